"""HiPe engine: known answers from the paper, properties, and a plain-loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_hipe import HipeResult, hierarchical_perturbation
from wsi_hipe.hipe import default_noise_rtol, max_depths, start_grid_size


def gaussian_blob(size: int = 256, sigma: float = 4.0, centre: float | None = None) -> torch.Tensor:
    c = size // 2 if centre is None else centre
    r = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-((r[:, None] - c) ** 2 + (r[None, :] - c) ** 2) / (2 * sigma**2))
    return g[None]


def total(batch: torch.Tensor) -> torch.Tensor:
    return batch.flatten(1).sum(1)


class TinyCNN(torch.nn.Module):
    """A small random CNN with ``outputs`` scalar heads (global average of feature maps)."""

    def __init__(self, channels: int = 1, outputs: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(channels, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, outputs, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(h)).pow(2).mean(dim=(2, 3))  # (B, outputs)


# --- the paper's Figure 3 toy ------------------------------------------------------------


def test_figure3_window_counts_and_peak():
    x = gaussian_blob()
    res = hierarchical_perturbation(total, x, substrate="fade", threshold="mid-range")
    assert isinstance(res, HipeResult)
    assert res.masks_per_depth == [81, 25, 77, 81]
    assert sum(res.masks_per_depth) == 264
    assert res.forward_passes == 265
    assert res.grid_sizes == [8, 16, 32, 64]
    assert res.thresholds[0] == 0.0
    finest = 256 / res.grid_sizes[-1]
    peak = divmod(int(res.saliency.argmax()), 256)
    assert max(abs(peak[0] - 128), abs(peak[1] - 128)) <= finest
    assert res.saliency.dtype == torch.float32 and res.saliency.shape == (256, 256)
    assert float(res.saliency.min()) >= 0.0


def test_mean_threshold_perturbs_more_windows_than_midrange():
    x = gaussian_blob()
    mid = hierarchical_perturbation(total, x, substrate="fade", threshold="mid-range")
    mean = hierarchical_perturbation(total, x, substrate="fade", threshold="mean")
    assert mean.masks_per_depth[0] == 81
    assert sum(mean.masks_per_depth) > 2 * sum(mid.masks_per_depth)


@pytest.mark.parametrize(("m", "n"), [(256, 8), (1024, 10), (64, 6), (250, 8), (8, 2), (1, 1)])
def test_start_grid(m, n):
    assert start_grid_size(m) == n


@pytest.mark.parametrize(
    ("side", "start", "min_cell", "max_depth"),
    [
        (96, None, 4, None),
        (96, 4, 8, None),
        (96, None, 4, 2),
        (96, 2, 4, None),
        (250, None, 4, None),
    ],
)
def test_the_loop_runs_exactly_the_depths_of_max_depths(side, start, min_cell, max_depth):
    # One depth rule: with the early stop off and the mean threshold (some window is always
    # selected), a run lasts max_depths(...) depths, and the grid doubles each depth.
    x = torch.rand(1, side, side + 7, generator=torch.Generator().manual_seed(3))
    res = hierarchical_perturbation(
        lambda b: b.flatten(1).pow(2).sum(1),
        x,
        start_grid=start,
        min_cell_size=min_cell,
        max_depth=max_depth,
        threshold="mean",
        stop_atol=-math.inf,
    )
    depths = max_depths(side, start_grid=start, min_cell_size=min_cell, max_depth=max_depth)
    assert res.depth == depths
    n = start if start is not None else start_grid_size(side)
    assert res.grid_sizes == [n * 2**d for d in range(depths)]
    assert res.stop_reason == ("max_depth" if max_depth is not None else "min_cell_size")
    assert max_depths(320) == 4 and max_depths(256) == 4 and max_depths(64) == 2


# --- attribution properties ------------------------------------------------------------------


def test_quadrant_model_puts_saliency_in_its_quadrant():
    torch.manual_seed(0)
    x = torch.rand(1, 64, 64)

    def top_left(batch):
        return batch[:, :, :32, :32].pow(2).sum(dim=(1, 2, 3))

    res = hierarchical_perturbation(top_left, x, substrate="fade")
    sal = res.saliency
    assert float(sal[:32, :32].sum()) / float(sal.sum()) > 0.8
    # Windows straddle the quadrant border by at most one depth-1 cell (64/6 → 11 px).
    cell = math.ceil(64 / res.grid_sizes[0])
    assert float(sal[32 + cell :, :].abs().max()) == 0.0
    assert float(sal[:, 32 + cell :].abs().max()) == 0.0


def test_constant_model_gives_zero_map_after_one_depth():
    x = torch.rand(2, 64, 72)
    res = hierarchical_perturbation(lambda b: torch.full((len(b),), 3.0), x)
    assert torch.count_nonzero(res.saliency) == 0
    assert len(res.masks_per_depth) == 1
    assert res.stop_reason == "no_response"


@pytest.mark.parametrize("substrate", ["mean", "fade", "blur"])
def test_batch_size_invariance(substrate):
    x = torch.rand(1, 40, 48, generator=torch.Generator().manual_seed(1))
    model = TinyCNN()
    forward = lambda b: model(b)[:, 0]  # noqa: E731
    results = [
        hierarchical_perturbation(forward, x, substrate=substrate, batch_size=bs)
        for bs in (1, 2, 7, 32)
    ]
    for r in results[1:]:
        assert r.masks_per_depth == results[0].masks_per_depth
        torch.testing.assert_close(r.saliency, results[0].saliency, rtol=1e-5, atol=1e-7)


def test_batch_size_invariance_is_exact_for_a_batch_independent_model():
    x = gaussian_blob(64, 3.0)
    maps = [
        hierarchical_perturbation(total, x, substrate="fade", batch_size=bs).saliency
        for bs in (1, 2, 7, 32)
    ]
    for m in maps[1:]:
        assert torch.equal(m, maps[0])


def test_affine_transform_of_the_model_scales_the_map():
    x = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(2))
    model = TinyCNN(seed=3)
    # noise_rtol=0: the noise tolerance is relative to |f| and so, by design, not invariant
    # under an offset (f - 7 carries the rounding of a number near 7); the credit rule is.
    base = hierarchical_perturbation(lambda b: model(b)[:, 0], x, noise_rtol=0)
    a, b = 3.5, -7.0
    scaled = hierarchical_perturbation(lambda t: a * model(t)[:, 0] + b, x, noise_rtol=0)
    assert scaled.masks_per_depth == base.masks_per_depth
    torch.testing.assert_close(scaled.saliency, a * base.saliency, rtol=1e-4, atol=1e-5)


def test_cells_tile_a_non_multiple_input_exactly():
    """250×300: every pixel is perturbed by 4 windows at depth 1 and credited where perturbed."""
    h, w = 250, 300
    x = torch.ones(1, h, w)
    perturbed_masks = []

    def forward(batch):
        changed = (batch != x).any(dim=1)  # (B, H, W)
        perturbed_masks.extend(changed)
        return batch.flatten(1).sum(1)

    res = hierarchical_perturbation(forward, x, substrate="fade", batch_size=16)
    masks = torch.stack(perturbed_masks[1:]).float()  # drop the clean pass
    assert len(masks) == sum(res.masks_per_depth)
    depth1 = masks[: res.masks_per_depth[0]]
    assert torch.equal(depth1.sum(0), torch.full((h, w), 4.0))  # no unperturbed margin
    # Credit goes exactly where the input was perturbed: drop = perturbed area for a sum model.
    expected = (masks * masks.sum(dim=(1, 2), keepdim=True)).sum(0)
    torch.testing.assert_close(res.saliency, expected)
    # Every perturbed window at every depth is exactly a union of whole cells.
    for d, n in enumerate(res.grid_sizes):
        start = sum(res.masks_per_depth[:d])
        row_cell = (torch.arange(h) * n) // h
        col_cell = (torch.arange(w) * n) // w
        for mask in masks[start : start + res.masks_per_depth[d]].bool():
            rows, cols = mask.any(dim=1), mask.any(dim=0)
            assert torch.equal(rows, torch.isin(row_cell, row_cell[rows].unique()))
            assert torch.equal(cols, torch.isin(col_cell, col_cell[cols].unique()))
            assert torch.equal(mask, rows[:, None] & cols[None, :])


def test_one_dimensional_signal():
    t = torch.arange(512, dtype=torch.float32)
    x = torch.exp(-((t - 300) ** 2) / 50)[None]
    res = hierarchical_perturbation(lambda b: b.pow(2).sum(dim=(1, 2)), x, substrate="fade")
    assert res.saliency.shape == (512,)
    assert res.masks_per_depth[0] == start_grid_size(512) + 1
    assert abs(int(res.saliency.argmax()) - 300) <= 512 / res.grid_sizes[-1]


def test_three_dimensional_volume():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 16, 24, 20, generator=g) * 0.1
    x[:, 4:7, 15:18, 9:12] += 1.0
    res = hierarchical_perturbation(lambda b: b.pow(2).sum(dim=(1, 2, 3, 4)), x, substrate="fade")
    n = res.grid_sizes[0]
    assert res.masks_per_depth[0] == (n + 1) ** 3
    assert res.saliency.shape == (16, 24, 20)
    assert res.saliency[5, 16, 10] == res.saliency.max()
    assert res.saliency[12, 3, 2] < res.saliency.max() / 10


def test_two_output_cnn_gives_different_maps_per_target():
    # Channel 0 carries a bright spot top-left, channel 1 one bottom-right; the CNN's first
    # layer routes channel k to head k, so each target's map must sit on its own spot.
    x = torch.rand(2, 48, 48, generator=torch.Generator().manual_seed(5)) * 0.05
    x[0, 8:12, 8:12] = 1.0
    x[1, 36:40, 30:34] = 1.0
    model = TinyCNN(channels=2, outputs=2, seed=6)
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[0:3, 0] = 0.2
        model.conv1.weight[3:6, 1] = 0.2
        model.conv1.bias.zero_()
        model.conv2.weight.zero_()
        model.conv2.weight[0, 0:3] = 0.3
        model.conv2.weight[1, 3:6] = 0.3
        model.conv2.bias.zero_()
    m0 = hierarchical_perturbation(lambda b: model(b)[:, 0], x).saliency
    m1 = hierarchical_perturbation(lambda b: model(b)[:, 1], x).saliency
    assert not torch.allclose(m0, m1)
    p0 = divmod(int(m0.argmax()), 48)
    p1 = divmod(int(m1.argmax()), 48)
    assert max(abs(p0[0] - 10), abs(p0[1] - 10)) <= 6 and m0[37, 32] < m0.max() / 10
    assert max(abs(p1[0] - 37), abs(p1[1] - 32)) <= 6 and m1[10, 10] < m1.max() / 10


# --- no saliency from float noise ------------------------------------------------------------


def pixelwise_logits(batch: torch.Tensor) -> torch.Tensor:
    """A pixel-wise 3-class model (the napari tests' threshold model): class 1 logit 12·(x − 0.4)."""
    lymphocyte = 12.0 * (batch[:, :1] - 0.4)
    return torch.cat(
        [torch.zeros_like(lymphocyte), lymphocyte, torch.full_like(lymphocyte, -20.0)], dim=1
    )


def expected_area(weights: torch.Tensor):
    """Expected class-1 area under ``weights`` ``(H, W)`` or ``(K, H, W)`` (→ ``(B,)``/``(B, K)``).

    As ``wsi_hipe.scores`` computes it, ``probabilities @ mask``: BLAS GEMV/GEMM, which rounds
    the rows of a batch differently (the float noise that must not become saliency).
    """
    flat = weights.flatten(-2).float()
    flat = flat if flat.ndim == 1 else flat.T.contiguous()

    def forward(batch):
        p = torch.softmax(pixelwise_logits(batch), dim=1)[:, 1]
        return p.flatten(1) @ flat

    return forward


def disk(shape, centre, radius) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).float()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_windows_that_cannot_change_the_score_get_exact_zeros(batch_size, threads):
    # 96 px → 6 depth-1 cells of exactly 16 px. The target nucleus lies in cell (0, 0), so only
    # windows with origins -1 or 0 on both axes touch it: rows and columns 0-31; every deeper
    # window that touches it lies inside one of those. Elsewhere no perturbation can change
    # the score (the model is pixel-wise), so the saliency there must be exactly 0, whatever
    # the batch shape, the row a window lands in, or the thread count. (Before the fix, both
    # nuclei got float-noise saliency of ~1e-6 on an AMD EPYC at batch sizes 7 and 64.)
    reach = torch.zeros(96, 96, dtype=torch.bool)
    reach[:32, :32] = True
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for centre, radius, amplitude in [((8, 8), 7, 0.3), ((8, 9), 5, 0.5)]:
            nucleus = disk((96, 96), centre, radius)
            noise = torch.rand(1, 96, 96, generator=torch.Generator().manual_seed(0))
            x = amplitude * noise + 0.4 * nucleus + 0.1
            res = hierarchical_perturbation(expected_area(nucleus), x, batch_size=batch_size)
            assert res.grid_sizes == [6, 12, 24]
            assert torch.count_nonzero(res.saliency[~reach]) == 0
            assert float(res.saliency[:16, :16].min()) > 0  # the reachable part is explained
    finally:
        torch.set_num_threads(before)


