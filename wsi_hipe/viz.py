"""A PNG overview of a wsi-hipe output: saliency over the slide, and the segmentation.

The saliency panel has a colour bar in the saliency's own units, which are the explained
score's: HiPe adds up score drops, so with the default score (the expected lymphocyte area of
a tile's core, in px² at the target resolution) a pixel's value is in px² of expected
lymphocyte area, and every tile shares one colour scale (0 to the output's largest value), so
tiles can be compared. The tissue outline (the pipeline's tissue mask) is drawn on both panels.

Only a coarse pyramid level is read (the finest level whose longer side fits in ``max_size``), so
an overview of a gigapixel output costs a few megabytes of reads. matplotlib is imported inside
the functions that draw.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .omezarr import SEGMENTATION_CLASSES, SEGMENTATION_COLORS, OutputView, read_output

__all__ = ["Overview", "overview_figure", "overview_images", "overview_png", "saliency_units"]

logger = logging.getLogger(__name__)

SALIENCY_CMAP = "magma"
#: Colour of the tissue outline (visible over grey, magma and the label colours).
TISSUE_OUTLINE_COLOR = "#3fd0ff"
#: Minimum displayed panel size in screen px (tiny outputs are enlarged, nearest neighbour).
_MIN_PANEL_PX = 256


@dataclass(frozen=True)
class Overview:
    """The panels of an overview, as RGB images of one pyramid level.

    Attributes
    ----------
    saliency : (h, w, 3) float32 ndarray in [0, 1]
        The slide thumbnail in grey (black when there is no slide) with the saliency overlaid
        in ``magma``, opacity proportional to the saliency.
    segmentation : (h, w, 3) float32 ndarray in [0, 1]
        The dimmed thumbnail with lymphocytes and nuclei in their label colours.
    level : int
        The pyramid level read.
    step : int
        Stride applied to that level (> 1 only for an unfinalized output larger than max_size).
    vmax : float
        Saliency mapped to full colour and opacity.
    has_slide : bool
        Whether a slide thumbnail is under the saliency.
    tissue : (h, w) bool ndarray
        The output's tissue mask at the panels' resolution (all False when none was written).
    units : str
        What the saliency values are, e.g. ``"px² of expected lymphocyte area per pixel"``.
    """

    saliency: np.ndarray
    segmentation: np.ndarray
    level: int
    step: int
    vmax: float
    has_slide: bool
    tissue: np.ndarray | None = None
    units: str = "score units per pixel"


def saliency_units(provenance: dict[str, Any] | None) -> str:
    """The units of an output's saliency, from its provenance (the score kind and class).

    HiPe's map is a sum of score drops, so it carries the score's units at every pixel:
    ``"area"`` → px² (at the target resolution) of expected class area, ``"mean"`` → mean
    class probability, ``"logit"`` → summed class logits. Returns e.g.
    ``"px² of expected lymphocyte area per pixel"``; ``"score units per pixel"`` when the
    provenance does not say.
    """
    prov = provenance or {}
    score = (prov.get("config") or {}).get("score") or {}
    kind = score.get("kind")
    index = score.get("class", score.get("class_index"))
    names = (prov.get("model") or {}).get("class_names") or ()
    cls = (
        str(names[index])
        if isinstance(index, int) and 0 <= index < len(names)
        else (f"class {index}" if index is not None else "class")
    )
    if kind == "area":
        return f"px² of expected {cls} area per pixel"
    if kind == "mean":
        return f"mean {cls} probability per pixel"
    if kind == "logit":
        return f"{cls} logit sum per pixel"
    return "score units per pixel"


def _pick_level(view: OutputView, max_size: int) -> tuple[int, int]:
    """The finest level whose longer side is <= max_size, else the coarsest with a stride."""
    for level, array in enumerate(view.saliency):
        if max(array.shape) <= max_size:
            return level, 1
    level = view.levels - 1
    step = math.ceil(max(view.saliency[level].shape) / max_size)
    logger.warning(
        "%s has no pyramid level within %d px (finalize it first); striding level %d by %d",
        view.path,
        max_size,
        level,
        step,
    )
    return level, step


def _open_thumbnail_source(slide: Any, view: OutputView):
    """A Slide-like object with ``thumbnail`` from ``slide`` or the provenance; None if none."""
    if slide is not None and hasattr(slide, "thumbnail"):
        return slide
    target = slide if slide is not None else view.slide_path
    if target is None:
        return None
    target = Path(target)
    if not target.is_absolute() and not target.exists():
        target = (view.path.parent / target).resolve()
    if not target.exists():
        logger.warning("slide %s is not reachable; drawing the saliency alone", target)
        return None
    try:
        from .slide import open_slide

        return open_slide(target, **_reopen_options(view))
    except Exception as exc:  # the overview is still useful without the slide
        logger.warning("cannot open slide %s (%s); drawing the saliency alone", target, exc)
        return None


def _reopen_options(view: OutputView) -> dict[str, Any]:
    """``open_slide`` options that reopen the slide as the run read it: its µm/px, stain
    channel, reader (a forced one) and plane (of a Z-stack), from the provenance."""
    prov = view.provenance
    prov_slide = prov.get("slide") if isinstance(prov.get("slide"), dict) else {}
    config = prov.get("config") if isinstance(prov.get("config"), dict) else {}
    slide_cfg = config.get("slide") if isinstance(config.get("slide"), dict) else {}
    kwargs: dict[str, Any] = {"mpp": view.slide_mpp}
    channel = prov_slide.get("channel")
    if isinstance(channel, (int, str)) and not isinstance(channel, bool):
        kwargs["channel"] = channel
    reader = slide_cfg.get("reader")
    if isinstance(reader, str) and reader:
        kwargs["reader"] = reader
    plane = prov_slide.get("plane")
    if plane is None or (isinstance(plane, dict) and not plane):
        plane = slide_cfg.get("plane")
    if plane is not None and not (isinstance(plane, dict) and not plane):
        kwargs["plane"] = plane
    return kwargs


def _thumbnail_panel(source, view: OutputView, level: int, step: int, shape) -> np.ndarray | None:
    """The slide thumbnail resampled (nearest, pixel centres) onto the panel's pixel grid."""
    try:
        thumb = np.asarray(source.thumbnail(max(shape)), dtype=np.float32)
        if thumb.ndim != 2:
            raise ValueError(f"thumbnail must be a (h, w) stain image, got shape {thumb.shape}")
        width0 = float(source.dimensions[0])
        downsample = width0 / thumb.shape[1]
        if hasattr(source, "thumbnail_downsample"):
            downsample = float(source.thumbnail_downsample(max(shape)))
    except Exception as exc:
        logger.warning("cannot read the slide thumbnail (%s); drawing the saliency alone", exc)
        return None
    # Panel pixel r is level-`level` pixel r·step, whose centre is target px (r·step + 1/2)·2^k,
    # i.e. slide level-0 px that times s = mpp / slide_mpp.
    factor = step * 2**level * view.mpp / view.slide_mpp / downsample
    rows = np.clip(((np.arange(shape[0]) + 0.5) * factor).astype(np.int64), 0, thumb.shape[0] - 1)
    cols = np.clip(((np.arange(shape[1]) + 0.5) * factor).astype(np.int64), 0, thumb.shape[1] - 1)
    return np.clip(thumb[rows][:, cols], 0.0, 1.0)


