"""Lazy pyramids of a whole-slide image for napari (no Qt, no napari imports here).

A level of a slide is a :class:`dask.array.Array` whose chunks read their region through
OpenSlide (via :func:`wsi_hipe.slide.open_slide`) only when napari slices them, so nothing
ever holds a whole level in memory. Each block function receives the slide *path* and opens
(and caches) one handle per process, so the arrays also work under any Dask scheduler.

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
    "slide_pyramid",
    "read_slide_chunk",
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


def _slide_handle(
    path: str, mpp: float | None, channel: str | int, allow_brightfield: bool = False
) -> _SlideHandle:
    """The cached slide for ``path`` in this process (opened on first use)."""

    def open_it() -> _SlideHandle:
        from wsi_hipe.slide import open_slide

        logger.debug("opening %s for lazy reads", path)
        return _SlideHandle(
            open_slide(path, mpp=mpp, channel=channel, allow_brightfield=allow_brightfield)
        )

    return _HANDLES.get((path, mpp, channel, allow_brightfield), open_it)


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

    Returns
    -------
    (height, width) float32 ndarray
        The normalised stain; zero outside the slide.
    """
    handle = _slide_handle(path, mpp, channel, allow_brightfield)
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
    )


def _regular_chunks(size: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def _probe(
    path: Path, mpp: float | None, channel: str | int, allow_brightfield: bool
) -> tuple[int, int, float, float | None, bool]:
    """Open the slide once: level-0 ``(width, height)``, its µm/px, the mpp to read with, known.

    A slide without µm/px metadata (and no override) is placed in level-0 pixels (mpp 1).
    """
    from wsi_hipe.errors import MissingMppError
    from wsi_hipe.slide import open_slide

    mpp_known = True
    try:
        slide = open_slide(str(path), mpp=mpp, channel=channel, allow_brightfield=allow_brightfield)
    except MissingMppError:
        logger.warning(
            "%s has no µm/px metadata; showing it in level-0 pixels (pass mpp= to place it in µm)",
            path,
        )
        mpp, mpp_known = 1.0, False
        slide = open_slide(str(path), mpp=mpp, channel=channel, allow_brightfield=allow_brightfield)
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
) -> SlidePyramid:
    """A lazy factor-2 pyramid of a slide's stain channel.

    Opens the slide once here (to learn its size and µm/px); the chunks open their own
    cached handle when napari first reads them.

    Parameters
    ----------
    path : str or Path
        A slide OpenSlide can open.
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
    width, height, m0, mpp, mpp_known = _probe(path, mpp, channel, allow_brightfield)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = 0
    token = tokenize(str(path.resolve()), stamp, mpp, channel, allow_brightfield, chunk)
    read = {"mpp": mpp, "channel": channel, "allow_brightfield": allow_brightfield}
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
