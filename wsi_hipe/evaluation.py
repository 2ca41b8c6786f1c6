"""Saliency-quality evaluation: HiPe against baselines on tiles with ground truth.

For every sample (an input ``x`` with ground-truth instances) and every method, the runner
computes the map with :func:`wsi_hipe.baselines.explain` and scores it with
:mod:`wsi_hipe.metrics`: forward passes, wall time, insertion AUC (blur substrate), deletion
AUC (zero substrate), the pointing game and the relevance mass inside the ground truth. The
result is one row per (sample, method) and one summary row per method, as markdown or CSV.

Three entry points, from generic to turnkey:

- :func:`evaluate_samples` - any scalar ``forward`` and any samples (tests use tiny models);
- :func:`synthetic_samples` - synthetic Hoechst tiles with lymphocyte instance ground truth;
- :func:`run_evaluation` - the configured run (``configs/evaluate.yaml``): the bundled model,
  the lymphocyte area score, synthetic tiles, the configured methods. ``pipelines/evaluate.py``
  and the CLI call it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wsi_hipe import baselines, metrics
from wsi_hipe.errors import ConfigError

__all__ = [
    "DEFAULT_METHODS",
    "EvaluationConfig",
    "EvaluationResult",
    "MethodSpec",
    "Sample",
    "centre_cell",
    "evaluate_samples",
    "load_evaluation_config",
    "run_evaluation",
    "synthetic_samples",
]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[str, int, int], object]

#: Columns of the per-(sample, method) table, in order.
RECORD_COLUMNS = (
    "sample",
    "method",
    "forward_passes",
    "seconds",
    "insertion_auc",
    "deletion_auc",
    "pointing_hit",
    "pointing_distance_px",
    "relevance_mass",
    "clean_score",
)
#: Columns of the per-method summary (means over samples; the hit rate over samples with GT).
SUMMARY_COLUMNS = (
    "method",
    "samples",
    "forward_passes",
    "seconds",
    "insertion_auc",
    "deletion_auc",
    "pointing_hit_rate",
    "relevance_mass",
)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a label, a :data:`wsi_hipe.baselines.METHODS` name, options.

    Attributes
    ----------
    name : str
        Label in the tables, e.g. ``"occlusion 16/8"``.
    method : str
        One of :data:`wsi_hipe.baselines.METHODS`.
    options : dict
        Keyword options of that method (``batch_size`` is filled in when the method takes one).
    """

    name: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in baselines.METHODS:
            raise ValueError(
                f"method {self.method!r} of {self.name!r} is not one of {list(baselines.METHODS)}"
            )


#: The comparison of the issue: HiPe vs occlusion 16/8 vs RISE 2k/8k vs gradients.
DEFAULT_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("hipe", "hipe", {}),
    MethodSpec("occlusion 16/8", "occlusion", {"window": 16, "stride": 8}),
    MethodSpec("rise 2000", "rise", {"n_masks": 2000}),
    MethodSpec("rise 8000", "rise", {"n_masks": 8000}),
    MethodSpec("gradient", "gradient", {}),
    MethodSpec("integrated gradients", "integrated_gradients", {"n_steps": 32}),
)


@dataclass(frozen=True)
class Sample:
    """One evaluation input.

    Attributes
    ----------
    name : str
        Identifier in the tables (e.g. ``"tile seed 3"``).
    x : (C, H, W) float32 tensor
        The model input.
    ground_truth : (H, W) int ndarray
        Instance labels of what the score is about (0 = none), e.g. lymphocytes.
    forward : callable, optional
        This sample's own scalar score (e.g. the area of one cell); None = the ``forward``
        given to :func:`evaluate_samples`.
    """

    name: str
    x: torch.Tensor
    ground_truth: np.ndarray
    forward: Forward | None = None


