"""Write a virtual slide as a tiled pyramidal TIFF that OpenSlide opens, with ground truth.

Memory stays bounded whatever the slide size:

* level 0 is rendered tile by tile (:func:`render_region` per tile) and streamed into the TIFF
  through a generator;
* each rendered tile is also averaged 2×2 into a one-tile-row band of level 1, appended to a
  raw scratch file beside the output; every lower level is then streamed from the scratch file
  of the level above, one band of ``tile_size`` rows at a time, while writing the next one.
  So the pyramid levels are exact 2×2 means of the stored level 0 (what a viewer expects), and
  memory grows with the slide *width* only (one band: ``tile_size × width / 2`` samples);
* the ground-truth TIFFs are written at the same time by one background thread each, fed tile by
  tile through small bounded queues, so level 0 is rendered once.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import logging
import math
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_hipe.errors import OutputError
from wsi_hipe.synthetic._fields import DENSITIES
from wsi_hipe.synthetic._params import CELL_CLASSES, check_int, check_mpp, check_seed, check_size
from wsi_hipe.synthetic._render import render_region

__all__ = ["LAYOUTS", "SyntheticSlide", "ground_truth_paths", "write_slide"]

logger = logging.getLogger(__name__)

#: Pixel layouts of the slide file: ``"gray"`` uint8 single channel (minisblack), ``"gray16"``
#: uint16 single channel (OpenSlide returns its top 8 bits), ``"rgb"`` uint8 RGB with the stain
#: in blue and 0 in red and green (how Hamamatsu fluorescence NDPI slides arrive via OpenSlide).
#: OpenSlide 4.0.1 misreads the partial right-most tile column of 16-bit files (the data are
#: correct, as tifffile shows), so for ``"gray16"`` choose a width that is a multiple of
#: ``tile_size``.
LAYOUTS = ("gray", "gray16", "rgb")

_GT_SUFFIXES = {
    "lymphocytes": ".lymphocytes.tiff",
    "nuclei": ".nuclei.tiff",
    "tissue": ".tissue.tiff",
    "cells": ".cells.csv",
    "meta": ".gt.json",
}


@dataclass(frozen=True)
class SyntheticSlide:
    """What :func:`write_slide` wrote.

    Attributes
    ----------
    path : Path
        The slide (tiled pyramidal TIFF).
    ground_truth : dict of str to Path
        ``"lymphocytes"``, ``"nuclei"``, ``"tissue"`` (tiled TIFFs), ``"cells"`` (CSV) and
        ``"meta"`` (JSON describing all of them); empty when ground truth was not written.
    n_cells : dict of str to int
        Cells centred inside the slide, per class (``"lymphocyte"``, ``"tumour"``,
        ``"stromal"``).
    mpp : float
        µm per pixel at level 0.
    size : (int, int)
        Level-0 (width, height) in px.
    seed : int
    layout : str
    level_dimensions : tuple of (int, int)
        (width, height) of each pyramid level.
    gt_downsample : int
        Level-0 px per ground-truth pixel.
    density : str or None
        The lymphocyte density preset (None: the seed's own).
    """

    path: Path
    ground_truth: dict[str, Path] = field(default_factory=dict)
    n_cells: dict[str, int] = field(default_factory=dict)
    mpp: float = 0.5
    size: tuple[int, int] = (0, 0)
    seed: int = 0
    layout: str = "gray"
    level_dimensions: tuple[tuple[int, int], ...] = ()
    gt_downsample: int = 1
    density: str | None = None


def ground_truth_paths(path: str | Path) -> dict[str, Path]:
    """Where :func:`write_slide` puts the ground truth of the slide ``path``.

    ``<stem>.lymphocytes.tiff``, ``<stem>.nuclei.tiff``, ``<stem>.tissue.tiff``,
    ``<stem>.cells.csv`` and ``<stem>.gt.json`` beside the slide, ``<stem>`` being the file
    name without its last suffix.
    """
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return {key: path.with_name(stem + suffix) for key, suffix in _GT_SUFFIXES.items()}


def _down2(a: np.ndarray) -> np.ndarray:
    """2×2 mean (rounded half up) of a (H, W) integer image; an odd last row/column is repeated."""
    if a.shape[0] % 2:
        a = np.concatenate([a, a[-1:]], axis=0)
    if a.shape[1] % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    s = (
        a[0::2, 0::2].astype(np.uint32)
        + a[1::2, 0::2]
        + a[0::2, 1::2]
        + a[1::2, 1::2]
        + np.uint32(2)
    )
    return (s // np.uint32(4)).astype(a.dtype)


class _TiffSink:
    """A tiled single-page TIFF written by a background thread from tiles put one at a time."""

    def __init__(self, path: Path, **write_kwargs) -> None:
        self.path = path
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(write_kwargs,), name=f"wsi-hipe-{path.name}", daemon=True
        )
        self._thread.start()

    def _tiles(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item

    def _run(self, write_kwargs: dict) -> None:
        import tifffile

        try:
            with tifffile.TiffWriter(self.path, bigtiff=write_kwargs.pop("bigtiff")) as tif:
                tif.write(self._tiles(), **write_kwargs)
        except BaseException as exc:  # reported to the producer by put() / close()
            self._error = exc

    def _raise(self) -> None:
        raise OutputError(f"could not write {self.path}: {self._error}") from self._error

    def put(self, tile: np.ndarray | None) -> None:
        while True:
            if self._error is not None:
                self._raise()
            try:
                self._queue.put(tile, timeout=0.2)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    if self._error is not None:
                        self._raise()
                    raise OutputError(f"writer of {self.path} stopped early") from None

    def close(self) -> None:
        self.put(None)
        self._thread.join()
        if self._error is not None:
            self._raise()

    def abort(self) -> None:
        """Stop the writer thread without raising (used while another error propagates)."""
        while self._thread.is_alive():
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
            self._thread.join(timeout=0.05)


def _check_options(layout, tile_size, gt_downsample) -> tuple[str, int, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    tile_size = check_int("tile_size", tile_size, minimum=16)
    if tile_size % 16:
        raise ValueError(
            f"tile_size must be a multiple of 16 (TIFF tiles), got {tile_size}; try 256 or 512"
        )
    d = check_int("gt_downsample", gt_downsample, minimum=1)
    if tile_size % d or (tile_size // d) % 16:
        ok = [
            k
            for k in range(1, tile_size // 16 + 1)
            if tile_size % k == 0 and (tile_size // k) % 16 == 0
        ]
        raise ValueError(
            f"gt_downsample must divide tile_size into tiles of a multiple of 16 px; "
            f"with tile_size={tile_size} use one of {ok}, got {gt_downsample!r}"
        )
    return layout, tile_size, d


@dataclass(frozen=True)
class _Plan:
    """What :func:`write_slide` writes, resolved once from its (checked) arguments."""

    path: Path
    width: int
    height: int
    seed: int
    mpp: float
    layout: str
    tile: int
    d: int  # gt_downsample
    artefacts: bool
    workers: int
    ground_truth: bool
    density: str | None = None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.layout == "gray16" else np.uint8)

    @property
    def channels(self) -> int:
        return 3 if self.layout == "rgb" else 1

    @property
    def dims(self) -> list[tuple[int, int]]:
        """(width, height) of each pyramid level, halving down to one tile."""
        dims = [(self.width, self.height)]
        while max(dims[-1]) > self.tile:
            w, h = dims[-1]
            dims.append(((w + 1) // 2, (h + 1) // 2))
        return dims

    @property
    def gt_shape(self) -> tuple[int, int]:
        d = self.d
        return (len(range(d // 2, self.height, d)), len(range(d // 2, self.width, d)))

    @property
    def gt_paths(self) -> dict[str, Path]:
        return ground_truth_paths(self.path) if self.ground_truth else {}

    @property
    def res0(self) -> float:
        return 1e4 / self.mpp  # px per cm

    def tiff_options(self) -> dict:
        """tifffile ``write`` options shared by every pyramid level."""
        return {
            "dtype": self.dtype,
            "tile": (self.tile, self.tile),
            "photometric": "rgb" if self.layout == "rgb" else "minisblack",
            "compression": "zlib",
            "resolutionunit": "CENTIMETER",
            "metadata": None,
            "software": "wsi-hipe",
            "maxworkers": 1,
        }

    def shape(self, w: int, h: int) -> tuple[int, ...]:
        return (h, w, 3) if self.channels == 3 else (h, w)

    def as_layout(self, t: np.ndarray) -> np.ndarray:
        if self.channels == 1:
            return np.ascontiguousarray(t)
        out = np.zeros((*t.shape, 3), dtype=t.dtype)
        out[..., 2] = t
        return out


def _plan(
    path: str | Path,
    *,
    size: int | tuple[int, int],
    seed: int,
    mpp: float,
    layout: str,
    tile_size: int,
    artefacts: bool,
    ground_truth: bool,
    gt_downsample: int,
    workers: int,
    density: str | None = None,
) -> _Plan:
    """Check :func:`write_slide`'s arguments (errors name the bad one) and resolve them."""
    path = Path(path)
    width, height = check_size(size)
    seed = check_seed(seed)
    mpp = check_mpp(mpp)
    layout, tile, d = _check_options(layout, tile_size, gt_downsample)
    n_workers = check_int("workers", workers, minimum=1)
    if not isinstance(artefacts, (bool, np.bool_)):
        raise ValueError(f"artefacts must be True or False, got {artefacts!r}")
    if density is not None and density not in DENSITIES:
        raise ValueError(
            f"density must be one of {sorted(DENSITIES)} or None (the seed's own), got {density!r}"
        )
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name such as {path / 'slide.tiff'}")
    if layout == "gray16" and width % tile:
        logger.warning(
            "%s: width %d is not a multiple of tile_size %d; OpenSlide misreads the last tile "
            "column of 16-bit slides (use a width of %d)",
            path,
            width,
            tile,
            width - width % tile or tile,
        )
    return _Plan(
        path=path,
        width=width,
        height=height,
        seed=seed,
        mpp=mpp,
        layout=layout,
        tile=tile,
        d=d,
        artefacts=bool(artefacts),
        workers=n_workers,
        ground_truth=bool(ground_truth),
        density=density,
    )


def _render(plan: _Plan, x0: int, y0: int):
    tw, th = min(plan.tile, plan.width - x0), min(plan.tile, plan.height - y0)
    kw = {
        "seed": plan.seed,
        "mpp": plan.mpp,
        "slide_size": (plan.width, plan.height),
        "artefacts": plan.artefacts,
        "density": plan.density,
    }
    return render_region(x0, y0, tw, th, **kw)


def _rendered(plan: _Plan) -> Iterator:
    """Level-0 tiles in row-major order, rendered ``workers`` at a time (bounded ahead)."""
    tile = plan.tile
    origins = [(x0, y0) for y0 in range(0, plan.height, tile) for x0 in range(0, plan.width, tile)]
    if plan.workers == 1:
        for x0, y0 in origins:
            yield _render(plan, x0, y0)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(plan.workers, thread_name_prefix="wsi-hipe-synth") as pool:
        pending: collections.deque = collections.deque()
        for x0, y0 in origins:
            pending.append(pool.submit(_render, plan, x0, y0))
            if len(pending) > 2 * plan.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _level0_tiles(
    plan: _Plan,
    sinks: dict[str, _TiffSink],
    band_file,
    table,
    n_cells: dict[str, int],
    progress: Callable[[int, int], None] | None,
) -> Iterator[np.ndarray]:
    """Level-0 tiles for the TIFF writer; on the way, the ground truth goes to ``sinks`` and
    ``table`` (counted in ``n_cells``) and the 2×2 means of each tile row to ``band_file``."""
    tile, width, height, d, dtype = plan.tile, plan.width, plan.height, plan.d, plan.dtype
    scale = float(np.iinfo(dtype).max)
    n_tiles = math.ceil(width / tile) * math.ceil(height / tile)
    done = 0
    tiles = _rendered(plan)
    for y0 in range(0, height, tile):
        th = min(tile, height - y0)
        band = np.zeros(((th + 1) // 2, (width + 1) // 2), dtype=dtype)
        for x0 in range(0, width, tile):
            reg = next(tiles)
            q = np.floor(reg.image * scale + 0.5).astype(dtype)
            for cell in reg.cells:
                n_cells[cell["cls"]] += 1
                if table is not None:
                    table.writerow(
                        [cell["id"], f"{cell['x']:.3f}", f"{cell['y']:.3f}", cell["cls"]]
                        + [cell["area_px"]]
                    )
            # a thin last tile may hold no ground-truth sample (x0 + d//2 >= width)
            if sinks and x0 + d // 2 < width and y0 + d // 2 < height:
                sub = (slice(d // 2, None, d), slice(d // 2, None, d))
                sinks["lymphocytes"].put(reg.lymphocytes[sub].astype(np.uint32))
                sinks["nuclei"].put(reg.nuclei[sub].astype(np.uint8))
                sinks["tissue"].put(reg.tissue[sub].astype(np.uint8))
            if band_file is not None:
                small = _down2(q)
                band[:, x0 // 2 : x0 // 2 + small.shape[1]] = small
                if x0 + tile >= width:  # the row is complete; tifffile may not ask again
                    band.tofile(band_file)
            done += 1
            if progress is not None:
                progress(done, n_tiles)
            yield plan.as_layout(q)


def _level_tiles(plan: _Plan, src: Path, w: int, h: int, dst: Path | None) -> Iterator[np.ndarray]:
    """Tiles of a level streamed from its scratch file ``src``; its 2×2 means go to ``dst``."""
    tile, dtype = plan.tile, plan.dtype
    with open(src, "rb") as fin, open(dst, "wb") if dst else contextlib.nullcontext() as fout:
        for y0 in range(0, h, tile):
            th = min(tile, h - y0)
            band = np.fromfile(fin, dtype=dtype, count=th * w).reshape(th, w)
            if fout is not None:
                _down2(band).tofile(fout)
            for x0 in range(0, w, tile):
                yield plan.as_layout(band[:, x0 : x0 + tile])


def _ground_truth_sinks(
    plan: _Plan, stack: contextlib.ExitStack, written: list[Path], sinks: dict[str, _TiffSink]
):
    """Start the ground-truth TIFF writers (into ``sinks``) and open the cell table."""
    gt_paths, gt_shape, d = plan.gt_paths, plan.gt_shape, plan.d
    gt_res = 1e4 / (plan.mpp * d)
    for key, gdt in (("lymphocytes", np.uint32), ("nuclei", np.uint8), ("tissue", np.uint8)):
        written.append(gt_paths[key])
        sinks[key] = _TiffSink(
            gt_paths[key],
            bigtiff=gt_shape[0] * gt_shape[1] * 4 > 2**31,
            shape=gt_shape,
            dtype=gdt,
            tile=(plan.tile // d, plan.tile // d),
            photometric="minisblack",
            compression="zlib",
            resolution=(gt_res, gt_res),
            resolutionunit="CENTIMETER",
            metadata=None,
            software="wsi-hipe",
            description=f"wsi-hipe synthetic ground truth: {key}",
            maxworkers=1,
        )
    written.append(gt_paths["cells"])
    fcsv = stack.enter_context(open(gt_paths["cells"], "w", newline=""))
    table = csv.writer(fcsv, lineterminator="\n")
    table.writerow(["id", "x", "y", "cls", "area_px"])
    return table


def _write_files(
    plan: _Plan,
    sinks: dict[str, _TiffSink],
    written: list[Path],
    n_cells: dict[str, int],
    progress: Callable[[int, int], None] | None,
) -> None:
    """The slide (level 0 rendered, lower levels from scratch files) and the ground truth."""
    import tifffile

    dims, common, res0 = plan.dims, plan.tiff_options(), plan.res0
    raw_bytes = plan.width * plan.height * plan.channels * plan.dtype.itemsize * 4 // 3
    with contextlib.ExitStack() as stack:
        tmp = Path(
            stack.enter_context(tempfile.TemporaryDirectory(dir=plan.path.parent, prefix=".synth-"))
        )
        table = _ground_truth_sinks(plan, stack, written, sinks) if plan.ground_truth else None
        written.append(plan.path)
        tif = stack.enter_context(tifffile.TiffWriter(plan.path, bigtiff=raw_bytes > 2**31))
        band_path = tmp / "level1.raw" if len(dims) > 1 else None
        with open(band_path, "wb") if band_path else contextlib.nullcontext() as band_file:
            tif.write(
                _level0_tiles(plan, sinks, band_file, table, n_cells, progress),
                shape=plan.shape(plan.width, plan.height),
                resolution=(res0, res0),
                description=(
                    f"wsi-hipe synthetic Hoechst slide; seed={plan.seed}; mpp={plan.mpp}; "
                    f"layout={plan.layout}; artefacts={plan.artefacts}"
                    + ("" if plan.density is None else f"; density={plan.density}")
                ),
                **common,
            )
        for sink in sinks.values():
            sink.close()
        for k in range(1, len(dims)):
            w, h = dims[k]
            src = tmp / f"level{k}.raw"
            dst = tmp / f"level{k + 1}.raw" if k + 1 < len(dims) else None
            res = res0 * w / plan.width
            tif.write(
                _level_tiles(plan, src, w, h, dst),
                shape=plan.shape(w, h),
                resolution=(res, res),
                subfiletype=1,
                **common,
            )
            src.unlink()


def _write_meta(plan: _Plan, n_cells: dict[str, int]) -> None:
    """The JSON file describing the ground truth."""
    gt_paths, gt_shape, d, mpp = plan.gt_paths, plan.gt_shape, plan.d, plan.mpp
    meta = {
        "format": "wsi-hipe synthetic slide ground truth",
        "version": 1,
        "slide": plan.path.name,
        "size": [plan.width, plan.height],
        "mpp": mpp,
        "seed": plan.seed,
        "layout": plan.layout,
        "artefacts": plan.artefacts,
        **({} if plan.density is None else {"density": plan.density}),
        "tile_size": plan.tile,
        "level_dimensions": [list(x) for x in plan.dims],
        "gt_downsample": d,
        "gt_mpp": mpp * d,
        "gt_size": [gt_shape[1], gt_shape[0]],
        "gt_sampling": "ground-truth pixel (r, c) = level-0 pixel (r*d + d//2, c*d + d//2)",
        "files": {key: p.name for key, p in gt_paths.items() if key != "meta"},
        "values": {
            "lymphocytes": "uint32 instance ids (0 = none), the id column of the cell table",
            "nuclei": "uint8, 1 = any nucleus (lymphocyte, tumour, stromal), 0 = not",
            "tissue": "uint8, 1 = tissue, 0 = background",
        },
        "cells": (
            "id, x, y (level-0 px; pixel i has its centre at i), cls (lymphocyte | tumour "
            "| stromal), area_px (level-0 px of the whole nucleus); one row per cell "
            "centred inside the slide"
        ),
        "n_cells": n_cells,
    }
    gt_paths["meta"].write_text(json.dumps(meta, indent=2) + "\n")


def write_slide(
    path: str | Path,
    *,
    size: int | tuple[int, int] = 4096,
    seed: int = 0,
    mpp: float = 0.5,
    layout: str = "gray",
    tile_size: int = 512,
    artefacts: bool = True,
    ground_truth: bool = True,
    gt_downsample: int = 1,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    density: str | None = None,
) -> SyntheticSlide:
    """Write a synthetic Hoechst slide as a tiled pyramidal TIFF, with its ground truth.

    The file is a plain tiled TIFF (zlib-compressed) whose pages are the pyramid levels, each
    half the size of the one before, down to one tile; level 0 carries X/YResolution in pixels
    per centimetre, so OpenSlide (driver ``generic-tiff``) reports ``openslide.mpp-x`` = ``mpp``.
    The same arguments always give the same bytes.

    Parameters
    ----------
    path : str or Path
        Output slide, e.g. ``slide.tiff``; an existing file is replaced. Its folder must exist.
    size : int or (width, height), keyword-only
        Level-0 size in px (``wsi-hipe synth --size``).
    seed : int, keyword-only
        Seed of the virtual slide (``--seed``).
    mpp : float, keyword-only
        µm per pixel at level 0 (``--mpp``).
    layout : {'gray', 'gray16', 'rgb'}, keyword-only
        Pixel layout (``--layout``), see :data:`LAYOUTS`.
    tile_size : int, keyword-only
        TIFF tile side in px, a multiple of 16; also the rendering tile.
    artefacts : bool, keyword-only
        Debris, folds, out-of-focus patches (``--no-artefacts`` turns them off).
    ground_truth : bool, keyword-only
        Write the ground truth beside the slide (see :func:`ground_truth_paths`):
        lymphocyte instances (uint32, ids as in the cell table), all nuclei and tissue (uint8,
        1 = yes) as tiled TIFFs, the cell table (``id,x,y,cls,area_px``; x, y in level-0 px,
        pixel ``i`` centred at ``i``) and a JSON file describing them.
    gt_downsample : int, keyword-only
        Level-0 px per ground-truth pixel; ground-truth pixel ``(r, c)`` is the level-0 pixel
        ``(r·d + d//2, c·d + d//2)`` (nearest sampling). ``tile_size / gt_downsample`` must be a
        multiple of 16.
    progress : callable(done, total), optional, keyword-only
        Called after each level-0 tile.
    workers : int, keyword-only
        Threads rendering level-0 tiles ahead of the writer (numpy releases the GIL for much of
        the work). The output does not depend on it; memory grows by ~2 tiles per worker.
    density : {'sparse', 'clustered', 'dense'} or None, keyword-only
        Lymphocyte density preset (:data:`wsi_hipe.synthetic.DENSITIES`; see
        :func:`render_region`); recorded in the ground-truth JSON. None: the seed's own.

    Returns
    -------
    SyntheticSlide
    """
    plan = _plan(
        path,
        size=size,
        seed=seed,
        mpp=mpp,
        layout=layout,
        tile_size=tile_size,
        artefacts=artefacts,
        ground_truth=ground_truth,
        gt_downsample=gt_downsample,
        workers=workers,
        density=density,
    )
    dims = plan.dims
    logger.info(
        "writing synthetic slide %s: %dx%d px, %d levels, seed %d, %.3g µm/px",
        plan.path,
        plan.width,
        plan.height,
        len(dims),
        plan.seed,
        plan.mpp,
    )
    n_cells = dict.fromkeys(CELL_CLASSES.values(), 0)
    sinks: dict[str, _TiffSink] = {}
    written: list[Path] = []
    try:
        _write_files(plan, sinks, written, n_cells, progress)
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    if plan.ground_truth:
        _write_meta(plan, n_cells)
    logger.info("wrote %s (%s)", plan.path, ", ".join(f"{v} {k}" for k, v in n_cells.items()))
    return SyntheticSlide(
        path=plan.path,
        ground_truth=plan.gt_paths,
        n_cells=n_cells,
        mpp=plan.mpp,
        size=(plan.width, plan.height),
        seed=plan.seed,
        layout=plan.layout,
        level_dimensions=tuple(dims),
        gt_downsample=plan.d,
        density=plan.density,
    )
