"""Lazy pyramids of a whole-slide image for napari (no Qt, no napari imports here).

A level of a slide is a :class:`dask.array.Array` whose chunks read their region through the
slide's reader (OpenSlide, tifffile or OME-Zarr, via :func:`wsi_hipe.slide.open_slide`) only
when napari slices them, so nothing ever holds a whole level in memory. Each block function
receives the slide *path* and opens (and caches) one handle per process, so the arrays also
work under any Dask scheduler.

Two kinds of pyramid:

* :func:`slide_pyramid` — the normalised stain (background ≈ 0, bright nuclei ≈ 1), as the
  model sees it; any slide.
* :func:`channel_pyramids` — the raw channels of a multi-channel fluorescence file (one
  pyramid per channel, values in the file's raw range), with each channel's name, colour and
  contrast limits from the metadata and a thumbnail.

Coordinates follow ``docs/INTERFACES.md``: a level of downsample ``d`` has pixel ``j`` covering
level-0 pixels ``[j·d, (j+1)·d)``, whose centre lies at level-0 pixel coordinate
``j·d + (d − 1)/2``. With ``m0`` the level-0 µm/px, a level's world transform in µm is
``scale = m0·d`` and ``translation = m0·(d − 1)/2``: :func:`wsi_hipe.tiling.pixel_transform`,
the project's one pixel-centre ⇄ µm transform.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.cache import ProcessCache
from wsi_hipe.tiling import PixelTransform, pixel_transform

__all__ = [
    "SlidePyramid",
    "ChannelPyramids",
    "slide_pyramid",
    "channel_pyramids",
    "slide_channels",
    "read_slide_chunk",
    "read_channel_chunk",
    "close_cached_slides",
]

logger = logging.getLogger(__name__)

#: Default side of a chunk of a lazy slide level, in pixels of that level.
DEFAULT_CHUNK = 512

#: The pyramid stops at the first level whose longer side is at most this many pixels.
DEFAULT_MIN_SIZE = 256

#: Slides kept open per process for lazy reads (least recently used ones are closed).
HANDLE_CACHE_SIZE = 8

#: The old name of :class:`wsi_hipe.tiling.PixelTransform` (the tests of the viewer use it).
LevelTransform = PixelTransform


@dataclass(frozen=True)
class SlidePyramid:
    """A lazy multiscale view of a slide's stain channel.

    Attributes
    ----------
    path : Path
        The slide file.
    levels : tuple of (H_k, W_k) float32 dask arrays
        Level ``k`` has downsample ``2**k``; values are the normalised stain (background ≈ 0,
        bright nuclei ≈ 1), as the model sees it.
    transforms : tuple of PixelTransform
        One per level, in µm.
    mpp : float
        µm per level-0 pixel used for the transforms.
    mpp_known : bool
        False when the slide has no µm/px metadata and no override was given; then ``mpp`` is
        1 and the world unit is the level-0 pixel.
    """

    path: Path
    levels: tuple[Any, ...]
    transforms: tuple[PixelTransform, ...]
    mpp: float
    mpp_known: bool = True

    @property
    def downsamples(self) -> tuple[int, ...]:
        """Level-0 pixels per pixel of each level."""
        return tuple(2**k for k in range(len(self.levels)))


# --- one slide handle per process ---------------------------------------------------------


class _SlideHandle:
    """A :class:`wsi_hipe.slide.Slide` opened for lazy reads, and the lock serialising them."""

    def __init__(self, slide: Any) -> None:
        self.slide = slide
        self.lock = threading.Lock()

    def close(self) -> None:
        """Drop the slide's reader once no read is in flight (a later read reopens it)."""
        with self.lock:
            close = getattr(self.slide, "close", None)
            if callable(close):
                close()


_HANDLES: ProcessCache[_SlideHandle] = ProcessCache(
    "napari slides", maxsize=HANDLE_CACHE_SIZE, close_evicted=True
)


def _plane_key(plane: Any) -> Any:
    """``plane`` as a hashable value (a mapping becomes sorted pairs)."""
    if isinstance(plane, dict):
        return tuple(sorted(plane.items()))
    return plane


def _plane_arg(plane: Any) -> Any:
    """The ``plane`` option back from :func:`_plane_key`."""
    return dict(plane) if isinstance(plane, tuple) else plane


