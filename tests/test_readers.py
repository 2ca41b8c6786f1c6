"""The tifffile and OME-Zarr readers, and the reader choice (wsi_hipe.slide._tiff/_ngff/_choose).

Synthetic files are written here with tifffile and zarr (their values known exactly, so every
read is compared with the array that was written); the real files of
``../shared/data/slides/fluorescence`` are compared with tifffile's own ``asarray``.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from wsi_hipe.errors import (
    MissingMppError,
    SlideFormatError,
    SlideNotFoundError,
    SlideReadError,
    StainError,
)
from wsi_hipe.slide import OpenSlideReader, SlideReader, open_slide
from wsi_hipe.slide import _tiff as tiff_module
from wsi_hipe.slide._channels import select_channel
from wsi_hipe.slide._choose import (
    READER_NAMES,
    cached_reader,
    choose_reader,
    evict_cached_reader,
    open_any_reader,
)
from wsi_hipe.slide._multichannel import (
    ChannelReader,
    channel_thumbnail,
    read_channel_resampled,
)
from wsi_hipe.slide._ngff import NgffReader, is_ngff
from wsi_hipe.slide._tiff import TiffReader

NAMES = ["DAPI", "CD3", "CD20"]


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------


def make_data(c: int = 3, h: int = 300, w: int = 420, *, dtype=np.uint16, top=4096, seed=0):
    """(C, H, W) random samples below ``top``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, top, (c, h, w)).astype(dtype)


def pyramid(data: np.ndarray, n: int) -> list[np.ndarray]:
    """Levels made by taking every 2**k-th sample (exact values to compare with)."""
    return [np.ascontiguousarray(data[..., :: 2**k, :: 2**k]) for k in range(n)]


