"""The napari reader's cells layer: labels/cells with the cells table as features.

The viewer test needs a display: ``xvfb-run -a env QT_QPA_PLATFORM=xcb pytest tests/...``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import test_tables as tt

from wsi_hipe.napari._reader import napari_get_reader
from wsi_hipe.omezarr import read_output


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    out = tmp_path_factory.mktemp("napari_cells") / "o.ome.zarr"
    store = tt._create(out)
    tt._run(store)
    store.finalize()
    return out


def test_reader_adds_the_cells_with_their_table_as_features(output):
    layers = napari_get_reader(str(output))(str(output))
    names = [kwargs["name"] for _, kwargs, _ in layers]
    assert names[-1] == "cells" and "segmentation" in names
    data, kwargs, layer_type = layers[-1]
    view = read_output(output)
    assert layer_type == "labels" and len(data) == view.levels
    saliency = next(k for _, k, _ in layers if k["name"] == "saliency")
    assert kwargs["scale"] == saliency["scale"] and kwargs["translate"] == saliency["translate"]
    features = kwargs["features"]
    ids = set(np.unique(np.asarray(data[0]))) - {0}
    assert set(features["index"]) == ids == set(features["instance_id"])
    assert {"context_share", "score", "saliency_inside", "area_um2"} <= set(features.columns)
    assert kwargs["metadata"]["wsi_hipe"]["kind"] == "cells"


def test_output_without_cells_has_no_cells_layer(tmp_path):
    out = tmp_path / "plain.ome.zarr"
    store = tt._create(out, cells=None)
    store.finalize()
    names = [k["name"] for _, k, _ in napari_get_reader(str(out))(str(out))]
    assert "cells" not in names


@pytest.mark.napari
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (xvfb-run)")
def test_hovering_a_cell_shows_its_row(make_napari_viewer, output):
    pytest.importorskip("napari")
    viewer = make_napari_viewer()
    viewer.open(str(output), plugin="wsi-hipe")
    layer = viewer.layers["cells"]
    view = read_output(output)
    frame = view.cells.frame()
    # the disc (40, 64) of test_tables: its centre in world µm
    cy, cx = 40, 64
    world = view.transform(0).to_world(cy, cx)
    value = layer.get_value(world, world=True)
    value = int(value[1] if isinstance(value, tuple) else value)  # multiscale: (level, value)
    assert value in set(frame["instance_id"])
    status = layer.get_status(world, world=True)
    text = status["coordinates"] if isinstance(status, dict) else str(status)
    share = frame.loc[str(value), "context_share"]
    assert "context_share" in text and f"{share:.3g}"[:4] in text


@pytest.mark.napari
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (xvfb-run)")
def test_widget_shows_stored_numbers_and_colours_cells(make_napari_viewer, output):
    import matplotlib
    from napari.utils.colormaps import DirectLabelColormap

    from wsi_hipe.napari._widget import ExplainWidget

    viewer = make_napari_viewer()
    viewer.open(str(output), plugin="wsi-hipe")
    widget = ExplainWidget(viewer)
    view = read_output(output)
    frame = view.cells.frame()
    y_um, x_um = view.transform(0).to_world(40, 64)  # a disc of test_tables
    assert widget.explain_cell(y_um, x_um) is None  # stored: shown at once, nothing run
    row = widget.last_cell_row
    assert row is not None and str(int(row["instance_id"])) in frame.index
    assert f"cell {int(row['instance_id'])} (stored)" in widget._status.value
    assert f"context share {row['context_share']:.2f}" in widget._status.value

    layer = viewer.layers["cells"]
    widget.color_cells("context share")
    assert isinstance(layer.colormap, DirectLabelColormap)
    cell = int(row["instance_id"])
    expected = matplotlib.colormaps["viridis"](row["context_share"])
    np.testing.assert_allclose(layer.colormap.color_dict[cell], expected, atol=1e-6)
    widget.color_cells("label")
    assert not isinstance(layer.colormap, DirectLabelColormap)
    with pytest.raises(ValueError, match="colour cells by one of"):
        widget.color_cells("area")
