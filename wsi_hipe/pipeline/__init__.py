"""Explain whole slides, regions, single cells and batches: the one implementation every face calls.

The CLI, the napari widget and notebooks call these functions and nothing below them:

- :func:`explain_slide` — every tissue tile of a slide into a resumable OME-Zarr
  (:mod:`~wsi_hipe.pipeline._slide`);
- :func:`explain_region`, :func:`explain_cell` — a region or the cell under a point, in the
  calling thread, returned as a :class:`RegionResult` (:mod:`~wsi_hipe.pipeline._region`);
- :func:`explain_batch`, :func:`resolve_batch_inputs`, :class:`BatchItem` — many slides from a
  folder, a glob or a CSV manifest (:mod:`~wsi_hipe.pipeline._batch`);
- :func:`skip_bound` — why a tile whose score is below ``score.floor`` may skip HiPe, with the
  proof, and the per-tile work every run shares (:mod:`~wsi_hipe.pipeline._tile`).

Their arguments are named by the aliases :data:`SlideLike`, :data:`ModelLike`,
:data:`ConfigLike`, :data:`SchedulerLike` and :data:`BatchInputs`; progress hooks follow one
contract, :data:`Progress` (``progress(done, total)`` in tiles, HiPe's depths included for
regions and cells; see :mod:`~wsi_hipe.pipeline._types`). The slide's and the model's identity
and the package versions that every output records come from :mod:`wsi_hipe.provenance`.
"""

from __future__ import annotations

from wsi_hipe.pipeline._batch import BatchItem, explain_batch, resolve_batch_inputs
from wsi_hipe.pipeline._region import explain_cell, explain_region
from wsi_hipe.pipeline._results import RegionResult, SlideResult, SlideStatus
from wsi_hipe.pipeline._slide import explain_slide
from wsi_hipe.pipeline._tile import skip_bound
from wsi_hipe.pipeline._types import (
    BatchInputs,
    BatchProgress,
    ConfigLike,
    ModelLike,
    Progress,
    SchedulerLike,
    ShouldStop,
    SlideLike,
)

__all__ = [
    "explain_slide",
    "explain_region",
    "explain_cell",
    "explain_batch",
    "resolve_batch_inputs",
    "skip_bound",
    "BatchItem",
    "RegionResult",
    "SlideResult",
    "SlideStatus",
    "SlideLike",
    "ModelLike",
    "ConfigLike",
    "SchedulerLike",
    "BatchInputs",
    "Progress",
    "BatchProgress",
    "ShouldStop",
]
