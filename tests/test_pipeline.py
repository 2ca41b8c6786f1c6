"""The slide/region/cell pipeline: exact stitching, the score floor, failures, resume, output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _pipeline_support import SMALL, FailingReader, save_tiny_model, synthetic_image, tiny_model

from wsi_hipe import hierarchical_perturbation, pipeline
from wsi_hipe.config import load_config
from wsi_hipe.errors import OutputError, ResumeMismatchError
from wsi_hipe.hipe import max_depths
from wsi_hipe.omezarr import read_output
from wsi_hipe.pipeline._tile import hipe_substrate
from wsi_hipe.schedule import torch_threads
from wsi_hipe.scores import class_area
from wsi_hipe.slide import ArrayReader, open_slide
from wsi_hipe.tiling import make_grid

FAST = {**SMALL, "hipe.max_depth": 2, "hipe.start_grid": 4}
W, H = 192, 128  # 3 x 2 tiles of 64 px
N = 6


@pytest.fixture(scope="module")
def image():
    return synthetic_image(W, H, seed=3)


@pytest.fixture(scope="module")
def slide(image):
    return open_slide(ArrayReader(image, mpp=0.5))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=FAST)


@pytest.fixture(scope="module")
def region(slide, model, cfg):
    """The whole slide explained as a region (reference for several tests)."""
    return pipeline.explain_region(slide, 0, 0, W, H, config=cfg, model=model)


def _by_hand(slide, model, cfg, x0, y0, width, height):
    """Tile the region and run read → HiPe(class_area on the core) per tile, placed by hand."""
    grid = make_grid(
        (width, height),
        slide_mpp=0.5,
        target_mpp=0.5,
        tile_size=cfg.tiling.tile_size,
        halo=cfg.tiling.halo,
    )
    side = grid.window
    sal = np.zeros(grid.shape, np.float32)
    seg = np.zeros(grid.shape, np.uint8)
    for tile in grid.tiles:
        rx, ry = grid.read_window(tile)[:2]
        img = slide.read(x0 + rx, y0 + ry, side, side, mpp=0.5)
        x = torch.from_numpy(img)[None]
        core = torch.zeros(side, side)
        h, w = tile.core
        hl = cfg.tiling.halo
        core[hl : hl + h, hl : hl + w] = 1
        res = hierarchical_perturbation(
            class_area(model, class_index=1, region=core),
            x,
            substrate=hipe_substrate(cfg),
            max_depth=cfg.hipe.max_depth,
            start_grid=cfg.hipe.start_grid,
            batch_size=cfg.hipe.batch_size,
        )
        labels = model.probabilities(x[None]).argmax(1)[0].numpy()
        sal[tile.y : tile.y + h, tile.x : tile.x + w] = res.saliency.numpy()[
            hl : hl + h, hl : hl + w
        ]
        seg[tile.y : tile.y + h, tile.x : tile.x + w] = labels[hl : hl + h, hl : hl + w]
    return sal, seg


def test_region_equals_tiles_explained_by_hand(slide, model, cfg):
    x0, y0, width, height = 37, 21, 150, 70  # not aligned, clipped last row/column
    res = pipeline.explain_region(slide, x0, y0, width, height, config=cfg, model=model)
    # The pipeline runs torch with 1 intra-op thread (the bits of CPU reductions depend on it).
    with torch_threads(1):
        sal, seg = _by_hand(slide, model, cfg, x0, y0, width, height)
    assert res.saliency.shape == (70, 150)
    np.testing.assert_array_equal(res.saliency, sal)
    np.testing.assert_array_equal(res.segmentation, seg)
    assert res.origin == (37.0, 21.0) and res.scale == 1.0 and res.mpp == 0.5
    assert len(res.tiles) == 6 and all(t["status"] == "done" for t in res.tiles)
    assert res.forward_passes == sum(t["passes"] for t in res.tiles)
    assert res.saliency.max() > 0


def test_no_seams_or_shifts_at_core_borders(slide, model, cfg, region):
    # A region starting one tile further right and down holds the same tiles, shifted by one.
    t = cfg.tiling.tile_size
    shifted = pipeline.explain_region(slide, t, t, 2 * t, t, config=cfg, model=model)
    np.testing.assert_array_equal(shifted.saliency, region.saliency[t : 2 * t, t : 3 * t])
    np.testing.assert_array_equal(shifted.segmentation, region.segmentation[t : 2 * t, t : 3 * t])


def test_tiled_segmentation_equals_untiled(slide, model, region):
    # BrightBlobNet sees 5x5 px; the 16 px halo makes tiling invisible in the segmentation.
    whole = slide.read(0, 0, W, H, mpp=0.5)
    with torch_threads(1):
        labels = model.probabilities(torch.from_numpy(whole)[None, None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(region.segmentation, labels.astype(np.uint8))
    assert 0 < (labels == 1).mean() < 0.5


def test_translate_um_centres_pixels(slide, model, cfg):
    res = pipeline.explain_region(slide, 10, 20, 64, 64, config=cfg, model=model)
    # scale 1: target pixel 0 is level-0 pixel 10, centred at 10 * 0.5 µm.
    assert res.translate_um == pytest.approx((20 * 0.5, 10 * 0.5))
    assert res.scale_um == (0.5, 0.5)


def test_slide_output_equals_region_and_opens_with_ome_zarr(tmp_path, slide, model, cfg, region):
    out = tmp_path / "s.ome.zarr"
    result = pipeline.explain_slide(slide, out, config=cfg, model=model)
    assert result.ok and result.tiles_total == N and result.computed == N
    assert result.counts == {"done": N, "skipped": 0, "failed": 0}
    view = read_output(out)
    np.testing.assert_array_equal(np.asarray(view.saliency[0]), region.saliency)
    np.testing.assert_array_equal(np.asarray(view.segmentation[0]), region.segmentation)
    assert view.finalized and view.levels == 3
    assert [tuple(a.shape) for a in view.saliency] == [(128, 192), (64, 96), (32, 48)]
    assert view.chunk == (64, 64)
    prov = view.provenance
    assert prov["config"]["tiling"]["tile_size"] == 64
    assert prov["config_fingerprint"] == cfg.fingerprint()
    assert prov["skip_bound"] == pytest.approx(pipeline.skip_bound(cfg))
    assert "torch" in prov["versions"]
    assert len(view.tiles) == N and {t["status"] for t in view.tiles} == {"done"}
    assert (out / "wsi_hipe" / "tiles.csv").is_file()

    # ome-zarr-py reads the multiscale image with its µm scales.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(out)))())
    image = nodes[0]
    assert [tuple(d.shape) for d in image.data] == [(128, 192), (64, 96), (32, 48)]
    ms = image.metadata["coordinateTransformations"]
    scales = [next(t["scale"] for t in level if t["type"] == "scale") for level in ms]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    translations = [
        next(t["translation"] for t in level if t["type"] == "translation") for level in ms
    ]
    assert translations[0] == [0.0, 0.0]  # same grid as the slide at level 0
    assert translations[1] == [0.25, 0.25]  # a 2x2 block's centre
    assert image.metadata["axes"][0]["unit"] == "micrometer"


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_tiles_per_batch_gives_the_maps_of_one_tile_per_task(
    tmp_path, slide, model, cfg, region, scheduler
):
    # 6 tiles in groups of 4 and 2: each group's HiPe runs share model calls.
    grouped = cfg.with_overrides({"hipe.tiles_per_batch": 4, "schedule.scheduler": scheduler})
    out = tmp_path / "g.ome.zarr"
    result = pipeline.explain_slide(slide, out, config=grouped, model=model)
    assert result.ok and result.counts == {"done": N, "skipped": 0, "failed": 0}
    view = read_output(out)
    sal = np.asarray(view.saliency[0])
    # Same maps up to the rounding of other batch shapes (rows mix tiles).
    scale = float(region.saliency.max())
    np.testing.assert_allclose(sal, region.saliency, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.asarray(view.segmentation[0]), region.segmentation)
    by_tile = {(t["y"], t["x"]): t for t in view.tiles}
    for t in region.tiles:
        mine = by_tile[(t["y"], t["x"])]
        assert mine["status"] == "done" and mine["passes"] == t["passes"]
        assert mine["score"] == pytest.approx(t["score"], rel=1e-6)
        assert mine["seconds"] > 0
    assert view.provenance["config"]["hipe"]["tiles_per_batch"] == 4


def test_tiles_per_batch_keeps_a_groups_good_tiles_when_one_fails(tmp_path, image, model, cfg):
    bad = FailingReader(image, bad_box=(130, 70, 140, 80))  # read windows of tiles in col 2
    grouped = cfg.with_overrides({"hipe.tiles_per_batch": 3})
    out = tmp_path / "gf.ome.zarr"
    result = pipeline.explain_slide(open_slide(bad), out, config=grouped, model=model)
    one = pipeline.explain_slide(open_slide(bad), tmp_path / "f1.ome.zarr", config=cfg,
                                 model=model)  # fmt: skip
    assert {(r["y"], r["x"]) for r in result.failed} == {(r["y"], r["x"]) for r in one.failed}
    assert 0 < result.counts["failed"] < N and result.counts["done"] == N - len(result.failed)
    assert all("corrupt tile data" in r["error"] for r in result.failed)


def test_ngff_05_output(tmp_path, slide, model, cfg, region):
    out = tmp_path / "v3.ome.zarr"
    pipeline.explain_slide(
        slide, out, config=cfg.with_overrides({"output.ngff": "0.5"}), model=model
    )
    view = read_output(out)
    assert view.ngff == "0.5" and (out / "zarr.json").is_file()
    np.testing.assert_array_equal(np.asarray(view.saliency[0]), region.saliency)


def test_score_floor_skips_with_one_pass_and_zero_saliency(slide, model, cfg, region):
    scores = sorted(t["score"] for t in region.tiles)
    floor = scores[len(scores) // 2]  # about half the tiles fall at or below it
    cfg_floor = cfg.with_overrides({"score.floor": floor})
    res = pipeline.explain_region(slide, 0, 0, W, H, config=cfg_floor, model=model)
    grid = make_grid((W, H), slide_mpp=0.5, target_mpp=0.5, tile_size=64, halo=16)
    skipped = 0
    for tile, rec, ref in zip(grid.tiles, res.tiles, region.tiles, strict=True):
        rows, cols = grid.target_slices(tile)
        assert rec["score"] == pytest.approx(ref["score"], rel=1e-5)
        if rec["score"] <= floor:
            skipped += 1
            assert rec["status"] == "skipped" and rec["passes"] == 1
            assert not res.saliency[rows, cols].any()
            # The documented bound holds for what was skipped.
            assert region.saliency[rows, cols].max() <= pipeline.skip_bound(cfg_floor)
        else:
            assert rec["status"] == "done"
            np.testing.assert_array_equal(res.saliency[rows, cols], region.saliency[rows, cols])
    assert skipped >= len(grid.tiles) // 2
    np.testing.assert_array_equal(res.segmentation, region.segmentation)
    assert res.forward_passes < region.forward_passes


def test_skip_bound_holds_on_every_tile(slide, model, region, cfg):
    # 0 <= S(p) <= 4 * D * f(x) for a non-negative score, D = depths that can run.
    d = max_depths(96, start_grid=4, min_cell_size=4, max_depth=2)
    assert d == 2
    grid = make_grid((W, H), slide_mpp=0.5, target_mpp=0.5, tile_size=64, halo=16)
    for tile, rec in zip(grid.tiles, region.tiles, strict=True):
        rows, cols = grid.target_slices(tile)
        assert 0 <= region.saliency[rows, cols].min()
        assert region.saliency[rows, cols].max() <= 4 * d * rec["score"] * (1 + 1e-6)


def test_skip_bound_is_four_times_the_depths_times_the_floor():
    # Defaults: a 256 + 2 * 32 = 320 px tile runs 4 depths (hipe.max_depths), floor 1 px².
    assert max_depths(320, start_grid=None, min_cell_size=4, max_depth=None) == 4
    assert pipeline.skip_bound(load_config()) == pytest.approx(4 * 4 * 1.0)
    assert math.isinf(pipeline.skip_bound(load_config(overrides={"score.kind": "logit"})))


def test_failed_tiles_are_recorded_and_retried(tmp_path, image, model, cfg, region):
    bad = FailingReader(image, bad_box=(130, 70, 140, 80))  # inside tile row 1, col 2
    out = tmp_path / "f.ome.zarr"
    result = pipeline.explain_slide(open_slide(bad), out, config=cfg, model=model)
    assert not result.ok
    failed_xy = {(r["y"], r["x"]) for r in result.failed}
    # Every tile whose read window (core + halo) touches the bad box fails; the others finish.
    assert (64, 128) in failed_xy and len(failed_xy) >= 1
    assert result.counts["failed"] == len(failed_xy)
    assert result.counts["done"] == N - len(failed_xy)
    assert all("corrupt tile data" in r["error"] for r in result.failed)
    view = read_output(out)
    sal = np.asarray(view.saliency[0])
    for y, x in failed_xy:
        assert not sal[y : y + 64, x : x + 64].any()
    # The same run on a healthy copy of the slide retries only the failed tiles.
    healthy = FailingReader(image, bad_box=(0, 0, 0, 0))
    again = pipeline.explain_slide(open_slide(healthy), out, config=cfg, model=model)
    assert again.ok and again.computed == len(failed_xy) and again.resumed == N - len(failed_xy)
    np.testing.assert_array_equal(np.asarray(read_output(out).saliency[0]), region.saliency)


def test_resume_refuses_other_config_or_model_and_overwrite_starts_fresh(
    tmp_path, slide, model, cfg
):
    out = tmp_path / "r.ome.zarr"
    small = cfg.with_overrides({"hipe.max_depth": 1})
    first = pipeline.explain_slide(slide, out, config=small, model=model)
    # Same command again: nothing recomputed.
    second = pipeline.explain_slide(slide, out, config=small, model=model)
    assert second.computed == 0 and second.resumed == first.tiles_total
    assert second.forward_passes == 0
    # Scheduling options do not change the fingerprint.
    third = pipeline.explain_slide(
        slide, out, config=small.with_overrides({"schedule.scheduler": "threads"}), model=model
    )
    assert third.computed == 0
    with pytest.raises(ResumeMismatchError, match="overwrite=True"):  # the library fix
        pipeline.explain_slide(
            slide, out, config=small.with_overrides({"score.floor": 3.0}), model=model
        )
    other = tiny_model()
    with torch.no_grad():
        other.network.conv.bias[1] += 0.5
    with pytest.raises(ResumeMismatchError):
        pipeline.explain_slide(slide, out, config=small, model=other)
    fresh = pipeline.explain_slide(slide, out, config=small, model=other, overwrite=True)
    assert fresh.computed == fresh.tiles_total


def test_output_must_be_a_wsi_hipe_output(tmp_path, slide, model, cfg):
    out = tmp_path / "not-zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError):
        pipeline.explain_slide(slide, out, config=cfg, model=model)
    assert (out / "precious.txt").read_text() == "keep me"


def test_tissue_tiles_only_and_progress(tmp_path, model, cfg):
    # Tissue only in the left half: the right column of tiles is not computed.
    img = synthetic_image(W, H, seed=3)
    img[:, 96:] = 0.0
    s = open_slide(ArrayReader(img, mpp=0.5))
    calls = []
    out = tmp_path / "t.ome.zarr"
    res = pipeline.explain_slide(
        s,
        out,
        config=cfg.with_overrides({"tiling.min_tissue": 0.5}),
        model=model,
        progress=lambda done, total: calls.append((done, total)),
    )
    view = read_output(out)
    tissue = np.asarray(view.tissue[0])
    assert tissue[:, :96].mean() > 0.3 and not tissue[:, 150:].any()
    assert {t["x"] for t in view.tiles} <= {0, 64}
    assert 0 < res.tiles_total < N
    assert calls[-1] == (res.tiles_total, res.tiles_total)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_explain_cell_explains_the_cell_under_the_point(slide, model, cfg, region):
    labels = region.segmentation == 1
    from scipy import ndimage

    comps, n = ndimage.label(labels)
    assert n > 0
    sizes = ndimage.sum(labels, comps, range(1, n + 1))
    target = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(comps == target)
    y, x = int(np.median(ys)), int(ys.size and np.median(xs))
    if comps[y, x] != target:
        y, x = int(ys[0]), int(xs[0])
    fine = cfg.with_overrides({"hipe.start_grid": 8, "hipe.max_depth": 3})
    res = pipeline.explain_cell(slide, x + 0.5, y + 0.5, config=fine, model=model)
    side = 96
    assert res.saliency.shape == (side, side) and res.cell_mask.shape == (side, side)
    # The explained cell is the segmented component under the point.
    c = side // 2
    assert res.cell_mask[c, c]
    oy, ox = int(round(res.origin[1])), int(round(res.origin[0]))
    np.testing.assert_array_equal(
        res.cell_mask[max(0, -oy) :, max(0, -ox) :][: H - max(oy, 0), : W - max(ox, 0)]
        & (comps[max(oy, 0) : oy + side, max(ox, 0) : ox + side] == target),
        res.cell_mask[max(0, -oy) :, max(0, -ox) :][: H - max(oy, 0), : W - max(ox, 0)],
    )
    assert res.score > 0 and res.forward_passes > 1
    # Saliency concentrates on the cell: its maximum lies in the cell's 6 px neighbourhood
    # (one finest HiPe cell), and the mean there is several times the mean elsewhere.
    near = ndimage.binary_dilation(res.cell_mask, iterations=6)
    peak = np.unravel_index(np.argmax(res.saliency), res.saliency.shape)
    assert near[peak]
    print(
        "cell saliency near/far mean ratio", res.saliency[near].mean() / res.saliency[~near].mean()
    )
    assert res.saliency[near].mean() >= 3 * res.saliency[~near].mean()


def test_explain_cell_without_a_cell_says_so(model, cfg):
    dark = open_slide(ArrayReader(np.zeros((128, 128), np.float32) + 0.01, mpp=0.5))
    with pytest.raises(ValueError, match="segmented"):
        pipeline.explain_cell(dark, 64, 64, config=cfg, model=model)


def test_early_stop_off_refines_flat_tiles_like_the_authors(model, cfg):
    flat = open_slide(ArrayReader(np.full((128, 128), 0.3, np.float32), mpp=0.5))
    on = pipeline.explain_region(flat, 32, 32, 64, 64, config=cfg, model=model)
    off = pipeline.explain_region(
        flat, 32, 32, 64, 64, config=cfg.with_overrides({"hipe.early_stop": False}), model=model
    )
    # A flat input under the mean substrate changes the score only by float rounding: a
    # ~zero map either way, but the authors' rule perturbs every window at every depth.
    assert on.saliency.max() < 1e-3 and off.saliency.max() < 1e-3
    assert on.tiles[0]["status"] == off.tiles[0]["status"] == "done"
    assert on.forward_passes == 1 + 1 + 25  # segmentation, clean pass, depth 1 (5x5 windows)
    # ... and goes on to depth 2 (up to 9x9 windows, chosen by thresholding rounding noise).
    assert 1 + 1 + 25 + 9 <= off.forward_passes <= 1 + 1 + 25 + 81


def test_region_and_cell_progress_follow_the_slide_contract(slide, model, cfg, region):
    # progress(done, total): total = tiles of the run, done never decreases, stays below the
    # next whole tile while HiPe runs inside it, and the last call is (total, total).
    calls = []
    pipeline.explain_region(
        slide, 0, 0, 128, 64, config=cfg, model=model, progress=lambda d, t: calls.append((d, t))
    )
    dones = [d for d, _ in calls]
    assert {t for _, t in calls} == {2} and calls[-1] == (2, 2)
    assert dones == sorted(dones) and 0 <= min(dones)
    assert any(0 < d < 1 for d in dones) and any(1 < d < 2 for d in dones)  # depths reported
    assert [d for d in dones if d == int(d)] == [1, 2]  # whole tiles only when finished
    cell = []
    ys, xs = np.nonzero(region.segmentation == 1)
    pipeline.explain_cell(
        slide,
        xs[0] + 0.5,
        ys[0] + 0.5,
        config=cfg,
        model=model,
        progress=lambda d, t: cell.append((d, t)),
    )
    assert {t for _, t in cell} == {1} and cell[-1] == (1, 1)
    assert [d for d, _ in cell] == sorted(d for d, _ in cell) and any(0 < d < 1 for d, _ in cell)


def test_should_stop_interrupts_region(slide, model, cfg):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    res = pipeline.explain_region(slide, 0, 0, W, H, config=cfg, model=model, should_stop=stop)
    assert res.stopped and len(res.tiles) < N


def test_model_from_file_is_identified_by_hash(tmp_path, slide, cfg):
    path = save_tiny_model(tmp_path / "tiny.pt")
    out = tmp_path / "m.ome.zarr"
    small = cfg.with_overrides({"hipe.max_depth": 1, "model.path": str(path)})
    pipeline.explain_slide(slide, out, config=small)
    prov = read_output(out).provenance
    from wsi_hipe.models import file_sha256

    assert prov["model"]["sha256"] == file_sha256(path)


@pytest.mark.slow
def test_end_to_end_saliency_points_at_lymphocytes(tmp_path):
    """Synthetic slide → bundled U-Net → HiPe of the lymphocyte area: saliency on lymphocytes.

    Seed 17 mixes lymphocytes with tumour and stromal nuclei, so "bright nucleus" is not
    enough to score. Measured (commit time): pointing hit rate 1.00 over 4 tiles (chance 0.18),
    mean saliency on lymphocytes 5.4x that on other nuclei.
    """
    import tifffile
    from scipy import ndimage

    from wsi_hipe.metrics import pointing_game
    from wsi_hipe.synthetic import write_slide

    written = write_slide(tmp_path / "s.tiff", size=(192, 128), seed=17, tile_size=128)
    lymph = tifffile.imread(written.ground_truth["lymphocytes"]) > 0
    other = (tifffile.imread(written.ground_truth["nuclei"]) > 0) & ~lymph
    cfg = load_config(
        overrides={
            "tiling.tile_size": 64,
            "tiling.halo": 16,
            "tiling.min_tissue": 0.0,
            "score.floor": 5.0,
            "hipe.start_grid": 4,
            "hipe.max_depth": 3,
        }
    )
    out = tmp_path / "s.ome.zarr"
    result = pipeline.explain_slide(written.path, out, config=cfg, model="bundled")
    assert result.ok
    sal = np.asarray(read_output(out).saliency[0])
    hits, chance, played = 0, 0.0, 0
    for tile in read_output(out).tiles:
        y, x = tile["y"], tile["x"]
        gt = lymph[y : y + 64, x : x + 64]
        if tile["status"] != "done" or gt.sum() < 20:
            continue
        played += 1
        hits += pointing_game(sal[y : y + 64, x : x + 64], gt, tolerance=3).hit
        chance += (ndimage.distance_transform_edt(~gt) <= 3).mean()
    assert played >= 3
    rate, chance = hits / played, chance / played
    contrast = sal[lymph].mean() / sal[other].mean()
    print(
        f"pointing hit rate {rate:.2f} over {played} tiles (chance {chance:.2f}); "
        f"saliency on lymphocytes / other nuclei {contrast:.2f}"
    )
    assert rate >= 0.5 and rate >= chance + 0.25
    assert contrast >= 2.0
