"""The ``wsi-hipe`` command line: run (+ resume after kill -9), batch, synth, demo, errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _pipeline_support import save_tiny_model
from typer.testing import CliRunner

from wsi_hipe import pipeline
from wsi_hipe.cli import app
from wsi_hipe.errors import OutputError
from wsi_hipe.omezarr import read_output
from wsi_hipe.pipeline._batch import _output_names

#: Small, fast settings for CLI runs (64 px cores, 2 HiPe depths from a 4x4 grid).
SMALL_YAML = """\
tiling: {tile_size: 64, halo: 16, min_tissue: 0.0}
score: {floor: 0.0}
hipe: {max_depth: 2, start_grid: 4, batch_size: 64}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two small synthetic slides, a TorchScript model and a config file."""
    from wsi_hipe.synthetic import write_slide

    root = tmp_path_factory.mktemp("cli")
    write_slide(root / "a1.tiff", size=(192, 128), seed=3, tile_size=128, ground_truth=False)
    write_slide(root / "c1.tiff", size=(128, 128), seed=4, tile_size=128, ground_truth=False)
    save_tiny_model(root / "tiny.pt")
    (root / "small.yaml").write_text(SMALL_YAML)
    return root


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def _sets(items):
    """``--set`` arguments, one per ``KEY=VALUE``."""
    return [arg for item in items for arg in ("--set", item)]


def _arrays(path):
    view = read_output(path)
    return np.asarray(view.saliency[0]), np.asarray(view.segmentation[0])


def test_run_writes_output_and_resumes(workdir, tmp_path):
    out = tmp_path / "a.ome.zarr"
    args = ["run", workdir / "a1.tiff", "-o", out, "-c", workdir / "small.yaml"]
    args += ["--model", workdir / "tiny.pt"]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    view = read_output(out)
    assert view.finalized and len(view.tiles) == 6
    assert view.provenance["config"]["tiling"]["tile_size"] == 64
    log = (out / "wsi_hipe" / "run.log").read_text()
    assert "6 to compute, 0 finished earlier" in log
    again = _invoke(*args)
    assert again.exit_code == 0
    assert "0 to compute, 6 finished earlier" in (out / "wsi_hipe" / "run.log").read_text()


def test_flags_override_the_config_file_and_mismatch_is_refused(workdir, tmp_path):
    out = tmp_path / "b.ome.zarr"
    base = ["run", workdir / "c1.tiff", "-o", out, "-c", workdir / "small.yaml"]
    base += ["--model", workdir / "tiny.pt"]
    assert _invoke(*base, "--max-depth", "1", "--ngff", "0.5").exit_code == 0
    view = read_output(out)
    assert view.provenance["config"]["hipe"]["max_depth"] == 1 and view.ngff == "0.5"
    refused = _invoke(*base, "--max-depth", "1", "--ngff", "0.5", "--floor", "2")
    assert refused.exit_code == 1
    assert "--overwrite" in refused.output
    fresh = _invoke(*base, "--floor", "2", "--overwrite")
    assert fresh.exit_code == 0
    assert read_output(out).provenance["config"]["score"]["floor"] == 2.0


def test_workers_flag_alone_asks_for_a_local_cluster():
    from wsi_hipe.cli import _load_config

    assert _load_config(None, {"schedule.workers": 3}).schedule.scheduler == "local:3"
    assert _load_config(None, {"schedule.workers": 1}).schedule.scheduler == "sync"
    both = _load_config(None, {"schedule.workers": 2, "schedule.scheduler": "threads"})
    assert both.schedule.scheduler == "threads"


def test_slide_flags_map_to_config_keys():
    from wsi_hipe.cli import _load_config, _overrides

    cfg = _load_config(None, _overrides(allow_brightfield=True, channel="Blue", mpp=0.25))
    assert cfg.slide.allow_brightfield and cfg.slide.channel == "blue" and cfg.slide.mpp == 0.25


def test_brightfield_slide_is_refused_with_the_fix(tmp_path, slides_dir):
    result = _invoke("run", slides_dir / "CMU-1-Small-Region.svs", "-o", tmp_path / "o.ome.zarr")
    assert result.exit_code == 1
    assert "brightfield" in result.output and "allow_brightfield" in result.output
    assert not (tmp_path / "o.ome.zarr").exists()


def test_bad_config_names_the_key(workdir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: {tile_size: 250}\n")
    result = _invoke("run", workdir / "a1.tiff", "-o", tmp_path / "x.ome.zarr", "-c", bad)
    assert result.exit_code == 1
    assert "tiling.tile_size: must be a multiple of 16, got 250" in result.output
    missing = _invoke("run", tmp_path / "nope.svs", "-o", tmp_path / "y.ome.zarr")
    assert missing.exit_code == 1 and "nope.svs" in missing.output


def _wait_for_records(table: Path, n: int, proc: subprocess.Popen, timeout: float = 240):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            return False
        if table.is_file() and table.read_text().count("\n") >= n:
            return True
        time.sleep(0.05)
    return False


def test_resume_after_sigkill_gives_identical_arrays(tmp_path):
    """kill -9 mid-run, rerun the same command: fewer tiles computed, identical output."""
    from wsi_hipe.synthetic import write_slide

    slide = tmp_path / "big.tiff"
    write_slide(slide, size=(384, 256), seed=5, tile_size=128, ground_truth=False)
    model = save_tiny_model(tmp_path / "tiny.pt")
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL_YAML)
    out = tmp_path / "killed.ome.zarr"
    cmd = [sys.executable, "-m", "wsi_hipe.cli", "run", str(slide), "-o", str(out)]
    cmd += ["-c", str(cfg), "--model", str(model)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        started = _wait_for_records(out / "wsi_hipe" / "tiles.jsonl", 3, proc)
        assert started, "the run finished (or failed) before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not read_output(out).finalized
    recorded = {r["index"] for r in read_output(out).tiles}
    assert 3 <= len(recorded) < 24

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = (out / "wsi_hipe" / "run.log").read_text()
    computed_now = [line for line in log.splitlines() if "finished earlier" in line][-1]
    assert f"({24 - len(recorded)} to compute, {len(recorded)} finished earlier)" in computed_now

    # The uninterrupted run, in this process.
    ref = tmp_path / "ref.ome.zarr"
    pipeline.explain_slide(slide, ref, config=cfg, model=str(model))
    view, ref_view = read_output(out), read_output(ref)
    assert view.finalized and ref_view.levels == view.levels
    for level in range(view.levels):
        np.testing.assert_array_equal(
            np.asarray(view.saliency[level]), np.asarray(ref_view.saliency[level])
        )
        np.testing.assert_array_equal(
            np.asarray(view.segmentation[level]), np.asarray(ref_view.segmentation[level])
        )
    assert len(view.tiles) == 24


def test_batch_with_a_corrupt_slide(workdir, tmp_path, slides_dir):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(workdir / "a1.tiff", folder / "a1.tiff")
    shutil.copy(workdir / "c1.tiff", folder / "c1.tiff")
    shutil.copy(slides_dir / "broken.svs", folder / "broken.svs")
    outdir = tmp_path / "out"
    common = ["-c", workdir / "small.yaml", "--model", workdir / "tiny.pt"]

    # Without --skip-errors: stop at the first failure (a1 done, broken failed, c1 not run).
    stop = _invoke("batch", folder, "-o", outdir, *common)
    assert stop.exit_code == 1
    assert "broken.svs" in stop.output
    assert read_output(outdir / "a1.ome.zarr").finalized
    assert not (outdir / "c1.ome.zarr").exists()
    assert "not run" in stop.stdout

    # With --skip-errors: the good ones finish (a1 is resumed), the summary names the bad one.
    result = _invoke("batch", folder, "-o", outdir, "--skip-errors", *common)
    assert result.exit_code == 1
    assert "broken.svs" in result.stdout and "failed" in result.stdout
    assert "SlideFormatError" in result.stdout
    for name in ("a1", "c1"):
        assert read_output(outdir / f"{name}.ome.zarr").finalized
    assert not (outdir / "broken.ome.zarr").exists()
    assert sorted(p.name for p in outdir.iterdir() if p.suffix == ".zarr") == [
        "a1.ome.zarr",
        "c1.ome.zarr",
    ]
    assert (outdir / "wsi-hipe-batch.log").is_file()
    for name in ("a1", "c1"):
        log = (outdir / f"{name}.ome.zarr" / "wsi_hipe" / "run.log").read_text()
        assert f"{name}.tiff" in log and "broken" not in log


def test_batch_all_good_exits_zero_with_glob_and_manifest(workdir, tmp_path):
    common = ["-c", workdir / "small.yaml", "--model", workdir / "tiny.pt", "--max-depth", "1"]
    result = _invoke("batch", str(workdir / "*.tiff"), "-o", tmp_path / "g", *common)
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "g").glob("*.ome.zarr")} == {"a1.ome.zarr", "c1.ome.zarr"}
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,mpp,output\n{workdir / 'c1.tiff'},0.5,sub/first\n")
    result = _invoke("batch", manifest, "-o", tmp_path / "m", *common)
    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "m" / "sub" / "first.ome.zarr").finalized


def test_batch_output_names_are_sanitised_unique_and_inside_outdir(tmp_path):
    items = [
        pipeline.BatchItem(Path("/data/x/a.svs")),
        pipeline.BatchItem(Path("/data/y/a.svs")),
        pipeline.BatchItem(Path("/data/y/A.svs")),
        pipeline.BatchItem(Path("/data/z/we ird;name$.ome.tiff")),
        pipeline.BatchItem(Path("/data/z/..hidden.svs")),
    ]
    names = [p.name for p in _output_names(items, tmp_path)]
    assert names == [
        "a.ome.zarr",
        "a-2.ome.zarr",
        "A-3.ome.zarr",
        "we_ird_name.ome.zarr",
        "hidden.ome.zarr",
    ]
    for bad in ("../x", "/abs/x", "a/../../x"):
        with pytest.raises(OutputError, match="inside the output folder"):
            _output_names([pipeline.BatchItem(Path("s.svs"), output=bad)], tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,output\ns.svs,../escape\n")
    with pytest.raises(OutputError):
        pipeline.explain_batch(manifest, tmp_path / "out", model="unused")


def test_manifest_errors(tmp_path):
    from wsi_hipe.errors import ConfigError, SlideNotFoundError

    (tmp_path / "no_slide_col.csv").write_text("path\nx.svs\n")
    with pytest.raises(ConfigError, match="'slide' column"):
        pipeline.resolve_batch_inputs(tmp_path / "no_slide_col.csv")
    (tmp_path / "bad_mpp.csv").write_text("slide,mpp\nx.svs,abc\n")
    with pytest.raises(ConfigError, match="line 2: mpp"):
        pipeline.resolve_batch_inputs(tmp_path / "bad_mpp.csv")
    with pytest.raises(SlideNotFoundError):
        pipeline.resolve_batch_inputs(tmp_path / "empty-*.svs")
    (tmp_path / "ok.csv").write_text("slide,mpp\nsub/x.svs,0.25\n\n/abs/y.svs,\n")
    items = pipeline.resolve_batch_inputs(tmp_path / "ok.csv")
    assert items == [
        pipeline.BatchItem(tmp_path / "sub" / "x.svs", 0.25, None),
        pipeline.BatchItem(Path("/abs/y.svs"), None, None),
    ]


def test_synth_writes_a_slide_openslide_opens(tmp_path):
    out = tmp_path / "s.tiff"
    result = _invoke("synth", out, "--size", "256x128", "--seed", "2", "--no-artefacts")
    assert result.exit_code == 0, result.output
    from wsi_hipe.slide import open_slide

    with open_slide(out) as slide:
        assert slide.dimensions == (256, 128) and slide.mpp == pytest.approx(0.5)
    assert _invoke("synth", out, "--size", "12x").exit_code != 0
    assert _invoke("synth", out, "--layout", "cmyk").exit_code != 0


def test_demo_wiring_on_a_small_slide(workdir, tmp_path):
    out = tmp_path / "demo"
    result = _invoke(
        "demo",
        "--out",
        out,
        "--size",
        "128x128",
        "--model",
        workdir / "tiny.pt",
        "-c",
        workdir / "small.yaml",
    )
    assert result.exit_code == 0, result.output
    assert (out / "demo_slide.tiff").is_file() and (out / "overview.png").is_file()
    assert read_output(out / "demo.ome.zarr").finalized
    assert str(out / "overview.png") in result.stdout


def test_demo_settings_give_cell_resolution_maps_with_the_default_substrate():
    """Issue 17: the demo's finest HiPe cells are <= 8 px (4 µm) on its 288 px model inputs."""
    from wsi_hipe.cli import DEMO_OVERRIDES
    from wsi_hipe.config import Config, load_config
    from wsi_hipe.hipe import max_depths

    cfg = load_config(overrides=DEMO_OVERRIDES)
    side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    depths = max_depths(
        side, start_grid=cfg.hipe.start_grid, min_cell_size=cfg.hipe.min_cell_size,
        max_depth=cfg.hipe.max_depth,
    )  # fmt: skip
    assert depths == cfg.hipe.max_depth  # every configured depth runs
    assert side / (cfg.hipe.start_grid * 2 ** (depths - 1)) <= 8.0
    assert cfg.hipe.substrate == Config().hipe.substrate == "background"


