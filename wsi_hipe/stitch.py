"""Stitching tiles into a canvas and 2× downsampling for image pyramids (pure NumPy).

A tile of the pipeline is read with a *halo* of context on every side; only its *core* is kept.
This module cuts the core out of a halo tile (:func:`crop_core`), places a core at its target-px
position on a canvas, clipped at the canvas border (:func:`place_tile`, :func:`stitch_tiles`), and
halves an array for the next pyramid level (:func:`downsample_mean` for continuous maps such as
saliency, :func:`downsample_mode` for label images).

Arrays are indexed ``[y, x]``; positions are given as ``(y, x)`` of the core's top-left pixel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

__all__ = [
    "clip_box",
    "crop_core",
    "place_tile",
    "stitch_tiles",
    "downsample_mean",
    "downsample_mode",
    "downsampled_shape",
]

logger = logging.getLogger(__name__)


def _as_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        pair = (int(value), int(value))
    else:
        pair = tuple(int(v) for v in value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a (y, x) pair, got {value!r}")
    if min(pair) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return pair  # type: ignore[return-value]


def crop_core(tile, halo: int | tuple[int, int], *, core_shape: tuple[int, int] | None = None):
    """Cut the core out of a tile that was read with a halo.

    Parameters
    ----------
    tile : (..., H, W) ndarray or torch.Tensor
        A tile of ``core + 2·halo`` px per side (any leading axes are kept).
    halo : int or (int, int)
        Context px on each side, the same for top/bottom (first value) and left/right (second).
    core_shape : (int, int), optional
        Shape ``(h, w)`` of the core to keep, e.g. a core clipped at the slide border; default
        ``(H − 2·halo_y, W − 2·halo_x)``. It must fit inside the tile after the halo.

    Returns
    -------
    core : (..., h, w) view of ``tile``
    """
    hy, hx = _as_pair(halo, "halo")
    height, width = int(tile.shape[-2]), int(tile.shape[-1])
    full = (height - 2 * hy, width - 2 * hx)
    if min(full) <= 0:
        raise ValueError(
            f"halo {halo!r} leaves no core in a tile of shape {tuple(tile.shape)}; "
            "the tile must be larger than 2·halo on both axes"
        )
    if core_shape is None:
        core_shape = full
    ch, cw = (int(v) for v in core_shape)
    if not (0 < ch <= full[0] and 0 < cw <= full[1]):
        raise ValueError(
            f"core_shape {tuple(core_shape)} does not fit in tile {tuple(tile.shape)} "
            f"with halo {halo!r} (at most {full})"
        )
    return tile[..., hy : hy + ch, hx : hx + cw]


def clip_box(y: int, x: int, height: int, width: int, shape: tuple[int, int]):
    """Clip a box at ``(y, x)`` of size ``(height, width)`` to an array of ``shape``.

    Returns
    -------
    (dst, src) : pair of ``(slice, slice)`` or None
        ``canvas[dst] = core[src]`` copies the part of the box inside the array; None when the box
        lies entirely outside it.
    """
    y, x, height, width = int(y), int(x), int(height), int(width)
    if height < 0 or width < 0:
        raise ValueError(f"box size must be >= 0, got height={height}, width={width}")
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + height, int(shape[0])), min(x + width, int(shape[1]))
    if y1 <= y0 or x1 <= x0:
        return None
    dst = (slice(y0, y1), slice(x0, x1))
    src = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    return dst, src


def place_tile(canvas: np.ndarray, core, y: int, x: int) -> tuple[slice, slice] | None:
    """Write ``core`` into ``canvas`` with its top-left pixel at ``(y, x)``, clipped at the border.

    Parameters
    ----------
    canvas : (..., H, W) ndarray
        Modified in place.
    core : (..., h, w) array-like
        Leading axes must broadcast to the canvas's.
    y, x : int
        Target-px position of ``core[..., 0, 0]``; may be negative or run past the border.

    Returns
    -------
    dst : (slice, slice) or None
        The canvas region written, None when the core lies outside the canvas.
    """
    core = np.asarray(core)
    boxes = clip_box(y, x, core.shape[-2], core.shape[-1], canvas.shape[-2:])
    if boxes is None:
        return None
    dst, src = boxes
    canvas[(..., *dst)] = core[(..., *src)]
    return dst


def stitch_tiles(
    tiles: Iterable[tuple[int, int, np.ndarray]],
    shape: tuple[int, int],
    *,
    dtype=None,
    fill: float = 0,
) -> np.ndarray:
    """Assemble tile cores into one in-memory array.

    Parameters
    ----------
    tiles : iterable of (y, x, core)
        ``core`` is a (h, w) array (already cut out of its halo, see :func:`crop_core`) whose
        top-left pixel goes to ``(y, x)``; cores running past ``shape`` are clipped. Later tiles
        overwrite earlier ones where they overlap.
    shape : (int, int)
        ``(H, W)`` of the result.
    dtype : numpy dtype, optional
        Default: the dtype of the first core (float32 when there is none).
    fill : scalar
        Value of pixels no tile covers.

    Returns
    -------
    (H, W) ndarray
    """
    shape = tuple(int(v) for v in shape)
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"shape must be (H, W) with H, W >= 0, got {shape!r}")
    canvas = None
    for y, x, core in tiles:
        core = np.asarray(core)
        if core.ndim != 2:
            raise ValueError(f"each core must be a 2-D (h, w) array, got shape {core.shape}")
        if canvas is None:
            canvas = np.full(shape, fill, dtype=dtype if dtype is not None else core.dtype)
        place_tile(canvas, core, y, x)
    if canvas is None:
        canvas = np.full(shape, fill, dtype=dtype if dtype is not None else np.float32)
    return canvas


def downsampled_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape after one 2× step: every axis halved, rounding up (``ceil(n / 2)``)."""
    return tuple((int(n) + 1) // 2 for n in shape)


def _check_2d(block: np.ndarray, name: str) -> np.ndarray:
    block = np.asarray(block)
    if block.ndim != 2:
        raise ValueError(f"{name} expects a 2-D (H, W) array, got shape {block.shape}")
    if block.size == 0:
        raise ValueError(f"{name} expects a non-empty array, got shape {block.shape}")
    return block


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """Halve a 2-D array by averaging 2×2 blocks.

    An odd last row or column forms partial blocks at the bottom/right border; each takes the mean
    of the pixels it does have (1 or 2), so a constant image stays constant and no border is
    darkened by padding.

    Parameters
    ----------
    block : (H, W) float or integer ndarray

    Returns
    -------
    (ceil(H/2), ceil(W/2)) float32 ndarray
        Sums are taken in float32 for float32 input (float64 otherwise).
    """
    block = _check_2d(block, "downsample_mean")
    acc = np.float32 if block.dtype in (np.float16, np.float32) else np.float64
    a = block.astype(acc, copy=False)
    height, width = a.shape
    h2, w2 = height // 2, width // 2
    out = np.empty(downsampled_shape(a.shape), acc)
    if h2 and w2:
        out[:h2, :w2] = a[0 : 2 * h2 : 2, 0 : 2 * w2 : 2]
        out[:h2, :w2] += a[1 : 2 * h2 : 2, 0 : 2 * w2 : 2]
        out[:h2, :w2] += a[0 : 2 * h2 : 2, 1 : 2 * w2 : 2]
        out[:h2, :w2] += a[1 : 2 * h2 : 2, 1 : 2 * w2 : 2]
        out[:h2, :w2] *= 0.25
    if width % 2 and h2:  # right column: 2×1 blocks
        out[:h2, w2] = (a[0 : 2 * h2 : 2, -1] + a[1 : 2 * h2 : 2, -1]) * 0.5
    if height % 2 and w2:  # bottom row: 1×2 blocks
        out[h2, :w2] = (a[-1, 0 : 2 * w2 : 2] + a[-1, 1 : 2 * w2 : 2]) * 0.5
    if height % 2 and width % 2:
        out[h2, w2] = a[-1, -1]
    return out.astype(np.float32, copy=False)


def _mode4(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray) -> np.ndarray:
    """Elementwise mode of four label arrays, ties to the largest label."""
    e01, e02, e03 = c0 == c1, c0 == c2, c0 == c3
    e12, e13, e23 = c1 == c2, c1 == c3, c2 == c3
    votes = (
        e01.astype(np.int8) + e02 + e03,
        e01.astype(np.int8) + e12 + e13,
        e02.astype(np.int8) + e12 + e23,
        e03.astype(np.int8) + e13 + e23,
    )
    best, best_votes = c0.copy(), votes[0]
    for cand, v in zip((c1, c2, c3), votes[1:], strict=True):
        better = (v > best_votes) | ((v == best_votes) & (cand > best))
        best = np.where(better, cand, best)
        best_votes = np.where(better, v, best_votes)
    return best


def downsample_mode(block: np.ndarray) -> np.ndarray:
    """Halve a 2-D label image by taking the most frequent label of each 2×2 block.

    Ties go to the **largest** label value: a 2–2 split between background (0) and a class keeps
    the class, so thin structures (one-pixel-wide membranes, small cells) survive downsampling;
    between two classes the higher label wins (for the segmentation, nucleus = 2 over lymphocyte
    = 1). Partial blocks at an odd bottom/right border take the mode of the pixels they have
    (for two pixels: the larger one, as they either agree or tie).

    Parameters
    ----------
    block : (H, W) integer or bool ndarray

    Returns
    -------
    (ceil(H/2), ceil(W/2)) ndarray of the input dtype
    """
    block = _check_2d(block, "downsample_mode")
    if not (np.issubdtype(block.dtype, np.integer) or block.dtype == np.bool_):
        raise ValueError(f"downsample_mode expects integer labels, got dtype {block.dtype}")
    a = block
    height, width = a.shape
    h2, w2 = height // 2, width // 2
    out = np.empty(downsampled_shape(a.shape), a.dtype)
    if h2 and w2:
        out[:h2, :w2] = _mode4(
            a[0 : 2 * h2 : 2, 0 : 2 * w2 : 2],
            a[0 : 2 * h2 : 2, 1 : 2 * w2 : 2],
            a[1 : 2 * h2 : 2, 0 : 2 * w2 : 2],
            a[1 : 2 * h2 : 2, 1 : 2 * w2 : 2],
        )
    if width % 2 and h2:
        out[:h2, w2] = np.maximum(a[0 : 2 * h2 : 2, -1], a[1 : 2 * h2 : 2, -1])
    if height % 2 and w2:
        out[h2, :w2] = np.maximum(a[-1, 0 : 2 * w2 : 2], a[-1, 1 : 2 * w2 : 2])
    if height % 2 and width % 2:
        out[h2, w2] = a[-1, -1]
    return out
