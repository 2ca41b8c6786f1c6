"""Synthetic Hoechst whole-slide images with ground truth.

``render_region`` renders any window of a virtual slide (a pure function of seed, µm/px and slide
size), ``render_tile`` a random training tile, ``write_slide`` a tiled pyramidal TIFF that
OpenSlide opens, with lymphocyte / nuclei / tissue masks and a cell table beside it;
``write_ome_tiff`` the same Hoechst slide as a multiplex pyramidal OME-TIFF (Hoechst + markers).
``density`` (:data:`DENSITIES`: sparse, clustered, dense) fixes how many lymphocytes a slide has.
"""

from wsi_hipe.synthetic._fields import DENSITIES
from wsi_hipe.synthetic._ometiff import (
    MARKERS,
    SyntheticOmeTiff,
    render_multiplex_region,
    write_ome_tiff,
)
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
    "MARKERS",
    "SyntheticOmeTiff",
    "render_multiplex_region",
    "write_ome_tiff",
    "SyntheticRegion",
    "SyntheticSlide",
    "ground_truth_paths",
    "render_region",
    "render_tile",
    "write_slide",
]
