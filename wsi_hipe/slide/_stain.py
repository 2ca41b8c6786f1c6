"""Which channel holds the nuclear stain, and how its intensities are normalised.

The stain channel
-----------------
Readers return RGBA. Premultiplied alpha means that transparent (unscanned) areas are 0 in
every channel, i.e. background. ``channel="auto"`` decides from the thumbnail:

* R = G = B (within 5 % of the signal): a single-channel image; the stain is the mean of R, G, B.
* One channel carries the signal (a Hamamatsu fluorescence NDPI puts DAPI/Hoechst in blue): the
  channel with the largest range (99.5th - 1st percentile) is used; the log says which, and warns
  when another channel carries at least half as much (a multi-stain slide; set ``channel``).
* Most of the scanned area bright in every channel (median of min(R, G, B) > 50 %): brightfield
  (e.g. H&E: bright background, darker tissue). Refused with :class:`StainError` unless
  ``allow_brightfield=True``, which *inverts* the image (``alpha - mean(R, G, B)``, or
  ``alpha - channel`` with an explicit channel) so that dark nuclei become bright.

An explicit ``channel`` (0/1/2 or "red"/"green"/"blue", or "mean") skips the detection.

Intensity normalisation
-----------------------
From a thumbnail of the raw stain (0..255): ``low`` = 1st percentile of the scanned pixels
(background level), ``high`` = 99.5th percentile of the tissue pixels (found with
:func:`wsi_hipe.tissue.detect_tissue`); a pixel becomes ``clip((x - low) / (high - low), 0,
CLIP_MAX)``. A thumbnail coarser than a nucleus averages nuclei with their surroundings (on a
4096² synthetic slide a 16 µm/px thumbnail put ``high`` at 120 where the full-resolution value
is 199), so when the thumbnail is coarser than 1.5 x ``NORM_MPP`` (0.5 µm/px, or the slide's own
resolution if coarser), ``high`` is the 99.5th percentile of ``NORM_SAMPLES`` (16) regions of
256² px centred on tissue (evenly spaced over the tissue pixels in row-major order, so
deterministic) and read at that resolution. Both values and how they were found are in
:meth:`Slide.provenance`; pass ``intensity=(low, high)`` to fix the scale, ``normalize=False``
for ``x / 255``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_hipe.errors import SlideReadError, StainError
from wsi_hipe.slide._protocol import CLIP_MAX
from wsi_hipe.slide._resample import Extract
from wsi_hipe.tissue import detect_tissue

__all__ = [
    "CHANNEL_NAMES",
    "HIGH_PERCENTILE",
    "LOW_PERCENTILE",
    "NORM_MPP",
    "NORM_SAMPLES",
    "NORM_SAMPLE_SIZE",
    "NORM_THUMB_RATIO",
    "ReadRaw",
    "Stain",
    "channel_option",
    "choose_stain",
    "extractor",
    "intensity_range",
    "normalise",
]

logger = logging.getLogger(__name__)

#: Percentiles of the thumbnail used for normalisation: background and bright tissue.
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.5
#: Resolution (µm/px) at which the bright end of the intensity range is measured: nuclei
#: (~7 µm) are resolved there. When the analysis thumbnail is coarser than NORM_THUMB_RATIO
#: times this, NORM_SAMPLES tissue regions of NORM_SAMPLE_SIZE px are read at it instead.
NORM_MPP = 0.5
NORM_THUMB_RATIO = 1.5
NORM_SAMPLES = 16
NORM_SAMPLE_SIZE = 256

CHANNEL_NAMES = {"red": 0, "green": 1, "blue": 2, "r": 0, "g": 1, "b": 2}
_NAME_OF_CHANNEL = {0: "red", 1: "green", 2: "blue"}

#: ``read_raw(x0, y0, width, height, scale, extract)``: a region of the slide at ``scale``
#: level-0 px per output px, as ``extract`` makes it (see :func:`~._resample.read_resampled`).
ReadRaw = Callable[[float, float, int, int, float, Extract], np.ndarray]


@dataclass(frozen=True)
class Stain:
    """How a slide's RGBA becomes the normalised stain (found once, pickled with the slide)."""

    mode: str  # "gray" | "channel" | "inverted"
    channel: int | None
    method: str  # how it was chosen, for the log and provenance
    brightfield: bool
    low: float
    high: float
    intensity_method: str


def channel_option(channel: Any) -> str | int:
    """``channel`` as ``"auto"``, ``"mean"`` or 0/1/2; ValueError naming the valid ones."""
    if isinstance(channel, str):
        key = channel.lower()
        if key in ("auto", "mean"):
            return key
        if key in CHANNEL_NAMES:
            return CHANNEL_NAMES[key]
    elif isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
        if 0 <= int(channel) <= 2:
            return int(channel)
    raise ValueError(
        "channel must be 'auto', 'mean', 0/1/2 or 'red'/'green'/'blue' (config key "
        f"slide.channel), got {channel!r}"
    )


