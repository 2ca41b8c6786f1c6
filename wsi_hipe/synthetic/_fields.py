"""Large-scale fields of a virtual slide, defined at absolute µm positions.

Tissue shape, tumour nests vs stroma, lymphocyte clusters, cell density, stromal fibre
direction, illumination, out-of-focus patches and tissue folds are sums of smooth value noise
(or, for folds, bands placed per 1.6 mm block) evaluated at absolute µm positions. Per-pixel
fields are evaluated on a fixed 4 µm grid of the slide plane (:class:`FieldGrid`) and
interpolated bilinearly, so they cost little and never depend on the window.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from wsi_hipe.synthetic._noise import domain, smoothstep, uniform, value_noise
from wsi_hipe.synthetic._params import LATTICES, MAX_CELL_RADIUS_UM, SlideParams

__all__ = [
    "ARTEFACT_FIELDS",
    "DENSITIES",
    "GRID_MARGIN_UM",
    "FieldGrid",
    "cluster_field",
    "tissue_field",
    "with_density",
]

_FIELD_STEP_UM = 4.0  # spacing of the grid on which per-pixel large-scale fields are evaluated


def tissue_field(seed: int, x_um, y_um, slide_um: tuple[float, float] | None) -> np.ndarray:
    """Tissue field at absolute µm positions; tissue where it exceeds the slide's threshold."""
    key = domain("tissue")
    t = (
        0.5 * value_noise(seed, key, x_um, y_um, 900.0)
        + 0.3 * value_noise(seed, key + 1, x_um, y_um, 260.0)
        + 0.2 * value_noise(seed, key + 2, x_um, y_um, 70.0)
    )
    if slide_um is not None:
        # Keep the tissue section inside the slide: raise the field near the middle and lower
        # it towards the edges (a rounded-square envelope relative to the slide size).
        rx = 2.0 * np.asarray(x_um) / slide_um[0] - 1.0
        ry = 2.0 * np.asarray(y_um) / slide_um[1] - 1.0
        r = (rx**4 + ry**4) ** 0.25
        t = t + 0.3 - 0.7 * r**3
    return t


def _nest(seed: int, p: SlideParams, x_um, y_um) -> np.ndarray:
    key = domain("nest")
    f = 0.7 * value_noise(seed, key, x_um, y_um, 420.0) + 0.3 * value_noise(
        seed, key + 1, x_um, y_um, 110.0
    )
    return smoothstep((f - p.nest_threshold) / 0.06 + 0.5)


def _cluster_noise(seed: int, x_um, y_um) -> np.ndarray:
    key = domain("lymph-cluster")
    return 0.65 * value_noise(seed, key, x_um, y_um, 240.0) + 0.35 * value_noise(
        seed, key + 1, x_um, y_um, 70.0
    )


def cluster_field(seed: int, p: SlideParams, x_um, y_um) -> np.ndarray:
    """Lymphocyte-cluster weight in [0, 1]: 1 inside a cluster, 0 outside."""
    f = _cluster_noise(seed, x_um, y_um)
    return smoothstep((f - p.cluster_threshold) / 0.05 + 0.5)


#: Lymphocyte density presets: ``name -> (cluster_cover, isolated_rate)``. ``cluster_cover`` is
#: the share of the slide's tissue inside lymphocyte clusters (lattice sites 92 % occupied, i.e.
#: packed, touching lymphocytes), ``isolated_rate`` the share of the other tissue's lymphocyte
#: sites holding a lone lymphocyte. ``"sparse"``: no cluster, scattered single cells;
#: ``"clustered"``: a few distinct clusters (about 12 % of the tissue) and few single cells;
#: ``"dense"``: large confluent infiltrates (about 45 % of the tissue). Without a preset each
#: seed draws its own cluster threshold and rate, and a small slide may have no cluster at all.
DENSITIES: dict[str, tuple[float, float]] = {
    "sparse": (0.0, 0.025),
    "clustered": (0.12, 0.01),
    "dense": (0.45, 0.03),
}
#: Spacing (µm) of the grid on which a preset's cluster cover is measured over the tissue.
_COVER_STEP_UM = 16.0
#: Extent (µm) of the tissue plane over which a preset is measured when there is no slide size.
_PLANE_UM = 2000.0


