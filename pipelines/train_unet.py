"""Train the bundled lymphocyte / nucleus U-Net on this CPU in about 15 minutes.

Usage::

    python pipelines/train_unet.py --config configs/train_unet.yaml [--out DIR] [--minutes N]
                                   [--max-steps N] [--threads N] [--seed N]

Data
----
- Synthetic Hoechst tiles from :func:`wsi_hipe.synthetic.render_tile` at ~0.5 µm/px (a small
  µm/px jitter), labels 0 = background, 1 = lymphocyte, 2 = other nucleus. Held-out tiles use
  seeds disjoint from the training seeds.
- Optionally real BBBC039 Hoechst images (U2OS nuclei, 20x ≈ 0.65 µm/px, 12-bit), rescaled to
  the training µm/px, normalised per image like a slide (1st / 99.5th percentile → 0 / 1,
  clipped to [0, 1.5]); every nucleus is labelled 2 ("nucleus": these are not lymphocytes).
  The last ``bbbc039_eval`` images (sorted by name) are held out for the all-nuclei Dice.
- Optionally (``data.tissue``) the real CyCIF tissue DNA crop: its left columns train with
  every nucleus labelled "any nucleus" (:data:`UNKNOWN_NUCLEUS`), its right
  ``tissue_eval_cols`` columns are held out (Dice, connected components, fused share).
- Optionally (``data.seams_px``) background seams where two instances touch, so packed nuclei
  come out separated.

Augmentation makes the model robust to slide normalisation: random gain, offset and gamma,
Gaussian noise, occasional blur, flips and 90° rotations. Where the real tissue crop differs
from the renderer (BENCHMARKS.md, "Model"), optional augmentations bring
the synthetic tiles closer: rendering at a native 0.25-0.65 µm/px and box-filtering to the
training µm/px (``data.native_mpp``), a per-nucleus brightness spread
(``data.brightness_spread``), out-of-focus regions (``augment.defocus_prob``) and 16-bit
quantisation with saturation (``augment.acquisition_prob``).

Output (``--out``, default ``wsi_hipe/models/weights``): ``lymphocyte_unet.safetensors``, its
JSON sidecar (architecture, classes, normalisation, µm/px, training data, held-out metrics),
``MODEL_CARD.md`` and ``training_log.json``. The schedule is cosine over the time budget (or
over ``--max-steps``, which makes a run reproducible step for step).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from wsi_hipe.errors import ConfigError  # noqa: E402
from wsi_hipe.models import (  # noqa: E402
    BUNDLED_MODEL_NAME,
    DEFAULT_CLASS_NAMES,
    DEFAULT_NORMALIZATION,
    ModelMeta,
    architecture_dict,
    build_unet,
    count_parameters,
    save_checkpoint,
)

logger = logging.getLogger("train_unet")

BBBC039_MPP = 0.65  # 20x objective of the ImageXpress images in BBBC039
TISSUE_MPP = 0.65  # the CyCIF tissue DNA crop in ../shared/data/nuclei/tissue (no pixel size)
#: Training label of a real nucleus whose class is unknown: supervised as "any nucleus".
UNKNOWN_NUCLEUS = 3


# --- configuration ------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    encoder: str = "resnet18"
    encoder_depth: int = 3
    decoder_channels: tuple[int, ...] = (32, 16, 8)


class DataSection(_Section):
    mpp: float = 0.5
    mpp_jitter: float = 0.08
    tile_size: int = 256
    synthetic_train_tiles: int = 200
    synthetic_eval_tiles: int = 24
    synthetic_eval_seed: int = 1_000_000
    bbbc039: bool = True
    bbbc039_dir: str | None = None
    bbbc039_eval: int = 2
    bbbc039_fraction: float = 0.25
    # Real tissue nuclei (../shared/data/nuclei/tissue: one CyCIF DNA crop, 263 instances): the
    # left columns train (every nucleus labelled "any nucleus", no class), the rightmost
    # ``tissue_eval_cols`` source columns are held out.
    tissue: bool = False
    tissue_eval_cols: int = 100
    tissue_fraction: float = 0.2
    # Touching instances: pixels within ``seams_px`` of another instance become background in
    # the training labels, so the model learns to leave a gap between packed nuclei (0: off).
    seams_px: int = 0
    # Synthetic tiles rendered at a native µm/px drawn log-uniformly from this range, then
    # box-filtered to the training µm/px as ``wsi_hipe.slide`` resamples a slide (None: rendered
    # at the training µm/px directly).
    native_mpp: tuple[float, float] | None = None
    # Per-nucleus brightness factor exp(N(0, spread²)) on synthetic tiles: real tissue nuclei
    # vary ~2.6x in brightness (p10-p90) where the renderer's vary ~1.35x (0: off).
    brightness_spread: float = 0.0


class TrainSection(_Section):
    minutes: float = 15.0
    clock: Literal["cpu", "wall"] = "cpu"
    max_steps: int | None = None
    batch_size: int = 8
    crop: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-5
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    log_every: int = 25


class AugmentSection(_Section):
    gain: tuple[float, float] = (0.6, 1.5)
    offset: tuple[float, float] = (-0.05, 0.08)
    gamma: tuple[float, float] = (0.7, 1.4)
    noise: tuple[float, float] = (0.0, 0.05)
    blur_prob: float = 0.2
    clip: tuple[float, float] = (0.0, 1.5)
    # Out of focus: a Gaussian blur of sigma px in ``defocus_sigma_px``, over the whole crop or
    # a smooth random part of it, with probability ``defocus_prob``.
    defocus_prob: float = 0.0
    defocus_sigma_px: tuple[float, float] = (0.8, 2.5)
    # A 16-bit acquisition, with probability ``acquisition_prob``: quantised to ``counts`` grey
    # levels per unit of normalised intensity (log-uniform: a dim 16-bit image uses few of its
    # levels), then saturated at a level drawn from ``saturation``; below 1 the brightest nuclei
    # clip and the slide's high percentile lands on the clip level (as on the real tissue crop,
    # whose 99.5th percentile is 65535), so the clip level becomes 1.
    acquisition_prob: float = 0.0
    saturation: tuple[float, float] = (0.7, 1.3)
    counts: tuple[float, float] = (48.0, 4096.0)


class TrainConfig(_Section):
    seed: int = 0
    threads: int = 2
    out: str = "wsi_hipe/models/weights"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    augment: AugmentSection = AugmentSection()


def load_train_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Read the YAML config (unknown keys rejected) and apply command-line overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read training config {str(path)!r}: {exc}") from exc
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return TrainConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid training config {str(path)!r}:\n{exc}") from exc


# --- data ---------------------------------------------------------------------------------


@dataclass
class Sample:
    image: np.ndarray  # (H, W) float32 normalised stain
    label: np.ndarray  # (H, W) uint8: 0 background, 1 lymphocyte, 2 other nucleus
    source: str
    seams: np.ndarray | None = None  # (H, W) bool: pixels a seamed label would cut (held out)


#: Offset of the ids of non-lymphocyte nuclei in :func:`region_instances` (above any cell id).
OTHER_NUCLEUS_ID = 2**40


def region_instances(region) -> np.ndarray:
    """Instance ids of a rendered region: its lymphocyte ids, and for the other nuclei (a mask
    only) the connected components of the mask, offset by :data:`OTHER_NUCLEUS_ID`."""
    from scipy import ndimage

    other, _ = ndimage.label(region.nuclei & (region.lymphocytes == 0))
    lymph = region.lymphocytes.astype(np.int64)
    offset = np.where(other > 0, other.astype(np.int64) + OTHER_NUCLEUS_ID, 0)
    return np.where(lymph > 0, lymph, offset)


def synthetic_sample(
    seed: int,
    size: int,
    mpp: float,
    seams_px: int = 0,
    native_mpp: float | None = None,
    brightness_spread: float = 0.0,
    *,
    cut_seams: bool = True,
) -> Sample:
    """A rendered tile and its labels at ``mpp``; rendered at ``native_mpp`` and box-filtered to
    ``mpp`` if given, its nuclei's brightness varied by ``brightness_spread`` (log-normal σ).
    With ``seams_px`` the pixels within that distance of another instance become background,
    or, with ``cut_seams=False``, are only returned as ``Sample.seams`` (held-out tiles)."""
    from wsi_hipe.synthetic import render_tile

    n_native = size if native_mpp is None else max(1, round(size * mpp / native_mpp))
    region = render_tile(seed, n_native, mpp=mpp if native_mpp is None else native_mpp)
    instances = region_instances(region)
    image = region.image.astype(np.float32)
    if brightness_spread > 0:
        image = vary_brightness(image, instances, brightness_spread, np.random.default_rng(seed))
    if n_native != size:
        image, instances = box_resample(image, instances, size)
    label = np.where(instances >= OTHER_NUCLEUS_ID, 2, np.where(instances > 0, 1, 0))
    label = label.astype(np.uint8)
    source = f"synthetic:{seed}" if native_mpp is None else f"synthetic:{seed}@{native_mpp:.3f}"
    sample = Sample(image, label, source)
    if seams_px:
        seams = touching_seams(instances, seams_px)
        if cut_seams:
            label[seams] = 0
        else:
            sample.seams = seams
    return sample


def eval_sample(seed: int, size: int, mpp: float, seams_px: int = 0) -> Sample:
    """A held-out tile with its plain labels and, with ``seams_px``, the seam pixels that a
    model trained with seams leaves as background (scored apart by :func:`evaluate`)."""
    return synthetic_sample(seed, size, mpp, seams_px, cut_seams=False)


def box_resample(
    image: np.ndarray, instances: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A square tile to ``size`` px: the image by the slide reader's box filter (area-weighted
    mean; covering pixels when upsampling), the instances by the pixel under each centre."""
    from wsi_hipe.slide._resample import _area_weights

    n = image.shape[0]
    ratio = n / size
    w = _area_weights(0.0, ratio, size, n)
    out = np.asarray(w @ (w @ image.astype(np.float32)).T).T.astype(np.float32)
    centres = np.minimum(((np.arange(size) + 0.5) * ratio).astype(np.int64), n - 1)
    return out, instances[np.ix_(centres, centres)]


