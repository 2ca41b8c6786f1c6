"""napari and multi-channel slides: one layer per channel, names and colours from the metadata.

The files are written here: a 4-channel multiplex OME-TIFF (``wsi_hipe.synthetic.
write_ome_tiff``: Hoechst, CD45, PanCK, CD3), a 2-channel OME-Zarr image and a gray 16-bit TIFF;
every lazy level is compared with the samples tifffile / zarr read from the file. The viewer
tests run under a virtual X server::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/pytest tests/test_napari_channels.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

napari = pytest.importorskip("napari")

from wsi_hipe.napari._layers import (  # noqa: E402
    MAX_VISIBLE_CHANNELS,
    _used_channels,
    channel_layers_data,
    output_layer_data,
    slide_info,
)
from wsi_hipe.napari._reader import napari_get_reader  # noqa: E402

SIZE = (320, 256)
MPP = 0.5
NAMES = ("Hoechst", "CD45", "PanCK", "CD3")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import zarr

    from wsi_hipe.synthetic import render_region, write_ome_tiff

    root = tmp_path_factory.mktemp("channels")
    write_ome_tiff(root / "m.ome.tiff", size=SIZE, channels=4, seed=2, tile_size=128, bits=12)
    hoechst = render_region(0, 0, *SIZE, seed=2, slide_size=SIZE).image
    gray = np.floor(hoechst * 65535 + 0.5).astype(np.uint16)
    tifffile.imwrite(root / "gray.tif", gray, resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                     metadata=None)  # fmt: skip
    # an OME-Zarr image (NGFF 0.4) with two levels: CD8 (no colour) and DAPI
    data = np.stack([np.random.default_rng(0).integers(0, 900, gray.shape), gray]).astype(np.uint16)
    group = zarr.open_group(str(root / "img.ome.zarr"), mode="w", zarr_format=2)
    datasets = []
    for k in range(2):
        level = data[:, :: 2**k, :: 2**k]
        group.create_array(str(k), shape=level.shape, chunks=(1, 64, 64), dtype=level.dtype)[
            ...
        ] = level
        scale = [1.0, MPP * 2**k, MPP * 2**k]
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "yx"
    ]
    group.attrs.update(
        {
            "multiscales": [{"version": "0.4", "axes": axes, "datasets": datasets}],
            "omero": {"channels": [{"label": "CD8"}, {"label": "DAPI", "color": "0000FF"}]},
        }
    )
    return root


def _levels(path):
    with tifffile.TiffFile(path) as tif:
        return [lv.asarray() for lv in tif.series[0].levels]


def test_a_multiplex_ome_tiff_opens_as_one_layer_per_channel(files):
    path = str(files / "m.ome.tiff")
    reader = napari_get_reader(path)
    assert reader is not None
    layers = reader(path)
    assert [kw["name"] for _, kw, _ in layers] == list(NAMES)
    assert {t for _, _, t in layers} == {"image"}
    stored = _levels(path)
    colours = [(0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1)]  # the OME Channel@Color of each
    for c, (data, kwargs, _) in enumerate(layers):
        np.testing.assert_allclose(kwargs["colormap"].colors[-1][:3], colours[c])
        assert kwargs["blending"] == "additive" and kwargs["visible"]
        assert kwargs["scale"] == pytest.approx((MPP, MPP)) and kwargs["units"] == "µm"
        info = kwargs["metadata"]["wsi_hipe"]
        assert info["channel"] == c and info["channel_name"] == NAMES[c]
        assert info["kind"] == ("slide" if c == 0 else "slide-channel")
        # lazy levels, whose values are the raw samples of the file's own levels
        assert len(data) == 2 and data[1].shape == (128, 160)
        assert all(type(d).__name__ == "Array" for d in data)
        np.testing.assert_array_equal(np.asarray(data[0]), stored[0][c].astype(np.float32))
        np.testing.assert_array_equal(np.asarray(data[1]), stored[1][c].astype(np.float32))
        low, high = kwargs["contrast_limits"]
        assert 0 <= low < high <= 4095
    assert slide_info(type("L", (), {"metadata": layers[0][1]["metadata"]})) is not None


def test_a_window_reads_only_the_chunks_under_it(files):
    import dask

    from wsi_hipe.napari._lazy import channel_pyramids

    pyramids = channel_pyramids(files / "m.ome.tiff", channels=["cd45"], chunk=64)
    assert pyramids.channels == (1,) and pyramids.names == ("CD45",) and pyramids.stain == 0
    level = pyramids.levels[0][0]
    assert level.numblocks == (4, 5)
    (window,) = dask.optimize(level[70:80, 130:140])
    reads = [k for k in dict(window.__dask_graph__()) if "wsi-hipe-channel" in str(k)]
    assert len(reads) == 1
    np.testing.assert_array_equal(
        window.compute(), _levels(files / "m.ome.tiff")[0][1, 70:80, 130:140].astype(np.float32)
    )


def test_ngff_image_and_gray_tiff(files):
    path = str(files / "img.ome.zarr")
    reader = napari_get_reader(path)
    assert reader is not None
    layers = reader(path)
    assert [kw["name"] for _, kw, _ in layers] == ["CD8", "DAPI"]
    dapi, cd8 = layers[1][1], layers[0][1]
    assert dapi["metadata"]["wsi_hipe"]["kind"] == "slide"  # the nuclear stain by name
    np.testing.assert_allclose(dapi["colormap"].colors[-1][:3], (0, 0, 1))
    assert tuple(cd8["colormap"].colors[-1][:3]) != (0, 0, 1)  # a default colour, not blue
    np.testing.assert_array_equal(
        np.asarray(layers[1][0][1]), (np.asarray(layers[1][0][0])[::2, ::2])
    )
    # a gray TIFF is one stain layer (the normalised stain, as the model sees it)
    gray = str(files / "gray.tif")
    ((data, kwargs, _),) = napari_get_reader(gray)(gray)
    assert kwargs["metadata"]["wsi_hipe"]["kind"] == "slide"
    assert kwargs["contrast_limits"] == (0.0, 1.5) and data[0].shape == SIZE[::-1]


def test_many_channels_show_the_stain_first(files, tmp_path):
    from wsi_hipe.synthetic import write_ome_tiff

    n = MAX_VISIBLE_CHANNELS + 2
    write_ome_tiff(tmp_path / "many.ome.tiff", size=(96, 64), channels=n, tile_size=64)
    layers = channel_layers_data(tmp_path / "many.ome.tiff")
    assert len(layers) == n
    assert [kw["visible"] for _, kw, _ in layers] == [True] + [False] * (n - 1)
    assert layers[-1][1]["name"] == f"Marker {n - 1}"


def test_used_channels_of_a_run():
    prov = {"slide": {"channel_names": list(NAMES), "channel": 0}}
    assert _used_channels(prov) == [0]
    prov["slide"]["input_channels"] = [{"index": 1}, {"index": 0}]
    assert _used_channels(prov) == [0, 1]
    assert _used_channels({"slide": {"channel": 2}}) is None  # an RGB slide: its stain layer
    assert _used_channels({"slide": {"channel_names": [None], "channel": None}}) is None


def test_output_of_a_multiplex_run_shows_the_channel_it_used(files, tmp_path):
    """`wsi-hipe run --channel CD45` on the multiplex file: the output shows that channel."""
    from _pipeline_support import save_tiny_model
    from typer.testing import CliRunner

    from wsi_hipe.cli import app

    save_tiny_model(tmp_path / "tiny.pt")
    (tmp_path / "small.yaml").write_text(
        "tiling: {tile_size: 64, halo: 16, min_tissue: 0.0}\nscore: {floor: 0.0}\n"
        "hipe: {max_depth: 1, start_grid: 4, batch_size: 64}\n"
    )
    out = tmp_path / "out.ome.zarr"
    args = ["run", files / "m.ome.tiff", "-o", out, "-c", tmp_path / "small.yaml"]
    args += ["--model", tmp_path / "tiny.pt", "--channel", "cd45"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    layers = output_layer_data(out)
    names = [kw["name"] for _, kw, _ in layers]
    assert names[:2] == ["CD45", "saliency"]
    slide = layers[0][1]["metadata"]["wsi_hipe"]
    assert slide["kind"] == "slide" and slide["channel"] == 1
    assert slide["config"]["slide"]["channel"] == "cd45"
    np.testing.assert_array_equal(
        np.asarray(layers[0][0][0]), _levels(files / "m.ome.tiff")[0][1].astype(np.float32)
    )


# --- a real viewer --------------------------------------------------------------------------


@pytest.mark.napari
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (xvfb-run)")
def test_viewer_shows_each_channel_in_its_colour(files, make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(files / "m.ome.tiff"), plugin="wsi-hipe")
    assert [layer.name for layer in layers] == list(NAMES)
    assert all(layer.multiscale and layer.blending == "additive" for layer in layers)
    for layer in layers[1:]:
        layer.visible = False
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False).astype(float)
    # only Hoechst is visible: the picture is blue (its OME colour), with no red or green
    assert shot[..., 2].max() > 100 and shot[..., 0].max() < 30 and shot[..., 1].max() < 30
    layers[0].visible, layers[1].visible = False, True
    shot = viewer.screenshot(canvas_only=True, flash=False).astype(float)
    assert shot[..., 1].max() > 100 and shot[..., 0].max() < 30 and shot[..., 2].max() < 30
    assert Path(layers[0].metadata["wsi_hipe"]["path"]).name == "m.ome.tiff"
