"""Forward-pass speed of the bundled U-Net (and candidate sizes) on this machine.

HiPe calls the model hundreds of times per tile, so the cost of one 256² forward pass is the
floor of the whole pipeline. This script measures, in one run:

1. The bundled model as ``load_model()`` returns it (batch norm folded into the convolutions,
   channels-last memory format), and without those two optimisations, for each thread count
   and batch size: milliseconds per 256² tile.
2. Candidate architectures (random weights, folded, channels-last) for the record of why this
   size was chosen: smp U-Net with a ResNet-18 encoder at several depths / decoder widths.

Medians of ``--repeats`` timed calls after warm-up. Absolute times depend on the machine and
its load (the dev machines share 2 cores between several people): compare rows of one run.

3. With ``--hipe-tiles N``: how often HiPe's maximum (expected lymphocyte area, 96² tiles,
   ``max_depth=2``) lies on a lymphocyte of a fresh synthetic tile (the hit rate that
   ``tests/test_bundled_model.py`` checks on 4 tiles), and the forward passes per tile.

Usage::

    python benchmarks/bench_model.py [--threads 1 2] [--repeats 20] [--batch 1 4 32] [--no-candidates]
                                     [--hipe-tiles 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from wsi_hipe.models import (
    ModelMeta,
    SegmentationModel,
    build_unet,
    count_parameters,
    fold_batchnorm,
    load_model,
)

CANDIDATES = [
    (4, (128, 64, 32, 16)),
    (4, (64, 32, 16, 8)),
    (3, (64, 32, 16)),
    (3, (32, 16, 8)),
    (2, (32, 16)),
]


def time_calls(model, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one call ``model(x)``."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(name: str, params: int, times: list[float], batches: list[int]) -> str:
    cells = " | ".join(f"{t * 1e3 / b:.1f}" for t, b in zip(times, batches, strict=True))
    return f"| {name} | {params / 1e6:.2f} M | {cells} |"


def hipe_hit_rate(model, tiles: int, size: int = 96, seed0: int = 7_000_000) -> None:
    """Share of fresh synthetic tiles where HiPe's maximum lies on (or 2 px from) a lymphocyte.

    Two kinds of tiles: "sparse" (3-15 % lymphocyte area among >= 10 % other nuclei: does the
    map pick the lymphocytes out?) and "dense" (>= 25 % lymphocytes: a pixel-level hit is then
    close to the lymphocyte area fraction, i.e. chance).
    """
    import numpy as np
    from scipy import ndimage

    from wsi_hipe.hipe import hierarchical_perturbation
    from wsi_hipe.scores import class_area
    from wsi_hipe.synthetic import render_tile

    score = class_area(model, class_index="lymphocyte")
    kinds = {"sparse": [], "dense": []}
    passes: list[int] = []
    lymph_fraction: dict[str, list[float]] = {"sparse": [], "dense": []}
    seed = seed0
    t0 = time.perf_counter()
    while min(len(v) for v in kinds.values()) < tiles and seed < seed0 + 200 * tiles:
        region = render_tile(seed, size)
        seed += 1
        lymph = float((region.lymphocytes > 0).mean())
        other = float(region.nuclei.mean()) - lymph
        if 0.03 <= lymph <= 0.15 and other >= 0.10:
            kind = "sparse"
        elif lymph >= 0.25:
            kind = "dense"
        else:
            continue
        if len(kinds[kind]) >= tiles:
            continue
        x = torch.from_numpy(region.image)[None]
        result = hierarchical_perturbation(score, x, max_depth=2, batch_size=64)
        saliency = result.saliency.numpy()
        top = saliency >= saliency.max() * (1 - 1e-6)
        near = ndimage.binary_dilation(region.lymphocytes > 0, iterations=2)
        kinds[kind].append(bool(saliency.max() > 0 and near[top].mean() >= 0.5))
        lymph_fraction[kind].append(lymph)
        passes.append(result.forward_passes)
    print(f"\nHiPe maximum on a lymphocyte ({size}² tiles, max_depth=2, seeds from {seed0}):")
    for kind, hits in kinds.items():
        print(
            f"- {kind}: {sum(hits)}/{len(hits)} = {sum(hits) / max(len(hits), 1):.2f} "
            f"(mean lymphocyte area fraction {np.mean(lymph_fraction[kind]):.2f})"
        )
    print(
        f"forward passes per tile: median {int(np.median(passes))}; {time.perf_counter() - t0:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--no-candidates", action="store_true")
    parser.add_argument("--hipe-tiles", type=int, default=0, help="also measure the HiPe hit rate")
    args = parser.parse_args()

    inputs = [
        torch.rand(b, 1, args.size, args.size, generator=torch.Generator().manual_seed(b))
        for b in args.batch
    ]
    variants = [
        ("bundled: BN folded, channels-last (default)", load_model(device="cpu")),
        ("bundled: BN folded, contiguous", load_model(device="cpu", channels_last=False)),
        (
            "bundled: BN unfolded, contiguous",
            load_model(device="cpu", fuse_batchnorm=False, channels_last=False),
        ),
    ]
    bundled = variants[0][1]
    params = count_parameters(bundled)
    print(
        f"bundled model: {bundled.meta.architecture}, sha256 {bundled.sha256[:12]}..., torch {torch.__version__}"
    )
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    cols = " | ".join(f"batch {b}" for b in args.batch)
    header = (
        f"| model (ms per {args.size}² tile) | params | {cols} |\n"
        f"|---|---|{'---|' * len(args.batch)}"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n### {threads} thread(s)\n")
        print(header)
        for name, model in variants:
            times = [time_calls(model, x, max(3, args.repeats // x.shape[0])) for x in inputs]
            print(row(name, params, times, args.batch), flush=True)
        if args.no_candidates:
            continue
        for depth, decoder in CANDIDATES:
            network = build_unet(encoder="resnet18", encoder_depth=depth, decoder_channels=decoder)
            n_params = count_parameters(network)
            fold_batchnorm(network)
            model = SegmentationModel(network, ModelMeta(), device="cpu", channels_last=True)
            times = [time_calls(model, x, max(3, args.repeats // x.shape[0])) for x in inputs]
            name = f"resnet18 depth {depth}, decoder {list(decoder)}"
            print(row(name, n_params, times, args.batch), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    if args.hipe_tiles:
        hipe_hit_rate(bundled, args.hipe_tiles)


if __name__ == "__main__":
    main()
