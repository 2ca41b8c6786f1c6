"""What the pipeline returns: per tile (to the driver), per region or cell, per slide, per batch slide."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.tiling import PixelTransform, pixel_transform

__all__ = ["TileOutcome", "RegionResult", "SlideResult", "SlideStatus"]


@dataclass(frozen=True)
class TileOutcome:
    """What one tile task returns to the driver.

    Attributes
    ----------
    record : dict
        The tile-table row: ``index, row, col, y, x, status, score, passes, seconds, error``.
    saliency : (h, w) float32 ndarray or None
        The core of the tile's saliency (None when the tile failed).
    segmentation : (h, w) uint8 ndarray or None
        The core of the argmax segmentation.
    cell_mask : ndarray or None
        :func:`explain_cell` only: the explained cell.
    cells : wsi_hipe.omezarr.CellRows or None
        ``explain_slide(..., cells=True)``: the tile's cells (rows and masks, no maps).
    """

    record: dict
    saliency: np.ndarray | None = None
    segmentation: np.ndarray | None = None
    cell_mask: np.ndarray | None = None
    cells: Any = None


@dataclass(frozen=True)
class RegionResult:
    """Saliency and segmentation of a slide region (:func:`explain_region`, :func:`explain_cell`).

    Attributes
    ----------
    saliency : (h, w) float32 ndarray
        HiPe saliency at the target resolution, ≥ 0, in the score's units (px² for areas).
    segmentation : (h, w) uint8 ndarray
        Argmax class per target pixel (bundled model: 0 background, 1 lymphocyte, 2 nucleus).
    origin : (float, float)
        Level-0 ``(x, y)`` of the top-left corner of target pixel ``[0, 0]``.
    scale : float
        Level-0 px per target px (target pixel ``[i, j]`` covers level-0
        ``x ∈ [x0 + j·scale, x0 + (j+1)·scale)``, likewise for y).
    mpp : float
        µm per target px.
    slide_mpp : float
        µm per slide level-0 px.
    score : float
        Sum of the tile scores explained (one tile for :func:`explain_cell`).
    forward_passes : int
        Model evaluations in all, the segmentation pass of each tile included.
    tiles : list of dict
        One tile-table record per tile (position inside this region).
    seconds : float
    stopped : bool
        ``should_stop`` interrupted the run; tiles not reached are zero and absent from
        ``tiles``.
    cell_mask : (h, w) bool ndarray or None
        :func:`explain_cell` only: the explained cell.
    cell_label : int or None
        :func:`explain_cell` only: the class of the cell.
    """

    saliency: np.ndarray
    segmentation: np.ndarray
    origin: tuple[float, float]
    scale: float
    mpp: float
    slide_mpp: float
    score: float
    forward_passes: int
    tiles: list = field(default_factory=list)
    seconds: float = 0.0
    stopped: bool = False
    cell_mask: np.ndarray | None = None
    cell_label: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` in target px."""
        return tuple(self.saliency.shape)  # type: ignore[return-value]

    @property
    def transform(self) -> PixelTransform:
        """Where the result's pixels sit on the slide, in µm (:func:`wsi_hipe.tiling.pixel_transform`).

        Target pixel ``[i, j]`` covers level-0 ``[x0 + j·scale, x0 + (j+1)·scale)`` (likewise
        for y), so the grid has downsample ``scale`` and origin ``(y0, x0)`` over the slide.
        """
        x0, y0 = self.origin
        return pixel_transform(self.slide_mpp, self.scale, origin=(y0, x0))

    @property
    def scale_um(self) -> tuple[float, float]:
        """``(y, x)`` µm per target px (for napari/NGFF ``scale``)."""
        return self.transform.scale

    @property
    def translate_um(self) -> tuple[float, float]:
        """``(y, x)`` µm position of target pixel ``[0, 0]``'s centre (for napari/NGFF
        ``translation``), with slide level-0 pixel ``j`` centred at ``j · slide_mpp`` µm."""
        return self.transform.translation


@dataclass(frozen=True)
class SlideResult:
    """Summary of :func:`explain_slide`.

    Attributes
    ----------
    slide, output : Path or str
    shape : (H, W)
        Output level-0 shape in target px.
    tiles_total : int
        Tissue tiles of the grid.
    counts : dict
        Tiles per status after the run: ``done``, ``skipped``, ``failed``.
    computed : int
        Tiles computed by this call (fewer than ``tiles_total`` when resuming).
    resumed : int
        Tiles already finished in the output before this call.
    forward_passes : int
        Model evaluations made by this call.
    failed : list of dict
        Records of the failed tiles (``index``, ``y``, ``x``, ``error``).
    seconds : float
    fingerprint : str
    cells : int or None
        Cells in the output's table (``explain_slide(..., cells=True)``), None without cells.
    """

    slide: str
    output: Path
    shape: tuple[int, int]
    tiles_total: int
    counts: dict
    computed: int
    resumed: int
    forward_passes: int
    failed: list
    seconds: float
    fingerprint: str
    cells: int | None = None

    @property
    def ok(self) -> bool:
        """Every tile finished (none failed)."""
        return not self.failed


@dataclass(frozen=True)
class SlideStatus:
    """The outcome of one slide of :func:`explain_batch`.

    Attributes
    ----------
    slide : str
    output : Path
    status : {"done", "partial", "failed", "not run"}
        ``partial``: the output was written but some tiles failed; ``not run``: the batch
        stopped at an earlier failure (without ``skip_errors``).
    error : str or None
    result : SlideResult or None
    seconds : float
    """

    slide: str
    output: Path
    status: str
    error: str | None = None
    result: SlideResult | None = None
    seconds: float = 0.0
