"""Tests of wsi_hipe.baselines on tiny models with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_hipe.baselines import METHODS, explain, rise, rise_masks
from wsi_hipe.hipe import hierarchical_perturbation

pytest.importorskip("captum")

SIZE = 32


def quadrant_weight(size: int = SIZE) -> torch.Tensor:
    w = torch.zeros(size, size)
    w[: size // 2, : size // 2] = 1.0
    return w


def quadrant_model(batch: torch.Tensor) -> torch.Tensor:
    """Reads only the top-left quadrant: the sum of its pixels over all channels."""
    return (batch * quadrant_weight(batch.shape[-1])).sum(dim=(1, 2, 3))


def quadrant_means(sal: torch.Tensor) -> list[float]:
    h = sal.shape[0] // 2
    return [
        float(sal[:h, :h].mean()),
        float(sal[:h, h:].mean()),
        float(sal[h:, :h].mean()),
        float(sal[h:, h:].mean()),
    ]


@pytest.fixture
def ones() -> torch.Tensor:
    return torch.ones(1, SIZE, SIZE)


# --- RISE -----------------------------------------------------------------------------------


def test_rise_seeded_determinism(ones):
    a = rise(quadrant_model, ones, n_masks=64, grid=4, seed=3)
    b = rise(quadrant_model, ones, n_masks=64, grid=4, seed=3)
    c = rise(quadrant_model, ones, n_masks=64, grid=4, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_rise_batch_size_invariance(ones):
    ref = rise(quadrant_model, ones, n_masks=50, grid=4, batch_size=1)
    for bs in (7, 16, 64):
        got = rise(quadrant_model, ones, n_masks=50, grid=4, batch_size=bs)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)


def test_rise_recovers_planted_quadrant():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(0.5 + rng.random((1, SIZE, SIZE)).astype(np.float32))
    res = explain("rise", quadrant_model, x, n_masks=800, grid=4, batch_size=100)
    assert res.forward_passes == 800
    tl, tr, bl, br = quadrant_means(res.saliency)
    assert tl > 1.1 * max(tr, bl, br)
    peak = divmod(int(res.saliency.argmax()), SIZE)
    assert peak[0] < SIZE // 2 and peak[1] < SIZE // 2


def test_rise_masks_are_smooth_shifted_and_in_range():
    gen = torch.Generator().manual_seed(0)
    grids = torch.rand((5, 4, 4), generator=gen) < 0.5
    shifts = torch.tensor([[0, 0], [1, 2], [7, 7], [3, 0], [0, 5]])
    masks = rise_masks(0, 5, (32, 32), grids=grids, shifts=shifts)
    assert masks.shape == (5, 32, 32)
    assert masks.min() >= 0 and masks.max() <= 1
    # Neighbouring pixels differ by at most one bilinear step (cell = 8 px).
    assert float((masks[:, :, 1:] - masks[:, :, :-1]).abs().max()) <= 1 / 8 + 1e-6
    # An all-kept grid gives an all-ones mask (away from nothing: border replicated).
    full = rise_masks(0, 1, (32, 32), grids=torch.ones(1, 4, 4, dtype=torch.bool), shifts=shifts)
    assert torch.allclose(full, torch.ones_like(full))


def test_rise_expected_value_for_constant_model(ones):
    # f ≡ 1: the map is Σ M / (N p), whose expectation is 1 everywhere.
    sal = rise(lambda b: torch.ones(b.shape[0]), ones, n_masks=2000, grid=4, p=0.5)
    assert abs(float(sal.mean()) - 1.0) < 0.05


# --- Captum baselines with exact answers ----------------------------------------------------


def test_occlusion_exact_on_linear_quadrant_model(ones):
    res = explain("occlusion", quadrant_model, ones, window=4, stride=4, batch_size=9)
    expected = quadrant_weight() * 16  # each 4×4 window removes 16 units of the score
    torch.testing.assert_close(res.saliency, expected)
    assert res.forward_passes == 1 + 8 * 8
    assert res.saliency.dtype == torch.float32 and res.saliency.shape == (SIZE, SIZE)


def test_occlusion_overlapping_windows_count(ones):
    res = explain("occlusion", quadrant_model, ones, window=16, stride=8)
    assert res.forward_passes == 1 + 3 * 3
    tl, tr, bl, br = quadrant_means(res.saliency)
    assert tl > 0 and tr < tl and bl < tl and br < min(tr, bl)
    assert float(res.saliency[24:, :].abs().max()) == 0.0  # no window reaching the quadrant


def test_feature_ablation_exact(ones):
    res = explain("feature_ablation", quadrant_model, ones, cell=8)
    torch.testing.assert_close(res.saliency, quadrant_weight() * 64)
    assert res.forward_passes == 1 + 16


def test_gradient_exact(ones):
    res = explain("gradient", quadrant_model, 2 * ones)
    torch.testing.assert_close(res.saliency, quadrant_weight())
    assert res.forward_passes == 1


def test_integrated_gradients_completeness():
    x = torch.from_numpy(np.random.default_rng(1).random((2, SIZE, SIZE)).astype(np.float32))

    def squares(batch):
        return (batch**2 * quadrant_weight()).sum(dim=(1, 2, 3))

    res = explain("integrated_gradients", squares, x, n_steps=16, batch_size=5)
    assert res.forward_passes == 16
    assert float(res.saliency.sum()) == pytest.approx(float(squares(x[None])[0]), rel=1e-3)
    assert float(res.saliency[SIZE // 2 :].abs().max()) == 0.0


def test_gradient_needs_differentiable_forward(ones):
    def frozen(batch):
        with torch.no_grad():
            return quadrant_model(batch)

    with pytest.raises(ValueError, match="differentiable"):
        explain("gradient", frozen, ones)


def test_hipe_through_explain_counts_its_passes():
    # A textured input: the default "mean" substrate would not change a constant one.
    x = torch.from_numpy(0.5 + np.random.default_rng(2).random((1, SIZE, SIZE)).astype("f4"))
    res = explain("hipe", quadrant_model, x, substrate="fade")
    direct = hierarchical_perturbation(quadrant_model, x, substrate="fade")
    assert res.forward_passes == direct.forward_passes
    torch.testing.assert_close(res.saliency, direct.saliency.float().cpu())
    tl, tr, bl, br = quadrant_means(res.saliency)
    assert tl > max(tr, bl, br)


# --- the common entry point -----------------------------------------------------------------


def test_explain_rejects_unknown_method_and_option(ones):
    with pytest.raises(ValueError, match="method must be one of"):
        explain("lime", quadrant_model, ones)
    with pytest.raises(ValueError, match="unknown options"):
        explain("rise", quadrant_model, ones, masks=10)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        explain("rise", quadrant_model, ones[0])
    with pytest.raises(ValueError, match="p \\(keep probability\\)"):
        explain("rise", quadrant_model, ones, p=1.5)
    with pytest.raises(ValueError, match="larger than the input"):
        explain("occlusion", quadrant_model, ones, window=64)
    assert set(METHODS) >= {"hipe", "occlusion", "rise", "gradient", "integrated_gradients"}


def test_explain_checks_forward_output(ones):
    with pytest.raises(ValueError, match="scores of shape"):
        explain("rise", lambda b: b.sum(dim=(2, 3)), ones, n_masks=4)
