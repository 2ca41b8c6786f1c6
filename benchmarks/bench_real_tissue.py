"""The bundled model on the real fluorescence tissue in ``../shared/data`` (issue 17, item 4).

Two measurements (the bundled model was trained on the tissue crop's left 200 columns,
``train_unet.py``'s ``data.tissue``; its right 100 columns are also reported on their own):

1. **All-nuclei segmentation on a real tissue DNA crop** (``nuclei/tissue/tissue_dna_300``:
   CyCIF, ~0.65 µm/px, 263 nuclei from a segmentation pipeline). The crop is read through
   :func:`wsi_hipe.slide.open_slide` at the model's 0.5 µm/px (stain normalised as every slide
   is), segmented in one pass, and the labels are taken back to the crop's pixels (nearest).
   Reported: all-nuclei Dice (lymphocyte ∪ nucleus vs the mask), predicted / reference nuclear
   area, predicted connected components vs reference nuclei, the share of reference nuclei
   inside a predicted component that covers two or more of them (fused) — also after the
   distance-map watershed of :func:`wsi_hipe.cells.find_cells` that ``--cells`` applies — and
   the share of the predicted nuclear area called lymphocyte.
2. **Lymphocyte calls vs CD45** on the 48-channel CyCIF crop of lymphoid tissue
   (``slides/fluorescence/cropped_reactive_core.ome.tiff``, DNA = channel 0, its OME pixel size
   is wrong: 0.65 µm/px assumed) and its 58 quantified cells
   (``cropped_tutorial_data_pheno.h5ad``). Each cell's class is the majority label in a 3×3
   target-px window at its centroid; CD45+ is the cell's CD45 intensity above the Otsu threshold
   of the 58. Reported: the share of CD45+ and of CD45− cells called lymphocyte.

With ``--split-sweep`` also ``cells.split_depth_um`` (the watershed depth of ``--cells``)
against the shares of reference nuclei fused with another and cut in two.

Usage::

    .venv/bin/python benchmarks/bench_real_tissue.py [--model bundled|PATH] [--json OUT.json]
        [--split-sweep]

Needs ``../shared/data`` (the project's data folder, next to the checkout, or
``$WSI_HIPE_SHARED_DATA``); exits 2 without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSI_HIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
TISSUE = DATA / "nuclei" / "tissue"
CYCIF = DATA / "slides" / "fluorescence"
TISSUE_MPP = 0.65  # CyCIF, as the data README says (the files carry no usable pixel size)
#: The tissue crop's right columns held out of training (``train_unet.py``'s
#: ``data.tissue_eval_cols``): reported on their own.
HELD_OUT_COLS = 100


def _labels(model, slide, mpp: float, *, probabilities: bool = False):
    """The model's labels over the whole slide at ``mpp`` (one pass, padded to a multiple of 8),
    and with ``probabilities`` its class probabilities ``(C, H, W)`` too."""
    import torch

    w, h = slide.dimensions
    tw, th = round(w * slide.mpp / mpp), round(h * slide.mpp / mpp)
    pw, ph = -(-tw // 8) * 8, -(-th // 8) * 8
    x = torch.from_numpy(slide.read_input(0, 0, pw, ph, mpp=mpp))[None]
    with torch.no_grad():
        logits = model(x)
        labels = model.segment(x, logits=logits)[0].numpy()[:th, :tw]
        if not probabilities:
            return labels
        probs = model.probabilities(x)[0].numpy()[:, :th, :tw]
    return labels, probs


def _fused(instances: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Shares of the reference nuclei (``mask`` ids) that share their predicted instance (by
    majority) with another one, and that no predicted instance covers."""
    owners = {}
    for nucleus in np.unique(mask[mask > 0]):
        hit = instances[mask == nucleus]
        hit = hit[hit > 0]
        if hit.size:
            owners[int(nucleus)] = int(np.bincount(hit).argmax())
    per_instance = np.bincount(list(owners.values()), minlength=int(instances.max()) + 1)
    fused = sum(per_instance[c] >= 2 for c in owners.values())
    n_ref = max(len(np.unique(mask[mask > 0])), 1)  # ids need not be contiguous (a crop)
    return fused / n_ref, 1 - len(owners) / n_ref


