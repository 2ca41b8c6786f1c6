"""wsi_hipe.scores: known answers from a model whose probabilities are constructed exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsi_hipe.errors import ModelError
from wsi_hipe.models import load_model
from wsi_hipe.scores import (
    Score,
    cell_area,
    class_area,
    core_region,
    logit_sum,
    make_score,
    mean_probability,
)


class KnownProbabilities(nn.Module):
    """Logits whose softmax is exactly p1 = x, p0 = p2 = (1 - x) / 2 (x in (0, 1)).

    softmax(log p) = p when the p sum to 1, so every score has a closed-form answer.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = x[:, :1]
        rest = (1 - p1) / 2
        return torch.log(torch.cat([rest, p1, rest], dim=1)).to(self.dtype)


def _batch(values: list[float], size: int = 8) -> torch.Tensor:
    return torch.stack([torch.full((1, size, size), v) for v in values])


def _ramp(size: int = 8) -> torch.Tensor:
    """A (1, 1, size, size) input with distinct values in (0, 1)."""
    return (torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) + 0.5) / (
        size * size
    )


def test_class_area_known_answer() -> None:
    score = class_area(KnownProbabilities(), class_index=1)
    out = score(_batch([0.25, 0.5, 0.9]))
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out, torch.tensor([16.0, 32.0, 57.6]))
    assert score.units == "px²"
    x = _ramp()
    torch.testing.assert_close(score(x), x.sum().view(1))


def test_area_in_um2_is_px2_times_mpp_squared() -> None:
    x = _ramp()
    px2 = class_area(KnownProbabilities())(x)
    for mpp in (0.25, 0.5, 2.0):
        um2 = class_area(KnownProbabilities(), mpp=mpp)
        assert um2.units == "µm²"
        torch.testing.assert_close(um2(x), px2 * mpp**2)
    with pytest.raises(ValueError, match="mpp"):
        class_area(KnownProbabilities(), mpp=0)


def test_area_inside_a_core_region() -> None:
    x = _ramp(8)
    core = core_region(8, 8, halo=2)
    assert core.sum() == 16 and core[2:6, 2:6].all()
    score = class_area(KnownProbabilities(), region=core)
    torch.testing.assert_close(score(x), x[..., 2:6, 2:6].sum().view(1))
    roi = np.zeros((8, 8), dtype=bool)
    roi[0, :] = True  # a region of interest: the top row
    torch.testing.assert_close(
        class_area(KnownProbabilities(), region=roi)(x), x[..., 0, :].sum().view(1)
    )
    weights = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    expected = (x[0, 0] * torch.from_numpy(weights)).sum().view(1)
    torch.testing.assert_close(class_area(KnownProbabilities(), region=weights)(x), expected)


def test_other_classes_and_sums_of_classes() -> None:
    x = _ramp()
    model = KnownProbabilities()
    background = class_area(model, class_index=0)(x)
    torch.testing.assert_close(background, ((1 - x) / 2).sum().view(1))
    all_nuclei = class_area(model, class_index=(1, 2))(x)
    torch.testing.assert_close(all_nuclei, 64 - background)


def test_class_by_name_through_a_segmentation_model() -> None:
    model = load_model(KnownProbabilities(), device="cpu")  # default names: bg, lymphocyte, nucleus
    x = _ramp()
    by_name = class_area(model, class_index="lymphocyte")(x)
    torch.testing.assert_close(by_name, x.sum().view(1))
    assert "lymphocyte" in class_area(model, class_index="lymphocyte").name
    with pytest.raises(ValueError, match="unknown class 'tumour'"):
        class_area(model, class_index="tumour")
    with pytest.raises(ValueError, match="no meta.class_names"):
        class_area(KnownProbabilities(), class_index="lymphocyte")
    with pytest.raises(ValueError, match="out of range"):
        class_area(model, class_index=3)


def test_mean_probability() -> None:
    x = _ramp()
    torch.testing.assert_close(mean_probability(KnownProbabilities())(x), x.mean().view(1))
    core = core_region(8, 8, halo=(1, 3))
    expected = x[..., 1:7, 3:5].mean().view(1)
    score = mean_probability(KnownProbabilities(), region=core)
    assert score.units == "probability"
    torch.testing.assert_close(score(x), expected)
    with pytest.raises(ValueError, match="empty"):
        mean_probability(KnownProbabilities(), region=np.zeros((8, 8)))


def test_logit_sum_known_answer() -> None:
    x = _ramp()
    expected = torch.log(x).sum().view(1)
    score = logit_sum(KnownProbabilities())
    assert score.units == "logit·px²"
    torch.testing.assert_close(score(x), expected)


def test_sigmoid_activation() -> None:
    def logits(x: torch.Tensor) -> torch.Tensor:  # sigmoid(logit(x)) = x on channel 1
        return torch.cat([torch.zeros_like(x), torch.logit(x)], dim=1)

    x = _ramp()
    score = class_area(logits, class_index=1, activation="sigmoid")
    torch.testing.assert_close(score(x), x.sum().view(1))
    described = load_model(logits, device="cpu", class_names=("bg", "fg"), activation="sigmoid")
    torch.testing.assert_close(class_area(described, class_index="fg")(x), x.sum().view(1))
    with pytest.raises(ValueError, match="activation"):
        class_area(logits, activation="tanh")