def test_noise_tolerance_is_relative_to_the_score_and_documented():
    assert default_noise_rtol(torch.float32) == pytest.approx(64 * 2.0**-23)
    assert default_noise_rtol(torch.float64) == pytest.approx(64 * 2.0**-52)
    assert default_noise_rtol(torch.bfloat16) == default_noise_rtol(torch.float16) == 2.0**-8
    assert default_noise_rtol(torch.int64) == 0.0
    x = torch.ones(1, 32, 32)
    tol = default_noise_rtol(torch.float32) * 1000.0

    def dips_by(delta):  # 1000, minus delta when the top-left pixel is perturbed
        return lambda b: 1000.0 - delta * (b[:, 0, 0, 0] != 1).to(torch.float32)

    small = hierarchical_perturbation(dips_by(tol / 2), x, substrate="fade", max_depth=1)
    large = hierarchical_perturbation(dips_by(4 * tol), x, substrate="fade", max_depth=1)
    assert torch.count_nonzero(small.saliency) == 0 and small.stop_reason == "max_depth"
    assert float(large.saliency[0, 0]) == pytest.approx(4 * 4 * tol, rel=0.02)  # 4 windows
    exact = hierarchical_perturbation(
        dips_by(tol / 2), x, substrate="fade", max_depth=1, noise_rtol=0
    )
    assert float(exact.saliency[0, 0]) > 0