def write_ome_subifds(path, data, *, names=NAMES, mpp=0.325, unit="µm", levels=3, bits=12,
                      tile=64, compression="zlib"):  # fmt: skip
    meta = {"axes": "CYX", "Channel": {"Name": list(names)}}
    if bits:
        meta["SignificantBits"] = bits
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit=unit, PhysicalSizeY=mpp)
        meta["PhysicalSizeYUnit"] = unit
    levs = pyramid(data, levels)
    opts = {"tile": (tile, tile), "compression": compression, "photometric": "minisblack"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(levs[0], subifds=levels - 1, metadata=meta, **opts)
        for lv in levs[1:]:
            tw.write(lv, subfiletype=1, metadata=None, **opts)
    return levs


def write_ome_images_per_level(path, data, *, levels=3):
    levs = pyramid(data, levels)
    with tifffile.TiffWriter(path, ome=True) as tw:
        for lv in levs:
            meta = {"axes": "CYX", "Channel": {"Name": NAMES}, "PhysicalSizeX": 0.5}
            meta["PhysicalSizeY"] = 0.5
            tw.write(lv, metadata=meta, tile=(64, 64), photometric="minisblack")
    return levs


def qpi_xml(name, color="0,0,255", kind="FullResolution", mpp=0.5):
    return (
        '<?xml version="1.0" encoding="utf-16"?>\r\n<PerkinElmer-QPI-ImageDescription>'
        f"<DescriptionVersion>2</DescriptionVersion><ImageType>{kind}</ImageType>"
        f"<Name>{name}</Name><Color>{color}</Color><ScanProfile><root><ScanResolution>"
        f"<PixelSizeMicrons>{mpp}</PixelSizeMicrons></ScanResolution></root></ScanProfile>"
        "</PerkinElmer-QPI-ImageDescription>"
    )


def write_qptiff(path, data, *, levels=2, names=("DAPI", "FITC", "Cy3")):
    """A QPTIFF as Vectra writes it: channel pages, an RGB thumbnail, then reduced levels."""
    colors = ("0,0,255", "0,255,0", "255,255,0")
    common = {"software": "PerkinElmer-QPI", "metadata": None, "tile": (64, 64)}
    # the resolution tags say 0.4965 µm/px, the XML 0.5: the XML must win
    res = {"resolution": (20140.0, 20140.0), "resolutionunit": "CENTIMETER"}
    levs = pyramid(data, 1)
    for _k in range(1, levels):
        prev = levs[-1]
        levs.append(
            np.ascontiguousarray(
                prev[:, : prev.shape[1] // 2 * 2 : 2, : prev.shape[2] // 2 * 2 : 2]
            )
        )
    with tifffile.TiffWriter(path) as tw:
        for c, name in enumerate(names):
            tw.write(levs[0][c], description=qpi_xml(name, colors[c]), **common, **res)
        thumb = np.zeros((levs[0].shape[1] // 4, levs[0].shape[2] // 4, 3), np.uint8)
        tw.write(thumb, description=qpi_xml("", kind="Thumbnail"), photometric="rgb",
                 software="PerkinElmer-QPI", metadata=None)  # fmt: skip
        for lv in levs[1:]:
            for c, name in enumerate(names):
                tw.write(lv[c], description=qpi_xml(name, colors[c], "ReducedResolution"),
                         subfiletype=1, **common)  # fmt: skip
    return levs


def write_ngff(path, data, *, version="0.4", levels=3, unit="micrometer", mpp=0.5,
               names=("Hoechst", "CD3"), axes="cyx", global_scale=None):  # fmt: skip
    """An OME-Zarr image written with zarr alone (Zarr v2 for 0.4, v3 for 0.5)."""
    fmt = 2 if version == "0.4" else 3
    g = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    levs = pyramid(data, levels)
    for i, lv in enumerate(levs):
        arr = g.create_array(str(i), shape=lv.shape, chunks=(1,) * (lv.ndim - 2) + (64, 64),
                             dtype=lv.dtype)  # fmt: skip
        arr[...] = lv
    ax = []
    for a in axes:
        if a in "yx":
            ax.append({"name": a, "type": "space", **({"unit": unit} if unit else {})})
        elif a == "c":
            ax.append({"name": "c", "type": "channel"})
        else:
            ax.append({"name": a, "type": "time" if a == "t" else "space"})
    datasets = []
    for i in range(levels):
        scale = [1.0] * (len(axes) - 2) + [mpp * 2**i, mpp * 2**i]
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": scale}]})  # fmt: skip
    ms = {"version": version, "axes": ax, "datasets": datasets}
    if global_scale is not None:
        ms["coordinateTransformations"] = [{"type": "scale", "scale": global_scale}]
    omero = {"channels": [{"label": n, "color": "0000FF"} for n in names]}
    if fmt == 2:
        g.attrs.update({"multiscales": [ms], "omero": omero})
    else:
        g.attrs.update({"ome": {"version": version, "multiscales": [ms], "omero": omero}})
    return levs


def window(arr: np.ndarray, x: int, y: int, w: int, h: int, chans) -> np.ndarray:
    """Reference read: (h, w, C) of ``arr`` (C, H, W) with zeros outside it."""
    out = np.zeros((h, w, len(chans)), arr.dtype)
    H, W = arr.shape[-2:]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = np.moveaxis(arr[list(chans), y0:y1, x0:x1], 0, -1)
    return out


WINDOWS = [(0, 0, 64, 64), (37, 51, 90, 33), (-20, -10, 50, 40), (400, 280, 60, 50), (-5, 0, 500, 400)]  # fmt: skip


def check_levels(reader, levs, chans=(0, 1, 2)):
    for level, lv in enumerate(levs):
        ds = reader.level_downsamples[level]
        for x, y, w, h in WINDOWS:
            x, y = x // 2**level, y // 2**level
            got = reader.read_channels((round(x * ds), round(y * ds)), level, (w, h), chans)
            np.testing.assert_array_equal(got, window(lv, x, y, w, h, chans))


# --------------------------------------------------------------------------------------------
# TiffReader on synthetic files
# --------------------------------------------------------------------------------------------


def test_ome_subifd_pyramid(tmp_path):
    data = make_data()
    path = tmp_path / "s.ome.tiff"
    levs = write_ome_subifds(path, data)
    reader = open_any_reader(path)
    assert isinstance(reader, TiffReader)
    assert isinstance(reader, SlideReader) and isinstance(reader, ChannelReader)
    assert reader.selection.kind == "tiff" and "OME-TIFF" in reader.selection.reason
    assert reader.vendor == "ome-tiff"
    assert reader.level_dimensions == ((420, 300), (210, 150), (105, 75))
    assert reader.level_downsamples == (1.0, 2.0, 4.0)
    assert reader.mpp == pytest.approx(0.325) and reader.mpp_source == "OME PhysicalSizeX/Y"
    assert reader.channel_names == tuple(NAMES)
    assert reader.dtype == np.uint16 and reader.raw_max == 4095  # SignificantBits 12
    check_levels(reader, levs)
    check_levels(reader, levs, chans=(2, 0))  # any order, not contiguous


def test_ome_pyramid_as_one_image_per_level(tmp_path):
    data = make_data(h=260, w=300)
    path = tmp_path / "s.ome.tiff"
    levs = write_ome_images_per_level(path, data)
    reader = TiffReader(path)
    assert reader.level_count == 3 and reader.level_downsamples == (1.0, 2.0, 4.0)
    assert "one OME image per level" in reader.description
    check_levels(reader, levs)


@pytest.mark.parametrize(("mpp", "unit", "expected"), [(325.0, "nm", 0.325), (0.00065, "mm", 0.65)])
def test_ome_physical_size_units(tmp_path, mpp, unit, expected):
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, make_data(h=64, w=64), mpp=mpp, unit=unit, levels=1)
    assert TiffReader(path).mpp == pytest.approx(expected)


def test_ome_without_physical_size_names_mpp(tmp_path):
    path = tmp_path / "s.ome.tiff"
    levs = write_ome_subifds(path, make_data(), mpp=None)
    reader = TiffReader(path)
    assert reader.mpp is None and reader.mpp_note is None
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(reader)
    slide = open_slide(reader, mpp=0.5, channel="dapi")
    assert slide.mpp == 0.5 and slide.mpp_source == "override"
    assert slide.channel == 0 and slide.channel_name == "DAPI"
    check_levels(reader, levs)


def test_implausible_physical_size_is_refused_with_its_value(tmp_path):
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, make_data(h=64, w=64), mpp=10000.0, levels=1)
    reader = TiffReader(path)
    assert reader.mpp is None
    assert "10000" in reader.mpp_note and "implausible" in reader.mpp_note
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(reader)
    assert open_slide(reader, mpp=0.65).mpp == 0.65


def _edit_ome(src: Path, dst: Path, old: str, new: str) -> None:
    shutil.copy(src, dst)
    xml = tifffile.tiffcomment(dst)
    assert old in xml
    tifffile.tiffcomment(dst, xml.replace(old, new).encode("utf-8"))


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ('SizeX="420"', 'SizeX="512"', r"SizeX x SizeY = 512 x 300 but the pages are 420 x 300"),
        ('Type="uint16"', 'Type="uint8"', r"Type = uint8 but the pages hold uint16"),
        ('SizeC="3"', 'SizeC="4"', r"SizeC = 4 but it lists 3 Channel"),
        (
            '<Channel ID="Channel:0:2" SamplesPerPixel="1" Name="CD20"><LightPath/></Channel>',
            "",
            r"SizeC = 3 but it lists 2 Channel",
        ),  # fmt: skip
        (
            '<TiffData IFD="0" PlaneCount="3"/>',
            '<Channel ID="Channel:0:3" SamplesPerPixel="1" Name="CD8"/><TiffData IFD="0" PlaneCount="4"/>',
            r"SizeC = 3 but it lists 4 Channel",
        ),  # fmt: skip
    ],
)
def test_ome_xml_that_disagrees_with_the_pages(tmp_path, old, new, says):
    src = tmp_path / "good.ome.tiff"
    write_ome_subifds(src, make_data(), levels=2)
    bad = tmp_path / "bad.ome.tiff"
    _edit_ome(src, bad, old, new)
    with pytest.raises(SlideFormatError, match=r"OME-XML .* disagrees with its pages: " + says):
        open_any_reader(bad)


