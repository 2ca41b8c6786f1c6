"""Tests of wsi_hipe.viz: the PNG overview of an output."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_hipe import slide as slide_mod
from wsi_hipe.omezarr import SEGMENTATION_COLORS, create_output, read_output
from wsi_hipe.viz import overview_figure, overview_images, overview_png, saliency_units

SHAPE, CHUNK = (64, 96), 16
MPP, SLIDE_MPP = 1.0, 0.5  # 2 slide px per output px


def _output(
    path,
    *,
    blob: bool = True,
    finalize: bool = True,
    slide_path="/nowhere/slide.tif",
    provenance=None,
    tissue=None,
):
    store = create_output(
        path,
        shape=SHAPE,
        chunk=CHUNK,
        mpp=MPP,
        slide_mpp=SLIDE_MPP,
        fingerprint="viz",
        provenance={"slide": {"path": slide_path}, **(provenance or {})},
    )
    if tissue is not None:
        store.write_tissue(tissue)
    sal = np.zeros(SHAPE, np.float32)
    if blob:
        sal[8:24, 8:24] = 1.0  # salient: the top-left area only
    seg = np.zeros(SHAPE, np.uint8)
    seg[40:56, 64:80] = 1  # a lymphocyte, bottom right
    seg[40:56, 16:32] = 2  # a nucleus, bottom left
    for y in range(0, SHAPE[0], CHUNK):
        for x in range(0, SHAPE[1], CHUNK):
            store.write_tile(y, x, sal[y : y + CHUNK, x : x + CHUNK], seg[y : y + CHUNK, x : x + CHUNK])  # fmt: skip
            store.record_tile({"index": y * 10 + x, "status": "done"})
    if finalize:
        store.finalize()  # levels: 64x96, 32x48, 16x24, 8x12
    return path


def test_overview_images_reads_a_coarse_level_and_shows_the_salient_area(tmp_path):
    path = _output(tmp_path / "o.ome.zarr")
    ov = overview_images(path, max_size=48)
    assert (ov.level, ov.step) == (1, 1) and ov.saliency.shape == (32, 48, 3)
    assert not ov.has_slide and ov.vmax == pytest.approx(1.0)
    # Level 1: the blob covers rows/cols 4..11; it is bright magma, the rest black.
    assert ov.saliency[6, 6].max() > 0.8
    np.testing.assert_array_equal(ov.saliency[20, 30], [0, 0, 0])
    lymph = np.asarray(SEGMENTATION_COLORS[1][:3]) / 255
    nucleus = np.asarray(SEGMENTATION_COLORS[2][:3]) / 255
    np.testing.assert_allclose(ov.segmentation[24, 36], lymph, atol=1e-6)
    np.testing.assert_allclose(ov.segmentation[24, 12], nucleus, atol=1e-6)
    np.testing.assert_array_equal(ov.segmentation[2, 2], [0, 0, 0])


def test_overview_never_reads_level0_of_a_finalized_output(tmp_path):
    path = _output(tmp_path / "o.ome.zarr")
    # Corrupt every stored level-0 chunk: reading any of them would raise.
    chunks = [
        p
        for array in ("0", "labels/segmentation/0", "labels/tissue/0")
        for p in (path / array).rglob("*")
        if p.is_file() and not p.name.startswith(".")
    ]
    assert len(chunks) >= 8  # the non-zero ones (all-zero chunks are not stored)
    for chunk in chunks:
        chunk.write_bytes(b"not a compressed chunk")
    with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises
        np.asarray(read_output(path).saliency[0][:CHUNK, :CHUNK])
    ov = overview_images(path, max_size=20)
    assert ov.level == 3 and ov.saliency.shape == (8, 12, 3)
    assert ov.saliency[2, 2].max() > 0.8  # the blob, from level 3 alone


def test_unfinalized_output_is_strided(tmp_path):
    path = _output(tmp_path / "o.ome.zarr", finalize=False)
    ov = overview_images(path, max_size=40)
    assert (ov.level, ov.step) == (0, 3) and ov.saliency.shape == (22, 32, 3)
    assert ov.saliency[4, 4].max() > 0.8


def test_slide_thumbnail_is_drawn_under_the_saliency(tmp_path):
    # A slide of 192x128 px (2 per output px): bright left half, dark right half.
    stain = np.zeros((SHAPE[0] * 2, SHAPE[1] * 2), np.uint8)
    stain[:, : SHAPE[1]] = 200
    reader = slide_mod.ArrayReader(stain, mpp=SLIDE_MPP)
    slide = slide_mod.open_slide(reader, normalize=False)
    path = _output(tmp_path / "o.ome.zarr", blob=False)
    ov = overview_images(path, slide=slide, max_size=48)
    assert ov.has_slide
    bright, dark = ov.saliency[20, 10], ov.saliency[20, 40]
    assert bright.min() > 0.5 and dark.max() < 0.2
    assert np.allclose(bright, bright[0])  # grey
    assert ov.saliency[20, 23].min() > 0.5 and ov.saliency[20, 25].max() < 0.2  # edge in place


def test_overview_png_is_written_and_salient_pixels_differ(tmp_path):
    from matplotlib.image import imread

    png = overview_png(_output(tmp_path / "a.ome.zarr"), tmp_path / "png" / "a.png")
    blank = overview_png(_output(tmp_path / "b.ome.zarr", blob=False), tmp_path / "b.png")
    assert png.is_file() and png.stat().st_size > 1000
    img, ref = imread(png)[..., :3], imread(blank)[..., :3]
    assert img.shape == ref.shape and img.shape[0] >= 256
    diff = np.abs(img - ref).sum(axis=-1) > 0.1
    assert diff.any()
    rows, cols = np.nonzero(diff)
    # Only the saliency panel (left third, upper half: where the blob is) and the colour bar's
    # tick labels (vmax differs) may change; the segmentation panel on the right is identical.
    height, width = diff.shape
    assert cols.max() < width / 2
    big = np.abs(img - ref).sum(axis=-1) > 1.0  # strongly changed pixels: the blob itself
    r, c = np.nonzero(big)
    assert r.size and r.mean() < height / 2 and c.mean() < width / 4


def test_bad_max_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="max_size"):
        overview_images(_output(tmp_path / "o.ome.zarr"), max_size=0)


PIPELINE_PROVENANCE = {
    "config": {"score": {"kind": "area", "class": 1}},
    "model": {"class_names": ["background", "lymphocyte", "nucleus"]},
}


def test_saliency_units_follow_the_score():
    assert saliency_units(PIPELINE_PROVENANCE) == "px² of expected lymphocyte area per pixel"
    mean = {**PIPELINE_PROVENANCE, "config": {"score": {"kind": "mean", "class": 2}}}
    assert saliency_units(mean) == "mean nucleus probability per pixel"
    assert saliency_units({"config": {"score": {"kind": "logit", "class": 4}}}) == (
        "class 4 logit sum per pixel"
    )
    assert saliency_units({}) == "score units per pixel"


def test_colour_bar_is_labelled_in_units_and_the_tissue_is_outlined(tmp_path):
    tissue = np.zeros(SHAPE, bool)
    tissue[4:60, 4:70] = True
    path = _output(tmp_path / "o.ome.zarr", provenance=PIPELINE_PROVENANCE, tissue=tissue)
    ov = overview_images(path, max_size=48)
    np.testing.assert_array_equal(ov.tissue, tissue[::2, ::2])  # level 1 of the tissue label
    assert ov.units == "px² of expected lymphocyte area per pixel"
    fig = overview_figure(path, max_size=48)
    bar = [ax for ax in fig.axes if ax.get_ylabel()]
    assert len(bar) == 1 and bar[0].get_ylabel().replace("\n", " ") == ov.units
    left, right = (ax for ax in fig.axes if ax.images)
    for ax in (left, right):  # one contour line around the tissue on each panel
        assert len(ax.collections) == 1
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert "tissue outline" in labels
    # Without a tissue label there is nothing to outline.
    bare = overview_figure(_output(tmp_path / "b.ome.zarr"), max_size=48)
    assert all(len(ax.collections) == 0 for ax in bare.axes if ax.images)
