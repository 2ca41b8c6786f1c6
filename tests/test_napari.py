"""The napari plugin in a real viewer: reader placement, screenshots, the explain widget.

Run headless under a virtual X server (``QT_QPA_PLATFORM=offscreen`` breaks once a layer is
added)::

    xvfb-run -a env QT_QPA_PLATFORM=xcb .venv/bin/pytest tests/test_napari.py

The scene: a 512×512 synthetic Hoechst slide at 0.25 µm/px and an output at 1 µm/px (4 slide
pixels per output pixel, so every translation is non-zero) written through ``wsi_hipe.omezarr``
with a Gaussian saliency and the ground-truth segmentation on one known lymphocyte. The model
of the widget tests is a tiny TorchScript file (lymphocyte logit = 12·(stain − 0.4)), so the
runs take seconds and their answers are known: a cell's area depends only on its own pixels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if not os.environ.get("DISPLAY"):
    pytest.skip(
        "napari tests need a display: xvfb-run -a env QT_QPA_PLATFORM=xcb pytest ...",
        allow_module_level=True,
    )

from wsi_hipe.napari._lazy import LevelTransform  # noqa: E402
from wsi_hipe.napari._widget import ExplainWidget  # noqa: E402

pytestmark = pytest.mark.napari

SLIDE_MPP = 0.25
TARGET_MPP = 1.0
SIZE = 512
SEED = 0
SIGMA_UM = 2.0
#: Analysis boxes are aligned to multiples of this many level-0 px, so that slide levels 0-1
#: and output levels 0-1 cover exactly the same level-0 pixels.
ALIGN = 8

#: Widget runs: small tiles at 0.5 µm/px (a tile of 64 + 2·16 px), HiPe to depth 3.
WIDGET_OVERRIDES = {"tiling.mpp": 0.5, "tiling.tile_size": 64, "tiling.halo": 16}


# --- the scene ----------------------------------------------------------------------------------


def _write_slide(path: Path):
    """A synthetic slide (``wsi_hipe.synthetic.write_slide``) and its ground truth."""
    from wsi_hipe import synthetic

    args = {"seed": SEED, "mpp": SLIDE_MPP}
    synthetic.write_slide(path, size=(SIZE, SIZE), tile_size=256, ground_truth=False, **args)
    # The virtual slide is a pure function of its arguments: the same pixels, with the truth.
    return synthetic.render_region(0, 0, SIZE, SIZE, slide_size=(SIZE, SIZE), **args)


def _pick_lymphocyte(truth, stain: np.ndarray) -> dict:
    """An isolated, bright lymphocyte well inside the slide."""
    centres = np.array([(c["x"], c["y"]) for c in truth.cells])
    best = None
    for cell in truth.cells:
        x, y = cell["x"], cell["y"]
        if cell["cls"] != "lymphocyte" or not (80 <= x < SIZE - 80 and 80 <= y < SIZE - 80):
            continue
        others = np.hypot(*(centres - (x, y)).T)
        isolation = np.sort(others)[1] * SLIDE_MPP  # µm to the nearest other nucleus
        brightness = stain[round(y), round(x)]
        if isolation >= 12 and brightness > 0.6 and (best is None or isolation > best[0]):
            best = (isolation, cell)
    assert best is not None, "no isolated bright lymphocyte in the synthetic slide"
    return best[1]


def _write_output(path: Path, slide_path: Path, truth, cell: dict, *, config=None) -> Path:
    from wsi_hipe.omezarr import create_output

    s = round(TARGET_MPP / SLIDE_MPP)
    n = SIZE // s
    # Output pixel j covers level-0 px [j·s, (j+1)·s): its centre is at world (j·s + (s−1)/2)·m0.
    centres = (np.arange(n) * s + (s - 1) / 2) * SLIDE_MPP
    cy, cx = cell["y"] * SLIDE_MPP, cell["x"] * SLIDE_MPP
    d2 = (centres[:, None] - cy) ** 2 + (centres[None, :] - cx) ** 2
    saliency = np.exp(-d2 / (2 * SIGMA_UM**2)).astype(np.float32)
    saliency[saliency < 1e-6] = 0

    def majority(mask):
        return mask.reshape(n, s, n, s).mean(axis=(1, 3)) >= 0.5

    segmentation = np.where(
        majority(truth.lymphocytes > 0), 1, np.where(majority(truth.nuclei), 2, 0)
    ).astype(np.uint8)
    chunk = 64
    store = create_output(
        path,
        shape=(n, n),
        chunk=chunk,
        mpp=TARGET_MPP,
        slide_mpp=SLIDE_MPP,
        fingerprint="napari-test",
        provenance={
            "slide": {"path": str(slide_path), "mpp": SLIDE_MPP},
            **({"config": config} if config is not None else {}),
        },
    )
    index = 0
    for ty in range(0, n, chunk):
        for tx in range(0, n, chunk):
            store.write_tile(
                ty, tx, saliency[ty : ty + chunk, tx : tx + chunk],
                segmentation[ty : ty + chunk, tx : tx + chunk],
            )  # fmt: skip
            store.record_tile({"index": index, "status": "done"})
            index += 1
    store.write_tissue(majority(truth.tissue))
    store.finalize()
    return path


def _write_threshold_model(path: Path) -> Path:
    import torch

    class Threshold(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lymphocyte = 12.0 * (x[:, :1] - 0.4)
            return torch.cat(
                [torch.zeros_like(lymphocyte), lymphocyte, torch.full_like(lymphocyte, -20.0)],
                dim=1,
            )

    torch.jit.script(Threshold()).save(str(path))
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from wsi_hipe.slide import open_slide

    root = tmp_path_factory.mktemp("napari")
    slide_path = root / "slide.tif"
    truth = _write_slide(slide_path)
    slide = open_slide(str(slide_path))
    stain = slide.read(0, 0, SIZE, SIZE, mpp=SLIDE_MPP)
    cell = _pick_lymphocyte(truth, stain)
    output = _write_output(root / "out.ome.zarr", slide_path, truth, cell)
    model = _write_threshold_model(root / "threshold.pt")
    return {
        "slide": slide_path,
        "output": output,
        "model": model,
        "truth": truth,
        "stain": stain,
        "cell": cell,
        "cell_um": (cell["y"] * SLIDE_MPP, cell["x"] * SLIDE_MPP),
    }


# --- helpers ------------------------------------------------------------------------------------


def _level_transform(layer, level: int) -> LevelTransform:
    """Level 0: napari's own data→world transform of the layer; coarser levels: the metadata."""
    if level == 0:
        origin = layer.data_to_world((0, 0))
        unit = layer.data_to_world((1, 1))
        return LevelTransform(
            scale=(unit[0] - origin[0], unit[1] - origin[1]), translation=(origin[0], origin[1])
        )
    meta = layer.metadata["wsi_hipe"]["levels"][level]
    return LevelTransform(scale=tuple(meta["scale"]), translation=tuple(meta["translation"]))


