"""Cells: instances of the score class in a tile, the vector score HiPe explains, and per-cell
summaries of a saliency map.

A segmentation network labels pixels; a researcher asks about *cells*: did the model call this
nucleus a lymphocyte because of the nucleus itself or because of its neighbours? This module turns
a tile's class mask into instances, gives every instance its own score (so all cells of a tile are
one vector target of :func:`wsi_hipe.hipe.hierarchical_perturbation`, explained in the same
passes), and condenses each cell's saliency map into a few numbers.

Instances (:func:`find_cells`)
------------------------------
1. The class mask (e.g. ``segmentation == 1``) with its holes filled (a hole = background not
   4-connected to the tile border), split into 4-connected components.
2. Touching cells are split by a watershed. The elevation is ``e = EDT · p``: the Euclidean
   distance to the background (px), multiplied by the class probability ``p`` when given, so that
   both a neck of the shape and a dip of the probability along a contact line separate cells.
   Markers are the *h*-maxima of ``e`` with ``h = split_depth`` px (a maximum counts only when
   every path to a higher one descends by at least ``h``); a component without such a maximum
   is one cell. The watershed of ``−e`` from the markers (4-connected flooding, inside the mask)
   gives the instances.
3. Instances smaller than ``min_area`` px join the neighbouring instance they share the longest
   border with; isolated ones are dropped (noise).
4. Instances are numbered 1..n in raster order of their first pixel; every instance is
   4-connected and hole-free, so its outline is one simple ring (:func:`outline`).

Failure cases, by construction: two cells pressed together along a straight contact without a
neck or a probability dip deeper than ``h`` stay one instance (under-split); a lobed or kidney-
shaped nucleus whose distance map has two maxima separated by more than ``h`` is split in two
(over-split; only fragments below ``min_area`` are merged back); a cell segmented partly as another
class (e.g. lymphocyte vs. nucleus under the argmax) is only its class part; holes inside a nucleus
are filled; a cell cut by the tile's window border is only its visible part (the pipeline's owner
rule below and a halo wider than a cell make owned cells whole).

Owner rule (:func:`in_core`): a cell belongs to the tile whose core holds its centroid, with the
core's pixel-centre box half-open (``[y0 − ½, y0 + h − ½)``) so that a point belongs to exactly
one tile. Neighbouring tiles segment a shared cell with different context; when their centroids
of it straddle a core border (a fraction of a pixel apart), the cell may be counted twice or not
at all. The HiPe map of a cell uses the whole halo tile as context.

The cell score (:func:`score_regions`, :func:`cell_scores`)
-----------------------------------------------------------
Cell ``k``'s score is its expected class area ``Σ_p p_class(x)_p`` over its *score region*: its
mask grown by ``margin`` px without overlapping other cells (each pixel within ``margin`` goes to
the nearest cell, :func:`skimage.segmentation.expand_labels`), so the score keeps the whole
predicted cell when a perturbation moves its outline a little, and the regions of touching cells
partition their pixels. The default margin :data:`MARGIN_UM` = 1.5 µm is the 3 px disk of
:func:`wsi_hipe.scores.cell_area` at 0.5 µm/px. The vector score is one scatter-add over the
region labels (float64 accumulation), not K masked sums.

One tile (:func:`explain_cells`)
--------------------------------
All instances of the tile's window are found (so that score regions of owned cells never take
pixels of a neighbour that belongs to another tile); the tile keeps the cells it owns. A cell whose
own score is at or below the score floor is *skipped*: by the pipeline's skip bound its map is at
most ``4 · D · floor`` everywhere, so it gets no HiPe target, zero summaries and status
"skipped". The other cells, and the tile's own score when the tile is explained, are one vector
target: ``forward(batch) -> (B, [1 +] K)``, explained in the same passes, the tile's map equal to
a separate run on the tile's score alone.

Summaries (:func:`summarize`)
-----------------------------
For cell ``k`` with saliency map ``S_k`` over the tile (halo included) and own mask ``M_k``:
``total = Σ S_k``; ``inside = Σ_{M_k} S_k``; ``ring`` = the sum over pixels at Euclidean distance
``0 < d ≤ ring`` px from ``M_k`` (:data:`RING_UM` = 3 µm by default, about half a lymphocyte's
diameter: the immediate neighbourhood); ``beyond = total − inside − ring``; the **context share**
``(total − inside) / total`` is how much of the explanation lies outside the cell (NaN when
``total = 0``: nothing to share). Rings of neighbouring cells overlap and may cover other cells:
each summary is about one cell's own map.

Reading the context share. HiPe credits a score drop to *every pixel of the perturbed window*,
so a pixel sum weights each window's drop by its area, and the coarse depths (depth-1 windows are
a quarter of the tile or more) dominate the mass. Even a model that looks only at the cell's own
pixels therefore has most of a small cell's saliency mass outside it: measured 0.88 for a
pixel-wise model on 8 px discs in a 64 px tile (``tests/test_cells.py``), and a median of 0.956
(10–90 %: 0.937–0.971) for the bundled U-Net's lymphocytes in a 320 px tile at the default depth
(finest windows 10 px), against 0.982 (0.955–0.992) for a toy that calls a nucleus a lymphocyte
when its neighbourhood is bright. Compare context shares between models, settings or cells
explained with the same HiPe settings; an absolute value means little on its own, and settings
that stop at coarse windows (the demo's: finest windows 72 px) leave every cell near 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from wsi_hipe.scores import Score, class_area

__all__ = [
    "MARGIN_UM",
    "MIN_AREA_UM2",
    "RING_UM",
    "SPLIT_DEPTH_UM",
    "CellScores",
    "Cells",
    "SaliencySummary",
    "TileCells",
    "cell_scores",
    "explain_cells",
    "find_cells",
    "in_core",
    "outline",
    "score_regions",
    "summarize",
    "um_to_px",
]

logger = logging.getLogger(__name__)

#: Default width of the ring around a cell in which its saliency counts as "ring", µm.
RING_UM = 3.0
#: Default margin by which a cell's mask grows into its score region, µm.
MARGIN_UM = 1.5
#: Default smallest cell, µm² (smaller instances merge into a neighbour or are dropped).
MIN_AREA_UM2 = 4.0
#: Default depth (h) of the distance-map maxima that split touching cells, µm.
SPLIT_DEPTH_UM = 0.5


def um_to_px(value_um: float, mpp: float, *, power: int = 1) -> float:
    """A length (``power=1``) or an area (``power=2``) in µm as px at ``mpp`` µm/px."""
    for name, v in (("value", value_um), ("mpp", mpp)):
        if not (isinstance(v, (int, float, np.number)) and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if mpp <= 0 or value_um < 0:
        raise ValueError(f"need value >= 0 µm and mpp > 0 µm/px, got {value_um!r}, {mpp!r}")
    return float(value_um) / float(mpp) ** power


# --- instances --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Cells:
    """Instances of one class in an image (see :func:`find_cells`).

    Attributes
    ----------
    labels : (H, W) int32 ndarray
        0 = no cell, ``i`` = instance ``i`` (1..n).
    area : (n,) int64 ndarray
        Pixels per instance.
    centroid : (n, 2) float64 ndarray
        (y, x) mean pixel position, pixel centres at integers.
    bbox : (n, 4) int64 ndarray
        (y0, x0, y1, x1), half-open.
    probability : (n,) float64 ndarray
        Mean class probability over the instance (NaN without a probability map).
    """

    labels: np.ndarray
    area: np.ndarray
    centroid: np.ndarray
    bbox: np.ndarray
    probability: np.ndarray

    @property
    def n(self) -> int:
        """Number of instances."""
        return int(self.area.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.n

    def crop(self, i: int) -> np.ndarray:
        """The bool mask of instance ``i`` (0-based) inside its bounding box."""
        y0, x0, y1, x1 = (int(v) for v in self.bbox[i])
        return self.labels[y0:y1, x0:x1] == i + 1

    def select(self, keep) -> Cells:
        """The instances ``keep`` (bool mask or 0-based indices, in that order), renumbered 1..m."""
        index = np.arange(self.n)[np.asarray(keep)] if np.asarray(keep).dtype == bool else keep
        index = np.asarray(index, dtype=np.int64)
        lut = np.zeros(self.n + 1, dtype=np.int32)
        lut[index + 1] = np.arange(1, index.size + 1, dtype=np.int32)
        return Cells(
            labels=lut[self.labels],
            area=self.area[index],
            centroid=self.centroid[index],
            bbox=self.bbox[index],
            probability=self.probability[index],
        )

    @classmethod
    def from_labels(cls, labels: np.ndarray, probability: np.ndarray | None = None) -> Cells:
        """Measure the instances of a label image whose labels are exactly 1..n."""
        from scipy import ndimage

        labels = np.ascontiguousarray(labels, dtype=np.int32)
        n = int(labels.max()) if labels.size else 0
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
        if n and (area == 0).any():
            raise ValueError("labels must be numbered 1..n without gaps")
        rows, cols = np.indices(labels.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = np.bincount(flat, rows.ravel(), minlength=n + 1)[1:] / area
            cx = np.bincount(flat, cols.ravel(), minlength=n + 1)[1:] / area
            if probability is None:
                prob = np.full(n, np.nan)
            else:
                prob = np.bincount(flat, probability.ravel(), minlength=n + 1)[1:] / area
        boxes = ndimage.find_objects(labels, max_label=n)
        bbox = np.array(
            [[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in boxes], dtype=np.int64
        ).reshape(n, 4)
        return cls(labels, area, np.stack([cy, cx], axis=1).reshape(n, 2), bbox, prob)


def _as_probability(probability, shape: tuple[int, ...]) -> np.ndarray | None:
    if probability is None:
        return None
    if isinstance(probability, torch.Tensor):
        probability = probability.detach().cpu().numpy()
    p = np.asarray(probability, dtype=np.float64)
    if p.shape != shape:
        raise ValueError(f"probability has shape {p.shape}, the mask {shape}; pass one (H, W) map")
    if not np.isfinite(p).all():
        raise ValueError("probability must be finite")
    return np.clip(p, 0.0, 1.0)


def _merge_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Merge instances below ``min_area`` px into the neighbour with the longest shared border."""
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(2, 1)
    while True:
        area = np.bincount(labels.ravel())
        small = [i for i in np.nonzero((area > 0) & (area < min_area))[0] if i != 0]
        if not small:
            return labels
        i = min(small, key=lambda j: (area[j], j))  # smallest first, deterministic
        box = ndimage.find_objects((labels == i).astype(np.int8))[0]
        y0, x0 = max(box[0].start - 1, 0), max(box[1].start - 1, 0)
        y1 = min(box[0].stop + 1, labels.shape[0])
        x1 = min(box[1].stop + 1, labels.shape[1])
        part = labels[y0:y1, x0:x1]
        own = part == i
        border = ndimage.binary_dilation(own, cross) & ~own
        neighbours = part[border]
        neighbours = neighbours[neighbours != 0]
        if neighbours.size:
            counts = np.bincount(neighbours)
            part[own] = int(np.argmax(counts))  # ties: the smaller label
        else:
            part[own] = 0


