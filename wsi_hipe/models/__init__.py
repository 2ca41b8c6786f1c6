"""Segmentation models: the residual U-Net, checkpoints and one calling convention.

- :func:`build_unet` - a segmentation-models-pytorch ``Unet`` with a ResNet encoder.
- :func:`save_checkpoint` - safetensors weights + a JSON sidecar (never a pickle).
- :func:`load_model` - the bundled weights, a ``.safetensors`` checkpoint, a TorchScript
  file, an ``nn.Module`` or any callable, as a :class:`SegmentationModel`:
  ``(B, C, H, W) float32 -> (B, K, H, W)`` float32 logits with ``.meta`` (:class:`ModelMeta`),
  ``.device`` and ``.probabilities(x)``.
- :func:`read_model_meta` - a model file's description from its sidecar, without loading it.
- :func:`bundled_model_path`, :func:`model_sha256`, :func:`file_sha256` - provenance (the
  project's one file hash).
- :func:`resolve_device` - the one device resolution (``"auto"`` → CUDA when available).
- :func:`autocast_dtype` - bf16 / fp16 / float32 from the device's compute capability, decided
  once per model (``SegmentationModel.compute_dtype``); :func:`exact_float32` - a block
  without TF32, for exact comparisons on a GPU.

The bundled model segments ``("background", "lymphocyte", "nucleus")`` (softmax; "nucleus"
= non-lymphocyte nuclei) in one normalised Hoechst channel at 0.5 µm/px; see
``weights/MODEL_CARD.md``.
"""

from __future__ import annotations

from wsi_hipe.models._checkpoint import (
    DEFAULT_CLASS_NAMES,
    DEFAULT_NORMALIZATION,
    ModelMeta,
    file_sha256,
    read_sidecar,
    save_checkpoint,
    sidecar_path,
)
from wsi_hipe.models._load import (
    BUNDLED_MODEL_NAME,
    TORCHSCRIPT_SUFFIXES,
    bundled_model_path,
    load_model,
    model_sha256,
    read_model_meta,
)
from wsi_hipe.models._precision import autocast_dtype, device_capability, exact_float32
from wsi_hipe.models._unet import (
    RESNET_ENCODERS,
    architecture_dict,
    build_unet,
    count_parameters,
    fold_batchnorm,
)
from wsi_hipe.models._wrapper import (
    SegmentationModel,
    logits_to_labels,
    logits_to_probabilities,
    resolve_device,
)

__all__ = [
    "BUNDLED_MODEL_NAME",
    "DEFAULT_CLASS_NAMES",
    "DEFAULT_NORMALIZATION",
    "RESNET_ENCODERS",
    "TORCHSCRIPT_SUFFIXES",
    "ModelMeta",
    "SegmentationModel",
    "architecture_dict",
    "autocast_dtype",
    "build_unet",
    "bundled_model_path",
    "count_parameters",
    "device_capability",
    "exact_float32",
    "file_sha256",
    "fold_batchnorm",
    "load_model",
    "logits_to_labels",
    "logits_to_probabilities",
    "model_sha256",
    "read_model_meta",
    "read_sidecar",
    "save_checkpoint",
    "sidecar_path",
    "resolve_device",
]
