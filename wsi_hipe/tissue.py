"""Tissue detection on a fluorescence thumbnail (bright tissue on a dark background).

A nuclear stain lights up nuclei, not tissue as such, but tissue between nuclei still glows a
little (autofluorescence, out-of-focus light) above the glass. The default threshold,
``"log-otsu"``, is Otsu's threshold on the *logarithm* of the lightly smoothed thumbnail: the
log compresses the bright nuclei so that the two classes Otsu separates are glass and tissue,
rather than dense nuclei and everything else (plain Otsu on a nuclear stain keeps only the
nucleus-dense regions and drops sparse stroma). The mask is then closed (a disk of
``closing_um``, merging the gaps between nuclei), cleared of small holes (``max_hole_um2``) and
of small specks (``min_area_um2``). All sizes are physical, so the result does not depend on
the thumbnail size.

On synthetic slides of ``wsi_hipe.synthetic`` and on the scenes in ``tests/test_tissue.py`` the
default mask has an IoU of 0.97-0.99 with the ground truth; plain Otsu after a 20 µm smoothing
("tissue is where nuclei are dense") scored 0.30-0.98 on the same images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

__all__ = ["TissueMask", "TissueThreshold", "detect_tissue", "THRESHOLDS"]

logger = logging.getLogger(__name__)

#: Automatic threshold methods: "log-otsu" (default, see above) and scikit-image's
#: ``threshold_<name>`` on the smoothed thumbnail.
TissueThreshold = Literal["log-otsu", "otsu", "li", "triangle"]
THRESHOLDS: tuple[str, ...] = get_args(TissueThreshold)


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask on a thumbnail grid.

    Attributes
    ----------
    mask : (h, w) bool ndarray
        True where there is tissue. Mask px ``(r, c)`` covers level-0
        ``[c·downsample, (c+1)·downsample) x [r·downsample, (r+1)·downsample)``.
    downsample : float
        Level-0 px per mask px.
    fraction : float
        Tissue fraction of the mask area, in [0, 1].
    threshold : float
        The threshold applied to the smoothed thumbnail (in the thumbnail's units).
    """

    mask: np.ndarray
    downsample: float
    fraction: float
    threshold: float = math.nan


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components of ``mask`` smaller than ``min_px`` pixels."""
    from scipy import ndimage

    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components smaller than ``max_px`` that do not touch the border."""
    from scipy import ndimage

    if max_px <= 0:
        return mask
    holes, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes <= max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[holes]


def _auto_threshold(image: np.ndarray, method: str) -> float:
    """An automatic threshold of ``image``, in its units."""
    from skimage import filters

    if method != "log-otsu":
        return float(getattr(filters, f"threshold_{method}")(image))
    low, high = np.percentile(image, [0.5, 99.5])
    eps = 0.01 * (high - low) + 1e-12
    logs = np.log(np.maximum(image - low, 0.0) + eps)
    return float(np.exp(filters.threshold_otsu(logs)) - eps + low)


def _check_options(
    image: np.ndarray,
    downsample: float,
    mpp: float,
    threshold: str | float,
    *sizes: float,
) -> None:
    """Raise ValueError naming the first bad argument of :func:`detect_tissue`."""
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"thumbnail must be a non-empty 2-D (h, w) array, got shape {image.shape}")
    for name, value in [("downsample", downsample), ("mpp", mpp)]:
        if not (
            isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0
        ):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    names = ("smooth_um", "closing_um", "min_area_um2", "max_hole_um2")
    for name, value in zip(names, sizes, strict=True):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(threshold, str):
        if threshold not in THRESHOLDS:
            raise ValueError(
                f"threshold must be one of {list(THRESHOLDS)} or a number, got {threshold!r}"
            )
    elif not (isinstance(threshold, (int, float, np.number)) and math.isfinite(threshold)):
        raise ValueError(
            f"threshold must be one of {list(THRESHOLDS)} or a number, got {threshold!r}"
        )


