"""wsi_hipe.omezarr cells: labels/cells, per-tile rows streamed and resumed, tables/cells (AnnData)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import anndata
import numpy as np
import pytest

from wsi_hipe.cells import SaliencySummary, find_cells, in_core
from wsi_hipe.errors import OutputError, ResumeMismatchError
from wsi_hipe.omezarr import CELL_COLUMNS, CellRows, create_output, read_output
from wsi_hipe.tiling import pixel_transform

SHAPE, CHUNK, HALO = (64, 96), 32, 10
MPP, SLIDE_MPP = 0.5, 0.25
INFO = {"class": "lymphocyte", "ring_um": 3.0, "margin_um": 1.5, "units": "px²"}
# Discs (cy, cx, r) on the whole output: several cross chunk borders (x = 32, 64; y = 32).
DISCS = [(10, 10, 4), (16, 31, 5), (40, 64, 5), (50, 20, 3), (31, 80, 4), (45, 45, 4)]


def _truth() -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    labels = np.zeros(SHAPE, np.int32)
    for i, (cy, cx, r) in enumerate(DISCS, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def _tiles():
    return [
        (r * (SHAPE[1] // CHUNK) + c, r * CHUNK, c * CHUNK)
        for r in range(SHAPE[0] // CHUNK)
        for c in range(SHAPE[1] // CHUNK)
    ]


def _rows(tile: int, y: int, x: int) -> CellRows:
    """What the pipeline does for one tile: cells of the halo window, the core's kept."""
    truth = np.pad(_truth(), HALO)
    window = truth[y : y + CHUNK + 2 * HALO, x : x + CHUNK + 2 * HALO]
    cells = find_cells(window > 0, min_area=4)
    keep = in_core(cells, (HALO, HALO, CHUNK, CHUNK))
    cells = cells.select(keep)
    n = cells.n
    # known sums: inside = area, ring = 2, beyond = 1 per cell
    summary = SaliencySummary(
        total=cells.area + 3.0, inside=cells.area.astype(float), ring=np.full(n, 2.0),
        beyond=np.ones(n),
    )  # fmt: skip
    return CellRows.from_cells(
        cells, tile=tile, origin=(y, x), ids=tile * 256 + np.arange(1, n + 1),
        offset=(y - HALO, x - HALO), score=cells.area * 0.9, summary=summary, status="done",
    )  # fmt: skip


def _create(path, **kw):
    kw.setdefault("cells", INFO)
    return create_output(
        path, shape=SHAPE, chunk=CHUNK, mpp=MPP, slide_mpp=SLIDE_MPP, fingerprint="fp", **kw
    )


def _run(store, tiles=None):
    for tile, y, x in tiles or _tiles():
        store.write_tile(
            y, x, np.zeros((CHUNK, CHUNK), np.float32), np.zeros((CHUNK, CHUNK), np.uint8)
        )
        store.write_cells(_rows(tile, y, x))
        store.record_tile({"index": tile, "status": "done", "y": y, "x": x})


