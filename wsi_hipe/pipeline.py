"""Explain whole slides, regions and single cells: the one implementation every face calls.

Per tile (``tiling.tile_size`` px core + ``tiling.halo`` px of context on each side, at
``tiling.mpp`` µm/px)::

    read core+halo ─▶ U-Net ─▶ probabilities ─▶ segmentation (argmax) + score s(x)
    s(x) ≤ floor   ─▶ zero saliency, HiPe skipped            (status "skipped")
    otherwise      ─▶ HiPe(score ∘ U-Net, whole halo tile)  (status "done")
    a read error   ─▶ nothing written, the run goes on      (status "failed")
    keep the core of saliency and segmentation

The default score is the expected lymphocyte area inside the tile core,
``s(x) = Σ_p p_1(x)_p · core_p`` in px² at the target resolution (``score.kind = "area"``,
``score.class = 1``), so context in the halo may change the score but only core pixels count.

Why skipping is safe (the score floor)
--------------------------------------
HiPe's map is a sum over depths ``d = 1..D`` and over the perturbed windows ``w`` at depth ``d``
of ``ReLU(f(x) − f(x'_w))`` on the pixels of ``w``. For a non-negative score (``area``,
``mean``, a cell's area; not ``logit``) every term satisfies
``0 ≤ ReLU(f(x) − f(x'_w)) ≤ f(x)``, because ``f(x'_w) ≥ 0``. In 2-D every pixel lies in exactly
four candidate windows per depth (window origins run from −1 to n−1 over an n × n cell grid), so
whatever windows are selected::

    0 ≤ S(p) ≤ 4 · D · f(x)        for every pixel p,

with ``D`` the number of depths HiPe can run on a tile: the depths ``d ≥ 1`` whose grid
``n_d = n_1 · 2^(d−1)`` keeps cells ≥ ``min_cell_size`` px (``n_d · min_cell_size ≤ m`` for
``d ≥ 2``, ``m`` the tile side with halo, ``n_1`` the start grid), capped by ``max_depth``;
:func:`skip_bound` computes ``4 · D · floor``. Writing zeros for a tile with
``f(x) ≤ floor`` therefore errs by at most ``4 · D · floor`` at any pixel — e.g. 16 px² for
the defaults (floor 1 px², D = 4 on a 320 px tile), against values of the order of a cell's area
(~150 px²) where lymphocytes are. With ``floor = 0`` only tiles with ``f(x) = 0`` are skipped and
the result is exact. A skipped tile costs one forward pass instead of a whole HiPe run.

Whole slides
------------
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

import csv
import glob
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.config import Config, load_config
from wsi_hipe.errors import (
    ConfigError,
    OutputError,
    SlideNotFoundError,
    SlideReadError,
    WsiHipeError,
)
from wsi_hipe.schedule import DEFAULT_TORCH_THREADS, TaskRunner, torch_threads, worker_cache

__all__ = [
    "RegionResult",
    "SlideResult",
    "SlideStatus",
    "TileOutcome",
    "explain_slide",
    "explain_region",
    "explain_cell",
    "explain_batch",
    "resolve_batch_inputs",
    "skip_bound",
    "max_depths",
    "SLIDE_SUFFIXES",
]

logger = logging.getLogger(__name__)

#: File suffixes taken as slides when a batch input is a folder.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)

Progress = Callable[[int, int], object]


# --- results -------------------------------------------------------------------------------


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
    """

    record: dict
    saliency: np.ndarray | None = None
    segmentation: np.ndarray | None = None
    cell_mask: np.ndarray | None = None


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
    def scale_um(self) -> tuple[float, float]:
        """``(y, x)`` µm per target px (for napari/NGFF ``scale``)."""
        return (self.mpp, self.mpp)

    @property
    def translate_um(self) -> tuple[float, float]:
        """``(y, x)`` µm position of target pixel ``[0, 0]``'s centre.

        With slide level-0 pixel ``j`` centred at ``j · slide_mpp`` µm (napari's convention),
        target pixel 0 covers level-0 ``[x0, x0 + scale)`` whose centre is at
        ``(x0 + scale/2 − 1/2) · slide_mpp``.
        """
        x0, y0 = self.origin
        half = (self.scale - 1.0) / 2.0
        return ((y0 + half) * self.slide_mpp, (x0 + half) * self.slide_mpp)


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


# --- the skip bound ------------------------------------------------------------------------


def max_depths(side: int, *, start_grid: int | None, min_cell_size: int, max_depth: int | None):
    """Number of depths HiPe can run on a square input of ``side`` px (the ``D`` of the bound).

    Mirrors :func:`wsi_hipe.hierarchical_perturbation`: depth 1 always runs; depth ``d ≥ 2``
    runs only if ``n_d · min_cell_size ≤ side`` with ``n_d = n_1 · 2^(d−1)``; ``max_depth``
    caps the count.
    """
    from wsi_hipe.hipe import start_grid_size

    n = start_grid if start_grid is not None else start_grid_size(side)
    depths = 1
    while True:
        n *= 2
        if n * min_cell_size > side or (max_depth is not None and depths >= max_depth):
            return depths
        depths += 1


