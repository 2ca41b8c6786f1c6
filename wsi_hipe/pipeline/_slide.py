"""Whole slides: every tissue tile of a slide into a resumable OME-Zarr.

:func:`explain_slide` detects tissue on a thumbnail, keeps the tiles with enough tissue, runs
them on a Dask scheduler (:mod:`wsi_hipe.schedule`; workers receive the slide *path* and open it
once each, the model is loaded once per worker), and — in this process only — writes each
returned tile core into level 0 of the OME-Zarr (one chunk per tile, each written once) and then
appends the tile's record to the fsynced tile table. A killed run therefore resumes where it
stopped: the same call skips the tiles already recorded and ends with the same arrays as an
uninterrupted run. The pyramid, the NGFF metadata and ``tiles.csv`` are written at the end
(:meth:`wsi_hipe.omezarr.OutputStore.finalize`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_hipe.config import Config
from wsi_hipe.pipeline._cells import CellSettings
from wsi_hipe.pipeline._inputs import (
    as_slide,
    check_model_for,
    detect_tissue,
    load_for,
    runner_for,
    task_device,
    tasks_model,
    wants_gpu,
)
from wsi_hipe.pipeline._results import SlideResult
from wsi_hipe.pipeline._tile import (
    ModelRef,
    TileJob,
    TileSpec,
    run_tile,
    run_tiles,
    skip_bound,
)
from wsi_hipe.pipeline._types import (
    ConfigLike,
    ModelLike,
    Progress,
    SchedulerLike,
    SlideLike,
    as_config,
)
from wsi_hipe.provenance import model_identity, package_versions, slide_identity
from wsi_hipe.schedule import TaskError

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.omezarr import OutputStore
    from wsi_hipe.schedule import Runner
    from wsi_hipe.slide import Slide
    from wsi_hipe.tiling import Tile, TileGrid
    from wsi_hipe.tissue import TissueMask

__all__ = ["explain_slide"]

logger = logging.getLogger(__name__)


def explain_slide(
    slide: SlideLike,
    output: str | os.PathLike[str],
    *,
    config: ConfigLike | None = None,
    model: ModelLike | None = None,
    scheduler: SchedulerLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cells: bool = False,
) -> SlideResult:
    """Segment and explain every tissue tile of a slide into an OME-Zarr.

    Parameters
    ----------
    slide : path or Slide
        A slide file (opened with ``config.slide`` options) or a ``wsi_hipe.slide.Slide``.
    output : path
        The ``*.ome.zarr`` folder. If it exists and was made with the same configuration
        fingerprint, model and slide, the run resumes: finished tiles are not recomputed.
    config : Config, YAML path or mapping of overrides, optional
        Default: all defaults (``configs/default.yaml``).
    model : SegmentationModel, path, "bundled", nn.Module or callable, optional
        Default: ``config.model.path``. Loaded once here; process-based schedulers load it
        once per worker from its file (an in-memory model is sent to them instead).
    scheduler : str or TaskRunner, optional
        ``"sync"``, ``"threads"``, ``"processes"``, ``"local:N"``, ``"tcp://host:port"`` or a
        started :class:`~wsi_hipe.schedule.TaskRunner` (reused, not closed). Default:
        ``config.schedule``. The output does not depend on it.
    overwrite : bool
        Delete an existing output first.
    progress : callable, optional
        ``progress(done, total)`` in tiles (:data:`~wsi_hipe.pipeline.Progress`), after every
        tile written; tiles finished earlier count as done from the start.
    cells : bool
        Also explain every instance of ``score.class`` (e.g. each lymphocyte): each tile's
        cells are one vector HiPe run in the tile's passes (:mod:`~wsi_hipe.pipeline._cells`);
        the output gains ``labels/cells`` and ``tables/cells``. The tile maps are the same as
        without cells. Resuming needs the same choice.

    Returns
    -------
    SlideResult

    Raises
    ------
    SlideNotFoundError, SlideFormatError, MissingMppError, StainError
        The slide cannot be used (nothing is written).
    OutputError
        ``output`` exists and is not a wsi-hipe output.
    ResumeMismatchError
        ``output`` was made with another configuration, model or slide, or with(out) cells
        (use ``overwrite``).

    Notes
    -----
    Tiles whose pixels cannot be read (:class:`~wsi_hipe.errors.SlideReadError`), and tiles
    whose task raised on each of its 1 + ``schedule.retries`` tries, are recorded as failed
    with the error and left zero; the run goes on and reports them in ``SlideResult.failed``.
    Rerunning retries only them. If the Dask scheduler goes away mid-run
    (:class:`~wsi_hipe.schedule.SchedulerLostError`), the tiles written so far are kept and
    the same call against a live scheduler resumes.
    """
    t_start = time.perf_counter()
    cfg = as_config(config)
    output = Path(output)
    runner, owned = runner_for(scheduler, cfg, gpu=wants_gpu(model, cfg))
    slide_obj, opened_here = as_slide(slide, cfg)
    try:
        # Workers in other processes get the model as CPU weights: keep this copy on the CPU.
        model_obj = load_for(model, cfg, remote=runner.remote)
        check_model_for(model_obj, cfg)
        # the model's input channels (count and trained names) against the slide's: refused
        # before anything is written
        meta = model_obj.meta
        slide_obj.check_model(meta.in_channels, meta.channel_names, model=f"model {meta.source!r}")
        tissue, grid = _plan(slide_obj, cfg)
        cell_settings = CellSettings.of(cfg, model_obj, grid) if cells else None
        slide_prov = slide_identity(slide_obj)
        dtype = _tasks_dtype(model_obj, cfg, runner)
        fingerprint, provenance = _identity(slide_obj, slide_prov, model_obj, cfg, grid, dtype)
        store = _create_store(
            output, grid, cfg, slide_obj, fingerprint, provenance, overwrite, cell_settings
        )
        run = _SlideRun(store, grid, slide_obj, model_obj, cfg, cell_settings)
        todo, passes, records = run.resume(tissue, runner=runner, progress=progress)
    finally:
        if owned:
            runner.close()
        if opened_here:
            slide_obj.close()
    counts, failed = _summary(records)
    if failed:
        logger.warning("%s: %d tile(s) failed (rerun to retry them)", output, len(failed))
    return SlideResult(
        slide=str(slide_prov.get("path") or slide),
        output=output,
        shape=tuple(grid.shape),
        tiles_total=len(grid.tiles),
        counts=counts,
        computed=len(todo),
        resumed=len(grid.tiles) - len(todo),
        forward_passes=passes,
        failed=failed,
        seconds=time.perf_counter() - t_start,
        fingerprint=fingerprint,
        cells=run.cell_count(),
    )


def _plan(slide: Slide, cfg: Config):
    """The slide's tissue mask and its grid of tissue tiles at the target resolution."""
    from wsi_hipe.tiling import make_grid

    tissue = detect_tissue(slide)
    grid = make_grid(
        slide.dimensions,
        slide_mpp=float(slide.mpp),
        target_mpp=cfg.tiling.mpp,
        tile_size=cfg.tiling.tile_size,
        halo=cfg.tiling.halo,
        tissue=tissue,
        min_tissue=cfg.tiling.min_tissue,
    )
    return tissue, grid


