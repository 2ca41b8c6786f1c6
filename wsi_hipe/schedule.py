"""Run independent tasks (tiles) on a Dask scheduler with a bounded number in flight.

The pipeline hands :meth:`TaskRunner.map` a picklable function and an iterable of small task
descriptions (a tile, a slide *path*, options); results come back to the caller, which writes
them. Heavy objects that every task needs (the model) travel once per worker through
``shared=`` and are cached per process with :func:`worker_cache`.

Schedulers (``spec``):

========================  ==============================================================
``"sync"``                Dask's synchronous scheduler, in the calling thread (debugging).
``"threads"``             Dask's threaded scheduler, ``workers`` threads in this process.
``"processes"``           Dask's multiprocessing scheduler on a pool of ``workers`` spawned
                          processes that lives as long as the runner (model loaded once per
                          process).
``"local"``/``"local:N"`` A ``distributed.LocalCluster`` of N single-threaded worker
                          processes (N = ``workers`` for ``"local"``).
``"tcp://host:port"``     Join a running ``distributed`` scheduler.
========================  ==============================================================

Memory stays flat whatever the number of tasks: the local schedulers compute bounded batches
of ``max_in_flight`` tasks with ``dask.delayed``; ``distributed`` keeps at most
``max_in_flight`` futures alive (``as_completed`` with a sliding window). With ``gpu=True`` the
distributed tasks ask for ``resources={"GPU": 1}`` and a LocalCluster offers one GPU per
worker.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

from wsi_hipe.cache import ProcessCache
from wsi_hipe.config import check_scheduler

__all__ = [
    "TaskRunner",
    "parse_scheduler",
    "worker_cache",
    "clear_worker_cache",
    "torch_threads",
    "DEFAULT_TORCH_THREADS",
]

#: torch intra-op threads per worker unless configured. CPU float reductions (matrix-vector
#: products, convolutions) may round differently with another thread count, so every scheduler
#: uses the same default: that is what makes outputs bit-identical across schedulers.
DEFAULT_TORCH_THREADS = 1

logger = logging.getLogger(__name__)

_THREADS_SET: list[int] = []

#: What tasks load once per worker process (the model, keyed by its path and hash; a slide,
#: keyed by its path and options). Evicted values are closed (a slide's file handle).
_WORKER_CACHE: ProcessCache[Any] = ProcessCache("worker", maxsize=8, close_evicted=True)


def worker_cache(key: Hashable, factory: Callable[[], Any]) -> Any:
    """Return the object cached under ``key`` in this process, building it once with ``factory``.

    Used inside tasks for what must be loaded once per worker (the model, keyed by its path
    and hash) or opened once per worker (a slide, keyed by its path and options). A thin use
    of one :class:`wsi_hipe.cache.ProcessCache`: thread-safe (concurrent callers with the same
    key wait for one build), per process, at most 8 objects (the least recently used one is
    dropped and closed).
    """
    return _WORKER_CACHE.get(key, factory)


def clear_worker_cache() -> None:
    """Drop every object cached by :func:`worker_cache` in this process (closing slides)."""
    _WORKER_CACHE.clear()


def parse_scheduler(spec: str, workers: int = 1) -> tuple[str, int, str | None]:
    """Normalise a scheduler spec.

    Parameters
    ----------
    spec : str
        A :data:`wsi_hipe.config.SchedulerName` (``"sync"``, ``"threads"``, ``"processes"``,
        ``"local"``), ``"local:N"`` or ``"tcp://host:port"`` (:func:`wsi_hipe.config.check_scheduler`).
    workers : int
        Worker count for specs that do not carry one.

    Returns
    -------
    kind : {"sync", "threads", "processes", "local", "tcp"}
    workers : int
        1 for ``sync``; N for ``local:N``; ``workers`` otherwise (for ``tcp``, the number used
        to size the in-flight window until the cluster reports its own).
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


def _call(fn: Callable[..., Any], item: Any, shared: Mapping[str, Any], threads: int | None):
    """The task body run by every scheduler: fix torch threads, then call ``fn``."""
    _set_torch_threads(threads)
    return fn(item, **shared)


def _process_initializer(threads: int | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or 1))
    _set_torch_threads(threads)