def _box(cell: dict, half_px: int) -> tuple[int, int, int, int]:
    """Level-0 px box [y0, y1) × [x0, x1) around a cell, aligned to ALIGN."""
    y0 = int(cell["y"] - half_px) // ALIGN * ALIGN
    x0 = int(cell["x"] - half_px) // ALIGN * ALIGN
    return y0, y0 + 2 * half_px, x0, x0 + 2 * half_px


def _centroid_um(layer, level: int, box, level0_px: float, weight=None) -> np.ndarray:
    """World (y, x) µm of the weighted centroid of a layer's level inside a level-0 box."""
    d = round(level0_px)  # level-0 px per pixel of this level
    y0, y1, x0, x1 = (v // d for v in box)
    block = np.asarray(layer.data[level][y0:y1, x0:x1], dtype=float)
    w = block if weight is None else weight(block)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    t = _level_transform(layer, level)
    return np.array(t.to_world((w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()))


def _component_at(mask: np.ndarray, y: int, x: int) -> np.ndarray:
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    assert labels[y, x] > 0, "the point is not inside the mask"
    return labels == labels[y, x]


def _wait(qtbot, widget, timeout_s=120):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout_s * 1000)


def _canvas_point(viewer, y_um: float, x_um: float) -> tuple[int, int]:
    """Screenshot pixel (row, col) of a world point, from the camera (canvas_only screenshots)."""
    h, w = viewer.canvas.size
    cy, cx = viewer.camera.center[-2:]
    zoom = viewer.camera.zoom
    return round(h / 2 + (y_um - cy) * zoom), round(w / 2 + (x_um - cx) * zoom)


# --- reader -------------------------------------------------------------------------------------


def test_reader_places_slide_saliency_and_labels_on_the_same_nucleus(make_napari_viewer, scene):
    viewer = make_napari_viewer()
    layers = viewer.open(str(scene["output"]), plugin="wsi-hipe")
    names = [layer.name for layer in layers]
    assert names == ["slide.tif", "saliency", "segmentation", "tissue"]
    slide, saliency, segmentation, _tissue = layers
    assert slide.multiscale and saliency.multiscale and segmentation.multiscale
    assert len(slide.data) >= 2 and len(saliency.data) == 2
    assert tuple(slide.scale) == pytest.approx((SLIDE_MPP, SLIDE_MPP))
    assert tuple(slide.translate) == pytest.approx((0, 0))
    # (1 µm/px over 0.25 µm/px: the centre of output pixel 0 is at level-0 px 1.5)
    assert tuple(saliency.translate) == pytest.approx((0.375, 0.375))
    assert tuple(segmentation.translate) == pytest.approx((0.375, 0.375))
    assert saliency.blending == "additive" and saliency.colormap.name == "inferno"

    cell = scene["cell"]
    truth_um = np.array(scene["cell_um"])
    box = _box(cell, half_px=48)  # 24 µm around the cell
    # The slide: level 1 averages level-0 pixels, so the raw intensity centroid over the same
    # level-0 box is the same world point at both levels only if both are placed right.
    raw = [_centroid_um(slide, k, box, 2**k) for k in (0, 1)]
    assert raw[1] == pytest.approx(raw[0], abs=0.02)
    # ...and the bright nucleus itself sits on the ground-truth cell centre.
    for k in (0, 1):
        nucleus = _centroid_um(slide, k, box, 2**k, weight=lambda b: np.clip(b - 0.5, 0, None))
        assert nucleus == pytest.approx(truth_um, abs=0.6), f"slide level {k}"
    # The saliency (2x2 mean pyramid): same centroid at both levels, on the cell.
    for k in (0, 1):
        centre = _centroid_um(saliency, k, box, 4 * 2**k)
        assert centre == pytest.approx(truth_um, abs=0.05), f"saliency level {k}"
    # The segmentation: the lymphocyte component under the cell centre, at both levels.
    for k in (0, 1):
        d = 4 * 2**k
        t = _level_transform(segmentation, k)
        py, px = (round(v) for v in t.to_pixel(*truth_um))
        labels = np.asarray(segmentation.data[k])
        component = _component_at(labels == 1, py, px)
        yy, xx = np.nonzero(component)
        centre = np.array(t.to_world(yy.mean(), xx.mean()))
        assert centre == pytest.approx(truth_um, abs=0.6 * d * SLIDE_MPP), f"labels level {k}"


def test_opening_a_slide_file_gives_a_lazy_stain_pyramid(make_napari_viewer, scene):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(scene["slide"]), plugin="wsi-hipe")
    assert layer.multiscale and type(layer.data[0]).__name__ == "Array"  # dask, not numpy
    assert [level.shape for level in layer.data] == [(512, 512), (256, 256)]
    for k, level in enumerate(layer.data):
        t = layer.metadata["wsi_hipe"]["levels"][k]
        d = 2**k
        assert t["scale"] == pytest.approx([SLIDE_MPP * d] * 2)
        assert t["translation"] == pytest.approx([SLIDE_MPP * (d - 1) / 2] * 2)
        assert max(level.chunksize) <= 512
    # chunked reads give the same pixels as one read of the whole level
    level1 = np.asarray(layer.data[1])
    from wsi_hipe.slide import open_slide

    whole = open_slide(str(scene["slide"])).read(0, 0, 256, 256, mpp=2 * SLIDE_MPP)
    np.testing.assert_allclose(level1, whole, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.data[0]), scene["stain"], atol=1e-6)