def test_ome_xml_with_more_planes_than_pages(tmp_path):
    src = tmp_path / "good.ome.tiff"
    write_ome_subifds(src, make_data(), levels=1)
    bad = tmp_path / "bad.ome.tiff"
    extra = '<Channel ID="Channel:0:3" SamplesPerPixel="1" Name="CD8"/>'
    shutil.copy(src, bad)
    xml = tifffile.tiffcomment(bad)
    xml = xml.replace('SizeC="3"', 'SizeC="4"').replace(
        '<TiffData IFD="0" PlaneCount="3"/>', extra + '<TiffData IFD="0" PlaneCount="4"/>'
    )
    tifffile.tiffcomment(bad, xml.encode("utf-8"))
    with pytest.raises(SlideFormatError, match=r"= 4 planes but the file holds 3"):
        TiffReader(bad)


def test_qptiff(tmp_path):
    data = make_data(h=256, w=320, dtype=np.uint8, top=256)
    path = tmp_path / "s.qptiff"
    levs = write_qptiff(path, data)
    reader = open_any_reader(path)
    assert isinstance(reader, TiffReader) and "QPTIFF" in reader.selection.reason
    assert reader.vendor == "qptiff"
    assert reader.channel_names == ("DAPI", "FITC", "Cy3")
    assert reader.channels[0].color == (0, 0, 255)
    assert reader.mpp == 0.5 and reader.mpp_source == "QPTIFF PixelSizeMicrons"
    assert reader.level_dimensions == ((320, 256), (160, 128))  # the thumbnail is no level
    check_levels(reader, levs)
    assert select_channel("auto", reader.channels, path=reader.path)[0] == 0


@pytest.mark.parametrize(
    ("unit", "px_per_unit"), [("CENTIMETER", 1e4 / 0.5), ("INCH", 25400 / 0.5)]
)
def test_plain_striped_16bit_tiff(tmp_path, unit, px_per_unit):
    data = make_data(c=1, h=700, w=500, top=65536)
    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, data[0], rowsperstrip=8, compression="zlib", metadata=None,
                     resolution=(px_per_unit, px_per_unit), resolutionunit=unit)  # fmt: skip
    reader = open_any_reader(path)
    assert isinstance(reader, TiffReader)
    assert "striped" in reader.selection.reason and "16-bit" in reader.selection.reason
    assert reader.mpp == pytest.approx(0.5) and "XResolution" in reader.mpp_source
    assert reader.channel_names == (None,) and reader.raw_max == 65535
    check_levels(reader, [data], chans=(0,))


def test_striped_reads_are_bands_in_a_bounded_cache(tmp_path, monkeypatch):
    data = make_data(c=1, h=2000, w=300, top=65536)
    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, data[0], rowsperstrip=4, compression="zlib", metadata=None)
    budget = 3 * tiff_module.BAND_ROWS * 300 * 2  # three bands of 256 rows
    monkeypatch.setattr(tiff_module, "BAND_CACHE_BYTES", budget)
    reader = TiffReader(path)
    for y in range(0, 2000, 97):  # a column of tiles down the image
        got = reader.read_channels((50, y), 0, (100, 120), (0,))
        np.testing.assert_array_equal(got, window(data, 50, y, 100, 120, (0,)))
        assert reader._band_bytes <= budget
        rows = {b.shape[0] for b in reader._bands.values()}
        assert rows <= {tiff_module.BAND_ROWS, 2000 % tiff_module.BAND_ROWS}
        assert all(b.shape[1] == 300 for b in reader._bands.values())  # whole-width bands
    assert len(reader._bands) <= 3


def test_a_request_larger_than_the_band_budget_keeps_its_bands(tmp_path, monkeypatch):
    data = make_data(c=1, h=1200, w=200, top=65536)
    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, data[0], rowsperstrip=16, compression="zlib", metadata=None)
    monkeypatch.setattr(tiff_module, "BAND_CACHE_BYTES", 1)  # less than one band
    reader = TiffReader(path)
    got = reader.read_channels((0, 100), 0, (80, 600), (0,))  # rows 100..700: bands 0-2
    np.testing.assert_array_equal(got, window(data, 0, 100, 80, 600, (0,)))
    bands = dict(reader._bands)
    assert sorted(b for _, b, _ in bands) == [0, 1, 2]
    got = reader.read_channels((100, 100), 0, (100, 600), (0,))  # the next tile of the row
    np.testing.assert_array_equal(got, window(data, 100, 100, 100, 600, (0,)))
    assert all(reader._bands[k] is v for k, v in bands.items())  # served, not decoded again
    reader.read_channels((0, 1000), 0, (10, 10), (0,))  # elsewhere: the old bands go
    assert sorted(b for _, b, _ in reader._bands) == [3]


def test_huge_uncompressed_strip_is_memory_mapped(tmp_path, monkeypatch):
    data = make_data(c=1, h=400, w=300, top=65536)
    path = tmp_path / "one-strip.tif"
    tifffile.imwrite(path, data[0], rowsperstrip=400, metadata=None)
    monkeypatch.setattr(tiff_module, "MEMMAP_BYTES", 1024)
    reader = TiffReader(path)
    check_levels(reader, [data], chans=(0,))
    assert reader._memmaps[0] is not None and not reader._bands


def test_plain_page_per_channel_with_page_names(tmp_path):
    data = make_data(c=3, h=100, w=120)
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tw:
        for c, name in enumerate(["CD45", "Hoechst", "CD8"]):
            tw.write(data[c], metadata=None, extratags=[(285, "s", 0, name, True)],
                     photometric="minisblack")  # fmt: skip
    reader = open_any_reader(path)
    assert (
        isinstance(reader, TiffReader) and "3 channels that are not RGB" in reader.selection.reason
    )
    assert reader.channel_names == ("CD45", "Hoechst", "CD8")
    assert select_channel("auto", reader.channels, path=reader.path)[0] == 1
    check_levels(reader, [data])


def test_rgb_tiff_openslide_refuses_is_read_as_rgb(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (90, 110, 3)).astype(np.uint8)
    path = tmp_path / "rgb-strips.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=16, metadata=None)
    reader = open_any_reader(path)
    assert isinstance(reader, TiffReader) and reader.is_rgb
    assert reader.channel_names == ("red", "green", "blue")
    rgba = reader.read_region((0, 0), 0, (110, 90))
    np.testing.assert_array_equal(rgba[..., :3], rgb)
    assert (rgba[..., 3] == 255).all()


