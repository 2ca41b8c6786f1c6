"""Running an evaluation: every method on every sample, scored with :mod:`wsi_hipe.metrics`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_hipe import baselines, metrics
from wsi_hipe.config import canonical_substrate
from wsi_hipe.evaluation._config import EvaluationConfig, load_evaluation_config
from wsi_hipe.evaluation._results import (
    DEFAULT_METHODS,
    EvaluationResult,
    Forward,
    MethodSpec,
    Sample,
    nanmean,
)

__all__ = ["centre_cell", "evaluate_samples", "run_evaluation", "synthetic_samples"]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], object]


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


def _check_run(forward: Forward | None, samples: Sequence[Sample], methods) -> None:
    if not samples:
        raise ValueError("samples is empty: give at least one sample to evaluate")
    if not methods:
        raise ValueError("methods is empty: give at least one MethodSpec")
    if forward is None and any(sample.forward is None for sample in samples):
        raise ValueError("forward is None but some samples have no Sample.forward of their own")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")


def _substrate_name(substrate: metrics.SubstrateSpec) -> str:
    """How a substrate is recorded in the settings: its one name (``"zero"`` -> ``"fade"``)."""
    return canonical_substrate(substrate) if isinstance(substrate, str) else str(substrate)


def _evaluate_one(
    spec: MethodSpec,
    sample: Sample,
    score: Forward,
    *,
    options: dict[str, Any],
    curve_options: dict[str, Any],
    pointing_tolerance: float,
) -> tuple[dict[str, Any], tuple[metrics.CausalCurve, metrics.CausalCurve], np.ndarray]:
    """One method on one sample: the record (:data:`RECORD_COLUMNS`), its curves, its map."""
    res = baselines.explain(spec.method, score, sample.x, **options)
    sal = res.saliency.numpy()
    ins, dele = metrics.insertion_deletion(score, sample.x, sal, **curve_options)
    gt = np.asarray(sample.ground_truth)
    if gt.any():
        point = metrics.pointing_game(sal, gt, tolerance=pointing_tolerance)
        hit, dist = point.hit, point.distance
    else:
        hit, dist = None, float("nan")
    record = {
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
    logger.info(
        "%s on %s: %d passes, %.2f s, insertion %.3f, deletion %.3f",
        spec.name,
        sample.name,
        res.forward_passes,
        res.seconds,
        ins.auc,
        dele.auc,
    )
    return record, (ins, dele), sal


def _summary(records: list[dict[str, Any]], methods: Sequence[MethodSpec]) -> list[dict]:
    """One row per method (:data:`SUMMARY_COLUMNS`): means over its samples."""
    summary = []
    for spec in methods:
        rows = [r for r in records if r["method"] == spec.name]
        hits = [r["pointing_hit"] for r in rows if r["pointing_hit"] is not None]
        summary.append(
            {
                "method": spec.name,
                "samples": len(rows),
                "forward_passes": nanmean([r["forward_passes"] for r in rows]),
                "seconds": nanmean([r["seconds"] for r in rows]),
                "insertion_auc": nanmean([r["insertion_auc"] for r in rows]),
                "deletion_auc": nanmean([r["deletion_auc"] for r in rows]),
                "pointing_hit_rate": float(np.mean(hits)) if hits else float("nan"),
                "relevance_mass": nanmean([r["relevance_mass"] for r in rows]),
            }
        )
    return summary


def _settings(
    curve_options: dict[str, Any],
    pointing_tolerance: float,
    methods: Sequence[MethodSpec],
    samples: Sequence[Sample],
) -> dict[str, Any]:
    """``EvaluationResult.settings``: the metric settings and the methods' options."""
    c = curve_options
    return {
        "step_fraction": c["step_fraction"],
        "insertion_substrate": _substrate_name(c["insertion_substrate"]),
        "deletion_substrate": _substrate_name(c["deletion_substrate"]),
        "blur_sigma": c["blur_sigma"],
        "pointing_tolerance_px": pointing_tolerance,
        "batch_size": c["batch_size"],
        "methods": [
            {"name": m.name, "method": m.method, "options": dict(m.options)} for m in methods
        ],
        "samples": [s.name for s in samples],
    }


def evaluate_samples(
    forward: Forward | None,
    samples: Sequence[Sample],
    *,
    methods: Sequence[MethodSpec] = DEFAULT_METHODS,
    step_fraction: float = 0.01,
    insertion_substrate: metrics.SubstrateSpec = "blur",
    deletion_substrate: metrics.SubstrateSpec = "fade",
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
        See :func:`wsi_hipe.metrics.make_substrate` (``"fade"``: zeros).
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
    _check_run(forward, samples, methods)
    # Warm-up (not counted, not timed): the first call of a model pays one-off costs
    # (allocator, thread pools, cuDNN autotuning) that would bias the first method's time.
    with torch.no_grad():
        (samples[0].forward if samples[0].forward is not None else forward)(samples[0].x[None])
    curve_options = {
        "step_fraction": step_fraction,
        "insertion_substrate": insertion_substrate,
        "deletion_substrate": deletion_substrate,
        "blur_sigma": blur_sigma,
        "batch_size": batch_size,
    }
    records: list[dict[str, Any]] = []
    curves: dict[str, list] = {m.name: [] for m in methods}
    maps: dict[str, list] = {m.name: [] for m in methods}
    for spec in methods:
        options = _with_batch_size(spec, batch_size)
        for i, sample in enumerate(samples):
            if progress is not None:
                progress(spec.name, i, len(samples))
            record, pair, sal = _evaluate_one(
                spec,
                sample,
                sample.forward if sample.forward is not None else forward,
                options=options,
                curve_options=curve_options,
                pointing_tolerance=pointing_tolerance,
            )
            records.append(record)
            curves[spec.name].append(pair)
            if keep_maps:
                maps[spec.name].append(sal)
    settings = _settings(curve_options, pointing_tolerance, methods, samples)
    summary = _summary(records, methods)
    return EvaluationResult(records, summary, curves=curves, maps=maps, settings=settings)


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
