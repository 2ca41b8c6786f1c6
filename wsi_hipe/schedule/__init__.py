"""Run independent tasks (tiles) on a Dask scheduler, streaming, with retries and faults survived.

The pipeline hands :meth:`TaskRunner.map` a picklable function and an iterable of small task
descriptions (a tile, a slide *path*, options); results come back to the caller, which writes
them. Heavy objects that every task needs (the model) travel once per worker through
``shared=`` and are cached per process with :func:`worker_cache`.

Schedulers (``spec``):

========================  ==============================================================
``"sync"``                In the calling thread, one task at a time (debugging).
``"threads"``             A pool of ``workers`` threads in this process.
``"processes"``           A pool of ``workers`` spawned processes that lives as long as the
                          runner (the model is built once per process).
``"local"``/``"local:N"`` A local ``distributed`` cluster of N worker processes (N =
                          ``workers`` for ``"local"``): 1 thread each on the CPU; with
                          ``gpu=True`` each worker is pinned to one GPU
                          (:func:`gpu_worker_env`) and has :data:`GPU_WORKER_THREADS` threads.
``"tcp://host:port"``     Join a running ``distributed`` scheduler (``dask scheduler`` /
                          ``dask worker``).
``"slurm"``/``"pbs"``/``"lsf"``  Workers as batch jobs through dask-jobqueue
                          (``schedule.jobqueue``; :func:`jobqueue_cluster`, docs/cluster.md).
========================  ==============================================================

Streaming, on every scheduler
-----------------------------
:meth:`TaskRunner.map` keeps a sliding window of at most :attr:`TaskRunner.max_in_flight`
tasks submitted and yields each result as soon as it completes (``as_completed``), so the
caller writes it at once: no task waits for another, memory stays bounded by the window, and a
failing task loses only itself. A task that raises is run again up to ``retries`` more times
(default :data:`DEFAULT_RETRIES`, i.e. at most 3 tries; for distributed schedulers Dask's own
``retries=``); a worker process that dies (``kill -9``, out of memory) has its tasks re-run on
the other workers by Dask itself. With ``errors="return"`` a task that failed on every try is
yielded as a :class:`TaskError` and the rest go on; the default ``"raise"`` re-raises it.
When the connection to a distributed scheduler is lost, :class:`SchedulerLostError` is raised:
results already yielded are the caller's to keep (the pipeline has written them, so a rerun
resumes).

Models on workers (CPU and GPU alike)
-------------------------------------
A model reaches remote workers as a :class:`ShippedModel`: its weights on the CPU and its
description (pickled once in the parent, CUDA tensors copied to host memory first, TorchScript
as a TorchScript archive), and the device it should run on. Each worker process unpacks it
once and moves it to its own device (:func:`worker_cache`), so a CUDA tensor never goes
through distributed's serializers, and a parent process that only schedules need not hold a
GPU copy. Distributed schedulers scatter it once per worker (and once per runner, whatever the
number of :meth:`map` calls); the ``processes`` pool receives a path to a file written once,
not the model with every task.
"""

from __future__ import annotations

from wsi_hipe.schedule._cache import clear_worker_cache, worker_cache
from wsi_hipe.schedule._gpu import (
    GPU_WORKER_THREADS,
    gpu_worker_env,
    local_worker_specs,
    visible_gpus,
)
from wsi_hipe.schedule._jobqueue import job_script, jobqueue_cluster
from wsi_hipe.schedule._runner import (
    OnError,  # noqa: F401 - not in __all__: a type alias the pipeline imports
    Runner,
    SchedulerLostError,
    TaskError,
    TaskRunner,
)
from wsi_hipe.schedule._ship import ShippedModel, WorkerValue, ship_model
from wsi_hipe.schedule._spec import (
    DEFAULT_RETRIES,
    DEFAULT_TORCH_THREADS,
    parse_scheduler,
    torch_threads,
)

__all__ = [
    "TaskRunner",
    "Runner",
    "TaskError",
    "SchedulerLostError",
    "WorkerValue",
    "ShippedModel",
    "ship_model",
    "parse_scheduler",
    "worker_cache",
    "clear_worker_cache",
    "torch_threads",
    "visible_gpus",
    "gpu_worker_env",
    "local_worker_specs",
    "jobqueue_cluster",
    "job_script",
    "DEFAULT_TORCH_THREADS",
    "DEFAULT_RETRIES",
    "GPU_WORKER_THREADS",
]
