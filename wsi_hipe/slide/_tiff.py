"""The tifffile backend: :class:`TiffReader` reads OME-TIFF, QPTIFF and plain TIFF lazily.

What it reads
-------------
* **OME-TIFF** pyramids stored as SubIFDs (Bio-Formats 6+, tifffile, QuPath) or as one OME
  image per level, and flat OME-TIFFs; any channel count, 8/16-bit or float. Channels are the
  ``Channel`` elements of the image's ``Pixels`` (name, colour, fluor, illumination; only those
  in the OME namespace: vendor metadata carried in annotations is not channels). µm/px from
  ``PhysicalSizeX/Y`` in their unit.
* **QPTIFF** (Akoya/PerkinElmer Vectra, Polaris, PhenoImager): channel names and colours from
  the XML of each page (``Biomarker`` of unmixed images, else ``Name``), µm/px from the scan
  profile's ``PixelSizeMicrons``; thumbnail, overview and label pages are not levels.
* **Plain TIFF** (tiled or striped, one page or a page per channel, ImageJ hyperstacks): µm/px
  from ``XResolution``/``YResolution`` with ``ResolutionUnit`` (inch or cm; ImageJ's ``unit``).

Every source of µm/px is checked by :func:`~wsi_hipe.slide._metadata.check_mpp`; an absent or
implausible one leaves ``mpp = None`` with the reason in ``mpp_note``.

The OME-XML is checked against the pages before anything is read: its size, sample type,
plane count and channel count must agree with what the file holds, else
:class:`~wsi_hipe.errors.SlideFormatError` says which field disagrees.

Reading
-------
Pixels come through tifffile's Zarr store of each level (``TiffPageSeries.aszarr``): a region
decodes only the tiles or strips it touches, never a whole level. A strip spans the width of
the image, so striped files are read in *bands* of whole strips (at least ``BAND_ROWS`` rows)
kept in a small LRU cache of ``BAND_CACHE_BYTES`` (more only while one request needs more):
the tiles of one grid row decode each strip once, and memory is bounded by the bands, not the
image. An uncompressed level
whose single strip exceeds ``MEMMAP_BYTES`` is memory-mapped instead (only the rows read are
touched). A region whose data cannot be decoded (corrupt, or beyond the end of a truncated
file) raises :class:`~wsi_hipe.errors.SlideReadError` for that region only; a truncated file
is reported when it is opened.

Z-stacks and time series need ``plane`` (see :func:`~wsi_hipe.slide._channels.resolve_plane`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.errors import SlideFormatError, SlideNotFoundError
from wsi_hipe.slide._channels import (
    ChannelInfo,
    ChannelSpec,
    PlaneSpec,
    parse_plane,
    raw_max,
    resolve_plane,
)
from wsi_hipe.slide._metadata import (
    MppInfo,
    check_mpp,
    level_downsamples,
    mpp_from_xy,
    to_micrometres,
)
from wsi_hipe.slide._multichannel import ChannelReaderBase
from wsi_hipe.slide._protocol import check_readable_file

__all__ = ["TiffReader", "is_tiff", "BAND_ROWS", "BAND_CACHE_BYTES", "MEMMAP_BYTES"]

logger = logging.getLogger(__name__)

#: Fewest rows decoded together from a striped level (a band of whole strips).
BAND_ROWS = 256
#: Decoded bands kept per reader (bytes; the bands of the current request are always kept).
BAND_CACHE_BYTES = 64 * 2**20
#: An uncompressed strip larger than this is memory-mapped rather than decoded.
MEMMAP_BYTES = 32 * 2**20

#: Bytes of the smallest level's stored data that enter :attr:`TiffReader.quickhash`.
_QUICKHASH_BYTES = 16 * 2**20
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_SPATIAL = "YX"
_PLANE_LIKE = "IQ"  # tifffile's axes for "a sequence of pages" of unknown meaning


def is_tiff(path: str | os.PathLike[str]) -> bool:
    """The file starts with a TIFF or BigTIFF header."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _parse_xml(text: str) -> ET.Element:
    # ElementTree refuses str input that declares an encoding (QPTIFF says utf-16).
    return ET.fromstring(re.sub(r"^\s*<\?xml[^>]*\?>", "", text))