def _tasks_dtype(model: SegmentationModel, cfg: Config, runner: Runner) -> str:
    """The dtype the tiles are computed in ("float32", "bfloat16", ...): the model's own where
    tasks share it, else that of its copies on :func:`task_device` (resolved here)."""
    dtype = (
        model.compute_dtype_on(task_device(model, cfg)) if runner.remote else model.compute_dtype
    )
    return str(dtype).removeprefix("torch.")


def _identity(
    slide: Slide,
    slide_prov: dict,
    model: SegmentationModel,
    cfg: Config,
    grid: TileGrid,
    compute_dtype: str,
) -> tuple[str, dict[str, Any]]:
    """The resume fingerprint of a run and the provenance stored with its output.

    The compute dtype is part of it: bf16 (CUDA autocast) and float32 give different arrays, so
    an output begun in one does not resume in the other."""
    from wsi_hipe.omezarr import make_fingerprint

    model_id = model_identity(model)
    fingerprint = make_fingerprint(
        {
            "config": cfg.fingerprint(),
            "model": model_id,
            "slide": {
                "sha256": slide_prov.get("sha256"),
                "dimensions": slide_prov["dimensions"],
                "mpp": slide_prov["mpp"],
                "channel": getattr(slide, "channel", None),
            },
            "tiles": len(grid.tiles),
            "compute_dtype": compute_dtype,
        }
    )
    provenance = {
        "slide": slide_prov,
        "model": {
            **model.meta.to_json_dict(),
            "identity": model_id,
            "compute_dtype": compute_dtype,
        },
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "versions": package_versions(),
        "grid": {
            "shape": list(grid.shape),
            "tile_size": grid.tile_size,
            "halo": grid.halo,
            "scale": grid.scale,
            "tiles": len(grid.tiles),
            "n_rows": grid.n_rows,
            "n_cols": grid.n_cols,
        },
        "skip_bound": skip_bound(cfg),
    }
    return fingerprint, provenance


