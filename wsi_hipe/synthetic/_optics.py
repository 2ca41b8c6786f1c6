"""Image formation: from drawn nuclei to what the camera records.

Nuclei + tissue autofluorescence (faintly textured), optional tissue folds (brighter band) and
out-of-focus patches (extra blur), Gaussian PSF blur, smooth illumination falloff with mild
per-field vignetting, dark offset, then Gaussian-like (Irwin–Hall) shot noise + read noise from
a per-pixel hash, clipped to ``[0, 1]``. Every random value comes from a hash of the absolute
pixel position, so a region equals the crop of any larger region bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np

from wsi_hipe.synthetic._noise import domain, normal, smoothstep
from wsi_hipe.synthetic._params import SlideParams

__all__ = ["OOF_SIGMA_UM", "blur_radius", "chromatin_texture", "form_image"]

_TEX_FINE_UM = 0.35  # chromatin texture: fine grain
_TEX_COARSE_UM = 0.9  # chromatin texture: clumps
#: Extra blur (µm) inside out-of-focus patches.
OOF_SIGMA_UM = 2.5
_BLUR_TRUNCATE = 3.0  # Gaussian kernels are cut at 3 sigma


def blur_radius(sigma_px: float) -> int:
    """Half-width in px of the Gaussian kernel of ``sigma_px`` (cut at 3 sigma)."""
    return int(_BLUR_TRUNCATE * sigma_px + 0.5)


def _gaussian(img: np.ndarray, sigma_px: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma_px, radius=blur_radius(sigma_px), mode="nearest")


def chromatin_texture(
    seed: int, x0: int, y0: int, width: int, height: int, mpp: float
) -> np.ndarray:
    """Zero-mean chromatin texture (≈ unit std) on pixels [x0, x0+width) × [y0, y0+height)."""
    fine = _TEX_FINE_UM / mpp
    coarse = _TEX_COARSE_UM / mpp
    pad = blur_radius(coarse)
    ix = np.arange(x0 - pad, x0 + width + pad, dtype=np.int64)[None, :]
    iy = np.arange(y0 - pad, y0 + height + pad, dtype=np.int64)[:, None]
    white = normal(seed, domain("texture"), iy, ix, dtype=np.float32)
    crop = (slice(pad, pad + height), slice(pad, pad + width))
    f = _gaussian(white, fine)[crop] * _noise_gain(fine)
    g = _gaussian(white, coarse)[crop] * _noise_gain(coarse)
    return (0.4 * f + 0.9 * g).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _noise_gain(sigma_px: float) -> float:
    """1 / std of unit white noise after the 2-D Gaussian blur of ``sigma_px``."""
    r = blur_radius(sigma_px)
    if sigma_px <= 0 or r == 0:
        return 1.0
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    k /= k.sum()
    return float(1.0 / np.sum(k * k))


def form_image(
    image: np.ndarray,
    *,
    seed: int,
    p: SlideParams,
    mpp: float,
    origin: tuple[int, int],
    fields: dict[str, np.ndarray],
    texture: np.ndarray,
) -> np.ndarray:
    """What the camera records of the drawn canvas ``image`` (ch, cw) float32 (modified).

    Parameters
    ----------
    origin : (int, int)
        Level-0 px of the canvas's top-left pixel (the noise is a hash of the absolute pixel).
    fields : dict
        Per-pixel fields of the canvas: ``"tissue"`` (raw: tissue where it exceeds
        ``p.tissue_threshold``), ``"illumination"``, and, where they are present, ``"fold"`` and
        ``"out_of_focus"`` (weights in [0, 1]).
    texture : (ch, cw) float32 ndarray
        The chromatin texture of the canvas (:func:`chromatin_texture`).

    Returns
    -------
    (ch, cw) float32 ndarray in [0, 1]
    """
    ox, oy = origin
    ch, cw = image.shape
    tissue_soft = smoothstep((fields["tissue"] - p.tissue_threshold) / 0.02 + 0.5)
    tissue_soft = tissue_soft.astype(np.float32)  # weight in [0, 1], soft edge
    # Tissue autofluorescence (cytoplasm, matrix), faintly textured.
    image += p.autofluorescence * tissue_soft * (1.0 + 0.3 * texture)
    if "fold" in fields:
        fold = fields["fold"] * tissue_soft
        image *= 1.0 + 0.8 * fold
        image += 0.05 * fold
    image = _gaussian(image, p.psf_sigma_um / mpp)
    if "out_of_focus" in fields:
        w_oof = fields["out_of_focus"]
        image = image + w_oof * (_gaussian(image, OOF_SIGMA_UM / mpp) - image)
    signal = p.gain * image * fields["illumination"] + p.offset
    np.maximum(signal, 0.0, out=signal)
    noise = normal(
        seed,
        domain("pixel-noise"),
        np.arange(oy, oy + ch, dtype=np.int64)[:, None],
        np.arange(ox, ox + cw, dtype=np.int64)[None, :],
    )
    signal += np.sqrt(signal / p.photons + p.read_noise**2) * noise
    np.clip(signal, 0.0, 1.0, out=signal)
    return signal