def test_cells_labels_and_table_known_answers(tmp_path):
    out = tmp_path / "o.ome.zarr"
    store = _create(out)
    _run(store)
    store.finalize()
    view = read_output(out)
    assert view.cells is not None and view.cells.finalized
    labels = np.asarray(view.cells.labels[0])
    truth = _truth()
    # every disc is whole after finalize, even where it crosses a chunk border, with one id
    assert np.array_equal(labels > 0, truth > 0)
    ids = {}
    for i in range(1, len(DISCS) + 1):
        values = np.unique(labels[truth == i])
        assert values.size == 1, (i, values)
        ids[i] = int(values[0])
    assert len(set(ids.values())) == len(DISCS)
    assert len(view.cells.labels) == len(view.saliency) and view.cells.labels[1].dtype == np.uint32

    table = anndata.read_zarr(out / "tables" / "cells")
    assert table.n_obs == len(DISCS)
    assert list(table.obs.columns) == list(CELL_COLUMNS)
    assert table.obs.index.tolist() == [str(v) for v in sorted(ids.values())]
    assert table.uns["spatialdata_attrs"] == {
        "region": "cells", "region_key": "region", "instance_key": "instance_id",
    }  # fmt: skip
    assert table.uns["wsi_hipe"]["class"] == "lymphocyte"
    transform = pixel_transform(SLIDE_MPP, mpp=MPP)
    for i, (cy, cx, _r) in enumerate(DISCS, start=1):
        row = table.obs.loc[str(ids[i])]
        area = int((truth == i).sum())
        assert row["area_um2"] == pytest.approx(area * MPP**2)
        ey, ex = transform.to_world(cy, cx)  # discs are symmetric: centroid = centre
        assert (row["centroid_y_um"], row["centroid_x_um"]) == pytest.approx((ey, ex))
        assert row["saliency_inside"] == area and row["saliency_ring"] == 2.0
        assert row["context_share"] == pytest.approx(3.0 / (area + 3.0))
        assert row["score"] == pytest.approx(0.9 * area)
        assert row["instance_id"] == ids[i] and row["region"] == "cells"
        assert row["tile"] == ids[i] // 256 and row["status"] == "done"
    spatial = table.obsm["spatial"]
    np.testing.assert_allclose(spatial, table.obs[["centroid_x_um", "centroid_y_um"]].to_numpy())
    # the same frame from the view, and the NGFF labels list
    assert view.cells.frame().equals(table.obs)
    meta = read_output(out).provenance["output"]
    assert meta["cell_count"] == len(DISCS)
    import zarr

    assert "cells" in zarr.open_group(str(out / "labels"), mode="r").attrs["labels"]


