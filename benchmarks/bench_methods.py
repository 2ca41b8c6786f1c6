"""Saliency quality and cost: HiPe vs Occlusion 16/8 vs RISE 2k/8k vs gradients, one run.

Runs :func:`wsi_hipe.evaluation.run_evaluation` (the bundled U-Net, expected lymphocyte area,
synthetic Hoechst tiles with lymphocyte ground truth) with the comparison of the issue and
prints a markdown report: the table, the pass ratios against HiPe and the goals

- HiPe ≥ 20× fewer forward passes than RISE-8000 and ≥ 3× fewer than Occlusion 16/8;
- HiPe's insertion AUC ≥ both of theirs and its deletion AUC ≤ both of theirs.

Every method runs in the same process on the same tiles, so the ratios are comparable even on
a shared machine (absolute seconds are not). RISE-8000 on a 256² tile with a ~30 ms model is
minutes per tile on a CPU; run it in the background::

    nohup .venv/bin/python benchmarks/bench_methods.py --tiles 3 --size 256 --threads 2 \
        --out benchmarks/results/methods > benchmarks/results/methods.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from wsi_hipe.evaluation import DEFAULT_METHODS, run_evaluation

REPO = Path(__file__).resolve().parents[1]


def _goals(summary: list[dict]) -> list[str]:
    by = {row["method"]: row for row in summary}
    hipe = by.get("hipe")
    lines = []
    if hipe is None:
        return ["(no HiPe row: goals not checked)"]
    for name, factor in (("rise 8000", 20.0), ("occlusion 16/8", 3.0)):
        other = by.get(name)
        if other is None:
            continue
        ratio = other["forward_passes"] / hipe["forward_passes"]
        ok = "met" if ratio >= factor else "NOT met"
        lines.append(f"- passes: {name} / HiPe = {ratio:.1f}× (goal ≥ {factor:.0f}×): {ok}")
        ins_ok = "met" if hipe["insertion_auc"] >= other["insertion_auc"] else "NOT met"
        del_ok = "met" if hipe["deletion_auc"] <= other["deletion_auc"] else "NOT met"
        lines.append(
            f"- insertion AUC: HiPe {hipe['insertion_auc']:.3f} vs {name} "
            f"{other['insertion_auc']:.3f} (goal ≥): {ins_ok}"
        )
        lines.append(
            f"- deletion AUC: HiPe {hipe['deletion_auc']:.3f} vs {name} "
            f"{other['deletion_auc']:.3f} (goal ≤): {del_ok}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=3, help="synthetic tiles")
    parser.add_argument("--size", type=int, default=256, help="tile side, px")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--step-fraction", type=float, default=0.01)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--target",
        choices=("tile", "cell"),
        default="tile",
        help="explain the tile's lymphocyte area, or one lymphocyte's (a sparse target)",
    )
    parser.add_argument("--no-rise-8000", action="store_true", help="skip the slowest row")
    parser.add_argument(
        "--hipe-substrates",
        default="",
        help="extra HiPe rows with these substrates, e.g. fade,blur (the default row: mean)",
    )
    parser.add_argument(
        "--deletion-substrate",
        default="fade",
        help="what deleted pixels become (fade, mean, blur): a map made with the metric's own "
        "substrate is favoured by it, so vary it",
    )
    parser.add_argument("--insertion-substrate", default="blur")
    parser.add_argument("--out", type=Path, default=None, help="folder for md/csv/json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    # Cheapest first, so the log holds complete rows early if a long run is cut short.
    cost = {"gradient": 0, "integrated_gradients": 1, "hipe": 2, "occlusion": 3, "rise": 4}
    methods = [
        {"name": m.name, "method": m.method, "options": dict(m.options)}
        for m in sorted(DEFAULT_METHODS, key=lambda m: cost.get(m.method, 9))
        if not (args.no_rise_8000 and m.name == "rise 8000")
    ]
    at = next(i for i, m in enumerate(methods) if m["method"] == "hipe") + 1
    for sub in [s.strip() for s in args.hipe_substrates.split(",") if s.strip()]:
        methods.insert(
            at, {"name": f"hipe ({sub})", "method": "hipe", "options": {"substrate": sub}}
        )
        at += 1
    overrides = {
        "model": args.model,
        "target": args.target,
        "device": args.device,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "tiles.n": args.tiles,
        "tiles.size": args.size,
        "tiles.first_seed": args.first_seed,
        "metrics.step_fraction": args.step_fraction,
        "metrics.deletion_substrate": args.deletion_substrate,
        "metrics.insertion_substrate": args.insertion_substrate,
        "methods": methods,
    }
    t0 = time.perf_counter()
    result = run_evaluation(None, overrides=overrides)
    elapsed = time.perf_counter() - t0

    cmd = "python benchmarks/bench_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        f"`{cmd.strip()}` — target {args.target}, {args.tiles} synthetic tile(s) of {args.size}² px; "
        f"insertion from {args.insertion_substrate}, deletion to {args.deletion_substrate} "
        f"({', '.join(result.settings['samples'])}), device {result.settings['device']}, "
        f"{args.threads} torch thread(s), batch {args.batch_size}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, model sha256 {str(result.settings.get('model_sha256'))[:12]}; "
        f"total {elapsed / 60:.1f} min.",
        "",
    ]
    report = "\n".join(header) + result.to_markdown() + "\n" + "\n".join(_goals(result.summary))
    print(report)
    if args.out is not None:
        paths = result.save(args.out)
        (args.out / "report.md").write_text(report + "\n", encoding="utf-8")
        (args.out / "settings.json").write_text(
            json.dumps(result.settings, indent=2, default=str), encoding="utf-8"
        )
        print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
