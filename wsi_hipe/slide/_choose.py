"""Which reader opens a slide: OpenSlide, tifffile or OME-Zarr (``slide.reader``).

``reader="auto"`` (:func:`choose_reader`) decides from the file itself, cheaply:

* a folder holding an OME-Zarr image (or a bioformats2raw container) -> ``ngff``; any other
  folder -> ``openslide`` (a DICOM series);
* a file that is not a TIFF -> ``openslide`` (MRXS, VMS, DICOM, ...: OpenSlide's own formats);
* a TIFF that tifffile recognises as a vendor format OpenSlide reads (Aperio SVS, Hamamatsu
  NDPI, Leica SCN, Philips, Ventana BIF) -> ``openslide``;
* an OME-TIFF or a QPTIFF -> ``tiff``: OpenSlide reads neither their channels nor (OME) their
  SubIFD levels (openslide#344), and refuses QPTIFF;
* any other TIFF -> ``openslide`` only when it is what OpenSlide reads faithfully, tiled 8-bit
  RGB; else ``tiff``, naming what OpenSlide would get wrong: a channel count other than 3
  (openslide#42; a gray image is 1 channel, a multiplex one many), more than 8 bits (OpenSlide
  keeps the top 8), floats, or strips (OpenSlide reads tiled TIFFs only);
* when OpenSlide then refuses the file as an unsupported format, the tifffile reader is tried.

``"openslide"``, ``"tiff"`` and ``"ngff"`` force a reader. The choice and its reason are logged
and kept on the reader as ``selection`` (a :class:`ReaderChoice`) for provenance.
:func:`open_any_reader` opens the chosen reader; :func:`cached_reader` keeps it per process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from wsi_hipe.cache import ProcessCache
from wsi_hipe.config import SLIDE_READERS, SlideReaderName
from wsi_hipe.errors import ConfigError, SlideFormatError, SlideNotFoundError
from wsi_hipe.slide._channels import PlaneSpec, parse_plane
from wsi_hipe.slide._multichannel import ReaderChoice
from wsi_hipe.slide._ngff import NgffReader, is_ngff
from wsi_hipe.slide._protocol import SlideReader
from wsi_hipe.slide._tiff import TiffReader, is_tiff

__all__ = [
    "ReaderName",
    "READER_NAMES",
    "choose_reader",
    "open_any_reader",
    "cached_reader",
    "evict_cached_reader",
    "reader_cached",
    "clear_reader_cache",
]

logger = logging.getLogger(__name__)

#: ``slide.reader`` / ``--reader`` (the vocabulary lives in :mod:`wsi_hipe.config`).
ReaderName = SlideReaderName
READER_NAMES: tuple[str, ...] = SLIDE_READERS

#: The readers of this process that :func:`cached_reader` opened (any backend), keyed by
#: ``(path, reader option, plane)``. ``open_reader`` keeps OpenSlide handles opened by path alone.
_CACHE: ProcessCache[Any] = ProcessCache("tifffile/zarr readers", maxsize=8, close_evicted=False)

_VENDOR_FLAGS = (
    ("is_svs", "Aperio SVS"),
    ("is_ndpi", "Hamamatsu NDPI"),
    ("is_scn", "Leica SCN"),
    ("is_philips", "Philips TIFF"),
    ("is_bif", "Ventana BIF"),
)


def _tiff_choice(path: Path) -> ReaderChoice:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            for flag, name in _VENDOR_FLAGS:
                if getattr(tif, flag, False):
                    return ReaderChoice("openslide", f"auto: {name}, a format OpenSlide reads")
            if tif.is_ome:
                return ReaderChoice(
                    "tiff",
                    "auto: OME-TIFF (OpenSlide reads neither its channels nor its SubIFD levels)",
                )
            if tif.is_qpi:
                return ReaderChoice("tiff", "auto: QPTIFF (OpenSlide does not read it)")
            if not tif.series:
                return ReaderChoice("openslide", "auto: tifffile finds no image series in it")
            series = tif.series[0]
            key = series.keyframe
            sizes = dict(zip(series.axes, series.shape, strict=True))
            channels = 1
            for axis in ("C", "S", "I", "Q"):
                channels *= int(sizes.get(axis, 1))
            problems = []
            if channels != 3:
                problems.append(f"{channels} channel(s); OpenSlide reads 3-channel RGB only")
            dtype = key.dtype
            if dtype is not None and dtype.kind == "f":
                problems.append(f"{dtype.name} samples; OpenSlide reads 8-bit RGB only")
            elif dtype is not None and dtype.itemsize > 1:
                problems.append(f"{8 * dtype.itemsize}-bit samples; OpenSlide keeps the top 8")
            if not key.is_tiled:
                problems.append("striped; OpenSlide reads tiled TIFFs only")
            if int(key.photometric) not in (2, 6) and channels == 3:
                problems.append("3 channels that are not RGB")
            if problems:
                return ReaderChoice("tiff", f"auto: TIFF with {'; '.join(problems)}")
            return ReaderChoice("openslide", "auto: tiled 8-bit RGB TIFF, which OpenSlide reads")
    except (tifffile.TiffFileError, ValueError, OSError, EOFError) as exc:
        return ReaderChoice("openslide", f"auto: tifffile cannot parse it ({exc})")


def choose_reader(path: str | os.PathLike[str], reader: str = "auto") -> ReaderChoice:
    """The reader for ``path`` and why (see the module docs).

    Parameters
    ----------
    path : str or PathLike
        A slide file or folder.
    reader : {'auto', 'openslide', 'tiff', 'ngff'}, default 'auto'

    Raises
    ------
    ConfigError
        An unknown ``reader`` (a ``ValueError`` too).
    SlideNotFoundError
        Nothing at ``path``.
    """
    if reader not in READER_NAMES:
        raise ConfigError(
            f"slide.reader must be one of {list(READER_NAMES)} (--reader), got {reader!r}"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideNotFoundError(f"slide not found: {p} (no such file or folder)")
    if reader != "auto":
        return ReaderChoice(reader, f"forced by slide.reader = {reader!r}")
    if p.is_dir():
        if is_ngff(p):
            return ReaderChoice("ngff", "auto: OME-Zarr image (NGFF multiscales)")
        return ReaderChoice("openslide", "auto: a folder (e.g. a DICOM series) for OpenSlide")
    if not is_tiff(p):
        return ReaderChoice("openslide", "auto: not a TIFF; one of OpenSlide's formats")
    return _tiff_choice(p)


def _open_kind(p: Path, choice: ReaderChoice, plane: PlaneSpec, channel: Any) -> SlideReader:
    if choice.kind == "tiff":
        if not p.is_file() or not is_tiff(p):
            raise SlideFormatError(
                f"slide.reader is 'tiff' but {p} is not a TIFF file; use slide.reader auto"
            )
        return TiffReader(p, plane=plane, channel=channel)
    if choice.kind == "ngff":
        if not is_ngff(p):
            raise SlideFormatError(
                f"slide.reader is 'ngff' but {p} is not an OME-Zarr image folder; use "
                "slide.reader auto"
            )
        return NgffReader(p, plane=plane, channel=channel)
    if parse_plane(plane):
        raise SlideFormatError(
            f"slide.plane is set but {p} is read by OpenSlide, which has no planes; leave "
            "slide.plane unset or force slide.reader tiff"
        )
    from wsi_hipe.slide._openslide import OpenSlideReader

    return OpenSlideReader(p)


def open_any_reader(
    path: str | os.PathLike[str],
    *,
    reader: str = "auto",
    plane: PlaneSpec = None,
    channel: Any = None,
) -> SlideReader:
    """Open ``path`` with the reader :func:`choose_reader` picks; ``reader.selection`` says why.

    Parameters
    ----------
    path : str or PathLike
        A slide file or folder.
    reader : {'auto', 'openslide', 'tiff', 'ngff'}, default 'auto'
        ``slide.reader``.
    plane : int, str or mapping, optional
        ``slide.plane`` (tifffile and OME-Zarr readers).
    channel : int or str, optional
        Display channel of a tifffile/OME-Zarr reader's ``read_region`` (see the readers).

    Raises
    ------
    SlideNotFoundError, SlideFormatError, SlideError
        As the chosen reader raises them; OpenSlide's "unsupported format" for a TIFF is
        retried with the tifffile reader (its own error wins if that fails too).
    """
    p = Path(path).expanduser()
    choice = choose_reader(p, reader)
    try:
        opened = _open_kind(p, choice, plane, channel)
    except SlideFormatError as exc:
        if not (reader == "auto" and choice.kind == "openslide" and _unsupported(exc)):
            raise
        if not (p.is_file() and is_tiff(p)):
            raise
        choice = ReaderChoice("tiff", f"{choice.reason}; OpenSlide refused it ({exc.__cause__})")
        opened = TiffReader(p, plane=plane, channel=channel)
    try:
        opened.selection = choice  # type: ignore[attr-defined]
    except AttributeError:  # a reader class with slots: the log still says it
        pass
    logger.info("%s: reader %s (%s)", p, choice.kind, choice.reason)
    return opened


def _unsupported(exc: BaseException) -> bool:
    try:
        import openslide
    except ImportError:
        return False
    return isinstance(exc.__cause__, openslide.OpenSlideUnsupportedFormatError)


def _cache_key(path: str | os.PathLike[str], reader: str, plane: PlaneSpec) -> tuple:
    return (str(path), reader, tuple(sorted(parse_plane(plane).items())))


def cached_reader(
    path: str | os.PathLike[str], *, reader: str = "auto", plane: PlaneSpec = None
) -> SlideReader:
    """:func:`open_any_reader` through this process's LRU cache (workers reopen once)."""
    key = _cache_key(path, reader, plane)
    return _CACHE.get(key, lambda: open_any_reader(path, reader=reader, plane=plane))


def evict_cached_reader(
    path: str | os.PathLike[str], *, reader: str = "auto", plane: PlaneSpec = None
) -> None:
    """Forget this process's cached reader of ``path`` (the next call reopens it)."""
    _CACHE.pop(_cache_key(path, reader, plane))


def reader_cached(
    path: str | os.PathLike[str], *, reader: str = "auto", plane: PlaneSpec = None
) -> bool:
    """Whether this process holds a reader of ``path`` from :func:`cached_reader`."""
    return _cache_key(path, reader, plane) in _CACHE


def clear_reader_cache() -> None:
    """Forget every cached slide reader of this process (both caches)."""
    from wsi_hipe.slide._openslide import clear_reader_cache as clear_openslide

    _CACHE.clear()
    clear_openslide()