def test_rgb_tiled_8bit_goes_to_openslide(tmp_path):
    rgb = np.zeros((256, 256, 3), np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(64, 64), metadata=None)
    choice = choose_reader(path)
    assert choice.kind == "openslide"
    reader = open_any_reader(path)
    assert isinstance(reader, OpenSlideReader) and reader.selection == choice


def test_gray_tiffs_go_to_tifffile(tmp_path):
    gray = np.zeros((256, 256), np.uint8)
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, gray, tile=(64, 64), metadata=None)
    assert choose_reader(path).kind == "tiff"
    assert "1 channel(s)" in choose_reader(path).reason


def test_read_region_is_an_8bit_view_of_the_display_channel(tmp_path):
    data = make_data(h=64, w=80)
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, data, levels=1)
    reader = TiffReader(path, channel="cd20")
    assert reader.display_channels == (2,)
    rgba = reader.read_region((-4, 0), 0, (20, 10))
    expected = np.round(data[2, :10, :16].astype(np.float32) * (255.0 / 4095)).astype(np.uint8)
    np.testing.assert_array_equal(rgba[:, 4:, 0], expected)
    assert (rgba[:, 4:, 0] == rgba[:, 4:, 2]).all()
    assert (rgba[:, :4] == 0).all() and (rgba[:, 4:, 3] == 255).all()
    with pytest.raises(StainError, match="no channel named 'CD8'"):
        TiffReader(path, channel="CD8")


def test_read_channel_resampled_is_the_box_filter(tmp_path):
    data = make_data(h=128, w=160)
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, data, levels=1)
    reader = TiffReader(path)
    got = read_channel_resampled(reader, 8.0, 4.0, 32, 20, 2.0, 1)
    ref = data[1, 4:44, 8:72].astype(np.float64).reshape(20, 2, 32, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    same = read_channel_resampled(reader, 3.0, 5.0, 17, 9, 1.0, 0)
    np.testing.assert_array_equal(same, data[0, 5:14, 3:20].astype(np.float32))
    outside = read_channel_resampled(reader, -100.0, -100.0, 8, 8, 1.0, 0)
    assert not outside.any()
    thumb = channel_thumbnail(reader, 40, 2)
    assert thumb.shape == (32, 40) and thumb.dtype == np.float32
    assert thumb.max() <= 4095


def test_open_slide_takes_a_tiff_reader(tmp_path):
    data = make_data(h=256, w=256)
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, data, levels=2)
    slide = open_slide(TiffReader(path, channel="auto"))
    assert slide.mpp == pytest.approx(0.325)
    image = slide.read(0, 0, 64, 64, mpp=0.65)
    assert image.shape == (64, 64) and np.isfinite(image).all()
    assert slide.provenance()["reader"] == "TiffReader"


def test_truncated_tiff_fails_per_region_and_the_rest_reads(tmp_path, caplog):
    data = make_data(c=1, h=512, w=512, top=65536)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, data[0], tile=(128, 128), compression="zlib", metadata=None,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    raw = good.read_bytes()
    bad = tmp_path / "cut.tif"
    bad.write_bytes(raw[: int(len(raw) * 0.6)])
    with caplog.at_level(logging.WARNING, logger="wsi_hipe.slide._tiff"):
        reader = TiffReader(bad)
    assert "truncated" in caplog.text
    np.testing.assert_array_equal(
        reader.read_channels((0, 0), 0, (128, 128)), data[0, :128, :128, None]
    )
    with pytest.raises(SlideReadError, match=r"level-0 \(384, 384\).*truncated"):
        reader.read_channels((384, 384), 0, (128, 128))
    # the reader is not broken by the failure, and a Slide reports it for that region only
    np.testing.assert_array_equal(
        reader.read_channels((0, 0), 0, (64, 64)), data[0, :64, :64, None]
    )
    slide = open_slide(reader, channel="mean", intensity=(0, 255))
    with pytest.raises(SlideReadError):
        slide.read(384, 384, 128, 128, mpp=0.5)
    assert slide.read(0, 0, 128, 128, mpp=0.5).shape == (128, 128)


def test_not_a_tiff(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(SlideFormatError, match="not a TIFF file tifffile can read"):
        TiffReader(path)
    path.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(SlideFormatError, match="TIFF header but no readable image"):
        TiffReader(path)
    with pytest.raises(SlideNotFoundError):
        TiffReader(tmp_path / "missing.tif")


def test_zstack_needs_a_plane(tmp_path):
    rng = np.random.default_rng(5)
    z = rng.integers(0, 255, (4, 2, 60, 70)).astype(np.uint8)
    path = tmp_path / "z.ome.tiff"
    tifffile.imwrite(path, z, metadata={"axes": "ZCYX", "PhysicalSizeX": 0.5,
                                        "PhysicalSizeY": 0.5}, photometric="minisblack")  # fmt: skip
    with pytest.raises(SlideFormatError, match=r"Z-stack \(4 z-planes\).*--plane z=2"):
        open_any_reader(path)
    reader = open_any_reader(path, plane="z=3")
    assert reader.plane == {"z": 3} and len(reader.channels) == 2
    check_levels(reader, [z[3]], chans=(0, 1))
    assert TiffReader(path, plane=1).plane == {"z": 1}


def test_time_and_z_need_both(tmp_path):
    z = np.zeros((3, 4, 1, 32, 32), np.uint8)
    path = tmp_path / "tz.ome.tiff"
    tifffile.imwrite(path, z, metadata={"axes": "TZCYX"}, photometric="minisblack")
    with pytest.raises(SlideFormatError, match=r"3 t-planes and 4 z-planes.*--plane t=1,z=2"):
        TiffReader(path)
    assert TiffReader(path, plane={"t": 2, "z": 0}).plane == {"t": 2, "z": 0}


def test_plane_on_a_2d_file(tmp_path):
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, make_data(h=32, w=32), levels=1)
    with pytest.raises(ValueError, match="no 'z' axis"):
        TiffReader(path, plane="z=1")


def test_tiff_reader_pickles(tmp_path):
    data = make_data()
    path = tmp_path / "s.ome.tiff"
    levs = write_ome_subifds(path, data)
    reader = open_any_reader(path, channel="CD3")
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.selection == reader.selection and copy.display_channels == (1,)
    check_levels(copy, levs)
    assert copy.quickhash == reader.quickhash and len(reader.quickhash) == 64


