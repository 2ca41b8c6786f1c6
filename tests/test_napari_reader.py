"""The napari plugin's reader and lazy pyramids, without a viewer (no display needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_hipe.napari import _lazy
from wsi_hipe.napari._reader import SLIDE_SUFFIXES, napari_get_reader
from wsi_hipe.napari._widget import RegionBox

REPO = Path(__file__).resolve().parents[1]


# --- pure geometry (the pixel transform itself: tests/test_tiling.py) ----------------------------------------------------------------------------


def test_region_box_covers_the_level0_pixels_a_world_rectangle_touches():
    # mpp 0.5: pixel i covers world [(i - 0.5) * 0.5, (i + 0.5) * 0.5).
    box = RegionBox.from_world(0.0, 0.0, 9.9, 4.9, mpp=0.5)
    assert box == RegionBox(x0=0, y0=0, width=11, height=21)
    # corners given in any order, edges exactly on pixel boundaries
    box = RegionBox.from_world(10.25, 5.25, 0.25, 1.25, mpp=0.5)
    assert box == RegionBox(x0=3, y0=1, width=8, height=20)
    assert RegionBox(x0=-5, y0=10, width=20, height=100).clipped(12, 50) == RegionBox(
        x0=0, y0=10, width=12, height=40
    )
    with pytest.raises(ValueError, match="mpp"):
        RegionBox.from_world(0, 0, 1, 1, mpp=0)


# --- which paths the reader claims ------------------------------------------------------------


def _tiny_output(path: Path, *, provenance: dict | None = None) -> Path:
    from wsi_hipe.omezarr import create_output

    store = create_output(
        path, shape=(64, 64), chunk=32, mpp=1.0, slide_mpp=0.5, fingerprint="test",
        provenance=provenance or {},
    )  # fmt: skip
    saliency = np.zeros((64, 64), np.float32)
    saliency[10:14, 40:44] = 2.0
    segmentation = (saliency > 0).astype(np.uint8)
    for ty in (0, 32):
        for tx in (0, 32):
            store.write_tile(ty, tx, saliency[ty : ty + 32, tx : tx + 32],
                             segmentation[ty : ty + 32, tx : tx + 32])  # fmt: skip
            store.record_tile({"index": ty // 32 * 2 + tx // 32, "status": "done"})
    store.write_tissue(np.ones((64, 64), bool))
    store.finalize()
    return path


def test_reader_declines_paths_it_does_not_own(tmp_path):
    import zarr

    assert napari_get_reader(str(tmp_path / "missing.ome.zarr")) is None
    assert napari_get_reader(str(tmp_path)) is None  # a plain folder
    plain = tmp_path / "other.ome.zarr"
    zarr.open_group(str(plain), mode="w").attrs["multiscales"] = []
    assert napari_get_reader(str(plain)) is None  # a zarr that is not a wsi-hipe output
    text = tmp_path / "notes.tif"
    text.write_text("not a tiff")
    assert napari_get_reader(str(text)) is None
    out = _tiny_output(tmp_path / "ok.ome.zarr")
    assert napari_get_reader([str(out), str(out)]) is None  # several paths: not ours


def test_reader_declines_real_non_slides(slides_dir):
    for name in ("boxes.png", "broken.svs", "unopenable.tiff"):
        assert napari_get_reader(str(slides_dir / name)) is None, name
    for name in ("boxes.tiff", "small.svs", "dicom-boxes/boxes_0.dcm"):
        assert napari_get_reader(str(slides_dir / name)) is not None, name


def test_slide_reader_gives_lazy_levels_of_real_slides(slides_dir):
    # boxes.tiff: a 300x250 generic TIFF; CMU-1: an Aperio H&E (brightfield) slide, mpp 0.499
    (data, kwargs, layer_type), = napari_get_reader(str(slides_dir / "boxes.tiff"))(
        str(slides_dir / "boxes.tiff")
    )  # fmt: skip
    assert layer_type == "image" and kwargs["multiscale"]
    assert data[0].shape == (250, 300) and data[1].shape == (125, 150)
    info = kwargs["metadata"]["wsi_hipe"]
    assert info["kind"] == "slide" and info["dimensions"] == (300, 250)
    scale = kwargs["scale"][0]
    assert info["levels"][1]["scale"] == pytest.approx([2 * scale] * 2)
    assert info["levels"][1]["translation"] == pytest.approx([scale / 2] * 2)
    assert np.isfinite(np.asarray(data[1][:8, :8])).all()

    path = str(slides_dir / "CMU-1-Small-Region.svs")
    ((data, kwargs, _),) = napari_get_reader(path)(path)
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    assert kwargs["metadata"]["wsi_hipe"]["allow_brightfield"] is True
    assert data[0].shape == (2967, 2220) and len(data) == 5  # 2967 / 16 <= 256
    assert data[0].chunksize == (512, 512)
    # Lazy: a level is 6 x 5 chunk reads, and a small window needs only the chunk under it.
    import dask

    assert data[0].numblocks == (6, 5)
    (window,) = dask.optimize(data[0][1000:1010, 600:610])
    reads = [k for k in dict(window.__dask_graph__()) if "wsi-hipe-slide" in str(k)]
    assert len(reads) == 1
    assert window.compute().shape == (10, 10)


def test_output_layers_carry_the_metadata_transforms(tmp_path):
    from wsi_hipe.omezarr import read_output

    out = _tiny_output(tmp_path / "out.ome.zarr")
    reader = napari_get_reader(str(out) + "/")  # a trailing slash, as file dialogs give
    assert reader is not None
    layers = reader(str(out))
    names = [kwargs["name"] for _, kwargs, _ in layers]
    assert names == ["saliency", "segmentation", "tissue"]  # no slide in the provenance
    view = read_output(out)
    assert view.levels == 2
    for data, kwargs, _layer_type in layers:
        assert kwargs["multiscale"] and len(data) == view.levels
        assert kwargs["scale"] == pytest.approx(view.scale(0))
        assert kwargs["translate"] == pytest.approx(view.translation(0))
        levels = kwargs["metadata"]["wsi_hipe"]["levels"]
        for k in range(view.levels):
            assert levels[k]["scale"] == pytest.approx(view.scale(k))
            assert levels[k]["translation"] == pytest.approx(view.translation(k))
        # lazy: dask arrays, nothing computed
        assert all(type(level).__name__ == "Array" for level in data)
    # (1.0 µm/px output over a 0.5 µm/px slide: translation (1.0 - 0.5)/2)
    assert layers[0][1]["translate"] == pytest.approx((0.25, 0.25))
    saliency_kwargs = layers[0][1]
    assert saliency_kwargs["blending"] == "additive"
    assert saliency_kwargs["colormap"] == "inferno"
    assert saliency_kwargs["contrast_limits"] == pytest.approx((0.0, 2.0))
    assert layers[1][2] == "labels" and layers[2][1]["visible"] is False


def test_wsi_hipe_imports_without_qt_or_napari_outside_the_plugin():
    code = (
        "import sys, wsi_hipe, wsi_hipe.config, wsi_hipe.omezarr, wsi_hipe.napari;"
        "bad = [m for m in ('PyQt6', 'PyQt5', 'PySide6', 'qtpy', 'napari', 'magicgui')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def test_manifest_is_valid_and_points_at_real_callables():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("wsi-hipe")
    assert manifest.name == "wsi-hipe"
    patterns = manifest.contributions.readers[0].filename_patterns
    assert "*.ome.zarr" in patterns and "*.svs" in patterns
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        __import__(module)
        assert callable(getattr(sys.modules[module], attr)), command.python_name


def test_manifest_patterns_are_the_slide_suffixes():
    import fnmatch

    import yaml

    from wsi_hipe import slide

    assert SLIDE_SUFFIXES is slide.SLIDE_SUFFIXES  # one list, owned by wsi_hipe.slide
    manifest = yaml.safe_load((REPO / "wsi_hipe" / "napari" / "napari.yaml").read_text())
    (reader,) = manifest["contributions"]["readers"]
    patterns = reader["filename_patterns"]
    for suffix in slide.SLIDE_SUFFIXES:
        name = f"slide{suffix}"
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"napari.yaml misses {suffix}"
    # ... and claims nothing else than outputs and those suffixes.
    others = [p for p in patterns if p not in ("*.ome.zarr", "*.zarr")]
    assert sorted(p.removeprefix("*") for p in others) == sorted(slide.SLIDE_SUFFIXES)


class _FakeSlide:
    def __init__(self, path):
        self.path, self.mpp, self.closed = path, 0.5, 0

    def close(self):
        self.closed += 1


def test_lazy_slide_handles_are_a_bounded_process_cache(monkeypatch):
    import wsi_hipe.slide

    opened = []

    def fake_open(path, **_options):
        opened.append(_FakeSlide(path))
        return opened[-1]

    monkeypatch.setattr(wsi_hipe.slide, "open_slide", fake_open)
    _lazy.close_cached_slides()
    n = _lazy.HANDLE_CACHE_SIZE
    try:
        for i in range(n + 2):
            handle = _lazy._slide_handle(f"/fake/{i}.svs", None, "auto")
            assert handle.slide is opened[-1]
        assert _lazy._slide_handle(f"/fake/{n + 1}.svs", None, "auto").slide is opened[-1]
        assert len(opened) == n + 2  # the last one came from the cache
        assert len(_lazy._HANDLES) == n
        # The least recently used handles were evicted and closed; the rest stay open.
        assert [s.closed for s in opened] == [1, 1] + [0] * n
    finally:
        _lazy.close_cached_slides()
    assert all(s.closed == 1 for s in opened) and len(_lazy._HANDLES) == 0
