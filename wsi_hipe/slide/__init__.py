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
  ``_tiff`` — :class:`TiffReader` over tifffile (OME-TIFF, QPTIFF, plain tiled or striped
  TIFF, any channel count and bit depth); ``_ngff`` — :class:`NgffReader`, an OME-Zarr image.
  The last two are *channel readers* (``_multichannel``: raw channels at full precision, their
  names and colours in :class:`ChannelInfo`), with ``_metadata`` (µm/px and levels from the
  file) and ``_channels`` (choosing channels by name, planes, raw range).
* ``_choose`` — which reader opens a path (:func:`choose_reader`: OpenSlide for the RGB
  formats it reads, tifffile/Zarr for the rest; ``slide.reader`` forces one) and this
  process's cache of opened readers (:func:`cached_reader`).
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
from wsi_hipe.slide._channels import (
    NUCLEAR_STAINS,
    ChannelInfo,
    check_model_channels,
    nuclear_stain,
    select_channel,
    select_channels,
)
from wsi_hipe.slide._choose import (
    READER_NAMES,
    cached_reader,
    choose_reader,
    clear_reader_cache,
    open_any_reader,
    reader_cached,
)
from wsi_hipe.slide._multichannel import ChannelReader, ReaderChoice
from wsi_hipe.slide._ngff import NgffReader, is_ngff
from wsi_hipe.slide._openslide import (
    OpenSlideReader,
    open_reader,
    resolve_slide_path,
)
from wsi_hipe.slide._protocol import CLIP_MAX, SLIDE_SUFFIXES, SlideReader
from wsi_hipe.slide._resample import LEVEL_RTOL
from wsi_hipe.slide._slide import ANALYSIS_SIZE, Slide, TileData, iter_tiles, open_slide
from wsi_hipe.slide._tiff import TiffReader, is_tiff

__all__ = [
    "SlideReader",
    "OpenSlideReader",
    "TiffReader",
    "NgffReader",
    "ArrayReader",
    "ChannelReader",
    "ChannelInfo",
    "ReaderChoice",
    "choose_reader",
    "open_any_reader",
    "cached_reader",
    "reader_cached",
    "is_tiff",
    "is_ngff",
    "select_channel",
    "select_channels",
    "check_model_channels",
    "nuclear_stain",
    "NUCLEAR_STAINS",
    "READER_NAMES",
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
