"""Saliency-quality evaluation: HiPe against baselines on tiles with ground truth.

For every sample (an input ``x`` with ground-truth instances) and every method, the runner
computes the map with :func:`wsi_hipe.baselines.explain` and scores it with
:mod:`wsi_hipe.metrics`: forward passes, wall time, insertion AUC (blur substrate), deletion
AUC (fade substrate: zeros), the pointing game and the relevance mass inside the ground truth. The
result is one row per (sample, method) and one summary row per method, as markdown or CSV.

Slide scale (:func:`run_slide_evaluation`, ``configs/evaluate_slide.yaml``, ``wsi-hipe evaluate
--slide``): HiPe settings (substrate × threshold × depth) on whole synthetic slides at three
lymphocyte densities, tiled as the pipeline tiles them; localisation against the ground truth
(AUROC class vs other nuclei, relevance mass with chance, per-tile Spearman, the densest tile's
rank), faithfulness on tiles with the metric's substrate varied, cascading model randomisation
and a random model, passes per tile (:mod:`wsi_hipe.evaluation._slide`).

Tile scale, three entry points, from generic to turnkey:

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
from wsi_hipe.evaluation._slide import (
    Setting,
    grid_settings,
    model_stages,
    run_slide_evaluation,
    synthetic_slide_set,
)
from wsi_hipe.evaluation._slide_config import (
    SlideEvaluationConfig,
    load_slide_evaluation_config,
)
from wsi_hipe.evaluation._slide_results import SlideEvaluationResult, load_slide_results

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
    "Setting",
    "SlideEvaluationConfig",
    "SlideEvaluationResult",
    "TilesSection",
    "centre_cell",
    "evaluate_samples",
    "grid_settings",
    "load_evaluation_config",
    "load_slide_evaluation_config",
    "load_slide_results",
    "model_stages",
    "run_evaluation",
    "run_slide_evaluation",
    "synthetic_samples",
    "synthetic_slide_set",
]
