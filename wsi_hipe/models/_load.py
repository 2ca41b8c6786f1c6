"""``load_model``: the bundled weights, a safetensors checkpoint, a TorchScript file or a callable."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_hipe.errors import CheckpointError, ModelError
from wsi_hipe.models._checkpoint import (
    DEFAULT_CLASS_NAMES,
    ModelMeta,
    file_sha256,
    meta_from_sidecar,
    read_sidecar,
    sidecar_path,
)
from wsi_hipe.models._unet import fold_batchnorm, unet_from_architecture
from wsi_hipe.models._wrapper import SegmentationModel, resolve_device

__all__ = [
    "BUNDLED_MODEL_NAME",
    "TORCHSCRIPT_SUFFIXES",
    "bundled_model_path",
    "load_model",
    "model_sha256",
    "read_model_meta",
]

logger = logging.getLogger(__name__)

#: File name of the bundled weights inside ``wsi_hipe/models/weights/``.
BUNDLED_MODEL_NAME = "lymphocyte_unet.safetensors"

#: File suffixes read as TorchScript archives.
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")

ModelSpec = (
    str | os.PathLike[str] | nn.Module | Callable[[torch.Tensor], torch.Tensor] | SegmentationModel
)


def bundled_model_path() -> Path:
    """Path of the bundled U-Net weights (``.safetensors``; its ``.json`` sidecar lies beside).

    Raises
    ------
    CheckpointError
        The weights are missing from this installation.
    """
    path = Path(__file__).resolve().parent / "weights" / BUNDLED_MODEL_NAME
    if not path.is_file():
        raise CheckpointError(
            f"bundled model weights not found at {str(path)!r}; reinstall wsi-hipe, or train "
            "them with `python pipelines/train_unet.py --config configs/train_unet.yaml`"
        )
    return path


def model_sha256(spec: ModelSpec | None = None) -> str | None:
    """SHA-256 (hex) of a model's weights file, for provenance.

    Parameters
    ----------
    spec : None, "bundled", path or SegmentationModel
        ``None`` / ``"bundled"``: the bundled weights; a path: that file; a loaded
        :class:`SegmentationModel`: the hash recorded when it was loaded.

    Returns
    -------
    str or None
        64 hex digits; None for a model built from an in-memory callable.
    """
    if isinstance(spec, SegmentationModel):
        return spec.meta.sha256
    if spec is None or (isinstance(spec, str) and spec == "bundled"):
        return file_sha256(bundled_model_path())
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        if not path.is_file():
            raise CheckpointError(f"model file {str(path)!r} not found; check the path")
        return file_sha256(path)
    return None


def read_model_meta(spec: str | os.PathLike[str] | None = None) -> ModelMeta:
    """The description of a model file (class names, activation, ...) without loading it.

    Reads only the JSON sidecar, so it is cheap and touches no device: a front end can list a
    model's classes on its GUI thread and leave the loading (and the first CUDA call) to a
    worker thread.

    Parameters
    ----------
    spec : None, "bundled" or path
        As for :func:`load_model`: a ``.safetensors`` checkpoint (its sidecar must exist) or a
        TorchScript file (sidecar optional: without one, the bundled model's convention).

    Raises
    ------
    CheckpointError
        The file or a required sidecar is missing or invalid.
    """
    if spec is None or (isinstance(spec, str) and spec == "bundled"):
        path, source = bundled_model_path(), "bundled"
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".json":
            path = path.with_suffix(".safetensors")
        source = str(path)
    if not path.is_file():
        raise CheckpointError(
            f"model file {str(path)!r} not found; pass 'bundled', a .safetensors "
            f"checkpoint or a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)})"
        )
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *TORCHSCRIPT_SUFFIXES):
        raise CheckpointError(
            f"cannot tell the format of model file {str(path)!r} from its suffix {suffix!r}; "
            f"use .safetensors (+ .json sidecar) or a TorchScript file"
        )
    record = read_sidecar(path, required=suffix == ".safetensors")
    fmt = "safetensors" if suffix == ".safetensors" else "torchscript"
    if record is None:
        return _meta_without_sidecar({}, what=f"TorchScript file {str(path)!r}", source=source,
                                     format=fmt)  # fmt: skip
    return meta_from_sidecar(record, side=sidecar_path(path), source=source, format=fmt)


def load_model(
    spec: ModelSpec | None = None,
    *,
    device: str | torch.device | None = None,
    autocast: bool | None = None,
    class_names: Sequence[str] | None = None,
    activation: str | None = None,
    in_channels: int | None = None,
    mpp: float | None = None,
    channel_names: Sequence[str] | None = None,
    fuse_batchnorm: bool = True,
    channels_last: bool | None = None,
    check: bool = True,
) -> SegmentationModel:
    """Load a segmentation model from any supported source.

    Parameters
    ----------
    spec : None, "bundled", path, torch.nn.Module, callable or SegmentationModel
        - ``None`` / ``"bundled"``: the U-Net shipped in ``wsi_hipe/models/weights``.
        - ``*.safetensors``: a checkpoint; its JSON sidecar (same name, ``.json``) must lie
          beside it. Loading never unpickles anything.
        - ``*.pt`` / ``*.pth`` / ``*.ts`` / ``*.torchscript`` / ``*.jit``: a TorchScript archive,
          read with ``torch.jit.load``. A TorchScript archive is compiled TorchScript code plus
          tensors; its data records are read by TorchScript's own restricted unpickler, which
          rebuilds tensors and TorchScript types only and never imports arbitrary Python
          objects (unlike ``torch.load`` of a ``torch.save`` pickle, which this function never
          does). It is still code that runs: load only models you trust. A sidecar JSON beside
          it is optional; without one, ``class_names`` etc. come from the arguments, or the
          bundled model's defaults (``("background", "lymphocyte", "nucleus")``, softmax, 1
          input channel, 0.5 µm/px) with a warning.
        - an ``nn.Module`` or any callable ``(B, C, H, W) -> (B, K, H, W)`` logits: wrapped,
          described by the keyword arguments (or the same defaults).
        - a :class:`SegmentationModel`: returned (moved to ``device`` when one is given).
    device : str or torch.device, optional
        ``None`` / ``"auto"``: CUDA when available, else CPU.
    autocast : bool, optional
        bf16/fp16 autocast, CUDA only; ``None`` = on for CUDA. Logits stay float32.
    class_names, activation, in_channels, mpp, channel_names
        Describe a model that has no sidecar; when given for a checkpoint they override the
        sidecar (with a warning if they differ). ``channel_names``: the slide channels the
        model was trained on, one per input channel, in order.
    fuse_batchnorm : bool
        Fold batch-norm layers into the preceding convolutions of a safetensors U-Net for
        faster inference (same outputs up to float rounding).
    channels_last : bool, optional
        Run in the channels-last memory format. ``None``: on for a safetensors U-Net on any
        device (about 1.4x faster on CPU as well, see BENCHMARKS.md), on CUDA only for
        TorchScript files and callables (whose code may assume contiguous inputs).
    check : bool
        Run one small zero batch through the model to check its output shape now, rather
        than at the first tile.

    Returns
    -------
    SegmentationModel

    Raises
    ------
    CheckpointError
        A file is missing, corrupt, not the format its suffix says, or disagrees with its
        sidecar.
    ModelError
        The model is unusable (wrong output shape, unknown spec type, bad argument).
    """
    overrides = _described(class_names, activation, in_channels, mpp, channel_names)
    if isinstance(spec, SegmentationModel):
        if overrides:
            raise ModelError(
                "class_names/activation/in_channels/mpp/channel_names cannot override a loaded "
                "SegmentationModel; load it again from its source with those arguments"
            )
        return spec.to(resolve_device(device)) if device is not None else spec
    options = {"device": device, "autocast": autocast, "channels_last": channels_last}
    if spec is None or (isinstance(spec, str) and spec == "bundled"):
        model = _load_file(bundled_model_path(), overrides, fuse_batchnorm, "bundled", **options)
    elif isinstance(spec, str | os.PathLike):
        path = Path(spec).expanduser()
        if path.suffix == ".json":
            path = path.with_suffix(".safetensors")
        model = _load_file(path, overrides, fuse_batchnorm, str(path), **options)
    elif callable(spec):
        meta = _meta_without_sidecar(overrides, what=f"the {type(spec).__name__} passed in")
        model = SegmentationModel(spec, meta, **options)
    else:
        raise ModelError(
            f"cannot load a model from {type(spec).__name__}; pass None/'bundled', a "
            ".safetensors or TorchScript path, an nn.Module or a callable"
        )
    if check:
        _probe(model)
    return model


# --- helpers ------------------------------------------------------------------------------


def _described(
    class_names: Sequence[str] | None,
    activation: str | None,
    in_channels: int | None,
    mpp: float | None,
    channel_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The description arguments of :func:`load_model` that were given, as ModelMeta fields."""
    overrides: dict[str, Any] = {}
    if class_names is not None:
        overrides["class_names"] = tuple(class_names)
    if activation is not None:
        overrides["activation"] = activation
    if in_channels is not None:
        overrides["in_channels"] = int(in_channels)
    if mpp is not None:
        overrides["mpp"] = float(mpp)
    if channel_names is not None:
        overrides["channel_names"] = (
            (channel_names,) if isinstance(channel_names, str) else tuple(channel_names)
        )
    return overrides


