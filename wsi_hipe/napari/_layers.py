"""napari layer data (``(data, kwargs, layer_type)`` tuples) for slides, outputs and results.

Everything is placed in micrometres: a layer's ``scale`` and ``translate`` are the world
transform of its level 0 (µm per pixel, and the world position of the centre of pixel (0, 0)).
Output levels carry their own transforms in the OME-Zarr metadata; they are read, never
recomputed. napari itself derives the placement of a multiscale layer's coarser levels from
the ratio of the level shapes; see ``docs/napari.md`` for what that means at sub-pixel scale.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.napari._lazy import channel_pyramids, slide_channels, slide_pyramid
from wsi_hipe.omezarr import ome_attrs
from wsi_hipe.tiling import PixelTransform, pixel_transform

__all__ = [
    "SALIENCY_COLORMAP",
    "output_transforms",
    "output_layer_data",
    "slide_layer_data",
    "slide_layers_data",
    "channel_layers_data",
    "result_layer_data",
    "result_transform",
    "slide_info",
    "saliency_contrast_limits",
]

logger = logging.getLogger(__name__)

#: Perceptually uniform, black at zero (so additive blending leaves the slide untouched there).
SALIENCY_COLORMAP = "inferno"

#: Upper contrast limit of the slide layer, in normalised stain units (bright nuclei ≈ 1).
SLIDE_DISPLAY_MAX = 1.5

#: Contrast limits are computed on the finest level with at most this many pixels.
_CONTRAST_MAX_PIXELS = 2048 * 2048

LayerData = tuple[Any, dict[str, Any], str]


def saliency_contrast_limits(levels: list[Any]) -> tuple[float, float]:
    """Contrast limits ``(0, max)`` from the finest level small enough to read whole."""
    chosen = levels[-1]
    for level in levels:
        if int(np.prod(level.shape)) <= _CONTRAST_MAX_PIXELS:
            chosen = level
            break
    top = float(np.nanmax(np.asarray(chosen))) if chosen.size else 0.0
    if not np.isfinite(top) or top <= 0:
        top = 1.0
    return 0.0, top


def _level_metadata(transforms: list[PixelTransform]) -> list[dict[str, list[float]]]:
    return [{"scale": list(t.scale), "translation": list(t.translation)} for t in transforms]


def output_transforms(view: Any) -> list[PixelTransform]:
    """Each level's world transform (µm) of an :class:`~wsi_hipe.omezarr.OutputView`."""
    return [view.transform(k) for k in range(view.levels)]


def _label_colormap(attrs: dict[str, Any]) -> Any:
    """A napari direct colormap from NGFF ``image-label`` colours, or None."""
    colors = (ome_attrs(attrs).get("image-label") or {}).get("colors")
    if not colors:
        return None
    from napari.utils.colormaps import DirectLabelColormap

    color_dict: dict[Any, Any] = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for item in colors:
        value = item.get("label-value")
        rgba = item.get("rgba")
        if value is None or rgba is None:
            continue
        rgba = np.asarray(rgba, dtype=float)
        if rgba.max() > 1:
            rgba = rgba / 255.0
        color_dict[int(value)] = tuple(rgba)
    return DirectLabelColormap(color_dict=color_dict)


def slide_info(layer: Any) -> dict[str, Any] | None:
    """The wsi-hipe slide description stored in a slide layer's metadata, else None."""
    meta = getattr(layer, "metadata", None) or {}
    info = meta.get("wsi_hipe")
    if isinstance(info, dict) and info.get("kind") == "slide":
        return info
    return None


