"""One tile: read, segment, score and (above the score floor) explain it. Runs in workers.

Per tile (``tiling.tile_size`` px core + ``tiling.halo`` px of context on each side, at
``tiling.mpp`` µm/px)::

    read core+halo ─▶ U-Net ─▶ logits ─▶ segmentation (SegmentationModel.segment) + score s(x)
    s(x) ≤ floor   ─▶ zero saliency, HiPe skipped            (status "skipped")
    otherwise      ─▶ HiPe(score ∘ U-Net, whole halo tile)  (status "done")
    a read error   ─▶ nothing written, the run goes on      (status "failed")
    keep the core of saliency and segmentation

The default score is the expected lymphocyte area inside the tile core,
``s(x) = Σ_p p_1(x)_p · core_p`` in px² at the target resolution (``score.kind = "area"``,
``score.class = 1``), so context in the halo may change the score but only core pixels count.
Scores are built by :func:`wsi_hipe.scores.make_score`; the segmentation pass's logits are
scored with :meth:`wsi_hipe.scores.Score.from_logits`, so no second pass is spent on them.

Why skipping is safe (the score floor)
--------------------------------------
HiPe's map is a sum over depths ``d = 1..D`` and over the perturbed windows ``w`` at depth ``d``
of ``ReLU(f(x) − f(x'_w))`` on the pixels of ``w``. For a non-negative score (``area``,
``mean``, a cell's area; not ``logit``) every term satisfies
``0 ≤ ReLU(f(x) − f(x'_w)) ≤ f(x)``, because ``f(x'_w) ≥ 0``. In 2-D every pixel lies in exactly
four candidate windows per depth (window origins run from −1 to n−1 over an n × n cell grid), so
whatever windows are selected::

    0 ≤ S(p) ≤ 4 · D · f(x)        for every pixel p,

with ``D`` the number of depths HiPe can run on a tile (:func:`wsi_hipe.hipe.max_depths`: the
depths ``d ≥ 1`` whose grid ``n_d = n_1 · 2^(d−1)`` keeps cells ≥ ``min_cell_size`` px, capped by
``max_depth``); :func:`skip_bound` computes ``4 · D · floor``. Writing zeros for a tile with
``f(x) ≤ floor`` therefore errs by at most ``4 · D · floor`` at any pixel — e.g. 16 px² for
the defaults (floor 1 px², D = 4 on a 320 px tile), against values of the order of a cell's area
(~150 px²) where lymphocytes are. With ``floor = 0`` only tiles with ``f(x) = 0`` are skipped and
the result is exact. A skipped tile costs one forward pass instead of a whole HiPe run.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_hipe.config import Config, ScoreKind
from wsi_hipe.errors import OutputError, SlideReadError
from wsi_hipe.hipe import hierarchical_perturbation, max_depths
from wsi_hipe.pipeline._results import TileOutcome
from wsi_hipe.schedule import worker_cache

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.pipeline._cells import CellSettings
    from wsi_hipe.scores import Score
    from wsi_hipe.slide import Slide
    from wsi_hipe.tiling import Tile, TileGrid

__all__ = ["skip_bound"]

logger = logging.getLogger(__name__)

#: HiPe's progress hook: ``hook(depth, done, total)`` (windows of the depth done so far).
HipeProgress = Callable[[int, int, int], object]


def skip_bound(config: Config | None = None) -> float:
    """Largest saliency a tile skipped by the score floor could have had, in score units.

    ``4 · D · floor`` (see the module docstring), ``D`` = :func:`wsi_hipe.hipe.max_depths` of
    the halo tile. Infinite for ``score.kind = "logit"`` (a signed score: the floor does not
    apply and no tile is skipped).
    """
    cfg = config or Config()
    if cfg.score.kind == "logit":
        return math.inf
    return 4.0 * tile_depths(cfg) * cfg.score.floor


def tile_depths(cfg: Config, side: int | None = None) -> int:
    """Depths HiPe can run on a tile of ``side`` px (default: core + 2 · halo) under ``cfg``."""
    if side is None:
        side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    return max_depths(
        side,
        start_grid=cfg.hipe.start_grid,
        min_cell_size=cfg.hipe.min_cell_size,
        max_depth=cfg.hipe.max_depth,
    )


def hipe_substrate(cfg: Config) -> str | Callable:
    """``hipe.substrate`` as the engine takes it: a name, or for ``"background"`` the picklable
    :func:`wsi_hipe.metrics.tissue_background` with ``hipe.background_radius_um`` in target px."""
    if cfg.hipe.substrate != "background":
        return cfg.hipe.substrate
    from wsi_hipe import metrics

    radius_px = cfg.hipe.background_radius_um / cfg.tiling.mpp
    return functools.partial(metrics.tissue_background, radius_px=radius_px)


# --- what a task receives (picklable) ---------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """How a worker gets the model: loaded once per process from its source, or an object."""

    source: str | None
    sha256: str | None
    device: str
    autocast: bool

    def get(self, obj: SegmentationModel | None = None) -> SegmentationModel:
        if obj is not None:
            return obj
        key = ("model", self.source, self.sha256, self.device, self.autocast)
        return worker_cache(key, self._load)

    def _load(self) -> SegmentationModel:
        from wsi_hipe.models import load_model

        model = load_model(self.source, device=self.device, autocast=self.autocast)
        if self.sha256 is not None and model.meta.sha256 != self.sha256:
            raise OutputError(
                f"model {self.source!r} changed on disk during the run (sha256 "
                f"{str(model.meta.sha256)[:12]}…, expected {self.sha256[:12]}…); rerun"
            )
        return model

    @classmethod
    def of(cls, model: SegmentationModel, cfg: Config) -> ModelRef:
        """A reference workers can load ``model`` from (``source`` None: it must travel)."""
        source = model.meta.source
        loadable = source == "bundled" or (
            source not in ("callable", "") and Path(source).is_file()
        )
        device = str(model.device) if model.device is not None else cfg.model.device
        return cls(
            source if loadable else None, model.meta.sha256, device, bool(cfg.model.autocast)
        )


@dataclass(frozen=True)
class TileSpec:
    """Everything a tile task needs besides the tile, the slide and the model (picklable)."""

    model: ModelRef
    mpp: float
    tile_size: int
    halo: int
    score_kind: ScoreKind
    class_index: int
    floor: float
    hipe: dict
    cells: CellSettings | None = None

    @property
    def side(self) -> int:
        """Side of the model input: core + 2 · halo, target px."""
        return self.tile_size + 2 * self.halo

    @classmethod
    def of(cls, cfg: Config, model_ref: ModelRef, cells: CellSettings | None = None) -> TileSpec:
        """``cells``: also find and explain every cell of each tile (:mod:`._cells`)."""
        h = cfg.hipe
        return cls(
            model=model_ref,
            mpp=cfg.tiling.mpp,
            tile_size=cfg.tiling.tile_size,
            halo=cfg.tiling.halo,
            score_kind=cfg.score.kind,
            class_index=cfg.score.class_index,
            floor=cfg.score.floor,
            hipe={
                "substrate": hipe_substrate(cfg),
                "threshold": h.threshold,
                "batch_size": h.batch_size,
                "max_depth": h.max_depth,
                "min_cell_size": h.min_cell_size,
                "start_grid": h.start_grid,
                # The authors' code never stops early: a score floor of -inf disables the stop.
                **({} if h.early_stop else {"stop_rtol": 0.0, "stop_atol": -math.inf}),
            },
            cells=cells,
        )


@dataclass(frozen=True)
class TileJob:
    """One tile: its place in the grid/output and where to read it (level-0 px)."""

    index: int
    row: int
    col: int
    y: int
    x: int
    core: tuple[int, int]
    read_x: float
    read_y: float

    @classmethod
    def of(cls, grid: TileGrid, tile: Tile, x0: float = 0.0, y0: float = 0.0) -> TileJob:
        """The job of ``tile`` of ``grid``, whose level-0 origin is at ``(x0, y0)``."""
        rx, ry = grid.read_window(tile)[:2]
        return cls(
            tile.index, tile.row, tile.col, tile.y, tile.x, tuple(tile.core), x0 + rx, y0 + ry
        )

    def record(self) -> dict[str, Any]:
        """A fresh tile-table row for this tile (status "failed" until computed)."""
        return {
            "index": self.index,
            "row": self.row,
            "col": self.col,
            "y": self.y,
            "x": self.x,
            "status": "failed",
            "score": None,
            "passes": 0,
            "seconds": 0.0,
            "error": None,
        }


# --- the computation --------------------------------------------------------------------------


def run_tile(
    job: TileJob, *, spec: TileSpec, slide: Slide, model: SegmentationModel | None = None
) -> TileOutcome:
    """Task body: read, segment, score, maybe explain one tile (module-level: picklable).

    ``slide`` is a ``wsi_hipe.slide.Slide``: it pickles as its path, options and resolved stain
    settings, and each worker process reopens (and caches) the file handle itself.
    """
    return compute_tile(job, spec, slide, spec.model.get(model))


def run_tiles(
    jobs: Sequence[TileJob],
    *,
    spec: TileSpec,
    slide: Slide,
    model: SegmentationModel | None = None,
) -> list[TileOutcome]:
    """Task body of ``hipe.tiles_per_batch > 1``: several tiles whose HiPe runs share model
    calls (:func:`compute_tiles`); one outcome per job, in order (module-level: picklable)."""
    return compute_tiles(jobs, spec, slide, spec.model.get(model))


@dataclass
class _Prepared:
    """A tile read, segmented and scored; HiPe still to run (or skipped)."""

    job: TileJob
    record: dict
    t0: float
    x: Any  # (C, side, side) tensor on the model's device
    logits: Any
    segmentation: np.ndarray
    forward: Score
    score: float
    explain: bool
    cell_mask: np.ndarray | None = None
    seconds: float = 0.0  # reading, segmenting and scoring


def _prepare(
    job: TileJob,
    spec: TileSpec,
    slide: Slide,
    model: SegmentationModel,
    cell_at: tuple[int, int] | None = None,
) -> _Prepared | TileOutcome:
    """Read, segment and score one tile; a read error gives the tile's failed outcome."""
    import torch

    t0 = time.perf_counter()
    record = job.record()
    side = spec.side
    try:
        # (C, side, side): the stain, or slide.channels in order, each on its own range
        image = slide.read_input(job.read_x, job.read_y, side, side, mpp=spec.mpp)
    except SlideReadError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["seconds"] = round(time.perf_counter() - t0, 4)
        logger.warning("tile %d (y=%d, x=%d) failed: %s", job.index, job.y, job.x, exc)
        return TileOutcome(record)
    # The tile goes to the model's device once; HiPe builds every perturbed batch there.
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)).to(model.device)
    logits = model(x[None])
    segmentation = model.segment(x[None], logits=logits)[0].to(torch.uint8).cpu().numpy()
    cell_mask = None if cell_at is None else cell_mask_at(segmentation, cell_at, spec.class_index)
    forward = tile_score(model, spec, job.core, cell_mask)
    score = float(forward.from_logits(logits)[0])
    explain = cell_mask is not None or spec.score_kind == "logit" or score > spec.floor
    record.update(score=score, passes=1)
    return _Prepared(
        job, record, t0, x, logits, segmentation, forward, score, explain, cell_mask,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _finish(
    tile: _Prepared,
    spec: TileSpec,
    saliency: np.ndarray | None,
    *,
    seconds: float | None = None,
    cell_rows: Any = None,
    keep_full: bool = False,
) -> TileOutcome:
    """The tile's outcome: its record completed, and the core of its maps (or the halo tile)."""
    record = tile.record
    if saliency is None:
        saliency = np.zeros((spec.side, spec.side), dtype=np.float32)
    if seconds is None:
        seconds = time.perf_counter() - tile.t0
    record["seconds"] = round(seconds, 4)
    if keep_full:
        return TileOutcome(record, saliency, tile.segmentation, tile.cell_mask)
    h, w = tile.job.core
    core = (slice(spec.halo, spec.halo + h), slice(spec.halo, spec.halo + w))
    return TileOutcome(
        record,
        np.ascontiguousarray(saliency[core], dtype=np.float32),
        np.ascontiguousarray(tile.segmentation[core]),
        cells=cell_rows,
    )


def compute_tile(
    job: TileJob,
    spec: TileSpec,
    slide: Slide,
    model: SegmentationModel,
    *,
    hipe_progress: HipeProgress | None = None,
    cell_at: tuple[int, int] | None = None,
    keep_full: bool = False,
) -> TileOutcome:
    """Read, segment, score and (above the floor) explain one tile.

    ``cell_at`` (row, col inside the halo tile) switches to the cell score of
    :func:`~wsi_hipe.pipeline.explain_cell`; ``keep_full`` returns the whole halo tile instead
    of the core.
    """
    tile = _prepare(job, spec, slide, model, cell_at)
    if isinstance(tile, TileOutcome):
        return tile
    record, device = tile.record, model.device
    if spec.cells is not None and tile.cell_mask is None:
        # The tile's score and its cells: one vector HiPe run (the tile map as without cells).
        h, w = job.core
        found = spec.cells.explain(
            model, tile.x, tile.logits, tile.segmentation, core=(spec.halo, spec.halo, h, w),
            mpp=spec.mpp, floor=spec.floor, tile_score=tile.forward if tile.explain else None,
            hipe={**spec.hipe, "device": device}, progress=hipe_progress,
        )  # fmt: skip
        cell_rows = spec.cells.rows(found, tile=job.index, origin=(job.y, job.x), halo=spec.halo)
        record["passes"] += found.forward_passes
        record["status"] = "done" if tile.explain else "skipped"
        record["cells"] = int(found.cells.n)
        record["cells_explained"] = int((found.status == "done").sum())
        return _finish(tile, spec, found.tile_saliency, cell_rows=cell_rows, keep_full=keep_full)
    if not tile.explain:
        record["status"] = "skipped"
        return _finish(tile, spec, None, keep_full=keep_full)
    result = hierarchical_perturbation(
        tile.forward, tile.x, device=device, progress=hipe_progress, **spec.hipe
    )
    record["passes"] += result.forward_passes
    record["status"] = "done"
    saliency = result.saliency.detach().float().cpu().numpy()
    return _finish(tile, spec, saliency, keep_full=keep_full)


def compute_tiles(
    jobs: Sequence[TileJob], spec: TileSpec, slide: Slide, model: SegmentationModel
) -> list[TileOutcome]:
    """Several tiles, their HiPe runs sharing model calls; one outcome per job, in order.

    Each tile is read, segmented and scored on its own; the tiles above the score floor are
    then explained by one :func:`~wsi_hipe.hipe_many.hierarchical_perturbation_many`, so a
    forward batch takes the windows of as many tiles as fit (late depths select few windows
    per tile, and a GPU batch would run mostly empty). Each tile's map is the one
    :func:`compute_tile` gives, up to the float rounding of a different batch shape. A tile
    whose HiPe run fails (non-finite scores) is recorded failed; the others are kept. Its
    ``seconds`` are its own reading and scoring plus its share of the shared model calls.
    With cells (``spec.cells``), each tile is one vector run of its own (:func:`compute_tile`).
    """
    from wsi_hipe.hipe_many import hierarchical_perturbation_many

    if spec.cells is not None or len(jobs) == 1:
        return [compute_tile(job, spec, slide, model) for job in jobs]
    tiles = [_prepare(job, spec, slide, model) for job in jobs]
    explain = [t for t in tiles if isinstance(t, _Prepared) and t.explain]
    results = []
    if explain:
        results = hierarchical_perturbation_many(
            model, [t.x for t in explain], scores=[t.forward.from_logits for t in explain],
            device=model.device, return_exceptions=True, **spec.hipe,
        )  # fmt: skip
    found = {id(t): r for t, r in zip(explain, results, strict=True)}
    outcomes = []
    for tile in tiles:
        if isinstance(tile, TileOutcome):
            outcomes.append(tile)
            continue
        record, own = tile.record, tile.seconds
        result = found.get(id(tile))
        if result is None:
            record["status"] = "skipped"
            outcomes.append(_finish(tile, spec, None, seconds=own))
        elif isinstance(result, Exception):
            record["error"] = f"{type(result).__name__}: {result}"
            record["seconds"] = round(own, 4)
            logger.warning("tile %d (y=%d, x=%d) failed: %s", tile.job.index, tile.job.y,
                           tile.job.x, result)  # fmt: skip
            outcomes.append(TileOutcome(record))
        else:
            record["passes"] += result.forward_passes
            record["status"] = "done"
            saliency = result.saliency.detach().float().cpu().numpy()
            outcomes.append(_finish(tile, spec, saliency, seconds=own + result.seconds))
    return outcomes


def tile_score(
    model: SegmentationModel,
    spec: TileSpec,
    core: tuple[int, int],
    cell_mask: np.ndarray | None = None,
) -> Score:
    """The scalar function HiPe explains, ``(B, C, H, W) -> (B,)``: the configured score kind
    restricted to the tile's ``core`` (``(h, w)`` target px), or the area of ``cell_mask``."""
    import torch

    from wsi_hipe.scores import make_score

    if cell_mask is not None:
        return make_score(model, "cell", cell_mask=cell_mask, class_index=spec.class_index)
    region = torch.zeros((spec.side, spec.side), dtype=torch.float32)
    h, w = core
    region[spec.halo : spec.halo + h, spec.halo : spec.halo + w] = 1.0
    return make_score(model, spec.score_kind, class_index=spec.class_index, region=region)


def cell_mask_at(segmentation: np.ndarray, at: tuple[int, int], class_index: int) -> np.ndarray:
    """The connected component of ``class_index`` under (or nearest to, ≤ 4 px) ``at``.

    Parameters
    ----------
    segmentation : (H, W) integer ndarray
        Class labels of a tile.
    at : (row, col)
        The point, in pixels of ``segmentation``.
    class_index : int

    Returns
    -------
    (H, W) bool ndarray

    Raises
    ------
    ValueError
        No pixel of the class, or none within 4 px of the point.
    """
    from scipy import ndimage

    labels, count = ndimage.label(segmentation == class_index)
    r, c = at
    if count == 0:
        raise ValueError(
            f"no pixel of class {class_index} was segmented around the point; click inside "
            "a segmented cell (or pick another score class)"
        )
    label = labels[r, c]
    if label == 0:
        r0, r1 = max(0, r - 4), min(labels.shape[0], r + 5)
        c0, c1 = max(0, c - 4), min(labels.shape[1], c + 5)
        window = labels[r0:r1, c0:c1]
        ys, xs = np.nonzero(window)
        if ys.size == 0:
            raise ValueError(
                f"no segmented cell of class {class_index} within 4 px of the point; click "
                "inside a segmented cell"
            )
        nearest = np.argmin((ys + r0 - r) ** 2 + (xs + c0 - c) ** 2)
        label = window[ys[nearest], xs[nearest]]
    return labels == label
