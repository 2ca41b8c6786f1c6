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

from wsi_hipe.napari._lazy import slide_pyramid
from wsi_hipe.omezarr import ome_attrs
from wsi_hipe.tiling import PixelTransform, pixel_transform

__all__ = [
    "SALIENCY_COLORMAP",
    "output_transforms",
    "output_layer_data",
    "slide_layer_data",
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

    Returns
    -------
    (list of dask arrays, dict, "image")
    """
    pyramid = slide_pyramid(path, mpp=mpp, channel=channel, allow_brightfield=allow_brightfield)
    height, width = pyramid.levels[0].shape
    info = {
        "kind": "slide",
        "path": str(Path(path)),
        "mpp": pyramid.mpp,
        "mpp_override": mpp if mpp is not None else (None if pyramid.mpp_known else 1.0),
        "mpp_known": pyramid.mpp_known,
        "channel": channel,
        "allow_brightfield": allow_brightfield,
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


def _provenance_slide_layer(path: Path, view: Any, prov: dict[str, Any]) -> LayerData | None:
    """The slide layer of an output, from the slide path in its provenance, if reachable."""
    slide_path = view.slide_path
    if slide_path is None:
        return None
    slide_file = Path(slide_path)
    if not slide_file.is_absolute():
        slide_file = (path.parent / slide_file).resolve()
    if not slide_file.exists():
        logger.warning("slide %s (from the provenance) is not reachable; not shown", slide_file)
        return None
    try:
        return slide_layer_data(
            slide_file,
            mpp=view.slide_mpp,
            channel=_slide_channel(prov),
            allow_brightfield=_brightfield(prov),
            config=prov.get("config") if isinstance(prov.get("config"), dict) else None,
        )
    except Exception as exc:  # the output is still worth showing without its slide
        logger.warning("cannot show the slide %s: %s", slide_file, exc)
        return None


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
        Bottom to top: slide, saliency (additive, perceptual colormap), segmentation, tissue.
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
    slide = _provenance_slide_layer(path, view, prov) if with_slide else None
    if slide is not None:
        layers.append(slide)
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
    return layers


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
