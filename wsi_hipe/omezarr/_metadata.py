"""NGFF metadata of a wsi-hipe output, and the one place that knows where it is stored.

NGFF 0.4 (Zarr v2) keeps a group's attributes in ``.zattrs``, the NGFF keys (``multiscales``,
``labels``, ``image-label``) at their top level and a ``"version"`` inside each multiscale and
image-label entry. NGFF 0.5 (Zarr v3) keeps them in ``zarr.json`` under ``"attributes"``, the
NGFF keys under ``"ome"`` next to ``"version": "0.5"``. wsi-hipe's own ``"wsi_hipe"`` attribute
(provenance and the ``"output"`` state) stays at the top level of the attributes in both.
:func:`ome_attrs`, :func:`write_ome_attrs` and :func:`root_attrs` are the only code that reads or
writes those places; the writer, the reader and the napari plugin all go through them.

Coordinates: output pyramid level ``k`` is a grid of ``mpp·2^k`` µm per pixel over a slide of
``slide_mpp`` µm per level-0 pixel (level-0 pixel centres at ``j·slide_mpp``); its
``coordinateTransformations`` come from :func:`wsi_hipe.tiling.pixel_transform`: scale
``mpp·2^k`` and translation ``(mpp·2^k − slide_mpp) / 2`` µm.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import NgffVersion
from ..tiling import PixelTransform, pixel_transform

__all__ = [
    "NGFF_VERSIONS",
    "SEGMENTATION_CLASSES",
    "SEGMENTATION_COLORS",
    "TISSUE_COLORS",
    "make_fingerprint",
    "ome_attrs",
    "write_ome_attrs",
    "root_attrs",
    "is_output",
]

logger = logging.getLogger(__name__)

#: Zarr format of each NGFF version the writer offers (the versions: ``config.NgffVersion``).
NGFF_VERSIONS: dict[NgffVersion, int] = {"0.4": 2, "0.5": 3}
#: Label values of the segmentation and their names.
SEGMENTATION_CLASSES: dict[int, str] = {0: "background", 1: "lymphocyte", 2: "nucleus"}
#: RGBA (0-255) colours of the segmentation classes (image-label "colors").
SEGMENTATION_COLORS: dict[int, tuple[int, int, int, int]] = {
    0: (0, 0, 0, 0),
    1: (255, 64, 160, 255),  # lymphocyte: magenta-pink
    2: (64, 200, 255, 255),  # nucleus: light blue
}
TISSUE_CLASSES: dict[int, str] = {0: "background", 1: "tissue"}
TISSUE_COLORS: dict[int, tuple[int, int, int, int]] = {0: (0, 0, 0, 0), 1: (80, 200, 80, 96)}

FORMAT_VERSION = 1
SALIENCY = "saliency"
LABELS = ("segmentation", "tissue")
#: The image groups of an output: (group path, multiscale name, dtype, pyramid method).
IMAGES: tuple[tuple[str, str, type, str], ...] = (
    ("", SALIENCY, np.float32, "mean"),
    ("labels/segmentation", "segmentation", np.uint8, "mode"),
    ("labels/tissue", "tissue", np.uint8, "mode"),
)
#: The instance labels of an output made with cells (:mod:`wsi_hipe.omezarr._tables`).
CELLS_IMAGE: tuple[str, str, type, str] = ("labels/cells", "cells", np.uint32, "mode")


def images(cells: bool) -> tuple[tuple[str, str, type, str], ...]:
    """The image groups of an output, ``labels/cells`` included when it has cells."""
    return (*IMAGES, CELLS_IMAGE) if cells else IMAGES


def label_names(cells: bool) -> list[str]:
    """The ``labels`` list of the root's ``labels`` group."""
    return [*LABELS, "cells"] if cells else list(LABELS)


#: Root attribute (and sub-group) holding wsi-hipe's provenance and state.
META_GROUP = "wsi_hipe"
STATE_CREATING, STATE_WRITING, STATE_FINAL = "creating", "writing", "finalized"


# --- JSON and argument helpers --------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def jsonable(value: Any, what: str) -> Any:
    """Round-trip ``value`` through JSON (numpy scalars, paths -> plain types)."""
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (no NaN/inf): {exc}") from exc


def make_fingerprint(*parts: Any) -> str:
    """A stable sha256 hex digest of JSON-serialisable parts (dict key order does not matter).

    Examples
    --------
    >>> fp = make_fingerprint({"tiling": {"mpp": 0.5}}, "model-sha", "slide-sha")
    >>> len(fp)
    64
    """
    text = json.dumps(list(parts), sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def as_chunk(chunk: int | tuple[int, int]) -> tuple[int, int]:
    """``chunk`` as a ``(h, w)`` pair of positive ints (ValueError naming it otherwise)."""
    if isinstance(chunk, (int, np.integer)):
        pair = (int(chunk), int(chunk))
    else:
        pair = tuple(int(c) for c in chunk)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"chunk must be a positive int or (height, width), got {chunk!r}")
    return pair  # type: ignore[return-value]


def as_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """``shape`` as a ``(H, W)`` pair of positive ints (ValueError naming it otherwise)."""
    try:
        pair = tuple(int(s) for s in shape)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"shape must be (height, width) in target px, both >= 1, got {shape!r}")
    return pair  # type: ignore[return-value]


def check_mpp(value: float, name: str) -> float:
    """``float(value)`` when it is a positive, finite µm/px (ValueError naming ``name``)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{name} must be a positive number of µm per pixel, got {value!r}")
    return out


def now() -> str:
    """The current UTC time, ISO 8601 to the second (provenance timestamps)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- where NGFF 0.4 / 0.5 keep their attributes ---------------------------------------------------


