"""The bundled U-Net: provenance, held-out quality on fresh data, HiPe on its lymphocyte score.

Also a smoke run of ``pipelines/train_unet.py`` (a few steps on tiny data) that must produce a
checkpoint ``load_model`` accepts.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_hipe.models import (
    DEFAULT_CLASS_NAMES,
    bundled_model_path,
    file_sha256,
    load_model,
    model_sha256,
    sidecar_path,
)
from wsi_hipe.scores import class_area

REPO = Path(__file__).resolve().parents[1]

# Conservative bounds for a handful of fresh tiles (the model card reports the held-out Dice
# over many tiles: >= 0.85 lymphocytes on synthetic, >= 0.70 nuclei on real BBBC039).
FRESH_TILE_LYMPHOCYTE_DICE = 0.75
BBBC039_NUCLEI_DICE = 0.65
# Seeds far from the training (0..) and held-out (1_000_000..) seeds of train_unet.py.
FRESH_SEED = 7_000_000


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(device="cpu")


def _fresh_tiles(
    size: int, count: int, min_lymph: float = 0.03, max_lymph: float = 1.0, min_other: float = 0.0
) -> list:
    """The first ``count`` fresh synthetic tiles whose lymphocyte area fraction lies in
    ``[min_lymph, max_lymph]`` and whose other nuclei cover at least ``min_other``."""
    from wsi_hipe.synthetic import render_tile

    tiles = []
    for seed in range(FRESH_SEED, FRESH_SEED + 50 * count):
        region = render_tile(seed, size)
        lymph = float((region.lymphocytes > 0).mean())
        other = float(region.nuclei.mean()) - lymph
        if min_lymph <= lymph <= max_lymph and other >= min_other:
            tiles.append(region)
            if len(tiles) == count:
                return tiles
    pytest.fail(f"fewer than {count} suitable synthetic tiles among {50 * count} seeds")


def test_bundled_files_and_provenance(model) -> None:
    path = bundled_model_path()
    assert path.suffix == ".safetensors" and path.stat().st_size < 25 * 2**20
    assert (path.parent / "MODEL_CARD.md").is_file()
    side = json.loads(sidecar_path(path).read_text())
    assert side["class_names"] == list(DEFAULT_CLASS_NAMES)
    assert side["mpp"] == 0.5
    assert model.meta.class_names == DEFAULT_CLASS_NAMES
    assert model.meta.activation == "softmax" and model.meta.in_channels == 1
    assert model.sha256 == file_sha256(path) == model_sha256() == model_sha256("bundled")
    assert model.meta.source == "bundled"
    # the recorded held-out metrics meet the targets of the issue
    assert side["metrics"]["dice_lymphocyte_synthetic"] >= 0.85
    assert side["metrics"]["dice_all_nuclei_bbbc039"] >= 0.70
    # issue 17: trained on real tissue with a held-out part, all-nuclei Dice >= 0.80 there
    assert side["metrics"]["dice_all_nuclei_tissue_held_out"] >= 0.80
    assert side["training"]["data"]["tissue_held_out"] and side["training"]["data"]["seams_px"] >= 1
    card = (path.parent / "MODEL_CARD.md").read_text(encoding="utf-8")
    held = side["metrics"]["dice_all_nuclei_tissue_held_out"]
    assert f"held-out right third of the real tissue DNA crop:\n  **{held:.3f}**" in card


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.logical_and(pred, truth).sum() / max(pred.sum() + truth.sum(), 1))


def test_bundled_segments_fresh_synthetic_tiles(model) -> None:
    tiles = _fresh_tiles(128, 3)
    x = torch.from_numpy(np.stack([t.image for t in tiles]))[:, None]
    labels = model.segment(x).numpy()
    lymph_pred = labels == 1
    lymph_true = np.stack([t.lymphocytes > 0 for t in tiles])
    assert _dice(lymph_pred, lymph_true) >= FRESH_TILE_LYMPHOCYTE_DICE
    nuclei_true = np.stack([t.nuclei for t in tiles])
    assert _dice(labels > 0, nuclei_true) >= FRESH_TILE_LYMPHOCYTE_DICE


def test_bundled_is_robust_to_gain_and_offset(model) -> None:
    """Slide normalisation is never exact: a brighter, offset tile must segment about the same."""
    tiles = _fresh_tiles(128, 2)
    x = torch.from_numpy(np.stack([t.image for t in tiles]))[:, None]
    base = model.segment(x).numpy() == 1
    shifted = model.segment((x * 1.3 + 0.03).clamp(0, 1.5)).numpy() == 1
    assert _dice(base, shifted) >= 0.85


def test_bundled_nuclei_on_held_out_bbbc039(model, nuclei_dir: Path) -> None:
    import tifffile
    from skimage import io, transform

    images = sorted((nuclei_dir / "bbbc039" / "images").glob("*.tif"))
    if len(images) < 2:
        pytest.skip("BBBC039 images not found")
    held_out = images[-1]  # train_unet.py holds out the last images by name
    raw = tifffile.imread(held_out).astype(np.float32)
    truth = io.imread(nuclei_dir / "bbbc039" / "masks" / (held_out.stem + ".png"))[..., 0] > 0
    low, high = np.percentile(raw, [1.0, 99.5])
    image = np.clip((raw - low) / (high - low), 0, 1.5)
    scale = 0.65 / model.meta.mpp  # BBBC039 is 20x, about 0.65 µm/px
    shape = (int(round(raw.shape[0] * scale / 8) * 8), int(round(raw.shape[1] * scale / 8) * 8))
    resized = transform.resize(image, shape, order=1, preserve_range=True).astype(np.float32)
    probs = model.probabilities(torch.from_numpy(resized)[None, None])[0].numpy()
    nuclei = transform.resize(probs[1] + probs[2], raw.shape, order=1, preserve_range=True) > 0.5
    assert _dice(nuclei, truth) >= BBBC039_NUCLEI_DICE


def test_bundled_on_real_tissue_as_the_model_card_says(model, shared_data: Path) -> None:
    """benchmarks/bench_real_tissue.py: real tissue nuclei and the CD45 proxy (never trained on)."""
    spec = importlib.util.spec_from_file_location(
        "bench_real_tissue", REPO / "benchmarks" / "bench_real_tissue.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not (bench.TISSUE.is_dir() and bench.CYCIF.is_dir()):
        pytest.skip("the real tissue crops are not in the shared data")
    tissue = bench.tissue_nuclei(model)
    # All nuclei are found (the card's figure, 0.889; a regression below 0.8 fails), ...
    assert tissue["all_nuclei_dice"] >= 0.80 and tissue["missed_share"] < 0.05
    assert tissue["reference_nuclei"] == 263 and 0.0 <= tissue["fused_share"] <= 1.0
    # ... but packed nuclei fuse: fewer components than nuclei (a known failure, on the card),
    # though the seams keep it well below the 74 % of the weights trained without them.
    assert tissue["components"] < tissue["reference_nuclei"]
    held = tissue["held_out"]  # the columns train_unet.py held out of training
    assert held["all_nuclei_dice"] >= 0.80 and held["fused_share"] < 0.6
    cd45 = bench.cd45_share(model)
    assert cd45["cells"] == 58 and sum(cd45["called"].values()) == 58
    card = (bundled_model_path().parent / "MODEL_CARD.md").read_text(encoding="utf-8")
    import re

    stated = re.search(r"real tissue DNA crop.*?all-nuclei Dice \*\*([0-9.]+)\*\*", card, re.S)
    # The card's figure is this measurement (within what another CPU's rounding may move).
    assert stated and abs(float(stated.group(1)) - tissue["all_nuclei_dice"]) < 0.005
    assert "whole epidermis lymphocytes" in card


def test_hipe_maximum_lies_on_a_lymphocyte(model) -> None:
    """HiPe of the expected lymphocyte area points at a lymphocyte, not at the other nuclei.

    Tiles with a few lymphocytes (3-15 % of the area) among other nuclei (>= 10 %): the
    maximum of the map must lie on (within 2 px of) a lymphocyte on most of them. (On tiles
    packed with lymphocytes every region matters and a pixel-level hit is near chance; see
    ``benchmarks/bench_model.py --hipe-tiles``.)
    """
    from scipy import ndimage

    from wsi_hipe.hipe import hierarchical_perturbation

    tiles = _fresh_tiles(96, 4, min_lymph=0.03, max_lymph=0.15, min_other=0.10)
    score = class_area(model, class_index="lymphocyte")
    hits = []
    for tile in tiles:
        x = torch.from_numpy(tile.image)[None]
        result = hierarchical_perturbation(score, x, max_depth=2, batch_size=64)
        saliency = result.saliency.numpy()
        assert saliency.shape == (96, 96) and saliency.max() > 0
        top = saliency >= saliency.max() * (1 - 1e-6)
        near_lymphocyte = ndimage.binary_dilation(tile.lymphocytes > 0, iterations=2)
        hits.append(near_lymphocyte[top].mean() >= 0.5)
    assert sum(hits) >= 3, f"HiPe maximum on a lymphocyte in {sum(hits)}/{len(hits)} tiles"


def _load_train_script():
    spec = importlib.util.spec_from_file_location(
        "train_unet", REPO / "pipelines" / "train_unet.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_train_script_smoke(tmp_path: Path) -> None:
    train_unet = _load_train_script()
    argv = [
        "--config",
        str(REPO / "configs" / "train_unet.yaml"),
        "--out",
        str(tmp_path),
        "--max-steps",
        "2",
        "--threads",
        "1",
        "--set",
        "data.synthetic_train_tiles=2",
        "--set",
        "data.synthetic_eval_tiles=1",
        "--set",
        "data.tile_size=64",
        "--set",
        "data.bbbc039=false",
        "--set",
        "train.crop=32",
        "--set",
        "train.batch_size=2",
    ]
    assert train_unet.main(argv) == 0
    weights = tmp_path / "lymphocyte_unet.safetensors"
    trained = load_model(weights, device="cpu")
    assert trained.meta.training["steps"] == 2
    assert 0.0 <= trained.meta.metrics["dice_lymphocyte_synthetic"] <= 1.0
    assert (tmp_path / "MODEL_CARD.md").is_file()
    assert trained.meta.channel_names == ("Hoechst",)  # as the bundled sidecar says
    with pytest.raises(Exception, match="unknown_key"):
        train_unet.main(["--out", str(tmp_path), "--set", "train.unknown_key=1"])


def test_seams_cut_only_where_instances_touch() -> None:
    train_unet = _load_train_script()
    inst = np.zeros((6, 10), dtype=np.int64)
    inst[1:5, 1:4] = 7  # touches 9 along x = 3 | 4
    inst[1:5, 4:7] = 9
    inst[1:3, 8:10] = 5  # alone: one background column away from 9
    seams = train_unet.touching_seams(inst, 1)
    # Within 1 px of another instance: the two touching columns, on both sides.
    assert seams[1:5, 3].all() and seams[1:5, 4].all()
    assert not seams[:, :3].any() and not seams[:, 5].any()
    # 5 and 9 are 2 px apart (x = 6 and x = 8): no seam at width 1, both cut at width 2.
    assert not seams[:, 6:].any()
    assert train_unet.touching_seams(inst, 2)[1:3, 8].all()
    assert not train_unet.touching_seams(np.where(inst == 7, 7, 0), 3).any()


def test_unknown_nucleus_pixels_are_supervised_as_any_nucleus() -> None:
    train_unet = _load_train_script()
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # lymphocyte at (0, 0)
    logits[0, 2] = torch.tensor([[0.0, 4.0], [0.0, 0.0]])  # nucleus at (0, 1)
    unknown = torch.full((1, 2, 2), train_unet.UNKNOWN_NUCLEUS)
    # Either nuclear class satisfies an unknown nucleus equally: swapping them changes nothing.
    swapped = logits[:, [0, 2, 1]]
    a = train_unet.training_loss(logits, unknown, 1.0)
    b = train_unet.training_loss(swapped, unknown, 1.0)
    torch.testing.assert_close(a, b)
    # Without unknown pixels it is the plain cross-entropy + soft Dice of the 3 classes.
    target = torch.tensor([[[1, 2], [0, 0]]])
    plain = torch.nn.functional.cross_entropy(logits, target) + train_unet.soft_dice_loss(
        logits, target
    )
    torch.testing.assert_close(train_unet.training_loss(logits, target, 1.0), plain)
    # Background logits raised on an unknown nucleus raise the loss.
    worse = logits.clone()
    worse[0, 0] = 3.0
    assert train_unet.training_loss(worse, unknown, 1.0) > a


def test_box_resample_is_the_slide_readers_area_mean() -> None:
    train_unet = _load_train_script()
    rng = np.random.default_rng(0)
    image = rng.random((8, 8)).astype(np.float32)
    inst = np.arange(64).reshape(8, 8)
    half, picked = train_unet.box_resample(image, inst, 4)
    np.testing.assert_allclose(half, image.reshape(4, 2, 4, 2).mean(axis=(1, 3)), rtol=1e-5)
    assert (picked == inst[1::2, 1::2]).all()  # the pixel under each output centre
    # Upsampling by 2 repeats each source pixel; a constant image stays constant at any ratio.
    double, _ = train_unet.box_resample(image, inst, 16)
    np.testing.assert_allclose(double, np.repeat(np.repeat(image, 2, 0), 2, 1), rtol=1e-5)
    flat, _ = train_unet.box_resample(
        np.full((13, 13), 0.3, np.float32), np.zeros((13, 13), int), 10
    )
    np.testing.assert_allclose(flat, 0.3, rtol=1e-5)


def test_vary_brightness_scales_each_nucleus_by_its_own_factor() -> None:
    train_unet = _load_train_script()
    image = np.full((40, 40), 0.05, np.float32)
    inst = np.zeros((40, 40), np.int64)
    inst[5:12, 5:12], inst[25:33, 25:33] = 1, 2
    image[inst > 0] = 0.6
    out = train_unet.vary_brightness(image, inst, 0.5, np.random.default_rng(3))
    ratios = [np.unique(np.round(out[inst == k] / image[inst == k], 5)) for k in (1, 2)]
    assert all(len(r) == 1 for r in ratios) and ratios[0][0] != ratios[1][0]
    assert np.allclose(out[18, 18], 0.05, rtol=1e-4)  # far from every nucleus: unchanged
    again = train_unet.vary_brightness(image, inst, 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(out, again)
    assert np.array_equal(
        train_unet.vary_brightness(image, inst * 0, 0.5, np.random.default_rng(3)), image
    )


def test_acquisition_augment_saturates_quantises_and_defocuses() -> None:
    train_unet = _load_train_script()
    rng = np.random.default_rng(1)
    crop = rng.random((64, 64)).astype(np.float32) * 1.2
    off = train_unet.AugmentSection()  # both off by default: the bundled recipe is unchanged
    np.testing.assert_array_equal(train_unet.augment_acquisition(crop, off, rng), crop)
    clip = train_unet.AugmentSection(acquisition_prob=1.0, saturation=(0.8, 0.8), counts=(64, 64))
    out = train_unet.augment_acquisition(crop, clip, rng)
    # in steps of 1 / 64, saturated at 0.8, which becomes the new 1.0
    assert out.max() == pytest.approx(1.0) and (out >= 1.0 - 1e-6).mean() > 0.3
    steps = out[out < 1.0] * 0.8 * 64
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    blur = train_unet.AugmentSection(defocus_prob=1.0, defocus_sigma_px=(2.0, 2.0))
    from scipy import ndimage

    blurred = ndimage.gaussian_filter(crop, 2.0)
    for seed in range(6):  # the whole crop or a smooth part of it: a pixelwise mix of the two
        soft = train_unet.augment_acquisition(crop, blur, np.random.default_rng(seed))
        assert ((soft - crop) * (blurred - soft) >= -1e-6).all()
        assert np.abs(soft - crop).mean() > 0.05 * np.abs(blurred - crop).mean()


def test_native_resolution_tiles_match_the_direct_rendering() -> None:
    """A tile rendered at 0.25 µm/px and box-filtered to 0.5 shows the same nuclei as the tile
    rendered at 0.5: the same slide window, lymphocytes in the same place."""
    train_unet = _load_train_script()
    seed = next(s for s in range(FRESH_SEED, FRESH_SEED + 50) if
                (_fresh_tile_lymph(s) > 0.05))  # fmt: skip
    direct = train_unet.synthetic_sample(seed, 96, 0.5)
    fine = train_unet.synthetic_sample(seed, 96, 0.5, native_mpp=0.25)
    coarse = train_unet.synthetic_sample(seed, 96, 0.5, native_mpp=0.65)
    for other in (fine, coarse):
        assert other.image.shape == direct.image.shape and other.label.shape == direct.label.shape
        assert _dice(other.label == 1, direct.label == 1) > 0.8
        assert _dice(other.label > 0, direct.label > 0) > 0.8
        assert np.corrcoef(other.image.ravel(), direct.image.ravel())[0, 1] > 0.8
    assert fine.source.endswith("@0.250")


def _fresh_tile_lymph(seed: int) -> float:
    from wsi_hipe.synthetic import render_tile

    return float((render_tile(seed, 96).lymphocytes > 0).mean())
