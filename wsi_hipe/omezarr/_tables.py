"""Per-cell results of an output: streamed tile by tile, consolidated into an AnnData table.

Layout (only in outputs created with ``cells``)::

    labels/cells/          0/ 1/ ...  uint32 instance ids (0 = no cell), pyramid by 2×2 mode
    wsi_hipe/cells/        one rows file per tile, ``<tile index>.npz`` (the live table)
    tables/cells/          AnnData (anndata's Zarr writer), written by finalize

Streaming and resume
--------------------
A tile's cells are written by :meth:`OutputStore.write_cells` *before* the tile's record: first
the tile's own chunk of ``labels/cells`` (its cells, clipped to its core), then its rows file,
written to a temporary name, fsynced and renamed over ``<index>.npz`` (so a file is whole or
absent, and the last write of a tile wins). A rows file counts only when the tile's last record
in ``tiles.jsonl`` is finished ("done" or "skipped"): a tile killed after its rows but before its
record is recomputed on resume and its file replaced, so after ``kill -9`` and resume no row is
duplicated or lost. Memory is one tile's cells at a time; nothing grows with the slide.

Finalize (:func:`finalize_cells`, one process)
---------------------------------------------
1. Cells reach past their tile's core into the halo, i.e. into neighbouring chunks. Each chunk
   that another tile's cells reach (or whose own rows are stale) is repainted from the rows files
   whose extent touches it: first the other tiles' cells (in tile order), then the chunk's own
   tile's cells over them, so where two tiles' segmentations disagree the chunk's owner wins.
   Rows files are read through a small cache, chunk row by chunk row: memory stays bounded.
2. The ``labels/cells`` pyramid (2×2 mode) is built like the other labels.
3. The rows of finished tiles are consolidated into ``tables/cells``: an AnnData whose ``obs`` is
   indexed by the instance id (as a string, AnnData's rule) with the columns
   :data:`CELL_COLUMNS` (µm from the output's NGFF transform, :func:`wsi_hipe.tiling.pixel_transform`:
   level-0 slide pixel ``j`` centred at ``j · slide_mpp``), ``obsm["spatial"]`` = (x, y) µm, and
   ``uns["spatialdata_attrs"]`` = ``{"region": "cells", "region_key": "region",
   "instance_key": "instance_id"}`` (SpatialData's table model: the table annotates the label
   image ``cells``). It is written next to the store and moved into place; the rows files stay
   (they hold the masks the GeoJSON export traces).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import OutputError
from ..tiling import pixel_transform
from ._metadata import META_GROUP
from ._tiles import FINISHED_STATUSES, TILES_JSONL, read_jsonl

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import pandas as pd

    from ..cells import Cells, SaliencySummary

__all__ = [
    "CELL_COLUMNS",
    "CELL_STATUSES",
    "CellRows",
    "CellsView",
]

logger = logging.getLogger(__name__)

CELLS_LABELS = "labels/cells"
CELLS_TABLE = "tables/cells"
CELL_ROWS = f"{META_GROUP}/cells"
_TABLE_TMP = f"{META_GROUP}/cells-table.tmp"
#: The label image the table annotates (SpatialData ``region``).
REGION = "cells"
#: Label dtype of ``labels/cells``: instance ids are 1 .. 2**32 − 1.
CELL_ID_DTYPE = np.uint32
#: A cell's status: "done" = explained by HiPe; "skipped" = its score was at or below the floor,
#: so its map is provably ≤ 4·D·floor and was not computed (summaries 0, context share NaN).
CELL_STATUSES: tuple[str, ...] = ("done", "skipped")
#: Columns of ``tables/cells`` obs (and of the CSV export), in order.
CELL_COLUMNS: tuple[str, ...] = (
    "instance_id",
    "region",
    "tile",
    "status",
    "centroid_x_um",
    "centroid_y_um",
    "area_um2",
    "probability",
    "score",
    "saliency_total",
    "saliency_inside",
    "saliency_ring",
    "saliency_beyond",
    "context_share",
)
_FLOATS = ("probability", "score", "total", "inside", "ring", "beyond")


# --- one tile's rows --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CellRows:
    """One tile's cells as stored, in target px of the output's level 0.

    Attributes
    ----------
    tile : int
        The tile index (the owner).
    origin : (y, x)
        The tile core's top-left pixel (a chunk origin).
    ids : (n,) int64
        Instance ids, unique over the slide, in 1 .. 2**32 − 1 (the ``labels/cells`` values).
    centroid : (n, 2) float64
        (y, x), pixel centres at integers.
    area : (n,) float64
        Mask area, px.
    probability, score, total, inside, ring, beyond : (n,) float64
        Mean class probability over the mask; the cell's own score (units of the run's score);
        its saliency in all, inside its mask, in its ring, beyond (:mod:`wsi_hipe.cells`).
    status : (n,) str
        One of :data:`CELL_STATUSES`.
    bbox : (n, 4) int64
        (y0, x0, y1, x1) of each mask, half-open.
    masks : tuple of bool ndarray, or None
        Each cell's mask inside its bbox (None when loaded without masks).
    """

    tile: int
    origin: tuple[int, int]
    ids: np.ndarray
    centroid: np.ndarray
    area: np.ndarray
    probability: np.ndarray
    score: np.ndarray
    total: np.ndarray
    inside: np.ndarray
    ring: np.ndarray
    beyond: np.ndarray
    status: np.ndarray
    bbox: np.ndarray
    masks: tuple[np.ndarray, ...] | None = None

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def context_share(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            share = (self.total - self.inside) / self.total
        return np.where(self.total > 0, np.clip(share, 0.0, 1.0), np.nan)

    @property
    def extent(self) -> np.ndarray:
        """(y0, x0, y1, x1) of all masks together; an empty box for no cells."""
        if self.n == 0:
            return np.zeros(4, np.int64)
        return np.array(
            [self.bbox[:, 0].min(), self.bbox[:, 1].min(),
             self.bbox[:, 2].max(), self.bbox[:, 3].max()], np.int64,
        )  # fmt: skip

    @classmethod
    def from_cells(
        cls,
        cells: Cells,
        *,
        tile: int,
        origin: tuple[int, int],
        ids,
        offset: tuple[float, float],
        score,
        summary: SaliencySummary,
        status,
    ) -> CellRows:
        """Rows of ``cells`` (found in an image whose pixel (0, 0) is output pixel ``offset``)."""
        oy, ox = (int(round(v)) for v in offset)
        n = cells.n
        status = np.broadcast_to(np.asarray(status, dtype="<U7"), (n,))
        bbox = cells.bbox + np.array([oy, ox, oy, ox], np.int64)
        return cls(
            tile=int(tile),
            origin=(int(origin[0]), int(origin[1])),
            ids=np.asarray(ids, np.int64).reshape(n),
            centroid=cells.centroid + np.array([oy, ox], np.float64),
            area=cells.area.astype(np.float64),
            probability=np.asarray(cells.probability, np.float64),
            score=np.asarray(score, np.float64).reshape(n),
            total=summary.total,
            inside=summary.inside,
            ring=summary.ring,
            beyond=summary.beyond,
            status=np.array(status),
            bbox=bbox,
            masks=tuple(cells.crop(i) for i in range(n)),
        )

    def check(self) -> None:
        """ValueError on inconsistent rows (lengths, ids, status, masks)."""
        n = self.n
        for name in ("centroid", "area", *_FLOATS, "status", "bbox"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"cell rows: {name} has {getattr(self, name).shape[0]} rows, ids {n}"
                )
        if n and (self.ids.min() < 1 or self.ids.max() > np.iinfo(CELL_ID_DTYPE).max):
            raise ValueError(f"cell ids must lie in 1..{np.iinfo(CELL_ID_DTYPE).max}")
        if np.unique(self.ids).size != n:
            raise ValueError(f"tile {self.tile}: cell ids are not unique")
        bad = set(np.unique(self.status).tolist()) - set(CELL_STATUSES)
        if bad:
            raise ValueError(f"cell status must be one of {list(CELL_STATUSES)}, got {sorted(bad)}")
        if self.masks is not None:
            if len(self.masks) != n:
                raise ValueError(f"cell rows: {len(self.masks)} masks for {n} cells")
            for i, mask in enumerate(self.masks):
                h, w = self.bbox[i, 2] - self.bbox[i, 0], self.bbox[i, 3] - self.bbox[i, 1]
                if mask.shape != (h, w):
                    raise ValueError(f"cell {self.ids[i]}: mask {mask.shape} vs bbox {(h, w)}")

    # -- storage

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file, fsynced, renamed over ``path``."""
        self.check()
        masks = self.masks or tuple(np.zeros((0, 0), bool) for _ in range(self.n))
        packed = [np.packbits(m.ravel()) for m in masks]
        offsets = np.zeros(self.n + 1, np.int64)
        offsets[1:] = np.cumsum([p.size for p in packed])
        arrays = {
            "tile": np.int64(self.tile),
            "origin": np.asarray(self.origin, np.int64),
            "ids": self.ids.astype(np.int64),
            "centroid": self.centroid.astype(np.float64),
            "area": self.area.astype(np.float64),
            **{name: getattr(self, name).astype(np.float64) for name in _FLOATS},
            "status": self.status.astype("<U7"),
            "bbox": self.bbox.astype(np.int64),
            "extent": self.extent,
            "has_masks": np.bool_(self.masks is not None),
            "mask_bits": np.concatenate(packed) if packed else np.zeros(0, np.uint8),
            "mask_offsets": offsets,
        }
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path, *, masks: bool = False) -> CellRows:
        with np.load(path, allow_pickle=False) as data:
            bbox = data["bbox"]
            cell_masks = None
            if masks and bool(data["has_masks"]):
                bits, offsets = data["mask_bits"], data["mask_offsets"]
                shapes = np.stack([bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]], 1)
                cell_masks = tuple(
                    np.unpackbits(bits[offsets[i] : offsets[i + 1]], count=int(h * w))
                    .astype(bool)
                    .reshape(int(h), int(w))
                    for i, (h, w) in enumerate(shapes)
                )
            return cls(
                tile=int(data["tile"]),
                origin=tuple(int(v) for v in data["origin"]),  # type: ignore[arg-type]
                ids=data["ids"],
                centroid=data["centroid"].reshape(-1, 2),
                area=data["area"],
                **{name: data[name] for name in _FLOATS},
                status=data["status"],
                bbox=bbox.reshape(-1, 4),
                masks=cell_masks,
            )

    # -- as a table

    def frame(self, *, mpp: float, slide_mpp: float) -> pd.DataFrame:
        """These rows as the table's columns (:data:`CELL_COLUMNS`), µm in the output's world."""
        import pandas as pd

        transform = pixel_transform(slide_mpp, mpp=mpp)
        y_um, x_um = transform.to_world(self.centroid[:, 0], self.centroid[:, 1])
        columns = {
            "instance_id": self.ids.astype(np.int64),
            "region": np.full(self.n, REGION, dtype=object),
            "tile": np.full(self.n, self.tile, dtype=np.int64),
            "status": self.status.astype(object),
            "centroid_x_um": np.asarray(x_um, np.float64),
            "centroid_y_um": np.asarray(y_um, np.float64),
            "area_um2": self.area * float(mpp) ** 2,
            "probability": self.probability,
            "score": self.score,
            "saliency_total": self.total,
            "saliency_inside": self.inside,
            "saliency_ring": self.ring,
            "saliency_beyond": self.beyond,
            "context_share": self.context_share,
        }
        return pd.DataFrame(columns, columns=list(CELL_COLUMNS))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rows_path(root: Path, tile: int) -> Path:
    return root / CELL_ROWS / f"{int(tile)}.npz"