# --------------------------------------------------------------------------------------------
# NgffReader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ngff_image(tmp_path, version):
    data = make_data(c=2, h=300, w=260)
    path = tmp_path / "img.ome.zarr"
    levs = write_ngff(path, data, version=version, unit="nanometer", mpp=325.0)
    assert is_ngff(path)
    reader = open_any_reader(path)
    assert isinstance(reader, NgffReader) and reader.selection.kind == "ngff"
    assert isinstance(reader, SlideReader) and isinstance(reader, ChannelReader)
    assert reader.level_dimensions == ((260, 300), (130, 150), (65, 75))
    assert reader.level_downsamples == (1.0, 2.0, 4.0)
    assert reader.mpp == pytest.approx(0.325)
    assert reader.channel_names == ("Hoechst", "CD3") and reader.channels[0].color == (0, 0, 255)
    assert f"NGFF {version}" in reader.description
    check_levels(reader, levs, chans=(0, 1))
    check_levels(reader, levs, chans=(1,))
    copy = pickle.loads(pickle.dumps(reader))
    check_levels(copy, levs, chans=(1, 0))
    assert copy.quickhash == reader.quickhash


def test_ngff_global_scale_and_missing_unit(tmp_path):
    data = make_data(c=1, h=64, w=64)
    a = tmp_path / "a.ome.zarr"
    write_ngff(a, data, names=("DAPI",), mpp=1.0, global_scale=[1.0, 0.25, 0.25], levels=1)
    assert NgffReader(a).mpp == pytest.approx(0.25)
    b = tmp_path / "b.ome.zarr"
    write_ngff(b, data, names=("DAPI",), unit=None, levels=1)
    reader = NgffReader(b)
    assert reader.mpp is None and "no unit" in reader.mpp_note
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(reader)


def test_ngff_5d_needs_a_plane_and_2d_has_one_channel(tmp_path):
    data = make_data(c=3, h=64, w=64)[None, :, None].repeat(2, axis=2)  # t=1, c=3, z=2
    data[0, :, 1] += 1
    path = tmp_path / "tczyx.ome.zarr"
    write_ngff(path, data, axes="tczyx", names=("DAPI", "CD3", "CD8"), levels=1)
    with pytest.raises(SlideFormatError, match=r"Z-stack \(2 z-planes\)"):
        NgffReader(path)
    reader = NgffReader(path, plane="z=1")
    assert reader.plane == {"t": 0, "z": 1}
    check_levels(reader, [data[0, :, 1]])
    flat = tmp_path / "yx.ome.zarr"
    write_ngff(flat, data[0, 0, 0], axes="yx", names=("DAPI",), levels=1)
    one = NgffReader(flat)
    assert len(one.channels) == 1 and one.channel_names == ("DAPI",)
    check_levels(one, [data[0, :1, 0]], chans=(0,))


def test_bioformats2raw_container(tmp_path):
    root = tmp_path / "b2r.ome.zarr"
    g = zarr.open_group(str(root), mode="w", zarr_format=2)
    g.attrs["bioformats2raw.layout"] = 3
    data = make_data(c=2, h=64, w=64)
    levs = write_ngff(root / "0", data)
    write_ngff(root / "1", data[:, :32, :32])
    reader = open_any_reader(root)
    assert isinstance(reader, NgffReader) and reader.level_dimensions[0] == (64, 64)
    check_levels(reader, levs, chans=(0, 1))


def test_not_ngff(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    with pytest.raises(SlideFormatError, match="not an OME-Zarr image"):
        NgffReader(folder)
    g = zarr.open_group(str(tmp_path / "nomulti.zarr"), mode="w", zarr_format=2)
    g.attrs["something"] = 1
    assert not is_ngff(tmp_path / "nomulti.zarr")
    bad = tmp_path / "badaxes.ome.zarr"
    write_ngff(bad, make_data(c=1, h=32, w=32), levels=1)
    attrs = json.loads((bad / ".zattrs").read_text())
    attrs["multiscales"][0]["axes"] = attrs["multiscales"][0]["axes"][:2]
    (bad / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(SlideFormatError, match="axes"):
        NgffReader(bad)


# --------------------------------------------------------------------------------------------
# Reader choice
# --------------------------------------------------------------------------------------------


def test_forced_readers_and_bad_choices(tmp_path):
    tif = tmp_path / "s.ome.tiff"
    write_ome_subifds(tif, make_data(h=64, w=64), levels=1)
    ngff = tmp_path / "s.ome.zarr"
    write_ngff(ngff, make_data(c=1, h=64, w=64), names=("DAPI",), levels=1)
    assert READER_NAMES == ("auto", "openslide", "tiff", "ngff")
    assert choose_reader(tif, "tiff").reason == "forced by slide.reader = 'tiff'"
    with pytest.raises(SlideFormatError, match="slide.reader is 'tiff' but .* not a TIFF"):
        open_any_reader(ngff, reader="tiff")
    with pytest.raises(SlideFormatError, match="slide.reader is 'ngff' but .* not an OME-Zarr"):
        open_any_reader(tif, reader="ngff")
    with pytest.raises(SlideFormatError, match="slide.plane is set but .* OpenSlide"):
        open_any_reader(tif, reader="openslide", plane="z=0")
    with pytest.raises(ValueError, match="reader must be one of"):
        choose_reader(tif, "bioformats")
    with pytest.raises(SlideNotFoundError):
        choose_reader(tmp_path / "missing.tif")
    # forcing OpenSlide on an OME-TIFF opens it as OpenSlide sees it
    forced = open_any_reader(tif, reader="openslide")
    assert isinstance(forced, OpenSlideReader) and forced.selection.kind == "openslide"


def test_cached_reader(tmp_path):
    tif = tmp_path / "s.ome.tiff"
    write_ome_subifds(tif, make_data(h=64, w=64), levels=1)
    a = cached_reader(tif)
    assert cached_reader(tif) is a
    assert cached_reader(tif, plane=None) is a
    evict_cached_reader(tif)
    assert cached_reader(tif) is not a


# --------------------------------------------------------------------------------------------
# Real files (../shared/data/slides/fluorescence)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fluo(shared_data: Path) -> Path:
    return shared_data / "slides" / "fluorescence"


def _tifffile_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [np.asarray(lv.asarray()) for lv in tif.series[0].levels]


def _check_whole_levels(reader, path: Path) -> None:
    for level, ref in enumerate(_tifffile_levels(path)):
        ref = ref if ref.ndim == 3 else ref[None]
        w, h = reader.level_dimensions[level]
        got = reader.read_channels((0, 0), level, (w, h))
        np.testing.assert_array_equal(got, np.moveaxis(ref, 0, -1))


@pytest.mark.shared_data
def test_real_visinity_ome_subifd_pyramid_without_physical_size(fluo):
    path = fluo / "visinity_test_image.ome.tiff"
    reader = open_any_reader(path)
    assert isinstance(reader, TiffReader)
    assert reader.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512), (256, 256))
    assert reader.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    assert reader.channel_names == ("CHAN_0", "CHAN_1")
    assert reader.mpp is None  # no PhysicalSize; XResolution is 0
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(reader)
    _check_whole_levels(reader, path)
    slide = open_slide(reader, mpp=0.5, channel="chan_1")
    assert slide.channel == 1
    for mpp in (0.5, 1.0, 2.0, 4.0):  # every level is used
        assert slide.read(0, 0, 64, 64, mpp=mpp).shape == (64, 64)
    # OpenSlide opens it as generic TIFF but sees one level and no channels
    assert OpenSlideReader(path).level_count == 1
    with pytest.raises(StainError, match=r"0 'CHAN_0', 1 'CHAN_1'.*--channel"):
        select_channel("auto", reader.channels, path=reader.path)


