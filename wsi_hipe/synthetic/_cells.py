"""Nuclei of a virtual slide: where they are, their shapes, and how they are rasterised.

Cells live on one jittered square lattice per class (lymphocyte 8 µm, tumour 12 µm, stromal
15 µm; :data:`~wsi_hipe.synthetic._params.LATTICES`). Each lattice site is a fixed block of the
plane holding at most one nucleus whose centre stays inside the block; whether it is present and
all its parameters come from a hash of (seed, class, site index). A nucleus is dropped when a
neighbouring site of the same lattice holds a nucleus of higher random priority that overlaps it
too much (a Matérn type-II hard-core rule, decided from the 3×3 neighbourhood only, so it is
local and pure). Cell ids are ``class_code << 28 | (row mod 2**14) << 14 | (col mod 2**14)``:
unique and stable within any 131 mm window (2**14 lymphocyte sites of 8 µm), below 2**30,
never 0.

Where nuclei overlap the brightest wins in the image; in the label image the larger lymphocyte
id wins. Bright debris (dust, precipitate) is drawn here too, but is no nucleus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsi_hipe.synthetic._fields import FieldGrid
from wsi_hipe.synthetic._noise import domain, uniform
from wsi_hipe.synthetic._params import CELL_CLASSES, Lattice, SlideParams

__all__ = ["Cells", "draw_cells", "draw_debris", "lattice_cells"]

_ID_BITS = 14  # bits per lattice axis in cell ids
_EDGE_UM = 0.45  # width of the soft rim of a nucleus
# per class: (chromatin texture amplitude, central dome: how much dimmer the rim is)
_CLASS_LOOK = {1: (0.12, 0.15), 2: (0.45, 0.05), 3: (0.22, 0.1)}
_DEBRIS_SPACING_UM = 60.0


@dataclass(frozen=True)
class Cells:
    """Nuclei of one lattice, as parallel arrays of length N."""

    lattice: Lattice
    ident: np.ndarray
    cx: np.ndarray  # centre, µm
    cy: np.ndarray
    a: np.ndarray  # semi-axes, µm (a >= b)
    b: np.ndarray
    theta: np.ndarray  # orientation of a, radians
    bright: np.ndarray
    h2: np.ndarray  # boundary harmonics: r(φ) = 1 + h2 cos(2φ + p2) + h3 cos(3φ + p3)
    p2: np.ndarray
    h3: np.ndarray
    p3: np.ndarray
    extra: np.ndarray  # (N, 7) uniforms for nucleoli

    @property
    def reach_um(self) -> np.ndarray:
        return self.a * (1.0 + self.h2 + self.h3) + _EDGE_UM


# --- where the nuclei are -------------------------------------------------------------------


def _sites(
    seed: int, lat: Lattice, box_um: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Site columns ``ii`` (1, nx), rows ``jj`` (ny, 1) and their 20 uniforms ``u`` (20, ny, nx).

    The sites are those whose block meets ``box_um``, plus one ring for the neighbour rule.
    """
    x0, y0, x1, y1 = box_um
    s = lat.spacing_um
    i0 = math.floor(x0 / s) - 1
    i1 = math.floor(x1 / s) + 1
    j0 = math.floor(y0 / s) - 1
    j1 = math.floor(y1 / s) + 1
    ii = np.arange(i0, i1 + 1, dtype=np.int64)[None, :]
    jj = np.arange(j0, j1 + 1, dtype=np.int64)[:, None]
    uu = uniform(seed, domain("cells-" + lat.name), jj[..., None], ii[..., None], np.arange(20))
    return ii, jj, np.moveaxis(uu, -1, 0)


def _presence_rate(
    p: SlideParams, lat: Lattice, cl: np.ndarray, nest: np.ndarray, dens: np.ndarray
) -> np.ndarray:
    """Probability that a tissue site of ``lat`` holds a nucleus, from the local fields."""
    if lat.code == 1:
        return 0.92 * cl + (1.0 - cl) * p.isolated_lymph_rate
    if lat.code == 2:
        return 0.9 * nest * (1.0 - cl) * dens
    return 0.45 * (1.0 - nest) * (1.0 - cl) * dens


