"""Hierarchical Perturbation (HiPe): model-agnostic saliency by coarse-to-fine occlusion.

Cooper, Arandjelović & Harrison, *Believe The HiPe: Hierarchical Perturbation for Fast, Robust,
and Model-Agnostic Saliency Mapping* (Pattern Recognition, 2022), section 3.

The algorithm, for an input ``x`` of spatial shape ``S`` (any number of spatial axes) and
``m = min(S)``:

1. Start with ``n = 2·⌊⌈log2 m⌉ / 2⌋`` cells along every axis (256 px → 8, 1024 → 10, 64 → 6).
   Cells tile the input exactly: pixel ``i`` of an axis of length ``L`` lies in cell
   ``⌊i·n / L⌋``, so cells differ by at most one pixel when ``L`` is not a multiple of ``n`` and
   no margin is ever left unperturbed (the reference implementation leaves one).
2. Candidate windows are 2×…×2 blocks of cells whose origins run from −1 to n−1 on each axis,
   clipped at the border: ``(n + 1)^D`` windows, every cell under exactly ``2^D`` of them.
3. Depth 1 perturbs every window. A later depth perturbs a window only when the maximum of the
   saliency accumulated so far over it is ≥ a threshold computed once from that saliency
   (``"mid-range"``: ``min + (max − min)/2``, the default; ``"mean"``).
4. Perturbing replaces the window by a substrate (``"mean"``: each channel's mean over the window,
   the default; ``"fade"``/``"zero"``; ``"blur"``; ``"noise"``; or a callable) and adds
   ``ReLU(f(x) − f(x'))`` to the saliency of every pixel of the window.
5. ``n`` doubles and the loop repeats while cells stay ≥ ``min_cell_size`` px (``n·4 ≤ m`` by
   default) and some window was selected.

Where this implementation deliberately differs from the authors' code (the defaults otherwise
reproduce its window counts, e.g. 81, 25, 77, 81 on the paper's Figure 3 toy):

- cells tile inputs whose size is not a multiple of the grid exactly (see 1.);
- N-D inputs (1-D signals, 2-D images, 3-D volumes), any channel count, non-square shapes;
- early stop: when no perturbation of a depth moves the output by more than
  ``stop_rtol·|f(x)| + stop_atol``, the model does not respond at that scale (a constant model,
  or float noise); refining further would only redistribute rounding error, so the loop stops.
  A model whose output never moves therefore gets an all-zero map after depth 1.
- depth 1 always runs, even on inputs too small for the default depth rule.

The implementation is vectorised: per-cell maxima by a scatter-reduce (pooling over the cell
grid), window maxima by a shifted max over the padded cell grid, perturbed inputs built per batch
from per-axis interval masks (memory bounded by ``batch_size``), and one device→host transfer per
depth (the window selection). Scores and saliency are accumulated in float32 whatever the model's
output dtype (e.g. under autocast).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "HipeResult",
    "hierarchical_perturbation",
    "SUBSTRATES",
    "THRESHOLDS",
    "start_grid_size",
    "max_depths",
]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
SubstrateName = Literal["mean", "fade", "zero", "blur", "noise"]
Substrate = SubstrateName | Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, int], object]

SUBSTRATES = ("mean", "fade", "zero", "blur", "noise")
THRESHOLDS = ("mid-range", "mean")


@dataclass(frozen=True)
class HipeResult:
    """What :func:`hierarchical_perturbation` returns.

    Attributes
    ----------
    saliency : (*S) float32 tensor
        The saliency map over ``x``'s spatial shape, ≥ 0, on ``x``'s device. Units: those of the
        model's score (it is a sum of score drops).
    masks_per_depth : list of int
        Windows perturbed at each depth that ran.
    thresholds : list of float
        The saliency threshold used to select windows at each depth (0.0 at depth 1).
    forward_passes : int
        Model evaluations, the clean one included (``1 + sum(masks_per_depth)``).
    grid_sizes : list of int
        Cells per axis at each depth.
    cell_sizes : list of tuple of float
        Mean cell extent in pixels along each spatial axis at each depth.
    score : float
        ``f(x)``, the clean score that is explained.
    seconds : float
        Wall time of the whole call.
    stop_reason : str
        Why refinement stopped: ``"min_cell_size"``, ``"max_depth"``, ``"no_window"`` or
        ``"no_response"`` (the early stop described in the module docstring).
    """

    saliency: torch.Tensor
    masks_per_depth: list[int]
    thresholds: list[float]
    forward_passes: int
    grid_sizes: list[int] = field(default_factory=list)
    cell_sizes: list[tuple[float, ...]] = field(default_factory=list)
    score: float = 0.0
    seconds: float = 0.0
    stop_reason: str = ""

    @property
    def depth(self) -> int:
        """Number of depths that ran."""
        return len(self.masks_per_depth)


def start_grid_size(m: int) -> int:
    """Cells per side at depth 1 for a smallest input side of ``m`` px.

    ``n = 2·⌊⌈log2 m⌉ / 2⌋`` as in the authors' implementation (256 → 8, 1024 → 10, 64 → 6),
    at least 1 and never more than ``m``.
    """
    if m < 1:
        raise ValueError(f"the smallest spatial side must be >= 1 px, got {m}")
    n = 2 * (math.ceil(math.log2(m)) // 2) if m > 1 else 1
    return max(1, min(n, m))


def max_depths(
    side: int, *, start_grid: int | None = None, min_cell_size: int = 4, max_depth: int | None = None
) -> int:
    """Number of depths HiPe can run on an input whose smallest side is ``side`` px.

    Depth 1 always runs; depth ``d ≥ 2`` runs only if ``n_d · min_cell_size ≤ side`` with
    ``n_d = n_1 · 2^(d−1)`` (``n_1`` = ``start_grid`` or :func:`start_grid_size`);
    ``max_depth`` caps the count. (It is an upper bound: a run also stops early when no window
    is selected or the model does not move.)
    """
    n = start_grid if start_grid is not None else start_grid_size(side)
    depths = 1
    while True:
        n *= 2
        if n * min_cell_size > side or (max_depth is not None and depths >= max_depth):
            return depths
        depths += 1


def hierarchical_perturbation(
    forward: Forward,
    x: torch.Tensor,
    *,
    substrate: Substrate = "mean",
    threshold: str = "mid-range",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    max_depth: int | None = None,
    min_cell_size: int = 4,
    start_grid: int | None = None,
    blur_sigma: float = 5.0,
    seed: int = 0,
    stop_rtol: float = 1e-4,
    stop_atol: float = 1e-12,
    progress: Progress | None = None,
) -> HipeResult:
    """Explain the scalar ``forward(x)`` with Hierarchical Perturbation.

    Parameters
    ----------
    forward : callable
        Maps a batch ``(B, C, *S)`` to ``(B,)`` scalar scores (any float dtype; accumulated in
        float32). Called under ``torch.no_grad()`` with at most ``batch_size`` inputs at once.
    x : (C, *S) tensor
        One sample: channels first, then 1 to 3 (or more) spatial axes.
    substrate : {'mean', 'fade', 'zero', 'blur', 'noise'} or callable, optional
        What replaces a perturbed window. ``'mean'``: each channel's mean over the window
        (default). ``'fade'``/``'zero'``: zeros. ``'blur'``: a Gaussian blur of ``x``
        (``blur_sigma`` px, every channel). ``'noise'``: Gaussian noise with each channel's mean
        and standard deviation, drawn once from ``seed``. A callable gets ``x`` ``(C, *S)`` and
        returns the substitute image of the same shape, pasted into each window.
    threshold : {'mid-range', 'mean'}, optional
        How the selection threshold is computed from the current saliency.
    batch_size : int, optional
        Perturbed inputs per model call; bounds memory. Results do not depend on it.
    device : torch device or str, optional
        Where to run (``x`` is moved there); the result is returned on ``x``'s device.
    max_depth : int, optional
        Stop after this many depths (default: until cells reach ``min_cell_size``).
    min_cell_size : int, optional
        Smallest cell side in px (default 4, the authors' rule ``n ≤ min(S)/4``).
    start_grid : int, optional
        Cells per axis at depth 1 (default :func:`start_grid_size` of ``min(S)``).
    blur_sigma : float, optional
        Gaussian sigma in px of the ``'blur'`` substrate.
    seed : int, optional
        Seed of the ``'noise'`` substrate.
    stop_rtol, stop_atol : float, optional
        Early stop when every score drop of a depth is ≤ ``stop_rtol·|f(x)| + stop_atol``.
    progress : callable, optional
        ``progress(depth, windows_done, windows_total)`` after each batch. Raise from it to cancel.

    Returns
    -------
    HipeResult

    Raises
    ------
    ValueError
        Unknown option, ``x`` of the wrong rank, or a ``forward`` that returns the wrong shape,
        NaN or inf.
    """
    t_start = time.perf_counter()
    forward, x, out_device, dev = _check_inputs(
        forward,
        x,
        substrate=substrate,
        threshold=threshold,
        batch_size=batch_size,
        device=device,
        max_depth=max_depth,
        min_cell_size=min_cell_size,
        start_grid=start_grid,
    )
    spatial = tuple(x.shape[1:])
    ndim = len(spatial)
    m = min(spatial)
    n = start_grid if start_grid is not None else start_grid_size(m)

    with torch.no_grad():
        clean = _scores(forward, x.unsqueeze(0), 1)
        _check_finite(clean, "f(x)")
        clean = clean[0]
        clean_value = float(clean)
        stop_floor = stop_rtol * abs(clean_value) + stop_atol
        fill = _substitute_image(substrate, x, blur_sigma=blur_sigma, seed=seed)
        integral = _integral_image(x) if substrate == "mean" else None

        saliency = torch.zeros(spatial, dtype=torch.float32, device=dev)
        masks_per_depth: list[int] = []
        thresholds: list[float] = []
        grid_sizes: list[int] = []
        cell_sizes: list[tuple[float, ...]] = []
        passes = 1
        depth = 0
        stop_reason = "min_cell_size"
        pending: torch.Tensor | None = None  # max score drop of the previous depth (on device)
        bad = torch.zeros((), dtype=torch.bool, device=dev)

        while True:
            depth += 1
            if depth > 1 and n * min_cell_size > m:
                stop_reason = "min_cell_size"
                break
            if max_depth is not None and depth > max_depth:
                stop_reason = "max_depth"
                break
            edges = [_cell_edges(length, n, dev) for length in spatial]
            if depth == 1:
                t = torch.zeros((), dtype=torch.float32, device=dev)
                selected = torch.ones((n + 1,) * ndim, dtype=torch.bool, device=dev)
            else:
                t = (
                    saliency.amin() + (saliency.amax() - saliency.amin()) / 2
                    if threshold == "mid-range"
                    else saliency.mean()
                )
                selected = _window_max(saliency, n, spatial) >= t
            # The one device→host transfer of this depth: selection, threshold, last depth's
            # largest score drop, and whether any score so far was NaN/inf.
            extra = torch.stack(
                [t, pending if pending is not None else t.new_tensor(math.inf), bad.float()]
            )
            host = torch.cat([selected.flatten().float(), extra.float()]).cpu()
            if host[-1] > 0:
                raise ValueError(
                    "forward returned NaN or inf for a perturbed input; check the "
                    "model and the substrate (e.g. a normalisation dividing by 0)"
                )
            if depth > 1 and float(host[-2]) <= stop_floor:
                stop_reason = "no_response"
                logger.debug("depth %d: no score drop above %.3g, stopping", depth, stop_floor)
                break
            origins = torch.nonzero(host[:-3].view((n + 1,) * ndim) > 0).tolist()
            if not origins:
                stop_reason = "no_window"
                break

            total = len(origins)
            thresholds.append(float(host[-3]))
            masks_per_depth.append(total)
            grid_sizes.append(n)
            cell_sizes.append(tuple(length / n for length in spatial))
            logger.debug(
                "depth %d: grid %d, %d windows, threshold %.4g", depth, n, total, thresholds[-1]
            )

            depth_max = torch.zeros((), dtype=torch.float32, device=dev)
            window_drop = torch.zeros(((n + 1) ** ndim,), dtype=torch.float32, device=dev)
            for start in range(0, total, batch_size):
                chunk = torch.tensor(origins[start : start + batch_size], device=dev)
                lo, hi = _window_bounds(chunk - 1, n, edges)
                perturbed = _perturb(x, lo, hi, substrate, fill, integral)
                scores = _scores(forward, perturbed, len(chunk))
                bad |= ~torch.isfinite(scores).all()
                drop = torch.relu(clean - scores)
                depth_max = torch.maximum(depth_max, drop.amax())
                flat = torch.zeros(len(chunk), dtype=torch.long, device=dev)
                for axis in range(ndim):
                    flat = flat * (n + 1) + chunk[:, axis]
                window_drop.index_add_(0, flat, drop)
                passes += len(chunk)
                if progress is not None:
                    progress(depth, min(start + batch_size, total), total)
            # Every cell lies under the 2^D windows whose origins are c-1 and c on each axis.
            saliency += _cell_sum(window_drop.view((n + 1,) * ndim), n)[_cell_ids(n, spatial, dev)]
            pending = depth_max
            n *= 2

        if bad.item():
            raise ValueError(
                "forward returned NaN or inf for a perturbed input; check the model "
                "and the substrate (e.g. a normalisation dividing by 0)"
            )

    return HipeResult(
        saliency=saliency.to(out_device),
        masks_per_depth=masks_per_depth,
        thresholds=thresholds,
        forward_passes=passes,
        grid_sizes=grid_sizes,
        cell_sizes=cell_sizes,
        score=clean_value,
        seconds=time.perf_counter() - t_start,
        stop_reason=stop_reason,
    )


# --- helpers -------------------------------------------------------------------------------


def _check_inputs(
    forward, x, *, substrate, threshold, batch_size, device, max_depth, min_cell_size, start_grid
):
    if not callable(forward):
        raise ValueError(f"forward must be callable (batch -> (B,) scores), got {type(forward)!r}")
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"x must be a tensor of shape (C, *spatial), got {type(x)!r}") from exc
    if x.ndim < 2:
        raise ValueError(
            f"x must be one sample of shape (C, *spatial) with at least one spatial axis, got "
            f"shape {tuple(x.shape)}; add a channel axis with x[None] for a single-channel input"
        )
    if any(s < 1 for s in x.shape):
        raise ValueError(f"x must not have empty axes, got shape {tuple(x.shape)}")
    if not (isinstance(substrate, str) and substrate in SUBSTRATES) and not callable(substrate):
        raise ValueError(
            f"substrate must be one of {list(SUBSTRATES)} or a callable, got {substrate!r}"
        )
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {list(THRESHOLDS)}, got {threshold!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_depth is not None and (not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth must be a positive int or None, got {max_depth!r}")
    if not isinstance(min_cell_size, int) or min_cell_size < 1:
        raise ValueError(f"min_cell_size must be a positive int, got {min_cell_size!r}")
    m = min(x.shape[1:])
    if start_grid is not None and (not isinstance(start_grid, int) or not 1 <= start_grid <= m):
        raise ValueError(
            f"start_grid must be an int in [1, {m}] (the smallest spatial side), got {start_grid!r}"
        )
    out_device = x.device
    dev = torch.device(device) if device is not None else x.device
    x = x.to(dev)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return forward, x, out_device, dev


def _scores(forward: Forward, batch: torch.Tensor, expected: int) -> torch.Tensor:
    """Call ``forward`` and check that it returns ``(B,)`` scores; float32."""
    out = forward(batch)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (expected,):
        raise ValueError(
            f"forward must return one scalar score per input, shape ({expected},), got shape "
            f"{tuple(out.shape)}; reduce the model output to a score, e.g. with wsi_hipe.scores"
        )
    return out.to(device=batch.device, dtype=torch.float32)


def _check_finite(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise ValueError(f"forward returned a non-finite score for {what}: {values.tolist()}")


def _cell_edges(length: int, n: int, dev: torch.device) -> torch.Tensor:
    """Pixel boundaries of ``n`` cells tiling ``length`` px: cell i = [e[i], e[i+1])."""
    i = torch.arange(n + 1, device=dev)
    return (i * length + n - 1) // n  # ceil(i·L/n): pixel p is in cell ⌊p·n/L⌋


def _cell_ids(n: int, spatial: Sequence[int], dev: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-axis cell index of every pixel, shaped to broadcast over ``spatial``."""
    ids = []
    for axis, length in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[axis] = length
        ids.append(((torch.arange(length, device=dev) * n) // length).view(shape))
    return tuple(ids)


def _window_max(saliency: torch.Tensor, n: int, spatial: Sequence[int]) -> torch.Tensor:
    """Maximum of ``saliency`` over every 2×…×2 window of cells; shape ``(n+1,)*D``."""
    ndim = len(spatial)
    dev = saliency.device
    flat_id = torch.zeros(spatial, dtype=torch.long, device=dev)
    for idx in _cell_ids(n, spatial, dev):
        flat_id = flat_id * n + idx
    cell_max = torch.full((n**ndim,), -math.inf, dtype=saliency.dtype, device=dev)
    cell_max = cell_max.scatter_reduce(0, flat_id.flatten(), saliency.flatten(), reduce="amax")
    padded = torch.nn.functional.pad(cell_max.view((n,) * ndim), (1, 1) * ndim, value=-math.inf)
    out = None
    for offset in itertools.product((0, 1), repeat=ndim):
        part = padded[tuple(slice(o, o + n + 1) for o in offset)]
        out = part if out is None else torch.maximum(out, part)
    return out


def _cell_sum(window_values: torch.Tensor, n: int) -> torch.Tensor:
    """Per cell, the sum of the values of the 2^D windows covering it; ``(n+1,)*D → (n,)*D``."""
    out = None
    for offset in itertools.product((0, 1), repeat=window_values.ndim):
        part = window_values[tuple(slice(o, o + n) for o in offset)]
        out = part if out is None else out + part
    return out


def _window_bounds(origins: torch.Tensor, n: int, edges: list[torch.Tensor]):
    """Pixel bounds ``[lo, hi)`` ``(B, D)`` of windows with cell origins ``origins`` ``(B, D)``."""
    lo = torch.stack([edges[a][origins[:, a].clamp(min=0)] for a in range(len(edges))], dim=1)
    hi = torch.stack([edges[a][(origins[:, a] + 2).clamp(max=n)] for a in range(len(edges))], dim=1)
    return lo, hi


def _window_masks(lo: torch.Tensor, hi: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Boolean pixel masks ``(B, *S)`` of the boxes ``[lo, hi)``."""
    ndim = len(spatial)
    mask = None
    for axis, length in enumerate(spatial):
        pix = torch.arange(length, device=lo.device)
        axis_mask = (pix >= lo[:, axis, None]) & (pix < hi[:, axis, None])  # (B, L)
        shape = [lo.shape[0]] + [1] * ndim
        shape[axis + 1] = length
        axis_mask = axis_mask.view(shape)
        mask = axis_mask if mask is None else mask & axis_mask
    return mask


def _integral_image(x: torch.Tensor) -> torch.Tensor:
    """Summed-area table of ``x`` ``(C, *S)`` in float64, zero-padded at the front of each axis."""
    out = x.to(torch.float64)
    for axis in range(1, x.ndim):
        out = torch.nn.functional.pad(out.cumsum(dim=axis).movedim(axis, -1), (1, 0))
        out = out.movedim(-1, axis)
    return out


def _box_means(integral: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of each box ``[lo, hi)`` ``(B, D)`` from a summed-area table → (B, C)."""
    ndim = lo.shape[1]
    total = None
    for corner in itertools.product((0, 1), repeat=ndim):
        idx = tuple(hi[:, a] if c else lo[:, a] for a, c in enumerate(corner))
        sign = (-1) ** (ndim - sum(corner))
        part = integral[(slice(None),) + idx].T * sign  # (B, C)
        total = part if total is None else total + part
    counts = (hi - lo).prod(dim=1, keepdim=True).to(torch.float64)
    return total / counts


def _perturb(x, lo, hi, substrate, fill, integral) -> torch.Tensor:
    """Inputs ``(B, C, *S)``: ``x`` with each box ``[lo, hi)`` replaced by the substrate."""
    w = _window_masks(lo, hi, x.shape[1:]).unsqueeze(1)  # (B, 1, *S)
    if substrate == "mean":
        means = _box_means(integral, lo, hi).to(x.dtype)
        means = means.view(means.shape + (1,) * (x.ndim - 1))  # (B, C, 1, ...)
        return torch.where(w, means, x.unsqueeze(0))
    if substrate in ("fade", "zero"):
        return torch.where(w, torch.zeros((), dtype=x.dtype, device=x.device), x.unsqueeze(0))
    return torch.where(w, fill.unsqueeze(0), x.unsqueeze(0))


def _substitute_image(substrate, x: torch.Tensor, *, blur_sigma: float, seed: int):
    """The whole-input substitute for image-valued substrates (blur, noise, callable)."""
    if substrate == "blur":
        return gaussian_blur(x, blur_sigma)
    if substrate == "noise":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
        dims = tuple(range(1, x.ndim))
        return x.mean(dim=dims, keepdim=True) + x.std(dim=dims, keepdim=True) * noise
    if callable(substrate):
        out = substrate(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
            raise ValueError(
                f"a substrate callable must return a tensor of x's shape "
                f"{tuple(x.shape)}, got {got}"
            )
        return out.to(device=x.device, dtype=x.dtype)
    return None


def gaussian_blur(x: torch.Tensor, sigma: float, *, mode: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of every channel of ``x`` ``(C, *S)`` over all spatial axes.

    Kernel radius ``⌈3σ⌉``, normalised to sum 1. ``mode`` pads the borders: ``"reflect"``
    (replicate where an axis is not longer than the radius) or ``"replicate"``.
    ``sigma <= 0`` returns a copy.
    """
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (k / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    out = x
    for axis in range(1, x.ndim):
        moved = out.movedim(axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        pad = mode if shape[-1] > radius else "replicate"
        flat = torch.nn.functional.pad(flat, (radius, radius), mode=pad)
        flat = torch.nn.functional.conv1d(flat, kernel.view(1, 1, -1))
        out = flat.reshape(shape).movedim(-1, axis)
    return out
