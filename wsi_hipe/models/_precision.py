"""Compute precision on a device: the autocast dtype, decided once, and exact float32 blocks.

- :func:`autocast_dtype` — the reduced-precision dtype a model runs in under autocast, a pure
  function of the device type and its compute capability (tested without a GPU);
- :func:`device_capability` — the capability of a CUDA device, asked once per model;
- :func:`exact_float32` — a block in which cuDNN and cuBLAS compute float32 as float32 (no TF32),
  for comparisons that must not depend on the GPU's reduced-precision tensor cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autocast_dtype", "device_capability", "exact_float32"]

#: First CUDA compute capability with native bf16 arithmetic (Ampere, sm_80).
BF16_CAPABILITY = (8, 0)
#: First CUDA compute capability with fp16 tensor cores (Volta, sm_70).
FP16_CAPABILITY = (7, 0)


def autocast_dtype(device_type: str, capability: tuple[int, int] | None) -> torch.dtype | None:
    """The dtype autocast computes in on a device, or None for plain float32.

    Parameters
    ----------
    device_type : str
        ``torch.device.type``: ``"cuda"`` (also ROCm builds), ``"cpu"``, ``"mps"``, ...
    capability : (major, minor) or None
        The CUDA compute capability (:func:`device_capability`); None when unknown.

    Returns
    -------
    torch.dtype or None
        ``torch.bfloat16`` from capability 8.0 (Ampere, Hopper: native bf16 tensor cores);
        ``torch.float16`` from 7.0 (Volta, Turing: fp16 tensor cores, no bf16); None below
        7.0, on other device types, or with no capability (float32: older GPUs gain nothing
        from half precision, and bf16 there is emulated, which
        ``torch.cuda.is_bf16_supported()`` counts as supported).
    """
    if device_type != "cuda" or capability is None:
        return None
    if tuple(capability) >= BF16_CAPABILITY:
        return torch.bfloat16
    if tuple(capability) >= FP16_CAPABILITY:
        return torch.float16
    return None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` compute capability of a CUDA device; None for other devices."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def _tf32_settings() -> list[tuple[object, str, object]]:
    """The (object, attribute, exact value) triples that switch TF32 off, for this torch."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):  # torch >= 2.9
        return [(cudnn_conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Run the block with TF32 off for cuDNN convolutions and cuBLAS matrix products.

    By default cuDNN convolutions on Ampere and later GPUs compute float32 inputs with TF32
    tensor cores (10-bit mantissa), so a "float32" U-Net differs from the CPU by ~1e-3
    relative, enough to move a HiPe threshold and change a window count. Tests that assert
    exact counts, and comparisons against a float32 reference, run inside this block. The
    previous settings are restored on exit. Harmless without CUDA.
    """
    settings = _tf32_settings()
    before = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    try:
        for obj, name, value in settings:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in before:
            setattr(obj, name, value)