# --- screenshots --------------------------------------------------------------------------------


def test_screenshot_shows_the_saliency_over_the_slide(make_napari_viewer, scene):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(scene["output"]), plugin="wsi-hipe")
    saliency = next(layer for layer in layers if layer.name == "saliency")
    for layer in layers:
        if layer.name in ("segmentation", "tissue"):
            layer.visible = False
    y_um, x_um = scene["cell_um"]
    viewer.camera.center = (y_um, x_um)
    viewer.camera.zoom = min(viewer.canvas.size) / 40  # 40 µm across the shorter side
    with_overlay = viewer.screenshot(canvas_only=True, flash=False).astype(float)
    saliency.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False).astype(float)

    # The difference the overlay makes, per screen pixel, against distance from the cell.
    diff = (with_overlay[..., :3] - without[..., :3]).sum(axis=2)
    rows, cols = np.indices(diff.shape)
    row, col = _canvas_point(viewer, y_um, x_um)
    dist_um = np.hypot(rows - row, cols - col) / viewer.camera.zoom
    inside = dist_um <= 2.0  # within one σ of the Gaussian's top
    outside = dist_um >= 12.0  # 6 σ away: the saliency is zero there
    assert diff[inside].mean() > 60  # inferno adds a bright yellow over the cell...
    # ...and leaves the slide as it was elsewhere (inferno's zero is (0, 0, 4)/255: near black)
    assert np.abs(diff[outside]).max() <= 6
    assert with_overlay[inside, :3].mean() > with_overlay[outside, :3].mean() + 60
    # the overlay's centre of mass on the screen is the cell
    w = np.clip(diff, 0, None)
    centre = np.array([(w * rows).sum(), (w * cols).sum()]) / w.sum()
    assert np.hypot(*(centre - (row, col))) / viewer.camera.zoom < 1.0


