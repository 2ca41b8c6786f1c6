"""wsi_hipe.cells: instances, the owner rule, the vector cell score and per-cell summaries."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from wsi_hipe import hierarchical_perturbation
from wsi_hipe.cells import (
    Cells,
    SaliencySummary,
    cell_scores,
    explain_cells,
    find_cells,
    in_core,
    outline,
    score_regions,
    summarize,
    um_to_px,
)
from wsi_hipe.scores import class_area


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


class KnownProbabilities(nn.Module):
    """Softmax of the logits is exactly p1 = x, p0 = p2 = (1 - x) / 2."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = SimpleNamespace(
            class_names=("background", "lymphocyte", "nucleus"), activation="softmax"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = x[:, :1].clamp(1e-6, 1 - 1e-6)
        rest = (1 - p1) / 2
        return torch.log(torch.cat([rest, p1, rest], dim=1))


# --- instances --------------------------------------------------------------------------------


def test_two_touching_discs_split_into_two_cells():
    a, b = _disc((40, 60), 20, 20, 8), _disc((40, 60), 20, 33, 8)
    assert (a & b).any()  # they overlap: one connected component
    cells = find_cells(a | b)
    assert cells.n == 2
    assert cells.area.tolist() == [189, 189]  # symmetric split, every pixel assigned
    assert cells.area.sum() == (a | b).sum()
    np.testing.assert_allclose(cells.centroid[:, 0], [20, 20])
    assert abs(cells.centroid[0, 1] - 20) < 1 and abs(cells.centroid[1, 1] - 33) < 1
    assert find_cells(a | b, split=False).n == 1
    # numbered in raster order of the first pixel; bbox and crop agree with the labels
    assert cells.centroid[0, 1] < cells.centroid[1, 1]
    y0, x0, y1, x1 = cells.bbox[1]
    assert np.array_equal(cells.crop(1), cells.labels[y0:y1, x0:x1] == 2)


def test_probability_dip_splits_cells_without_a_neck():
    # two squares side by side: one rectangle, no neck; the probability dips on their contact
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:25] = True
    p = np.ones(mask.shape)
    p[:, 14:16] = 0.3
    assert find_cells(mask).n == 1  # EDT alone: one cell (the documented under-split)
    cells = find_cells(mask, p)
    assert cells.n == 2 and cells.area.tolist() == [100, 100]
    np.testing.assert_allclose(cells.probability, [(90 + 10 * 0.3) / 100] * 2)


def test_small_fragments_merge_and_specks_drop():
    m = _disc((40, 40), 20, 20, 6)
    m[18:21, 27:30] = True  # a 3x3 bump, separated by a probability dip
    p = np.ones(m.shape)
    p[18:21, 26:28] = 0.3
    assert find_cells(m, p, min_area=1, split_depth=0.2).area.tolist() == [113, 9]
    merged = find_cells(m, p, min_area=16, split_depth=0.2)
    assert merged.n == 1 and merged.area[0] == m.sum()
    speck = m.copy()
    speck[2, 2] = speck[2, 3] = True
    assert find_cells(speck, min_area=16).n == 1


def test_holes_are_filled():
    ring = _disc((30, 30), 15, 15, 8) & ~_disc((30, 30), 15, 15, 3)
    cells = find_cells(ring)
    assert cells.n == 1 and cells.area[0] == _disc((30, 30), 15, 15, 8).sum()
    assert find_cells(np.zeros((5, 5), bool)).n == 0


def test_find_cells_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        find_cells(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="probability has shape"):
        find_cells(np.zeros((4, 4), bool), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="min_area"):
        find_cells(np.zeros((4, 4), bool), min_area=-1)
    with pytest.raises(ValueError, match="mpp"):
        um_to_px(1.0, 0.0)
    assert um_to_px(4.0, 0.5, power=2) == 16.0