def _create_store(
    output, grid, cfg, slide, fingerprint, provenance, overwrite, cells=None
) -> OutputStore:
    """Create the output (or reopen a matching one: resume); ``cells`` a :class:`CellSettings`."""
    from wsi_hipe.omezarr import create_output

    return create_output(
        output,
        shape=grid.shape,
        chunk=cfg.tiling.tile_size,
        mpp=cfg.tiling.mpp,
        slide_mpp=float(slide.mpp),
        fingerprint=fingerprint,
        provenance=provenance,
        ngff=cfg.output.ngff,
        overwrite=overwrite,
        resume=not overwrite,
        cells=None if cells is None else cells.info(),
    )


def _per_tile(results):
    """``(group of jobs, outcomes)`` pairs as ``(job, outcome)``; a failed group's task error
    becomes each of its jobs' outcome."""
    for jobs, outcomes in results:
        if isinstance(outcomes, TaskError):
            outcomes = [outcomes] * len(jobs)
        yield from zip(jobs, outcomes, strict=True)


def _summary(records: dict) -> tuple[dict[str, int], list[dict]]:
    """Tiles per status, and the failed tiles' ``index, y, x, error``."""
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for record in records.values():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    failed = [
        {k: r.get(k) for k in ("index", "y", "x", "error")}
        for r in sorted(records.values(), key=lambda r: r["index"])
        if r["status"] == "failed"
    ]
    return counts, failed


@dataclass(frozen=True)
class _SlideRun:
    """The tiles of one slide on a scheduler, written by this process (the single writer)."""

    store: OutputStore
    grid: TileGrid
    slide: Slide
    model: SegmentationModel
    cfg: Config
    cells: CellSettings | None = None

    def cell_count(self) -> int | None:
        """Cells in the finalized output's table (None without cells)."""
        if self.cells is None:
            return None
        from wsi_hipe.omezarr import read_output

        return int(read_output(self.store.path).provenance["output"].get("cell_count", 0))

    def resume(
        self, tissue: TissueMask, *, runner: Runner, progress: Progress | None
    ) -> tuple[list[Tile], int, dict]:
        """Compute the tiles the output does not hold yet and finalize it.

        Returns the tiles computed now, their forward passes and every tile's record.
        """
        grid, store = self.grid, self.store
        with store:
            finished = store.finished_tiles()
            if not finished:
                store.write_tissue(tissue.mask, downsample=tissue.downsample)
            todo = [t for t in grid.tiles if t.index not in finished]
            total, resumed = len(grid.tiles), len(grid.tiles) - len(todo)
            logger.info(
                "%s: %d tissue tiles of %d (%d to compute, %d finished earlier)",
                store.path,
                total,
                grid.n_rows * grid.n_cols,
                len(todo),
                resumed,
            )
            if progress is not None:
                progress(resumed, total)
            tile_progress = None if progress is None else (lambda n: progress(resumed + n, total))
            passes = self.compute(todo, runner=runner, progress=tile_progress)
            store.finalize()
            return todo, passes, store.tile_records()

    def compute(
        self,
        tiles: Sequence[Tile],
        *,
        runner: Runner,
        progress: Callable[[int], object] | None,
    ) -> int:
        """Compute ``tiles``; write each core and then its record as it arrives (streaming);
        return the forward passes. A tile whose task failed on every try is recorded failed."""
        if not tiles:
            return 0
        model_ref = ModelRef.of(self.model, self.cfg)
        shared: dict[str, Any] = {
            "spec": TileSpec.of(self.cfg, model_ref, self.cells),
            "slide": self.slide,
            "model": tasks_model(self.model, self.cfg, runner),
        }
        jobs = [TileJob.of(self.grid, t) for t in tiles]
        group = 1 if self.cells is not None else self.cfg.hipe.tiles_per_batch
        if group == 1:
            pairs = runner.map(run_tile, jobs, shared=shared, errors="return")
        else:
            # hipe.tiles_per_batch: one task explains a group of tiles, sharing model calls.
            groups = [tuple(jobs[i : i + group]) for i in range(0, len(jobs), group)]
            pairs = _per_tile(runner.map(run_tiles, groups, shared=shared, errors="return"))
        passes = done = 0
        for job, outcome in pairs:
            if isinstance(outcome, TaskError):
                record = job.record()
                record["error"] = f"{outcome.error} (failed {outcome.attempts} tries)"
            else:
                if outcome.saliency is not None:
                    self.store.write_tile(job.y, job.x, outcome.saliency, outcome.segmentation)
                if outcome.cells is not None:  # after the tile's chunks, before its record
                    self.store.write_cells(outcome.cells)
                record = outcome.record
            self.store.record_tile(record)
            passes += int(record["passes"] or 0)
            done += 1
            if progress is not None:
                progress(done)
        return passes
