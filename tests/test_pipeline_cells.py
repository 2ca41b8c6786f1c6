"""explain_slide(..., cells=True): every cell one target of its tile's vector HiPe run."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
import torch
from _pipeline_support import SMALL
from torch import nn

from wsi_hipe import pipeline
from wsi_hipe.config import load_config
from wsi_hipe.errors import ConfigError, ResumeMismatchError
from wsi_hipe.omezarr import read_output
from wsi_hipe.slide import ArrayReader, open_slide
from wsi_hipe.tiling import pixel_transform

FAST = {**SMALL, "hipe.max_depth": 3, "hipe.start_grid": 4, "score.floor": 1.0}
W, H = 192, 128  # 3 x 2 tiles of 64 px


class NucleusNet(nn.Module):
    """A pixel-wise "segmenter": a pixel brighter than 0.5 is a lymphocyte (logit 20·(x − ½))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 20 * (x - 0.5), torch.full_like(x, -20.0)], 1)


@pytest.fixture(scope="module")
def slide():
    """A dense part of the synthetic slide (about 60 nuclei in 192 x 128 px)."""
    from wsi_hipe.synthetic import render_region

    region = render_region(752, 600, W, H, seed=0, slide_size=(2048, 1536))
    return open_slide(ArrayReader(np.clip(region.image, 0, 1), mpp=0.5))


@pytest.fixture(scope="module")
def model():
    from wsi_hipe.models import load_model

    return load_model(
        NucleusNet(), class_names=("background", "lymphocyte", "nucleus"), device="cpu"
    )


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=FAST)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, slide, model, cfg):
    """The same slide without and with cells."""
    folder = tmp_path_factory.mktemp("cells")
    plain = pipeline.explain_slide(slide, folder / "plain.ome.zarr", config=cfg, model=model)
    cells = pipeline.explain_slide(
        slide, folder / "cells.ome.zarr", config=cfg, model=model, cells=True
    )
    return plain, cells


def test_cells_output_labels_and_table(runs, cfg):
    plain, result = runs
    assert result.ok and plain.cells is None and result.cells > 5
    view = read_output(result.output)
    table = anndata.read_zarr(result.output / "tables" / "cells")
    obs = table.obs
    assert table.n_obs == result.cells and obs.index.is_unique
    assert obs.index.tolist() == obs["instance_id"].astype(str).tolist()
    # the ids in labels/cells are the table's, every cell is painted
    labels = np.asarray(view.cells.labels[0])
    assert set(np.unique(labels)) - {0} == set(obs["instance_id"])
    # a cell belongs to the tile whose core holds its centroid; ids carry the tile
    transform = pixel_transform(view.slide_mpp, mpp=view.mpp)
    cy, cx = transform.to_pixel(obs["centroid_y_um"].to_numpy(), obs["centroid_x_um"].to_numpy())
    tiles = {t["index"]: t for t in view.tiles}
    bits = view.cells.info["id_bits"]
    for tile, y, x, cell_id in zip(obs["tile"], cy, cx, obs["instance_id"], strict=True):
        t = tiles[int(tile)]
        assert t["y"] - 0.5 <= y < t["y"] + 64 - 0.5 and t["x"] - 0.5 <= x < t["x"] + 64 - 0.5
        assert int(cell_id) >> bits == int(tile)
    # explained cells have saliency; the summaries add up
    done = obs[obs["status"] == "done"]
    assert len(done) > 0 and (done["saliency_total"] > 0).all()
    np.testing.assert_allclose(
        done["saliency_inside"] + done["saliency_ring"] + done["saliency_beyond"],
        done["saliency_total"], rtol=1e-6,
    )  # fmt: skip
    assert ((obs["context_share"].dropna() >= 0) & (obs["context_share"].dropna() <= 1)).all()
    skipped = obs[obs["status"] == "skipped"]
    assert (skipped["score"] <= cfg.score.floor).all() and (skipped["saliency_total"] == 0).all()
    # the cells are the segmentation's class pixels, holes filled (small fragments aside)
    from scipy import ndimage

    seg = np.asarray(view.segmentation[0]) == cfg.score.class_index
    assert ((labels > 0) <= ndimage.binary_fill_holes(seg)).all()
    components, _ = ndimage.label(seg)
    sizes = np.bincount(components.ravel())
    missed = np.unique(components[seg & (labels == 0)])
    assert (sizes[missed] < 16).all()  # only specks below 4 µm² (16 px at 0.5 µm/px) are left
    assert table.uns["wsi_hipe"]["class"] == "lymphocyte"


