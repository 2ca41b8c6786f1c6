"""The GPU check's measurements, in one run, as a markdown table for BENCHMARKS.md ("GPU").

``benchmarks/gpu_check.sh`` runs this on the lent GPU machine (``--device cuda``) and, tiny, in
the test suite on the CPU (``--device cpu --quick``, ``tests/test_gpu_check.py``), so it cannot
rot. Ratios are what matter; absolute times depend on the machine.

1. **HiPe against its forward floor** at batch 32 / 128 / 512: the bundled U-Net on one
   pipeline tile (core + halo, score = expected lymphocyte area in the core). The floor is the
   time the model alone needs for the very same calls (the batch sizes HiPe used), so the ratio
   is HiPe's own overhead. Goal on the GPU ≤ 1.10.
2. **One pipeline tile** (``explain_region`` over one core): read → segment → score → HiPe on
   the model's device; seconds, passes/s.
3. **A small slide through ``explain_slide``** (1024² px, ``configs/gpu.yaml``) with the
   ``sync`` and ``local:1`` schedulers, and ``sync`` with another ``hipe.tiles_per_batch``
   (tiles whose HiPe windows share forward batches; gpu.yaml: 8, against 1):
   tiles/s, passes/s, and the GPU's utilisation sampled by ``nvidia-smi dmon`` during the run
   (goal ≥ 80 %).
4. **Autocast on vs off**: the same slide with ``model.autocast`` true and false (false inside
   :func:`wsi_hipe.models.exact_float32`, i.e. true float32 without TF32): the maximum
   relative difference of the saliency, ``max|on − off| / max|off|``, and of the tile scores.
5. **The demo slide at the default settings** (``configs/gpu.yaml``: the defaults' full depth,
   256 px cores + 32 px halo, with HiPe batches of 128 and autocast; the 2048×1536 synthetic
   slide of ``wsi-hipe demo``): seconds, passes and
   the ratio to the compute floor, ``passes × FLOP per pass / peak``, FLOP counted by
   ``torch.utils.flop_counter`` (peak: ``--peak-tflops``, default 790 TFLOP/s, taken as an
   H200's attainable bf16 dense rate; pass the machine's own figure where it is known). Goal ≤ 10 s on one H200.

Usage::

    python benchmarks/bench_gpu.py --device cuda --out DIR            # the lent machine
    python benchmarks/bench_gpu.py --device cpu --quick --out DIR     # a dry run (seconds)

Writes ``DIR/gpu_check.md`` (the tables) and ``DIR/gpu_check.json`` (the same numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

#: The HiPe batch sizes the check compares against their floor (issue 16).
BATCH_SIZES = (32, 128, 512)


@dataclass(frozen=True)
class Sizes:
    """What one run measures: full sizes on the GPU, tiny ones for the CPU dry run."""

    batch_sizes: tuple[int, ...]
    config: str | None  # a YAML under configs/ (None: the defaults = configs/default.yaml)
    overrides: dict[str, Any]
    slide: tuple[int, int]  # the small slide (level-0 px at 0.5 µm/px)
    demo: tuple[int, int]  # the demo slide
    repeats: int


#: On the GPU: the default settings with configs/gpu.yaml's HiPe batch of 128 and autocast.
FULL = Sizes(BATCH_SIZES, "gpu.yaml", {}, (1024, 1024), (2048, 1536), 3)
QUICK = Sizes(
    (4, 16),
    None,
    {"tiling.tile_size": 32, "tiling.halo": 16, "hipe.start_grid": 2, "hipe.max_depth": 2},
    (128, 128),
    (192, 128),
    1,
)


@dataclass
class Report:
    """The tables of the run, and the JSON beside them."""

    env: dict[str, Any] = field(default_factory=dict)
    sections: list[tuple[str, list[str], list[list[Any]], str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def table(self, title: str, header: list[str], rows: list[list[Any]], note: str = "") -> None:
        self.sections.append((title, header, rows, note))

    def markdown(self) -> str:
        lines = ["## GPU check", ""]
        lines += [f"- {k}: {v}" for k, v in self.env.items()]
        for title, header, rows, note in self.sections:
            lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |"]
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
            if note:
                lines += ["", note]
        return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "n/a" if value is None else str(value)


# --- helpers ------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


class Recorder:
    """Wraps a forward and records the batch size of every call."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.forward = forward
        self.sizes: list[int] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(batch))
        return self.forward(batch)