def _shapes(p: SlideParams, lat: Lattice, u: np.ndarray, fibre: np.ndarray) -> tuple:
    """``(a, b, theta, bright, h2, h3)`` of the nuclei at every site (see :class:`Cells`)."""
    if lat.code == 1:  # lymphocyte: small, round, bright, dense
        diameter = 6.0 + 2.0 * u[3]
        aspect = 1.0 + 0.15 * u[4]
        a = 0.5 * diameter * np.sqrt(aspect)
        b = 0.5 * diameter / np.sqrt(aspect)
        theta = np.pi * u[5]
        bright = p.lymph_brightness * (0.85 + 0.3 * u[6])
        h2, h3 = 0.03 * u[7], 0.03 * u[8]
    elif lat.code == 2:  # tumour: large, oval, textured, dimmer
        a = 0.5 * (10.0 + 6.0 * u[3])
        b = a * (0.58 + 0.27 * u[4])
        theta = np.pi * u[5]
        bright = p.tumour_brightness * (0.7 + 0.6 * u[6])
        h2, h3 = 0.06 * u[7], 0.05 * u[8]
    else:  # stromal: elongated spindle along the local fibre direction
        a = 0.5 * (11.0 + 9.0 * u[3])
        b = 0.5 * (2.8 + 1.8 * u[4])
        theta = 2.0 * np.pi * fibre + 0.7 * (u[5] - 0.5)
        bright = p.stromal_brightness * (0.8 + 0.4 * u[6])
        h2, h3 = 0.02 * u[7], 0.04 * u[8]
    return a, b, theta, bright, h2, h3


def _hard_core(
    lat: Lattice,
    present: np.ndarray,
    prio: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
) -> np.ndarray:
    """Matérn type-II rule on the 3×3 neighbourhood: the sites whose nucleus is kept.

    A nucleus is dropped if a present neighbour of higher priority is closer than
    ``min_separation × (r1 + r2)``; the outer ring of sites (no full neighbourhood) is dropped.
    """
    keep = present.copy()
    ny, nx = present.shape
    inner = (slice(1, ny - 1), slice(1, nx - 1))
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            nb = (slice(1 + dj, ny - 1 + dj), slice(1 + di, nx - 1 + di))
            dist = np.hypot(cx[inner] - cx[nb], cy[inner] - cy[nb])
            clash = (
                present[nb]
                & (prio[nb] > prio[inner])
                & (dist < lat.min_separation * (radius[inner] + radius[nb]))
            )
            keep[inner] &= ~clash
    keep[0, :] = keep[-1, :] = False
    keep[:, 0] = keep[:, -1] = False
    return keep


