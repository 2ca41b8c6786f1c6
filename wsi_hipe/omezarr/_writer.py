"""Writing an output: :func:`create_output`, :func:`open_output` and :class:`OutputStore`.

See :mod:`wsi_hipe.omezarr` for the three steps (create, write tiles, finalize) and the layout.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import NgffVersion
from ..errors import OutputError, ResumeMismatchError
from ._metadata import (
    FORMAT_VERSION,
    META_GROUP,
    NGFF_VERSIONS,
    SALIENCY,
    STATE_CREATING,
    STATE_FINAL,
    STATE_WRITING,
    as_chunk,
    as_shape,
    check_mpp,
    image_ome,
    images,
    is_zarr_dir,
    jsonable,
    label_names,
    make_fingerprint,
    now,
    read_meta,
    write_ome_attrs,
)
from ._pyramid import array_range, build_levels, create_level, pyramid_shapes
from ._tables import (
    CELL_ROWS,
    CELLS_LABELS,
    CELLS_TABLE,
    CellRows,
    cells_frame,
    paint_own_chunk,
    remove_temporaries,
    repaint_labels,
    rows_path,
    write_table,
)
from ._tiles import (
    FINISHED_STATUSES,
    TILES_CSV,
    TILES_JSONL,
    read_jsonl,
    record_line,
    repair_jsonl,
    tile_counts,
    write_csv,
)

__all__ = ["OutputStore", "create_output", "open_output"]

logger = logging.getLogger(__name__)

#: Fix named by errors about an existing output (the CLI says "--overwrite" instead).
_REPLACE_HINT = "pass overwrite=True to replace it, or write to another path"


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().cpu().numpy()
    return np.asarray(array)


class OutputStore:
    """A writable wsi-hipe OME-Zarr output; make one with :func:`create_output`/:func:`open_output`.

    Picklable: Dask workers may receive it and call :meth:`write_tile` / :meth:`record_tile`
    (each process opens its own array handles and table file descriptor).

    Attributes
    ----------
    path : Path
    shape : (H, W)
        Level-0 shape in target px.
    chunk : (h, w)
        Chunk shape = tile core size.
    mpp, slide_mpp : float
        µm/px of the output's level 0 and of the slide's level 0.
    ngff : {"0.4", "0.5"}
    fingerprint : str
    cells_info : dict or None
        What the run said about its cells (None: an output without cells).
    """

    def __init__(self, path: Path, meta: Mapping[str, Any]):
        self.path = Path(path)
        self.shape: tuple[int, int] = tuple(meta["shape"])  # type: ignore[assignment]
        self.chunk: tuple[int, int] = tuple(meta["chunk"])  # type: ignore[assignment]
        self.mpp = float(meta["mpp"])
        self.slide_mpp = float(meta["slide_mpp"])
        self.ngff: str = meta["ngff"]
        self.fingerprint: str = meta["fingerprint"]
        cells = meta.get("cells")
        self.cells_info: dict[str, Any] | None = dict(cells) if isinstance(cells, Mapping) else None
        self._arrays: dict[str, Any] = {}
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OutputStore({str(self.path)!r}, shape={self.shape}, chunk={self.chunk}, "
            f"mpp={self.mpp}, ngff={self.ngff!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        state["_fd"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- paths and handles

    @property
    def zarr_format(self) -> int:
        return NGFF_VERSIONS[self.ngff]

    @property
    def tiles_path(self) -> Path:
        """The live, append-only tile table (JSON lines)."""
        return self.path / TILES_JSONL

    @property
    def csv_path(self) -> Path:
        """The tile table exported by :meth:`finalize`."""
        return self.path / TILES_CSV

    @property
    def has_cells(self) -> bool:
        """Whether the output was created with cells (``labels/cells``, ``tables/cells``)."""
        return self.cells_info is not None

    def _array(self, name: str):
        import zarr

        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(
                str(self.path / name), mode="r+", zarr_format=self.zarr_format
            )
        return self._arrays[name]

    def _group(self, name: str = ""):
        import zarr

        return zarr.open_group(str(self.path / name), mode="r+", zarr_format=self.zarr_format)

    # -- level 0

    def _check_origin(self, tile_y: int, tile_x: int) -> tuple[int, int]:
        y, x = int(tile_y), int(tile_x)
        ch, cw = self.chunk
        if not (0 <= y < self.shape[0] and 0 <= x < self.shape[1]):
            raise ValueError(
                f"tile origin (y={y}, x={x}) lies outside the output of shape {self.shape}"
            )
        if y % ch or x % cw:
            raise ValueError(
                f"tile origin (y={y}, x={x}) is not aligned with the chunks {self.chunk}: "
                "pass the tile core's top-left pixel (a multiple of the tile size)"
            )
        return y, x

    def write_tile(self, tile_y: int, tile_x: int, saliency, segmentation) -> tuple[int, int]:
        """Write one tile core into level 0 of the saliency and segmentation arrays.

        Parameters
        ----------
        tile_y, tile_x : int
            Target-px position of the core's top-left pixel; multiples of the chunk size.
        saliency : (h, w) float array or torch.Tensor
            The core of the tile's saliency (halo already removed); ``h, w <= chunk``. Rows and
            columns past the output's border are dropped.
        segmentation : (h, w) integer array or torch.Tensor
            Argmax class per pixel (0..255), same shape as ``saliency``.

        Returns
        -------
        (h, w) : the shape actually written (after clipping at the border).

        Notes
        -----
        The core covers exactly one chunk of each array, so each chunk is written once. Call
        :meth:`record_tile` after this returns. Chunks equal to the fill value (all zeros) are
        not stored at all; reading them gives zeros.
        """
        y, x = self._check_origin(tile_y, tile_x)
        sal = _to_numpy(saliency)
        seg = _to_numpy(segmentation)
        if sal.ndim != 2:
            raise ValueError(f"saliency must be a 2-D (h, w) core, got shape {sal.shape}")
        if seg.shape != sal.shape:
            raise ValueError(
                f"segmentation shape {seg.shape} differs from saliency shape {sal.shape}"
            )
        if sal.shape[0] > self.chunk[0] or sal.shape[1] > self.chunk[1]:
            raise ValueError(
                f"tile core of shape {sal.shape} is larger than the chunks {self.chunk}; "
                "crop the halo first (wsi_hipe.stitch.crop_core)"
            )
        if not (np.issubdtype(seg.dtype, np.integer) or seg.dtype == np.bool_):
            raise ValueError(f"segmentation must hold integer classes, got dtype {seg.dtype}")
        if seg.size and (seg.min() < 0 or seg.max() > 255):
            raise ValueError(
                f"segmentation classes must lie in 0..255, got {seg.min()}..{seg.max()}"
            )
        h = min(sal.shape[0], self.shape[0] - y)
        w = min(sal.shape[1], self.shape[1] - x)
        self._array("0")[y : y + h, x : x + w] = sal[:h, :w].astype(np.float32, copy=False)
        self._array("labels/segmentation/0")[y : y + h, x : x + w] = seg[:h, :w].astype(
            np.uint8, copy=False
        )
        logger.debug("wrote tile core at y=%d x=%d (%dx%d)", y, x, h, w)
        return h, w

    def write_tissue(self, mask, *, downsample: float | None = None) -> None:
        """Write the tissue label (level 0), resampling ``mask`` to target px (nearest).

        Parameters
        ----------
        mask : (h, w) bool or integer array
            Non-zero = tissue. Either already at target px (``h, w == shape``) or at a coarser
            resolution, e.g. the thumbnail of :func:`wsi_hipe.tissue.detect_tissue`.
        downsample : float, optional
            Slide level-0 px per mask px (``TissueMask.downsample``). Target pixel ``i`` takes
            the mask pixel under its centre, ``floor((i + 0.5)·s / downsample)`` with
            ``s = mpp / slide_mpp``. Default: the mask spans the output, i.e. the factor is
            ``mask.shape / shape`` per axis.

        Written band by band (one chunk row at a time), so memory stays bounded.
        """
        mask = _to_numpy(mask)
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"tissue mask must be a non-empty 2-D (h, w) array, got {mask.shape}")
        height, width = self.shape
        if downsample is None:
            fy, fx = mask.shape[0] / height, mask.shape[1] / width
        else:
            ds = float(downsample) if isinstance(downsample, (int, float, np.number)) else -1.0
            if not (math.isfinite(ds) and ds > 0):
                raise ValueError(
                    f"downsample must be a positive number of slide px per mask px, "
                    f"got {downsample!r}"
                )
            s = self.mpp / self.slide_mpp
            fy = fx = s / ds
        cols = np.minimum(((np.arange(width) + 0.5) * fx).astype(np.int64), mask.shape[1] - 1)
        array = self._array("labels/tissue/0")
        band = self.chunk[0]
        for y0 in range(0, height, band):
            y1 = min(y0 + band, height)
            rows = np.minimum(((np.arange(y0, y1) + 0.5) * fy).astype(np.int64), mask.shape[0] - 1)
            array[y0:y1, :] = (mask[rows][:, cols] != 0).astype(np.uint8)
        logger.debug("wrote tissue label %s from mask %s", self.shape, mask.shape)

    # -- cells

    def write_cells(self, rows: CellRows) -> int:
        """Write one tile's cells: its chunk of ``labels/cells``, then its rows file.

        Parameters
        ----------
        rows : CellRows
            The tile's cells (``rows.tile`` its index, ``rows.origin`` its core's top-left pixel,
            a chunk origin), with their masks. No cells: an empty chunk and an empty rows file.

        Returns
        -------
        int : the number of cells written.

        Call it after :meth:`write_tile` and before :meth:`record_tile` of the same tile: a rows
        file counts only once the tile's record says it is finished, and the last write of a
        tile wins (see :mod:`wsi_hipe.omezarr._tables`). Several processes may write distinct
        tiles at once.
        """
        if not self.has_cells:
            raise OutputError(
                f"{self.path} was created without cells; create it with cells to write them"
            )
        if not isinstance(rows, CellRows):
            raise TypeError(f"rows must be a CellRows, got {type(rows).__name__}")
        rows.check()
        if rows.masks is None:
            raise ValueError("write_cells needs the cells' masks (CellRows.masks)")
        self._check_origin(*rows.origin)
        paint_own_chunk(self._array(f"{CELLS_LABELS}/0"), rows, self.chunk, self.shape)
        rows.save(rows_path(self.path, rows.tile))
        logger.debug("tile %d: wrote %d cells", rows.tile, rows.n)
        return rows.n

    # -- tile table

    def record_tile(self, record: Mapping[str, Any]) -> None:
        """Append one tile's record to the table, flushed and fsynced before returning.

        Parameters
        ----------
        record : dict
            ``index`` (int, required), ``status`` in {"done", "skipped", "failed"} (required),
            and optionally ``row``, ``col``, ``y``, ``x``, ``score``, ``passes``, ``seconds``,
            ``error`` and further JSON-serialisable keys. Call it after :meth:`write_tile`: a
            record means the tile's chunks are on disk. The last record of a tile wins.
        """
        line = record_line(record)
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.tiles_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = os.getpid()
            os.write(self._fd, line)  # one write: atomic w.r.t. other appenders
            os.fsync(self._fd)

    def tile_records(self) -> dict[int, dict[str, Any]]:
        """The table as ``{index: last record}``."""
        return read_jsonl(self.tiles_path)

    def finished_tiles(self) -> set[int]:
        """Indices of tiles whose last record is "done" or "skipped" (failed ones are retried)."""
        return {i for i, r in self.tile_records().items() if r.get("status") in FINISHED_STATUSES}

    def close(self) -> None:
        """Close the table's file descriptor (array handles need no closing)."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None
            self._arrays = {}

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- finalize

    def finalize(self, *, levels: int | None = None, workers: int | None = None) -> None:
        """Build the pyramids, write the multiscale metadata of every level and ``tiles.csv``.

        Parameters
        ----------
        levels : int, optional
            Number of levels, level 0 included (default: halve until the largest side fits
            in one chunk).
        workers : int, optional
            Threads computing pyramid chunks (default ``min(4, os.cpu_count())``).

        Each level is computed chunk by chunk from the level above (at most 2×2 chunks in
        memory per thread); level 0 is only read. Run it once, from one process, after every
        tile is written; it may be run again after a resume (levels are rebuilt).
        """
        shapes = pyramid_shapes(self.shape, self.chunk, levels)
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        if not isinstance(workers, (int, np.integer)) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        value_range = [math.inf, -math.inf]
        records = self.tile_records()
        if self.has_cells:
            repaint_labels(self.path, self._array(f"{CELLS_LABELS}/0"), shape=self.shape,
                           chunk=self.chunk, records=records)  # fmt: skip
        for prefix, name, _dtype, method in images(self.has_cells):
            group = self._group(prefix)
            stats = build_levels(
                group, self.path / prefix, shapes, chunk=self.chunk,
                zarr_format=self.zarr_format, method=method, workers=int(workers),
            )  # fmt: skip
            if name == SALIENCY:
                value_range = stats or array_range(group["0"], self.chunk)
            ome = image_ome(name, len(shapes), mpp=self.mpp, slide_mpp=self.slide_mpp,
                            ngff=self.ngff, method=method)  # fmt: skip
            write_ome_attrs(group, self.ngff, ome)
        write_csv(self.csv_path, records.values())
        counts = tile_counts(records.values())
        extra: dict[str, Any] = {}
        if self.has_cells:
            frame = cells_frame(self.path, mpp=self.mpp, slide_mpp=self.slide_mpp, records=records)
            info = {**(self.cells_info or {}), "mpp": self.mpp, "slide_mpp": self.slide_mpp}
            write_table(self.path, frame, info, self.zarr_format)
            extra["cell_count"] = int(len(frame))
        self._update_meta(
            **extra,
            state=STATE_FINAL,
            levels=len(shapes),
            finalized=now(),
            tile_counts=counts,
            saliency_range=[float(v) if math.isfinite(v) else 0.0 for v in value_range],
        )
        logger.info("finalized %s: %d levels, tiles %s", self.path, len(shapes), counts)

    def _update_meta(self, **changes: Any) -> None:
        """Merge ``changes`` into the root's ``wsi_hipe.output`` attributes."""
        root = self._group()
        attrs = dict(root.attrs)
        info = dict(attrs[META_GROUP])
        info["output"] = {**info["output"], **changes}
        attrs[META_GROUP] = info
        root.attrs.put(attrs)


