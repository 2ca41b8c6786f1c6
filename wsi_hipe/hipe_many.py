"""Hierarchical Perturbation of several inputs at once: one model call, several inputs' windows.

:func:`~wsi_hipe.hipe.hierarchical_perturbation` fills each model call with one input's
windows. Late depths select few windows (a 288 px tile refines a handful of cells at its last
depth), so on a GPU a batch of 128 may carry 6 inputs and the device idles. Here every input
advances its own HiPe run: its depths, thresholds, early stop and result are exactly those of
a run on its own, but each model call takes the pending rows of as many inputs as fit in
``batch_size``. The model is called once per batch on the concatenated rows, and each input's
``score`` reduces its slice of the model output to its own targets.

Each input's scores are its rows of the very same model outputs, so a model whose outputs do
not depend on the other rows of its batch (every CNN in eval mode) gives the same maps as
separate runs, up to the float rounding of a different batch shape.

Example
-------
>>> from wsi_hipe.hipe_many import hierarchical_perturbation_many
>>> results = hierarchical_perturbation_many(model, tiles, scores=score, batch_size=128)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wsi_hipe.config import Substrate, Threshold
from wsi_hipe.hipe import HipeResult, _begin, _Paste, _Run, _Windows, checked_scores

__all__ = ["hierarchical_perturbation_many"]

logger = logging.getLogger(__name__)

#: ``progress(input_index, depth, windows_done, windows_total)`` after each of its batches.
ManyProgress = Callable[[int, int, int, int], object]


@dataclass
class _Input:
    """One input's run and where its current depth stands."""

    index: int
    run: _Run
    paste: _Paste
    steps: object  # the generator of hipe._begin
    out_device: torch.device
    t_start: float
    seconds: float = 0.0  # time spent in its own steps, plus its share of the model calls
    depth: int = 0
    windows: _Windows | None = None
    next_row: int = 0  # next unscored row of [clean] + windows
    total: int = 0

    @property
    def key(self) -> tuple:
        """Inputs with the same key can share a batch (shape, dtype, device)."""
        x = self.run.x
        return tuple(x.shape), x.dtype, x.device

    def advance(self) -> bool:
        """Credit the scored depth and select the next one; False when the run is done."""
        t0 = time.perf_counter()
        step = next(self.steps, None)  # type: ignore[call-overload]
        self.seconds += time.perf_counter() - t0
        if step is None:
            return False
        self.depth, self.windows = step
        self.next_row = 0
        self.total = len(self.windows.boxes) + self.windows.with_clean
        return True


