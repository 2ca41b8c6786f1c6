"""Checkpoints: safetensors weights plus a JSON sidecar; never a pickle.

A checkpoint is two files side by side::

    model.safetensors   the state dict (safetensors: a JSON header + raw tensor bytes)
    model.json          the sidecar: architecture, class names, activation, input
                        normalisation, the µm/px it was trained at, training data, held-out
                        metrics and the SHA-256 of the weights file

Reading one never unpickles anything: safetensors parses a JSON header and copies raw bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from wsi_hipe.errors import CheckpointError, ModelError

__all__ = [
    "DEFAULT_CLASS_NAMES",
    "DEFAULT_NORMALIZATION",
    "ModelMeta",
    "file_sha256",
    "read_sidecar",
    "save_checkpoint",
    "sidecar_path",
]

logger = logging.getLogger(__name__)

#: Output classes of the bundled model (and the default for a model without a sidecar).
DEFAULT_CLASS_NAMES = ("background", "lymphocyte", "nucleus")

#: How the stain is scaled before it reaches the model (the convention of ``wsi_hipe.slide``).
DEFAULT_NORMALIZATION: dict[str, Any] = {
    "kind": "percentile",
    "low_percentile": 1.0,
    "high_percentile": 99.5,
    "clip": [0.0, 1.5],
    "description": (
        "single stain channel, float32: (x - low) / (high - low) clipped to [0, 1.5], where "
        "low is the 1st percentile of the scanned pixels (background -> 0) and high the "
        "99.5th percentile of the tissue pixels (bright nuclei -> 1), as wsi_hipe.slide does"
    ),
}

#: Version of the sidecar layout written by :func:`save_checkpoint`.
SIDECAR_VERSION = 1

Activation = Literal["softmax", "sigmoid"]
_ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelMeta:
    """What a segmentation model is and how to feed it.

    Attributes
    ----------
    class_names : tuple of str
        One name per output channel, in order.
    activation : {"softmax", "sigmoid"}
        How logits become probabilities: softmax over classes (mutually exclusive) or a
        sigmoid per channel (independent).
    in_channels : int
        Channels of the input batch.
    channel_names : tuple of str or None
        The slide channels the model was trained on, one per input channel, in order (e.g.
        ``("Hoechst",)``); a slide whose selected channels differ is refused
        (:meth:`wsi_hipe.slide.Slide.check_model`). None: not recorded.
    mpp : float or None
        µm per pixel of the training data; the pipeline resamples slides to it. None: unknown.
    normalization : dict
        How the stain must be scaled (see ``DEFAULT_NORMALIZATION``).
    architecture : dict
        The builder's arguments (``{"name": "smp.Unet", "encoder": ..., ...}``); empty for
        TorchScript files and callables.
    training : dict
        Free-form description of the training data and run.
    metrics : dict
        Held-out metrics (e.g. ``{"dice_lymphocyte_synthetic": 0.9}``).
    sha256 : str or None
        SHA-256 of the weights / TorchScript file the model was loaded from; None for a
        callable passed in memory.
    source : str
        Where the model came from: a file path, ``"bundled"`` or ``"callable"``.
    format : {"safetensors", "torchscript", "callable"}
        How it was loaded.
    """

    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    activation: Activation = "softmax"
    in_channels: int = 1
    channel_names: tuple[str, ...] | None = None
    mpp: float | None = 0.5
    normalization: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    architecture: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    source: str = "callable"
    format: str = "callable"

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.class_names)
        if not names:
            raise ModelError("class_names must name at least one output class, got none")
        if len(set(names)) != len(names):
            raise ModelError(f"class_names must be unique, got {names!r}")
        object.__setattr__(self, "class_names", names)
        if self.activation not in _ACTIVATIONS:
            raise ModelError(
                f"activation must be one of {list(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ModelError(f"in_channels must be a positive int, got {self.in_channels!r}")
        if self.channel_names is not None:
            if isinstance(self.channel_names, str):
                raise ModelError(
                    f"channel_names must be a sequence of names, got the string "
                    f"{self.channel_names!r}; write [{self.channel_names!r}]"
                )
            channels = tuple(str(n) for n in self.channel_names)
            if len(channels) != self.in_channels:
                raise ModelError(
                    f"channel_names must name each of the in_channels={self.in_channels} input "
                    f"channel(s), got {len(channels)}: {list(channels)}"
                )
            if any(not n.strip() for n in channels):
                raise ModelError(f"channel_names must not be empty strings, got {list(channels)}")
            object.__setattr__(self, "channel_names", channels)
        if self.mpp is not None:
            mpp = float(self.mpp)
            if not (math.isfinite(mpp) and mpp > 0):
                raise ModelError(
                    f"mpp must be a positive number of µm/px or None, got {self.mpp!r}"
                )
            object.__setattr__(self, "mpp", mpp)

    @property
    def num_classes(self) -> int:
        """Number of output channels."""
        return len(self.class_names)

    def class_index(self, name_or_index: str | int) -> int:
        """The output channel of a class given by name or index.

        Raises
        ------
        ModelError
            The name is not one of ``class_names`` or the index is out of range.
        """
        if isinstance(name_or_index, str):
            if name_or_index not in self.class_names:
                raise ModelError(
                    f"unknown class {name_or_index!r}; this model's classes are "
                    f"{list(self.class_names)}"
                )
            return self.class_names.index(name_or_index)
        index = int(name_or_index)
        if not 0 <= index < self.num_classes:
            raise ModelError(
                f"class index {name_or_index!r} out of range for {self.num_classes} classes "
                f"{list(self.class_names)}"
            )
        return index

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        if self.channel_names is not None:
            out["channel_names"] = list(self.channel_names)
        return out

    def replace(self, **changes: Any) -> ModelMeta:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def sidecar_path(weights_path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar that belongs to a weights file: same name, suffix ``.json``."""
    return Path(weights_path).with_suffix(".json")


