"""Slide-level evaluation: HiPe settings on synthetic slides with ground truth, at slide scale.

For every synthetic slide (lymphocyte density × seed, :mod:`wsi_hipe.synthetic`) and every
HiPe setting of the grid (substrate × threshold × depth), the slide is tiled as the pipeline
tiles it (the tissue mask of :func:`wsi_hipe.pipeline.explain_slide`, tile cores with their
halo, the score floor) and every tissue tile is explained with the pipeline's score; the cores
are stitched into the slide's map. That map is compared with the ground truth:

localisation
    ``auroc`` — AUROC of the saliency for lymphocyte (class) pixels against the pixels of the
    other nuclei: does the map tell the explained class from nuclei that merely look alike?
    ``relevance_mass`` — share of the saliency on class pixels, with ``mass_chance``, the
    class share of the tissue (what a map spread evenly over the tissue gets).
    ``tile_spearman`` — Spearman of per-tile saliency (its sum over the core) with per-tile
    class area: do tiles with more lymphocytes get more saliency? ``densest_rank`` — the rank
    of the tile with the most class area by saliency (1 = it got the most): a map that misses
    the densest cluster shows here. ``class_in_blank_tiles`` — the share of class pixels in
    tiles left without any saliency (skipped by the floor, or flat).
faithfulness
    insertion and deletion AUC (:mod:`wsi_hipe.metrics`) on the tiles with the most class area
    (and the median one), each with every metric substrate (``fade``, ``mean``, ``blur``,
    ``background``), next to the same curves for a random pixel order: a map made with the
    metric's own substrate is favoured by it, so one substrate alone proves little.
sanity
    cascading model-parameter randomisation (MPRT, Adebayo et al. 2018): the head, the decoder,
    then the encoder's blocks are re-initialised in turn and the Spearman correlation of the
    new map with the trained model's map is recorded per stage; and a data-randomisation
    check with a random model (every parameter re-initialised). A map that stays correlated
    is driven by the input, not by what the model learned.
cost
    forward passes per tissue tile (the segmentation pass included, as the pipeline counts
    them), wall and CPU seconds per tile (the CPU time of this process: what a tile costs on
    one core whatever else runs on the machine).

The ``background`` substrate (:func:`wsi_hipe.metrics.tissue_background`: the tile with its
nuclei removed by a grey opening) is passed to HiPe as a callable; every other setting is a
pipeline configuration. ``tests/test_evaluation.py`` checks that the stitched map equals
``explain_slide``'s output for a pipeline setting.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_hipe import metrics
from wsi_hipe.config import Config, load_config
from wsi_hipe.errors import ConfigError
from wsi_hipe.evaluation._slide_config import (
    BACKGROUND,
    DepthSection,
    SlideEvaluationConfig,
    load_slide_evaluation_config,
)
from wsi_hipe.evaluation._slide_results import SlideEvaluationResult, _add_unit
from wsi_hipe.hipe import hierarchical_perturbation, max_depths, start_grid_size

__all__ = [
    "Setting",
    "grid_settings",
    "model_stages",
    "run_slide_evaluation",
    "synthetic_slide_set",
]

logger = logging.getLogger(__name__)

#: ``progress(done, total)`` in units of work (a slide × a setting, a sanity tile × a setting).
Progress = Callable[[int, int], object]


# --- the grid ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One point of the grid: what HiPe is run with on every tile.

    Attributes
    ----------
    substrate : str
        A :data:`wsi_hipe.config.Substrate` name or ``"background"``.
    threshold : {'mid-range', 'mean'}
    start_grid : int or None
        Cells per side at depth 1 (None: the authors' rule for the tile side).
    max_depth : int or None
        Depths at most (None: until cells reach ``min_cell_size``).
    min_cell_size : int
    """

    substrate: str
    threshold: str
    start_grid: int | None
    max_depth: int | None
    min_cell_size: int = 4

    @property
    def key(self) -> str:
        """Label in the tables, e.g. ``"fade · mid-range · 4×3"`` (start grid × depths)."""
        start = "auto" if self.start_grid is None else str(self.start_grid)
        depth = "all" if self.max_depth is None else str(self.max_depth)
        cells = "" if self.min_cell_size == 4 else f" ≥{self.min_cell_size}px"
        return f"{self.substrate} · {self.threshold} · {start}×{depth}{cells}"

    def depths(self, side: int) -> int:
        """Depths HiPe runs on a ``side`` px tile (:func:`wsi_hipe.hipe.max_depths`)."""
        return max_depths(
            side,
            start_grid=self.start_grid,
            min_cell_size=self.min_cell_size,
            max_depth=self.max_depth,
        )

    def finest_cell_px(self, side: int) -> float:
        """Side in px of the finest cells on a ``side`` px tile."""
        n = self.start_grid if self.start_grid is not None else start_grid_size(side)
        return side / (n * 2 ** (self.depths(side) - 1))

    @classmethod
    def of(cls, substrate: str, threshold: str, depth: DepthSection) -> Setting:
        return cls(substrate, threshold, depth.start_grid, depth.max_depth, depth.min_cell_size)