def _ome_color(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        v = int(value) & 0xFFFFFFFF  # OME stores RGBA as a signed int32
    except ValueError:
        return None
    return ((v >> 24) & 255, (v >> 16) & 255, (v >> 8) & 255)


def _rgb_triplet(value: str | None) -> tuple[int, int, int] | None:
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    r, g, b = (min(255, int(p)) for p in parts)
    return (r, g, b)


@dataclass
class _Ome:
    """The parts of one OME ``Image`` that the reader uses."""

    name: str | None
    size: dict[str, int]  # X, Y, C, Z, T
    type: str | None
    significant_bits: int | None
    physical: dict[str, tuple[float, str | None]]  # X/Y -> (value, unit)
    channels: list[tuple[ChannelInfo, int]]  # info, samples per pixel


def _ome_images(xml: str, path: str) -> list[_Ome]:
    try:
        root = _parse_xml(xml)
    except ET.ParseError as exc:
        raise SlideFormatError(
            f"the OME-XML of {path} cannot be parsed ({exc}); repair it (e.g. rewrite it with "
            "tifffile.tiffcomment or bfconvert) or strip it to read the file as plain TIFF"
        ) from exc
    ns = root.tag[1 : root.tag.index("}")] if root.tag.startswith("{") else ""
    q = (lambda t: f"{{{ns}}}{t}") if ns else (lambda t: t)
    images = []
    for image in root.findall(q("Image")):
        pixels = image.find(q("Pixels"))
        if pixels is None:
            continue
        a = pixels.attrib
        size = {}
        for key in "XYCZT":
            try:
                size[key] = int(a.get(f"Size{key}", "1"))
            except ValueError:
                size[key] = -1
        physical = {}
        for key in "XY":
            raw = a.get(f"PhysicalSize{key}")
            if raw is not None:
                try:
                    physical[key] = (float(raw), a.get(f"PhysicalSize{key}Unit"))
                except ValueError:
                    pass
        channels = []
        for ch in pixels.findall(q("Channel")):
            info = ChannelInfo(
                name=(ch.get("Name") or "").strip() or None,
                color=_ome_color(ch.get("Color")),
                fluor=ch.get("Fluor"),
                illumination=ch.get("IlluminationType"),
            )
            try:
                spp = int(ch.get("SamplesPerPixel", "1"))
            except ValueError:
                spp = 1
            channels.append((info, max(1, spp)))
        bits = a.get("SignificantBits")
        images.append(
            _Ome(
                name=image.get("Name"),
                size=size,
                type=a.get("Type"),
                significant_bits=int(bits) if bits and bits.isdigit() else None,
                physical=physical,
                channels=channels,
            )
        )
    return images


_OME_TYPES = {
    "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
    "float": "f4", "double": "f8", "bit": "?",
}  # fmt: skip


def _check_ome(ome: _Ome, series: Any, tif: Any, path: str) -> None:
    """Raise SlideFormatError naming each field of the OME-XML that disagrees with the pages."""
    key = series.keyframe
    problems = []
    page_h, page_w = key.imagelength, key.imagewidth
    if ome.size["X"] != page_w or ome.size["Y"] != page_h:
        problems.append(
            f"SizeX x SizeY = {ome.size['X']} x {ome.size['Y']} but the pages are "
            f"{page_w} x {page_h} px"
        )
    want = _OME_TYPES.get(ome.type or "")
    if want is not None and np.dtype(want) != np.dtype(key.dtype):
        problems.append(f"Type = {ome.type} but the pages hold {np.dtype(key.dtype).name}")
    n_samples = sum(spp for _, spp in ome.channels)
    if ome.channels and n_samples != ome.size["C"]:
        problems.append(
            f"SizeC = {ome.size['C']} but it lists {len(ome.channels)} Channel element(s) with "
            f"{n_samples} sample(s)"
        )
    planes = ome.size["C"] * ome.size["Z"] * ome.size["T"]
    held = [p for p in series.pages if p is not None]
    spp = max(1, int(key.samplesperpixel))
    held_planes = len(held) * spp
    if series.kind == "ome" and (len(held) < len(series.pages) or held_planes < planes):
        problems.append(
            f"SizeC x SizeZ x SizeT = {ome.size['C']} x {ome.size['Z']} x {ome.size['T']} = "
            f"{planes} planes but the file holds {held_planes} for this image"
        )
    if not problems and series.kind != "ome":
        problems.append("tifffile cannot map its planes onto the pages")
    if problems:
        raise SlideFormatError(
            f"the OME-XML of {path} disagrees with its pages: {'; '.join(problems)}. Correct "
            "the OME-XML (e.g. with tifffile.tiffcomment) or export the file again (bfconvert)"
        )


def _qpi_channel(page: Any) -> tuple[ChannelInfo, float | None]:
    """Channel and µm/px from the PerkinElmer XML of a QPTIFF page."""
    try:
        root = _parse_xml(page.description)
    except (ET.ParseError, TypeError):
        return ChannelInfo(), None
    name = (root.findtext("Biomarker") or root.findtext("Name") or "").strip() or None
    color = _rgb_triplet(root.findtext("Color"))
    mpp = None
    for tag in ("ScanProfile//ScanResolution/PixelSizeMicrons", ".//PixelSizeMicrons"):
        text = root.findtext(tag)
        if text:
            try:
                mpp = float(text)
                break
            except ValueError:
                continue
    return ChannelInfo(name=name, color=color), mpp


def _resolution_mpp(page: Any, path: str, *, imagej_unit: str | None = None) -> MppInfo:
    """µm/px from XResolution/YResolution (+ ResolutionUnit, or ImageJ's ``unit``)."""
    tags = page.tags
    xr, yr, ru = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if xr is None:
        return MppInfo(None, None)
    unit = int(ru.value) if ru is not None else 2  # TIFF's default unit is the inch

    def px_per_unit(tag: Any) -> float | None:
        if tag is None:
            return None
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        return float(num) / float(den) if num and den else None

    px_x, px_y = px_per_unit(xr), px_per_unit(yr)
    if unit == 2:
        per_unit, source = 25400.0, "TIFF XResolution/YResolution (px per inch)"
    elif unit == 3:
        per_unit, source = 1e4, "TIFF XResolution/YResolution (px per cm)"
    elif imagej_unit:
        um = to_micrometres(1.0, imagej_unit.replace("\\u00B5", "µ"))
        if um is None:
            return MppInfo(None, None)
        per_unit, source = um, f"ImageJ XResolution/YResolution (px per {imagej_unit})"
    else:
        return MppInfo(None, None)
    return mpp_from_xy(
        per_unit / px_x if px_x else None, per_unit / px_y if px_y else None, source, path
    )


def _ome_mpp(ome: _Ome, path: str) -> MppInfo:
    um = {}
    for key in "XY":
        if key in ome.physical:
            value, unit = ome.physical[key]
            converted = to_micrometres(value, unit)
            if converted is None:
                note = f"its OME PhysicalSize{key}Unit {unit!r} is not a length unit"
                logger.warning("%s: %s; ignoring it", path, note)
                return MppInfo(None, "OME PhysicalSizeX/Y", note)
            um[key] = converted
    if not um:
        return MppInfo(None, None)
    return mpp_from_xy(um.get("X"), um.get("Y"), "OME PhysicalSizeX/Y", path)


# --------------------------------------------------------------------------------------------
# Layout: levels, axes, channels
# --------------------------------------------------------------------------------------------


def _levels_as_series(tif: Any, first: Any) -> list[Any]:
    """Series after ``first`` that are its reduced levels (a pyramid as one OME image each)."""
    out = [first]
    axes = first.axes
    lead = [s for a, s in zip(axes, first.shape, strict=True) if a not in _SPATIAL]
    for s in tif.series[1:]:
        if s.axes != axes or s.dtype != first.dtype:
            break
        if [n for a, n in zip(s.axes, s.shape, strict=True) if a not in _SPATIAL] != lead:
            break
        prev = out[-1]
        h, w = (s.shape[axes.index(a)] for a in "YX")
        ph, pw = (prev.shape[axes.index(a)] for a in "YX")
        if not (h < ph and w < pw):
            break
        out.append(s)
    return out


class TiffReader(ChannelReaderBase):
    """:class:`~wsi_hipe.slide.SlideReader` (and ``ChannelReader``) over tifffile.

    Parameters
    ----------
    path : str or PathLike
        An OME-TIFF, QPTIFF or plain TIFF file.
    plane : int, str or mapping, optional
        The plane of a Z-stack or time series (``"z=3"``, ``{"z": 3, "t": 0}``).
    channel : int or str, optional
        The channel that :meth:`read_region` shows (index, name or ``"auto"``); default: the
        first (R, G, B for an RGB image). Raw reads take any channel.

    Attributes
    ----------
    vendor : str
        ``"ome-tiff"``, ``"qptiff"``, ``"imagej-tiff"``, ``"aperio-tiff"`` or ``"tiff"``.
    description : str
        What was found, e.g. ``"OME-TIFF, 2 channels uint8, 4 levels (SubIFDs)"``.

    Raises
    ------
    SlideNotFoundError, SlideFormatError, SlideError
        Missing file; not a TIFF, OME-XML that disagrees with the pages, a plane needed;
        no permission.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        plane: PlaneSpec = None,
        channel: ChannelSpec | None = None,
    ) -> None:
        import tifffile

        p = Path(path).expanduser()
        if not p.exists():
            raise SlideNotFoundError(f"slide not found: {p} (no such file)")
        p = p.resolve()
        check_readable_file(p)
        self.path = str(p)
        self._plane_opt = plane
        self._channel_opt = channel
        self._lock = threading.RLock()
        self._arrays: dict[int, Any] = {}
        self._memmaps: dict[int, list[np.ndarray] | None] = {}
        self._bands: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._band_bytes = 0
        self._quickhash: str | None = None
        try:
            self._tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, OSError, EOFError) as exc:
            raise SlideFormatError(
                f"{self.path} is not a TIFF file tifffile can read ({exc}); pass a TIFF, "
                "OME-TIFF or QPTIFF file"
            ) from exc
        try:
            self._parse()
        except BaseException:
            self._tif.close()
            raise
        self._set_display(channel)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.path, self._plane_opt, self._channel_opt, self.selection))

    def __repr__(self) -> str:
        return f"TiffReader({self.path!r}, {self.description})"

    # --- parsing ----------------------------------------------------------------------------

    def _parse(self) -> None:
        tif = self._tif
        path = self.path
        if not tif.series:
            raise SlideFormatError(
                f"{path} has a TIFF header but no readable image (corrupt or truncated "
                "file); copy it again"
            )
        series = tif.series[0]
        ome: _Ome | None = None
        if tif.is_ome:
            images = _ome_images(tif.ome_metadata or "", path)
            if not images:
                raise SlideFormatError(f"the OME-XML of {path} describes no image with Pixels")
            ome = images[0]
            _check_ome(ome, series, tif, path)
            self.vendor = "ome-tiff"
        elif tif.is_qpi:
            self.vendor = "qptiff"
        elif tif.is_imagej:
            self.vendor = "imagej-tiff"
        elif tif.is_svs:
            self.vendor = "aperio-tiff"
        else:
            self.vendor = "tiff"
        if len(series.levels) > 1:
            levels = list(series.levels)
            self._sources = [(series, k) for k in range(len(levels))]
            how = "SubIFDs" if tif.is_ome else "reduced pages"
        else:
            levels = _levels_as_series(tif, series) if tif.is_ome else [series]
            self._sources = [(lv, 0) for lv in levels]
            how = "one OME image per level"
        axes = series.axes
        shape0 = levels[0].shape
        if "Y" not in axes or "X" not in axes:
            raise SlideFormatError(f"{path}: the image has no y and x axes (axes {axes!r})")
        sizes = dict(zip(axes, shape0, strict=True))
        # which axis holds the channels
        c_axis: str | None = None
        if "C" in axes:
            c_axis = "C"
            if sizes.get("S", 1) > 1:
                if sizes["C"] > 1:
                    raise SlideFormatError(
                        f"{path}: channels of {sizes['S']} samples each (axes {axes}) are not "
                        "supported; export one sample per channel"
                    )
                c_axis = "S"
        elif "S" in axes:
            c_axis = "S"
        else:
            unknown = [a for a in axes if a not in _SPATIAL]
            if len(unknown) == 1 and unknown[0] in _PLANE_LIKE:
                c_axis = unknown[0]  # a plain stack of pages: one page per channel
        extra = {a: n for a, n in sizes.items() if a not in _SPATIAL and a != c_axis}
        self._axes = axes
        self._c_axis = c_axis
        self._plane = resolve_plane(parse_plane(self._plane_opt), _lower(extra), path=path)
        n_channels = sizes[c_axis] if c_axis else 1
        key = series.keyframe
        self._dtype = np.dtype(series.dtype)
        photometric = int(key.photometric)
        self._rgb = photometric in (2, 6) and c_axis == "S" and n_channels in (3, 4)
        # channels
        channels: list[ChannelInfo] = [ChannelInfo() for _ in range(n_channels)]
        bits = None
        mpp = MppInfo(None, None)
        if ome is not None:
            infos = [info for info, spp in ome.channels for _ in range(spp)]
            if len(infos) == n_channels and not self._rgb:
                channels = infos
            bits = ome.significant_bits
            mpp = _ome_mpp(ome, path)
            if mpp.mpp is None and mpp.note is None:
                mpp = _fallback(_resolution_mpp(key, path), "the OME has no PhysicalSizeX")
        elif tif.is_qpi:
            found = [_qpi_channel(pg) for pg in levels[0].pages if pg is not None]
            if len(found) == n_channels:
                channels = [c for c, _ in found]
            qpi_mpp = next((m for _, m in found if m), None)
            if qpi_mpp is not None:
                mpp = check_mpp(qpi_mpp, "QPTIFF PixelSizeMicrons", path)
            else:
                mpp = _resolution_mpp(key, path)
        elif tif.is_imagej:
            meta = tif.imagej_metadata or {}
            labels = meta.get("Labels")
            if isinstance(labels, list) and len(labels) == n_channels and c_axis == "C":
                channels = [ChannelInfo(name=str(lb).strip() or None) for lb in labels]
            unit = str(meta.get("unit") or "").strip() or None
            mpp = _resolution_mpp(key, path, imagej_unit=unit)
        else:
            if tif.is_svs:
                m = re.search(r"MPP\s*=\s*([0-9.]+)", key.description or "")
                if m:
                    mpp = check_mpp(float(m.group(1)), "Aperio MPP", path)
            if mpp.mpp is None and mpp.note is None:
                mpp = _resolution_mpp(key, path)
            if c_axis in tuple(_PLANE_LIKE):
                names = [_page_name(pg) for pg in levels[0].pages]
                if len(names) == n_channels and any(names):
                    channels = [ChannelInfo(name=n) for n in names]
        if self._rgb:
            rgb_names = ("red", "green", "blue", "alpha")
            rgb_colors = ((255, 0, 0), (0, 255, 0), (0, 0, 255), None)
            channels = [
                ChannelInfo(name=rgb_names[i], color=rgb_colors[i]) for i in range(n_channels)
            ]
        if bits is None and self._dtype.kind in "ui":
            try:
                bps = key.bitspersample
                bits = int(bps[0] if isinstance(bps, tuple) else bps)
            except (TypeError, ValueError):
                bits = None
        self._channels = tuple(channels)
        self._raw_max = raw_max(self._dtype, bits)
        self._bits = bits
        self._mpp = mpp
        self._levels = levels
        dims = []
        for lv in levels:
            s = dict(zip(lv.axes, lv.shape, strict=True))
            dims.append((int(s["X"]), int(s["Y"])))
        self._dims = tuple(dims)
        self._downsamples = level_downsamples(self._dims)
        self._striped = [not lv.keyframe.is_tiled for lv in levels]
        kind = {"ome-tiff": "OME-TIFF", "qptiff": "QPTIFF", "imagej-tiff": "ImageJ TIFF"}.get(
            self.vendor, "TIFF"
        )
        layout = "tiled" if key.is_tiled else "striped"
        lv_text = f"{len(levels)} level(s)" + (f" ({how})" if len(levels) > 1 else "")
        self.description = (
            f"{kind}, {n_channels} channel(s) {self._dtype.name}"
            + (" RGB" if self._rgb else "")
            + f", {layout}, {lv_text}"
            + (f", plane {self._plane}" if any(n > 1 for n in extra.values()) else "")
        )
        self._truncation = self._find_truncation()
        if self._truncation:
            logger.warning("%s: %s", path, self._truncation)
        logger.debug("%s: %s; mpp %s (%s)", path, self.description, mpp.mpp, mpp.source)

    def _find_truncation(self) -> str | None:
        size = os.path.getsize(self.path)
        need = 0
        for lv in self._levels:
            for page in lv.pages:
                if page is None:
                    continue
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size:
                    need = max(need, int((offsets + counts).max()))
        if need > size:
            return (
                f"the file is truncated: it has {size} bytes but its image data reach byte "
                f"{need}; regions stored past the end cannot be read (copy the file again)"
            )
        return None

    def _damage_note(self) -> str:
        if self._truncation:
            return f" ({self._truncation})"
        return " (corrupt pixel data at that place)"

    # --- reading ----------------------------------------------------------------------------

    def _array(self, level: int) -> Any:
        with self._lock:
            arr = self._arrays.get(level)
            if arr is None:
                import zarr

                source, index = self._sources[level]
                arr = zarr.open_array(source.aszarr(level=index), mode="r")
                want = tuple(self._levels[level].shape)
                if tuple(arr.shape) != want:
                    raise SlideFormatError(
                        f"{self.path}: level {level} reads as {arr.shape}, expected {want}"
                    )
                self._arrays[level] = arr
            return arr

    def _selection(
        self, x0: int, y0: int, x1: int, y1: int, channels: tuple[int, ...]
    ) -> tuple[tuple, list[str]]:
        sel: list[Any] = []
        kept: list[str] = []
        contiguous = channels == tuple(range(channels[0], channels[0] + len(channels)))
        for a in self._axes:
            if a == "Y":
                sel.append(slice(y0, y1))
                kept.append(a)
            elif a == "X":
                sel.append(slice(x0, x1))
                kept.append(a)
            elif a == self._c_axis:
                sel.append(
                    slice(channels[0], channels[0] + len(channels))
                    if contiguous
                    else list(channels)
                )
                kept.append(a)
            else:
                sel.append(self._plane[a.lower()])
        return tuple(sel), kept

    def _to_yxc(self, data: np.ndarray, kept: list[str]) -> np.ndarray:
        if self._c_axis is None:
            order = [kept.index("Y"), kept.index("X")]
            return np.transpose(data, order)[..., None]
        order = [kept.index("Y"), kept.index("X"), kept.index(self._c_axis)]
        return np.transpose(data, order)

    def _read_window(
        self, level: int, x0: int, y0: int, x1: int, y1: int, channels: tuple[int, ...]
    ) -> np.ndarray:
        if self._c_axis is None and channels != (0,):
            raise ValueError(f"{self.path} has one channel, got channels {channels}")
        maps = self._memmap(level)
        if maps is not None:
            return self._read_memmap(maps, x0, y0, x1, y1, channels)
        if self._striped[level]:
            return self._read_bands(level, x0, y0, x1, y1, channels)
        sel, kept = self._selection(x0, y0, x1, y1, channels)
        data = self._array(level).get_orthogonal_selection(sel)
        return np.ascontiguousarray(self._to_yxc(np.asarray(data), kept))

    # striped levels: whole-width bands through the Zarr store, in a small LRU cache

    def _band_rows(self, level: int) -> int:
        rps = int(self._levels[level].keyframe.rowsperstrip or 1)
        rps = max(1, min(rps, self._dims[level][1]))
        return rps * max(1, math.ceil(BAND_ROWS / rps))

    def _read_bands(
        self, level: int, x0: int, y0: int, x1: int, y1: int, channels: tuple[int, ...]
    ) -> np.ndarray:
        rows = self._band_rows(level)
        lw, lh = self._dims[level]
        out = np.empty((y1 - y0, x1 - x0, len(channels)), dtype=self._dtype)
        needed = range(y0 // rows, (y1 - 1) // rows + 1)
        keep = {(level, b, channels) for b in needed}
        for b in needed:
            r0, r1 = b * rows, min((b + 1) * rows, lh)
            band = self._band(level, b, r0, r1, lw, channels, keep)
            a, z = max(y0, r0), min(y1, r1)
            out[a - y0 : z - y0] = band[a - r0 : z - r0, x0:x1]
        return out

    def _band(
        self,
        level: int,
        b: int,
        r0: int,
        r1: int,
        width: int,
        channels: tuple[int, ...],
        keep: set[tuple],
    ) -> np.ndarray:
        """Band ``b`` (rows r0..r1, whole width) from the cache, decoding it if needed.

        Least recently used bands are dropped while the cache exceeds ``BAND_CACHE_BYTES``,
        except those of the current request (``keep``): a request larger than the budget keeps
        its own bands, so the next tile of the same grid row finds them.
        """
        key = (level, b, channels)
        with self._lock:
            band = self._bands.get(key)
            if band is not None:
                self._bands.move_to_end(key)
                return band
        sel, kept = self._selection(0, r0, width, r1, channels)
        band = np.ascontiguousarray(
            self._to_yxc(np.asarray(self._array(level).get_orthogonal_selection(sel)), kept)
        )
        with self._lock:
            if key not in self._bands:
                self._bands[key] = band
                self._band_bytes += band.nbytes
            for old_key in list(self._bands):
                if self._band_bytes <= BAND_CACHE_BYTES:
                    break
                if old_key in keep:
                    continue
                self._band_bytes -= self._bands.pop(old_key).nbytes
        return band

    # huge uncompressed strips: memory-mapped pages

    def _memmap(self, level: int) -> list[np.ndarray] | None:
        with self._lock:
            if level in self._memmaps:
                return self._memmaps[level]
            maps = None
            lv = self._levels[level]
            key = lv.keyframe
            page_axes = self._axes[-len(key.shape) :] if key.shape else ""
            chunk_bytes = (
                int(np.prod(key.chunks))
                * self._dtype.itemsize
                * (int(key.samplesperpixel) if key.planarconfig == 1 else 1)
            )
            pages = list(lv.pages)
            if (
                chunk_bytes > MEMMAP_BYTES
                and page_axes in ("YX", "YXS")
                and all(p is not None and p.is_memmappable for p in pages)
            ):
                maps = [p.asarray(out="memmap") for p in pages]
                logger.debug("%s: level %d memory-mapped (%d pages)", self.path, level, len(maps))
            self._memmaps[level] = maps
            return maps

    def _read_memmap(
        self,
        maps: list[np.ndarray],
        x0: int,
        y0: int,
        x1: int,
        y1: int,
        channels: tuple[int, ...],
    ) -> np.ndarray:
        lead_axes = self._axes[: len(self._axes) - maps[0].ndim]
        lead_shape = [self._levels[0].shape[self._axes.index(a)] for a in lead_axes]
        parts = []
        for c in channels:
            idx = [c if a == self._c_axis else self._plane[a.lower()] for a in lead_axes]
            page = maps[int(np.ravel_multi_index(idx, lead_shape))] if lead_axes else maps[0]
            window = page[y0:y1, x0:x1]
            parts.append(window[..., c] if self._c_axis == "S" else window)
        return np.stack(parts, axis=-1).astype(self._dtype, copy=False)

    # --- provenance ---------------------------------------------------------------------------

    @property
    def plane(self) -> dict[str, int]:
        """The plane read on each extra axis (``{}`` for a 2-D image)."""
        return dict(self._plane)

    @property
    def significant_bits(self) -> int | None:
        return self._bits

    @property
    def quickhash(self) -> str:  # type: ignore[override]
        """SHA-256 of the file size, the first page's description and the smallest level's data.

        Cheap for any file size (the smallest level is small), like OpenSlide's quickhash.
        """
        if self._quickhash is None:
            digest = hashlib.sha256()
            digest.update(str(os.path.getsize(self.path)).encode())
            digest.update((self._tif.pages[0].description or "").encode("utf-8", "replace"))
            budget = _QUICKHASH_BYTES
            with open(self.path, "rb") as fh:
                for page in self._levels[-1].pages:
                    if page is None:
                        continue
                    for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
                        if budget <= 0:
                            break
                        fh.seek(off)
                        data = fh.read(min(int(n), budget))
                        digest.update(data)
                        budget -= max(1, len(data))
            self._quickhash = digest.hexdigest()
        return self._quickhash

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._arrays.clear()
            self._memmaps.clear()
            self._bands.clear()
            self._band_bytes = 0
        self._tif.close()


def _fallback(info: MppInfo, why: str) -> MppInfo:
    if info.mpp is None:
        return info
    return MppInfo(info.mpp, f"{info.source} ({why})", info.note)


def _lower(extra: dict[str, int]) -> dict[str, int]:
    return {a.lower(): int(n) for a, n in extra.items()}


def _page_name(page: Any) -> str | None:
    if page is None:
        return None
    tag = page.tags.get("PageName")
    return str(tag.value).strip() or None if tag is not None else None


def _reopen(path: str, plane: PlaneSpec, channel: ChannelSpec | None, selection: Any) -> TiffReader:
    reader = TiffReader(path, plane=plane, channel=channel)
    reader.selection = selection
    return reader
