"""Tile-read throughput of ``wsi_hipe.slide`` and its overhead over raw ``OpenSlide.read_region``.

Reads the same 256 x 256 tiles (a) with ``openslide.OpenSlide.read_region`` + ``np.asarray`` (the
floor) and (b) with ``Slide.read`` (stain extraction, premultiplied alpha, resampling when needed,
normalisation), in one run, and reports tiles/s and the ratio (b)/(a). Cases:

* ``level0``: CMU-1-Small-Region.svs (Aperio JPEG) at its native 0.499 µm/px.
* ``level0-synthetic``: a synthetic fluorescence pyramid (zlib TIFF written to a temp folder) at
  its native 0.5 µm/px.
* ``level1``: the same pyramid at 1.0 µm/px, served directly from level 1 (downsample 2).
* ``resampled``: 1.5 µm/px, read from level 1 with a 1.5x box filter; the raw baseline reads the
  same 384 x 384 level-1 window, so the ratio includes the resampling.

OpenSlide's tile cache is disabled for both sides (``--cache-mb``, default 0) so every read
decodes, as a pipeline streaming a large slide does; pass e.g. ``--cache-mb 256`` for the warm
case, which isolates this layer's own cost. Each case alternates raw and wrapped passes
``--repeat`` times and keeps the best pass of each.

Run:  .venv/bin/python benchmarks/bench_slide.py [--tiles 48] [--repeat 3] [--cache-mb 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CMU = Path(os.environ.get("WSI_HIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
CMU = CMU / "slides" / "CMU-1-Small-Region.svs"
TILE = 256


def synthetic_pyramid(path: Path, size: int = 3072, seed: int = 0) -> Path:
    """A gray fluorescence-like tiled pyramid (levels 1, 2, 4), 0.5 µm/px, zlib tiles."""
    import tifffile

    rng = np.random.default_rng(seed)
    img = np.full((size, size), 6.0, dtype=np.float32)
    n = size * size // 400
    ys, xs = rng.integers(0, size - 12, n), rng.integers(0, size - 12, n)
    disk = (np.mgrid[-5:6, -5:6] ** 2).sum(0) <= 25
    for y, x in zip(ys, xs, strict=True):
        img[y : y + 11, x : x + 11][disk] = rng.uniform(150, 230)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    level = np.clip(img, 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            res = 1e4 / (0.5 * 2**k)
            tw.write(
                level,
                tile=(256, 256),
                photometric="minisblack",
                compression="zlib",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
            )
            h, w = level.shape[0] // 2, level.shape[1] // 2
            level = level[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3)).astype(np.uint8)
    return path


def tile_positions(dims: tuple[int, int], step: float, count: int, seed: int = 1) -> list:
    """``count`` distinct tile origins (level-0 px) on a grid of ``step`` level-0 px."""
    cols = int((dims[0] - step) // step) + 1
    rows = int((dims[1] - step) // step) + 1
    rng = np.random.default_rng(seed)
    cells = rng.permutation(rows * cols)[:count]
    return [(int((c % cols) * step), int((c // cols) * step)) for c in cells]


def set_cache(osr, mb: int) -> None:
    import openslide

    osr.set_cache(openslide.OpenSlideCache(mb * 1024 * 1024))


def run_case(name, path, slide_kwargs, target_scale, raw_level, cache_mb, tiles, repeat):
    import openslide

    from wsi_hipe.slide import clear_reader_cache, open_slide

    clear_reader_cache()
    slide = open_slide(path, **slide_kwargs)
    osr = openslide.OpenSlide(str(path))
    set_cache(osr, cache_mb)
    set_cache(slide.reader._osr, cache_mb)
    mpp = slide.mpp * target_scale
    ds = osr.level_downsamples[raw_level]
    raw_side = int(round(TILE * target_scale / ds))  # level px covering one target tile
    positions = tile_positions(slide.dimensions, TILE * target_scale, tiles)

    def raw_pass():
        for x, y in positions:
            np.asarray(osr.read_region((x, y), raw_level, (raw_side, raw_side)))

    def wrapped_pass():
        for x, y in positions:
            slide.read(x, y, TILE, TILE, mpp=mpp)

    raw_pass()  # warm-up (file system, code paths)
    wrapped_pass()
    best_raw = best_wrapped = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        raw_pass()
        best_raw = min(best_raw, time.perf_counter() - t0)
        t0 = time.perf_counter()
        wrapped_pass()
        best_wrapped = min(best_wrapped, time.perf_counter() - t0)
    n = len(positions)
    return {
        "case": name,
        "slide": Path(path).name,
        "target_mpp": round(mpp, 4),
        "level": raw_level,
        "tiles": n,
        "raw_tiles_per_s": n / best_raw,
        "slide_tiles_per_s": n / best_wrapped,
        "overhead": best_wrapped / best_raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=48, help="tiles per case")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per side")
    parser.add_argument("--cache-mb", type=int, default=0, help="OpenSlide tile cache size")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        pyramid = synthetic_pyramid(Path(tmp) / "synthetic.tiff")
        cases = []
        if CMU.is_file():
            cases.append(("level0", CMU, {"allow_brightfield": True}, 1.0, 0))
        else:
            print(f"(skipping CMU-1-Small-Region.svs: not found at {CMU})")
        cases += [
            ("level0-synthetic", pyramid, {}, 1.0, 0),
            ("level1", pyramid, {}, 2.0, 1),
            ("resampled", pyramid, {}, 3.0, 1),
        ]
        for case in cases:
            results.append(run_case(*case, args.cache_mb, args.tiles, args.repeat))

    print(f"256x256 tiles, OpenSlide cache {args.cache_mb} MB, best of {args.repeat} passes")
    print(
        f"{'case':<18}{'slide':<24}{'mpp':>7}{'lvl':>4}{'raw t/s':>10}{'Slide t/s':>11}{'ratio':>7}"
    )
    for r in results:
        print(
            f"{r['case']:<18}{r['slide']:<24}{r['target_mpp']:>7}{r['level']:>4}"
            f"{r['raw_tiles_per_s']:>10.1f}{r['slide_tiles_per_s']:>11.1f}{r['overhead']:>7.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
