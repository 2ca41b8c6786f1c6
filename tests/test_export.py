"""wsi_hipe.export: QuPath's GeoJSON conventions on a small known output, and the CSV table."""

from __future__ import annotations

import json
import uuid

import anndata
import numpy as np
import pandas as pd
import pytest

from wsi_hipe.cells import Cells, SaliencySummary
from wsi_hipe.errors import OutputError
from wsi_hipe.export import MEASUREMENTS, export_csv, export_geojson
from wsi_hipe.omezarr import CELL_COLUMNS, CellRows, create_output

MPP = 0.5


def _output(path, *, slide_mpp=0.25, with_cells=True, square=True):
    """One 32x32 tile: a 4x4 square cell (rows 10..13, cols 20..23) and an L-shaped cell."""
    store = create_output(
        path, shape=(32, 32), chunk=32, mpp=MPP, slide_mpp=slide_mpp, fingerprint="fp",
        cells={"class": "lymphocyte", "class_index": 1} if with_cells else None,
    )  # fmt: skip
    store.write_tile(0, 0, np.zeros((32, 32), np.float32), np.zeros((32, 32), np.uint8))
    if with_cells:
        labels = np.zeros((32, 32), np.int32)
        if square:
            labels[10:14, 20:24] = 1
            labels[2:5, 2:4] = 2
            labels[4, 4:6] = 2  # an L
        cells = Cells.from_labels(labels, np.full(labels.shape, 0.8))
        n = cells.n
        summary = SaliencySummary(
            total=np.array([10.0, 0.0])[:n], inside=np.array([4.0, 0.0])[:n],
            ring=np.array([5.0, 0.0])[:n], beyond=np.array([1.0, 0.0])[:n],
        )  # fmt: skip
        rows = CellRows.from_cells(
            cells, tile=0, origin=(0, 0), ids=np.arange(1, n + 1) + 7, offset=(0, 0),
            score=np.full(n, 3.5), summary=summary, status=["done", "skipped"][:n],
        )  # fmt: skip
        store.write_cells(rows)
    store.record_tile({"index": 0, "status": "done"})
    store.finalize()
    return path


def test_geojson_follows_qupath_conventions(tmp_path):
    out = _output(tmp_path / "o.ome.zarr")
    n = export_geojson(out, tmp_path / "cells.geojson")
    doc = json.loads((tmp_path / "cells.geojson").read_text())  # strict JSON: no NaN
    assert n == 2 and doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    square, ell = doc["features"]
    assert square["type"] == "Feature" and uuid.UUID(square["id"]).version == 5
    # level-0 px (slide_mpp 0.25 -> 2 level-0 px per output px), origin at the top-left corner,
    # exterior counter-clockwise in (x, y) and closed
    assert square["geometry"] == {
        "type": "Polygon",
        "coordinates": [[[40.0, 20.0], [48.0, 20.0], [48.0, 28.0], [40.0, 28.0], [40.0, 20.0]]],
    }
    assert ell["geometry"]["coordinates"] == [
        [[4.0, 4.0], [8.0, 4.0], [8.0, 8.0], [12.0, 8.0], [12.0, 10.0], [4.0, 10.0], [4.0, 4.0]]
    ]
    props = square["properties"]
    assert props["objectType"] == "detection" and props["name"] == "cell 8"
    assert props["classification"] == {"name": "lymphocyte", "color": [255, 64, 160]}
    m = props["measurements"]
    assert set(m) == set(MEASUREMENTS) and all(isinstance(v, (int, float)) for v in m.values())
    assert (
        m["instance_id"] == 8
        and m["area_um2"] == 16 * MPP**2
        and m["probability"] == pytest.approx(0.8)
    )
    assert m["context_share"] == pytest.approx(0.6) and m["saliency_ring"] == 5.0
    # the centroid in µm lands on the polygon's centre in QuPath's level-0 px
    assert m["centroid_x_um"] / 0.25 + 0.5 == pytest.approx(44.0)
    assert m["centroid_y_um"] / 0.25 + 0.5 == pytest.approx(24.0)
    # no saliency: no context share (QuPath reads a missing measurement as NaN)
    assert "context_share" not in ell["properties"]["measurements"]
    # stable IDs
    export_geojson(out, tmp_path / "again.geojson")
    again = json.loads((tmp_path / "again.geojson").read_text())
    assert [f["id"] for f in again["features"]] == [f["id"] for f in doc["features"]]


def test_geojson_coordinates_at_a_non_integer_scale(tmp_path):
    slide_mpp = 0.2527
    out = _output(tmp_path / "o.ome.zarr", slide_mpp=slide_mpp)
    export_geojson(out, tmp_path / "cells.geojson")
    ring = json.loads((tmp_path / "cells.geojson").read_text())["features"][0]["geometry"]
    s = MPP / slide_mpp
    expected = [[20 * s, 10 * s], [24 * s, 10 * s], [24 * s, 14 * s], [20 * s, 14 * s]]
    np.testing.assert_allclose(ring["coordinates"][0][:4], expected, atol=1e-4)


def test_csv_is_the_table(tmp_path):
    out = _output(tmp_path / "o.ome.zarr")
    assert export_csv(out, tmp_path / "cells.csv") == 2
    csv = pd.read_csv(tmp_path / "cells.csv")
    assert list(csv.columns) == list(CELL_COLUMNS)
    obs = anndata.read_zarr(out / "tables" / "cells").obs
    for column in CELL_COLUMNS:
        if column in ("region", "status"):
            assert csv[column].tolist() == obs[column].astype(str).tolist()
        else:
            np.testing.assert_allclose(csv[column], obs[column].astype(float), rtol=1e-8)
    assert np.isnan(csv["context_share"][1]) and csv["status"].tolist() == ["done", "skipped"]


def test_no_cells_and_outputs_without_cells(tmp_path):
    empty = _output(tmp_path / "empty.ome.zarr", square=False)
    assert export_geojson(empty, tmp_path / "e.geojson") == 0
    assert json.loads((tmp_path / "e.geojson").read_text()) == {
        "type": "FeatureCollection", "features": [],
    }  # fmt: skip
    assert export_csv(empty, tmp_path / "e.csv") == 0
    assert (tmp_path / "e.csv").read_text().strip() == ",".join(CELL_COLUMNS)
    plain = _output(tmp_path / "plain.ome.zarr", with_cells=False)
    with pytest.raises(OutputError, match="has no cells"):
        export_geojson(plain, tmp_path / "p.geojson")
    with pytest.raises(OutputError, match="has no cells"):
        export_csv(plain, tmp_path / "p.csv")
    assert not (tmp_path / "p.geojson").exists()
