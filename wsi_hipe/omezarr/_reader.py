"""Reading an output: :func:`read_output` gives a lazy :class:`OutputView` (dask arrays per level).

The coordinate transforms are read from the NGFF metadata, never recomputed, so a view places an
output exactly as any NGFF viewer would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from ..tiling import PixelTransform
from ._metadata import META_GROUP, STATE_FINAL, ome_attrs, read_meta
from ._tables import CELLS_LABELS, CellsView
from ._tiles import TILES_JSONL, read_jsonl

__all__ = ["OutputView", "read_output"]


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
    cells : CellsView or None
        The per-cell labels and table of an output made with cells (None otherwise).
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
    cells: CellsView | None = field(repr=False, default=None)

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

    def transform(self, level: int = 0) -> PixelTransform:
        """The world transform (µm) of ``level``, from the NGFF metadata."""
        scale, translation = self.transforms[self._level(level)]
        return PixelTransform(
            scale=(float(scale[0]), float(scale[1])),
            translation=(float(translation[0]), float(translation[1])),
        )


def _levels(group: Any) -> tuple[list, list]:
    import dask.array as da

    multiscale = ome_attrs(group.attrs)["multiscales"][0]
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
    meta = read_meta(path)
    if meta is None:
        raise OutputError(
            f"{path} is not a wsi-hipe output (no 'wsi_hipe' attributes in its root group)"
        )
    root = zarr.open_group(str(path), mode="r")
    saliency, transforms = _levels(root)
    segmentation, _ = _levels(root["labels/segmentation"])
    tissue, _ = _levels(root["labels/tissue"])
    records = read_jsonl(path / TILES_JSONL)
    finalized = meta.get("state") == STATE_FINAL
    cells = None
    if isinstance(meta.get("cells"), dict) and CELLS_LABELS in root:
        labels, _ = _levels(root[CELLS_LABELS])
        cells = CellsView(
            path=path,
            labels=labels,
            info=dict(meta["cells"]),
            mpp=float(meta["mpp"]),
            slide_mpp=float(meta["slide_mpp"]),
            finalized=finalized,
        )
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
        finalized=finalized,
        transforms=transforms,
        cells=cells,
    )
