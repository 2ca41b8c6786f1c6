"""A virtual multiplex slide as a pyramidal OME-TIFF: Hoechst plus plausible marker channels.

What the channels hold (:data:`MARKERS`, in this order; ``channels=N`` writes the first N, and
any beyond the list are autofluorescence-only channels ``"Marker N"``):

* ``Hoechst`` — the nuclear stain of :func:`~wsi_hipe.synthetic.render_region`, sample for
  sample what :func:`~wsi_hipe.synthetic.write_slide` stores (``floor(x·max + 0.5)``);
* ``CD45`` — a membrane ring around every lymphocyte (the pan-leukocyte marker): the pixels
  within ``RING_UM`` of a lymphocyte's nucleus, brighter or dimmer per cell;
* ``PanCK`` — cytokeratin in the cytoplasm of tumour cells: a disc of ``CYTOPLASM_UM`` around
  each tumour cell's centre, without the nuclei;
* ``CD3`` — the membrane ring of about 70 % of the lymphocytes (T cells);
* ``Ki67`` — the nuclei of about 30 % of the tumour cells (proliferating).

Every marker channel also has tissue autofluorescence, a dark offset, PSF blur and shot + read
noise. The noise is a hash of (seed, channel, pixel), so like the Hoechst render any region
equals the crop of a larger one. The markers are drawn from the ground truth of the Hoechst
render (lymphocyte labels, the cell table), so they agree with it: a CD45 ring surrounds each
lymphocyte of the lymphocyte mask.

The file
--------
An OME-TIFF (tifffile's OME-XML: channel ``Name``, ``Color``, ``Fluor``; ``PhysicalSizeX/Y`` in
µm; ``SignificantBits``) with one page per channel at level 0 and the reduced levels in
SubIFDs, each level the exact 2×2 mean (rounded half up) of the level above, halving down to
one tile; tiled, zlib-compressed, 8-, 12- or 16-bit.

Memory stays bounded whatever the slide size: level 0 is rendered tile by tile into raw
scratch files (one per channel, tiles in order) beside the output; each level is then streamed
tile by tile into the TIFF from its scratch files while the next level is made from them, 2×2
tiles at a time. Scratch space on disk: about 1.25 × channels × width × height × 2 bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_hipe.errors import OutputError
from wsi_hipe.synthetic._params import check_int, check_mpp, check_seed, check_size
from wsi_hipe.synthetic._render import SyntheticRegion, render_region

__all__ = [
    "MARKERS",
    "SyntheticOmeTiff",
    "render_multiplex_region",
    "write_ome_tiff",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    """One channel of the virtual multiplex slide: name, display colour (RGB), fluorophore."""

    name: str
    color: tuple[int, int, int]
    fluor: str


#: The channels, in file order.
MARKERS: tuple[Marker, ...] = (
    Marker("Hoechst", (0, 0, 255), "Hoechst 33342"),
    Marker("CD45", (0, 255, 0), "Opal 520"),
    Marker("PanCK", (255, 0, 0), "Opal 690"),
    Marker("CD3", (255, 0, 255), "Opal 570"),
    Marker("Ki67", (255, 255, 0), "Opal 620"),
)
#: Colours of the autofluorescence-only channels beyond :data:`MARKERS`.
_EXTRA_COLORS = ((0, 255, 255), (255, 128, 0), (128, 128, 255), (255, 255, 255))

#: Width (µm) of the membrane ring outside a lymphocyte's nucleus.
RING_UM = 1.2
#: Radius (µm) of a tumour cell's cytoplasm around its centre.
CYTOPLASM_UM = 6.5
#: Radius (µm) around a tumour cell's centre whose nucleus pixels carry Ki67.
KI67_UM = 5.0
#: PSF blur (µm, Gaussian sigma) of the marker channels.
MARKER_PSF_UM = 0.35
#: Photons at full scale (shot noise) and read noise (fraction of full scale).
_PHOTONS = 400.0
_READ_NOISE = 0.004
#: Tissue autofluorescence and dark offset of the marker channels (fraction of full scale).
_AUTOFLUORESCENCE = 0.035
_DARK = 0.008
#: Bit depths offered.
BIT_DEPTHS = (8, 12, 16)


@dataclass(frozen=True)
class SyntheticOmeTiff:
    """What :func:`write_ome_tiff` wrote.

    Attributes
    ----------
    path : Path
        The OME-TIFF.
    channel_names : tuple of str
        The channels in file order (``"Hoechst"`` first).
    level_dimensions : tuple of (int, int)
        ``(width, height)`` of each level.
    mpp : float
        µm per level-0 px (``PhysicalSizeX/Y``).
    bits : int
        Significant bits of the uint8/uint16 samples.
    n_cells : dict
        Cells per class (``"lymphocyte"``, ``"tumour"``, ``"stromal"``) centred in the slide.
    """

    path: Path
    channel_names: tuple[str, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float
    bits: int
    n_cells: dict[str, int]


def channel_markers(n: int) -> tuple[Marker, ...]:
    """The first ``n`` channels (autofluorescence-only ``"Marker k"`` beyond :data:`MARKERS`)."""
    out = list(MARKERS[:n])
    for k in range(len(MARKERS), n):
        color = _EXTRA_COLORS[(k - len(MARKERS)) % len(_EXTRA_COLORS)]
        out.append(Marker(f"Marker {k}", color, "autofluorescence"))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _mix(a: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    a = a ^ (a >> np.uint64(30))
    a = a * np.uint64(0xBF58476D1CE4E5B9)
    a = a ^ (a >> np.uint64(27))
    a = a * np.uint64(0x94D049BB133111EB)
    return a ^ (a >> np.uint64(31))


def _hash_uniform(seed: int, channel: int, ys: np.ndarray, xs: np.ndarray, salt: int) -> np.ndarray:
    """Uniform (0, 1) per pixel, a pure function of (seed, channel, salt, y, x)."""
    key = np.uint64((seed * 1_000_003 + channel * 7919 + salt * 104_729) & (2**64 - 1))
    y = ys.astype(np.int64).astype(np.uint64)[:, None]
    x = xs.astype(np.int64).astype(np.uint64)[None, :]
    with np.errstate(over="ignore"):
        h = _mix(_mix(y * np.uint64(0x9E3779B97F4A7C15) ^ key) ^ x)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


def _noise(seed: int, channel: int, x: int, y: int, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal noise per pixel (Box-Muller on two hashes), float32 (h, w)."""
    ys = np.arange(y, y + shape[0])
    xs = np.arange(x, x + shape[1])
    u1 = _hash_uniform(seed, channel, ys, xs, 1)
    u2 = _hash_uniform(seed, channel, ys, xs, 2)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _cell_level(seed: int, ids: np.ndarray, channel: int, lo: float, hi: float) -> np.ndarray:
    """A brightness in [lo, hi] per cell id (a hash of seed, channel and id)."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    key = np.uint64((seed * 31 + channel * 1_000_033) & (2**64 - 1))
    with np.errstate(over="ignore"):
        h = _mix(ids * np.uint64(0x9E3779B97F4A7C15) ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return (lo + (hi - lo) * u).astype(np.float32)


def _chosen(seed: int, ids: np.ndarray, channel: int, share: float) -> np.ndarray:
    """Whether each cell id is in the ``share`` of cells that carry a marker (by hash)."""
    return _cell_level(seed + 17, ids, channel, 0.0, 1.0) < share


def _discs(
    shape: tuple[int, int], centres: np.ndarray, radius: float, values: np.ndarray
) -> np.ndarray:
    """Discs of ``radius`` px at ``centres`` (k, 2) (row, col) with ``values``; later ones win."""
    out = np.zeros(shape, dtype=np.float32)
    r = int(math.ceil(radius))
    h, w = shape
    for (cy, cx), v in zip(centres, values, strict=True):
        y0, y1 = max(0, int(math.floor(cy)) - r), min(h, int(math.floor(cy)) + r + 2)
        x0, x1 = max(0, int(math.floor(cx)) - r), min(w, int(math.floor(cx)) + r + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
        out[y0:y1, x0:x1][inside] = v
    return out


def _ring(labels: np.ndarray, ring_px: float, seed: int, channel: int, subset: float | None):
    """Membrane ring of the lymphocytes in ``labels`` (optionally a hashed subset of them)."""
    from scipy import ndimage

    ids = labels
    if subset is not None:
        unique = np.unique(labels[labels > 0])
        keep = unique[_chosen(seed, unique, channel, subset)]
        ids = np.where(np.isin(labels, keep), labels, 0)
    cells = ids > 0
    if not cells.any():
        return np.zeros(labels.shape, dtype=np.float32)
    dist, (iy, ix) = ndimage.distance_transform_edt(~cells, return_indices=True)
    ring = (dist > 0) & (dist <= ring_px)
    owner = ids[iy, ix]
    out = np.zeros(labels.shape, dtype=np.float32)
    out[ring] = _cell_level(seed, owner[ring], channel, 0.35, 0.75)
    return out


def _marker_signal(
    k: int, reg: SyntheticRegion, seed: int, mpp: float, origin: tuple[int, int]
) -> np.ndarray:
    """The specific signal (before optics) of marker channel ``k`` on ``reg``'s canvas."""
    shape = reg.image.shape
    if k in (1, 3):  # CD45: every lymphocyte; CD3: ~70 % of them
        return _ring(reg.lymphocytes, max(1.0, RING_UM / mpp), seed, k, None if k == 1 else 0.7)
    if k in (2, 4):
        tumour = [c for c in reg.cells if c["cls"] == "tumour"]
        if not tumour:
            return np.zeros(shape, dtype=np.float32)
        ids = np.array([c["id"] for c in tumour])
        centres = np.array([(c["y"] - origin[1], c["x"] - origin[0]) for c in tumour], float)
        if k == 2:  # PanCK: cytoplasm = disc without the nuclei
            levels = _cell_level(seed, ids, k, 0.25, 0.55)
            disc = _discs(shape, centres, CYTOPLASM_UM / mpp, levels)
            disc[reg.nuclei] *= 0.15
            return disc
        keep = _chosen(seed, ids, k, 0.3)  # Ki67: nuclei of ~30 % of the tumour cells
        levels = _cell_level(seed, ids[keep], k, 0.45, 0.9)
        disc = _discs(shape, centres[keep], KI67_UM / mpp, levels)
        disc[~reg.nuclei] = 0.0
        return disc
    return np.zeros(shape, dtype=np.float32)