def _slide_handle(
    path: str,
    mpp: float | None,
    channel: str | int,
    allow_brightfield: bool = False,
    reader: str = "auto",
    plane: Any = None,
) -> _SlideHandle:
    """The cached slide for ``path`` in this process (opened on first use)."""

    def open_it() -> _SlideHandle:
        from wsi_hipe.slide import open_slide

        logger.debug("opening %s for lazy reads", path)
        options: dict[str, Any] = {"mpp": mpp, "channel": channel}
        options["allow_brightfield"] = allow_brightfield
        if reader != "auto":
            options["reader"] = reader
        if plane is not None:
            options["plane"] = _plane_arg(plane)
        return _SlideHandle(open_slide(path, **options))

    key = (path, mpp, channel, allow_brightfield, reader, _plane_key(plane))
    return _HANDLES.get(key, open_it)


def close_cached_slides() -> None:
    """Close and forget every slide handle this process opened for lazy reads."""
    _HANDLES.clear()


def read_slide_chunk(
    path: str,
    y0: int,
    x0: int,
    height: int,
    width: int,
    *,
    downsample: int,
    mpp: float | None = None,
    channel: str | int = "auto",
    allow_brightfield: bool = False,
    reader: str = "auto",
    plane: Any = None,
) -> np.ndarray:
    """Read one chunk of a slide level (a pure function of its arguments).

    Parameters
    ----------
    path : str
        The slide file; its handle is opened once per process and cached.
    y0, x0 : int
        Top-left pixel of the chunk, in pixels of the level.
    height, width : int
        Chunk shape in pixels of the level.
    downsample : int
        Level-0 pixels per level pixel.
    mpp : float, optional
        µm per level-0 pixel, overriding the slide's metadata (needed when it has none).
    channel : "auto", "mean" or int, optional
        Stain channel of an RGB(A) slide.
    allow_brightfield : bool, optional
        Accept an RGB brightfield slide (inverted), as the run that made an output did.
    reader, plane : optional
        ``slide.reader`` and ``slide.plane`` (see :func:`wsi_hipe.slide.open_slide`).

    Returns
    -------
    (height, width) float32 ndarray
        The normalised stain; zero outside the slide.
    """
    handle = _slide_handle(path, mpp, channel, allow_brightfield, reader, plane)
    level_mpp = handle.slide.mpp * downsample
    with handle.lock:
        region = handle.slide.read(x0 * downsample, y0 * downsample, width, height, mpp=level_mpp)
    region = np.asarray(region, dtype=np.float32)
    if region.shape != (height, width):
        raise ValueError(
            f"slide.read returned shape {region.shape} for a {height}x{width} chunk of {path}"
        )
    return region


def _chunk_block(
    block_id: tuple[int, int] | None = None,
    *,
    path: str,
    level_chunks: tuple[tuple[int, ...], tuple[int, ...]],
    downsample: int,
    mpp: float | None,
    channel: str | int,
    allow_brightfield: bool,
    reader: str = "auto",
    plane: Any = None,
) -> np.ndarray:
    """Dask block function: the chunk at ``block_id`` of one level."""
    if block_id is None:  # dask probes block functions without a position
        return np.empty((0, 0), dtype=np.float32)
    row, col = block_id
    y0 = sum(level_chunks[0][:row])
    x0 = sum(level_chunks[1][:col])
    return read_slide_chunk(
        path,
        y0,
        x0,
        level_chunks[0][row],
        level_chunks[1][col],
        downsample=downsample,
        mpp=mpp,
        channel=channel,
        allow_brightfield=allow_brightfield,
        reader=reader,
        plane=plane,
    )