@pytest.mark.shared_data
def test_real_vectra_qptiff_dapi_by_name(fluo):
    path = fluo / "small_vectra.qptiff"
    reader = open_any_reader(path)
    assert isinstance(reader, TiffReader) and reader.vendor == "qptiff"
    assert reader.channel_names == ("DAPI", "FITC", "Cy3")
    assert reader.mpp == 0.5 and reader.mpp_source == "QPTIFF PixelSizeMicrons"
    assert reader.level_dimensions == ((1920, 1440),)  # thumbnail, overview, label are not levels
    index, how = select_channel("auto", reader.channels, path=reader.path)
    assert index == 0 and "DAPI" in how
    _check_whole_levels(reader, path)
    with pytest.raises(SlideFormatError):
        OpenSlideReader(path)


@pytest.mark.shared_data
def test_real_cycif_crop_without_names_and_implausible_size(fluo):
    path = fluo / "cropped_reactive_core.ome.tiff"
    reader = open_any_reader(path)
    assert len(reader.channels) == 48 and reader.dtype == np.uint16
    assert reader.level_dimensions == ((100, 100), (50, 50), (25, 25), (12, 12))
    assert reader.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    assert reader.mpp is None and "10000" in reader.mpp_note and "implausible" in reader.mpp_note
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(reader)
    with pytest.raises(StainError, match=r"48 channel\(s\) without names.*--channel"):
        select_channel("auto", reader.channels, path=reader.path)
    _check_whole_levels(reader, path)
    # DNA is channel 0, 4, 8, ... (the README's correlation with the cell table)
    dna = reader.read_channels((0, 0), 0, (100, 100), (0, 4, 8)).astype(np.float64)
    assert np.corrcoef(dna[..., 0].ravel(), dna[..., 1].ravel())[0, 1] > 0.8


@pytest.mark.shared_data
def test_real_zeiss_ome_tiff_channels_from_the_ome_only(fluo):
    path = fluo / "s_1_t_1_c_1_z_1.ome.tiff"
    reader = open_any_reader(path)
    # the CZI metadata in its annotations lists EGFP, TaRFP, Bright: those are not channels
    assert reader.channel_names == ("Bright",)
    assert reader.mpp == pytest.approx(1.0833333)
    assert reader.channels[0].transmitted
    with pytest.raises(StainError, match="transmitted light"):
        select_channel("auto", reader.channels, path=reader.path)
    with pytest.raises(StainError, match=r"no channel named 'EGFP'.*0 'Bright'"):
        select_channel("EGFP", reader.channels, path=reader.path)
    _check_whole_levels(reader, path)


@pytest.mark.shared_data
def test_real_imagej_overview(fluo):
    path = fluo / "tma_dapi_overview.tif"
    reader = open_any_reader(path)
    assert reader.vendor == "imagej-tiff" and reader.mpp is None
    assert reader.level_dimensions == ((638, 473),)
    _check_whole_levels(reader, path)


# --------------------------------------------------------------------------------------------
# Slides of multi-channel files: the stain by name at full precision, the model's channels
# --------------------------------------------------------------------------------------------


def _box_mean(a: np.ndarray, d: int) -> np.ndarray:
    h, w = a.shape[0] // d, a.shape[1] // d
    return a[: h * d, : w * d].astype(np.float64).reshape(h, d, w, d).mean(axis=(1, 3))


def test_stain_of_a_16bit_channel_is_read_at_full_precision(tmp_path):
    data = make_data(h=256, w=320, top=65536, seed=4)
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, data, levels=2, bits=16, names=["CD3", "DAPI", "CD20"])
    raw = open_slide(path, normalize=False)
    assert raw.channel == 1 and raw.channel_name == "DAPI"
    # x / raw_max of the raw uint16 samples: no 8-bit rounding on the way
    got = raw.read(10, 20, 64, 48, mpp=0.325)
    np.testing.assert_allclose(got, data[1, 20:68, 10:74] / 65535.0, rtol=1e-6, atol=1e-7)
    coarse = raw.read(8, 4, 30, 20, mpp=0.65 * 1.5)  # level 1, resampled by 1.5
    assert coarse.shape == (20, 30) and np.unique(np.round(coarse * 65535)).size > 256
    slide = open_slide(path)
    low, high = slide.intensity
    assert 0 < low < high < 65535  # percentiles of the raw range
    expect = np.clip((data[1, 20:68, 10:74].astype(np.float64) - low) / (high - low), 0, 1.5)
    np.testing.assert_allclose(slide.read(10, 20, 64, 48, mpp=0.325), expect, atol=1e-5)
    prov = slide.provenance()
    assert prov["channel_name"] == "DAPI" and prov["raw_max"] == 65535.0
    assert prov["channel_names"] == ["CD3", "DAPI", "CD20"] and prov["dtype"] == "uint16"
    assert prov["reader"] == "TiffReader" and "OME-TIFF" in prov["reader_choice"]
    assert prov["mpp_source"] == "OME PhysicalSizeX/Y"