def skip_bound(config: Config | None = None) -> float:
    """Largest saliency a tile skipped by the score floor could have had, in score units.

    ``4 · D · floor`` (see the module docstring), ``D`` = :func:`max_depths` of the halo tile.
    Infinite for ``score.kind = "logit"`` (a signed score: the floor does not apply and no tile
    is skipped).
    """
    cfg = config or Config()
    if cfg.score.kind == "logit":
        return math.inf
    side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    d = max_depths(
        side,
        start_grid=cfg.hipe.start_grid,
        min_cell_size=cfg.hipe.min_cell_size,
        max_depth=cfg.hipe.max_depth,
    )
    return 4.0 * d * cfg.score.floor


# --- tile computation (runs in workers) ----------------------------------------------------


@dataclass(frozen=True)
class _ModelRef:
    """How a worker gets the model: loaded once per process from its source, or an object."""

    source: str | None
    sha256: str | None
    device: str
    autocast: bool

    def get(self, obj=None):
        if obj is not None:
            return obj
        key = ("model", self.source, self.sha256, self.device, self.autocast)
        return worker_cache(key, self._load)

    def _load(self):
        from wsi_hipe.models import load_model

        model = load_model(self.source, device=_resolve_device(self.device), autocast=self.autocast)
        if self.sha256 is not None and model.meta.sha256 != self.sha256:
            raise OutputError(
                f"model {self.source!r} changed on disk during the run (sha256 "
                f"{str(model.meta.sha256)[:12]}…, expected {self.sha256[:12]}…); rerun"
            )
        return model


@dataclass(frozen=True)
class _TileSpec:
    """Everything a tile task needs besides the tile, the slide and the model (picklable)."""

    model: _ModelRef
    mpp: float
    tile_size: int
    halo: int
    score_kind: str
    class_index: int
    floor: float
    hipe: dict


@dataclass(frozen=True)
class _TileJob:
    """One tile: its place in the grid/output and where to read it (level-0 px)."""

    index: int
    row: int
    col: int
    y: int
    x: int
    core: tuple[int, int]
    read_x: float
    read_y: float


def _run_tile(job: _TileJob, *, spec: _TileSpec, slide: Any, model: Any = None) -> TileOutcome:
    """Task body: read, segment, score, maybe explain one tile (module-level: picklable).

    ``slide`` is a ``wsi_hipe.slide.Slide``: it pickles as its path, options and resolved stain
    settings, and each worker process reopens (and caches) the file handle itself.
    """
    return _compute_tile(job, spec, slide, spec.model.get(model))


def _tile_region(spec: _TileSpec, core: tuple[int, int]):
    import torch

    side = spec.tile_size + 2 * spec.halo
    region = torch.zeros((side, side), dtype=torch.float32)
    h, w = core
    region[spec.halo : spec.halo + h, spec.halo : spec.halo + w] = 1.0
    return region


def _score_forward(model, spec: _TileSpec, region, cell_mask=None):
    """The scalar function HiPe explains: ``(B, 1, H, W) -> (B,)``."""
    from wsi_hipe import scores

    if cell_mask is not None:
        return scores.cell_area(model, cell_mask, class_index=spec.class_index)
    if spec.score_kind == "area":
        return scores.class_area(model, class_index=spec.class_index, region=region)
    if spec.score_kind == "mean":
        return scores.mean_probability(model, class_index=spec.class_index, region=region)
    if spec.score_kind == "logit":
        return scores.logit_sum(model, class_index=spec.class_index, region=region)
    raise ConfigError(f"score.kind: must be one of area, mean, logit, got {spec.score_kind!r}")


def _score_of(forward, logits, x) -> float:
    """``forward(x)`` evaluated on logits already computed (no second model pass)."""
    return float(replace(forward, model=lambda _batch: logits)(x[None])[0])


