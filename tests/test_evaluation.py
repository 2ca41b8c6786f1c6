"""Tests of the evaluation runner (wsi_hipe.evaluation) and pipelines/evaluate.py."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_hipe import evaluation
from wsi_hipe.errors import ConfigError
from wsi_hipe.evaluation import (
    DEFAULT_METHODS,
    RECORD_COLUMNS,
    SUMMARY_COLUMNS,
    EvaluationConfig,
    MethodSpec,
    Sample,
    centre_cell,
    evaluate_samples,
    load_evaluation_config,
)
from wsi_hipe.models import architecture_dict, build_unet, save_checkpoint

pytest.importorskip("captum")

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def blob_sample(seed: int) -> Sample:
    """Bright 3×3 'cells' on a dark background; every cell is ground truth."""
    rng = np.random.default_rng(seed)
    img = np.zeros((SIZE, SIZE), np.float32)
    labels = np.zeros((SIZE, SIZE), np.int32)
    for k, (y, x) in enumerate(rng.integers(3, SIZE - 3, size=(4, 2)), start=1):
        img[y - 1 : y + 2, x - 1 : x + 2] = 1.0
        labels[y - 1 : y + 2, x - 1 : x + 2] = k
    return Sample(name=f"blobs {seed}", x=torch.from_numpy(img)[None], ground_truth=labels)


def detector(batch: torch.Tensor) -> torch.Tensor:
    """Counts bright pixels (a differentiable, monotone 'cell area')."""
    return torch.relu(batch - 0.3).sum(dim=(1, 2, 3))


METHODS = (
    MethodSpec("occlusion 4/2", "occlusion", {"window": 4, "stride": 2}),
    MethodSpec("rise 100", "rise", {"n_masks": 100, "grid": 4}),
    MethodSpec("gradient", "gradient", {}),
)


def test_evaluate_samples_table_and_known_properties(tmp_path):
    samples = [blob_sample(0), blob_sample(1)]
    seen = []
    res = evaluate_samples(
        detector,
        samples,
        methods=METHODS,
        step_fraction=0.05,
        pointing_tolerance=0.0,
        batch_size=16,
        keep_maps=True,
        progress=lambda name, i, n: seen.append((name, i, n)),
    )
    assert len(res.records) == 6 and [r["method"] for r in res.summary] == [m.name for m in METHODS]
    assert seen[0] == ("occlusion 4/2", 0, 2) and len(seen) == 6
    by = {r["method"]: r for r in res.summary}
    # Exact pass counts: occlusion 1 + 15², RISE N, gradient 1.
    assert by["occlusion 4/2"]["forward_passes"] == 1 + 15 * 15
    assert by["rise 100"]["forward_passes"] == 100
    assert by["gradient"]["forward_passes"] == 1
    # The gradient of the detector is 1 exactly on the cells: a perfect map.
    assert by["gradient"]["pointing_hit_rate"] == 1.0
    assert by["gradient"]["relevance_mass"] == pytest.approx(1.0)
    assert by["occlusion 4/2"]["pointing_hit_rate"] == 1.0
    for row in res.summary:
        assert 0.0 <= row["deletion_auc"] <= 1.0 + 1e-9
        assert 0.0 <= row["insertion_auc"] <= 1.0 + 1e-9
    # A perfect map deletes all the signal within the first steps; RISE is blurrier.
    assert by["gradient"]["deletion_auc"] < by["rise 100"]["deletion_auc"]
    fr, mean_ins = res.mean_curve("gradient", "insertion")
    assert fr[0] == 0.0 and fr[-1] == 1.0 and mean_ins[-1] == pytest.approx(1.0)
    assert len(res.maps["rise 100"]) == 2 and res.maps["rise 100"][0].shape == (SIZE, SIZE)

    md = res.to_markdown()
    assert md.splitlines()[0].startswith("| method | forward passes")
    assert "| gradient | 1 |" in md
    rows = list(csv.DictReader(io.StringIO(res.to_csv())))
    assert list(rows[0]) == list(SUMMARY_COLUMNS) and len(rows) == 3
    paths = res.save(tmp_path / "out")
    per_sample = list(csv.DictReader(paths["per_sample"].open()))
    assert list(per_sample[0]) == list(RECORD_COLUMNS) and len(per_sample) == 6
    assert paths["markdown"].read_text() == md


def test_evaluate_samples_without_ground_truth_reports_nan():
    empty = Sample("no gt", blob_sample(0).x, np.zeros((SIZE, SIZE), np.int32))
    res = evaluate_samples(detector, [empty], methods=METHODS[2:], step_fraction=0.1)
    assert res.records[0]["pointing_hit"] is None
    assert res.settings["deletion_substrate"] == "fade"  # the default, by its one name
    assert math.isnan(res.summary[0]["pointing_hit_rate"])
    assert "n/a" in res.to_markdown()


def test_evaluate_samples_input_errors():
    with pytest.raises(ValueError, match="samples is empty"):
        evaluate_samples(detector, [], methods=METHODS)
    with pytest.raises(ValueError, match="unique"):
        evaluate_samples(detector, [blob_sample(0)], methods=[METHODS[2], METHODS[2]])
    with pytest.raises(ValueError, match="not one of"):
        MethodSpec("x", "lime")


def test_per_sample_forward_and_centre_cell():
    sample = blob_sample(0)
    labels = np.zeros((9, 9), np.int32)
    labels[0:2, 0:2] = 5
    labels[4:6, 3:6] = 7  # centroid (4.5, 4) is nearest the centre (4, 4)
    labels[8, 8] = 2
    assert centre_cell(labels) == 7
    with pytest.raises(ValueError, match="no instance"):
        centre_cell(np.zeros((3, 3), np.int32))
    label = centre_cell(sample.ground_truth)
    gt = (sample.ground_truth == label).astype(np.int32)
    weight = torch.from_numpy(gt.astype(np.float32))

    def one_cell(batch):
        return (torch.relu(batch - 0.3)[:, 0] * weight).sum(dim=(1, 2))

    cell = Sample("one cell", sample.x, gt, forward=one_cell)
    res = evaluate_samples(None, [cell], methods=METHODS[2:], step_fraction=0.1)
    # The gradient of the one-cell score is exactly that cell: a perfect map.
    assert res.summary[0]["relevance_mass"] == pytest.approx(1.0)
    assert res.records[0]["clean_score"] == pytest.approx(9 * 0.7)
    with pytest.raises(ValueError, match="forward is None"):
        evaluate_samples(None, [sample], methods=METHODS[2:])


def test_config_file_loads_and_errors_name_the_key(tmp_path):
    cfg = load_evaluation_config(REPO / "configs" / "evaluate.yaml")
    assert cfg == EvaluationConfig()  # the file spells out the defaults
    assert [m.name for m in cfg.method_specs()] == [m.name for m in DEFAULT_METHODS]
    small = load_evaluation_config(overrides={"tiles.n": 1, "metrics.step_fraction": 0.1})
    assert small.tiles.n == 1 and small.metrics.step_fraction == 0.1
    with pytest.raises(ConfigError, match="tiles.nn"):
        load_evaluation_config(overrides={"tiles.nn": 1})
    with pytest.raises(ConfigError, match="metrics.deletion_substrate"):
        load_evaluation_config(overrides={"metrics.deletion_substrate": "pink"})
    old = load_evaluation_config(overrides={"metrics.deletion_substrate": "zero"})
    assert old.metrics.deletion_substrate == "fade"  # the old spelling, mapped to its one name
    with pytest.raises(ConfigError, match="not found"):
        load_evaluation_config(tmp_path / "missing.yaml")


def test_run_evaluation_end_to_end_tiny(tmp_path):
    """The configured path: U-Net → lymphocyte area → synthetic tiles → table (tiny)."""
    torch.manual_seed(0)
    net = build_unet(encoder_depth=3, decoder_channels=(16, 8, 8)).eval()
    res = evaluation.run_evaluation(
        model=net,
        overrides={
            "device": "cpu",
            "tiles.n": 1,
            "tiles.size": 32,
            "metrics.step_fraction": 0.1,
            "methods": [
                {"name": "hipe", "method": "hipe"},
                {"name": "rise 20", "method": "rise", "options": {"n_masks": 20, "grid": 4}},
            ],
        },
    )
    assert [r["method"] for r in res.summary] == ["hipe", "rise 20"]
    assert res.summary[1]["forward_passes"] == 20
    assert res.settings["config"]["tiles"]["size"] == 32
    assert res.records[0]["clean_score"] > 0


def test_pipeline_script_writes_tables(tmp_path, capsys):
    """pipelines/evaluate.py with a tiny checkpoint: markdown + CSV + settings written."""
    arch = dict(
        encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 8), in_channels=1, classes=3
    )
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        build_unet(**arch).eval(),
        tmp_path / "tiny.safetensors",
        meta={"architecture": architecture_dict(**arch)},
    )
    spec = importlib.util.spec_from_file_location(
        "evaluate_script", REPO / "pipelines" / "evaluate.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    rc = script.main(
        [
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--set",
            "device=cpu",
            "--set",
            "tiles.size=32",
            "--set",
            "tiles.n=1",
            "--set",
            "metrics.step_fraction=0.25",
            "--set",
            "methods=[{name: rise 8, method: rise, options: {n_masks: 8, grid: 4}}]",
        ]
    )
    assert rc == 0
    assert "| rise 8 | 8 |" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "summary.md",
        "summary.csv",
        "per_sample.csv",
        "settings.json",
    }
    assert script.main(["--set", "tiles.nope=1", "--out", str(out)]) == 2


def test_run_evaluation_cell_target_tiny():
    torch.manual_seed(0)
    net = build_unet(encoder_depth=3, decoder_channels=(16, 8, 8)).eval()
    res = evaluation.run_evaluation(
        model=net,
        overrides={
            "device": "cpu",
            "target": "cell",
            "tiles.n": 1,
            "tiles.size": 32,
            "metrics.step_fraction": 0.25,
            "methods": [{"name": "rise 8", "method": "rise", "options": {"n_masks": 8}}],
        },
    )
    record = res.records[0]
    assert " cell " in record["sample"] and record["forward_passes"] == 8
    assert record["clean_score"] > 0


# --- slide-level evaluation -------------------------------------------------------------------

SLIDE_PIPELINE = {
    "tiling.tile_size": 64,
    "tiling.halo": 16,
    "score.floor": 1.0,
    "hipe.batch_size": 16,
}


def slide_config(**extra):
    """A slide evaluation small enough for a test: one 256 px slide, 96 px tiles."""
    overrides = {
        "slides.size": 256,
        "slides.seeds": [0],
        "slides.densities": ["clustered"],
        "grid.substrates": ["fade", "background"],
        "grid.depths": [{"start_grid": 4, "max_depth": 2}],
        "faithfulness.tiles_per_slide": 2,
        "faithfulness.step_fraction": 0.25,
        "faithfulness.substrates": ["fade", "blur"],
        "sanity.seeds": [0],
        "sanity.substrates": ["fade"],
        "sanity.depth": {"start_grid": 4, "max_depth": 2},
        **extra,
    }
    config = evaluation.load_slide_evaluation_config(None, overrides=overrides)
    return config.model_copy(update={"pipeline": dict(SLIDE_PIPELINE)})


@pytest.fixture(scope="module")
def tiny_segmenter():
    from _pipeline_support import tiny_model

    return tiny_model()


@pytest.mark.parametrize("substrate", ["fade", "background"])
def test_slide_map_equals_the_pipelines_output(tmp_path, tiny_segmenter, substrate):
    """The evaluation tiles, skips and explains exactly as explain_slide does."""
    from wsi_hipe.omezarr import read_output
    from wsi_hipe.pipeline import explain_slide

    config = slide_config(**{"grid.substrates": [substrate], "faithfulness.tiles_per_slide": 0})
    config = config.model_copy(update={"sanity": config.sanity.model_copy(update={"seeds": []})})
    res = evaluation.run_slide_evaluation(
        config, out=tmp_path / "eval", model=tiny_segmenter, keep_maps=True
    )
    (key,) = [k for k in res.maps]
    ours = res.maps[key]
    slide = Path(res.settings["slides"][0])
    pipeline = {
        **SLIDE_PIPELINE,
        "hipe.substrate": substrate,
        "hipe.threshold": "mid-range",
        "hipe.start_grid": 4,
        "hipe.max_depth": 2,
    }
    run = explain_slide(slide, tmp_path / "out.ome.zarr", config=pipeline, model=tiny_segmenter)
    view = read_output(run.output)
    theirs = np.asarray(view.saliency[0])
    assert ours.shape == theirs.shape
    assert theirs.max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * float(theirs.max()))
    (row,) = res.slides
    records = [t for t in view.tiles if t["status"] in ("done", "skipped")]
    assert row["tissue_tiles"] == len(records)
    assert row["explained_tiles"] == sum(t["status"] == "done" for t in records)
    assert row["passes_per_tile"] == pytest.approx(np.mean([t["passes"] for t in records]))


def test_slide_evaluation_tables_resume_and_sanity(tmp_path, tiny_segmenter):
    config = slide_config()
    out = tmp_path / "eval"
    res = evaluation.run_slide_evaluation(config, out=out, model=tiny_segmenter)
    assert [r["setting"] for r in res.slides] == [
        "fade · mid-range · 4×2",
        "background · mid-range · 4×2",
    ]
    for r in res.slides:
        assert 0.0 <= r["auroc"] <= 1.0
        assert 0.0 <= r["relevance_mass"] <= 1.0
        assert r["finest_cell_px"] == 12.0  # 96 px tiles: 4 cells of 24 px, then 12 px
        assert r["passes_per_tile"] >= 1
        assert r["densest_rank"] >= 1
    # chance = the class share of the (ground-truth) tissue
    import tifffile

    from wsi_hipe.synthetic import ground_truth_paths

    gt = ground_truth_paths(res.settings["slides"][0])
    lymph = tifffile.imread(gt["lymphocytes"]) > 0
    tissue = tifffile.imread(gt["tissue"]) > 0
    assert res.slides[0]["mass_chance"] == pytest.approx(lymph[tissue].mean())
    # faithfulness: the random control and both settings, every metric substrate, 2 tiles
    subs = {(r["setting"], r["metric_substrate"]) for r in res.faithfulness}
    assert {s for s, _ in subs} == {"random", *[r["setting"] for r in res.slides]}
    assert {m for _, m in subs} == {"fade", "blur"}
    assert len(res.faithfulness) == 3 * 2 * 2
    # sanity: every stage of the tiny model (its one conv) and the random model
    assert [r["stage"] for r in res.sanity] == ["network.conv", "random model"]
    for r in res.sanity:
        assert -1.0 <= r["spearman"] <= 1.0
    text = res.to_markdown()
    assert "Faithfulness on tiles" in text and "random model" in text
    for name in ("slide_summary.md", "slides.csv", "faithfulness.csv", "sanity.csv"):
        assert (out / name).is_file()
    # A rerun resumes: nothing is recomputed, the tables are the same.
    lines = (out / "records.jsonl").read_text().count("\n")
    again = evaluation.run_slide_evaluation(config, out=out, model=tiny_segmenter)
    assert (out / "records.jsonl").read_text().count("\n") == lines
    assert again.slides == res.slides and again.sanity == res.sanity
    # The recorded units load back as the same tables (runs split per seed are merged so).
    loaded = evaluation.load_slide_results(out)
    assert loaded.slides == res.slides and loaded.sanity == res.sanity
    assert sorted(map(str, loaded.faithfulness)) == sorted(map(str, res.faithfulness))
    # Another metric setting may not be mixed into the same folder.
    other = slide_config(**{"faithfulness.step_fraction": 0.5})
    with pytest.raises(ConfigError, match="another"):
        evaluation.run_slide_evaluation(other, out=out, model=tiny_segmenter)


def test_slide_evaluation_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="grid.substrates"):
        evaluation.load_slide_evaluation_config(None, overrides={"grid.substrates": ["zeros"]})
    with pytest.raises(ConfigError, match="slides.densities"):
        evaluation.load_slide_evaluation_config(None, overrides={"slides.densities": ["packed"]})
    with pytest.raises(ConfigError, match="not found"):
        evaluation.load_slide_evaluation_config(tmp_path / "missing.yaml")
    config = evaluation.load_slide_evaluation_config(
        REPO / "configs" / "evaluate_slide.yaml", overrides={"pipeline.tiling.halo": 32}
    )
    assert config.pipeline["tiling.halo"] == 32 and config.pipeline["tiling.tile_size"] == 256
    # "zero" is still read as "fade"
    old = evaluation.load_slide_evaluation_config(None, overrides={"grid.substrates": ["zero"]})
    assert old.grid.substrates == ["fade"]


def test_model_stages_of_the_bundled_unet():
    from wsi_hipe.models import load_model

    stages = evaluation.model_stages(load_model("bundled", device="cpu"))
    assert stages[:2] == ["network.segmentation_head", "network.decoder"]
    assert stages[2:] and all(s.startswith("network.encoder.") for s in stages[2:])
    assert stages[-1] == "network.encoder.conv1"  # the stem last


def test_setting_labels_and_cell_sizes():
    s = evaluation.Setting("fade", "mid-range", 4, 2)
    assert s.key == "fade · mid-range · 4×2"
    assert s.finest_cell_px(288) == 36.0
    assert evaluation.Setting("mean", "mean", 9, 3).finest_cell_px(288) == 8.0
    assert evaluation.Setting("mean", "mid-range", None, None).finest_cell_px(288) == 4.5