def test_a_12bit_channel_is_scaled_on_its_12_bits(tmp_path):
    data = make_data(h=64, w=64, top=4096)
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, data, levels=1, bits=12)
    slide = open_slide(path, channel="cd20", normalize=False)
    np.testing.assert_allclose(
        slide.read(0, 0, 64, 64, mpp=0.325), data[2] / 4095.0, rtol=1e-6, atol=1e-7
    )
    assert slide.provenance()["raw_max"] == 4095.0


def test_slide_channels_feed_the_model_in_order(tmp_path):
    data = make_data(h=128, w=160, top=4096, seed=2)
    path = tmp_path / "s.ome.tiff"
    write_ome_subifds(path, data, levels=1, bits=12)  # DAPI, CD3, CD20
    slide = open_slide(path, channels=["cd20", "DAPI"])
    x = slide.read_input(5, 7, 40, 30, mpp=0.325)
    assert x.shape == (2, 30, 40) and x.dtype == np.float32
    np.testing.assert_array_equal(x[1], slide.read(5, 7, 40, 30, mpp=0.325))  # DAPI = stain
    cd20 = open_slide(path, channel="CD20")  # its own percentiles, as when it is the stain
    np.testing.assert_allclose(x[0], cd20.read(5, 7, 40, 30, mpp=0.325), atol=1e-6)
    assert [c.name for c in slide.input_channels] == ["CD20", "DAPI"]
    slide.check_model(2, ["CD20", "Hoechst"])  # nuclear stains stand in for each other
    slide.check_model(2, None)
    with pytest.raises(StainError, match=r"input 0: trained on 'CD3', slide gives 'CD20'"):
        slide.check_model(2, ["CD3", "DAPI"])
    with pytest.raises(StainError, match=r"takes 3 input channel.*--channels.*'DAPI', 'CD3'"):
        slide.check_model(3)
    prov = slide.provenance()["input_channels"]
    assert [c["index"] for c in prov] == [2, 0] and prov[0]["intensity_high"] > 0
    # the default input is the stain alone
    plain = open_slide(path)
    np.testing.assert_array_equal(
        plain.read_input(0, 0, 16, 16, mpp=0.325), plain.read(0, 0, 16, 16, mpp=0.325)[None]
    )
    plain.check_model(1, ["Hoechst"])
    with pytest.raises(StainError, match="trained on 'CD45', slide gives 'DAPI'"):
        plain.check_model(1, ["CD45"])
    with pytest.raises(StainError, match="twice"):
        open_slide(path, channels=["DAPI", 0])
    with pytest.raises(StainError, match="no channel named 'CD8'"):
        open_slide(path, channels=["DAPI", "CD8"])


def test_slide_channels_need_a_multichannel_file(tmp_path):
    rgb = np.zeros((128, 128, 3), np.uint8)
    rgb[..., 2] = make_data(c=1, h=128, w=128, dtype=np.uint8, top=256)[0]
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(64, 64), resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    assert choose_reader(path).kind == "openslide"
    with pytest.raises(StainError, match=r"slide\.channels.*read as RGB.*slide\.channel"):
        open_slide(path, channels=["blue"])
    slide = open_slide(path)
    assert slide.channel == 2 and slide.input_channels[0].name == "nuclear stain"


# --------------------------------------------------------------------------------------------
# The synthetic multiplex OME-TIFF (wsi_hipe.synthetic.write_ome_tiff)
# --------------------------------------------------------------------------------------------


def test_synthetic_ome_tiff(tmp_path):
    from wsi_hipe.synthetic import render_multiplex_region, render_region, write_ome_tiff

    size, seed = (300, 200), 1
    written = write_ome_tiff(tmp_path / "m.ome.tiff", size=size, channels=6, seed=seed,
                             tile_size=64, bits=12, artefacts=False)  # fmt: skip
    reader = TiffReader(written.path)
    assert choose_reader(written.path).kind == "tiff"
    names = ("Hoechst", "CD45", "PanCK", "CD3", "Ki67", "Marker 5")
    assert reader.channel_names == names == written.channel_names
    assert reader.channels[0].color == (0, 0, 255) and reader.channels[1].color == (0, 255, 0)
    assert reader.mpp == 0.5 and reader.mpp_source == "OME PhysicalSizeX/Y"
    assert reader.raw_max == 4095 and reader.dtype == np.uint16
    dims = ((300, 200), (150, 100), (75, 50), (38, 25))  # halving down to one 64 px tile
    assert reader.level_dimensions == dims == written.level_dimensions
    with tifffile.TiffFile(written.path) as tif:
        assert len(tif.pages[0].subifds) == 3 and len(tif.series[0].levels) == 4
        levels = [lv.asarray() for lv in tif.series[0].levels]
    # channel 0 is the Hoechst render, quantised as write_slide does
    hoechst = render_region(0, 0, *size, seed=seed, slide_size=size, artefacts=False).image
    np.testing.assert_array_equal(levels[0][0], np.floor(hoechst * 4095 + 0.5).astype(np.uint16))
    # each level is the 2x2 mean (rounded half up) of the level above
    for k in (1, 2, 3):
        above = levels[k - 1].astype(np.int64)
        for c in range(6):
            padded = np.pad(above[c], ((0, above.shape[1] % 2), (0, above.shape[2] % 2)), "edge")
            means = (_box_mean(padded, 2) * 4 + 2) // 4
            np.testing.assert_array_equal(levels[k][c], means.astype(np.uint16))
    # the reader gives the same samples through its Zarr store, and the slide picks Hoechst
    check_levels(reader, [lv for lv in levels], chans=(0, 3, 5))
    assert open_slide(written.path).channel_name == "Hoechst"
    # CD45 rings the lymphocytes: bright just outside their nuclei, dark inside them
    image, region = render_multiplex_region(0, 0, *size, channels=6, seed=seed, slide_size=size,
                                            artefacts=False)  # fmt: skip
    np.testing.assert_array_equal(levels[0], np.floor(image * 4095 + 0.5).astype(np.uint16))
    from scipy import ndimage

    lymph = region.lymphocytes > 0
    assert lymph.sum() > 200
    ring = ndimage.binary_dilation(lymph, iterations=2) & ~lymph & ~region.nuclei
    tissue_far = region.tissue & ~ndimage.binary_dilation(lymph, iterations=8)
    assert image[1][ring].mean() > 4 * image[1][tissue_far].mean()
    assert image[1][ring].mean() > 2 * image[1][lymph].mean()
    assert image[5][ring].mean() < 2 * image[5][tissue_far].mean()  # autofluorescence only
    # a window is the crop of a larger one (noise included)
    part, _ = render_multiplex_region(100, 50, 60, 40, channels=6, seed=seed, slide_size=size,
                                      artefacts=False)  # fmt: skip
    np.testing.assert_array_equal(part, image[:, 50:90, 100:160])


