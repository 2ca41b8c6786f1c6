"""Workers as batch jobs through dask-jobqueue (SLURM, PBS, LSF)."""

from __future__ import annotations

from wsi_hipe.config import JOBQUEUE_SCHEDULERS, JobqueueConfig
from wsi_hipe.errors import ConfigError
from wsi_hipe.schedule._gpu import GPU_WORKER_THREADS

#: The command each batch system's scheduler uses to submit jobs (checked on the PATH).
_SUBMIT_COMMANDS = {"slurm": "sbatch", "pbs": "qsub", "lsf": "bsub"}


# --- batch systems (dask-jobqueue) ------------------------------------------------------------


def _jobqueue_class(kind: str):
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(
            f"scheduler {kind!r} needs dask-jobqueue: pip install 'wsi-hipe[cluster]' "
            "(see docs/cluster.md)"
        ) from None
    return {
        "slurm": dask_jobqueue.SLURMCluster,
        "pbs": dask_jobqueue.PBSCluster,
        "lsf": dask_jobqueue.LSFCluster,
    }[kind]


def jobqueue_cluster(kind: str, config: JobqueueConfig | None = None, *, gpu: bool = False):
    """A dask-jobqueue cluster (``SLURMCluster``, ``PBSCluster``, ``LSFCluster``), not scaled.

    Parameters
    ----------
    kind : {"slurm", "pbs", "lsf"}
    config : JobqueueConfig, optional
        ``schedule.jobqueue``: cores, memory, walltime, queue, account, job directives (GPUs:
        e.g. ``--gres=gpu:1``), prologue. Default all defaults.
    gpu : bool
        Workers offer ``GPU`` resource slots (tasks that run on a GPU ask for one).

    Starting the cluster starts its scheduler in this process; jobs are submitted only when
    it is scaled (:class:`TaskRunner` does that: ``adapt`` between ``minimum_jobs`` and
    ``maximum_jobs``).
    """
    if kind not in JOBQUEUE_SCHEDULERS:
        raise ValueError(f"kind must be one of {list(JOBQUEUE_SCHEDULERS)}, got {kind!r}")
    cfg = config or JobqueueConfig()
    cls = _jobqueue_class(kind)
    return cls(**cfg.cluster_kwargs(gpu=gpu, threads=GPU_WORKER_THREADS if gpu else None))


def job_script(kind: str, config: JobqueueConfig | None = None, *, gpu: bool = False) -> str:
    """The job script the batch system would get for each worker job (dask-jobqueue's
    ``job_script()``); nothing is submitted, and ``sbatch`` need not exist."""
    cluster = jobqueue_cluster(kind, config, gpu=gpu)
    try:
        return cluster.job_script()
    finally:
        cluster.close()
