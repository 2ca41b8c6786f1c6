"""Archive scale on real Dask clusters: workers and schedulers that die, failing tiles, slides
overlapping on one cluster, models shipped to workers, GPU pinning, SLURM job scripts.

The clusters are real ``dask scheduler`` / ``dask worker`` processes on 127.0.0.1 (started and
killed by these tests, each wait bounded); the runs are real ``wsi-hipe`` processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _pipeline_support import SMALL, BrightBlobNet, save_tiny_model, tiny_model
from typer.testing import CliRunner

from wsi_hipe import pipeline
from wsi_hipe.cli import app
from wsi_hipe.config import load_config
from wsi_hipe.omezarr import read_output
from wsi_hipe.schedule import (
    GPU_WORKER_THREADS,
    TaskError,
    TaskRunner,
    gpu_worker_env,
    local_worker_specs,
    visible_gpus,
)

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

#: 48 tiles of 64 px (+16 px halo), 3 HiPe depths: long enough to kill something mid-run.
CLUSTER_YAML = """\
tiling: {tile_size: 64, halo: 16, min_tissue: 0.0}
score: {floor: 0.0}
hipe: {max_depth: 3, start_grid: 4, batch_size: 64}
"""
CLUSTER_OVERRIDES = {**SMALL, "hipe.max_depth": 3, "hipe.start_grid": 4}
N_TILES = 48

#: Every wait on a process or cluster is bounded by this (seconds).
WAIT = 240


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaskCluster:
    """A scheduler and ``n`` single-threaded workers as separate processes, on loopback."""

    def __init__(self, n_workers: int = 2) -> None:
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = self._spawn(
            "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"
        )
        self.workers = [
            self._spawn(
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--death-timeout",
                "60",
            )
            for _ in range(n_workers)
        ]
        from distributed import Client

        with Client(self.address, timeout=WAIT) as client:
            client.wait_for_workers(n_workers, timeout=WAIT)

    @staticmethod
    def _spawn(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "dask"), *args],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill_worker(self, i: int = 0) -> None:
        self.workers[i].send_signal(signal.SIGKILL)
        self.workers[i].wait(timeout=60)

    def kill_scheduler(self) -> None:
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait(timeout=60)

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


@pytest.fixture
def cluster():
    c = DaskCluster(2)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def shared_cluster():
    """One cluster for the tests that leave it usable (the worker-kill test leaves one worker)."""
    c = DaskCluster(2)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 512x384 px slide (48 tiles), the tiny TorchScript model, a config, a sync reference."""
    from wsi_hipe.synthetic import write_slide

    root = tmp_path_factory.mktemp("cluster")
    write_slide(root / "s.tiff", size=(512, 384), seed=5, tile_size=128, ground_truth=False)
    model = save_tiny_model(root / "tiny.pt")
    (root / "cluster.yaml").write_text(CLUSTER_YAML)
    cfg = load_config(overrides={**CLUSTER_OVERRIDES, "model.path": str(model)})
    ref = root / "sync.ome.zarr"
    result = pipeline.explain_slide(root / "s.tiff", ref, config=cfg, scheduler="sync")
    assert result.ok and result.tiles_total == N_TILES
    return root


def _run_cmd(work: Path, out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "wsi_hipe.cli", "run", str(work / "s.tiff"), "-o", str(out)]
    return cmd + ["-c", str(work / "cluster.yaml"), "--model", str(work / "tiny.pt"), *extra]


def _wait_for_records(table: Path, n: int, proc: subprocess.Popen) -> int:
    """Records in the tile table once it holds ``n`` (or the run ended, or WAIT passed)."""
    start = time.monotonic()
    while time.monotonic() - start < WAIT and proc.poll() is None:
        if table.is_file() and (count := table.read_text().count("\n")) >= n:
            return count
        time.sleep(0.02)
    return table.read_text().count("\n") if table.is_file() else 0


