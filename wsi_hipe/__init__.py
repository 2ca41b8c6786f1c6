"""wsi-hipe: Hierarchical Perturbation saliency for whole-slide U-Net segmentation.

The top-level namespace exports the HiPe engine; the rest lives in submodules
(``wsi_hipe.pipeline``, ``wsi_hipe.slide``, ``wsi_hipe.models``, ...), imported on demand so that
``import wsi_hipe`` stays light and never imports Qt, napari, Dask or OpenSlide.
"""

from wsi_hipe.hipe import HipeResult, hierarchical_perturbation

__version__ = "0.1.0"
__all__ = ["HipeResult", "hierarchical_perturbation", "__version__"]
