"""Scalar scores of a segmentation model: what HiPe explains and what the pipeline stitches.

A *score* turns a segmentation model into a scalar function of its input, one value per
batch item::

    forward = class_area(model, class_index=1, region=core)   # expected lymphocyte area
    forward(batch)        # (B, C, H, W) float -> (B,) float32

``model`` is anything that maps a ``(B, C, H, W)`` batch to ``(B, K, H, W)`` *logits* (a
:class:`wsi_hipe.models.SegmentationModel`, an ``nn.Module``, a function). Probabilities
come from a softmax over ``K`` (or a sigmoid per channel, when ``activation="sigmoid"`` or
the model's ``meta.activation`` says so), always computed in float32, even when the model
itself ran under bf16/fp16 autocast.

Units
-----
- ``class_area`` / ``cell_area``: the *expected area* of the class, ``Σ_pixels p_class(x) ·
  region(x)``, in px² at the model's input resolution (each pixel counts 1 px²). Pass
  ``mpp`` (µm per pixel of the input) to get µm² instead: µm² = px² · mpp².
- ``mean_probability``: the region-weighted mean probability, dimensionless in [0, 1].
- ``logit_sum``: ``Σ_pixels logit_class(x) · region(x)``, in logit · px² (any sign).

A region is an ``(H, W)`` mask or non-negative weight map on the model's input grid, e.g. the
core of a tile with halo (:func:`core_region`) or a region of interest drawn by a user.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsi_hipe.config import ScoreKind
from wsi_hipe.errors import ModelError

__all__ = [
    "SCORE_NAMES",
    "Score",
    "cell_area",
    "class_area",
    "core_region",
    "logit_sum",
    "make_score",
    "mean_probability",
]

logger = logging.getLogger(__name__)

ClassSpec = int | str | Sequence[int | str]
RegionLike = np.ndarray | torch.Tensor

#: The builder of each score kind of a run (:data:`wsi_hipe.config.ScoreKind`) and of the cell
#: score.
_KIND_BUILDERS = {
    "area": "class_area",
    "mean": "mean_probability",
    "logit": "logit_sum",
    "cell": "cell_area",
}
#: Names accepted by :func:`make_score`: the kinds and the builders' own names.
SCORE_NAMES = {**_KIND_BUILDERS, **{name: name for name in _KIND_BUILDERS.values()}}

_ACTIVATIONS = ("softmax", "sigmoid")


def _no_autocast(device_type: str):
    """A block with autocast off on ``device_type`` (nothing to switch off where it has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


@dataclass(frozen=True, eq=False)
class Score:
    """A scalar score of a segmentation model, callable on a batch.

    Build one with :func:`class_area`, :func:`mean_probability`, :func:`cell_area`,
    :func:`logit_sum` or :func:`make_score` rather than directly.

    Attributes
    ----------
    model : callable
        ``(B, C, H, W) -> (B, K, H, W)`` logits.
    kind : {"area", "mean", "logit"}
        Expected area (probability sum), weighted mean probability, or logit sum.
    class_index : tuple of int
        Output channels summed (e.g. ``(1, 2)`` = all nuclei for the bundled model).
    region : (H, W) float32 tensor or None
        Non-negative pixel weights; None = every pixel with weight 1.
    scale : float
        Factor applied to the sum (``mpp²`` for µm², 1 otherwise).
    units : str
        ``"px²"``, ``"µm²"``, ``"probability"`` or ``"logit·px²"``.
    activation : {"softmax", "sigmoid"}
        How logits become probabilities (unused for ``kind="logit"``).
    name : str
        Short description for logs and provenance.
    """

    model: Callable[[torch.Tensor], torch.Tensor]
    kind: ScoreKind
    class_index: tuple[int, ...]
    region: torch.Tensor | None
    scale: float
    units: str
    activation: str
    name: str
    _region_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Parameters
        ----------
        batch : (B, C, H, W) float tensor
            Model inputs.

        Returns
        -------
        (B,) float32 tensor
            One score per batch item, in :attr:`units`, on the model's output device.

        Raises
        ------
        ModelError
            The model returned something other than ``(B, K, H, W)`` with enough channels.
        ValueError
            The region's shape differs from the model output's ``(H, W)``.
        """
        return self.from_logits(self.model(batch))

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The score of logits the model already returned (no model call).

        ``score.from_logits(model(batch))`` equals ``score(batch)``; the pipeline uses it to
        score the segmentation pass of a tile instead of running the model twice.

        Parameters
        ----------
        logits : (B, K, H, W) tensor

        Returns
        -------
        (B,) float32 tensor
        """
        out = logits
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(
                f"score {self.name!r}: the model must return (B, K, H, W) logits, got {got}"
            )
        if max(self.class_index) >= out.shape[1]:
            raise ModelError(
                f"score {self.name!r} reads class channel(s) {list(self.class_index)} but the "
                f"model returned {out.shape[1]} channels; pass a class_index below {out.shape[1]}"
            )
        with _no_autocast(out.device.type):
            out = out.float()
            if self.kind == "logit":
                values = out
            elif self.activation == "softmax":
                values = torch.softmax(out, dim=1)
            else:
                values = torch.sigmoid(out)
            index = list(self.class_index)
            maps = values[:, index[0]] if len(index) == 1 else values[:, index].sum(dim=1)
            h, w = maps.shape[-2:]
            if self.region is None:
                total = maps.sum(dim=(-2, -1))
                if self.kind == "mean":
                    total = total / float(h * w)
            else:
                region = self._region_on(self.region, maps.device, (h, w))
                total = maps.flatten(1) @ region.flatten()
                if self.kind == "mean":
                    total = total / float(self.region.sum())
            return (total * self.scale).to(torch.float32)

    def _region_on(
        self, region: torch.Tensor, device: torch.device, shape: tuple[int, int]
    ) -> torch.Tensor:
        if tuple(region.shape) != tuple(shape):
            raise ValueError(
                f"score {self.name!r}: region has shape {tuple(region.shape)} but the "
                f"model output is {tuple(shape)}; make the region on the model input's grid"
            )
        key = str(device)
        cached = self._region_cache.get(key)
        if cached is None:
            cached = region.to(device)
            self._region_cache[key] = cached
        return cached

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (for run provenance)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "class_index": list(self.class_index),
            "units": self.units,
            "activation": self.activation,
            "scale": self.scale,
            "region_sum": None if self.region is None else float(self.region.sum()),
        }