def remove_temporaries(root: Path) -> None:
    """Delete half-written rows files left by a crash (``.<index>.npz.tmp.<pid>``)."""
    folder = root / CELL_ROWS
    if folder.is_dir():
        for tmp in folder.glob(".*.npz.tmp.*"):
            logger.warning("removing an interrupted cell rows file %s", tmp)
            tmp.unlink(missing_ok=True)


def _rows_files(root: Path) -> dict[int, Path]:
    """Every rows file by tile index (finished or not)."""
    folder = root / CELL_ROWS
    out = {}
    if folder.is_dir():
        for path in folder.glob("*.npz"):
            if path.stem.isdigit():
                out[int(path.stem)] = path
    return out


def finished_rows(root: Path, records: Mapping[int, Mapping[str, Any]] | None = None):
    """Rows files of tiles whose last record is finished, by tile index (sorted)."""
    if records is None:
        records = read_jsonl(root / TILES_JSONL)
    files = _rows_files(root)
    return {
        t: files[t]
        for t in sorted(files)
        if t in records and records[t].get("status") in FINISHED_STATUSES
    }


# --- writing (called by OutputStore) ------------------------------------------------------------


def paint_own_chunk(array: Any, rows: CellRows, chunk: tuple[int, int], shape) -> None:
    """Write the tile's chunk of ``labels/cells``: its own cells clipped to its core."""
    y, x = rows.origin
    h, w = min(chunk[0], shape[0] - y), min(chunk[1], shape[1] - x)
    block = np.zeros((h, w), CELL_ID_DTYPE)
    _paint(block, (y, x), rows)
    array[y : y + h, x : x + w] = block


