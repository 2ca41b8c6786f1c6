"""Saliency-map quality metrics: causal insertion/deletion, pointing game, relevance mass,
AUROC of a map for class against other pixels, model-parameter randomisation.

Layer L1: numpy, scipy and torch only. Every function takes a ``forward`` callable of the
project's usual shape (a batch ``(B, C, H, W)`` → ``(B,)`` scalar scores) and one sample
``x`` of shape ``(C, H, W)``; saliency maps are ``(H, W)``.

Causal curves (Petsiuk et al., 2018, "RISE"), precisely as computed here
--------------------------------------------------------------------------
Pixels are ranked once by decreasing saliency; ties are broken by increasing flat (row-major)
pixel index (a stable sort on ``-saliency``). With ``N = H·W`` pixels and a step of
``k = ceil(step_fraction · N)`` pixels, the curve has ``S + 1`` points, ``S = ceil(N / k)``;
point ``i`` has the ``n_i = min(i·k, N)`` top-ranked pixels changed, and its abscissa is
``n_i / N`` (so it runs from 0 to 1).

- **Deletion**: point ``i`` is the clean input with its ``n_i`` top pixels replaced by the
  deletion substrate (``"fade"``, i.e. zeros, by default). Point 0 is the unperturbed input; the last
  point is the fully substituted input.
- **Insertion**: point ``i`` is the insertion substrate (``"blur"`` by default) with the
  ``n_i`` top pixels restored to their clean values. Point 0 is the fully substituted input;
  the last point is the unperturbed input.

Scores are divided by the clean score ``f(x)`` (``normalize=True``), so the deletion curve
starts at exactly 1 and the insertion curve ends at exactly 1: the clean point reuses the one
clean forward pass instead of being re-evaluated. The AUC is the trapezoidal area over the
abscissae in [0, 1]. A pixel is replaced in every channel at once.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from wsi_hipe.config import METRIC_SUBSTRATES, MetricSubstrate, canonical_substrate
from wsi_hipe.hipe import gaussian_blur

__all__ = [
    "CausalCurve",
    "PointingResult",
    "RandomisationResult",
    "auc",
    "auroc",
    "causal_curve",
    "deletion_curve",
    "insertion_curve",
    "insertion_deletion",
    "make_substrate",
    "pixel_order",
    "pointing_game",
    "randomisation_check",
    "randomise_parameters",
    "relevance_mass",
    "spearman",
    "tissue_background",
]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
#: A named substrate (:data:`wsi_hipe.config.MetricSubstrate`; the old spelling ``"zero"`` is
#: still accepted for ``"fade"``), a constant, a tensor of ``x``'s shape or a callable of ``x``.
SubstrateSpec = (
    MetricSubstrate | float | int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
)
CurveKind = Literal["insertion", "deletion"]

CURVE_KINDS: tuple[str, ...] = get_args(CurveKind)
DEFAULT_SUBSTRATE: dict[str, MetricSubstrate] = {"insertion": "blur", "deletion": "fade"}


# --- helpers ------------------------------------------------------------------------------


def _as_tensor_image(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return ``x`` as a float32 tensor ``(C, H, W)``, checking its dimensionality."""
    t = torch.as_tensor(x)
    if t.ndim != 3:
        raise ValueError(
            f"x must be one sample of shape (C, H, W), got shape {tuple(t.shape)}; "
            "add a channel axis with x[None] for a single-channel (H, W) image"
        )
    if not t.is_floating_point():
        t = t.float()
    return t


