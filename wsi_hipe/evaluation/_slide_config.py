"""The slide-level evaluation's configuration (``configs/evaluate_slide.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wsi_hipe.config import (
    METRIC_SUBSTRATES,
    SUBSTRATES,
    Threshold,
    canonical_substrate,
)
from wsi_hipe.errors import ConfigError

__all__ = [
    "BACKGROUND",
    "DepthSection",
    "FaithfulnessSection",
    "GridSection",
    "SanitySection",
    "SlideEvaluationConfig",
    "SlidesSection",
    "load_slide_evaluation_config",
]

#: The substrate the evaluation adds to HiPe's and the metrics' named ones: the local tissue
#: background (:func:`wsi_hipe.metrics.tissue_background`), passed to them as a callable.
BACKGROUND = "background"
Density = Literal["sparse", "clustered", "dense"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _substrate_names(values: list[str], known: tuple[str, ...]) -> list[str]:
    out = []
    for value in values:
        name = canonical_substrate(value) if isinstance(value, str) else value
        if name not in (*known, BACKGROUND):
            raise ValueError(f"must be one of {[*known, BACKGROUND]}, got {value!r}")
        out.append(name)
    if len(set(out)) != len(out):
        raise ValueError(f"names must be unique, got {values}")
    return out


class SlidesSection(_Section):
    """Synthetic slides: every ``density`` × every ``seed``, ``size``² px at ``mpp`` µm/px."""

    densities: list[Density] = Field(default_factory=lambda: ["sparse", "clustered", "dense"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    size: int = Field(1024, ge=64)
    mpp: float = Field(0.5, gt=0)
    artefacts: bool = True


class DepthSection(_Section):
    """One depth point of the grid: HiPe's start grid and depth count (cells ≥ min_cell_size)."""

    start_grid: int | None = Field(4, ge=1)
    max_depth: int | None = Field(3, ge=1)
    min_cell_size: int = Field(4, ge=1)


class GridSection(_Section):
    """The settings compared: every substrate × threshold × depth point."""

    substrates: list[str] = Field(
        default_factory=lambda: ["mean", "fade", "blur", "noise", BACKGROUND]
    )
    thresholds: list[Threshold] = Field(default_factory=lambda: ["mid-range"])
    depths: list[DepthSection] = Field(default_factory=lambda: [DepthSection()])
    #: Disk radius (µm) of the ``background`` substrate: wider than the largest nucleus.
    background_radius_um: float = Field(7.0, gt=0)

    @field_validator("substrates")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _substrate_names(value, SUBSTRATES)


class FaithfulnessSection(_Section):
    """Insertion/deletion on the ``tiles_per_slide`` tiles with the most class area (and the
    median one when there are more), for every metric substrate."""

    tiles_per_slide: int = Field(2, ge=0)
    step_fraction: float = Field(0.05, gt=0, le=1)
    substrates: list[str] = Field(default_factory=lambda: ["fade", "mean", "blur", BACKGROUND])
    blur_sigma: float = Field(5.0, gt=0)

    @field_validator("substrates")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _substrate_names(value, METRIC_SUBSTRATES)


class SanitySection(_Section):
    """Cascading model randomisation (MPRT) and a random model, on the ``tiles_per_slide``
    tiles with the most class area (then the median one) of each slide of ``seeds`` (every
    density), for the grid's substrates at one threshold and depth. ``stages``: module names randomised in order (None: head, decoder,
    then the encoder's blocks from the deepest; see :func:`model_stages`)."""

    seeds: list[int] = Field(default_factory=lambda: [0])
    tiles_per_slide: int = Field(1, ge=1)
    substrates: list[str] | None = None
    threshold: Threshold = "mid-range"
    depth: DepthSection = Field(default_factory=DepthSection)
    stages: list[str] | None = None
    random_model_seed: int = 0

    @field_validator("substrates")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _substrate_names(value, SUBSTRATES)


class SlideEvaluationConfig(_Section):
    """The slide-level evaluation; every key has a default.

    Attributes
    ----------
    model : str
        ``"bundled"`` or a checkpoint (:func:`wsi_hipe.models.load_model`).
    device : str
        ``"cpu"``, ``"auto"``, ``"cuda"``...
    threads : int or None
        torch intra-op threads (1: the pipeline's default, results as its workers get them).
    pipeline : dict
        Dotted overrides of the pipeline configuration every setting starts from (tiling,
        score, hipe batch size...), on top of ``pipeline_config``.
    pipeline_config : str or None
        A pipeline YAML (e.g. ``configs/default.yaml``); None = the built-in defaults.
    slides, grid, faithfulness, sanity : sections
    """

    model: str = "bundled"
    device: str = "cpu"
    threads: int | None = Field(1, ge=1)
    pipeline: dict[str, Any] = Field(
        default_factory=lambda: {
            "tiling.tile_size": 256,
            "tiling.halo": 16,
            "score.floor": 5.0,
            "hipe.batch_size": 8,
        }
    )
    pipeline_config: str | None = None
    slides: SlidesSection = Field(default_factory=SlidesSection)
    grid: GridSection = Field(default_factory=GridSection)
    faithfulness: FaithfulnessSection = Field(default_factory=FaithfulnessSection)
    sanity: SanitySection = Field(default_factory=SanitySection)


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_slide_evaluation_config(
    path: str | Path | None = None, *, overrides: Mapping[str, Any] | None = None
) -> SlideEvaluationConfig:
    """Read a slide-evaluation config (YAML), apply dotted ``overrides``, validate.

    ``overrides`` keys starting with ``pipeline.`` go into the ``pipeline`` mapping whole
    (``{"pipeline.tiling.halo": 32}`` sets the pipeline override ``tiling.halo``).

    Raises
    ------
    ConfigError
        Unreadable file or invalid keys/values (the message names the key).
    """
    import yaml

    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"slide evaluation config {str(p)!r} not found; check the path")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        data = loaded
        source = str(p)
    for key, value in (overrides or {}).items():
        if key.startswith("pipeline."):
            data.setdefault("pipeline", dict(SlideEvaluationConfig().pipeline))
            data["pipeline"][key[len("pipeline.") :]] = value
        else:
            _set_nested(data, key, value)
    try:
        return SlideEvaluationConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<top level>'}: {err['msg']} "
            f"(got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid slide evaluation config ({source}): {problems}") from None