def lattice_cells(
    seed: int,
    p: SlideParams,
    lat: Lattice,
    fields: FieldGrid,
    box_um: tuple[float, float, float, float],
    canvas_um: tuple[float, float, float, float],
) -> Cells:
    """Nuclei of one lattice centred in ``box_um`` (x0, y0, x1, y1) that reach ``canvas_um``."""
    x0, y0, x1, y1 = box_um
    s = lat.spacing_um
    ii, jj, u = _sites(seed, lat, box_um)
    shape = (jj.size, ii.size)

    cx = (ii + 0.5 + (2.0 * u[0] - 1.0) * lat.jitter) * s
    cy = (jj + 0.5 + (2.0 * u[1] - 1.0) * lat.jitter) * s
    tissue, cl, nest, dens, fibre = fields.points(
        ("tissue", "cluster", "nest", "density", "fibre"), cx, cy
    )
    in_tissue = tissue > p.tissue_threshold
    present = in_tissue & (u[2] < _presence_rate(p, lat, cl, nest, dens))
    a, b, theta, bright, h2, h3 = _shapes(p, lat, u, fibre)

    keep = _hard_core(lat, present, u[9], cx, cy, 0.5 * (a + b))
    keep &= (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    # only nuclei that reach the canvas
    reach = a * (1.0 + h2 + h3) + _EDGE_UM
    c0x, c0y, c1x, c1y = canvas_um
    keep &= (cx + reach > c0x) & (cx - reach < c1x) & (cy + reach > c0y) & (cy - reach < c1y)

    sel = np.nonzero(keep)
    bits = (1 << _ID_BITS) - 1
    ident = (
        (lat.code << (2 * _ID_BITS))
        | ((np.broadcast_to(jj, shape)[sel] & bits) << _ID_BITS)
        | (np.broadcast_to(ii, shape)[sel] & bits)
    )

    def pick(arr) -> np.ndarray:
        return np.broadcast_to(arr, shape)[sel]

    return Cells(
        lattice=lat,
        ident=ident.astype(np.int64),
        cx=pick(cx),
        cy=pick(cy),
        a=pick(a),
        b=pick(b),
        theta=pick(theta),
        bright=pick(bright),
        h2=pick(h2),
        p2=pick(2.0 * np.pi * u[10]),
        h3=pick(h3),
        p3=pick(2.0 * np.pi * u[11]),
        extra=np.stack([pick(u[12 + k]) for k in range(7)], axis=1),
    )


# --- rasterising them -----------------------------------------------------------------------


def _col(v) -> np.ndarray:
    """A per-nucleus value (N,) as float32 (N, 1, 1), to broadcast over patches."""
    return np.asarray(v, dtype=np.float32)[:, None, None]


def _per(v, k: np.ndarray) -> np.ndarray:
    """A per-nucleus value (N,) as float32, at candidate pixels of nuclei ``k``."""
    return np.asarray(v, dtype=np.float32)[k]


@dataclass(frozen=True)
class _Patch:
    """Candidate pixels of all nuclei of a lattice: nucleus ``k``, row ``r``, column ``q`` in
    its patch (whose top-left pixel is ``(px0[k], py0[k])``), nucleus coordinates ``un``, ``vn``
    (in semi-axes), their radius ``rho`` and the boundary radius in that direction."""

    px0: np.ndarray
    py0: np.ndarray
    k: np.ndarray
    r: np.ndarray
    q: np.ndarray
    un: np.ndarray
    vn: np.ndarray
    rho: np.ndarray
    boundary: np.ndarray


def _patch(c: Cells, mpp: float) -> _Patch:
    """Every nucleus evaluated on its own square patch of absolute pixels (vectorised over
    nuclei; a pixel's value depends only on its position and the nucleus, never on the patch)."""
    reach = c.reach_um
    rpx = math.ceil(float(reach.max()) / mpp)
    size = 2 * rpx + 2
    ar = np.arange(size)
    px0 = np.floor(c.cx / mpp - 0.5).astype(np.int64) - rpx
    py0 = np.floor(c.cy / mpp - 0.5).astype(np.int64) - rpx
    xs = ((px0[:, None] + ar + 0.5) * mpp - c.cx[:, None]).astype(np.float32)[:, None, :]
    ys = ((py0[:, None] + ar + 0.5) * mpp - c.cy[:, None]).astype(np.float32)[:, :, None]

    ct, st = _col(np.cos(c.theta)), _col(np.sin(c.theta))
    un = (xs * ct + ys * st) * _col(1.0 / c.a)
    vn = (ys * ct - xs * st) * _col(1.0 / c.b)
    rho = np.sqrt(un * un + vn * vn)
    # Everything else only where a nucleus can be: rho below its largest boundary radius.
    cand = rho < _col(1.0 + c.h2 + c.h3)
    k, r, q = np.nonzero(cand)
    un, vn, rho = un[cand], vn[cand], rho[cand]
    inv = 1.0 / np.maximum(rho, np.float32(1e-6))
    c1 = un * inv
    s1 = vn * inv
    boundary = (
        1.0
        + _per(c.h2, k)
        * ((c1 * c1 - s1 * s1) * _per(np.cos(c.p2), k) - 2.0 * c1 * s1 * _per(np.sin(c.p2), k))
        + _per(c.h3, k)
        * (
            c1 * (4.0 * c1 * c1 - 3.0) * _per(np.cos(c.p3), k)
            - s1 * (3.0 - 4.0 * s1 * s1) * _per(np.sin(c.p3), k)
        )
    )
    return _Patch(px0, py0, k, r, q, un, vn, rho, boundary)


def _table_rows(
    c: Cells, mpp: float, region: tuple[int, int, int, int], area: np.ndarray
) -> list[dict]:
    """Rows of the cell table for the nuclei whose centre pixel lies in ``region``."""
    rx0, ry0, rx1, ry1 = region
    fx = np.floor(c.cx / mpp)  # pixel i has its centre at i
    fy = np.floor(c.cy / mpp)
    mine = np.nonzero((fx >= rx0) & (fx < rx1) & (fy >= ry0) & (fy < ry1))[0]
    cls = CELL_CLASSES[c.lattice.code]
    return [
        {
            "id": int(c.ident[j]),
            "x": float(c.cx[j] / mpp - 0.5),
            "y": float(c.cy[j] / mpp - 0.5),
            "cls": cls,
            "area_px": int(area[j]),
        }
        for j in mine.tolist()
    ]


def _brightness(
    c: Cells,
    k: np.ndarray,
    un: np.ndarray,
    vn: np.ndarray,
    rho: np.ndarray,
    boundary: np.ndarray,
    texture: np.ndarray,
) -> np.ndarray:
    """Brightness of nucleus ``k`` at its pixels inside it (soft rim, dome, chromatin texture
    ``texture`` at those pixels, nucleoli of tumour nuclei)."""
    code = c.lattice.code
    tex_amp, dome = _CLASS_LOOK[code]
    prof = np.clip((boundary - rho) * (_per(c.b, k) / _EDGE_UM), 0.0, 1.0)
    prof *= 1.0 - dome * np.minimum(rho, 1.0) ** 2
    prof *= 1.0 + tex_amp * texture
    if code == 2:  # one or two nucleoli: darker spots in the inner half of tumour nuclei
        e = c.extra
        for m in range(2):
            on = (m == 0) | (e[:, 6] < 0.5)
            ang = 2.0 * np.pi * e[:, 3 * m]
            rr = 0.45 * np.sqrt(e[:, 3 * m + 1])
            rad = (0.6 + 0.5 * e[:, 3 * m + 2]) / c.b
            d2 = (un - _per(rr * np.cos(ang) * c.b / c.a, k)) ** 2 + (
                vn - _per(rr * np.sin(ang), k)
            ) ** 2
            prof *= 1.0 - _per(0.55 * on, k) * np.exp(-d2 / _per(2.0 * rad * rad, k))
    prof *= _per(c.bright, k)
    return prof


def draw_cells(
    c: Cells,
    *,
    mpp: float,
    origin: tuple[int, int],
    image: np.ndarray,
    labels: np.ndarray,
    nuclei: np.ndarray,
    texture: np.ndarray,
    region: tuple[int, int, int, int],
) -> list[dict]:
    """Rasterise the nuclei of one lattice into the canvas; return table rows of those centred
    in ``region`` = (x0, y0, x1, y1) level-0 px.

    ``image`` (the canvas, whose top-left pixel is level-0 ``origin``) keeps the brightest
    nucleus per pixel, ``labels`` the largest lymphocyte id; ``nuclei`` marks every nucleus.
    """
    n = c.ident.size
    if n == 0:
        return []
    ox, oy = origin
    hgt, wid = image.shape
    pt = _patch(c, mpp)
    inside = pt.rho < pt.boundary
    rows = _table_rows(c, mpp, region, np.bincount(pt.k[inside], minlength=n))

    gx = pt.px0[pt.k] + pt.q - ox  # canvas column and row of each candidate pixel
    gy = pt.py0[pt.k] + pt.r - oy
    valid = inside & (gx >= 0) & (gx < wid) & (gy >= 0) & (gy < hgt)
    k, gx, gy = pt.k[valid], gx[valid], gy[valid]
    prof = _brightness(
        c,
        k,
        pt.un[valid],
        pt.vn[valid],
        pt.rho[valid],
        pt.boundary[valid],
        texture[gy, gx],
    )

    flat = gy * wid + gx
    np.maximum.at(image.reshape(-1), flat, prof.astype(np.float32))
    nuclei.reshape(-1)[flat] = True
    if c.lattice.code == 1:
        np.maximum.at(labels.reshape(-1), flat, c.ident.astype(np.int32)[k])
    return rows


# --- debris ---------------------------------------------------------------------------------


def _pixel_range(c: float, r: float, mpp: float) -> tuple[int, int]:
    """Pixels (half-open) whose centres lie within ``r`` µm of ``c`` µm along one axis."""
    return math.ceil((c - r) / mpp - 0.5), math.floor((c + r) / mpp - 0.5) + 1


def draw_debris(
    seed: int,
    p: SlideParams,
    *,
    mpp: float,
    origin: tuple[int, int],
    image: np.ndarray,
) -> None:
    """Bright irregular specks (dust, precipitate): clusters of 2–4 tiny blobs, not nuclei."""
    ox, oy = origin
    hgt, wid = image.shape
    s = _DEBRIS_SPACING_UM
    reach = 4.0
    x0_um, y0_um = ox * mpp - reach, oy * mpp - reach
    x1_um, y1_um = (ox + wid) * mpp + reach, (oy + hgt) * mpp + reach
    ii = np.arange(math.floor(x0_um / s), math.floor(x1_um / s) + 1)[None, :]
    jj = np.arange(math.floor(y0_um / s), math.floor(y1_um / s) + 1)[:, None]
    key = domain("debris")
    present = uniform(seed, key, 0, jj, ii) < p.debris_rate
    for j, i in zip(*np.nonzero(present), strict=True):
        gi, gj = int(ii[0, i]), int(jj[j, 0])
        u = uniform(seed, key, 1, gj, gi, np.arange(16))
        cx0 = (gi + 0.1 + 0.8 * u[0]) * s
        cy0 = (gj + 0.1 + 0.8 * u[1]) * s
        level = 1.3 + 1.2 * u[2]
        for m in range(2 + int(u[3] * 3)):
            bx = cx0 + 2.4 * (u[4 + 3 * m] - 0.5)
            by = cy0 + 2.4 * (u[5 + 3 * m] - 0.5)
            br = 0.35 + 0.9 * u[6 + 3 * m]
            px0, px1 = _pixel_range(bx, br + 0.5, mpp)
            py0, py1 = _pixel_range(by, br + 0.5, mpp)
            sx0, sy0 = max(px0 - ox, 0), max(py0 - oy, 0)
            sx1, sy1 = min(px1 - ox, wid), min(py1 - oy, hgt)
            if sx0 >= sx1 or sy0 >= sy1:
                continue
            xs = (np.arange(sx0 + ox, sx1 + ox) + 0.5) * mpp - bx
            ys = ((np.arange(sy0 + oy, sy1 + oy) + 0.5) * mpp - by)[:, None]
            d = np.hypot(xs, ys)
            blob = (level * np.clip((br - d) / 0.3 + 0.5, 0.0, 1.0)).astype(np.float32)
            csl = (slice(sy0, sy1), slice(sx0, sx1))
            np.maximum(image[csl], blob, out=image[csl])
