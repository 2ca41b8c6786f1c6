"""The virtual Hoechst slide: cells, large-scale fields, image formation, region rendering.

Model (all lengths in µm, so the tissue is the same physical object at any µm/px):

* **Slide parameters** (PSF width, photon budget, brightness of each nucleus class, how much
  tissue, how many lymphocyte clusters, ...) are drawn once per seed, so different seeds give
  visibly different slides.
* **Large-scale fields** (tissue shape, tumour nests vs stroma, lymphocyte clusters, cell density,
  stromal fibre direction, illumination, out-of-focus patches) are sums of smooth value noise
  evaluated at absolute µm positions. Per-pixel fields are evaluated on a fixed 4 µm grid of the
  slide plane and interpolated bilinearly, so they cost little and never depend on the window.
* **Cells** live on one jittered square lattice per class (lymphocyte 8 µm, tumour 12 µm,
  stromal 15 µm). Each lattice site is a fixed block of the plane holding at most one nucleus
  whose centre stays inside the block; whether it is present and all its parameters come from a
  hash of (seed, class, site index). A nucleus is dropped when a neighbouring site of the same
  lattice holds a nucleus of higher random priority that overlaps it too much (a Matérn type-II
  hard-core rule, decided from the 3×3 neighbourhood only, so it is local and pure).
  Cell ids are ``class_code << 28 | (row mod 2**14) << 14 | (col mod 2**14)``: unique and stable
  within any 131 mm window (2**14 lymphocyte sites of 8 µm), below 2**30, never 0.
* **Image formation**: nuclei (where they overlap the brightest wins; in the label image the
  larger lymphocyte id wins; lymphocytes are complete wherever no other lymphocyte overlaps
  them, which the hard-core rule keeps away from their centres) + tissue autofluorescence,
  optional artefacts (bright debris, a tissue fold band, out-of-focus patches), Gaussian PSF blur,
  smooth illumination falloff with mild per-field vignetting, dark offset, then Gaussian-like
  (Irwin–Hall) shot noise + read noise from a per-pixel hash, clipped to ``[0, 1]``.

A region is rendered on a canvas padded by the blur radius, so a region equals the crop of any
larger region bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from wsi_hipe.synthetic._noise import domain, normal, smoothstep, uniform, value_noise

__all__ = ["CELL_CLASSES", "SyntheticRegion", "render_region", "render_tile"]

#: class code -> class name; code 0 is "no cell".
CELL_CLASSES = {1: "lymphocyte", 2: "tumour", 3: "stromal"}

_FIELD_STEP_UM = 4.0  # spacing of the grid on which per-pixel large-scale fields are evaluated
_MAX_CELL_RADIUS_UM = 13.0  # no nucleus reaches further than this from its centre
_TEX_FINE_UM = 0.35  # chromatin texture: fine grain
_TEX_COARSE_UM = 0.9  # chromatin texture: clumps
_OOF_SIGMA_UM = 2.5  # extra blur inside out-of-focus patches
_BLUR_TRUNCATE = 3.0  # Gaussian kernels are cut at 3 sigma
_ID_BITS = 14  # bits per lattice axis in cell ids


@dataclass(frozen=True)
class _Lattice:
    name: str
    code: int
    spacing_um: float
    jitter: float  # centre offset from the site centre, as a fraction of the spacing (< 0.5)
    min_separation: float  # neighbours closer than this × (r1 + r2) are resolved by priority


_LATTICES = (
    _Lattice("lymphocyte", 1, 8.0, 0.3, 0.72),
    _Lattice("tumour", 2, 12.0, 0.3, 0.55),
    _Lattice("stromal", 3, 15.0, 0.35, 0.4),
)


@dataclass(frozen=True)
class _SlideParams:
    """Per-slide appearance, drawn from the seed."""

    psf_sigma_um: float
    photons: float  # photo-electrons at intensity 1.0
    read_noise: float
    offset: float  # dark level of the background
    autofluorescence: float
    gain: float
    lymph_brightness: float
    tumour_brightness: float
    stromal_brightness: float
    tissue_threshold: float
    nest_threshold: float
    cluster_threshold: float
    isolated_lymph_rate: float
    illumination_depth: float
    vignetting: float
    debris_rate: float
    fold_rate: float
    oof_threshold: float


@functools.lru_cache(maxsize=64)
def _slide_params(seed: int) -> _SlideParams:
    u = uniform(seed, domain("slide-params"), np.arange(32)).tolist()

    def lerp(k: int, lo: float, hi: float) -> float:
        return lo + (hi - lo) * u[k]

    return _SlideParams(
        psf_sigma_um=lerp(0, 0.35, 0.6),
        photons=lerp(1, 150.0, 900.0),
        read_noise=lerp(2, 0.002, 0.008),
        offset=lerp(3, 0.02, 0.045),
        autofluorescence=lerp(4, 0.02, 0.07),
        gain=lerp(5, 0.85, 1.1),
        lymph_brightness=lerp(6, 0.62, 0.85),
        tumour_brightness=lerp(7, 0.26, 0.42),
        stromal_brightness=lerp(8, 0.38, 0.55),
        tissue_threshold=lerp(9, 0.44, 0.52),
        nest_threshold=lerp(10, 0.45, 0.6),
        cluster_threshold=lerp(11, 0.6, 0.7),
        isolated_lymph_rate=lerp(12, 0.015, 0.06),
        illumination_depth=lerp(13, 0.08, 0.3),
        vignetting=lerp(14, 0.0, 0.12),
        debris_rate=lerp(15, 0.02, 0.1),
        fold_rate=lerp(16, 0.15, 0.5),
        oof_threshold=lerp(17, 0.71, 0.79),
    )


@dataclass(frozen=True)
class SyntheticRegion:
    """One rendered window of a virtual slide, with its ground truth.

    Attributes
    ----------
    image : (H, W) float32 ndarray
        The Hoechst stain in ``[0, 1]``; background ≈ 0.02–0.05, nuclei ≈ 0.2–1.
    lymphocytes : (H, W) int32 ndarray
        Lymphocyte instance labels, 0 = none. Ids are global: the same cell has the same id in
        every region that shows it (see the ``id`` of ``cells``).
    nuclei : (H, W) bool ndarray
        Every nucleus (lymphocytes, tumour and stromal), not debris.
    tissue : (H, W) bool ndarray
        Tissue mask.
    cells : list of dict
        The cells whose centre lies in the window (each cell belongs to exactly one window of a
        tiling): ``id`` (int), ``x``, ``y`` (float, level-0 px; pixel ``i`` has its centre at
        ``i``, so the centre pixel is ``round(x)``), ``cls`` (``"lymphocyte"``, ``"tumour"`` or
        ``"stromal"``), ``area_px`` (int, pixels of the whole nucleus, also where it is hidden
        or outside the window).
    x, y : int
        Level-0 px of the top-left pixel in the virtual slide.
    mpp : float
        µm per pixel.
    seed : int
        Seed of the virtual slide.
    """

    image: np.ndarray
    lymphocytes: np.ndarray
    nuclei: np.ndarray
    tissue: np.ndarray
    cells: list[dict] = field(default_factory=list)
    x: int = 0
    y: int = 0
    mpp: float = 0.5
    seed: int = 0


# --- validation -------------------------------------------------------------------------------


def _check_int(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_mpp(mpp) -> float:
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.floating, np.integer)):
        raise ValueError(f"mpp must be a number of µm per pixel (e.g. 0.5), got {mpp!r}")
    mpp = float(mpp)
    if not (0.05 <= mpp <= 50.0):
        raise ValueError(f"mpp must be between 0.05 and 50 µm per pixel (e.g. 0.5), got {mpp!r}")
    return mpp


def _check_size(size, name: str = "size") -> tuple[int, int]:
    """Normalise ``int`` or ``(width, height)`` to ``(width, height)``."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{name} must be an int or a (width, height) pair of ints, got {size!r}")
    w = _check_int(f"{name}[0] (width)", size[0], minimum=1)
    h = _check_int(f"{name}[1] (height)", size[1], minimum=1)
    return w, h