def test_evaluate_command_writes_tables(workdir, tmp_path):
    out = tmp_path / "eval"
    sets = [
        "device=cpu",
        "tiles.n=1",
        "tiles.size=32",
        "metrics.step_fraction=0.25",
        "methods=[{name: rise 8, method: rise, options: {n_masks: 8, grid: 4}}]",
    ]
    args = ["evaluate", "--out", out, "--model", workdir / "tiny.pt", *_sets(sets)]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert "rise 8" in result.stdout
    assert (out / "settings.json").is_file()
    bad = _invoke("evaluate", "--out", out, "--set", "tiles.n")
    assert bad.exit_code != 0


def test_evaluate_slide_writes_the_slide_tables_and_resumes(workdir, tmp_path):
    out = tmp_path / "slide-eval"
    sets = [
        "slides.size=256",
        "slides.seeds=[0]",
        "slides.densities=[clustered]",
        "grid.substrates=[background]",
        "grid.depths=[{start_grid: 4, max_depth: 1}]",
        "faithfulness.tiles_per_slide=0",
        "sanity.seeds=[]",
        "pipeline.tiling.tile_size=64",
        "pipeline.tiling.halo=16",
        "pipeline.hipe.batch_size=16",
    ]
    args = ["evaluate", "--slide", "--out", out, "--model", workdir / "tiny.pt", *_sets(sets)]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert "background · mid-range · 4×1" in result.stdout
    assert (out / "records.jsonl").is_file()
    units = (out / "records.jsonl").read_text().splitlines()
    # A second call finds every unit recorded and computes nothing new.
    again = _invoke(*args)
    assert again.exit_code == 0, again.output
    assert (out / "records.jsonl").read_text().splitlines() == units
    bad = _invoke("evaluate", "--slide", "--out", out, "--set", "grid.substrates=[zeros]")
    assert bad.exit_code != 0 and "grid.substrates" in bad.output


