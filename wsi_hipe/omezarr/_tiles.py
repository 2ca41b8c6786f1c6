"""The tile table of an output: ``wsi_hipe/tiles.jsonl`` (live) and ``wsi_hipe/tiles.csv`` (export).

The live table is append-only JSON lines, one record per line, each appended with a single
``O_APPEND`` write and fsynced, so several processes may append at once and a crash can at worst
truncate the last line. Reading keeps the last record of each tile and skips an unparsable line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._metadata import META_GROUP, jsonable

__all__ = ["TILE_FIELDS", "TILE_STATUSES", "FINISHED_STATUSES"]

logger = logging.getLogger(__name__)

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

#: Paths of the tables inside an output.
TILES_JSONL = f"{META_GROUP}/tiles.jsonl"
TILES_CSV = f"{META_GROUP}/tiles.csv"


def read_jsonl(path: Path) -> dict[int, dict[str, Any]]:
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


def clean_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A tile record checked and made JSON-safe: the table's fields first, NaN/inf -> None."""
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
    return jsonable(out, f"tile record {out['index']}")


def record_line(record: Mapping[str, Any]) -> bytes:
    """The table line of one record (checked by :func:`clean_record`), newline-terminated."""
    return (json.dumps(clean_record(record), separators=(",", ":")) + "\n").encode()


def repair_jsonl(path: Path) -> None:
    """Terminate a last line truncated by a crash, so records appended later stay readable."""
    if not (path.is_file() and path.stat().st_size):
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) != b"\n":
            logger.warning("%s: last record was truncated by a crash; ignoring it", path)
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())


def tile_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Number of tiles per status (every status listed, 0 included)."""
    counts: dict[str, int] = {s: 0 for s in TILE_STATUSES}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return counts


def write_csv(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Export records to CSV (the table's columns, then extra keys sorted), atomically."""
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