def _check_seed(seed) -> int:
    return _check_int("seed", seed, minimum=0)


# --- large-scale fields -----------------------------------------------------------------------


def _tissue_raw(seed: int, x_um, y_um, slide_um: tuple[float, float] | None) -> np.ndarray:
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


def _nest(seed: int, p: _SlideParams, x_um, y_um) -> np.ndarray:
    key = domain("nest")
    f = 0.7 * value_noise(seed, key, x_um, y_um, 420.0) + 0.3 * value_noise(
        seed, key + 1, x_um, y_um, 110.0
    )
    return smoothstep((f - p.nest_threshold) / 0.06 + 0.5)


def _cluster(seed: int, p: _SlideParams, x_um, y_um) -> np.ndarray:
    key = domain("lymph-cluster")
    f = 0.65 * value_noise(seed, key, x_um, y_um, 240.0) + 0.35 * value_noise(
        seed, key + 1, x_um, y_um, 70.0
    )
    return smoothstep((f - p.cluster_threshold) / 0.05 + 0.5)


def _density(seed: int, x_um, y_um) -> np.ndarray:
    return 0.7 + 0.3 * value_noise(seed, domain("density"), x_um, y_um, 160.0)


def _illumination(seed: int, p: _SlideParams, x_um, y_um) -> np.ndarray:
    smooth = 1.0 - p.illumination_depth * value_noise(
        seed, domain("illumination"), x_um, y_um, 1400.0
    )
    # Vignetting of each camera field (600 µm), as in stitched scans.
    fx = 2.0 * np.mod(np.asarray(x_um), 600.0) / 600.0 - 1.0
    fy = 2.0 * np.mod(np.asarray(y_um), 600.0) / 600.0 - 1.0
    return smooth * (1.0 - p.vignetting * 0.5 * (fx * fx + fy * fy))