def test_synthetic_ome_tiff_bad_arguments(tmp_path):
    from wsi_hipe.errors import OutputError
    from wsi_hipe.synthetic import write_ome_tiff

    with pytest.raises(ValueError, match="bits"):
        write_ome_tiff(tmp_path / "a.ome.tiff", size=64, bits=10)
    with pytest.raises(ValueError, match="channels"):
        write_ome_tiff(tmp_path / "a.ome.tiff", size=64, channels=0)
    with pytest.raises(ValueError, match="tile_size"):
        write_ome_tiff(tmp_path / "a.ome.tiff", size=64, tile_size=40)
    with pytest.raises(OutputError, match="does not exist"):
        write_ome_tiff(tmp_path / "no" / "a.ome.tiff", size=64)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# End to end: `wsi-hipe run` on a 16-bit TIFF crop, a multiplex OME-TIFF and an OME-Zarr image
# --------------------------------------------------------------------------------------------

#: Small, fast settings for CLI runs (64 px cores, 2 HiPe depths from a 4x4 grid).
E2E_YAML = """\
tiling: {tile_size: 64, halo: 16, min_tissue: 0.0}
score: {floor: 0.0}
hipe: {max_depth: 2, start_grid: 4, batch_size: 64}
"""
E2E_SIZE = (256, 192)


@pytest.fixture(scope="module")
def fluorescence_files(tmp_path_factory):
    """The three formats of the issue, small, with the tiny test model and a config."""
    from _pipeline_support import save_tiny_model

    from wsi_hipe.synthetic import render_region, write_ome_tiff

    root = tmp_path_factory.mktemp("fluorescence")
    hoechst = render_region(0, 0, *E2E_SIZE, seed=3, slide_size=E2E_SIZE).image
    crop = np.floor(hoechst * 4095 + 0.5).astype(np.uint16)  # a 12-bit camera in uint16
    tifffile.imwrite(
        root / "crop.tif",
        crop,
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        rowsperstrip=16,
        metadata=None,
    )  # fmt: skip  striped, 0.5 µm/px
    write_ome_tiff(root / "multiplex.ome.tiff", size=E2E_SIZE, channels=4, seed=3, tile_size=64)
    rng = np.random.default_rng(0)
    other = rng.integers(0, 3000, crop.shape).astype(np.uint16)
    write_ngff(root / "image.ome.zarr", np.stack([other, crop]), names=("CD3", "DAPI"))
    save_tiny_model(root / "tiny.pt")
    (root / "small.yaml").write_text(E2E_YAML)
    return root


@pytest.mark.parametrize(
    ("name", "flags", "reader", "channel_name"),
    [
        ("crop.tif", [], "TiffReader", None),
        ("multiplex.ome.tiff", ["--channel", "Hoechst"], "TiffReader", "Hoechst"),
        ("image.ome.zarr", [], "NgffReader", "DAPI"),
    ],
)
def test_wsi_hipe_run_on_fluorescence_formats(
    fluorescence_files, tmp_path, name, flags, reader, channel_name
):
    from typer.testing import CliRunner

    from wsi_hipe.cli import app
    from wsi_hipe.omezarr import read_output
    from wsi_hipe.viz import overview_images, overview_png

    root = fluorescence_files
    out = tmp_path / "out.ome.zarr"
    args = ["run", root / name, "-o", out, "-c", root / "small.yaml", "--model", root / "tiny.pt"]
    result = CliRunner().invoke(app, [str(a) for a in args + flags])
    assert result.exit_code == 0, result.output
    view = read_output(out)
    assert view.finalized and len(view.tiles) == 12
    assert {t["status"] for t in view.tiles} == {"done"}
    prov = view.provenance["slide"]
    assert prov["reader"] == reader and prov["mpp"] == 0.5 and prov["channel_name"] == channel_name
    assert prov["raw_max"] == 65535.0 and 0 < prov["intensity_low"] < prov["intensity_high"]
    segmentation = np.asarray(view.segmentation[0])
    assert segmentation.shape == E2E_SIZE[::-1] and (segmentation == 1).any()
    assert float(np.asarray(view.saliency[0]).max()) > 0
    panels = overview_images(out, max_size=256)
    assert panels.has_slide  # the slide was reopened from the provenance for the background
    png = overview_png(out, tmp_path / "overview.png", max_size=256)
    assert Path(png).stat().st_size > 1000


def test_wsi_hipe_run_refuses_what_it_cannot_read(fluorescence_files, tmp_path):
    from typer.testing import CliRunner

    from wsi_hipe.cli import app

    root = fluorescence_files
    base = ["run", "-o", tmp_path / "x.ome.zarr", "-c", root / "small.yaml"]
    base += ["--model", root / "tiny.pt"]
    cases = [
        ([root / "multiplex.ome.tiff", "--channel", "DAPI"], "no channel named 'DAPI'.*'Hoechst'"),
        ([root / "crop.tif", "--reader", "ngff"], "not an OME-Zarr image"),
        ([root / "crop.tif", "--plane", "z=1"], "no 'z' axis"),
    ]
    for args, says in cases:
        result = CliRunner().invoke(app, [str(a) for a in base + args])
        assert result.exit_code != 0
        assert re.search(says, " ".join(result.output.split())), result.output
        assert not (tmp_path / "x.ome.zarr").exists()