# --- create / open --------------------------------------------------------------------------------


def _layout(shape, chunk, mpp, slide_mpp, ngff) -> dict[str, Any]:
    return {
        "shape": list(shape),
        "chunk": list(chunk),
        "mpp": float(mpp),
        "slide_mpp": float(slide_mpp),
        "ngff": ngff,
    }


def _remove_output(path: Path) -> None:
    if path.is_dir():
        if any(path.iterdir()) and not is_zarr_dir(path):
            raise OutputError(
                f"{path} exists and is not a Zarr/OME-Zarr folder; refusing to delete it even "
                "with overwrite=True. Write the output to another path."
            )
        logger.info("overwrite: removing %s", path)
        shutil.rmtree(path)
    else:
        raise OutputError(
            f"{path} exists and is a file, not an output folder; remove it or write the output "
            "to another path"
        )


def _check_identity(
    fingerprint: str | Mapping[str, Any], provenance: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The fingerprint as a string (a dict is hashed) and the provenance made JSON-safe."""
    if isinstance(fingerprint, Mapping):
        fingerprint = make_fingerprint(fingerprint)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(f"fingerprint must be a non-empty str or a dict, got {fingerprint!r}")
    provenance = jsonable(dict(provenance or {}), "provenance")
    if "output" in provenance:
        raise ValueError("provenance key 'output' is reserved for wsi_hipe's own metadata")
    return fingerprint, provenance


def _check_cells(path: Path, existing: Mapping[str, Any], cells: dict[str, Any] | None) -> None:
    """A resume must keep the cells as they were: none, or the same settings."""
    theirs = existing.get("cells")
    if isinstance(theirs, Mapping):
        theirs = {k: v for k, v in theirs.items() if k not in ("labels", "table", "rows")}
    else:
        theirs = None
    if (theirs is None) != (cells is None):
        had, now = ("without", "with") if theirs is None else ("with", "without")
        raise ResumeMismatchError(
            f"{path} was written {had} cells and cannot be resumed {now} them (the tiles done so "
            f"far would have no cell rows); pass overwrite=True to start it afresh, or write to "
            "another path"
        )
    if theirs is not None and theirs != jsonable(cells, "cells"):
        diff = sorted(k for k in {*theirs, *cells} if theirs.get(k) != cells.get(k))
        raise ResumeMismatchError(
            f"{path} was made with other cell settings ({', '.join(diff)}); {_REPLACE_HINT}"
        )


def _resume(
    path: Path, layout: dict[str, Any], fingerprint: str, cells: dict[str, Any] | None = None
) -> OutputStore:
    """Reopen an existing output for ``create_output(..., resume=True)``."""
    # Compare the layout before open_output(), which marks a finalized output as being
    # written again: a refused resume must leave a finished output finished.
    existing = read_meta(path) or {}
    if all(k in existing for k in layout):
        theirs = _layout(**{k: existing[k] for k in layout})
    else:
        theirs = layout  # not a wsi-hipe output: open_output() says so
    diff = sorted(k for k in layout if layout[k] != theirs[k])
    if diff:
        raise ResumeMismatchError(
            f"{path} was made with another layout ({', '.join(diff)}: "
            f"{[theirs[k] for k in diff]} there, {[layout[k] for k in diff]} now); {_REPLACE_HINT}"
        )
    if existing:
        _check_cells(path, existing, cells)
    store = open_output(path, fingerprint=fingerprint)
    logger.info("resuming %s (%d tiles finished)", path, len(store.finished_tiles()))
    return store


def _lay_out(
    path: Path,
    layout: dict[str, Any],
    fingerprint: str,
    provenance: dict[str, Any],
    cells: dict[str, Any] | None = None,
) -> OutputStore:
    """Write a new output's groups, empty level-0 arrays, NGFF metadata and empty tile table."""
    import zarr

    meta = {
        "format": FORMAT_VERSION,
        "state": STATE_CREATING,
        "fingerprint": fingerprint,
        **layout,
        "levels": 1,
        "tiles": {"table": TILES_JSONL, "csv": TILES_CSV},
    }
    if cells is not None:
        meta["cells"] = {"labels": CELLS_LABELS, "table": CELLS_TABLE, "rows": CELL_ROWS, **cells}
    ngff = meta["ngff"]
    root = zarr.open_group(str(path), mode="w-", zarr_format=NGFF_VERSIONS[ngff])
    root.attrs.put({META_GROUP: {**provenance, "output": meta}})
    store = OutputStore(path, meta)
    for prefix, name, dtype, method in images(cells is not None):
        group = root.require_group(prefix) if prefix else root
        create_level(group, "0", store.shape, store.chunk, store.zarr_format, dtype)
        ome = image_ome(name, 1, mpp=store.mpp, slide_mpp=store.slide_mpp, ngff=ngff, method=method)
        write_ome_attrs(group, ngff, ome)
    write_ome_attrs(root["labels"], ngff, {"labels": label_names(cells is not None)})
    root.require_group(META_GROUP)
    if cells is not None:
        root.require_group(CELL_ROWS)
    (path / TILES_JSONL).touch()
    store._update_meta(state=STATE_WRITING)
    return store


def create_output(
    path: str | os.PathLike,
    *,
    shape: tuple[int, int],
    chunk: int | tuple[int, int],
    mpp: float,
    slide_mpp: float,
    fingerprint: str | Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
    ngff: NgffVersion = "0.4",
    overwrite: bool = False,
    resume: bool = False,
    cells: bool | Mapping[str, Any] | None = None,
) -> OutputStore:
    """Create a new output (or reopen a matching one with ``resume=True``).

    Parameters
    ----------
    path : path-like
        The ``*.ome.zarr`` folder.
    shape : (H, W)
        Level-0 shape in target px.
    chunk : int or (h, w)
        Tile core size in target px; the chunk shape of every level.
    mpp : float
        Output level-0 µm/px (the pipeline's target resolution).
    slide_mpp : float
        The slide's level-0 µm/px (used for the translation that aligns pixel centres).
    fingerprint : str or dict
        Identifies the run's inputs (e.g. :func:`make_fingerprint` of the resolved config, model
        sha256 and slide sha256); a dict is hashed. Resuming requires the same fingerprint.
    provenance : dict, optional
        JSON-serialisable facts stored under the root attribute ``"wsi_hipe"`` (suggested keys:
        ``slide`` {path, sha256, mpp}, ``model`` {sha256, ...}, ``config``, ``versions``,
        ``created``). The key ``"output"`` is reserved; ``"created"`` is added if absent.
    ngff : {"0.4", "0.5"}
        "0.4" writes Zarr v2 (read by every viewer), "0.5" Zarr v3.
    overwrite : bool
        Delete an existing output at ``path`` first (only a Zarr folder or an empty folder is
        ever deleted).
    resume : bool
        If ``path`` holds an output made with the same fingerprint and layout, reopen it (see
        :func:`open_output`) instead of failing.
    cells : bool or dict, optional
        Also lay out per-cell results: ``labels/cells`` and the rows behind ``tables/cells``
        (:mod:`wsi_hipe.omezarr._tables`). A dict (JSON-serialisable: class, ring and margin
        widths, units, ...) is stored with them and copied into the table's ``uns``. Resuming
        needs the same cells (none, or the same dict).

    Returns
    -------
    OutputStore

    Raises
    ------
    OutputError
        ``path`` exists and neither ``overwrite`` nor a valid ``resume`` applies.
    ResumeMismatchError
        ``resume=True`` and the existing output was made with another fingerprint, layout or
        cells (e.g. resumed with cells when it was written without).
    """
    path = Path(path)
    if ngff not in NGFF_VERSIONS:
        raise ValueError(f"ngff must be one of {sorted(NGFF_VERSIONS)}, got {ngff!r}")
    shape, chunk = as_shape(shape), as_chunk(chunk)
    mpp, slide_mpp = check_mpp(mpp, "mpp"), check_mpp(slide_mpp, "slide_mpp")
    fingerprint, provenance = _check_identity(fingerprint, provenance)
    layout = _layout(shape, chunk, mpp, slide_mpp, ngff)
    if cells is None or cells is False:
        cell_info = None
    elif cells is True:
        cell_info = {}
    elif isinstance(cells, Mapping):
        cell_info = jsonable(dict(cells), "cells")
    else:
        raise ValueError(f"cells must be a bool or a dict, got {cells!r}")

    if path.exists():
        if overwrite:
            _remove_output(path)
        elif resume:
            return _resume(path, layout, fingerprint, cell_info)
        else:
            raise OutputError(
                f"{path} already exists; pass overwrite=True to replace it, resume=True to "
                "continue it (same config, model and slide), or write to another path"
            )
    provenance.setdefault("created", now())
    path.parent.mkdir(parents=True, exist_ok=True)
    store = _lay_out(path, layout, fingerprint, provenance, cell_info)
    logger.info("created %s: shape %s, chunk %s, NGFF %s", path, shape, chunk, ngff)
    return store


def open_output(
    path: str | os.PathLike, *, fingerprint: str | Mapping | None = None
) -> OutputStore:
    """Reopen an existing output for writing (resume after a crash).

    Parameters
    ----------
    path : path-like
    fingerprint : str or dict, optional
        When given, it must equal the fingerprint stored at creation.

    Returns
    -------
    OutputStore
        Its :meth:`~OutputStore.finished_tiles` says which tiles to skip. A truncated last line
        of the tile table (a crash during a write) is terminated so later records stay readable.
        A finalized output goes back to state "writing" (its pyramid is rebuilt by the next
        :meth:`~OutputStore.finalize`). Call it from one process (the scheduler's).

    Raises
    ------
    OutputError
        ``path`` is missing, is not a wsi-hipe output, or its creation never completed.
    ResumeMismatchError
        The fingerprint differs.
    """
    path = Path(path)
    if not path.exists():
        raise OutputError(f"no output at {path}; create it first with create_output()")
    meta = read_meta(path)
    if meta is None:
        raise OutputError(
            f"{path} is not a wsi-hipe output (no 'wsi_hipe' attributes); write to another "
            "path (overwrite=True replaces a Zarr store or an empty folder, never other files)"
        )
    if meta.get("state") not in (STATE_WRITING, STATE_FINAL):
        raise OutputError(
            f"{path} is an incomplete output (creation was interrupted); pass overwrite=True "
            "to create it afresh"
        )
    if isinstance(fingerprint, Mapping):
        fingerprint = make_fingerprint(fingerprint)
    if fingerprint is not None and fingerprint != meta.get("fingerprint"):
        raise ResumeMismatchError(
            f"{path} was made with another config/model/slide (fingerprint "
            f"{str(meta.get('fingerprint'))[:12]}…, now {fingerprint[:12]}…); {_REPLACE_HINT}"
        )
    store = OutputStore(path, meta)
    if meta.get("state") == STATE_FINAL:
        # New tiles will change level 0: the pyramid is stale until finalize() runs again.
        store._update_meta(state=STATE_WRITING)
    repair_jsonl(path / TILES_JSONL)
    remove_temporaries(path)
    return store