def _compute_tile(
    job: _TileJob,
    spec: _TileSpec,
    slide: Any,
    model: Any,
    *,
    hipe_progress: Callable[[int, int, int], object] | None = None,
    cell_at: tuple[int, int] | None = None,
    keep_full: bool = False,
) -> TileOutcome:
    """Read, segment, score and (above the floor) explain one tile.

    ``cell_at`` (row, col inside the halo tile) switches to the cell score of
    :func:`explain_cell`; ``keep_full`` returns the whole halo tile instead of the core.
    """
    import torch

    from wsi_hipe import hierarchical_perturbation
    from wsi_hipe.models import logits_to_probabilities

    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "index": job.index,
        "row": job.row,
        "col": job.col,
        "y": job.y,
        "x": job.x,
        "status": "failed",
        "score": None,
        "passes": 0,
        "seconds": 0.0,
        "error": None,
    }
    side = spec.tile_size + 2 * spec.halo
    try:
        image = slide.read(job.read_x, job.read_y, side, side, mpp=spec.mpp)
    except SlideReadError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["seconds"] = round(time.perf_counter() - t0, 4)
        logger.warning("tile %d (y=%d, x=%d) failed: %s", job.index, job.y, job.x, exc)
        return TileOutcome(record)
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))[None]  # (1, H, W)
    region = _tile_region(spec, job.core)
    logits = model(x[None])
    probs = logits_to_probabilities(logits, model.meta.activation)
    labels = probs.argmax(dim=1)[0]
    if model.meta.activation == "sigmoid":
        labels = torch.where(probs[0].amax(dim=0) > 0.5, labels, torch.zeros_like(labels))
    segmentation = labels.to(torch.uint8).cpu().numpy()
    passes = 1
    cell_mask = None
    if cell_at is not None:
        cell_mask = _cell_mask(segmentation, cell_at, spec.class_index)
    forward = _score_forward(model, spec, region, cell_mask)
    score = _score_of(forward, logits, x)
    skip = cell_mask is None and spec.score_kind != "logit" and score <= spec.floor
    if skip:
        saliency = np.zeros((side, side), dtype=np.float32)
        record["status"] = "skipped"
    else:
        result = hierarchical_perturbation(forward, x, progress=hipe_progress, **spec.hipe)
        saliency = result.saliency.detach().float().cpu().numpy()
        passes += result.forward_passes
        record["status"] = "done"
    record.update(score=score, passes=passes, seconds=round(time.perf_counter() - t0, 4))
    if keep_full:
        return TileOutcome(record, saliency, segmentation, cell_mask)
    h, w = job.core
    core = (slice(spec.halo, spec.halo + h), slice(spec.halo, spec.halo + w))
    return TileOutcome(
        record,
        np.ascontiguousarray(saliency[core], dtype=np.float32),
        np.ascontiguousarray(segmentation[core]),
    )


def _cell_mask(segmentation: np.ndarray, at: tuple[int, int], class_index: int) -> np.ndarray:
    """The connected component of ``class_index`` under (or nearest to, ≤ 4 px) ``at``."""
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


# --- slide / model helpers -----------------------------------------------------------------


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _open_slide(source, *, mpp, channel, allow_brightfield):
    from wsi_hipe.slide import open_slide

    kwargs: dict[str, Any] = {"mpp": mpp, "channel": channel}
    if allow_brightfield:
        kwargs["allow_brightfield"] = True
    return open_slide(source, **kwargs)


def _as_slide(slide: Any, cfg: Config):
    """A ``Slide`` from a path or an already opened one (returned with 'opened here' flag)."""
    if isinstance(slide, (str, os.PathLike)):
        path = Path(slide)
        if not path.exists():
            raise SlideNotFoundError(f"slide not found: {path}; check the path")
        return (
            _open_slide(
                str(path),
                mpp=cfg.slide.mpp,
                channel=cfg.slide.channel,
                allow_brightfield=cfg.slide.allow_brightfield,
            ),
            True,
        )
    return slide, False


def _slide_path(slide: Any) -> str | None:
    path = getattr(slide, "path", None)
    if path is None:
        reader = getattr(slide, "reader", None)
        path = getattr(reader, "path", None)
    if path is not None and Path(str(path)).exists():
        return str(path)
    return None


def _slide_identity(slide: Any) -> dict[str, Any]:
    """Provenance of the slide (``Slide.provenance()`` when it has one) and a stable id."""
    prov: dict[str, Any] = {}
    getter = getattr(slide, "provenance", None)
    if callable(getter):
        try:
            prov = dict(getter())
        except Exception:  # provenance must never stop a run
            logger.debug("slide provenance failed", exc_info=True)
    path = _slide_path(slide)
    prov.setdefault("path", path)
    prov["mpp"] = float(slide.mpp)
    prov["dimensions"] = list(slide.dimensions)
    if not prov.get("sha256") and path is not None and Path(path).is_file():
        if Path(path).stat().st_size <= _HASH_LIMIT:
            prov["sha256"] = _file_sha256(Path(path))
        else:  # OpenSlide's quickhash (metadata + smallest level) identifies huge files
            logger.info("slide larger than %d bytes: identified by quickhash", _HASH_LIMIT)
    return prov


#: Slides up to this size (bytes) are identified by their SHA-256.
_HASH_LIMIT = 4 << 30


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(model: Any, cfg: Config):
    from wsi_hipe.models import SegmentationModel, load_model

    if isinstance(model, SegmentationModel):
        return model
    spec = cfg.model.path if model is None else model
    if isinstance(spec, os.PathLike):
        spec = str(spec)
    return load_model(spec, device=_resolve_device(cfg.model.device), autocast=cfg.model.autocast)


