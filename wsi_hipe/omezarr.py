"""The pipeline's output: an OME-Zarr (NGFF 0.4 / Zarr v2 by default, 0.5 / Zarr v3 as an option).

Writing happens in three steps, each safe to interrupt:

1. :func:`create_output` lays out the store: empty level-0 arrays (chunks = the tile core size),
   NGFF metadata for level 0, provenance and a fingerprint of the run (``open_output`` /
   ``create_output(..., resume=True)`` reopen it after a crash).
2. Per tile, :meth:`OutputStore.write_tile` writes the tile's core into level 0 — exactly the
   chunk(s) the core covers, each once — and :meth:`OutputStore.record_tile` appends one line to
   the tile table ``wsi_hipe/tiles.jsonl`` (flushed and fsynced) **after** the chunks are written.
   Several processes may do this at once: they write distinct chunk files, and each record is a
   single ``O_APPEND`` write.
3. :meth:`OutputStore.finalize` builds the factor-2 pyramid chunk by chunk (saliency: 2×2 mean;
   labels: 2×2 mode, ties to the larger label — see :mod:`wsi_hipe.stitch`), writes the
   multiscale metadata of every level and exports ``wsi_hipe/tiles.csv``.

Layout (``OUT.ome.zarr``)::

    .zattrs / zarr.json   multiscales "saliency" (axes y, x in micrometer, per-level scale and
                          translation), "wsi_hipe": provenance + "output" (fingerprint, state, ...)
    0/ 1/ ...             saliency, float32
    labels/segmentation/  0/ 1/ ...  uint8 argmax class (0 background, 1 lymphocyte, 2 nucleus)
    labels/tissue/        0/ 1/ ...  uint8 tissue mask (1 = tissue) at the target resolution
    wsi_hipe/             a Zarr group holding tiles.jsonl (the live table) and tiles.csv

Coordinates: the output is at ``mpp`` µm/px, the slide's level 0 at ``slide_mpp``. Target pixel
``i`` covers slide level-0 pixels ``[i·s, (i+1)·s)`` with ``s = mpp / slide_mpp``. With the slide's
level 0 at scale ``slide_mpp`` and translation 0 (pixel centres at ``j·slide_mpp``), output level
``k`` has scale ``mpp·2^k`` and translation ``(mpp·2^k − slide_mpp) / 2`` µm on both axes, so that
pixel centres line up with the slide.

:func:`read_output` opens a finished (or partial) output lazily: dask arrays per level, the
coordinate transforms from the NGFF metadata, provenance and the tile table.

Viewers: ome-zarr-py and napari-ome-zarr read the image and both labels. napari-ome-zarr 0.10
applies only the first transform of dataset 0 (the scale), so it drops the sub-pixel translation;
the wsi-hipe napari plugin places layers with :meth:`OutputView.translation`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import OutputError, ResumeMismatchError
from .stitch import downsample_mean, downsample_mode, downsampled_shape

__all__ = [
    "NGFF_VERSIONS",
    "SEGMENTATION_CLASSES",
    "TILE_FIELDS",
    "TILE_STATUSES",
    "OutputStore",
    "OutputView",
    "create_output",
    "open_output",
    "read_output",
    "make_fingerprint",
    "pyramid_shapes",
    "level_transform",
]

logger = logging.getLogger(__name__)

NgffVersion = Literal["0.4", "0.5"]
#: NGFF version -> Zarr format.
NGFF_VERSIONS: dict[str, int] = {"0.4": 2, "0.5": 3}
#: Label values of the segmentation and their names.
SEGMENTATION_CLASSES: dict[int, str] = {0: "background", 1: "lymphocyte", 2: "nucleus"}
#: RGBA (0-255) colours of the segmentation classes (image-label "colors").
SEGMENTATION_COLORS: dict[int, tuple[int, int, int, int]] = {
    0: (0, 0, 0, 0),
    1: (255, 64, 160, 255),  # lymphocyte: magenta-pink
    2: (64, 200, 255, 255),  # nucleus: light blue
}
TISSUE_COLORS: dict[int, tuple[int, int, int, int]] = {0: (0, 0, 0, 0), 1: (80, 200, 80, 96)}
#: Columns of the tile table, in order.
TILE_FIELDS: tuple[str, ...] = (
    "index",
    "row",
    "col",
    "y",
    "x",
    "status",
    "score",
    "passes",
    "seconds",
    "error",
)
#: Allowed values of a tile record's "status"; "done" and "skipped" count as finished.
TILE_STATUSES: tuple[str, ...] = ("done", "skipped", "failed")
FINISHED_STATUSES: frozenset[str] = frozenset({"done", "skipped"})

FORMAT_VERSION = 1
SALIENCY = "saliency"
LABELS = ("segmentation", "tissue")
META_GROUP = "wsi_hipe"
TILES_JSONL = f"{META_GROUP}/tiles.jsonl"
TILES_CSV = f"{META_GROUP}/tiles.csv"
_STATE_CREATING, _STATE_WRITING, _STATE_FINAL = "creating", "writing", "finalized"


# --- small helpers ------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _jsonable(value: Any, what: str) -> Any:
    """Round-trip ``value`` through JSON (numpy scalars, paths -> plain types)."""
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (no NaN/inf): {exc}") from exc


def make_fingerprint(*parts: Any) -> str:
    """A stable sha256 hex digest of JSON-serialisable parts (dict key order does not matter).

    Examples
    --------
    >>> fp = make_fingerprint({"tiling": {"mpp": 0.5}}, "model-sha", "slide-sha")
    >>> len(fp)
    64
    """
    text = json.dumps(list(parts), sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _as_chunk(chunk: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(chunk, (int, np.integer)):
        pair = (int(chunk), int(chunk))
    else:
        pair = tuple(int(c) for c in chunk)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"chunk must be a positive int or (height, width), got {chunk!r}")
    return pair  # type: ignore[return-value]


def _as_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        pair = tuple(int(s) for s in shape)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"shape must be (height, width) in target px, both >= 1, got {shape!r}")
    return pair  # type: ignore[return-value]


def pyramid_shapes(
    shape: tuple[int, int], chunk: int | tuple[int, int], levels: int | None = None
) -> list[tuple[int, int]]:
    """Shapes of the pyramid levels: level 0, then ``ceil`` halving.

    Parameters
    ----------
    shape : (H, W)
        Level-0 shape in px.
    chunk : int or (int, int)
        Chunk (tile core) size; with ``levels=None`` levels are added until the largest side is
        ``<= max(chunk)``.
    levels : int, optional
        Exact number of levels (>= 1), level 0 included; the halving stops early at 1×1.

    Returns
    -------
    list of (h, w)
    """
    shape = _as_shape(shape)
    limit = max(_as_chunk(chunk))
    if levels is not None and (not isinstance(levels, (int, np.integer)) or levels < 1):
        raise ValueError(f"levels must be an int >= 1 or None, got {levels!r}")
    shapes = [shape]
    while True:
        current = shapes[-1]
        if levels is not None:
            if len(shapes) >= levels or max(current) <= 1:
                break
        elif max(current) <= limit:
            break
        shapes.append(downsampled_shape(current))  # type: ignore[arg-type]
    return shapes


def level_transform(level: int, *, mpp: float, slide_mpp: float) -> tuple[list[float], list[float]]:
    """NGFF ``scale`` and ``translation`` (µm, order y, x) of pyramid ``level``.

    Level ``k`` has scale ``mpp·2^k`` and translation ``(mpp·2^k − slide_mpp) / 2``: its pixel
    centres line up with a slide whose level 0 has scale ``slide_mpp`` and translation 0.
    """
    step = float(mpp) * 2**level
    shift = (step - float(slide_mpp)) / 2
    return [step, step], [shift, shift]


def _check_mpp(value: float, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{name} must be a positive number of µm per pixel, got {value!r}")
    return out


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _is_zarr_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (".zgroup", ".zarray", "zarr.json"))


# --- NGFF metadata ------------------------------------------------------------------------------


def _axes() -> list[dict[str, str]]:
    return [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]


def _multiscale(
    name: str, n_levels: int, *, mpp: float, slide_mpp: float, ngff: str, method: str
) -> dict[str, Any]:
    datasets = []
    for level in range(n_levels):
        scale, translation = level_transform(level, mpp=mpp, slide_mpp=slide_mpp)
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    entry: dict[str, Any] = {"name": name, "axes": _axes(), "datasets": datasets}
    if ngff == "0.4":
        entry = {"version": "0.4", **entry}
    entry["type"] = method
    entry["metadata"] = {
        "method": f"wsi_hipe.stitch.downsample_{method}",
        "description": f"factor-2 levels, 2x2 {method}",
    }
    return entry


def _image_label(values: Mapping[int, str], colors: Mapping[int, tuple], ngff: str) -> dict:
    label: dict[str, Any] = {
        "colors": [{"label-value": int(v), "rgba": list(colors[v])} for v in sorted(colors)],
        "properties": [{"label-value": int(v), "class": name} for v, name in values.items()],
        "source": {"image": "../../"},
    }
    if ngff == "0.4":
        label = {"version": "0.4", **label}
    return label


def _set_ome_attrs(group, ngff: str, ome: Mapping[str, Any], extra: Mapping | None = None):
    """Write NGFF attributes: top level for 0.4, under "ome" (with "version") for 0.5."""
    attrs = dict(group.attrs)
    if ngff == "0.4":
        attrs.update(ome)
    else:
        current = dict(attrs.get("ome", {}))
        current.update(ome)
        current["version"] = ngff
        attrs["ome"] = current
    if extra:
        attrs.update(extra)
    group.attrs.put(attrs)


def _get_ome_attrs(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    return attrs["ome"] if "ome" in attrs else attrs


# --- the tile table -----------------------------------------------------------------------------


def _read_jsonl(path: Path) -> dict[int, dict[str, Any]]:
    """Last record per tile index; an unparsable line (a truncated last write) is skipped."""
    records: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return records
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            index = int(record["index"])
        except (ValueError, KeyError, TypeError):
            where = "last line (truncated by a crash?)" if number >= len(lines) - 1 else "line"
            logger.warning("%s: ignoring unreadable %s %d", path, where, number)
            continue
        records[index] = record
    return records


def _clean_record(record: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise TypeError(f"a tile record must be a dict, got {type(record).__name__}")
    if "index" not in record:
        raise ValueError(f"a tile record needs an 'index', got keys {sorted(record)}")
    status = record.get("status")
    if status not in TILE_STATUSES:
        raise ValueError(f"tile status must be one of {list(TILE_STATUSES)}, got {status!r}")
    out: dict[str, Any] = {}
    for key in (*TILE_FIELDS, *sorted(k for k in record if k not in TILE_FIELDS)):
        value = record.get(key)
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    out["index"] = int(out["index"])
    return _jsonable(out, f"tile record {out['index']}")


# --- the writer ---------------------------------------------------------------------------------


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
    """

    def __init__(self, path: Path, meta: Mapping[str, Any]):
        self.path = Path(path)
        self.shape: tuple[int, int] = tuple(meta["shape"])  # type: ignore[assignment]
        self.chunk: tuple[int, int] = tuple(meta["chunk"])  # type: ignore[assignment]
        self.mpp = float(meta["mpp"])
        self.slide_mpp = float(meta["slide_mpp"])
        self.ngff: str = meta["ngff"]
        self.fingerprint: str = meta["fingerprint"]
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
        line = json.dumps(_clean_record(record), separators=(",", ":")) + "\n"
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.tiles_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = os.getpid()
            os.write(self._fd, line.encode())  # one write: atomic w.r.t. other appenders
            os.fsync(self._fd)

    def tile_records(self) -> dict[int, dict[str, Any]]:
        """The table as ``{index: last record}``."""
        return _read_jsonl(self.tiles_path)

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
        groups = [("", "mean"), ("labels/segmentation", "mode"), ("labels/tissue", "mode")]
        value_range = [math.inf, -math.inf]
        for prefix, method in groups:
            group = self._group(prefix)
            fn = downsample_mean if method == "mean" else downsample_mode
            old = [
                d["path"]
                for d in _get_ome_attrs(group.attrs)["multiscales"][0]["datasets"]
                if d["path"] != "0"
            ]
            for name in old:
                if int(name) >= len(shapes):
                    shutil.rmtree(self.path / prefix / name)
            for level in range(1, len(shapes)):
                src = group[str(level - 1)]
                dst = _create_level(group, str(level), shapes[level], self, src.dtype)
                stats = _downsample_level(src, dst, self.chunk, fn, workers)
                if prefix == "" and level == 1:
                    value_range = stats
            if prefix == "" and len(shapes) == 1:
                value_range = _array_range(group["0"], self.chunk)
            name = SALIENCY if prefix == "" else prefix.split("/")[-1]
            ome = {
                "multiscales": [
                    _multiscale(
                        name,
                        len(shapes),
                        mpp=self.mpp,
                        slide_mpp=self.slide_mpp,
                        ngff=self.ngff,
                        method=method,
                    )
                ]
            }
            _set_ome_attrs(group, self.ngff, ome)
        records = self.tile_records()
        _write_csv(self.csv_path, records.values())
        counts: dict[str, int] = {s: 0 for s in TILE_STATUSES}
        for record in records.values():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        root = self._group()
        attrs = dict(root.attrs)
        info = dict(attrs[META_GROUP])
        output = dict(info["output"])
        output.update(
            state=_STATE_FINAL,
            levels=len(shapes),
            finalized=_now(),
            tile_counts=counts,
            saliency_range=[float(v) if math.isfinite(v) else 0.0 for v in value_range],
        )
        info["output"] = output
        attrs[META_GROUP] = info
        root.attrs.put(attrs)
        logger.info("finalized %s: %d levels, tiles %s", self.path, len(shapes), counts)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _create_level(group, name: str, shape, store: OutputStore, dtype):
    chunks = (min(store.chunk[0], shape[0]), min(store.chunk[1], shape[1]))
    kwargs: dict[str, Any] = {}
    if store.zarr_format == 2:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    else:
        kwargs["dimension_names"] = ("y", "x")
    return group.create_array(
        name, shape=tuple(shape), chunks=chunks, dtype=dtype, fill_value=0, overwrite=True, **kwargs
    )