def test_table_before_finalize_comes_from_the_rows(tmp_path):
    store = _create(tmp_path / "o.ome.zarr")
    _run(store, _tiles()[:3])
    cells = read_output(tmp_path / "o.ome.zarr").cells
    frame = cells.frame()
    owners = {(cy // CHUNK) * 3 + cx // CHUNK for cy, cx, _r in DISCS}
    assert not cells.finalized and set(frame["tile"]) == owners & {0, 1, 2} == {0, 2}
    assert cells.table().n_obs == len(frame) > 0


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_tables as t
from wsi_hipe.omezarr import open_output
store = open_output({out!r})
tiles = t._tiles()
t._run(store, tiles[:3])
tile, y, x = tiles[3]
store.write_tile(y, x, t.np.zeros((t.CHUNK, t.CHUNK), 'f4'), t.np.zeros((t.CHUNK, t.CHUNK), 'u1'))
store.write_cells(t._rows(tile, y, x))
os.kill(os.getpid(), signal.SIGKILL)  # before the record of tile 3
"""


def test_resume_after_kill_gives_no_duplicate_or_lost_rows(tmp_path):
    reference = tmp_path / "ref.ome.zarr"
    store = _create(reference)
    _run(store)
    store.finalize()
    expected = read_output(reference).cells.frame()

    out = tmp_path / "o.ome.zarr"
    _create(out).close()
    script = _KILL_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    # a rows file cut short by the crash
    (out / "wsi_hipe" / "cells" / ".4.npz.tmp.999").write_bytes(b"PK\x03")
    assert (out / "wsi_hipe" / "cells" / "3.npz").is_file()  # rows written, record not
    store = _create(out, resume=True)
    assert not (out / "wsi_hipe" / "cells" / ".4.npz.tmp.999").exists()
    finished = store.finished_tiles()
    assert finished == {0, 1, 2}
    assert sorted(read_output(out).cells.frame()["tile"].unique()) == sorted(
        t for t in expected["tile"].unique() if t in finished
    )
    _run(store, [t for t in _tiles() if t[0] not in finished])
    store.finalize()
    got = anndata.read_zarr(out / "tables" / "cells").obs
    assert got.index.is_unique
    assert got.equals(expected)
    np.testing.assert_array_equal(
        np.asarray(read_output(out).cells.labels[0]),
        np.asarray(read_output(reference).cells.labels[0]),
    )


def test_rows_of_unfinished_tiles_are_not_in_the_table(tmp_path):
    store = _create(tmp_path / "o.ome.zarr")
    tiles = _tiles()
    _run(store, tiles[:-1])
    tile, y, x = tiles[-1]
    store.write_cells(_rows(tile, y, x))
    store.record_tile({"index": tile, "status": "failed", "error": "read error"})
    store.finalize()
    view = read_output(tmp_path / "o.ome.zarr")
    frame = view.cells.frame()
    assert tile not in set(frame["tile"]) and frame.index.is_unique
    labels = np.asarray(view.cells.labels[0])
    ids = set(np.unique(labels)) - {0}
    assert ids == set(frame["instance_id"])  # the failed tile's own cells are gone from labels


def test_no_cells_gives_an_empty_table(tmp_path):
    store = _create(tmp_path / "o.ome.zarr")
    empty = _rows(0, 0, 0)
    empty = CellRows(**{**empty.__dict__, **{k: getattr(empty, k)[:0] for k in (
        "ids", "centroid", "area", "probability", "score", "total", "inside", "ring", "beyond",
        "status", "bbox")}, "masks": ()})  # fmt: skip
    store.write_cells(empty)
    store.record_tile({"index": 0, "status": "skipped"})
    store.finalize()
    table = anndata.read_zarr(tmp_path / "o.ome.zarr" / "tables" / "cells")
    assert table.n_obs == 0 and list(table.obs.columns) == list(CELL_COLUMNS)
    assert not np.asarray(read_output(tmp_path / "o.ome.zarr").cells.labels[0]).any()


def test_ngff_05_writes_a_zarr_v3_table(tmp_path):
    out = tmp_path / "o.ome.zarr"
    store = _create(out, ngff="0.5")
    _run(store)
    store.finalize()
    assert (out / "tables" / "cells" / "zarr.json").is_file()
    assert anndata.read_zarr(out / "tables" / "cells").n_obs == len(DISCS)


def test_resume_must_keep_the_cells(tmp_path):
    plain = tmp_path / "plain.ome.zarr"
    _create(plain, cells=None).close()
    with pytest.raises(ResumeMismatchError, match="without cells.*overwrite=True"):
        _create(plain, resume=True)
    with_cells = tmp_path / "cells.ome.zarr"
    _create(with_cells).close()
    with pytest.raises(ResumeMismatchError, match="with cells.*overwrite=True"):
        _create(with_cells, resume=True, cells=None)
    with pytest.raises(ResumeMismatchError, match="other cell settings \\(ring_um\\)"):
        _create(with_cells, resume=True, cells={**INFO, "ring_um": 5.0})
    assert _create(with_cells, resume=True).has_cells
    assert read_output(plain).cells is None


def test_write_cells_checks_its_input(tmp_path):
    plain = _create(tmp_path / "plain.ome.zarr", cells=None)
    with pytest.raises(OutputError, match="without cells"):
        plain.write_cells(_rows(0, 0, 0))
    store = _create(tmp_path / "o.ome.zarr")
    rows = _rows(0, 0, 0)
    assert rows.n == 2
    with pytest.raises(ValueError, match="not unique"):
        store.write_cells(CellRows(**{**rows.__dict__, "ids": np.ones(rows.n, np.int64)}))
    with pytest.raises(ValueError, match="status"):
        store.write_cells(CellRows(**{**rows.__dict__, "status": np.full(rows.n, "maybe")}))
    with pytest.raises(ValueError, match="aligned"):
        store.write_cells(CellRows(**{**rows.__dict__, "origin": (0, 5)}))
    with pytest.raises(TypeError):
        store.write_cells({"ids": [1]})