def _rgb_mean(rgba: np.ndarray) -> np.ndarray:
    """Mean of R, G, B as float32 (h, w) (explicit sums: ~15x faster than ``mean(axis=-1)``)."""
    out = rgba[..., 0].astype(np.float32)
    out += rgba[..., 1]
    out += rgba[..., 2]
    out *= np.float32(1.0 / 3.0)
    return out


def extractor(mode: str, channel: int | None) -> Extract:
    """Map premultiplied RGBA uint8 (h, w, 4) to the raw stain, float32 (h, w) in 0..255."""
    if mode == "gray":

        def extract(rgba: np.ndarray) -> np.ndarray:
            return _rgb_mean(rgba)

    elif mode == "channel":

        def extract(rgba: np.ndarray) -> np.ndarray:
            return rgba[..., channel].astype(np.float32)

    elif mode == "inverted":
        if channel is None:

            def extract(rgba: np.ndarray) -> np.ndarray:
                out = _rgb_mean(rgba)
                np.subtract(rgba[..., 3], out, out=out)
                return out

        else:

            def extract(rgba: np.ndarray) -> np.ndarray:
                out = rgba[..., 3].astype(np.float32)
                out -= rgba[..., channel]
                return out

    else:  # pragma: no cover - internal
        raise ValueError(f"unknown stain mode {mode!r}")
    return extract


def normalise(raw: np.ndarray, stain: Stain) -> np.ndarray:
    """``clip((raw - low) / (high - low), 0, CLIP_MAX)``, in place on float32 ``raw``."""
    raw -= np.float32(stain.low)
    raw *= np.float32(1.0 / (stain.high - stain.low))
    np.clip(raw, 0.0, CLIP_MAX, out=raw)
    return raw


# --- the channel ---------------------------------------------------------------------------


def _looks_brightfield(thumb: np.ndarray) -> bool:
    """Most scanned pixels bright in every channel (median of min(R, G, B) > 50 %)."""
    scanned = thumb[..., 3] > 0
    if not scanned.any():
        return False
    alpha = thumb[..., 3][scanned][:, None]
    straight = thumb[..., :3][scanned] * (255.0 / alpha)
    return float(np.median(straight.min(axis=1))) > 127.5


def _detect_channel(thumb: np.ndarray, path: str) -> tuple[str, int | None, str]:
    scanned = thumb[..., 3] > 0
    if not scanned.any():
        logger.warning("%s: the thumbnail holds no scanned pixels; treating as gray", path)
        return "gray", None, "auto: no scanned pixels, mean of R, G, B"
    rgb = thumb[..., :3][scanned]  # premultiplied
    spread = rgb.max(axis=1) - rgb.min(axis=1)
    peak = float(np.percentile(rgb.max(axis=1), 99))
    if float(np.percentile(spread, 99)) <= 0.05 * peak + 2.0:
        return "gray", None, "auto: single channel (R = G = B), mean of R, G, B"
    ranges = np.percentile(rgb, HIGH_PERCENTILE, axis=0) - np.percentile(
        rgb, LOW_PERCENTILE, axis=0
    )
    order = np.argsort(ranges)[::-1]
    best, second = int(order[0]), int(order[1])
    detail = ", ".join(f"{_NAME_OF_CHANNEL[c]} {ranges[c]:.1f}" for c in range(3))
    if ranges[second] >= 0.5 * ranges[best]:
        logger.warning(
            "%s: more than one channel carries signal (range %s); using %s. If this is a "
            "multi-stain slide set the nuclear channel with slide.channel",
            path,
            detail,
            _NAME_OF_CHANNEL[best],
        )
    method = f"auto: channel {best} ({_NAME_OF_CHANNEL[best]}) carries the signal (range {detail})"
    return "channel", best, method


def choose_stain(
    thumb: np.ndarray | None, channel: str | int, *, allow_brightfield: bool, path: str
) -> tuple[str, int | None, str, bool]:
    """``(mode, channel, method, brightfield)`` for a :class:`Stain`.

    ``thumb`` (h, w, 4) float32 premultiplied RGBA is looked at for ``channel="auto"`` and, when
    ``allow_brightfield``, to detect brightfield; None skips both (an explicit channel).
    ``channel`` is a value of :func:`channel_option`.
    """
    brightfield = thumb is not None and _looks_brightfield(thumb)
    fixed = None if channel in ("auto", "mean") else int(channel)
    if brightfield:
        if not allow_brightfield:
            raise StainError(
                f"slide {path} looks like RGB brightfield (most of it is bright in "
                "every channel, e.g. H&E), not a fluorescence nuclear stain; the model "
                "expects bright nuclei on a dark background. Pass allow_brightfield=True "
                "(slide.allow_brightfield) to invert it, or an explicit channel "
                "(slide.channel) if it is fluorescence after all"
            )
        what = "mean of R, G, B" if fixed is None else f"channel {fixed}"
        logger.warning(
            "%s: brightfield slide; inverting it (alpha - %s) so that dark nuclei read "
            "bright (allow_brightfield)",
            path,
            what,
        )
        how = "auto" if channel == "auto" else "explicit"
        return "inverted", fixed, f"{how}: brightfield, inverted {what}", True
    if channel == "auto" and thumb is not None:
        return (*_detect_channel(thumb, path), False)
    if channel == "mean":
        return "gray", None, "explicit: mean of R, G, B", False
    return "channel", fixed, f"explicit: channel {fixed} ({_NAME_OF_CHANNEL[int(channel)]})", False