def _downsample_level(src, dst, chunk, fn, workers: int) -> list[float]:
    """Fill ``dst`` (level k) chunk by chunk from ``src`` (level k-1); return src's (min, max)."""
    ch, cw = dst.chunks
    blocks = [(i, j) for i in range(0, dst.shape[0], ch) for j in range(0, dst.shape[1], cw)]

    def one(block: tuple[int, int]) -> tuple[float, float]:
        i, j = block
        part = np.asarray(src[2 * i : 2 * (i + ch), 2 * j : 2 * (j + cw)])
        lo, hi = part.min(), part.max()
        if lo == hi:  # constant (e.g. background): no need to downsample
            if lo != 0:  # a fresh level reads 0 where nothing is written
                dst[i : i + ch, j : j + cw] = np.full(downsampled_shape(part.shape), lo, dst.dtype)
        else:
            dst[i : i + ch, j : j + cw] = fn(part)
        return float(lo), float(hi)

    if workers == 1:
        stats = [one(b) for b in blocks]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            stats = list(pool.map(one, blocks))
    return [min(s[0] for s in stats), max(s[1] for s in stats)]


def _array_range(array, chunk) -> list[float]:
    lo, hi = math.inf, -math.inf
    ch, cw = chunk
    for i in range(0, array.shape[0], ch):
        for j in range(0, array.shape[1], cw):
            part = np.asarray(array[i : i + ch, j : j + cw])
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    return [lo, hi]