def _regular_chunks(size: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def _probe(
    path: Path,
    mpp: float | None,
    channel: str | int,
    allow_brightfield: bool,
    reader: str = "auto",
    plane: Any = None,
) -> tuple[int, int, float, float | None, bool]:
    """Open the slide once: level-0 ``(width, height)``, its µm/px, the mpp to read with, known.

    A slide without µm/px metadata (and no override) is placed in level-0 pixels (mpp 1).
    """
    from wsi_hipe.errors import MissingMppError
    from wsi_hipe.slide import open_slide

    options: dict[str, Any] = {"channel": channel, "allow_brightfield": allow_brightfield}
    options.update(reader=reader, plane=_plane_arg(plane))
    mpp_known = True
    try:
        slide = open_slide(str(path), mpp=mpp, **options)
    except MissingMppError:
        logger.warning(
            "%s has no µm/px metadata; showing it in level-0 pixels (pass mpp= to place it in µm)",
            path,
        )
        mpp, mpp_known = 1.0, False
        slide = open_slide(str(path), mpp=mpp, **options)
    try:
        width, height = (int(v) for v in slide.dimensions)
        m0 = float(slide.mpp)
    finally:
        close = getattr(slide, "close", None)
        if callable(close):
            close()
    return width, height, m0, mpp, mpp_known


def _lazy_level(
    path: Path, name: str, shape: tuple[int, int], chunk: int, downsample: int, **read: Any
) -> Any:
    """One lazy level: a dask array whose blocks read the slide (``read``: mpp, channel, ...)."""
    import dask.array as da

    chunks = (_regular_chunks(shape[0], chunk), _regular_chunks(shape[1], chunk))
    return da.map_blocks(
        _chunk_block,
        chunks=chunks,
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
        name=name,
        path=str(path),
        level_chunks=chunks,
        downsample=downsample,
        **read,
    )


def slide_pyramid(
    path: str | Path,
    *,
    mpp: float | None = None,
    channel: str | int = "auto",
    allow_brightfield: bool = False,
    chunk: int = DEFAULT_CHUNK,
    min_size: int = DEFAULT_MIN_SIZE,
    reader: str = "auto",
    plane: Any = None,
) -> SlidePyramid:
    """A lazy factor-2 pyramid of a slide's stain channel.

    Opens the slide once here (to learn its size and µm/px); the chunks open their own
    cached handle when napari first reads them.

    Parameters
    ----------
    path : str or Path
        A slide file (any format :func:`wsi_hipe.slide.open_slide` reads) or OME-Zarr image.
    mpp : float, optional
        µm per level-0 pixel, overriding the slide's metadata. When the slide has none and
        none is given, the pyramid is built in level-0 pixels (``mpp = 1``, ``mpp_known``
        False) and a warning is logged.
    channel : "auto", "mean" or int, optional
        Stain channel of an RGB(A) slide.
    allow_brightfield : bool, optional
        Accept an RGB brightfield slide (inverted) instead of raising StainError.
    chunk : int, optional
        Chunk side in pixels of each level (≥ 16).
    min_size : int, optional
        Stop at the first level whose longer side is ≤ ``min_size`` pixels (≥ 1).
    reader, plane : optional
        ``slide.reader`` and ``slide.plane`` (see :func:`wsi_hipe.slide.open_slide`).

    Returns
    -------
    SlidePyramid

    Raises
    ------
    wsi_hipe.errors.SlideNotFoundError, wsi_hipe.errors.SlideFormatError
        The path is missing or not a slide.
    """
    from dask.base import tokenize

    if chunk < 16:
        raise ValueError(f"chunk must be at least 16 px, got {chunk}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1 px, got {min_size}")
    path = Path(path)
    plane = _plane_key(plane)
    width, height, m0, mpp, mpp_known = _probe(path, mpp, channel, allow_brightfield, reader, plane)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = 0
    token = tokenize(
        str(path.resolve()), stamp, mpp, channel, allow_brightfield, chunk, reader, plane
    )
    read = {"mpp": mpp, "channel": channel, "allow_brightfield": allow_brightfield}
    read.update(reader=reader, plane=plane)
    levels, transforms = [], []
    downsample = 1
    while True:
        shape = (-(-height // downsample), -(-width // downsample))
        name = f"wsi-hipe-slide-{token}-{downsample}"
        levels.append(_lazy_level(path, name, shape, chunk, downsample, **read))
        transforms.append(pixel_transform(m0, downsample))
        if max(shape) <= min_size:
            break
        downsample *= 2
    logger.debug("lazy pyramid of %s: %d levels, level 0 %dx%d", path, len(levels), width, height)
    return SlidePyramid(
        path=path,
        levels=tuple(levels),
        transforms=tuple(transforms),
        mpp=m0,
        mpp_known=mpp_known,
    )


# --- raw channels of multi-channel files ------------------------------------------------------


@dataclass(frozen=True)
class ChannelPyramids:
    """Lazy multiscale views of the raw channels of a multi-channel fluorescence file.

    Attributes
    ----------
    path : Path
        The slide file or OME-Zarr image.
    channels : tuple of int
        The channel indices shown, in order.
    names : tuple of str
        Their names (``"channel k"`` where the file names none).
    colors : tuple of (float, float, float)
        Their display colours (RGB 0..1), from the metadata or a default per position.
    levels : tuple of tuples of (H_k, W_k) float32 dask arrays
        Per channel, level ``k`` with downsample ``2**k``; raw values (0..``raw_max``).
    contrast : tuple of (float, float)
        Per channel, contrast limits from a thumbnail's percentiles (raw values).
    transforms : tuple of PixelTransform
        One per level, in µm.
    mpp : float
        µm per level-0 pixel used for the transforms (1 when unknown: ``mpp_known`` False).
    stain : int or None
        The channel ``"auto"`` takes as the nuclear stain, if one is recognised by name.
    raw_max : float
        The raw range's top.
    """

    path: Path
    channels: tuple[int, ...]
    names: tuple[str, ...]
    colors: tuple[tuple[float, float, float], ...]
    levels: tuple[tuple[Any, ...], ...]
    contrast: tuple[tuple[float, float], ...]
    transforms: tuple[PixelTransform, ...]
    mpp: float
    mpp_known: bool
    stain: int | None
    raw_max: float


#: Display colours for channels whose metadata has none (the nuclear stain is blue).
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 255, 0), (255, 0, 0), (255, 0, 255), (255, 255, 0), (0, 255, 255), (255, 128, 0),
)  # fmt: skip
#: Percentiles of a channel's thumbnail used as its contrast limits.
CONTRAST_PERCENTILES = (0.5, 99.8)
#: Longer side (px) of the thumbnail a channel's contrast limits are taken from.
CONTRAST_THUMBNAIL = 512


def slide_channels(path: str | Path, *, reader: str = "auto", plane: Any = None) -> Any:
    """The channel reader of ``path`` when it is a multi-channel (non-RGB) file, else None.

    A file of one channel (a gray TIFF) or RGB (read by OpenSlide, or an RGB TIFF) is shown as
    its stain (:func:`slide_pyramid`); only files with several channels are shown per channel.
    """
    from wsi_hipe.slide import ChannelReader, cached_reader

    opened = cached_reader(str(Path(path).resolve()), reader=reader, plane=_plane_arg(plane))
    if isinstance(opened, ChannelReader) and not opened.is_rgb and len(opened.channels) > 1:
        return opened
    return None


def read_channel_chunk(
    path: str,
    y0: int,
    x0: int,
    height: int,
    width: int,
    *,
    downsample: int,
    channel: int,
    reader: str = "auto",
    plane: Any = None,
) -> np.ndarray:
    """One chunk of a raw channel at a level (a pure function of its arguments).

    Returns
    -------
    (height, width) float32 ndarray
        Raw values, box-filtered from the file's nearest finer level; zero outside the image.
    """
    from wsi_hipe.slide import cached_reader
    from wsi_hipe.slide._multichannel import read_channel_resampled

    opened = cached_reader(path, reader=reader, plane=_plane_arg(plane))
    ds = float(downsample)
    region = read_channel_resampled(opened, x0 * ds, y0 * ds, width, height, ds, channel)
    if region.shape != (height, width):
        raise ValueError(f"read {region.shape} for a {height}x{width} chunk of {path}")
    return region


def _channel_block(
    block_id: tuple[int, int] | None = None,
    *,
    path: str,
    level_chunks: tuple[tuple[int, ...], tuple[int, ...]],
    downsample: int,
    channel: int,
    reader: str,
    plane: Any,
) -> np.ndarray:
    """Dask block function: the chunk at ``block_id`` of one raw channel level."""
    if block_id is None:
        return np.empty((0, 0), dtype=np.float32)
    row, col = block_id
    return read_channel_chunk(
        path,
        sum(level_chunks[0][:row]),
        sum(level_chunks[1][:col]),
        level_chunks[0][row],
        level_chunks[1][col],
        downsample=downsample,
        channel=channel,
        reader=reader,
        plane=plane,
    )


def _contrast(thumb: np.ndarray, raw_max: float) -> tuple[float, float]:
    lo_p, hi_p = CONTRAST_PERCENTILES
    low, high = (float(v) for v in np.percentile(thumb, [lo_p, hi_p]))
    if not high > low:
        high = low + max(raw_max / 255.0, 1e-6)
    return low, high


def channel_pyramids(
    path: str | Path,
    *,
    channels: Any = None,
    mpp: float | None = None,
    reader: str = "auto",
    plane: Any = None,
    chunk: int = DEFAULT_CHUNK,
    min_size: int = DEFAULT_MIN_SIZE,
) -> ChannelPyramids:
    """Lazy factor-2 pyramids of the raw channels of a multi-channel file.

    Parameters
    ----------
    path : str or Path
        A multi-channel OME-TIFF, QPTIFF, TIFF or OME-Zarr image.
    channels : sequence of int or str, optional
        The channels to show (indices or names, see :func:`wsi_hipe.slide.select_channels`);
        default: all.
    mpp : float, optional
        µm per level-0 px, overriding the metadata; without either the pyramids are placed
        in level-0 pixels (``mpp_known`` False).
    reader, plane : optional
        ``slide.reader`` and ``slide.plane``.
    chunk, min_size : int, optional
        As for :func:`slide_pyramid`.

    Raises
    ------
    ValueError
        ``path`` is not a multi-channel file (see :func:`slide_channels`).
    """
    from dask.base import tokenize

    from wsi_hipe.errors import StainError
    from wsi_hipe.slide import select_channel, select_channels
    from wsi_hipe.slide._multichannel import channel_thumbnail

    if chunk < 16:
        raise ValueError(f"chunk must be at least 16 px, got {chunk}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1 px, got {min_size}")
    path = Path(path)
    plane = _plane_key(plane)
    opened = slide_channels(path, reader=reader, plane=plane)
    if opened is None:
        raise ValueError(f"{path} is not a multi-channel file; show it with slide_pyramid")
    infos = opened.channels
    if channels is None:
        shown = tuple(range(len(infos)))
    else:
        shown, _ = select_channels(list(channels), infos, path=opened.path)
    try:
        stain: int | None = select_channel("auto", infos, path=opened.path)[0]
    except StainError:
        stain = None
    m0 = mpp if mpp is not None else opened.mpp
    mpp_known = m0 is not None
    if not mpp_known:
        logger.warning(
            "%s has no usable µm/px metadata; showing it in level-0 pixels (pass mpp=)", path
        )
        m0 = 1.0
    width, height = opened.dimensions
    raw_max = float(opened.raw_max)
    names, colors, contrast, levels = [], [], [], []
    other = 0
    for c in shown:
        info = infos[c]
        names.append(info.name or f"channel {c}")
        if info.color is not None and any(info.color):
            rgb = info.color
        elif c == stain:
            rgb = (0, 0, 255)
        else:
            rgb = DEFAULT_COLORS[other % len(DEFAULT_COLORS)]
            other += 1
        colors.append(tuple(v / 255.0 for v in rgb))
        contrast.append(_contrast(channel_thumbnail(opened, CONTRAST_THUMBNAIL, c), raw_max))
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = 0
    token = tokenize(str(path.resolve()), stamp, reader, plane, chunk)
    import dask.array as da

    transforms = []
    downsample = 1
    shapes = []
    while True:
        shape = (-(-height // downsample), -(-width // downsample))
        shapes.append((downsample, shape))
        transforms.append(pixel_transform(float(m0), downsample))
        if max(shape) <= min_size:
            break
        downsample *= 2
    for c in shown:
        per_level = []
        for ds, shape in shapes:
            chunks = (_regular_chunks(shape[0], chunk), _regular_chunks(shape[1], chunk))
            per_level.append(
                da.map_blocks(
                    _channel_block,
                    chunks=chunks,
                    dtype=np.float32,
                    meta=np.empty((0, 0), dtype=np.float32),
                    name=f"wsi-hipe-channel-{token}-{c}-{ds}",
                    path=str(path.resolve()),
                    level_chunks=chunks,
                    downsample=ds,
                    channel=int(c),
                    reader=reader,
                    plane=plane,
                )
            )
        levels.append(tuple(per_level))
    return ChannelPyramids(
        path=path,
        channels=tuple(int(c) for c in shown),
        names=tuple(names),
        colors=tuple(colors),  # type: ignore[arg-type]
        levels=tuple(levels),
        contrast=tuple(contrast),
        transforms=tuple(transforms),
        mpp=float(m0),
        mpp_known=mpp_known,
        stain=stain,
        raw_max=raw_max,
    )