def slide_layer_data(
    path: str | Path,
    *,
    mpp: float | None = None,
    channel: str | int = "auto",
    allow_brightfield: bool = False,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    reader: str = "auto",
    plane: Any = None,
) -> LayerData:
    """A lazy multiscale image layer of a slide's stain channel, placed in µm.

    Parameters
    ----------
    path : str or Path
        The slide file.
    mpp : float, optional
        µm per level-0 pixel, overriding the slide's metadata.
    channel : "auto", "mean" or int, optional
        Stain channel of an RGB(A) slide.
    allow_brightfield : bool, optional
        Accept an RGB brightfield slide (inverted) instead of raising StainError.
    name : str, optional
        Layer name (default: the file name).
    config : dict, optional
        The resolved run configuration of the output the slide belongs to; the widget runs
        with it.
    reader, plane : optional
        ``slide.reader`` and ``slide.plane`` (see :func:`wsi_hipe.slide.open_slide`).

    Returns
    -------
    (list of dask arrays, dict, "image")
    """
    pyramid = slide_pyramid(
        path,
        mpp=mpp,
        channel=channel,
        allow_brightfield=allow_brightfield,
        reader=reader,
        plane=plane,
    )
    height, width = pyramid.levels[0].shape
    info = {
        "kind": "slide",
        "path": str(Path(path)),
        "mpp": pyramid.mpp,
        "mpp_override": mpp if mpp is not None else (None if pyramid.mpp_known else 1.0),
        "mpp_known": pyramid.mpp_known,
        "channel": channel,
        "allow_brightfield": allow_brightfield,
        "reader": reader,
        "plane": plane,
        "dimensions": (int(width), int(height)),
        "config": config,
        "levels": _level_metadata(list(pyramid.transforms)),
    }
    kwargs = {
        "name": name or Path(path).name,
        "multiscale": True,
        "scale": pyramid.transforms[0].scale,
        "translate": pyramid.transforms[0].translation,
        "colormap": "gray",
        # The normalised stain runs to 1.5 (bright nuclei ≈ 1 show as light grey), which
        # leaves headroom for the additive saliency to show over the nuclei.
        "contrast_limits": (0.0, SLIDE_DISPLAY_MAX),
        "metadata": {"wsi_hipe": info},
        "units": "µm" if pyramid.mpp_known else "pixel",
    }
    return list(pyramid.levels), kwargs, "image"


#: Channel layers shown when a file has more channels than this: the nuclear stain only.
MAX_VISIBLE_CHANNELS = 5


