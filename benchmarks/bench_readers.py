"""The tifffile reader (``wsi_hipe.slide._tiff.TiffReader``): throughput and memory.

Subcommands (each prints JSON lines, then a Markdown table for BENCHMARKS.md):

* ``tiles`` — 256 x 256 tile reads/s of the reader against tifffile's raw reads of the same
  tiles (``zarr.open_array(series.aszarr(level=L))[c, y:y+256, x:x+256]`` on the same file), in
  one run, alternating passes, best of ``--repeat``. The file: a synthetic 3-channel uint16
  OME-TIFF pyramid (SubIFDs, 512² zlib tiles, nuclei-like texture). Cases: level 0 and level 1
  read with ``read_channels`` (raw samples) and with ``read_channel_resampled`` (float32 through
  the slide package's box-filter resampler: what a ``Slide`` reads); and, for the choice of
  reader for 8-bit gray TIFFs, the same reader against ``OpenSlide.read_region`` (cache off) on
  a gray uint8 pyramid.
* ``rss`` — peak RSS while reading ``--tiles`` tiles spread over a 20k² and an 80k² synthetic
  OME-TIFF (one channel "DAPI", uint16, SubIFD pyramid; tiles written pre-encoded, mostly
  background, every 16th tile textured, so an 80k² file is written in seconds). Each size runs
  in a fresh process; the high-water mark is reset after opening (``/proc/self/clear_refs``), so
  the peak is the reads' own.
* ``striped`` — a 16k² uint16 plain TIFF in 16-row zlib strips, read as a grid of 256² tiles in
  row-major order (as the pipeline streams them): tiles/s and peak RSS of the reader (bands
  cached) against raw Zarr reads of the same tiles, each in a fresh process.

* ``writer`` — the synthetic multiplex OME-TIFF writer (``wsi_hipe.synthetic.write_ome_tiff``,
  3 channels, 512² tiles): seconds, level-0 tiles/s and peak RSS for each of ``--sizes``, each
  in a fresh process (the high-water mark reset after the imports), so a flat peak shows the
  tile-by-tile streaming.

Run:  .venv/bin/python benchmarks/bench_readers.py all
      .venv/bin/python benchmarks/bench_readers.py tiles [--size 4096] [--tiles 48] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

TILE = 256
FILE_TILE = 512


# --------------------------------------------------------------------------------------------
# synthetic files
# --------------------------------------------------------------------------------------------


def texture(h: int, w: int, seed: int, *, top: float = 3000.0) -> np.ndarray:
    """Nuclei-like uint16 texture: bright disks on a noisy dark background."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 200.0, dtype=np.float32)
    disk = (np.mgrid[-5:6, -5:6] ** 2).sum(0) <= 25
    n = h * w // 400
    ys, xs = rng.integers(0, h - 11, n), rng.integers(0, w - 11, n)
    vals = rng.uniform(0.4 * top, top, n)
    for y, x, v in zip(ys, xs, vals, strict=True):
        img[y : y + 11, x : x + 11][disk] = v
    img += rng.normal(0, 40, img.shape).astype(np.float32)
    return np.clip(img, 0, 65535).astype(np.uint16)


def write_multichannel_pyramid(path: Path, size: int, *, channels: int = 3) -> None:
    """A 3-channel uint16 OME-TIFF, levels 1, 2, 4, 8 in SubIFDs, 512² zlib tiles."""
    import tifffile

    data = np.stack([texture(size, size, seed=c) for c in range(channels)])
    levels = [data]
    while len(levels) < 4:
        prev = levels[-1]
        h, w = prev.shape[1] // 2, prev.shape[2] // 2
        levels.append(
            prev[:, : 2 * h, : 2 * w]
            .reshape(channels, h, 2, w, 2)
            .mean(axis=(2, 4))
            .astype(np.uint16)
        )
    meta = {"axes": "CYX", "Channel": {"Name": ["DAPI", "CD3", "CD20"][:channels]}}
    meta.update(PhysicalSizeX=0.5, PhysicalSizeY=0.5)
    opts = {"tile": (FILE_TILE, FILE_TILE), "compression": "zlib", "photometric": "minisblack"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, metadata=None, **opts)


def write_gray8_pyramid(path: Path, size: int) -> None:
    """A gray uint8 tiled pyramid (levels 1, 2, 4) with µm/px in the resolution tags."""
    import tifffile

    img = (texture(size, size, seed=7) // 16).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            res = 1e4 / (0.5 * 2**k)
            tw.write(img, tile=(FILE_TILE, FILE_TILE), photometric="minisblack",
                     compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=1 if k else 0, metadata=None)  # fmt: skip
            img = img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2]
            img = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2).mean(axis=(1, 3))
            img = img.astype(np.uint8)