def _as_numpy_map(saliency: torch.Tensor | np.ndarray, *, name: str = "saliency") -> np.ndarray:
    """Return a saliency map as a float64 numpy array, rejecting NaN/inf."""
    if isinstance(saliency, torch.Tensor):
        arr = saliency.detach().cpu().double().numpy()
    else:
        arr = np.asarray(saliency, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; fix the explainer before scoring its map")
    return arr


def _call_forward(forward: Forward, batch: torch.Tensor) -> torch.Tensor:
    """Run ``forward`` on a batch and return a float64 CPU tensor of shape ``(B,)``."""
    out = forward(batch)
    out = torch.as_tensor(out)
    if out.numel() != batch.shape[0]:
        raise ValueError(
            f"forward must map a batch of shape {tuple(batch.shape)} to scores of shape "
            f"({batch.shape[0]},), got shape {tuple(out.shape)}; reduce the model output to "
            "one scalar per sample (see wsi_hipe.scores)"
        )
    return out.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def make_substrate(
    x: torch.Tensor, substrate: SubstrateSpec, *, blur_sigma: float = 5.0
) -> torch.Tensor:
    """Build the fully substituted version of ``x``.

    Parameters
    ----------
    x : (C, H, W) float tensor
        The clean sample.
    substrate : {'fade', 'mean', 'blur'}, float, (C, H, W) tensor or callable
        ``'fade'``: all zeros (``'zero'``, its old name, is accepted too); ``'mean'``: each
        channel's mean over the whole image;
        ``'blur'``: a Gaussian blur of ``x`` with ``blur_sigma``; a number: that constant;
        a tensor of ``x``'s shape: used as is; a callable: ``substrate(x)`` must return a
        tensor of ``x``'s shape.
    blur_sigma : float, optional
        Standard deviation of the ``'blur'`` substrate in pixels (Petsiuk et al. used 5).

    Returns
    -------
    (C, H, W) tensor on ``x``'s device and dtype.
    """
    x = _as_tensor_image(x)
    if isinstance(substrate, str):
        name = canonical_substrate(substrate)
        if name == "fade":
            return torch.zeros_like(x)
        if name == "mean":
            return x.mean(dim=(1, 2), keepdim=True).expand_as(x).clone()
        if name == "blur":
            _check_positive("blur_sigma", blur_sigma)
            return gaussian_blur(x, float(blur_sigma), mode="replicate")  # per channel
        raise ValueError(
            f"substrate must be one of {list(METRIC_SUBSTRATES)}, a number, a tensor or a "
            f"callable, got {substrate!r}"
        )
    if isinstance(substrate, bool):
        raise ValueError(f"substrate must not be a bool, got {substrate!r}")
    if isinstance(substrate, (int, float)):
        return torch.full_like(x, float(substrate))
    if isinstance(substrate, torch.Tensor):
        sub = substrate
    elif callable(substrate):
        sub = torch.as_tensor(substrate(x))
    else:
        raise ValueError(
            f"substrate must be one of {list(METRIC_SUBSTRATES)}, a number, a tensor or a "
            f"callable, got {type(substrate).__name__}"
        )
    if tuple(sub.shape) != tuple(x.shape):
        raise ValueError(
            f"the substrate must have x's shape {tuple(x.shape)}, got {tuple(sub.shape)}"
        )
    return sub.to(device=x.device, dtype=x.dtype)


def tissue_background(
    x: torch.Tensor, *, radius_px: float = 14.0, smooth_px: float | None = None
) -> torch.Tensor:
    """The local tissue background of a fluorescence image: ``x`` with its nuclei removed.

    A grey-level opening (erosion, then dilation) with a disk of ``radius_px`` removes every
    bright structure the disk does not fit into (nuclei narrower than ``2·radius_px``) and
    keeps what is wider (the tissue's autofluorescence, its slow illumination changes); a
    Gaussian of ``smooth_px`` then softens the opening's flat plateaus, and the result is
    capped at ``x`` so the background is never brighter than the pixel it replaces. As a
    substrate (HiPe's or the causal curves' ``substrate=tissue_background``), a perturbed
    window keeps its tissue context and loses its nuclei, instead of turning darker than any
    tissue (``"fade"``, zeros) or keeping the brightness of packed nuclei (``"mean"``).

    Parameters
    ----------
    x : (C, H, W) float tensor
        A normalised stain image (background ≈ 0, nuclei ≈ 1).
    radius_px : float, optional
        Disk radius in px; larger than the largest nucleus radius (14 px = 7 µm at 0.5 µm/px).
    smooth_px : float, optional
        σ of the Gaussian in px (default ``radius_px / 2``; 0 turns it off).

    Returns
    -------
    (C, H, W) tensor of ``x``'s dtype and device, ``0 ≤ out ≤ x`` wherever ``x ≥ 0``.
    """
    from scipy import ndimage

    t = _as_tensor_image(x)
    _check_positive("radius_px", radius_px)
    sigma = radius_px / 2.0 if smooth_px is None else float(smooth_px)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"smooth_px must be a number >= 0 (px), got {smooth_px!r}")
    r = math.ceil(radius_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (yy * yy + xx * xx) <= radius_px * radius_px
    arr = t.detach().cpu().double().numpy()
    out = np.stack([ndimage.grey_opening(c, footprint=disk, mode="reflect") for c in arr])
    if sigma > 0:
        out = ndimage.gaussian_filter(out, sigma=(0.0, sigma, sigma), mode="reflect")
    out = np.minimum(out, arr)
    return torch.as_tensor(out, dtype=t.dtype, device=t.device)


def pixel_order(saliency: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flat pixel indices sorted by decreasing saliency, ties by increasing index.

    Parameters
    ----------
    saliency : (H, W) array or tensor

    Returns
    -------
    (H·W,) int64 ndarray: ``order[0]`` is the most salient pixel (row-major flat index).
    """
    arr = _as_numpy_map(saliency)
    return np.argsort(-arr.ravel(), kind="stable")


def auc(fractions: np.ndarray | Sequence[float], scores: np.ndarray | Sequence[float]) -> float:
    """Trapezoidal area under a curve given by abscissae ``fractions`` and ``scores``.

    Parameters
    ----------
    fractions : (S,) increasing array
        Abscissae, e.g. the fraction of pixels inserted or deleted, in [0, 1].
    scores : (S,) array
        Ordinates, e.g. scores normalised by the clean score.

    Returns
    -------
    float
    """
    f = np.asarray(fractions, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if f.shape != s.shape or f.ndim != 1 or f.size < 2:
        raise ValueError(
            f"fractions and scores must be 1-D of equal length >= 2, got {f.shape} and {s.shape}"
        )
    if np.any(np.diff(f) < 0):
        raise ValueError("fractions must be non-decreasing")
    return float(np.sum(0.5 * (s[1:] + s[:-1]) * np.diff(f)))


# --- causal insertion / deletion ----------------------------------------------------------


@dataclass(frozen=True)
class CausalCurve:
    """One insertion or deletion curve.

    Attributes
    ----------
    kind : {'insertion', 'deletion'}
    fractions : (S + 1,) float64 ndarray
        Fraction of pixels inserted (insertion) or deleted (deletion) at each point, 0 → 1.
    scores : (S + 1,) float64 ndarray
        Scores divided by ``clean_score`` (equal to ``raw_scores`` when not normalised).
    raw_scores : (S + 1,) float64 ndarray
        The model's scores as returned by ``forward``.
    clean_score : float
        ``forward(x)`` for the unperturbed input.
    auc : float
        Trapezoidal area under ``scores`` over ``fractions``.
    forward_passes : int
        Model evaluations spent on this curve, the clean one included (1 + S).
    """

    kind: str
    fractions: np.ndarray
    scores: np.ndarray
    raw_scores: np.ndarray
    clean_score: float
    auc: float
    forward_passes: int


def _curve_scores(
    forward: Forward,
    x: torch.Tensor,
    sub: torch.Tensor,
    order: torch.Tensor,
    counts: np.ndarray,
    *,
    kind: str,
    batch_size: int,
) -> np.ndarray:
    """Scores of the perturbed inputs with ``counts[j]`` top pixels changed (batched)."""
    c, h, w = x.shape
    n = h * w
    rank = torch.empty(n, dtype=torch.long, device=x.device)
    rank[order] = torch.arange(n, device=x.device)
    flat_x = x.reshape(1, c, n)
    flat_sub = sub.reshape(1, c, n)
    out = np.empty(len(counts), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(counts), batch_size):
            chunk = torch.as_tensor(counts[start : start + batch_size], device=x.device)
            changed = (rank[None, :] < chunk[:, None])[:, None, :]  # (B, 1, N)
            if kind == "deletion":
                batch = torch.where(changed, flat_sub, flat_x)
            else:
                batch = torch.where(changed, flat_x, flat_sub)
            out[start : start + len(chunk)] = _call_forward(
                forward, batch.reshape(-1, c, h, w)
            ).numpy()
    return out


def _steps(n_pixels: int, step_fraction: float) -> np.ndarray:
    if not (isinstance(step_fraction, (int, float)) and 0 < step_fraction <= 1):
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction!r}")
    step = max(1, math.ceil(step_fraction * n_pixels - 1e-9))
    n_steps = math.ceil(n_pixels / step)
    return np.minimum(np.arange(n_steps + 1) * step, n_pixels)


def _check_curve_inputs(
    x: torch.Tensor, saliency: torch.Tensor | np.ndarray, *, kind: str, batch_size: int
) -> tuple[torch.Tensor, np.ndarray]:
    """``x`` as a (C, H, W) float tensor and ``saliency`` as an (H, W) float64 map, checked."""
    if kind not in CURVE_KINDS:
        raise ValueError(f"kind must be one of {list(CURVE_KINDS)}, got {kind!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    x = _as_tensor_image(x)
    sal = _as_numpy_map(saliency)
    if sal.shape != tuple(x.shape[1:]):
        raise ValueError(
            f"saliency shape {sal.shape} does not match x's spatial shape {tuple(x.shape[1:])}"
        )
    return x, sal


def _normalised(raw: np.ndarray, clean_score: float) -> np.ndarray:
    """``raw / clean_score``; raises when the clean score is ~0 (or not finite)."""
    if not math.isfinite(clean_score) or abs(clean_score) < 1e-12:
        raise ValueError(
            f"the clean score f(x) = {clean_score!r} is ~0, so the curve cannot be "
            "normalised; pick an input the model responds to or pass normalize=False"
        )
    return raw / clean_score


def causal_curve(
    forward: Forward,
    x: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    *,
    kind: CurveKind,
    substrate: SubstrateSpec | None = None,
    step_fraction: float = 0.01,
    batch_size: int = 32,
    normalize: bool = True,
    blur_sigma: float = 5.0,
    clean_score: float | None = None,
) -> CausalCurve:
    """Insertion or deletion curve of a saliency map (Petsiuk et al., 2018).

    See the module docstring for exactly which inputs the points are.

    Parameters
    ----------
    forward : callable
        ``(B, C, H, W)`` float tensor → ``(B,)`` scores.
    x : (C, H, W) float tensor
        The clean sample, on the device ``forward`` expects.
    saliency : (H, W) array or tensor
        The map to score; higher = more salient (signed maps are ranked as they are).
    kind : {'insertion', 'deletion'}
    substrate : see :func:`make_substrate`, optional
        What deleted pixels become / what insertion starts from. Default ``'blur'`` for
        insertion and ``'fade'`` (zeros) for deletion.
    step_fraction : float, optional
        Fraction of the pixels changed per step (default 0.01, i.e. 1 %).
    batch_size : int, optional
        Perturbed inputs per ``forward`` call; does not change the result.
    normalize : bool, optional
        Divide the scores by the clean score (default). Raises when it is ~0.
    blur_sigma : float, optional
        σ in px of the ``'blur'`` substrate.
    clean_score : float, optional
        ``forward(x)`` if already known (saves one pass; then ``forward_passes`` excludes it).

    Returns
    -------
    CausalCurve
    """
    x, sal = _check_curve_inputs(x, saliency, kind=kind, batch_size=batch_size)
    sub = make_substrate(
        x, DEFAULT_SUBSTRATE[kind] if substrate is None else substrate, blur_sigma=blur_sigma
    )
    passes = 0
    if clean_score is None:
        with torch.no_grad():
            clean_score = float(_call_forward(forward, x[None])[0])
        passes += 1
    counts = _steps(sal.size, step_fraction)
    n = sal.size
    order = torch.as_tensor(pixel_order(sal), device=x.device)
    # The clean input is the first deletion point and the last insertion point: reuse f(x).
    perturbed = counts[1:] if kind == "deletion" else counts[:-1]
    raw_perturbed = _curve_scores(
        forward, x, sub, order, perturbed, kind=kind, batch_size=batch_size
    )
    passes += len(perturbed)
    if kind == "deletion":
        raw = np.concatenate([[clean_score], raw_perturbed])
    else:
        raw = np.concatenate([raw_perturbed, [clean_score]])
    scores = _normalised(raw, clean_score) if normalize else raw.copy()
    fractions = counts / n
    logger.debug("%s curve: %d points, AUC %.4f", kind, len(counts), auc(fractions, scores))
    return CausalCurve(
        kind=kind,
        fractions=fractions,
        scores=scores,
        raw_scores=raw,
        clean_score=float(clean_score),
        auc=auc(fractions, scores),
        forward_passes=passes,
    )


def insertion_curve(forward: Forward, x: torch.Tensor, saliency, **options) -> CausalCurve:
    """Insertion curve (blur substrate by default); see :func:`causal_curve`."""
    return causal_curve(forward, x, saliency, kind="insertion", **options)


def deletion_curve(forward: Forward, x: torch.Tensor, saliency, **options) -> CausalCurve:
    """Deletion curve (fade substrate, zeros, by default); see :func:`causal_curve`."""
    return causal_curve(forward, x, saliency, kind="deletion", **options)


def insertion_deletion(
    forward: Forward,
    x: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    *,
    insertion_substrate: SubstrateSpec = "blur",
    deletion_substrate: SubstrateSpec = "fade",
    step_fraction: float = 0.01,
    batch_size: int = 32,
    normalize: bool = True,
    blur_sigma: float = 5.0,
) -> tuple[CausalCurve, CausalCurve]:
    """Both causal curves, sharing one clean forward pass.

    The clean pass is counted in the insertion curve's ``forward_passes``.

    Returns
    -------
    (insertion, deletion) : tuple of CausalCurve
    """
    x = _as_tensor_image(x)
    with torch.no_grad():
        clean = float(_call_forward(forward, x[None])[0])
    common = dict(
        step_fraction=step_fraction,
        batch_size=batch_size,
        normalize=normalize,
        blur_sigma=blur_sigma,
        clean_score=clean,
    )
    ins = causal_curve(
        forward, x, saliency, kind="insertion", substrate=insertion_substrate, **common
    )
    dele = causal_curve(
        forward, x, saliency, kind="deletion", substrate=deletion_substrate, **common
    )
    ins = dataclasses.replace(ins, forward_passes=ins.forward_passes + 1)
    return ins, dele


# --- ground-truth based -------------------------------------------------------------------


@dataclass(frozen=True)
class PointingResult:
    """Outcome of the pointing game on one map.

    Attributes
    ----------
    hit : bool
        Whether the map's maximum lies within ``tolerance`` px of a ground-truth pixel.
    point : tuple of int
        ``(y, x)`` of the maximum (the first in row-major order when several pixels tie).
    distance : float
        Euclidean distance in px from ``point`` to the nearest ground-truth pixel (0 inside).
    tolerance : float
        The tolerance used, in px.
    """

    hit: bool
    point: tuple[int, int]
    distance: float
    tolerance: float


def _gt_mask(ground_truth: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(ground_truth, torch.Tensor):
        ground_truth = ground_truth.detach().cpu().numpy()
    gt = np.asarray(ground_truth)
    if gt.shape != shape:
        raise ValueError(f"ground_truth shape {gt.shape} does not match the map's shape {shape}")
    return gt != 0


def pointing_game(
    saliency: torch.Tensor | np.ndarray,
    ground_truth: torch.Tensor | np.ndarray,
    *,
    tolerance: float = 0.0,
) -> PointingResult:
    """Pointing game (Zhang et al., 2018) of one map against ground-truth instances.

    Parameters
    ----------
    saliency : (H, W) array or tensor
    ground_truth : (H, W) int or bool array
        Instance labels (0 = none) or a boolean mask; every non-zero pixel is ground truth.
    tolerance : float, optional
        Hit radius in px (Euclidean): a hit when the maximum lies within ``tolerance`` of any
        ground-truth pixel. 0 means the maximum must lie on a ground-truth pixel.

    Returns
    -------
    PointingResult

    Raises
    ------
    ValueError
        If the ground truth is empty (there is nothing to point at; skip such samples).
    """
    from scipy import ndimage

    sal = _as_numpy_map(saliency)
    if sal.ndim != 2:
        raise ValueError(f"saliency must be (H, W), got shape {sal.shape}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0 (px), got {tolerance!r}")
    gt = _gt_mask(ground_truth, sal.shape)
    if not gt.any():
        raise ValueError("ground_truth is empty: the pointing game needs at least one GT pixel")
    flat = int(np.argmax(sal))
    y, x = divmod(flat, sal.shape[1])
    dist = float(ndimage.distance_transform_edt(~gt)[y, x])
    return PointingResult(
        hit=bool(dist <= tolerance), point=(y, x), distance=dist, tolerance=float(tolerance)
    )


def relevance_mass(
    saliency: torch.Tensor | np.ndarray,
    ground_truth: torch.Tensor | np.ndarray,
    *,
    positive_only: bool = True,
) -> float:
    """Fraction of the saliency that falls inside the ground truth.

    ``sum(saliency[gt]) / sum(saliency)`` (Arias-Duart et al.'s relevance mass accuracy).

    Parameters
    ----------
    saliency : (H, W) array or tensor
    ground_truth : (H, W) int or bool array
        Non-zero pixels are ground truth.
    positive_only : bool, optional
        Clip negative saliency to 0 first (default), so signed maps are scored on their
        positive evidence and the result lies in [0, 1].

    Returns
    -------
    float
        In [0, 1] for a non-negative map; NaN when the map sums to 0 (no relevance at all).
    """
    sal = _as_numpy_map(saliency)
    gt = _gt_mask(ground_truth, sal.shape)
    if positive_only:
        sal = np.clip(sal, 0.0, None)
    total = float(sal.sum())
    if total == 0.0:
        logger.debug("relevance_mass: the map sums to 0; returning NaN")
        return float("nan")
    return float(sal[gt].sum() / total)


def auroc(
    saliency: torch.Tensor | np.ndarray,
    positive: torch.Tensor | np.ndarray,
    negative: torch.Tensor | np.ndarray | None = None,
) -> float:
    """Area under the ROC curve of a map separating ``positive`` from ``negative`` pixels.

    The probability that a random positive pixel has a higher saliency than a random negative
    one, ties counting one half (the Mann–Whitney U statistic over ``n_pos · n_neg``, from
    average ranks). A map that is higher on every positive pixel scores 1, a constant map
    exactly 0.5, an inverted one 0. E.g. saliency for lymphocyte pixels against the pixels of
    the other nuclei: does the map tell the explained class from nuclei that merely look alike?

    Parameters
    ----------
    saliency : (H, W) array or tensor
    positive : (H, W) bool or int array
        Non-zero pixels are positives.
    negative : (H, W) bool or int array, optional
        Non-zero pixels are negatives (default: every pixel that is not positive). Must not
        overlap ``positive``.

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        Shapes differ, the sets overlap, or one of them is empty.
    """
    from scipy import stats

    sal = _as_numpy_map(saliency)
    pos = _gt_mask(positive, sal.shape)
    neg = ~pos if negative is None else _gt_mask(negative, sal.shape)
    if np.any(pos & neg):
        raise ValueError("positive and negative pixels overlap; pass disjoint masks")
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs positive and negative pixels, got {n_pos} and {n_neg}; skip maps "
            "without both"
        )
    ranks = stats.rankdata(np.concatenate([sal[pos], sal[neg]]))  # ties: average ranks
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


# --- model-parameter randomisation (Adebayo et al., 2018) ---------------------------------


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two maps of equal shape (NaN if one is constant)."""
    from scipy import stats

    x = _as_numpy_map(a, name="a").ravel()
    y = _as_numpy_map(b, name="b").ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps differ in size: {x.size} vs {y.size}")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


@dataclass(frozen=True)
class RandomisationResult:
    """The cascading model-parameter randomisation curve.

    Attributes
    ----------
    layers : tuple of str
        Module names in the order they were randomised (output side first); a stage that
        names a container (e.g. ``"network.decoder"``) randomised everything inside it.
    correlations : (L,) float64 ndarray
        Spearman correlation between the original map and the map after randomising
        ``layers[: i + 1]`` (cumulative).
    original : (H, W) float64 ndarray
        The map of the unmodified model.
    maps : tuple of (H, W) ndarrays
        The map after each cumulative step (empty unless ``keep_maps=True``).
    """

    layers: tuple[str, ...]
    correlations: np.ndarray
    original: np.ndarray
    maps: tuple[np.ndarray, ...] = ()


def _parametrised_layers(model: torch.nn.Module) -> list[str]:
    """Names of modules owning parameters directly, output side first (reverse definition)."""
    names = [
        name
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    return names[::-1]


def randomise_parameters(module: torch.nn.Module, seed: int) -> int:
    """Re-initialise the parameters of ``module`` and of every module inside it, in place.

    Deterministic in ``seed`` (the global RNG is left as it was). Each module owning
    parameters, in ``module.modules()`` order, is reset by its own ``reset_parameters`` when it
    has one (its initialiser: Kaiming for convolutions, ones and zeros for batch norms); its
    parameters are otherwise drawn from N(0, σ²), σ the parameter's standard deviation (1 when
    it is a single value or constant). Randomising a whole network this way gives the "random
    model" of a data-randomisation check.

    Returns
    -------
    int
        How many modules were re-initialised.
    """
    count = 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for sub in module.modules():
            own = list(sub.parameters(recurse=False))
            if not own:
                continue
            count += 1
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                continue
            for p in own:
                std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, std if std > 0 else 1.0)
    return count


def randomisation_check(
    model: torch.nn.Module,
    explainer: Callable[[Forward, torch.Tensor], torch.Tensor | np.ndarray],
    x: torch.Tensor,
    *,
    make_forward: Callable[[torch.nn.Module], Forward] | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    absolute: bool = True,
    keep_maps: bool = False,
) -> RandomisationResult:
    """Cascading model-parameter randomisation sanity check (Adebayo et al., 2018).

    On a deep copy of ``model`` (the original is never modified), layers are re-initialised
    one after another from the output side down; after each, the explainer is re-run and the
    Spearman rank correlation between the original map and the new one is recorded. A map
    that explains the model must change (correlation falls) as its parameters are destroyed.

    Parameters
    ----------
    model : torch.nn.Module
    explainer : callable
        ``explainer(forward, x) -> (H, W)`` saliency, e.g.
        ``lambda f, x: hierarchical_perturbation(f, x).saliency``.
    x : (C, H, W) float tensor
    make_forward : callable, optional
        Turns a model into a scalar ``forward`` (e.g. ``lambda m: class_area(m)``); default:
        the model itself must map ``(B, C, H, W)`` → ``(B,)``.
    layers : sequence of str, optional
        Module names (as in ``model.named_modules()``) in randomisation order; a name may be a
        container, whose parameters are then all randomised in one stage (e.g. the head, the
        decoder, then each encoder block). Default: every module that owns parameters, in
        reverse definition order (the head first).
    seed : int, optional
        Re-initialisation of layer ``i`` is seeded with ``seed + i``.
    absolute : bool, optional
        Correlate absolute values of the maps (Adebayo et al.'s default), so a sign flip does
        not count as a change.
    keep_maps : bool, optional
        Keep every randomised map in the result.

    Returns
    -------
    RandomisationResult
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    make = make_forward if make_forward is not None else (lambda m: m)
    work = copy.deepcopy(model)
    work.eval()
    modules = dict(work.named_modules())
    order = list(layers) if layers is not None else _parametrised_layers(work)
    unknown = [name for name in order if name not in modules]
    if unknown:
        raise ValueError(
            f"unknown layer names {unknown}; valid names are those of model.named_modules(), "
            f"e.g. {list(modules)[1:6]}"
        )
    if not order:
        raise ValueError("the model has no parameters to randomise")
    empty = [name for name in order if not any(True for _ in modules[name].parameters())]
    if empty:
        raise ValueError(f"layers {empty} have no parameters to randomise; drop them")

    def run() -> np.ndarray:
        sal = _as_numpy_map(explainer(make(work), x))
        return np.abs(sal) if absolute else sal

    original = run()
    corrs = []
    maps = []
    for i, name in enumerate(order):
        randomise_parameters(modules[name], seed + i)
        sal = run()
        corrs.append(spearman(original, sal))
        if keep_maps:
            maps.append(sal)
        logger.debug("randomised %s: spearman %.3f", name, corrs[-1])
    return RandomisationResult(
        layers=tuple(order), correlations=np.asarray(corrs), original=original, maps=tuple(maps)
    )
