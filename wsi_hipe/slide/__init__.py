"""Slide access: any supported slide file (or an in-memory array) read as a normalised stain image.

Modules of this package
-----------------------
* ``_protocol`` — :class:`SlideReader`, the ``Protocol`` in front of every slide library: level
  geometry, µm/px and ``read_region`` returning *premultiplied* RGBA ``uint8`` (areas without
  scan data are ``(0, 0, 0, 0)``); :data:`SLIDE_SUFFIXES`; what all backends share.
* One module per backend, each a class satisfying :class:`SlideReader`:
  ``_openslide`` — :class:`OpenSlideReader` over ``openslide.OpenSlide`` (SVS, NDPI, MRXS, SCN,
  BIF, Philips TIFF, DICOM, generic tiled TIFF, ...), slide paths and this process's handle
  cache (:func:`open_reader`); ``_array`` — :class:`ArrayReader`, an array in memory (tests,
  notebooks), with an optional pyramid.
* ``_resample`` — reading any reader at a target µm/px (level choice, exact box filter, reads in
  bounded blocks).
* ``_stain`` — which channel holds the stain (or brightfield, inverted) and the intensity
  normalisation (background ≈ 0, bright nuclei ≈ 1).
* ``_slide`` — :class:`Slide` (made by :func:`open_slide`), which ties them together, and
  :func:`iter_tiles`.

Tunables (``BLOCK_SIDE``, ``NORM_MPP``, ``READER_CACHE_SIZE``, ...) live in the module that
uses them; set them there, not here.

Processes and errors
--------------------
Slide handles are opened per process and kept in a small LRU cache (a
:class:`wsi_hipe.cache.ProcessCache`); a :class:`Slide` pickles as its path, options and resolved
stain settings and reopens lazily in the worker. A region whose pixels cannot be decoded raises
:class:`~wsi_hipe.errors.SlideReadError` for that region only (the handle is reopened for the
next read).
"""

from wsi_hipe.slide._array import ArrayReader
from wsi_hipe.slide._openslide import (
    OpenSlideReader,
    clear_reader_cache,
    open_reader,
    resolve_slide_path,
)
from wsi_hipe.slide._protocol import CLIP_MAX, SLIDE_SUFFIXES, SlideReader
from wsi_hipe.slide._resample import LEVEL_RTOL
from wsi_hipe.slide._slide import ANALYSIS_SIZE, Slide, TileData, iter_tiles, open_slide

__all__ = [
    "SlideReader",
    "OpenSlideReader",
    "ArrayReader",
    "Slide",
    "TileData",
    "open_slide",
    "open_reader",
    "iter_tiles",
    "clear_reader_cache",
    "resolve_slide_path",
    "ANALYSIS_SIZE",
    "CLIP_MAX",
    "LEVEL_RTOL",
    "SLIDE_SUFFIXES",
]