# --- helpers ------------------------------------------------------------------------------


def _model_meta(model: Any) -> Any:
    return getattr(model, "meta", None)


def _resolve_activation(model: Any, activation: str | None) -> str:
    if activation is None:
        meta = _model_meta(model)
        activation = getattr(meta, "activation", None) or "softmax"
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    return activation


def _resolve_classes(model: Any, class_index: ClassSpec) -> tuple[int, ...]:
    items = [class_index] if isinstance(class_index, int | str) else list(class_index)
    if not items:
        raise ValueError("class_index must name at least one class, got an empty sequence")
    names = getattr(_model_meta(model), "class_names", None)
    out = []
    for item in items:
        if isinstance(item, str):
            if names is None:
                raise ValueError(
                    f"class {item!r} given by name, but the model has no meta.class_names; "
                    "pass the channel index instead"
                )
            if item not in names:
                raise ValueError(f"unknown class {item!r}; the model's classes are {list(names)}")
            out.append(list(names).index(item))
            continue
        if isinstance(item, bool) or not isinstance(item, int | np.integer):
            raise ValueError(
                f"class_index must be an int, a class name or a sequence of them, got {item!r}"
            )
        index = int(item)
        if index < 0 or (names is not None and index >= len(names)):
            valid = f"0..{len(names) - 1} ({list(names)})" if names is not None else ">= 0"
            raise ValueError(f"class_index {index} out of range; valid: {valid}")
        out.append(index)
    if len(set(out)) != len(out):
        raise ValueError(f"class_index lists a class twice: {class_index!r}")
    return tuple(out)


def _as_region(region: RegionLike | None, *, what: str = "region") -> torch.Tensor | None:
    if region is None:
        return None
    tensor = torch.as_tensor(np.asarray(region) if not isinstance(region, torch.Tensor) else region)
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.ndim != 2:
        raise ValueError(
            f"{what} must be an (H, W) mask or weight map, got shape {tuple(tensor.shape)}"
        )
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(f"{what} weights must be finite and >= 0")
    return tensor.contiguous()


def _area_scale(mpp: float | None) -> tuple[float, str]:
    if mpp is None:
        return 1.0, "px²"
    mpp = float(mpp)
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    return mpp * mpp, "µm²"


