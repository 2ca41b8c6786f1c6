"""How well the demo's stitched maps localise lymphocytes at slide scale (issue 17, item 3).

Reads ``wsi-hipe demo`` outputs (each folder holds ``demo_slide.tiff`` with its ground truth
and ``demo.ome.zarr``) and reports, per output, the slide-level localisation columns of
``wsi_hipe.evaluation`` on the whole demo slide: AUROC of the saliency for lymphocyte pixels
against other nuclei pixels, relevance mass (share of the saliency on lymphocytes) with its
chance level, Spearman of per-tile saliency with per-tile lymphocyte area, the rank of the tile
with the most lymphocyte area, passes per tile and the finest HiPe cell.

Usage (the settings are the run's; ``--config`` YAMLs give other HiPe settings)::

    wsi-hipe demo --out /tmp/demo_a                  # the demo's settings
    wsi-hipe demo --out /tmp/demo_b -c other.yaml
    .venv/bin/python benchmarks/bench_demo_maps.py /tmp/demo_a /tmp/demo_b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def demo_maps(folder: Path) -> dict:
    import tifffile

    from wsi_hipe import metrics
    from wsi_hipe.omezarr import read_output

    view = read_output(folder / "demo.ome.zarr")
    sal = np.asarray(view.saliency[0], dtype=np.float64)
    lymph = tifffile.imread(folder / "demo_slide.lymphocytes.tiff") > 0
    nuclei = tifffile.imread(folder / "demo_slide.nuclei.tiff") > 0
    tissue = tifffile.imread(folder / "demo_slide.tissue.tiff") > 0
    if lymph.shape != sal.shape:  # the output is at tiling.mpp; the demo slide is at 0.5 µm/px
        raise SystemExit(f"{folder}: ground truth {lymph.shape} vs saliency {sal.shape}")
    config = view.provenance["config"]
    tile = int(config["tiling"]["tile_size"])
    side = tile + 2 * int(config["tiling"]["halo"])
    h = config["hipe"]
    finest = side / (int(h["start_grid"]) * 2 ** (int(h["max_depth"]) - 1))
    per_tile, area, passes = [], [], []
    for t in view.tiles:
        if t["status"] not in ("done", "skipped"):
            continue
        cells = (slice(t["y"], t["y"] + tile), slice(t["x"], t["x"] + tile))
        per_tile.append(float(sal[cells].sum()))
        area.append(float(lymph[cells].sum()))
        passes.append(int(t["passes"]))
    per_tile, area = np.asarray(per_tile), np.asarray(area)
    densest = int(np.argmax(area))
    return {
        "folder": str(folder),
        "setting": f"{h['substrate']} · {h['threshold']} · {h['start_grid']}×{h['max_depth']}",
        "finest_cell_px": finest,
        "auroc": metrics.auroc(sal, lymph, nuclei & ~lymph),
        "relevance_mass": metrics.relevance_mass(sal, lymph),
        "mass_chance": float(lymph[tissue].sum() / tissue.sum()),
        "tile_spearman": metrics.spearman(per_tile, area),
        "densest_rank": 1 + int(np.sum(per_tile > per_tile[densest])),
        "tiles": len(per_tile),
        "passes_per_tile": float(np.mean(passes)),
        "passes": int(np.sum(passes)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    args = parser.parse_args(argv)
    print(
        "| setting | finest cell px | AUROC ↑ | mass ↑ (chance) | tile ρ ↑ | densest rank ↓ "
        "| passes/tile | passes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for folder in args.folders:
        r = demo_maps(folder)
        print(
            f"| {r['setting']} | {r['finest_cell_px']:.1f} | {r['auroc']:.3f} "
            f"| {r['relevance_mass']:.3f} ({r['mass_chance']:.3f}) | {r['tile_spearman']:.3f} "
            f"| {r['densest_rank']} of {r['tiles']} | {r['passes_per_tile']:.0f} | {r['passes']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