@dataclass
class EvaluationResult:
    """Everything one evaluation measured.

    Attributes
    ----------
    records : list of dict
        One row per (sample, method) with :data:`RECORD_COLUMNS`.
    summary : list of dict
        One row per method with :data:`SUMMARY_COLUMNS` (means over samples).
    curves : dict of str to list of (CausalCurve, CausalCurve)
        Per method, the (insertion, deletion) curves of every sample, in sample order.
    maps : dict of str to list of (H, W) float32 ndarray
        Per method, the saliency maps (empty unless ``keep_maps=True``).
    settings : dict
        The metric settings and method options used.
    """

    records: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    curves: dict[str, list[tuple[metrics.CausalCurve, metrics.CausalCurve]]]
    maps: dict[str, list[np.ndarray]]
    settings: dict[str, Any]

    def mean_curve(self, method: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean normalised curve of ``method`` over samples (all samples share one size).

        Returns
        -------
        fractions, scores : (S + 1,) ndarrays
        """
        if method not in self.curves:
            raise ValueError(f"unknown method {method!r}; evaluated: {list(self.curves)}")
        index = {"insertion": 0, "deletion": 1}.get(kind)
        if index is None:
            raise ValueError(f"kind must be 'insertion' or 'deletion', got {kind!r}")
        curves = [pair[index] for pair in self.curves[method]]
        lengths = {len(c.fractions) for c in curves}
        if len(lengths) != 1:
            raise ValueError("samples of different sizes have curves of different lengths")
        return curves[0].fractions, np.mean([c.scores for c in curves], axis=0)

    def to_markdown(self) -> str:
        """The summary as a markdown table (means over samples)."""
        head = (
            "| method | forward passes | wall time (s) | insertion AUC ↑ | deletion AUC ↓ "
            "| pointing hit rate ↑ | relevance mass ↑ |"
        )
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
        for row in self.summary:
            lines.append(
                f"| {row['method']} | {row['forward_passes']:.0f} | {row['seconds']:.2f} "
                f"| {_fmt(row['insertion_auc'])} | {_fmt(row['deletion_auc'])} "
                f"| {_fmt(row['pointing_hit_rate'], 2)} | {_fmt(row['relevance_mass'])} |"
            )
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None, *, per_sample: bool = False) -> str:
        """The summary (or the per-sample records) as CSV text, also written to ``path``."""
        rows = self.records if per_sample else self.summary
        columns = RECORD_COLUMNS if per_sample else SUMMARY_COLUMNS
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``summary.md``, ``summary.csv`` and ``per_sample.csv`` into ``out_dir``.

        Returns
        -------
        dict of str to Path
            The files written, by kind.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "markdown": out / "summary.md",
            "csv": out / "summary.csv",
            "per_sample": out / "per_sample.csv",
        }
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        self.to_csv(paths["csv"])
        self.to_csv(paths["per_sample"], per_sample=True)
        return paths


def _fmt(value: float, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def _nanmean(values: Sequence[float | None]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _with_batch_size(spec: MethodSpec, batch_size: int) -> dict[str, Any]:
    import inspect

    options = dict(spec.options)
    fn = getattr(baselines, spec.method)
    params = inspect.signature(fn).parameters
    takes = "batch_size" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    if takes:
        options.setdefault("batch_size", batch_size)
    return options


def evaluate_samples(
    forward: Forward | None,
    samples: Sequence[Sample],
    *,
    methods: Sequence[MethodSpec] = DEFAULT_METHODS,
    step_fraction: float = 0.01,
    insertion_substrate: metrics.SubstrateSpec = "blur",
    deletion_substrate: metrics.SubstrateSpec = "zero",
    blur_sigma: float = 5.0,
    pointing_tolerance: float = 3.0,
    batch_size: int = 32,
    keep_maps: bool = False,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Explain every sample with every method and score the maps.

    Parameters
    ----------
    forward : callable or None
        ``(B, C, H, W)`` → ``(B,)`` scalar score (differentiable, for the gradient methods);
        None when every sample carries its own ``Sample.forward``.
    samples : sequence of Sample
        Inputs on the device ``forward`` expects, with ground-truth instance labels.
    methods : sequence of MethodSpec
        The rows of the comparison (default :data:`DEFAULT_METHODS`).
    step_fraction : float
        Pixels changed per step of the causal curves (0.01 = 1 %).
    insertion_substrate, deletion_substrate
        See :func:`wsi_hipe.metrics.make_substrate`.
    blur_sigma : float
        σ in px of the ``"blur"`` substrate.
    pointing_tolerance : float
        Hit radius of the pointing game, in px.
    batch_size : int
        Inputs per ``forward`` call for the methods and the metrics.
    keep_maps : bool
        Keep every saliency map in the result (for figures).
    progress : callable, optional
        Called as ``progress(method_name, sample_index, n_samples)`` before each map.

    Returns
    -------
    EvaluationResult
    """
    if not samples:
        raise ValueError("samples is empty: give at least one sample to evaluate")
    if not methods:
        raise ValueError("methods is empty: give at least one MethodSpec")
    if forward is None and any(sample.forward is None for sample in samples):
        raise ValueError("forward is None but some samples have no Sample.forward of their own")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    # Warm-up (not counted, not timed): the first call of a model pays one-off costs
    # (allocator, thread pools, cuDNN autotuning) that would bias the first method's time.
    with torch.no_grad():
        (samples[0].forward if samples[0].forward is not None else forward)(samples[0].x[None])
    records: list[dict[str, Any]] = []
    curves: dict[str, list] = {m.name: [] for m in methods}
    maps: dict[str, list] = {m.name: [] for m in methods}
    for spec in methods:
        options = _with_batch_size(spec, batch_size)
        for i, sample in enumerate(samples):
            if progress is not None:
                progress(spec.name, i, len(samples))
            score = sample.forward if sample.forward is not None else forward
            res = baselines.explain(spec.method, score, sample.x, **options)
            sal = res.saliency.numpy()
            ins, dele = metrics.insertion_deletion(
                score,
                sample.x,
                sal,
                insertion_substrate=insertion_substrate,
                deletion_substrate=deletion_substrate,
                step_fraction=step_fraction,
                batch_size=batch_size,
                blur_sigma=blur_sigma,
            )
            gt = np.asarray(sample.ground_truth)
            if gt.any():
                point = metrics.pointing_game(sal, gt, tolerance=pointing_tolerance)
                hit, dist = point.hit, point.distance
            else:
                hit, dist = None, float("nan")
            records.append(
                {
                    "sample": sample.name,
                    "method": spec.name,
                    "forward_passes": res.forward_passes,
                    "seconds": res.seconds,
                    "insertion_auc": ins.auc,
                    "deletion_auc": dele.auc,
                    "pointing_hit": hit,
                    "pointing_distance_px": dist,
                    "relevance_mass": metrics.relevance_mass(sal, gt),
                    "clean_score": ins.clean_score,
                }
            )
            curves[spec.name].append((ins, dele))
            if keep_maps:
                maps[spec.name].append(sal)
            logger.info(
                "%s on %s: %d passes, %.2f s, insertion %.3f, deletion %.3f",
                spec.name,
                sample.name,
                res.forward_passes,
                res.seconds,
                ins.auc,
                dele.auc,
            )
    summary = []
    for spec in methods:
        rows = [r for r in records if r["method"] == spec.name]
        hits = [r["pointing_hit"] for r in rows if r["pointing_hit"] is not None]
        summary.append(
            {
                "method": spec.name,
                "samples": len(rows),
                "forward_passes": _nanmean([r["forward_passes"] for r in rows]),
                "seconds": _nanmean([r["seconds"] for r in rows]),
                "insertion_auc": _nanmean([r["insertion_auc"] for r in rows]),
                "deletion_auc": _nanmean([r["deletion_auc"] for r in rows]),
                "pointing_hit_rate": float(np.mean(hits)) if hits else float("nan"),
                "relevance_mass": _nanmean([r["relevance_mass"] for r in rows]),
            }
        )
    settings = {
        "step_fraction": step_fraction,
        "insertion_substrate": str(insertion_substrate),
        "deletion_substrate": str(deletion_substrate),
        "blur_sigma": blur_sigma,
        "pointing_tolerance_px": pointing_tolerance,
        "batch_size": batch_size,
        "methods": [
            {"name": m.name, "method": m.method, "options": dict(m.options)} for m in methods
        ],
        "samples": [s.name for s in samples],
    }
    return EvaluationResult(
        records=records, summary=summary, curves=curves, maps=maps, settings=settings
    )


# --- synthetic tiles ----------------------------------------------------------------------


def synthetic_samples(
    n_tiles: int = 3,
    *,
    size: int = 256,
    mpp: float = 0.5,
    first_seed: int = 0,
    min_lymphocytes: int = 1,
    max_tries: int = 50,
    device: str | torch.device | None = None,
) -> list[Sample]:
    """Synthetic Hoechst tiles with lymphocyte instance ground truth.

    Seeds ``first_seed, first_seed + 1, ...`` are rendered with
    :func:`wsi_hipe.synthetic.render_tile`; tiles with fewer than ``min_lymphocytes``
    lymphocytes are skipped (the pointing game needs something to point at) until ``n_tiles``
    are found or ``max_tries`` seeds were tried.

    Returns
    -------
    list of Sample
        ``x`` is ``(1, size, size)`` float32 (the stain), ``ground_truth`` the lymphocyte labels.
    """
    from wsi_hipe.synthetic import render_tile

    if isinstance(n_tiles, bool) or not isinstance(n_tiles, int) or n_tiles < 1:
        raise ValueError(f"n_tiles must be an int >= 1, got {n_tiles!r}")
    samples: list[Sample] = []
    for seed in range(first_seed, first_seed + max_tries):
        tile = render_tile(seed, size, mpp=mpp)
        labels = np.asarray(tile.lymphocytes)
        n_lymph = len(np.unique(labels[labels > 0]))
        if n_lymph < min_lymphocytes:
            logger.debug("seed %d: %d lymphocytes, skipped", seed, n_lymph)
            continue
        x = torch.as_tensor(np.asarray(tile.image, dtype=np.float32))[None]
        if device is not None:
            x = x.to(device)
        samples.append(Sample(name=f"tile seed {seed}", x=x, ground_truth=labels))
        if len(samples) == n_tiles:
            return samples
    raise ValueError(
        f"only {len(samples)} of {n_tiles} tiles in seeds {first_seed}..{first_seed + max_tries - 1} "
        f"have >= {min_lymphocytes} lymphocytes; raise max_tries or lower min_lymphocytes"
    )


# --- configuration ------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TilesSection(_Section):
    """Which synthetic tiles: ``n`` tiles of ``size``² px at ``mpp`` µm/px from ``first_seed``."""

    n: int = Field(3, ge=1)
    size: int = Field(256, ge=16)
    mpp: float = Field(0.5, gt=0)
    first_seed: int = 0
    min_lymphocytes: int = Field(1, ge=0)


class MetricsSection(_Section):
    """Settings of the metrics (see :func:`evaluate_samples`)."""

    step_fraction: float = Field(0.01, gt=0, le=1)
    insertion_substrate: str = "blur"
    deletion_substrate: str = "zero"
    blur_sigma: float = Field(5.0, gt=0)
    pointing_tolerance_px: float = Field(3.0, ge=0)

    @field_validator("insertion_substrate", "deletion_substrate")
    @classmethod
    def _known_substrate(cls, value: str) -> str:
        if value not in metrics.SUBSTRATES:
            raise ValueError(f"must be one of {list(metrics.SUBSTRATES)}")
        return value


class MethodSection(_Section):
    """One method row: label ``name``, ``method`` in baselines.METHODS, its ``options``."""

    name: str
    method: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in baselines.METHODS:
            raise ValueError(f"must be one of {list(baselines.METHODS)}")
        return value


class EvaluationConfig(_Section):
    """The configured evaluation (``configs/evaluate.yaml``); every key has a default.

    Attributes
    ----------
    model : str
        Model spec for :func:`wsi_hipe.models.load_model` (``"bundled"`` or a file).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    target : {'tile', 'cell'}
        ``"tile"``: explain the expected class area of the whole tile, GT = every lymphocyte;
        ``"cell"``: explain the expected class area of one lymphocyte (the one nearest the tile
        centre, :func:`wsi_hipe.scores.cell_area`), GT = that cell only. A tile-level score of
        a lymphocyte-rich tile is salient almost everywhere; one cell is a sparse target.
    class_index : int or str
        The class whose expected area is explained (1 / ``"lymphocyte"``).
    batch_size : int
        Inputs per model call.
    threads : int or None
        ``torch.set_num_threads`` for the run (None leaves it alone).
    tiles, metrics : sections
    methods : list of method rows (default: :data:`DEFAULT_METHODS`)
    """

    model: str = "bundled"
    device: str = "auto"
    target: Literal["tile", "cell"] = "tile"
    class_index: int | str = 1
    batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1)
    tiles: TilesSection = Field(default_factory=TilesSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    methods: list[MethodSection] = Field(
        default_factory=lambda: [
            MethodSection(name=m.name, method=m.method, options=dict(m.options))
            for m in DEFAULT_METHODS
        ]
    )

    def method_specs(self) -> list[MethodSpec]:
        return [MethodSpec(m.name, m.method, dict(m.options)) for m in self.methods]


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_evaluation_config(
    path: str | Path | None = None, *, overrides: Mapping[str, Any] | None = None
) -> EvaluationConfig:
    """Read an evaluation config (YAML), apply dotted ``overrides``, validate.

    Parameters
    ----------
    path : str or Path, optional
        YAML file; None = all defaults.
    overrides : mapping, optional
        ``{"tiles.n": 2, "metrics.step_fraction": 0.05}``.

    Raises
    ------
    ConfigError
        Unreadable file or invalid keys/values (the message names the key).
    """
    import yaml

    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"evaluation config {str(p)!r} not found; check the path")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        data = loaded
        source = str(p)
    for key, value in (overrides or {}).items():
        _set_nested(data, key, value)
    try:
        return EvaluationConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<top level>'}: {err['msg']} "
            f"(got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid evaluation config ({source}): {problems}") from None