def _class_label(model: Any, classes: tuple[int, ...]) -> str:
    names = getattr(_model_meta(model), "class_names", None)
    if names is None:
        return "+".join(f"class{i}" for i in classes)
    return "+".join(names[i] for i in classes)


def _check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(
            f"model must be callable (B, C, H, W) -> (B, K, H, W), got {type(model).__name__}"
        )


# --- builders -----------------------------------------------------------------------------


def core_region(height: int, width: int, halo: int | tuple[int, int]) -> np.ndarray:
    """A mask of the core of a tile that carries a halo of context on every side.

    Parameters
    ----------
    height, width : int
        Size of the model input (core + 2·halo), px.
    halo : int or (int, int)
        Halo in px (one value, or ``(halo_y, halo_x)``).

    Returns
    -------
    (height, width) float32 ndarray
        1 inside the core, 0 in the halo.
    """
    hy, hx = (halo, halo) if isinstance(halo, int) else (int(halo[0]), int(halo[1]))
    if hy < 0 or hx < 0 or 2 * hy >= height or 2 * hx >= width:
        raise ValueError(
            f"halo {halo!r} leaves no core in a {height}x{width} input; use 0 <= halo < size/2"
        )
    mask = np.zeros((height, width), dtype=np.float32)
    mask[hy : height - hy, hx : width - hx] = 1.0
    return mask


def class_area(
    model: Callable[[torch.Tensor], torch.Tensor],
    *,
    class_index: ClassSpec = 1,
    region: RegionLike | None = None,
    mpp: float | None = None,
    activation: str | None = None,
) -> Score:
    """Expected area of a class: ``Σ p_class · region`` per batch item.

    Parameters
    ----------
    model : callable
        ``(B, C, H, W) -> (B, K, H, W)`` logits.
    class_index : int, str or sequence
        Output channel(s), by index or by name (``"lymphocyte"``) when the model has
        ``meta.class_names``; several channels are summed (``(1, 2)``: all nuclei).
    region : (H, W) mask or weights, optional
        Where to count (tile core, a region of interest); None = the whole input.
    mpp : float, optional
        µm per pixel of the model input; when given the score is in µm² (px² · mpp²).
    activation : {"softmax", "sigmoid"}, optional
        Default: the model's ``meta.activation``, else softmax.

    Returns
    -------
    Score
        ``forward(batch) -> (B,)`` float32, units px² (or µm² with ``mpp``).
    """
    _check_model(model)
    classes = _resolve_classes(model, class_index)
    scale, units = _area_scale(mpp)
    where = "" if region is None else " in region"
    return Score(
        model=model,
        kind="area",
        class_index=classes,
        region=_as_region(region),
        scale=scale,
        units=units,
        activation=_resolve_activation(model, activation),
        name=f"area of {_class_label(model, classes)}{where} [{units}]",
    )


def mean_probability(
    model: Callable[[torch.Tensor], torch.Tensor],
    *,
    class_index: ClassSpec = 1,
    region: RegionLike | None = None,
    activation: str | None = None,
) -> Score:
    """Mean probability of a class: ``Σ p_class · region / Σ region`` per batch item.

    Parameters are as for :func:`class_area`. The score is dimensionless, in [0, 1].

    Raises
    ------
    ValueError
        The region's weights sum to zero.
    """
    _check_model(model)
    classes = _resolve_classes(model, class_index)
    weights = _as_region(region)
    if weights is not None and float(weights.sum()) <= 0:
        raise ValueError("region is empty (its weights sum to 0): nothing to average over")
    where = "" if weights is None else " in region"
    return Score(
        model=model,
        kind="mean",
        class_index=classes,
        region=weights,
        scale=1.0,
        units="probability",
        activation=_resolve_activation(model, activation),
        name=f"mean p({_class_label(model, classes)}){where}",
    )


