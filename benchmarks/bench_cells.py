"""Per-cell explanations: every lymphocyte of a tile in one vector run vs one run per cell.

``vector``
    The demo slide (``write_slide(size=(2048, 1536), seed=0)``, the bundled U-Net, the demo's
    settings ``wsi_hipe.cli.DEMO_OVERRIDES`` unless ``--full-depth``). For the first ``--tiles``
    tissue tiles whose core holds lymphocytes, three ways in one run:

    - *tile*: today's tile map alone (HiPe on the tile's core area);
    - *vector*: :func:`wsi_hipe.cells.explain_cells`, the tile's score and every owned cell
      above the floor as one ``(B, 1 + K)`` target: the tile map and all cell maps in the union of
      their passes;
    - *per cell*: one HiPe run per explained cell on its own score (what explaining the cells
      one click at a time costs).

    Reports passes and wall time per tile and in total, the ratios per-cell / vector and
    vector / tile (the price of ``--cells`` over a plain run), cells per second, and the largest
    relative difference between a cell's summary from the vector run and from its own run.

``rss``
    Peak resident memory of ``explain_slide`` with and without ``cells=True`` on the mostly
    empty 20k² and 80k² slides of ``bench_pipeline.py rss`` (a 2048² synthetic tissue patch,
    served lazily), each run in a fresh process, the demo's settings. With cells, memory must
    stay flat too: only one tile's rows travel, the label repaint and the table consolidation
    read a few tiles at a time.

Usage::

    .venv/bin/python benchmarks/bench_cells.py vector [--tiles 8] [--full-depth] [--threads 2]
    .venv/bin/python benchmarks/bench_cells.py rss [--sizes 20000 80000] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def _setup(full_depth: bool):
    from wsi_hipe.cli import DEMO_OVERRIDES
    from wsi_hipe.config import load_config
    from wsi_hipe.models import load_model
    from wsi_hipe.slide import open_slide
    from wsi_hipe.synthetic import write_slide
    from wsi_hipe.tiling import make_grid

    overrides = {k: v for k, v in DEMO_OVERRIDES.items() if not k.startswith("hipe.")}
    cfg = load_config(overrides=DEMO_OVERRIDES if not full_depth else overrides)
    folder = Path(tempfile.mkdtemp(prefix="bench_cells_"))
    synth = write_slide(folder / "demo.tiff", size=(2048, 1536), seed=0)
    slide = open_slide(synth.path)
    tissue = slide.detect_tissue()
    grid = make_grid(
        slide.dimensions, slide_mpp=float(slide.mpp), target_mpp=cfg.tiling.mpp,
        tile_size=cfg.tiling.tile_size, halo=cfg.tiling.halo, tissue=tissue,
        min_tissue=cfg.tiling.min_tissue,
    )  # fmt: skip
    return cfg, load_model("bundled"), slide, grid


def _hipe_options(cfg) -> dict:
    h = cfg.hipe
    return {
        "substrate": h.substrate, "threshold": h.threshold, "batch_size": h.batch_size,
        "max_depth": h.max_depth, "min_cell_size": h.min_cell_size, "start_grid": h.start_grid,
    }  # fmt: skip


def bench_vector(args) -> dict:
    from wsi_hipe import hierarchical_perturbation
    from wsi_hipe.cells import cell_scores, explain_cells, summarize, um_to_px
    from wsi_hipe.scores import make_score

    torch.set_num_threads(args.threads)
    cfg, model, slide, grid = _setup(args.full_depth)
    hipe = _hipe_options(cfg)
    side, halo, mpp = grid.window, grid.halo, cfg.tiling.mpp
    rows, totals = [], {"tile": [0, 0.0], "vector": [0, 0.0], "per_cell": [0, 0.0]}
    worst = 0.0
    n_cells = 0
    tiles = list(grid.tiles)
    if args.tiles and args.tiles < len(tiles):  # evenly spaced: border and inner tiles alike
        tiles = [tiles[i] for i in np.linspace(0, len(tiles) - 1, args.tiles).round().astype(int)]
    for tile in tiles:
        x0, y0, w, h = grid.read_window(tile)
        x = torch.from_numpy(np.ascontiguousarray(slide.read(x0, y0, w, h, mpp=mpp)))[None]
        with torch.inference_mode():
            logits = model(x[None])
            seg = model.segment(x[None], logits=logits)[0].numpy()
        ch, cw = tile.core
        region = np.zeros((side, side), np.float32)
        region[halo : halo + ch, halo : halo + cw] = 1.0  # the pipeline's tile score region
        tile_score = make_score(model, "area", class_index=cfg.score.class_index, region=region)
        if float(tile_score.from_logits(logits)[0]) <= cfg.score.floor:
            continue
        t = time.perf_counter()
        alone = hierarchical_perturbation(tile_score, x, **hipe)
        t_tile = time.perf_counter() - t
        t = time.perf_counter()
        out = explain_cells(
            model, x, logits, seg, class_index=cfg.score.class_index,
            core=(halo, halo, ch, cw), mpp=mpp, floor=cfg.score.floor, tile_score=tile_score,
            hipe=hipe,
        )  # fmt: skip
        t_vector = time.perf_counter() - t
        done = np.nonzero(out.status == "done")[0]
        if done.size == 0:
            continue
        t = time.perf_counter()
        passes = 0
        for k in done:
            single = cell_scores(model, (out.regions == k + 1).astype(np.int32))
            res = hierarchical_perturbation(lambda b, f=single: f(b)[:, 0], x, **hipe)
            passes += res.forward_passes
            ref = summarize(res.saliency.numpy()[None], out.cells.select([k]),
                            ring=um_to_px(3.0, mpp))  # fmt: skip
            for name in ("total", "inside", "ring"):
                a, b = getattr(out.summary, name)[k], getattr(ref, name)[0]
                worst = max(worst, abs(a - b) / max(abs(b), 1e-9))
        t_cells = time.perf_counter() - t
        n_cells += int(done.size)
        row = {
            "tile": tile.index, "cells": int(done.size), "tile_passes": alone.forward_passes,
            "vector_passes": out.forward_passes, "per_cell_passes": passes,
            "tile_s": round(t_tile, 2), "vector_s": round(t_vector, 2),
            "per_cell_s": round(t_cells, 2),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        for key, p, s in (
            ("tile", alone.forward_passes, t_tile),
            ("vector", out.forward_passes, t_vector),
            ("per_cell", passes, t_cells),
        ):
            totals[key][0] += p
            totals[key][1] += s
    summary = {
        "tiles": len(rows), "cells": n_cells, "settings": "full depth" if args.full_depth else "demo",
        **{f"{k}_passes": v[0] for k, v in totals.items()},
        **{f"{k}_s": round(v[1], 1) for k, v in totals.items()},
        "per_cell_over_vector_passes": round(totals["per_cell"][0] / max(totals["vector"][0], 1), 2),
        "per_cell_over_vector_time": round(totals["per_cell"][1] / max(totals["vector"][1], 1e-9), 2),
        "vector_over_tile_passes": round(totals["vector"][0] / max(totals["tile"][0], 1), 2),
        "vector_over_tile_time": round(totals["vector"][1] / max(totals["tile"][1], 1e-9), 2),
        "cells_per_s_vector": round(n_cells / max(totals["vector"][1], 1e-9), 2),
        "max_rel_diff_summaries": float(f"{worst:.2e}"),
    }  # fmt: skip
    print(json.dumps(summary), flush=True)
    return summary


def _bench_pipeline():
    """benchmarks/bench_pipeline.py as a module (its sparse slide, models and /proc helpers)."""
    import importlib.util

    path = Path(__file__).with_name("bench_pipeline.py")
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss_child(size: int, out: str, model_name: str, cells: bool) -> None:
    """In a fresh process: one sparse slide, with or without cells; peak RSS as JSON."""
    from wsi_hipe import pipeline
    from wsi_hipe.cli import DEMO_OVERRIDES
    from wsi_hipe.config import load_config
    from wsi_hipe.slide import open_slide

    bp = _bench_pipeline()
    torch.set_num_threads(1)
    model = bp._model(model_name)
    slide = open_slide(bp.SparseReader(size, patch=2048))
    before = bp._vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
    t0 = time.perf_counter()
    result = pipeline.explain_slide(
        slide, out, config=load_config(overrides=DEMO_OVERRIDES), model=model, overwrite=True,
        cells=cells,
    )  # fmt: skip
    peak = bp._vm("VmHWM")
    row = {
        "size": size, "cells": result.cells, "tiles": result.tiles_total,
        "passes": result.forward_passes, "seconds": round(time.perf_counter() - t0, 1),
        "rss_before_mib": round(before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
    }  # fmt: skip
    print(json.dumps(row), flush=True)


def bench_rss(args) -> list[dict]:
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cells-rss-") as tmp:
        for size in args.sizes:
            for cells in (False, True):
                out = str(Path(tmp) / f"s{size}-{int(cells)}.ome.zarr")
                cmd = [sys.executable, __file__, "_rss_child", str(size), out, args.model,
                       str(int(cells))]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(f"child {size} cells={cells} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| slide px | cells | tissue tiles | passes | s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = "—" if r["cells"] is None else r["cells"]
        print(f"| {r['size']}² | {cells} | {r['tiles']} | {r['passes']} | {r['seconds']} | "
              f"{r['peak_rss_mib']} |")  # fmt: skip
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vector", help="one vector run vs one run per cell")
    v.add_argument("--tiles", type=int, default=8, help="evenly spaced tissue tiles (0: all)")
    v.add_argument("--full-depth", action="store_true", help="the default HiPe settings")
    v.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("rss", help="peak memory with and without cells on sparse slides")
    r.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    r.add_argument("--model", default="tiny", choices=["tiny", "bundled"])
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_rss_child":
        _rss_child(int(sys.argv[2]), sys.argv[3], sys.argv[4], bool(int(sys.argv[5])))
        return 0
    args = p.parse_args(argv)
    if args.cmd == "vector":
        bench_vector(args)
    elif args.cmd == "rss":
        bench_rss(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
