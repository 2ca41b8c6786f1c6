"""Synthetic Hoechst whole-slide images with ground truth.

``render_region`` renders any window of a virtual slide (a pure function of seed, µm/px and slide
size), ``render_tile`` a random training tile, ``write_slide`` a tiled pyramidal TIFF that
OpenSlide opens, with lymphocyte / nuclei / tissue masks and a cell table beside it.
"""

from wsi_hipe.synthetic._render import (
    CELL_CLASSES,
    SyntheticRegion,
    render_region,
    render_tile,
)

__all__ = ["CELL_CLASSES", "SyntheticRegion", "render_region", "render_tile"]
