"""The :class:`TaskRunner`: streaming map, retries, failed tasks, a lost scheduler."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from wsi_hipe.config import JOBQUEUE_SCHEDULERS, JobqueueConfig
from wsi_hipe.errors import ConfigError, WsiHipeError
from wsi_hipe.schedule._gpu import GPU_WORKER_THREADS, local_worker_specs, visible_gpus
from wsi_hipe.schedule._jobqueue import _SUBMIT_COMMANDS, jobqueue_cluster
from wsi_hipe.schedule._ship import WorkerValue, _Spilled
from wsi_hipe.schedule._spec import (
    DEFAULT_RETRIES,
    DEFAULT_TORCH_THREADS,
    _set_torch_threads,
    parse_scheduler,
)

#: How :meth:`TaskRunner.map` treats a task that failed on every try.
OnError = Literal["raise", "return"]

logger = logging.getLogger("wsi_hipe.schedule")  # one logger for the package, as before the split


class SchedulerLostError(WsiHipeError, ConnectionError):
    """The connection to the Dask scheduler was lost mid-run (the scheduler died or the network
    went). Results returned before it are kept; rerunning against a live scheduler resumes."""


@dataclass(frozen=True)
class TaskError:
    """A task that raised on every try (:meth:`TaskRunner.map` with ``errors="return"``).

    Attributes
    ----------
    error : str
        ``"ExceptionType: message"`` of the last try.
    attempts : int
        Tries made (1 + retries), or fewer when Dask gave up on a task whose workers kept
        dying (``KilledWorker``).
    """

    error: str
    attempts: int

    @classmethod
    def of(cls, exc: BaseException, attempts: int) -> TaskError:
        return cls(f"{type(exc).__name__}: {exc}", attempts)


def _call(fn: Callable[..., Any], item: Any, shared: Mapping[str, Any], threads: int | None):
    """The task body run by every scheduler: fix torch threads, build the worker values, call."""
    _set_torch_threads(threads)
    kwargs = {k: v.get() if isinstance(v, WorkerValue) else v for k, v in shared.items()}
    return fn(item, **kwargs)


def _process_initializer(threads: int | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or 1))
    _set_torch_threads(threads)


# --- the runner -------------------------------------------------------------------------------


class Runner(Protocol):
    """What the pipeline needs of a runner: :class:`TaskRunner`, or a view of one that the
    batch gives each slide (so that one cluster runs several slides' tiles at once)."""

    @property
    def remote(self) -> bool: ...

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Mapping[str, Any] | None = None,
        errors: OnError = "raise",
    ) -> Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...


