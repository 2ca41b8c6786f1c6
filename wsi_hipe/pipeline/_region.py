"""Regions and single cells, explained in the calling thread (the napari widget, notebooks).

A region is tiled exactly like a slide (cores of ``tiling.tile_size`` with their halo, the
score floor applies) and its tiles are placed at their target-px positions, so the result
equals the per-tile computation stitched by hand. A cell is one tile centred on a point, whose
score is the expected area of the segmented cell under it. Both poll ``should_stop`` during
HiPe and report ``progress(done, total)`` in tiles (:data:`~wsi_hipe.pipeline.Progress`),
HiPe's depths included.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from wsi_hipe.config import Config, ScoreKind
from wsi_hipe.errors import SlideReadError
from wsi_hipe.pipeline._inputs import as_slide, check_model_for, load_for
from wsi_hipe.pipeline._results import RegionResult, TileOutcome
from wsi_hipe.pipeline._tile import (
    HipeProgress,
    ModelRef,
    TileJob,
    TileSpec,
    compute_tile,
    tile_depths,
)
from wsi_hipe.pipeline._types import (
    ConfigLike,
    ModelLike,
    Progress,
    ShouldStop,
    SlideLike,
    as_config,
)
from wsi_hipe.schedule import DEFAULT_TORCH_THREADS, torch_threads
from wsi_hipe.tiling import pixel_transform

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.slide import Slide
    from wsi_hipe.tiling import TileGrid

__all__ = ["explain_region", "explain_cell"]

#: Progress inside a tile stays below this share of it until the tile is finished.
_PARTIAL_MAX = 0.99


class _Stopped(Exception):
    """Raised from HiPe's progress hook when ``should_stop()`` turns true."""