def test_tile_maps_are_the_same_as_without_cells(runs):
    plain, result = runs
    a = np.asarray(read_output(plain.output).saliency[0])
    b = np.asarray(read_output(result.output).saliency[0])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(a.max()))
    assert result.forward_passes >= plain.forward_passes  # the union holds the tile's windows
    tiles = {t["index"]: t for t in read_output(result.output).tiles}
    assert sum(t.get("cells", 0) for t in tiles.values()) == result.cells


def test_resume_after_a_crash_keeps_the_table(tmp_path, runs, slide, model, cfg):
    _, full = runs
    out = tmp_path / "o.ome.zarr"
    pipeline.explain_slide(slide, out, config=cfg, model=model, cells=True)
    # as if killed after two tiles: later tiles' rows exist, their records do not
    table = out / "wsi_hipe" / "tiles.jsonl"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # and a truncated record
    again = pipeline.explain_slide(slide, out, config=cfg, model=model, cells=True)
    assert again.computed == len(lines) - 2 and again.cells == full.cells
    got = anndata.read_zarr(out / "tables" / "cells").obs
    want = anndata.read_zarr(full.output / "tables" / "cells").obs
    assert got.index.tolist() == want.index.tolist()  # the same ids: stable across resume
    np.testing.assert_allclose(got["context_share"], want["context_share"], rtol=1e-6)


def test_resume_without_cells_then_with_cells_is_refused(runs, slide, model, cfg):
    plain, _ = runs
    with pytest.raises(ResumeMismatchError, match="without cells.*overwrite=True"):
        pipeline.explain_slide(slide, plain.output, config=cfg, model=model, cells=True)


def test_no_cells_gives_no_rows(tmp_path, model, cfg):
    blank = open_slide(ArrayReader(np.zeros((H, W), np.float32) + 0.02, mpp=0.5))
    result = pipeline.explain_slide(blank, tmp_path / "b.ome.zarr", config=cfg, model=model,
                                    cells=True)  # fmt: skip
    assert result.cells == 0 and result.counts["skipped"] == result.tiles_total
    assert result.forward_passes == result.tiles_total  # no HiPe beyond the tile's own rule
    assert anndata.read_zarr(tmp_path / "b.ome.zarr" / "tables" / "cells").n_obs == 0


def test_the_cells_section_sets_the_split_and_is_stored(tmp_path, runs, slide, model, cfg):
    from wsi_hipe import cells
    from wsi_hipe.config import CellsConfig

    # The section's defaults are the library's.
    default = CellsConfig()
    assert (default.split_depth_um, default.min_area_um2, default.ring_um, default.margin_um) == (
        cells.SPLIT_DEPTH_UM, cells.MIN_AREA_UM2, cells.RING_UM, cells.MARGIN_UM,
    )  # fmt: skip
    _, result = runs
    # A smaller watershed depth splits at least as many cells; a larger one merges.
    counts = {}
    for depth in (0.0, 2.0):
        out = tmp_path / f"h{depth}.ome.zarr"
        run = pipeline.explain_slide(
            slide, out, config=cfg.with_overrides({"cells.split_depth_um": depth}), model=model,
            cells=True,
        )  # fmt: skip
        assert run.ok
        assert read_output(out).cells.info["split_depth_um"] == depth
        counts[depth] = run.cells
    assert counts[0.0] >= result.cells >= counts[2.0] and counts[0.0] > counts[2.0]