def test_in_core_is_half_open_so_a_point_has_one_owner():
    labels = np.zeros((20, 20), np.int32)
    cells = Cells(
        labels, np.ones(4, np.int64), np.array([[4.5, 5.0], [4.49, 5.0], [13.5, 5.0], [13.49, 5]]),
        np.zeros((4, 4), np.int64), np.zeros(4),
    )  # fmt: skip
    # core rows 5..13 (h = 9): pixel-centre box [4.5, 13.5)
    assert in_core(cells, (5, 0, 9, 20)).tolist() == [True, False, False, True]
    # the neighbour core below owns the point on the border
    assert in_core(cells, (14, 0, 9, 20)).tolist() == [False, False, True, False]


# --- score regions and the vector score -------------------------------------------------------


def test_score_regions_grow_without_overlap():
    a, b = _disc((40, 60), 20, 20, 8), _disc((40, 60), 20, 33, 8)
    cells = find_cells(a | b)
    regions = score_regions(cells, 3)
    assert set(np.unique(regions)) == {0, 1, 2}
    for k in (1, 2):
        assert (regions[cells.labels == k] == k).all()  # a cell's own pixels stay its own
    grown = ndimage.distance_transform_edt(cells.labels == 0) <= 3
    assert np.array_equal(regions > 0, grown)
    assert np.array_equal(score_regions(cells, 0), cells.labels)


def test_cell_scores_known_answer_and_tile_score_first():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16)
    regions = np.zeros((16, 16), np.int32)
    regions[2:5, 2:6] = 1
    regions[10:14, 8:9] = 2
    model = KnownProbabilities()
    tile = class_area(model, class_index=1)
    forward = cell_scores(model, regions, class_index="lymphocyte", extra=[tile])
    out = forward(x)
    assert out.shape == (2, 3) and out.dtype == torch.float32 and forward.num_targets == 3
    p1 = x[:, 0].clamp(1e-6, 1 - 1e-6)
    expected = torch.stack(
        [p1.sum((1, 2)), p1[:, 2:5, 2:6].sum((1, 2)), p1[:, 10:14, 8:9].sum((1, 2))], 1
    )
    torch.testing.assert_close(out, expected)
    um = cell_scores(model, regions, mpp=0.5)(x)
    torch.testing.assert_close(um, expected[:, 1:] * 0.25)
    with pytest.raises(ValueError, match=r"the model's classes are \['background'"):
        cell_scores(model, regions, class_index="tumour")
    with pytest.raises(ValueError, match="model output"):
        cell_scores(model, regions[:8])(x)


def test_vector_cell_run_equals_separate_runs_per_cell():
    torch.manual_seed(1)
    x = torch.rand(1, 32, 32) * 0.5
    regions = np.zeros((32, 32), np.int32)
    regions[4:10, 4:10] = 1
    regions[20:26, 18:28] = 2
    model = KnownProbabilities()
    forward = cell_scores(model, regions)
    vector = hierarchical_perturbation(forward, x, substrate="fade", batch_size=16)
    assert vector.saliency.shape == (2, 32, 32)
    for k in (1, 2):
        single = hierarchical_perturbation(
            lambda b, k=k: forward(b)[:, k - 1], x, substrate="fade", batch_size=16
        )
        torch.testing.assert_close(vector.saliency[k - 1], single.saliency, rtol=1e-5, atol=1e-6)
    assert vector.forward_passes < 2 * single.forward_passes  # the union, not the sum


# --- summaries --------------------------------------------------------------------------------


def test_summary_known_masses_inside_ring_beyond():
    labels = np.zeros((20, 20), np.int32)
    labels[10, 10] = 1  # a one-pixel cell: distance to it is the Euclidean offset
    cells = Cells.from_labels(labels)
    sal = np.zeros((1, 20, 20))
    sal[0, 10, 10] = 4.0  # inside
    sal[0, 12, 12] = 2.0  # distance sqrt(8) <= 3: ring
    sal[0, 13, 10] = 1.0  # distance 3: ring (the ring is closed)
    sal[0, 13, 11] = 8.0  # distance sqrt(10) > 3: beyond
    sal[0, 0, 0] = 16.0  # far: beyond
    s = summarize(sal, cells, ring=3.0)
    assert s.total.tolist() == [31.0] and s.inside.tolist() == [4.0]
    assert s.ring.tolist() == [3.0] and s.beyond.tolist() == [24.0]
    assert s.context_share.tolist() == [27.0 / 31.0]
    assert np.isnan(SaliencySummary.zeros(2).context_share).all()