def find_cells(
    mask,
    probability=None,
    *,
    min_area: float = 16.0,
    split: bool = True,
    split_depth: float = 1.0,
) -> Cells:
    """Instances of a class mask; touching cells split by a distance-transform watershed.

    Parameters
    ----------
    mask : (H, W) bool ndarray or tensor
        The class's pixels, e.g. ``segmentation == class_index``.
    probability : (H, W) float ndarray or tensor, optional
        The class probability; the watershed elevation is ``EDT · p`` (only the EDT without it),
        and each instance's mean probability is measured.
    min_area : float
        Smallest instance in px (``MIN_AREA_UM2`` µm² is ``um_to_px(4, mpp, power=2)``).
    split : bool
        Split touching cells (False: connected components only).
    split_depth : float
        ``h`` of the h-maxima markers, px (``SPLIT_DEPTH_UM`` µm converted).

    Returns
    -------
    Cells
        See the module docstring for the rule and its failure cases.
    """
    from scipy import ndimage

    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) array, got shape {mask.shape}")
    for name, v in (("min_area", min_area), ("split_depth", split_depth)):
        if not (isinstance(v, (int, float, np.number)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a number >= 0 (px), got {v!r}")
    p = _as_probability(probability, mask.shape)
    filled = ndimage.binary_fill_holes(mask.astype(bool))
    components, n = ndimage.label(filled)
    if n and split:
        labels = _watershed(filled, components, n, p, float(split_depth))
    else:
        labels = components
    if n and min_area > 1:
        labels = _merge_small(labels, float(min_area))
    labels = _renumber(labels)
    cells = Cells.from_labels(labels, p)
    logger.debug("find_cells: %d components -> %d cells", n, cells.n)
    return cells


def _watershed(filled, components, n, p, depth) -> np.ndarray:
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    elevation = ndimage.distance_transform_edt(filled)
    if p is not None:
        elevation = elevation * p
    if depth > 0:
        peaks = h_maxima(elevation, depth).astype(bool) & filled
    else:
        peaks = (elevation == ndimage.maximum_filter(elevation, size=3)) & filled
    markers, m = ndimage.label(peaks, structure=np.ones((3, 3), bool))
    # A component without a deep enough maximum is one cell: the whole component is its marker.
    has_marker = np.zeros(n + 1, bool)
    has_marker[np.unique(components[peaks])] = True
    lone = ~has_marker[components] & filled
    if lone.any():
        lone_ids = np.unique(components[lone])
        lut = np.zeros(n + 1, np.int64)
        lut[lone_ids] = m + np.arange(1, lone_ids.size + 1)
        markers = np.where(lone, lut[components], markers)
    return watershed(-elevation, markers=markers, mask=filled, connectivity=1).astype(np.int32)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Labels 1..n in raster order of each label's first pixel."""
    flat = labels.ravel()
    present, first = np.unique(flat, return_index=True)
    keep = present != 0
    present, first = present[keep], first[keep]
    order = present[np.argsort(first, kind="stable")]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lut[labels]


def in_core(cells: Cells, core: tuple[int, int, int, int]) -> np.ndarray:
    """Which cells a tile owns: centroid inside the core's half-open pixel-centre box.

    Parameters
    ----------
    cells : Cells
    core : (y0, x0, h, w)
        The core inside the image, px (e.g. ``(halo, halo, *tile.core)``).

    Returns
    -------
    (n,) bool ndarray
        ``y0 − ½ ≤ cy < y0 + h − ½`` and the same along x.
    """
    y0, x0, h, w = (float(v) for v in core)
    cy, cx = cells.centroid[:, 0], cells.centroid[:, 1]
    return (cy >= y0 - 0.5) & (cy < y0 + h - 0.5) & (cx >= x0 - 0.5) & (cx < x0 + w - 0.5)


# --- the vector score -------------------------------------------------------------------------


def score_regions(cells: Cells, margin: float) -> np.ndarray:
    """Each cell's score region: its mask grown by ``margin`` px without overlap.

    Returns
    -------
    (H, W) int32 ndarray
        ``k`` where cell ``k`` (1-based) scores, 0 elsewhere.
    """
    from skimage.segmentation import expand_labels

    if not (isinstance(margin, (int, float, np.number)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a number >= 0 (px), got {margin!r}")
    if margin == 0 or cells.n == 0:
        return cells.labels.copy()
    return expand_labels(cells.labels, distance=float(margin)).astype(np.int32)


@dataclass(frozen=True, eq=False)
class CellScores:
    """``forward(batch (B, C, H, W)) -> (B, T + K)`` float32: optional tile score(s), then cells.

    Build it with :func:`cell_scores`. Column ``T + k`` is cell ``k + 1``'s expected class area
    over its score region (units of ``base.units``); the first ``T`` columns are the scores in
    ``extra`` (e.g. the tile's own score), computed from the same model call.
    """

    base: Score
    regions: torch.Tensor  # (H, W) int64 labels 0..K
    num_cells: int
    extra: tuple[Score, ...] = ()
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_targets(self) -> int:
        return len(self.extra) + self.num_cells

    @property
    def model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.base.model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.from_logits(self.base.model(batch))

    def _pixels(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._cache:
            flat = self.regions.flatten()
            pix = torch.nonzero(flat > 0).flatten()
            self._cache[key] = (pix.to(device), (flat[pix] - 1).to(device))
        return self._cache[key]

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores of logits the model already returned, ``(B, K, H, W) -> (B, T + K)``."""
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(f"cell scores need (B, K, H, W) logits, got {got}")
        if tuple(logits.shape[-2:]) != tuple(self.regions.shape):
            raise ValueError(
                f"cell score regions are {tuple(self.regions.shape)} but the model output is "
                f"{tuple(logits.shape[-2:])}; find the cells on the model input's grid"
            )
        parts = [s.from_logits(logits)[:, None] for s in self.extra]
        if self.num_cells:
            maps = _class_maps(logits, self.base)  # (B, H, W) float32
            pix, lab = self._pixels(maps.device)
            values = maps.flatten(1)[:, pix].double()
            sums = torch.zeros(
                maps.shape[0], self.num_cells, dtype=torch.float64, device=maps.device
            )
            sums.index_add_(1, lab, values)
            parts.append((sums * self.base.scale).float())
        if not parts:
            return torch.zeros(logits.shape[0], 0, device=logits.device)
        return torch.cat(parts, dim=1)


def _class_maps(logits: torch.Tensor, score: Score) -> torch.Tensor:
    """``(B, H, W)`` float32 probability of ``score``'s class(es), as :class:`Score` computes it."""
    if max(score.class_index) >= logits.shape[1]:
        raise ValueError(
            f"score class channel(s) {list(score.class_index)} but the model returned "
            f"{logits.shape[1]} channels"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        out = logits.float()
        probs = torch.softmax(out, dim=1) if score.activation == "softmax" else torch.sigmoid(out)
        index = list(score.class_index)
        return probs[:, index[0]] if len(index) == 1 else probs[:, index].sum(dim=1)


def cell_scores(
    model: Callable[[torch.Tensor], torch.Tensor],
    regions,
    *,
    class_index=1,
    mpp: float | None = None,
    activation: str | None = None,
    extra: tuple[Score, ...] | list[Score] = (),
) -> CellScores:
    """The vector score of the cells of one image: each cell's expected class area.

    Parameters
    ----------
    model : callable
        ``(B, C, H, W) -> (B, K, H, W)`` logits (a :class:`wsi_hipe.models.SegmentationModel`).
    regions : (H, W) int ndarray
        Score regions, 1..K (:func:`score_regions`).
    class_index : int, str or sequence
        The class(es) whose probability is summed; a name must be one of the model's
        ``meta.class_names`` (the error lists them).
    mpp : float, optional
        µm per pixel: scores in µm² instead of px².
    extra : sequence of Score
        Scores of the same model put first (e.g. the tile's own score, so the tile map and every
        cell's map come from one HiPe run).

    Returns
    -------
    CellScores
    """
    base = class_area(model, class_index=class_index, mpp=mpp, activation=activation)
    if isinstance(regions, torch.Tensor):
        regions = regions.detach().cpu().numpy()
    regions = np.asarray(regions)
    if regions.ndim != 2 or not np.issubdtype(regions.dtype, np.integer):
        raise ValueError(f"regions must be an (H, W) integer label image, got {regions.dtype} "
                         f"{regions.shape}")  # fmt: skip
    if regions.size and regions.min() < 0:
        raise ValueError("regions must hold labels >= 0")
    k = int(regions.max()) if regions.size else 0
    for s in extra:
        if s.model is not model:
            raise ValueError("extra scores must be built on the same model")
    return CellScores(
        base=base,
        regions=torch.as_tensor(regions.astype(np.int64)),
        num_cells=k,
        extra=tuple(extra),
    )


# --- summaries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaliencySummary:
    """Per-cell sums of saliency (see :func:`summarize`); each a (n,) float64 ndarray."""

    total: np.ndarray
    inside: np.ndarray
    ring: np.ndarray
    beyond: np.ndarray

    @property
    def context_share(self) -> np.ndarray:
        """``(total − inside) / total``; NaN where ``total == 0``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            share = (self.total - self.inside) / self.total
        return np.where(self.total > 0, np.clip(share, 0.0, 1.0), np.nan)

    @classmethod
    def zeros(cls, n: int) -> SaliencySummary:
        z = np.zeros(n)
        return cls(z, z.copy(), z.copy(), z.copy())

    def take(self, index) -> SaliencySummary:
        return replace(
            self,
            total=self.total[index],
            inside=self.inside[index],
            ring=self.ring[index],
            beyond=self.beyond[index],
        )


def _disk(radius: float) -> np.ndarray:
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= radius * radius


def summarize(saliency, cells: Cells, *, ring: float) -> SaliencySummary:
    """Per-cell saliency inside the cell, in a ring around it and beyond.

    Parameters
    ----------
    saliency : (n, H, W) float array or tensor
        Map ``k`` belongs to cell ``k + 1`` of ``cells`` (HiPe's vector result).
    cells : Cells
        ``n`` instances on the same (H, W) grid.
    ring : float
        Ring width, px: pixels at Euclidean distance ``0 < d ≤ ring`` from the cell's mask.

    Returns
    -------
    SaliencySummary
        ``total``, ``inside``, ``ring``, ``beyond`` per cell (``beyond = total − inside − ring``,
        clipped at 0 against rounding) and ``context_share``.

    Notes
    -----
    Vectorised over cells: ``inside`` is one gather over the label image; ``ring`` one dilation
    of all cells' masks stacked in windows of a common size around their boxes.
    """
    from scipy import ndimage

    if isinstance(saliency, torch.Tensor):
        saliency = saliency.detach().float().cpu().numpy()
    sal = np.asarray(saliency, dtype=np.float64)
    n = cells.n
    if sal.ndim == 2 and n == 1:
        sal = sal[None]
    if sal.shape != (n, *cells.shape):
        raise ValueError(
            f"saliency must be ({n}, {cells.shape[0]}, {cells.shape[1]}) for {n} cells, "
            f"got {sal.shape}"
        )
    if not (isinstance(ring, (int, float, np.number)) and math.isfinite(ring) and ring >= 0):
        raise ValueError(f"ring must be a number >= 0 (px), got {ring!r}")
    if n == 0:
        return SaliencySummary.zeros(0)
    total = sal.reshape(n, -1).sum(axis=1)
    ys, xs = np.nonzero(cells.labels)
    owner = cells.labels[ys, xs] - 1
    inside = np.bincount(owner, weights=sal[owner, ys, xs], minlength=n)

    r = int(math.floor(ring))
    height, width = cells.shape
    y0 = np.maximum(cells.bbox[:, 0] - r, 0)
    x0 = np.maximum(cells.bbox[:, 1] - r, 0)
    y1 = np.minimum(cells.bbox[:, 2] + r, height)
    x1 = np.minimum(cells.bbox[:, 3] + r, width)
    hh, ww = int((y1 - y0).max()), int((x1 - x0).max())
    yy = y0[:, None] + np.arange(hh)[None, :]  # (n, hh)
    xx = x0[:, None] + np.arange(ww)[None, :]  # (n, ww)
    valid = (yy < y1[:, None])[:, :, None] & (xx < x1[:, None])[:, None, :]
    yc, xc = np.minimum(yy, height - 1), np.minimum(xx, width - 1)
    own_labels = cells.labels[yc[:, :, None], xc[:, None, :]]  # (n, hh, ww)
    own = (own_labels == (np.arange(n) + 1)[:, None, None]) & valid
    if r > 0 or ring > 0:
        grown = ndimage.binary_dilation(own, structure=_disk(ring)[None])
    else:
        grown = own
    band = grown & ~own & valid
    crops = sal[np.arange(n)[:, None, None], yc[:, :, None], xc[:, None, :]]
    ring_sum = (crops * band).reshape(n, -1).sum(axis=1)
    beyond = np.maximum(total - inside - ring_sum, 0.0)
    return SaliencySummary(total=total, inside=inside, ring=ring_sum, beyond=beyond)


# --- outlines ---------------------------------------------------------------------------------


def outline(mask) -> list[np.ndarray]:
    """The outline of a bool mask along pixel edges, as closed rings of (y, x) vertices.

    Pixel ``(i, j)`` is the square ``[i, i+1) × [j, j+1)`` in *edge* coordinates (QuPath's and
    OpenSlide's convention: the origin is the top-left corner of the top-left pixel). Vertices are
    corners where the outline turns (collinear points removed); each ring is closed (last vertex
    = first). Exterior rings run counter-clockwise in (x, y) — positive shoelace area, the
    right-hand rule of GeoJSON (RFC 7946) — holes clockwise. A 4-connected hole-free mask (an
    instance of :func:`find_cells`) has exactly one ring. At a corner shared by two diagonal
    pixels the outline turns so that they stay apart.

    Returns
    -------
    list of (m, 2) float64 ndarray
        Exterior rings first (largest first), then holes.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if not m.any():
        return []
    p = np.pad(m, 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(starts: np.ndarray, dy: int, dx: int) -> None:
        for y, x in starts.tolist():
            edges.setdefault((y, x), []).append((y + dy, x + dx))

    inside = p[1:-1, 1:-1]
    r, c = np.nonzero(inside & ~p[:-2, 1:-1])  # top edges: left -> right
    add(np.stack([r, c], 1), 0, 1)
    r, c = np.nonzero(inside & ~p[1:-1, 2:])  # right edges: top -> bottom
    add(np.stack([r, c + 1], 1), 1, 0)
    r, c = np.nonzero(inside & ~p[2:, 1:-1])  # bottom edges: right -> left
    add(np.stack([r + 1, c + 1], 1), 0, -1)
    r, c = np.nonzero(inside & ~p[1:-1, :-2])  # left edges: bottom -> top
    add(np.stack([r + 1, c], 1), -1, 0)

    rings = []
    while edges:
        start = min(edges)
        ring = [start]
        prev_dir = None
        vertex = start
        while True:
            outs = edges[vertex]
            if len(outs) == 1 or prev_dir is None:
                nxt = outs.pop(0)
            else:  # a pinch: turn so that diagonal pixels stay apart (the interior's side)
                nxt = min(outs, key=lambda e: _turn(prev_dir, (e[0] - vertex[0], e[1] - vertex[1])))
                outs.remove(nxt)
            if not outs:
                del edges[vertex]
            prev_dir = (nxt[0] - vertex[0], nxt[1] - vertex[1])
            vertex = nxt
            if vertex == start:
                break
            ring.append(vertex)
        rings.append(_simplify(np.asarray(ring, dtype=np.float64)))
    areas = [_signed_area(ring) for ring in rings]
    order = sorted(range(len(rings)), key=lambda i: (areas[i] < 0, -abs(areas[i])))
    return [np.vstack([rings[i], rings[i][:1]]) for i in order]


def _turn(incoming: tuple[int, int], outgoing: tuple[int, int]) -> int:
    """0 for a right turn (screen, y down) and 1 for a left one: walking with the interior on the
    right (clockwise on screen), turning right keeps two diagonal pixels' outlines apart."""
    cross = incoming[1] * outgoing[0] - incoming[0] * outgoing[1]  # x_in*y_out - y_in*x_out
    return 0 if cross > 0 else 1


def _simplify(ring: np.ndarray) -> np.ndarray:
    """Drop vertices where the outline goes straight on."""
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    d1, d2 = ring - prev, nxt - ring
    straight = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) == 0
    return ring[~straight]


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area in (x, y): positive = counter-clockwise in a y-up frame."""
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


# --- one tile ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TileCells:
    """What :func:`explain_cells` returns for one tile.

    Attributes
    ----------
    cells : Cells
        The cells the tile owns, on the window's pixel grid (numbered 1..n).
    score : (n,) float64
        Each cell's own score (its expected class area over its score region), clean input.
    summary : SaliencySummary
        Per-cell saliency sums (zeros for skipped cells).
    status : (n,) str
        "done" (explained) or "skipped" (own score ≤ floor).
    tile_saliency : (H, W) float32 ndarray or None
        The tile score's map from the same run (None when the tile itself was not explained).
    forward_passes : int
        Passes of the HiPe run (0 when nothing was explained).
    found : int
        Instances in the whole window (owned or not).
    regions : (H, W) int32 ndarray
        The owned cells' score regions, numbered as ``cells`` (0 elsewhere): cell ``k``'s score
        is ``cell_scores(model, regions == k)``.
    """

    cells: Cells
    score: np.ndarray
    summary: SaliencySummary
    status: np.ndarray
    tile_saliency: np.ndarray | None
    forward_passes: int
    found: int
    regions: np.ndarray


def explain_cells(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    logits: torch.Tensor,
    segmentation,
    *,
    class_index: int | str = 1,
    core: tuple[int, int, int, int],
    mpp: float,
    floor: float = 0.0,
    tile_score: Score | None = None,
    ring_um: float = RING_UM,
    margin_um: float = MARGIN_UM,
    min_area_um2: float = MIN_AREA_UM2,
    split_depth_um: float = SPLIT_DEPTH_UM,
    hipe: dict | None = None,
    progress=None,
) -> TileCells:
    """Find a tile's cells and explain all of them (and the tile) in one vector HiPe run.

    Parameters
    ----------
    model : callable
        ``(B, C, H, W) -> (B, K, H, W)`` logits.
    x : (C, H, W) tensor
        The tile's window (core + halo).
    logits : (1, K, H, W) tensor
        ``model(x[None])``, already computed by the caller.
    segmentation : (H, W) int ndarray
        The caller's segmentation of the window (``SegmentationModel.segment``): the cells are
        the instances of ``segmentation == class_index``.
    class_index : int
        The score class.
    core : (y0, x0, h, w)
        The core inside the window, px (the owner rule, :func:`in_core`).
    mpp : float
        µm per pixel of the window (converts the µm options).
    floor : float
        Cells whose own score is ≤ ``floor`` are skipped (module docstring).
    tile_score : Score, optional
        The tile's own score, explained as target 0 of the same run; None: only the cells.
    ring_um, margin_um, min_area_um2, split_depth_um : float
        See the module docstring.
    hipe : dict, optional
        Keyword options of :func:`wsi_hipe.hipe.hierarchical_perturbation`.
    progress : callable, optional
        HiPe's progress hook.

    Returns
    -------
    TileCells
    """
    from wsi_hipe.hipe import hierarchical_perturbation

    seg = (
        segmentation.detach().cpu().numpy()
        if isinstance(segmentation, torch.Tensor)
        else segmentation
    )
    seg = np.asarray(seg)
    base = class_area(model, class_index=class_index)
    probability = _class_maps(logits, base)[0].detach().cpu().numpy()
    found = find_cells(
        seg == base.class_index[0],
        probability,
        min_area=um_to_px(min_area_um2, mpp, power=2),
        split_depth=um_to_px(split_depth_um, mpp),
    )
    regions = score_regions(found, um_to_px(margin_um, mpp))
    owned = np.nonzero(in_core(found, core))[0]
    cells = found.select(owned)
    lut = np.zeros(found.n + 1, np.int32)
    lut[owned + 1] = np.arange(1, owned.size + 1, dtype=np.int32)
    regions = lut[regions]  # owned cells' regions, numbered as ``cells``
    scores = cell_scores(model, regions, class_index=base.class_index).from_logits(logits)[0]
    score = scores.detach().double().cpu().numpy()
    explained = score > floor
    status = np.where(explained, "done", "skipped")
    summary = SaliencySummary.zeros(cells.n)
    targets = np.nonzero(explained)[0]
    if targets.size == 0 and tile_score is None:
        return TileCells(cells, score, summary, status, None, 0, found.n, regions)
    lut = np.zeros(cells.n + 1, np.int32)
    lut[targets + 1] = np.arange(1, targets.size + 1, dtype=np.int32)
    extra = (tile_score,) if tile_score is not None else ()
    forward = cell_scores(model, lut[regions], class_index=base.class_index, extra=extra)
    result = hierarchical_perturbation(forward, x, progress=progress, **(hipe or {}))
    maps = result.saliency.detach().float().cpu().numpy().reshape(-1, *cells.shape)
    tile_map = maps[0] if tile_score is not None else None
    if targets.size:
        part = summarize(maps[len(extra) :], cells.select(targets), ring=um_to_px(ring_um, mpp))
        for name in ("total", "inside", "ring", "beyond"):
            getattr(summary, name)[targets] = getattr(part, name)
    logger.debug(
        "cells: %d found, %d owned, %d explained in %d passes",
        found.n, cells.n, targets.size, result.forward_passes,
    )  # fmt: skip
    return TileCells(
        cells, score, summary, status, tile_map, result.forward_passes, found.n, regions
    )
