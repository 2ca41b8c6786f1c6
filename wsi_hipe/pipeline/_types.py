"""The front end's argument types and the one progress contract.

Every face (CLI, napari widget, notebooks) calls the pipeline with the same few kinds of
argument; the aliases below name them, so that signatures say what they accept instead of
``Any`` (as zarr-python's ``StoreLike`` does).

Progress
--------
``progress(done, total)`` means the same in :func:`~wsi_hipe.pipeline.explain_slide`,
:func:`~wsi_hipe.pipeline.explain_region` and :func:`~wsi_hipe.pipeline.explain_cell`:

- ``total`` (int): the tiles of the run — the tissue tiles of a slide, the tiles of a region,
  1 for a cell;
- ``done`` (float, ``0 ≤ done ≤ total``, never decreasing): the tiles finished, plus the
  finished share of the tile being explained. Slides report whole tiles as they are written
  (tiles finished by an earlier run count from the start); regions and cells also report
  HiPe's depths inside the current tile (below the next whole number until the tile is done).

The last call of a run that was not stopped is ``progress(total, total)``. A caller that wants
integer steps (a progress bar) scales ``done`` by a resolution of its choice.
:func:`~wsi_hipe.pipeline.explain_batch` reports ``progress(slide_name, done, total)`` with the
same ``done`` and ``total`` for each slide.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, Union

from wsi_hipe.config import Config, load_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.pipeline._batch import BatchItem
    from wsi_hipe.schedule import TaskRunner
    from wsi_hipe.slide import Slide

__all__ = [
    "SlideLike",
    "ModelLike",
    "ConfigLike",
    "SchedulerLike",
    "BatchInputs",
    "Progress",
    "BatchProgress",
    "ShouldStop",
    "as_config",
]

#: A slide: a file path (opened with ``config.slide`` options) or an opened
#: :class:`wsi_hipe.slide.Slide`.
SlideLike: TypeAlias = Union[str, os.PathLike[str], "Slide"]
#: A model: a loaded :class:`~wsi_hipe.models.SegmentationModel`, ``"bundled"``, a checkpoint
#: or TorchScript path, an ``nn.Module`` or a callable ``(B, C, H, W) -> (B, K, H, W)`` logits.
ModelLike: TypeAlias = Union[
    "SegmentationModel", str, os.PathLike[str], "torch.nn.Module", Callable[..., Any]
]
#: A configuration: a :class:`~wsi_hipe.config.Config`, a YAML file, or a mapping of overrides
#: (dotted keys) applied to the defaults.
ConfigLike: TypeAlias = Config | str | os.PathLike[str] | Mapping[str, Any]
#: A scheduler: a spec (:data:`wsi_hipe.config.SchedulerName`, ``"local:N"``,
#: ``"tcp://host:port"``) or a started :class:`~wsi_hipe.schedule.TaskRunner` (reused, not closed).
SchedulerLike: TypeAlias = Union[str, "TaskRunner"]
#: A batch: a folder, a glob, a CSV manifest, or a list of paths / :class:`BatchItem`.
BatchInputs: TypeAlias = (
    str | os.PathLike[str] | Sequence[Union[str, os.PathLike[str], "BatchItem"]]
)
#: ``progress(done, total)`` in tiles (module docstring).
Progress: TypeAlias = Callable[[float, int], object]
#: ``progress(slide_name, done, total)`` of a batch, ``done``/``total`` as for :data:`Progress`.
BatchProgress: TypeAlias = Callable[[str, float, int], object]
#: ``should_stop()``: polled during HiPe; True stops the run and returns what is done.
ShouldStop: TypeAlias = Callable[[], bool]


def as_config(config: ConfigLike | None) -> Config:
    """The :class:`Config` a front-end argument stands for (None: all defaults)."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return load_config(overrides=config)
    return load_config(config)
