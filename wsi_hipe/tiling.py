"""Tile grids at a fixed physical resolution, with exact tile <-> level-0 coordinates.

The pipeline works on a virtual image at the *target* resolution ``target_mpp`` (µm/px). With
``s = target_mpp / slide_mpp`` level-0 px per target px, target pixel ``i`` covers level-0
``[i·s, (i + 1)·s)`` (docs/INTERFACES.md). The target image has ``ceil(W0 / s)`` by
``ceil(H0 / s)`` pixels, so it covers the whole slide; its last row/column may reach past the
slide border, where reads return background (0).

A :class:`TileGrid` cuts the target image into square *cores* of ``tile_size`` px in row-major
order. The last core of a row/column is clipped to the image, so the cores cover every target
pixel exactly once. Each core is read with a ``halo`` of context on every side, always as a
``(tile_size + 2·halo)``-square window (padded with background beyond the slide), so a model sees
the same input size everywhere.

Coordinates are computed from integer target positions with one multiplication each (never by
accumulating steps), so there is no drift anywhere on the slide, and conversions snap float noise
of ~1e-9 px to the integer: ``level0_to_target(*target_to_level0(x, y)) == (x, y)`` exactly for
integer ``x, y`` and vice versa.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Tile", "TileGrid", "make_grid", "area_fractions", "PixelTransform", "pixel_transform"]

logger = logging.getLogger(__name__)

#: Relative distance to an integer under which a coordinate is taken to be that integer.
SNAP_RTOL = 1e-9


def _snap(value: float) -> float:
    """Return ``value`` rounded to the nearest integer when it is within float noise of it."""
    nearest = round(value)
    if abs(value - nearest) <= SNAP_RTOL * max(1.0, abs(value)):
        return float(nearest)
    return float(value)


def _ceil_snapped(value: float) -> int:
    """``ceil`` that ignores float noise just above an integer (``4.0000000001 -> 4``)."""
    return int(math.ceil(_snap(value)))


def _positive(name: str, value: Any, unit: str = "") -> float:
    """``float(value)`` when it is a finite number > 0, else ValueError naming ``name``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not (math.isfinite(out) and out > 0):
        what = f"a positive number of {unit}" if unit else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return out


# --------------------------------------------------------------------------------------------
# The one pixel-centre <-> micrometre transform
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelTransform:
    """Where the pixels of one image grid sit in the slide's world, in micrometres.

    The world convention (napari's and NGFF's): level-0 slide pixel ``j`` is *centred* at
    ``j · slide_mpp`` µm and covers ``[(j − ½)·slide_mpp, (j + ½)·slide_mpp)``. A grid whose pixel
    covers ``downsample`` level-0 px and whose pixel 0 starts at level-0 *edge* coordinate
    ``origin`` (pixel ``j`` of level 0 spans edge coordinates ``[j, j + 1)``) has

    - ``scale = slide_mpp · downsample`` µm per pixel, and
    - ``translation = (origin + (downsample − 1)/2) · slide_mpp``: the world position of the
      centre of its pixel 0.

    Every conversion between output pixels, level-0 pixels and µm in the project goes through
    this class (the OME-Zarr writer and reader, the napari layers and widget, region results).

    Attributes
    ----------
    scale : (2,) tuple of float
        µm per pixel along (y, x).
    translation : (2,) tuple of float
        World position (y, x) in µm of the centre of pixel (0, 0).
    """

    scale: tuple[float, float]
    translation: tuple[float, float]

    def to_world(self, y: float, x: float) -> tuple[float, float]:
        """World (y, x) in µm of the pixel coordinate ``(y, x)`` (pixel centres integral)."""
        return (
            self.translation[0] + y * self.scale[0],
            self.translation[1] + x * self.scale[1],
        )

    def to_pixel(self, y_um: float, x_um: float) -> tuple[float, float]:
        """Pixel coordinate (y, x) (centres integral) of the world point ``(y_um, x_um)``."""
        return (
            (y_um - self.translation[0]) / self.scale[0],
            (x_um - self.translation[1]) / self.scale[1],
        )

    def to_edge(self, y_um: float, x_um: float) -> tuple[float, float]:
        """Continuous pixel-edge coordinate (y, x) of a world point: pixel ``j`` spans ``[j, j+1)``."""
        y, x = self.to_pixel(y_um, x_um)
        return y + 0.5, x + 0.5

    def ngff(self) -> tuple[list[float], list[float]]:
        """NGFF ``coordinateTransformations`` values: ``([sy, sx], [ty, tx])``."""
        return [float(self.scale[0]), float(self.scale[1])], [
            float(self.translation[0]),
            float(self.translation[1]),
        ]