def test_summary_matches_a_per_cell_loop():
    rng = np.random.default_rng(3)
    mask = np.zeros((64, 64), bool)
    for cy, cx, r in rng.integers([5, 5, 2], [59, 59, 7], size=(12, 3)):
        mask |= _disc(mask.shape, cy, cx, r)
    cells = find_cells(mask)
    sal = rng.random((cells.n, 64, 64))
    ring = 2.5
    s = summarize(sal, cells, ring=ring)
    for k in range(cells.n):
        own = cells.labels == k + 1
        d = ndimage.distance_transform_edt(~own)
        band = (d > 0) & (d <= ring)
        assert s.inside[k] == pytest.approx(sal[k][own].sum())
        assert s.ring[k] == pytest.approx(sal[k][band].sum())
        assert s.beyond[k] == pytest.approx(sal[k][~own & ~band].sum())
        assert s.total[k] == pytest.approx(sal[k].sum())
    with pytest.raises(ValueError, match="saliency must be"):
        summarize(sal[:1], cells, ring=ring)


# --- outlines ---------------------------------------------------------------------------------


def test_outline_of_a_square_is_its_pixel_corners():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True
    (ring,) = outline(mask)
    assert ring.tolist() == [[2, 3], [2, 7], [5, 7], [5, 3], [2, 3]]  # (y, x) edge coordinates


def test_outline_area_equals_pixel_count_and_runs_counter_clockwise():
    rng = np.random.default_rng(5)
    mask = np.zeros((48, 48), bool)
    for cy, cx, r in rng.integers([4, 4, 2], [44, 44, 8], size=(10, 3)):
        mask |= _disc(mask.shape, cy, cx, r)
    cells = find_cells(mask)
    for i in range(cells.n):
        rings = outline(cells.crop(i))
        assert len(rings) == 1  # instances are 4-connected and hole-free
        y, x = rings[0][:-1, 0], rings[0][:-1, 1]
        area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
        assert area == cells.area[i]  # positive: counter-clockwise in (x, y)


def test_outline_keeps_diagonal_pixels_apart_and_finds_holes():
    diagonal = np.eye(2, dtype=bool)
    rings = outline(diagonal)
    assert [r.tolist() for r in rings] == [
        [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]],
        [[1, 1], [1, 2], [2, 2], [2, 1], [1, 1]],
    ]
    frame = np.ones((4, 4), bool)
    frame[1:3, 1:3] = False
    outer, hole = outline(frame)
    assert outer.tolist()[:4] == [[0, 0], [0, 4], [4, 4], [4, 0]]
    assert sorted(map(tuple, hole[:-1].tolist())) == [(1, 1), (1, 3), (3, 1), (3, 3)]
    assert outline(np.zeros((3, 3), bool)) == []


# --- one tile ---------------------------------------------------------------------------------


def _tile_window():
    x = np.full((48, 48), 0.05, np.float32)
    x[_disc(x.shape, 20, 20, 5)] = 0.9  # owned: centroid in the core
    x[_disc(x.shape, 24, 33, 4)] = 0.9  # owned
    x[_disc(x.shape, 3, 24, 3)] = 0.9  # in the halo: another tile's
    x = torch.from_numpy(x)[None]
    model = KnownProbabilities()
    logits = model(x[None])
    segmentation = torch.softmax(logits, 1).argmax(1)[0].numpy()
    return model, x, logits, segmentation