# --- widgets ------------------------------------------------------------------------------------


def _widget(viewer, scene) -> ExplainWidget:
    widget = ExplainWidget(viewer, overrides=WIDGET_OVERRIDES)
    widget.set_settings(model=scene["model"], max_depth=3, batch_size=64, target="lymphocyte")
    return widget


def test_region_widget_explains_the_drawn_rectangle(make_napari_viewer, qtbot, scene):
    viewer = make_napari_viewer()
    viewer.open(str(scene["slide"]), plugin="wsi-hipe")
    widget = _widget(viewer, scene)
    y_um, x_um = scene["cell_um"]
    rect = np.array([[y_um - 10, x_um - 10], [y_um + 10, x_um + 10]])
    viewer.add_shapes([rect], shape_type="rectangle", name="regions")

    worker = widget.explain_region()
    _wait(qtbot, widget)
    result = widget.last_result
    assert result is not None and not result.stopped
    layer = next(lay for lay in widget.last_layers if lay.name.endswith("saliency"))
    data = np.asarray(layer.data)
    assert data.shape in ((40, 40), (41, 41))  # 20 µm at 0.5 µm/px, whole level-0 pixels
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    # the result's pixels tile the rectangle: its outer edges lie within a pixel of it
    lo = np.asarray(layer.data_to_world((0, 0))) - 0.25
    hi = np.asarray(layer.data_to_world(np.array(data.shape) - 1)) + 0.25
    assert np.all(lo <= rect[0] + SLIDE_MPP / 2) and np.all(rect[0] - lo < 0.5)
    assert np.all(hi >= rect[1] - SLIDE_MPP / 2) and np.all(hi - rect[1] < 0.5 + SLIDE_MPP)
    # the peak lies inside the rectangle, and (the score being the lymphocyte area of a
    # pixel-wise model) within one finest HiPe window (8 px = 4 µm) of a nucleus
    peak = np.unravel_index(np.argmax(data), data.shape)
    py, px = layer.data_to_world(peak)
    assert rect[0][0] <= py <= rect[1][0] and rect[0][1] <= px <= rect[1][1]
    iy, ix = round(py / SLIDE_MPP), round(px / SLIDE_MPP)
    near = 16  # level-0 px = 4 µm
    assert scene["truth"].nuclei[iy - near : iy + near + 1, ix - near : ix + near + 1].any()
    # and nuclei carry more of it than the background between them
    ys, xs = np.indices(data.shape)
    iy = np.round((layer.translate[0] + ys * layer.scale[0]) / SLIDE_MPP).astype(int)
    ix = np.round((layer.translate[1] + xs * layer.scale[1]) / SLIDE_MPP).astype(int)
    on_nuclei = scene["truth"].nuclei[iy, ix]
    assert on_nuclei.any() and (~on_nuclei).any()
    assert data[on_nuclei].mean() > 1.2 * data[~on_nuclei].mean()
    assert data.max() > 0
    assert f"{result.forward_passes} forward passes" in widget._status.value
    assert worker is widget.worker
    # the progress bar was sized from the pipeline's progress hook, then closed
    assert worker.pbar.total > 0 and worker.pbar.n == worker.pbar.total

    # "current view": the world rectangle the canvas shows
    viewer.camera.center = (y_um, x_um)
    viewer.camera.zoom = 8.0  # screen px per µm
    y0, x0, y1, x1 = widget.current_view_box()
    h, w = viewer.canvas.size
    assert ((y0 + y1) / 2, (x0 + x1) / 2) == pytest.approx((y_um, x_um))
    assert (y1 - y0, x1 - x0) == pytest.approx((h / 8.0, w / 8.0))


