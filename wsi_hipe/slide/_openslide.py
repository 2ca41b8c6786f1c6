"""The OpenSlide backend: :class:`OpenSlideReader`, slide paths, and this process's handles.

OpenSlide reads the vendor formats (SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM, generic
tiled TIFF, ...). Handles are opened per process and kept in a :class:`~wsi_hipe.cache.
ProcessCache` (:func:`open_reader`), so a Dask worker never uses a handle its parent opened;
a handle that failed to decode a region is dropped (:func:`evict_reader`) and reopened by the
next read, because an OpenSlide handle stays broken after an error.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.cache import ProcessCache
from wsi_hipe.errors import SlideError, SlideFormatError, SlideNotFoundError, SlideReadError
from wsi_hipe.slide._protocol import check_readable_file
from wsi_hipe.slide._resample import reader_thumbnail

__all__ = [
    "OpenSlideReader",
    "READER_CACHE_SIZE",
    "clear_reader_cache",
    "evict_reader",
    "open_reader",
    "resolve_slide_path",
]

logger = logging.getLogger(__name__)

#: Number of OpenSlide handles kept open per process.
READER_CACHE_SIZE = 8

_SUPPORTED = (
    "Aperio .svs/.tif, Hamamatsu .ndpi/.vms/.vmu, Leica .scn, MIRAX .mrxs, Philips .tiff, "
    "Sakura .svslide, Ventana .bif/.tif, Zeiss .czi, DICOM WSI, generic tiled pyramidal TIFF"
)


def _open_openslide(path: Path) -> Any:
    import openslide

    check_readable_file(path)
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
        return reader_thumbnail(self, max_size)

    def close(self) -> None:
        self._osr.close()


# --- per-process handle cache ----------------------------------------------------------------

#: This process's OpenSlide handles, keyed by the slide path. Evicted handles are not closed:
#: they are released when the last reference goes, so a thread still reading is not disturbed.
_READERS: ProcessCache[OpenSlideReader] = ProcessCache(
    "slide readers", maxsize=READER_CACHE_SIZE, close_evicted=False
)


def open_reader(path: str | os.PathLike[str]) -> OpenSlideReader:
    """An :class:`OpenSlideReader` for ``path`` from this process's LRU cache.

    Handles are never shared between processes (the cache is per pid); evicted handles are
    released when the last reference goes, so a thread still reading is not disturbed.
    """
    key = str(path)
    return _READERS.get(key, lambda: OpenSlideReader(key))


def evict_reader(path: str) -> None:
    """Forget this process's cached handle of ``path`` (the next :func:`open_reader` reopens)."""
    _READERS.pop(str(path))


def clear_reader_cache() -> None:
    """Forget every cached OpenSlide handle of this process."""
    _READERS.clear()
