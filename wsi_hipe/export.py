"""Export an output's cells: GeoJSON detections for QuPath, and a plain CSV table.

GeoJSON (:func:`export_geojson`) follows what QuPath (0.4 and later) writes and reads with
*File ▸ Import objects from file*:

- one ``FeatureCollection``; each cell a ``Feature`` with a ``Polygon`` geometry (the cell's
  outline along pixel edges, exterior counter-clockwise in (x, y) as RFC 7946 asks);
- coordinates in **level-0 slide pixels**, origin at the top-left corner of the full-resolution
  image, pixel ``j`` spanning ``[j, j + 1)`` (QuPath's ROI convention). An output pixel ``i`` at
  ``mpp`` µm/px covers level-0 ``[i·s, (i+1)·s)`` with ``s = mpp / slide_mpp``; the conversion
  goes through the output's NGFF transform (:func:`wsi_hipe.tiling.pixel_transform`);
- ``properties``: ``objectType: "detection"``, ``name`` (``"cell <id>"``), ``classification``
  ``{"name": <class>, "color": [r, g, b]}`` and ``measurements``, a flat object of numbers
  named as the table's columns (``area_um2``, ``context_share``, ...; QuPath shows them in its
  measurement table). A value that is not finite (the context share of a cell without
  saliency) is left out, which QuPath reads as missing (NaN); JSON has no NaN;
- ``id``: a UUID (QuPath keeps it as the object's ID), derived from the run's fingerprint and the
  cell id, so exporting twice gives the same IDs.

CSV (:func:`export_csv`): the table's columns (:data:`wsi_hipe.omezarr.CELL_COLUMNS`), one row
per cell, tile by tile (the pipeline's ids increase with the tile); a missing value is empty.

Both stream tile by tile from the output's per-tile rows: memory holds one tile's cells.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.cells import outline
from wsi_hipe.errors import OutputError
from wsi_hipe.omezarr import (
    CELL_COLUMNS,
    SEGMENTATION_CLASSES,
    SEGMENTATION_COLORS,
    CellRows,
    CellsView,
    OutputView,
    read_output,
)
from wsi_hipe.tiling import pixel_transform

__all__ = ["MEASUREMENTS", "cell_features", "export_csv", "export_geojson"]

logger = logging.getLogger(__name__)

#: The table's columns written as QuPath measurements (the numeric ones).
MEASUREMENTS: tuple[str, ...] = tuple(c for c in CELL_COLUMNS if c not in ("region", "status"))
_FALLBACK_COLOR = (255, 64, 160)

OutputLike = str | os.PathLike | OutputView


def _cells_of(output: OutputLike) -> tuple[OutputView, CellsView]:
    view = output if isinstance(output, OutputView) else read_output(output)
    if view.cells is None:
        raise OutputError(
            f"{view.path} has no cells: it was explained without them; explain the slide with "
            "cells=True to export them"
        )
    return view, view.cells


def _classification(info: dict[str, Any]) -> dict[str, Any]:
    index = info.get("class_index")
    name = info.get("class") or SEGMENTATION_CLASSES.get(index, "cell")
    rgb = info.get("color") or SEGMENTATION_COLORS.get(index, (*_FALLBACK_COLOR, 255))[:3]
    return {"name": str(name), "color": [int(c) for c in rgb[:3]]}


def _geometry(rows: CellRows, i: int, to_level0) -> dict[str, Any]:
    y0, x0 = int(rows.bbox[i, 0]), int(rows.bbox[i, 1])
    rings = outline(rows.masks[i])  # type: ignore[index]
    if not rings:
        raise OutputError(f"cell {int(rows.ids[i])} of tile {rows.tile} has an empty mask")
    exteriors = [r for r in rings if _area(r) > 0]
    holes = [r for r in rings if _area(r) < 0]

    def coords(ring: np.ndarray) -> list[list[float]]:
        x, y = to_level0(ring[:, 0] + y0, ring[:, 1] + x0)
        return np.round(np.stack([x, y], axis=1), 4).tolist()

    if len(exteriors) == 1:
        return {"type": "Polygon", "coordinates": [coords(exteriors[0]), *map(coords, holes)]}
    if holes:
        logger.warning("cell %d: several parts with holes; holes dropped", int(rows.ids[i]))
    return {"type": "MultiPolygon", "coordinates": [[coords(r)] for r in exteriors]}


def _area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def cell_features(output: OutputLike) -> Iterator[dict[str, Any]]:
    """The GeoJSON ``Feature`` of every cell of a finished tile, tile by tile.

    Parameters
    ----------
    output : path or OutputView
        A wsi-hipe output made with cells.

    Yields
    ------
    dict
        A QuPath detection (see the module docstring).
    """
    view, cells = _cells_of(output)
    target = pixel_transform(view.slide_mpp, mpp=view.mpp)
    level0 = pixel_transform(view.slide_mpp)

    def to_level0(ey: np.ndarray, ex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Target-px edge coordinates -> level-0 edge coordinates (x, y), through µm."""
        y_um, x_um = target.to_world(ey - 0.5, ex - 0.5)
        ly, lx = level0.to_edge(y_um, x_um)
        return lx, ly

    classification = _classification(cells.info)
    fingerprint = view.provenance.get("output", {}).get("fingerprint", "")
    for rows in cells.iter_rows(masks=True):
        frame = rows.frame(mpp=view.mpp, slide_mpp=view.slide_mpp)
        values = frame[list(MEASUREMENTS)].to_numpy(dtype=np.float64)
        for i in range(rows.n):
            cell_id = int(rows.ids[i])
            measurements = {
                name: (int(v) if name in ("instance_id", "tile") else float(v))
                for name, v in zip(MEASUREMENTS, values[i], strict=True)
                if math.isfinite(v)
            }
            yield {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsi-hipe:{fingerprint}:{cell_id}")),
                "geometry": _geometry(rows, i, to_level0),
                "properties": {
                    "objectType": "detection",
                    "name": f"cell {cell_id}",
                    "classification": classification,
                    "measurements": measurements,
                },
            }


def export_geojson(output: OutputLike, path: str | os.PathLike) -> int:
    """Write the cells as a GeoJSON FeatureCollection of QuPath detections.

    Parameters
    ----------
    output : path or OutputView
        A wsi-hipe output made with cells (finished tiles are exported; finalizing is not
        needed).
    path : path-like
        The ``.geojson`` file (written to a temporary name, then moved into place).

    Returns
    -------
    int : the number of cells written.

    Raises
    ------
    OutputError
        The output has no cells.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write('{"type": "FeatureCollection", "features": [')
        for feature in cell_features(output):
            handle.write(("\n" if count == 0 else ",\n") + json.dumps(feature, allow_nan=False))
            count += 1
        handle.write("\n]}\n")
    os.replace(tmp, path)
    logger.info("wrote %d cells to %s", count, path)
    return count


def export_csv(output: OutputLike, path: str | os.PathLike) -> int:
    """Write the cells table as CSV (columns :data:`~wsi_hipe.omezarr.CELL_COLUMNS`).

    Returns
    -------
    int : the number of rows written.
    """
    view, cells = _cells_of(output)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(",".join(CELL_COLUMNS) + "\n")
        for rows in cells.iter_rows():
            frame = rows.frame(mpp=view.mpp, slide_mpp=view.slide_mpp)
            frame.to_csv(handle, header=False, index=False, float_format="%.9g")
            count += rows.n
    os.replace(tmp, path)
    logger.info("wrote %d cells to %s", count, path)
    return count
