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
    (with cells)          labels/cells/ (uint32 instance ids), wsi_hipe/cells/<tile>.npz (live
                          per-tile rows), tables/cells/ (AnnData, written by finalize): see
                          ``_tables`` and :meth:`OutputStore.write_cells`

Coordinates: the output is at ``mpp`` µm/px, the slide's level 0 at ``slide_mpp``. Target pixel
``i`` covers slide level-0 pixels ``[i·s, (i+1)·s)`` with ``s = mpp / slide_mpp``. With the slide's
level 0 at scale ``slide_mpp`` and translation 0 (pixel centres at ``j·slide_mpp``), output level
``k`` has scale ``mpp·2^k`` and translation ``(mpp·2^k − slide_mpp) / 2`` µm on both axes, so that
pixel centres line up with the slide (:func:`wsi_hipe.tiling.pixel_transform`).

:func:`read_output` opens a finished (or partial) output lazily: dask arrays per level, the
coordinate transforms from the NGFF metadata, provenance and the tile table.

Viewers: ome-zarr-py and napari-ome-zarr read the image and both labels. napari-ome-zarr 0.10
applies only the first transform of dataset 0 (the scale), so it drops the sub-pixel translation;
the wsi-hipe napari plugin places layers with :meth:`OutputView.transform`.

Modules: ``_metadata`` (NGFF attributes, multiscales, label metadata, and where NGFF 0.4 / 0.5
keep them), ``_tiles`` (the tile table), ``_pyramid`` (level shapes and building), ``_writer``
(:func:`create_output`, :func:`open_output`, :class:`OutputStore`), ``_reader``
(:func:`read_output`, :class:`OutputView`), ``_tables`` (per-cell rows, the cells table,
:class:`CellRows`, :class:`CellsView`). Import from ``wsi_hipe.omezarr``.
"""

from __future__ import annotations

from ._metadata import (
    NGFF_VERSIONS,
    SEGMENTATION_CLASSES,
    SEGMENTATION_COLORS,
    TISSUE_COLORS,
    is_output,
    make_fingerprint,
    ome_attrs,
    root_attrs,
    write_ome_attrs,
)
from ._pyramid import pyramid_shapes
from ._reader import OutputView, read_output
from ._tables import CELL_COLUMNS, CELL_STATUSES, CellRows, CellsView
from ._tiles import FINISHED_STATUSES, TILE_FIELDS, TILE_STATUSES
from ._writer import OutputStore, create_output, open_output

__all__ = [
    "CELL_COLUMNS",
    "CELL_STATUSES",
    "CellRows",
    "CellsView",
    "NGFF_VERSIONS",
    "SEGMENTATION_CLASSES",
    "SEGMENTATION_COLORS",
    "TISSUE_COLORS",
    "TILE_FIELDS",
    "TILE_STATUSES",
    "FINISHED_STATUSES",
    "OutputStore",
    "OutputView",
    "create_output",
    "open_output",
    "read_output",
    "make_fingerprint",
    "pyramid_shapes",
    "is_output",
    "ome_attrs",
    "root_attrs",
    "write_ome_attrs",
]
