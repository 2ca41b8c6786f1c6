"""HiPe cost against the model's own forward passes, the paper's toy, and Captum Occlusion.

Three measurements, in one run (ratios are what matter; absolute times depend on the machine):

1. A residual U-Net tile (smp U-Net, ResNet-18 encoder, 256², score = expected lymphocyte
   area): HiPe's forward passes and wall time against the *floor* — the time the model alone
   needs for the very same calls (same batch sizes), measured separately. Goal ≤ 1.10 × floor.
2. The paper's Figure 3 toy (256² Gaussian blob, σ = 4 px, model = sum): the model is free, so
   the wall time is HiPe's own overhead. Goal: well under 0.1 s.
3. The same U-Net tile under Captum's ``Occlusion`` (16 px window, stride 8): passes and time.

Usage::

    python benchmarks/bench_hipe.py [--repeats 3] [--batch-size 32] [--threads 2] [--no-occlusion]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from wsi_hipe import hierarchical_perturbation


def unet_and_tile(size: int = 256, device: str = "cpu"):
    """The bundled U-Net and a synthetic Hoechst tile with lymphocytes."""
    from wsi_hipe.models import load_model
    from wsi_hipe.synthetic import render_tile

    model = load_model(device=device)
    x = torch.from_numpy(render_tile(3, size=size).image)[None].float()
    return model, x.to(device), "bundled weights"


def lymphocyte_area(model):
    from wsi_hipe.scores import class_area

    return class_area(model, class_index=1)


class Recorder:
    """Wraps a forward and records the batch size of every call."""

    def __init__(self, forward):
        self.forward = forward
        self.sizes: list[int] = []

    def __call__(self, batch):
        self.sizes.append(len(batch))
        return self.forward(batch)


def time_calls(forward, x, sizes, repeats):
    """Best-of-``repeats`` time of calling ``forward`` with batches of the given sizes."""
    best = float("inf")
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        forward(x.unsqueeze(0).expand(max(sizes), *x.shape).contiguous())  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            for n in sizes:
                forward(x.unsqueeze(0).expand(n, *x.shape).contiguous())
            sync()
            best = min(best, time.perf_counter() - t)
    return best


def bench_unet(args):
    model, x, what = unet_and_tile(device=args.device)
    forward = lymphocyte_area(model)
    rec = Recorder(forward)
    hierarchical_perturbation(rec, x, batch_size=args.batch_size)  # warm-up, records the calls
    sizes = list(rec.sizes)
    hipe_times, floor_times = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = hierarchical_perturbation(forward, x, batch_size=args.batch_size)
        hipe_times.append(time.perf_counter() - t)
        floor_times.append(time_calls(forward, x, sizes, 1))
    hipe_t, floor_t = min(hipe_times), min(floor_times)
    print(
        f"U-Net tile ({what}), 256², batch {args.batch_size}: {res.forward_passes} passes "
        f"{res.masks_per_depth}; HiPe {hipe_t:.3f} s, floor {floor_t:.3f} s, "
        f"ratio {hipe_t / floor_t:.3f} (median ratio "
        f"{statistics.median(h / f for h, f in zip(hipe_times, floor_times, strict=True)):.3f})"
    )
    return model, x, forward, res, hipe_t


def bench_toy(args):
    r = torch.arange(256, dtype=torch.float32)
    x = torch.exp(-((r[:, None] - 128) ** 2 + (r[None, :] - 128) ** 2) / (2 * 4.0**2))[None]

    def total(b):
        return b.flatten(1).sum(1)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.toy_threads)  # the toy's work is small: threads only add sync
    res = hierarchical_perturbation(total, x, substrate="fade")  # warm-up
    times = []
    for _ in range(max(20, args.repeats)):
        t = time.perf_counter()
        res = hierarchical_perturbation(total, x, substrate="fade")
        times.append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    print(
        f"Figure 3 toy ({args.toy_threads} thread): {res.masks_per_depth} windows, "
        f"{res.forward_passes} passes; best {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms per map"
    )


def bench_occlusion(args, x, forward, hipe_res, hipe_t):
    from captum.attr import Occlusion

    calls = Recorder(forward)
    occ = Occlusion(calls)
    t = time.perf_counter()
    with torch.no_grad():
        occ.attribute(
            x[None],
            sliding_window_shapes=(1, 16, 16),
            strides=(1, 8, 8),
            perturbations_per_eval=args.batch_size,
        )
    occ_t = time.perf_counter() - t
    passes = sum(calls.sizes)
    print(
        f"Captum Occlusion 16/8: {passes} passes, {occ_t:.3f} s; HiPe uses "
        f"{passes / hipe_res.forward_passes:.1f}x fewer passes and is {occ_t / hipe_t:.1f}x faster"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-occlusion", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--toy-threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    bench_toy(args)
    model, x, forward, res, hipe_t = bench_unet(args)
    if not args.no_occlusion:
        bench_occlusion(args, x, forward, res, hipe_t)


if __name__ == "__main__":
    main()