def _model_identity(model: Any) -> str:
    """The weights' SHA-256, or a hash of the parameters of an in-memory module."""
    sha = getattr(model.meta, "sha256", None)
    if sha:
        return sha
    network = getattr(model, "network", None)
    if network is None:
        fn = getattr(model, "_fn", None)
        return "callable:" + getattr(fn, "__qualname__", type(fn).__name__)
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "state:" + digest.hexdigest()


def _model_ref(model: Any, cfg: Config) -> _ModelRef:
    source = model.meta.source
    loadable = source == "bundled" or (source not in ("callable", "") and Path(source).is_file())
    device = str(model.device) if model.device is not None else cfg.model.device
    return _ModelRef(
        source if loadable else None, model.meta.sha256, device, bool(cfg.model.autocast)
    )


def _tile_spec(cfg: Config, model_ref: _ModelRef) -> _TileSpec:
    h = cfg.hipe
    return _TileSpec(
        model=model_ref,
        mpp=cfg.tiling.mpp,
        tile_size=cfg.tiling.tile_size,
        halo=cfg.tiling.halo,
        score_kind=cfg.score.kind,
        class_index=cfg.score.class_index,
        floor=cfg.score.floor,
        hipe={
            "substrate": h.substrate,
            "threshold": h.threshold,
            "batch_size": h.batch_size,
            "max_depth": h.max_depth,
            "min_cell_size": h.min_cell_size,
            "start_grid": h.start_grid,
            # The authors' code never stops early: a score floor of -inf disables the stop.
            **({} if h.early_stop else {"stop_rtol": 0.0, "stop_atol": -math.inf}),
        },
    )


def _check_model_for(model: Any, cfg: Config) -> None:
    classes = model.meta.num_classes
    if not 0 <= cfg.score.class_index < classes:
        raise ConfigError(
            f"score.class: the model has {classes} classes {list(model.meta.class_names)}, "
            f"got class {cfg.score.class_index}"
        )
    multiple = getattr(model, "input_multiple", 1)
    side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    if side % multiple:
        raise ConfigError(
            f"tiling.tile_size + 2*tiling.halo = {side} must be a multiple of {multiple} for "
            "this model"
        )


