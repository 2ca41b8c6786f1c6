"""Lazy pyramids of a whole-slide image for napari (no Qt, no napari imports here).

A level of a slide is a :class:`dask.array.Array` whose chunks read their region through
OpenSlide (via :func:`wsi_hipe.slide.open_slide`) only when napari slices them, so nothing
ever holds a whole level in memory. Each block function receives the slide *path* and opens
(and caches) one handle per process, so the arrays also work under any Dask scheduler.

Coordinates follow ``docs/INTERFACES.md``: a level of downsample ``d`` has pixel ``j`` covering
level-0 pixels ``[j·d, (j+1)·d)``, whose centre lies at level-0 pixel coordinate
``j·d + (d − 1)/2``. With ``m0`` the level-0 µm/px, a level's world transform in µm is
``scale = m0·d`` and ``translation = m0·(d − 1)/2`` (see :func:`level_transform`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LevelTransform",
    "SlidePyramid",
    "level_transform",
    "slide_pyramid",
    "read_slide_chunk",
]

logger = logging.getLogger(__name__)

#: Default side of a chunk of a lazy slide level, in pixels of that level.
DEFAULT_CHUNK = 512

#: The pyramid stops at the first level whose longer side is at most this many pixels.
DEFAULT_MIN_SIZE = 256


@dataclass(frozen=True)
class LevelTransform:
    """Where one pyramid level sits in the world, in micrometres.

    Attributes
    ----------
    scale : (2,) tuple of float
        µm per pixel along (y, x).
    translation : (2,) tuple of float
        World position (y, x) in µm of the centre of the level's pixel (0, 0).
    """

    scale: tuple[float, float]
    translation: tuple[float, float]

    def to_world(self, y: float, x: float) -> tuple[float, float]:
        """World (y, x) in µm of the level pixel coordinate ``(y, x)`` (pixel centres integral)."""
        return (
            self.translation[0] + y * self.scale[0],
            self.translation[1] + x * self.scale[1],
        )

    def to_pixel(self, y_um: float, x_um: float) -> tuple[float, float]:
        """Level pixel coordinate (y, x) of the world point ``(y_um, x_um)`` in µm."""
        return (
            (y_um - self.translation[0]) / self.scale[0],
            (x_um - self.translation[1]) / self.scale[1],
        )


def level_transform(mpp: float, downsample: float = 1.0) -> LevelTransform:
    """The world transform of a slide level, pixel centres aligned with level 0.

    Parameters
    ----------
    mpp : float
        µm per level-0 pixel (> 0).
    downsample : float, optional
        Level-0 pixels per pixel of this level (> 0; below 1 for a finer grid).

    Returns
    -------
    LevelTransform
        ``scale = mpp·downsample`` and ``translation = mpp·(downsample − 1)/2`` on both axes.
    """
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    if not (downsample > 0 and math.isfinite(downsample)):
        raise ValueError(f"downsample must be > 0 (level-0 px per level px), got {downsample!r}")
    scale = float(mpp * downsample)
    offset = float(mpp * (downsample - 1) / 2)
    return LevelTransform(scale=(scale, scale), translation=(offset, offset))


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
    transforms : tuple of LevelTransform
        One per level, in µm.
    mpp : float
        µm per level-0 pixel used for the transforms.
    mpp_known : bool
        False when the slide has no µm/px metadata and no override was given; then ``mpp`` is
        1 and the world unit is the level-0 pixel.
    """

    path: Path
    levels: tuple[Any, ...]
    transforms: tuple[LevelTransform, ...]
    mpp: float
    mpp_known: bool = True

    @property
    def downsamples(self) -> tuple[int, ...]:
        """Level-0 pixels per pixel of each level."""
        return tuple(2**k for k in range(len(self.levels)))


# --- one slide handle per process ---------------------------------------------------------

_HANDLES: dict[tuple[Any, ...], tuple[Any, threading.Lock]] = {}
_HANDLES_LOCK = threading.Lock()


def _slide_handle(
    path: str, mpp: float | None, channel: str | int, allow_brightfield: bool = False
) -> tuple[Any, threading.Lock]:
    """The cached :class:`wsi_hipe.slide.Slide` for ``path`` in this process, and its lock."""
    key = (os.getpid(), path, mpp, channel, allow_brightfield)
    with _HANDLES_LOCK:
        entry = _HANDLES.get(key)
        if entry is None:
            from wsi_hipe.slide import open_slide

            logger.debug("opening %s for lazy reads (pid %d)", path, os.getpid())
            slide = open_slide(path, mpp=mpp, channel=channel, allow_brightfield=allow_brightfield)
            entry = (slide, threading.Lock())
            _HANDLES[key] = entry
    return entry


def close_cached_slides() -> None:
    """Close and forget every slide handle this process opened for lazy reads."""
    with _HANDLES_LOCK:
        entries = list(_HANDLES.values())
        _HANDLES.clear()
    for slide, _lock in entries:
        close = getattr(slide, "close", None)
        if callable(close):
            close()


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
    slide, lock = _slide_handle(path, mpp, channel, allow_brightfield)
    level_mpp = slide.mpp * downsample
    with lock:
        region = slide.read(x0 * downsample, y0 * downsample, width, height, mpp=level_mpp)
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
    import dask.array as da
    from dask.base import tokenize

    from wsi_hipe.errors import MissingMppError
    from wsi_hipe.slide import open_slide

    if chunk < 16:
        raise ValueError(f"chunk must be at least 16 px, got {chunk}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1 px, got {min_size}")
    path = Path(path)
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

    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = 0
    token = tokenize(str(path.resolve()), stamp, mpp, channel, allow_brightfield, chunk)
    levels = []
    transforms = []
    downsample = 1
    while True:
        h = -(-height // downsample)
        w = -(-width // downsample)
        chunks = (_regular_chunks(h, chunk), _regular_chunks(w, chunk))
        level = da.map_blocks(
            _chunk_block,
            chunks=chunks,
            dtype=np.float32,
            meta=np.empty((0, 0), dtype=np.float32),
            name=f"wsi-hipe-slide-{token}-{downsample}",
            path=str(path),
            level_chunks=chunks,
            downsample=downsample,
            mpp=mpp,
            channel=channel,
            allow_brightfield=allow_brightfield,
        )
        levels.append(level)
        transforms.append(level_transform(m0, downsample))
        if max(h, w) <= min_size:
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