def grid_settings(config: SlideEvaluationConfig) -> list[Setting]:
    """Every substrate × threshold × depth point of ``config.grid``, in that order."""
    g = config.grid
    return [Setting.of(s, t, d) for d in g.depths for t in g.thresholds for s in g.substrates]


def _sanity_settings(config: SlideEvaluationConfig) -> list[Setting]:
    s = config.sanity
    subs = s.substrates if s.substrates is not None else config.grid.substrates
    return [Setting.of(sub, s.threshold, s.depth) for sub in subs]


def model_stages(model: torch.nn.Module) -> list[str]:
    """The cascading-randomisation stages of a segmentation network, output side first.

    For an encoder–decoder (smp: ``segmentation_head``, ``decoder``, ``encoder``, possibly
    wrapped as ``network`` by :class:`wsi_hipe.models.SegmentationModel`): the head, the
    decoder, then each block of the encoder that has parameters, deepest first. Otherwise
    every module owning parameters, head first.
    """
    modules = dict(model.named_modules())
    prefix = "network." if "network" in modules else ""

    def has_params(m: torch.nn.Module) -> bool:
        return any(True for _ in m.parameters())

    stages = [
        prefix + name
        for name in ("segmentation_head", "decoder")
        if prefix + name in modules and has_params(modules[prefix + name])
    ]
    encoder = modules.get(prefix + "encoder")
    if encoder is not None:
        blocks = [n for n, m in encoder.named_children() if has_params(m)]
        stages += [f"{prefix}encoder.{n}" for n in reversed(blocks)]
    if not stages:
        stages = [
            name
            for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        ][::-1]
    return stages


# --- the slides ---------------------------------------------------------------------------------


