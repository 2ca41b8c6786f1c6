"""HiPe's cost: the paper's toy, the U-Net's forward floor, many cells at once, Captum Occlusion.

Each measurement is a ratio taken in one run (absolute times depend on the machine and, on a
shared machine, on what else runs; the ratios much less):

1. The paper's Figure 3 toy (256² Gaussian blob, σ = 4, 8, 16 px, model = sum, fade, mid-range):
   the model is free, so the time is HiPe's own overhead, in ms per map (1 thread). With
   ``--against-reference PATH`` the authors' ``HiPe.py``, loaded from PATH (it has no licence,
   so it is never part of this repository: fetch it yourself), runs side by side, alternating
   with this engine. Its code runs a fifth depth of 2 px cells (81, 25, 77, 81, 289 windows for
   σ = 4) and works only at batch size 1, so the comparison runs this engine on the very same
   windows (``min_cell_size=2``; the counts are printed and checked) at batch size 1 and at the
   default 32.
2. A residual U-Net tile (the bundled smp U-Net, 256², score = expected lymphocyte area):
   HiPe's wall time against the *floor*, the time the model alone needs for the very same calls
   (same batch sizes, recorded by wrapping the forward), alternating. Goal ≤ 1.10 × floor.
3. ``--cells``: every lymphocyte of a synthetic 256² tile (``--cells-seed``, default
   ``render_tile(40)``: 24 cells; ``render_tile(0)``: 159), explained as one vector target
   ``(B, K)`` against one run per cell (``wsi_hipe.scores.cell_area``): passes and time (goal
   ≥ 10× fewer passes), and the largest difference between the two sets of maps. A run on cell
   k alone perturbs exactly the vector run's own windows of k, so with ``--cells-sample N`` only
   N cells run alone (checked against the vector run) and the rest follow from the vector run.
4. The same U-Net tile under Captum's ``Occlusion`` (16 px window, stride 8): passes and time.

Usage::

    python benchmarks/bench_hipe.py [--repeats 3] [--batch-size 32] [--threads 2]
        [--against-reference /path/to/HiPe.py] [--no-unet] [--no-occlusion] [--device cpu|cuda]
        [--cells [--cells-seed 40 0] [--cells-sample N] [--cells-max-depth D]]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import statistics
import sys
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from wsi_hipe import hierarchical_perturbation

TOY_SIGMAS = (4.0, 8.0, 16.0)


def unet_and_tile(size: int = 256, device: str = "cpu", seed: int = 3):
    """The bundled U-Net and a synthetic Hoechst tile with lymphocytes (and its truth)."""
    from wsi_hipe.models import load_model
    from wsi_hipe.synthetic import render_tile

    model = load_model(device=device)
    tile = render_tile(seed, size=size)
    x = torch.from_numpy(tile.image)[None].float()
    return model, x.to(device), tile


def lymphocyte_area(model):
    from wsi_hipe.scores import class_area

    return class_area(model, class_index=1)


class Recorder:
    """Wraps a forward; records the batch size of every call and the time spent inside."""

    def __init__(self, forward, sync=lambda: None):
        self.forward = forward
        self.sync = sync
        self.sizes: list[int] = []
        self.seconds = 0.0

    def __call__(self, batch):
        self.sizes.append(len(batch))
        t = time.perf_counter()
        out = self.forward(batch)
        self.sync()
        self.seconds += time.perf_counter() - t
        return out


def sync_for(x: torch.Tensor):
    return torch.cuda.synchronize if x.is_cuda else (lambda: None)


def time_calls(forward, x, sizes, repeats):
    """Best-of-``repeats`` time of calling ``forward`` with batches of the given sizes."""
    best = float("inf")
    sync = sync_for(x)
    with torch.no_grad():
        forward(x.unsqueeze(0).expand(max(sizes), *x.shape).contiguous())  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            for n in sizes:
                forward(x.unsqueeze(0).expand(n, *x.shape).contiguous())
            sync()
            best = min(best, time.perf_counter() - t)
    return best


def timed(fn, sync=lambda: None):
    """``(result, seconds)`` of ``fn()``, ``sync()`` included (CUDA: the queued work)."""
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


# --- 1. the Figure 3 toy, alone and against the authors' code -------------------------------


def blob(sigma: float, size: int = 256) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32)
    c = size // 2
    return torch.exp(-((r[:, None] - c) ** 2 + (r[None, :] - c) ** 2) / (2 * sigma**2))[None]


def total(batch: torch.Tensor) -> torch.Tensor:
    return batch.flatten(1).sum(1)


def load_reference(path: str):
    """The authors' ``HiPe.py`` from ``path``; its plotting-only imports stubbed if missing.

    ``torchray.utils.imsc``, matplotlib and pandas are only used when ``vis=True``, which this
    benchmark never passes; a stub stands in for whichever is not installed.
    """
    for name in ("torchray.utils", "matplotlib.pyplot", "pandas"):
        try:
            if importlib.util.find_spec(name) is not None:
                continue
        except ModuleNotFoundError:
            pass
        parent = None
        for part in name.split("."):
            full = part if parent is None else f"{parent.__name__}.{part}"
            module = sys.modules.setdefault(full, types.ModuleType(full))
            if parent is not None:
                setattr(parent, part, module)
            parent = module
    if "torchray.utils" in sys.modules and not hasattr(sys.modules["torchray.utils"], "imsc"):
        sys.modules["torchray.utils"].imsc = None  # plotting only (vis=True)
    spec = importlib.util.spec_from_file_location("hipe_reference", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against-reference: cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_reference(ref, x: torch.Tensor):
    """One map by the authors' code (fade, mid-range, batch 1; its prints discarded)."""
    with contextlib.redirect_stdout(io.StringIO()):
        _, info = ref.hierarchical_perturbation(
            lambda b: total(b)[:, None],
            x[None],
            0,
            perturbation_type="fade",
            threshold_mode="mid-range",
            batch_size=1,
            return_info=True,
        )
    return info["masks"]


