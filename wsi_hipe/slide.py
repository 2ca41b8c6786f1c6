"""Slide access: any OpenSlide format (or an in-memory array) read as a normalised stain image.

Layers of this module
---------------------
* :class:`SlideReader` — the ``Protocol`` in front of the slide library: level geometry, µm/px
  and ``read_region`` returning *premultiplied* RGBA ``uint8`` (areas without scan data are
  ``(0, 0, 0, 0)``). :class:`OpenSlideReader` wraps ``openslide.OpenSlide`` (SVS, NDPI, MRXS,
  SCN, BIF, Philips TIFF, DICOM, generic tiled TIFF, ...); :class:`ArrayReader` serves an array
  in memory (tests, notebooks), with an optional pyramid.
* :class:`Slide` (made by :func:`open_slide`) — reads a region at a target µm/px as a float32
  stain image, normalised so that background ≈ 0 and bright nuclei ≈ 1.

Reading at a target resolution
------------------------------
With ``s = mpp / slide.mpp`` level-0 px per target px, ``Slide.read`` picks the pyramid level
with the largest downsample ``<= s·(1 + LEVEL_RTOL)``, reads the covering window there, and
resamples only when the remaining factor differs from 1 (or the region does not start on a level
pixel): each target pixel is the exact area-weighted mean of the level pixels under its footprint
(box filter; for upsampling, the covering pixel(s)). Regions beyond the slide read as 0.

The stain channel
-----------------
OpenSlide returns RGBA. Premultiplied alpha means that transparent (unscanned) areas are 0 in
every channel, i.e. background. ``channel="auto"`` decides from the thumbnail:

* R = G = B (within 5 % of the signal): a single-channel image; the stain is the mean of R, G, B.
* One channel carries the signal (a Hamamatsu fluorescence NDPI puts DAPI/Hoechst in blue): the
  channel with the largest range (99.5th - 1st percentile) is used; the log says which, and warns
  when another channel carries at least half as much (a multi-stain slide; set ``channel``).
* Most of the scanned area bright in every channel (median of min(R, G, B) > 50 %): brightfield
  (e.g. H&E: bright background, darker tissue). Refused with :class:`StainError` unless
  ``allow_brightfield=True``, which *inverts* the image (``alpha - mean(R, G, B)``, or
  ``alpha - channel`` with an explicit channel) so that dark nuclei become bright.

An explicit ``channel`` (0/1/2 or "red"/"green"/"blue", or "mean") skips the detection.

Intensity normalisation
-----------------------
From a thumbnail of the raw stain (0..255): ``low`` = 1st percentile of the scanned pixels
(background level), ``high`` = 99.5th percentile of the tissue pixels (found with
:func:`wsi_hipe.tissue.detect_tissue`); a pixel becomes ``clip((x - low) / (high - low), 0,
CLIP_MAX)``. A thumbnail coarser than a nucleus averages nuclei with their surroundings (on a
4096² synthetic slide a 16 µm/px thumbnail put ``high`` at 120 where the full-resolution value
is 199), so when the thumbnail is coarser than 1.5 x ``NORM_MPP`` (0.5 µm/px, or the slide's own
resolution if coarser), ``high`` is the 99.5th percentile of ``NORM_SAMPLES`` (16) regions of
256² px centred on tissue (evenly spaced over the tissue pixels in row-major order, so
deterministic) and read at that resolution. Both values and how they were found are in
:meth:`Slide.provenance`; pass ``intensity=(low, high)`` to fix the scale, ``normalize=False``
for ``x / 255``.

Processes and errors
--------------------
OpenSlide handles are opened per process and kept in a small LRU cache keyed by
``(path, pid)``; a :class:`Slide` pickles as its path, options and resolved stain settings and
reopens lazily in the worker. A region whose pixels cannot be decoded raises
:class:`SlideReadError` for that region only (the handle is reopened for the next read).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from wsi_hipe.errors import (
    MissingMppError,
    SlideError,
    SlideFormatError,
    SlideNotFoundError,
    SlideReadError,
    StainError,
)
from wsi_hipe.tissue import TissueMask, detect_tissue

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
    "CLIP_MAX",
    "LEVEL_RTOL",
]

logger = logging.getLogger(__name__)

#: Upper clip of normalised intensities (bright nuclei ≈ 1; a little headroom above).
CLIP_MAX = 1.5
#: Relative tolerance when matching a level downsample to the wanted scale.
LEVEL_RTOL = 1e-3
#: Percentiles of the thumbnail used for normalisation: background and bright tissue.
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.5
#: Resolution (µm/px) at which the bright end of the intensity range is measured: nuclei
#: (~7 µm) are resolved there. When the analysis thumbnail is coarser than NORM_THUMB_RATIO
#: times this, NORM_SAMPLES tissue regions of NORM_SAMPLE_SIZE px are read at it instead.
NORM_MPP = 0.5
NORM_THUMB_RATIO = 1.5
NORM_SAMPLES = 16
NORM_SAMPLE_SIZE = 256
#: Side (px) of the thumbnail used to detect the stain channel and intensity range.
ANALYSIS_SIZE = 1024
#: Largest source window side (px) read in one piece; bigger regions are read in blocks.
BLOCK_SIDE = 2048
#: Number of OpenSlide handles kept open per process.
READER_CACHE_SIZE = 8

CHANNEL_NAMES = {"red": 0, "green": 1, "blue": 2, "r": 0, "g": 1, "b": 2}
_NAME_OF_CHANNEL = {0: "red", 1: "green", 2: "blue"}


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


@runtime_checkable
class SlideReader(Protocol):
    """What :class:`Slide` needs from a slide library.

    ``read_region(location, level, size)``: ``location`` = (x, y) top-left in level-0 px,
    ``size`` = (width, height) in px of ``level``; returns (height, width, 4) uint8 RGBA with
    premultiplied alpha, ``(0, 0, 0, 0)`` outside the slide or where nothing was scanned.
    """

    path: str

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def level_count(self) -> int: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def mpp(self) -> float | None: ...

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray: ...

    def get_thumbnail(self, max_size: int) -> np.ndarray: ...

    def close(self) -> None: ...


_SUPPORTED = (
    "Aperio .svs/.tif, Hamamatsu .ndpi/.vms/.vmu, Leica .scn, MIRAX .mrxs, Philips .tiff, "
    "Sakura .svslide, Ventana .bif/.tif, Zeiss .czi, DICOM WSI, generic tiled pyramidal TIFF"
)


def _check_readable_file(path: Path) -> None:
    if not path.is_file():
        raise SlideFormatError(f"slide {path} is not a regular file; pass a slide file or folder")
    if not os.access(path, os.R_OK):
        raise SlideError(
            f"cannot read slide {path}: permission denied; give the user running wsi-hipe read "
            "access (e.g. chmod a+r)"
        )
    if path.stat().st_size == 0:
        raise SlideFormatError(f"slide file {path} is empty (0 bytes); the copy is incomplete")


def _open_openslide(path: Path) -> Any:
    import openslide

    _check_readable_file(path)
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideFormatError(
            f"{path} is not a slide format OpenSlide can open ({exc}); supported: {_SUPPORTED}. "
            "Convert plain images to a tiled pyramidal TIFF with µm/px in its resolution tags"
        ) from exc
    except openslide.OpenSlideError as exc:
        raise SlideFormatError(
            f"OpenSlide cannot open {path}: {exc} (corrupt file or unsupported encoding)"
        ) from exc
    except OSError as exc:  # e.g. the file vanished or became unreadable meanwhile
        raise SlideError(f"cannot open slide {path}: {exc}") from exc


def _slide_in_folder(folder: Path) -> Path:
    """The one slide in ``folder`` (e.g. the files of a DICOM WSI), or a clear error."""
    import openslide

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = []
    for f in files:
        try:
            if os.access(f, os.R_OK) and openslide.OpenSlide.detect_format(str(f)):
                candidates.append(f)
        except (openslide.OpenSlideError, OSError):
            continue
    if not candidates:
        raise SlideNotFoundError(
            f"folder {folder} holds no slide OpenSlide can open ({len(files)} files looked at); "
            "pass the slide file itself"
        )
    slides: dict[str, Path] = {}
    failures = []
    for f in candidates:
        try:
            handle = _open_openslide(f)
        except SlideError as exc:
            failures.append(f"{f.name} ({exc.__cause__ or exc})")
            continue
        # Files of one slide (a DICOM series) share OpenSlide's quickhash.
        key = handle.properties.get("openslide.quickhash-1") or str(f)
        handle.close()
        slides.setdefault(key, f)
    if not slides:
        raise SlideFormatError(f"folder {folder}: no slide could be opened: {'; '.join(failures)}")
    if len(slides) > 1:
        names = ", ".join(p.name for p in slides.values())
        raise SlideFormatError(
            f"folder {folder} holds {len(slides)} different slides ({names}); pass one of them"
        )
    return next(iter(slides.values()))


def resolve_slide_path(path: str | os.PathLike[str]) -> Path:
    """The slide file for ``path``: the file itself, or the one slide inside a folder.

    Raises
    ------
    SlideNotFoundError
        Nothing at ``path``, or a folder without a slide.
    SlideFormatError
        A folder with several different slides, or only files OpenSlide cannot open.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideNotFoundError(f"slide not found: {p} (no such file or folder)")
    p = p.resolve()
    if p.is_dir():
        return _slide_in_folder(p)
    return p