class Utilisation:
    """``nvidia-smi dmon -s u`` in the background: the SM utilisation (%) once a second."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            index = device.index if device.index is not None else torch.cuda.current_device()
            cmd = ["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-i", str(index)]
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        column = None
        for line in self._proc.stdout:
            parts = line.split()
            if line.startswith("#") and "sm" in parts:
                column = parts.index("sm") - 1  # "# gpu sm mem ..." → values start at gpu
            elif column is not None and len(parts) > column and parts[column].isdigit():
                self.samples.append(float(parts[column]))

    def stop(self) -> dict[str, float | None]:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            if self._thread is not None:
                self._thread.join(timeout=5)
        if not self.samples:
            return {"sm_mean": None, "sm_median": None, "samples": 0}
        return {
            "sm_mean": statistics.fmean(self.samples),
            "sm_median": statistics.median(self.samples),
            "samples": len(self.samples),
        }


@contextlib.contextmanager
def utilisation(device: torch.device) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}
    sampler = Utilisation(device)
    try:
        yield out
    finally:
        out.update(sampler.stop())


def tile_input(side: int, device: torch.device) -> torch.Tensor:
    """A synthetic Hoechst tile with lymphocytes, ``(1, side, side)`` on ``device``."""
    from wsi_hipe.synthetic import render_tile

    return torch.from_numpy(render_tile(3, size=side).image)[None].float().to(device)


def flops_per_pass(model, side: int) -> int:
    """FLOP of one forward pass of ``model`` on a ``side``² input (torch's counter, on the CPU)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from wsi_hipe.models import SegmentationModel

    cpu = copy.deepcopy(model).to("cpu") if isinstance(model, SegmentationModel) else model
    x = torch.zeros(1, model.in_channels, side, side)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        cpu(x)
    return int(counter.get_total_flops())


# --- 1. HiPe against its forward floor ------------------------------------------------------------


def hipe_vs_floor(model, cfg, sizes: Sizes, device: torch.device, report: Report) -> None:
    from wsi_hipe import hierarchical_perturbation
    from wsi_hipe.scores import class_area, core_region

    side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    x = tile_input(side, device)
    score = class_area(model, class_index=1, region=core_region(side, side, cfg.tiling.halo))
    sync = synchronizer(device)
    hipe = {
        "max_depth": cfg.hipe.max_depth,
        "start_grid": cfg.hipe.start_grid,
        "min_cell_size": cfg.hipe.min_cell_size,
    }
    rows, data = [], []
    for batch in sizes.batch_sizes:
        recorder = Recorder(score)
        hierarchical_perturbation(recorder, x, batch_size=batch, device=device, **hipe)  # warm
        best_hipe = float("inf")
        for _ in range(sizes.repeats):
            recorder.sizes.clear()
            sync()
            t = time.perf_counter()
            res = hierarchical_perturbation(recorder, x, batch_size=batch, device=device, **hipe)
            sync()
            best_hipe = min(best_hipe, time.perf_counter() - t)
        calls = list(recorder.sizes)
        full = x.unsqueeze(0).expand(max(calls), *x.shape).contiguous()
        best_floor = float("inf")
        with torch.no_grad():
            for n in sorted(set(calls)):  # warm every shape (cuDNN picks kernels per shape)
                score(full[:n])
            for _ in range(sizes.repeats):
                sync()
                t = time.perf_counter()
                for n in calls:
                    score(full[:n])
                sync()
                best_floor = min(best_floor, time.perf_counter() - t)
        ratio = best_hipe / best_floor
        passes = res.forward_passes
        rows.append([batch, passes, len(calls), best_hipe, best_floor, ratio, passes / best_hipe])
        data.append(
            {
                "batch_size": batch,
                "passes": passes,
                "calls": len(calls),
                "hipe_s": best_hipe,
                "floor_s": best_floor,
                "ratio": ratio,
                "masks_per_depth": res.masks_per_depth,
            }
        )
    report.table(
        f"HiPe against its forward floor ({side}² tile, bundled U-Net, best of {sizes.repeats})",
        ["batch", "passes", "model calls", "HiPe s", "floor s", "HiPe / floor", "passes/s"],
        rows,
        "Floor = the model alone on the same batch sizes. Goal on the GPU: HiPe / floor ≤ 1.10.",
    )
    report.data["hipe_vs_floor"] = data


# --- 2. one pipeline tile -------------------------------------------------------------------------


def one_tile(model, cfg, device: torch.device, report: Report) -> None:
    from wsi_hipe import pipeline
    from wsi_hipe.slide import ArrayReader, open_slide
    from wsi_hipe.synthetic import render_region

    side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    size = 4 * side
    region = render_region(0, 0, size, size, seed=0, slide_size=(size, size))
    image = np.clip(region.image, 0, 1)
    slide = open_slide(ArrayReader(image, mpp=cfg.tiling.mpp))
    # The core window (inside the halo margin) with the most lymphocyte area in the ground truth,
    # so that HiPe runs (a tile under the score floor would be skipped in one pass).
    t, step = cfg.tiling.tile_size, cfg.tiling.tile_size // 4
    starts = range(cfg.tiling.halo, size - t - cfg.tiling.halo + 1, step)
    lymph = region.lymphocytes > 0
    _, x0, y0 = max((int(lymph[y : y + t, x : x + t].sum()), x, y) for y in starts for x in starts)
    box = (x0, y0, t, t)
    pipeline.explain_region(slide, *box, config=cfg, model=model)  # warm
    sync = synchronizer(device)
    sync()
    t = time.perf_counter()
    res = pipeline.explain_region(slide, *box, config=cfg, model=model)
    sync()
    seconds = time.perf_counter() - t
    record = res.tiles[0]
    row = [
        str(model.device),
        str(model.compute_dtype).removeprefix("torch."),
        record["status"],
        res.forward_passes,
        seconds,
        res.forward_passes / seconds,
    ]
    report.table(
        f"One pipeline tile ({cfg.tiling.tile_size} px core + {cfg.tiling.halo} px halo)",
        ["model device", "compute dtype", "status", "passes", "s", "passes/s"],
        [row],
    )
    report.data["one_tile"] = dict(
        zip(["device", "dtype", "status", "passes", "seconds", "passes_per_s"], row, strict=True)
    )


# --- 3./4./5. slides --------------------------------------------------------------------------


def run_slide(slide_path: Path, out: Path, cfg, scheduler: str, device: torch.device):
    from wsi_hipe import pipeline

    sync = synchronizer(device)
    with utilisation(device) as util:
        sync()
        t = time.perf_counter()
        res = pipeline.explain_slide(
            slide_path, out, config=cfg, scheduler=scheduler, overwrite=True
        )
        sync()
        seconds = time.perf_counter() - t
    if not res.ok:
        raise RuntimeError(f"{scheduler}: slide run did not finish cleanly: {res.failed[:3]}")
    computed = res.counts["done"] + res.counts["skipped"]
    return res, seconds, computed, util


def saliency_of(out: Path) -> np.ndarray:
    from wsi_hipe.omezarr import read_output

    return np.asarray(read_output(out).saliency[0], dtype=np.float64)


def _grouped_diff(workdir: Path, group: int, other: int) -> float:
    """``max|a − b| / max|b|`` of the small slide's saliency, ``other`` vs ``group`` tiles/task."""
    ref = saliency_of(workdir / "small.ome.zarr")
    alt = saliency_of(workdir / f"group{other}.ome.zarr")
    return float(np.abs(alt - ref).max()) / (float(np.abs(ref).max()) or 1.0)


def slides(cfg, sizes: Sizes, device: torch.device, workdir: Path, report: Report) -> None:
    from wsi_hipe.models import exact_float32
    from wsi_hipe.synthetic import write_slide

    small = write_slide(workdir / "small.tiff", size=sizes.slide, seed=0, mpp=0.5).path
    rows, data = [], {}
    # hipe.tiles_per_batch: the config's (gpu.yaml: 8), and one other (1, or 4 when it is 1),
    # to show what sharing batches across tiles buys; maps compared below.
    group = cfg.hipe.tiles_per_batch
    other = 1 if group > 1 else 4
    runs = [("sync", group), ("sync", other), ("local:1", group)]
    for scheduler, tiles_per_batch in runs:
        name = "small.ome.zarr" if tiles_per_batch == group else f"group{tiles_per_batch}.ome.zarr"
        res, seconds, computed, util = run_slide(
            small, workdir / name, cfg.with_overrides({"hipe.tiles_per_batch": tiles_per_batch}),
            scheduler, device,
        )  # fmt: skip
        rows.append(
            [
                scheduler,
                tiles_per_batch,
                res.tiles_total,
                computed,
                res.forward_passes,
                seconds,
                computed / seconds,
                res.forward_passes / seconds,
                util["sm_mean"],
                util["sm_median"],
            ]
        )
        key = scheduler if tiles_per_batch == group else f"{scheduler} tiles_per_batch={other}"
        data[key] = {
            "tiles_per_batch": tiles_per_batch,
            "tiles": res.tiles_total,
            "computed": computed,
            "passes": res.forward_passes,
            "seconds": seconds,
            **util,
        }
    report.table(
        f"A small slide through explain_slide ({sizes.slide[0]}×{sizes.slide[1]} px, "
        f"{report.env['config']})",
        [
            "scheduler",
            "tiles/task",
            "tiles",
            "computed",
            "passes",
            "s",
            "tiles/s",
            "passes/s",
            "GPU SM % mean",
            "GPU SM % median",
        ],
        rows,
        "GPU utilisation: `nvidia-smi dmon -s u`, one sample a second during the run "
        "(n/a without a GPU). Goal ≥ 80 %. `local:1` includes starting its Dask worker. "
        "tiles/task: `hipe.tiles_per_batch`, tiles whose HiPe windows share forward batches. "
        f"Saliency with {other} vs {group} tiles per task: max relative difference "
        f"{_grouped_diff(workdir, group, other):.2e} (batch rounding only).",
    )
    report.data["slide"] = data

    # 4. autocast on vs off on the same slide
    on = saliency_of(workdir / "small.ome.zarr")
    off_cfg = cfg.with_overrides({"model.autocast": False})
    with exact_float32():
        res_off, _, _, _ = run_slide(small, workdir / "fp32.ome.zarr", off_cfg, "sync", device)
    off = saliency_of(workdir / "fp32.ome.zarr")
    scale = float(np.abs(off).max()) or 1.0
    sal_diff = float(np.abs(on - off).max()) / scale
    from wsi_hipe.omezarr import read_output

    def scores(path: Path) -> dict[int, float]:
        return {t["index"]: float(t["score"]) for t in read_output(path).tiles if t["score"]}

    s_on, s_off = scores(workdir / "small.ome.zarr"), scores(workdir / "fp32.ome.zarr")
    score_diff = max(
        (abs(s_on[k] - s_off[k]) / max(abs(s_off[k]), 1e-12) for k in s_off), default=0.0
    )
    dtype = _compute_dtype(cfg)
    report.table(
        "Saliency with autocast on vs off (the small slide, sync)",
        [
            "autocast dtype",
            "max \\|on − off\\| / max \\|off\\|",
            "max tile-score rel. diff",
            "passes on",
            "passes off",
        ],
        [[dtype, sal_diff, score_diff, data["sync"]["passes"], res_off.forward_passes]],
        "Off = float32 with TF32 off (`wsi_hipe.models.exact_float32`). On the CPU both are "
        "float32 (autocast applies on CUDA only), so the difference there is 0.",
    )
    report.data["autocast"] = {
        "dtype": dtype,
        "saliency_max_rel_diff": sal_diff,
        "score_max_rel_diff": score_diff,
    }


def _compute_dtype(cfg) -> str:
    from wsi_hipe.models import load_model

    model = load_model("bundled", device="cpu", autocast=cfg.model.autocast)
    return str(model.compute_dtype_on(cfg.model.device)).removeprefix("torch.")


def demo_slide(
    model, cfg, sizes: Sizes, device, workdir: Path, peak_tflops: float, report: Report
) -> None:
    from wsi_hipe.synthetic import write_slide

    demo = write_slide(workdir / "demo.tiff", size=sizes.demo, seed=0, mpp=0.5).path
    res, seconds, computed, util = run_slide(demo, workdir / "demo.ome.zarr", cfg, "sync", device)
    side = cfg.tiling.tile_size + 2 * cfg.tiling.halo
    flop = flops_per_pass(model, side)
    floor = res.forward_passes * flop / (peak_tflops * 1e12)
    row = [
        f"{sizes.demo[0]}×{sizes.demo[1]}",
        computed,
        res.forward_passes,
        seconds,
        flop / 1e9,
        floor,
        seconds / floor,
        util["sm_mean"],
    ]
    report.table(
        f"The demo slide, full depth ({report.env['config']}, sync)",
        [
            "slide px",
            "tiles computed",
            "passes",
            "s",
            "GFLOP/pass",
            "compute floor s",
            "s / floor",
            "GPU SM % mean",
        ],
        [row],
        f"Compute floor = passes × FLOP per pass / {peak_tflops:g} TFLOP/s. Goal on one H200: "
        "≤ 10 s.",
    )
    report.data["demo"] = {
        "tiles": computed,
        "passes": res.forward_passes,
        "seconds": seconds,
        "flop_per_pass": flop,
        "floor_s": floor,
        **util,
    }


# --- main ---------------------------------------------------------------------------------------


def environment(device: torch.device, model) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["cpu threads"] = torch.get_num_threads()
    env["model compute dtype"] = str(model.compute_dtype).removeprefix("torch.")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="the device's bf16 dense peak, for the demo's compute floor",
    )
    args = parser.parse_args(argv)

    from wsi_hipe.config import load_config
    from wsi_hipe.models import load_model, resolve_device

    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    path = None if sizes.config is None else REPO / "configs" / sizes.config
    cfg = load_config(path, overrides={**sizes.overrides, "model.device": str(device)})
    model = load_model("bundled", device=device, autocast=cfg.model.autocast)
    report = Report(env=environment(device, model))
    report.env["config"] = f"configs/{sizes.config or 'default.yaml'}" + (
        f" + {sizes.overrides}" if sizes.overrides else ""
    )
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [
        ("hipe_vs_floor", lambda: hipe_vs_floor(model, cfg, sizes, device, report)),
        ("one_tile", lambda: one_tile(model, cfg, device, report)),
        ("slides", lambda: slides(cfg, sizes, device, work, report)),
        ("demo", lambda: demo_slide(model, cfg, sizes, device, work, args.peak_tflops, report)),
    ]
    failed = []
    with tempfile.TemporaryDirectory(prefix="wsi-hipe-gpu-check-") as tmp:
        work = Path(tmp)
        for name, step in steps:
            t = time.perf_counter()
            try:
                step()
            except Exception as exc:  # report the others; the exit status says it failed
                failed.append(name)
                report.table(f"{name}: FAILED", ["error"], [[f"{type(exc).__name__}: {exc}"]])
                import traceback

                traceback.print_exc()
            print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            (args.out / "gpu_check.md").write_text(report.markdown(), encoding="utf-8")
    report.data["env"] = report.env
    report.data["failed"] = failed
    (args.out / "gpu_check.json").write_text(json.dumps(report.data, indent=2, default=str))
    print(report.markdown())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