def test_cell_widget_explains_the_clicked_lymphocyte(make_napari_viewer, qtbot, MouseEvent, scene):
    viewer = make_napari_viewer()
    viewer.open(str(scene["slide"]), plugin="wsi-hipe")
    widget = _widget(viewer, scene)
    y_um, x_um = scene["cell_um"]
    widget._cell_button.clicked.emit()  # "Explain cell (click one)"
    widget._on_mouse(viewer, MouseEvent(type="mouse_press", position=(y_um, x_um)))
    assert widget.busy
    _wait(qtbot, widget)
    result = widget.last_result
    assert result is not None and result.cell_mask is not None and result.cell_label == 1
    layer = next(lay for lay in widget.last_layers if lay.name.endswith("saliency"))
    data = np.asarray(layer.data)
    peak = np.unravel_index(np.argmax(data), data.shape)
    py, px = layer.data_to_world(peak)
    # The score is the clicked cell's area: its peak lies on that lymphocyte...
    lymphocytes = scene["truth"].lymphocytes
    cell_id = lymphocytes[round(scene["cell"]["y"]), round(scene["cell"]["x"])]
    radius_um = math.sqrt(scene["cell"]["area_px"] / math.pi) * SLIDE_MPP
    assert math.hypot(py - y_um, px - x_um) <= radius_um + 1.0
    assert cell_id > 0
    # ...it is larger on the cell than around it...
    ys, xs = np.indices(data.shape)
    dist = np.hypot(
        layer.translate[0] + ys * layer.scale[0] - y_um,
        layer.translate[1] + xs * layer.scale[1] - x_um,
    )
    on_cell = result.cell_mask
    assert data[on_cell].mean() > 2 * data[~on_cell].mean()
    # ...and exactly zero where no perturbed window touches the cell: the model is pixel-wise,
    # so only windows overlapping the cell change its area. Depth-1 windows are the largest:
    # 2 cells of 96/6 px at 0.5 µm/px = 16 µm, so no pixel beyond r + 16·√2 µm gets credit.
    assert np.all(data[dist > radius_um + 16 * math.sqrt(2) + 1] == 0)
    cell_layer = next(lay for lay in widget.last_layers if lay.name.endswith("cell"))
    assert np.asarray(cell_layer.data).sum() == result.cell_mask.sum()


