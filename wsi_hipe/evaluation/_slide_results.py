"""What a slide-level evaluation measured (:class:`SlideEvaluationResult`) and its tables."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.evaluation._results import nanmean

__all__ = [
    "FAITHFULNESS_COLUMNS",
    "SANITY_COLUMNS",
    "SLIDE_COLUMNS",
    "SUMMARY_COLUMNS",
    "SlideEvaluationResult",
    "load_slide_results",
]

#: One row per (slide, setting): localisation and cost over the whole slide.
SLIDE_COLUMNS = (
    "slide",
    "density",
    "seed",
    "setting",
    "substrate",
    "threshold",
    "start_grid",
    "max_depth",
    "finest_cell_px",
    "tissue_tiles",
    "explained_tiles",
    "auroc",
    "relevance_mass",
    "mass_chance",
    "tile_spearman",
    "densest_rank",
    "densest_share_ratio",
    "class_in_blank_tiles",
    "passes_per_tile",
    "seconds_per_tile",
    "cpu_seconds_per_tile",
)
#: One row per (slide, tile, setting, metric substrate); ``setting`` "random" is the control.
FAITHFULNESS_COLUMNS = (
    "slide",
    "tile",
    "class_area_px",
    "setting",
    "metric_substrate",
    "insertion_auc",
    "deletion_auc",
)
#: One row per (slide, setting, stage); stage "random model" is the data-randomisation check.
SANITY_COLUMNS = ("slide", "tile", "setting", "stage", "spearman", "flat")
#: One row per setting: means over slides (and faithfulness per metric substrate).
SUMMARY_COLUMNS = (
    "setting",
    "slides",
    "finest_cell_px",
    "auroc",
    "relevance_mass",
    "mass_chance",
    "tile_spearman",
    "densest_rank",
    "class_in_blank_tiles",
    "passes_per_tile",
    "seconds_per_tile",
    "cpu_seconds_per_tile",
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def _nanmedian(values: Sequence[float | None]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.median(vals)) if vals else float("nan")


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in columns})
    return buf.getvalue()


def _ordered(keys: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for k in keys:
        seen.setdefault(k, None)
    return list(seen)


@dataclass
class SlideEvaluationResult:
    """Everything a slide-level evaluation measured.

    Attributes
    ----------
    slides : list of dict
        :data:`SLIDE_COLUMNS` per (slide, setting).
    faithfulness : list of dict
        :data:`FAITHFULNESS_COLUMNS` per (slide, tile, setting, metric substrate).
    sanity : list of dict
        :data:`SANITY_COLUMNS` per (slide, setting, randomisation stage).
    settings : dict
        The resolved configuration, the pipeline configuration, the model's sha256, the slides.
    maps : dict
        ``(slide, setting) -> (H, W) float32`` stitched maps (only with ``keep_maps``).
    """

    slides: list[dict[str, Any]] = field(default_factory=list)
    faithfulness: list[dict[str, Any]] = field(default_factory=list)
    sanity: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    # --- summaries ------------------------------------------------------------------------

    def summary(self, *, density: str | None = None) -> list[dict[str, Any]]:
        """One row per setting (:data:`SUMMARY_COLUMNS`): means over its slides (of
        ``density`` only, when given); ``densest_rank`` is the mean rank (1 = the tile with
        the most class area got the most saliency)."""
        rows = [r for r in self.slides if density is None or r["density"] == density]
        out = []
        for key in _ordered(r["setting"] for r in rows):
            mine = [r for r in rows if r["setting"] == key]
            row = {"setting": key, "slides": len(mine), "finest_cell_px": mine[0]["finest_cell_px"]}
            for col in SUMMARY_COLUMNS[3:]:
                row[col] = nanmean([r.get(col) for r in mine])
            out.append(row)
        return out

    def faithfulness_summary(self) -> list[dict[str, Any]]:
        """Median insertion/deletion AUC per (setting, metric substrate) over the tiles.

        Medians, not means: the curves are divided by the clean score, and on a tile with
        one or two lymphocytes a substrate that itself looks like lymphocytes to the model
        (``mean``, ``blur`` of packed nuclei) scores many times the clean tile, which would
        swamp a mean."""
        out = []
        pairs = _ordered(f"{r['setting']}\t{r['metric_substrate']}" for r in self.faithfulness)
        for pair in pairs:
            setting, sub = pair.split("\t")
            mine = [
                r
                for r in self.faithfulness
                if r["setting"] == setting and r["metric_substrate"] == sub
            ]
            out.append(
                {
                    "setting": setting,
                    "metric_substrate": sub,
                    "tiles": len(mine),
                    "insertion_auc": _nanmedian([r["insertion_auc"] for r in mine]),
                    "deletion_auc": _nanmedian([r["deletion_auc"] for r in mine]),
                }
            )
        return out

    def sanity_summary(self) -> list[dict[str, Any]]:
        """Mean Spearman per (setting, stage) over the sanity tiles (a flat map counts 0)."""
        out = []
        pairs = _ordered(f"{r['setting']}\t{r['stage']}" for r in self.sanity)
        for pair in pairs:
            setting, stage = pair.split("\t")
            mine = [r for r in self.sanity if r["setting"] == setting and r["stage"] == stage]
            out.append(
                {
                    "setting": setting,
                    "stage": stage,
                    "tiles": len(mine),
                    "spearman": nanmean([r["spearman"] for r in mine]),
                    "flat": sum(bool(r["flat"]) for r in mine),
                }
            )
        return out

    # --- tables ---------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """Localisation and cost per setting, faithfulness per metric substrate, sanity per
        stage, as markdown tables."""
        lines = [
            "Localisation and cost (means over slides; AUROC: class vs other-nuclei pixels; "
            "mass: share of the saliency on class pixels, chance = class share of the tissue; "
            "tile ρ: Spearman of per-tile saliency with per-tile class area; densest rank: "
            "rank of the tile with the most class area by saliency, 1 = first; blank: share "
            "of class pixels in tiles left without saliency)",
            "",
            "| setting | cells px | slides | AUROC ↑ | mass ↑ | chance | tile ρ ↑ "
            "| densest rank ↓ | blank ↓ | passes/tile ↓ | CPU s/tile |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.summary():
            lines.append(
                f"| {r['setting']} | {_fmt(r['finest_cell_px'], 0)} | {r['slides']} "
                f"| {_fmt(r['auroc'])} | {_fmt(r['relevance_mass'])} | {_fmt(r['mass_chance'])} "
                f"| {_fmt(r['tile_spearman'])} | {_fmt(r['densest_rank'], 2)} "
                f"| {_fmt(r['class_in_blank_tiles'])} | {_fmt(r['passes_per_tile'], 0)} "
                f"| {_fmt(r['cpu_seconds_per_tile'], 1)} |"
            )
        densities = _ordered(r["density"] for r in self.slides)
        if len(densities) > 1:
            lines += [
                "",
                "Per density (AUROC / tile ρ / densest rank)",
                "",
                "| setting | " + " | ".join(densities) + " |",
                "|---|" + "---:|" * len(densities),
            ]
            tables = {d: {r["setting"]: r for r in self.summary(density=d)} for d in densities}
            for key in _ordered(r["setting"] for r in self.slides):
                cells = []
                for d in densities:
                    r = tables[d].get(key)
                    cells.append(
                        "n/a"
                        if r is None
                        else f"{_fmt(r['auroc'])} / {_fmt(r['tile_spearman'], 2)} / "
                        f"{_fmt(r['densest_rank'], 1)}"
                    )
                lines.append(f"| {key} | " + " | ".join(cells) + " |")
        if self.faithfulness:
            subs = _ordered(r["metric_substrate"] for r in self.faithfulness)
            lines += [
                "",
                "Faithfulness on tiles (medians over tiles of insertion AUC ↑ / deletion AUC ↓, "
                "per metric substrate; 'random' ranks the pixels at random: the chance level)",
                "",
                "| setting | " + " | ".join(f"{s}: ins ↑ / del ↓" for s in subs) + " |",
                "|---|" + "---:|" * len(subs),
            ]
            table = {(r["setting"], r["metric_substrate"]): r for r in self.faithfulness_summary()}
            for setting in _ordered(r["setting"] for r in self.faithfulness):
                cells = []
                for s in subs:
                    row = table.get((setting, s))
                    cells.append(
                        "n/a"
                        if row is None
                        else f"{_fmt(row['insertion_auc'])} / {_fmt(row['deletion_auc'])}"
                    )
                lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        if self.sanity:
            stages = _ordered(r["stage"] for r in self.sanity)
            lines += [
                "",
                "Sanity: Spearman of the map with the trained model's map after cascading "
                "randomisation (cumulative, head first) and for a random model (means over "
                "tiles; ↓ = the map depends on the model; a flat map — the randomised model's "
                "score no longer moves — counts 0, and (n flat) says how many there were)",
                "",
                "| setting | " + " | ".join(stages) + " |",
                "|---|" + "---:|" * len(stages),
            ]
            table = {(r["setting"], r["stage"]): r for r in self.sanity_summary()}
            for setting in _ordered(r["setting"] for r in self.sanity):
                cells = []
                for st in stages:
                    row = table.get((setting, st))
                    if row is None:
                        cells.append("n/a")
                        continue
                    flat = f" ({row['flat']} flat)" if row["flat"] else ""
                    cells.append(_fmt(row["spearman"], 2) + flat)
                lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``slide_summary.md``, ``slides.csv``, ``faithfulness.csv``, ``sanity.csv``,
        ``summary.csv`` and ``settings.json`` into ``out_dir``; returns the paths by kind."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "markdown": out / "slide_summary.md",
            "slides": out / "slides.csv",
            "faithfulness": out / "faithfulness.csv",
            "sanity": out / "sanity.csv",
            "summary": out / "summary.csv",
            "settings": out / "settings.json",
        }
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        paths["slides"].write_text(_csv(self.slides, SLIDE_COLUMNS), encoding="utf-8")
        paths["faithfulness"].write_text(
            _csv(self.faithfulness, FAITHFULNESS_COLUMNS), encoding="utf-8"
        )
        paths["sanity"].write_text(_csv(self.sanity, SANITY_COLUMNS), encoding="utf-8")
        paths["summary"].write_text(_csv(self.summary(), SUMMARY_COLUMNS), encoding="utf-8")
        paths["settings"].write_text(
            json.dumps(self.settings, indent=2, default=str) + "\n", encoding="utf-8"
        )
        return paths


def _add_unit(result: SlideEvaluationResult, unit: str, rows: list[dict[str, Any]]) -> None:
    """File one recorded unit's rows (see ``records.jsonl``) into ``result``'s tables."""
    kind = unit.split("\t", 1)[0]
    if kind == "sanity":
        result.sanity += rows
    elif kind == "random":
        result.faithfulness += rows
    else:
        for r in rows:
            clean = {k: v for k, v in r.items() if k != "kind"}
            (result.slides if r.get("kind") == "slide" else result.faithfulness).append(clean)


def load_slide_results(*folders: str | Path) -> SlideEvaluationResult:
    """The tables recorded in the ``records.jsonl`` of one or more slide-evaluation folders.

    Runs split over several processes or machines (e.g. one per seed) are merged this way;
    a unit recorded twice counts once (the last record wins).

    Raises
    ------
    FileNotFoundError
        A folder without ``records.jsonl``.
    """
    units: dict[str, list[dict[str, Any]]] = {}
    settings: dict[str, Any] = {"folders": [str(f) for f in folders]}
    for folder in folders:
        path = Path(folder) / "records.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a slide-evaluation folder")
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                unit = json.loads(line)
            except ValueError:
                continue  # a line cut short by an interrupted run
            units[unit["unit"]] = unit["rows"]
        meta = Path(folder) / "settings.json"
        if meta.is_file() and "config" not in settings:
            settings.update(json.loads(meta.read_text(encoding="utf-8")))
    result = SlideEvaluationResult(settings=settings)
    for unit, rows in units.items():
        _add_unit(result, unit, rows)
    return result
