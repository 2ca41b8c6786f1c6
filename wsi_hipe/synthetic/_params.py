"""What a virtual slide is made of before anything is drawn: per-seed parameters, argument checks.

**Slide parameters** (PSF width, photon budget, brightness of each nucleus class, how much
tissue, how many lymphocyte clusters, ...) are drawn once per seed, so different seeds give
visibly different slides. The cell classes and their lattices (:data:`LATTICES`) are the same
for every seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from wsi_hipe.synthetic._noise import domain, uniform

__all__ = [
    "CELL_CLASSES",
    "LATTICES",
    "Lattice",
    "MAX_CELL_RADIUS_UM",
    "SlideParams",
    "check_int",
    "check_mpp",
    "check_seed",
    "check_size",
    "slide_params",
]

#: class code -> class name; code 0 is "no cell".
CELL_CLASSES = {1: "lymphocyte", 2: "tumour", 3: "stromal"}

#: No nucleus reaches further than this (µm) from its centre.
MAX_CELL_RADIUS_UM = 13.0


@dataclass(frozen=True)
class Lattice:
    """One class of nuclei: a jittered square lattice of sites, at most one nucleus each."""

    name: str
    code: int
    spacing_um: float
    jitter: float  # centre offset from the site centre, as a fraction of the spacing (< 0.5)
    min_separation: float  # neighbours closer than this × (r1 + r2) are resolved by priority


#: The lattices, drawn in this order.
LATTICES = (
    Lattice("lymphocyte", 1, 8.0, 0.3, 0.72),
    Lattice("tumour", 2, 12.0, 0.3, 0.55),
    Lattice("stromal", 3, 15.0, 0.35, 0.4),
)


@dataclass(frozen=True)
class SlideParams:
    """Per-slide appearance, drawn from the seed."""

    psf_sigma_um: float
    photons: float  # photo-electrons at intensity 1.0
    read_noise: float
    offset: float  # dark level of the background
    autofluorescence: float
    gain: float
    lymph_brightness: float
    tumour_brightness: float
    stromal_brightness: float
    tissue_threshold: float
    nest_threshold: float
    cluster_threshold: float
    isolated_lymph_rate: float
    illumination_depth: float
    vignetting: float
    debris_rate: float
    fold_rate: float
    oof_threshold: float


@functools.lru_cache(maxsize=64)
def slide_params(seed: int) -> SlideParams:
    u = uniform(seed, domain("slide-params"), np.arange(32)).tolist()

    def lerp(k: int, lo: float, hi: float) -> float:
        return lo + (hi - lo) * u[k]

    return SlideParams(
        psf_sigma_um=lerp(0, 0.35, 0.6),
        photons=lerp(1, 150.0, 900.0),
        read_noise=lerp(2, 0.002, 0.008),
        offset=lerp(3, 0.02, 0.045),
        autofluorescence=lerp(4, 0.02, 0.07),
        gain=lerp(5, 0.85, 1.1),
        lymph_brightness=lerp(6, 0.62, 0.85),
        tumour_brightness=lerp(7, 0.26, 0.42),
        stromal_brightness=lerp(8, 0.38, 0.55),
        tissue_threshold=lerp(9, 0.44, 0.52),
        nest_threshold=lerp(10, 0.45, 0.6),
        cluster_threshold=lerp(11, 0.6, 0.7),
        isolated_lymph_rate=lerp(12, 0.015, 0.06),
        illumination_depth=lerp(13, 0.08, 0.3),
        vignetting=lerp(14, 0.0, 0.12),
        debris_rate=lerp(15, 0.02, 0.1),
        fold_rate=lerp(16, 0.15, 0.5),
        oof_threshold=lerp(17, 0.71, 0.79),
    )


# --- validation -------------------------------------------------------------------------------


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_mpp(mpp) -> float:
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.floating, np.integer)):
        raise ValueError(f"mpp must be a number of µm per pixel (e.g. 0.5), got {mpp!r}")
    mpp = float(mpp)
    if not (0.05 <= mpp <= 50.0):
        raise ValueError(f"mpp must be between 0.05 and 50 µm per pixel (e.g. 0.5), got {mpp!r}")
    return mpp


def check_size(size, name: str = "size") -> tuple[int, int]:
    """Normalise ``int`` or ``(width, height)`` to ``(width, height)``."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{name} must be an int or a (width, height) pair of ints, got {size!r}")
    w = check_int(f"{name}[0] (width)", size[0], minimum=1)
    h = check_int(f"{name}[1] (height)", size[1], minimum=1)
    return w, h


def check_seed(seed) -> int:
    return check_int("seed", seed, minimum=0)


# --- large-scale fields -----------------------------------------------------------------------
