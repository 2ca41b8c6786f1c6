"""Every cell of a slide: the per-tile part of ``explain_slide(..., cells=True)``.

Per tile, after the segmentation pass (:func:`wsi_hipe.pipeline._tile.compute_tile`), the
instances of ``score.class`` in the whole halo window are found, the tile keeps those whose
centroid lies in its core, and the tile's own score (when the tile is above the floor) and every
kept cell above the floor are one vector HiPe run (:func:`wsi_hipe.cells.explain_cells`): the
tile map is the same as without cells, and every cell gets its map in the same passes, condensed
into its row (inside / ring / beyond, context share) before the maps are dropped. Only rows and
masks leave the worker: memory does not grow with the number of cells.

Cell ids
--------
``id = tile.index · 2^bits + k`` with ``k = 1..`` the cell's number in its tile (raster order of
the first pixel): unique over the slide, and stable across resume because a tile is recomputed
from the same pixels with the same settings. ``bits`` is the smallest width holding the most
cells a window can have (window area / smallest cell area); ``labels/cells`` is uint32, so the
grid's tiles · 2^bits must stay below 2^32 (a ``ConfigError`` names the fix otherwise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_hipe.cells import (
    MARGIN_UM,
    MIN_AREA_UM2,
    RING_UM,
    SPLIT_DEPTH_UM,
    TileCells,
    explain_cells,
    um_to_px,
)
from wsi_hipe.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.config import Config
    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.omezarr import CellRows
    from wsi_hipe.tiling import TileGrid

__all__ = ["CellSettings"]

_ID_LIMIT = 2**32 - 1  # labels/cells is uint32


@dataclass(frozen=True)
class CellSettings:
    """How a run finds and summarises cells (picklable; stored with the output).

    Attributes
    ----------
    class_index : int
        The score class whose instances are the cells.
    class_name : str
    ring_um, margin_um, min_area_um2, split_depth_um : float
        :mod:`wsi_hipe.cells` (ring width, score-region margin, smallest cell, watershed depth).
    id_bits : int
        Bits of the per-tile cell number in the cell id (module docstring).
    units : str
        Units of the cells' scores and saliency (those of the expected area: px² at the target
        resolution).
    """

    class_index: int
    class_name: str
    ring_um: float = RING_UM
    margin_um: float = MARGIN_UM
    min_area_um2: float = MIN_AREA_UM2
    split_depth_um: float = SPLIT_DEPTH_UM
    id_bits: int = 16
    units: str = "px²"

    @classmethod
    def of(cls, cfg: Config, model: SegmentationModel, grid: TileGrid) -> CellSettings:
        """The settings of ``cfg``'s run of ``model`` on ``grid`` (ids checked to fit)."""
        names = list(model.meta.class_names)
        index = cfg.score.class_index
        if not 0 <= index < len(names):  # check_model_for says it first; kept for direct calls
            raise ConfigError(f"score.class: the model's classes are {names}, got class {index}")
        c = cfg.cells
        window = grid.window
        min_area = max(um_to_px(c.min_area_um2, cfg.tiling.mpp, power=2), 1.0)
        bits = max(1, math.ceil(math.log2(window * window / min_area + 1)))
        tiles = grid.n_rows * grid.n_cols
        if tiles * 2**bits > _ID_LIMIT:
            raise ConfigError(
                f"cells: {tiles} tiles of {window} px leave no room for 32-bit cell ids "
                f"({bits} bits per tile); use a larger tiling.tile_size"
            )
        return cls(
            class_index=index, class_name=str(names[index]), ring_um=c.ring_um,
            margin_um=c.margin_um, min_area_um2=c.min_area_um2, split_depth_um=c.split_depth_um,
            id_bits=bits,
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        """What the output stores about its cells (``tables/cells`` ``uns["wsi_hipe"]``)."""
        return {**asdict(self), "class": self.class_name, "ids": "tile index * 2**id_bits + k"}

    def explain(
        self,
        model: SegmentationModel,
        x,
        logits,
        segmentation: np.ndarray,
        *,
        core: tuple[int, int, int, int],
        mpp: float,
        floor: float,
        tile_score,
        hipe: dict,
        progress=None,
    ) -> TileCells:
        """:func:`wsi_hipe.cells.explain_cells` with these settings."""
        return explain_cells(
            model, x, logits, segmentation, class_index=self.class_index, core=core, mpp=mpp,
            floor=floor, tile_score=tile_score, ring_um=self.ring_um, margin_um=self.margin_um,
            min_area_um2=self.min_area_um2, split_depth_um=self.split_depth_um, hipe=hipe,
            progress=progress,
        )  # fmt: skip

    def rows(self, found: TileCells, *, tile: int, origin: tuple[int, int], halo: int) -> CellRows:
        """The tile's rows for the output: ids, and positions in output pixels."""
        from wsi_hipe.omezarr import CellRows

        n = found.cells.n
        if n >= 2**self.id_bits:
            raise ConfigError(f"tile {tile}: {n} cells do not fit {self.id_bits}-bit cell numbers")
        ids = (int(tile) << self.id_bits) + np.arange(1, n + 1, dtype=np.int64)
        y, x = origin
        return CellRows.from_cells(
            found.cells, tile=tile, origin=origin, ids=ids, offset=(y - halo, x - halo),
            score=found.score, summary=found.summary, status=found.status,
        )  # fmt: skip
