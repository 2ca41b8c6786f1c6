"""Slide access on real vendor files, bad inputs, synthetic fluorescence slides and arrays."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import wsi_hipe.slide as slide_mod
import wsi_hipe.slide._openslide as openslide_mod
import wsi_hipe.slide._resample as resample_mod
from wsi_hipe import synthetic
from wsi_hipe.errors import (
    MissingMppError,
    SlideError,
    SlideFormatError,
    SlideNotFoundError,
    SlideReadError,
    StainError,
)
from wsi_hipe.slide import (
    CLIP_MAX,
    ArrayReader,
    OpenSlideReader,
    Slide,
    SlideReader,
    TiffReader,
    clear_reader_cache,
    iter_tiles,
    open_reader,
    open_slide,
    reader_cached,
)
from wsi_hipe.tiling import make_grid

# --------------------------------------------------------------------------------------------
# Test data made here: a fluorescence nuclear stain with a known tissue region.
# --------------------------------------------------------------------------------------------


def fluorescence(h, w, *, seed=0):
    """uint8 (h, w) nuclear stain: dark background, an ellipse of tissue dense with nuclei.

    Returns the image and the ground-truth tissue mask.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((yy - 0.5 * h) / (0.38 * h)) ** 2 + ((xx - 0.45 * w) / (0.33 * w)) ** 2 <= 1.0
    image = np.full((h, w), 6.0)
    image[tissue] = 28.0
    ys, xs = np.nonzero(tissue)
    r = 6
    n = int(0.4 * tissue.sum() / (np.pi * r * r))
    disk = (np.mgrid[-r : r + 1, -r : r + 1] ** 2).sum(0) <= r * r
    for i in rng.choice(ys.size, size=n, replace=False):
        y, x = ys[i], xs[i]
        y0, x0, y1, x1 = max(y - r, 0), max(x - r, 0), min(y + r + 1, h), min(x + r + 1, w)
        sub = disk[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r]
        image[y0:y1, x0:x1][sub] = rng.uniform(170, 230)
    image += rng.normal(0, 2, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), tissue


def block_mean(a, d):
    h, w = a.shape[0] // d, a.shape[1] // d
    b = a[: h * d, : w * d].astype(np.float64).reshape(h, d, w, d, *a.shape[2:]).mean(axis=(1, 3))
    return np.round(b).astype(np.uint8)


def write_tiff(path, data, *, mpp=0.5, levels=3, tile=64, extrasamples=None):
    """A tiled pyramidal TIFF (zlib) that OpenSlide opens as generic-tiff; mpp in cm tags."""
    import tifffile

    photometric = "minisblack" if data.ndim == 2 else "rgb"
    with tifffile.TiffWriter(path) as tw:
        level = data
        for k in range(levels):
            kw = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**k)  # px per cm
                kw = dict(resolution=(res, res), resolutionunit="CENTIMETER")
            if extrasamples is not None:
                kw["extrasamples"] = extrasamples
            tw.write(
                level,
                tile=(tile, tile),
                photometric=photometric,
                compression="zlib",
                subfiletype=0 if k == 0 else 1,
                **kw,
            )
            level = block_mean(level, 2)
    return Path(path)


def box_reference(src, x0, y0, ratio, width, height):
    """Area-weighted mean of ``src`` pixels under each output pixel (a plain loop)."""

    def weights(start, n, size):
        out = []
        for i in range(n):
            a, b = start + i * ratio, start + (i + 1) * ratio
            row = {}
            for j in range(int(np.floor(a)), int(np.ceil(b))):
                ov = min(b, j + 1) - max(a, j)
                if ov > 0 and 0 <= j < size:
                    row[j] = ov / ratio
            out.append(row)
        return out

    wy, wx = weights(y0, height, src.shape[0]), weights(x0, width, src.shape[1])
    out = np.zeros((height, width))
    for i, ry in enumerate(wy):
        for j, rx in enumerate(wx):
            out[i, j] = sum(vy * vx * src[yy, xx] for yy, vy in ry.items() for xx, vx in rx.items())
    return out


