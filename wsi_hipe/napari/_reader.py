"""npe2 reader: wsi-hipe outputs (``*.ome.zarr``) and whole-slide image files.

A reader returns None for paths it does not claim, so napari can try other plugins (e.g.
napari-ome-zarr for other Zarr stores, the built-in reader for plain TIFFs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsi_hipe.napari._layers import LayerData, output_layer_data, slide_layers_data
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
    """True when ``path`` is a slide file (with a slide suffix) or an OME-Zarr image we read.

    The suffixes are :data:`wsi_hipe.slide.SLIDE_SUFFIXES` (``napari.yaml`` lists the same).
    A TIFF that :func:`wsi_hipe.slide.choose_reader` gives to tifffile (OME-TIFF, QPTIFF, gray
    or multi-channel TIFF) is claimed when tifffile opens it and decodes a pixel of its
    smallest level; any other file when OpenSlide recognises and opens it; an OME-Zarr image
    folder (not a wsi-hipe output) when its multiscales open. Only headers and one tile are
    read; files that fail are left to other readers.
    """
    path = Path(path)
    if path.is_dir():
        return _is_ngff_image(path)
    if not path.is_file() or not path.name.lower().endswith(SLIDE_SUFFIXES):
        return False
    from wsi_hipe.slide import choose_reader

    try:
        kind = choose_reader(path).kind
    except Exception as exc:  # a file choose_reader cannot look at is not ours
        logger.debug("%s: no reader (%s)", path, exc)
        return False
    if kind == "tiff":
        return _opens_with_tifffile(path)
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


def _opens_with_tifffile(path: Path) -> bool:
    from wsi_hipe.slide import TiffReader

    try:
        reader = TiffReader(path)
        try:
            reader.read_channels((0, 0), reader.level_count - 1, (1, 1), (0,))
        finally:
            reader.close()
    except Exception as exc:  # SlideError and whatever a decoder raises
        logger.debug("%s is not a TIFF tifffile can read: %s", path, exc)
        return False
    return True


def _is_ngff_image(path: Path) -> bool:
    from wsi_hipe.slide import NgffReader, is_ngff

    if not is_ngff(path):
        return False
    try:
        NgffReader(path).close()
    except Exception as exc:  # malformed multiscales, a plane needed, ...
        logger.debug("%s is not an OME-Zarr image we read: %s", path, exc)
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
    """Lazy multiscale images of a slide, in µm: one per channel of a multi-channel file
    (names and colours from its metadata), else the slide's stain channel.

    An RGB brightfield slide (which the pipeline refuses unless told otherwise) is shown
    inverted, as ``slide.allow_brightfield`` would feed it to the model, with a warning.
    """
    from wsi_hipe.errors import StainError

    path = _one(path)
    try:
        return slide_layers_data(path)
    except StainError as exc:
        logger.warning("%s; showing it inverted as brightfield", exc)
        return slide_layers_data(path, allow_brightfield=True)