def _reduce(image: np.ndarray, sigma_px: float) -> tuple[np.ndarray, int]:
    """Block-average ``image`` to a resolution matched to the smoothing (px ~ sigma / 4).

    Returns the reduced image and the block side (1: unchanged); the mask is expanded back at
    the end.
    """
    factor = max(1, int(sigma_px / 4)) if sigma_px > 0 else 1
    if factor > 1:
        h, w = image.shape
        padded = np.pad(image, ((0, -h % factor), (0, -w % factor)), mode="edge")
        image = padded.reshape(padded.shape[0] // factor, factor, -1, factor).mean(axis=(1, 3))
    return image, factor


def _clean(
    mask: np.ndarray, px_um: float, closing_um: float, max_hole_um2: float, min_area_um2: float
) -> np.ndarray:
    """Close gaps (a disk of ``closing_um``), fill small holes, drop small specks."""
    from scipy import ndimage

    radius = closing_um / px_um
    if radius >= 1 and mask.any():
        # Closing with a Euclidean disk via distance transforms (cost independent of radius);
        # the image border does not erode.
        dilated = ndimage.distance_transform_edt(~mask) <= radius
        mask = ndimage.distance_transform_edt(dilated) > radius
    area_px_um2 = px_um * px_um
    mask = _fill_small_holes(mask, max_hole_um2 / area_px_um2)
    min_px = min(min_area_um2 / area_px_um2, 0.25 * mask.size)
    return _remove_small(mask, min_px)


def detect_tissue(
    thumbnail: np.ndarray,
    *,
    downsample: float,
    mpp: float,
    threshold: TissueThreshold | float = "log-otsu",
    smooth_um: float = 2.0,
    closing_um: float = 20.0,
    min_area_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
) -> TissueMask:
    """Find tissue in a fluorescence thumbnail.

    Parameters
    ----------
    thumbnail : (h, w) float ndarray
        Stain intensity, bright = signal (e.g. ``Slide.thumbnail()``); NaN counts as background.
    downsample : float
        Level-0 px per thumbnail px.
    mpp : float
        µm per level-0 px; thumbnail px are ``mpp * downsample`` µm.
    threshold : {'log-otsu', 'otsu', 'li', 'triangle'} or float, default 'log-otsu'
        Automatic method applied to the smoothed thumbnail, or a fixed value in its units.
    smooth_um : float, default 2
        Gaussian sigma in µm applied before the threshold (0: none); use ~20 with plain
        ``'otsu'`` to find only nucleus-dense regions.
    closing_um : float, default 20
        Radius in µm of the disk used to close gaps in the mask (0: none).
    min_area_um2 : float, default 10 000
        Tissue pieces smaller than this are dropped (capped at a quarter of the thumbnail area,
        so that a small crop that is all tissue is kept).
    max_hole_um2 : float, default 10 000
        Holes inside tissue up to this area are filled.

    Returns
    -------
    TissueMask
        An image without contrast (constant) has no tissue.
    """
    from scipy import ndimage

    image = np.asarray(thumbnail, dtype=np.float64)
    sizes = (smooth_um, closing_um, min_area_um2, max_hole_um2)
    _check_options(image, downsample, mpp, threshold, *sizes)
    image = np.where(np.isfinite(image), image, 0.0)
    full_shape = image.shape
    image, factor = _reduce(image, smooth_um / (float(mpp) * float(downsample)))
    px_um = float(mpp) * float(downsample) * factor
    sigma_px = smooth_um / px_um
    smoothed = (
        ndimage.gaussian_filter(image, sigma_px, mode="nearest") if sigma_px >= 0.3 else image
    )

    if isinstance(threshold, str):
        if float(smoothed.max() - smoothed.min()) <= 1e-12 * max(1.0, float(abs(smoothed).max())):
            logger.info("tissue: thumbnail has no contrast; no tissue found")
            empty = np.zeros(full_shape, dtype=bool)
            return TissueMask(empty, float(downsample), 0.0, float(smoothed.max()))
        value = _auto_threshold(smoothed, threshold)
    else:
        value = float(threshold)
    mask = _clean(smoothed > value, px_um, closing_um, max_hole_um2, min_area_um2)
    if factor > 1:
        mask = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
        mask = mask[: full_shape[0], : full_shape[1]]

    fraction = float(mask.mean())
    logger.debug(
        "tissue: threshold %s = %.4g, sigma %.2f px, fraction %.3f",
        threshold,
        value,
        sigma_px,
        fraction,
    )
    return TissueMask(mask, float(downsample), fraction, value)