def bench_toy(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(args.toy_threads)  # the toy's work is small: threads only add sync
    ref = load_reference(args.against_reference) if args.against_reference else None
    try:
        for sigma in TOY_SIGMAS:
            x = blob(sigma)
            res = hierarchical_perturbation(total, x, substrate="fade")  # warm-up
            times = []
            for _ in range(args.toy_repeats):
                res, t = timed(lambda x=x: hierarchical_perturbation(total, x, substrate="fade"))
                times.append(t)
            print(
                f"Figure 3 toy σ={sigma:g} ({args.toy_threads} thread): {res.masks_per_depth} "
                f"windows, {res.forward_passes} passes; best {min(times) * 1e3:.1f} ms, median "
                f"{statistics.median(times) * 1e3:.1f} ms per map"
            )
            if ref is not None:
                compare_with_reference(ref, x, sigma, args.reference_repeats)
    finally:
        torch.set_num_threads(threads)


def compare_with_reference(ref, x, sigma, repeats):
    """Alternate the authors' code and this engine on the same windows; print the ratios."""

    def ours(batch_size):
        return hierarchical_perturbation(
            total, x, substrate="fade", min_cell_size=2, batch_size=batch_size
        )

    theirs_t, ours1_t, ours32_t = [], [], []
    for _ in range(repeats):
        counts, t = timed(lambda: run_reference(ref, x))
        theirs_t.append(t)
        res1, t = timed(lambda: ours(1))
        ours1_t.append(t)
        res32, t = timed(lambda: ours(32))
        ours32_t.append(t)
    same = counts == res1.masks_per_depth == res32.masks_per_depth
    med = statistics.median
    print(
        f"  vs the authors' HiPe.py, σ={sigma:g}, same windows {counts} ({sum(counts)}): "
        f"{'counts match' if same else 'COUNTS DIFFER: ' + str(res1.masks_per_depth)}; "
        f"theirs (batch 1) median {med(theirs_t) * 1e3:.0f} ms; ours batch 1 "
        f"{med(ours1_t) * 1e3:.1f} ms → {med(theirs_t) / med(ours1_t):.0f}× less, ours batch 32 "
        f"{med(ours32_t) * 1e3:.1f} ms → {med(theirs_t) / med(ours32_t):.0f}× less "
        f"(medians of {repeats} alternating runs)"
    )


# --- 2. the U-Net tile against its forward floor -------------------------------------------


def bench_unet(args, model, x):
    forward = lymphocyte_area(model)
    rec = Recorder(forward)
    hierarchical_perturbation(rec, x, batch_size=args.batch_size)  # warm-up, records the calls
    sizes = list(rec.sizes)
    sync = sync_for(x)
    hipe_times, floor_times, own = [], [], []
    for _ in range(args.repeats):
        timer = Recorder(forward, sync)
        res, t = timed(lambda t=timer: hierarchical_perturbation(t, x, batch_size=args.batch_size))
        hipe_times.append(t)
        own.append(t - timer.seconds)  # HiPe's own work: everything outside the model calls
        floor_times.append(time_calls(forward, x, sizes, 1))
    hipe_t, floor_t = min(hipe_times), min(floor_times)
    ratios = [h / f for h, f in zip(hipe_times, floor_times, strict=True)]
    print(
        f"U-Net tile (bundled weights), 256², batch {args.batch_size}: {res.forward_passes} "
        f"passes {res.masks_per_depth}; HiPe {hipe_t:.3f} s, floor {floor_t:.3f} s, ratio "
        f"{hipe_t / floor_t:.3f} (median of the {len(ratios)} ratios "
        f"{statistics.median(ratios):.3f}); HiPe's own work outside the model calls "
        f"{statistics.median(own) * 1e3:.0f} ms = {statistics.median(own) / hipe_t:.2%} of a run"
    )
    return forward, res, hipe_t


# --- 3. every cell of a dense tile: one vector run vs one run per cell ----------------------


def cell_scores(model, labels):
    """One ``cell_area`` score per lymphocyte, and the ``(B, K)`` forward of all of them."""
    import numpy as np

    from wsi_hipe.scores import cell_area

    ids = [int(i) for i in np.unique(labels) if i > 0]
    scores = [cell_area(model, labels, label=i) for i in ids]
    if any(s.activation != "softmax" or s.class_index != (1,) for s in scores):
        raise SystemExit("the vector forward below assumes softmax and class 1")
    device = model.device
    weights = torch.stack([s.region.flatten() for s in scores], dim=1).to(device)  # (H·W, K)

    def all_cells(batch):  # the same probabilities and masks as each cell_area, as one GEMM
        p = torch.softmax(model(batch).float(), dim=1)[:, 1]
        return p.flatten(1) @ weights

    return ids, scores, all_cells


def bench_cells(args, model, seed):
    """Vector run vs one run per cell; with ``--cells-sample N`` only N cells run alone.

    A separate run on cell k perturbs exactly the windows of the vector run's own selection
    for k (``target_masks[k]``; checked on every cell that runs alone), so the per-cell passes
    of all cells follow from the vector run; their time is then the sampled cells' time per
    pass times those passes (an extrapolation, said so in the output).
    """
    from wsi_hipe.synthetic import render_tile

    tile = render_tile(seed, size=256)
    x = torch.from_numpy(tile.image)[None].float().to(model.device)
    ids, scores, all_cells = cell_scores(model, tile.lymphocytes)
    sync = sync_for(x)
    hierarchical_perturbation(all_cells, x, batch_size=args.batch_size, max_depth=1)  # warm-up
    depth = args.cells_max_depth

    def explain(forward):
        return hierarchical_perturbation(forward, x, batch_size=args.batch_size, max_depth=depth)

    vec, vec_t = timed(lambda: explain(all_cells), sync)
    sample = range(len(ids))
    if args.cells_sample and args.cells_sample < len(ids):
        sample = range(0, len(ids), -(-len(ids) // args.cells_sample))  # evenly spread
    singles, single_t = {}, 0.0
    for k in sample:
        singles[k], t = timed(lambda s=scores[k]: explain(s), sync)
        single_t += t
    own_passes = [1 + sum(m) for m in vec.target_masks]  # what a run on cell k alone costs
    assert all(singles[k].forward_passes == own_passes[k] for k in singles)
    worst = max(
        float((vec.saliency[k] - r.saliency).abs().max() / r.saliency.abs().max().clamp_min(1e-30))
        for k, r in singles.items()
    )
    same = all(vec.target_masks[k] == r.masks_per_depth for k, r in singles.items())
    passes = sum(own_passes)
    ran = sum(own_passes[k] for k in singles)
    if len(singles) == len(ids):
        how = f"{single_t:.1f} s"
    else:
        single_t = single_t / ran * passes
        how = f"≈ {single_t:.0f} s (extrapolated from the {len(singles)} cells run alone)"
    print(
        f"Cells of render_tile({seed}), 256², {len(ids)} lymphocytes, batch {args.batch_size}, "
        f"max_depth {depth}: "
        f"one vector run {vec.forward_passes} passes {vec.masks_per_depth} in {vec_t:.1f} s; "
        f"one run per cell {passes} passes in {how} → {passes / vec.forward_passes:.1f}× fewer "
        f"passes, {single_t / vec_t:.1f}× faster; {len(singles)} cells run alone: same windows "
        f"{same}, largest map difference {worst:.1e} of the cell's maximum"
    )


# --- 4. Captum Occlusion ------------------------------------------------------------------


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
    p.add_argument("--repeats", type=int, default=3, help="U-Net: HiPe/floor pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--toy-threads", type=int, default=1)
    p.add_argument("--toy-repeats", type=int, default=20)
    p.add_argument("--against-reference", metavar="PATH", help="the authors' HiPe.py")
    p.add_argument("--reference-repeats", type=int, default=5)
    p.add_argument("--cells", action="store_true", help="vector run vs one run per cell")
    p.add_argument("--cells-seed", type=int, nargs="+", default=[40], help="render_tile seeds")
    p.add_argument("--cells-sample", type=int, default=0, help="run only N cells alone")
    p.add_argument("--cells-max-depth", type=int, default=None, help="HiPe max_depth for cells")
    p.add_argument("--no-unet", action="store_true")
    p.add_argument("--no-occlusion", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, load {load:.1f}")
    bench_toy(args)
    if args.no_unet and not args.cells:
        return
    torch.set_num_threads(args.threads)
    model, x, _ = unet_and_tile(device=args.device)
    if not args.no_unet:
        forward, res, hipe_t = bench_unet(args, model, x)
        if not args.no_occlusion:
            bench_occlusion(args, x, forward, res, hipe_t)
    if args.cells:
        for seed in args.cells_seed:
            bench_cells(args, model, seed)


if __name__ == "__main__":
    main()
