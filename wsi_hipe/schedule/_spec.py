"""Scheduler specs (:func:`parse_scheduler`), default thread and retry counts, torch threads."""

from __future__ import annotations

import contextlib

from wsi_hipe.config import check_scheduler

#: torch intra-op threads per worker unless configured. CPU float reductions (matrix-vector
#: products, convolutions) may round differently with another thread count, so every scheduler
#: uses the same default: that is what makes outputs bit-identical across schedulers.
DEFAULT_TORCH_THREADS = 1

#: Extra tries of a task that raised (``schedule.retries``): at most 3 tries in all. A tile
#: that fails on every try is recorded as failed and retried by the next run.
DEFAULT_RETRIES = 2

_THREADS_SET: list[int] = []


# --- scheduler specs --------------------------------------------------------------------------


def parse_scheduler(spec: str, workers: int = 1) -> tuple[str, int, str | None]:
    """Normalise a scheduler spec.

    Parameters
    ----------
    spec : str
        A :data:`wsi_hipe.config.SchedulerName` (``"sync"``, ``"threads"``, ``"processes"``,
        ``"local"``, ``"slurm"``, ``"pbs"``, ``"lsf"``), ``"local:N"`` or ``"tcp://host:port"``
        (:func:`wsi_hipe.config.check_scheduler`).
    workers : int
        Worker count for specs that do not carry one.

    Returns
    -------
    kind : {"sync", "threads", "processes", "local", "tcp", "slurm", "pbs", "lsf"}
    workers : int
        1 for ``sync``; N for ``local:N``; ``workers`` otherwise (for ``tcp`` and the batch
        systems, the number used to size the in-flight window until the cluster reports its
        own).
    address : str or None
        The scheduler address for ``tcp``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    try:
        check_scheduler(spec)  # the grammar: wsi_hipe.config.SchedulerName, local:N, tcp://...
    except ValueError as exc:
        raise ValueError(f"scheduler {exc}") from None
    if spec.startswith("tcp://"):
        return "tcp", workers, spec
    kind, _, count = spec.partition(":")
    if kind == "sync":
        return "sync", 1, None
    return kind, int(count) if count else workers, None


# --- torch threads ----------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run a block with ``threads`` torch intra-op threads, restoring the setting afterwards.

    ``None`` leaves the setting alone. The setting is process-wide: other threads running
    torch meanwhile are affected too.
    """
    if threads is None:
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _set_torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads once per process (no-op for None)."""
    if threads is None or (_THREADS_SET and _THREADS_SET[0] == threads):
        return
    import torch

    torch.set_num_threads(threads)
    _THREADS_SET[:] = [threads]
