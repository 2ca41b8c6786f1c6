"""The residual U-Net architecture: segmentation-models-pytorch ``Unet`` with a ResNet encoder."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from wsi_hipe.errors import ModelError

__all__ = ["ARCHITECTURE_NAME", "RESNET_ENCODERS", "build_unet", "unet_from_architecture"]

logger = logging.getLogger(__name__)

#: The ``architecture["name"]`` written into checkpoint sidecars for this builder.
ARCHITECTURE_NAME = "smp.Unet"

#: ResNet encoders of segmentation-models-pytorch accepted by :func:`build_unet`.
RESNET_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Encoder stages of a torchvision-style ResNet, in the order smp runs them; a U-Net of
# depth d uses the stem plus the first d - 1 of these.
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def build_unet(
    *,
    encoder: str = "resnet18",
    encoder_depth: int = 4,
    decoder_channels: Sequence[int] = (128, 64, 32, 16),
    in_channels: int = 1,
    classes: int = 3,
) -> nn.Module:
    """Build a residual U-Net (smp ``Unet`` with a ResNet encoder), randomly initialised.

    Parameters
    ----------
    encoder : {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
        ResNet encoder. No pretrained weights are downloaded (``encoder_weights=None``).
    encoder_depth : int
        Number of encoder stages, 1..5; the input is halved ``encoder_depth`` times, so its
        height and width must be multiples of ``2**encoder_depth``.
    decoder_channels : sequence of int
        Channels of each decoder block, one per encoder stage (``len == encoder_depth``).
    in_channels : int
        Input channels (1 for a single stain).
    classes : int
        Output channels (logits).

    Returns
    -------
    torch.nn.Module
        ``(B, in_channels, H, W) float32 -> (B, classes, H, W)`` logits. Encoder stages that
        a shallow ``encoder_depth`` never runs are replaced by ``nn.Identity`` so they hold
        no parameters (a smaller checkpoint; smp would keep them unused).

    Raises
    ------
    ModelError
        An unknown encoder or inconsistent depth / decoder channels.
    """
    import segmentation_models_pytorch as smp

    if encoder not in RESNET_ENCODERS:
        raise ModelError(f"encoder must be one of {list(RESNET_ENCODERS)}, got {encoder!r}")
    if not isinstance(encoder_depth, int) or not 1 <= encoder_depth <= 5:
        raise ModelError(f"encoder_depth must be an int in 1..5, got {encoder_depth!r}")
    decoder_channels = tuple(int(c) for c in decoder_channels)
    if len(decoder_channels) != encoder_depth:
        raise ModelError(
            f"decoder_channels needs one entry per encoder stage ({encoder_depth}), "
            f"got {decoder_channels!r}"
        )
    if any(c < 1 for c in decoder_channels):
        raise ModelError(f"decoder_channels must be positive, got {decoder_channels!r}")
    if in_channels < 1 or classes < 1:
        raise ModelError(
            f"in_channels and classes must be >= 1, got in_channels={in_channels!r}, "
            f"classes={classes!r}"
        )
    model = smp.Unet(
        encoder_name=encoder,
        encoder_weights=None,
        encoder_depth=encoder_depth,
        decoder_channels=decoder_channels,
        in_channels=in_channels,
        classes=classes,
    )
    for name in _RESNET_STAGES[max(encoder_depth - 1, 0) :]:
        if hasattr(model.encoder, name):
            setattr(model.encoder, name, nn.Identity())
    return model


def architecture_dict(
    *,
    encoder: str,
    encoder_depth: int,
    decoder_channels: Sequence[int],
    in_channels: int,
    classes: int,
) -> dict[str, Any]:
    """The JSON-serialisable description of a :func:`build_unet` model (sidecar ``architecture``)."""
    return {
        "name": ARCHITECTURE_NAME,
        "encoder": encoder,
        "encoder_depth": int(encoder_depth),
        "decoder_channels": [int(c) for c in decoder_channels],
        "in_channels": int(in_channels),
        "classes": int(classes),
    }


def unet_from_architecture(architecture: Mapping[str, Any]) -> nn.Module:
    """Build the model a sidecar's ``architecture`` entry describes.

    Raises
    ------
    ModelError
        The architecture name is not ``"smp.Unet"`` or a key is missing / invalid.
    """
    name = architecture.get("name")
    if name != ARCHITECTURE_NAME:
        raise ModelError(
            f"unknown architecture {name!r}; this version builds only {ARCHITECTURE_NAME!r} "
            "(load other networks as TorchScript files or pass the module to load_model)"
        )
    keys = ("encoder", "encoder_depth", "decoder_channels", "in_channels", "classes")
    missing = [k for k in keys if k not in architecture]
    if missing:
        raise ModelError(f"architecture is missing the keys {missing}; it needs {list(keys)}")
    return build_unet(**{k: architecture[k] for k in keys})


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(int(p.numel()) for p in model.parameters())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` into it (eval only).

    Works in place on the two patterns of a smp ResNet U-Net: a ``Sequential`` holding
    ``Conv2d, BatchNorm2d`` (decoder blocks, downsample shortcuts) and modules with
    ``convN`` / ``bnN`` attribute pairs (ResNet stem and basic blocks). The folded model
    computes the same function in eval mode with fewer memory passes.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, in eval mode.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (name_a, a), (name_b, b) in zip(children, children[1:], strict=False):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    setattr(module, name_a, fuse_conv_bn_eval(a, b))
                    setattr(module, name_b, nn.Identity())
        for index in range(1, 4):
            conv = getattr(module, f"conv{index}", None)
            bn = getattr(module, f"bn{index}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, f"conv{index}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{index}", nn.Identity())
    return model