class TaskRunner:
    """A Dask scheduler, started once and used for many :meth:`map` calls.

    Parameters
    ----------
    spec : str
        See the module docstring.
    workers : int
        Worker threads/processes (ignored by ``sync``; ``local:N`` wins); for the batch
        systems, the in-flight window until workers have joined.
    max_in_flight : int, optional
        Tasks submitted and not yet returned, per :meth:`map` call; default 2 × the worker
        threads (for distributed schedulers: of the workers connected when a task is
        submitted, so the window grows as an adaptive cluster scales up).
    threads_per_worker : int, optional
        torch intra-op threads per worker (for ``sync`` and ``threads``: of this process while
        the runner is open; restored by :meth:`close`). Default
        :data:`DEFAULT_TORCH_THREADS` (1) for every scheduler, so that all of them give
        bit-identical results; more threads can be faster with ``sync`` on a many-core CPU
        but may change the last bits of the saliency.
    gpu : bool
        Tasks run on GPUs: distributed tasks request ``resources={"GPU": 1}``; a local
        cluster pins each worker to one GPU and gives it :data:`GPU_WORKER_THREADS` threads.
    retries : int
        Extra tries of a task that raised (default :data:`DEFAULT_RETRIES`).
    jobqueue : JobqueueConfig or mapping, optional
        ``schedule.jobqueue`` for ``slurm``/``pbs``/``lsf``.

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
        retries: int = DEFAULT_RETRIES,
        jobqueue: JobqueueConfig | Mapping[str, Any] | None = None,
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
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        self.threads_per_worker = threads_per_worker
        self.retries = retries
        if jobqueue is not None and not isinstance(jobqueue, JobqueueConfig):
            jobqueue = JobqueueConfig(**dict(jobqueue))
        self.jobqueue = jobqueue
        if self.kind in JOBQUEUE_SCHEDULERS:
            command = _SUBMIT_COMMANDS[self.kind]
            if shutil.which(command) is None:
                raise ConfigError(
                    f"scheduler {self.kind!r} submits Dask workers as batch jobs with "
                    f"{command!r}, which is not on the PATH: run on a login node of the cluster "
                    "(see docs/cluster.md)"
                )
        if self.kind == "local" and self.gpu and not visible_gpus():
            raise ConfigError(
                "GPU workers were asked for (a CUDA device) but this machine shows no GPU "
                "(CUDA_VISIBLE_DEVICES is empty or CUDA is unavailable); use the device "
                "'cpu' or 'auto'"
            )
        self._pool: Any = None
        self._client: Any = None
        self._cluster: Any = None
        self._saved_threads: int | None = None
        self._spill_dir: str | None = None
        self._spilled: dict[Hashable, _Spilled] = {}
        self._scattered: dict[Hashable, Any] = {}
        self._slots_seen: tuple[float, int] = (0.0, 0)
        self._scheduler_lost = False
        self._started = False

    # -- life cycle ---------------------------------------------------------------------

    @property
    def max_in_flight(self) -> int:
        """Tasks allowed in flight per :meth:`map` (default 2 × worker threads)."""
        return self._max_in_flight or 2 * self._slots()

    @property
    def distributed(self) -> bool:
        """Tasks go through a ``distributed`` scheduler (``local``, ``tcp``, batch systems)."""
        return self.kind in ("local", "tcp", *JOBQUEUE_SCHEDULERS)

    @property
    def remote(self) -> bool:
        """Tasks run in other processes (``processes``, ``local``, ``tcp``, batch systems):
        what they need must pickle, and a model travels as a :class:`ShippedModel`."""
        return self.kind == "processes" or self.distributed

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` of a started distributed runner (else None)."""
        return self._client

    def _slots(self) -> int:
        """Task threads to fill: worker threads of the cluster (refreshed every 2 s)."""
        per_worker = GPU_WORKER_THREADS if (self.gpu and self.kind == "local") else 1
        configured = self.workers * per_worker
        if self._client is None or self.kind == "local":
            return configured
        now = time.monotonic()
        seen_at, seen = self._slots_seen
        if now - seen_at > 2.0:
            try:
                seen = sum(self._client.nthreads().values())
            except Exception:  # the scheduler is gone: map() reports it
                seen = 0
            self._slots_seen = (now, seen)
        return max(configured, seen)

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
            self._pool = self._process_pool()
        elif self.kind == "local":
            self._start_local()
        elif self.kind == "tcp":
            self._join(self.address)
        elif self.kind in JOBQUEUE_SCHEDULERS:
            self._start_jobqueue()
        self._started = True
        return self

    def _process_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_process_initializer,
            initargs=(self.threads_per_worker,),
        )

    def _start_local(self) -> None:
        from distributed import Client, Scheduler, SpecCluster

        self._cluster = SpecCluster(
            workers=local_worker_specs(self.workers, gpu=self.gpu),
            scheduler={
                "cls": Scheduler,
                "options": {"host": "127.0.0.1", "dashboard_address": None},
            },
            silence_logs=logging.ERROR,
            name="wsi-hipe",
        )
        self._client = Client(self._cluster)
        self._client.wait_for_workers(self.workers, timeout=120)
        logger.info(
            "started a local cluster of %d %s worker(s)", self.workers, "GPU" if self.gpu else "CPU"
        )

    def _join(self, address: str) -> None:
        from distributed import Client

        try:
            self._client = Client(address, timeout=30)
        except OSError as exc:
            raise SchedulerLostError(
                f"cannot reach the Dask scheduler at {address} ({exc}); start one "
                "('dask scheduler') or check the address"
            ) from None
        workers = self._client.scheduler_info().get("workers", {})
        n = len(workers)
        if n:
            self.workers = n
        if self.gpu and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
            logger.warning(
                "no worker of %s offers a 'GPU' resource (start them with "
                "--nthreads %d --resources GPU=%d); tasks are submitted without resource "
                "restrictions",
                address,
                GPU_WORKER_THREADS,
                GPU_WORKER_THREADS,
            )
            self.gpu = False
        logger.info("joined the Dask cluster at %s (%d workers)", address, n)

    def _start_jobqueue(self) -> None:
        from distributed import Client

        cfg = self.jobqueue or JobqueueConfig()
        self._cluster = jobqueue_cluster(self.kind, cfg, gpu=self.gpu)
        self._cluster.adapt(minimum_jobs=cfg.minimum_jobs, maximum_jobs=cfg.maximum_jobs)
        self._client = Client(self._cluster)
        self.workers = max(1, cfg.maximum_jobs * cfg.processes)
        logger.info(
            "started a %s cluster (%d to %d jobs); dashboard %s",
            self.kind,
            cfg.minimum_jobs,
            cfg.maximum_jobs,
            getattr(self._cluster, "dashboard_link", "-"),
        )

    def close(self) -> None:
        """Shut down what :meth:`start` started (an external cluster is only disconnected)."""
        for value in self._scattered.values():
            with contextlib.suppress(Exception):
                value.release()
        self._scattered.clear()
        if self._client is not None:
            # After a lost scheduler, closing cancels the client's reconnection attempts,
            # which distributed logs as an error with a traceback: the run says it once.
            quiet = _quiet("distributed.client") if self._scheduler_lost else _noop()
            try:
                with quiet:
                    self._client.close(timeout=10)
            except Exception:  # a lost scheduler: nothing left to close
                logger.debug("closing the Dask client failed", exc_info=True)
            self._client = None
        if self._cluster is not None:
            try:
                self._cluster.close(timeout=30)
            except Exception:
                logger.debug("closing the Dask cluster failed", exc_info=True)
            self._cluster = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
            self._spilled.clear()
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
            f"max_in_flight={self.max_in_flight}, gpu={self.gpu}, retries={self.retries})"
        )

    # -- work -----------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Mapping[str, Any] | None = None,
        errors: OnError = "raise",
    ) -> Iterator[tuple[Any, Any]]:
        """Run ``fn(item, **shared)`` for every item; yield ``(item, result)`` as each finishes.

        Parameters
        ----------
        fn : callable
            A module-level (picklable) function.
        items : iterable
            Small, picklable task descriptions; consumed lazily, so at most
            :attr:`max_in_flight` are outstanding at any time.
        shared : mapping, optional
            Keyword arguments common to every task. A :class:`WorkerValue` (e.g. a
            :class:`ShippedModel`) is built once per worker process and its result passed;
            distributed schedulers scatter it once per worker and runner, the process pool
            reads it from a file written once. Other values travel with each task (process
            pool) or once per :meth:`map` call (distributed): keep them small.
        errors : {"raise", "return"}
            A task that raised on every try (1 + ``retries``): ``"raise"`` re-raises its
            exception (after outstanding tasks are cancelled); ``"return"`` yields
            ``(item, TaskError)`` and goes on.

        Yields
        ------
        (item, result)
            In completion order (``sync``: in order).

        Raises
        ------
        SchedulerLostError
            The distributed scheduler went away; results yielded so far stand.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        self.start()
        shared = dict(shared or {})
        if self.distributed:
            yield from self._map_distributed(fn, items, shared, errors)
        elif self.kind == "sync":
            yield from self._map_sync(fn, items, shared, errors)
        else:
            yield from self._map_pool(fn, items, shared, errors)

    def _failed(self, item: Any, exc: BaseException, attempts: int, errors: OnError):
        if errors == "raise":
            raise exc
        logger.warning("task %r failed after %d tries: %s", item, attempts, exc)
        return item, TaskError.of(exc, attempts)

    def _map_sync(self, fn, items, shared, errors) -> Iterator[tuple[Any, Any]]:
        for item in items:
            for attempt in range(1, self.retries + 2):
                try:
                    result = _call(fn, item, shared, None)
                except Exception as exc:
                    if attempt <= self.retries:
                        logger.info("task %r failed (try %d), retrying: %s", item, attempt, exc)
                        continue
                    yield self._failed(item, exc, attempt, errors)
                else:
                    yield item, result
                break

    def _spill(self, shared: dict[str, Any]) -> dict[str, Any]:
        """Worker values written once to files, so a process pool's tasks carry only paths."""
        out = {}
        for name, value in shared.items():
            if not isinstance(value, WorkerValue):
                out[name] = value
                continue
            if value.key not in self._spilled:
                if self._spill_dir is None:
                    self._spill_dir = tempfile.mkdtemp(prefix="wsi-hipe-shared-")
                path = Path(self._spill_dir) / f"{len(self._spilled)}.pickle"
                with open(path, "wb") as handle:
                    pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
                self._spilled[value.key] = _Spilled(str(path), value.key)
            out[name] = self._spilled[value.key]
        return out

    def _map_pool(self, fn, items, shared, errors) -> Iterator[tuple[Any, Any]]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        threads = None
        if self.kind == "processes":
            threads = self.threads_per_worker
            shared = self._spill(shared)
        iterator = iter(items)
        pending: dict[Any, tuple[int, Any, int, Any]] = {}  # future -> (seq, item, tries, pool)
        counter = itertools.count()

        def submit(item: Any, tries: int) -> None:
            fut = self._pool.submit(_call, fn, item, shared, threads)
            pending[fut] = (next(counter), item, tries, self._pool)

        def fill() -> None:
            while len(pending) < self.max_in_flight:
                item = next(iterator, _END)
                if item is _END:
                    return
                submit(item, 1)

        try:
            fill()
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f][0]):
                    _, item, tries, pool = pending.pop(fut)
                    exc = fut.exception()
                    if isinstance(exc, BrokenProcessPool) and pool is self._pool:
                        # A worker process died: the pool is unusable. Start a new one; its
                        # tasks run again there (each loss counts as a try).
                        logger.warning("a worker process died; restarting the process pool")
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._pool = self._process_pool()
                    if exc is None:
                        yield item, fut.result()
                    elif tries <= self.retries:
                        logger.info("task %r failed (try %d), retrying: %s", item, tries, exc)
                        submit(item, tries + 1)
                    else:
                        yield self._failed(item, exc, tries, errors)
                fill()
        finally:
            for fut in pending:
                fut.cancel()

    def _scatter(self, shared: dict[str, Any]) -> dict[str, Any]:
        """Worker values scattered once per runner (every worker gets a copy); the rest as is."""
        client = self._client
        out = {}
        for name, value in shared.items():
            if isinstance(value, WorkerValue):
                if value.key not in self._scattered:
                    self._scattered[value.key] = client.scatter(value, broadcast=True, hash=False)
                out[name] = self._scattered[value.key]
            else:
                out[name] = value
        return out

    def _map_distributed(self, fn, items, shared, errors) -> Iterator[tuple[Any, Any]]:
        from distributed import as_completed

        client = self._client
        try:
            shared = self._scatter(shared)
        except (OSError, TimeoutError) as exc:
            raise self._lost(exc) from None
        submit_kw: dict[str, Any] = {"pure": False, "retries": self.retries}
        if self.gpu:
            submit_kw["resources"] = {"GPU": 1}
        iterator = iter(items)
        pending: dict[str, tuple[Any, Any]] = {}
        queue = as_completed()

        def fill() -> None:
            while len(pending) < self.max_in_flight:
                item = next(iterator, _END)
                if item is _END:
                    return
                try:
                    fut = client.submit(
                        _call, fn, item, shared, self.threads_per_worker, **submit_kw
                    )
                except Exception as exc:
                    if client.status != "running":
                        raise self._lost(exc) from None
                    raise
                pending[fut.key] = (item, fut)
                queue.add(fut)

        try:
            fill()
            for fut in queue:
                item, _ = pending.pop(fut.key)
                if fut.status == "finished":
                    try:
                        result = fut.result()
                    except (OSError, TimeoutError) as exc:  # fetching it: the scheduler is gone
                        raise self._lost(exc) from None
                    fut.release()
                    yield item, result
                elif fut.status == "cancelled" or client.status != "running":
                    raise self._lost(None)
                else:
                    exc = fut.exception()
                    fut.release()
                    # Dask re-ran it `retries` times; a KilledWorker means its workers kept dying.
                    yield self._failed(item, exc, 1 + self.retries, errors)
                fill()
            if pending:  # as_completed ended early: the scheduler went away
                raise self._lost(None)
        finally:
            if pending and client.status == "running":
                with contextlib.suppress(Exception):
                    client.cancel([f for _, f in pending.values()])

    def _lost(self, exc: BaseException | None) -> SchedulerLostError:
        self._scheduler_lost = True
        where = self.address or getattr(self._cluster, "scheduler_address", None) or self.spec
        detail = f" ({exc})" if exc is not None else ""
        return SchedulerLostError(
            f"lost the Dask scheduler at {where}{detail}; the tiles finished before it are "
            "written and kept: start a scheduler and workers again and rerun the same call "
            "to resume"
        )


_END = object()


@contextlib.contextmanager
def _quiet(name: str):
    """Silence the logger ``name`` for a block."""
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(saved)


_noop = contextlib.nullcontext
