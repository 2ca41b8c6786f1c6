"""``SegmentationModel``: one calling convention for every kind of segmentation model."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from wsi_hipe.config import check_device
from wsi_hipe.errors import ModelError
from wsi_hipe.models._checkpoint import ModelMeta
from wsi_hipe.models._precision import autocast_dtype, device_capability

__all__ = ["SegmentationModel", "logits_to_labels", "logits_to_probabilities", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn a device name into a usable ``torch.device``: the one device resolution.

    Parameters
    ----------
    device : str, torch.device or None
        A :data:`wsi_hipe.config.DeviceName` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``),
        ``"cuda:N"``, a ``torch.device``, or None. ``None`` and ``"auto"`` pick CUDA when it is
        available, else the CPU.

    Raises
    ------
    ModelError
        The string is not a device, or CUDA is requested on a machine without it.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        try:
            check_device(device)
        except ValueError as exc:
            raise ModelError(f"device {exc}") from None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"device must be a torch.device or a device name, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'"
        )
    return dev


class SegmentationModel(nn.Module):
    """A segmentation network with its description: ``(B, C, H, W) -> (B, K, H, W)`` logits.

    Wraps an ``nn.Module`` (smp U-Net, TorchScript module) or any Python callable with the
    same convention, checks inputs and outputs, and handles device, inference mode,
    channels-last and autocast.

    Parameters
    ----------
    network : torch.nn.Module or callable
        Maps a float32 batch ``(B, C, H, W)`` to logits ``(B, K, H, W)``, ``K =
        len(meta.class_names)``. Modules are moved to ``device`` and put in eval mode.
    meta : ModelMeta
        Class names, activation, input channels, mpp, normalisation, provenance.
    device : str or torch.device, optional
        ``None`` / ``"auto"``: CUDA when available, else CPU. Inputs are moved here.
    autocast : bool, optional
        Run the network under autocast in :attr:`compute_dtype`: bf16 on GPUs of compute
        capability ≥ 8.0, fp16 on 7.x, float32 below (:func:`autocast_dtype`, decided once
        per device, not per call). Only ever applies on CUDA; ``None`` means on for CUDA.
        Logits are returned in float32 either way.
    channels_last : bool, optional
        Use the channels-last memory format; ``None`` means on for CUDA only.

    Notes
    -----
    A call runs under ``torch.inference_mode()`` unless gradients are enabled and the input
    requires grad (gradient-based attribution baselines), in which case autograd records as
    usual. Outputs made in inference mode are inference tensors: clone them before an
    in-place update outside inference mode.
    """

    def __init__(
        self,
        network: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        meta: ModelMeta,
        *,
        device: str | torch.device | None = None,
        autocast: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if not callable(network):
            raise ModelError(
                f"network must be a torch.nn.Module or a callable, got {type(network).__name__}"
            )
        if not isinstance(meta, ModelMeta):
            raise ModelError(f"meta must be a ModelMeta, got {type(meta).__name__}")
        self.meta = meta
        self._device = resolve_device(device)
        self._autocast = autocast
        self._amp_dtype = autocast_dtype(self._device.type, device_capability(self._device))
        self._channels_last = channels_last
        if isinstance(network, nn.Module):
            self.network: nn.Module | None = network.to(self._device).eval()
            self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
            if self._use_channels_last:
                self.network.to(memory_format=torch.channels_last)
        else:
            self.network = None
            self._fn = network

    # --- properties -----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the network runs; inputs are moved here."""
        return self._device

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the output channels."""
        return self.meta.class_names

    @property
    def num_classes(self) -> int:
        """Number of output channels ``K``."""
        return self.meta.num_classes

    @property
    def in_channels(self) -> int:
        """Number of input channels ``C``."""
        return self.meta.in_channels

    @property
    def sha256(self) -> str | None:
        """SHA-256 of the file the model was loaded from (None for an in-memory callable)."""
        return self.meta.sha256

    @property
    def autocast_enabled(self) -> bool:
        """Whether calls run under autocast (CUDA of compute capability ≥ 7.0 only)."""
        if self._device.type != "cuda" or self._amp_dtype is None:
            return False
        return True if self._autocast is None else bool(self._autocast)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the network computes in: the autocast dtype when autocast is on, else
        float32. Outputs computed in another dtype differ beyond float rounding, so the
        pipeline makes it part of an output's identity (a resume needs the same one)."""
        return self._amp_dtype if self.autocast_enabled else torch.float32

    def compute_dtype_on(self, device: str | torch.device | None) -> torch.dtype:
        """:attr:`compute_dtype` once moved to ``device`` (resolved by :func:`resolve_device`,
        ``"auto"`` as in this process), e.g. where workers will run a copy of this model."""
        dev = resolve_device(device)
        amp = autocast_dtype(dev.type, device_capability(dev))
        if amp is None or self._autocast is False:
            return torch.float32
        return amp

    @property
    def _use_channels_last(self) -> bool:
        if self._channels_last is None:
            return self._device.type == "cuda"
        return bool(self._channels_last)

    @property
    def input_multiple(self) -> int:
        """Height and width of an input must be multiples of this (1 when unknown)."""
        depth = self.meta.architecture.get("encoder_depth")
        return 2 ** int(depth) if depth else 1

    def to(self, *args: Any, **kwargs: Any) -> SegmentationModel:
        """Move the network (like ``nn.Module.to``) and make the new device the input device."""
        super().to(*args, **kwargs)
        device = kwargs.get("device")
        if device is None:
            for arg in args:
                if isinstance(arg, str | torch.device):
                    device = arg
                    break
                if isinstance(arg, torch.Tensor):
                    device = arg.device
                    break
        if device is not None:
            self._device = resolve_device(device)
            self._amp_dtype = autocast_dtype(self._device.type, device_capability(self._device))
        return self

    def cpu(self) -> SegmentationModel:
        """Move to the CPU."""
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> SegmentationModel:
        """Move to a CUDA device (default: the current one)."""
        if device is None:
            return self.to("cuda")
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device)

    def extra_repr(self) -> str:
        return (
            f"classes={list(self.class_names)}, activation={self.meta.activation!r}, "
            f"in_channels={self.in_channels}, mpp={self.meta.mpp}, device={self._device}, "
            f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}, "
            f"source={self.meta.source!r}"
        )

    # --- calls ----------------------------------------------------------------------------

    def _check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ModelError(
                    f"model input must be a (B, C, H, W) float tensor, got {type(x).__name__}"
                ) from exc
        if x.ndim != 4:
            hint = " (add a batch axis: x[None])" if x.ndim == 3 else ""
            raise ModelError(
                f"model input must be a (B, C, H, W) batch, got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != self.in_channels:
            raise ModelError(
                f"model expects {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); pass the stain as a ({self.in_channels}, H, W) "
                "sample per batch item"
            )
        if not x.is_floating_point():
            raise ModelError(
                f"model input must be floating point (the normalised stain, background ~0, "
                f"nuclei ~1), got dtype {x.dtype}; normalise the image first"
            )
        multiple = self.input_multiple
        if multiple > 1 and (x.shape[-1] % multiple or x.shape[-2] % multiple):
            raise ModelError(
                f"input height and width must be multiples of {multiple} for this U-Net, got "
                f"{tuple(x.shape[-2:])}; pad or crop the tile"
            )
        return x.to(self._device, torch.float32, non_blocking=True)

    def _check_output(self, out: Any, x: torch.Tensor) -> torch.Tensor:
        if isinstance(out, tuple | list) and len(out) == 1:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"model must return a (B, K, H, W) tensor of logits, got {type(out).__name__}"
            )
        b, _, h, w = x.shape
        expected = (b, self.num_classes, h, w)
        if tuple(out.shape) != expected:
            raise ModelError(
                f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; expected "
                f"(B, K, H, W) = {expected} with K = {self.num_classes} classes "
                f"{list(self.class_names)} (pass class_names= matching the model's outputs)"
            )
        return out.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch.

        Parameters
        ----------
        x : (B, C, H, W) float tensor
            Normalised stain (any device; moved to :attr:`device`).

        Returns
        -------
        (B, K, H, W) float32 tensor
            Logits on :attr:`device`, float32 even under autocast.

        Raises
        ------
        ModelError
            Wrong rank, channel count, dtype or spatial size, or the network returned the
            wrong shape.
        """
        x = self._check_input(x)
        if self._use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wants_grad = torch.is_grad_enabled() and x.requires_grad
        grad_ctx = contextlib.nullcontext() if wants_grad else torch.inference_mode()
        if self.autocast_enabled:
            amp_ctx: Any = torch.autocast(device_type="cuda", dtype=self._amp_dtype)
        else:
            amp_ctx = contextlib.nullcontext()
        fn = self.network if self.network is not None else self._fn
        with grad_ctx, amp_ctx:
            out = fn(x)
            return self._check_output(out, x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a batch, float32.

        Returns
        -------
        (B, K, H, W) float32 tensor
            Softmax over ``K`` or a sigmoid per channel, as ``meta.activation`` says.
        """
        logits = self(x)
        with torch.inference_mode(not (torch.is_grad_enabled() and logits.requires_grad)):
            return logits_to_probabilities(logits, self.meta.activation)

    def segment(self, x: torch.Tensor, *, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pixel class labels: the one segmentation rule (:func:`logits_to_labels`).

        Parameters
        ----------
        x : (B, C, H, W) float tensor
            Normalised stain.
        logits : (B, K, H, W) tensor, optional
            ``self(x)`` when the caller already has it (the pipeline scores and segments one
            pass): the labels come from these logits and the network does not run again.

        Returns
        -------
        (B, H, W) int64 tensor
            Argmax over classes (softmax models); for sigmoid models the highest channel
            above 0.5, else 0.
        """
        if logits is None:
            logits = self(x)
        with torch.inference_mode(not (torch.is_grad_enabled() and logits.requires_grad)):
            return logits_to_labels(logits, self.meta.activation)


def logits_to_labels(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """``(B, H, W)`` int64 class labels from ``(B, K, H, W)`` logits (see :meth:`SegmentationModel.segment`)."""
    probs = logits_to_probabilities(logits, activation)
    labels = probs.argmax(dim=1)
    if activation == "sigmoid":
        labels = torch.where(probs.amax(dim=1) > 0.5, labels, torch.zeros_like(labels))
    return labels


def logits_to_probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Float32 probabilities from ``(B, K, H, W)`` logits: softmax over K or sigmoid."""
    logits = logits.float()
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    raise ModelError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
