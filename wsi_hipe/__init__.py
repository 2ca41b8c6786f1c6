"""wsi-hipe: Hierarchical Perturbation saliency for whole-slide U-Net segmentation.

What users call, from the top-level namespace:

- the HiPe engine: :func:`hierarchical_perturbation`, :class:`HipeResult`, and
  :func:`hierarchical_perturbation_many` (several inputs sharing the model calls);
- the pipeline (:mod:`wsi_hipe.pipeline`): :func:`explain_slide`, :func:`explain_region`,
  :func:`explain_cell`, :func:`explain_batch` with :class:`BatchItem`, and their results
  :class:`SlideResult`, :class:`RegionResult`, :class:`SlideStatus`;
- their inputs: :func:`load_config` / :class:`Config`, :func:`load_model`, :func:`open_slide`.

Everything but the engine is imported on first use, so that ``import wsi_hipe`` stays light and
never imports Qt, napari, Dask, Zarr or OpenSlide. The rest lives in submodules
(``wsi_hipe.scores``, ``wsi_hipe.omezarr``, ``wsi_hipe.synthetic``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

from wsi_hipe.hipe import HipeResult, hierarchical_perturbation

__version__ = "0.1.0"

#: Names exported lazily, and the module each comes from.
_LAZY = {
    "hierarchical_perturbation_many": "wsi_hipe.hipe_many",
    "explain_slide": "wsi_hipe.pipeline",
    "explain_region": "wsi_hipe.pipeline",
    "explain_cell": "wsi_hipe.pipeline",
    "explain_batch": "wsi_hipe.pipeline",
    "BatchItem": "wsi_hipe.pipeline",
    "SlideResult": "wsi_hipe.pipeline",
    "RegionResult": "wsi_hipe.pipeline",
    "SlideStatus": "wsi_hipe.pipeline",
    "Config": "wsi_hipe.config",
    "load_config": "wsi_hipe.config",
    "load_model": "wsi_hipe.models",
    "open_slide": "wsi_hipe.slide",
}

__all__ = ["HipeResult", "hierarchical_perturbation", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_hipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