def test_explain_cells_is_one_vector_run_equal_to_separate_runs():
    model, x, logits, seg = _tile_window()
    core = (8, 8, 32, 32)
    region = np.zeros((48, 48), np.float32)
    region[8:40, 8:40] = 1
    tile = class_area(model, class_index=1, region=region)
    hipe = {"substrate": "fade", "batch_size": 16}
    out = explain_cells(model, x, logits, seg, core=core, mpp=0.5, tile_score=tile, hipe=hipe)
    assert out.found == 3 and out.cells.n == 2 and out.status.tolist() == ["done", "done"]
    alone = hierarchical_perturbation(tile, x, **hipe)
    np.testing.assert_allclose(out.tile_saliency, alone.saliency.numpy(), rtol=1e-5, atol=1e-5)
    # each cell's summary = the summary of a separate run on that cell's score
    regions = score_regions(find_cells(seg == 1, min_area=16, split_depth=1.0), 3.0)
    passes = 0
    for k in range(2):
        own = out.cells.labels == k + 1
        label = np.bincount(regions[own]).argmax()
        assert np.array_equal(out.regions == k + 1, regions == label)
        single = cell_scores(model, (regions == label).astype(np.int32))
        np.testing.assert_allclose(out.score[k], single(x[None]).item(), rtol=1e-6)
        res = hierarchical_perturbation(lambda b, f=single: f(b)[:, 0], x, **hipe)
        passes += res.forward_passes
        ref = summarize(res.saliency.numpy()[None], out.cells.select([k]), ring=6.0)
        for name in ("total", "inside", "ring", "beyond"):
            np.testing.assert_allclose(
                getattr(out.summary, name)[k], getattr(ref, name)[0], rtol=1e-4
            )
    assert out.forward_passes < passes + alone.forward_passes


def test_explain_cells_skips_cells_below_the_floor_and_tiles_without_cells():
    model, x, logits, seg = _tile_window()
    out = explain_cells(model, x, logits, seg, core=(8, 8, 32, 32), mpp=0.5, floor=1e9)
    assert out.status.tolist() == ["skipped", "skipped"] and out.forward_passes == 0
    assert out.summary.total.tolist() == [0, 0] and out.tile_saliency is None
    none = explain_cells(model, x, logits, np.zeros_like(seg), core=(8, 8, 32, 32), mpp=0.5)
    assert none.cells.n == 0 and none.forward_passes == 0
    with pytest.raises(ValueError, match="the model's classes are"):
        explain_cells(model, x, logits, seg, class_index="tumour", core=(8, 8, 32, 32), mpp=0.5)


class NeighbourModel(nn.Module):
    """A context-driven toy: a nucleus (x > 0.5) is a lymphocyte when the annulus 6..12 px around
    each pixel is bright, whatever the nucleus itself looks like."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = nn.functional.avg_pool2d(x, 25, stride=1, padding=12, count_include_pad=False)
        small = nn.functional.avg_pool2d(x, 11, stride=1, padding=5, count_include_pad=False)
        annulus = (big * 25**2 - small * 11**2) / (25**2 - 11**2)
        nucleus = 40 * (x - 0.5)
        return torch.cat([-nucleus, nucleus + 40 * (annulus - 0.12), nucleus], dim=1)


def test_context_share_separates_a_pixel_model_from_a_neighbour_model():
    x = np.full((64, 64), 0.05, np.float32)
    for cy, cx in [(20, 20), (20, 34), (34, 20), (34, 34), (27, 27), (44, 44), (12, 44), (46, 18)]:
        x[_disc(x.shape, cy, cx, 4)] = 0.9
    x = torch.from_numpy(x)[None]
    shares, beyond = {}, {}
    for name, model in (("pixel", KnownProbabilities()), ("neighbour", NeighbourModel())):
        logits = model(x[None])
        seg = torch.softmax(logits, 1).argmax(1)[0].numpy()
        out = explain_cells(
            model, x, logits, seg, core=(8, 8, 48, 48), mpp=0.5,
            hipe={"substrate": "fade", "batch_size": 32},
        )  # fmt: skip
        assert out.cells.n == 8 and (out.status == "done").all()
        shares[name] = np.median(out.summary.context_share)
        beyond[name] = np.median(out.summary.beyond / out.summary.total)
    # HiPe credits whole windows, so even the pixel-wise model has most of a small cell's mass
    # outside it (measured 0.88 here); the neighbour model has more, and more of it far away
    # (measured 0.92 and 0.60 vs 0.50)
    assert 0.8 < shares["pixel"] < shares["neighbour"] - 0.02
    assert beyond["neighbour"] > beyond["pixel"] + 0.05