def _load_file(
    path: Path,
    overrides: dict[str, Any],
    fuse_batchnorm: bool,
    source: str,
    *,
    device: str | torch.device | None,
    autocast: bool | None,
    channels_last: bool | None,
) -> SegmentationModel:
    """A safetensors checkpoint or a TorchScript archive, told apart by the suffix."""
    if not path.is_file():
        raise CheckpointError(
            f"model file {str(path)!r} not found; pass 'bundled', a .safetensors "
            f"checkpoint or a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)})"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(
            path,
            overrides,
            device=device,
            autocast=autocast,
            fuse_batchnorm=fuse_batchnorm,
            channels_last=True if channels_last is None else channels_last,
            source=source,
        )
    if suffix in TORCHSCRIPT_SUFFIXES:
        return _load_torchscript(
            path, overrides, device=device, autocast=autocast, channels_last=channels_last
        )
    raise CheckpointError(
        f"cannot tell the format of model file {str(path)!r} from its suffix "
        f"{suffix!r}; use .safetensors (+ .json sidecar) or a TorchScript file "
        f"({', '.join(TORCHSCRIPT_SUFFIXES)})"
    )


def _meta_without_sidecar(overrides: dict[str, Any], *, what: str, **extra: Any) -> ModelMeta:
    if "class_names" not in overrides:
        logger.warning(
            "%s has no sidecar and no class_names were given: assuming the bundled model's "
            "convention %s (softmax, %d input channel, %.2f µm/px); pass class_names=, "
            "activation=, in_channels=, mpp= to describe it",
            what,
            list(DEFAULT_CLASS_NAMES),
            overrides.get("in_channels", 1),
            overrides.get("mpp", 0.5),
        )
    return ModelMeta(**{**overrides, **extra})


def _apply_overrides(meta: ModelMeta, overrides: dict[str, Any], source: str) -> ModelMeta:
    changed = {k: v for k, v in overrides.items() if getattr(meta, k) != v}
    if changed:
        logger.warning("overriding the sidecar of %s with %s", source, changed)
        return meta.replace(**changed)
    return meta


def _load_safetensors(
    path: Path,
    overrides: dict[str, Any],
    *,
    device: str | torch.device | None,
    autocast: bool | None,
    fuse_batchnorm: bool,
    channels_last: bool | None,
    source: str,
) -> SegmentationModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    side = sidecar_path(path)
    record = read_sidecar(path, required=True) or {}  # required=True raises when absent
    sha = file_sha256(path)
    recorded = record.get("weights_sha256")
    if recorded is not None and recorded != sha:
        raise CheckpointError(
            f"weights file {str(path)!r} (sha256 {sha[:12]}...) is not the file its sidecar "
            f"{str(side)!r} describes (sha256 {str(recorded)[:12]}...); restore the matching "
            "pair, or re-save the model with save_checkpoint"
        )
    architecture = record.get("architecture")
    if not isinstance(architecture, dict) or not architecture:
        raise CheckpointError(
            f"checkpoint sidecar {str(side)!r} has no 'architecture' entry, so the network "
            "cannot be rebuilt; re-save it with save_checkpoint(model, path, meta=...) giving "
            "meta.architecture"
        )
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} as safetensors ({exc}); the file is corrupt or "
            "truncated - copy it again or re-save the model with save_checkpoint"
        ) from exc
    try:
        network = unet_from_architecture(architecture)
    except ModelError as exc:
        raise CheckpointError(f"checkpoint sidecar {str(side)!r}: {exc}") from exc
    _check_state_matches(network, state, path=path, side=side)
    network.load_state_dict(state, strict=True)
    meta = meta_from_sidecar(record, side=side, sha256=sha, source=source, format="safetensors")
    if int(architecture.get("classes", meta.num_classes)) != meta.num_classes:
        raise CheckpointError(
            f"checkpoint sidecar {str(side)!r} names {meta.num_classes} classes "
            f"{list(meta.class_names)} but its architecture has {architecture.get('classes')} "
            "outputs; fix class_names in the sidecar"
        )
    if int(architecture.get("in_channels", meta.in_channels)) != meta.in_channels:
        raise CheckpointError(
            f"checkpoint sidecar {str(side)!r} says in_channels={meta.in_channels} but its "
            f"architecture has in_channels={architecture.get('in_channels')}; fix the sidecar"
        )
    meta = _apply_overrides(meta, overrides, str(path))
    if fuse_batchnorm:
        fold_batchnorm(network)
    logger.debug("loaded %s (sha256 %s)", path, sha)
    return SegmentationModel(
        network, meta, device=device, autocast=autocast, channels_last=channels_last
    )


