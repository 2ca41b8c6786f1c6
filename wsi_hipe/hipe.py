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
   the default; ``"fade"``, old spelling ``"zero"``: zeros; ``"blur"``; ``"noise"``; or a
   callable) and adds ``ReLU(f(x) − f(x'))`` to the saliency of every pixel of the window.
5. ``n`` doubles and the loop repeats while cells stay ≥ ``min_cell_size`` px (``n·4 ≤ m`` by
   default) and some window was selected. :func:`max_depths` is this rule; the loop below and
   the pipeline's skip bound both use it.

Vector targets: ``forward`` may return ``(B, K)``, K scores explained in the same passes (e.g.
every cell of a tile). Each target has its own saliency, threshold, selection and early stop; a
depth perturbs the *union* of the K selections, each window once, and target k is credited only
by windows of its own selection. Map k therefore equals a separate run on target k alone (up to
the rounding of a different batch composition), and the passes are those of the union.

Where this implementation deliberately differs from the authors' code (the defaults otherwise
reproduce its window counts, e.g. 81, 25, 77, 81 on the paper's Figure 3 toy):

- cells tile inputs whose size is not a multiple of the grid exactly (see 1.);
- N-D inputs (1-D signals, 2-D images, 3-D volumes), any channel count, non-square shapes;
- no saliency from float noise. The clean input is scored in the first batch, like the perturbed
  ones, and a drop ``f(x) − f(x')`` counts only when it exceeds
  ``noise_rtol · max(|f(x)|, |f(x')|)``. The default ``noise_rtol`` (:func:`default_noise_rtol`)
  is ``64·ε`` of the score dtype, at most ``2⁻⁸``: float32 7.6e-6, float64 1.4e-14, bf16 and
  fp16 3.9e-3. Why: the very same probabilities scored in two rows of one batch can differ by
  a few ε (measured on an AMD EPYC, AVX2: 1–5 ε for a cell's area ``probabilities @ mask``,
  because BLAS GEMV rounds each row of a batch its own way), so equal batch shapes alone cannot
  make the drop of an unreachable window exactly 0; 64 ε leaves a margin of more than 10, and a
  drop of 8 parts per million of the score is not a finding. 16-bit scores carry an ulp or two
  of rounding; the cap keeps their real drops of a few tenths of a percent. A window whose
  perturbation cannot change the score thus gets exactly 0 on any CPU or GPU.
- early stop: when no perturbation of a depth moves the output by more than
  ``stop_rtol·|f(x)| + stop_atol``, the model does not respond at that scale (a constant model,
  or float noise); refining further would only redistribute rounding error, so the loop stops
  (per target for vector targets). A model whose output never moves gets an all-zero map after
  depth 1.
- depth 1 always runs, even on inputs too small for the default depth rule.

Costs: the saliency lives on the cell grid of the current depth (the cells of depth d+1 nest in
those of depth d, so refining is an exact repeat by 2 along each axis) and is expanded to pixels
once at the end; window maxima are a shifted max over the padded cell grid. Each depth makes one
device→host transfer (the union of the selections, the per-target counts, thresholds and
early-stop flags, the NaN/inf counts so far) and one host→device transfer (the selected windows'
indices and pixel bounds). Perturbed inputs are pasted as window slices into one batch buffer
that is reused and restored, so a batch costs the windows' pixels, not a full-size mask. Drops
and saliency are float32 (float64 scores stay float64 until the drop is taken) whatever the
model's output dtype (e.g. under autocast).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from wsi_hipe.config import SUBSTRATES, THRESHOLDS, Substrate, Threshold, canonical_substrate

__all__ = [
    "HipeResult",
    "SUBSTRATES",
    "THRESHOLDS",
    "SubstrateLike",
    "default_noise_rtol",
    "gaussian_blur",
    "hierarchical_perturbation",
    "max_depths",
    "start_grid_size",
]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
#: A substrate name (:data:`wsi_hipe.config.Substrate`; ``"zero"`` is accepted for ``"fade"``)
#: or a callable ``x (C, *S) -> substitute image (C, *S)``.
SubstrateLike = Substrate | str | Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, int], object]


@dataclass(frozen=True)
class HipeResult:
    """What :func:`hierarchical_perturbation` returns.

    Attributes
    ----------
    saliency : (*S) or (K, *S) float32 tensor
        The saliency map over ``x``'s spatial shape, ≥ 0, on ``x``'s device; one map per target,
        ``(K, *S)``, when ``forward`` returned ``(B, K)``. Units: those of the model's score (it
        is a sum of score drops).
    masks_per_depth : list of int
        Windows perturbed at each depth that ran (vector targets: the union of the targets'
        selections; each window is perturbed once).
    thresholds : list of float
        The saliency threshold used to select windows at each depth (0.0 at depth 1). Vector
        targets: the smallest of the targets' thresholds (each is in ``target_thresholds``).
    forward_passes : int
        Model evaluations, the clean one included (``1 + sum(masks_per_depth)``).
    grid_sizes : list of int
        Cells per axis at each depth.
    cell_sizes : list of tuple of float
        Mean cell extent in pixels along each spatial axis at each depth.
    score : float
        ``f(x)``, the clean score that is explained (vector targets: the sum of the K scores).
    seconds : float
        Wall time of the whole call.
    stop_reason : str
        Why refinement stopped: ``"min_cell_size"``, ``"max_depth"``, ``"no_window"`` or
        ``"no_response"`` (the early stop of the module docstring; vector targets: when every
        target stopped that way).
    vector : bool
        True when ``forward`` returned ``(B, K)`` (``saliency`` then has the leading K axis).
    target_scores : list of float
        ``f_k(x)`` of each target (one entry for a scalar score).
    target_masks : list of list of int
        Per target, the windows of its own selection at each depth it ran: the
        ``masks_per_depth`` that a separate run on that target alone gives.
    target_thresholds : list of list of float
        Per target, its threshold at each depth it ran.
    target_stop_reasons : list of str
        Per target, why its refinement stopped (values as ``stop_reason``).
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
    vector: bool = False
    target_scores: list[float] = field(default_factory=list)
    target_masks: list[list[int]] = field(default_factory=list)
    target_thresholds: list[list[float]] = field(default_factory=list)
    target_stop_reasons: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        """Number of depths that ran."""
        return len(self.masks_per_depth)

    @property
    def num_targets(self) -> int:
        """K, the number of targets explained (1 for a scalar score)."""
        return len(self.target_scores)


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
    side: int,
    *,
    start_grid: int | None = None,
    min_cell_size: int = 4,
    max_depth: int | None = None,
) -> int:
    """Number of depths HiPe can run on an input whose smallest side is ``side`` px.

    Depth 1 always runs; depth ``d ≥ 2`` runs only if ``n_d · min_cell_size ≤ side`` with
    ``n_d = n_1 · 2^(d−1)`` (``n_1`` = ``start_grid`` or :func:`start_grid_size`);
    ``max_depth`` caps the count. :func:`hierarchical_perturbation` runs exactly these depths
    unless it stops early (no window selected, or the model does not move).
    """
    n = start_grid if start_grid is not None else start_grid_size(side)
    depths = 1
    while True:
        n *= 2
        if n * min_cell_size > side or (max_depth is not None and depths >= max_depth):
            return depths
        depths += 1


def default_noise_rtol(dtype: torch.dtype) -> float:
    """Default ``noise_rtol`` for scores of ``dtype``: ``min(64·ε, 2⁻⁸)``, 0 for integer scores.

    float32 7.6e-6, float64 1.4e-14, bf16/fp16 3.9e-3; the module docstring says why.
    """
    if not dtype.is_floating_point:
        return 0.0
    return min(64 * torch.finfo(dtype).eps, 2.0**-8)


def hierarchical_perturbation(
    forward: Forward,
    x: torch.Tensor,
    *,
    substrate: SubstrateLike = "mean",
    threshold: Threshold = "mid-range",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    max_depth: int | None = None,
    min_cell_size: int = 4,
    start_grid: int | None = None,
    blur_sigma: float = 5.0,
    seed: int = 0,
    stop_rtol: float = 1e-4,
    stop_atol: float = 1e-12,
    noise_rtol: float | None = None,
    progress: Progress | None = None,
) -> HipeResult:
    """Explain ``forward(x)`` with Hierarchical Perturbation.

    Parameters
    ----------
    forward : callable
        Maps a batch ``(B, C, *S)`` to ``(B,)`` scalar scores, or to ``(B, K)``: K targets
        explained in the same passes (any dtype; drops are accumulated in float32). Called
        under ``torch.no_grad()`` with at most ``batch_size`` inputs at once; the first input
        of the first call is ``x`` itself. The batch is a view of a buffer that HiPe reuses:
        ``forward`` must not modify it in place, nor keep it after returning.
    x : (C, *S) tensor
        One sample: channels first, then 1 to 3 (or more) spatial axes.
    substrate : {'mean', 'fade', 'blur', 'noise'} or callable, optional
        What replaces a perturbed window. ``'mean'``: each channel's mean over the window
        (default). ``'fade'`` (also spelled ``'zero'``): zeros. ``'blur'``: a Gaussian blur of
        ``x`` (``blur_sigma`` px, every channel). ``'noise'``: Gaussian noise with each
        channel's mean and standard deviation, drawn once from ``seed``. A callable gets ``x``
        ``(C, *S)`` and returns the substitute image of the same shape, pasted into each window.
    threshold : {'mid-range', 'mean'}, optional
        How the selection threshold is computed from the current saliency (per target).
    batch_size : int, optional
        Inputs per model call, the clean one included; bounds memory. Results do not depend on
        it beyond float rounding.
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
        A target stops refining when every drop of its last depth is
        ≤ ``stop_rtol·|f(x)| + stop_atol`` (``stop_atol=-inf``: never stop early).
    noise_rtol : float, optional
        A drop ``f(x) − f(x')`` counts only when > ``noise_rtol · max(|f(x)|, |f(x')|)``
        (default :func:`default_noise_rtol` of the score dtype; 0 credits every positive drop).
    progress : callable, optional
        ``progress(depth, windows_done, windows_total)`` after each batch. Raise from it to cancel.

    Returns
    -------
    HipeResult

    Raises
    ------
    ValueError
        Unknown option, ``x`` of the wrong rank, or a ``forward`` that returns anything but
        ``(B,)`` or ``(B, K)`` (one K throughout) finite scores.
    """
    t_start = time.perf_counter()
    with torch.no_grad():
        run, paste, steps, out_device = _begin(
            forward, x, substrate=substrate, threshold=threshold, batch_size=batch_size,
            device=device, max_depth=max_depth, min_cell_size=min_cell_size,
            start_grid=start_grid, blur_sigma=blur_sigma, seed=seed, stop_rtol=stop_rtol,
            stop_atol=stop_atol, noise_rtol=noise_rtol,
        )  # fmt: skip
        for depth, windows in steps:  # each step credits the depth scored before it
            for rows in windows.batches(batch_size):
                _perturb_batch(run, paste, windows, rows)
                if progress is not None:
                    progress(depth, rows[1] - windows.with_clean, len(windows.boxes))
        return run.result(run.stop_reason, out_device, time.perf_counter() - t_start)


def _begin(forward, x, *, substrate, threshold, batch_size, device, max_depth, min_cell_size,
           start_grid, blur_sigma, seed, stop_rtol, stop_atol, noise_rtol):  # fmt: skip
    """Check the options and set up one input's run.

    Returns its state, its paster, the generator of its depths and the result's device. The
    generator yields ``(depth, windows)``; the caller scores every row of ``[clean] + windows``
    (:meth:`_Windows.batches`) into ``run.depth_scores`` before asking for the next depth, and
    the generator then credits the depth's drops and selects the next one. When it ends,
    ``run.stop_reason`` says why. Both :func:`hierarchical_perturbation` and
    :func:`wsi_hipe.hipe_many.hierarchical_perturbation_many` drive it.
    """
    substrate = _check_options(
        forward,
        substrate=substrate,
        threshold=threshold,
        batch_size=batch_size,
        max_depth=max_depth,
        min_cell_size=min_cell_size,
        noise_rtol=noise_rtol,
    )
    x, out_device = _as_input(x, device, start_grid)
    m = min(x.shape[1:])
    n = start_grid if start_grid is not None else start_grid_size(m)
    rule = max_depths(m, start_grid=n, min_cell_size=min_cell_size)
    depths = max_depths(m, start_grid=n, min_cell_size=min_cell_size, max_depth=max_depth)
    run = _Run(forward, x, batch_size, n * 2 ** (depths - 1), stop_rtol, stop_atol, noise_rtol)
    run.stop_reason = "max_depth" if depths < rule else "min_cell_size"
    paste = _Paste(x, substrate, blur_sigma=blur_sigma, seed=seed)
    return run, paste, _depths(run, paste, n, depths, threshold), out_device


def _depths(run: _Run, paste: _Paste, n: int, depths: int, threshold: str):
    """The generator of :func:`_begin`: one ``(depth, windows)`` per depth that runs."""
    for depth in range(1, depths + 1):
        windows = _select_windows(run, n, depth, threshold)
        if windows is None:
            run.stop_reason = run.early_stop_reason()
            return
        paste.prepare(windows)
        yield depth, windows
        _accumulate(run, windows)
        n *= 2


# --- the steps of a depth ------------------------------------------------------------------


@dataclass
class _Windows:
    """The windows of one depth: the union of the targets' selections, in perturbation order."""

    n: int
    boxes: list[tuple[slice, ...]]  # host: each window's pixel box
    flat: torch.Tensor  # device (W,): index in the flattened (n+1)^D window grid
    lo: torch.Tensor  # device (W, D): pixel bounds [lo, hi)
    hi: torch.Tensor
    selected: torch.Tensor | None  # device (K, (n+1)^D) bool, each target's own selection
    with_clean: bool  # the clean input is row 0 of the first batch (depth 1)

    def batches(self, batch_size: int) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` over ``[clean] + windows``."""
        total = len(self.boxes) + self.with_clean
        return [(s, min(s + batch_size, total)) for s in range(0, total, batch_size)]


def _select_windows(run: _Run, n: int, depth: int, threshold: str) -> _Windows | None:
    """Each target's windows at this depth and their union, with the depth's one sync.

    Depth 1 takes every window for every target without asking the device. A later depth stops
    the targets whose previous depth moved no score (early stop), computes each remaining
    target's threshold and window maxima on the cell grid, and brings to the host in one
    transfer the union, per-target counts, thresholds and early-stop flags, and the NaN/inf
    counts so far. None when no target selected a window.
    """
    if depth == 1:
        flat = np.arange((n + 1) ** run.ndim)
        run.record_depth(n, len(flat), [0.0])
        return _windows(run, n, flat, selected=None, with_clean=True)
    sal = run.refine(n)  # (K, n, ...) on this depth's cell grid
    responsive = run.active & (run.prev_max > run.stop_floor)
    t = _threshold(sal, threshold, run.cell_volumes(n))
    selected = (_window_max(sal) >= t[:, None]) & responsive[:, None]
    counts = selected.sum(dim=1)
    union = selected.any(dim=0)
    packed = [run.bad, counts, t, responsive, union]
    host = torch.cat([v.double() for v in packed]).cpu()  # the depth's one sync
    bad, counts_h, t_h, resp_h, union_h = host.split([len(v) for v in packed])
    run.check_finite(bad.tolist())
    counts_h, t_h, resp_h = counts_h.long().tolist(), t_h.tolist(), resp_h.bool().tolist()
    run.record_targets(counts_h, t_h, resp_h)
    run.active = responsive & (counts > 0)
    flat = np.flatnonzero(union_h.numpy())
    if flat.size == 0:
        return None
    chosen = [t for t, c, r in zip(t_h, counts_h, resp_h, strict=True) if c > 0 and r]
    run.record_depth(n, flat.size, chosen)
    return _windows(run, n, flat, selected=selected, with_clean=False)


def _windows(run: _Run, n: int, flat: np.ndarray, *, selected, with_clean) -> _Windows:
    """Boxes (host) and indices and bounds (device) of the windows with flat indices ``flat``."""
    origins = np.stack(np.unravel_index(flat, (n + 1,) * run.ndim), axis=1) - 1  # (W, D)
    lo = np.empty_like(origins)
    hi = np.empty_like(origins)
    for a, length in enumerate(run.spatial):
        edges = (np.arange(n + 1) * length + n - 1) // n  # cell i = [edges[i], edges[i+1])
        lo[:, a] = edges[np.clip(origins[:, a], 0, n)]
        hi[:, a] = edges[np.clip(origins[:, a] + 2, 0, n)]
    boxes = [tuple(map(slice, a, b)) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    # The depth's one host→device transfer: window indices and pixel bounds (from pinned
    # memory on CUDA, so the copy does not wait for the work already queued).
    table = torch.from_numpy(np.concatenate([flat[:, None], lo, hi], axis=1))
    if run.dev.type == "cuda":
        table = table.pin_memory()
    table = table.to(run.dev, non_blocking=True)
    flat_d, lo_d, hi_d = table.split([1, run.ndim, run.ndim], dim=1)
    return _Windows(n, boxes, flat_d[:, 0], lo_d, hi_d, selected, with_clean)


def _perturb_batch(run: _Run, paste: _Paste, windows: _Windows, rows: tuple[int, int]) -> None:
    """Score rows ``[start, stop)`` of ``[clean] + windows`` into ``run.depth_scores``.

    Pastes each row's window into the reused buffer, calls the model once, restores the rows.
    """
    start, stop = rows
    first = start - windows.with_clean  # window in the batch's row 0 (−1: the clean input)
    placed = [(r, first + r) for r in range(stop - start) if first + r >= 0]
    for r, j in placed:
        paste.into(run.buf, r, windows, j)
    run.score_rows(start, run.buf[: stop - start])
    for r, j in placed:
        paste.restore(run.buf, r, windows.boxes[j])


def _accumulate(run: _Run, windows: _Windows) -> None:
    """Credit each window's score drop to the targets that selected it (once per depth).

    A drop at or below the noise tolerance is 0. NaN and inf are counted on the device and
    reported at the next sync. Updates the cell-grid saliency and each target's largest drop.
    """
    scores = run.depth_scores  # (rows, K): [clean] + windows at depth 1, windows later
    if windows.with_clean:
        run.set_clean(scores[0])
        scores = scores[1:]
    run.count_non_finite(scores)
    clean = run.clean[None, :]
    drop = clean - scores
    tol = run.noise_rtol * torch.maximum(clean.abs(), scores.abs())
    drop = torch.where(drop > tol, drop, torch.zeros((), dtype=drop.dtype, device=drop.device))
    drop = drop.T.to(torch.float32)  # (K, W)
    if windows.selected is not None:
        drop = drop * windows.selected[:, windows.flat]
    shape = (run.k,) + (windows.n + 1,) * run.ndim
    window_drop = torch.zeros(shape, dtype=torch.float32, device=run.dev)
    window_drop.view(run.k, -1).index_copy_(1, windows.flat, drop)
    run.prev_max = drop.amax(dim=1)
    cells = _cell_sum(window_drop)
    run.sal = cells if run.sal is None else run.refine(windows.n) + cells
    run.sal_n = windows.n


def checked_scores(out, b: int) -> torch.Tensor:
    """``forward``'s output for a batch of ``b`` as a tensor of shape ``(b,)`` or ``(b, K)``."""
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out)
    if not (out.shape == (b,) or (out.ndim == 2 and out.shape[0] == b and out.shape[1] > 0)):
        raise ValueError(
            f"forward must return one scalar score per input, shape ({b},), or K >= 1 scores "
            f"per input, shape ({b}, K); got shape {tuple(out.shape)} for a batch of {b}. "
            "Reduce the model output to scores, e.g. with wsi_hipe.scores"
        )
    return out


# --- run state ---------------------------------------------------------------------------


class _Run:
    """One call's state: the batch buffer, clean scores, per-target saliency and bookkeeping."""

    def __init__(self, forward, x, batch_size, n_last, stop_rtol, stop_atol, noise_rtol):
        self.forward = forward
        self.x = x
        self.dev = x.device
        self.spatial = tuple(x.shape[1:])
        self.ndim = len(self.spatial)
        self.buf_rows = min(batch_size, (n_last + 1) ** self.ndim + 1)  # no depth needs more
        self._buf: torch.Tensor | None = None
        self.stop_reason = ""
        self.stop_rtol, self.stop_atol, self.noise_rtol_option = stop_rtol, stop_atol, noise_rtol
        self.k: int | None = None  # number of targets, known after the first call
        self.vector = False
        self.passes = 0
        self.bad = torch.zeros(3, dtype=torch.long, device=self.dev)  # clean non-finite, NaN, inf
        self.masks_per_depth: list[int] = []
        self.thresholds: list[float] = []
        self.grid_sizes: list[int] = []
        self.target_masks: list[list[int]] = []
        self.target_thresholds: list[list[float]] = []
        self.target_stop: list[str | None] = []
        self.sal: torch.Tensor | None = None  # (K, n, ...) float32 on the cell grid of sal_n
        self.sal_n = 0
        self.depth_scores: torch.Tensor | None = None  # (rows, K) scores of the current depth

    # model calls -------------------------------------------------------------------------

    @property
    def buf(self) -> torch.Tensor:
        """The reused batch buffer, ``x`` in every row (made on first use: a run driven by
        :func:`wsi_hipe.hipe_many.hierarchical_perturbation_many` never needs its own)."""
        if self._buf is None:
            self._buf = self.x.unsqueeze(0).repeat((self.buf_rows,) + (1,) * self.x.ndim)
        return self._buf

    def score_rows(self, start: int, batch: torch.Tensor) -> None:
        """``forward(batch)``, checked against earlier calls, into ``depth_scores[start:]``."""
        self.store(start, checked_scores(self.forward(batch), len(batch)))

    def store(self, start: int, out: torch.Tensor) -> None:
        """Scores ``(b,)`` or ``(b, K)`` of rows ``[start, start + b)`` of the current depth."""
        b = len(out)
        self.passes += b
        vector, k = out.ndim == 2, (out.shape[1] if out.ndim == 2 else 1)
        if self.k is None:
            self._start(vector, k, out.dtype)
        elif (vector, k) != (self.vector, self.k):
            before = f"(B, {self.k})" if self.vector else "(B,)"
            raise ValueError(
                f"forward returned shape {tuple(out.shape)} for a batch of {b} but {before} "
                "scores before; it must return (B,) on every call, or (B, K) with one K on "
                "every call"
            )
        # A copy (never a view of the batch buffer), in the working dtype, on the device.
        self.depth_scores[start : start + b] = out if vector else out[:, None]

    def _start(self, vector: bool, k: int, dtype: torch.dtype) -> None:
        """First call: K targets, all selecting every depth-1 window."""
        self.vector, self.k = vector, k
        self.work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rtol = self.noise_rtol_option
        self.noise_rtol = default_noise_rtol(dtype) if rtol is None else float(rtol)
        self.active = torch.ones(k, dtype=torch.bool, device=self.dev)
        self.target_masks = [list(self.masks_per_depth) for _ in range(k)]
        self.target_thresholds = [list(self.thresholds) for _ in range(k)]
        self.target_stop = [None] * k
        self.depth_scores = self._new_depth_scores(self.masks_per_depth[-1] + 1)

    def _new_depth_scores(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, self.k), dtype=self.work_dtype, device=self.dev)

    def set_clean(self, clean: torch.Tensor) -> None:
        """``f(x)`` ``(K,)``, scored in the first batch like every perturbed input."""
        self.clean = clean
        self.bad[0] += (~torch.isfinite(clean)).sum()
        self.stop_floor = (self.stop_rtol * clean.abs() + self.stop_atol).to(torch.float32)

    def count_non_finite(self, scores: torch.Tensor) -> None:
        self.bad[1] += torch.isnan(scores).sum()
        self.bad[2] += torch.isinf(scores).sum()

    def check_finite(self, counts: Sequence[float]) -> None:
        """The one NaN/inf error, from the device's counts (clean non-finite, NaN, inf)."""
        clean, nan, inf = (int(c) for c in counts)
        if not (clean or nan or inf):
            return
        parts = [f"the clean input x ({clean} of {self.k} scores)"] if clean else []
        if nan or inf:
            parts.append(f"perturbed inputs ({nan} NaN, {inf} inf)")
        raise ValueError(
            f"forward returned non-finite scores (NaN or inf) for {' and '.join(parts)}; valid "
            "scores are finite numbers: check the model and the substrate (e.g. a "
            "normalisation dividing by 0)"
        )

    # depths ------------------------------------------------------------------------------

    def record_depth(self, n: int, windows: int, thresholds: list[float]) -> None:
        """A depth that runs: its union of windows and the smallest per-target threshold."""
        self.masks_per_depth.append(windows)
        self.thresholds.append(min(thresholds))
        self.grid_sizes.append(n)
        if self.k is not None:
            self.depth_scores = self._new_depth_scores(windows)

    def record_targets(self, counts: list[int], thresholds: list[float], responsive: list[bool]):
        """Per-target bookkeeping of a depth ≥ 2: own windows and threshold, or why it stops."""
        for k, (count, t, resp) in enumerate(zip(counts, thresholds, responsive, strict=True)):
            if self.target_stop[k] is not None:
                continue
            if not resp or count == 0:
                self.target_stop[k] = "no_response" if not resp else "no_window"
                depth = len(self.target_masks[k])
                logger.debug("target %d stops after depth %d: %s", k, depth, self.target_stop[k])
                continue
            self.target_masks[k].append(count)
            self.target_thresholds[k].append(t)

    def early_stop_reason(self) -> str:
        reasons = [r for r in self.target_stop if r is not None]
        return "no_response" if all(r == "no_response" for r in reasons) else "no_window"

    def refine(self, n: int) -> torch.Tensor:
        """The saliency on the cell grid of ``n`` (exact: cells of 2n nest in cells of n)."""
        while self.sal_n < n:
            for axis in range(1, self.ndim + 1):
                self.sal = self.sal.repeat_interleave(2, dim=axis)
            self.sal_n *= 2
        return self.sal

    def cell_volumes(self, n: int) -> torch.Tensor:
        """Pixels per cell on the grid of ``n``, ``(n,)*D`` float64 (cells differ by ≤ 1 px)."""
        vol = torch.ones((), dtype=torch.float64, device=self.dev)
        for length in self.spatial:
            size = torch.diff(_cell_edges(length, n, self.dev)).to(torch.float64)
            vol = vol[..., None] * size
        return vol

    def result(self, stop_reason: str, out_device, seconds: float) -> HipeResult:
        self.check_finite(self.bad.tolist())
        sal = self.sal
        for axis, length in enumerate(self.spatial):  # cell grid → pixels
            ids = (torch.arange(length, device=self.dev) * self.sal_n) // length
            sal = sal.index_select(axis + 1, ids)
        scores = self.clean.tolist()
        reasons = [r if r is not None else stop_reason for r in self.target_stop]
        return HipeResult(
            saliency=(sal if self.vector else sal[0]).to(out_device),
            masks_per_depth=self.masks_per_depth,
            thresholds=self.thresholds,
            forward_passes=self.passes,
            grid_sizes=self.grid_sizes,
            cell_sizes=[tuple(length / n for length in self.spatial) for n in self.grid_sizes],
            score=float(sum(scores)) if self.vector else float(scores[0]),
            seconds=seconds,
            stop_reason=stop_reason,
            vector=self.vector,
            target_scores=[float(s) for s in scores],
            target_masks=self.target_masks,
            target_thresholds=self.target_thresholds,
            target_stop_reasons=reasons,
        )


class _Paste:
    """Pastes a window's substrate into a row of the batch buffer, and restores the row."""

    def __init__(self, x: torch.Tensor, substrate, *, blur_sigma: float, seed: int):
        self.x = x
        self.kind = substrate if substrate in ("mean", "fade") else "image"
        self.fill = _substitute_image(substrate, x, blur_sigma=blur_sigma, seed=seed)
        self.integral = _integral_image(x) if self.kind == "mean" else None
        self.means: torch.Tensor | None = None

    def prepare(self, windows: _Windows) -> None:
        """Per-window channel means of the depth (mean substrate), in one vectorised step."""
        if self.kind == "mean":
            means = _box_means(self.integral, windows.lo, windows.hi).to(self.x.dtype)
            self.means = means.view(means.shape + (1,) * (self.x.ndim - 1))  # (W, C, 1, ...)

    def into(self, buf: torch.Tensor, row: int, windows: _Windows, j: int) -> None:
        box = (row, slice(None), *windows.boxes[j])
        if self.kind == "mean":
            buf[box] = self.means[j]
        elif self.kind == "fade":
            buf[box] = 0
        else:
            buf[box] = self.fill[box[1:]]

    def restore(self, buf: torch.Tensor, row: int, box: tuple[slice, ...]) -> None:
        buf[(row, slice(None), *box)] = self.x[(slice(None), *box)]


# --- checks and helpers -----------------------------------------------------------------


def _check_options(
    forward, *, substrate, threshold, batch_size, max_depth, min_cell_size, noise_rtol
):
    """Validate the options; returns the substrate with old spellings mapped (``zero``→``fade``)."""
    if not callable(forward):
        raise ValueError(
            f"forward must be callable (batch -> (B,) or (B, K) scores), got {type(forward)!r}"
        )
    if isinstance(substrate, str):
        substrate = canonical_substrate(substrate)
    if not (isinstance(substrate, str) and substrate in SUBSTRATES) and not callable(substrate):
        raise ValueError(
            f"substrate must be one of {list(SUBSTRATES)} (or 'zero', the old name of 'fade') "
            f"or a callable, got {substrate!r}"
        )
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {list(THRESHOLDS)}, got {threshold!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_depth is not None and (not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth must be a positive int or None, got {max_depth!r}")
    if not isinstance(min_cell_size, int) or min_cell_size < 1:
        raise ValueError(f"min_cell_size must be a positive int, got {min_cell_size!r}")
    if noise_rtol is not None and not (isinstance(noise_rtol, int | float) and noise_rtol >= 0):
        raise ValueError(f"noise_rtol must be a number >= 0 or None, got {noise_rtol!r}")
    return substrate


def _as_input(x, device, start_grid) -> tuple[torch.Tensor, torch.device]:
    """``x`` as a floating tensor ``(C, *S)`` on the compute device, and ``x``'s own device."""
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
    m = min(x.shape[1:])
    if start_grid is not None and (not isinstance(start_grid, int) or not 1 <= start_grid <= m):
        raise ValueError(
            f"start_grid must be an int in [1, {m}] (the smallest spatial side), got {start_grid!r}"
        )
    out_device = x.device
    x = x.to(torch.device(device) if device is not None else x.device)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return x, out_device


def _cell_edges(length: int, n: int, dev: torch.device) -> torch.Tensor:
    """Pixel boundaries of ``n`` cells tiling ``length`` px: cell i = [e[i], e[i+1])."""
    i = torch.arange(n + 1, device=dev)
    return (i * length + n - 1) // n  # ceil(i·L/n): pixel p is in cell ⌊p·n/L⌋


def _threshold(sal: torch.Tensor, threshold: str, volumes: torch.Tensor) -> torch.Tensor:
    """Per-target threshold ``(K,)`` of a cell-grid saliency ``(K, n, ...)``."""
    flat = sal.flatten(1)
    if threshold == "mid-range":
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        return lo + (hi - lo) / 2
    # The pixel mean: cells weighted by their pixel counts, summed in float64.
    weighted = (flat.to(torch.float64) * volumes.flatten()).sum(dim=1)
    return (weighted / volumes.sum()).to(torch.float32)


def _window_max(sal: torch.Tensor) -> torch.Tensor:
    """Maximum of ``sal`` ``(K, n, ...)`` over every 2×…×2 window of cells → ``(K, (n+1)^D)``."""
    ndim = sal.ndim - 1
    padded = torch.nn.functional.pad(sal, (1, 1) * ndim, value=-math.inf)
    n1 = sal.shape[1] + 1
    out = None
    for offset in itertools.product((0, 1), repeat=ndim):
        part = padded[(slice(None), *(slice(o, o + n1) for o in offset))]
        out = part if out is None else torch.maximum(out, part)
    return out.flatten(1)


def _cell_sum(window_values: torch.Tensor) -> torch.Tensor:
    """Per cell, the sum of the 2^D windows covering it: ``(K, n+1, ...) → (K, n, ...)``."""
    ndim = window_values.ndim - 1
    n = window_values.shape[1] - 1
    out = None
    for offset in itertools.product((0, 1), repeat=ndim):
        part = window_values[(slice(None), *(slice(o, o + n) for o in offset))]
        out = part if out is None else out + part
    return out


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
