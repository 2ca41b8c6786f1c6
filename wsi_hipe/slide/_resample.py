"""Reading any :class:`SlideReader` at a target resolution (level choice and box filter).

With ``s = mpp / slide.mpp`` level-0 px per target px, :func:`read_resampled` picks the pyramid
level with the largest downsample ``<= s·(1 + LEVEL_RTOL)``, reads the covering window there,
and resamples only when the remaining factor differs from 1 (or the region does not start on a
level pixel): each target pixel is the exact area-weighted mean of the level pixels under its
footprint (box filter; for upsampling, the covering pixel(s)). Regions beyond the slide read as
0. Regions larger than ``BLOCK_SIDE`` source px are read in blocks, so memory stays bounded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from wsi_hipe.slide._protocol import SlideReader

__all__ = [
    "LEVEL_RTOL",
    "BLOCK_SIDE",
    "Extract",
    "as_float",
    "pick_level",
    "read_resampled",
    "reader_thumbnail",
    "thumbnail_geometry",
]

#: Relative tolerance when matching a level downsample to the wanted scale.
LEVEL_RTOL = 1e-3
#: Largest source window side (px) read in one piece; bigger regions are read in blocks.
BLOCK_SIDE = 2048

#: Maps premultiplied RGBA uint8 (h, w, 4) to float32 (h, w[, c]) values in 0..255.
Extract = Callable[[np.ndarray], np.ndarray]


def pick_level(downsamples: Sequence[float], scale: float) -> int:
    """Index of the level with the largest downsample ``<= scale·(1 + LEVEL_RTOL)``."""
    best = 0
    for i, d in enumerate(downsamples):
        if d <= scale * (1 + LEVEL_RTOL) and d >= downsamples[best]:
            best = i
    return best


@functools.lru_cache(maxsize=256)
def _area_weights(start: float, ratio: float, n_out: int, n_in: int) -> Any:
    """Sparse (n_out, n_in) box-filter weights (cached: tiles of a grid share a few offsets).

    Output px ``i`` covers source ``[start + i·ratio, start + (i+1)·ratio)``; source px ``j``
    covers ``[j, j+1)``; weight = overlap / ratio (rows sum to 1 where the source is present).
    """
    from scipy import sparse

    a = start + np.arange(n_out, dtype=np.float64) * ratio
    b = a + ratio
    k = int(math.ceil(ratio)) + 1
    j = np.floor(a).astype(np.int64)[:, None] + np.arange(k)[None, :]
    overlap = np.minimum(b[:, None], j + 1.0) - np.maximum(a[:, None], j.astype(np.float64))
    rows = np.broadcast_to(np.arange(n_out)[:, None], j.shape)
    keep = (overlap > 1e-12) & (j >= 0) & (j < n_in)
    return sparse.csr_matrix(
        ((overlap[keep] / ratio).astype(np.float32), (rows[keep], j[keep])), shape=(n_out, n_in)
    )


def _read_window(
    reader: SlideReader,
    level: int,
    window: tuple[int, int, int, int],
    extract: Extract,
) -> np.ndarray:
    """Level px ``window`` = (x0, y0, x1, y1) of ``level``, extracted; zeros off the slide."""
    ds = reader.level_downsamples[level]
    lw, lh = reader.level_dimensions[level]
    jx0, jy0, jx1, jy1 = window
    cx0, cy0, cx1, cy1 = max(jx0, 0), max(jy0, 0), min(jx1, lw), min(jy1, lh)
    if (cx0, cy0, cx1, cy1) == window:  # the whole window lies on the slide: no padding, no copy
        location = (int(round(jx0 * ds)), int(round(jy0 * ds)))
        return extract(reader.read_region(location, level, (jx1 - jx0, jy1 - jy0)))
    probe = extract(np.zeros((1, 1, 4), dtype=np.uint8))
    out = np.zeros((jy1 - jy0, jx1 - jx0, *probe.shape[2:]), dtype=np.float32)
    if cx1 > cx0 and cy1 > cy0:
        location = (int(round(cx0 * ds)), int(round(cy0 * ds)))
        rgba = reader.read_region(location, level, (cx1 - cx0, cy1 - cy0))
        out[cy0 - jy0 : cy1 - jy0, cx0 - jx0 : cx1 - jx0] = extract(rgba)
    return out


def _read_block(
    reader: SlideReader,
    x0: float,
    y0: float,
    width: int,
    height: int,
    scale: float,
    level: int,
    extract: Extract,
) -> np.ndarray:
    """One block: read the covering window of ``level`` and resample it to (height, width)."""
    ds = reader.level_downsamples[level]
    ratio = scale / ds  # level px per output px
    ax, ay = x0 / ds, y0 / ds  # region start in level px
    direct = (
        abs(ratio - 1.0) <= LEVEL_RTOL
        and abs(ax - round(ax)) <= 1e-6
        and abs(ay - round(ay)) <= 1e-6
    )
    if direct:
        jx0, jy0 = round(ax), round(ay)
        jx1, jy1 = jx0 + width, jy0 + height
    else:
        jx0, jy0 = math.floor(ax), math.floor(ay)
        jx1 = math.ceil(ax + width * ratio - 1e-9)
        jy1 = math.ceil(ay + height * ratio - 1e-9)
    window = _read_window(reader, level, (jx0, jy0, jx1, jy1), extract)
    if direct:
        return window
    wy = _area_weights(ay - jy0, ratio, height, window.shape[0])
    wx = _area_weights(ax - jx0, ratio, width, window.shape[1])
    flat = window.reshape(window.shape[0], window.shape[1], -1)
    out = np.empty((height, width, flat.shape[2]), dtype=np.float32)
    for c in range(flat.shape[2]):
        out[..., c] = (wx @ (wy @ flat[..., c]).T).T
    return out.reshape(height, width, *window.shape[2:])


def read_resampled(
    reader: SlideReader,
    x0: float,
    y0: float,
    width: int,
    height: int,
    scale: float,
    extract: Extract,
) -> np.ndarray:
    """Region at ``scale`` level-0 px per output px, read in blocks of bounded size.

    ``(x0, y0)`` is the region's top-left corner in level-0 px; the result is
    ``(height, width[, c])`` float32, as ``extract`` makes it.
    """
    level = pick_level(reader.level_downsamples, scale)
    ratio = scale / reader.level_downsamples[level]
    step = max(1, int(BLOCK_SIDE / max(ratio, 1.0)))
    if width <= step and height <= step:
        return _read_block(reader, x0, y0, width, height, scale, level, extract)
    probe = extract(np.zeros((1, 1, 4), dtype=np.uint8))
    out = np.empty((height, width, *probe.shape[2:]), dtype=np.float32)
    for i in range(0, height, step):
        for j in range(0, width, step):
            h, w = min(step, height - i), min(step, width - j)
            out[i : i + h, j : j + w] = _read_block(
                reader, x0 + j * scale, y0 + i * scale, w, h, scale, level, extract
            )
    return out


def as_float(rgba: np.ndarray) -> np.ndarray:
    """The :data:`Extract` that keeps all four RGBA channels."""
    return rgba.astype(np.float32)


def thumbnail_geometry(dimensions: tuple[int, int], max_size: int) -> tuple[float, int, int]:
    """``(scale, width, height)``: level-0 px per thumbnail px and the thumbnail size."""
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer (px), got {max_size!r}")
    w0, h0 = dimensions
    scale = max(1.0, max(w0, h0) / max_size)
    return scale, max(1, math.ceil(w0 / scale - 1e-9)), max(1, math.ceil(h0 / scale - 1e-9))


def reader_thumbnail(reader: SlideReader, max_size: int) -> np.ndarray:
    """Premultiplied RGBA thumbnail (h, w, 4) uint8 of ``reader``, longer side ``<= max_size``."""
    scale, w, h = thumbnail_geometry(reader.dimensions, max_size)
    rgba = read_resampled(reader, 0.0, 0.0, w, h, scale, as_float)
    return np.clip(np.round(rgba), 0, 255).astype(np.uint8)
