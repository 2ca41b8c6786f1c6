"""Scale-out: one 8-slide synthetic batch on ``sync``, ``local:2`` and a 2-worker tcp cluster.

For each scheduler the same batch goes through :func:`wsi_hipe.pipeline.explain_batch` into a
fresh folder; the report gives tiles/s over the batch and per slide, and checks that every
output's arrays (all pyramid levels of saliency and segmentation) are bit-identical to the
``sync`` run. The tcp cluster is real: ``dask scheduler`` and two ``dask worker`` processes
(one thread each) on 127.0.0.1, started by this script.

``--kill`` adds a run on a fresh tcp cluster where one of the two workers is killed with
SIGKILL once half of the batch's tiles are written: its cost is the extra seconds over the
undisturbed tcp run, and the tiles that had been handed to the dead worker and ran again
elsewhere (``client.processing()`` of that worker at the moment of the kill).

Commands (BENCHMARKS.md, "Scale-out")::

    .venv/bin/python benchmarks/bench_scaleout.py --kill
    .venv/bin/python benchmarks/bench_scaleout.py --model tiny --slides 8 --kill

Wall times on a shared 2-core machine depend on what else runs there: the script prints the
load average before and after, and the ratios between schedulers of one run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: Small tiles and two HiPe depths, so that the batch runs in minutes on a 2-core CPU.
OVERRIDES = {
    "tiling.tile_size": 64,
    "tiling.halo": 16,
    "tiling.min_tissue": 0.0,
    "score.floor": 0.0,
    "hipe.start_grid": 4,
    "hipe.max_depth": 2,
    "hipe.batch_size": 32,
}


def _model(name: str, root: Path) -> str:
    if name == "bundled":
        return "bundled"
    sys.path.insert(0, str(REPO / "tests"))
    from _pipeline_support import save_tiny_model

    return str(save_tiny_model(root / "tiny.pt"))


def _slides(root: Path, n: int, size: tuple[int, int]) -> Path:
    from wsi_hipe.synthetic import write_slide

    folder = root / "slides"
    folder.mkdir()
    for i in range(n):
        write_slide(
            folder / f"s{i}.tiff", size=size, seed=10 + i, tile_size=128, ground_truth=False
        )
    return folder


class TcpCluster:
    """``dask scheduler`` + ``n`` ``dask worker`` processes (1 thread each) on loopback."""

    def __init__(self, n: int = 2) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.scheduler = subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
            + ["--no-dashboard"],
            **quiet,
        )
        self.workers = [
            subprocess.Popen(
                [str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--no-nanny"]
                + ["--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                **quiet,
            )
            for i in range(n)
        ]
        from distributed import Client

        with Client(self.address, timeout=120) as client:
            client.wait_for_workers(n, timeout=120)

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


def _warm() -> None:
    import torch  # noqa: F401

    import wsi_hipe.pipeline  # noqa: F401


def _run(label, spec, folder, outdir, cfg, model, *, kill_at=None, cluster=None) -> dict:
    """One batch; with ``kill_at`` (tiles), SIGKILL worker 0 of ``cluster`` once that many
    tiles are written and count the tasks it held."""
    from wsi_hipe.pipeline import explain_batch
    from wsi_hipe.schedule import TaskRunner

    written = {"n": 0}
    killed: dict = {}
    lock = threading.Lock()

    with TaskRunner(spec, workers=2, threads_per_worker=cfg.schedule.threads_per_worker) as runner:
        last: dict[str, float] = {}

        def progress(name: str, done: float, total: int) -> None:
            with lock:
                if last.get(name, 0) < done:
                    written["n"] += int(done - last.get(name, 0))
                    last[name] = done
                due = kill_at is not None and not killed and written["n"] >= kill_at
                if due:
                    victim = cluster.workers[0]
                    held = runner.client.processing()
                    name0 = next(
                        (
                            a
                            for a, info in runner.client.scheduler_info()["workers"].items()
                            if info.get("name") == "w0"
                        ),
                        None,
                    )
                    killed["tasks"] = len(held.get(name0, ()))
                    killed["at_tiles"] = written["n"]
                    victim.send_signal(signal.SIGKILL)

        if runner.client is not None:  # imports in the workers are start-up, not tiles
            runner.client.run(_warm)
        t0 = time.perf_counter()
        statuses = explain_batch(
            folder, outdir, config=cfg, model=model, scheduler=runner, progress=progress
        )
        seconds = time.perf_counter() - t0
    tiles = sum(s.result.computed for s in statuses if s.result)
    return {
        "label": label,
        "seconds": seconds,
        "tiles": tiles,
        "tiles_per_s": tiles / seconds,
        "per_slide": [
            round(s.result.computed / s.seconds, 2) if s.result and s.seconds else None
            for s in statuses
        ],
        "ok": all(s.status == "done" for s in statuses),
        "killed": killed or None,
        "outdir": str(outdir),
    }


def _identical(outdir: Path, ref: Path) -> bool:
    from wsi_hipe.omezarr import read_output

    for out in sorted(ref.glob("*.ome.zarr")):
        a, b = read_output(outdir / out.name), read_output(out)
        for level in range(b.levels):
            for x, y in ((a.saliency, b.saliency), (a.segmentation, b.segmentation)):
                if not np.array_equal(np.asarray(x[level]), np.asarray(y[level])):
                    return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("bundled", "tiny"), default="bundled")
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", default="256x192", help="slide WIDTHxHEIGHT px")
    parser.add_argument("--kill", action="store_true", help="also time a worker kill")
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = parser.parse_args(argv)

    from wsi_hipe.config import load_config

    width, height = (int(v) for v in args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    load_before = os.getloadavg()
    try:
        folder = _slides(root, args.slides, (width, height))
        model = _model(args.model, root)
        cfg = load_config(overrides={**OVERRIDES, "model.path": model})
        rows = [_run("sync", "sync", folder, root / "sync", cfg, None)]
        rows.append(_run("local:2", "local:2", folder, root / "local", cfg, None))
        cluster = TcpCluster(2)
        try:
            rows.append(_run("tcp, 2 workers", cluster.address, folder, root / "tcp", cfg, None))
        finally:
            cluster.close()
        if args.kill:
            total = rows[0]["tiles"]
            cluster = TcpCluster(2)
            try:
                rows.append(
                    _run(
                        "tcp, 2 workers, one killed at 50 %",
                        cluster.address,
                        folder,
                        root / "killed",
                        cfg,
                        None,
                        kill_at=total // 2,
                        cluster=cluster,
                    )
                )
            finally:
                cluster.close()
        for row in rows:
            row["identical_to_sync"] = _identical(Path(row["outdir"]), root / "sync")
    finally:
        load_after = os.getloadavg()
        shutil.rmtree(root, ignore_errors=True)

    sync_rate = rows[0]["tiles_per_s"]
    print(
        f"{args.slides} slides of {width}x{height} px, {rows[0]['tiles']} tiles, model "
        f"{args.model}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
    )
    print(
        "| scheduler | seconds | tiles/s | × sync | per-slide tiles/s (min–max) | identical to sync |"
    )
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        rates = [r for r in row["per_slide"] if r is not None]
        print(
            f"| {row['label']} | {row['seconds']:.1f} | {row['tiles_per_s']:.2f} | "
            f"{row['tiles_per_s'] / sync_rate:.2f} | {min(rates):.2f}–{max(rates):.2f} | "
            f"{'yes' if row['identical_to_sync'] and row['ok'] else 'NO'} |"
        )
    killed = [r for r in rows if r["killed"]]
    if killed:
        undisturbed = next(r for r in rows if r["label"] == "tcp, 2 workers")
        k = killed[0]
        print(
            f"\nworker kill: +{k['seconds'] - undisturbed['seconds']:.1f} s over the undisturbed "
            f"tcp run; killed after {k['killed']['at_tiles']} tiles written, "
            f"{k['killed']['tasks']} tile task(s) held by the dead worker ran again elsewhere"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