def vary_brightness(
    image: np.ndarray, instances: np.ndarray, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """Each nucleus (and its blurred rim, fading over ~2 px) times its own exp(N(0, spread²))."""
    from scipy import ndimage

    ids, inverse = np.unique(instances, return_inverse=True)
    factor = np.exp(rng.normal(0.0, spread, len(ids))).astype(np.float32)
    factor[ids == 0] = 1.0
    if not (ids > 0).any():
        return image
    dist, (iy, ix) = ndimage.distance_transform_edt(instances == 0, return_indices=True)
    nearest = factor[inverse.reshape(instances.shape)[iy, ix]]
    weight = np.exp(-0.5 * (dist / 2.0) ** 2).astype(np.float32)
    return image * (1.0 + (nearest - 1.0) * weight)


def touching_seams(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels of an instance with another instance within ``width`` px (square window)."""
    from scipy import ndimage

    size = 2 * int(width) + 1
    inst = np.asarray(instances, dtype=np.int64)
    none = int(inst.max()) + 1  # above every id (scipy's filters wrap near the int64 limit)
    highest = ndimage.maximum_filter(inst, size=size)
    lowest = ndimage.minimum_filter(np.where(inst > 0, inst, none), size=size)
    return (inst > 0) & (lowest != none) & (highest != lowest)


def load_tissue(
    folder: Path, target_mpp: float, eval_cols: int, seams_px: int
) -> tuple[Sample, tuple[str, np.ndarray, np.ndarray, Sample]]:
    """The tissue crop split by columns: a training sample (label ``UNKNOWN_NUCLEUS`` on every
    nucleus, seams cut) and the held-out part (name, raw, instance mask, rescaled sample)."""
    import tifffile
    from skimage import transform

    raw = tifffile.imread(folder / "tissue_dna_300.tiff")
    mask = tifffile.imread(folder / "tissue_dna_300_mask.tiff").astype(np.int64)
    image = normalise_percentiles(raw)
    cut = raw.shape[1] - int(eval_cols)
    scale = TISSUE_MPP / target_mpp

    def rescaled(img: np.ndarray, inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (round(img.shape[0] * scale), round(img.shape[1] * scale))
        img_r = transform.resize(img, shape, order=1, preserve_range=True, anti_aliasing=False)
        inst_r = transform.resize(inst, shape, order=0, preserve_range=True, anti_aliasing=False)
        return img_r.astype(np.float32), inst_r.astype(np.int64)

    img_t, inst_t = rescaled(image[:, :cut], mask[:, :cut])
    label = np.where(inst_t > 0, UNKNOWN_NUCLEUS, 0).astype(np.uint8)
    if seams_px:
        label[touching_seams(inst_t, seams_px)] = 0
    train_sample = Sample(img_t, label, f"tissue:tissue_dna_300[:, :{cut}]")
    img_e, inst_e = rescaled(image[:, cut:], mask[:, cut:])
    eval_sample = Sample(img_e, np.where(inst_e > 0, UNKNOWN_NUCLEUS, 0).astype(np.uint8),
                         f"tissue:tissue_dna_300[:, {cut}:]")  # fmt: skip
    return train_sample, ("tissue_dna_300 (held-out columns)", raw[:, cut:], mask[:, cut:],
                          eval_sample)  # fmt: skip


def normalise_percentiles(
    raw: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.5
) -> np.ndarray:
    """Scale like ``wsi_hipe.slide``: low percentile → 0, high percentile → 1, clip [0, 1.5]."""
    raw = raw.astype(np.float32)
    low, high = np.percentile(raw, [low_pct, high_pct])
    out = (raw - low) / max(float(high - low), 1e-6)
    return np.clip(out, 0.0, 1.5).astype(np.float32)


def load_bbbc039(
    folder: Path, target_mpp: float
) -> list[tuple[str, np.ndarray, np.ndarray, Sample]]:
    """BBBC039 pairs: (name, raw image, all-nuclei mask at native res, rescaled training sample)."""
    import tifffile
    from skimage import io, transform

    out = []
    for image_path in sorted((folder / "images").glob("*.tif")):
        mask_path = folder / "masks" / (image_path.stem + ".png")
        if not mask_path.is_file():
            logger.warning("BBBC039: no mask for %s, skipped", image_path.name)
            continue
        raw = tifffile.imread(image_path)
        mask = io.imread(mask_path)
        nuclei = (mask[..., 0] if mask.ndim == 3 else mask) > 0
        scale = BBBC039_MPP / target_mpp
        shape = (round(raw.shape[0] * scale), round(raw.shape[1] * scale))
        image = normalise_percentiles(raw)
        image_r = transform.resize(image, shape, order=1, preserve_range=True, anti_aliasing=False)
        nuclei_r = (
            transform.resize(nuclei.astype(np.float32), shape, order=0, preserve_range=True) > 0.5
        )
        label = np.where(nuclei_r, 2, 0).astype(np.uint8)
        out.append(
            (
                image_path.stem,
                raw,
                nuclei,
                Sample(image_r.astype(np.float32), label, f"bbbc039:{image_path.stem}"),
            )
        )
    return out


# --- augmentation and batches -------------------------------------------------------------


def random_crop(
    sample: Sample, crop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    h, w = sample.image.shape
    y = int(rng.integers(0, h - crop + 1))
    x = int(rng.integers(0, w - crop + 1))
    image = sample.image[y : y + crop, x : x + crop]
    label = sample.label[y : y + crop, x : x + crop]
    k = int(rng.integers(0, 4))
    image, label = np.rot90(image, k), np.rot90(label, k)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def augment_acquisition(
    image: np.ndarray, cfg: AugmentSection, rng: np.random.Generator
) -> np.ndarray:
    """Out-of-focus blur (whole crop or a smooth part of it) and a 16-bit acquisition
    (quantisation, then saturation), each with its probability; a normalised crop in and out."""
    from scipy import ndimage

    x = image
    # (no draw when off: a config without these augmentations keeps its random stream)
    if cfg.defocus_prob > 0 and rng.random() < cfg.defocus_prob:
        blurred = ndimage.gaussian_filter(x, float(rng.uniform(*cfg.defocus_sigma_px)))
        if rng.random() < 0.5:
            x = blurred
        else:  # a soft-edged region of the crop, ~ a quarter to three quarters of it
            field = ndimage.gaussian_filter(rng.standard_normal(x.shape), x.shape[0] / 8)
            field /= max(float(field.std()), 1e-6)
            part = 1.0 / (1.0 + np.exp(-4.0 * (field - rng.uniform(-0.7, 0.7))))
            x = (part * blurred + (1.0 - part) * x).astype(np.float32)
    if cfg.acquisition_prob > 0 and rng.random() < cfg.acquisition_prob:
        level = float(rng.uniform(*cfg.saturation))
        lo, hi = np.log(cfg.counts)
        counts = float(np.exp(rng.uniform(lo, hi)))
        x = np.minimum(np.round(x * counts) / counts, level) / min(level, 1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def augment_intensity(
    batch: torch.Tensor, cfg: AugmentSection, gen: torch.Generator
) -> torch.Tensor:
    """Random gain · x^gamma + offset, Gaussian noise, occasional blur; per batch item."""
    b = batch.shape[0]

    def uniform(lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return (torch.rand(b, 1, 1, 1, generator=gen) * (hi - lo) + lo).to(batch.dtype)

    gamma = uniform(cfg.gamma)
    gain = uniform(cfg.gain)
    offset = uniform(cfg.offset)
    x = batch.clamp_min(0).pow(gamma) * gain + offset
    blur = (torch.rand(b, generator=gen) < cfg.blur_prob).view(b, 1, 1, 1)
    if bool(blur.any()):
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel2d = (kernel[:, None] * kernel[None, :]).view(1, 1, 3, 3)
        blurred = nn.functional.conv2d(
            nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel2d
        )
        x = torch.where(blur, blurred, x)
    sigma = uniform(cfg.noise)
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(*cfg.clip)


def make_batch(
    synthetic: list[Sample],
    real: list[Sample],
    cfg: TrainConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    tissue: list[Sample] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for _ in range(cfg.train.batch_size):
        use_real = real and rng.random() < cfg.data.bbbc039_fraction
        pool = real if use_real else synthetic
        if tissue and not use_real and rng.random() < cfg.data.tissue_fraction:
            pool = tissue
        image, label = random_crop(pool[int(rng.integers(0, len(pool)))], cfg.train.crop, rng)
        images.append(augment_acquisition(image, cfg.augment, rng))
        labels.append(label)
    x = torch.from_numpy(np.stack(images))[:, None]
    y = torch.from_numpy(np.stack(labels).astype(np.int64))
    return augment_intensity(x, cfg.augment, gen), y


# --- loss and metrics ---------------------------------------------------------------------


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, classes: tuple[int, ...] = (1, 2)
) -> torch.Tensor:
    probs = torch.softmax(logits, dim=1)
    losses = []
    for c in classes:
        p = probs[:, c]
        t = (target == c).float()
        inter = (p * t).sum()
        losses.append(1 - (2 * inter + 1) / (p.sum() + t.sum() + 1))
    return torch.stack(losses).mean()


def training_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Cross-entropy + soft Dice; ``UNKNOWN_NUCLEUS`` pixels count as "any nucleus"
    (``-log(p_1 + p_2)``, and in an all-nuclei Dice term) and in no class's Dice."""
    unknown = target == UNKNOWN_NUCLEUS
    if not bool(unknown.any()):
        return nn.functional.cross_entropy(logits, target) + dice_weight * soft_dice_loss(
            logits, target
        )
    logp = torch.log_softmax(logits, dim=1)
    known_target = torch.where(unknown, 0, target)
    nll = -logp.gather(1, known_target[:, None])[:, 0]
    nll = torch.where(unknown, -torch.logaddexp(logp[:, 1], logp[:, 2]), nll)
    probs = logp.exp()
    known = (~unknown).float()
    losses = []
    for c in (1, 2):
        p, t = probs[:, c] * known, (target == c).float()
        losses.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    p_any, t_any = probs[:, 1] + probs[:, 2], (target > 0).float()
    losses.append(1 - (2 * (p_any * t_any).sum() + 1) / (p_any.sum() + t_any.sum() + 1))
    return nll.mean() + dice_weight * torch.stack(losses).mean()


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


@torch.inference_mode()
def predict_probabilities(model: nn.Module, image: np.ndarray, multiple: int) -> np.ndarray:
    """Softmax of a whole image, padded (reflect) to a multiple of ``multiple``: (K, H, W)."""
    h, w = image.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    padded = np.pad(image, ((0, ph), (0, pw)), mode="reflect")
    logits = model(torch.from_numpy(padded)[None, None])
    return torch.softmax(logits.float(), dim=1)[0, :, :h, :w].numpy()


def evaluate(
    model: nn.Module,
    synthetic_eval: list[Sample],
    real_eval: list[tuple[str, np.ndarray, np.ndarray, Sample]],
    multiple: int,
    tissue_eval: list[tuple[str, np.ndarray, np.ndarray, Sample]] | None = None,
) -> dict[str, Any]:
    """Held-out Dice: lymphocyte and all-nuclei on synthetic tiles; all-nuclei on BBBC039."""
    from skimage import transform

    model.eval()
    inter = {"lym": 0, "nuc": 0}
    total = {"lym": 0, "nuc": 0}
    per_tile = []
    seamed = [0, 0]  # lymphocyte Dice with the truth's seam pixels not counted
    for sample in synthetic_eval:
        probs = predict_probabilities(model, sample.image, multiple)
        pred = probs.argmax(axis=0)
        for key, p, t in (
            ("lym", pred == 1, sample.label == 1),
            ("nuc", pred > 0, sample.label > 0),
        ):
            inter[key] += int(np.logical_and(p, t).sum())
            total[key] += int(p.sum() + t.sum())
        per_tile.append(dice(pred == 1, sample.label == 1))
        if sample.seams is not None:
            keep = ~sample.seams
            p, t = (pred == 1) & keep, (sample.label == 1) & keep
            seamed[0] += 2 * int((p & t).sum())
            seamed[1] += int(p.sum() + t.sum())
    metrics: dict[str, Any] = {
        "dice_lymphocyte_synthetic": 2 * inter["lym"] / max(total["lym"], 1),
        "dice_all_nuclei_synthetic": 2 * inter["nuc"] / max(total["nuc"], 1),
        "dice_lymphocyte_synthetic_per_tile_mean": float(np.mean(per_tile)) if per_tile else None,
        "synthetic_eval_tiles": len(synthetic_eval),
    }
    if seamed[1]:
        # A model trained with seams leaves them as background, which the plain truth counts
        # as missed: this figure compares it fairly with a model trained without.
        metrics["dice_lymphocyte_synthetic_seams_excluded"] = seamed[0] / seamed[1]
    real_dice = {}
    for name, raw, nuclei, sample in real_eval:
        probs = predict_probabilities(model, sample.image, multiple)
        p_nuclei = probs[1] + probs[2]
        back = transform.resize(
            p_nuclei, raw.shape, order=1, preserve_range=True, anti_aliasing=False
        )
        real_dice[name] = dice(back > 0.5, nuclei)
    if real_dice:
        metrics["dice_all_nuclei_bbbc039"] = float(np.mean(list(real_dice.values())))
        metrics["dice_all_nuclei_bbbc039_per_image"] = real_dice
    for _name, raw, instances, sample in tissue_eval or []:
        from scipy import ndimage

        probs = predict_probabilities(model, sample.image, multiple)
        back = transform.resize(
            probs[1] + probs[2], raw.shape, order=1, preserve_range=True, anti_aliasing=False
        )
        pred = back > 0.5
        components, n = ndimage.label(pred)
        fused, _ = _real_tissue_bench()._fused(components, instances)
        metrics["dice_all_nuclei_tissue_held_out"] = dice(pred, instances > 0)
        metrics["tissue_held_out_nuclei"] = len(np.unique(instances[instances > 0]))
        metrics["tissue_held_out_components"] = int(n)
        metrics["tissue_held_out_fused_share"] = float(fused)
    return metrics


# --- training -----------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Training samples and the held-out sets (synthetic tiles; BBBC039 images with names)."""

    synthetic: list[Sample]
    synthetic_eval: list[Sample]
    real_train: list[Sample]
    real_eval: list[tuple[str, np.ndarray, np.ndarray, Sample]]
    tissue_train: list[Sample] = field(default_factory=list)
    tissue_eval: list[tuple[str, np.ndarray, np.ndarray, Sample]] = field(default_factory=list)


@dataclass
class Fit:
    """What the training loop did."""

    steps: int
    history: list[dict[str, Any]]
    seconds: float
    cpu_seconds: float


def train(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Train the U-Net of ``cfg`` and write weights, sidecar, model card and log to ``out_dir``."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_training_data(cfg, rng, t_start)
    arch = architecture_dict(
        encoder=cfg.model.encoder,
        encoder_depth=cfg.model.encoder_depth,
        decoder_channels=cfg.model.decoder_channels,
        in_channels=1,
        classes=len(DEFAULT_CLASS_NAMES),
    )
    model = build_unet(**{k: v for k, v in arch.items() if k != "name"})
    logger.info("model: %s, %.2f M parameters", arch, count_parameters(model) / 1e6)
    fit = fit_model(model, data, cfg, rng, gen)
    logger.info(
        "trained %d steps in %.0f s wall, %.0f s CPU; evaluating",
        fit.steps,
        fit.seconds,
        fit.cpu_seconds,
    )
    metrics = evaluate(
        model, data.synthetic_eval, data.real_eval, 2**cfg.model.encoder_depth, data.tissue_eval
    )
    logger.info("held-out metrics: %s", json.dumps(metrics, indent=1))
    training = training_record(cfg, data, fit, t_start)
    meta = ModelMeta(
        class_names=DEFAULT_CLASS_NAMES,
        activation="softmax",
        in_channels=1,
        channel_names=("Hoechst",),  # any nuclear stain matches it; marker channels are refused
        mpp=cfg.data.mpp,
        normalization=dict(DEFAULT_NORMALIZATION),
        architecture=arch,
        training=training,
        metrics=metrics,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = save_checkpoint(model, out_dir / BUNDLED_MODEL_NAME, meta=meta)
    (out_dir / "training_log.json").write_text(
        json.dumps({"history": fit.history, "metrics": metrics}, indent=1) + "\n"
    )
    write_model_card(
        out_dir / "MODEL_CARD.md", arch=arch, metrics=metrics, training=training, weights=weights,
        real_tissue=real_tissue_figures(weights),
    )  # fmt: skip
    logger.info("wrote %s (%.1f MB)", weights, weights.stat().st_size / 1e6)
    return metrics


def load_training_data(cfg: TrainConfig, rng: np.random.Generator, t_start: float) -> TrainingData:
    """Render the synthetic tiles (µm/px jittered with ``rng``) and read BBBC039 if asked."""
    d = cfg.data
    logger.info(
        "rendering %d synthetic training tiles (%d px)", d.synthetic_train_tiles, d.tile_size
    )
    mpps = d.mpp * (1 + rng.uniform(-d.mpp_jitter, d.mpp_jitter, d.synthetic_train_tiles))
    natives: list[float | None] = [None] * d.synthetic_train_tiles
    if d.native_mpp is not None:
        lo, hi = np.log(d.native_mpp)
        natives = [float(v) for v in np.exp(rng.uniform(lo, hi, d.synthetic_train_tiles))]
    synthetic = [
        synthetic_sample(
            cfg.seed * 100_003 + i,
            d.tile_size,
            float(m),
            d.seams_px,
            natives[i],
            d.brightness_spread,
        )  # fmt: skip
        for i, m in enumerate(mpps)
    ]
    synthetic_eval = [
        eval_sample(d.synthetic_eval_seed + i, d.tile_size, d.mpp, d.seams_px)
        for i in range(d.synthetic_eval_tiles)
    ]
    logger.info("synthetic data ready in %.0f s", time.perf_counter() - t_start)

    real_train: list[Sample] = []
    real_eval: list[tuple[str, np.ndarray, np.ndarray, Sample]] = []
    if d.bbbc039:
        shared = Path(os.environ.get("WSI_HIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
        folder = Path(d.bbbc039_dir) if d.bbbc039_dir else shared / "nuclei" / "bbbc039"
        if folder.is_dir():
            pairs = load_bbbc039(folder, d.mpp)
            n_eval = min(d.bbbc039_eval, max(len(pairs) - 1, 0))
            real_eval = pairs[len(pairs) - n_eval :]
            real_train = [p[3] for p in pairs[: len(pairs) - n_eval]]
            logger.info("BBBC039: %d training, %d held-out images", len(real_train), len(real_eval))
        else:
            logger.warning("BBBC039 folder %s not found: training on synthetic data only", folder)
    tissue_train: list[Sample] = []
    tissue_eval: list[tuple[str, np.ndarray, np.ndarray, Sample]] = []
    if d.tissue:
        shared = Path(os.environ.get("WSI_HIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
        folder = shared / "nuclei" / "tissue"
        if (folder / "tissue_dna_300.tiff").is_file():
            sample, held_out = load_tissue(folder, d.mpp, d.tissue_eval_cols, d.seams_px)
            tissue_train, tissue_eval = [sample], [held_out]
            logger.info("tissue crop: %s for training, %d columns held out", sample.image.shape,
                        d.tissue_eval_cols)  # fmt: skip
        else:
            logger.warning("tissue crop not found in %s: trained without it", folder)
    return TrainingData(synthetic, synthetic_eval, real_train, real_eval, tissue_train, tissue_eval)


def fit_model(
    model: nn.Module,
    data: TrainingData,
    cfg: TrainConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> Fit:
    """AdamW with a cosine schedule over the time budget (or ``train.max_steps``)."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    # The budget counts this process's CPU time by default ("15 minutes on this CPU"), so a
    # machine shared with other jobs stretches the wall time instead of shortening training.
    budget_s = cfg.train.minutes * 60.0
    clock = time.process_time if cfg.train.clock == "cpu" else time.perf_counter
    t_train = time.perf_counter()
    c_train = clock()
    c_cpu = time.process_time()
    history: list[dict[str, Any]] = []
    step = 0
    running = 0.0
    while True:
        elapsed = time.perf_counter() - t_train
        if cfg.train.max_steps is not None:
            progress = step / cfg.train.max_steps
        else:
            progress = (clock() - c_train) / budget_s
        if progress >= 1.0:
            break
        lr = cfg.train.min_lr + 0.5 * (cfg.train.lr - cfg.train.min_lr) * (
            1 + math.cos(math.pi * progress)
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        x, y = make_batch(data.synthetic, data.real_train, cfg, rng, gen, data.tissue_train)
        logits = model(x)
        loss = training_loss(logits, y, cfg.train.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        value = float(loss.detach())
        running = 0.9 * running + 0.1 * value if step > 1 else value
        if step % cfg.train.log_every == 0:
            entry = _log_step(step, running, lr, elapsed, time.process_time() - c_cpu, progress)
            history.append(entry)
    return Fit(step, history, time.perf_counter() - t_train, time.process_time() - c_cpu)


def _log_step(
    step: int, loss: float, lr: float, elapsed: float, cpu: float, progress: float
) -> dict[str, Any]:
    logger.info(
        "step %d  loss %.4f  lr %.2e  wall %.0f s (%.2f s/step)  cpu %.0f s  budget %.0f %%",
        step,
        loss,
        lr,
        elapsed,
        elapsed / max(step, 1),
        cpu,
        100 * progress,
    )
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "wall_s": round(elapsed, 1),
        "cpu_s": round(cpu, 1),
    }


def training_record(cfg: TrainConfig, data: TrainingData, fit: Fit, t_start: float) -> dict:
    """How the weights were made, for the sidecar and the model card."""
    d = cfg.data
    return {
        "script": "pipelines/train_unet.py",
        "config": cfg.model_dump(mode="json"),
        "steps": fit.steps,
        "train_seconds": round(fit.seconds, 1),
        "train_cpu_seconds": round(fit.cpu_seconds, 1),
        "budget_clock": cfg.train.clock,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "threads": cfg.threads,
        "data": {
            "synthetic": (
                f"{d.synthetic_train_tiles} tiles of {d.tile_size} px from wsi_hipe.synthetic.render_tile "
                f"(seeds {cfg.seed * 100_003}..{cfg.seed * 100_003 + d.synthetic_train_tiles - 1}, "
                f"µm/px {d.mpp} ± {d.mpp_jitter * 100:.0f} %"
                + (
                    f", rendered at {d.native_mpp[0]}-{d.native_mpp[1]} µm/px and box-filtered"
                    if d.native_mpp is not None
                    else ""
                )
                + (
                    f", nucleus brightness x exp(N(0, {d.brightness_spread}²))"
                    if d.brightness_spread
                    else ""
                )
                + ")"
            ),
            "synthetic_held_out": f"{d.synthetic_eval_tiles} tiles, seeds {d.synthetic_eval_seed}.. at {d.mpp} µm/px",
            "bbbc039_train": [s.source for s in data.real_train],
            "bbbc039_held_out": [name for name, *_ in data.real_eval],
            "tissue_train": [t.source for t in data.tissue_train],
            "tissue_held_out": [name for name, *_ in data.tissue_eval],
            "seams_px": d.seams_px,
            "bbbc039_note": (
                f"BBBC039v1 Hoechst (U2OS, CC0), {BBBC039_MPP} µm/px rescaled to {d.mpp}, "
                "normalised per image (p1 -> 0, p99.5 -> 1, clip 1.5), all nuclei labelled 'nucleus'"
            ),
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _real_tissue_bench():
    """``benchmarks/bench_real_tissue.py`` as a module (its measures are the card's)."""
    import importlib.util

    bench = REPO / "benchmarks" / "bench_real_tissue.py"
    spec = importlib.util.spec_from_file_location("bench_real_tissue", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def real_tissue_figures(weights: Path) -> dict | None:
    """``benchmarks/bench_real_tissue.py`` on ``weights`` (None without ``../shared/data``)."""
    module = _real_tissue_bench()
    if not (module.TISSUE.is_dir() and module.CYCIF.is_dir()):
        return None
    from wsi_hipe.models import load_model

    model = load_model(weights, device="cpu")
    return {"tissue": module.tissue_nuclei(model), "cd45": module.cd45_share(model)}


def _real_tissue_lines(real: dict | None, tissue_trained: bool = False) -> str:
    if real is None:
        return (
            "Not measured here (`benchmarks/bench_real_tissue.py` needs the project's data folder)."
        )
    t, c = real["tissue"], real["cd45"]
    if tissue_trained:
        seen = """Measured by `benchmarks/bench_real_tissue.py` on the whole crops. The tissue DNA crop's left
two thirds were training data (its held-out right third: "Held-out results" above); the CyCIF
lymphoid crop was never trained on:"""
    else:
        seen = (
            "Measured by `benchmarks/bench_real_tissue.py` on data this model was never trained on:"
        )
    return f"""{seen}

- A real tissue DNA crop (CyCIF, ~0.65 µm/px, 300×300 px, 263 nuclei from a segmentation
  pipeline, `nuclei/tissue/tissue_dna_300`): all-nuclei Dice **{t["all_nuclei_dice"]:.3f}**, predicted
  nuclear area {t["area_ratio"]:.2f}× the reference, but only {t["components"]} connected components for
  {t["reference_nuclei"]} nuclei: **{t["fused_share"]:.0%} of the nuclei are fused** with a neighbour into one blob
  ({t["missed_share"]:.0%} missed). The distance-map watershed of `wsi_hipe.cells.find_cells` (what
  `--cells` applies) splits them into {t["cells_split"]} cells, of which still {t["fused_share_split"]:.0%} hold two or more
  nuclei. {t["lymphocyte_share_of_nuclear_area"]:.0%} of the nuclear area is called lymphocyte.
- The 48-channel CyCIF crop of lymphoid tissue (`slides/fluorescence/cropped_reactive_core`,
  DNA channel, 58 quantified cells; CD45+ = CD45 intensity above the Otsu threshold of the 58,
  {c["cd45_positive"]} of {c["cells"]}): called lymphocyte on {c["lymphocyte_share_cd45_positive"]:.0%} of the CD45+ cells and
  {c["lymphocyte_share_cd45_negative"]:.0%} of the CD45− ones ({c["cells"] - c["cd45_positive"]} cells: too few to conclude): the
  lymphocyte call is not a leukocyte call."""


def write_model_card(
    path: Path,
    *,
    arch: dict,
    metrics: dict,
    training: dict,
    weights: Path,
    real_tissue: dict | None = None,
) -> None:
    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    per_image = metrics.get("dice_all_nuclei_bbbc039_per_image", {})
    per_image_lines = "\n".join(f"  - `{name}`: {fmt(v)}" for name, v in per_image.items())
    data, cfg = training["data"], training["config"]
    tissue_trained = bool(data.get("tissue_train"))
    seams = int(data.get("seams_px") or 0)
    aug = cfg["augment"]
    extra_aug = []
    if aug.get("defocus_prob"):
        lo, hi = aug["defocus_sigma_px"]
        extra_aug.append(
            f"out-of-focus regions (Gaussian σ {lo}–{hi} px over the crop or a smooth part of it, "
            f"p = {aug['defocus_prob']})"
        )
    if aug.get("acquisition_prob"):
        lo, hi = aug["counts"]
        s_lo, s_hi = aug["saturation"]
        extra_aug.append(
            f"16-bit acquisitions ({lo:.0f}–{hi:.0f} grey levels per unit, saturation at "
            f"{s_lo}–{s_hi}, p = {aug['acquisition_prob']})"
        )
    aug_line = "random gain, offset, gamma, Gaussian noise, blur, flips, 90° rotations" + "".join(
        f", {a}" for a in extra_aug
    )
    tissue_lines = ""
    if tissue_trained:
        tissue_lines = f"""
- Real tissue nuclei: the left {300 - cfg["data"]["tissue_eval_cols"]} of 300 columns of the CyCIF DNA crop
  `nuclei/tissue/tissue_dna_300` (~0.65 µm/px, rescaled to the training µm/px), every nucleus
  labelled "any nucleus" (lymphocyte or nucleus both count: its cells have no class), in
  {cfg["data"]["tissue_fraction"]:.0%} of the non-BBBC039 crops; the right {cfg["data"]["tissue_eval_cols"]} columns are held out."""
    if seams:
        tissue_lines += f"""
- Touching nuclei: where two instances touch, the pixels within {seams} px of the other instance
  are labelled background (a seam), in the synthetic and tissue labels, so the model leaves a
  gap between packed nuclei that connected components and the cells watershed can split on."""
    brightness_note = ""
    if cfg["data"].get("brightness_spread"):
        brightness_note = (
            f" Training varied each synthetic nucleus's brightness by a factor "
            f"exp(N(0, {cfg['data']['brightness_spread']}²)), to make brightness a less reliable "
            "cue than size and shape."
        )
    seams_dice = ""
    if "dice_lymphocyte_synthetic_seams_excluded" in metrics:
        seams_dice = (
            f"; **{fmt(metrics['dice_lymphocyte_synthetic_seams_excluded'])}** with the 1 px seams between "
            "touching nuclei not counted (the truth has none, and this model leaves them as "
            "background by design)"
        )
    held_tissue = ""
    if "dice_all_nuclei_tissue_held_out" in metrics:
        held_tissue = f"""
- All-nuclei Dice on the held-out right third of the real tissue DNA crop:
  **{fmt(metrics["dice_all_nuclei_tissue_held_out"])}**; {metrics["tissue_held_out_components"]} connected components for its
  {metrics["tissue_held_out_nuclei"]} reference nuclei ({metrics["tissue_held_out_fused_share"]:.0%} of them share a component with another)."""
    if cfg["train"].get("max_steps"):
        schedule = (
            f"The learning-rate schedule followed `train.max_steps` ({cfg['train']['max_steps']}), so "
            "the same command repeats the run step for step (up to float rounding of the CPU)."
        )
    else:
        schedule = (
            "The learning-rate schedule followed the CPU-time budget; for a run of the same length "
            f"that any machine repeats (a step-based schedule, same seed), add `--max-steps {training['steps']}`."
        )
    text = f"""# Model card: bundled lymphocyte / nucleus U-Net

`{weights.name}` (+ `{weights.with_suffix(".json").name}`, the sidecar read by
`wsi_hipe.models.load_model`). Made by `pipelines/train_unet.py --config configs/train_unet.yaml`.

## What it is

A residual U-Net (segmentation-models-pytorch `Unet`, encoder `{arch["encoder"]}` of depth
{arch["encoder_depth"]}, decoder channels {arch["decoder_channels"]}, randomly initialised: no
ImageNet weights) that segments one Hoechst (nuclear stain) channel into
`("background", "lymphocyte", "nucleus")` with a softmax; "nucleus" means a non-lymphocyte
nucleus, so all nuclei = p(lymphocyte) + p(nucleus).

- Input: `(B, 1, H, W)` float32, H and W multiples of {2 ** arch["encoder_depth"]}, the stain normalised
  as `wsi_hipe.slide` does (1st percentile → 0, 99.5th percentile of tissue → 1, clipped to [0, 1.5]).
- Channels: the sidecar's `channel_names` is `["Hoechst"]`; any nuclear stain (Hoechst, DAPI)
  matches it, and a marker channel (e.g. `--channel CD45` of a multiplex file) is refused.
- Resolution: trained at 0.5 µm/px; resample slides to 0.5 µm/px before use.
- Output: `(B, 3, H, W)` logits.

## What "lymphocyte" means for this model

There are no real lymphocyte labels in its training data. "Lymphocyte" is the synthetic
renderer's lymphocyte (`wsi_hipe.synthetic`): a **small, round, bright, smooth nucleus** —
6–8 µm across, aspect ratio ≤ 1.15, about twice as bright as a tumour nucleus, little chromatin
texture, often packed in clusters — against tumour nuclei (10–16 µm, oval, dimmer, textured)
and stromal nuclei (spindles 11–20 × 3–5 µm). Any real nucleus that looks like that is called a
lymphocyte, whatever its lineage; no immune marker is involved.{brightness_note}

## Training data

- {training["data"]["synthetic"]} (`wsi_hipe.synthetic`: lymphocytes, tumour and stromal nuclei,
  debris, folds, blur, uneven illumination).
- Real BBBC039v1 Hoechst images (U2OS cells, CC0, Broad Bioimage Benchmark Collection):
  {training["data"]["bbbc039_note"]}. Training images: {len(training["data"]["bbbc039_train"])}.{tissue_lines}
- Augmentation: {aug_line}.
- {training["steps"]} steps, {training.get("train_cpu_seconds", float("nan")):.0f} s of CPU time ({training["train_seconds"]:.0f} s wall on a
  machine shared with other jobs), {training["threads"]} torch thread(s), torch {training["torch"]}, seed
  {training["config"]["seed"]}. Batch {training["config"]["train"]["batch_size"]} crops of {training["config"]["train"]["crop"]} px, AdamW, cosine learning rate,
  cross-entropy + soft Dice. {schedule}

## Held-out results

- Lymphocyte Dice on {metrics["synthetic_eval_tiles"]} held-out synthetic tiles: **{fmt(metrics["dice_lymphocyte_synthetic"])}**
  (mean per tile {fmt(metrics["dice_lymphocyte_synthetic_per_tile_mean"])}){seams_dice}.
- All-nuclei Dice on the same tiles: {fmt(metrics["dice_all_nuclei_synthetic"])}.
- All-nuclei Dice (p(lymphocyte) + p(nucleus) > 0.5, at the original resolution) on held-out
  real BBBC039 images: **{fmt(metrics.get("dice_all_nuclei_bbbc039", "n/a"))}**
{per_image_lines}{held_tissue}

## Intended use

A demonstration model, a fixture for tests, and a starting point for fine-tuning. It has
never seen a real tissue section with annotated lymphocytes: its lymphocyte class is learnt
from synthetic data only. **Not for clinical or diagnostic use.** Its saliency maps explain
this model, not biology.

## On real tissue

{_real_tissue_lines(real_tissue, tissue_trained)}

## Limitations and known failures

- Lymphocytes are told apart from other nuclei by size, roundness and brightness only; real
  small non-lymphocyte nuclei (e.g. some U2OS nuclei, apoptotic bodies) may be called
  lymphocytes.
- **On a real DAPI skin slide it calls the whole epidermis lymphocytes** (seen with the first
  bundled weights on a DAPI NDPI that is not among the project's data files, so not re-checked
  for these weights and not quantified: no masks), likely because packed, small, bright
  epidermal nuclei are the closest thing to the renderer's lymphocyte it knows; the size and
  shape rule it learnt has not changed.
- Densely packed real nuclei are fused into blobs (above){" less often than without seams, but still" if seams else ""}: it has no
  boundary class{" (the seams are background)" if seams else ""}; the cells watershed separates part of them, so on packed tissue a
  `--cells` row may be two nuclei.
- Held-out real data with masks: {len(per_image)} BBBC039 image(s) of cultured cells{" and one third of one tissue crop" if tissue_trained else ""}; the
  tissue crop's mask is a segmentation pipeline's output, not a gold standard.
- Sensitive to µm/px: a slide at another resolution must be resampled to 0.5 µm/px.
"""
    path.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "train_unet.yaml")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: config 'out')"
    )
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="fixed number of steps (reproducible)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--rewrite-card",
        action="store_true",
        help="only rewrite MODEL_CARD.md in --out from the checkpoint's sidecar, no training",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. data.synthetic_train_tiles=8",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    if args.minutes is not None:
        overrides["train.minutes"] = args.minutes
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_train_config(args.config, overrides)
    out_dir = args.out if args.out is not None else REPO / cfg.out
    if args.rewrite_card:
        weights = out_dir / BUNDLED_MODEL_NAME
        side = json.loads(weights.with_suffix(".json").read_text())
        write_model_card(
            out_dir / "MODEL_CARD.md",
            arch=side["architecture"],
            metrics=side["metrics"],
            training=side["training"],
            weights=weights,
            real_tissue=real_tissue_figures(weights),
        )
        return 0
    train(cfg, out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
