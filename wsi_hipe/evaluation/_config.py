"""The configured evaluation (``configs/evaluate.yaml``): its sections, loading and validation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wsi_hipe import baselines
from wsi_hipe.config import MetricSubstrate, canonical_substrate
from wsi_hipe.errors import ConfigError
from wsi_hipe.evaluation._results import DEFAULT_METHODS, MethodSpec

__all__ = [
    "EvaluationConfig",
    "MethodSection",
    "MetricsSection",
    "TilesSection",
    "load_evaluation_config",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TilesSection(_Section):
    """Which synthetic tiles: ``n`` tiles of ``size``² px at ``mpp`` µm/px from ``first_seed``."""

    n: int = Field(3, ge=1)
    size: int = Field(256, ge=16)
    mpp: float = Field(0.5, gt=0)
    first_seed: int = 0
    min_lymphocytes: int = Field(1, ge=0)


class MetricsSection(_Section):
    """Settings of the metrics (see :func:`evaluate_samples`)."""

    step_fraction: float = Field(0.01, gt=0, le=1)
    insertion_substrate: MetricSubstrate = "blur"
    deletion_substrate: MetricSubstrate = "fade"
    blur_sigma: float = Field(5.0, gt=0)
    pointing_tolerance_px: float = Field(3.0, ge=0)

    @field_validator("insertion_substrate", "deletion_substrate", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        """Accept old spellings (``"zero"``) as their one name (``"fade"``)."""
        return canonical_substrate(value) if isinstance(value, str) else value


class MethodSection(_Section):
    """One method row: label ``name``, ``method`` in baselines.METHODS, its ``options``."""

    name: str
    method: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in baselines.METHODS:
            raise ValueError(f"must be one of {list(baselines.METHODS)}")
        return value


class EvaluationConfig(_Section):
    """The configured evaluation (``configs/evaluate.yaml``); every key has a default.

    Attributes
    ----------
    model : str
        Model spec for :func:`wsi_hipe.models.load_model` (``"bundled"`` or a file).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    target : {'tile', 'cell'}
        ``"tile"``: explain the expected class area of the whole tile, GT = every lymphocyte;
        ``"cell"``: explain the expected class area of one lymphocyte (the one nearest the tile
        centre, :func:`wsi_hipe.scores.cell_area`), GT = that cell only. A tile-level score of
        a lymphocyte-rich tile is salient almost everywhere; one cell is a sparse target.
    class_index : int or str
        The class whose expected area is explained (1 / ``"lymphocyte"``).
    batch_size : int
        Inputs per model call.
    threads : int or None
        ``torch.set_num_threads`` for the run (None leaves it alone).
    tiles, metrics : sections
    methods : list of method rows (default: :data:`DEFAULT_METHODS`)
    """

    model: str = "bundled"
    device: str = "auto"
    target: Literal["tile", "cell"] = "tile"
    class_index: int | str = 1
    batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1)
    tiles: TilesSection = Field(default_factory=TilesSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    methods: list[MethodSection] = Field(
        default_factory=lambda: [
            MethodSection(name=m.name, method=m.method, options=dict(m.options))
            for m in DEFAULT_METHODS
        ]
    )

    def method_specs(self) -> list[MethodSpec]:
        return [MethodSpec(m.name, m.method, dict(m.options)) for m in self.methods]


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_evaluation_config(
    path: str | Path | None = None, *, overrides: Mapping[str, Any] | None = None
) -> EvaluationConfig:
    """Read an evaluation config (YAML), apply dotted ``overrides``, validate.

    Parameters
    ----------
    path : str or Path, optional
        YAML file; None = all defaults.
    overrides : mapping, optional
        ``{"tiles.n": 2, "metrics.step_fraction": 0.05}``.

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
            raise ConfigError(f"evaluation config {str(p)!r} not found; check the path")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        data = loaded
        source = str(p)
    for key, value in (overrides or {}).items():
        _set_nested(data, key, value)
    try:
        return EvaluationConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<top level>'}: {err['msg']} "
            f"(got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid evaluation config ({source}): {problems}") from None