# --- the intensity range -------------------------------------------------------------------


def intensity_range(
    stain: np.ndarray,
    scanned: np.ndarray,
    scale: float,
    extract: Extract,
    *,
    mpp: float,
    path: str,
    read_raw: ReadRaw,
    min_contrast: float = 1.0,
) -> tuple[float, float, str]:
    """``(low, high, how)`` raw stain values mapped to 0 and 1, from the thumbnail.

    Parameters
    ----------
    stain : (h, w) float32 ndarray
        The raw stain (0..255) of the thumbnail; ``scanned`` (h, w) bool its scanned pixels.
    scale : float
        Level-0 px per thumbnail px.
    extract : Extract
        The stain extractor, for the tissue samples read at ``NORM_MPP``.
    mpp : float
        µm per level-0 px of the slide; ``path`` names it in the log.
    read_raw : ReadRaw
        Reads a region of the slide (the tissue samples).
    min_contrast : float, default 1.0
        Smallest ``high - low`` in raw units (one count of 8/16-bit samples; ``raw_max / 255``
        for float samples in 0..1).
    """
    values = stain[scanned] if scanned.any() else stain.ravel()
    low = float(np.percentile(values, LOW_PERCENTILE))
    tissue = detect_tissue(stain, downsample=scale, mpp=mpp).mask & scanned
    where = "tissue"
    if tissue.sum() < 16:
        tissue, where = scanned, "scanned (no tissue found)"
    sample_mpp = max(mpp, NORM_MPP)
    samples = None
    if mpp * scale > NORM_THUMB_RATIO * sample_mpp and tissue.any():
        # The thumbnail averages nuclei with their surroundings; take the bright end from
        # tissue regions read at nuclear resolution instead.
        samples = _tissue_samples(
            tissue, scale, sample_mpp, extract, mpp=mpp, path=path, read_raw=read_raw
        )
    if samples is not None and samples.size:
        high = float(np.percentile(samples, HIGH_PERCENTILE))
        n = samples.size // NORM_SAMPLE_SIZE**2
        source = (
            f"p{HIGH_PERCENTILE:g} of {n} tissue samples of {NORM_SAMPLE_SIZE}x"
            f"{NORM_SAMPLE_SIZE} px at {sample_mpp:g} µm/px"
        )
    else:
        high = float(np.percentile(stain[tissue], HIGH_PERCENTILE)) if tissue.any() else low
        source = f"p{HIGH_PERCENTILE:g} of {where} px"
    if high - low < min_contrast:
        logger.warning(
            "%s: the thumbnail has almost no contrast (low %.3g, high %.3g); using high = low + %g",
            path,
            low,
            high,
            min_contrast,
        )
        high = low + min_contrast
    how = (
        f"thumbnail {stain.shape[1]}x{stain.shape[0]}: low = p{LOW_PERCENTILE:g} of scanned "
        f"px, high = {source}; x -> clip((x - low) / (high - low), 0, {CLIP_MAX:g})"
    )
    return low, high, how


def _tissue_samples(
    tissue: np.ndarray,
    scale: float,
    sample_mpp: float,
    extract: Extract,
    *,
    mpp: float,
    path: str,
    read_raw: ReadRaw,
) -> np.ndarray | None:
    """Raw stain of up to NORM_SAMPLES regions centred on tissue, at ``sample_mpp``."""
    rows, cols = np.nonzero(tissue)
    picks = np.unique(np.linspace(0, rows.size - 1, NORM_SAMPLES).round().astype(int))
    sample_scale = sample_mpp / mpp
    half = NORM_SAMPLE_SIZE / 2 * sample_scale
    parts = []
    for i in picks:  # row-major tissue order, evenly spaced: deterministic and spread
        cx, cy = (cols[i] + 0.5) * scale, (rows[i] + 0.5) * scale
        try:
            parts.append(
                read_raw(
                    cx - half, cy - half, NORM_SAMPLE_SIZE, NORM_SAMPLE_SIZE, sample_scale, extract
                ).ravel()
            )
        except SlideReadError as exc:
            logger.debug("%s: normalisation sample skipped: %s", path, exc)
    return np.concatenate(parts) if parts else None