def test_forward_may_return_a_view_of_the_reused_batch_buffer():
    x = gaussian_blob(32, 3.0)
    view = hierarchical_perturbation(lambda b: b[:, 0, 16, 16], x, substrate="fade")
    copy = hierarchical_perturbation(lambda b: b[:, 0, 16, 16].clone(), x, substrate="fade")
    assert torch.equal(view.saliency, copy.saliency) and view.saliency.max() > 0


# --- vector targets: (B, K) scores ------------------------------------------------------------


def separate_runs(forward, x, k, **options):
    """One run per target on ``forward(b)[:, j]`` alone: what each vector map must equal."""
    return [
        hierarchical_perturbation(lambda b, j=j: forward(b)[:, j], x, **options) for j in range(k)
    ]


def assert_maps_equal_separate_runs(vec, seps):
    assert vec.vector and vec.num_targets == len(seps)
    assert vec.saliency.shape == (len(seps), *seps[0].saliency.shape)
    for k, sep in enumerate(seps):
        assert vec.target_masks[k] == sep.masks_per_depth
        assert vec.target_thresholds[k] == pytest.approx(sep.thresholds, rel=1e-6, abs=1e-12)
        assert vec.target_stop_reasons[k] == sep.stop_reason
        assert vec.target_scores[k] == pytest.approx(sep.score, rel=1e-6)
        # The union's batches differ from each target's own, so the sums differ in float noise
        # (a few ulps of the map's scale, more on some CPUs' kernels); a real error is O(scale).
        scale = float(sep.saliency.max())
        torch.testing.assert_close(vec.saliency[k], sep.saliency, rtol=1e-5, atol=1e-5 * scale)
    # Each window of the union is perturbed once: passes = union + 1 <= the separate runs' sum.
    assert vec.forward_passes == 1 + sum(vec.masks_per_depth)
    assert vec.forward_passes <= sum(s.forward_passes for s in seps)
    for d, union in enumerate(vec.masks_per_depth):
        own = [m[d] for m in vec.target_masks if len(m) > d]
        assert max(own) <= union <= sum(own)