def _write_csv(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    records = sorted(records, key=lambda r: r["index"])
    extra = sorted({k for r in records for k in r} - set(TILE_FIELDS))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*TILE_FIELDS, *extra], restval="")
        writer.writeheader()
        for record in records:
            writer.writerow(
                {k: ("" if v is None else v) for k, v in record.items() if k in writer.fieldnames}
            )
    os.replace(tmp, path)


# --- create / open ------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any] | None:
    """The ``wsi_hipe.output`` attributes of an existing output, None if it is not one."""
    import zarr

    if not _is_zarr_dir(path):
        return None
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return None
    info = group.attrs.get(META_GROUP)
    if not isinstance(info, dict) or not isinstance(info.get("output"), dict):
        return None
    return info["output"]


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
        if any(path.iterdir()) and not _is_zarr_dir(path):
            raise OutputError(
                f"{path} exists and is not a Zarr/OME-Zarr folder; refusing to delete it even "
                "with overwrite. Choose another output path (-o)."
            )
        logger.info("overwrite: removing %s", path)
        shutil.rmtree(path)
    else:
        raise OutputError(
            f"{path} exists and is a file, not an output folder; remove it or choose another -o"
        )


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

    Returns
    -------
    OutputStore

    Raises
    ------
    OutputError
        ``path`` exists and neither ``overwrite`` nor a valid ``resume`` applies.
    ResumeMismatchError
        ``resume=True`` and the existing output was made with another fingerprint or layout.
    """
    import zarr

    path = Path(path)
    if ngff not in NGFF_VERSIONS:
        raise ValueError(f"ngff must be one of {sorted(NGFF_VERSIONS)}, got {ngff!r}")
    shape, chunk = _as_shape(shape), _as_chunk(chunk)
    mpp, slide_mpp = _check_mpp(mpp, "mpp"), _check_mpp(slide_mpp, "slide_mpp")
    if isinstance(fingerprint, Mapping):
        fingerprint = make_fingerprint(fingerprint)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(f"fingerprint must be a non-empty str or a dict, got {fingerprint!r}")
    provenance = _jsonable(dict(provenance or {}), "provenance")
    if "output" in provenance:
        raise ValueError("provenance key 'output' is reserved for wsi_hipe's own metadata")
    layout = _layout(shape, chunk, mpp, slide_mpp, ngff)

    if path.exists():
        if overwrite:
            _remove_output(path)
        elif resume:
            # Compare the layout before open_output(), which marks a finalized output as being
            # written again: a refused resume must leave a finished output finished.
            existing = _read_meta(path) or {}
            if all(k in existing for k in layout):
                theirs = _layout(**{k: existing[k] for k in layout})
            else:
                theirs = layout  # not a wsi-hipe output: open_output() says so
            diff = sorted(k for k in layout if layout[k] != theirs[k])
            if diff:
                raise ResumeMismatchError(
                    f"{path} was made with another layout ({', '.join(diff)}: "
                    f"{[theirs[k] for k in diff]} there, {[layout[k] for k in diff]} now); "
                    "use --overwrite or another -o"
                )
            store = open_output(path, fingerprint=fingerprint)
            logger.info("resuming %s (%d tiles finished)", path, len(store.finished_tiles()))
            return store
        else:
            raise OutputError(
                f"{path} already exists; pass --overwrite to replace it, resume it with the "
                "same config, or choose another -o"
            )

    meta = {
        "format": FORMAT_VERSION,
        "state": _STATE_CREATING,
        "fingerprint": fingerprint,
        **layout,
        "levels": 1,
        "tiles": {"table": TILES_JSONL, "csv": TILES_CSV},
    }
    provenance.setdefault("created", _now())
    zarr_format = NGFF_VERSIONS[ngff]
    path.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(path), mode="w-", zarr_format=zarr_format)
    root.attrs.put({META_GROUP: {**provenance, "output": meta}})
    store = OutputStore(path, meta)
    for prefix, dtype, name, method in (
        ("", np.float32, SALIENCY, "mean"),
        ("labels/segmentation", np.uint8, "segmentation", "mode"),
        ("labels/tissue", np.uint8, "tissue", "mode"),
    ):
        group = root.require_group(prefix) if prefix else root
        _create_level(group, "0", shape, store, dtype)
        ome: dict[str, Any] = {
            "multiscales": [
                _multiscale(name, 1, mpp=mpp, slide_mpp=slide_mpp, ngff=ngff, method=method)
            ]
        }
        if name == "segmentation":
            ome["image-label"] = _image_label(SEGMENTATION_CLASSES, SEGMENTATION_COLORS, ngff)
        elif name == "tissue":
            ome["image-label"] = _image_label({0: "background", 1: "tissue"}, TISSUE_COLORS, ngff)
        _set_ome_attrs(group, ngff, ome)
    _set_ome_attrs(root["labels"], ngff, {"labels": list(LABELS)})
    root.require_group(META_GROUP)
    (path / TILES_JSONL).touch()
    meta["state"] = _STATE_WRITING
    attrs = dict(root.attrs)
    attrs[META_GROUP] = {**provenance, "output": meta}
    root.attrs.put(attrs)
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
        raise OutputError(f"no output at {path}; create it first (wsi-hipe run ... -o {path})")
    meta = _read_meta(path)
    if meta is None:
        raise OutputError(
            f"{path} is not a wsi-hipe output (no 'wsi_hipe' attributes); "
            "use --overwrite or another -o"
        )
    if meta.get("state") not in (_STATE_WRITING, _STATE_FINAL):
        raise OutputError(
            f"{path} is an incomplete output (creation was interrupted); use --overwrite"
        )
    if isinstance(fingerprint, Mapping):
        fingerprint = make_fingerprint(fingerprint)
    if fingerprint is not None and fingerprint != meta.get("fingerprint"):
        raise ResumeMismatchError(
            f"{path} was made with another config/model/slide (fingerprint "
            f"{str(meta.get('fingerprint'))[:12]}…, now {fingerprint[:12]}…); "
            "use --overwrite or another -o"
        )
    if meta.get("state") == _STATE_FINAL:
        # New tiles will change level 0: the pyramid is stale until finalize() runs again.
        import zarr

        root = zarr.open_group(str(path), mode="r+")
        attrs = dict(root.attrs)
        meta = {**meta, "state": _STATE_WRITING}
        attrs[META_GROUP] = {**attrs[META_GROUP], "output": meta}
        root.attrs.put(attrs)
    table = path / TILES_JSONL
    if table.is_file() and table.stat().st_size:
        with open(table, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                logger.warning("%s: last record was truncated by a crash; ignoring it", table)
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
    return OutputStore(path, meta)


# --- the reader ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputView:
    """A read-only, lazy view of a wsi-hipe output (see :func:`read_output`).

    Attributes
    ----------
    path : Path
    saliency : list of (H_k, W_k) float32 dask arrays
        One per pyramid level, level 0 first.
    segmentation, tissue : list of (H_k, W_k) uint8 dask arrays
    provenance : dict
        The root ``"wsi_hipe"`` attributes (what the pipeline passed, plus ``"output"``).
    tiles : list of dict
        The tile table, last record per tile, sorted by index.
    mpp, slide_mpp : float
    ngff : str
    finalized : bool
        False while the run is going on or after a crash (only level 0 is then meaningful).
    """

    path: Path
    saliency: list
    segmentation: list
    tissue: list
    provenance: dict
    tiles: list
    mpp: float
    slide_mpp: float
    ngff: str
    finalized: bool
    transforms: list = field(repr=False, default_factory=list)

    @property
    def levels(self) -> int:
        return len(self.saliency)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.saliency[0].shape)  # type: ignore[return-value]

    @property
    def chunk(self) -> tuple[int, int]:
        return tuple(c[0] for c in self.saliency[0].chunks)  # type: ignore[return-value]

    @property
    def fingerprint(self) -> str:
        return self.provenance["output"]["fingerprint"]

    @property
    def slide_path(self) -> str | None:
        """The slide's path from the provenance (``slide.path`` or ``slide_path``), if any."""
        slide = self.provenance.get("slide")
        if isinstance(slide, dict) and slide.get("path"):
            return str(slide["path"])
        value = self.provenance.get("slide_path")
        return str(value) if value else None

    def _level(self, level: int) -> int:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.levels:
            raise ValueError(f"level must be in 0..{self.levels - 1}, got {level!r}")
        return int(level)

    def scale(self, level: int = 0) -> tuple[float, float]:
        """(y, x) µm per pixel of ``level`` (from the NGFF metadata)."""
        return tuple(self.transforms[self._level(level)][0])  # type: ignore[return-value]

    def translation(self, level: int = 0) -> tuple[float, float]:
        """(y, x) µm position of pixel (0, 0)'s centre at ``level``."""
        return tuple(self.transforms[self._level(level)][1])  # type: ignore[return-value]