def write_sparse_ome(path: Path, size: int) -> None:
    """A 1-channel uint16 OME-TIFF of ``size``², SubIFD levels down to < 1024 px, tiles written
    pre-encoded: background everywhere except every 16th tile, which holds texture."""
    import tifffile

    tex = zlib.compress(texture(FILE_TILE, FILE_TILE, seed=1).tobytes(), 6)
    flat = zlib.compress(np.full((FILE_TILE, FILE_TILE), 200, np.uint16).tobytes(), 6)

    def tiles(h: int, w: int):
        nx = -(-w // FILE_TILE)
        for ty in range(-(-h // FILE_TILE)):
            for tx in range(nx):
                yield tex if (ty * nx + tx) % 16 == 0 else flat

    shapes = [(size, size)]
    while max(shapes[-1]) > 1024:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    meta = {"axes": "YX", "Channel": {"Name": ["DAPI"]}, "PhysicalSizeX": 0.5}
    meta["PhysicalSizeY"] = 0.5
    opts = {"tile": (FILE_TILE, FILE_TILE), "compression": "zlib", "dtype": np.uint16,
            "photometric": "minisblack"}  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(*shapes[0]), shape=shapes[0], subifds=len(shapes) - 1, metadata=meta,
                 **opts)  # fmt: skip
        for shape in shapes[1:]:
            tw.write(tiles(*shape), shape=shape, subfiletype=1, metadata=None, **opts)


def write_striped(path: Path, size: int, rows: int = 16) -> None:
    """A ``size``² uint16 plain TIFF in ``rows``-row zlib strips (8 textured strips cycled)."""
    import tifffile

    strips = [zlib.compress(texture(rows, size, seed=s).tobytes(), 6) for s in range(8)]
    n = -(-size // rows)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write((strips[i % 8] for i in range(n)), shape=(size, size), dtype=np.uint16,
                 rowsperstrip=rows, compression="zlib", photometric="minisblack",
                 resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)  # fmt: skip


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _positions(n: int, width: int, height: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, max(1, width - TILE), n)
    ys = rng.integers(0, max(1, height - TILE), n)
    return [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]


def _best_alternating(fns: dict, repeat: int, n: int) -> dict:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n / t for name, t in best.items()}


# --------------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------------


def bench_tiles(args) -> list[dict]:
    import openslide
    import tifffile
    import zarr

    from wsi_hipe.slide._multichannel import read_channel_resampled
    from wsi_hipe.slide._tiff import TiffReader

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-readers-") as tmp:
        ome = Path(tmp) / "multi.ome.tiff"
        write_multichannel_pyramid(ome, args.size)
        reader = TiffReader(ome)
        with tifffile.TiffFile(ome) as tif:
            for level in (0, 1):
                raw_arr = zarr.open_array(tif.series[0].aszarr(level=level), mode="r")
                ds = reader.level_downsamples[level]
                w, h = reader.level_dimensions[level]
                pos = _positions(args.tiles, w, h, seed=level)

                def raw(pos=pos, raw_arr=raw_arr):
                    for x, y in pos:
                        np.asarray(raw_arr[0, y : y + TILE, x : x + TILE])

                def ours(pos=pos, level=level, ds=ds):
                    for x, y in pos:
                        reader.read_channels((int(x * ds), int(y * ds)), level, (TILE, TILE), (0,))

                def resampled(pos=pos, ds=ds):
                    for x, y in pos:
                        read_channel_resampled(reader, x * ds, y * ds, TILE, TILE, ds, 0)

                rate = _best_alternating(
                    {"raw": raw, "read_channels": ours, "resampled": resampled},
                    args.repeat,
                    len(pos),
                )
                row = {
                    "case": f"OME-TIFF 3-channel uint16, level {level}",
                    "raw_tiles_s": round(rate["raw"], 1),
                    "read_channels_tiles_s": round(rate["read_channels"], 1),
                    "resampled_tiles_s": round(rate["resampled"], 1),
                    "ratio_read_channels": round(rate["raw"] / rate["read_channels"], 3),
                    "ratio_resampled": round(rate["raw"] / rate["resampled"], 3),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
        reader.close()

        gray = Path(tmp) / "gray8.tiff"
        write_gray8_pyramid(gray, args.size)
        osr = openslide.OpenSlide(str(gray))
        osr.set_cache(openslide.OpenSlideCache(0))
        reader = TiffReader(gray)
        pos = _positions(args.tiles, *reader.dimensions, seed=3)

        def os_read():
            for x, y in pos:
                np.asarray(osr.read_region((x, y), 0, (TILE, TILE)))

        def tiff_read():
            for x, y in pos:
                read_channel_resampled(reader, x, y, TILE, TILE, 1.0, 0)

        rate = _best_alternating({"openslide": os_read, "tiff": tiff_read}, args.repeat, len(pos))
        row = {
            "case": "gray uint8 tiled TIFF, level 0: OpenSlide vs TiffReader",
            "openslide_tiles_s": round(rate["openslide"], 1),
            "tiffreader_resampled_tiles_s": round(rate["tiff"], 1),
            "ratio": round(rate["openslide"] / rate["tiff"], 3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        osr.close()
    print()
    print("| case | raw tifffile tiles/s | `read_channels` tiles/s | ratio | "
          "`read_channel_resampled` tiles/s | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows[:-1]:
        print(
            f"| {r['case']} | {r['raw_tiles_s']} | {r['read_channels_tiles_s']} | "
            f"{r['ratio_read_channels']:.2f} | {r['resampled_tiles_s']} | "
            f"{r['ratio_resampled']:.2f} |"
        )
    r = rows[-1]
    print(
        f"\n{r['case']}: OpenSlide {r['openslide_tiles_s']} tiles/s, TiffReader "
        f"{r['tiffreader_resampled_tiles_s']} tiles/s (ratio {r['ratio']:.2f})"
    )
    return rows


# --------------------------------------------------------------------------------------------
# rss
# --------------------------------------------------------------------------------------------


def _rss_child(path: str, tiles: int) -> None:
    from wsi_hipe.slide._multichannel import read_channel_resampled
    from wsi_hipe.slide._tiff import TiffReader

    t0 = time.perf_counter()
    reader = TiffReader(path)
    opened = time.perf_counter() - t0
    w, h = reader.dimensions
    side = int(np.sqrt(tiles))
    # textured tiles: every 16th file tile in row-major order; read the tile at its corner
    nx = -(-w // FILE_TILE)
    pos = []
    for i in range(side):
        for j in range(side):
            tx, ty = int(j * nx / side), int(i * (-(-h // FILE_TILE)) / side)
            k = ty * nx + tx
            k -= k % 16
            pos.append(((k % nx) * FILE_TILE + 64, (k // nx) * FILE_TILE + 64))
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    total = 0.0
    for x, y in pos:
        total += float(read_channel_resampled(reader, x, y, TILE, TILE, 1.0, 0).mean())
    for x, y in pos[:side]:  # and a few at level 2 (2 µm/px)
        total += float(read_channel_resampled(reader, x, y, TILE, TILE, 4.0, 0).mean())
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM")
    print(json.dumps({
        "size": w, "file_mib": round(Path(path).stat().st_size / 2**20, 1),
        "levels": reader.level_count, "open_s": round(opened, 2), "tiles": len(pos) + side,
        "read_s": round(seconds, 2), "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1), "checksum": round(total, 1),
    }), flush=True)  # fmt: skip


def bench_rss(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-readers-rss-") as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"s{size}.ome.tiff"
            t0 = time.perf_counter()
            write_sparse_ome(path, size)
            written = time.perf_counter() - t0
            cmd = [sys.executable, __file__, "_rss_child", str(path), str(args.tiles)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"child for {size} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["write_s"] = round(written, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
            path.unlink()
    base = rows[0]["peak_rss_mib"]
    print()
    print("| slide px | file MiB | levels | open s | tiles read | read s | RSS before MiB | "
          "peak RSS MiB | vs first |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']}² | {r['file_mib']} | {r['levels']} | {r['open_s']} | {r['tiles']} | "
            f"{r['read_s']} | {r['rss_before_mib']} | {r['peak_rss_mib']} | "
            f"{r['peak_rss_mib'] / base - 1:+.1%} |"
        )
    return rows


# --------------------------------------------------------------------------------------------
# striped
# --------------------------------------------------------------------------------------------


def _striped_child(path: str, mode: str, limit: int) -> None:
    import tifffile
    import zarr

    from wsi_hipe.slide._tiff import TiffReader

    reader = TiffReader(path)
    w, h = reader.dimensions
    grid = [(x, y) for y in range(0, h, TILE) for x in range(0, w, TILE)][:limit]
    tif = tifffile.TiffFile(path)
    arr = zarr.open_array(tif.series[0].aszarr(), mode="r")
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    for x, y in grid:
        if mode == "reader":
            reader.read_channels((x, y), 0, (TILE, TILE), (0,))
        else:
            np.asarray(arr[y : y + TILE, x : x + TILE])
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM")
    print(json.dumps({
        "mode": mode, "size": w, "tiles": len(grid), "tiles_s": round(len(grid) / seconds, 1),
        "rss_before_mib": round(before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
        "peak_increase_mib": round((peak - before) / 1024, 1),
        "image_mib": round(w * h * 2 / 2**20, 1),
    }), flush=True)  # fmt: skip


def bench_striped(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-readers-striped-") as tmp:
        path = Path(tmp) / "striped.tif"
        write_striped(path, args.size)
        per_row = -(-args.size // TILE)
        for mode, limit in (("reader", per_row * per_row), ("raw", per_row * args.raw_rows)):
            cmd = [sys.executable, __file__, "_striped_child", str(path), mode, str(limit)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print("| reads | tiles | tiles/s | RSS before MiB | peak RSS MiB | peak − before MiB | "
          "decoded image MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "TiffReader (bands cached)" if r["mode"] == "reader" else "raw Zarr reads"
        print(
            f"| {name} | {r['tiles']} | {r['tiles_s']} | {r['rss_before_mib']} | "
            f"{r['peak_rss_mib']} | {r['peak_increase_mib']} | {r['image_mib']} |"
        )
    return rows


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------


def _writer_child(path: str, size: int, channels: int) -> None:
    from wsi_hipe.synthetic import write_ome_tiff

    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    written = write_ome_tiff(path, size=size, channels=channels, tile_size=FILE_TILE, seed=1)
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM")
    tiles = math.ceil(size / FILE_TILE) ** 2
    print(json.dumps({
        "size": size, "channels": channels, "levels": len(written.level_dimensions),
        "file_mib": round(Path(path).stat().st_size / 2**20, 1), "seconds": round(seconds, 1),
        "tiles_s": round(tiles / seconds, 2), "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "raw_level0_mib": round(size * size * channels * 2 / 2**20, 1),
    }), flush=True)  # fmt: skip


def bench_writer(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-readers-writer-") as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"w{size}.ome.tiff"
            cmd = [sys.executable, __file__, "_writer_child", str(path), str(size),
                   str(args.channels)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"writer child for {size} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
            path.unlink()
    print()
    print("| slide px | channels | levels | file MiB | raw level 0 MiB | seconds | tiles/s | "
          "RSS before MiB | peak RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']}² | {r['channels']} | {r['levels']} | {r['file_mib']} | "
            f"{r['raw_level0_mib']} | {r['seconds']} | {r['tiles_s']} | {r['rss_before_mib']} | "
            f"{r['peak_rss_mib']} |"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tiles")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tiles", type=int, default=48)
    p.add_argument("--repeat", type=int, default=5)
    p = sub.add_parser("rss")
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    p.add_argument("--tiles", type=int, default=64)
    p = sub.add_parser("striped")
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--raw-rows", type=int, default=2, help="grid rows read raw (slow)")
    p = sub.add_parser("writer")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--channels", type=int, default=3)
    p = sub.add_parser("all")
    p = sub.add_parser("_writer_child")
    p.add_argument("path")
    p.add_argument("size", type=int)
    p.add_argument("channels", type=int)
    p = sub.add_parser("_rss_child")
    p.add_argument("path")
    p.add_argument("tiles", type=int)
    p = sub.add_parser("_striped_child")
    p.add_argument("path")
    p.add_argument("mode", choices=["reader", "raw"])
    p.add_argument("limit", type=int)
    args = parser.parse_args(argv)
    if args.cmd == "_rss_child":
        _rss_child(args.path, args.tiles)
    elif args.cmd == "_striped_child":
        _striped_child(args.path, args.mode, args.limit)
    elif args.cmd == "tiles":
        bench_tiles(args)
    elif args.cmd == "rss":
        bench_rss(args)
    elif args.cmd == "striped":
        bench_striped(args)
    elif args.cmd == "_writer_child":
        _writer_child(args.path, args.size, args.channels)
    elif args.cmd == "writer":
        bench_writer(args)
    else:
        bench_tiles(argparse.Namespace(size=4096, tiles=48, repeat=5))
        bench_rss(argparse.Namespace(sizes=[20000, 80000], tiles=64))
        bench_striped(argparse.Namespace(size=16384, raw_rows=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