def _mpp_from_properties(props: Any, path: Path) -> float | None:
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(props.get(key, "nan"))
        except (TypeError, ValueError):
            v = math.nan
        if math.isfinite(v) and v > 0:
            values.append(v)
    if not values:
        return None
    if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * max(values):
        logger.warning(
            "%s: anisotropic pixels (mpp-x %.6g, mpp-y %.6g); using their mean", path, *values
        )
    return float(sum(values) / len(values))


class OpenSlideReader:
    """:class:`SlideReader` over ``openslide.OpenSlide``.

    Parameters
    ----------
    path : str or PathLike
        A slide file, or a folder holding exactly one slide (e.g. a DICOM WSI).

    Raises
    ------
    SlideNotFoundError, SlideFormatError, SlideError
        Missing path / no slide in a folder; not a slide, corrupt or empty; no permission.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        resolved = resolve_slide_path(path)
        self.path = str(resolved)
        self._osr = _open_openslide(resolved)
        props = self._osr.properties
        self.vendor: str | None = props.get("openslide.vendor")
        self.quickhash: str | None = props.get("openslide.quickhash-1")
        self._mpp = _mpp_from_properties(props, resolved)
        self._dims = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self._downsamples = tuple(float(d) for d in self._osr.level_downsamples)

    def __repr__(self) -> str:
        return f"OpenSlideReader({self.path!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (OpenSlideReader, (self.path,))

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dims[0]

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Premultiplied RGBA (height, width, 4) uint8; raises SlideReadError on bad pixels."""
        import openslide

        try:
            image = self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: cannot read region at level-0 {tuple(location)}, level {level}, "
                f"size {tuple(size)}: {exc} (corrupt pixel data at that place)"
            ) from exc
        rgba = np.asarray(image)
        # openslide-python un-premultiplies; premultiply back where alpha < 255 (rare: edges).
        alpha = rgba[..., 3]
        if alpha.min() < 255:
            rgba = rgba.copy()
            scaled = rgba[..., :3].astype(np.uint16) * alpha[..., None] + 127
            rgba[..., :3] = (scaled // 255).astype(np.uint8)
        return rgba

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """Premultiplied RGBA thumbnail (h, w, 4) uint8 whose longer side is ``<= max_size``."""
        return _reader_thumbnail(self, max_size)

    def close(self) -> None:
        self._osr.close()


class ArrayReader:
    """:class:`SlideReader` serving an image in memory.

    Parameters
    ----------
    array : (H, W), (H, W, 3) or (H, W, 4) ndarray
        uint8, or float in [0, 1] (scaled to 0..255). (H, W) is a single-channel stain (served
        as R = G = B); 4 channels are premultiplied RGBA.
    mpp : float, optional
        µm per px of ``array``; None imitates a slide without metadata.
    downsamples : sequence of int, default (1,)
        Pyramid levels to build by area averaging, starting with 1 (e.g. ``(1, 2, 4)``).
    path : str, default "<array>"
        Name used in messages and provenance.
    """

    vendor = "array"

    def __init__(
        self,
        array: np.ndarray,
        *,
        mpp: float | None = None,
        downsamples: Sequence[int] = (1,),
        path: str = "<array>",
    ) -> None:
        a = np.asarray(array)
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
            raise ValueError(f"array must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
        if a.dtype == np.uint8:
            pass
        elif np.issubdtype(a.dtype, np.floating):
            if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
                raise ValueError("a float array must hold values in [0, 1]; scale it first")
            a = np.round(a * 255.0).astype(np.uint8)
        else:
            raise ValueError(
                f"array must be uint8 or float in [0, 1], got {a.dtype}; convert it, e.g. "
                "(a / a.max() * 255).astype(np.uint8)"
            )
        if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
            raise ValueError(f"mpp must be a positive number of µm per px or None, got {mpp!r}")
        ds = [int(d) for d in downsamples]
        if not ds or ds[0] != 1 or any(b <= a_ for a_, b in zip(ds, ds[1:], strict=False)):
            raise ValueError(
                f"downsamples must start with 1 and increase, e.g. (1, 2, 4), got {downsamples!r}"
            )
        self.path = path
        self._mpp = None if mpp is None else float(mpp)
        self._levels: list[np.ndarray] = []
        for d in ds:
            h, w = a.shape[0] // d, a.shape[1] // d
            if h == 0 or w == 0:
                raise ValueError(f"downsample {d} is larger than the array {a.shape[:2]}")
            if d == 1:
                self._levels.append(a)
                continue
            block = a[: h * d, : w * d].astype(np.float32)
            block = block.reshape(h, d, w, d, *a.shape[2:]).mean(axis=(1, 3))
            self._levels.append(np.round(block).astype(np.uint8))
        self._downsamples = tuple(float(d) for d in ds)

    def __repr__(self) -> str:
        return f"ArrayReader({self.path!r}, shape={self._levels[0].shape}, mpp={self._mpp})"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.shape[1], lv.shape[0]) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        return self._mpp

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Premultiplied RGBA (height, width, 4) uint8; zeros outside the array."""
        if not 0 <= level < len(self._levels):
            raise ValueError(f"level must be in 0..{len(self._levels) - 1}, got {level}")
        width, height = int(size[0]), int(size[1])
        d = self._downsamples[level]
        x = int(math.floor(location[0] / d))
        y = int(math.floor(location[1] / d))
        src = self._levels[level]
        out = np.zeros((height, width, 4), dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, src.shape[1]), min(y + height, src.shape[0])
        if x1 <= x0 or y1 <= y0:
            return out
        part = src[y0:y1, x0:x1]
        dst = out[y0 - y : y1 - y, x0 - x : x1 - x]
        if part.ndim == 2:
            dst[..., :3] = part[..., None]
            dst[..., 3] = 255
        elif part.shape[2] == 3:
            dst[..., :3] = part
            dst[..., 3] = 255
        else:
            dst[...] = part
        return out

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """Premultiplied RGBA thumbnail (h, w, 4) uint8 whose longer side is ``<= max_size``."""
        return _reader_thumbnail(self, max_size)

    def close(self) -> None:
        """Nothing to release."""


# --- per-process handle cache ----------------------------------------------------------------

_READERS: OrderedDict[tuple[str, int], OpenSlideReader] = OrderedDict()
_READERS_LOCK = threading.Lock()


def open_reader(path: str | os.PathLike[str]) -> OpenSlideReader:
    """An :class:`OpenSlideReader` for ``path`` from this process's LRU cache.

    Handles are never shared between processes (the key holds the pid); evicted handles are
    released when the last reference goes, so a thread still reading is not disturbed.
    """
    key = (str(path), os.getpid())
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is not None:
            _READERS.move_to_end(key)
            return reader
    reader = OpenSlideReader(path)
    with _READERS_LOCK:
        _READERS[key] = reader
        _READERS.move_to_end(key)
        while len(_READERS) > READER_CACHE_SIZE:
            _READERS.popitem(last=False)
    return reader


def _evict_reader(path: str) -> None:
    with _READERS_LOCK:
        _READERS.pop((path, os.getpid()), None)


def clear_reader_cache() -> None:
    """Forget every cached OpenSlide handle of this process."""
    with _READERS_LOCK:
        _READERS.clear()


# --------------------------------------------------------------------------------------------
# Resampling core
# --------------------------------------------------------------------------------------------


def _pick_level(downsamples: Sequence[float], scale: float) -> int:
    """Index of the level with the largest downsample ``<= scale·(1 + LEVEL_RTOL)``."""
    best = 0
    for i, d in enumerate(downsamples):
        if d <= scale * (1 + LEVEL_RTOL) and d >= downsamples[best]:
            best = i
    return best


@functools.lru_cache(maxsize=256)
def _area_weights(start: float, ratio: float, n_out: int, n_in: int) -> Any:
    """Sparse (n_out, n_in) box-filter weights (cached: tiles of a grid share a few offsets).

    Output px ``i`` covers source ``[start + i·ratio, start + (i+1)·ratio)``; source px ``j``
    covers ``[j, j+1)``; weight = overlap / ratio (rows sum to 1 where the source is present).
    """
    from scipy import sparse

    a = start + np.arange(n_out, dtype=np.float64) * ratio
    b = a + ratio
    k = int(math.ceil(ratio)) + 1
    j = np.floor(a).astype(np.int64)[:, None] + np.arange(k)[None, :]
    overlap = np.minimum(b[:, None], j + 1.0) - np.maximum(a[:, None], j.astype(np.float64))
    rows = np.broadcast_to(np.arange(n_out)[:, None], j.shape)
    keep = (overlap > 1e-12) & (j >= 0) & (j < n_in)
    return sparse.csr_matrix(
        ((overlap[keep] / ratio).astype(np.float32), (rows[keep], j[keep])), shape=(n_out, n_in)
    )


Extract = Callable[[np.ndarray], np.ndarray]


def _read_block(
    reader: SlideReader,
    x0: float,
    y0: float,
    width: int,
    height: int,
    scale: float,
    level: int,
    extract: Extract,
) -> np.ndarray:
    """One block: read the covering window of ``level`` and resample it to (height, width)."""
    ds = reader.level_downsamples[level]
    lw, lh = reader.level_dimensions[level]
    ratio = scale / ds  # level px per output px
    ax, ay = x0 / ds, y0 / ds  # region start in level px
    direct = (
        abs(ratio - 1.0) <= LEVEL_RTOL
        and abs(ax - round(ax)) <= 1e-6
        and abs(ay - round(ay)) <= 1e-6
    )
    if direct:
        jx0, jy0 = round(ax), round(ay)
        jx1, jy1 = jx0 + width, jy0 + height
    else:
        jx0, jy0 = math.floor(ax), math.floor(ay)
        jx1 = math.ceil(ax + width * ratio - 1e-9)
        jy1 = math.ceil(ay + height * ratio - 1e-9)
    cx0, cy0, cx1, cy1 = max(jx0, 0), max(jy0, 0), min(jx1, lw), min(jy1, lh)
    inside = (cx0, cy0, cx1, cy1) == (jx0, jy0, jx1, jy1)
    if inside:  # the whole window lies on the slide: no padding, no copy
        location = (int(round(jx0 * ds)), int(round(jy0 * ds)))
        window = extract(reader.read_region(location, level, (jx1 - jx0, jy1 - jy0)))
    else:
        probe = extract(np.zeros((1, 1, 4), dtype=np.uint8))
        window = np.zeros((jy1 - jy0, jx1 - jx0, *probe.shape[2:]), dtype=np.float32)
        if cx1 > cx0 and cy1 > cy0:
            location = (int(round(cx0 * ds)), int(round(cy0 * ds)))
            rgba = reader.read_region(location, level, (cx1 - cx0, cy1 - cy0))
            window[cy0 - jy0 : cy1 - jy0, cx0 - jx0 : cx1 - jx0] = extract(rgba)
    if direct:
        return window
    wy = _area_weights(ay - jy0, ratio, height, window.shape[0])
    wx = _area_weights(ax - jx0, ratio, width, window.shape[1])
    flat = window.reshape(window.shape[0], window.shape[1], -1)
    out = np.empty((height, width, flat.shape[2]), dtype=np.float32)
    for c in range(flat.shape[2]):
        out[..., c] = (wx @ (wy @ flat[..., c]).T).T
    return out.reshape(height, width, *window.shape[2:])


def _read_resampled(
    reader: SlideReader,
    x0: float,
    y0: float,
    width: int,
    height: int,
    scale: float,
    extract: Extract,
) -> np.ndarray:
    """Region at ``scale`` level-0 px per output px, read in blocks of bounded size."""
    level = _pick_level(reader.level_downsamples, scale)
    ratio = scale / reader.level_downsamples[level]
    step = max(1, int(BLOCK_SIDE / max(ratio, 1.0)))
    if width <= step and height <= step:
        return _read_block(reader, x0, y0, width, height, scale, level, extract)
    probe = extract(np.zeros((1, 1, 4), dtype=np.uint8))
    out = np.empty((height, width, *probe.shape[2:]), dtype=np.float32)
    for i in range(0, height, step):
        for j in range(0, width, step):
            h, w = min(step, height - i), min(step, width - j)
            out[i : i + h, j : j + w] = _read_block(
                reader, x0 + j * scale, y0 + i * scale, w, h, scale, level, extract
            )
    return out


def _as_float(rgba: np.ndarray) -> np.ndarray:
    return rgba.astype(np.float32)


def _thumbnail_geometry(dimensions: tuple[int, int], max_size: int) -> tuple[float, int, int]:
    """``(scale, width, height)``: level-0 px per thumbnail px and the thumbnail size."""
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer (px), got {max_size!r}")
    w0, h0 = dimensions
    scale = max(1.0, max(w0, h0) / max_size)
    return scale, max(1, math.ceil(w0 / scale - 1e-9)), max(1, math.ceil(h0 / scale - 1e-9))


def _reader_thumbnail(reader: SlideReader, max_size: int) -> np.ndarray:
    scale, w, h = _thumbnail_geometry(reader.dimensions, max_size)
    rgba = _read_resampled(reader, 0.0, 0.0, w, h, scale, _as_float)
    return np.clip(np.round(rgba), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Slide
# --------------------------------------------------------------------------------------------


def _channel_option(channel: Any) -> str | int:
    if isinstance(channel, str):
        key = channel.lower()
        if key in ("auto", "mean"):
            return key
        if key in CHANNEL_NAMES:
            return CHANNEL_NAMES[key]
    elif isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
        if 0 <= int(channel) <= 2:
            return int(channel)
    raise ValueError(
        "channel must be 'auto', 'mean', 0/1/2 or 'red'/'green'/'blue' (config key "
        f"slide.channel), got {channel!r}"
    )


def _rgb_mean(rgba: np.ndarray) -> np.ndarray:
    """Mean of R, G, B as float32 (h, w) (explicit sums: ~15x faster than ``mean(axis=-1)``)."""
    out = rgba[..., 0].astype(np.float32)
    out += rgba[..., 1]
    out += rgba[..., 2]
    out *= np.float32(1.0 / 3.0)
    return out


def _extractor(mode: str, channel: int | None) -> Extract:
    """Map premultiplied RGBA uint8 (h, w, 4) to the raw stain, float32 (h, w) in 0..255."""
    if mode == "gray":

        def extract(rgba: np.ndarray) -> np.ndarray:
            return _rgb_mean(rgba)

    elif mode == "channel":

        def extract(rgba: np.ndarray) -> np.ndarray:
            return rgba[..., channel].astype(np.float32)

    elif mode == "inverted":
        if channel is None:

            def extract(rgba: np.ndarray) -> np.ndarray:
                out = _rgb_mean(rgba)
                np.subtract(rgba[..., 3], out, out=out)
                return out

        else:

            def extract(rgba: np.ndarray) -> np.ndarray:
                out = rgba[..., 3].astype(np.float32)
                out -= rgba[..., channel]
                return out

    else:  # pragma: no cover - internal
        raise ValueError(f"unknown stain mode {mode!r}")
    return extract


@dataclass(frozen=True)
class _Stain:
    mode: str  # "gray" | "channel" | "inverted"
    channel: int | None
    method: str  # how it was chosen, for the log and provenance
    brightfield: bool
    low: float
    high: float
    intensity_method: str


class Slide:
    """A slide read as a normalised single-stain image. Make it with :func:`open_slide`.

    Attributes
    ----------
    path : str
        The slide file (or the reader's name).
    mpp : float
        µm per level-0 px (after an override).
    dimensions : (int, int)
        Level-0 ``(width, height)`` in px.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | SlideReader,
        *,
        mpp: float | None = None,
        channel: str | int = "auto",
        normalize: bool = True,
        allow_brightfield: bool = False,
        intensity: tuple[float, float] | None = None,
        analysis_size: int = ANALYSIS_SIZE,
    ) -> None:
        self._channel_opt = _channel_option(channel)
        if mpp is not None and not (
            isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0
        ):
            raise ValueError(
                f"mpp must be a positive number of µm per px (--mpp / slide.mpp), got {mpp!r}"
            )
        if intensity is not None:
            low, high = (float(v) for v in intensity)
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(
                    f"intensity must be (low, high) raw values with high > low, got {intensity!r}"
                )
            intensity = (low, high)
        self._normalize = bool(normalize)
        self._allow_brightfield = bool(allow_brightfield)
        self._intensity_opt = intensity
        self._analysis_size = int(analysis_size)
        self._mpp_override = None if mpp is None else float(mpp)
        self._stain: _Stain | None = None
        self._extract: Extract | None = None
        if isinstance(source, (str, os.PathLike)):
            reader = open_reader(resolve_slide_path(source))
            self._path: str | None = reader.path
            self._array_reader: SlideReader | None = None
        elif isinstance(source, SlideReader):
            self._path = None
            self._array_reader = source
            reader = source
        else:
            raise TypeError(
                f"open_slide needs a path or a SlideReader, got {type(source).__name__}"
            )
        self._bind(reader)

    # --- pickling: path + options + resolved stain settings; handles reopen lazily ----------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_extract"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _bind(self, reader: SlideReader) -> None:
        mpp = self._mpp_override if self._mpp_override is not None else reader.mpp
        if mpp is None:
            raise MissingMppError(
                f"slide {reader.path} has no µm/px metadata (openslide.mpp-x); pass --mpp 0.5 "
                "(µm per level-0 px) or set slide.mpp in the config"
            )
        self.path = reader.path
        self.mpp = float(mpp)
        self.mpp_source = "override" if self._mpp_override is not None else "metadata"
        self.dimensions = tuple(reader.dimensions)
        self.level_dimensions = tuple(tuple(d) for d in reader.level_dimensions)
        self.level_downsamples = tuple(reader.level_downsamples)
        self.vendor = getattr(reader, "vendor", None)
        self.quickhash = getattr(reader, "quickhash", None)

    @property
    def reader(self) -> SlideReader:
        """The slide reader of this process (reopened from the cache after unpickling)."""
        if self._array_reader is not None:
            return self._array_reader
        return open_reader(str(self._path))

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, dimensions={self.dimensions}, mpp={self.mpp:.4g})"

    def close(self) -> None:
        """Drop this process's cached handle of the slide (a later read reopens it)."""
        if self._path is not None:
            _evict_reader(self._path)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stain analysis -------------------------------------------------------------------

    def _read_raw(
        self, x0: float, y0: float, width: int, height: int, scale: float, extract: Extract
    ) -> np.ndarray:
        try:
            return _read_resampled(self.reader, x0, y0, width, height, scale, extract)
        except SlideReadError:
            if self._path is not None:
                _evict_reader(self._path)  # an OpenSlide handle stays broken after an error
            raise

    def _analyse(self) -> _Stain:
        if self._stain is not None:
            return self._stain
        opt = self._channel_opt
        # The thumbnail is needed to detect the layout (auto), to check for brightfield when
        # inversion is allowed, and for the percentiles.
        need_layout = opt == "auto" or self._allow_brightfield
        need_range = self._normalize and self._intensity_opt is None
        thumb = None
        scale = 1.0
        if need_layout or need_range:
            scale, w, h = _thumbnail_geometry(self.dimensions, self._analysis_size)
            thumb = self._read_raw(0.0, 0.0, w, h, scale, _as_float)
        brightfield = need_layout and thumb is not None and self._looks_brightfield(thumb)
        fixed = None if opt in ("auto", "mean") else int(opt)
        if brightfield:
            if not self._allow_brightfield:
                raise StainError(
                    f"slide {self.path} looks like RGB brightfield (most of it is bright in "
                    "every channel, e.g. H&E), not a fluorescence nuclear stain; the model "
                    "expects bright nuclei on a dark background. Pass allow_brightfield=True "
                    "(slide.allow_brightfield) to invert it, or an explicit channel "
                    "(slide.channel) if it is fluorescence after all"
                )
            what = "mean of R, G, B" if fixed is None else f"channel {fixed}"
            mode, channel = "inverted", fixed
            method = f"{'auto' if opt == 'auto' else 'explicit'}: brightfield, inverted {what}"
            logger.warning(
                "%s: brightfield slide; inverting it (alpha - %s) so that dark nuclei read "
                "bright (allow_brightfield)",
                self.path,
                what,
            )
        elif opt == "auto" and thumb is not None:
            mode, channel, method = self._detect_channel(thumb)
        elif opt == "mean":
            mode, channel, method = "gray", None, "explicit: mean of R, G, B"
        else:
            mode, channel = "channel", fixed
            method = f"explicit: channel {fixed} ({_NAME_OF_CHANNEL[int(opt)]})"
        extract = _extractor(mode, channel)
        if not self._normalize:
            low, high, how = 0.0, 255.0, "none (x / 255)"
        elif self._intensity_opt is not None:
            low, high = self._intensity_opt
            how = "explicit"
        elif thumb is not None:
            low, high, how = self._intensity_range(
                extract(thumb), thumb[..., 3] > 0, scale, extract
            )
        stain = _Stain(mode, channel, method, brightfield, low, high, how)
        logger.info(
            "%s: stain %s; intensity low %.4g, high %.4g (%s)", self.path, method, low, high, how
        )
        self._stain = stain
        return stain

    @staticmethod
    def _looks_brightfield(thumb: np.ndarray) -> bool:
        """Most scanned pixels bright in every channel (median of min(R, G, B) > 50 %)."""
        scanned = thumb[..., 3] > 0
        if not scanned.any():
            return False
        alpha = thumb[..., 3][scanned][:, None]
        straight = thumb[..., :3][scanned] * (255.0 / alpha)
        return float(np.median(straight.min(axis=1))) > 127.5

    def _detect_channel(self, thumb: np.ndarray) -> tuple[str, int | None, str]:
        scanned = thumb[..., 3] > 0
        if not scanned.any():
            logger.warning("%s: the thumbnail holds no scanned pixels; treating as gray", self.path)
            return "gray", None, "auto: no scanned pixels, mean of R, G, B"
        rgb = thumb[..., :3][scanned]  # premultiplied
        spread = rgb.max(axis=1) - rgb.min(axis=1)
        peak = float(np.percentile(rgb.max(axis=1), 99))
        if float(np.percentile(spread, 99)) <= 0.05 * peak + 2.0:
            return "gray", None, "auto: single channel (R = G = B), mean of R, G, B"
        ranges = np.percentile(rgb, HIGH_PERCENTILE, axis=0) - np.percentile(
            rgb, LOW_PERCENTILE, axis=0
        )
        order = np.argsort(ranges)[::-1]
        best, second = int(order[0]), int(order[1])
        detail = ", ".join(f"{_NAME_OF_CHANNEL[c]} {ranges[c]:.1f}" for c in range(3))
        if ranges[second] >= 0.5 * ranges[best]:
            logger.warning(
                "%s: more than one channel carries signal (range %s); using %s. If this is a "
                "multi-stain slide set the nuclear channel with slide.channel",
                self.path,
                detail,
                _NAME_OF_CHANNEL[best],
            )
        method = (
            f"auto: channel {best} ({_NAME_OF_CHANNEL[best]}) carries the signal (range {detail})"
        )
        return "channel", best, method

    def _intensity_range(
        self, stain: np.ndarray, scanned: np.ndarray, scale: float, extract: Extract
    ) -> tuple[float, float, str]:
        values = stain[scanned] if scanned.any() else stain.ravel()
        low = float(np.percentile(values, LOW_PERCENTILE))
        tissue = detect_tissue(stain, downsample=scale, mpp=self.mpp).mask & scanned
        where = "tissue"
        if tissue.sum() < 16:
            tissue, where = scanned, "scanned (no tissue found)"
        sample_mpp = max(self.mpp, NORM_MPP)
        samples = None
        if self.mpp * scale > NORM_THUMB_RATIO * sample_mpp and tissue.any():
            # The thumbnail averages nuclei with their surroundings; take the bright end from
            # tissue regions read at nuclear resolution instead.
            samples = self._tissue_samples(tissue, scale, sample_mpp, extract)
        if samples is not None and samples.size:
            high = float(np.percentile(samples, HIGH_PERCENTILE))
            n = samples.size // NORM_SAMPLE_SIZE**2
            source = (
                f"p{HIGH_PERCENTILE:g} of {n} tissue samples of {NORM_SAMPLE_SIZE}x"
                f"{NORM_SAMPLE_SIZE} px at {sample_mpp:g} µm/px"
            )
        else:
            high = float(np.percentile(stain[tissue], HIGH_PERCENTILE)) if tissue.any() else low
            source = f"p{HIGH_PERCENTILE:g} of {where} px"
        if high - low < 1.0:
            logger.warning(
                "%s: the thumbnail has almost no contrast (low %.3g, high %.3g); using high = "
                "low + 1",
                self.path,
                low,
                high,
            )
            high = low + 1.0
        how = (
            f"thumbnail {stain.shape[1]}x{stain.shape[0]}: low = p{LOW_PERCENTILE:g} of scanned "
            f"px, high = {source}; x -> clip((x - low) / (high - low), 0, {CLIP_MAX:g})"
        )
        return low, high, how

    def _tissue_samples(
        self, tissue: np.ndarray, scale: float, sample_mpp: float, extract: Extract
    ) -> np.ndarray | None:
        """Raw stain of up to NORM_SAMPLES regions centred on tissue, at ``sample_mpp``."""
        rows, cols = np.nonzero(tissue)
        picks = np.unique(np.linspace(0, rows.size - 1, NORM_SAMPLES).round().astype(int))
        sample_scale = sample_mpp / self.mpp
        half = NORM_SAMPLE_SIZE / 2 * sample_scale
        parts = []
        for i in picks:  # row-major tissue order, evenly spaced: deterministic and spread
            cx, cy = (cols[i] + 0.5) * scale, (rows[i] + 0.5) * scale
            try:
                parts.append(
                    self._read_raw(
                        cx - half,
                        cy - half,
                        NORM_SAMPLE_SIZE,
                        NORM_SAMPLE_SIZE,
                        sample_scale,
                        extract,
                    ).ravel()
                )
            except SlideReadError as exc:
                logger.debug("%s: normalisation sample skipped: %s", self.path, exc)
        return np.concatenate(parts) if parts else None

    def _ensure_analysed(self) -> tuple[_Stain, Extract]:
        stain = self._analyse()
        if self._extract is None:
            self._extract = _extractor(stain.mode, stain.channel)
        return stain, self._extract

    @property
    def channel(self) -> int | None:
        """The RGB channel read as the stain, or None (single channel: mean of R, G, B)."""
        return self._analyse().channel

    @property
    def intensity(self) -> tuple[float, float]:
        """``(low, high)`` raw stain values (0..255) mapped to 0 and 1."""
        stain = self._analyse()
        return stain.low, stain.high

    # --- reading --------------------------------------------------------------------------

    def _normalise(self, raw: np.ndarray, stain: _Stain) -> np.ndarray:
        raw -= np.float32(stain.low)
        raw *= np.float32(1.0 / (stain.high - stain.low))
        np.clip(raw, 0.0, CLIP_MAX, out=raw)
        return raw

    def read(self, x0: float, y0: float, width: int, height: int, *, mpp: float) -> np.ndarray:
        """Read a region of the normalised stain at a target resolution.

        Parameters
        ----------
        x0, y0 : float
            Level-0 px position of the region's top-left corner (may be fractional or outside
            the slide).
        width, height : int
            Region size in target px.
        mpp : float
            Target µm per px.

        Returns
        -------
        (height, width) float32 ndarray
            Normalised stain (background ≈ 0, bright nuclei ≈ 1, clipped to [0, CLIP_MAX]);
            0 outside the slide.

        Raises
        ------
        SlideReadError
            The pixels of this region cannot be decoded (other regions may still read).
        StainError
            The slide looks like brightfield and ``allow_brightfield`` is off.
        """
        if not (isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a positive number of µm per target px, got {mpp!r}")
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer (target px), got {v!r}")
        if not (math.isfinite(x0) and math.isfinite(y0)):
            raise ValueError(f"x0, y0 must be finite level-0 px, got {(x0, y0)!r}")
        stain, extract = self._ensure_analysed()
        scale = float(mpp) / self.mpp
        raw = self._read_raw(float(x0), float(y0), int(width), int(height), scale, extract)
        return self._normalise(raw, stain)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide as a normalised stain image, longer side ``<= max_size``.

        Returns
        -------
        (h, w) float32 ndarray
            Thumbnail px ``(r, c)`` covers level-0 ``[c·d, (c+1)·d) x [r·d, (r+1)·d)`` with
            ``d = thumbnail_downsample(max_size)``.
        """
        stain, extract = self._ensure_analysed()
        scale, w, h = _thumbnail_geometry(self.dimensions, max_size)
        return self._normalise(self._read_raw(0.0, 0.0, w, h, scale, extract), stain)

    def thumbnail_downsample(self, max_size: int = 1024) -> float:
        """Level-0 px per px of ``thumbnail(max_size)``."""
        return _thumbnail_geometry(self.dimensions, max_size)[0]

    def detect_tissue(self, *, max_size: int = 1024, **options: Any) -> TissueMask:
        """Tissue mask from ``thumbnail(max_size)``; options go to :func:`detect_tissue`."""
        return detect_tissue(
            self.thumbnail(max_size),
            downsample=self.thumbnail_downsample(max_size),
            mpp=self.mpp,
            **options,
        )

    def provenance(self) -> dict[str, Any]:
        """Where the pixels came from and how they were turned into the stain image."""
        stain = self._analyse()
        return {
            "path": self.path,
            "reader": type(self.reader).__name__,
            "vendor": self.vendor,
            "quickhash": self.quickhash,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "dimensions": list(self.dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "stain_mode": stain.mode,
            "channel": stain.channel,
            "channel_method": stain.method,
            "brightfield": stain.brightfield,
            "normalize": self._normalize,
            "intensity_low": stain.low,
            "intensity_high": stain.high,
            "intensity_method": stain.intensity_method,
            "clip_max": CLIP_MAX,
        }


def open_slide(
    path_or_reader: str | os.PathLike[str] | SlideReader,
    *,
    mpp: float | None = None,
    channel: str | int = "auto",
    normalize: bool = True,
    allow_brightfield: bool = False,
    intensity: tuple[float, float] | None = None,
    analysis_size: int = ANALYSIS_SIZE,
) -> Slide:
    """Open a slide for reading at a target resolution.

    Parameters
    ----------
    path_or_reader : str, PathLike or SlideReader
        A slide file, a folder holding one slide (DICOM), or a reader (e.g. ArrayReader).
    mpp : float, optional
        µm per level-0 px; overrides the metadata (``--mpp`` / ``slide.mpp``).
    channel : {'auto', 'mean', 0, 1, 2, 'red', 'green', 'blue'}, default 'auto'
        Which RGB channel holds the stain (see the module docs).
    normalize : bool, default True
        Scale intensities from thumbnail percentiles; False gives ``x / 255``.
    allow_brightfield : bool, default False
        Accept an RGB brightfield slide by inverting it instead of raising StainError.
    intensity : (float, float), optional
        Raw ``(low, high)`` values (0..255) mapped to 0 and 1, instead of the percentiles.
    analysis_size : int, default 1024
        Longer side of the thumbnail used to detect the channel and the intensity range.

    Returns
    -------
    Slide
        The channel and intensity range are found now; when the thumbnail's pixels cannot be
        decoded, that is logged and retried at the first read, which then raises
        SlideReadError.

    Raises
    ------
    SlideNotFoundError, SlideFormatError, SlideError
        Missing path, no/several slides in a folder, not a slide, corrupt, empty, no permission.
    MissingMppError
        No µm/px metadata and no ``mpp``.
    StainError
        RGB brightfield without ``allow_brightfield`` (and ``channel='auto'``).
    """
    slide = Slide(
        path_or_reader,
        mpp=mpp,
        channel=channel,
        normalize=normalize,
        allow_brightfield=allow_brightfield,
        intensity=intensity,
        analysis_size=analysis_size,
    )
    try:
        slide._analyse()
    except SlideReadError as exc:
        logger.warning("%s: cannot analyse the thumbnail yet (%s)", slide.path, exc)
    return slide


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileData:
    """One streamed tile: the tile, its window (or None) and the read error (or None)."""

    tile: Any
    image: np.ndarray | None
    error: SlideReadError | None = None


def iter_tiles(slide: Slide, grid: Any, *, halo: bool = True) -> Iterator[TileData]:
    """Read the tiles of a grid one at a time (bounded memory: one window alive per step).

    Parameters
    ----------
    slide : Slide
        The slide the grid was made for.
    grid : TileGrid
        From :func:`wsi_hipe.tiling.make_grid` with this slide's dimensions and mpp.
    halo : bool, default True
        Read core + halo windows (``grid.window`` square) or only the cores.

    Yields
    ------
    TileData
        ``image`` is (h, w) float32; a tile whose pixels cannot be decoded comes with
        ``image=None`` and its ``SlideReadError``, and the stream goes on.
    """
    if tuple(grid.level0_size) != tuple(slide.dimensions) or not math.isclose(
        grid.slide_mpp, slide.mpp, rel_tol=1e-9
    ):
        raise ValueError(
            f"grid was made for a slide of {grid.level0_size} px at {grid.slide_mpp} µm/px, "
            f"not {slide.dimensions} at {slide.mpp}; make it with make_grid(slide.dimensions, "
            "slide_mpp=slide.mpp, ...)"
        )
    for tile in grid.tiles:
        x0, y0, w, h = grid.read_window(tile, halo=halo)
        try:
            image = slide.read(x0, y0, w, h, mpp=grid.target_mpp)
        except SlideReadError as exc:
            yield TileData(tile, None, exc)
            continue
        yield TileData(tile, image)
