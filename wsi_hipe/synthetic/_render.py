"""The virtual Hoechst slide: rendering any window of it with its ground truth.

Model (all lengths in µm, so the tissue is the same physical object at any µm/px), one module
per stage:

* ``_params`` — **slide parameters** (PSF width, photon budget, brightness of each nucleus
  class, how much tissue, ...) drawn once per seed, so different seeds give visibly different
  slides; the cell lattices; argument checks.
* ``_fields`` — **large-scale fields** (tissue shape, tumour nests vs stroma, lymphocyte
  clusters, cell density, stromal fibre direction, illumination, out-of-focus patches, folds):
  smooth value noise at absolute µm positions, on a fixed 4 µm grid interpolated bilinearly.
* ``_cells`` — **cells** on one jittered square lattice per class (lymphocyte 8 µm, tumour
  12 µm, stromal 15 µm) with a local hard-core rule and stable ids; their rasterisation (in the
  image the brightest nucleus wins, in the label image the larger lymphocyte id; lymphocytes are
  complete wherever no other lymphocyte overlaps them, which the hard-core rule keeps away from
  their centres); bright debris.
* ``_optics`` — **image formation**: autofluorescence, folds, Gaussian PSF blur, out-of-focus
  blur, illumination falloff and vignetting, dark offset, shot + read noise, clip to ``[0, 1]``.

This module composes them. A region is rendered on a canvas padded by the blur radius, so a
region equals the crop of any larger region bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wsi_hipe.synthetic._cells import draw_cells, draw_debris, lattice_cells
from wsi_hipe.synthetic._fields import (
    ARTEFACT_FIELDS,
    GRID_MARGIN_UM,
    FieldGrid,
    cluster_field,
    tissue_field,
    with_density,
)
from wsi_hipe.synthetic._optics import OOF_SIGMA_UM, blur_radius, chromatin_texture, form_image
from wsi_hipe.synthetic._params import (
    CELL_CLASSES,
    LATTICES,
    MAX_CELL_RADIUS_UM,
    SlideParams,
    check_int,
    check_mpp,
    check_seed,
    check_size,
    slide_params,
)

__all__ = ["CELL_CLASSES", "SyntheticRegion", "render_region", "render_tile"]


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


def _canvas_fields(
    seed: int,
    p: SlideParams,
    canvas: tuple[int, int, int, int],
    *,
    mpp: float,
    slide_um: tuple[float, float] | None,
    artefacts: bool,
) -> tuple[FieldGrid, dict[str, np.ndarray]]:
    """The field grid around ``canvas`` (ox, oy, cw, ch level-0 px) and the per-pixel fields
    of the canvas: ``"tissue"``, ``"illumination"`` and the artefacts present there."""
    ox, oy, cw, ch = canvas
    g = GRID_MARGIN_UM
    box_um = (ox * mpp - g, oy * mpp - g, (ox + cw) * mpp + g, (oy + ch) * mpp + g)
    grid = FieldGrid(seed, p, box_um, slide_um, artefacts)
    names = ["tissue", "illumination"]
    if artefacts:
        names += [n for n in ARTEFACT_FIELDS if grid.has_signal(n)]
    xs_um = (np.arange(ox, ox + cw) + 0.5) * mpp
    ys_um = (np.arange(oy, oy + ch) + 0.5) * mpp
    return grid, dict(zip(names, grid.pixels(names, xs_um, ys_um), strict=True))


def _draw_all_cells(
    seed: int,
    p: SlideParams,
    grid: FieldGrid,
    *,
    mpp: float,
    origin: tuple[int, int],
    shape: tuple[int, int],
    texture: np.ndarray,
    region: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """The nuclei of every lattice on a canvas of ``shape`` (ch, cw) at level-0 ``origin``.

    Returns the image (float32), the lymphocyte labels (int32), the nuclei mask and the cell
    table rows of the cells centred in ``region`` (x0, y0, x1, y1), sorted by id.
    """
    ox, oy = origin
    ch, cw = shape
    canvas_um = (ox * mpp, oy * mpp, (ox + cw) * mpp, (oy + ch) * mpp)
    m = MAX_CELL_RADIUS_UM
    cell_box = (canvas_um[0] - m, canvas_um[1] - m, canvas_um[2] + m, canvas_um[3] + m)
    image = np.zeros((ch, cw), dtype=np.float32)
    labels = np.zeros((ch, cw), dtype=np.int32)
    nuclei = np.zeros((ch, cw), dtype=bool)
    rows: list[dict] = []
    for lat in LATTICES:
        cells = lattice_cells(seed, p, lat, grid, cell_box, canvas_um)
        rows += draw_cells(
            cells,
            mpp=mpp,
            origin=origin,
            image=image,
            labels=labels,
            nuclei=nuclei,
            texture=texture,
            region=region,
        )
    rows.sort(key=lambda r: r["id"])
    return image, labels, nuclei, rows


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
    density: str | None = None,
) -> SyntheticRegion:
    """Render a window of a virtual Hoechst slide with its ground truth.

    The virtual slide is a pure function of ``(seed, mpp, slide_size, density)``: any window
    equals the crop of a larger window, bit for bit, so tiles of a slide can be rendered
    independently.

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
    density : {'sparse', 'clustered', 'dense'} or None, keyword-only
        Lymphocyte density preset (:data:`wsi_hipe.synthetic.DENSITIES`): scattered single
        lymphocytes, a few distinct clusters (~12 % of the tissue), or large confluent
        infiltrates (~45 %). None (default): the seed's own draw (bit-identical to earlier
        versions). The rest of the slide (tissue, other nuclei, optics) does not change.

    Returns
    -------
    SyntheticRegion
        ``image`` (height, width) float32 in [0, 1], ``lymphocytes`` int32 instance labels,
        ``nuclei`` and ``tissue`` bool masks, ``cells`` (those centred in the window).
    """
    x, y = check_int("x", x), check_int("y", y)
    width = check_int("width", width, minimum=1)
    height = check_int("height", height, minimum=1)
    seed, mpp = check_seed(seed), check_mpp(mpp)
    slide_um = None
    if slide_size is not None:
        sw, sh = check_size(slide_size, "slide_size")
        slide_um = (sw * mpp, sh * mpp)
    if not isinstance(artefacts, (bool, np.bool_)):
        raise ValueError(f"artefacts must be True or False, got {artefacts!r}")
    artefacts = bool(artefacts)
    p = with_density(seed, slide_params(seed), density, slide_um)

    halo = blur_radius(p.psf_sigma_um / mpp) + 1
    if artefacts:
        halo += blur_radius(OOF_SIGMA_UM / mpp)
    ox, oy = x - halo, y - halo
    cw, ch = width + 2 * halo, height + 2 * halo
    grid, fields = _canvas_fields(
        seed, p, (ox, oy, cw, ch), mpp=mpp, slide_um=slide_um, artefacts=artefacts
    )
    tissue = fields["tissue"] > p.tissue_threshold
    texture = chromatin_texture(seed, ox, oy, cw, ch, mpp)

    region = (x, y, x + width, y + height)
    image, labels, nuclei, rows = _draw_all_cells(
        seed, p, grid, mpp=mpp, origin=(ox, oy), shape=(ch, cw), texture=texture, region=region
    )
    if artefacts:
        draw_debris(seed, p, mpp=mpp, origin=(ox, oy), image=image)
    signal = form_image(
        image, seed=seed, p=p, mpp=mpp, origin=(ox, oy), fields=fields, texture=texture
    )

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
    seed = check_seed(seed)
    size = check_int("size", size, minimum=1)
    mpp = check_mpp(mpp)
    rng = np.random.default_rng([seed, 0x5EED])
    slide_seed = int(rng.integers(0, 2**31 - 1))
    p = slide_params(slide_seed)
    span_um = 40_000.0
    n_try = 24
    cand_x = rng.uniform(0.0, span_um, n_try)
    cand_y = rng.uniform(0.0, span_um, n_try)
    mode = rng.random()
    tissue = tissue_field(slide_seed, cand_x, cand_y, None) - p.tissue_threshold
    if mode < 0.5:  # lymphocyte-rich tissue
        pick = int(np.argmax(cluster_field(slide_seed, p, cand_x, cand_y) + (tissue > 0)))
    elif mode < 0.8:  # any tissue
        pick = int(np.argmax(tissue > 0))
    elif mode < 0.92:  # a tissue border
        pick = int(np.argmin(np.abs(tissue)))
    else:  # background (with the odd bit of debris)
        pick = int(np.argmin(tissue))
    cx = int(cand_x[pick] / mpp) - size // 2
    cy = int(cand_y[pick] / mpp) - size // 2
    return render_region(cx, cy, size, size, seed=slide_seed, mpp=mpp, artefacts=artefacts)