def _versions() -> dict[str, str]:
    out = {}
    for name in (
        "wsi-hipe",
        "torch",
        "segmentation-models-pytorch",
        "numpy",
        "zarr",
        "ome-zarr",
        "dask",
        "distributed",
        "openslide-python",
        "openslide-bin",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _config_of(config: Config | str | os.PathLike | Mapping | None) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return load_config(overrides=config)
    return load_config(config)


def _runner_for(scheduler: Any, cfg: Config, *, gpu: bool) -> tuple[TaskRunner, bool]:
    """A TaskRunner from a spec / an existing runner; the flag says whether we own it."""
    if isinstance(scheduler, TaskRunner):
        return scheduler, False
    sched = cfg.schedule
    spec = sched.scheduler if scheduler is None else str(scheduler)
    return (
        TaskRunner(
            spec,
            workers=sched.workers,
            max_in_flight=sched.max_in_flight,
            threads_per_worker=sched.threads_per_worker,
            gpu=gpu,
        ),
        True,
    )


def _thumbnail_size(dimensions: Sequence[int]) -> int:
    """Thumbnail side for tissue detection: ≈ 4 level-0 px per thumbnail px, at most 2048."""
    return int(max(64, min(2048, math.ceil(max(dimensions) / 4))))


def _detect_tissue(slide: Any):
    return slide.detect_tissue(max_size=_thumbnail_size(slide.dimensions))


# --- whole slides ----------------------------------------------------------------------------


def explain_slide(
    slide: Any,
    output: str | os.PathLike,
    *,
    config: Config | str | os.PathLike | Mapping | None = None,
    model: Any = None,
    scheduler: Any = None,
    overwrite: bool = False,
    progress: Progress | None = None,
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
        ``progress(done, total)`` after every tile written (tiles finished earlier count as
        done from the start).

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
        ``output`` was made with another configuration, model or slide (use ``overwrite``).

    Notes
    -----
    Tiles whose pixels cannot be read (:class:`~wsi_hipe.errors.SlideReadError`) are recorded
    as failed with the error and left zero; the run goes on and reports them in
    ``SlideResult.failed``. Rerunning retries only them.
    """
    from wsi_hipe.omezarr import create_output, make_fingerprint
    from wsi_hipe.tiling import make_grid

    t_start = time.perf_counter()
    cfg = _config_of(config)
    output = Path(output)
    slide_obj, opened_here = _as_slide(slide, cfg)
    try:
        model_obj = _load(model, cfg)
        _check_model_for(model_obj, cfg)
        tissue = _detect_tissue(slide_obj)
        grid = make_grid(
            slide_obj.dimensions,
            slide_mpp=float(slide_obj.mpp),
            target_mpp=cfg.tiling.mpp,
            tile_size=cfg.tiling.tile_size,
            halo=cfg.tiling.halo,
            tissue=tissue,
            min_tissue=cfg.tiling.min_tissue,
        )
        slide_prov = _slide_identity(slide_obj)
        model_id = _model_identity(model_obj)
        fingerprint = make_fingerprint(
            {
                "config": cfg.fingerprint(),
                "model": model_id,
                "slide": {
                    "sha256": slide_prov.get("sha256"),
                    "dimensions": slide_prov["dimensions"],
                    "mpp": slide_prov["mpp"],
                    "channel": getattr(slide_obj, "channel", None),
                },
                "tiles": len(grid.tiles),
            }
        )
        provenance = {
            "slide": slide_prov,
            "model": {**model_obj.meta.to_json_dict(), "identity": model_id},
            "config": cfg.to_dict(),
            "config_fingerprint": cfg.fingerprint(),
            "versions": _versions(),
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
        store = create_output(
            output,
            shape=grid.shape,
            chunk=cfg.tiling.tile_size,
            mpp=cfg.tiling.mpp,
            slide_mpp=float(slide_obj.mpp),
            fingerprint=fingerprint,
            provenance=provenance,
            ngff=cfg.output.ngff,
            overwrite=overwrite,
            resume=not overwrite,
        )
        with store:
            finished = store.finished_tiles()
            if not finished:
                store.write_tissue(tissue.mask, downsample=tissue.downsample)
            todo = [t for t in grid.tiles if t.index not in finished]
            total = len(grid.tiles)
            resumed = total - len(todo)
            logger.info(
                "%s: %d tissue tiles of %d (%d to compute, %d finished earlier)",
                output,
                total,
                grid.n_rows * grid.n_cols,
                len(todo),
                resumed,
            )
            if progress is not None:
                progress(resumed, total)
            passes = _run_tiles(
                store,
                grid,
                todo,
                slide_obj,
                model_obj,
                cfg,
                scheduler=scheduler,
                progress=None if progress is None else (lambda n: progress(resumed + n, total)),
            )
            store.finalize()
            records = store.tile_records()
    finally:
        if opened_here:
            slide_obj.close()
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for record in records.values():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    failed = [
        {k: r.get(k) for k in ("index", "y", "x", "error")}
        for r in sorted(records.values(), key=lambda r: r["index"])
        if r["status"] == "failed"
    ]
    if failed:
        logger.warning("%s: %d tile(s) failed (rerun to retry them)", output, len(failed))
    return SlideResult(
        slide=str(slide_prov.get("path") or slide),
        output=output,
        shape=tuple(grid.shape),
        tiles_total=len(grid.tiles),
        counts=counts,
        computed=len(todo),
        resumed=resumed,
        forward_passes=passes,
        failed=failed,
        seconds=time.perf_counter() - t_start,
        fingerprint=fingerprint,
    )


def _run_tiles(store, grid, tiles, slide, model, cfg, *, scheduler, progress) -> int:
    """Compute ``tiles`` on the scheduler; write each core and then its record (single writer)."""
    if not tiles:
        return 0
    gpu = str(model.device).startswith("cuda")
    runner, owned = _runner_for(scheduler, cfg, gpu=gpu)
    remote = runner.kind in ("processes", "local", "tcp")
    model_ref = _model_ref(model, cfg)
    spec = _tile_spec(cfg, model_ref)
    shared: dict[str, Any] = {"spec": spec, "slide": slide}
    if not remote or model_ref.source is None:
        # threads/sync share the loaded model; an in-memory model must travel to workers.
        shared["model"] = model
    jobs = (
        _TileJob(t.index, t.row, t.col, t.y, t.x, tuple(t.core), *grid.read_window(t)[:2])
        for t in tiles
    )
    passes = 0
    done = 0
    try:
        for job, outcome in runner.map(_run_tile, jobs, shared=shared):
            if outcome.saliency is not None:
                store.write_tile(job.y, job.x, outcome.saliency, outcome.segmentation)
            store.record_tile(outcome.record)
            passes += int(outcome.record["passes"])
            done += 1
            if progress is not None:
                progress(done)
    finally:
        if owned:
            runner.close()
    return passes


# --- regions and cells -----------------------------------------------------------------------


class _Stopped(Exception):
    """Raised from HiPe's progress hook when ``should_stop()`` turns true."""


def _region_setup(slide, config, model):
    cfg = _config_of(config)
    slide_obj, opened_here = _as_slide(slide, cfg)
    model_obj = _load(model, cfg)
    _check_model_for(model_obj, cfg)
    spec = _tile_spec(cfg, _model_ref(model_obj, cfg))
    return cfg, slide_obj, opened_here, model_obj, spec


def _depth_progress(progress, should_stop, step: int, total_steps: int, depths: int):
    """HiPe progress hook → ``progress(done, total)`` in 1/100 tile units; raises to cancel."""

    def hook(depth: int, done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise _Stopped
        if progress is not None and total:
            frac = (min(depth, depths) - 1 + done / total) / depths
            progress(step * 100 + min(99, int(frac * 100)), total_steps * 100)

    return hook


def explain_region(
    slide: Any,
    x0: float,
    y0: float,
    width: float,
    height: float,
    *,
    config: Config | str | os.PathLike | Mapping | None = None,
    model: Any = None,
    score: str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
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
        As for :func:`explain_slide` (``schedule`` is ignored: regions run here).
    score : {"area", "mean", "logit"}, optional
        The tile score; default ``config.score.kind`` (``"area"``: expected lymphocyte area in
        the core). The region is tiled exactly like a slide (cores of ``tiling.tile_size`` with
        their halo), each tile's score restricted to its core, and the score floor applies.
    progress : callable, optional
        ``progress(done, total)``, in hundredths of a tile, during HiPe.
    should_stop : callable, optional
        Polled during HiPe; when it returns True the run stops and returns what is done
        (``stopped=True``).

    Returns
    -------
    RegionResult
        Tiles are placed at their target-px positions, so the result equals the per-tile
        computation stitched by hand (no seams or shifts).
    """
    from wsi_hipe.tiling import make_grid

    t0 = time.perf_counter()
    if not (width > 0 and height > 0):
        raise ValueError(f"width and height must be > 0 level-0 px, got {width}, {height}")
    cfg = _config_of(config)
    if score is not None and score != cfg.score.kind:
        cfg = cfg.with_overrides({"score.kind": score})
    cfg, slide_obj, opened_here, model_obj, spec = _region_setup(slide, cfg, model)
    try:
        grid = make_grid(
            (max(1, math.ceil(width)), max(1, math.ceil(height))),
            slide_mpp=float(slide_obj.mpp),
            target_mpp=cfg.tiling.mpp,
            tile_size=cfg.tiling.tile_size,
            halo=cfg.tiling.halo,
        )
        sal = np.zeros(grid.shape, dtype=np.float32)
        seg = np.zeros(grid.shape, dtype=np.uint8)
        depths = max_depths(
            spec.tile_size + 2 * spec.halo,
            start_grid=cfg.hipe.start_grid,
            min_cell_size=cfg.hipe.min_cell_size,
            max_depth=cfg.hipe.max_depth,
        )
        records: list[dict] = []
        threads = cfg.schedule.threads_per_worker or DEFAULT_TORCH_THREADS
        with torch_threads(threads):
            stopped = _region_loop(
                grid,
                spec,
                slide_obj,
                model_obj,
                x0,
                y0,
                sal,
                seg,
                records,
                progress,
                should_stop,
                depths,
            )
        passes = sum(int(r["passes"]) for r in records)
        total_score = sum(
            float(r["score"]) for r in records if r["score"] is not None and r["status"] != "failed"
        )
    finally:
        if opened_here:
            slide_obj.close()
    return RegionResult(
        saliency=sal,
        segmentation=seg,
        origin=(float(x0), float(y0)),
        scale=float(grid.scale),
        mpp=cfg.tiling.mpp,
        slide_mpp=float(slide_obj.mpp),
        score=total_score,
        forward_passes=passes,
        tiles=records,
        seconds=time.perf_counter() - t0,
        stopped=stopped,
    )


def _region_loop(
    grid, spec, slide_obj, model_obj, x0, y0, sal, seg, records, progress, should_stop, depths
) -> bool:
    """Compute the tiles of a region in order, in place; return whether it was stopped."""
    for step, tile in enumerate(grid.tiles):
        if should_stop is not None and should_stop():
            return True
        rx, ry = grid.read_window(tile)[:2]
        job = _TileJob(
            tile.index, tile.row, tile.col, tile.y, tile.x, tuple(tile.core), x0 + rx, y0 + ry
        )
        hook = _depth_progress(progress, should_stop, step, len(grid.tiles), depths)
        try:
            outcome = _compute_tile(job, spec, slide_obj, model_obj, hipe_progress=hook)
        except _Stopped:
            return True
        records.append(outcome.record)
        if outcome.saliency is not None:
            rows, cols = grid.target_slices(tile)
            sal[rows, cols] = outcome.saliency
            seg[rows, cols] = outcome.segmentation
        if progress is not None:
            progress((step + 1) * 100, len(grid.tiles) * 100)
    return False


def explain_cell(
    slide: Any,
    x: float,
    y: float,
    *,
    config: Config | str | os.PathLike | Mapping | None = None,
    model: Any = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
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
        Level-0 px position of the point.
    config, model, progress, should_stop
        As for :func:`explain_region`.

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
    cfg, slide_obj, opened_here, model_obj, spec = _region_setup(slide, config, model)
    try:
        scale = cfg.tiling.mpp / float(slide_obj.mpp)
        side = spec.tile_size + 2 * spec.halo
        centre = side // 2
        # The point lies in target pixel ``centre`` of the tile on both axes.
        ox = float(x) - (centre + 0.5) * scale
        oy = float(y) - (centre + 0.5) * scale
        job = _TileJob(0, 0, 0, 0, 0, (side, side), ox, oy)
        cell_spec = replace(spec, halo=0, tile_size=side)
        depths = max_depths(
            side,
            start_grid=cfg.hipe.start_grid,
            min_cell_size=cfg.hipe.min_cell_size,
            max_depth=cfg.hipe.max_depth,
        )
        hook = _depth_progress(progress, should_stop, 0, 1, depths)
        stopped = False
        try:
            with torch_threads(cfg.schedule.threads_per_worker or DEFAULT_TORCH_THREADS):
                outcome = _compute_tile(
                    job,
                    cell_spec,
                    slide_obj,
                    model_obj,
                    hipe_progress=hook,
                    cell_at=(centre, centre),
                    keep_full=True,
                )
        except _Stopped:
            stopped = True
            outcome = TileOutcome(
                {"index": 0, "status": "stopped", "passes": 0, "score": None},
                np.zeros((side, side), np.float32),
                np.zeros((side, side), np.uint8),
            )
        if outcome.saliency is None:
            raise SlideReadError(f"cannot read the slide around ({x}, {y}): {outcome.record}")
        if progress is not None and not stopped:
            progress(100, 100)
    finally:
        if opened_here:
            slide_obj.close()
    return RegionResult(
        saliency=outcome.saliency,
        segmentation=outcome.segmentation,
        origin=(ox, oy),
        scale=scale,
        mpp=cfg.tiling.mpp,
        slide_mpp=float(slide_obj.mpp),
        score=float(outcome.record["score"] or 0.0),
        forward_passes=int(outcome.record["passes"]),
        tiles=[outcome.record],
        seconds=time.perf_counter() - t0,
        stopped=stopped,
        cell_mask=outcome.cell_mask,
        cell_label=cfg.score.class_index,
    )


# --- batches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    """One slide of a batch: its path, an optional mpp override and output name."""

    slide: Path
    mpp: float | None = None
    output: str | None = None


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _sanitize(name: str) -> str:
    """A safe file-name stem: letters, digits, ``._-``; no leading dots; never empty."""
    stem = _SAFE.sub("_", name).strip("._-") or "slide"
    return stem[:120]


def _slide_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def resolve_batch_inputs(inputs: Any) -> list[BatchItem]:
    """Turn a batch input into a list of slides.

    Parameters
    ----------
    inputs : path, glob or list
        A folder (its slide files, by suffix: :data:`SLIDE_SUFFIXES`, not recursive), a glob
        pattern (``"slides/*.svs"``), a CSV manifest with a ``slide`` column and optional
        ``mpp`` and ``output`` columns (relative slide paths are taken from the manifest's
        folder), or a list of paths / :class:`BatchItem`.

    Returns
    -------
    list of BatchItem, in a deterministic (sorted or manifest) order.

    Raises
    ------
    SlideNotFoundError
        Nothing matched.
    ConfigError
        A manifest without a ``slide`` column or with a bad ``mpp``.
    """
    if isinstance(inputs, (list, tuple)):
        items = [i if isinstance(i, BatchItem) else BatchItem(Path(i)) for i in inputs]
    else:
        text = str(inputs)
        path = Path(text)
        if path.is_dir():
            items = [
                BatchItem(p)
                for p in sorted(path.iterdir())
                if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            ]
        elif path.is_file() and path.suffix.lower() == ".csv":
            items = _read_manifest(path)
        elif path.is_file():
            items = [BatchItem(path)]
        elif any(ch in text for ch in "*?["):
            items = [BatchItem(Path(p)) for p in sorted(glob.glob(text)) if Path(p).is_file()]
        else:
            raise SlideNotFoundError(f"batch input not found: {text}; pass a folder, glob or CSV")
    if not items:
        raise SlideNotFoundError(
            f"no slides found in {inputs!r} (slide suffixes: {', '.join(SLIDE_SUFFIXES)})"
        )
    return items


def _read_manifest(path: Path) -> list[BatchItem]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "slide" not in fields:
            raise ConfigError(f"{path}: a manifest needs a 'slide' column, got columns {fields}")
        items = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("slide"):
                continue
            slide = Path(row["slide"])
            if not slide.is_absolute():
                slide = path.parent / slide
            mpp = None
            if row.get("mpp"):
                try:
                    mpp = float(row["mpp"])
                except ValueError:
                    mpp = -1.0
                if not mpp > 0:
                    raise ConfigError(
                        f"{path}, line {line}: mpp must be a positive number (µm/px), "
                        f"got {row['mpp']!r}"
                    )
            items.append(BatchItem(slide, mpp, row.get("output") or None))
    return items


def _output_names(items: Sequence[BatchItem], outdir: Path) -> list[Path]:
    """Unique, sanitised outputs inside ``outdir`` (``a.ome.zarr``, ``a-2.ome.zarr``, ...)."""
    root = outdir.resolve()
    taken: set[str] = set()
    out = []
    for item in items:
        if item.output:
            requested = Path(item.output)
            if requested.is_absolute() or ".." in requested.parts:
                raise OutputError(
                    f"manifest output {item.output!r} for {item.slide} must be a relative path "
                    f"inside the output folder {outdir} (no '..', not absolute)"
                )
            parts = [_sanitize(p) for p in requested.parts]
            name = "/".join(parts)
            if not name.endswith(".zarr"):
                name += ".ome.zarr"
            if name.lower() in taken:
                raise OutputError(
                    f"manifest output {item.output!r} is used twice; give each slide its own"
                )
            candidate = root / name
            if root not in candidate.resolve().parents:
                raise OutputError(f"manifest output {item.output!r} leaves {outdir}; refused")
        else:
            stem = _sanitize(_slide_stem(item.slide))
            name = f"{stem}.ome.zarr"
            k = 2
            while name.lower() in taken:
                name = f"{stem}-{k}.ome.zarr"
                k += 1
            candidate = root / name
        taken.add(name.lower())
        out.append(candidate)
    return out


def explain_batch(
    inputs: Any,
    outdir: str | os.PathLike,
    *,
    config: Config | str | os.PathLike | Mapping | None = None,
    model: Any = None,
    scheduler: Any = None,
    overwrite: bool = False,
    skip_errors: bool = False,
    progress: Callable[[str, int, int], object] | None = None,
    on_slide: Callable[[SlideStatus, int, int], object] | None = None,
    on_start: Callable[[str, Path], object] | None = None,
) -> list[SlideStatus]:
    """Explain many slides into ``outdir``, one OME-Zarr each.

    Parameters
    ----------
    inputs : folder, glob, CSV manifest or list
        See :func:`resolve_batch_inputs`.
    outdir : path
        Created if needed. Outputs are named from the slides (sanitised, made unique:
        ``a.ome.zarr``, ``a-2.ome.zarr``) or by the manifest's ``output`` column; nothing is
        written outside ``outdir``.
    config, model, scheduler
        As for :func:`explain_slide`; the model is loaded and the scheduler started once.
    overwrite : bool
        Replace existing outputs. Without it an existing output is resumed if it matches, and
        reported as failed if not (``ResumeMismatchError``).
    skip_errors : bool
        Go on past a slide that fails. Without it the batch stops at the first failure
        (finished outputs are kept; the remaining slides are reported as "not run").
    progress : callable, optional
        ``progress(slide_name, done_tiles, total_tiles)`` during each slide.
    on_slide : callable, optional
        ``on_slide(status, done_slides, total_slides)`` after each slide.
    on_start : callable, optional
        ``on_start(slide, output)`` before each slide runs (e.g. to log into its output).

    Returns
    -------
    list of SlideStatus
        One per input slide, in input order.
    """
    cfg = _config_of(config)
    outdir = Path(outdir)
    items = resolve_batch_inputs(inputs)
    outputs = _output_names(items, outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model_obj = _load(model, cfg)
    runner, owned = _runner_for(scheduler, cfg, gpu=str(model_obj.device).startswith("cuda"))
    statuses: list[SlideStatus] = []
    try:
        stop = False
        for i, (item, out) in enumerate(zip(items, outputs, strict=True)):
            if stop:
                statuses.append(SlideStatus(str(item.slide), out, "not run"))
                continue
            slide_cfg = cfg if item.mpp is None else cfg.with_overrides({"slide.mpp": item.mpp})
            t0 = time.perf_counter()
            hook = None
            if progress is not None:
                name = item.slide.name

                def hook(done: int, total: int, _name: str = name) -> None:
                    progress(_name, done, total)

            if on_start is not None:
                on_start(str(item.slide), out)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                result = explain_slide(
                    item.slide,
                    out,
                    config=slide_cfg,
                    model=model_obj,
                    scheduler=runner,
                    overwrite=overwrite,
                    progress=hook,
                )
            except Exception as exc:  # one slide's failure must not lose the batch's statuses
                if isinstance(exc, (WsiHipeError, OSError, ValueError)):
                    logger.error("%s failed: %s", item.slide, exc)
                else:  # e.g. a torch RuntimeError (CUDA out of memory): keep the traceback
                    logger.exception("%s failed unexpectedly", item.slide)
                status = SlideStatus(
                    str(item.slide),
                    out,
                    "failed",
                    f"{type(exc).__name__}: {exc}",
                    None,
                    time.perf_counter() - t0,
                )
                stop = not skip_errors
            else:
                state = "done" if result.ok else "partial"
                error = None if result.ok else f"{len(result.failed)} tile(s) failed"
                status = SlideStatus(
                    str(item.slide), out, state, error, result, time.perf_counter() - t0
                )
            statuses.append(status)
            if on_slide is not None:
                on_slide(status, i + 1, len(items))
    finally:
        if owned:
            runner.close()
    return statuses