def test_cancel_stops_a_running_explanation(make_napari_viewer, qtbot, scene):
    viewer = make_napari_viewer()
    viewer.open(str(scene["slide"]), plugin="wsi-hipe")
    widget = _widget(viewer, scene)
    widget.set_settings(max_depth=0)  # no depth limit: a long run
    widget.explain_region((0.0, 0.0, 120.0, 120.0))  # 16 tiles
    widget.cancel()
    _wait(qtbot, widget)
    assert widget.last_result is not None and widget.last_result.stopped
    assert widget.last_layers == []
    assert "cancelled" in widget._status.value


def test_view_opens_the_output_and_docks_the_widget(make_napari_viewer, scene):
    from wsi_hipe.napari import view

    viewer = make_napari_viewer()
    assert view(scene["output"], block=False, viewer=viewer) is viewer
    assert [layer.name for layer in viewer.layers] == [
        "slide.tif", "saliency", "segmentation", "tissue",
    ]  # fmt: skip
    assert "Explain (HiPe)" in viewer.window.dock_widgets
    with pytest.raises(FileNotFoundError, match="does not exist"):
        view(scene["output"].parent / "missing.ome.zarr", block=False, viewer=viewer)
    with pytest.raises(ValueError, match="neither a wsi-hipe output"):
        view(scene["model"], block=False, viewer=viewer)


def test_plugin_menu_docks_the_widget_with_the_viewer(make_napari_viewer, scene):
    viewer = make_napari_viewer()
    viewer.open(str(scene["slide"]), plugin="wsi-hipe")
    _dock, widget = viewer.window.add_plugin_dock_widget("wsi-hipe", "Explain (HiPe)")
    assert isinstance(widget, ExplainWidget)
    assert widget._viewer.layers[0].name == "slide.tif"  # napari injected this viewer
    assert widget.slide_layer().name == "slide.tif"


def test_widget_starts_from_the_outputs_configuration(make_napari_viewer, scene, tmp_path):
    from wsi_hipe.config import load_config

    run_config = load_config(
        overrides={
            "tiling.tile_size": 128,
            "hipe.substrate": "fade",
            "hipe.max_depth": 2,
            "model.path": str(scene["model"]),
        }
    ).to_dict()
    output = _write_output(
        tmp_path / "configured.ome.zarr", scene["slide"], scene["truth"], scene["cell"],
        config=run_config,
    )  # fmt: skip
    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    viewer.open(str(output), plugin="wsi-hipe")  # the new slide layer becomes the choice...
    layer = widget.slide_layer()
    assert widget._slide.value is layer
    assert widget._substrate.value == "fade" and widget._depth.value == 2  # ...with its settings
    assert widget.model_spec == str(scene["model"])  # and the run's model
    config = widget.config(layer)
    assert config.tiling.tile_size == 128  # the run's tiling, not the defaults
    assert config.hipe.substrate == "fade" and config.hipe.max_depth == 2
    assert config.score.class_index == 1
    widget.set_settings(max_depth=0, substrate="mean", target="nucleus")
    config = widget.config(layer)
    assert config.hipe.max_depth is None and config.hipe.substrate == "mean"
    assert config.score.class_index == 2 and config.tiling.tile_size == 128
    with pytest.raises(ValueError, match="substrate must be one of"):
        widget.set_settings(substrate="zeros")
    widget._model_file.value = ""  # choosing "file" before a file: a hint, not an error
    widget._model.value = "file"
    assert widget._status.value == "choose a model file"
    with pytest.raises(ValueError, match="does not exist; choose a .safetensors"):
        widget.explain_cell(*scene["cell_um"])


def test_model_stack_imports_after_the_opengl_context():
    # Triton bundles its own LLVM; loading it after Mesa's llvmpipe (Xvfb) mapped the system
    # LLVM segfaults. torchvision (imported by segmentation-models-pytorch) imports triton
    # through torch._dynamo, i.e. at the first model load inside napari. The plugin package
    # keeps the two apart (see wsi_hipe.napari._avoid_llvm_clash).
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: nothing can clash")
    code = (
        "import numpy as np, napari\n"
        "viewer = napari.Viewer(show=True)\n"
        "viewer.add_image(np.zeros((8, 8)))\n"
        "viewer.screenshot()\n"
        "import wsi_hipe.napari\n"
        "import torchvision.ops\n"
        "print('model stack imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model stack imported" in out.stdout