def logit_sum(
    model: Callable[[torch.Tensor], torch.Tensor],
    *,
    class_index: ClassSpec = 1,
    region: RegionLike | None = None,
) -> Score:
    """Sum of a class's logits: ``Σ logit_class · region`` per batch item (logit · px², any sign).

    Logits do not saturate the way probabilities do, but they are unbounded and can be
    negative; HiPe credits only decreases of the score.
    """
    _check_model(model)
    classes = _resolve_classes(model, class_index)
    where = "" if region is None else " in region"
    return Score(
        model=model,
        kind="logit",
        class_index=classes,
        region=_as_region(region),
        scale=1.0,
        units="logit·px²",
        activation=_resolve_activation(model, None),
        name=f"logit sum of {_class_label(model, classes)}{where}",
    )


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def cell_area(
    model: Callable[[torch.Tensor], torch.Tensor],
    cell_mask: RegionLike,
    *,
    label: int | None = None,
    class_index: ClassSpec = 1,
    dilation: int = 3,
    mpp: float | None = None,
    activation: str | None = None,
) -> Score:
    """Expected class area of one cell: ``Σ p_class`` inside the cell's dilated mask.

    Parameters
    ----------
    model : callable
        ``(B, C, H, W) -> (B, K, H, W)`` logits.
    cell_mask : (H, W) bool or int array
        The cell's mask (one connected component), or an instance label image together with
        ``label``.
    label : int, optional
        Select ``cell_mask == label`` from a label image.
    class_index : int, str or sequence
        As for :func:`class_area` (default 1 = lymphocyte).
    dilation : int
        Radius in px of the disk the mask is dilated by, so that the score keeps the whole
        predicted cell even when its outline differs slightly from the mask.
    mpp : float, optional
        µm per pixel: score in µm² instead of px².

    Returns
    -------
    Score
        ``forward(batch) -> (B,)`` float32 in px² (or µm²).

    Raises
    ------
    ValueError
        The mask is empty, not 2-D, or ``dilation`` is negative.
    """
    from scipy import ndimage

    _check_model(model)
    mask = (
        cell_mask.detach().cpu().numpy()
        if isinstance(cell_mask, torch.Tensor)
        else np.asarray(cell_mask)
    )
    if mask.ndim != 2:
        raise ValueError(f"cell_mask must be an (H, W) mask, got shape {mask.shape}")
    if label is not None:
        mask = mask == label
    elif mask.dtype != bool:
        values = np.unique(mask[mask != 0])
        if values.size > 1:
            raise ValueError(
                f"cell_mask holds {values.size} labels; pass label= to choose one cell, or a bool mask"
            )
        mask = mask != 0
    if not mask.any():
        raise ValueError(
            f"cell mask is empty{'' if label is None else f' (no pixel has label {label})'}; "
            "choose a cell that lies inside the input"
        )
    if not isinstance(dilation, int) or dilation < 0:
        raise ValueError(f"dilation must be an int >= 0 (px), got {dilation!r}")
    if dilation:
        mask = ndimage.binary_dilation(mask, structure=_disk(dilation))
    score = class_area(model, class_index=class_index, region=mask, mpp=mpp, activation=activation)
    return Score(
        model=score.model,
        kind="area",
        class_index=score.class_index,
        region=score.region,
        scale=score.scale,
        units=score.units,
        activation=score.activation,
        name=f"cell area of {_class_label(model, score.class_index)} (dilated {dilation} px) [{score.units}]",
    )


def make_score(model: Callable[[torch.Tensor], torch.Tensor], name: str, **kwargs: Any) -> Score:
    """Build a score by name: the one score dispatch (configuration files, the CLI, the pipeline).

    Parameters
    ----------
    model : callable
        ``(B, C, H, W) -> (B, K, H, W)`` logits.
    name : {"area", "mean", "logit", "cell"} or the builder names
        ``"area"`` / ``"class_area"``, ``"mean"`` / ``"mean_probability"``, ``"logit"`` /
        ``"logit_sum"``, ``"cell"`` / ``"cell_area"`` (needs ``cell_mask=``).
    **kwargs
        Passed to the builder (``class_index``, ``region``, ``mpp``, ...).

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones).
    """
    builder_name = SCORE_NAMES.get(name)
    if builder_name is None:
        raise ValueError(f"score name must be one of {sorted(SCORE_NAMES)}, got {name!r}")
    builders = {
        "class_area": class_area,
        "mean_probability": mean_probability,
        "logit_sum": logit_sum,
        "cell_area": cell_area,
    }
    if builder_name == "cell_area":
        if "cell_mask" not in kwargs:
            raise ValueError("the 'cell' score needs cell_mask=(H, W) mask of the cell")
        cell_mask = kwargs.pop("cell_mask")
        return cell_area(model, cell_mask, **kwargs)
    return builders[builder_name](model, **kwargs)
