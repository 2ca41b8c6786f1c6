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
from wsi_hipe.schedule import TaskRunner

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.slide import Slide
    from wsi_hipe.tissue import TissueMask

__all__ = ["as_slide", "load_for", "check_model_for", "runner_for", "detect_tissue"]


def as_slide(slide: SlideLike, cfg: Config) -> tuple[Slide, bool]:
    """A ``Slide`` from a path (opened with ``cfg.slide``) or an opened one, and whether it was
    opened here (then the caller closes it)."""
    if not isinstance(slide, (str, os.PathLike)):
        return slide, False
    from wsi_hipe.slide import open_slide

    path = Path(slide)
    if not path.exists():
        raise SlideNotFoundError(f"slide not found: {path}; check the path")
    kwargs: dict[str, Any] = {"mpp": cfg.slide.mpp, "channel": cfg.slide.channel}
    if cfg.slide.allow_brightfield:
        kwargs["allow_brightfield"] = True
    return open_slide(str(path), **kwargs), True


def load_for(model: ModelLike | None, cfg: Config) -> SegmentationModel:
    """The model to run (default ``cfg.model.path``), loaded on ``cfg.model.device``."""
    from wsi_hipe.models import SegmentationModel, load_model

    if isinstance(model, SegmentationModel):
        return model
    spec = cfg.model.path if model is None else model
    if isinstance(spec, os.PathLike):
        spec = str(spec)
    return load_model(spec, device=cfg.model.device, autocast=cfg.model.autocast)


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


def runner_for(
    scheduler: SchedulerLike | None, cfg: Config, *, gpu: bool
) -> tuple[TaskRunner, bool]:
    """A TaskRunner from a spec (default ``cfg.schedule``) or a started one; the flag says
    whether the caller owns (and closes) it."""
    if isinstance(scheduler, TaskRunner):
        return scheduler, False
    sched = cfg.schedule
    spec = sched.scheduler if scheduler is None else str(scheduler)
    runner = TaskRunner(
        spec,
        workers=sched.workers,
        max_in_flight=sched.max_in_flight,
        threads_per_worker=sched.threads_per_worker,
        gpu=gpu,
    )
    return runner, True


def thumbnail_size(dimensions: Sequence[int]) -> int:
    """Thumbnail side for tissue detection: ≈ 4 level-0 px per thumbnail px, at most 2048."""
    return int(max(64, min(2048, math.ceil(max(dimensions) / 4))))


def detect_tissue(slide: Slide) -> TissueMask:
    """The slide's tissue mask, from a thumbnail of :func:`thumbnail_size`."""
    return slide.detect_tissue(max_size=thumbnail_size(slide.dimensions))