def _depth_progress(
    progress: Progress | None,
    should_stop: ShouldStop | None,
    step: int,
    total_steps: int,
    depths: int,
) -> HipeProgress:
    """HiPe's progress hook → ``progress(step + share of the tile, total_steps)``; raises
    :class:`_Stopped` to cancel."""

    def hook(depth: int, done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise _Stopped
        if progress is not None and total:
            share = (min(depth, depths) - 1 + done / total) / depths
            progress(step + min(_PARTIAL_MAX, share), total_steps)

    return hook


@dataclass(frozen=True)
class _Setup:
    """What a region or cell run works with (the slide closed by the caller if ``opened``)."""

    cfg: Config
    slide: Slide
    opened: bool
    model: SegmentationModel
    spec: TileSpec

    def close(self) -> None:
        if self.opened:
            self.slide.close()


def _setup(slide: SlideLike, cfg: Config, model: ModelLike | None) -> _Setup:
    slide_obj, opened = as_slide(slide, cfg)
    try:
        model_obj = load_for(model, cfg)
        check_model_for(model_obj, cfg)
        meta = model_obj.meta
        slide_obj.check_model(meta.in_channels, meta.channel_names, model=f"model {meta.source!r}")
    except BaseException:
        if opened:
            slide_obj.close()
        raise
    spec = TileSpec.of(cfg, ModelRef.of(model_obj, cfg))
    return _Setup(cfg, slide_obj, opened, model_obj, spec)


# --- regions ----------------------------------------------------------------------------------


def explain_region(
    slide: SlideLike,
    x0: float,
    y0: float,
    width: float,
    height: float,
    *,
    config: ConfigLike | None = None,
    model: ModelLike | None = None,
    score: ScoreKind | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> RegionResult:
    """Segment and explain a region of a slide, tile by tile, in this thread.

    Parameters
    ----------
    slide : path or Slide
    x0, y0 : float
        Level-0 px of the region's top-left corner.
    width, height : float
        Region size in level-0 px; the result has ``ceil(width / s)`` × ``ceil(height / s)``
        target px, ``s = tiling.mpp / slide.mpp``.
    config, model
        As for :func:`~wsi_hipe.pipeline.explain_slide` (``schedule`` is ignored: regions
        run here).
    score : {"area", "mean", "logit"}, optional
        The tile score (:data:`wsi_hipe.config.ScoreKind`); default ``config.score.kind``
        (``"area"``: expected lymphocyte area in the core). Each tile's score is restricted to
        its core, and the score floor applies.
    progress : callable, optional
        ``progress(done, total)`` in tiles of the region, HiPe's depths included
        (:data:`~wsi_hipe.pipeline.Progress`).
    should_stop : callable, optional
        Polled during HiPe; when it returns True the run stops and returns what is done
        (``stopped=True``).

    Returns
    -------
    RegionResult
        Tiles are placed at their target-px positions, so the result equals the per-tile
        computation stitched by hand (no seams or shifts).
    """
    t0 = time.perf_counter()
    if not (width > 0 and height > 0):
        raise ValueError(f"width and height must be > 0 level-0 px, got {width}, {height}")
    cfg = as_config(config)
    if score is not None and score != cfg.score.kind:
        cfg = cfg.with_overrides({"score.kind": score})
    setup = _setup(slide, cfg, model)
    try:
        run = _RegionRun.start(
            setup, (x0, y0, width, height), progress=progress, should_stop=should_stop
        )
        with torch_threads(cfg.schedule.threads_per_worker or DEFAULT_TORCH_THREADS):
            stopped = _region_loop(run)
    finally:
        setup.close()
    records = run.records
    return RegionResult(
        saliency=run.saliency,
        segmentation=run.segmentation,
        origin=(float(x0), float(y0)),
        scale=float(run.grid.scale),
        mpp=cfg.tiling.mpp,
        slide_mpp=float(setup.slide.mpp),
        score=sum(
            float(r["score"]) for r in records if r["score"] is not None and r["status"] != "failed"
        ),
        forward_passes=sum(int(r["passes"]) for r in records),
        tiles=records,
        seconds=time.perf_counter() - t0,
        stopped=stopped,
    )


@dataclass
class _RegionRun:
    """The tiles of one region, computed in order into ``saliency`` and ``segmentation``."""

    grid: TileGrid
    spec: TileSpec
    slide: Slide
    model: SegmentationModel
    x0: float
    y0: float
    depths: int
    progress: Progress | None = None
    should_stop: ShouldStop | None = None
    saliency: np.ndarray = field(init=False)
    segmentation: np.ndarray = field(init=False)
    records: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.saliency = np.zeros(self.grid.shape, dtype=np.float32)
        self.segmentation = np.zeros(self.grid.shape, dtype=np.uint8)

    @classmethod
    def start(
        cls,
        setup: _Setup,
        box: tuple[float, float, float, float],
        *,
        progress: Progress | None,
        should_stop: ShouldStop | None,
    ) -> _RegionRun:
        """The run over the level-0 ``box = (x0, y0, width, height)``, tiled as ``setup.cfg`` says."""
        from wsi_hipe.tiling import make_grid

        x0, y0, width, height = box
        cfg = setup.cfg
        grid = make_grid(
            (max(1, math.ceil(width)), max(1, math.ceil(height))),
            slide_mpp=float(setup.slide.mpp),
            target_mpp=cfg.tiling.mpp,
            tile_size=cfg.tiling.tile_size,
            halo=cfg.tiling.halo,
        )
        depths = tile_depths(cfg, setup.spec.side)
        return cls(
            grid, setup.spec, setup.slide, setup.model, x0, y0, depths, progress, should_stop
        )


def _region_loop(run: _RegionRun) -> bool:
    """Compute the tiles of a region in order, in place; return whether it was stopped."""
    n = len(run.grid.tiles)
    for step, tile in enumerate(run.grid.tiles):
        if run.should_stop is not None and run.should_stop():
            return True
        job = TileJob.of(run.grid, tile, run.x0, run.y0)
        hook = _depth_progress(run.progress, run.should_stop, step, n, run.depths)
        try:
            outcome = compute_tile(job, run.spec, run.slide, run.model, hipe_progress=hook)
        except _Stopped:
            return True
        run.records.append(outcome.record)
        if outcome.saliency is not None:
            rows, cols = run.grid.target_slices(tile)
            run.saliency[rows, cols] = outcome.saliency
            run.segmentation[rows, cols] = outcome.segmentation
        if run.progress is not None:
            run.progress(step + 1, n)
    return False


# --- cells ------------------------------------------------------------------------------------


def explain_cell(
    slide: SlideLike,
    x: float,
    y: float,
    *,
    config: ConfigLike | None = None,
    model: ModelLike | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> RegionResult:
    """Explain the area of the segmented cell under a level-0 point.

    A tile of ``tiling.tile_size + 2·tiling.halo`` target px centred on ``(x, y)`` is
    segmented; the connected component of class ``score.class`` under the point (or the
    nearest within 4 px) is the cell, and HiPe explains its expected area
    ``Σ_p p_class(x)_p · cell_p`` (:func:`wsi_hipe.scores.cell_area`) on the whole tile. The
    score floor does not apply.

    Parameters
    ----------
    slide : path or Slide
    x, y : float
        Level-0 position of the point, in continuous pixel coordinates (level-0 pixel ``j``
        spans ``[j, j + 1)``).
    config, model, should_stop
        As for :func:`explain_region`.
    progress : callable, optional
        ``progress(done, 1)``: a cell is one tile (:data:`~wsi_hipe.pipeline.Progress`).

    Returns
    -------
    RegionResult
        The whole tile, with ``cell_mask`` and ``cell_label``.

    Raises
    ------
    ValueError
        No cell of the class was segmented at the point.
    """
    t0 = time.perf_counter()
    setup = _setup(slide, as_config(config), model)
    cfg = setup.cfg
    try:
        scale = cfg.tiling.mpp / float(setup.slide.mpp)
        side = setup.spec.side
        ox, oy = _tile_origin(x, y, side // 2, float(setup.slide.mpp), scale)
        job = TileJob(0, 0, 0, 0, 0, (side, side), ox, oy)
        outcome, stopped = _explain_cell_tile(setup, job, progress, should_stop)
        if outcome.saliency is None:
            raise SlideReadError(f"cannot read the slide around ({x}, {y}): {outcome.record}")
        if progress is not None and not stopped:
            progress(1, 1)
    finally:
        setup.close()
    return RegionResult(
        saliency=outcome.saliency,
        segmentation=outcome.segmentation,
        origin=(ox, oy),
        scale=scale,
        mpp=cfg.tiling.mpp,
        slide_mpp=float(setup.slide.mpp),
        score=float(outcome.record["score"] or 0.0),
        forward_passes=int(outcome.record["passes"]),
        tiles=[outcome.record],
        seconds=time.perf_counter() - t0,
        stopped=stopped,
        cell_mask=outcome.cell_mask,
        cell_label=cfg.score.class_index,
    )


def _tile_origin(
    x: float, y: float, centre: int, slide_mpp: float, scale: float
) -> tuple[float, float]:
    """Level-0 ``(x, y)`` corner of a target-px tile whose pixel ``(centre, centre)`` is
    centred on the level-0 point ``(x, y)`` (continuous pixel coordinates)."""
    at_zero = pixel_transform(slide_mpp, scale)  # the tile's grid with its corner at 0
    cy, cx = pixel_transform(slide_mpp).to_edge(*at_zero.to_world(centre, centre))
    return float(x) - cx, float(y) - cy


def _explain_cell_tile(
    setup: _Setup, job: TileJob, progress: Progress | None, should_stop: ShouldStop | None
) -> tuple[TileOutcome, bool]:
    """The cell's tile, explained whole; ``(outcome, stopped)`` (zeros when stopped)."""
    side = setup.spec.side
    centre = side // 2
    cell_spec = replace(setup.spec, halo=0, tile_size=side)
    hook = _depth_progress(progress, should_stop, 0, 1, tile_depths(setup.cfg, side))
    threads = setup.cfg.schedule.threads_per_worker or DEFAULT_TORCH_THREADS
    try:
        with torch_threads(threads):
            outcome = compute_tile(
                job,
                cell_spec,
                setup.slide,
                setup.model,
                hipe_progress=hook,
                cell_at=(centre, centre),
                keep_full=True,
            )
    except _Stopped:
        stopped = TileOutcome(
            {"index": 0, "status": "stopped", "passes": 0, "score": None},
            np.zeros((side, side), np.float32),
            np.zeros((side, side), np.uint8),
        )
        return stopped, True
    return outcome, False