@pytest.mark.parametrize("k", [1, 3, 17])
def test_vector_targets_equal_separate_runs_on_a_random_cnn(k):
    x = torch.rand(1, 96, 100, generator=torch.Generator().manual_seed(30 + k))
    model = TinyCNN(outputs=k, seed=k)
    vec = hierarchical_perturbation(model, x, batch_size=16)
    seps = separate_runs(model, x, k, batch_size=16)
    assert vec.grid_sizes == [6, 12, 24]
    assert_maps_equal_separate_runs(vec, seps)
    if k > 1:  # the targets differ, so the test is not comparing k copies of one map
        assert len({tuple(m) for m in vec.target_masks}) > 1
        assert not torch.allclose(vec.saliency[0], vec.saliency[1])


def test_vector_run_perturbs_exactly_the_union_of_the_targets_windows():
    x = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(40)) + 0.5  # no zeros

    def recording(forward, boxes):
        def wrapped(batch):
            for row in (batch == 0).any(dim=1):  # fade: exactly the window is zero
                rows, cols = row.any(dim=1).nonzero(), row.any(dim=0).nonzero()
                if len(rows):
                    boxes.append((int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])))
            return forward(batch)

        return wrapped

    def per_depth(boxes, counts):
        edges = [sum(counts[:d]) for d in range(len(counts) + 1)]
        return [set(boxes[a:b]) for a, b in zip(edges, edges[1:], strict=False)]

    model = TinyCNN(outputs=3, seed=41)
    vec_boxes = []
    vec = hierarchical_perturbation(recording(model, vec_boxes), x, substrate="fade")
    union = per_depth(vec_boxes, vec.masks_per_depth)
    own = []
    for k in range(3):
        boxes = []
        sep = hierarchical_perturbation(
            recording(lambda b, k=k: model(b)[:, k], boxes), x, substrate="fade"
        )
        own.append(per_depth(boxes, sep.masks_per_depth))
    for d, windows in enumerate(union):
        assert len(windows) == vec.masks_per_depth[d]  # each window once
        assert windows == set().union(*(o[d] for o in own if len(o) > d))
    assert sum(len(u) for u in union) < sum(len(w) for o in own for w in o)