def _check_state_matches(
    network: nn.Module, state: dict[str, torch.Tensor], *, path: Path, side: Path
) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs architecture {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:2]})")
        raise CheckpointError(
            f"weights {str(path)!r} disagree with the architecture in sidecar {str(side)!r}: "
            f"{'; '.join(problems)}; the sidecar belongs to another model - restore the "
            "matching pair or re-save the model with save_checkpoint"
        )


def _load_torchscript(
    path: Path,
    overrides: dict[str, Any],
    *,
    device: str | torch.device | None,
    autocast: bool | None,
    channels_last: bool | None,
) -> SegmentationModel:
    dev = resolve_device(device)
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 flags TorchScript as deprecated; reading archives still works
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
            network = torch.jit.load(str(path), map_location=dev)
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"cannot load {str(path)!r} as a TorchScript archive ({str(exc).splitlines()[0]}); "
            "wsi-hipe never unpickles torch.save files: export the model with "
            "torch.jit.script(model).save(path) / torch.jit.trace, or save its weights with "
            "wsi_hipe.models.save_checkpoint"
        ) from exc
    sha = file_sha256(path)
    record = read_sidecar(path, required=False)
    extra = {"sha256": sha, "source": str(path), "format": "torchscript"}
    if record is not None:
        meta = meta_from_sidecar(record, side=sidecar_path(path), **extra)
        meta = _apply_overrides(meta, overrides, str(path))
    else:
        meta = _meta_without_sidecar(overrides, what=f"TorchScript file {str(path)!r}", **extra)
    return SegmentationModel(
        network, meta, device=dev, autocast=autocast, channels_last=channels_last
    )


def _probe(model: SegmentationModel) -> None:
    side = max(64, model.input_multiple)
    x = torch.zeros(1, model.in_channels, side, side, device=model.device)
    try:
        model(x)
    except ModelError:
        raise
    except Exception as exc:  # a user's callable may raise anything
        raise ModelError(
            f"the model failed on a (1, {model.in_channels}, {side}, {side}) zero batch: "
            f"{type(exc).__name__}: {exc}; check in_channels= and that it maps (B, C, H, W) "
            "to (B, K, H, W) logits"
        ) from exc
