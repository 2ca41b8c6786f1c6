"""Synthetic Hoechst whole-slide images with ground truth.

``render_region`` renders any window of a virtual slide (a pure function of seed, µm/px and slide
size), ``render_tile`` a random training tile, ``write_slide`` a tiled pyramidal TIFF that
OpenSlide opens, with lymphocyte / nuclei / tissue masks and a cell table beside it.
``density`` (:data:`DENSITIES`: sparse, clustered, dense) fixes how many lymphocytes a slide has.
"""

from wsi_hipe.synthetic._fields import DENSITIES
from wsi_hipe.synthetic._render import (
    CELL_CLASSES,
    SyntheticRegion,
    render_region,
    render_tile,
)
from wsi_hipe.synthetic._write import LAYOUTS, SyntheticSlide, ground_truth_paths, write_slide

__all__ = [
    "CELL_CLASSES",
    "DENSITIES",
    "LAYOUTS",
    "SyntheticRegion",
    "SyntheticSlide",
    "ground_truth_paths",
    "render_region",
    "render_tile",
    "write_slide",
]