def test_each_target_stops_early_on_its_own():
    # Target 1 never moves: it stops after depth 1 with a zero map, while target 0 refines on.
    x = gaussian_blob(64, 3.0)
    both = lambda b: torch.stack([total(b), torch.full((len(b),), 5.0)], dim=1)  # noqa: E731
    vec = hierarchical_perturbation(both, x, substrate="fade")
    assert vec.target_stop_reasons == ["min_cell_size", "no_response"]
    assert vec.stop_reason == "min_cell_size" and vec.depth == 2
    assert vec.target_masks[1] == [49] and torch.count_nonzero(vec.saliency[1]) == 0
    assert_maps_equal_separate_runs(vec, separate_runs(both, x, 2, substrate="fade"))


def test_vector_targets_get_exact_zeros_out_of_reach():
    # Three nuclei in three corner cells, explained in one run: each map is zero beyond the
    # windows that touch its own nucleus (see the scalar test above for the geometry).
    noise = torch.rand(1, 96, 96, generator=torch.Generator().manual_seed(0))
    nuclei = torch.stack([disk((96, 96), c, 7) for c in [(8, 8), (8, 87), (87, 8)]])
    x = 0.3 * noise + 0.4 * nuclei.amax(dim=0) + 0.1
    res = hierarchical_perturbation(expected_area(nuclei), x, batch_size=7)
    reach = torch.zeros(3, 96, 96, dtype=torch.bool)
    reach[0, :32, :32] = reach[1, :32, 64:] = reach[2, 64:, :32] = True
    assert res.saliency.shape == (3, 96, 96)
    assert torch.count_nonzero(res.saliency[~reach]) == 0
    assert all(float(res.saliency[k][reach[k]].max()) > 0 for k in range(3))


