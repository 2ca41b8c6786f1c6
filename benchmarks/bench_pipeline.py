"""Whole-slide pipeline benchmarks: forward passes against the naive baseline, and flat memory.

``passes``
    One synthetic slide through :func:`wsi_hipe.pipeline.explain_slide` twice, in one run:

    - *pipeline*: tissue tiles only, HiPe skipped below the score floor (the configuration
      given, default the demo's);
    - *naive* (the HiPe authors' behaviour): the same HiPe settings on every tile of the grid
      (``tiling.min_tissue = 0``), no score floor (``score.floor = 0``) and no early stop
      (``hipe.early_stop = False``: the authors' code refines flat maps to the last depth).

    Reports forward passes, wall time and their ratios. Slides: ``dense`` (``write_slide``, the
    demo slide, tissue almost everywhere) and ``sparse`` (the same kind of tissue in a patch of
    a mostly empty slide, as whole slides usually are).

``rss``
    Peak resident memory of ``explain_slide`` on mostly-background slides of 20k² and 80k² px
    (a 2048² px synthetic tissue patch in an otherwise empty slide served lazily by a
    pyramid-aware in-memory reader), each in a fresh subprocess. Memory must stay flat: the
    pipeline streams tiles, the tissue label and the pyramid chunk by chunk.

Commands (see BENCHMARKS.md, "Pipeline")::

    .venv/bin/python benchmarks/bench_pipeline.py passes --model tiny
    .venv/bin/python benchmarks/bench_pipeline.py passes --model bundled --slides dense
    .venv/bin/python benchmarks/bench_pipeline.py rss

``--model tiny`` uses a fixed 5x5-convolution "segmenter" (cheap forward passes, so the naive
baseline finishes on a 2-core CPU); pass counts depend on the model only through the scores
and saliency, the times mostly through the cost of a pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger("bench_pipeline")


# --- models and slides ----------------------------------------------------------------------


def _tiny_model():
    """The tests' fixed 5×5-conv "segmenter" (tests/_pipeline_support.py), not a second copy."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _pipeline_support import tiny_model

    return tiny_model()


def _model(name: str):
    if name == "tiny":
        return _tiny_model()
    from wsi_hipe.models import load_model

    return load_model(name, device="cpu")


class SparseReader:
    """A mostly empty slide with one synthetic tissue patch, served lazily at any level.

    Implements :class:`wsi_hipe.slide.SlideReader`. Levels are factor-4 downsamples; the patch
    is rendered once at level 0 and box-averaged per level; everything else reads as black.
    """

    vendor = "sparse-benchmark"

    def __init__(self, size: int, *, patch: int = 2048, seed: int = 0, mpp: float = 0.5):
        from wsi_hipe.synthetic import render_region

        self.path = f"<sparse {size}x{size}>"
        self._size = int(size)
        self._mpp = float(mpp)
        self._origin = (self._size // 3, self._size // 3)
        image = render_region(0, 0, patch, patch, seed=seed, mpp=mpp).image
        self._patch = [np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)]
        self._downsamples = [1]
        while self._size / self._downsamples[-1] > 1024:
            d = self._downsamples[-1] * 4
            prev = self._patch[-1]
            h, w = prev.shape[0] // 4, prev.shape[1] // 4
            if h == 0:
                break
            self._patch.append(
                prev[: h * 4, : w * 4].reshape(h, 4, w, 4).mean(axis=(1, 3)).astype(np.uint8)
            )
            self._downsamples.append(d)

    @property
    def dimensions(self):
        return (self._size, self._size)

    @property
    def level_count(self):
        return len(self._downsamples)

    @property
    def level_dimensions(self):
        return tuple(
            (math.ceil(self._size / d), math.ceil(self._size / d)) for d in self._downsamples
        )

    @property
    def level_downsamples(self):
        return tuple(float(d) for d in self._downsamples)

    @property
    def mpp(self):
        return self._mpp

    def read_region(self, location, level, size):
        d = self._downsamples[level]
        w, h = size
        out = np.zeros((h, w, 4), dtype=np.uint8)
        out[..., 3] = 255
        lx, ly = location[0] // d, location[1] // d
        px, py = self._origin[0] // d, self._origin[1] // d
        patch = self._patch[level]
        x0, y0 = max(lx, px), max(ly, py)
        x1 = min(lx + w, px + patch.shape[1])
        y1 = min(ly + h, py + patch.shape[0])
        if x1 > x0 and y1 > y0:
            block = patch[y0 - py : y1 - py, x0 - px : x1 - px]
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx, :3] = block[..., None]
        return out

    def get_thumbnail(self, max_size):
        level = self.level_count - 1
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))[..., :3]

    def close(self):
        pass


# --- passes -----------------------------------------------------------------------------------