def _out_of_focus(seed: int, p: _SlideParams, x_um, y_um) -> np.ndarray:
    key = domain("out-of-focus")
    f = 0.6 * value_noise(seed, key, x_um, y_um, 500.0) + 0.4 * value_noise(
        seed, key + 1, x_um, y_um, 150.0
    )
    return smoothstep((f - p.oof_threshold) / 0.04)


_FOLD_SPACING_UM = 1600.0
_FOLD_MAX_HALF_LENGTH_UM = 650.0
_FOLD_MAX_HALF_WIDTH_UM = 30.0


def _folds(seed: int, p: _SlideParams, x_um, y_um) -> np.ndarray:
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


_NODE_FIELDS = ("tissue", "cluster", "nest", "density", "fibre", "illumination")
_ARTEFACT_FIELDS = ("out_of_focus", "fold")
# How far beyond a canvas the node grid must reach: the largest nucleus, plus the lattice ring
# used by the neighbour rule, plus one node.
_GRID_MARGIN_UM = _MAX_CELL_RADIUS_UM + 2.0 * 15.0 + 2.0 * _FIELD_STEP_UM


class _FieldGrid:
    """Large-scale fields on the fixed 4 µm node grid covering a box, interpolated bilinearly.

    Node positions are multiples of 4 µm in the slide plane, so two overlapping boxes share the
    values of their common nodes exactly, and points and pixels are interpolated alike.
    """

    def __init__(
        self,
        seed: int,
        p: _SlideParams,
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
            "tissue": _tissue_raw(seed, gx, gy, slide_um),
            "cluster": _cluster(seed, p, gx, gy),
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


# --- cells ------------------------------------------------------------------------------------

_EDGE_UM = 0.45  # width of the soft rim of a nucleus


@dataclass(frozen=True)
class _Cells:
    """Nuclei of one lattice, as parallel arrays of length N."""

    lattice: _Lattice
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


# per class: (chromatin texture amplitude, central dome: how much dimmer the rim is)
_CLASS_LOOK = {1: (0.12, 0.15), 2: (0.45, 0.05), 3: (0.22, 0.1)}


def _lattice_cells(
    seed: int,
    p: _SlideParams,
    lat: _Lattice,
    fields: _FieldGrid,
    box_um: tuple[float, float, float, float],
    canvas_um: tuple[float, float, float, float],
) -> _Cells:
    """Nuclei of one lattice centred in ``box_um`` (x0, y0, x1, y1) that reach ``canvas_um``."""
    x0, y0, x1, y1 = box_um
    s = lat.spacing_um
    # Sites whose block meets the box, plus one ring for the neighbour rule.
    i0 = math.floor(x0 / s) - 1
    i1 = math.floor(x1 / s) + 1
    j0 = math.floor(y0 / s) - 1
    j1 = math.floor(y1 / s) + 1
    ii = np.arange(i0, i1 + 1, dtype=np.int64)[None, :]
    jj = np.arange(j0, j1 + 1, dtype=np.int64)[:, None]
    shape = (jj.size, ii.size)
    uu = uniform(seed, domain("cells-" + lat.name), jj[..., None], ii[..., None], np.arange(20))
    u = np.moveaxis(uu, -1, 0)  # (20, ny, nx)

    cx = (ii + 0.5 + (2.0 * u[0] - 1.0) * lat.jitter) * s
    cy = (jj + 0.5 + (2.0 * u[1] - 1.0) * lat.jitter) * s
    tissue, cl, nest, dens, fibre = fields.points(
        ("tissue", "cluster", "nest", "density", "fibre"), cx, cy
    )
    in_tissue = tissue > p.tissue_threshold
    if lat.code == 1:
        rate = 0.92 * cl + (1.0 - cl) * p.isolated_lymph_rate
    elif lat.code == 2:
        rate = 0.9 * nest * (1.0 - cl) * dens
    else:
        rate = 0.45 * (1.0 - nest) * (1.0 - cl) * dens
    present = in_tissue & (u[2] < rate)

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
    radius = 0.5 * (a + b)

    # Matérn type-II rule on the 3×3 neighbourhood: drop a nucleus if a present neighbour of
    # higher priority is closer than min_separation × (r1 + r2).
    prio = u[9]
    keep = present.copy()
    ny, nx = shape
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

    return _Cells(
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


def _draw_cells(
    c: _Cells,
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

    Every nucleus is evaluated on its own square patch of absolute pixels (vectorised over
    nuclei; a pixel's value depends only on its position and the nucleus, never on the patch),
    then scattered: the image keeps the brightest nucleus per pixel, the label image the largest
    lymphocyte id.
    """
    n = c.ident.size
    if n == 0:
        return []
    code = c.lattice.code
    tex_amp, dome = _CLASS_LOOK[code]
    reach = c.reach_um
    rpx = math.ceil(float(reach.max()) / mpp)
    size = 2 * rpx + 2
    ox, oy = origin
    hgt, wid = image.shape
    ar = np.arange(size)
    px0 = np.floor(c.cx / mpp - 0.5).astype(np.int64) - rpx
    py0 = np.floor(c.cy / mpp - 0.5).astype(np.int64) - rpx
    xs = ((px0[:, None] + ar + 0.5) * mpp - c.cx[:, None]).astype(np.float32)[:, None, :]
    ys = ((py0[:, None] + ar + 0.5) * mpp - c.cy[:, None]).astype(np.float32)[:, :, None]

    def col(v) -> np.ndarray:
        return np.asarray(v, dtype=np.float32)[:, None, None]

    ct, st = col(np.cos(c.theta)), col(np.sin(c.theta))
    un = (xs * ct + ys * st) * col(1.0 / c.a)
    vn = (ys * ct - xs * st) * col(1.0 / c.b)
    rho = np.sqrt(un * un + vn * vn)
    # Everything else only where a nucleus can be: rho below its largest boundary radius.
    cand = rho < col(1.0 + c.h2 + c.h3)
    k, r, q = np.nonzero(cand)
    un, vn, rho = un[cand], vn[cand], rho[cand]
    inv = 1.0 / np.maximum(rho, np.float32(1e-6))
    c1 = un * inv
    s1 = vn * inv

    def per(v) -> np.ndarray:
        return np.asarray(v, dtype=np.float32)[k]

    boundary = (
        1.0
        + per(c.h2) * ((c1 * c1 - s1 * s1) * per(np.cos(c.p2)) - 2.0 * c1 * s1 * per(np.sin(c.p2)))
        + per(c.h3)
        * (
            c1 * (4.0 * c1 * c1 - 3.0) * per(np.cos(c.p3))
            - s1 * (3.0 - 4.0 * s1 * s1) * per(np.sin(c.p3))
        )
    )
    inside = rho < boundary
    area = np.bincount(k[inside], minlength=n)

    # table rows: cells whose centre pixel lies in the region (pixel i has its centre at i)
    rx0, ry0, rx1, ry1 = region
    fx = np.floor(c.cx / mpp)
    fy = np.floor(c.cy / mpp)
    mine = np.nonzero((fx >= rx0) & (fx < rx1) & (fy >= ry0) & (fy < ry1))[0]
    cls = CELL_CLASSES[code]
    rows = [
        {
            "id": int(c.ident[j]),
            "x": float(c.cx[j] / mpp - 0.5),
            "y": float(c.cy[j] / mpp - 0.5),
            "cls": cls,
            "area_px": int(area[j]),
        }
        for j in mine.tolist()
    ]

    gx = px0[k] + q - ox  # canvas column and row of each candidate pixel
    gy = py0[k] + r - oy
    valid = inside & (gx >= 0) & (gx < wid) & (gy >= 0) & (gy < hgt)
    k, gx, gy = k[valid], gx[valid], gy[valid]
    un, vn, rho, boundary = un[valid], vn[valid], rho[valid], boundary[valid]
    prof = np.clip((boundary - rho) * (per(c.b) / _EDGE_UM), 0.0, 1.0)
    prof *= 1.0 - dome * np.minimum(rho, 1.0) ** 2
    prof *= 1.0 + tex_amp * texture[gy, gx]
    if code == 2:  # one or two nucleoli: darker spots in the inner half of tumour nuclei
        e = c.extra
        for m in range(2):
            on = (m == 0) | (e[:, 6] < 0.5)
            ang = 2.0 * np.pi * e[:, 3 * m]
            rr = 0.45 * np.sqrt(e[:, 3 * m + 1])
            rad = (0.6 + 0.5 * e[:, 3 * m + 2]) / c.b
            d2 = (un - per(rr * np.cos(ang) * c.b / c.a)) ** 2 + (vn - per(rr * np.sin(ang))) ** 2
            prof *= 1.0 - per(0.55 * on) * np.exp(-d2 / per(2.0 * rad * rad))
    prof *= per(c.bright)

    flat = gy * wid + gx
    np.maximum.at(image.reshape(-1), flat, prof.astype(np.float32))
    nuclei.reshape(-1)[flat] = True
    if code == 1:
        np.maximum.at(labels.reshape(-1), flat, c.ident.astype(np.int32)[k])
    return rows


_DEBRIS_SPACING_UM = 60.0


def _pixel_range(c: float, r: float, mpp: float) -> tuple[int, int]:
    """Pixels (half-open) whose centres lie within ``r`` µm of ``c`` µm along one axis."""
    return math.ceil((c - r) / mpp - 0.5), math.floor((c + r) / mpp - 0.5) + 1


def _draw_debris(
    seed: int,
    p: _SlideParams,
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


# --- image formation ---------------------------------------------------------------------------


def _blur_radius(sigma_px: float) -> int:
    return int(_BLUR_TRUNCATE * sigma_px + 0.5)


def _gaussian(img: np.ndarray, sigma_px: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma_px, radius=_blur_radius(sigma_px), mode="nearest")


def _texture(seed: int, x0: int, y0: int, width: int, height: int, mpp: float) -> np.ndarray:
    """Zero-mean chromatin texture (≈ unit std) on pixels [x0, x0+width) × [y0, y0+height)."""
    fine = _TEX_FINE_UM / mpp
    coarse = _TEX_COARSE_UM / mpp
    pad = _blur_radius(coarse)
    ix = np.arange(x0 - pad, x0 + width + pad, dtype=np.int64)[None, :]
    iy = np.arange(y0 - pad, y0 + height + pad, dtype=np.int64)[:, None]
    white = normal(seed, domain("texture"), iy, ix, dtype=np.float32)
    crop = (slice(pad, pad + height), slice(pad, pad + width))
    f = _gaussian(white, fine)[crop] * _noise_gain(fine)
    g = _gaussian(white, coarse)[crop] * _noise_gain(coarse)
    return (0.4 * f + 0.9 * g).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _noise_gain(sigma_px: float) -> float:
    """1 / std of unit white noise after the 2-D Gaussian blur of ``sigma_px``."""
    r = _blur_radius(sigma_px)
    if sigma_px <= 0 or r == 0:
        return 1.0
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    k /= k.sum()
    return float(1.0 / np.sum(k * k))


def render_region(
    x: int,
    y: int,
    width: int,
    height: int,
    *,
    seed: int = 0,
    mpp: float = 0.5,
    slide_size: int | tuple[int, int] | None = None,
    artefacts: bool = True,
) -> SyntheticRegion:
    """Render a window of a virtual Hoechst slide with its ground truth.

    The virtual slide is a pure function of ``(seed, mpp, slide_size)``: any window equals the
    crop of a larger window, bit for bit, so tiles of a slide can be rendered independently.

    Parameters
    ----------
    x, y : int
        Level-0 px of the window's top-left pixel (may be negative or beyond the slide).
    width, height : int
        Window size in px (>= 1).
    seed : int, keyword-only
        Seed of the virtual slide (>= 0).
    mpp : float, keyword-only
        µm per pixel (0.05–50). Tissue and cells are defined in µm, so a slide rendered at
        0.25 µm/px shows the same cells as at 0.5 µm/px, twice as large.
    slide_size : int or (width, height) or None, keyword-only
        Level-0 size in px of the slide this window belongs to; the tissue section is kept
        inside it (tissue fades out towards its borders). ``None``: an endless tissue plane.
    artefacts : bool, keyword-only
        Add bright debris, tissue folds and out-of-focus patches.

    Returns
    -------
    SyntheticRegion
        ``image`` (height, width) float32 in [0, 1], ``lymphocytes`` int32 instance labels,
        ``nuclei`` and ``tissue`` bool masks, ``cells`` (those centred in the window).
    """
    x = _check_int("x", x)
    y = _check_int("y", y)
    width = _check_int("width", width, minimum=1)
    height = _check_int("height", height, minimum=1)
    seed = _check_seed(seed)
    mpp = _check_mpp(mpp)
    slide_um = None
    if slide_size is not None:
        sw, sh = _check_size(slide_size, "slide_size")
        slide_um = (sw * mpp, sh * mpp)
    if not isinstance(artefacts, (bool, np.bool_)):
        raise ValueError(f"artefacts must be True or False, got {artefacts!r}")
    p = _slide_params(seed)

    psf_px = p.psf_sigma_um / mpp
    oof_px = _OOF_SIGMA_UM / mpp
    halo = _blur_radius(psf_px) + (_blur_radius(oof_px) if artefacts else 0) + 1
    ox, oy = x - halo, y - halo
    cw, ch = width + 2 * halo, height + 2 * halo
    xs_um = (np.arange(ox, ox + cw) + 0.5) * mpp
    ys_um = (np.arange(oy, oy + ch) + 0.5) * mpp
    canvas_um = (ox * mpp, oy * mpp, (ox + cw) * mpp, (oy + ch) * mpp)
    m = _MAX_CELL_RADIUS_UM
    cell_box = (canvas_um[0] - m, canvas_um[1] - m, canvas_um[2] + m, canvas_um[3] + m)
    g = _GRID_MARGIN_UM
    grid = _FieldGrid(
        seed,
        p,
        (canvas_um[0] - g, canvas_um[1] - g, canvas_um[2] + g, canvas_um[3] + g),
        slide_um,
        bool(artefacts),
    )
    names = ["tissue", "illumination"]
    if artefacts:
        names += [n for n in _ARTEFACT_FIELDS if grid.has_signal(n)]
    fields = dict(zip(names, grid.pixels(names, xs_um, ys_um), strict=True))
    tissue_raw = fields["tissue"]
    tissue = tissue_raw > p.tissue_threshold
    tissue_soft = smoothstep((tissue_raw - p.tissue_threshold) / 0.02 + 0.5).astype(np.float32)
    texture = _texture(seed, ox, oy, cw, ch, mpp)

    image = np.zeros((ch, cw), dtype=np.float32)
    labels = np.zeros((ch, cw), dtype=np.int32)
    nuclei = np.zeros((ch, cw), dtype=bool)
    rows: list[dict] = []
    for lat in _LATTICES:
        cells = _lattice_cells(seed, p, lat, grid, cell_box, canvas_um)
        rows += _draw_cells(
            cells,
            mpp=mpp,
            origin=(ox, oy),
            image=image,
            labels=labels,
            nuclei=nuclei,
            texture=texture,
            region=(x, y, x + width, y + height),
        )
    rows.sort(key=lambda r: r["id"])
    if artefacts:
        _draw_debris(seed, p, mpp=mpp, origin=(ox, oy), image=image)

    # Tissue autofluorescence (cytoplasm, matrix), faintly textured.
    image += p.autofluorescence * tissue_soft * (1.0 + 0.3 * texture)
    if "fold" in fields:
        fold = fields["fold"] * tissue_soft
        image *= 1.0 + 0.8 * fold
        image += 0.05 * fold
    image = _gaussian(image, psf_px)
    if "out_of_focus" in fields:
        w_oof = fields["out_of_focus"]
        image = image + w_oof * (_gaussian(image, oof_px) - image)
    signal = p.gain * image * fields["illumination"] + p.offset
    np.maximum(signal, 0.0, out=signal)
    noise = normal(
        seed,
        domain("pixel-noise"),
        np.arange(oy, oy + ch, dtype=np.int64)[:, None],
        np.arange(ox, ox + cw, dtype=np.int64)[None, :],
    )
    signal += np.sqrt(signal / p.photons + p.read_noise**2) * noise
    np.clip(signal, 0.0, 1.0, out=signal)

    crop = (slice(halo, halo + height), slice(halo, halo + width))
    return SyntheticRegion(
        image=np.ascontiguousarray(signal[crop], dtype=np.float32),
        lymphocytes=np.ascontiguousarray(labels[crop]),
        nuclei=np.ascontiguousarray(nuclei[crop]),
        tissue=np.ascontiguousarray(tissue[crop]),
        cells=rows,
        x=x,
        y=y,
        mpp=mpp,
        seed=seed,
    )


def render_tile(
    seed: int, size: int = 256, *, mpp: float = 0.5, artefacts: bool = True
) -> SyntheticRegion:
    """A random training tile: a random window of a random virtual slide.

    The slide seed and the location are drawn from ``seed``: half of the tiles are centred on
    lymphocyte-rich tissue, 30 % on any tissue, 12 % on a tissue border and 8 % on background.
    Deterministic in ``(seed, size, mpp, artefacts)``.

    Parameters
    ----------
    seed : int
        Tile seed (>= 0); different seeds give different slides and places.
    size : int
        Tile side in px (>= 1).
    mpp : float, keyword-only
        µm per pixel.
    artefacts : bool, keyword-only
        Allow debris, folds and out-of-focus patches.

    Returns
    -------
    SyntheticRegion
        As :func:`render_region`; ``x``, ``y`` and ``seed`` say which slide window it is.
    """
    seed = _check_seed(seed)
    size = _check_int("size", size, minimum=1)
    mpp = _check_mpp(mpp)
    rng = np.random.default_rng([seed, 0x5EED])
    slide_seed = int(rng.integers(0, 2**31 - 1))
    p = _slide_params(slide_seed)
    span_um = 40_000.0
    n_try = 24
    cand_x = rng.uniform(0.0, span_um, n_try)
    cand_y = rng.uniform(0.0, span_um, n_try)
    mode = rng.random()
    tissue = _tissue_raw(slide_seed, cand_x, cand_y, None) - p.tissue_threshold
    if mode < 0.5:  # lymphocyte-rich tissue
        pick = int(np.argmax(_cluster(slide_seed, p, cand_x, cand_y) + (tissue > 0)))
    elif mode < 0.8:  # any tissue
        pick = int(np.argmax(tissue > 0))
    elif mode < 0.92:  # a tissue border
        pick = int(np.argmin(np.abs(tissue)))
    else:  # background (with the odd bit of debris)
        pick = int(np.argmin(tissue))
    cx = int(cand_x[pick] / mpp) - size // 2
    cy = int(cand_y[pick] / mpp) - size // 2
    return render_region(cx, cy, size, size, seed=slide_seed, mpp=mpp, artefacts=artefacts)