@pytest.fixture(scope="module")
def fluor():
    return fluorescence(384, 512, seed=1)


@pytest.fixture(scope="module")
def gray_tiff(tmp_path_factory, fluor):
    return write_tiff(tmp_path_factory.mktemp("gray") / "gray.tiff", fluor[0])


@pytest.fixture(scope="module")
def blue_tiff(tmp_path_factory, fluor):
    img = fluor[0]
    rgb = np.stack([np.zeros_like(img), np.zeros_like(img), img], axis=-1)
    return write_tiff(tmp_path_factory.mktemp("blue") / "blue.tiff", rgb)


# --------------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------------

REAL = [
    ("CMU-1-Small-Region.svs", "aperio", (2220, 2967), 0.499),
    ("small.svs", "aperio", (16, 16), 0.499),
    ("dicom-boxes", "dicom", (16, 16), 0.499),
    ("boxes.tiff", "generic-tiff", (300, 250), None),
]


@pytest.mark.shared_data
@pytest.mark.parametrize("name,vendor,dims,mpp", REAL)
def test_real_slides_open_read_and_tile(slides_dir, name, vendor, dims, mpp):
    slide = open_slide(slides_dir / name, allow_brightfield=True)  # all four are brightfield
    prov = slide.provenance()
    assert prov["vendor"] == vendor and slide.dimensions == dims
    if mpp is not None:
        assert slide.mpp == pytest.approx(mpp)
    assert prov["brightfield"] and prov["stain_mode"] == "inverted"
    # Read at a quarter of the resolution, tile by tile, and stitch the cores.
    target = 4 * slide.mpp
    grid = make_grid(
        slide.dimensions, slide_mpp=slide.mpp, target_mpp=target, tile_size=128, halo=16
    )
    whole = slide.read(0, 0, grid.shape[1], grid.shape[0], mpp=target)
    assert whole.dtype == np.float32 and whole.shape == grid.shape
    assert 0.0 <= whole.min() and whole.max() <= CLIP_MAX and whole.max() > 0.2
    stitched = np.full(grid.shape, np.nan, dtype=np.float32)
    for item in iter_tiles(slide, grid):
        assert item.error is None and item.image.shape == (grid.window, grid.window)
        rows, cols = grid.core_slices(item.tile)
        assert np.isnan(stitched[grid.target_slices(item.tile)]).all()  # each px written once
        stitched[grid.target_slices(item.tile)] = item.image[rows, cols]
    np.testing.assert_allclose(stitched, whole, atol=1e-5)


@pytest.mark.shared_data
def test_cmu_native_read_is_the_raw_channel(slides_dir):
    import openslide

    path = slides_dir / "CMU-1-Small-Region.svs"
    slide = open_slide(path, channel=0, normalize=False)  # explicit channel: no refusal
    assert slide.provenance()["channel_method"].startswith("explicit")
    got = slide.read(1000, 1200, 96, 64, mpp=0.499)
    raw = np.asarray(openslide.OpenSlide(str(path)).read_region((1000, 1200), 0, (96, 64)))
    np.testing.assert_allclose(got, raw[..., 0] / 255, rtol=1e-6)


@pytest.mark.shared_data
def test_boxes_tiff_picks_the_level_and_resamples_only_when_needed(slides_dir):
    import openslide

    path = slides_dir / "boxes.tiff"
    osr = openslide.OpenSlide(str(path))
    level1 = np.asarray(osr.read_region((0, 0), 1, osr.level_dimensions[1]))[..., :3].mean(-1)
    slide = open_slide(path, channel="mean", normalize=False)
    m = slide.mpp
    # Exactly level 1 (downsample 2): no resampling.
    got = slide.read(0, 0, 150, 125, mpp=2 * m)
    np.testing.assert_allclose(got, level1 / 255, atol=1e-6)
    # 3x: level 1 (the largest downsample <= 3; level 2 is 4.016) and a 1.5x box filter.
    got = slide.read(8, 12, 40, 30, mpp=3 * m)
    ref = box_reference(level1, 8 / 2, 12 / 2, 1.5, 40, 30)
    np.testing.assert_allclose(got, ref / 255, atol=1e-5)


