"""Pyramid levels of an output: their shapes, their arrays, and building them chunk by chunk.

Levels halve with ``ceil`` (a partial edge block keeps its pixels): saliency by a 2×2 mean,
labels by a 2×2 mode with ties to the larger label (:mod:`wsi_hipe.stitch`). A level is computed
from the one above it, one output chunk (2×2 source chunks) at a time per thread, so memory
stays bounded whatever the output size.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..stitch import downsample_mean, downsample_mode, downsampled_shape
from ._metadata import as_chunk, as_shape, dataset_paths

__all__ = ["pyramid_shapes"]


def pyramid_shapes(
    shape: tuple[int, int], chunk: int | tuple[int, int], levels: int | None = None
) -> list[tuple[int, int]]:
    """Shapes of the pyramid levels: level 0, then ``ceil`` halving.

    Parameters
    ----------
    shape : (H, W)
        Level-0 shape in px.
    chunk : int or (int, int)
        Chunk (tile core) size; with ``levels=None`` levels are added until the largest side is
        ``<= max(chunk)``.
    levels : int, optional
        Exact number of levels (>= 1), level 0 included; the halving stops early at 1×1.

    Returns
    -------
    list of (h, w)
    """
    shape = as_shape(shape)
    limit = max(as_chunk(chunk))
    if levels is not None and (not isinstance(levels, (int, np.integer)) or levels < 1):
        raise ValueError(f"levels must be an int >= 1 or None, got {levels!r}")
    shapes = [shape]
    while True:
        current = shapes[-1]
        if levels is not None:
            if len(shapes) >= levels or max(current) <= 1:
                break
        elif max(current) <= limit:
            break
        shapes.append(downsampled_shape(current))  # type: ignore[arg-type]
    return shapes


def create_level(
    group: Any, name: str, shape: tuple[int, int], chunk: tuple[int, int], zarr_format: int, dtype
) -> Any:
    """An empty level array (fill 0, chunks ``chunk`` clipped to ``shape``), replacing any old one.

    Zarr v2 arrays use "/" chunk keys (NGFF 0.4); v3 arrays name their dimensions y, x.
    """
    chunks = (min(chunk[0], shape[0]), min(chunk[1], shape[1]))
    kwargs: dict[str, Any] = {}
    if zarr_format == 2:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    else:
        kwargs["dimension_names"] = ("y", "x")
    return group.create_array(
        name, shape=tuple(shape), chunks=chunks, dtype=dtype, fill_value=0, overwrite=True, **kwargs
    )


def downsample_level(src: Any, dst: Any, fn: Callable, workers: int) -> list[float]:
    """Fill ``dst`` (level k) chunk by chunk from ``src`` (level k-1); return src's (min, max)."""
    ch, cw = dst.chunks
    blocks = [(i, j) for i in range(0, dst.shape[0], ch) for j in range(0, dst.shape[1], cw)]

    def one(block: tuple[int, int]) -> tuple[float, float]:
        i, j = block
        part = np.asarray(src[2 * i : 2 * (i + ch), 2 * j : 2 * (j + cw)])
        lo, hi = part.min(), part.max()
        if lo == hi:  # constant (e.g. background): no need to downsample
            if lo != 0:  # a fresh level reads 0 where nothing is written
                dst[i : i + ch, j : j + cw] = np.full(downsampled_shape(part.shape), lo, dst.dtype)
        else:
            dst[i : i + ch, j : j + cw] = fn(part)
        return float(lo), float(hi)

    if workers == 1:
        stats = [one(b) for b in blocks]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            stats = list(pool.map(one, blocks))
    return [min(s[0] for s in stats), max(s[1] for s in stats)]


def array_range(array: Any, chunk: tuple[int, int]) -> list[float]:
    """(min, max) of a level array, read one chunk at a time."""
    lo, hi = math.inf, -math.inf
    ch, cw = chunk
    for i in range(0, array.shape[0], ch):
        for j in range(0, array.shape[1], cw):
            part = np.asarray(array[i : i + ch, j : j + cw])
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    return [lo, hi]


def build_levels(
    group: Any,
    folder: Path,
    shapes: list[tuple[int, int]],
    *,
    chunk: tuple[int, int],
    zarr_format: int,
    method: str,
    workers: int,
) -> list[float] | None:
    """(Re)build levels 1.. of one image group from its level 0.

    Returns level 0's (min, max) as seen while building level 1 (None with a single level).
    Levels of an earlier, deeper pyramid beyond ``len(shapes)`` are deleted from ``folder``
    (the group's directory). Level 0 is only read.
    """
    fn = downsample_mean if method == "mean" else downsample_mode
    for name in dataset_paths(group):
        if name != "0" and int(name) >= len(shapes):
            shutil.rmtree(folder / name)
    value_range = None
    for level in range(1, len(shapes)):
        src = group[str(level - 1)]
        dst = create_level(group, str(level), shapes[level], chunk, zarr_format, src.dtype)
        stats = downsample_level(src, dst, fn, workers)
        if level == 1:
            value_range = stats
    return value_range