def _levels(group) -> tuple[list, list]:
    import dask.array as da

    multiscale = _get_ome_attrs(group.attrs)["multiscales"][0]
    arrays, transforms = [], []
    for dataset in multiscale["datasets"]:
        arrays.append(da.from_zarr(group[dataset["path"]]))
        scale, translation = [1.0, 1.0], [0.0, 0.0]
        for t in dataset.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = [float(v) for v in t["scale"]]
            elif t.get("type") == "translation":
                translation = [float(v) for v in t["translation"]]
        transforms.append((scale, translation))
    return arrays, transforms


def read_output(path: str | os.PathLike) -> OutputView:
    """Open a wsi-hipe output for reading (lazily: no pixel is read here).

    Parameters
    ----------
    path : path-like
        A ``*.ome.zarr`` folder written by :func:`create_output`, finished or not.

    Returns
    -------
    OutputView

    Raises
    ------
    OutputError
        ``path`` does not exist or is not a wsi-hipe output.
    """
    import zarr

    path = Path(path)
    if not path.is_dir():
        raise OutputError(f"no output folder at {path}")
    meta = _read_meta(path)
    if meta is None:
        raise OutputError(
            f"{path} is not a wsi-hipe output (no 'wsi_hipe' attributes in its root group)"
        )
    root = zarr.open_group(str(path), mode="r")
    saliency, transforms = _levels(root)
    segmentation, _ = _levels(root["labels/segmentation"])
    tissue, _ = _levels(root["labels/tissue"])
    records = _read_jsonl(path / TILES_JSONL)
    return OutputView(
        path=path,
        saliency=saliency,
        segmentation=segmentation,
        tissue=tissue,
        provenance=dict(root.attrs[META_GROUP]),
        tiles=[records[i] for i in sorted(records)],
        mpp=float(meta["mpp"]),
        slide_mpp=float(meta["slide_mpp"]),
        ngff=str(meta["ngff"]),
        finalized=meta.get("state") == _STATE_FINAL,
        transforms=transforms,
    )