def _back_to_source(labels: np.ndarray, shape: tuple[int, int], factor: float) -> np.ndarray:
    """Nearest target px of each source px centre (``factor`` = source px per target px)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * factor).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * factor).astype(int), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def tissue_nuclei(model) -> dict:
    import tifffile
    from scipy import ndimage

    from wsi_hipe.cells import MIN_AREA_UM2, SPLIT_DEPTH_UM, find_cells, um_to_px
    from wsi_hipe.slide import open_slide

    slide = open_slide(TISSUE / "tissue_dna_300.tiff", mpp=TISSUE_MPP)
    mask = tifffile.imread(TISSUE / "tissue_dna_300_mask.tiff")
    target, probs = _labels(model, slide, 0.5, probabilities=True)
    factor = TISSUE_MPP / 0.5
    labels = _back_to_source(target, mask.shape, factor)
    pred = labels > 0
    ref = mask > 0
    components, n_components = ndimage.label(pred)
    fused, missed = _fused(components, mask)
    # What --cells makes of it: the all-nuclei mask split by the cells module's watershed.
    cells = find_cells(
        target > 0, probs[1] + probs[2], min_area=um_to_px(MIN_AREA_UM2, 0.5, power=2),
        split_depth=um_to_px(SPLIT_DEPTH_UM, 0.5),
    )  # fmt: skip
    split = _back_to_source(cells.labels, mask.shape, factor)
    fused_split, missed_split = _fused(split, mask)
    n_ref = int(mask.max())
    # The crop's right columns, which a model trained with ``data.tissue`` never saw (scored
    # on this whole-crop segmentation; train_unet.py's own figure segments them alone).
    cut = mask.shape[1] - HELD_OUT_COLS
    held_pred, held_mask = pred[:, cut:], mask[:, cut:]
    held_components, n_held = ndimage.label(held_pred)
    held_fused, _ = _fused(held_components, held_mask)
    held_fused_split, _ = _fused(split[:, cut:], held_mask)
    held_ref = held_mask > 0
    held_out = {
        "columns": f"{cut}:{mask.shape[1]}",
        "all_nuclei_dice": float(
            2 * (held_pred & held_ref).sum() / (held_pred.sum() + held_ref.sum())
        ),
        "reference_nuclei": len(np.unique(held_mask[held_ref])),
        "components": int(n_held),
        "fused_share": float(held_fused),
        "fused_share_split": float(held_fused_split),
    }
    return {
        "all_nuclei_dice": float(2 * (pred & ref).sum() / (pred.sum() + ref.sum())),
        "area_ratio": float(pred.sum() / ref.sum()),
        "components": int(n_components),
        "reference_nuclei": n_ref,
        "fused_share": float(fused),
        "missed_share": float(missed),
        "cells_split": int(cells.n),
        "fused_share_split": float(fused_split),
        "missed_share_split": float(missed_split),
        "lymphocyte_share_of_nuclear_area": float((labels == 1).sum() / max(pred.sum(), 1)),
        "held_out": held_out,
    }


def _over_split(instances: np.ndarray, mask: np.ndarray, share: float = 0.2) -> float:
    """Share of the reference nuclei cut in two: two or more predicted instances each cover at
    least ``share`` of the nucleus's predicted pixels."""
    cut = 0
    for nucleus in np.unique(mask[mask > 0]):
        hit = instances[mask == nucleus]
        hit = hit[hit > 0]
        if hit.size and (np.bincount(hit) >= share * hit.size).sum() >= 2:
            cut += 1
    return cut / int(mask.max())


def split_sweep(model, depths_um=(0.0, 0.125, 0.25, 0.5, 1.0)) -> list[dict]:
    """``cells.split_depth_um`` against fused and cut nuclei on the real tissue crop."""
    import tifffile

    from wsi_hipe.cells import MIN_AREA_UM2, find_cells, um_to_px
    from wsi_hipe.slide import open_slide

    slide = open_slide(TISSUE / "tissue_dna_300.tiff", mpp=TISSUE_MPP)
    mask = tifffile.imread(TISSUE / "tissue_dna_300_mask.tiff")
    target, probs = _labels(model, slide, 0.5, probabilities=True)
    rows = []
    for depth in depths_um:
        cells = find_cells(
            target > 0, probs[1] + probs[2], min_area=um_to_px(MIN_AREA_UM2, 0.5, power=2),
            split_depth=um_to_px(depth, 0.5),
        )  # fmt: skip
        split = _back_to_source(cells.labels, mask.shape, TISSUE_MPP / 0.5)
        fused, missed = _fused(split, mask)
        rows.append(
            {"split_depth_um": depth, "cells": int(cells.n), "fused": fused,
             "cut": _over_split(split, mask), "missed": missed}
        )  # fmt: skip
    return rows


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