def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks: the project's one file hash (weights,
    slides).

    Raises
    ------
    CheckpointError
        The file does not exist or cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(chunk_size), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r} to hash it: {exc}") from exc
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a JSON sidecar: {value!r}")


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    meta: ModelMeta | Mapping[str, Any],
) -> Path:
    """Write ``model``'s weights as safetensors and its description as a JSON sidecar.

    Parameters
    ----------
    model : torch.nn.Module
        The network (typically from :func:`build_unet`). Its state dict is saved from CPU
        copies in float32 (training precision), contiguous.
    path : path-like
        Weights file; must end in ``.safetensors``. The sidecar goes to
        ``path.with_suffix(".json")``.
    meta : ModelMeta or mapping
        Class names, activation, mpp, normalisation, architecture, training and metrics. A
        mapping is passed to ``ModelMeta(**meta)``. ``architecture`` must be filled for the
        checkpoint to be loadable by :func:`load_model`.

    Returns
    -------
    pathlib.Path
        The weights path.

    Raises
    ------
    CheckpointError
        ``path`` does not end in ``.safetensors``.
    ModelError
        ``meta`` is invalid or disagrees with the model (e.g. class count).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"checkpoint path must end in '.safetensors', got {str(path)!r}; "
            f"use {str(path.with_suffix('.safetensors'))!r}"
        )
    if not isinstance(meta, ModelMeta):
        meta = ModelMeta(**dict(meta))
    arch = meta.architecture
    if arch:
        if int(arch.get("classes", meta.num_classes)) != meta.num_classes:
            raise ModelError(
                f"architecture has {arch.get('classes')} output classes but class_names has "
                f"{meta.num_classes}: {list(meta.class_names)}"
            )
        if int(arch.get("in_channels", meta.in_channels)) != meta.in_channels:
            raise ModelError(
                f"architecture has in_channels={arch.get('in_channels')} but meta says "
                f"in_channels={meta.in_channels}"
            )
    else:
        logger.warning(
            "saving %s without meta.architecture: load_model cannot rebuild it; pass "
            "meta.architecture (see wsi_hipe.models.build_unet)",
            path,
        )
    state = {
        name: tensor.detach()
        .to("cpu", torch.float32 if tensor.is_floating_point() else None)
        .contiguous()
        .clone()
        for name, tensor in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        state, str(path), metadata={"format": "pt", "wsi_hipe_sidecar": sidecar_path(path).name}
    )
    record = meta.to_json_dict()
    for transient in ("sha256", "source", "format"):
        record.pop(transient, None)
    record = {
        "wsi_hipe_checkpoint": SIDECAR_VERSION,
        "weights_file": path.name,
        "weights_sha256": file_sha256(path),
        **record,
    }
    text = json.dumps(record, indent=2, default=_json_default, ensure_ascii=False)
    sidecar_path(path).write_text(text + "\n", encoding="utf-8")
    logger.info("saved checkpoint %s (+ %s)", path, sidecar_path(path).name)
    return path


def read_sidecar(weights_path: str | os.PathLike[str], *, required: bool = True) -> dict | None:
    """Read and minimally check the JSON sidecar of a weights file.

    Returns
    -------
    dict or None
        The parsed sidecar; None when it is absent and ``required`` is false.

    Raises
    ------
    CheckpointError
        The sidecar is missing (when required), not valid JSON, or not a JSON object.
    """
    weights_path = Path(weights_path)
    side = sidecar_path(weights_path)
    if not side.is_file():
        if not required:
            return None
        raise CheckpointError(
            f"checkpoint sidecar {str(side)!r} not found next to {str(weights_path)!r}; a "
            "checkpoint is the .safetensors weights plus the .json sidecar written by "
            "wsi_hipe.models.save_checkpoint - copy the sidecar beside the weights, or re-save "
            "the model with save_checkpoint(model, path, meta=...)"
        )
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint sidecar {str(side)!r} is not readable JSON ({exc}); restore it or "
            "re-save the model with save_checkpoint"
        ) from exc
    if not isinstance(record, dict):
        raise CheckpointError(
            f"checkpoint sidecar {str(side)!r} must hold a JSON object, got "
            f"{type(record).__name__}; re-save the model with save_checkpoint"
        )
    return record


_META_FIELDS = (
    "class_names",
    "activation",
    "in_channels",
    "channel_names",
    "mpp",
    "normalization",
)
_META_FREE = ("architecture", "training", "metrics")


def meta_from_sidecar(record: Mapping[str, Any], *, side: Path, **extra: Any) -> ModelMeta:
    """Build a :class:`ModelMeta` from a sidecar dict; unknown keys are kept out.

    Raises
    ------
    CheckpointError
        A field has an invalid value (the message names the sidecar and the field).
    """
    kwargs: dict[str, Any] = {}
    for key in _META_FIELDS + _META_FREE:
        if key in record:
            kwargs[key] = record[key]
    if "class_names" in kwargs:
        kwargs["class_names"] = tuple(kwargs["class_names"])
    if isinstance(kwargs.get("channel_names"), list):
        kwargs["channel_names"] = tuple(kwargs["channel_names"])
    kwargs.update(extra)
    try:
        return ModelMeta(**kwargs)
    except (ModelError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint sidecar {str(side)!r} is invalid: {exc}; fix the field or re-save "
            "the model with save_checkpoint"
        ) from exc
