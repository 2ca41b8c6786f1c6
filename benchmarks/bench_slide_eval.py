"""Slide-level evaluation of HiPe settings: the table that chose the pipeline's defaults.

Runs :func:`wsi_hipe.evaluation.run_slide_evaluation` (``configs/evaluate_slide.yaml`` plus
``--set`` overrides) and prints its markdown tables with the machine, the model and the run's
CPU and wall time. The run resumes from ``--out`` (every finished slide × setting is recorded
there), so a long grid can be split across processes, one per seed, and merged afterwards::

    for s in 0 1 2; do
      nohup .venv/bin/python benchmarks/bench_slide_eval.py --out /tmp/se-s$s \\
          --set slides.seeds=[$s] > /tmp/se-s$s.log 2>&1 &
    done
    .venv/bin/python benchmarks/bench_slide_eval.py --merge /tmp/se-s0 /tmp/se-s1 /tmp/se-s2

On this project's 2-core CPU the default grid (9 slides of 1024², 5 substrates at one depth,
MPRT on the three seed-0 slides) is a few hours of CPU; ``--set`` narrows it
(``--set grid.substrates=[fade,background] --set slides.seeds=[0]``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml

from wsi_hipe.evaluation import load_slide_results, run_slide_evaluation

REPO = Path(__file__).resolve().parents[1]


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. slides.seeds=[0]), got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "evaluate_slide.yaml")
    parser.add_argument("--out", type=Path, default=None, help="results folder (resumes)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--maps", action="store_true", help="keep every stitched map (.npy)")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="print the tables of these folders"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("wsi_hipe.slide", "wsi_hipe.synthetic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.merge:
        result = load_slide_results(*args.merge)
        print(result.to_markdown())
        for density in ("sparse", "clustered", "dense"):
            rows = result.summary(density=density)
            if rows:
                print(
                    f"\n{density}: "
                    + "; ".join(
                        f"{r['setting']}: AUROC {r['auroc']:.3f}, tile ρ {r['tile_spearman']:.3f}, "
                        f"densest rank {r['densest_rank']:.2f}"
                        for r in rows
                    )
                )
        return 0

    t0, c0 = time.perf_counter(), time.process_time()
    result = run_slide_evaluation(
        args.config,
        out=args.out,
        overrides=_overrides(args.sets),
        keep_maps=args.maps,
        progress=lambda done, total: print(f"progress {done}/{total}", flush=True),
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cmd = "python benchmarks/bench_slide_eval.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(
        f"`{cmd.strip()}` — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), model sha256 {str(result.settings.get('model_sha256'))[:12]}; "
        f"CPU {cpu / 60:.1f} min, wall {wall / 60:.1f} min\n"
    )
    print(result.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