def _channel_colormap(name: str, rgb: tuple[float, float, float]) -> Any:
    """A napari colormap from black to ``rgb`` (0..1)."""
    from napari.utils.colormaps import Colormap

    return Colormap(colors=[[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=f"wsi-hipe {name}")


def channel_layers_data(
    path: str | Path,
    *,
    channels: Any = None,
    stain: int | None = None,
    mpp: float | None = None,
    reader: str = "auto",
    plane: Any = None,
    config: dict[str, Any] | None = None,
) -> list[LayerData]:
    """One lazy multiscale image layer per channel of a multi-channel file, placed in µm.

    Parameters
    ----------
    path : str or Path
        A multi-channel OME-TIFF, QPTIFF, TIFF or OME-Zarr image.
    channels : sequence of int or str, optional
        The channels to show (default: all), in order.
    stain : int, optional
        The channel that is the slide's stain (default: the nuclear stain by name, if any);
        its layer carries the ``kind: "slide"`` metadata the explain widget runs on.
    mpp : float, optional
        µm per level-0 px, overriding the metadata.
    reader, plane : optional
        ``slide.reader`` and ``slide.plane``.
    config : dict, optional
        The resolved run configuration of the output the slide belongs to.

    Returns
    -------
    list of (list of dask arrays, dict, "image")
        Raw values, named and coloured from the metadata, blended additively; contrast
        limits from a thumbnail's percentiles. With more than :data:`MAX_VISIBLE_CHANNELS`
        channels only the stain is visible at first.
    """
    pyramids = channel_pyramids(path, channels=channels, mpp=mpp, reader=reader, plane=plane)
    stain = pyramids.stain if stain is None else int(stain)
    levels_meta = _level_metadata(list(pyramids.transforms))
    height, width = pyramids.levels[0][0].shape
    many = len(pyramids.channels) > MAX_VISIBLE_CHANNELS
    layers: list[LayerData] = []
    for c, name, rgb, limits, levels in zip(
        pyramids.channels,
        pyramids.names,
        pyramids.colors,
        pyramids.contrast,
        pyramids.levels,
        strict=True,
    ):
        is_stain = c == stain
        info: dict[str, Any] = {
            "kind": "slide" if is_stain else "slide-channel",
            "path": str(Path(path)),
            "channel": c,
            "channel_name": name,
            "mpp": pyramids.mpp,
            "mpp_override": mpp if mpp is not None else (None if pyramids.mpp_known else 1.0),
            "mpp_known": pyramids.mpp_known,
            "allow_brightfield": False,
            "reader": reader,
            "plane": plane,
            "raw_max": pyramids.raw_max,
            "dimensions": (int(width), int(height)),
            "config": config,
            "levels": levels_meta,
        }
        kwargs = {
            "name": name,
            "multiscale": True,
            "scale": pyramids.transforms[0].scale,
            "translate": pyramids.transforms[0].translation,
            "colormap": _channel_colormap(name, rgb),
            "blending": "additive",
            "contrast_limits": limits,
            "visible": is_stain or not many,
            "metadata": {"wsi_hipe": info},
            "units": "µm" if pyramids.mpp_known else "pixel",
        }
        layers.append((list(levels), kwargs, "image"))
    return layers


def slide_layers_data(
    path: str | Path,
    *,
    mpp: float | None = None,
    channel: str | int = "auto",
    allow_brightfield: bool = False,
    reader: str = "auto",
    plane: Any = None,
    channels: Any = None,
    config: dict[str, Any] | None = None,
) -> list[LayerData]:
    """The layers of a slide: one per channel of a multi-channel file, else its stain.

    A multi-channel file (several channels, not RGB) gives :func:`channel_layers_data` (all
    channels, or ``channels``), its stain chosen by ``channel``; any other slide the one stain
    layer of :func:`slide_layer_data`.
    """
    if slide_channels(path, reader=reader, plane=plane) is None:
        layer = slide_layer_data(
            path,
            mpp=mpp,
            channel=channel,
            allow_brightfield=allow_brightfield,
            reader=reader,
            plane=plane,
            config=config,
        )
        return [layer]
    from wsi_hipe.errors import StainError
    from wsi_hipe.slide import select_channel

    opened = slide_channels(path, reader=reader, plane=plane)
    stain = None
    try:
        stain = select_channel(channel, opened.channels, path=opened.path)[0]
    except StainError as exc:
        logger.info("%s: %s; no channel layer is the stain", path, exc)
    return channel_layers_data(
        path,
        channels=channels,
        stain=stain,
        mpp=mpp,
        reader=reader,
        plane=plane,
        config=config,
    )


def _used_channels(prov: dict[str, Any]) -> list[int] | None:
    """The channels a run on a multi-channel slide read (stain first, then the model's)."""
    slide = prov.get("slide") if isinstance(prov.get("slide"), dict) else {}
    if not slide.get("channel_names"):
        return None
    used: list[int] = []
    stain = slide.get("channel")
    if isinstance(stain, int) and not isinstance(stain, bool):
        used.append(stain)
    for item in slide.get("input_channels") or []:
        index = item.get("index") if isinstance(item, dict) else None
        if isinstance(index, int) and index not in used:
            used.append(index)
    return used or None


def _slide_channel(prov: dict[str, Any]) -> str | int:
    slide = prov.get("slide") if isinstance(prov.get("slide"), dict) else {}
    if slide.get("stain_mode") == "mean":
        return "mean"
    channel = slide.get("channel")
    if channel is None:
        config = prov.get("config") if isinstance(prov.get("config"), dict) else {}
        channel = (config.get("slide") or {}).get("channel", "auto")
    return "auto" if channel is None else channel


def _brightfield(prov: dict[str, Any]) -> bool:
    """Whether the run that made an output accepted its slide as (inverted) brightfield."""
    slide = prov.get("slide") if isinstance(prov.get("slide"), dict) else {}
    config = prov.get("config") if isinstance(prov.get("config"), dict) else {}
    return bool(slide.get("brightfield") or (config.get("slide") or {}).get("allow_brightfield"))


def _label_colormaps(path: Path) -> dict[str, Any]:
    """napari colormaps from the ``image-label`` colours of each label image, by name."""
    import zarr

    out: dict[str, Any] = {}
    try:
        labels = zarr.open_group(str(path / "labels"), mode="r")
        for name in ("segmentation", "tissue"):
            if name in labels:
                colormap = _label_colormap(dict(labels[name].attrs))
                if colormap is not None:
                    out[name] = colormap
    except Exception as exc:  # colours are cosmetic: fall back to napari's
        logger.debug("no label colours in %s: %s", path, exc)
    return out


def _provenance_slide_layers(path: Path, view: Any, prov: dict[str, Any]) -> list[LayerData]:
    """The slide layers of an output, from the slide path in its provenance, if reachable.

    A multi-channel slide shows the channels the run used (its stain, and ``slide.channels``
    when it fed several to the model), each as its own layer.
    """
    slide_path = view.slide_path
    if slide_path is None:
        return []
    slide_file = Path(slide_path)
    if not slide_file.is_absolute():
        slide_file = (path.parent / slide_file).resolve()
    if not slide_file.exists():
        logger.warning("slide %s (from the provenance) is not reachable; not shown", slide_file)
        return []
    config = prov.get("config") if isinstance(prov.get("config"), dict) else None
    slide_cfg = (config or {}).get("slide") or {}
    slide_prov = prov.get("slide") if isinstance(prov.get("slide"), dict) else {}
    reader = slide_cfg.get("reader") or "auto"
    plane = slide_prov.get("plane") or slide_cfg.get("plane") or None
    try:
        used = _used_channels(prov)
        if used is not None:
            return channel_layers_data(
                slide_file,
                channels=used,
                stain=used[0] if isinstance(slide_prov.get("channel"), int) else None,
                mpp=view.slide_mpp,
                reader=reader,
                plane=plane,
                config=config,
            )
        layer = slide_layer_data(
            slide_file,
            mpp=view.slide_mpp,
            channel=_slide_channel(prov),
            allow_brightfield=_brightfield(prov),
            reader=reader,
            plane=plane,
            config=config,
        )
        return [layer]
    except Exception as exc:  # the output is still worth showing without its slide
        logger.warning("cannot show the slide %s: %s", slide_file, exc)
        return []


def _saliency_limits(view: Any, prov: dict[str, Any]) -> tuple[float, float]:
    """Contrast limits of the saliency: the range finalize() stored, else computed."""
    value_range = (prov.get("output") or {}).get("saliency_range")
    if value_range and value_range[1] is not None and float(value_range[1]) > 0:
        return 0.0, float(value_range[1])
    return saliency_contrast_limits(view.saliency)


def output_layer_data(path: str | Path, *, with_slide: bool = True) -> list[LayerData]:
    """Layers of a wsi-hipe output: the slide (when reachable), saliency, segmentation, tissue.

    Parameters
    ----------
    path : str or Path
        A ``*.ome.zarr`` written by :mod:`wsi_hipe.omezarr`.
    with_slide : bool, optional
        Add the slide from the path in the provenance when that file exists.

    Returns
    -------
    list of (data, kwargs, layer_type)
        Bottom to top: slide, saliency (additive, perceptual colormap), segmentation, tissue,
        and for an output made with cells the ``cells`` labels with the table as features.
        Every layer is lazy (dask arrays per level) and placed by its level-0 transform in µm;
        ``metadata["wsi_hipe"]["levels"]`` lists every level's transform.

    Raises
    ------
    wsi_hipe.errors.OutputError
        ``path`` is not a wsi-hipe output.
    """
    from wsi_hipe.omezarr import read_output

    path = Path(path)
    view = read_output(path)
    prov = dict(view.provenance)
    transforms = output_transforms(view)
    levels_meta = _level_metadata(transforms)
    placement = {
        "multiscale": True,
        "scale": transforms[0].scale,
        "translate": transforms[0].translation,
        "units": "µm",
    }
    layers: list[LayerData] = []
    if with_slide:
        layers.extend(_provenance_slide_layers(path, view, prov))
    saliency_meta = {"kind": "saliency", "output": str(path), "levels": levels_meta,
                     "provenance": prov}  # fmt: skip
    saliency_kwargs = {"name": "saliency", **placement, "colormap": SALIENCY_COLORMAP,
                       "blending": "additive", "contrast_limits": _saliency_limits(view, prov),
                       "metadata": {"wsi_hipe": saliency_meta}}  # fmt: skip
    layers.append((list(view.saliency), saliency_kwargs, "image"))
    colormaps = _label_colormaps(path)
    for name, label_levels, extra in (
        ("segmentation", view.segmentation, {"opacity": 0.5}),
        ("tissue", view.tissue, {"opacity": 0.25, "visible": False}),
    ):
        if not label_levels:
            continue
        label_meta = {"kind": "labels", "output": str(path), "levels": levels_meta}
        kwargs: dict[str, Any] = {"name": name, **placement, **extra,
                                  "metadata": {"wsi_hipe": label_meta}}  # fmt: skip
        if name in colormaps:
            kwargs["colormap"] = colormaps[name]
        layers.append((list(label_levels), kwargs, "labels"))
    if view.cells is not None:
        layers.append(cells_layer_data(view, placement, levels_meta))
    return layers


def cell_features(view: Any) -> Any:
    """The cells table as napari Labels ``features``: one row per cell, ``index`` = its id."""
    frame = view.cells.frame().reset_index(drop=True)
    frame.insert(0, "index", frame["instance_id"].to_numpy())
    return frame


def cells_layer_data(view: Any, placement: dict[str, Any], levels_meta: list) -> LayerData:
    """``labels/cells`` as a labels layer whose ``features`` are the cells table (hovering a
    cell shows its row: score, saliency inside / ring / beyond, context share)."""
    meta = {"kind": "cells", "output": str(view.path), "levels": levels_meta,
            "info": dict(view.cells.info)}  # fmt: skip
    kwargs: dict[str, Any] = {"name": "cells", **placement, "opacity": 0.6,
                              "features": cell_features(view),
                              "metadata": {"wsi_hipe": meta}}  # fmt: skip
    return (list(view.cells.labels), kwargs, "labels")


def result_layer_data(result: Any, *, slide_mpp: float, name: str) -> list[LayerData]:
    """Layers of a region / cell explanation, placed in µm on its slide.

    Parameters
    ----------
    result : RegionResult
        From :func:`wsi_hipe.pipeline.explain_region` or ``explain_cell``.
    slide_mpp : float
        µm per level-0 pixel of the slide the result was computed on (used only when the
        result does not carry its own placement).
    name : str
        Base name of the layers.

    Returns
    -------
    list of (data, kwargs, layer_type)
        The saliency (additive, perceptual colormap), the explained cell (for
        :func:`~wsi_hipe.pipeline.explain_cell`) and the segmentation of the region (hidden).
    """
    transform = result_transform(result, slide_mpp=slide_mpp)
    saliency = np.asarray(result.saliency, dtype=np.float32)
    top = float(saliency.max()) if saliency.size else 0.0
    layers: list[LayerData] = [
        (
            saliency,
            {
                "name": f"{name} saliency",
                "scale": transform.scale,
                "translate": transform.translation,
                "colormap": SALIENCY_COLORMAP,
                "blending": "additive",
                "contrast_limits": (0.0, top if top > 0 else 1.0),
                "metadata": {"wsi_hipe": {"kind": "result-saliency"}},
                "units": "µm",
            },
            "image",
        )
    ]
    cell_mask = getattr(result, "cell_mask", None)
    if cell_mask is not None:
        layers.append(
            (
                np.asarray(cell_mask).astype(np.uint8),
                {
                    "name": f"{name} cell",
                    "scale": transform.scale,
                    "translate": transform.translation,
                    "opacity": 0.4,
                    "metadata": {"wsi_hipe": {"kind": "result-cell"}},
                    "units": "µm",
                },
                "labels",
            )
        )
    segmentation = getattr(result, "segmentation", None)
    if segmentation is not None:
        layers.append(
            (
                np.asarray(segmentation),
                {
                    "name": f"{name} segmentation",
                    "scale": transform.scale,
                    "translate": transform.translation,
                    "opacity": 0.5,
                    "visible": False,
                    "metadata": {"wsi_hipe": {"kind": "result-labels"}},
                    "units": "µm",
                },
                "labels",
            )
        )
    return layers


def result_transform(result: Any, *, slide_mpp: float | None = None) -> PixelTransform:
    """World transform (µm) of a :class:`wsi_hipe.pipeline.RegionResult`'s arrays.

    Uses the result's ``scale_um`` / ``translate_um`` when it has them; otherwise its
    ``origin`` (level-0 ``(x, y)`` of the top-left corner of target pixel ``[0, 0]``), ``scale``
    (level-0 px per target px) and ``slide_mpp``, through
    :func:`wsi_hipe.tiling.pixel_transform`.
    """
    scale_um = getattr(result, "scale_um", None)
    translate_um = getattr(result, "translate_um", None)
    if scale_um is not None and translate_um is not None:
        return PixelTransform(
            scale=(float(scale_um[0]), float(scale_um[1])),
            translation=(float(translate_um[0]), float(translate_um[1])),
        )
    m0 = float(getattr(result, "slide_mpp", None) or slide_mpp or 0)
    if not m0 > 0:
        raise ValueError("the result carries no slide_mpp; pass slide_mpp= (µm per level-0 px)")
    x0, y0 = (float(v) for v in result.origin)
    return pixel_transform(m0, float(result.scale), origin=(y0, x0))


#: What the widget can colour cells by: the cells table's column (None = napari's own colours).
CELL_COLORINGS: dict[str, str | None] = {
    "label": None,
    "context share": "context_share",
    "own score": "score",
}


def color_cells(layer: Any, by: str) -> None:
    """Colour a ``cells`` labels layer by a column of its features (``CELL_COLORINGS``).

    Cells are coloured by the column's value through viridis over its range in this table
    (0..1 for the context share); cells without a value (a skipped cell's context share) grey.
    ``by="label"`` restores napari's cyclic label colours.
    """
    import matplotlib
    from napari.utils.colormaps import DirectLabelColormap, label_colormap

    if by not in CELL_COLORINGS:
        raise ValueError(f"colour cells by one of {list(CELL_COLORINGS)}, got {by!r}")
    column = CELL_COLORINGS[by]
    if column is None:
        layer.colormap = label_colormap()
        return
    features = layer.features
    values = features[column].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    lo, hi = (
        (0.0, 1.0)
        if column == "context_share"
        else ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    )
    span = hi - lo if hi > lo else 1.0
    cmap = matplotlib.colormaps["viridis"]
    colors: dict[int | None, Any] = {None: np.array([0.5, 0.5, 0.5, 1.0]), 0: np.zeros(4)}
    for cell_id, value in zip(features["index"].to_numpy(), values, strict=True):
        if np.isfinite(value):
            colors[int(cell_id)] = np.asarray(cmap((value - lo) / span), dtype=float)
    layer.colormap = DirectLabelColormap(color_dict=colors)


def cell_row_at(layers: Any, y_um: float, x_um: float) -> dict[str, Any] | None:
    """The stored table row of the cell under a world point, from the first ``cells`` layer
    that has one there (None when no cells layer holds a cell at the point)."""
    for layer in layers:
        meta = getattr(layer, "metadata", {}).get("wsi_hipe", {})
        if meta.get("kind") != "cells":
            continue
        value = layer.get_value((y_um, x_um), world=True)
        value = value[1] if isinstance(value, tuple) else value
        if value is None or int(value) == 0:
            continue
        rows = layer.features[layer.features["index"] == int(value)]
        if len(rows):
            return rows.iloc[0].to_dict()
    return None


def describe_cell(row: dict[str, Any]) -> str:
    """One line of a cell's stored numbers (the widget's status)."""
    share = row.get("context_share")
    share_text = "n/a" if share is None or not np.isfinite(share) else f"{share:.2f}"
    return (
        f"cell {int(row['instance_id'])} (stored): score {row['score']:.1f}, saliency inside "
        f"{row['saliency_inside']:.3g} / ring {row['saliency_ring']:.3g} / beyond "
        f"{row['saliency_beyond']:.3g}, context share {share_text}"
    )