def _assert_same_arrays(out: Path, ref: Path) -> None:
    view, ref_view = read_output(out), read_output(ref)
    assert view.finalized and view.levels == ref_view.levels
    for level in range(view.levels):
        np.testing.assert_array_equal(
            np.asarray(view.saliency[level]), np.asarray(ref_view.saliency[level])
        )
        np.testing.assert_array_equal(
            np.asarray(view.segmentation[level]), np.asarray(ref_view.segmentation[level])
        )
    assert np.asarray(ref_view.saliency[0]).max() > 0


# --- faults on a real cluster -----------------------------------------------------------------


def test_a_killed_scheduler_says_how_to_resume_and_a_new_cluster_finishes(work, cluster, tmp_path):
    out = tmp_path / "s.ome.zarr"
    proc = subprocess.Popen(
        _run_cmd(work, out, "--scheduler", cluster.address),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        at_kill = _wait_for_records(out / "wsi_hipe" / "tiles.jsonl", 2, proc)
        assert proc.poll() is None and 2 <= at_kill < N_TILES, "no run to kill the scheduler in"
        cluster.kill_scheduler()
        output, _ = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output
    flat = " ".join(output.split())
    assert "lost the Dask scheduler" in flat and "rerun the same command" in flat, output
    assert "to resume" in flat
    assert not read_output(out).finalized
    kept = {r["index"] for r in read_output(out).tiles if r["status"] == "done"}
    assert len(kept) >= 2

    cluster.close()
    fresh = DaskCluster(1)
    try:
        rerun = _invoke(*_run_cmd(work, out, "--scheduler", fresh.address)[3:])
    finally:
        fresh.close()
    assert rerun.exit_code == 0, rerun.output
    log = (out / "wsi_hipe" / "run.log").read_text()
    resumed = [line for line in log.splitlines() if "finished earlier" in line][-1]
    assert f"({N_TILES - len(kept)} to compute, {len(kept)} finished earlier)" in resumed
    _assert_same_arrays(out, work / "sync.ome.zarr")


class FlakyNet(BrightBlobNet):
    """BrightBlobNet that raises on inputs brighter (mean) than ``above``: one tile, always."""

    def __init__(self, above: float) -> None:
        super().__init__()
        self.above = above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.mean() > self.above):
            raise RuntimeError("flaky tile (test)")
        return self.conv(x)


def _tile_means(slide_path: Path) -> list[float]:
    """The mean of each tile's model input (core + halo), in grid order."""
    from wsi_hipe.slide import open_slide
    from wsi_hipe.tiling import make_grid

    cfg = load_config(overrides=CLUSTER_OVERRIDES)
    with open_slide(slide_path) as slide:
        grid = make_grid(
            slide.dimensions,
            slide_mpp=slide.mpp,
            target_mpp=cfg.tiling.mpp,
            tile_size=cfg.tiling.tile_size,
            halo=cfg.tiling.halo,
            min_tissue=0.0,
        )
        means = []
        for tile in grid.tiles:
            x0, y0, w, h = grid.read_window(tile)
            means.append(float(slide.read(x0, y0, w, h, mpp=cfg.tiling.mpp).mean()))
    return means


def _fail_every_try(item: int, *, log: str) -> int:
    with open(log, "a") as handle:
        handle.write(f"{item}\n")
    if item == 1:
        raise ValueError("tile 1 is broken (test)")
    return item


