"""npe2 reader: wsi-hipe outputs (``*.ome.zarr``) and whole-slide image files.

A reader returns None for paths it does not claim, so napari can try other plugins (e.g.
napari-ome-zarr for other Zarr stores, the built-in reader for plain TIFFs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsi_hipe.napari._layers import LayerData, output_layer_data, slide_layer_data
from wsi_hipe.omezarr import is_output
from wsi_hipe.slide import SLIDE_SUFFIXES

__all__ = ["napari_get_reader", "is_wsi_hipe_output", "is_slide_file", "SLIDE_SUFFIXES"]

logger = logging.getLogger(__name__)


def is_wsi_hipe_output(path: str | Path) -> bool:
    """True when ``path`` is a Zarr group carrying wsi-hipe provenance (NGFF 0.4 or 0.5).

    Reads only the group's small metadata file (:func:`wsi_hipe.omezarr.is_output`).
    """
    return is_output(path)


def is_slide_file(path: str | Path) -> bool:
    """True when ``path`` is a file with a slide suffix that OpenSlide recognises and opens.

    The suffixes are :data:`wsi_hipe.slide.SLIDE_SUFFIXES` (``napari.yaml`` lists the same).

    Opening reads only the file's headers; a file OpenSlide recognises but cannot open (e.g. an
    unsupported TIFF compression) is left to other readers.
    """
    path = Path(path)
    if not path.is_file() or not path.name.lower().endswith(SLIDE_SUFFIXES):
        return False
    try:
        import openslide
    except ImportError:  # pragma: no cover - openslide is a core dependency
        return False
    try:
        if openslide.OpenSlide.detect_format(str(path)) is None:
            return False
        openslide.OpenSlide(str(path)).close()
    except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        logger.debug("%s is not a slide OpenSlide can open: %s", path, exc)
        return False
    return True


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 ``get_reader``: a reader function for ``path``, or None when it is not ours.

    Parameters
    ----------
    path : str or list of str
        One path (a list of exactly one is accepted too).

    Returns
    -------
    callable or None
        ``reader(path) -> list of (data, kwargs, layer_type)``.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    text = str(path).rstrip("/\\")
    if is_wsi_hipe_output(text):
        return read_output
    if is_slide_file(text):
        return read_slide
    return None


def _one(path: str | list[str]) -> str:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            raise ValueError(f"expected one path, got {len(path)}: {path!r}")
        path = path[0]
    return str(path).rstrip("/\\")


def read_output(path: str | list[str]) -> list[LayerData]:
    """Layers of a wsi-hipe output: slide (when reachable), saliency, segmentation, tissue."""
    return output_layer_data(_one(path))


def read_slide(path: str | list[str]) -> list[LayerData]:
    """A lazy multiscale image of the slide's stain channel, in µm.

    An RGB brightfield slide (which the pipeline refuses unless told otherwise) is shown
    inverted, as ``slide.allow_brightfield`` would feed it to the model, with a warning.
    """
    from wsi_hipe.errors import StainError

    path = _one(path)
    try:
        return [slide_layer_data(path)]
    except StainError as exc:
        logger.warning("%s; showing it inverted as brightfield", exc)
        return [slide_layer_data(path, allow_brightfield=True)]