@pytest.mark.shared_data
def test_dicom_folder_opens_its_one_slide_same_pixels_as_svs(slides_dir):
    dicom = open_slide(slides_dir / "dicom-boxes", channel="mean", normalize=False)
    assert Path(dicom.path).parent.name == "dicom-boxes" and dicom.path.endswith(".dcm")
    svs = open_slide(slides_dir / "small.svs", channel="mean", normalize=False)
    np.testing.assert_array_equal(
        dicom.read(0, 0, 16, 16, mpp=0.499), svs.read(0, 0, 16, 16, mpp=0.499)
    )


@pytest.mark.shared_data
def test_brightfield_is_refused_with_the_fix(slides_dir):
    path = slides_dir / "CMU-1-Small-Region.svs"
    with pytest.raises(StainError) as info:
        open_slide(path)
    msg = str(info.value)
    assert str(path.resolve()) in msg and "brightfield" in msg and "allow_brightfield" in msg


# --------------------------------------------------------------------------------------------
# Bad inputs: one wsi_hipe error each, naming the file and the cause
# --------------------------------------------------------------------------------------------

BAD = [
    ("unopenable.tiff", SlideFormatError, "Unsupported TIFF compression"),
    ("broken.svs", SlideFormatError, "not a slide format"),
    ("boxes.png", SlideFormatError, "not a slide format"),
    ("missing.svs", SlideNotFoundError, "not found"),
]


@pytest.mark.shared_data
@pytest.mark.parametrize("name,error,cause", BAD)
def test_bad_real_files(slides_dir, name, error, cause):
    with pytest.raises(error) as info:
        open_slide(slides_dir / name)
    assert name in str(info.value) and cause in str(info.value)
    assert isinstance(info.value, SlideError)