class TaskRunner:
    """A Dask scheduler, started once and used for many :meth:`map` calls.

    Parameters
    ----------
    spec : str
        See the module docstring.
    workers : int
        Worker threads/processes (ignored by ``sync``; ``local:N`` wins).
    max_in_flight : int, optional
        Tasks submitted and not yet returned; default 2 × workers.
    threads_per_worker : int, optional
        torch intra-op threads per worker (for ``sync`` and ``threads``: of this process while
        the runner is open; restored by :meth:`close`). Default
        :data:`DEFAULT_TORCH_THREADS` (1) for every scheduler, so that all of them give
        bit-identical results; more threads can be faster with ``sync`` on a many-core CPU
        but may change the last bits of the saliency.
    gpu : bool
        Distributed tasks request ``resources={"GPU": 1}`` (a LocalCluster advertises one GPU
        per worker).

    Use as a context manager (``with TaskRunner("local:2") as runner: ...``) so that pools and
    clusters are shut down.
    """

    def __init__(
        self,
        spec: str = "sync",
        *,
        workers: int = 1,
        max_in_flight: int | None = None,
        threads_per_worker: int | None = None,
        gpu: bool = False,
    ) -> None:
        self.kind, self.workers, self.address = parse_scheduler(spec, workers)
        self.spec = spec
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        self._max_in_flight = max_in_flight
        self.gpu = bool(gpu)
        if threads_per_worker is None:
            threads_per_worker = DEFAULT_TORCH_THREADS
        if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
            raise ValueError(
                f"threads_per_worker must be a positive integer, got {threads_per_worker!r}"
            )
        self.threads_per_worker = threads_per_worker
        self._pool: Any = None
        self._client: Any = None
        self._cluster: Any = None
        self._saved_threads: int | None = None
        self._started = False

    # -- life cycle ---------------------------------------------------------------------

    @property
    def max_in_flight(self) -> int:
        """Tasks allowed in flight (default 2 × workers)."""
        return self._max_in_flight or 2 * self.workers

    @property
    def remote(self) -> bool:
        """Tasks run in other processes (``processes``, ``local``, ``tcp``): what they need must
        pickle, and a model is best loaded there from its file (:func:`worker_cache`)."""
        return self.kind in ("processes", "local", "tcp")

    def start(self) -> TaskRunner:
        """Start pools or the cluster (done lazily by :meth:`map` otherwise)."""
        if self._started:
            return self
        if self.kind in ("sync", "threads"):
            import torch

            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads_per_worker)
        if self.kind == "threads":
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="wsi-hipe")
        elif self.kind == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_process_initializer,
                initargs=(self.threads_per_worker,),
            )
        elif self.kind == "local":
            from distributed import Client, LocalCluster

            self._cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                resources={"GPU": 1} if self.gpu else None,
            )
            self._client = Client(self._cluster)
            logger.info("started a LocalCluster of %d workers", self.workers)
        elif self.kind == "tcp":
            from distributed import Client

            self._client = Client(self.address)
            workers = self._client.scheduler_info().get("workers", {})
            n = len(workers)
            if n:
                self.workers = n
            if self.gpu and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
                logger.warning(
                    "no worker of %s offers a 'GPU' resource (start them with "
                    "--resources GPU=1); tasks are submitted without resource restrictions",
                    self.address,
                )
                self.gpu = False
            logger.info("joined the Dask cluster at %s (%d workers)", self.address, n)
        self._started = True
        return self

    def close(self) -> None:
        """Shut down what :meth:`start` started (an external cluster is only disconnected)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        self._started = False

    def __enter__(self) -> TaskRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TaskRunner({self.spec!r}, workers={self.workers}, "
            f"max_in_flight={self.max_in_flight}, gpu={self.gpu})"
        )

    # -- work -----------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Run ``fn(item, **shared)`` for every item; yield ``(item, result)`` as they finish.

        Parameters
        ----------
        fn : callable
            A module-level (picklable) function. Exceptions it raises propagate to the
            caller (after outstanding tasks are cancelled); a task that may fail for a single
            item should return its failure instead.
        items : iterable
            Small, picklable task descriptions; consumed lazily, so at most
            :attr:`max_in_flight` are outstanding at any time.
        shared : mapping, optional
            Keyword arguments common to every task (e.g. the model). Sent once per worker for
            ``distributed`` (scattered with ``broadcast=True``); process pools pickle them with
            each batch, so prefer small references (a model path) there.

        Yields
        ------
        (item, result)
            In completion order for ``distributed``, in submission order otherwise.
        """
        self.start()
        shared = dict(shared or {})
        if self.kind in ("local", "tcp"):
            yield from self._map_distributed(fn, items, shared)
        else:
            yield from self._map_local(fn, items, shared)

    def _map_local(self, fn, items, shared) -> Iterator[tuple[Any, Any]]:
        import dask

        iterator = iter(items)
        threads = self.threads_per_worker if self.kind == "processes" else None
        while True:
            batch = list(itertools.islice(iterator, self.max_in_flight))
            if not batch:
                return
            tasks = [dask.delayed(_call, pure=False)(fn, item, shared, threads) for item in batch]
            if self.kind == "sync":
                results = dask.compute(*tasks, scheduler="sync")
            else:
                results = dask.compute(
                    *tasks,
                    scheduler="threads" if self.kind == "threads" else "processes",
                    pool=self._pool,
                    num_workers=self.workers,
                )
            yield from zip(batch, results, strict=True)

    def _map_distributed(self, fn, items, shared) -> Iterator[tuple[Any, Any]]:
        from distributed import as_completed

        client = self._client
        scattered = {}
        for name, value in shared.items():
            scattered[name] = client.scatter(value, broadcast=True, hash=False)
        submit_kw: dict[str, Any] = {"pure": False}
        if self.gpu:
            submit_kw["resources"] = {"GPU": 1}
        iterator = iter(items)
        pending: dict[Any, Any] = {}
        queue = as_completed()

        def submit_next() -> bool:
            try:
                item = next(iterator)
            except StopIteration:
                return False
            fut = client.submit(_call, fn, item, scattered, self.threads_per_worker, **submit_kw)
            pending[fut.key] = (item, fut)
            queue.add(fut)
            return True

        try:
            for _ in range(self.max_in_flight):
                if not submit_next():
                    break
            for fut in queue:
                item, _ = pending.pop(fut.key)
                result = fut.result()
                fut.release()
                yield item, result
                submit_next()
        finally:
            if pending:
                client.cancel([f for _, f in pending.values()])
            for value in scattered.values():
                try:
                    value.release()
                except Exception:
                    logger.debug("releasing a scattered object failed", exc_info=True)