def pixel_transform(
    slide_mpp: float,
    downsample: float | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    *,
    mpp: float | None = None,
) -> PixelTransform:
    """The :class:`PixelTransform` of a grid over a slide (see its docstring for the rule).

    Parameters
    ----------
    slide_mpp : float
        µm per level-0 slide pixel (> 0).
    downsample : float, optional
        Level-0 px per pixel of the grid (> 0; default 1): 1 for level 0,
        ``target_mpp / slide_mpp`` for the pipeline's target grid, ``2**k`` times that for
        output pyramid level ``k``.
    origin : (y, x) tuple of float, optional
        Level-0 edge coordinate where the grid's pixel (0, 0) starts (a region's top-left).
    mpp : float, optional
        µm per pixel of the grid, instead of ``downsample`` (``downsample = mpp / slide_mpp``).
        Give it when the grid's µm/px is the exact quantity (an output's target resolution):
        the scale is then ``mpp`` itself, not ``slide_mpp · (mpp / slide_mpp)`` rounded twice.

    Returns
    -------
    PixelTransform
        ``scale = step`` and ``translation = origin · slide_mpp + (step − slide_mpp) / 2`` on
        each axis, with ``step = slide_mpp · downsample`` (or ``mpp``) µm per grid pixel: the
        NGFF rule ``(mpp·2^k − slide_mpp)/2`` for pyramid level ``k`` at origin 0.

    Examples
    --------
    >>> pixel_transform(0.25, 2.0).translation      # two level-0 px per pixel: centre at 0.5 px
    (0.125, 0.125)
    >>> pixel_transform(0.25, mpp=0.5) == pixel_transform(0.25, 2.0)
    True
    """
    slide_mpp = _positive("slide_mpp", slide_mpp, "µm per pixel")
    if mpp is not None:
        if downsample is not None:
            raise ValueError(
                f"pass downsample or mpp, not both (got downsample={downsample!r}, mpp={mpp!r})"
            )
        step = _positive("mpp", mpp, "µm per pixel")
    elif downsample is None:
        step = slide_mpp
    else:
        try:
            ds = float(downsample)
        except (TypeError, ValueError):
            ds = math.nan
        if not (math.isfinite(ds) and ds > 0):
            raise ValueError(f"downsample must be > 0 (level-0 px per pixel), got {downsample!r}")
        step = slide_mpp * ds
    if len(origin) != 2:
        raise ValueError(f"origin must be a (y, x) pair of level-0 px, got {origin!r}")
    # World offset of pixel 0's centre from the centre of the level-0 pixel at its corner.
    centre = (step - slide_mpp) / 2
    return PixelTransform(
        scale=(step, step),
        translation=(
            float(origin[0]) * slide_mpp + centre,
            float(origin[1]) * slide_mpp + centre,
        ),
    )


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes
    ----------
    index : int
        Position in ``grid.tiles`` (0 .. n-1), row-major.
    row, col : int
        Grid cell of the tile (row ``y // tile_size``, column ``x // tile_size``).
    y, x : int
        Top-left pixel of the core in target px.
    core : (int, int)
        ``(height, width)`` of the core in target px; ``tile_size`` except at the bottom/right
        border of the image, where it is clipped.
    tissue : float
        Tissue fraction of the core area (1.0 when the grid was made without a tissue mask).
    """

    index: int
    row: int
    col: int
    y: int
    x: int
    core: tuple[int, int]
    tissue: float = 1.0


@dataclass(frozen=True)
class TileGrid:
    """A tile grid over a slide at a target resolution. Build it with :func:`make_grid`.

    Attributes
    ----------
    shape : (int, int)
        ``(H, W)`` of the whole target image in target px.
    tile_size : int
        Core side in target px.
    halo : int
        Context margin on each side of a core, in target px.
    scale : float
        Level-0 px per target px, ``target_mpp / slide_mpp``.
    tiles : tuple of Tile
        The kept tiles, row-major.
    level0_size : (int, int)
        Slide level-0 ``(width, height)`` in px (OpenSlide order).
    slide_mpp, target_mpp : float
        µm per level-0 px and per target px.
    n_rows, n_cols : int
        Grid size before tissue filtering.
    min_tissue : float
        Minimum core tissue fraction a kept tile had to reach (0 without a mask).
    """

    shape: tuple[int, int]
    tile_size: int
    halo: int
    scale: float
    tiles: tuple[Tile, ...] = field(repr=False)
    level0_size: tuple[int, int] = (0, 0)
    slide_mpp: float = 1.0
    target_mpp: float = 1.0
    n_rows: int = 0
    n_cols: int = 0
    min_tissue: float = 0.0

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    @property
    def window(self) -> int:
        """Side of the read window (core + halo on both sides) in target px."""
        return self.tile_size + 2 * self.halo

    # --- coordinates ------------------------------------------------------------------

    def target_to_level0(self, x: float, y: float) -> tuple[float, float]:
        """Level-0 px position of the target px position ``(x, y)`` (the pixel's corner)."""
        return _snap(x * self.scale), _snap(y * self.scale)

    def level0_to_target(self, x: float, y: float) -> tuple[float, float]:
        """Target px position of the level-0 px position ``(x, y)``."""
        return _snap(x / self.scale), _snap(y / self.scale)

    def read_window(self, tile: Tile, *, halo: bool = True) -> tuple[float, float, int, int]:
        """Arguments for ``Slide.read`` that fetch this tile.

        Returns
        -------
        (x0, y0, width, height)
            ``x0, y0`` in level-0 px (floats; may be negative at the slide border),
            ``width, height`` in target px: ``window`` x ``window`` with the halo, the core
            size without it.
        """
        if halo:
            x0, y0 = self.target_to_level0(tile.x - self.halo, tile.y - self.halo)
            return x0, y0, self.window, self.window
        x0, y0 = self.target_to_level0(tile.x, tile.y)
        return x0, y0, tile.core[1], tile.core[0]

    def level0_box(self, tile: Tile, *, halo: bool = True) -> tuple[float, float, float, float]:
        """The tile's box in level-0 px, ``(x0, y0, width, height)`` (floats).

        With ``halo=True`` the full read window (``window`` px square); without, the core.
        """
        margin = self.halo if halo else 0
        h, w = (self.window, self.window) if halo else tile.core
        x0, y0 = self.target_to_level0(tile.x - margin, tile.y - margin)
        x1, y1 = self.target_to_level0(tile.x - margin + w, tile.y - margin + h)
        return x0, y0, x1 - x0, y1 - y0

    def core_slices(self, tile: Tile) -> tuple[slice, slice]:
        """``(rows, cols)`` slices that cut the core out of a window read with the halo."""
        h, w = tile.core
        return slice(self.halo, self.halo + h), slice(self.halo, self.halo + w)

    def target_slices(self, tile: Tile) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of the core inside the whole target image."""
        h, w = tile.core
        return slice(tile.y, tile.y + h), slice(tile.x, tile.x + w)


def area_fractions(mask: np.ndarray, downsample: float, boxes: np.ndarray) -> np.ndarray:
    """Exact area-weighted mean of a mask over level-0 boxes.

    Mask pixel ``(r, c)`` covers level-0 ``[c·d, (c+1)·d) x [r·d, (r+1)·d)`` with
    ``d = downsample``; parts of a box beyond the mask count as 0.

    Parameters
    ----------
    mask : (h, w) bool or float ndarray
        The mask (e.g. tissue) at ``downsample``.
    downsample : float
        Level-0 px per mask px (> 0).
    boxes : (n, 4) float ndarray
        ``(x0, y0, width, height)`` in level-0 px.

    Returns
    -------
    (n,) float64 ndarray
        Mean of the mask over each box (0 for empty boxes).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w), got shape {mask.shape}")
    if not downsample > 0:
        raise ValueError(f"downsample must be > 0 (level-0 px per mask px), got {downsample!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = mask.shape
    # Summed-area table: sat[i, j] = sum of mask[:i, :j]. The integral of the piecewise-constant
    # mask over [0, x) x [0, y) is exactly the bilinear interpolation of the table at (x, y).
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        c0 = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
        r0 = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
        fx = x - c0
        fy = y - r0
        c1 = np.minimum(c0 + 1, w)
        r1 = np.minimum(r0 + 1, h)
        top = sat[r0, c0] * (1 - fx) + sat[r0, c1] * fx
        bottom = sat[r1, c0] * (1 - fx) + sat[r1, c1] * fx
        return top * (1 - fy) + bottom * fy

    x0 = boxes[:, 0] / downsample
    y0 = boxes[:, 1] / downsample
    x1 = (boxes[:, 0] + boxes[:, 2]) / downsample
    y1 = (boxes[:, 1] + boxes[:, 3]) / downsample
    area = (x1 - x0) * (y1 - y0)
    inside = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, inside / np.where(area > 0, area, 1.0), 0.0)
    return np.clip(frac, 0.0, 1.0)


def _check_grid_args(
    level0_size: Sequence[int], tile_size: int, halo: int, min_tissue: float
) -> tuple[int, int]:
    """Validate ``make_grid``'s integer arguments; return the level-0 ``(width, height)``."""
    if len(level0_size) != 2:
        raise ValueError(f"level0_size must be (width, height), got {level0_size!r}")
    width0, height0 = (int(v) for v in level0_size)
    if width0 <= 0 or height0 <= 0 or (width0, height0) != tuple(level0_size):
        raise ValueError(f"level0_size must be two positive integers, got {level0_size!r}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer (target px), got {tile_size!r}")
    if isinstance(halo, bool) or not isinstance(halo, (int, np.integer)) or halo < 0:
        raise ValueError(f"halo must be an integer >= 0 (target px), got {halo!r}")
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise ValueError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}")
    return width0, height0