def test_a_tile_failing_every_try_is_recorded_and_the_run_is_partial(
    work, shared_cluster, tmp_path
):
    import json

    means = _tile_means(work / "s.tiff")
    order = np.argsort(means)
    bad = int(order[-1])
    threshold = (means[order[-1]] + means[order[-2]]) / 2
    model = tmp_path / "flaky.pt"
    torch.jit.script(FlakyNet(threshold)).save(str(model))
    sidecar = {"class_names": ["background", "lymphocyte", "nucleus"], "in_channels": 1}
    model.with_suffix(".json").write_text(json.dumps({**sidecar, "mpp": 0.5}))
    out = tmp_path / "p.ome.zarr"
    cmd = _run_cmd(work, out, "--scheduler", shared_cluster.address)[3:]
    cmd[cmd.index("--model") + 1] = str(model)
    done = _invoke(*cmd)
    assert done.exit_code == 3, done.output  # "partial"
    assert "3 tries" in " ".join(done.output.split())
    view = read_output(out)
    assert view.finalized
    records = {t["index"]: t for t in view.tiles}
    assert records[bad]["status"] == "failed"
    assert "flaky tile (test)" in records[bad]["error"] and "3 tries" in records[bad]["error"]
    assert all(r["status"] == "done" for i, r in records.items() if i != bad)
    assert len(records) == N_TILES
    # Every other tile is written as the sync run wrote it; the failed one is left zero.
    got, ref = read_output(out), read_output(work / "sync.ome.zarr")
    sal, ref_sal = np.asarray(got.saliency[0]), np.asarray(ref.saliency[0])
    y, x = records[bad]["y"], records[bad]["x"]
    assert not sal[y : y + 64, x : x + 64].any()
    sal[y : y + 64, x : x + 64] = ref_sal[y : y + 64, x : x + 64]
    np.testing.assert_array_equal(sal, ref_sal)

    # The number of tries is Dask's retries= + 1, on the same cluster.
    log = tmp_path / "tries.log"
    with TaskRunner(shared_cluster.address, retries=2) as runner:
        results = dict(
            runner.map(_fail_every_try, range(4), shared={"log": str(log)}, errors="return")
        )
    assert results[0] == 0 and results[2] == 2 and results[3] == 3
    assert isinstance(results[1], TaskError) and results[1].attempts == 3
    assert "ValueError: tile 1 is broken" in results[1].error
    assert log.read_text().split().count("1") == 3


