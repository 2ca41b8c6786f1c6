"""GPU pinning of local workers (pure functions: tested without a GPU)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

#: Task threads of a GPU worker: one tile reads its pixels and sends back its result while the
#: other keeps the GPU busy.
GPU_WORKER_THREADS = 2

logger = logging.getLogger("wsi_hipe.schedule")  # one logger for the package, as before the split


# --- GPU pinning (pure functions: tested without a GPU) ----------------------------------------


def visible_gpus(
    environ: Mapping[str, str] | None = None, device_count: int | None = None
) -> list[str]:
    """The GPUs this process may hand to workers, as ``CUDA_VISIBLE_DEVICES`` entries.

    Parameters
    ----------
    environ : mapping, optional
        Default ``os.environ``. A set ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, comma
        separated) is the list; an empty one means no GPU.
    device_count : int, optional
        GPUs when ``CUDA_VISIBLE_DEVICES`` is unset; default ``torch.cuda.device_count()``.
    """
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


def gpu_worker_env(index: int, gpus: Sequence[str]) -> dict[str, str]:
    """The environment that pins GPU worker ``index`` to one GPU of ``gpus``.

    Worker ``i`` sees only ``gpus[i % len(gpus)]`` (as its ``cuda:0``): round robin, so
    workers share GPUs only when there are more workers than GPUs.

    Raises
    ------
    ValueError
        ``gpus`` is empty or ``index`` negative.
    """
    if not gpus:
        raise ValueError("no GPU to pin a worker to (CUDA_VISIBLE_DEVICES is empty or no GPU)")
    if index < 0:
        raise ValueError(f"worker index must be >= 0, got {index}")
    return {"CUDA_VISIBLE_DEVICES": str(gpus[index % len(gpus)])}


def local_worker_specs(
    n: int, *, gpu: bool = False, gpus: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Worker specs of the local cluster (``distributed.SpecCluster``): one per worker.

    CPU workers have 1 task thread. GPU workers have :data:`GPU_WORKER_THREADS` threads, offer
    as many ``GPU`` resource slots (tasks ask for one) and are pinned to one GPU each
    (:func:`gpu_worker_env`; ``gpus`` default :func:`visible_gpus`).
    """
    from distributed import Nanny

    if gpu:
        gpus = visible_gpus() if gpus is None else list(gpus)
        if len(gpus) < n:
            logger.warning(
                "%d GPU worker(s) on %d GPU(s): some workers share a GPU", n, max(len(gpus), 0)
            )
    specs = {}
    for i in range(n):
        options: dict[str, Any] = {
            "nthreads": 1,
            "host": "127.0.0.1",
            "dashboard": False,
            "silence_logs": logging.ERROR,
        }
        if gpu:
            options.update(
                nthreads=GPU_WORKER_THREADS,
                resources={"GPU": GPU_WORKER_THREADS},
                env=gpu_worker_env(i, gpus or []),
            )
        specs[f"wsi-hipe-{i}"] = {"cls": Nanny, "options": options}
    return specs