def test_empty_file_and_folder_without_slide(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(SlideFormatError, match=r"empty\.svs.*empty \(0 bytes\)"):
        open_slide(empty)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no slide here")
    with pytest.raises(SlideNotFoundError, match=r"notes holds no slide"):
        open_slide(folder)
    with pytest.raises(SlideNotFoundError, match="notes"):
        open_slide(tmp_path / "notes" / "absent.ndpi")


def test_folder_with_two_slides_is_ambiguous(tmp_path, fluor):
    write_tiff(tmp_path / "a.tiff", fluor[0], levels=1)
    write_tiff(tmp_path / "b.tiff", fluor[0][::-1].copy(), levels=1)
    with pytest.raises(SlideFormatError, match=r"2 different slides \(a.tiff, b.tiff\)"):
        open_slide(tmp_path)
    (tmp_path / "b.tiff").unlink()
    assert open_slide(tmp_path).path.endswith("a.tiff")


def test_unreadable_permission(tmp_path, fluor):
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="wsi-hipe-perm-"))
    try:
        folder.chmod(0o755)
        path = write_tiff(folder / "locked.tiff", fluor[0], levels=1)
        path.chmod(0o000)
        if os.geteuid() != 0:
            with pytest.raises(SlideError, match=r"locked\.tiff: permission denied"):
                open_slide(path)
            return
        # Root reads anything: check as an unprivileged user in a child process.
        code = textwrap.dedent(
            f"""
            import os, sys
            import openslide
            from wsi_hipe.errors import SlideError
            from wsi_hipe.slide import open_slide
            os.setgid(65534); os.setuid(65534)
            try:
                open_slide({str(path)!r})
            except SlideError as exc:
                print(type(exc).__name__, exc)
                sys.exit(0)
            sys.exit(3)
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(Path(slide_mod.__file__).parents[1]),
        )
        if proc.returncode != 0 and "PermissionError" in proc.stderr:
            pytest.skip(f"cannot run as an unprivileged user here: {proc.stderr[-200:]}")
        assert proc.returncode == 0, proc.stderr
        assert "locked.tiff: permission denied" in proc.stdout
    finally:
        for p in folder.iterdir():
            p.chmod(0o644)
            p.unlink()
        folder.rmdir()


@pytest.mark.shared_data
def test_unreadable_svs_opens_and_fails_per_region(slides_dir, caplog):
    path = slides_dir / "unreadable.svs"
    with caplog.at_level(logging.WARNING, logger="wsi_hipe.slide"):
        slide = open_slide(path)
    assert "cannot analyse the thumbnail" in caplog.text
    for _ in range(2):  # the error repeats; it never turns into a crash
        with pytest.raises(SlideReadError, match=r"unreadable\.svs.*Bogus marker length"):
            slide.read(0, 0, 8, 8, mpp=0.499)
    explicit = open_slide(path, channel="blue", intensity=(0, 255))
    grid = make_grid(
        explicit.dimensions, slide_mpp=explicit.mpp, target_mpp=0.499, tile_size=8, halo=0
    )
    items = list(iter_tiles(explicit, grid))
    assert len(items) == 4
    assert all(i.image is None and isinstance(i.error, SlideReadError) for i in items)


def test_corrupt_tile_fails_alone_and_the_slide_reads_on(tmp_path, fluor):
    import tifffile

    img = fluor[0]
    path = write_tiff(tmp_path / "corrupt.tiff", img, levels=3, tile=64)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        tiles_per_row = -(-page.imagewidth // 64)
        k = 1 * tiles_per_row + 2  # level-0 tile at row 1, column 2: x 128..192, y 64..128
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff" * (count - 4))
    # A 128 px analysis thumbnail comes from level 2, which is intact.
    slide = open_slide(path, normalize=False, analysis_size=128)
    assert slide.channel is None
    with pytest.raises(SlideReadError, match=r"corrupt\.tiff.*level 0"):
        slide.read(130, 70, 32, 32, mpp=0.5)
    # The next region reads fine (the broken OpenSlide handle was replaced).
    np.testing.assert_allclose(slide.read(0, 0, 64, 64, mpp=0.5), img[:64, :64] / 255, rtol=1e-6)
    grid = make_grid(slide.dimensions, slide_mpp=0.5, target_mpp=0.5, tile_size=64, halo=0)
    items = list(iter_tiles(slide, grid))
    failed = [i.tile for i in items if i.error is not None]
    assert [(t.row, t.col) for t in failed] == [(1, 2)]
    assert sum(i.image is not None for i in items) == len(grid) - 1


# --------------------------------------------------------------------------------------------
# Stain layouts, normalisation, tissue
# --------------------------------------------------------------------------------------------


def test_single_channel_and_blue_channel_slides(gray_tiff, blue_tiff, fluor, caplog):
    with caplog.at_level(logging.INFO, logger="wsi_hipe.slide"):
        gray = open_slide(gray_tiff)
        blue = open_slide(blue_tiff)
    assert gray.channel is None and "single channel" in gray.provenance()["channel_method"]
    assert blue.channel == 2 and "blue" in blue.provenance()["channel_method"]
    assert "channel 2 (blue)" in caplog.text  # the choice is logged
    a = gray.read(0, 0, 256, 192, mpp=1.0)
    b = blue.read(0, 0, 256, 192, mpp=1.0)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # Normalised: background ≈ 0, bright nuclei ≈ 1.
    img, tissue = fluor
    full = gray.read(0, 0, img.shape[1], img.shape[0], mpp=0.5)
    assert np.median(full[~tissue]) < 0.02
    nuclei = img > 150
    assert 0.75 < np.median(full[nuclei]) < 1.05
    for slide in (gray, blue):
        mask = slide.detect_tissue()
        assert mask.fraction == pytest.approx(tissue.mean(), abs=0.04)
        assert gray.thumbnail().shape == mask.mask.shape


def test_green_channel_array_and_explicit_override():
    img, _ = fluorescence(200, 240, seed=2)
    rgb = np.stack([np.zeros_like(img), img, np.zeros_like(img)], axis=-1)
    assert open_slide(ArrayReader(rgb, mpp=0.5)).channel == 1
    forced = open_slide(ArrayReader(rgb, mpp=0.5), channel="red", normalize=False)
    assert forced.channel == 0 and forced.read(0, 0, 50, 50, mpp=0.5).max() == 0.0


def test_brightfield_array_refused_or_inverted_exactly():
    img, _ = fluorescence(200, 240, seed=3)
    bf = np.stack([255 - img] * 3, axis=-1)  # white background, dark nuclei
    with pytest.raises(StainError, match=r"<array>.*allow_brightfield"):
        open_slide(ArrayReader(bf, mpp=0.5))
    inverted = open_slide(ArrayReader(bf, mpp=0.5), allow_brightfield=True)
    direct = open_slide(ArrayReader(img, mpp=0.5))
    assert inverted.provenance()["brightfield"] is True
    assert inverted.intensity == pytest.approx(direct.intensity)
    np.testing.assert_allclose(
        inverted.read(0, 0, 240, 200, mpp=0.5), direct.read(0, 0, 240, 200, mpp=0.5), atol=1e-6
    )


def test_normalisation_known_values_and_options():
    img = np.full((200, 200), 10, dtype=np.uint8)
    img[50:150, 50:150] = 40  # tissue
    img[60:140:10, 60:140] = 210  # bright nuclei rows: 8 % of the tissue
    slide = open_slide(ArrayReader(img, mpp=0.5))
    low, high = slide.intensity
    assert low == pytest.approx(10) and high == pytest.approx(210)
    out = slide.read(0, 0, 200, 200, mpp=0.5)
    assert out[0, 0] == 0.0 and out[60, 70] == pytest.approx(1.0)
    assert out[55, 55] == pytest.approx(30 / 200)
    prov = slide.provenance()
    assert prov["intensity_low"] == low and "p99.5" in prov["intensity_method"]
    assert {"path", "vendor", "mpp", "channel", "level_dimensions"} <= set(prov)
    fixed = open_slide(ArrayReader(img, mpp=0.5), intensity=(10, 110))
    assert fixed.read(60, 70, 1, 1, mpp=0.5)[0, 0] == pytest.approx(CLIP_MAX)  # clipped
    raw = open_slide(ArrayReader(img, mpp=0.5), normalize=False)
    assert raw.read(60, 70, 1, 1, mpp=0.5)[0, 0] == pytest.approx(210 / 255)


def test_premultiplied_alpha_no_scan_data_is_background(tmp_path):
    rng = np.random.default_rng(0)
    stain = rng.integers(30, 255, (128, 128)).astype(np.uint8)
    alpha = np.full((128, 128), 255, dtype=np.uint8)
    alpha[:, :64] = 0  # not scanned
    alpha[:, 32:48] = 128  # half-covered edge
    rgba = np.zeros((128, 128, 4), dtype=np.uint8)
    rgba[..., 2] = (stain.astype(np.int32) * alpha // 255).astype(np.uint8)
    rgba[..., 3] = alpha
    path = write_tiff(tmp_path / "rgba.tiff", rgba, levels=1, extrasamples=["assocalpha"])
    premult = OpenSlideReader(path).read_region((0, 0), 0, (128, 128))
    assert np.abs(premult.astype(int) - rgba).max() <= 1  # premultiplied again
    slide = open_slide(path, channel="blue", normalize=False)
    got = slide.read(0, 0, 128, 128, mpp=0.5) * 255
    assert (got[:, :32] == 0).all() and (got[:, 48:64] == 0).all()
    np.testing.assert_allclose(got[:, 64:], stain[:, 64:], atol=1e-3)
    np.testing.assert_allclose(got[:, 32:48], rgba[:, 32:48, 2], atol=1.01)
    # Outside the slide is background too.
    assert (slide.read(-50, 100, 40, 40, mpp=0.5) == 0).all()


# --------------------------------------------------------------------------------------------
# µm/px
# --------------------------------------------------------------------------------------------


def test_missing_mpp_names_the_override_and_the_override_works(tmp_path, fluor):
    path = write_tiff(tmp_path / "nompp.tiff", fluor[0], mpp=None, levels=2)
    with pytest.raises(MissingMppError) as info:
        open_slide(path)
    msg = str(info.value)
    assert "nompp.tiff" in msg and "--mpp" in msg and "slide.mpp" in msg
    slide = open_slide(path, mpp=0.5)
    assert slide.mpp == 0.5 and slide.provenance()["mpp_source"] == "override"
    assert slide.read(0, 0, 64, 64, mpp=1.0).shape == (64, 64)
    with pytest.raises(MissingMppError, match="<array>"):
        open_slide(ArrayReader(fluor[0]))
    with pytest.raises(ValueError, match="mpp"):
        open_slide(path, mpp=-1)


# --------------------------------------------------------------------------------------------
# Resampling semantics on arrays (exact answers)
# --------------------------------------------------------------------------------------------


def _raw(array, **kw):
    return open_slide(ArrayReader(array, mpp=1.0, **kw), channel="mean", normalize=False)


def test_level_choice_and_box_filter_known_answers():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (96, 128)).astype(np.uint8)
    pyr = ArrayReader(img, mpp=1.0, downsamples=(1, 2, 4))
    slide = open_slide(pyr, channel="mean", normalize=False)
    level2 = pyr.read_region((0, 0), 2, (32, 24))[..., 0]
    np.testing.assert_allclose(slide.read(0, 0, 32, 24, mpp=4.0) * 255, level2, atol=1e-4)
    # Within LEVEL_RTOL of a level's downsample, that level is served as is.
    np.testing.assert_allclose(slide.read(0, 0, 32, 24, mpp=3.999) * 255, level2, atol=1e-4)
    # The reader's thumbnail is the premultiplied RGBA box-filtered to fit.
    thumb = pyr.get_thumbnail(32)
    assert thumb.shape == (24, 32, 4) and thumb.dtype == np.uint8
    np.testing.assert_allclose(
        thumb[..., 0], img.reshape(24, 4, 32, 4).mean(axis=(1, 3)), atol=0.51
    )
    assert (thumb[..., 3] == 255).all()
    # Without a pyramid the same read is the 4x4 block mean of level 0.
    flat = _raw(img)
    expect = img.reshape(24, 4, 32, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(flat.read(0, 0, 32, 24, mpp=4.0) * 255, expect, atol=1e-3)
    # A non-integer factor with a fractional start, checked against a plain loop.
    got = flat.read(3.25, 1.5, 20, 15, mpp=2.6) * 255
    np.testing.assert_allclose(got, box_reference(img, 3.25, 1.5, 2.6, 20, 15), atol=2e-3)
    # Upsampling repeats pixels; a half-pixel shift averages neighbours.
    np.testing.assert_allclose(
        flat.read(0, 0, 8, 8, mpp=0.5) * 255,
        np.repeat(np.repeat(img[:4, :4], 2, 0), 2, 1),
        atol=1e-3,
    )
    np.testing.assert_allclose(
        flat.read(0.5, 0, 4, 1, mpp=1.0)[0] * 255,
        (img[0, :4] + img[0, 1:5].astype(float)) / 2,
        atol=1e-3,
    )


def test_tiled_read_equals_untiled_read_and_blocks_do_not_matter(monkeypatch):
    img, _ = fluorescence(300, 400, seed=4)
    slide = open_slide(ArrayReader(img, mpp=0.5, downsamples=(1, 2)))
    s = 1.7 / 0.5
    whole = slide.read(-10.0, 5.0, 120, 90, mpp=1.7)
    pieces = np.block(
        [
            [slide.read(-10.0 + c * s, 5.0 + r * s, 40, 30, mpp=1.7) for c in (0, 40, 80)]
            for r in (0, 30, 60)
        ]
    )
    np.testing.assert_allclose(pieces, whole, atol=1e-5)
    monkeypatch.setattr(resample_mod, "BLOCK_SIDE", 16)
    np.testing.assert_allclose(slide.read(-10.0, 5.0, 120, 90, mpp=1.7), whole, atol=1e-5)


def test_array_reader_validation():
    with pytest.raises(ValueError, match="uint8 or float"):
        ArrayReader(np.zeros((4, 4), dtype=np.int16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ArrayReader(np.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="downsamples"):
        ArrayReader(np.zeros((8, 8), np.uint8), downsamples=(2, 4))
    with pytest.raises(ValueError, match="slide.channel"):
        open_slide(ArrayReader(np.zeros((8, 8), np.uint8), mpp=1.0), channel="purple")
    with pytest.raises(ValueError, match="width"):
        _raw(np.zeros((8, 8), np.uint8)).read(0, 0, 0, 4, mpp=1.0)
    with pytest.raises(TypeError, match="path or a SlideReader"):
        open_slide(42)
    assert isinstance(ArrayReader(np.zeros((8, 8), np.uint8)), SlideReader)


# --------------------------------------------------------------------------------------------
# Processes, caching, streaming
# --------------------------------------------------------------------------------------------


def _read_in_child(blob):
    slide = pickle.loads(blob)
    inherited = reader_cached(slide.path)  # the parent's handle must not be seen
    image = slide.read(10, 20, 64, 48, mpp=1.0)
    return os.getpid(), image, inherited, reader_cached(slide.path)


def test_slide_pickles_as_path_and_reopens_in_another_process(gray_tiff):
    slide = open_slide(gray_tiff)
    # A gray TIFF is read by tifffile; Slide keeps it in the cache of chosen readers.
    assert isinstance(slide.reader, TiffReader) and slide.reader is slide.reader
    blob = pickle.dumps(slide)
    assert len(blob) < 4000  # path + options, no pixels, no handle
    expect = slide.read(10, 20, 64, 48, mpp=1.0)
    np.testing.assert_array_equal(pickle.loads(blob).read(10, 20, 64, 48, mpp=1.0), expect)
    # A forked child inherits the parent's cache, but must open its own handle.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        pid, got, inherited, cached = pool.submit(_read_in_child, blob).result(timeout=120)
    assert reader_cached(slide.path)  # the parent holds a handle ...
    assert pid != os.getpid() and not inherited and cached  # ... the child opened its own
    np.testing.assert_array_equal(got, expect)


def test_reader_cache_is_per_path_and_clearable(gray_tiff, blue_tiff):
    a = open_reader(gray_tiff)
    assert open_reader(gray_tiff) is a and open_reader(blue_tiff) is not a
    clear_reader_cache()
    assert open_reader(gray_tiff) is not a
    assert str(gray_tiff) in openslide_mod._READERS and len(openslide_mod._READERS) == 1


def test_streaming_is_lazy_ordered_and_bounded(gray_tiff):
    slide = open_slide(gray_tiff)
    grid = make_grid(slide.dimensions, slide_mpp=slide.mpp, target_mpp=0.5, tile_size=32, halo=16)
    assert len(grid) == 12 * 16
    window_bytes = grid.window**2 * 4
    stream = iter_tiles(slide, grid)
    tracemalloc.start()
    try:
        indices = []
        for item in stream:
            indices.append(item.tile.index)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert indices == list(range(len(grid)))
    # 192 windows of 16 KiB were read (3 MiB in all); at most a few are alive at once.
    assert peak < 40 * window_bytes, peak
    other = make_grid((10, 10), slide_mpp=slide.mpp, target_mpp=0.5)
    with pytest.raises(ValueError, match="make_grid"):
        next(iter_tiles(slide, other))


def test_slide_without_path_reads_from_its_reader():
    img, _ = fluorescence(64, 64, seed=9)
    slide = open_slide(ArrayReader(img, mpp=0.5))
    assert isinstance(slide, Slide) and slide.path == "<array>"
    clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(
        clone.read(0, 0, 64, 64, mpp=0.5), slide.read(0, 0, 64, 64, mpp=0.5)
    )


# --------------------------------------------------------------------------------------------
# Slides from wsi_hipe.synthetic (ground truth known)
# --------------------------------------------------------------------------------------------

SYNTH_SIZE = (1024, 768)


@pytest.fixture(scope="module")
def synthetic_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return {
        layout: synthetic.write_slide(
            folder / f"{layout}.tiff",
            size=SYNTH_SIZE,
            seed=3,
            layout=layout,
            tile_size=256,
            gt_downsample=4,
        )
        for layout in ("gray", "rgb")
    }


@pytest.mark.parametrize("layout,channel", [("gray", None), ("rgb", 2)])
def test_synthetic_slide_channel_pixels_and_tissue(synthetic_slides, layout, channel):
    import tifffile

    from wsi_hipe.synthetic import render_region

    written = synthetic_slides[layout]
    slide = open_slide(written.path)
    assert slide.channel == channel and slide.mpp == pytest.approx(0.5)
    # The pixels are the rendered stain (quantised to uint8 in the file).
    raw = open_slide(written.path, normalize=False, channel="mean" if channel is None else channel)
    region = render_region(100, 50, 200, 150, seed=3, mpp=0.5, slide_size=SYNTH_SIZE)
    np.testing.assert_allclose(raw.read(100, 50, 200, 150, mpp=0.5), region.image, atol=0.6 / 255)
    # Tissue against the ground truth (at downsample 4: compare on the same grid).
    truth = tifffile.imread(written.ground_truth["tissue"]).astype(bool)
    mask = slide.detect_tissue(max_size=256)
    assert slide.thumbnail_downsample(256) == 4.0 and mask.mask.shape == truth.shape
    assert mask.fraction == pytest.approx(truth.mean(), abs=0.03)
    assert (mask.mask & truth).sum() / (mask.mask | truth).sum() > 0.9
    # Normalised: glass ≈ 0, bright nuclei ≈ 1.
    full = slide.read(0, 0, *SYNTH_SIZE, mpp=0.5)
    nuclei = tifffile.imread(written.ground_truth["nuclei"]).astype(bool)
    sub = full[2::4, 2::4]  # the level-0 pixels the ground truth samples
    assert np.median(sub[~truth]) < 0.05
    assert 0.7 < np.percentile(sub[nuclei], 95) < 1.2


def test_coarse_thumbnail_takes_the_bright_end_from_full_resolution_samples(synthetic_slides):
    path = synthetic_slides["gray"].path
    fine = open_slide(path)  # 1024 px thumbnail of a 1024 px slide: full resolution
    coarse = open_slide(path, analysis_size=64)  # 8 µm/px thumbnail: nuclei averaged away
    assert "tissue samples" in coarse.provenance()["intensity_method"]
    assert "tissue samples" not in fine.provenance()["intensity_method"]
    assert coarse.intensity[1] == pytest.approx(fine.intensity[1], rel=0.05)
    raw = open_slide(path, normalize=False)
    thumb = raw.thumbnail(64) * 255
    tissue = raw.detect_tissue(max_size=64).mask
    # What the 8 µm/px thumbnail alone would have given (about 127 against 212).
    assert np.percentile(thumb[tissue], 99.5) < 0.75 * coarse.intensity[1]
