"""Tissue detection on fluorescence thumbnails with known ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_hipe.tissue import TissueMask, detect_tissue


def nuclear_scene(shape, *, px_um, seed=0, background=0.03):
    """A thumbnail-like nuclear-stain image: an elliptical tissue piece of dense nuclei.

    Returns the image and the ground-truth tissue mask. Nuclei (~8 µm) are drawn at full
    resolution (1 µm/px) and area-averaged down to ``px_um`` µm/px, as a slide thumbnail would.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    f = int(round(px_um))  # full-res px per thumbnail px
    H, W = h * f, w * f
    yy, xx = np.mgrid[0:H, 0:W]
    tissue = ((yy - 0.5 * H) / (0.35 * H)) ** 2 + ((xx - 0.45 * W) / (0.3 * W)) ** 2 <= 1.0
    image = np.full((H, W), background, dtype=np.float64)
    image[tissue] = 0.12  # autofluorescence of the tissue between nuclei
    ys, xs = np.nonzero(tissue)
    n = int(tissue.sum() / 120)  # one nucleus per ~120 µm²: about 40 % nuclear area
    pick = rng.choice(ys.size, size=n, replace=False)
    r = 4
    disk = (np.mgrid[-r : r + 1, -r : r + 1] ** 2).sum(0) <= r * r
    for y, x in zip(ys[pick], xs[pick], strict=True):
        y0, x0 = max(y - r, 0), max(x - r, 0)
        y1, x1 = min(y + r + 1, H), min(x + r + 1, W)
        sub = disk[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r]
        image[y0:y1, x0:x1][sub] = rng.uniform(0.6, 1.0)
    image += rng.normal(0, 0.01, image.shape)
    thumb = image.reshape(h, f, w, f).mean(axis=(1, 3))
    truth = tissue.reshape(h, f, w, f).mean(axis=(1, 3)) >= 0.5
    return thumb, truth


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("px_um", [4, 8])
def test_fraction_and_mask_match_ground_truth(px_um):
    side = 1024 // px_um
    thumb, truth = nuclear_scene((side, side), px_um=px_um)
    # Slide at 0.5 µm/px, thumbnail downsample = px_um / 0.5.
    res = detect_tissue(thumb, downsample=px_um / 0.5, mpp=0.5)
    assert isinstance(res, TissueMask)
    assert res.mask.dtype == bool and res.mask.shape == thumb.shape
    assert res.downsample == px_um / 0.5
    assert res.fraction == pytest.approx(truth.mean(), abs=0.03)
    assert iou(res.mask, truth) > 0.9


def test_constant_image_has_no_tissue():
    res = detect_tissue(np.zeros((50, 60)), downsample=16, mpp=0.5)
    assert res.fraction == 0.0 and not res.mask.any()


def test_small_specks_are_dropped_and_small_holes_filled():
    thumb = np.zeros((200, 200))
    thumb[50:150, 50:150] = 1.0  # 100 x 100 px tissue at 10 µm/px = 1 mm²
    thumb[95:99, 95:99] = 0.0  # a 40 µm hole (1 600 µm²)
    thumb[10:12, 10:12] = 1.0  # a 20 µm speck (400 µm²)
    res = detect_tissue(
        thumb, downsample=20, mpp=0.5, smooth_um=0, closing_um=0, min_area_um2=5_000
    )
    expected = np.zeros((200, 200), dtype=bool)
    expected[50:150, 50:150] = True
    np.testing.assert_array_equal(res.mask, expected)
    assert res.fraction == pytest.approx(0.25)
    # Keeping specks and holes when the limits are 0.
    raw = detect_tissue(
        thumb, downsample=20, mpp=0.5, smooth_um=0, closing_um=0, min_area_um2=0, max_hole_um2=0
    )
    assert raw.mask[10, 10] and not raw.mask[96, 96]


def test_fixed_threshold_and_methods():
    thumb, truth = nuclear_scene((128, 128), px_um=8, seed=1)
    fixed = detect_tissue(thumb, downsample=16, mpp=0.5, threshold=0.08)
    assert fixed.threshold == 0.08
    assert iou(fixed.mask, truth) > 0.85
    li = detect_tissue(thumb, downsample=16, mpp=0.5, threshold="li")
    assert iou(li.mask, truth) > 0.85
    # The triangle method thresholds close to the background peak: a generous mask that still
    # holds all of the tissue.
    triangle = detect_tissue(thumb, downsample=16, mpp=0.5, threshold="triangle")
    assert triangle.threshold < li.threshold
    assert (triangle.mask & truth).sum() >= 0.98 * truth.sum()


def test_whole_field_of_tissue_is_kept():
    # A small crop that is all tissue: the minimum area is capped at a quarter of the field.
    rng = np.random.default_rng(0)
    thumb = np.zeros((40, 40))
    thumb[:, 8:] = 0.5 + 0.1 * rng.random((40, 32))
    res = detect_tissue(thumb, downsample=2, mpp=0.5, smooth_um=0, closing_um=0)
    assert res.fraction == pytest.approx(0.8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(threshold="magic"), "threshold must be one of"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(downsample=0), "downsample"),
        (dict(mpp=-1.0), "mpp"),
        (dict(smooth_um=-1.0), "smooth_um"),
    ],
)
def test_bad_arguments(kwargs, match):
    base = dict(downsample=8, mpp=0.5)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        detect_tissue(np.ones((10, 10)), **base)
    with pytest.raises(ValueError, match="2-D"):
        detect_tissue(np.ones((3, 10, 10)), downsample=8, mpp=0.5)
