"""Tests of wsi_hipe.omezarr: layout, pyramid, NGFF validity, resume, overwrite, chunk writes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_hipe.errors import OutputError, ResumeMismatchError
from wsi_hipe.omezarr import (
    NGFF_VERSIONS,
    create_output,
    make_fingerprint,
    ome_attrs,
    open_output,
    pyramid_shapes,
    read_output,
)
from wsi_hipe.stitch import downsample_mean, downsample_mode
from wsi_hipe.tiling import pixel_transform

SHAPE, CHUNK = (50, 70), 16  # 4 x 5 tiles, the last row/column partial
MPP, SLIDE_MPP = 1.0, 0.25


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    sal = rng.random(SHAPE).astype(np.float32) + 0.01  # no all-zero chunk
    seg = rng.integers(0, 3, SHAPE).astype(np.uint8)
    seg[0, ::CHUNK] = 1  # every chunk holds a non-zero class
    return sal, seg


def _tiles():
    for row, y in enumerate(range(0, SHAPE[0], CHUNK)):
        for col, x in enumerate(range(0, SHAPE[1], CHUNK)):
            yield row * 5 + col, row, col, y, x


def _create(path, **kw):
    args = dict(
        shape=SHAPE,
        chunk=CHUNK,
        mpp=MPP,
        slide_mpp=SLIDE_MPP,
        fingerprint="fp-1",
        provenance={"slide": {"path": "/data/s1.tif", "sha256": "ab" * 32}, "config": {"a": 1}},
    )
    args.update(kw)
    return create_output(path, **args)


def _write_all(store, sal, seg, *, status="done"):
    for index, row, col, y, x in _tiles():
        # Hand the writer full-size cores even at the border: it must clip them.
        core_sal = np.zeros((CHUNK, CHUNK), np.float32)
        core_seg = np.zeros((CHUNK, CHUNK), np.uint8)
        h, w = min(CHUNK, SHAPE[0] - y), min(CHUNK, SHAPE[1] - x)
        core_sal[:h, :w] = sal[y : y + h, x : x + w]
        core_seg[:h, :w] = seg[y : y + h, x : x + w]
        assert store.write_tile(y, x, core_sal, core_seg) == (h, w)
        store.record_tile(
            {"index": index, "row": row, "col": col, "y": y, "x": x, "status": status,
             "score": float(index) / 2, "passes": 10 + index, "seconds": 0.5}
        )  # fmt: skip


def _chunk_files(array_dir: Path) -> list[Path]:
    meta = {".zarray", ".zattrs", "zarr.json"}
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name not in meta)


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def finished(request, tmp_path_factory):
    """A finalized output, shared read-only by the tests of one NGFF version."""
    sal, seg = _data()
    path = tmp_path_factory.mktemp(f"ngff{request.param}") / "out.ome.zarr"
    store = _create(path, ngff=request.param)
    _write_all(store, sal, seg)
    store.write_tissue(np.ones((5, 7), bool))
    store.finalize()
    return path, sal, seg, request.param


# --- pyramid geometry -----------------------------------------------------------------------------


def test_pyramid_shapes_halve_with_ceil_until_one_chunk():
    assert pyramid_shapes((50, 70), 16) == [(50, 70), (25, 35), (13, 18), (7, 9)]
    assert pyramid_shapes((16, 10), 16) == [(16, 10)]
    assert pyramid_shapes((50, 70), 16, levels=2) == [(50, 70), (25, 35)]
    assert pyramid_shapes((3, 2), 16, levels=10) == [(3, 2), (2, 1), (1, 1)]
    with pytest.raises(ValueError, match="levels"):
        pyramid_shapes((50, 70), 16, levels=0)


def test_level_transforms_align_pixel_centres_with_the_slide(tmp_path):
    # Output pixel i of level k covers slide level-0 px [i·2^k·s, (i+1)·2^k·s); its centre in µm,
    # with slide pixel j centred at j·slide_mpp, is ((i + 1/2)·2^k·s − 1/2)·slide_mpp.
    mpp, slide_mpp = 0.5, 0.2
    s = mpp / slide_mpp
    store = create_output(tmp_path / "o.ome.zarr", shape=(40, 40), chunk=8, mpp=mpp,
                          slide_mpp=slide_mpp, fingerprint="fp")  # fmt: skip
    store.finalize()
    view = read_output(tmp_path / "o.ome.zarr")
    assert view.levels == 4
    for k in range(4):
        scale, translation = view.scale(k), view.translation(k)
        assert scale == (mpp * 2**k, mpp * 2**k)  # exactly the output's µm/px
        for i in (0, 3, 11):
            expected = ((i + 0.5) * 2**k * s - 0.5) * slide_mpp
            assert i * scale[0] + translation[0] == pytest.approx(expected)
            assert i * scale[1] + translation[1] == pytest.approx(expected)
        assert view.transform(k).to_world(3, 11) == pytest.approx(
            (3 * scale[0] + translation[0], 11 * scale[1] + translation[1])
        )
    assert pixel_transform(0.25, mpp=0.25).ngff() == ([0.25, 0.25], [0.0, 0.0])


def test_ngff_versions_are_the_config_vocabulary():
    from typing import get_args

    from wsi_hipe.config import NgffVersion

    assert tuple(NGFF_VERSIONS) == get_args(NgffVersion)
    assert NGFF_VERSIONS == {"0.4": 2, "0.5": 3}


def test_ome_attrs_finds_ngff_keys_for_either_version(finished):
    path, _, _, ngff = finished
    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    assert ("ome" in attrs) == (ngff == "0.5")
    assert ome_attrs(attrs)["multiscales"][0]["name"] == "saliency"
    assert ome_attrs(dict(root["labels"].attrs))["labels"] == ["segmentation", "tissue"]
    assert "wsi_hipe" in attrs  # provenance stays at the top level in both versions


# --- round trip -----------------------------------------------------------------------------------


def test_round_trip_levels_and_metadata(finished):
    path, sal, seg, ngff = finished
    view = read_output(path)
    assert view.finalized and view.ngff == ngff
    assert view.levels == 4 and view.shape == SHAPE and view.chunk == (CHUNK, CHUNK)
    assert [a.shape for a in view.saliency] == [(50, 70), (25, 35), (13, 18), (7, 9)]
    assert [a.shape for a in view.segmentation] == [a.shape for a in view.saliency]
    assert [a.shape for a in view.tissue] == [a.shape for a in view.saliency]
    np.testing.assert_array_equal(view.saliency[0].compute(), sal)
    np.testing.assert_array_equal(view.segmentation[0].compute(), seg)
    assert view.saliency[0].dtype == np.float32 and view.segmentation[0].dtype == np.uint8
    # Every level is the 2x2 mean / mode of the one above it.
    ref_sal, ref_seg = sal, seg
    for k in range(1, 4):
        ref_sal, ref_seg = downsample_mean(ref_sal), downsample_mode(ref_seg)
        np.testing.assert_allclose(view.saliency[k].compute(), ref_sal, rtol=1e-6)
        np.testing.assert_array_equal(view.segmentation[k].compute(), ref_seg)
        assert (view.tissue[k].compute() == 1).all()
    assert view.scale(2) == (4.0, 4.0)
    assert view.translation(2) == ((4.0 - SLIDE_MPP) / 2, (4.0 - SLIDE_MPP) / 2)
    assert view.mpp == MPP and view.slide_mpp == SLIDE_MPP
    assert view.slide_path == "/data/s1.tif"
    assert view.provenance["config"] == {"a": 1} and "created" in view.provenance
    out = view.provenance["output"]
    assert out["tile_counts"] == {"done": 20, "skipped": 0, "failed": 0}
    assert out["saliency_range"] == [pytest.approx(float(sal.min())), pytest.approx(sal.max())]
    assert [t["index"] for t in view.tiles] == list(range(20))
    assert view.tiles[7]["passes"] == 17 and view.tiles[7]["error"] is None
    with pytest.raises(ValueError, match="level"):
        view.scale(4)


def test_ome_zarr_py_reads_levels_axes_scales_and_labels(finished):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path, sal, seg, _ = finished
    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    assert [d.shape for d in image.data] == [(50, 70), (25, 35), (13, 18), (7, 9)]
    np.testing.assert_array_equal(np.asarray(image.data[0]), sal)
    assert [a["name"] for a in image.metadata["axes"]] == ["y", "x"]
    assert {a["unit"] for a in image.metadata["axes"]} == {"micrometer"}
    transforms = image.metadata["coordinateTransformations"]
    for k, ts in enumerate(transforms):
        scale, translation = pixel_transform(SLIDE_MPP, mpp=MPP * 2**k).ngff()
        assert ts == [
            {"type": "scale", "scale": scale},
            {"type": "translation", "translation": translation},
        ]
    labels = {n.metadata.get("name"): n for n in nodes if "color" in n.metadata}
    assert set(labels) == {"segmentation", "tissue"}
    np.testing.assert_array_equal(np.asarray(labels["segmentation"].data[0]), seg)
    colors = labels["segmentation"].metadata["color"]
    assert set(colors) == {0, 1, 2} and colors[1] != colors[2]
    assert labels["segmentation"].metadata["properties"][1] == {"class": "lymphocyte"}


def test_metadata_validates_against_ome_zarr_models(finished):
    path, _, _, ngff = finished
    if ngff == "0.4":
        from ome_zarr_models.v04 import Image, ImageLabel
    else:
        from ome_zarr_models.v05 import Image, ImageLabel
    group = zarr.open_group(str(path), mode="r")
    image = Image.from_zarr(group)
    assert [d.path for d in image.datasets[0]] == ["0", "1", "2", "3"]
    for name in ("segmentation", "tissue"):
        ImageLabel.from_zarr(group[f"labels/{name}"])


def test_napari_ome_zarr_reader_gets_image_and_both_labels(finished, capsys):
    pytest.importorskip("napari_ome_zarr")
    from napari_ome_zarr._reader import napari_get_reader

    path, sal, _, _ = finished
    reader = napari_get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels", "labels"]
    data, meta, _ = layers[0]
    assert len(data) == 4 and meta["units"] == ("micrometer", "micrometer")
    assert meta["scale"] == [MPP, MPP]
    # napari-ome-zarr 0.10 applies only the first transform of dataset 0 (the scale) and drops
    # the sub-pixel translation; read_output / the wsi-hipe napari plugin apply both.
    np.testing.assert_array_equal(np.asarray(data[0]), sal)


def test_finalize_writes_tiles_csv(finished):
    path = finished[0]
    with open(path / "wsi_hipe" / "tiles.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20
    assert list(rows[0]) == ["index", "row", "col", "y", "x", "status", "score", "passes",
                             "seconds", "error"]  # fmt: skip
    assert rows[6] == {"index": "6", "row": "1", "col": "1", "y": "16", "x": "16",
                       "status": "done", "score": "3.0", "passes": "16", "seconds": "0.5",
                       "error": ""}  # fmt: skip


def test_zarr_lists_the_hierarchy_without_warnings(finished, recwarn):
    group = zarr.open_group(str(finished[0]), mode="r")
    assert sorted(group.group_keys()) == ["labels", "wsi_hipe"]
    assert sorted(group.array_keys()) == ["0", "1", "2", "3"]
    assert not [w for w in recwarn if "not recognized" in str(w.message)]


# --- level-0 writes -------------------------------------------------------------------------------


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_each_level0_chunk_is_written_exactly_once(tmp_path, ngff):
    sal, seg = _data(3)
    store = _create(tmp_path / "o.ome.zarr", ngff=ngff)
    _write_all(store, sal, seg)
    files = {
        name: _chunk_files(tmp_path / "o.ome.zarr" / name)
        for name in ("0", "labels/segmentation/0")
    }
    # 20 tiles -> 20 chunk files per array, one per tile core, no more.
    assert {k: len(v) for k, v in files.items()} == {"0": 20, "labels/segmentation/0": 20}
    stamps = {p: p.stat().st_mtime_ns for v in files.values() for p in v}
    store.finalize()
    # finalize only reads level 0: no level-0 chunk was rewritten or added.
    after = {p: p.stat().st_mtime_ns for name in files for p in _chunk_files(tmp_path / "o.ome.zarr" / name)}  # fmt: skip
    assert after == stamps


def test_write_tile_rejects_misaligned_oversized_and_bad_cores(tmp_path):
    store = _create(tmp_path / "o.ome.zarr")
    ok = np.zeros((CHUNK, CHUNK), np.float32)
    seg = np.zeros((CHUNK, CHUNK), np.uint8)
    with pytest.raises(ValueError, match="aligned"):
        store.write_tile(8, 0, ok, seg)
    with pytest.raises(ValueError, match="outside"):
        store.write_tile(64, 0, ok, seg)
    with pytest.raises(ValueError, match="larger than the chunks"):
        store.write_tile(0, 0, np.zeros((CHUNK + 1, CHUNK)), np.zeros((CHUNK + 1, CHUNK), int))
    with pytest.raises(ValueError, match="differs"):
        store.write_tile(0, 0, ok, seg[:4])
    with pytest.raises(ValueError, match="0..255"):
        store.write_tile(0, 0, ok, np.full((CHUNK, CHUNK), 300))
    with pytest.raises(ValueError, match="integer"):
        store.write_tile(0, 0, ok, ok)


def test_write_tile_accepts_torch_and_zero_tiles_read_as_zero(tmp_path):
    torch = pytest.importorskip("torch")
    store = _create(tmp_path / "o.ome.zarr")
    store.write_tile(16, 32, torch.full((CHUNK, CHUNK), 0.5), torch.ones(CHUNK, CHUNK, dtype=torch.int64))  # fmt: skip
    store.write_tile(0, 0, np.zeros((CHUNK, CHUNK), np.float32), np.zeros((CHUNK, CHUNK), np.uint8))
    view = read_output(tmp_path / "o.ome.zarr")
    assert not view.finalized and view.levels == 1
    sal = view.saliency[0].compute()
    assert (sal[16:32, 32:48] == 0.5).all() and sal.sum() == 0.5 * CHUNK * CHUNK
    assert view.segmentation[0].compute().sum() == CHUNK * CHUNK


def test_write_tissue_nearest_from_a_thumbnail_mask(tmp_path):
    store = _create(tmp_path / "o.ome.zarr", shape=(40, 24), chunk=8)
    # Thumbnail at 32 slide px per mask px; output px = MPP/SLIDE_MPP = 4 slide px -> 8 output
    # px per mask px. Mask pixel (r, c) must cover output rows 8r..8r+7, cols 8c..8c+7.
    mask = np.zeros((5, 3), bool)
    mask[1, 2] = mask[4, 0] = True
    store.write_tissue(mask, downsample=32)
    tissue = read_output(tmp_path / "o.ome.zarr").tissue[0].compute()
    np.testing.assert_array_equal(tissue, np.kron(mask, np.ones((8, 8))).astype(np.uint8))
    store.write_tissue(np.kron(mask, np.ones((8, 8), bool)))  # already at target px
    np.testing.assert_array_equal(read_output(tmp_path / "o.ome.zarr").tissue[0].compute(), tissue)
    with pytest.raises(ValueError, match="downsample"):
        store.write_tissue(mask, downsample=0)


# --- tile table and resume ------------------------------------------------------------------------


def test_records_survive_reopen_and_last_record_wins(tmp_path):
    path = tmp_path / "o.ome.zarr"
    store = _create(path)
    store.record_tile({"index": 0, "status": "done", "score": np.float32(2.0)})
    store.record_tile({"index": 1, "status": "failed", "error": "SlideReadError: bad tile"})
    store.record_tile({"index": 2, "status": "skipped", "score": float("nan")})
    store.close()
    again = open_output(path, fingerprint="fp-1")
    assert again.finished_tiles() == {0, 2}  # failed tiles are retried
    again.record_tile({"index": 1, "status": "done", "passes": 12})
    assert open_output(path).finished_tiles() == {0, 1, 2}
    records = again.tile_records()
    assert records[1]["passes"] == 12 and records[1]["error"] is None
    assert records[0]["score"] == 2.0 and records[2]["score"] is None


def test_record_tile_rejects_bad_records(tmp_path):
    store = _create(tmp_path / "o.ome.zarr")
    with pytest.raises(ValueError, match="status"):
        store.record_tile({"index": 0, "status": "ok"})
    with pytest.raises(ValueError, match="index"):
        store.record_tile({"status": "done"})
    with pytest.raises(ValueError, match="JSON"):
        store.record_tile({"index": 0, "status": "done", "extra": object()})
    assert store.tile_records() == {}


def test_truncated_last_line_is_ignored_and_later_records_stay_readable(tmp_path):
    path = tmp_path / "o.ome.zarr"
    store = _create(path)
    store.record_tile({"index": 0, "status": "done"})
    with open(store.tiles_path, "ab") as handle:
        handle.write(b'{"index":1,"status":"do')  # a crash mid-write
    assert store.finished_tiles() == {0}
    resumed = open_output(path, fingerprint="fp-1")
    assert resumed.finished_tiles() == {0}
    resumed.record_tile({"index": 3, "status": "done"})
    assert resumed.finished_tiles() == {0, 3}


_CRASHING_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from wsi_hipe.omezarr import create_output
    store = create_output(sys.argv[1], shape=(32, 48), chunk=16, mpp=1.0, slide_mpp=0.5,
                          fingerprint="fp-kill", provenance={})
    for index in range(3):
        y, x = 0, 16 * index
        store.write_tile(y, x, np.full((16, 16), index + 1.0, np.float32),
                         np.full((16, 16), 1, np.uint8))
        store.record_tile({"index": index, "status": "done", "y": y, "x": x})
    # Tile 3: chunks written, then killed halfway through its record.
    store.write_tile(16, 0, np.full((16, 16), 9.0, np.float32), np.ones((16, 16), np.uint8))
    fd = os.open(store.tiles_path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b'{"index":3,"sta')
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_resume_after_kill_9(tmp_path):
    path = tmp_path / "crash.ome.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_CHILD, str(path)], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with pytest.raises(OutputError, match="already exists"):
        create_output(path, shape=(32, 48), chunk=16, mpp=1.0, slide_mpp=0.5, fingerprint="fp-kill")
    store = create_output(
        path, shape=(32, 48), chunk=16, mpp=1.0, slide_mpp=0.5, fingerprint="fp-kill", resume=True
    )
    assert store.finished_tiles() == {0, 1, 2}
    # Redo tile 3 and the rest, then finalize: the output is complete and consistent.
    for index, (y, x) in enumerate([(16, 0), (16, 16), (16, 32)], start=3):
        store.write_tile(y, x, np.full((16, 16), index + 1.0, np.float32), np.ones((16, 16), np.uint8))  # fmt: skip
        store.record_tile({"index": index, "status": "done", "y": y, "x": x})
    store.finalize()
    view = read_output(path)
    expected = np.kron(np.arange(1, 7, dtype=np.float32).reshape(2, 3), np.ones((16, 16)))
    np.testing.assert_array_equal(view.saliency[0].compute(), expected)
    assert [t["index"] for t in view.tiles] == [0, 1, 2, 3, 4, 5]


def test_fingerprint_or_layout_mismatch_refuses_to_resume(tmp_path):
    path = tmp_path / "o.ome.zarr"
    _create(path, fingerprint={"config": {"mpp": 1.0}, "model": "m1"}).record_tile(
        {"index": 0, "status": "done"}
    )
    with pytest.raises(ResumeMismatchError, match="another config/model"):
        open_output(path, fingerprint={"config": {"mpp": 1.0}, "model": "m2"})
    with pytest.raises(ResumeMismatchError, match="pass overwrite=True"):
        _create(path, fingerprint="other", resume=True)
    with pytest.raises(ResumeMismatchError, match="chunk.*pass overwrite=True"):
        _create(path, fingerprint={"model": "m1", "config": {"mpp": 1.0}}, chunk=32, resume=True)
    store = open_output(path, fingerprint={"model": "m1", "config": {"mpp": 1.0}})  # key order
    assert store.finished_tiles() == {0}
    assert isinstance(ResumeMismatchError("x"), OutputError)


def test_make_fingerprint_is_order_independent_and_sensitive():
    a = make_fingerprint({"x": 1, "y": [1, 2]}, "model")
    assert a == make_fingerprint({"y": [1, 2], "x": 1}, "model")
    assert a != make_fingerprint({"x": 1, "y": [2, 1]}, "model")
    assert len(a) == 64


def test_overwrite_replaces_an_output_but_never_a_foreign_folder(tmp_path):
    path = tmp_path / "o.ome.zarr"
    _create(path).record_tile({"index": 5, "status": "done"})
    # A library error names the library's fix (the CLI words it as its flags).
    with pytest.raises(OutputError, match="already exists; pass overwrite=True .* resume=True"):
        _create(path)
    fresh = _create(path, overwrite=True, fingerprint="fp-2")
    assert fresh.finished_tiles() == set()
    assert read_output(path).fingerprint == "fp-2"

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match="refusing to delete.*another path"):
        _create(foreign, overwrite=True)
    assert (foreign / "thesis.txt").read_text() == "precious"
    with pytest.raises(OutputError, match="not a wsi-hipe output.*another path"):
        open_output(foreign)
    with pytest.raises(OutputError):
        read_output(foreign)
    with pytest.raises(OutputError, match=r"no output.*create_output\(\)"):
        open_output(tmp_path / "missing.ome.zarr")


def test_interrupted_creation_is_not_resumable(tmp_path):
    path = tmp_path / "o.ome.zarr"
    _create(path)
    root = zarr.open_group(str(path), mode="r+")
    attrs = dict(root.attrs)
    attrs["wsi_hipe"]["output"]["state"] = "creating"
    root.attrs.put(attrs)
    with pytest.raises(OutputError, match="incomplete.*pass overwrite=True"):
        open_output(path)
    assert _create(path, overwrite=True).finished_tiles() == set()


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="ngff"):
        _create(tmp_path / "a", ngff="0.3")
    with pytest.raises(ValueError, match="mpp"):
        _create(tmp_path / "b", mpp=0)
    with pytest.raises(ValueError, match="chunk"):
        _create(tmp_path / "c", chunk=(16, 0))
    with pytest.raises(ValueError, match="reserved"):
        _create(tmp_path / "d", provenance={"output": 1})
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_refinalize_with_fewer_levels_drops_stale_levels(tmp_path):
    path = tmp_path / "o.ome.zarr"
    store = _create(path)
    _write_all(store, *_data(4))
    store.finalize()
    store.finalize(levels=2, workers=1)
    view = read_output(path)
    assert view.levels == 2 and len(view.segmentation) == 2 and view.finalized
    open_output(path, fingerprint="fp-1")  # resuming makes the pyramid stale
    assert not read_output(path).finalized
    assert not (path / "2").exists() and not (path / "labels" / "tissue" / "3").exists()


def _worker_write(store, tiles, seed):
    sal, seg = _data(seed)
    for index, _row, _col, y, x in tiles:
        store.write_tile(y, x, sal[y : y + CHUNK, x : x + CHUNK], seg[y : y + CHUNK, x : x + CHUNK])
        store.record_tile({"index": index, "status": "done", "y": y, "x": x, "pid": os.getpid()})
    return os.getpid()


def test_several_processes_write_their_own_tiles(tmp_path):
    path = tmp_path / "o.ome.zarr"
    store = _create(path)
    tiles = list(_tiles())
    # One worker process (the store is pickled to it) and this process write alternate tiles.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        child = pool.submit(_worker_write, store, tiles[1::2], 5)
        pids = [_worker_write(store, tiles[0::2], 5), child.result(timeout=300)]
    assert len(set(pids)) == 2
    store.finalize()
    view = read_output(path)
    sal, seg = _data(5)
    np.testing.assert_array_equal(view.saliency[0].compute(), sal)
    np.testing.assert_array_equal(view.segmentation[0].compute(), seg)
    assert [t["index"] for t in view.tiles] == list(range(20))
    assert {t["pid"] for t in view.tiles} == set(pids)
    lines = (path / "wsi_hipe" / "tiles.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line) for line in lines)


def test_refinalize_after_resume_rebuilds_changed_levels(tmp_path):
    path = tmp_path / "o.ome.zarr"
    sal, seg = _data(6)
    store = _create(path)
    _write_all(store, sal, seg)
    store.finalize()
    resumed = open_output(path, fingerprint="fp-1")
    zeros = np.zeros((CHUNK, CHUNK))
    resumed.write_tile(0, 0, zeros, zeros.astype(np.uint8))  # tile 0 redone: now all zero
    resumed.finalize()
    sal[:CHUNK, :CHUNK] = 0
    seg[:CHUNK, :CHUNK] = 0
    view = read_output(path)
    np.testing.assert_allclose(view.saliency[1].compute(), downsample_mean(sal), rtol=1e-6)
    np.testing.assert_array_equal(view.segmentation[1].compute(), downsample_mode(seg))
    assert (view.saliency[1][: CHUNK // 2, : CHUNK // 2].compute() == 0).all()


def test_refused_resume_leaves_a_finished_output_finished(tmp_path):
    from wsi_hipe.errors import ResumeMismatchError
    from wsi_hipe.omezarr import create_output, read_output

    path = tmp_path / "done.ome.zarr"
    kw = dict(chunk=(32, 32), mpp=1.0, slide_mpp=0.5, fingerprint="same")
    store = create_output(path, shape=(64, 64), **kw)
    store.write_tile(0, 0, np.ones((32, 32), np.float32), np.ones((32, 32), np.uint8))
    store.finalize()
    assert read_output(path).finalized
    with pytest.raises(ResumeMismatchError, match="layout"):
        create_output(path, shape=(64, 96), resume=True, **kw)
    assert read_output(path).finalized