def test_cell_area_dilated_mask() -> None:
    labels = np.zeros((16, 16), dtype=np.int32)
    labels[4:7, 4:7] = 5  # a 3x3 cell
    labels[10:12, 10:12] = 9  # another cell
    x = torch.full((1, 1, 16, 16), 0.5)
    model = KnownProbabilities()
    exact = cell_area(model, labels, label=5, dilation=0)(x)
    torch.testing.assert_close(exact, torch.tensor([9 * 0.5]))
    # a radius-1 disk is a plus: the 3x3 square grows to 5x5 minus its 4 corners = 21 px
    dilated = cell_area(model, labels, label=5, dilation=1)(x)
    torch.testing.assert_close(dilated, torch.tensor([21 * 0.5]))
    bool_mask = labels == 9
    torch.testing.assert_close(
        cell_area(model, bool_mask, dilation=0, mpp=0.5)(x), torch.tensor([4 * 0.5 * 0.25])
    )
    with pytest.raises(ValueError, match="2 labels"):
        cell_area(model, labels)
    with pytest.raises(ValueError, match="label 7"):
        cell_area(model, labels, label=7)
    with pytest.raises(ValueError, match="dilation"):
        cell_area(model, bool_mask, dilation=-1)


def test_cell_score_reads_only_its_cell() -> None:
    labels = np.zeros((16, 16), dtype=np.int32)
    labels[2:5, 2:5] = 1
    x = torch.full((1, 1, 16, 16), 0.2)
    x_changed = x.clone()
    x_changed[..., 12:, 12:] = 0.9  # far from the cell, beyond the dilation
    score = cell_area(KnownProbabilities(), labels, label=1, dilation=2)
    torch.testing.assert_close(score(x), score(x_changed))
    x_changed[..., 3, 3] = 0.9
    assert score(x_changed) > score(x)


def test_scores_are_float32_under_low_precision_models() -> None:
    x = _ramp(16)
    reference = class_area(KnownProbabilities())(x)
    half = class_area(KnownProbabilities(dtype=torch.bfloat16))
    out = half(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = class_area(KnownProbabilities())(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, reference)


def test_batch_items_are_scored_independently() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=gen) * 0.98 + 0.01
    for score in (
        class_area(KnownProbabilities(), region=core_region(8, 8, 1)),
        mean_probability(KnownProbabilities()),
        logit_sum(KnownProbabilities()),
    ):
        together = score(x)
        one_by_one = torch.cat([score(x[i : i + 1]) for i in range(5)])
        torch.testing.assert_close(together, one_by_one)


def test_gradients_flow_through_a_score() -> None:
    x = _ramp().requires_grad_(True)
    class_area(KnownProbabilities())(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # d(sum x)/dx = 1


def test_make_score_names() -> None:
    x = _ramp()
    model = KnownProbabilities()
    assert isinstance(make_score(model, "area"), Score)
    torch.testing.assert_close(make_score(model, "area")(x), class_area(model)(x))
    torch.testing.assert_close(make_score(model, "mean")(x), mean_probability(model)(x))
    torch.testing.assert_close(make_score(model, "logit")(x), logit_sum(model)(x))
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = True
    torch.testing.assert_close(
        make_score(model, "cell", cell_mask=mask, dilation=0)(x), x[..., 0, 0].view(1)
    )
    with pytest.raises(ValueError, match="score name must be one of"):
        make_score(model, "volume")
    with pytest.raises(ValueError, match="cell_mask"):
        make_score(model, "cell")
    assert make_score(model, "area", mpp=0.5).describe()["units"] == "µm²"


def test_bad_inputs_and_outputs() -> None:
    x = _ramp()
    with pytest.raises(ValueError, match=r"region has shape \(4, 4\)"):
        class_area(KnownProbabilities(), region=np.ones((4, 4)))(x)
    with pytest.raises(ValueError, match="finite and >= 0"):
        class_area(KnownProbabilities(), region=-np.ones((8, 8)))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        class_area(KnownProbabilities(), region=np.ones((1, 8, 8)))
    with pytest.raises(ModelError, match=r"\(B, K, H, W\)"):
        class_area(lambda b: b.sum(dim=(1, 2, 3)))(x)
    with pytest.raises(ModelError, match="channel"):
        class_area(lambda b: b, class_index=2)(x)
    with pytest.raises(ValueError, match="twice"):
        class_area(KnownProbabilities(), class_index=(1, 1))
    with pytest.raises(ValueError, match="no core"):
        core_region(8, 8, halo=4)
    with pytest.raises(TypeError, match="callable"):
        class_area("model")


def test_every_run_score_kind_has_a_builder() -> None:
    from wsi_hipe.config import SCORE_KINDS
    from wsi_hipe.scores import SCORE_NAMES

    model = KnownProbabilities()
    for kind in SCORE_KINDS:
        assert make_score(model, kind, class_index=1).kind == kind
    assert set(SCORE_KINDS) <= set(SCORE_NAMES)


def test_from_logits_equals_calling_the_score() -> None:
    x = _batch([0.25, 0.5, 0.9])
    model = KnownProbabilities()
    region = core_region(8, 8, 2)
    for score in (class_area(model, region=region), mean_probability(model), logit_sum(model)):
        torch.testing.assert_close(score.from_logits(model(x)), score(x), rtol=0, atol=0)
    with pytest.raises(ModelError, match=r"\(B, K, H, W\)"):
        class_area(model).from_logits(torch.zeros(3, 8, 8))
