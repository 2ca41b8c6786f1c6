"""Segmentation models side by side under what real slides do to them (issue 17, item 4).

The numbers behind the choice of the bundled U-Net (BENCHMARKS.md "Model"):

1. **Held-out real tissue under acquisition changes**: the right 100 columns of the tissue DNA
   crop (``nuclei/tissue/tissue_dna_300``, columns that ``train_unet.py``'s ``data.tissue``
   holds out), normalised like a slide (1st / 99.5th percentile) and resampled to 0.5 µm/px
   from an assumed pixel size — as is (0.65 µm/px), read with a wrong pixel size (0.5 and
   0.8 µm/px), defocused (Gaussian σ 1.5 px), dim (the 16-bit values / 64: a 10-bit range) and
   saturated at the 90th percentile. Reported: all-nuclei Dice / share of the reference nuclei
   fused with another (connected components of the all-nuclei mask).
2. **Held-out synthetic tiles rendered at other µm/px** (0.5, and 0.3 / 0.65 box-filtered to
   0.5 as the slide reader does): lymphocyte / all-nuclei Dice.
3. **The seam effect**: a model trained with ``data.seams_px`` leaves background between
   touching nuclei, which the held-out truth (no seams) counts as misses. Lymphocyte Dice on
   the 24 held-out synthetic tiles of ``train_unet.py``, plain and with the seam pixels
   (``touching_seams`` of the truth, 1 px) left out of the count.

With ``--renderer-gap`` only: how the renderer's tiles differ from the real tissue crop
(nuclear share, density, touching share, background, per-nucleus brightness, edge steepness),
the measurement behind ``train_unet.py``'s ``data.native_mpp``, ``data.brightness_spread`` and
``augment.defocus_prob``.

Usage::

    .venv/bin/python benchmarks/bench_model_robustness.py [--model NAME=PATH ...]
    .venv/bin/python benchmarks/bench_model_robustness.py --renderer-gap

``PATH`` is a checkpoint (``bundled`` for the package's). Needs ``../shared/data`` for part 1
(skipped without it). CPU: about a minute per model on 2 threads.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSI_HIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
TISSUE = DATA / "nuclei" / "tissue"


@functools.cache
def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _train():
    return _module("train_unet", REPO / "pipelines" / "train_unet.py")


def _bench():
    return _module("bench_real_tissue", REPO / "benchmarks" / "bench_real_tissue.py")


def tissue_conditions() -> dict:
    """Condition name -> (raw held-out columns -> normalised image, assumed µm/px)."""
    from scipy import ndimage

    norm = _train().normalise_percentiles
    return {
        "as is (0.65 µm/px)": lambda r: (norm(r), 0.65),
        "read as 0.5 µm/px": lambda r: (norm(r), 0.5),
        "read as 0.8 µm/px": lambda r: (norm(r), 0.8),
        "defocus σ 1.5 px": lambda r: (norm(ndimage.gaussian_filter(r, 1.5)), 0.65),
        "dim (a 10-bit range)": lambda r: (norm(np.round(r / 64.0)), 0.65),
        "saturated at p90": lambda r: (norm(np.minimum(r, np.percentile(r, 90))), 0.65),
    }


def held_out_tissue(model, image: np.ndarray, mask: np.ndarray, mpp: float) -> tuple:
    """All-nuclei Dice and fused share of ``image`` (normalised, at ``mpp``) against ``mask``."""
    import torch
    from scipy import ndimage
    from skimage import transform

    scale = mpp / model.meta.mpp
    th, tw = round(image.shape[0] * scale), round(image.shape[1] * scale)
    x = transform.resize(image, (th, tw), order=1, preserve_range=True, anti_aliasing=scale < 1)
    x = np.pad(x, ((0, -th % 8), (0, -tw % 8)))  # the model's multiple of 8; 0 = background
    labels = model.segment(torch.from_numpy(x.astype(np.float32))[None, None])[0].numpy()
    labels = _bench()._back_to_source(labels[:th, :tw], image.shape, scale)
    pred, ref = labels > 0, mask > 0
    fused, _ = _bench()._fused(ndimage.label(pred)[0], mask)
    return float(2 * (pred & ref).sum() / (pred.sum() + ref.sum())), float(fused)


def synthetic_dice(model, native: float | None, tiles: int = 12) -> tuple[float, float]:
    """Pooled lymphocyte and all-nuclei Dice on held-out tiles rendered at ``native`` µm/px."""
    import torch

    train = _train()
    acc = np.zeros(4)
    for i in range(tiles):
        sample = train.synthetic_sample(1_000_000 + i, 256, 0.5, 0, native)
        labels = model.segment(torch.from_numpy(sample.image)[None, None])[0].numpy()
        t, p = sample.label == 1, labels == 1
        tn, pn = sample.label > 0, labels > 0
        acc += [2 * (t & p).sum(), t.sum() + p.sum(), 2 * (tn & pn).sum(), tn.sum() + pn.sum()]
    return float(acc[0] / acc[1]), float(acc[2] / acc[3])


def seam_dice(model, tiles: int = 24) -> tuple[float, float]:
    """Lymphocyte Dice on the held-out tiles, plain and with the truth's 1 px seams not counted."""
    import torch

    train = _train()
    acc = np.zeros(4)
    for i in range(tiles):
        plain = train.eval_sample(1_000_000 + i, 256, 0.5, 1)
        keep = ~plain.seams
        labels = model.segment(torch.from_numpy(plain.image)[None, None])[0].numpy()
        t, p = plain.label == 1, labels == 1
        acc += [
            2 * (t & p).sum(),
            t.sum() + p.sum(),
            2 * (t & p & keep).sum(),
            (t & keep).sum() + (p & keep).sum(),
        ]
    return float(acc[0] / acc[1]), float(acc[2] / acc[3])