def _optics(
    signal: np.ndarray,
    tissue: np.ndarray,
    *,
    seed: int,
    channel: int,
    mpp: float,
    origin: tuple[int, int],
) -> np.ndarray:
    """Autofluorescence, PSF blur, dark offset and shot + read noise; clipped to [0, 1]."""
    from scipy import ndimage

    base = signal + np.float32(_AUTOFLUORESCENCE) * tissue.astype(np.float32)
    blurred = ndimage.gaussian_filter(base, MARKER_PSF_UM / mpp, mode="nearest", truncate=3.0)
    mean = blurred + np.float32(_DARK)
    sd = np.sqrt(mean / np.float32(_PHOTONS) + np.float32(_READ_NOISE**2))
    out = mean + sd * _noise(seed, channel, origin[0], origin[1], mean.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _halo(mpp: float) -> int:
    """Canvas margin (px) so that every marker of the window is complete (see the constants)."""
    reach = max(CYTOPLASM_UM, RING_UM, KI67_UM) + 3.0 * MARKER_PSF_UM
    return int(math.ceil(reach / mpp)) + 2


def render_multiplex_region(
    x: int,
    y: int,
    width: int,
    height: int,
    *,
    channels: int = 3,
    seed: int = 0,
    mpp: float = 0.5,
    slide_size: int | tuple[int, int] | None = None,
    artefacts: bool = True,
    density: str | None = None,
) -> tuple[np.ndarray, SyntheticRegion]:
    """Render a window of the virtual multiplex slide (see the module docs).

    Parameters are those of :func:`~wsi_hipe.synthetic.render_region`, plus

    channels : int, keyword-only
        Number of channels (>= 1): :data:`MARKERS` in order, then autofluorescence-only ones.

    Returns
    -------
    (C, height, width) float32 ndarray in [0, 1], SyntheticRegion
        Channel 0 is the region's Hoechst ``image`` itself; the region is the Hoechst render
        with its ground truth.
    """
    n = check_int("channels", channels, minimum=1)
    x, y = check_int("x", x), check_int("y", y)
    width = check_int("width", width, minimum=1)
    height = check_int("height", height, minimum=1)
    mpp = check_mpp(mpp)
    seed = check_seed(seed)
    kw = {"seed": seed, "mpp": mpp, "slide_size": slide_size, "artefacts": artefacts}
    if density is not None:
        kw["density"] = density
    if n == 1:
        reg = render_region(x, y, width, height, **kw)
        return reg.image[None].copy(), reg
    m = _halo(mpp)
    canvas = render_region(x - m, y - m, width + 2 * m, height + 2 * m, **kw)
    crop = (slice(m, m + height), slice(m, m + width))
    out = np.empty((n, height, width), dtype=np.float32)
    out[0] = canvas.image[crop]
    origin = (x - m, y - m)
    for k in range(1, n):
        signal = _marker_signal(k, canvas, seed, mpp, origin)
        image = _optics(signal, canvas.tissue, seed=seed, channel=k, mpp=mpp, origin=origin)
        out[k] = image[crop]
    region = SyntheticRegion(
        image=np.ascontiguousarray(canvas.image[crop]),
        lymphocytes=np.ascontiguousarray(canvas.lymphocytes[crop]),
        nuclei=np.ascontiguousarray(canvas.nuclei[crop]),
        tissue=np.ascontiguousarray(canvas.tissue[crop]),
        cells=[  # the cells whose centre pixel lies in the window, as render_region keeps
            c
            for c in canvas.cells
            if x <= math.floor(c["x"] + 0.5) < x + width
            and y <= math.floor(c["y"] + 0.5) < y + height
        ],
        x=x,
        y=y,
        mpp=mpp,
        seed=seed,
    )
    return out, region


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _TileFile:
    """One channel of one level as raw tiles in row-major tile order (random tile reads)."""

    def __init__(self, path: Path, size: tuple[int, int], tile: int, dtype: np.dtype) -> None:
        self.path = path
        self.width, self.height = size
        self.tile = tile
        self.dtype = np.dtype(dtype)

    def tile_shape(self, i: int, j: int) -> tuple[int, int]:
        t = self.tile
        return min(t, self.height - i * t), min(t, self.width - j * t)

    def offset(self, i: int, j: int) -> int:
        th, _ = self.tile_shape(i, j)
        return (i * self.tile * self.width + th * j * self.tile) * self.dtype.itemsize

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)

    def read(self, fh, i: int, j: int) -> np.ndarray:
        th, tw = self.tile_shape(i, j)
        fh.seek(self.offset(i, j))
        data = np.fromfile(fh, dtype=self.dtype, count=th * tw)
        if data.size != th * tw:
            raise OutputError(f"scratch file {self.path} is short (disk full?)")
        return data.reshape(th, tw)