def centre_cell(labels: np.ndarray) -> int:
    """Label of the instance whose centroid lies nearest the centre of ``labels`` (H, W)."""
    from scipy import ndimage

    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        raise ValueError("no instance in the label image: cannot choose a cell")
    centres = np.asarray(ndimage.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)
    mid = (np.asarray(labels.shape) - 1) / 2.0
    return int(ids[np.argmin(((centres - mid) ** 2).sum(axis=1))])


def _cell_sample(sample: Sample, model: Any, class_index: int | str) -> Sample:
    from wsi_hipe.scores import cell_area

    label = centre_cell(sample.ground_truth)
    gt = (sample.ground_truth == label).astype(np.int32)
    return Sample(
        name=f"{sample.name} cell {label}",
        x=sample.x,
        ground_truth=gt,
        forward=cell_area(model, gt.astype(bool), class_index=class_index),
    )


def run_evaluation(
    config: EvaluationConfig | str | Path | None = None,
    *,
    model: Any = None,
    overrides: Mapping[str, Any] | None = None,
    keep_maps: bool = False,
    progress: Progress | None = None,
) -> EvaluationResult:
    """The configured evaluation on synthetic Hoechst tiles.

    Loads the model (``config.model``, or ``model`` when given: anything
    :func:`wsi_hipe.models.load_model` accepts), explains the expected lymphocyte area
    (:func:`wsi_hipe.scores.class_area`) of ``config.tiles.n`` synthetic tiles - or of one
    lymphocyte per tile with ``target: cell`` - with every configured method and scores the
    maps against the lymphocyte instances (or that cell).

    Returns
    -------
    EvaluationResult
        ``settings`` also holds the resolved config and the model's sha256.
    """
    from wsi_hipe.models import load_model
    from wsi_hipe.scores import class_area

    if not isinstance(config, EvaluationConfig):
        config = load_evaluation_config(config, overrides=overrides)
    elif overrides:
        config = load_evaluation_config(None, overrides={**config.model_dump(), **overrides})
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    net = load_model(model if model is not None else config.model, device=config.device)
    forward = class_area(net, class_index=config.class_index)
    samples = synthetic_samples(
        config.tiles.n,
        size=config.tiles.size,
        mpp=config.tiles.mpp,
        first_seed=config.tiles.first_seed,
        min_lymphocytes=config.tiles.min_lymphocytes,
        device=net.device,
    )
    if config.target == "cell":
        samples = [_cell_sample(s, net, config.class_index) for s in samples]
    m = config.metrics
    result = evaluate_samples(
        forward,
        samples,
        methods=config.method_specs(),
        step_fraction=m.step_fraction,
        insertion_substrate=m.insertion_substrate,
        deletion_substrate=m.deletion_substrate,
        blur_sigma=m.blur_sigma,
        pointing_tolerance=m.pointing_tolerance_px,
        batch_size=config.batch_size,
        keep_maps=keep_maps,
        progress=progress,
    )
    result.settings["config"] = config.model_dump()
    result.settings["model_sha256"] = getattr(net, "sha256", None)
    result.settings["device"] = str(net.device)
    return result