@functools.lru_cache(maxsize=64)
def _density_params(
    seed: int, p: SlideParams, density: str, slide_um: tuple[float, float] | None
) -> SlideParams:
    cover, isolated = DENSITIES[density]
    if cover <= 0.0:
        return dataclasses.replace(p, cluster_threshold=math.inf, isolated_lymph_rate=isolated)
    w_um, h_um = slide_um if slide_um is not None else (_PLANE_UM, _PLANE_UM)
    xs = np.arange(0.5 * _COVER_STEP_UM, w_um, _COVER_STEP_UM)[None, :]
    ys = np.arange(0.5 * _COVER_STEP_UM, h_um, _COVER_STEP_UM)[:, None]
    tissue = tissue_field(seed, xs, ys, slide_um) > p.tissue_threshold
    noise = np.broadcast_to(_cluster_noise(seed, xs, ys), tissue.shape)
    values = noise[tissue] if tissue.any() else noise.ravel()
    threshold = float(np.quantile(values, 1.0 - cover))
    return dataclasses.replace(p, cluster_threshold=threshold, isolated_lymph_rate=isolated)


def with_density(
    seed: int, p: SlideParams, density: str | None, slide_um: tuple[float, float] | None
) -> SlideParams:
    """The slide parameters ``p`` with the lymphocyte density preset ``density`` applied.

    The cluster threshold is the quantile of the slide's own cluster noise over its tissue
    (sampled every 16 µm over the slide, or over a 2 mm square of the endless plane) that
    leaves ``cluster_cover`` of the tissue in clusters, so every seed and slide size gets the
    preset's cover. A pure function of ``(seed, density, slide_um)``: tiles of one slide agree.
    ``density=None`` returns ``p`` unchanged (the seed's own draw).
    """
    if density is None:
        return p
    if density not in DENSITIES:
        raise ValueError(
            f"density must be one of {sorted(DENSITIES)} or None (the seed's own), got {density!r}"
        )
    return _density_params(seed, p, density, slide_um)


def _density(seed: int, x_um, y_um) -> np.ndarray:
    return 0.7 + 0.3 * value_noise(seed, domain("density"), x_um, y_um, 160.0)


def _illumination(seed: int, p: SlideParams, x_um, y_um) -> np.ndarray:
    smooth = 1.0 - p.illumination_depth * value_noise(
        seed, domain("illumination"), x_um, y_um, 1400.0
    )
    # Vignetting of each camera field (600 µm), as in stitched scans.
    fx = 2.0 * np.mod(np.asarray(x_um), 600.0) / 600.0 - 1.0
    fy = 2.0 * np.mod(np.asarray(y_um), 600.0) / 600.0 - 1.0
    return smooth * (1.0 - p.vignetting * 0.5 * (fx * fx + fy * fy))


def _out_of_focus(seed: int, p: SlideParams, x_um, y_um) -> np.ndarray:
    key = domain("out-of-focus")
    f = 0.6 * value_noise(seed, key, x_um, y_um, 500.0) + 0.4 * value_noise(
        seed, key + 1, x_um, y_um, 150.0
    )
    return smoothstep((f - p.oof_threshold) / 0.04)


_FOLD_SPACING_UM = 1600.0
_FOLD_MAX_HALF_LENGTH_UM = 650.0
_FOLD_MAX_HALF_WIDTH_UM = 30.0


def _folds(seed: int, p: SlideParams, x_um, y_um) -> np.ndarray:
    """Band weight in [0, 1] of tissue folds (one optional fold per 1.6 mm block)."""
    x_um = np.asarray(x_um, dtype=np.float64)
    y_um = np.asarray(y_um, dtype=np.float64)
    out = np.zeros(np.broadcast_shapes(x_um.shape, y_um.shape))
    reach = _FOLD_MAX_HALF_LENGTH_UM + _FOLD_MAX_HALF_WIDTH_UM + 10.0
    s = _FOLD_SPACING_UM
    i0 = math.floor((float(x_um.min()) - reach) / s)
    i1 = math.floor((float(x_um.max()) + reach) / s)
    j0 = math.floor((float(y_um.min()) - reach) / s)
    j1 = math.floor((float(y_um.max()) + reach) / s)
    key = domain("fold")
    for j in range(j0, j1 + 1):
        for i in range(i0, i1 + 1):
            u = uniform(seed, key, i, j, np.arange(6))
            if u[0] >= p.fold_rate:
                continue
            cx = (i + u[1]) * s
            cy = (j + u[2]) * s
            ang = np.pi * u[3]
            half_len = 150.0 + (_FOLD_MAX_HALF_LENGTH_UM - 150.0) * u[4]
            half_wid = 8.0 + (_FOLD_MAX_HALF_WIDTH_UM - 8.0) * u[5]
            dx, dy = math.cos(ang), math.sin(ang)
            along = (x_um - cx) * dx + (y_um - cy) * dy
            across = -(x_um - cx) * dy + (y_um - cy) * dx
            excess = np.maximum(np.abs(along) - half_len, 0.0)
            dist = np.sqrt(across * across + excess * excess)
            np.maximum(out, smoothstep((half_wid - dist) / 6.0 + 0.5), out=out)
    return out


