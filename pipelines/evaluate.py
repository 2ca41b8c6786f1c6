"""Saliency-quality evaluation: HiPe vs baselines on synthetic Hoechst tiles.

A thin script over :func:`wsi_hipe.evaluation.run_evaluation`; writes ``summary.md``,
``summary.csv`` and ``per_sample.csv`` into ``--out`` and prints the markdown table::

    python pipelines/evaluate.py --config configs/evaluate.yaml --out results/evaluate \
        --set tiles.n=2 --set tiles.size=128
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from wsi_hipe.errors import WsiHipeError
from wsi_hipe.evaluation import run_evaluation


def _parse_set(items: list[str]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. tiles.n=2), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML (configs/evaluate.yaml)")
    parser.add_argument("--out", type=Path, default=Path("evaluate-results"), help="output folder")
    parser.add_argument("--model", default=None, help="model spec (overrides the config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        result = run_evaluation(args.config, model=args.model, overrides=_parse_set(args.set))
    except WsiHipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = result.save(args.out)
    (args.out / "settings.json").write_text(
        json.dumps(result.settings, indent=2, default=str), encoding="utf-8"
    )
    print(result.to_markdown())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
