"""Tests of wsi_hipe.metrics on tiny inputs with known answers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from wsi_hipe import metrics
from wsi_hipe.metrics import (
    auc,
    causal_curve,
    deletion_curve,
    insertion_curve,
    insertion_deletion,
    make_substrate,
    pixel_order,
    pointing_game,
    randomisation_check,
    relevance_mass,
)


def total(batch: torch.Tensor) -> torch.Tensor:
    """A monotone linear model: the sum of every pixel of every channel."""
    return batch.sum(dim=(1, 2, 3))


class Counter:
    """Wrap a forward and count evaluated samples."""

    def __init__(self, forward):
        self.forward = forward
        self.samples = 0
        self.calls = 0

    def __call__(self, batch):
        self.samples += batch.shape[0]
        self.calls += 1
        return self.forward(batch)


def blob_image() -> tuple[torch.Tensor, np.ndarray]:
    """10×10 image with 10 bright pixels (one row) and zero elsewhere, plus its GT mask."""
    x = torch.zeros(1, 10, 10)
    x[0, 4, :] = 1.0
    gt = (x[0] > 0).numpy()
    return x, gt


# --- causal curves -------------------------------------------------------------------------


def test_perfect_map_deletion_and_insertion_exact_auc():
    x, gt = blob_image()
    perfect = gt.astype(float)
    reverse = 1.0 - perfect
    # Step of 10 % = 10 pixels = exactly the blob: the perfect map deletes it at step 1.
    d_good = deletion_curve(total, x, perfect, step_fraction=0.1)
    d_bad = deletion_curve(total, x, reverse, step_fraction=0.1)
    assert d_good.scores.tolist() == pytest.approx([1.0] + [0.0] * 10)
    assert d_good.auc == pytest.approx(0.05)
    assert d_bad.auc == pytest.approx(0.95)
    i_good = insertion_curve(total, x, perfect, step_fraction=0.1, substrate="fade")
    i_bad = insertion_curve(total, x, reverse, step_fraction=0.1, substrate="fade")
    assert i_good.auc == pytest.approx(0.95)
    assert i_bad.auc == pytest.approx(0.05)
    assert i_good.auc > i_bad.auc and d_good.auc < d_bad.auc


def test_perfect_beats_reverse_with_default_substrates():
    # Bright 3×3 "nuclei" on a dark background; a detector counts bright pixels in a region.
    rng = np.random.default_rng(0)
    x = torch.zeros(1, 24, 24)
    for y, xx in rng.integers(2, 21, size=(8, 2)):
        x[0, y - 1 : y + 2, xx - 1 : xx + 2] = 1.0
    weight = torch.zeros(24, 24)
    weight[:12, :] = 1.0

    def detector(batch):
        return (torch.relu(batch - 0.3) * weight).sum(dim=(1, 2, 3))

    perfect = (x[0] * weight).numpy() + 1e-3 * x[0].numpy()
    reverse = -perfect
    ins_good, del_good = insertion_deletion(detector, x, perfect)
    ins_bad, del_bad = insertion_deletion(detector, x, reverse)
    assert ins_good.auc > ins_bad.auc + 0.5
    assert del_good.auc < del_bad.auc - 0.5


def test_curve_endpoints_are_clean_input_and_full_substrate():
    x, _ = blob_image()
    x = x + 0.5  # mean substrate differs from zero
    sal = np.arange(100, dtype=float).reshape(10, 10)
    d = deletion_curve(total, x, sal, step_fraction=0.25, substrate="mean")
    clean = float(x.sum())
    assert d.clean_score == pytest.approx(clean)
    assert d.scores[0] == 1.0  # exactly the clean point
    assert d.raw_scores[-1] == pytest.approx(float(x.mean()) * 100)  # fully substituted
    i = insertion_curve(total, x, sal, step_fraction=0.25, substrate=0.0)
    assert i.raw_scores[0] == pytest.approx(0.0)
    assert i.scores[-1] == 1.0
    assert i.fractions[0] == 0.0 and i.fractions[-1] == 1.0


def test_step_counts_when_step_does_not_divide():
    x = torch.ones(1, 2, 5)  # 10 pixels; 30 % = 3 pixels per step -> 0, 3, 6, 9, 10
    counter = Counter(total)
    d = deletion_curve(counter, x, np.zeros((2, 5)), step_fraction=0.3, batch_size=2)
    assert d.fractions.tolist() == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0])
    assert d.scores.tolist() == pytest.approx([1.0, 0.7, 0.4, 0.1, 0.0])
    assert d.forward_passes == 5 == counter.samples  # the clean pass + 4 perturbed
    assert counter.calls == 1 + 2  # clean, then batches of 2
    assert d.auc == pytest.approx(auc(d.fractions, d.scores))


def test_uniform_image_deletion_auc_is_half_for_any_map():
    x = torch.ones(1, 10, 10)
    rng = np.random.default_rng(3)
    for _ in range(3):
        d = deletion_curve(total, x, rng.random((10, 10)), step_fraction=0.1)
        assert d.auc == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["insertion", "deletion"])
def test_auc_bounds_for_monotone_model(kind):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((1, 12, 12)).astype(np.float32))
    for trial in range(4):
        sal = rng.normal(size=(12, 12))
        curve = causal_curve(total, x, sal, kind=kind, step_fraction=0.05)
        assert 0.0 <= curve.auc <= curve.scores.max() + 1e-12, trial
        assert np.all(curve.scores >= -1e-9)


def test_batch_size_does_not_change_curves():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.random((1, 12, 12)).astype(np.float32))
    sal = rng.random((12, 12))

    def nonlinear(batch):
        return torch.tanh(batch[:, :, :6]).sum(dim=(1, 2, 3)) + 0.1

    ref = insertion_deletion(nonlinear, x, sal, step_fraction=0.05, batch_size=1)
    for bs in (2, 7, 64):
        got = insertion_deletion(nonlinear, x, sal, step_fraction=0.05, batch_size=bs)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
            assert a.forward_passes == b.forward_passes


def test_insertion_deletion_counts_one_shared_clean_pass():
    x, _ = blob_image()
    counter = Counter(total)
    ins, dele = insertion_deletion(counter, x, np.zeros((10, 10)), step_fraction=0.1)
    # 10 perturbed points each (the clean point reused) + 1 shared clean pass.
    assert ins.forward_passes == 11 and dele.forward_passes == 10
    assert counter.samples == 21


def test_ties_broken_by_pixel_index():
    sal = np.array([[1.0, 1.0], [2.0, 1.0]])
    assert pixel_order(sal).tolist() == [2, 0, 1, 3]
    assert pixel_order(np.zeros((3, 3))).tolist() == list(range(9))


def test_substrates():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    assert torch.equal(make_substrate(x, "fade"), torch.zeros_like(x))
    assert torch.equal(make_substrate(x, "zero"), torch.zeros_like(x))  # the old name of "fade"
    assert torch.allclose(make_substrate(x, "mean"), torch.full_like(x, 5.5))
    flat = torch.full((2, 9, 9), 3.0)
    assert torch.allclose(make_substrate(flat, "blur", blur_sigma=2.0), flat)
    blurred = make_substrate(x, "blur", blur_sigma=1.0)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    assert torch.equal(make_substrate(x, 2.5), torch.full_like(x, 2.5))
    assert torch.equal(make_substrate(x, lambda t: t * 0 + 1), torch.ones_like(x))


def test_curve_input_errors():
    x = torch.ones(1, 4, 4)
    with pytest.raises(ValueError, match="kind"):
        causal_curve(total, x, np.zeros((4, 4)), kind="sideways")
    with pytest.raises(ValueError, match=r"substrate must be one of \['fade', 'mean', 'blur'\]"):
        deletion_curve(total, x, np.zeros((4, 4)), substrate="pink")
    with pytest.raises(ValueError, match="does not match"):
        deletion_curve(total, x, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="step_fraction"):
        deletion_curve(total, x, np.zeros((4, 4)), step_fraction=0.0)
    with pytest.raises(ValueError, match="normalize=False"):
        deletion_curve(total, torch.zeros(1, 4, 4), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        deletion_curve(total, x, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        deletion_curve(total, torch.ones(4, 4), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="scores of shape"):
        deletion_curve(lambda b: b.sum(dim=(2, 3)).repeat(1, 2), x, np.zeros((4, 4)))
    unnormalised = deletion_curve(total, torch.zeros(1, 4, 4), np.zeros((4, 4)), normalize=False)
    assert unnormalised.auc == 0.0


# --- pointing game and relevance mass ------------------------------------------------------


def test_pointing_game_planted_maximum_with_tolerance():
    sal = np.zeros((12, 12))
    sal[5, 5] = 1.0
    gt = np.zeros((12, 12), dtype=np.int32)
    gt[5, 8:10] = 7  # nearest GT pixel is 3 px to the right
    assert pointing_game(sal, gt, tolerance=3).hit
    miss = pointing_game(sal, gt, tolerance=2.9)
    assert not miss.hit and miss.point == (5, 5) and miss.distance == pytest.approx(3.0)
    gt[5, 5] = 2
    on = pointing_game(sal, gt)
    assert on.hit and on.distance == 0.0


def test_pointing_game_tie_uses_first_maximum_in_row_major_order():
    sal = np.zeros((4, 4))
    sal[1, 2] = sal[3, 0] = 5.0
    gt = np.zeros((4, 4), bool)
    gt[3, 0] = True
    res = pointing_game(torch.from_numpy(sal), gt)
    assert res.point == (1, 2) and not res.hit


def test_pointing_game_errors():
    with pytest.raises(ValueError, match="empty"):
        pointing_game(np.ones((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(np.ones((3, 3)), np.ones((3, 3)), tolerance=-1)
    with pytest.raises(ValueError, match="shape"):
        pointing_game(np.ones((3, 3)), np.ones((3, 4)))


def test_relevance_mass_exact():
    sal = np.array([[1.0, 2.0], [3.0, 4.0]])
    gt = np.array([[1, 0], [0, 5]])
    assert relevance_mass(sal, gt) == pytest.approx(0.5)
    signed = np.array([[1.0, -2.0], [3.0, 4.0]])
    assert relevance_mass(signed, gt) == pytest.approx(5 / 8)
    assert relevance_mass(signed, gt, positive_only=False) == pytest.approx(5 / 6)
    assert math.isnan(relevance_mass(np.zeros((2, 2)), gt))


# --- AUROC of a map: class pixels against other pixels -------------------------------------


def test_auroc_perfect_constant_inverted_and_by_hand():
    gt = np.zeros((6, 6), bool)
    gt[1:3, 1:4] = True  # 6 class pixels
    other = np.zeros((6, 6), bool)
    other[4:6, :] = True  # 12 other-nuclei pixels
    assert metrics.auroc(gt.astype(float), gt, other) == 1.0  # perfect map
    assert metrics.auroc(np.full((6, 6), 3.0), gt, other) == 0.5  # constant map: all ties
    assert metrics.auroc(-gt.astype(float), gt, other) == 0.0  # inverted
    # By hand: positives {2, 1}, negatives {1, 0}: pairs (2>1)(2>0)(1=1: 1/2)(1>0) = 3.5 / 4.
    sal = np.array([[2.0, 1.0], [1.0, 0.0]])
    pos = np.array([[1, 1], [0, 0]], bool)
    assert metrics.auroc(sal, pos) == pytest.approx(3.5 / 4)
    # Pixels in neither set do not count.
    sal2 = sal.copy()
    sal2[1, 1] = 99.0
    assert metrics.auroc(sal2, pos, np.array([[0, 0], [1, 0]], bool)) == pytest.approx(0.75)


def test_auroc_matches_pairwise_count_on_random_maps():
    rng = np.random.default_rng(3)
    sal = rng.integers(0, 5, (9, 9)).astype(float)  # many ties
    pos = rng.random((9, 9)) < 0.3
    neg = ~pos & (rng.random((9, 9)) < 0.7)
    a, b = sal[pos][:, None], sal[neg][None, :]
    expected = ((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size)
    assert metrics.auroc(sal, pos, neg) == pytest.approx(expected, abs=1e-12)


def test_auroc_errors():
    with pytest.raises(ValueError, match="overlap"):
        metrics.auroc(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="positive and negative"):
        metrics.auroc(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        metrics.auroc(np.ones((2, 2)), np.ones((3, 3)))


# --- the tissue-background substrate ------------------------------------------------------


def test_tissue_background_removes_nuclei_and_keeps_tissue():
    x = torch.full((1, 64, 64), 0.1)
    x[0, :, 32:] = 0.2  # two tissue levels, each wider than the disk
    yy, xx = np.mgrid[:64, :64]
    nucleus = (yy - 16) ** 2 + (xx - 16) ** 2 <= 16  # radius 4 px
    x[0][torch.from_numpy(nucleus)] = 1.0
    bg = metrics.tissue_background(x, radius_px=6.0, smooth_px=0.0)
    assert bg.shape == x.shape and bg.dtype == x.dtype
    assert torch.all(bg <= x)  # never brighter than the pixel it replaces
    assert float(bg[0, 16, 16]) == pytest.approx(0.1)  # the nucleus is gone
    assert float(bg[0, 48, 8]) == pytest.approx(0.1)  # wide tissue is kept as it is
    assert float(bg[0, 48, 56]) == pytest.approx(0.2)
    smooth = metrics.tissue_background(x, radius_px=6.0)
    assert torch.all(smooth <= x) and float(smooth[0, 16, 16]) < 0.2
    with pytest.raises(ValueError, match="radius_px"):
        metrics.tissue_background(x, radius_px=0)


# --- randomisation sanity check ------------------------------------------------------------


class SpatialHead(torch.nn.Module):
    """A learned (H, W) weighting summed into one score; no ``reset_parameters``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, features):
        return (features[:, 0] * self.weight).sum(dim=(1, 2))