def ome_attrs(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The NGFF attributes of a group's attributes: under ``"ome"`` (0.5), else top level (0.4)."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, Mapping) else attrs


def write_ome_attrs(
    group: Any, ngff: str, ome: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> None:
    """Merge NGFF attributes ``ome`` (and top-level ``extra``) into a Zarr group's attributes.

    NGFF 0.4 puts them at the top level; 0.5 under ``"ome"``, with ``"version": "0.5"``.
    """
    attrs = dict(group.attrs)
    if ngff == "0.4":
        attrs.update(ome)
    else:
        current = dict(attrs.get("ome", {}))
        current.update(ome)
        current["version"] = ngff
        attrs["ome"] = current
    if extra:
        attrs.update(extra)
    group.attrs.put(attrs)


def _versioned(entry: dict[str, Any], ngff: str) -> dict[str, Any]:
    """NGFF 0.4 carries the version inside each multiscale / image-label entry."""
    return {"version": "0.4", **entry} if ngff == "0.4" else entry


def is_zarr_dir(path: Path) -> bool:
    """True when ``path`` holds Zarr v2 or v3 node metadata."""
    return any((path / name).is_file() for name in (".zgroup", ".zarray", "zarr.json"))


def root_attrs(path: str | Path) -> dict[str, Any] | None:
    """The attributes of the Zarr group at ``path``, read from its metadata file (no zarr import).

    Zarr v2 (NGFF 0.4): ``.zattrs``; Zarr v3 (NGFF 0.5): ``zarr.json`` ``"attributes"`` of a
    group node. None when ``path`` is not a readable Zarr group.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / ".zgroup").is_file():
        attrs_file, v3 = path / ".zattrs", False
        if not attrs_file.is_file():
            return {}
    elif (path / "zarr.json").is_file():
        attrs_file, v3 = path / "zarr.json", True
    else:
        return None
    try:
        meta = json.loads(attrs_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.debug("%s: unreadable Zarr metadata (%s)", attrs_file, exc)
        return None
    if not isinstance(meta, dict):
        return None
    if v3:
        if meta.get("node_type") != "group":
            return None
        meta = meta.get("attributes") or {}
    return meta if isinstance(meta, dict) else None


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``wsi_hipe.output`` attributes of an existing output, None if it is not one."""
    attrs = root_attrs(path)
    info = attrs.get(META_GROUP) if attrs else None
    if not isinstance(info, dict) or not isinstance(info.get("output"), dict):
        return None
    return info["output"]


def is_output(path: str | Path) -> bool:
    """True when ``path`` is a Zarr group carrying wsi-hipe provenance (NGFF 0.4 or 0.5).

    Reads only the group's small metadata file.
    """
    attrs = root_attrs(path)
    return bool(attrs) and isinstance(attrs.get(META_GROUP), dict)


# --- multiscales and labels -----------------------------------------------------------------------


def _level_transform(level: int, *, mpp: float, slide_mpp: float) -> PixelTransform:
    """World transform (µm) of output pyramid ``level``: ``mpp·2^level`` µm/px over the slide."""
    return pixel_transform(slide_mpp, mpp=float(mpp) * 2**level)


def _axes() -> list[dict[str, str]]:
    return [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]


def multiscale(
    name: str, n_levels: int, *, mpp: float, slide_mpp: float, ngff: str, method: str
) -> dict[str, Any]:
    """One ``multiscales`` entry: axes y, x in µm, datasets "0".."n-1" with their transforms."""
    datasets = []
    for level in range(n_levels):
        scale, translation = _level_transform(level, mpp=mpp, slide_mpp=slide_mpp).ngff()
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    entry = _versioned({"name": name, "axes": _axes(), "datasets": datasets}, ngff)
    entry["type"] = method
    entry["metadata"] = {
        "method": f"wsi_hipe.stitch.downsample_{method}",
        "description": f"factor-2 levels, 2x2 {method}",
    }
    return entry


def _image_label(values: Mapping[int, str], colors: Mapping[int, tuple], ngff: str) -> dict:
    label: dict[str, Any] = {
        "colors": [{"label-value": int(v), "rgba": list(colors[v])} for v in sorted(colors)],
        "properties": [{"label-value": int(v), "class": name} for v, name in values.items()],
        "source": {"image": "../../"},
    }
    return _versioned(label, ngff)


def image_ome(
    name: str, n_levels: int, *, mpp: float, slide_mpp: float, ngff: str, method: str
) -> dict[str, Any]:
    """The NGFF attributes of one image group of an output (a label image's colours too)."""
    ome: dict[str, Any] = {
        "multiscales": [
            multiscale(name, n_levels, mpp=mpp, slide_mpp=slide_mpp, ngff=ngff, method=method)
        ]
    }
    if name == "segmentation":
        ome["image-label"] = _image_label(SEGMENTATION_CLASSES, SEGMENTATION_COLORS, ngff)
    elif name == "tissue":
        ome["image-label"] = _image_label(TISSUE_CLASSES, TISSUE_COLORS, ngff)
    elif name == "cells":  # instance ids: no per-value colours or properties (viewers pick)
        ome["image-label"] = _versioned({"source": {"image": "../../"}}, ngff)
    return ome


def dataset_paths(group: Any) -> list[str]:
    """The dataset paths ("0", "1", ...) of a group's first multiscale."""
    return [d["path"] for d in ome_attrs(group.attrs)["multiscales"][0]["datasets"]]