def _halve(block: np.ndarray) -> np.ndarray:
    """2×2 mean (rounded half up) of an integer (h, w) block; an odd last row/column repeats."""
    if block.shape[0] % 2:
        block = np.concatenate([block, block[-1:]], axis=0)
    if block.shape[1] % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    s = (
        block[0::2, 0::2].astype(np.uint32)
        + block[1::2, 0::2]
        + block[0::2, 1::2]
        + block[1::2, 1::2]
        + np.uint32(2)
    )
    return (s // np.uint32(4)).astype(block.dtype)


def _next_level(src: _TileFile, dst: _TileFile) -> None:
    """Write level ``dst`` (half of ``src``) tile by tile, from 2×2 tiles of ``src``."""
    rows, cols = src.grid
    with open(src.path, "rb") as fin, open(dst.path, "wb") as fout:
        for i in range(dst.grid[0]):
            for j in range(dst.grid[1]):
                parts = []
                for di in (0, 1):
                    if 2 * i + di >= rows:
                        continue
                    row = [
                        src.read(fin, 2 * i + di, 2 * j + dj) for dj in (0, 1) if 2 * j + dj < cols
                    ]
                    parts.append(np.concatenate(row, axis=1))
                small = _halve(np.concatenate(parts, axis=0))
                th, tw = dst.tile_shape(i, j)
                if small.shape != (th, tw):
                    raise AssertionError(
                        f"level tile {small.shape} != {(th, tw)}"
                    )  # pragma: no cover
                small.tofile(fout)


def _level_tiles(files: list[_TileFile]) -> Iterator[np.ndarray]:
    """Tiles of every channel of a level, channel-major (the order tifffile writes pages)."""
    for f in files:
        rows, cols = f.grid
        with open(f.path, "rb") as fh:
            for i in range(rows):
                for j in range(cols):
                    yield f.read(fh, i, j)


def _ome_color(rgb: tuple[int, int, int]) -> int:
    """OME ``Color``: RGBA packed in a signed int32."""
    v = (rgb[0] << 24) | (rgb[1] << 16) | (rgb[2] << 8) | 255
    return v - 2**32 if v >= 2**31 else v


def write_ome_tiff(
    path: str | os.PathLike[str],
    *,
    size: int | tuple[int, int] = 4096,
    channels: int = 3,
    seed: int = 0,
    mpp: float = 0.5,
    bits: int = 16,
    tile_size: int = 512,
    artefacts: bool = True,
    density: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticOmeTiff:
    """Write a virtual multiplex slide as a pyramidal OME-TIFF (SubIFDs), streamed tile by tile.

    Parameters
    ----------
    path : str or PathLike
        The ``.ome.tiff`` to write (its folder must exist).
    size : int or (width, height), keyword-only
        Level-0 size in px.
    channels : int, keyword-only
        Number of channels (>= 1): Hoechst, CD45, PanCK, CD3, Ki67, then ``"Marker k"``.
    seed, mpp, artefacts, density : keyword-only
        As for :func:`~wsi_hipe.synthetic.write_slide` (the Hoechst channel is that slide).
    bits : {8, 12, 16}, keyword-only
        Significant bits (uint8 for 8, uint16 otherwise; OME ``SignificantBits``).
    tile_size : int, keyword-only
        TIFF tile side (a multiple of 16).
    progress : callable, optional
        ``progress(done, total)`` after each rendered level-0 tile.

    Returns
    -------
    SyntheticOmeTiff

    Raises
    ------
    ValueError
        A bad argument (the message names it).
    OutputError
        The folder does not exist, or the file cannot be written.
    """
    import tifffile

    path = Path(path)
    width, height = check_size(size)
    n = check_int("channels", channels, minimum=1)
    seed, mpp = check_seed(seed), check_mpp(mpp)
    tile = check_int("tile_size", tile_size, minimum=16)
    if tile % 16:
        raise ValueError(f"tile_size must be a multiple of 16 (TIFF tiles), got {tile_size!r}")
    if bits not in BIT_DEPTHS:
        raise ValueError(f"bits must be one of {list(BIT_DEPTHS)}, got {bits!r}")
    if not isinstance(artefacts, (bool, np.bool_)):
        raise ValueError(f"artefacts must be True or False, got {artefacts!r}")
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name such as {path / 'slide.ome.tiff'}")
    dtype = np.dtype(np.uint8 if bits == 8 else np.uint16)
    top = float(2**bits - 1)
    markers = channel_markers(n)
    dims = [(width, height)]
    while max(dims[-1]) > tile:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    n_cells = {"lymphocyte": 0, "tumour": 0, "stromal": 0}
    render_kw = {
        "channels": n,
        "seed": seed,
        "mpp": mpp,
        "slide_size": (width, height),
        "artefacts": bool(artefacts),
        "density": density,
    }
    raw_bytes = n * width * height * dtype.itemsize * 4 // 3
    metadata = {
        "axes": "CYX",
        "Name": f"wsi-hipe synthetic multiplex slide (seed {seed})",
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
        "SignificantBits": bits,
        "Channel": {
            "Name": [m.name for m in markers],
            "Color": [_ome_color(m.color) for m in markers],
            "Fluor": [m.fluor for m in markers],
        },
    }
    options = {
        "photometric": "minisblack",
        "tile": (tile, tile),
        "compression": "zlib",
        "resolutionunit": "CENTIMETER",
        "dtype": dtype,
        "maxworkers": 1,
        "software": "wsi-hipe",
    }
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-ome-") as tmp:
            levels = [
                [_TileFile(Path(tmp) / f"l{k}c{c}.raw", dims[k], tile, dtype) for c in range(n)]
                for k in range(len(dims))
            ]
            # level 0: rendered once per tile, each channel appended to its scratch file
            total = math.ceil(width / tile) * math.ceil(height / tile)
            done = 0
            with contextlib.ExitStack() as stack:
                outs = [stack.enter_context(open(f.path, "wb")) for f in levels[0]]
                for y0 in range(0, height, tile):
                    for x0 in range(0, width, tile):
                        tw, th = min(tile, width - x0), min(tile, height - y0)
                        image, region = render_multiplex_region(x0, y0, tw, th, **render_kw)
                        for cell in region.cells:
                            n_cells[cell["cls"]] += 1
                        q = np.floor(image * top + 0.5).astype(dtype)
                        for c in range(n):
                            q[c].tofile(outs[c])
                        done += 1
                        if progress is not None:
                            progress(done, total)
            with tifffile.TiffWriter(path, bigtiff=raw_bytes > 2**31, ome=True) as tif:
                for k, files in enumerate(levels):
                    if k + 1 < len(levels):
                        for src, dst in zip(files, levels[k + 1], strict=True):
                            _next_level(src, dst)
                    w, h = dims[k]
                    res = 1e4 / (mpp * width / w)
                    extra = (
                        {"subifds": len(dims) - 1, "metadata": metadata}
                        if k == 0
                        else {"subfiletype": 1}
                    )
                    tif.write(
                        _level_tiles(files),
                        shape=(n, h, w),
                        resolution=(res, res),
                        **extra,
                        **options,
                    )
                    for f in files:
                        f.path.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise OutputError(f"could not write {path}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    logger.info(
        "%s: %d channels (%s), %dx%d px, %d levels, %d-bit",
        path,
        n,
        ", ".join(m.name for m in markers),
        width,
        height,
        len(dims),
        bits,
    )
    return SyntheticOmeTiff(
        path=path,
        channel_names=tuple(m.name for m in markers),
        level_dimensions=tuple(dims),
        mpp=mpp,
        bits=bits,
        n_cells=n_cells,
    )
