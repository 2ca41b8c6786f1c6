"""Saliency-quality evaluation: HiPe against baselines on tiles with ground truth.

For every sample (an input ``x`` with ground-truth instances) and every method, the runner
computes the map with :func:`wsi_hipe.baselines.explain` and scores it with
:mod:`wsi_hipe.metrics`: forward passes, wall time, insertion AUC (blur substrate), deletion
AUC (fade substrate: zeros), the pointing game and the relevance mass inside the ground truth. The
result is one row per (sample, method) and one summary row per method, as markdown or CSV.

Three entry points, from generic to turnkey:

- :func:`evaluate_samples` - any scalar ``forward`` and any samples (tests use tiny models);
- :func:`synthetic_samples` - synthetic Hoechst tiles with lymphocyte instance ground truth;
- :func:`run_evaluation` - the configured run (``configs/evaluate.yaml``): the bundled model,
  the lymphocyte area score, synthetic tiles, the configured methods. ``pipelines/evaluate.py``
  and the CLI call it.
"""

from wsi_hipe.evaluation._config import (
    EvaluationConfig,
    MethodSection,
    MetricsSection,
    TilesSection,
    load_evaluation_config,
)
from wsi_hipe.evaluation._results import (
    DEFAULT_METHODS,
    RECORD_COLUMNS,
    SUMMARY_COLUMNS,
    EvaluationResult,
    MethodSpec,
    Sample,
)
from wsi_hipe.evaluation._run import (
    centre_cell,
    evaluate_samples,
    run_evaluation,
    synthetic_samples,
)

__all__ = [
    "DEFAULT_METHODS",
    "RECORD_COLUMNS",
    "SUMMARY_COLUMNS",
    "EvaluationConfig",
    "EvaluationResult",
    "MethodSection",
    "MethodSpec",
    "MetricsSection",
    "Sample",
    "TilesSection",
    "centre_cell",
    "evaluate_samples",
    "load_evaluation_config",
    "run_evaluation",
    "synthetic_samples",
]