def synthetic_slide_set(config: SlideEvaluationConfig, folder: str | Path) -> list[dict[str, Any]]:
    """Write (or reuse) the synthetic slides of ``config.slides`` into ``folder``.

    Returns
    -------
    list of dict
        ``name`` (e.g. ``"clustered s1"``), ``density``, ``seed``, ``path`` and
        ``ground_truth`` (the paths of :func:`wsi_hipe.synthetic.ground_truth_paths`).
        A slide whose ground-truth JSON matches (size, seed, mpp, density, artefacts) is reused.
    """
    from wsi_hipe.synthetic import ground_truth_paths, write_slide

    s = config.slides
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in s.seeds:  # every density of the first seed first: partial runs cover them all
        for density in s.densities:
            path = folder / f"{density}-s{seed}-{s.size}px.tiff"
            gt = ground_truth_paths(path)
            if not _matches(gt["meta"], s.size, seed, s.mpp, density, s.artefacts):
                logger.info("writing synthetic slide %s", path)
                write_slide(
                    path,
                    size=s.size,
                    seed=seed,
                    mpp=s.mpp,
                    density=density,
                    artefacts=s.artefacts,
                    tile_size=min(512, max(16, 16 * (s.size // 16))),
                )
            out.append(
                {
                    "name": f"{density} s{seed}",
                    "density": density,
                    "seed": seed,
                    "path": path,
                    "ground_truth": gt,
                }
            )
    return out


def _matches(meta_path: Path, size: int, seed: int, mpp: float, density: str, artefacts: bool):
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        meta.get("size") == [size, size]
        and meta.get("seed") == seed
        and meta.get("mpp") == mpp
        and meta.get("density") == density
        and meta.get("artefacts") == artefacts
        and meta.get("gt_downsample") == 1
        and all((meta_path.parent / f).is_file() for f in meta.get("files", {}).values())
    )


@dataclass
class _TileData:
    """One tissue tile of a slide: its window, clean score and ground-truth class area."""

    tile: Any
    image: np.ndarray  # (side, side) float32, the halo window
    region: torch.Tensor  # (side, side) float32, 1 on the core
    score: float
    class_area: int  # class pixels of the ground truth in the core


@dataclass
class _Case:
    """One slide with its ground truth at the target resolution and its tissue tiles."""

    name: str
    density: str
    seed: int
    grid: Any
    lymph: np.ndarray  # (H, W) bool
    other: np.ndarray  # (H, W) bool: other nuclei
    tissue: np.ndarray  # (H, W) bool (ground truth)
    tiles: list[_TileData] = field(default_factory=list)

    @property
    def side(self) -> int:
        return self.grid.window


def _load_case(entry: Mapping[str, Any], cfg: Config, model, *, slide_mpp: float) -> _Case:
    """Open a slide, tile it as the pipeline does, read its tiles and their clean scores."""
    import tifffile

    from wsi_hipe.pipeline._inputs import detect_tissue  # the pipeline's own tissue step
    from wsi_hipe.scores import make_score
    from wsi_hipe.slide import open_slide
    from wsi_hipe.tiling import make_grid

    slide = open_slide(entry["path"])
    try:
        grid = make_grid(
            slide.dimensions,
            slide_mpp=float(slide.mpp),
            target_mpp=cfg.tiling.mpp,
            tile_size=cfg.tiling.tile_size,
            halo=cfg.tiling.halo,
            tissue=detect_tissue(slide),
            min_tissue=cfg.tiling.min_tissue,
        )
        if abs(grid.scale - 1.0) > 1e-9:
            raise ConfigError(
                f"slides.mpp ({slide_mpp} µm/px) must equal the pipeline's tiling.mpp "
                f"({cfg.tiling.mpp}) so the ground truth lies on the map's pixel grid"
            )
        gt = entry["ground_truth"]
        lymph = tifffile.imread(gt["lymphocytes"]) > 0
        nuclei = tifffile.imread(gt["nuclei"]) > 0
        tissue = tifffile.imread(gt["tissue"]) > 0
        h, w = grid.shape
        lymph, nuclei, tissue = (a[:h, :w] for a in (lymph, nuclei, tissue))
        case = _Case(
            entry["name"], entry["density"], entry["seed"], grid, lymph, nuclei & ~lymph, tissue
        )
        side = grid.window
        with torch.no_grad():
            for tile in grid.tiles:
                x0, y0, width, height = grid.read_window(tile)
                image = np.ascontiguousarray(
                    slide.read(x0, y0, width, height, mpp=cfg.tiling.mpp), dtype=np.float32
                )
                region = torch.zeros((side, side), dtype=torch.float32)
                ch, cw = tile.core
                region[grid.halo : grid.halo + ch, grid.halo : grid.halo + cw] = 1.0
                forward = make_score(
                    model, cfg.score.kind, class_index=cfg.score.class_index, region=region
                )
                score = float(forward(torch.as_tensor(image)[None, None])[0])
                rows, cols = grid.target_slices(tile)
                case.tiles.append(
                    _TileData(tile, image, region, score, int(lymph[rows, cols].sum()))
                )
    finally:
        slide.close()
    return case


# --- explaining ---------------------------------------------------------------------------------


def _hipe_options(cfg: Config, setting: Setting, background_radius_px: float) -> dict[str, Any]:
    """Keyword options of :func:`hierarchical_perturbation`, as the pipeline passes them."""
    h = cfg.hipe
    substrate: Any = setting.substrate
    if substrate == BACKGROUND:
        substrate = functools.partial(metrics.tissue_background, radius_px=background_radius_px)
    return {
        "substrate": substrate,
        "threshold": setting.threshold,
        "batch_size": h.batch_size,
        "max_depth": setting.max_depth,
        "min_cell_size": setting.min_cell_size,
        "start_grid": setting.start_grid,
        **({} if h.early_stop else {"stop_rtol": 0.0, "stop_atol": -math.inf}),
    }


def _metric_substrate(name: str, background_radius_px: float) -> Any:
    if name == BACKGROUND:
        return functools.partial(metrics.tissue_background, radius_px=background_radius_px)
    return name


@dataclass
class _Explained:
    """A setting's stitched map of one slide, with its per-tile passes and times."""

    saliency: np.ndarray
    passes: list[int]
    seconds: list[float]
    cpu_seconds: list[float]
    tile_maps: dict[int, np.ndarray]  # full halo-window maps of the requested tiles


def _explain_case(
    case: _Case, cfg: Config, model, options: dict[str, Any], keep: set[int]
) -> _Explained:
    """Explain every tissue tile of ``case`` (the floor skips as in the pipeline), stitched."""
    from wsi_hipe.scores import make_score

    grid = case.grid
    saliency = np.zeros(grid.shape, dtype=np.float32)
    passes, seconds, cpu, kept = [], [], [], {}
    skip_floor = cfg.score.kind != "logit"
    for k, t in enumerate(case.tiles):
        t0, c0 = time.perf_counter(), time.process_time()
        if skip_floor and t.score <= cfg.score.floor:
            sal, n = np.zeros((case.side, case.side), np.float32), 1
        else:
            forward = make_score(
                model, cfg.score.kind, class_index=cfg.score.class_index, region=t.region
            )
            res = hierarchical_perturbation(forward, torch.as_tensor(t.image)[None], **options)
            sal, n = res.saliency.detach().float().cpu().numpy(), 1 + res.forward_passes
        rows, cols = grid.target_slices(t.tile)
        core_rows, core_cols = grid.core_slices(t.tile)
        saliency[rows, cols] = sal[core_rows, core_cols]
        if k in keep:
            kept[k] = sal
        passes.append(n)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return _Explained(saliency, passes, seconds, cpu, kept)


def _localisation(case: _Case, ex: _Explained) -> dict[str, Any]:
    """The localisation and cost columns of one (slide, setting)."""
    sal = ex.saliency
    grid = case.grid
    per_tile = np.array(
        [float(sal[grid.target_slices(t.tile)].sum()) for t in case.tiles], dtype=np.float64
    )
    area = np.array([t.class_area for t in case.tiles], dtype=np.float64)
    has_class, has_other = bool(case.lymph.any()), bool(case.other.any())
    auroc = metrics.auroc(sal, case.lymph, case.other) if has_class and has_other else math.nan
    chance = float(case.lymph[case.tissue].sum() / max(1, case.tissue.sum()))
    densest_rank, share_ratio = math.nan, math.nan
    if len(case.tiles) and area.max() > 0:
        d = int(np.argmax(area))
        densest_rank = 1 + int(np.sum(per_tile > per_tile[d]))
        total = per_tile.sum()
        share_ratio = (per_tile[d] / total) / (area[d] / area.sum()) if total > 0 else 0.0
    blank = np.zeros(grid.shape, bool)
    for t, s in zip(case.tiles, per_tile, strict=True):
        if s == 0:
            blank[grid.target_slices(t.tile)] = True
    n_class = int(case.lymph.sum())
    return {
        "tissue_tiles": len(case.tiles),
        "explained_tiles": int(sum(p > 1 for p in ex.passes)),
        "auroc": auroc,
        "relevance_mass": metrics.relevance_mass(sal, case.lymph) if has_class else math.nan,
        "mass_chance": chance,
        "tile_spearman": metrics.spearman(per_tile, area) if len(case.tiles) > 2 else math.nan,
        "densest_rank": densest_rank,
        "densest_share_ratio": share_ratio,
        "class_in_blank_tiles": float((case.lymph & blank).sum() / n_class)
        if n_class
        else math.nan,
        "passes_per_tile": float(np.mean(ex.passes)) if ex.passes else math.nan,
        "seconds_per_tile": float(np.mean(ex.seconds)) if ex.seconds else math.nan,
        "cpu_seconds_per_tile": float(np.mean(ex.cpu_seconds)) if ex.cpu_seconds else math.nan,
    }


def _faithfulness_tiles(case: _Case, cfg: Config, n: int) -> list[int]:
    """Indices of the tiles with the most class area, then the median one (above the floor)."""
    if n <= 0:
        return []
    above = [k for k, t in enumerate(case.tiles) if t.score > cfg.score.floor and t.class_area > 0]
    above.sort(key=lambda k: (-case.tiles[k].class_area, k))
    chosen = above[: max(1, n - 1)]
    if n > 1 and len(above) > len(chosen):
        rest = [k for k in above if k not in chosen]
        chosen.append(rest[len(rest) // 2])
    return chosen


def _curves(
    case: _Case, k: int, sal: np.ndarray, cfg: Config, model, config: SlideEvaluationConfig, rpx
) -> list[tuple[str, float, float]]:
    """(metric substrate, insertion AUC, deletion AUC) of one tile's map, per substrate."""
    from wsi_hipe.scores import make_score

    t = case.tiles[k]
    f = config.faithfulness
    forward = make_score(model, cfg.score.kind, class_index=cfg.score.class_index, region=t.region)
    x = torch.as_tensor(t.image)[None]
    out = []
    for name in f.substrates:
        sub = _metric_substrate(name, rpx)
        ins, dele = metrics.insertion_deletion(
            forward,
            x,
            sal,
            insertion_substrate=sub,
            deletion_substrate=sub,
            step_fraction=f.step_fraction,
            batch_size=cfg.hipe.batch_size,
            blur_sigma=f.blur_sigma,
        )
        out.append((name, ins.auc, dele.auc))
    return out


# --- resumable records --------------------------------------------------------------------------


class _Store:
    """Records appended to JSONL files in ``out`` (none without ``out``); a rerun with the same
    fingerprint skips the units already recorded."""

    def __init__(self, out: Path | None, fingerprint: str) -> None:
        self.out = out
        self.done: dict[str, list[dict]] = {}
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        stamp = out / "fingerprint.txt"
        if stamp.exists() and stamp.read_text().strip() != fingerprint:
            raise ConfigError(
                f"{out} holds an evaluation made with another model, pipeline configuration "
                "or metric settings; use another out folder or delete it"
            )
        stamp.write_text(fingerprint + "\n")
        path = out / "records.jsonl"
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    unit = json.loads(line)
                except ValueError:
                    continue  # a line cut short by an interrupted run
                self.done[unit["unit"]] = unit["rows"]

    def get(self, unit: str) -> list[dict] | None:
        return self.done.get(unit)

    def put(self, unit: str, rows: list[dict]) -> None:
        self.done[unit] = rows
        if self.out is not None:
            with open(self.out / "records.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"unit": unit, "rows": rows}, default=float) + "\n")


def _fingerprint(config: SlideEvaluationConfig, cfg: Config, model_sha: str | None) -> str:
    parts = {
        "model": model_sha,
        "pipeline": cfg.results_dict(),
        "faithfulness": config.faithfulness.model_dump(),
        "sanity": config.sanity.model_dump(exclude={"seeds", "substrates"}),
        "background_radius_um": config.grid.background_radius_um,
        "slides": config.slides.model_dump(include={"size", "mpp", "artefacts"}),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --- the run ----------------------------------------------------------------------------------


def _sanity_rows(
    case: _Case, k: int, setting: Setting, cfg: Config, model, config, rpx, stages
) -> list[dict]:
    """MPRT per stage and the random model, on tile ``k`` of ``case``, for one setting."""
    from wsi_hipe.scores import make_score

    t = case.tiles[k]
    options = _hipe_options(cfg, setting, rpx)

    def make_forward(m):
        return make_score(m, cfg.score.kind, class_index=cfg.score.class_index, region=t.region)

    def explainer(forward, x):
        return hierarchical_perturbation(forward, x, **options).saliency

    x = torch.as_tensor(t.image)[None]
    res = metrics.randomisation_check(
        model,
        explainer,
        x,
        make_forward=make_forward,
        layers=stages,
        seed=config.sanity.random_model_seed,
        keep_maps=True,
    )
    base = {"slide": case.name, "tile": t.tile.index, "setting": setting.key}
    rows = []
    for stage, rho, sal in zip(res.layers, res.correlations, res.maps, strict=True):
        flat = bool(np.all(sal == sal.flat[0]))
        rows.append({**base, "stage": stage, "spearman": 0.0 if flat else float(rho), "flat": flat})
    area = float(t.region.sum())
    random_model = _random_model(model, make_forward, x, config.sanity.random_model_seed, area)
    sal = np.asarray(explainer(make_forward(random_model), x))
    flat = bool(np.all(sal == sal.flat[0]))
    rho = 0.0 if flat else metrics.spearman(res.original, np.abs(sal))
    rows.append({**base, "stage": "random model", "spearman": float(rho), "flat": flat})
    return rows


def _random_model(model, make_forward, x: torch.Tensor, seed: int, area: float, tries: int = 20):
    """A copy of ``model`` with every parameter re-initialised (the data-randomisation check's
    random model), from the first of ``seed + 10_000 + i`` whose score on ``x`` is not
    degenerate (between 1 % and 99 % of the score's range ``[0, area]``, the core area):
    a random network often saturates to one class everywhere, and its map is then flat for a
    reason that says nothing about the explainer."""
    candidate = model
    for i in range(tries):
        candidate = copy.deepcopy(model)
        metrics.randomise_parameters(candidate, seed + 10_000 + i)
        with torch.no_grad():
            value = float(make_forward(candidate)(x[None])[0])
        if 0.01 * area < value < 0.99 * area:
            return candidate
    return candidate


def run_slide_evaluation(
    config: SlideEvaluationConfig | str | Path | None = None,
    *,
    out: str | Path | None = None,
    model: Any = None,
    overrides: Mapping[str, Any] | None = None,
    keep_maps: bool | list[str] = False,
    progress: Progress | None = None,
) -> SlideEvaluationResult:
    """Evaluate HiPe settings at slide scale on synthetic slides with ground truth.

    Parameters
    ----------
    config : SlideEvaluationConfig, YAML path or None
        ``configs/evaluate_slide.yaml`` or similar; None = all defaults.
    out : path, optional
        Results folder: slides are written to ``out/slides`` (reused when present), every
        finished unit (a slide × a setting) is appended to ``out/records.jsonl`` so that an
        interrupted run resumes, and the tables are saved there at the end. Without it,
        slides go to a temporary folder and nothing is kept.
    model : optional
        Anything :func:`wsi_hipe.models.load_model` accepts (default ``config.model``).
    overrides : mapping, optional
        Dotted overrides of the evaluation config (``{"slides.seeds": [0]}``).
    keep_maps : bool or list of str
        Keep the stitched maps of every setting (True) or of the listed setting keys, in
        ``result.maps`` and as ``out/maps/*.npy``.
    progress : callable, optional
        ``progress(done, total)`` in units of work.

    Returns
    -------
    SlideEvaluationResult
    """
    import tempfile

    from wsi_hipe.models import load_model

    if not isinstance(config, SlideEvaluationConfig):
        config = load_slide_evaluation_config(config, overrides=overrides)
    elif overrides:
        config = load_slide_evaluation_config(None, overrides={**config.model_dump(), **overrides})
    cfg = load_config(config.pipeline_config, overrides=config.pipeline)
    net = load_model(model if model is not None else config.model, device=config.device)
    sha = getattr(getattr(net, "meta", None), "sha256", None)
    out_path = Path(out) if out is not None else None
    store = _Store(out_path, _fingerprint(config, cfg, sha))
    tmp = None
    if out_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="wsi-hipe-slide-eval-")
    try:
        with _threads(config.threads):
            result = _run(config, cfg, net, store, out_path, tmp, keep_maps, progress)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result.settings.update(
        config=config.model_dump(),
        pipeline=cfg.to_dict(),
        model_sha256=sha,
        device=str(getattr(net, "device", "cpu")),
        threads=config.threads,
    )
    if out_path is not None:
        result.save(out_path)
    return result


class _threads:
    """``torch.set_num_threads(n)`` inside the block (None: unchanged)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)


def _run(config, cfg, net, store, out_path, tmp, keep_maps, progress) -> SlideEvaluationResult:
    folder = (out_path / "slides") if out_path is not None else Path(tmp.name)
    entries = synthetic_slide_set(config, folder)
    settings = grid_settings(config)
    sanity_settings = _sanity_settings(config)
    stages = config.sanity.stages or model_stages(net)
    sanity_entries = [e for e in entries if e["seed"] in config.sanity.seeds]
    rpx = config.grid.background_radius_um / cfg.tiling.mpp
    total = len(entries) * (len(settings) + 1) + len(sanity_entries) * len(sanity_settings)
    result = SlideEvaluationResult(settings={"slides": [str(e["path"]) for e in entries]})
    done = 0
    for entry in entries:
        lazy = _LazyCase(entry, cfg, net, config)
        load = lazy.get
        # The control: a random pixel order on the faithfulness tiles (once per slide).
        unit = f"random\t{entry['name']}"
        rows = store.get(unit)
        if rows is None:
            c = load()
            rows = []
            rng = np.random.default_rng(entry["seed"])
            for k in lazy.faith_tiles:
                sal = rng.random((c.side, c.side)).astype(np.float32)
                for name, ins, dele in _curves(c, k, sal, cfg, net, config, rpx):
                    rows.append(_faith_row(c, k, "random", name, ins, dele))
            store.put(unit, rows)
        result.faithfulness += rows
        done += 1
        if progress is not None:
            progress(done, total)
        for setting in settings:
            unit = f"slide\t{entry['name']}\t{setting.key}"
            rows = store.get(unit)
            want_map = keep_maps is True or (
                isinstance(keep_maps, list) and setting.key in keep_maps
            )
            map_path = None
            if out_path is not None and want_map:
                map_path = out_path / "maps" / _file_name(entry["name"], setting.key)
            if rows is None or (want_map and (map_path is None or not map_path.exists())):
                c = load()
                ex = _explain_case(
                    c, cfg, net, _hipe_options(cfg, setting, rpx), set(lazy.faith_tiles)
                )
                row = {
                    "slide": c.name,
                    "density": c.density,
                    "seed": c.seed,
                    "setting": setting.key,
                    "substrate": setting.substrate,
                    "threshold": setting.threshold,
                    "start_grid": setting.start_grid,
                    "max_depth": setting.max_depth,
                    "finest_cell_px": setting.finest_cell_px(c.side),
                    **_localisation(c, ex),
                }
                faith = [
                    _faith_row(c, k, setting.key, name, ins, dele)
                    for k in lazy.faith_tiles
                    for name, ins, dele in _curves(c, k, ex.tile_maps[k], cfg, net, config, rpx)
                ]
                rows = [{"kind": "slide", **row}] + [{"kind": "faith", **r} for r in faith]
                store.put(unit, rows)
                if want_map:
                    result.maps[(c.name, setting.key)] = ex.saliency
                    if map_path is not None:
                        map_path.parent.mkdir(parents=True, exist_ok=True)
                        np.save(map_path, ex.saliency)
                logger.info(
                    "%s, %s: AUROC %.3f, tile rho %.3f, %.0f passes/tile",
                    c.name,
                    setting.key,
                    row["auroc"],
                    row["tile_spearman"],
                    row["passes_per_tile"],
                )
            elif want_map and map_path is not None:
                result.maps[(entry["name"], setting.key)] = np.load(map_path)
            _add_unit(result, unit, rows)
            done += 1
            if progress is not None:
                progress(done, total)
        if entry in sanity_entries:
            for setting in sanity_settings:
                unit = f"sanity\t{entry['name']}\t{setting.key}\t{','.join(stages)}"
                rows = store.get(unit)
                if rows is None:
                    c = load()
                    chosen = _faithfulness_tiles(c, cfg, config.sanity.tiles_per_slide)
                    rows = [
                        row
                        for k in chosen
                        for row in _sanity_rows(c, k, setting, cfg, net, config, rpx, stages)
                    ]
                    store.put(unit, rows)
                result.sanity += rows
                done += 1
                if progress is not None:
                    progress(done, total)
    return result


class _LazyCase:
    """A slide's :class:`_Case`, loaded only when a unit of it is not recorded yet."""

    def __init__(self, entry: Mapping[str, Any], cfg: Config, net, config) -> None:
        self.entry, self.cfg, self.net, self.config = entry, cfg, net, config
        self.case: _Case | None = None
        self.faith_tiles: list[int] = []

    def get(self) -> _Case:
        if self.case is None:
            self.case = _load_case(self.entry, self.cfg, self.net, slide_mpp=self.config.slides.mpp)
            n = self.config.faithfulness.tiles_per_slide
            self.faith_tiles = _faithfulness_tiles(self.case, self.cfg, n)
        return self.case


def _faith_row(case: _Case, k: int, setting: str, name: str, ins: float, dele: float) -> dict:
    t = case.tiles[k]
    return {
        "slide": case.name,
        "tile": t.tile.index,
        "class_area_px": t.class_area,
        "setting": setting,
        "metric_substrate": name,
        "insertion_auc": float(ins),
        "deletion_auc": float(dele),
    }


def _file_name(slide: str, setting: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in f"{slide}__{setting}")
    return safe + ".npy"
