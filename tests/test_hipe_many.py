"""Cross-input batching: hierarchical_perturbation_many == one run per input (issue 16, item 3)."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_hipe.hipe import hierarchical_perturbation
from wsi_hipe.hipe_many import hierarchical_perturbation_many


class RowWise(torch.nn.Module):
    """A small random CNN applied to one row at a time: its outputs cannot depend on the batch,
    so shared and separate batches must give bit-identical maps. Channel 0 is the image;
    channel 1, if any, carries the input's id (kept by the mean substrate: the mean of a
    constant) so that the test can see which inputs share a call."""

    def __init__(self, outputs: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(6, 1, 3, 3, generator=g) * 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(outputs, 6, 3, 3, generator=g) * 0.5)
        self.calls: list[list[int]] = []  # per call: the input id of each row

    def forward(self, batch):
        if batch.shape[1] > 1:
            self.calls.append([round(float(v)) for v in batch[:, 1].flatten(1).amax(1)])
        else:
            self.calls.append([-1] * len(batch))
        rows = []
        for row in batch[:, :1]:
            h = torch.relu(torch.nn.functional.conv2d(row[None], self.w1, padding=1))
            o = torch.nn.functional.conv2d(h, self.w2, padding=1)
            rows.append(torch.relu(o).pow(2).mean(dim=(2, 3))[0])
        return torch.stack(rows)  # (B, outputs)


def tagged(image: torch.Tensor, tag: int) -> torch.Tensor:
    return torch.stack([image, torch.full_like(image, float(tag))])


def blobs(seed: int, size=(64, 64)) -> torch.Tensor:
    """A few Gaussian blobs at random places: tiles whose HiPe runs select different windows."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    img = torch.zeros(size)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor(size)).tolist()
        img += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 5.0**2))
    return img


def assert_same(got, want, *, exact: bool):
    assert got.masks_per_depth == want.masks_per_depth
    assert got.grid_sizes == want.grid_sizes
    assert got.forward_passes == want.forward_passes
    assert got.stop_reason == want.stop_reason
    assert got.target_masks == want.target_masks
    if exact:
        assert torch.equal(got.saliency, want.saliency)
        assert got.target_scores == want.target_scores
    else:
        scale = float(want.saliency.abs().max())
        torch.testing.assert_close(got.saliency, want.saliency, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("substrate", ["mean", "fade", "blur"])
@pytest.mark.parametrize("batch_size", [5, 32])
def test_many_equals_one_run_per_input_and_shares_calls(substrate, batch_size):
    model = RowWise(outputs=1, seed=1)
    xs = [tagged(blobs(s), s) for s in range(5)]
    score = lambda out: out[:, 0]  # noqa: E731
    options = dict(substrate=substrate, batch_size=batch_size, start_grid=4)
    want = [hierarchical_perturbation(lambda b: score(model(b)), x, **options) for x in xs]
    separate_calls = len(model.calls)
    model.calls.clear()
    got = hierarchical_perturbation_many(model, xs, scores=score, **options)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w, exact=True)
    # Every row of every input was scored once, in fewer model calls than one run per input.
    rows = [i for call in model.calls for i in call]
    assert sorted(rows) == sorted(i for i, w in enumerate(want) for _ in range(w.forward_passes))
    assert len(model.calls) < separate_calls
    assert all(len(call) <= batch_size for call in model.calls)
    assert any(len(set(call)) > 1 for call in model.calls)  # some call mixes inputs
    # A call is full unless no input had a row left to give (all waiting on their next depth).
    total = sum(w.forward_passes for w in want)
    assert len(model.calls) >= math.ceil(total / batch_size)


def test_each_input_has_its_own_targets():
    model = RowWise(outputs=3, seed=2)
    xs = [tagged(blobs(10 + s, (48, 56)), s) for s in range(3)]
    reducers = [lambda o: o[:, 0], lambda o: o[:, 1:], lambda o: o]  # (B,), (B, 2), (B, 3)
    got = hierarchical_perturbation_many(model, xs, scores=reducers, batch_size=16)
    for x, reduce, g in zip(xs, reducers, got, strict=True):
        w = hierarchical_perturbation(lambda b, r=reduce: r(model(b)), x, batch_size=16)
        assert_same(g, w, exact=True)
    assert [g.num_targets for g in got] == [1, 2, 3]


def test_a_batched_cnn_matches_within_float_rounding():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 1, 3, padding=1)
    )
    score = lambda out: out.relu().pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    xs = [blobs(20 + s)[None] for s in range(4)]
    got = hierarchical_perturbation_many(model, xs, scores=score, batch_size=24, start_grid=4)
    for x, g in zip(xs, got, strict=True):
        w = hierarchical_perturbation(lambda b: score(model(b)), x, batch_size=24, start_grid=4)
        assert_same(g, w, exact=False)


def test_inputs_of_different_shapes_never_share_a_call():
    model = RowWise(seed=4)
    xs = [tagged(blobs(30), 0), tagged(blobs(31, (40, 52)), 1), tagged(blobs(32), 2)]
    score = lambda out: out[:, 0]  # noqa: E731
    got = hierarchical_perturbation_many(model, xs, scores=score, batch_size=8)
    for call in model.calls:
        assert not (1 in call and (0 in call or 2 in call))
    for x, g in zip(xs, got, strict=True):
        assert_same(g, hierarchical_perturbation(lambda b: score(model(b)), x, batch_size=8),
                    exact=True)  # fmt: skip
    assert got[1].saliency.shape == (40, 52)


def test_a_failing_input_is_returned_or_raised_and_the_others_go_on():
    model = RowWise(seed=5)
    xs = [tagged(blobs(40 + s), s) for s in range(3)]

    def score(out):
        return out[:, 0]

    def nan_for_input_1(out):  # gets input 1's rows of each call only
        return torch.full_like(out[:, 0], torch.nan)

    reducers = [score, nan_for_input_1, score]
    got = hierarchical_perturbation_many(
        model, xs, scores=reducers, batch_size=8, return_exceptions=True
    )
    assert isinstance(got[1], ValueError) and "non-finite" in str(got[1])
    for i in (0, 2):
        assert_same(got[i], hierarchical_perturbation(lambda b: score(model(b)), xs[i],
                                                      batch_size=8), exact=True)  # fmt: skip
    with pytest.raises(ValueError, match="non-finite"):
        hierarchical_perturbation_many(model, xs, scores=reducers, batch_size=8)


def test_scores_of_the_wrong_length_say_so():
    with pytest.raises(ValueError, match="one per input"):
        hierarchical_perturbation_many(
            RowWise(), [torch.rand(1, 32, 32)] * 2, scores=[lambda o: o[:, 0]] * 3
        )