def overview_images(
    output_path: str | os.PathLike,
    *,
    slide: Any = None,
    max_size: int = 2048,
) -> Overview:
    """Compose the overview panels of an output (no file written).

    Parameters
    ----------
    output_path : path-like
        A ``*.ome.zarr`` written by :mod:`wsi_hipe.omezarr`.
    slide : path-like or Slide, optional
        The slide for the background; default: the path in the output's provenance. When it
        cannot be opened the saliency is drawn on black.
    max_size : int
        Longer side of the panels in px; the finest pyramid level that fits is read.

    Returns
    -------
    Overview
    """
    from matplotlib import colormaps

    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer (px), got {max_size!r}")
    view = read_output(output_path)
    level, step = _pick_level(view, int(max_size))
    sal = np.asarray(view.saliency[level][::step, ::step], dtype=np.float32)
    seg = np.asarray(view.segmentation[level][::step, ::step])
    value_range = (view.provenance.get("output") or {}).get("saliency_range") or [0.0, 0.0]
    vmax = float(value_range[1]) if value_range[1] else 0.0
    if not vmax > 0:
        vmax = float(sal.max()) if sal.size else 0.0
    alpha = np.clip(sal / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(sal)

    source = _open_thumbnail_source(slide, view)
    grey = None
    if source is not None:
        grey = _thumbnail_panel(source, view, level, step, sal.shape)
    has_slide = grey is not None
    if grey is None:
        grey = np.zeros(sal.shape, np.float32)
    base = np.repeat(grey[..., None], 3, axis=-1)

    tissue = np.zeros(sal.shape, bool)
    if view.tissue:
        tissue = np.asarray(view.tissue[level][::step, ::step]) > 0

    colour = colormaps[SALIENCY_CMAP](alpha)[..., :3].astype(np.float32)
    a = alpha[..., None]
    saliency_rgb = (1.0 - a) * base + a * colour

    segmentation_rgb = 0.5 * base
    for value, rgba in SEGMENTATION_COLORS.items():
        if value == 0:
            continue
        segmentation_rgb[seg == value] = np.asarray(rgba[:3], np.float32) / 255.0
    return Overview(
        saliency=np.clip(saliency_rgb, 0, 1).astype(np.float32),
        segmentation=np.clip(segmentation_rgb, 0, 1).astype(np.float32),
        level=level,
        step=step,
        vmax=vmax,
        has_slide=has_slide,
        tissue=tissue,
        units=saliency_units(view.provenance),
    )


def overview_figure(
    output_path: str | os.PathLike,
    *,
    slide: Any = None,
    max_size: int = 2048,
    dpi: int = 100,
):
    """The overview as a matplotlib ``Figure`` (what :func:`overview_png` saves).

    Left: the saliency over the slide with the tissue outline, and a colour bar labelled in
    the saliency's units (:func:`saliency_units`); right: the segmentation with the outline.
    Parameters as :func:`overview_png`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = overview_images(output_path, slide=slide, max_size=max_size)
    height, width = panels.saliency.shape[:2]
    zoom = max(1.0, _MIN_PANEL_PX / max(height, width))
    panel_w, panel_h = width * zoom / dpi, height * zoom / dpi
    fig_w, fig_h = 2 * panel_w + 2.4, panel_h + 1.0  # inches: margins, colour bar, titles
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)

    def box(x: float, w: float) -> tuple[float, float, float, float]:
        return (x / fig_w, 0.5 / fig_h, w / fig_w, panel_h / fig_h)

    left = fig.add_axes(box(0.3, panel_w))
    colorbar_ax = fig.add_axes(box(panel_w + 0.4, 0.12))
    right = fig.add_axes(box(panel_w + 1.8, panel_w))
    left.imshow(panels.saliency, interpolation="nearest")
    where = "over the slide" if panels.has_slide else "(slide not available)"
    left.set_title(f"HiPe saliency {where} — level {panels.level}", fontsize=9)
    right.imshow(panels.segmentation, interpolation="nearest")
    right.set_title("segmentation", fontsize=9)
    outline = panels.tissue is not None and panels.tissue.any() and not panels.tissue.all()
    for ax in (left, right):
        ax.set_axis_off()
        if outline:
            ax.contour(
                panels.tissue.astype(np.float32),
                levels=[0.5],
                colors=TISSUE_OUTLINE_COLOR,
                linewidths=0.8,
            )
    handles = [
        Patch(color=np.asarray(SEGMENTATION_COLORS[v][:3]) / 255.0, label=SEGMENTATION_CLASSES[v])
        for v in sorted(SEGMENTATION_COLORS)
        if v != 0
    ]
    if outline:
        handles.append(Line2D([], [], color=TISSUE_OUTLINE_COLOR, lw=1.0, label="tissue outline"))
    right.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.7)
    mappable = ScalarMappable(norm=Normalize(0.0, panels.vmax or 1.0), cmap=SALIENCY_CMAP)
    bar = fig.colorbar(mappable, cax=colorbar_ax)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(_wrap(panels.units), fontsize=7)
    return fig


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def overview_png(
    output_path: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    slide: Any = None,
    max_size: int = 2048,
    dpi: int = 100,
) -> Path:
    """Write a PNG overview of an output: saliency over the slide, and the segmentation.

    Parameters
    ----------
    output_path : path-like
        A ``*.ome.zarr`` written by :mod:`wsi_hipe.omezarr`.
    png_path : path-like
        Where to write the PNG (parent folders are created).
    slide : path-like or Slide, optional
        See :func:`overview_images`.
    max_size : int
        Longer side of each panel in px (a coarse pyramid level is read, never a big level 0).
    dpi : int
        Resolution of the figure; panels are drawn at about one image px per screen px.

    Returns
    -------
    Path
        ``png_path``.
    """
    fig = overview_figure(output_path, slide=slide, max_size=max_size, dpi=dpi)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi, facecolor="white")
    logger.info("wrote overview %s", png_path)
    return png_path