ARTEFACT_FIELDS = ("out_of_focus", "fold")
#: How far beyond a canvas the node grid must reach: the largest nucleus, plus the lattice ring
#: used by the neighbour rule, plus one node.
GRID_MARGIN_UM = (
    MAX_CELL_RADIUS_UM + 2.0 * max(lat.spacing_um for lat in LATTICES) + 2.0 * _FIELD_STEP_UM
)


class FieldGrid:
    """Large-scale fields on the fixed 4 µm node grid covering a box, interpolated bilinearly.

    Node positions are multiples of 4 µm in the slide plane, so two overlapping boxes share the
    values of their common nodes exactly, and points and pixels are interpolated alike.
    """

    def __init__(
        self,
        seed: int,
        p: SlideParams,
        box_um: tuple[float, float, float, float],
        slide_um: tuple[float, float] | None,
        artefacts: bool,
    ) -> None:
        x0, y0, x1, y1 = box_um
        self.kx0 = math.floor(x0 / _FIELD_STEP_UM)
        self.ky0 = math.floor(y0 / _FIELD_STEP_UM)
        nx = math.floor(x1 / _FIELD_STEP_UM) + 2 - self.kx0
        ny = math.floor(y1 / _FIELD_STEP_UM) + 2 - self.ky0
        gx = (self.kx0 + np.arange(nx))[None, :] * _FIELD_STEP_UM
        gy = (self.ky0 + np.arange(ny))[:, None] * _FIELD_STEP_UM
        values = {
            "tissue": tissue_field(seed, gx, gy, slide_um),
            "cluster": cluster_field(seed, p, gx, gy),
            "nest": _nest(seed, p, gx, gy),
            "density": _density(seed, gx, gy),
            "fibre": value_noise(seed, domain("fibre"), gx, gy, 350.0),
            "illumination": _illumination(seed, p, gx, gy),
        }
        if artefacts:
            values["out_of_focus"] = _out_of_focus(seed, p, gx, gy)
            values["fold"] = _folds(seed, p, gx, gy)
        self.index = {name: k for k, name in enumerate(values)}
        self.stack = np.stack([np.broadcast_to(v, (ny, nx)) for v in values.values()]).astype(
            np.float32
        )

    def _axis(self, pos_um: np.ndarray, k0: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(pos_um, dtype=np.float64) / _FIELD_STEP_UM
        k = np.floor(g)
        return (k - k0).astype(np.intp), (g - k).astype(np.float32)

    def has_signal(self, name: str) -> bool:
        return name in self.index and bool(np.any(self.stack[self.index[name]] != 0))

    def pixels(self, names, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        """Fields at pixel centres ``xs_um`` (W,) × ``ys_um`` (H,): (len(names), H, W)."""
        cx, tx = self._axis(xs_um, self.kx0)
        cy, ty = self._axis(ys_um, self.ky0)
        sub = self.stack[[self.index[n] for n in names]]
        tx = tx[None, None, :]
        ty = ty[None, :, None]
        rows = sub[:, :, cx] * (1.0 - tx) + sub[:, :, cx + 1] * tx
        return rows[:, cy, :] * (1.0 - ty) + rows[:, cy + 1, :] * ty

    def points(self, names, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Fields at points (broadcast shapes S): (len(names), *S)."""
        cx, tx = self._axis(x_um, self.kx0)
        cy, ty = self._axis(y_um, self.ky0)
        sub = self.stack[[self.index[n] for n in names]]
        top = sub[:, cy, cx] * (1.0 - tx) + sub[:, cy, cx + 1] * tx
        bottom = sub[:, cy + 1, cx] * (1.0 - tx) + sub[:, cy + 1, cx + 1] * tx
        return top * (1.0 - ty) + bottom * ty
