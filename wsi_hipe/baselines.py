"""Baseline saliency methods to compare HiPe against, behind one signature.

``explain(method, forward, x, **options) -> BaselineResult`` runs one method on one sample and
reports its map, the forward passes it spent (counted by wrapping ``forward``: one pass = one
sample of a batch) and its wall time. Methods:

============================  ================================================  ===========
method                        what                                              map
============================  ================================================  ===========
``"hipe"``                    :func:`wsi_hipe.hipe.hierarchical_perturbation`   ≥ 0
``"occlusion"``               Captum ``Occlusion`` (Zeiler & Fergus), sliding   signed
                              ``window``×``window`` patches with ``stride``
``"feature_ablation"``        Captum ``FeatureAblation`` over a grid of         signed
                              ``cell``×``cell`` blocks
``"rise"``                    RISE (Petsiuk et al., 2018), own implementation   ≥ 0 [#]_
``"gradient"``                Captum ``Saliency``: max over channels of |∂f/∂x| ≥ 0
``"integrated_gradients"``    Captum ``IntegratedGradients``, summed over       signed
                              channels
============================  ================================================  ===========

.. [#] for a non-negative score.

Captum is imported inside the functions that use it (install the ``eval`` extra). Gradient
methods need a differentiable ``forward`` and spend one backward pass per forward pass on top of
the count reported here.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "METHODS",
    "BaselineResult",
    "explain",
    "feature_ablation",
    "gradient",
    "hipe",
    "integrated_gradients",
    "occlusion",
    "rise",
    "rise_masks",
]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BaselineResult:
    """One saliency map and what it cost.

    Attributes
    ----------
    saliency : (H, W) float32 CPU tensor
        The map; see the module table for which methods are signed.
    forward_passes : int
        Samples evaluated by ``forward`` (a batch of B counts B), the clean one included.
    seconds : float
        Wall time of the method, in seconds.
    method : str
        The method name given to :func:`explain`.
    options : dict
        The options it ran with (as passed; defaults are the method's).
    """

    saliency: torch.Tensor
    forward_passes: int
    seconds: float
    method: str
    options: dict[str, Any] = field(default_factory=dict)


class _CountingForward:
    """Wrap a forward and count the samples it evaluates."""

    def __init__(self, forward: Forward):
        self.forward = forward
        self.samples = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.samples += int(batch.shape[0])
        out = self.forward(batch)
        if out.ndim != 1 or out.shape[0] != batch.shape[0]:
            raise ValueError(
                f"forward must map a batch of shape {tuple(batch.shape)} to scores of shape "
                f"({batch.shape[0]},), got {tuple(out.shape)}; reduce the model output to one "
                "scalar per sample (see wsi_hipe.scores)"
            )
        return out


def _check_x(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(
            f"x must be one sample as a (C, H, W) tensor, got {shape}; add a channel axis "
            "with x[None] for a single-channel image"
        )
    return x if x.is_floating_point() else x.float()


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _import_captum_attr():
    try:
        import captum.attr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this baseline needs Captum; install it with `pip install wsi-hipe[eval]`"
        ) from err
    return captum.attr


# --- perturbation baselines ---------------------------------------------------------------


def occlusion(
    forward: Forward,
    x: torch.Tensor,
    *,
    window: int = 16,
    stride: int = 8,
    baseline: float = 0.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """Sliding-window occlusion (Captum ``Occlusion``).

    Each ``window``×``window`` patch (all channels) is set to ``baseline``; every pixel gets the
    score drop ``f(x) − f(x')`` averaged over the windows that cover it.

    Parameters
    ----------
    forward : callable ``(B, C, H, W)`` → ``(B,)``
    x : (C, H, W) float tensor
    window, stride : int
        Patch side and step, in px. Passes: ``1 + ((H − window)//stride + 1)·((W − window)//stride + 1)``.
    baseline : float
        Value of occluded pixels (0 = background for the project's stain images).
    batch_size : int
        Perturbed inputs per ``forward`` call.

    Returns
    -------
    (H, W) float32 tensor, signed.
    """
    x = _check_x(x)
    _check_int("window", window)
    _check_int("stride", stride)
    _check_int("batch_size", batch_size)
    c, h, w = x.shape
    if window > min(h, w):
        raise ValueError(f"window={window} px is larger than the input ({h}×{w} px)")
    attr = _import_captum_attr()
    with torch.no_grad():
        out = attr.Occlusion(forward).attribute(
            x[None],
            sliding_window_shapes=(c, window, window),
            strides=(1, stride, stride),
            baselines=float(baseline),
            perturbations_per_eval=batch_size,
        )
    return out[0].mean(dim=0).float().cpu()


def feature_ablation(
    forward: Forward,
    x: torch.Tensor,
    *,
    cell: int = 16,
    baseline: float = 0.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """Ablate a grid of ``cell``×``cell`` blocks one at a time (Captum ``FeatureAblation``).

    Every pixel of a block gets the score drop ``f(x) − f(x')`` of ablating that block.
    Passes: ``1 + ⌈H/cell⌉·⌈W/cell⌉``.

    Returns
    -------
    (H, W) float32 tensor, signed.
    """
    x = _check_x(x)
    _check_int("cell", cell)
    _check_int("batch_size", batch_size)
    _, h, w = x.shape
    rows = torch.arange(h, device=x.device) // cell
    cols = torch.arange(w, device=x.device) // cell
    mask = rows[:, None] * math.ceil(w / cell) + cols[None, :]
    attr = _import_captum_attr()
    with torch.no_grad():
        out = attr.FeatureAblation(forward).attribute(
            x[None],
            baselines=float(baseline),
            feature_mask=mask[None, None],
            perturbations_per_eval=batch_size,
        )
    return out[0].mean(dim=0).float().cpu()


def rise_masks(
    start: int,
    stop: int,
    size: tuple[int, int],
    *,
    grids: torch.Tensor,
    shifts: torch.Tensor,
) -> torch.Tensor:
    """Masks ``start:stop`` of a RISE draw, upsampled and cropped to ``size``.

    Parameters
    ----------
    start, stop : int
        Mask indices.
    size : (H, W)
        Output size in px.
    grids : (N, s, s) bool tensor
        The binary low-resolution grids.
    shifts : (N, 2) int tensor
        Per-mask ``(dy, dx)`` crop offsets in px, each in ``[0, cell)``.

    Returns
    -------
    (stop − start, H, W) float32 tensor in [0, 1].
    """
    h, w = size
    s = grids.shape[-1]
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    low = grids[start:stop, None].float()
    up = torch.nn.functional.interpolate(
        low, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False
    )[:, 0]
    b = up.shape[0]
    iy = shifts[start:stop, 0, None] + torch.arange(h, device=grids.device)[None, :]
    ix = shifts[start:stop, 1, None] + torch.arange(w, device=grids.device)[None, :]
    return up[torch.arange(b, device=grids.device)[:, None, None], iy[:, :, None], ix[:, None, :]]


def rise(
    forward: Forward,
    x: torch.Tensor,
    *,
    n_masks: int = 2000,
    p: float = 0.5,
    grid: int = 8,
    seed: int = 0,
    baseline: float = 0.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """RISE: randomised input sampling (Petsiuk et al., 2018).

    ``n_masks`` binary ``grid``×``grid`` masks keep each cell with probability ``p``; each is
    upsampled bilinearly to ``(grid + 1)·cell`` px (``cell = ⌈H / grid⌉``) and cropped at a
    random shift in ``[0, cell)`` so mask edges fall anywhere. The input is dimmed to
    ``x·M + baseline·(1 − M)`` and the map is ``Σ_i f(x ⊙ M_i) · M_i / (N · p)``.

    Parameters
    ----------
    forward : callable ``(B, C, H, W)`` → ``(B,)``
    x : (C, H, W) float tensor
    n_masks : int
        N. Passes: exactly N (RISE never evaluates the clean input).
    p : float in (0, 1)
        Keep probability of a grid cell.
    grid : int
        s, the low-resolution grid side.
    seed : int
        Seeds the masks (drawn on the CPU, so the same on any device and batch size).
    baseline : float
        What masked-out pixels fade to (0 = the paper's dimming to black).
    batch_size : int
        Masked inputs per ``forward`` call; does not change the map beyond float rounding.

    Returns
    -------
    (H, W) float32 tensor.
    """
    x = _check_x(x)
    _check_int("n_masks", n_masks)
    _check_int("grid", grid)
    _check_int("batch_size", batch_size)
    if not (isinstance(p, (int, float)) and 0 < p < 1):
        raise ValueError(f"p (keep probability) must be in (0, 1), got {p!r}")
    _, h, w = x.shape
    if grid > min(h, w):
        raise ValueError(f"grid={grid} cells is finer than the input ({h}×{w} px)")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    grids = torch.rand((n_masks, grid, grid), generator=gen) < p
    ch, cw = math.ceil(h / grid), math.ceil(w / grid)
    shifts = torch.stack(
        [
            torch.randint(0, ch, (n_masks,), generator=gen),
            torch.randint(0, cw, (n_masks,), generator=gen),
        ],
        dim=1,
    )
    grids, shifts = grids.to(x.device), shifts.to(x.device)
    sal = torch.zeros((h, w), dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start in range(0, n_masks, batch_size):
            stop = min(start + batch_size, n_masks)
            masks = rise_masks(start, stop, (h, w), grids=grids, shifts=shifts).to(x.dtype)
            batch = x[None] * masks[:, None] + float(baseline) * (1 - masks[:, None])
            scores = forward(batch).detach().to(torch.float64)
            sal += torch.einsum("b,bhw->hw", scores, masks.to(torch.float64))
    return (sal / (n_masks * p)).float().cpu()


def hipe(forward: Forward, x: torch.Tensor, **options: Any) -> torch.Tensor:
    """HiPe itself (:func:`wsi_hipe.hipe.hierarchical_perturbation`), options passed through.

    Returns
    -------
    (H, W) float32 tensor, ≥ 0.
    """
    from wsi_hipe.hipe import hierarchical_perturbation

    x = _check_x(x)
    res = hierarchical_perturbation(forward, x, **options)
    logger.debug("hipe: windows per depth %s", res.masks_per_depth)
    return res.saliency.detach().float().cpu()


# --- gradient baselines -------------------------------------------------------------------


def gradient(forward: Forward, x: torch.Tensor) -> torch.Tensor:
    """Gradient saliency (Simonyan et al.; Captum ``Saliency``): ``max_c |∂f/∂x_c|``.

    One forward and one backward pass. ``forward`` must be differentiable (not run under
    ``torch.no_grad`` / ``inference_mode``).

    Returns
    -------
    (H, W) float32 tensor, ≥ 0.
    """
    x = _check_x(x)
    attr = _import_captum_attr()
    inp = x[None].detach().clone().requires_grad_(True)
    try:
        out = attr.Saliency(forward).attribute(inp, abs=True)
    except RuntimeError as err:
        raise ValueError(
            "gradient saliency needs a differentiable forward; build it without "
            f"torch.no_grad/inference_mode ({err})"
        ) from err
    return out[0].amax(dim=0).detach().float().cpu()


def integrated_gradients(
    forward: Forward,
    x: torch.Tensor,
    *,
    n_steps: int = 32,
    baseline: float = 0.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al.; Captum), summed over channels.

    The path runs from a constant ``baseline`` image to ``x`` with ``n_steps`` Gauss–Legendre
    points (``n_steps`` forward and backward passes); the map sums to ≈ ``f(x) − f(baseline)``.

    Returns
    -------
    (H, W) float32 tensor, signed.
    """
    x = _check_x(x)
    _check_int("n_steps", n_steps)
    _check_int("batch_size", batch_size)
    attr = _import_captum_attr()
    inp = x[None].detach().clone()
    try:
        out = attr.IntegratedGradients(forward).attribute(
            inp,
            baselines=float(baseline),
            n_steps=n_steps,
            internal_batch_size=batch_size,
        )
    except RuntimeError as err:
        raise ValueError(
            "integrated gradients need a differentiable forward; build it without "
            f"torch.no_grad/inference_mode ({err})"
        ) from err
    return out[0].sum(dim=0).detach().float().cpu()


# --- the common entry point ---------------------------------------------------------------

_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "hipe": hipe,
    "occlusion": occlusion,
    "feature_ablation": feature_ablation,
    "rise": rise,
    "gradient": gradient,
    "integrated_gradients": integrated_gradients,
}
METHODS = tuple(_METHODS)


def explain(
    method: str,
    forward: Forward,
    x: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    **options: Any,
) -> BaselineResult:
    """Run one saliency method on one sample, counting forward passes and wall time.

    Parameters
    ----------
    method : {'hipe', 'occlusion', 'feature_ablation', 'rise', 'gradient', 'integrated_gradients'}
    forward : callable
        ``(B, C, H, W)`` float tensor → ``(B,)`` scores (e.g. from :mod:`wsi_hipe.scores`).
    x : (C, H, W) float tensor
    device : str or torch.device, optional
        Move ``x`` there first (the model must already be there).
    **options
        The method's keyword options (see each function); unknown names raise ``ValueError``.

    Returns
    -------
    BaselineResult
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    fn = _METHODS[method]
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown options {unknown} for method {method!r}; valid: {allowed}")
    x = _check_x(x)
    if device is not None:
        x = x.to(device)
    counter = _CountingForward(forward)
    sync = x.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    sal = fn(counter, x, **options)
    if sync:
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - t0
    logger.debug("%s: %d passes, %.3f s", method, counter.samples, seconds)
    return BaselineResult(
        saliency=sal,
        forward_passes=counter.samples,
        seconds=seconds,
        method=method,
        options=dict(options),
    )