def hierarchical_perturbation_many(
    model: Callable[[torch.Tensor], torch.Tensor],
    xs: Sequence[torch.Tensor],
    *,
    scores: Callable | Sequence[Callable] | None = None,
    substrate: Substrate | Callable = "mean",
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
    progress: ManyProgress | None = None,
    return_exceptions: bool = False,
) -> list[HipeResult | Exception]:
    """Explain several inputs with Hierarchical Perturbation, sharing the model calls.

    Parameters
    ----------
    model : callable
        Maps a batch ``(B, C, *S)`` to an output whose first axis is the batch (logits, or
        scores). Called under ``torch.no_grad()`` with at most ``batch_size`` rows, drawn from
        any of the inputs; it must not modify the batch, nor keep it.
    xs : sequence of (C, *S) tensors
        The inputs. Inputs of one shape, dtype and device share model calls; others are
        batched among themselves.
    scores : callable or sequence of callables, optional
        Input ``i``'s score: maps its rows of the model output ``(b, ...)`` to ``(b,)`` or
        ``(b, K_i)`` scores (each input may have its own targets). One callable serves every
        input; None: the model's output already is the scores.
    substrate, threshold, batch_size, device, max_depth, min_cell_size, start_grid, \
blur_sigma, seed, stop_rtol, stop_atol, noise_rtol
        As for :func:`~wsi_hipe.hipe.hierarchical_perturbation`, the same for every input.
    progress : callable, optional
        ``progress(i, depth, windows_done, windows_total)`` after each batch that scored rows
        of input ``i``. Raise from it to cancel.
    return_exceptions : bool, optional
        True: an input whose run fails (e.g. non-finite scores) gets its exception in the
        result list and the others go on. False (default): the first failure is raised.

    Returns
    -------
    list of HipeResult (or Exception, with ``return_exceptions``)
        One per input, in order: the same result as ``hierarchical_perturbation`` on its own
        (``forward_passes`` counts the input's own rows; ``seconds`` is its share of the time).

    Raises
    ------
    ValueError
        As :func:`~wsi_hipe.hipe.hierarchical_perturbation`, or ``scores`` of the wrong length.
        An exception raised by ``model`` itself (or by ``progress``) is raised at once, for
        every input of its batch.
    """
    t_start = time.perf_counter()
    if callable(scores) or scores is None:
        reducers = [scores] * len(xs)
    else:
        reducers = list(scores)
        if len(reducers) != len(xs):
            raise ValueError(
                f"scores must be one callable or one per input: got {len(reducers)} for "
                f"{len(xs)} inputs"
            )
    results: list[HipeResult | Exception | None] = [None] * len(xs)
    pending: list[_Input] = []

    def fail(item: _Input, exc: Exception) -> None:
        if not return_exceptions:
            raise exc
        logger.debug("input %d failed: %s", item.index, exc)
        results[item.index] = exc

    def start_or_finish(item: _Input) -> None:
        try:
            if item.advance():
                pending.append(item)
            else:
                run = item.run
                results[item.index] = run.result(run.stop_reason, item.out_device, item.seconds)
        except Exception as exc:
            fail(item, exc)

    with torch.no_grad():
        for i, (x, reduce) in enumerate(zip(xs, reducers, strict=True)):
            forward = _forward(model, reduce)
            run, paste, steps, out_device = _begin(
                forward, x, substrate=substrate, threshold=threshold, batch_size=batch_size,
                device=device, max_depth=max_depth, min_cell_size=min_cell_size,
                start_grid=start_grid, blur_sigma=blur_sigma, seed=seed, stop_rtol=stop_rtol,
                stop_atol=stop_atol, noise_rtol=noise_rtol,
            )  # fmt: skip
            start_or_finish(_Input(i, run, paste, steps, out_device, t_start))
        buffers: dict[tuple, torch.Tensor] = {}
        calls = 0
        while pending:
            key = pending[0].key
            buf = buffers.get(key)
            if buf is None:
                x = pending[0].run.x
                buf = buffers[key] = torch.empty((batch_size, *x.shape), dtype=x.dtype,
                                                 device=x.device)  # fmt: skip
            t0 = time.perf_counter()
            segments = _fill(buf, [p for p in pending if p.key == key], batch_size)
            rows = sum(take for _, _, take, _ in segments)
            out = model(buf[:rows])
            calls += 1
            share = (time.perf_counter() - t0) / rows
            for item, start, take, r0 in segments:
                item.seconds += share * take
                reduce, part = reducers[item.index], out[r0 : r0 + take]
                try:
                    part = part if reduce is None else reduce(part)
                    item.run.store(start, checked_scores(part, take))
                except Exception as exc:
                    pending.remove(item)
                    fail(item, exc)
                    continue
                if progress is not None:
                    windows = item.windows
                    progress(item.index, item.depth, item.next_row - windows.with_clean,
                             len(windows.boxes))  # fmt: skip
                if item.next_row == item.total:
                    pending.remove(item)
                    start_or_finish(item)
        logger.debug(
            "%d inputs in %d model calls (%.2f s)", len(xs), calls, time.perf_counter() - t_start
        )
    return results  # type: ignore[return-value]


def _forward(model, reduce):
    """The single-input forward the run checks its options against (and never calls here)."""
    if reduce is None:
        return model
    return lambda batch: reduce(model(batch))


def _fill(buf: torch.Tensor, items: list[_Input], batch_size: int) -> list[tuple]:
    """Paste the next rows of ``items``, in order, into ``buf`` until it holds ``batch_size``.

    Returns ``(item, first row of its depth, rows taken, row in buf)`` per item that got rows;
    advances each item's ``next_row``. A row is the input itself, with one window pasted
    (row 0 of depth 1 is the clean input).
    """
    segments = []
    r = 0
    for item in items:
        if r == batch_size:
            break
        take = min(batch_size - r, item.total - item.next_row)
        windows, paste = item.windows, item.paste
        for k in range(take):
            j = item.next_row + k - windows.with_clean
            buf[r + k].copy_(item.run.x)
            if j >= 0:
                paste.into(buf, r + k, windows, j)
        segments.append((item, item.next_row, take, r))
        item.next_row += take
        r += take
    return segments
