"""Front-end arguments made concrete: an opened slide, a loaded and checked model, a scheduler."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_hipe.config import Config
from wsi_hipe.errors import ConfigError, SlideNotFoundError
from wsi_hipe.pipeline._types import ModelLike, SchedulerLike, SlideLike
from wsi_hipe.schedule import TaskRunner, ship_model

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.schedule import Runner
    from wsi_hipe.slide import Slide
    from wsi_hipe.tissue import TissueMask

__all__ = [
    "as_slide",
    "load_for",
    "task_device",
    "wants_gpu",
    "tasks_model",
    "check_model_for",
    "runner_for",
    "detect_tissue",
]


def as_slide(slide: SlideLike, cfg: Config) -> tuple[Slide, bool]:
    """A ``Slide`` from a path (opened with ``cfg.slide``) or an opened one, and whether it was
    opened here (then the caller closes it)."""
    if not isinstance(slide, (str, os.PathLike)):
        return slide, False
    from wsi_hipe.slide import open_slide

    path = Path(slide)
    if not path.exists():
        raise SlideNotFoundError(f"slide not found: {path}; check the path")
    kwargs: dict[str, Any] = {
        "mpp": cfg.slide.mpp,
        "channel": cfg.slide.channel,
        "channels": cfg.slide.channels,
        "reader": cfg.slide.reader,
        "plane": cfg.slide.plane,
    }
    if cfg.slide.allow_brightfield:
        kwargs["allow_brightfield"] = True
    return open_slide(str(path), **kwargs), True


def load_for(model: ModelLike | None, cfg: Config, *, remote: bool = False) -> SegmentationModel:
    """The model to run (default ``cfg.model.path``), loaded on ``cfg.model.device``.

    ``remote``: tasks run in other processes (:attr:`TaskRunner.remote`), which receive the
    model as CPU weights and move it to their own device (:func:`tasks_model`); this process
    then keeps its copy on the CPU. A loaded ``SegmentationModel`` is returned as it is.
    """
    from wsi_hipe.models import SegmentationModel, load_model

    if isinstance(model, SegmentationModel):
        return model
    spec = cfg.model.path if model is None else model
    if isinstance(spec, os.PathLike):
        spec = str(spec)
    device = "cpu" if remote else cfg.model.device
    return load_model(spec, device=device, autocast=cfg.model.autocast)


def task_device(model: SegmentationModel, cfg: Config) -> str:
    """Where tasks run ``model``: its device when that is not the CPU, else ``cfg.model.device``
    (``"auto"``: each worker's GPU where it has one)."""
    device = getattr(model, "device", None)
    if device is not None and str(device) != "cpu":
        return str(device)
    return cfg.model.device


def wants_gpu(model: ModelLike | None, cfg: Config) -> bool:
    """Whether tiles run on a GPU: a loaded model on CUDA, else ``cfg.model.device`` (``cuda``
    / ``cuda:N``; ``auto`` where this process sees CUDA). Never fails here: a scheduling
    process (a cluster's login node) may have no GPU while its workers do."""
    from wsi_hipe.models import SegmentationModel

    if isinstance(model, SegmentationModel):
        return model.device.type == "cuda"
    device = cfg.model.device
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def tasks_model(model: SegmentationModel, cfg: Config, runner: Runner) -> Any:
    """The model as tasks receive it (``shared["model"]``): the object itself where tasks run
    in this process, a :class:`~wsi_hipe.schedule.ShippedModel` (CPU weights + description,
    moved to :func:`task_device` in each worker, once) where they run in other processes."""
    if not runner.remote:
        return model
    return ship_model(model, device=task_device(model, cfg))


def check_model_for(model: SegmentationModel, cfg: Config) -> None:
    """Refuse a configuration the model cannot run.

    Raises
    ------
    ConfigError
        ``score.class`` is not a class of the model, or the tile with its halo is not a size
        the model accepts.
    """
    classes = model.meta.num_classes
    if not 0 <= cfg.score.class_index < classes:
        raise ConfigError(
            f"score.class: the model has {classes} classes {list(model.meta.class_names)}, "
            f"got class {cfg.score.class_index}"
        )
    multiple = getattr(model, "input_multiple", 1)
    side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    if side % multiple:
        raise ConfigError(
            f"tiling.tile_size + 2*tiling.halo = {side} must be a multiple of {multiple} for "
            "this model"
        )


def runner_for(scheduler: SchedulerLike | None, cfg: Config, *, gpu: bool) -> tuple[Runner, bool]:
    """A TaskRunner from a spec (default ``cfg.schedule``), or a given runner (anything with
    :class:`TaskRunner`'s ``map``/``remote``); the flag says whether the caller owns (and
    closes) it. A new runner is not started yet."""
    if scheduler is not None and not isinstance(scheduler, str):
        if not (hasattr(scheduler, "map") and hasattr(scheduler, "remote")):
            raise TypeError(
                f"scheduler must be a spec string or a TaskRunner, got {type(scheduler).__name__}"
            )
        return scheduler, False
    sched = cfg.schedule
    spec = sched.scheduler if scheduler is None else str(scheduler)
    runner = TaskRunner(
        spec,
        workers=sched.workers,
        max_in_flight=sched.max_in_flight,
        threads_per_worker=sched.threads_per_worker,
        gpu=gpu,
        retries=sched.retries,
        jobqueue=sched.jobqueue,
    )
    return runner, True


def thumbnail_size(dimensions: Sequence[int]) -> int:
    """Thumbnail side for tissue detection: ≈ 4 level-0 px per thumbnail px, at most 2048."""
    return int(max(64, min(2048, math.ceil(max(dimensions) / 4))))


def detect_tissue(slide: Slide) -> TissueMask:
    """The slide's tissue mask, from a thumbnail of :func:`thumbnail_size`."""
    return slide.detect_tissue(max_size=thumbnail_size(slide.dimensions))