class QuadrantModel(torch.nn.Module):
    """Score = sum of a 1×1-conv feature over the top-left quadrant (a learned spatial head)."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.unused = torch.nn.Linear(2, 2)  # never called: randomising it cannot matter
        self.features = torch.nn.Conv2d(1, 1, kernel_size=1, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
        weight = torch.zeros(size, size)
        weight[: size // 2, : size // 2] = 1.0
        self.head = SpatialHead(weight)

    def forward(self, batch):
        return self.head(self.features(batch))


def occlusion_2x2(forward, x):
    """Tiny reference explainer: score drop when each 2×2 block is set to zero."""
    _, h, w = x.shape
    clean = forward(x[None])[0]
    sal = torch.zeros(h, w)
    with torch.no_grad():
        for y in range(0, h, 2):
            for xx in range(0, w, 2):
                pert = x.clone()
                pert[:, y : y + 2, xx : xx + 2] = 0
                sal[y : y + 2, xx : xx + 2] = clean - forward(pert[None])[0]
    return sal


def test_randomisation_check_separates_trained_from_random():
    model = QuadrantModel()
    x = torch.from_numpy(np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)) + 0.5
    before = [p.detach().clone() for p in model.parameters()]
    res = randomisation_check(model, occlusion_2x2, x)
    # Output side first: reverse definition order of the modules that own parameters.
    assert res.layers == ("head", "features", "unused")
    assert res.original[:4, :4].min() > 0 and res.original[4:, :].max() == 0.0
    assert res.correlations.shape == (3,)
    assert np.all(res.correlations < 0.5)  # the trained map is gone once the head is random
    # The original model is untouched, and the result is reproducible.
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)
    again = randomisation_check(model, occlusion_2x2, x)
    np.testing.assert_array_equal(res.correlations, again.correlations)


def test_randomising_an_unused_layer_keeps_the_map():
    model = QuadrantModel()
    x = torch.ones(1, 8, 8)
    res = randomisation_check(model, occlusion_2x2, x, layers=["unused"], keep_maps=True)
    assert res.correlations[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(res.maps[0], res.original)
    with pytest.raises(ValueError, match="unknown layer"):
        randomisation_check(model, occlusion_2x2, x, layers=["nope"])


def test_a_random_models_maps_decorrelate():
    """The data-randomisation check: a freshly initialised model has an unrelated map."""
    model = QuadrantModel()
    x = torch.from_numpy(np.random.default_rng(1).random((1, 8, 8)).astype(np.float32)) + 0.5
    trained = occlusion_2x2(model, x).numpy()
    random_model = copy.deepcopy(model)
    assert metrics.randomise_parameters(random_model, seed=5) == 3
    random_map = occlusion_2x2(random_model, x).numpy()
    assert metrics.spearman(trained, trained) == pytest.approx(1.0)
    assert abs(metrics.spearman(trained, random_map)) < 0.5
    # Deterministic in the seed; the global RNG is left alone.
    state = torch.random.get_rng_state()
    again = copy.deepcopy(model)
    metrics.randomise_parameters(again, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(random_model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_randomisation_stage_may_name_a_container():
    model = torch.nn.Sequential(QuadrantModel())
    x = torch.from_numpy(np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)) + 0.5
    res = randomisation_check(model, occlusion_2x2, x, layers=["0"], keep_maps=True)
    assert res.layers == ("0",)
    # The stage randomised the whole model: its map is that of a model randomised by hand.
    by_hand = copy.deepcopy(model)
    metrics.randomise_parameters(by_hand, seed=0)
    np.testing.assert_array_equal(res.maps[0], np.abs(occlusion_2x2(by_hand, x).numpy()))
    assert not np.array_equal(res.maps[0], res.original)
    with pytest.raises(ValueError, match="no parameters"):
        randomisation_check(
            torch.nn.Sequential(torch.nn.ReLU(), QuadrantModel()), occlusion_2x2, x, layers=["0"]
        )


def test_spearman_constant_map_is_nan():
    assert math.isnan(metrics.spearman(np.ones((3, 3)), np.arange(9).reshape(3, 3)))
    assert metrics.spearman(np.arange(9), np.arange(9) ** 2) == pytest.approx(1.0)


# --- real fluorescence nuclei (../shared/data) -----------------------------------------------


@pytest.mark.shared_data
def test_intensity_map_on_real_nuclei(nuclei_dir):
    """On a real fluorescence image, brightness points at nuclei; a uniform map does not."""
    tifffile = pytest.importorskip("tifffile")
    img = tifffile.imread(nuclei_dir / "stardist" / "tests_img2d.tif").astype(np.float64)
    gt = tifffile.imread(nuclei_dir / "stardist" / "tests_mask2d.tif")
    area = float(np.mean(gt > 0))
    # A uniform map puts exactly the GT's area fraction inside the GT.
    assert relevance_mass(np.ones_like(img), gt) == pytest.approx(area)
    assert relevance_mass(img, gt) > 3 * area
    assert pointing_game(img, gt).hit
    assert not pointing_game(-img, gt).hit  # the darkest pixel is background
    # A detector of bright pixels: brightness order beats its reverse on both curves.
    x = torch.from_numpy(img / img.max()).float()[None]

    def bright(batch):
        return torch.relu(batch - 0.3).sum(dim=(1, 2, 3))

    ins, dele = insertion_deletion(bright, x, img, step_fraction=0.05)
    ins_r, dele_r = insertion_deletion(bright, x, -img, step_fraction=0.05)
    assert ins.auc > ins_r.auc and dele.auc < dele_r.auc
