"""Facts about a slide file shared by the tifffile and OME-Zarr readers: µm/px and levels.

µm per pixel
------------
A file states its pixel size in a length unit (OME ``PhysicalSizeX`` + ``PhysicalSizeXUnit``,
NGFF axis ``unit``, TIFF ``XResolution`` pixels per ``ResolutionUnit``). :func:`to_micrometres`
converts it; :func:`check_mpp` accepts it only inside :data:`PLAUSIBLE_MPP` and otherwise
says why not (e.g. a CyCIF crop whose OME says 10000 µm per px: a slide is never that coarse).
A reader keeps an unusable value as ``mpp = None`` and the reason in ``mpp_note``, so the
caller's "pass --mpp" error can say what the file claimed.

Level downsamples
-----------------
Halving a level of odd size rounds (100 → 50 → 25 → 12), so the ratio of the level-0 size to a
level's size is not the factor the level was made with (100 / 12 = 8.33, made with 8).
:func:`level_downsample` returns the integer factor ``d`` whenever ``floor`` or ``ceil`` of
``size / d`` gives the level's size on both axes, and the mean ratio (OpenSlide's rule)
otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

__all__ = [
    "PLAUSIBLE_MPP",
    "LENGTH_UNITS",
    "MppInfo",
    "to_micrometres",
    "check_mpp",
    "mpp_from_xy",
    "level_downsample",
    "level_downsamples",
]

logger = logging.getLogger(__name__)

#: µm per px that a slide's metadata may claim (0.02 µm: beyond super-resolution; 50 µm: a
#: coarse overview). Outside it the metadata is refused and the caller must pass the value.
PLAUSIBLE_MPP = (0.02, 50.0)

#: Micrometres per unit, for the length units of OME (UnitsLength) and NGFF (UDUNITS-2 names).
LENGTH_UNITS: dict[str, float] = {
    "pm": 1e-6, "picometer": 1e-6,
    "å": 1e-4, "angstrom": 1e-4,
    "nm": 1e-3, "nanometer": 1e-3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "mm": 1e3, "millimeter": 1e3,
    "cm": 1e4, "centimeter": 1e4,
    "dm": 1e5, "decimeter": 1e5,
    "m": 1e6, "meter": 1e6,
    "in": 25400.0, "inch": 25400.0,
    "thou": 25.4, "mil": 25.4,
}  # fmt: skip


@dataclass(frozen=True)
class MppInfo:
    """µm per level-0 px as a file states it.

    Attributes
    ----------
    mpp : float or None
        Usable µm/px (isotropic mean of x and y), or None.
    source : str or None
        Where it came from, e.g. ``"OME PhysicalSizeX/Y"``; None when the file has none.
    note : str or None
        Why ``mpp`` is None although the file states something (implausible, unknown unit), or
        None.
    """

    mpp: float | None
    source: str | None
    note: str | None = None


def to_micrometres(value: float, unit: str | None) -> float | None:
    """``value`` in ``unit`` as µm (``unit`` None means µm, OME's default); None if unknown."""
    if unit is None or unit == "":
        return float(value)
    factor = LENGTH_UNITS.get(unit.strip().lower()) or LENGTH_UNITS.get(unit.strip())
    if factor is None:
        return None
    return float(value) * factor


def check_mpp(mpp: float, source: str, path: str) -> MppInfo:
    """Accept ``mpp`` (µm/px) from ``source`` when it lies in :data:`PLAUSIBLE_MPP`."""
    lo, hi = PLAUSIBLE_MPP
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        note = (
            f"its {source} gives {mpp:.6g} µm/px, which is implausible for a slide (expected "
            f"{lo:g}-{hi:g} µm/px)"
        )
        logger.warning("%s: %s; ignoring it", path, note)
        return MppInfo(None, source, note)
    return MppInfo(float(mpp), source)


def mpp_from_xy(x_um: float | None, y_um: float | None, source: str, path: str) -> MppInfo:
    """µm/px from the x and y pixel sizes in µm (either may be None: the other is used)."""
    values = [v for v in (x_um, y_um) if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return MppInfo(None, None)
    if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * max(values):
        logger.warning(
            "%s: anisotropic pixels (%.6g x %.6g µm); using their mean", path, values[0], values[1]
        )
    return check_mpp(sum(values) / len(values), source, path)


def level_downsample(size0: tuple[int, int], size: tuple[int, int]) -> float:
    """Level-0 px per px of a level of ``size`` (w, h), from the level-0 ``size0`` (w, h)."""
    (w0, h0), (w, h) = size0, size
    ratio = (w0 / w + h0 / h) / 2.0
    d = round(ratio)
    if d >= 1:
        fits_w = w in (w0 // d, -(-w0 // d))
        fits_h = h in (h0 // d, -(-h0 // d))
        if fits_w and fits_h:
            return float(d)
    return float(ratio)


def level_downsamples(dimensions: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """:func:`level_downsample` of every level (the first is 1)."""
    return tuple(level_downsample(dimensions[0], d) for d in dimensions)