def _paint(block: np.ndarray, origin: tuple[int, int], rows: CellRows) -> None:
    """Paint ``rows``' masks into ``block`` whose pixel (0, 0) is output pixel ``origin``."""
    if rows.masks is None:
        raise ValueError("painting cells needs their masks (CellRows.load(..., masks=True))")
    by, bx = origin
    bh, bw = block.shape
    for i in range(rows.n):
        y0, x0, y1, x1 = (int(v) for v in rows.bbox[i])
        cy0, cx0 = max(y0, by), max(x0, bx)
        cy1, cx1 = min(y1, by + bh), min(x1, bx + bw)
        if cy0 >= cy1 or cx0 >= cx1:
            continue
        mask = rows.masks[i][cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        view = block[cy0 - by : cy1 - by, cx0 - bx : cx1 - bx]
        view[mask] = CELL_ID_DTYPE(rows.ids[i])


# --- finalize ---------------------------------------------------------------------------------


class _RowsCache:
    """A few tiles' rows (with masks), least recently used evicted."""

    def __init__(self, files: Mapping[int, Path], size: int):
        self.files, self.size = files, max(4, size)
        self._items: OrderedDict[int, CellRows] = OrderedDict()

    def get(self, tile: int) -> CellRows:
        if tile in self._items:
            self._items.move_to_end(tile)
            return self._items[tile]
        rows = CellRows.load(self.files[tile], masks=True)
        self._items[tile] = rows
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return rows


def repaint_labels(root: Path, array: Any, *, shape, chunk, records) -> int:
    """Step 1 of finalize (module docstring): paint cells that reach into other tiles' chunks.

    Returns the number of chunks repainted.
    """
    files = _rows_files(root)
    finished = finished_rows(root, records)
    ch, cw = chunk
    n_cols = -(-shape[1] // cw)
    owner_of: dict[tuple[int, int], int] = {}
    touching: dict[tuple[int, int], list[int]] = {}
    stale_chunks = set()
    for tile, path in files.items():
        with np.load(path, allow_pickle=False) as data:
            origin = tuple(int(v) for v in data["origin"])
            extent = data["extent"]
            n = int(data["ids"].shape[0])
        home = (origin[0] // ch, origin[1] // cw)
        if tile not in finished:
            stale_chunks.add(home)
            continue
        owner_of[home] = tile
        if n == 0:
            continue
        y0, x0, y1, x1 = (int(v) for v in extent)
        for r in range(max(y0, 0) // ch, (min(y1, shape[0]) - 1) // ch + 1):
            for c in range(max(x0, 0) // cw, (min(x1, shape[1]) - 1) // cw + 1):
                touching.setdefault((r, c), []).append(tile)
    todo = set(stale_chunks)
    for key, tiles in touching.items():
        if any(t != owner_of.get(key) for t in tiles):
            todo.add(key)
    cache = _RowsCache(finished, size=3 * n_cols + 4)
    for r, c in sorted(todo):
        y, x = r * ch, c * cw
        h, w = min(ch, shape[0] - y), min(cw, shape[1] - x)
        block = np.zeros((h, w), CELL_ID_DTYPE)
        owner = owner_of.get((r, c))
        tiles = touching.get((r, c), [])
        for tile in sorted(t for t in tiles if t != owner):
            _paint(block, (y, x), cache.get(tile))
        if owner is not None and owner in tiles:
            _paint(block, (y, x), cache.get(owner))
        array[y : y + h, x : x + w] = block
    logger.debug("cells: repainted %d chunks of labels/cells", len(todo))
    return len(todo)


def cells_frame(root: Path, *, mpp: float, slide_mpp: float, records=None) -> pd.DataFrame:
    """The table of finished tiles' cells (rows files), indexed by the instance id as a string."""
    import pandas as pd

    frames = [
        CellRows.load(path).frame(mpp=mpp, slide_mpp=slide_mpp)
        for path in finished_rows(root, records).values()
    ]
    frame = (
        pd.concat(frames, ignore_index=True)
        if frames
        else _empty_rows().frame(mpp=mpp, slide_mpp=slide_mpp)
    )
    frame = frame.sort_values("instance_id", kind="stable").reset_index(drop=True)
    dup = frame["instance_id"].duplicated()
    if dup.any():
        raise OutputError(
            f"{root}: cell ids {frame['instance_id'][dup].head().tolist()} occur in several "
            "tiles; the output is inconsistent, rerun with overwrite=True"
        )
    frame.index = pd.Index(frame["instance_id"].astype(str).to_numpy(), name="cell_id")
    frame["region"] = pd.Categorical(frame["region"], categories=[REGION])
    frame["status"] = pd.Categorical(frame["status"], categories=list(CELL_STATUSES))
    return frame


def _empty_rows() -> CellRows:
    z = np.zeros(0)
    return CellRows(
        tile=0, origin=(0, 0), ids=np.zeros(0, np.int64), centroid=np.zeros((0, 2)),
        area=z, probability=z, score=z, total=z, inside=z, ring=z, beyond=z,
        status=np.zeros(0, "<U7"), bbox=np.zeros((0, 4), np.int64), masks=(),
    )  # fmt: skip


def make_table(frame: pd.DataFrame, info: Mapping[str, Any]) -> anndata.AnnData:
    """The AnnData of a cells frame (SpatialData's table model, see the module docstring)."""
    import anndata

    spatial = frame[["centroid_x_um", "centroid_y_um"]].to_numpy(dtype=np.float64)
    return anndata.AnnData(
        obs=frame,
        obsm={"spatial": spatial},
        uns={
            "spatialdata_attrs": {
                "region": REGION,
                "region_key": "region",
                "instance_key": "instance_id",
            },
            "wsi_hipe": dict(info),
        },
    )


def write_table(root: Path, frame: pd.DataFrame, info: Mapping[str, Any], zarr_format: int):
    """Write ``tables/cells`` with anndata's Zarr writer, next to it first, then moved in place."""
    import anndata
    import zarr

    table = make_table(frame, info)
    tmp = root / _TABLE_TMP
    if tmp.exists():
        shutil.rmtree(tmp)
    meta = zarr.open_group(str(root / META_GROUP), mode="r+", zarr_format=zarr_format)
    with anndata.settings.override(zarr_write_format=zarr_format, auto_shard_zarr_v3=False):
        anndata.io.write_elem(meta, tmp.name, table)
    zarr.open_group(str(root), mode="r+", zarr_format=zarr_format).require_group("tables")
    final = root / CELLS_TABLE
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellsView:
    """The cells of an output (``read_output(path).cells``; None for outputs without cells).

    Attributes
    ----------
    path : Path
        The output.
    labels : list of (H_k, W_k) uint32 dask arrays
        ``labels/cells`` per level (cells reaching into other tiles' chunks are complete only
        after finalize).
    info : dict
        What the run stored about its cells (class, ring and margin widths, units, ...).
    mpp, slide_mpp : float
    finalized : bool
    """

    path: Path
    labels: list
    info: dict
    mpp: float
    slide_mpp: float
    finalized: bool

    def rows_files(self) -> dict[int, Path]:
        """Rows files of finished tiles, by tile index."""
        return finished_rows(self.path)

    def iter_rows(self, *, masks: bool = False) -> Iterator[CellRows]:
        """Each finished tile's rows, in tile order (one tile in memory at a time)."""
        for path in self.rows_files().values():
            yield CellRows.load(path, masks=masks)

    def frame(self) -> pd.DataFrame:
        """The table's ``obs``: from ``tables/cells`` when finalized, else from the rows files."""
        table_path = self.path / CELLS_TABLE
        if self.finalized and table_path.is_dir():
            import anndata

            return anndata.io.read_elem(_open(table_path).get("obs"))  # type: ignore[arg-type]
        return cells_frame(self.path, mpp=self.mpp, slide_mpp=self.slide_mpp)

    def table(self) -> anndata.AnnData:
        """The AnnData table (read from ``tables/cells`` when finalized, else built)."""
        table_path = self.path / CELLS_TABLE
        if self.finalized and table_path.is_dir():
            import anndata

            return anndata.read_zarr(table_path)
        return make_table(self.frame(), self.info)

    def __len__(self) -> int:
        return int(len(self.frame()))


def _open(path: Path):
    import zarr

    return zarr.open_group(str(path), mode="r")