def test_a_worker_killed_mid_run_changes_nothing(work, shared_cluster, tmp_path):
    """kill -9 one of two workers mid-run: the run completes, bit-identical to sync."""
    out = tmp_path / "w.ome.zarr"
    proc = subprocess.Popen(
        _run_cmd(work, out, "--scheduler", shared_cluster.address),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        at_kill = _wait_for_records(out / "wsi_hipe" / "tiles.jsonl", 2, proc)
        assert proc.poll() is None and 2 <= at_kill < N_TILES, "no run to kill a worker in"
        shared_cluster.kill_worker(0)
        output, _ = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    view = read_output(out)
    assert sorted(t["index"] for t in view.tiles if t["status"] == "done") == list(range(N_TILES))
    _assert_same_arrays(out, work / "sync.ome.zarr")


# --- many slides at once ------------------------------------------------------------------------


class _Gate:
    """Holds every forward pass until the second slide of a batch has started."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.armed = False
        self.timed_out = 0

    def __call__(self, x: torch.Tensor) -> None:
        if self.armed and not self.open.wait(timeout=60):
            self.timed_out += 1
            self.open.set()


class GatedNet(torch.nn.Module):
    def __init__(self, gate: _Gate) -> None:
        super().__init__()
        self.net = BrightBlobNet()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate(x)
        return self.net(x)


def test_a_batch_starts_the_next_slide_while_the_last_tiles_run(tmp_path):
    """Slide a's tiles cannot finish before slide b has started: the batch must overlap them
    (a sequential batch would wait out the gate and time out)."""
    from wsi_hipe.models import load_model
    from wsi_hipe.synthetic import write_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "a.tiff", size=(128, 64), seed=3, tile_size=128, ground_truth=False)
    write_slide(folder / "b.tiff", size=(192, 128), seed=4, tile_size=128, ground_truth=False)
    cfg = load_config(overrides={**SMALL, "hipe.max_depth": 2, "hipe.start_grid": 4})
    gate = _Gate()
    names = ("background", "lymphocyte", "nucleus")
    model = load_model(GatedNet(gate), class_names=names, device="cpu")
    gate.armed = True
    started: list[str] = []

    def on_start(slide: str, output: Path) -> None:
        started.append(Path(slide).name)
        if Path(slide).name == "b.tiff":
            gate.open.set()

    with TaskRunner("threads", workers=3, max_in_flight=4) as runner:
        statuses = pipeline.explain_batch(
            folder, tmp_path / "out", config=cfg, model=model, scheduler=runner, on_start=on_start
        )
    assert gate.timed_out == 0, "slide b did not start while slide a's tiles were running"
    assert started == ["a.tiff", "b.tiff"]
    assert [s.status for s in statuses] == ["done", "done"]
    # The same arrays as each slide alone with the sync scheduler.
    gate.armed = False
    for name in ("a", "b"):
        ref = tmp_path / f"{name}-sync.ome.zarr"
        pipeline.explain_slide(folder / f"{name}.tiff", ref, config=cfg, model=model)
        _assert_same_arrays(tmp_path / "out" / f"{name}.ome.zarr", ref)


# --- models travel as CPU weights -----------------------------------------------------------------


# --- GPU workers: one GPU and two threads each ---------------------------------------------------


def test_gpu_pinning_is_round_robin_over_the_visible_gpus():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, device_count=3) == ["0", "1", "2"]
    uuid = "GPU-3c5f6b0e-0000-0000-0000-000000000000"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": f"{uuid},1"}) == [uuid, "1"]
    envs = [gpu_worker_env(i, ["2", "5"]) for i in range(5)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5", "2", "5", "2"]
    with pytest.raises(ValueError, match="no GPU"):
        gpu_worker_env(0, [])
    specs = local_worker_specs(3, gpu=True, gpus=["0", "1"])
    options = [s["options"] for s in specs.values()]
    assert [o["env"]["CUDA_VISIBLE_DEVICES"] for o in options] == ["0", "1", "0"]
    assert all(o["nthreads"] == GPU_WORKER_THREADS == 2 for o in options)
    assert all(o["resources"] == {"GPU": GPU_WORKER_THREADS} for o in options)
    cpu = [s["options"] for s in local_worker_specs(2).values()]
    assert all(o["nthreads"] == 1 and "env" not in o and "resources" not in o for o in cpu)


def test_gpu_workers_need_a_gpu_here_but_a_scheduling_process_does_not(tmp_path, monkeypatch):
    from wsi_hipe.errors import ConfigError
    from wsi_hipe.pipeline._inputs import load_for, wants_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="no GPU"):
        TaskRunner("local:2", gpu=True)
    # A login node without a GPU schedules GPU workers: asking for CUDA does not fail here,
    # and the model it keeps is a CPU copy.
    cfg = load_config(overrides={"model.device": "cuda"})
    assert wants_gpu(None, cfg) and not wants_gpu(tiny_model(), cfg)
    model = str(save_tiny_model(tmp_path / "tiny.pt"))
    assert load_for(model, cfg, remote=True).device.type == "cpu"


def _visible(item: int) -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_a_cpu_model_state_reaches_pinned_gpu_workers_and_equals_sync(tmp_path, monkeypatch):
    """The GPU scheduling path without a GPU: the machine pretends to list GPUs 7 and 9; a
    2-process local cluster pins one to each worker (2 threads each), and an in-memory model
    (CPU state: no file a worker could load) reaches them and gives the sync run's output."""
    from wsi_hipe.synthetic import write_slide

    slide = tmp_path / "s.tiff"
    write_slide(slide, size=(192, 128), seed=3, tile_size=128, ground_truth=False)
    cfg = load_config(overrides={**SMALL, "hipe.max_depth": 2, "hipe.start_grid": 4})
    model = tiny_model()
    assert pipeline.explain_slide(slide, tmp_path / "sync.ome.zarr", config=cfg, model=model).ok
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,9")
    with TaskRunner("local:2", gpu=True) as runner:
        assert sorted(runner.client.nthreads().values()) == [2, 2]
        seen = runner.client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        tasks = {result for _, result in runner.map(_visible, range(8))}
        result = pipeline.explain_slide(
            slide, tmp_path / "local.ome.zarr", config=cfg, model=model, scheduler=runner
        )
    assert sorted(seen.values()) == ["7", "9"]
    assert tasks <= {"7", "9"} and tasks
    assert result.ok and result.computed == 6
    _assert_same_arrays(tmp_path / "local.ome.zarr", tmp_path / "sync.ome.zarr")
    assert model.device.type == "cpu"


# --- SLURM through dask-jobqueue --------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_print_job_script_shows_what_sbatch_would_get(work, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: printing does not need one
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(
        CLUSTER_YAML
        + "schedule:\n  scheduler: slurm\n  jobqueue:\n    interface: lo\n    cores: 2\n"
        "    memory: 4GB\n    walltime: '00:20:00'\n    job_extra_directives: ['--gres=gpu:1']\n"
        "    job_script_prologue: ['source /opt/wsi-hipe/.venv/bin/activate']\n"
    )
    result = _invoke(
        "run", work / "s.tiff", "-o", tmp_path / "o.ome.zarr", "-c", cfg, "--print-job-script"
    )
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert script.startswith("#!/usr/bin/env bash")
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH -t 00:20:00", "#SBATCH --mem=4G"):
        assert line in script, script
    assert "source /opt/wsi-hipe/.venv/bin/activate" in script
    assert "distributed.cli.dask_worker tcp://127.0.0.1:" in script
    assert not (tmp_path / "o.ome.zarr").exists()
    bad = _invoke("run", work / "s.tiff", "-o", tmp_path / "x.ome.zarr", "--print-job-script")
    assert bad.exit_code == 2 and "--scheduler" in bad.output


def test_slurm_without_sbatch_says_where_to_read(work, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "o.ome.zarr"
    result = _invoke("run", work / "s.tiff", "-o", out, "--scheduler", "slurm")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "'sbatch'" in message and "docs/cluster.md" in message
    assert message.count("error:") == 1
    assert not out.exists()


@pytest.fixture
def slurm(tmp_path_factory):
    import _slurm

    why = _slurm.missing()
    if why:
        pytest.skip(why)
    cluster = _slurm.PrivateSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_real_slurm_job_runs_the_tiles(slurm, tmp_path, monkeypatch):
    """A single-node SLURM from the OS packages: the workers are sbatch jobs."""
    from wsi_hipe.synthetic import write_slide

    slide = tmp_path / "s.tiff"
    write_slide(slide, size=(192, 128), seed=3, tile_size=128, ground_truth=False)
    model = save_tiny_model(tmp_path / "tiny.pt")
    small = "tiling: {tile_size: 64, halo: 16, min_tissue: 0.0}\nscore: {floor: 0.0}\n"
    small += "hipe: {max_depth: 2, start_grid: 4, batch_size: 64}\n"
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(
        small + "schedule:\n  scheduler: slurm\n  jobqueue:\n    interface: lo\n"
        "    cores: 1\n    memory: 2GB\n    walltime: '00:10:00'\n    minimum_jobs: 1\n"
        "    maximum_jobs: 1\n    job_script_prologue: ['export OMP_NUM_THREADS=1']\n"
        f"    log_directory: {tmp_path / 'jobs'}\n"
    )
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    out = tmp_path / "slurm.ome.zarr"
    done = _invoke("run", slide, "-o", out, "-c", cfg, "--model", model)
    assert done.exit_code == 0, done.output
    assert list((tmp_path / "jobs").glob("*.err")), "no SLURM job ran"
    ref = tmp_path / "sync.ome.zarr"
    sync = load_config(cfg, {"schedule.scheduler": "sync", "model.path": str(model)})
    assert pipeline.explain_slide(slide, ref, config=sync).ok
    _assert_same_arrays(out, ref)