@pytest.fixture(scope="module")
def unet_cells():
    """The bundled U-Net and a 64² synthetic Hoechst tile with its lymphocyte instances."""
    from wsi_hipe.models import load_model
    from wsi_hipe.synthetic import render_tile

    model = load_model(device="cpu")
    tile = render_tile(0, size=64)
    ids, areas = torch.unique(torch.from_numpy(tile.lymphocytes), return_counts=True)
    cells = [int(i) for i, a in zip(ids, areas, strict=True) if i > 0 and a >= 12]
    masks = torch.stack([torch.from_numpy(tile.lymphocytes == i) for i in cells])
    return model, torch.from_numpy(tile.image)[None].float(), masks


def unet_cell_areas(model, masks):
    """Expected lymphocyte area of each cell: ``(B, 1, H, W) -> (B, K)``."""
    weights = masks.flatten(1).float().T.contiguous()  # (H·W, K)

    def forward(batch):
        p = torch.softmax(model(batch), dim=1)[:, 1]
        return p.flatten(1) @ weights

    return forward


@pytest.mark.parametrize("k", [1, 3, pytest.param(17, marks=pytest.mark.slow)])
def test_vector_targets_equal_separate_runs_on_the_unet_cells(unet_cells, k):
    model, x, masks = unet_cells
    assert len(masks) >= 17
    forward = unet_cell_areas(model, masks[:k])
    vec = hierarchical_perturbation(forward, x, batch_size=32)
    seps = separate_runs(forward, x, k, batch_size=32)
    assert_maps_equal_separate_runs(vec, seps)
    assert min(vec.target_scores) > 1.0  # real cells, seen by the model


# --- a plain-loop reference written from the rules in DESIGN.md -------------------------------


