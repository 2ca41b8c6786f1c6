"""The rows of an evaluation (methods, samples) and what it measured (:class:`EvaluationResult`)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_hipe import baselines, metrics

__all__ = [
    "DEFAULT_METHODS",
    "RECORD_COLUMNS",
    "SUMMARY_COLUMNS",
    "EvaluationResult",
    "Forward",
    "MethodSpec",
    "Sample",
    "nanmean",
]

Forward = Callable[[torch.Tensor], torch.Tensor]

#: Columns of the per-(sample, method) table, in order.
RECORD_COLUMNS = (
    "sample",
    "method",
    "forward_passes",
    "seconds",
    "insertion_auc",
    "deletion_auc",
    "pointing_hit",
    "pointing_distance_px",
    "relevance_mass",
    "clean_score",
)
#: Columns of the per-method summary (means over samples; the hit rate over samples with GT).
SUMMARY_COLUMNS = (
    "method",
    "samples",
    "forward_passes",
    "seconds",
    "insertion_auc",
    "deletion_auc",
    "pointing_hit_rate",
    "relevance_mass",
)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a label, a :data:`wsi_hipe.baselines.METHODS` name, options.

    Attributes
    ----------
    name : str
        Label in the tables, e.g. ``"occlusion 16/8"``.
    method : str
        One of :data:`wsi_hipe.baselines.METHODS`.
    options : dict
        Keyword options of that method (``batch_size`` is filled in when the method takes one).
    """

    name: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in baselines.METHODS:
            raise ValueError(
                f"method {self.method!r} of {self.name!r} is not one of {list(baselines.METHODS)}"
            )


#: The comparison of the issue: HiPe vs occlusion 16/8 vs RISE 2k/8k vs gradients.
DEFAULT_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("hipe", "hipe", {}),
    MethodSpec("occlusion 16/8", "occlusion", {"window": 16, "stride": 8}),
    MethodSpec("rise 2000", "rise", {"n_masks": 2000}),
    MethodSpec("rise 8000", "rise", {"n_masks": 8000}),
    MethodSpec("gradient", "gradient", {}),
    MethodSpec("integrated gradients", "integrated_gradients", {"n_steps": 32}),
)


@dataclass(frozen=True)
class Sample:
    """One evaluation input.

    Attributes
    ----------
    name : str
        Identifier in the tables (e.g. ``"tile seed 3"``).
    x : (C, H, W) float32 tensor
        The model input.
    ground_truth : (H, W) int ndarray
        Instance labels of what the score is about (0 = none), e.g. lymphocytes.
    forward : callable, optional
        This sample's own scalar score (e.g. the area of one cell); None = the ``forward``
        given to :func:`evaluate_samples`.
    """

    name: str
    x: torch.Tensor
    ground_truth: np.ndarray
    forward: Forward | None = None


@dataclass
class EvaluationResult:
    """Everything one evaluation measured.

    Attributes
    ----------
    records : list of dict
        One row per (sample, method) with :data:`RECORD_COLUMNS`.
    summary : list of dict
        One row per method with :data:`SUMMARY_COLUMNS` (means over samples).
    curves : dict of str to list of (CausalCurve, CausalCurve)
        Per method, the (insertion, deletion) curves of every sample, in sample order.
    maps : dict of str to list of (H, W) float32 ndarray
        Per method, the saliency maps (empty unless ``keep_maps=True``).
    settings : dict
        The metric settings and method options used.
    """

    records: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    curves: dict[str, list[tuple[metrics.CausalCurve, metrics.CausalCurve]]]
    maps: dict[str, list[np.ndarray]]
    settings: dict[str, Any]

    def mean_curve(self, method: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean normalised curve of ``method`` over samples (all samples share one size).

        Returns
        -------
        fractions, scores : (S + 1,) ndarrays
        """
        if method not in self.curves:
            raise ValueError(f"unknown method {method!r}; evaluated: {list(self.curves)}")
        index = {"insertion": 0, "deletion": 1}.get(kind)
        if index is None:
            raise ValueError(f"kind must be 'insertion' or 'deletion', got {kind!r}")
        curves = [pair[index] for pair in self.curves[method]]
        lengths = {len(c.fractions) for c in curves}
        if len(lengths) != 1:
            raise ValueError("samples of different sizes have curves of different lengths")
        return curves[0].fractions, np.mean([c.scores for c in curves], axis=0)

    def to_markdown(self) -> str:
        """The summary as a markdown table (means over samples)."""
        head = (
            "| method | forward passes | wall time (s) | insertion AUC ↑ | deletion AUC ↓ "
            "| pointing hit rate ↑ | relevance mass ↑ |"
        )
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
        for row in self.summary:
            lines.append(
                f"| {row['method']} | {row['forward_passes']:.0f} | {row['seconds']:.2f} "
                f"| {_fmt(row['insertion_auc'])} | {_fmt(row['deletion_auc'])} "
                f"| {_fmt(row['pointing_hit_rate'], 2)} | {_fmt(row['relevance_mass'])} |"
            )
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None, *, per_sample: bool = False) -> str:
        """The summary (or the per-sample records) as CSV text, also written to ``path``."""
        rows = self.records if per_sample else self.summary
        columns = RECORD_COLUMNS if per_sample else SUMMARY_COLUMNS
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``summary.md``, ``summary.csv`` and ``per_sample.csv`` into ``out_dir``.

        Returns
        -------
        dict of str to Path
            The files written, by kind.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "markdown": out / "summary.md",
            "csv": out / "summary.csv",
            "per_sample": out / "per_sample.csv",
        }
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        self.to_csv(paths["csv"])
        self.to_csv(paths["per_sample"], per_sample=True)
        return paths


def _fmt(value: float, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def nanmean(values: Sequence[float | None]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")