def cd45_share(model) -> dict:
    import anndata

    from wsi_hipe.slide import open_slide

    slide = open_slide(CYCIF / "cropped_reactive_core.ome.tiff", mpp=TISSUE_MPP, channel=0)
    labels = _labels(model, slide, 0.5)
    cells = anndata.read_h5ad(CYCIF / "cropped_tutorial_data_pheno.h5ad")
    cd45 = np.asarray(cells[:, "CD45"].X, dtype=float).ravel()
    threshold = _otsu(cd45)
    scale = TISSUE_MPP / 0.5
    called = []
    for x, y in zip(cells.obs["X_centroid"], cells.obs["Y_centroid"], strict=True):
        r, c = int(y * scale), int(x * scale)
        window = labels[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].ravel()
        called.append(np.bincount(window, minlength=3).argmax())
    called = np.asarray(called)
    positive = cd45 > threshold
    lymph = called == 1
    return {
        "cells": int(cd45.size),
        "cd45_threshold": threshold,
        "cd45_positive": int(positive.sum()),
        "lymphocyte_share_cd45_positive": float(lymph[positive].mean()) if positive.any() else None,
        "lymphocyte_share_cd45_negative": float(lymph[~positive].mean())
        if (~positive).any()
        else None,
        "called": {
            "background": int((called == 0).sum()),
            "lymphocyte": int(lymph.sum()),
            "nucleus": int((called == 2).sum()),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--split-sweep", action="store_true", help="also cells.split_depth_um vs fused/cut nuclei"
    )
    args = parser.parse_args(argv)
    if not (TISSUE.is_dir() and CYCIF.is_dir()):
        print(f"needs the project's data folder at {DATA}", file=sys.stderr)
        return 2
    from wsi_hipe.models import load_model

    model = load_model(args.model, device="cpu")
    result = {
        "model": args.model,
        "sha256": model.meta.sha256,
        "tissue": tissue_nuclei(model),
        "cd45": cd45_share(model),
    }
    t, c = result["tissue"], result["cd45"]
    print(f"model {args.model} (sha256 {str(model.meta.sha256)[:12]}…)")
    print(
        f"real tissue DNA crop: all-nuclei Dice {t['all_nuclei_dice']:.3f}, area "
        f"{t['area_ratio']:.2f}× the reference, {t['components']} components for "
        f"{t['reference_nuclei']} nuclei ({t['fused_share']:.0%} fused, "
        f"{t['missed_share']:.0%} missed); after the cells watershed {t['cells_split']} cells "
        f"({t['fused_share_split']:.0%} fused, {t['missed_share_split']:.0%} missed); "
        f"{t['lymphocyte_share_of_nuclear_area']:.0%} of the nuclear area called lymphocyte"
    )
    h = t["held_out"]
    print(
        f"  its held-out columns {h['columns']}: all-nuclei Dice {h['all_nuclei_dice']:.3f}, "
        f"{h['components']} components for {h['reference_nuclei']} nuclei "
        f"({h['fused_share']:.0%} fused; {h['fused_share_split']:.0%} after the watershed)"
    )
    print(
        f"CyCIF lymphoid crop: {c['cells']} cells, CD45 Otsu threshold {c['cd45_threshold']:.2f} "
        f"({c['cd45_positive']} positive); called lymphocyte: "
        f"{c['lymphocyte_share_cd45_positive']:.0%} of CD45+, "
        f"{c['lymphocyte_share_cd45_negative']:.0%} of CD45−; calls {c['called']}"
    )
    if args.split_sweep:
        result["split_sweep"] = split_sweep(model)
        print("| cells.split_depth_um | cells (263 nuclei) | fused ↓ | cut in two ↓ | missed |")
        print("|---:|---:|---:|---:|---:|")
        for r in result["split_sweep"]:
            print(
                f"| {r['split_depth_um']} | {r['cells']} | {r['fused']:.0%} | {r['cut']:.0%} "
                f"| {r['missed']:.0%} |"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
