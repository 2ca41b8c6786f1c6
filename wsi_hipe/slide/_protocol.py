"""What every slide reader provides (:class:`SlideReader`), and what all backends share.

A backend (OpenSlide, an array in memory; next tifffile and OME-Zarr) is one module of this
package holding one class that satisfies :class:`SlideReader`; :class:`wsi_hipe.slide.Slide`
needs nothing else from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from wsi_hipe.errors import SlideError, SlideFormatError

__all__ = ["SlideReader", "SLIDE_SUFFIXES", "CLIP_MAX", "check_readable_file"]

#: File name endings taken as slides (a folder given as batch input, the napari reader). The
#: readers decide by content; these are only a first filter.
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)  # fmt: skip

#: Upper clip of normalised intensities (bright nuclei ≈ 1; a little headroom above).
CLIP_MAX = 1.5


@runtime_checkable
class SlideReader(Protocol):
    """What :class:`~wsi_hipe.slide.Slide` needs from a slide library.

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


def check_readable_file(path: Path) -> None:
    """Raise the error that says what is wrong with ``path`` as a slide file, if anything.

    Raises
    ------
    SlideFormatError
        Not a regular file, or empty.
    SlideError
        No read permission.
    """
    if not path.is_file():
        raise SlideFormatError(f"slide {path} is not a regular file; pass a slide file or folder")
    if not os.access(path, os.R_OK):
        raise SlideError(
            f"cannot read slide {path}: permission denied; give the user running wsi-hipe read "
            "access (e.g. chmod a+r)"
        )
    if path.stat().st_size == 0:
        raise SlideFormatError(f"slide file {path} is empty (0 bytes); the copy is incomplete")