def _tissue_fractions(tissue: Any, boxes: np.ndarray) -> np.ndarray:
    """Tissue fraction of each level-0 box ``(x0, y0, w, h)`` under a :class:`TissueMask`."""
    mask = getattr(tissue, "mask", None)
    downsample = getattr(tissue, "downsample", None)
    if mask is None or downsample is None:
        raise ValueError(
            "tissue must have .mask and .downsample (a TissueMask from "
            f"wsi_hipe.tissue.detect_tissue), got {type(tissue).__name__}"
        )
    return area_fractions(mask, float(downsample), boxes)


def make_grid(
    level0_size: Sequence[int],
    *,
    slide_mpp: float,
    target_mpp: float,
    tile_size: int = 256,
    halo: int = 32,
    tissue: Any = None,
    min_tissue: float = 0.05,
) -> TileGrid:
    """Cut a slide into tiles at a target resolution.

    Parameters
    ----------
    level0_size : (int, int)
        Slide level-0 ``(width, height)`` in px (``Slide.dimensions``).
    slide_mpp : float
        µm per level-0 px.
    target_mpp : float
        µm per target px (the resolution the model works at).
    tile_size : int, default 256
        Core side in target px.
    halo : int, default 32
        Context margin around each core in target px (reads are ``tile_size + 2·halo`` square).
    tissue : TissueMask, optional
        Anything with ``.mask`` ((h, w) bool) and ``.downsample`` (level-0 px per mask px),
        e.g. from :func:`wsi_hipe.tissue.detect_tissue`. Without it every tile is kept.
    min_tissue : float, default 0.05
        Keep a tile only when the tissue fraction of its core is ``>= min_tissue`` (ignored
        without ``tissue``). 0 keeps every tile.

    Returns
    -------
    TileGrid
    """
    width0, height0 = _check_grid_args(level0_size, tile_size, halo, min_tissue)
    slide_mpp = _positive("slide_mpp", slide_mpp)
    target_mpp = _positive("target_mpp", target_mpp)
    tile_size, halo = int(tile_size), int(halo)

    scale = target_mpp / slide_mpp
    height = _ceil_snapped(height0 / scale)
    width = _ceil_snapped(width0 / scale)
    n_rows = -(-height // tile_size)
    n_cols = -(-width // tile_size)

    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    ys, xs = rows * tile_size, cols * tile_size
    core_h = np.minimum(tile_size, height - ys)
    core_w = np.minimum(tile_size, width - xs)

    if tissue is None:
        fractions, keep, min_tissue = np.ones(rows.size), np.ones(rows.size, bool), 0.0
    else:
        boxes = np.stack([xs * scale, ys * scale, core_w * scale, core_h * scale], axis=1)
        fractions = _tissue_fractions(tissue, boxes)
        keep = fractions >= float(min_tissue) - 1e-12

    columns = (rows, cols, ys, xs, core_h, core_w, fractions)
    tiles = tuple(
        Tile(index=i, row=int(r), col=int(c), y=int(y), x=int(x), core=(int(h), int(w)),
             tissue=float(f))
        for i, (r, c, y, x, h, w, f) in enumerate(zip(*(a[keep] for a in columns), strict=True))
    )  # fmt: skip
    logger.debug("grid %dx%d target px (scale %.6g), %d of %d tiles kept",
                 width, height, scale, len(tiles), rows.size)  # fmt: skip
    return TileGrid(
        shape=(height, width),
        tile_size=tile_size,
        halo=halo,
        scale=scale,
        tiles=tiles,
        level0_size=(width0, height0),
        slide_mpp=slide_mpp,
        target_mpp=target_mpp,
        n_rows=int(n_rows),
        n_cols=int(n_cols),
        min_tissue=float(min_tissue),
    )