@torch.no_grad()
def reference_hipe(forward, x, *, substrate, threshold):
    """Literal, slow HiPe for (C, H, W): loops over windows and pixels' cells."""
    _, h, w = x.shape
    m = min(h, w)
    n = 2 * (math.ceil(math.log2(m)) // 2)
    sal = torch.zeros(h, w, dtype=torch.float64)
    clean = float(forward(x[None])[0])
    counts, passes, prev_max_drop = [], 1, None
    depth = 0
    while True:
        depth += 1
        if depth > 1 and 4 * n > m:
            break
        if depth > 1 and prev_max_drop <= 1e-4 * abs(clean) + 1e-12:
            break
        row_cell = [(i * n) // h for i in range(h)]
        col_cell = [(j * n) // w for j in range(w)]
        if threshold == "mid-range":
            t = float(sal.min() + (sal.max() - sal.min()) / 2)
        else:
            t = float(sal.mean())
        windows = []
        for oy in range(-1, n):
            for ox in range(-1, n):
                rows = [i for i in range(h) if row_cell[i] in (oy, oy + 1)]
                cols = [j for j in range(w) if col_cell[j] in (ox, ox + 1)]
                region = torch.zeros(h, w, dtype=torch.bool)
                region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
                if depth == 1 or float(sal[region].max()) >= t:
                    windows.append(region)
        if not windows:
            break
        counts.append(len(windows))
        drops = []
        for region in windows:
            xp = x.clone()
            for c in range(x.shape[0]):
                xp[c][region] = x[c][region].mean() if substrate == "mean" else 0.0
            drops.append(max(0.0, clean - float(forward(xp[None])[0])))
            passes += 1
        for region, drop in zip(windows, drops, strict=True):
            sal[region] += drop
        prev_max_drop = max(drops)
        n *= 2
    return sal, counts, passes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("substrate", ["mean", "fade"])
@pytest.mark.parametrize("threshold", ["mid-range", "mean"])
def test_vectorised_agrees_with_plain_loop(seed, substrate, threshold):
    g = torch.Generator().manual_seed(seed)
    shape = [(2, 18, 23), (1, 24, 17), (3, 20, 20)][seed]
    x = torch.rand(shape, generator=g)
    model = TinyCNN(channels=shape[0], seed=seed + 10).double()
    forward = lambda b: model(b.double())[:, 0]  # noqa: E731
    ref, counts, passes = reference_hipe(
        forward, x.double(), substrate=substrate, threshold=threshold
    )
    res = hierarchical_perturbation(
        forward, x.double(), substrate=substrate, threshold=threshold, batch_size=5
    )
    assert res.masks_per_depth == counts
    assert res.forward_passes == passes
    torch.testing.assert_close(res.saliency.double(), ref, rtol=1e-5, atol=1e-6)


# --- substrates, dtypes, devices, options -------------------------------------------------


def test_noise_substrate_is_seeded():
    x = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(7))
    model = TinyCNN(seed=8)
    f = lambda b: model(b)[:, 0]  # noqa: E731
    a = hierarchical_perturbation(f, x, substrate="noise", seed=1).saliency
    b = hierarchical_perturbation(f, x, substrate="noise", seed=1).saliency
    c = hierarchical_perturbation(f, x, substrate="noise", seed=2).saliency
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_callable_substrate_matches_builtin_fade():
    x = gaussian_blob(64, 3.0)
    a = hierarchical_perturbation(total, x, substrate="fade")
    b = hierarchical_perturbation(total, x, substrate=torch.zeros_like)
    assert a.masks_per_depth == b.masks_per_depth
    assert torch.equal(a.saliency, b.saliency)


def test_blur_substrate_on_many_channels():
    x = torch.rand(5, 32, 40, generator=torch.Generator().manual_seed(9))
    x[:, 10:14, 20:24] = 3.0
    res = hierarchical_perturbation(
        lambda b: b.pow(4).sum(dim=(1, 2, 3)), x, substrate="blur", blur_sigma=2.0
    )
    y, xx = divmod(int(res.saliency.argmax()), 40)
    assert 8 <= y <= 16 and 18 <= xx <= 26


def test_low_precision_model_output_accumulates_in_float32():
    x = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(10))
    res = hierarchical_perturbation(lambda b: total(b).to(torch.bfloat16), x, substrate="fade")
    assert res.saliency.dtype == torch.float32
    assert res.saliency.sum() > 0


def test_max_depth_start_grid_and_min_cell_size():
    x = gaussian_blob(128, 3.0)
    assert (
        len(hierarchical_perturbation(total, x, substrate="fade", max_depth=2).masks_per_depth) == 2
    )
    res = hierarchical_perturbation(total, x, substrate="fade", start_grid=4, max_depth=1)
    assert res.masks_per_depth == [25]
    coarse = hierarchical_perturbation(total, x, substrate="fade", min_cell_size=16)
    assert 128 / coarse.grid_sizes[-1] >= 16


def test_progress_reports_and_can_cancel():
    seen = []
    x = gaussian_blob(64, 3.0)
    hierarchical_perturbation(
        total,
        x,
        substrate="fade",
        batch_size=10,
        progress=lambda d, done, tot: seen.append((d, done, tot)),
    )
    # The first batch carries the clean input and 9 windows.
    assert seen[0] == (1, 9, 49) and seen[1] == (1, 19, 49) and seen[-1][1] == seen[-1][2]

    class Cancelled(Exception):
        pass

    def stop(*_):
        raise Cancelled

    with pytest.raises(Cancelled):
        hierarchical_perturbation(total, x, progress=stop)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_returns_on_input_device():
    x = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(11))
    model = TinyCNN(seed=12)
    cpu = hierarchical_perturbation(lambda b: model(b)[:, 0], x)
    model_gpu = TinyCNN(seed=12).cuda()
    gpu = hierarchical_perturbation(lambda b: model_gpu(b)[:, 0], x, device="cuda")
    assert gpu.saliency.device == x.device
    assert gpu.masks_per_depth == cpu.masks_per_depth
    torch.testing.assert_close(gpu.saliency, cpu.saliency, rtol=1e-3, atol=1e-5)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"substrate": "gaussian"}, "substrate must be one of"),
        ({"threshold": "median"}, "threshold must be one of"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_depth": 0}, "max_depth"),
        ({"start_grid": 1000}, "start_grid"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hierarchical_perturbation(total, torch.rand(1, 16, 16), **kwargs)


def test_bad_inputs_and_models_raise_value_error():
    with pytest.raises(ValueError, match=r"\(C, \*spatial\)"):
        hierarchical_perturbation(total, torch.rand(16))
    with pytest.raises(ValueError, match="one scalar score per input"):
        hierarchical_perturbation(lambda b: b.sum(dim=(1,)), torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match="noise_rtol"):
        hierarchical_perturbation(total, torch.rand(1, 16, 16), noise_rtol=-1.0)


def calls_returning(*shapes):
    """A forward whose i-th call returns zeros of ``shapes[i]`` (``B`` = the batch size)."""
    calls = []

    def forward(batch):
        shape = shapes[min(len(calls), len(shapes) - 1)]
        calls.append(len(batch))
        return torch.zeros([len(batch) if s == "B" else s for s in shape])

    return forward


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (
            (("B", 3, 1),),
            r"shape \(26,\), or K >= 1 scores per input, shape \(26, K\); got shape \(26, 3, 1\)",
        ),
        ((("B", 0),), r"K >= 1 scores per input.*got shape \(26, 0\)"),
        ((("B", 2), ("B", 3)), r"returned shape \(10, 3\) .* but \(B, 2\) scores before"),
        ((("B",), ("B", 2)), r"returned shape \(10, 2\) .* but \(B,\) scores before"),
        ((("B", 2), ("B",)), r"returned shape \(10,\) .* but \(B, 2\) scores before"),
    ],
)
def test_forward_output_shapes_must_stay_one_form(shapes, match):
    x = torch.rand(1, 16, 16) + 0.5
    batch_size = 26 if len(shapes) == 1 else 16  # 26 rows: one batch; 16: a second of 10
    with pytest.raises(ValueError, match=match):
        hierarchical_perturbation(calls_returning(*shapes), x, batch_size=batch_size)