def test_overwrite_keeps_the_new_runs_log(workdir, tmp_path):
    out = tmp_path / "o.ome.zarr"
    args = ["run", workdir / "a1.tiff", "-o", out, "-c", workdir / "small.yaml"]
    args += ["--model", workdir / "tiny.pt"]
    assert _invoke(*args).exit_code == 0
    first = (out / "wsi_hipe" / "run.log").read_text()
    assert _invoke(*args, "--overwrite").exit_code == 0
    log = (out / "wsi_hipe" / "run.log").read_text()
    # --overwrite removed the old output after logging had begun: the new log is complete
    # (it starts like the first run's) and holds no line of the first run.
    assert log.splitlines()[0].split(" ", 2)[2] == first.splitlines()[0].split(" ", 2)[2]
    assert "created" in log and log != first
    assert not set(first.splitlines()) & set(log.splitlines())


def test_batch_goes_on_past_an_unexpected_error(workdir, tmp_path, monkeypatch):
    # A torch RuntimeError (e.g. CUDA out of memory) cannot be provoked on this CPU; stand one in
    # for the second slide and check that the batch keeps its statuses and goes on.
    real = pipeline.explain_slide

    def flaky(slide, output, **kw):
        if Path(slide).name == "c1.tiff":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(slide, output, **kw)

    # explain_batch calls explain_slide from its own module: patch it where it is looked up.
    monkeypatch.setattr(pipeline._batch, "explain_slide", flaky)
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a1.tiff", "c1.tiff"):
        shutil.copy(workdir / name, folder / name)
    common = ["-c", workdir / "small.yaml", "--model", workdir / "tiny.pt", "--max-depth", "1"]
    result = _invoke("batch", folder, "-o", tmp_path / "out", "--skip-errors", *common)
    assert result.exit_code == 1
    assert "RuntimeError" in result.stdout and "c1.tiff" in result.stdout
    assert read_output(tmp_path / "out" / "a1.ome.zarr").finalized