def test_a_class_the_model_lacks_is_refused_with_its_classes(tmp_path, slide, model):
    cfg = load_config(overrides={**FAST, "score.class": 5})
    with pytest.raises(ConfigError, match=r"background.*lymphocyte.*nucleus"):
        pipeline.explain_slide(slide, tmp_path / "x.ome.zarr", config=cfg, model=model, cells=True)
    assert not (tmp_path / "x.ome.zarr").exists()


def test_geojson_of_a_pipeline_run_matches_its_table(tmp_path, runs):
    from wsi_hipe.export import export_geojson

    _, result = runs
    n = export_geojson(result.output, tmp_path / "c.geojson")
    features = json.loads((tmp_path / "c.geojson").read_text())["features"]
    assert n == len(features) == result.cells
    view = read_output(result.output)
    s = view.mpp / view.slide_mpp
    obs = view.cells.frame()
    for f in features[:10]:
        m = f["properties"]["measurements"]
        ring = np.asarray(f["geometry"]["coordinates"][0])
        # the outline's area in level-0 px² is the cell's area
        x, y = ring[:-1, 0], ring[:-1, 1]
        area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
        assert area == pytest.approx(m["area_um2"] / view.slide_mpp**2)
        assert area == pytest.approx(
            obs.loc[str(m["instance_id"]), "area_um2"] / view.mpp**2 * s * s
        )


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A small synthetic slide, NucleusNet as TorchScript (+ sidecar) and a small config."""
    from wsi_hipe.synthetic import write_slide

    root = tmp_path_factory.mktemp("cli_cells")
    write_slide(root / "s.tiff", size=(192, 128), seed=0, tile_size=128, ground_truth=False)
    torch.jit.script(NucleusNet()).save(str(root / "nuc.pt"))
    sidecar = {"class_names": ["background", "lymphocyte", "nucleus"], "activation": "softmax",
               "in_channels": 1, "mpp": 0.5}  # fmt: skip
    (root / "nuc.json").write_text(json.dumps(sidecar))
    (root / "small.yaml").write_text(
        "tiling: {tile_size: 64, halo: 16, min_tissue: 0.0}\nscore: {floor: 1.0}\n"
        "hipe: {max_depth: 2, start_grid: 4, batch_size: 64}\n"
    )
    return root


def _cli(*args):
    from typer.testing import CliRunner

    from wsi_hipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_run_cells_and_export(cli_files, tmp_path):
    out = tmp_path / "o.ome.zarr"
    base = ["run", cli_files / "s.tiff", "-c", cli_files / "small.yaml", "--model",
            cli_files / "nuc.pt"]  # fmt: skip
    result = _cli(*base, "-o", out, "--cells")
    assert result.exit_code == 0, result.output
    n = read_output(out).provenance["output"]["cell_count"]
    assert f"{n} cells in" in result.output
    result = _cli("export", out, "--geojson", tmp_path / "c.geojson", "--csv", tmp_path / "c.csv")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "c.geojson").read_text())["features"]) == n
    assert len((tmp_path / "c.csv").read_text().splitlines()) == n + 1
    assert _cli("export", out).exit_code == 2


def test_cli_refuses_cells_on_an_output_without_them(cli_files, tmp_path):
    out = tmp_path / "o.ome.zarr"
    base = ["run", cli_files / "s.tiff", "-c", cli_files / "small.yaml", "--model",
            cli_files / "nuc.pt", "-o", out]  # fmt: skip
    assert _cli(*base).exit_code == 0
    result = _cli(*base, "--cells")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "without cells" in text and "--overwrite" in text and "overwrite=True" not in text
    result = _cli("export", out, "--csv", tmp_path / "c.csv")
    assert result.exit_code == 1 and "wsi-hipe run --cells" in " ".join(result.output.split())
    assert _cli(*base, "--cells", "--overwrite").exit_code == 0