def test_one_nan_inf_message_names_what_came_back():
    x = torch.rand(1, 16, 16) + 0.5
    with pytest.raises(ValueError, match=r"non-finite scores \(NaN or inf\) for the clean input"):
        hierarchical_perturbation(lambda b: total(b) * float("nan"), x)

    def inf_when_perturbed(b):
        return torch.where(b.flatten(1).min(1).values == 0, float("inf"), total(b))

    with pytest.raises(ValueError, match=r"NaN or inf\) for perturbed inputs \(0 NaN, 25 inf\)"):
        hierarchical_perturbation(inf_when_perturbed, x, substrate="fade")

    def nan_in_target_1(b):
        out = torch.stack([total(b), total(b)], dim=1)
        out[1:, 1] = float("nan")
        return out

    with pytest.raises(ValueError, match=r"perturbed inputs \(25 NaN, 0 inf\)"):
        hierarchical_perturbation(nan_in_target_1, x, substrate="fade")
    with pytest.raises(ValueError, match="valid scores are finite"):  # also on the last depth
        hierarchical_perturbation(inf_when_perturbed, x, substrate="fade", max_depth=1)


def test_zero_is_the_old_name_of_fade():
    x = gaussian_blob(32, 3.0)
    a = hierarchical_perturbation(total, x, substrate="fade")
    b = hierarchical_perturbation(total, x, substrate="zero")
    assert torch.equal(a.saliency, b.saliency) and a.masks_per_depth == b.masks_per_depth
