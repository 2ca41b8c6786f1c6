"""Synthetic Hoechst slides: seams, determinism, OpenSlide round trip, ground truth, cell shapes."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from wsi_hipe.errors import OutputError
from wsi_hipe.synthetic import (
    LAYOUTS,
    SyntheticRegion,
    ground_truth_paths,
    render_region,
    render_tile,
    write_slide,
)
from wsi_hipe.synthetic._write import _down2

SEED = 4  # a slide whose central 512 µm hold all three classes and an out-of-focus patch
SIZE = 1024
TILE = 256


def _q8(image: np.ndarray) -> np.ndarray:
    return np.floor(image * 255 + 0.5).astype(np.uint8)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def full() -> SyntheticRegion:
    """The whole 1024² slide rendered in one piece."""
    return render_region(0, 0, SIZE, SIZE, seed=SEED, slide_size=SIZE)


@pytest.fixture(scope="module")
def clean() -> SyntheticRegion:
    """The same slide without artefacts."""
    return render_region(0, 0, SIZE, SIZE, seed=SEED, slide_size=SIZE, artefacts=False)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "slide.tiff"
    return write_slide(out, size=SIZE, seed=SEED, tile_size=TILE)


# --- render_region: seams and determinism ------------------------------------------------------


def test_region_is_crop_of_larger_region(full):
    for x, y, w, h in [(0, 0, 512, 512), (301, 203, 333, 257), (700, 900, 324, 124)]:
        sub = render_region(x, y, w, h, seed=SEED, slide_size=SIZE)
        crop = (slice(y, y + h), slice(x, x + w))
        np.testing.assert_array_equal(sub.image, full.image[crop])
        np.testing.assert_array_equal(sub.lymphocytes, full.lymphocytes[crop])
        np.testing.assert_array_equal(sub.nuclei, full.nuclei[crop])
        np.testing.assert_array_equal(sub.tissue, full.tissue[crop])


def test_seams_with_fold_and_out_of_focus_patch():
    # seed 11 has a tissue fold and an out-of-focus patch in its central region
    big = render_region(0, 0, 1024, 1024, seed=11, slide_size=1024)
    parts = [
        render_region(x, y, 512, 512, seed=11, slide_size=1024) for y in (0, 512) for x in (0, 512)
    ]
    tiled = np.block([[parts[0].image, parts[1].image], [parts[2].image, parts[3].image]])
    np.testing.assert_array_equal(tiled, big.image)
    # the cells of a tiling are the cells of the whole, each exactly once
    ids = sorted(c["id"] for p in parts for c in p.cells)
    assert ids == sorted(c["id"] for c in big.cells)
    # artefacts do change the image, never the ground truth
    clean = render_region(0, 0, 1024, 1024, seed=11, slide_size=1024, artefacts=False)
    assert not np.array_equal(clean.image, big.image)
    np.testing.assert_array_equal(clean.lymphocytes, big.lymphocytes)
    np.testing.assert_array_equal(clean.nuclei, big.nuclei)
    np.testing.assert_array_equal(clean.tissue, big.tissue)


def test_region_cells_belong_to_the_window(full):
    sub = render_region(256, 256, 256, 256, seed=SEED, slide_size=SIZE)
    expected = [c for c in full.cells if 256 <= round(c["x"]) < 512 and 256 <= round(c["y"]) < 512]
    assert sub.cells == expected
    assert len(sub.cells) > 20


def test_deterministic_and_seed_dependent():
    a = render_region(10, 20, 128, 96, seed=3)
    b = render_region(10, 20, 128, 96, seed=3)
    c = render_region(10, 20, 128, 96, seed=5)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.cells == b.cells
    assert not np.array_equal(a.image, c.image)


def test_same_cells_at_any_resolution():
    # tissue and cells are defined in µm: the same 128 µm window at 0.5 and 0.25 µm/px
    lo = render_region(0, 0, 256, 256, seed=SEED, mpp=0.5, slide_size=256)
    hi = render_region(0, 0, 512, 512, seed=SEED, mpp=0.25, slide_size=512)
    assert [c["id"] for c in lo.cells] == [c["id"] for c in hi.cells]
    assert len(lo.cells) > 10
    for a, b in zip(lo.cells, hi.cells, strict=True):
        assert b["area_px"] == pytest.approx(4 * a["area_px"], rel=0.25)
        assert (b["x"] + 0.5) / 2 == pytest.approx(a["x"] + 0.5)


def test_region_output_types(full):
    assert full.image.dtype == np.float32 and full.image.shape == (SIZE, SIZE)
    assert 0.0 <= full.image.min() and full.image.max() <= 1.0
    assert full.lymphocytes.dtype == np.int32
    assert full.nuclei.dtype == bool and full.tissue.dtype == bool
    assert set(full.cells[0]) == {"id", "x", "y", "cls", "area_px"}
    ids = [c["id"] for c in full.cells]
    assert len(ids) == len(set(ids)) and min(ids) > 0 and max(ids) < 2**31


# --- image model against ground truth ----------------------------------------------------------


def test_lymphocytes_bright_and_centred_in_their_instance(full):
    img, lab = full.image, full.lymphocytes
    background = float(np.median(img[full.tissue & ~full.nuclei]))
    lymphs = [c for c in full.cells if c["cls"] == "lymphocyte"]
    assert len(lymphs) > 50
    present = set(np.unique(lab)) - {0}
    for c in lymphs:
        assert c["id"] in present
        assert lab[round(c["y"]), round(c["x"])] == c["id"]
        inside = img[lab == c["id"]]
        assert inside.mean() > background + 0.2, c
    # every labelled lymphocyte is in the table (none centred outside this full-slide window)
    assert present == {c["id"] for c in lymphs}
    # lymphocytes lie on the nuclei mask; the nuclei mask is more than lymphocytes
    assert np.all(full.nuclei[lab > 0])
    assert full.nuclei.sum() > 2 * (lab > 0).sum()
    # dark background, brighter tissue, nuclei well above both
    assert 0.015 < float(np.median(img[~full.tissue])) < 0.07
    assert background < float(np.median(img[full.nuclei]))


def _class_regions(region: SyntheticRegion) -> dict[str, list]:
    """Regionprops of isolated nuclei (one cell centre per connected component), per class."""
    from skimage.measure import label, regionprops

    comp = label(region.nuclei, connectivity=1)
    centres: dict[int, list[dict]] = {}
    for c in region.cells:
        centres.setdefault(int(comp[round(c["y"]), round(c["x"])]), []).append(c)
    out: dict[str, list] = {"lymphocyte": [], "tumour": [], "stromal": []}
    for rp in regionprops(comp):
        cells = centres.get(rp.label, [])
        if len(cells) == 1 and rp.area > 0.8 * cells[0]["area_px"]:
            out[cells[0]["cls"]].append(rp)
    return out


def test_cell_class_shapes(clean):
    props = _class_regions(clean)
    assert all(len(v) >= 15 for v in props.values()), {k: len(v) for k, v in props.items()}

    def med(cls, f):
        return float(np.median([f(rp) for rp in props[cls]]))

    def ratio(rp):
        return rp.axis_major_length / max(rp.axis_minor_length, 1e-6)

    # lymphocytes ~7 µm (14 px at 0.5 µm/px), round
    assert 12.0 < med("lymphocyte", lambda rp: rp.equivalent_diameter_area) < 16.0
    assert med("lymphocyte", ratio) < 1.25
    # tumour nuclei larger and oval
    assert med("tumour", lambda rp: rp.area) > 2.0 * med("lymphocyte", lambda rp: rp.area)
    assert med("tumour", ratio) > med("lymphocyte", ratio) + 0.2
    # stromal nuclei elongated
    assert med("stromal", ratio) > 2.5


def test_texture_and_brightness_by_class(clean):
    from scipy.ndimage import binary_erosion
    from skimage.morphology import disk

    props = _class_regions(clean)
    img = clean.image

    def stats(cls):
        mean, cv, peak = [], [], []
        for rp in props[cls]:
            m = np.zeros(img.shape, dtype=bool)
            m[rp.coords[:, 0], rp.coords[:, 1]] = True
            core = img[binary_erosion(m, disk(2))]
            if core.size > 10:
                mean.append(core.mean())
                cv.append(core.std() / core.mean())
                peak.append(np.percentile(core, 99))
        return np.median(mean), np.median(cv), np.max(peak)

    l_mean, l_cv, l_peak = stats("lymphocyte")
    t_mean, t_cv, t_peak = stats("tumour")
    assert l_mean > 1.4 * t_mean  # lymphocytes brightest
    assert t_cv > 1.5 * l_cv  # tumour nuclei textured
    assert t_peak > 0.8 * l_mean  # ... with spots as bright as lymphocytes


def test_intensity_calibrated_to_real_hoechst(nuclei_dir):
    """Nucleus-to-background contrast within the range of real Hoechst/fluorescence images."""
    import tifffile
    from skimage.io import imread

    ratios = []
    for img_path in sorted((nuclei_dir / "bbbc039" / "images").glob("*.tif"))[:2]:
        img = tifffile.imread(img_path).astype(np.float64)
        mask = imread(nuclei_dir / "bbbc039" / "masks" / (img_path.stem + ".png"))[..., 0] > 0
        ratios.append(np.median(img[mask]) / np.median(img[~mask]))
    img = tifffile.imread(nuclei_dir / "stardist" / "tests_img2d.tif").astype(np.float64)
    mask = tifffile.imread(nuclei_dir / "stardist" / "tests_mask2d.tif") > 0
    ratios.append(np.median(img[mask]) / np.median(img[~mask]))

    region = render_region(0, 0, 512, 512, seed=SEED, slide_size=SIZE // 2)
    ours = np.median(region.image[region.nuclei]) / np.median(region.image[~region.nuclei])
    assert 0.5 * min(ratios) < ours < 2.0 * max(ratios), (ours, ratios)


# --- render_tile -----------------------------------------------------------------------------


def test_render_tile_varies_and_repeats():
    tiles = [render_tile(s, 128) for s in range(32)]
    again = render_tile(3, 128)
    np.testing.assert_array_equal(again.image, tiles[3].image)
    np.testing.assert_array_equal(again.lymphocytes, tiles[3].lymphocytes)
    for t in tiles:
        assert t.image.shape == (128, 128) and t.image.dtype == np.float32
        assert t.lymphocytes.shape == t.nuclei.shape == t.tissue.shape == (128, 128)
    tissue = np.array([t.tissue.mean() for t in tiles])
    assert (tissue > 0.9).sum() >= 16  # mostly tissue
    assert (tissue < 0.5).sum() >= 2  # some background
    with_lymphs = sum((t.lymphocytes > 0).sum() > 100 for t in tiles)
    assert with_lymphs >= 12
    assert len({t.seed for t in tiles}) == 32


# --- write_slide -------------------------------------------------------------------------------


def test_openslide_round_trip(slide, full):
    import openslide

    with openslide.OpenSlide(str(slide.path)) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert osr.level_count == 3
        assert osr.level_dimensions == ((1024, 1024), (512, 512), (256, 256))
        assert slide.level_dimensions == osr.level_dimensions
        rgba = np.asarray(osr.read_region((300, 500), 0, (400, 300)))
        assert np.all(rgba[..., 3] == 255)
        for ch in range(3):  # single channel: OpenSlide repeats it in R, G and B
            np.testing.assert_array_equal(rgba[..., ch], _q8(full.image[500:800, 300:700]))
        level1 = np.asarray(osr.read_region((0, 0), 1, (512, 512)))[..., 0]
        np.testing.assert_array_equal(level1, _down2(_q8(full.image)))


def test_ground_truth_matches_untiled_render(slide, full):
    import tifffile

    gt = slide.ground_truth
    assert gt == ground_truth_paths(slide.path)
    assert {p.name for p in gt.values()} == {
        "slide.lymphocytes.tiff",
        "slide.nuclei.tiff",
        "slide.tissue.tiff",
        "slide.cells.csv",
        "slide.gt.json",
    }
    lab = tifffile.imread(gt["lymphocytes"])
    assert lab.dtype == np.uint32
    np.testing.assert_array_equal(lab, full.lymphocytes)
    np.testing.assert_array_equal(tifffile.imread(gt["nuclei"]), full.nuclei.astype(np.uint8))
    np.testing.assert_array_equal(tifffile.imread(gt["tissue"]), full.tissue.astype(np.uint8))

    with open(gt["cells"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["id"]) for r in rows) == sorted(c["id"] for c in full.cells)
    by_id = {c["id"]: c for c in full.cells}
    for r in rows:
        c = by_id[int(r["id"])]
        assert r["cls"] == c["cls"] and int(r["area_px"]) == c["area_px"]
        assert float(r["x"]) == pytest.approx(c["x"], abs=1e-3)
    counts = {k: sum(r["cls"] == k for r in rows) for k in ("lymphocyte", "tumour", "stromal")}
    assert slide.n_cells == counts

    meta = json.loads(gt["meta"].read_text())
    assert meta["size"] == [SIZE, SIZE] and meta["mpp"] == 0.5 and meta["seed"] == SEED
    assert meta["gt_downsample"] == 1 and meta["n_cells"] == counts
    assert meta["files"]["lymphocytes"] == "slide.lymphocytes.tiff"


def test_write_is_deterministic(tmp_path):
    kw = {"size": (512, 384), "tile_size": 128}
    a = write_slide(tmp_path / "a.tiff", seed=2, **kw)
    b = write_slide(tmp_path / "b.tiff", seed=2, workers=2, **kw)  # threads change nothing
    c = write_slide(tmp_path / "c.tiff", seed=9, **kw)
    assert _sha(a.path) == _sha(b.path) != _sha(c.path)
    for key in ("lymphocytes", "nuclei", "tissue", "cells"):
        assert _sha(a.ground_truth[key]) == _sha(b.ground_truth[key])
    assert _sha(a.ground_truth["cells"]) != _sha(c.ground_truth["cells"])


@pytest.mark.parametrize("layout", ["rgb", "gray16"])
def test_layouts(tmp_path, layout):
    import openslide
    import tifffile

    # 16-bit: OpenSlide misreads partial right-edge tiles, so the width is a tile multiple
    width = 400 if layout == "rgb" else 384
    s = write_slide(
        tmp_path / f"{layout}.tiff",
        size=(width, 272),
        seed=1,
        layout=layout,
        tile_size=128,
        ground_truth=False,
    )
    assert s.ground_truth == {} and not (tmp_path / f"{layout}.cells.csv").exists()
    ref = render_region(0, 0, width, 272, seed=1, slide_size=(width, 272)).image
    stored = tifffile.TiffFile(s.path).pages[0].asarray()
    with openslide.OpenSlide(str(s.path)) as osr:
        assert osr.level_dimensions[0] == (width, 272)
        rgba = np.asarray(osr.read_region((0, 0), 0, (width, 272)))
    if layout == "rgb":
        assert stored.shape == (272, width, 3) and stored.dtype == np.uint8
        np.testing.assert_array_equal(stored[..., 2], _q8(ref))
        assert rgba[..., 2].max() > 200 and rgba[..., 2].mean() > 5
        assert rgba[..., 0].max() == 0 and rgba[..., 1].max() == 0
    else:
        assert stored.dtype == np.uint16
        q16 = np.floor(ref * 65535 + 0.5).astype(np.uint16)
        np.testing.assert_array_equal(stored, q16)
        # OpenSlide reads the top 8 bits of 16-bit grey
        np.testing.assert_array_equal(rgba[..., 0], (q16 >> 8).astype(np.uint8))


def test_ground_truth_downsample(tmp_path, full):
    import tifffile

    s = write_slide(
        tmp_path / "d.tiff",
        size=SIZE,
        seed=SEED,
        tile_size=TILE,
        gt_downsample=4,
        artefacts=False,
    )
    lab = tifffile.imread(s.ground_truth["lymphocytes"])
    assert lab.shape == (256, 256)
    np.testing.assert_array_equal(lab, full.lymphocytes[2::4, 2::4])
    np.testing.assert_array_equal(
        tifffile.imread(s.ground_truth["tissue"]), full.tissue[2::4, 2::4].astype(np.uint8)
    )
    meta = json.loads(s.ground_truth["meta"].read_text())
    assert meta["gt_downsample"] == 4 and meta["gt_mpp"] == 2.0 and meta["gt_size"] == [256, 256]
    with tifffile.TiffFile(s.ground_truth["tissue"]) as tf:
        x_res = tf.pages[0].tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 2.0)  # px per cm at 2 µm/px


def test_ground_truth_downsample_with_thin_edge_tiles(tmp_path):
    import tifffile

    # the last tile column and row are 3 px: they hold no ground-truth sample at d = 8
    s = write_slide(tmp_path / "e.tiff", size=(259, 131), seed=2, tile_size=128, gt_downsample=8)
    ref = render_region(0, 0, 259, 131, seed=2, slide_size=(259, 131))
    nuclei = tifffile.imread(s.ground_truth["nuclei"])
    assert nuclei.shape == (16, 32)
    np.testing.assert_array_equal(nuclei, ref.nuclei[4::8, 4::8].astype(np.uint8))


# --- input checking ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout": "bgr"}, "layout must be one of"),
        ({"tile_size": 100}, "multiple of 16"),
        ({"tile_size": 256, "gt_downsample": 3}, "gt_downsample"),
        ({"size": 0}, "width"),
        ({"size": (10, 20, 30)}, "size must be"),
        ({"mpp": 0.0}, "mpp"),
        ({"seed": -1}, "seed"),
    ],
)
def test_write_slide_rejects_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_slide(tmp_path / "x.tiff", **kwargs)
    assert not any(tmp_path.iterdir())


def test_write_slide_needs_existing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_slide(tmp_path / "missing" / "x.tiff", size=64)


def test_render_region_rejects_bad_input():
    with pytest.raises(ValueError, match="width"):
        render_region(0, 0, 0, 10)
    with pytest.raises(ValueError, match="mpp"):
        render_region(0, 0, 8, 8, mpp=-1)
    with pytest.raises(ValueError, match="slide_size"):
        render_region(0, 0, 8, 8, slide_size=(8,))
    assert set(LAYOUTS) == {"gray", "gray16", "rgb"}


# --- lymphocyte density presets ----------------------------------------------------------------


def test_density_presets_order_the_lymphocyte_cover_and_keep_the_rest(full):
    from wsi_hipe.synthetic import DENSITIES

    assert set(DENSITIES) == {"sparse", "clustered", "dense"}
    cover = {}
    for density in ("sparse", "clustered", "dense"):
        r = render_region(0, 0, SIZE, SIZE, seed=SEED, slide_size=SIZE, density=density)
        np.testing.assert_array_equal(r.tissue, full.tissue)  # the same section
        lymph = r.lymphocytes > 0
        cover[density] = lymph.sum() / r.tissue.sum()
        assert not np.any(lymph & ~r.nuclei)
        assert {c["cls"] for c in r.cells} >= {"lymphocyte", "tumour"}
    assert cover["sparse"] < 0.03 < cover["clustered"] < 0.12 < cover["dense"]
    # None is the seed's own draw, bit for bit the same as before presets existed.
    own = render_region(0, 0, 256, 256, seed=SEED, slide_size=SIZE, density=None)
    np.testing.assert_array_equal(own.image, full.image[:256, :256])


def test_density_preset_regions_are_crops_of_the_slide():
    kw = {"seed": 1, "slide_size": 512, "density": "clustered"}
    big = render_region(0, 0, 512, 512, **kw)
    sub = render_region(130, 70, 200, 300, **kw)
    np.testing.assert_array_equal(sub.image, big.image[70:370, 130:330])
    np.testing.assert_array_equal(sub.lymphocytes, big.lymphocytes[70:370, 130:330])


def test_sparse_preset_has_no_cluster():
    from scipy import ndimage

    r = render_region(0, 0, 1024, 1024, seed=2, slide_size=1024, density="sparse")
    # Isolated lymphocytes only: no 60 µm window holds more than a handful of them.
    lymph = (r.lymphocytes > 0).astype(float)
    assert ndimage.uniform_filter(lymph, 120).max() < 0.1
    dense = render_region(0, 0, 1024, 1024, seed=2, slide_size=1024, density="dense")
    assert ndimage.uniform_filter((dense.lymphocytes > 0).astype(float), 120).max() > 0.4


def test_write_slide_records_the_density(tmp_path):
    s = write_slide(tmp_path / "d.tiff", size=256, seed=3, tile_size=256, density="dense")
    assert s.density == "dense"
    meta = json.loads(s.ground_truth["meta"].read_text())
    assert meta["density"] == "dense"
    import tifffile

    ref = render_region(0, 0, 256, 256, seed=3, slide_size=256, density="dense")
    np.testing.assert_array_equal(
        tifffile.imread(s.ground_truth["lymphocytes"]), ref.lymphocytes.astype(np.uint32)
    )
    plain = write_slide(tmp_path / "p.tiff", size=256, seed=3, tile_size=256)
    assert "density" not in json.loads(plain.ground_truth["meta"].read_text())


def test_bad_density_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="density must be one of"):
        render_region(0, 0, 8, 8, density="packed")
    with pytest.raises(ValueError, match="density must be one of"):
        write_slide(tmp_path / "x.tiff", size=64, density="packed")
    assert not any(tmp_path.iterdir())