def nucleus_stats(image: np.ndarray, instances: np.ndarray, mpp: float) -> dict:
    """What a nuclei image looks like: density, touching, brightness spread, edge steepness."""
    from scipy import ndimage

    fg = instances > 0
    ids = np.unique(instances[fg])
    touching = np.unique(instances[_train().touching_seams(instances, 1)])
    background = image[~ndimage.binary_dilation(fg, iterations=3)]
    brightness = ndimage.mean(image, instances, ids)
    gy, gx = np.gradient(image.astype(np.float64))
    edge = ndimage.binary_dilation(fg) & ~ndimage.binary_erosion(fg)
    return {
        "nuclear_share": float(fg.mean()),
        "nuclei_per_1000um2": len(ids) / (image.size * mpp**2) * 1000,
        "touching_share": len(touching) / max(len(ids), 1),
        "background_median": float(np.median(background)),
        "brightness_p10_p50_p90": np.percentile(brightness, [10, 50, 90]).round(2).tolist(),
        "edge_gradient_median": float(np.median(np.hypot(gy, gx)[edge])),
    }


def renderer_gap(tiles: int = 6) -> None:
    """The tissue crop (normalised, at 0.5 µm/px) against rendered tiles (the renderer alone)."""
    import tifffile
    from skimage import transform

    from wsi_hipe.synthetic import render_tile

    train = _train()
    raw = tifffile.imread(TISSUE / "tissue_dna_300.tiff")
    mask = tifffile.imread(TISSUE / "tissue_dna_300_mask.tiff").astype(np.int64)
    shape = (round(raw.shape[0] * 1.3), round(raw.shape[1] * 1.3))  # 0.65 -> 0.5 µm/px
    image = transform.resize(train.normalise_percentiles(raw), shape, order=1, preserve_range=True)
    rows = [("real tissue crop", nucleus_stats(image, transform.resize(
        mask, shape, order=0, preserve_range=True).astype(np.int64), 0.5))]  # fmt: skip
    for seed in range(tiles):
        region = render_tile(seed * 100_003, 256, mpp=0.5)
        inst = train.region_instances(region)
        if (inst > 0).mean() > 0.05:
            rows.append((f"rendered tile {seed * 100_003}", nucleus_stats(region.image, inst, 0.5)))
    keys = list(rows[0][1])
    print("\nThe renderer against the real tissue crop (both at 0.5 µm/px)\n")
    print("| | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, stats in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in stats.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model to compare (repeat); default: the bundled one",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--renderer-gap",
        action="store_true",
        help="only compare the renderer's tiles with the real tissue crop (no model)",
    )
    args = parser.parse_args(argv)
    if args.renderer_gap:
        renderer_gap()
        return 0
    import torch

    from wsi_hipe.models import load_model

    torch.set_num_threads(args.threads)
    specs = [m.partition("=") for m in args.model] or [("bundled", "=", "bundled")]
    models = {name: load_model(path or name, device="cpu") for name, _, path in specs}
    header = "| | " + " | ".join(models) + " |\n|---|" + "---:|" * len(models)
    print("sha256: " + ", ".join(f"{k} {str(m.sha256)[:8]}" for k, m in models.items()))
    if (TISSUE / "tissue_dna_300.tiff").is_file():
        import tifffile

        cols = _bench().HELD_OUT_COLS
        raw = tifffile.imread(TISSUE / "tissue_dna_300.tiff").astype(np.float32)[:, -cols:]
        mask = tifffile.imread(TISSUE / "tissue_dna_300_mask.tiff").astype(np.int64)[:, -cols:]
        print("\nHeld-out tissue columns: all-nuclei Dice / fused share\n\n" + header)
        for name, condition in tissue_conditions().items():
            image, mpp = condition(raw)
            cells = [held_out_tissue(m, image, mask, mpp) for m in models.values()]
            print(f"| {name} | " + " | ".join(f"{d:.3f} / {f:.0%}" for d, f in cells) + " |")
    else:
        print(f"(no tissue crop in {TISSUE}: part 1 skipped)")
    print("\nHeld-out synthetic tiles: lymphocyte / all-nuclei Dice\n\n" + header)
    for native in (None, 0.3, 0.65):
        cells = [synthetic_dice(m, native) for m in models.values()]
        label = "rendered at 0.5" if native is None else f"rendered at {native}, box-filtered"
        print(f"| {label} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in cells) + " |")
    print("\nLymphocyte Dice, 24 held-out tiles: plain / seam pixels not counted\n\n" + header)
    cells = [seam_dice(m) for m in models.values()]
    print("| lymphocyte Dice | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