def _run(slide, out: Path, cfg, model) -> dict:
    from wsi_hipe import pipeline

    t0 = time.perf_counter()
    result = pipeline.explain_slide(slide, out, config=cfg, model=model, overwrite=True)
    seconds = time.perf_counter() - t0
    return {
        "tiles": result.tiles_total,
        "done": result.counts["done"],
        "skipped": result.counts["skipped"],
        "passes": result.forward_passes,
        "seconds": round(seconds, 1),
    }


def bench_passes(args) -> list[dict]:
    import torch

    from wsi_hipe.cli import DEMO_OVERRIDES
    from wsi_hipe.config import load_config
    from wsi_hipe.slide import open_slide
    from wsi_hipe.synthetic import write_slide

    torch.set_num_threads(1)
    overrides = dict(DEMO_OVERRIDES)
    cfg = load_config(args.config, overrides if args.config is None else None)
    naive_cfg = cfg.with_overrides(
        {"tiling.min_tissue": 0.0, "score.floor": 0.0, "hipe.early_stop": False}
    )
    model = _model(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        tmp = Path(tmp)
        slides = {}
        if "dense" in args.slides:
            path = tmp / "dense.tiff"
            write_slide(path, size=(2048, 1536), seed=args.seed, mpp=0.5, ground_truth=False)
            slides["dense 2048x1536 (write_slide)"] = lambda p=path: open_slide(p)
        if "sparse" in args.slides:
            slides["sparse 6144x6144, 2048² tissue patch"] = lambda: open_slide(
                SparseReader(6144, patch=2048, seed=args.seed)
            )
        for name, make in slides.items():
            ours = _run(make(), tmp / "ours.ome.zarr", cfg, model)
            naive = _run(make(), tmp / "naive.ome.zarr", naive_cfg, model)
            row = {
                "slide": name,
                "model": args.model,
                "pipeline": ours,
                "naive": naive,
                "pass_ratio": round(naive["passes"] / max(1, ours["passes"]), 2),
                "time_ratio": round(naive["seconds"] / max(1e-9, ours["seconds"]), 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print(
        "| slide | model | tiles (pipeline / naive) | HiPe run / skipped | passes pipeline | "
        "passes naive | pass ratio | s pipeline | s naive | time ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, n = r["pipeline"], r["naive"]
        print(
            f"| {r['slide']} | {r['model']} | {o['tiles']} / {n['tiles']} | "
            f"{o['done']} / {o['skipped']} | {o['passes']} | {n['passes']} | "
            f"{r['pass_ratio']}× | {o['seconds']} | {n['seconds']} | {r['time_ratio']}× |"
        )
    return rows


# --- memory -------------------------------------------------------------------------------------


def _vm(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_child(size: int, out: str, model_name: str) -> None:
    """Run in a fresh process: explain one sparse slide, print peak RSS as JSON."""
    import torch

    from wsi_hipe import pipeline
    from wsi_hipe.cli import DEMO_OVERRIDES
    from wsi_hipe.config import load_config
    from wsi_hipe.slide import open_slide

    torch.set_num_threads(1)
    model = _model(model_name)
    slide = open_slide(SparseReader(size, patch=2048))
    # Setting up (imports, rendering the tissue patch) has its own peak; reset the high-water
    # mark so that only the pipeline's own peak is measured (Linux: clear_refs 5 resets VmHWM).
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    result = pipeline.explain_slide(
        slide, out, config=load_config(overrides=DEMO_OVERRIDES), model=model, overwrite=True
    )
    peak = _vm("VmHWM")
    print(
        json.dumps(
            {
                "size": size,
                "grid": list(result.shape),
                "tiles": result.tiles_total,
                "passes": result.forward_passes,
                "seconds": round(time.perf_counter() - t0, 1),
                "rss_before_mib": round(before / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1),
                "peak_increase_mib": round((peak - before) / 1024, 1),
            }
        ),
        flush=True,
    )


def bench_rss(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        for size in args.sizes:
            out = str(Path(tmp) / f"s{size}.ome.zarr")
            cmd = [sys.executable, __file__, "_rss_child", str(size), out, args.model]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"child for {size} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    base = rows[0]["peak_rss_mib"]
    print()
    print(
        "| slide px | target grid | tissue tiles | passes | s | RSS before MiB | "
        "peak RSS MiB | vs first |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']}² | {r['grid'][0]}×{r['grid'][1]} | {r['tiles']} | {r['passes']} | "
            f"{r['seconds']} | {r['rss_before_mib']} | {r['peak_rss_mib']} | "
            f"{r['peak_rss_mib'] / base - 1:+.1%} |"
        )
    return rows


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_rss_child":
        _rss_child(int(argv[1]), argv[2], argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("passes", help="forward passes and time against the naive baseline")
    p.add_argument("--model", default="tiny", help="'tiny', 'bundled' or a model file")
    p.add_argument("--config", default=None, help="YAML config (default: the demo's settings)")
    p.add_argument("--slides", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("rss", help="peak RSS on 20k² and 80k² mostly-background slides")
    r.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    r.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.what == "passes":
        bench_passes(args)
    else:
        bench_rss(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
