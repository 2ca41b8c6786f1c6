"""The OME-Zarr backend: :class:`NgffReader` reads an NGFF 0.4/0.5 image lazily with zarr.

What it reads
-------------
An OME-Zarr *image* group (what QuPath 0.6, bioformats2raw, ome-zarr-py and this project's
outputs write): NGFF 0.4 (Zarr v2, ``.zattrs``) or 0.5 (Zarr v3, ``zarr.json`` with the
metadata under ``"ome"``). A bioformats2raw container (``"bioformats2raw.layout"``) is read
through its first image (``0/``); the others are named in the log.

* Levels: the ``datasets`` of the first ``multiscales`` entry, in order. A level's downsample is
  the ratio of its x ``scale`` to level 0's (NGFF states it exactly); without scales, the size
  ratio (:func:`~wsi_hipe.slide._metadata.level_downsample`).
* µm/px: level 0's x and y ``scale`` (times a ``multiscales``-wide scale, if any) in the axes'
  ``unit`` (``micrometer``, ``nanometer``, ...), checked for plausibility; an axis without a
  unit gives no µm/px (the value is in the note of the "pass --mpp" error).
* Axes: ``y`` and ``x``; the channel axis is the one of type ``channel`` (or named ``c``);
  any other axis (``z``, ``t``) needs a ``plane``.
* Channels: ``omero.channels`` (``label``, ``color``), when they match the channel axis.

Pixels are read with orthogonal selections of the level's Zarr array: only the chunks a region
touches are loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.errors import SlideFormatError, SlideNotFoundError
from wsi_hipe.slide._channels import (
    ChannelInfo,
    ChannelSpec,
    PlaneSpec,
    parse_plane,
    raw_max,
    resolve_plane,
)
from wsi_hipe.slide._metadata import MppInfo, level_downsample, mpp_from_xy, to_micrometres
from wsi_hipe.slide._multichannel import ChannelReaderBase

__all__ = ["NgffReader", "is_ngff", "ngff_metadata"]

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def ngff_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The OME attributes of a Zarr group folder (``multiscales``, ``omero``, ...), or None.

    Reads ``zarr.json`` (NGFF 0.5: ``attributes.ome``) or ``.zattrs`` (NGFF 0.4) without
    opening the store; None when ``path`` is not a Zarr group with OME metadata.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    v3 = _read_json(p / "zarr.json")
    if v3 is not None:
        attrs = v3.get("attributes") or {}
        ome = attrs.get("ome")
        return ome if isinstance(ome, dict) else (attrs if "multiscales" in attrs else None)
    v2 = _read_json(p / ".zattrs")
    if v2 is not None and ("multiscales" in v2 or "bioformats2raw.layout" in v2):
        return v2
    return None


def is_ngff(path: str | os.PathLike[str]) -> bool:
    """``path`` is an OME-Zarr image or a bioformats2raw container."""
    meta = ngff_metadata(path)
    return meta is not None and ("multiscales" in meta or "bioformats2raw.layout" in meta)


def _hex_color(value: Any) -> tuple[int, int, int] | None:
    if not isinstance(value, str) or len(value.lstrip("#")) != 6:
        return None
    try:
        v = int(value.lstrip("#"), 16)
    except ValueError:
        return None
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)


def _scale(transforms: Any, ndim: int) -> list[float] | None:
    if not isinstance(transforms, list):
        return None
    for t in transforms:
        if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list):
            values = t["scale"]
            if len(values) == ndim:
                return [float(v) for v in values]
    return None


class NgffReader(ChannelReaderBase):
    """:class:`~wsi_hipe.slide.SlideReader` (and ``ChannelReader``) over an OME-Zarr image.

    Parameters
    ----------
    path : str or PathLike
        The image group folder (``*.ome.zarr``), or a bioformats2raw container.
    plane : int, str or mapping, optional
        The plane of extra axes (``"z=3"``, ``{"t": 0, "z": 3}``).
    channel : int or str, optional
        The channel that :meth:`read_region` shows (index, name or ``"auto"``); default: the
        first. Raw reads take any channel.

    Raises
    ------
    SlideNotFoundError, SlideFormatError
        Nothing at ``path``; not an OME-Zarr image, malformed ``multiscales``, a plane needed.
    """

    vendor = "ome-zarr"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        plane: PlaneSpec = None,
        channel: ChannelSpec | None = None,
    ) -> None:
        p = Path(path).expanduser()
        if not p.exists():
            raise SlideNotFoundError(f"slide not found: {p} (no such file or folder)")
        p = p.resolve()
        self.path = str(p)
        self._plane_opt = plane
        self._channel_opt = channel
        self._quickhash: str | None = None
        self._open(p)
        self._set_display(channel)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.path, self._plane_opt, self._channel_opt, self.selection))

    def __repr__(self) -> str:
        return f"NgffReader({self.path!r}, {self.description})"

    def _open(self, root: Path) -> None:
        import zarr

        meta = ngff_metadata(root)
        if meta is None:
            raise SlideFormatError(
                f"{root} is not an OME-Zarr image (no NGFF 'multiscales' in zarr.json or "
                ".zattrs); pass the image group folder, e.g. image.ome.zarr or image.ome.zarr/0"
            )
        image_dir = root
        if "multiscales" not in meta:  # bioformats2raw container: images 0/, 1/, ...
            series = sorted(
                (d for d in root.iterdir() if d.is_dir() and d.name.isdigit()),
                key=lambda d: int(d.name),
            )
            images = [d for d in series if (ngff_metadata(d) or {}).get("multiscales")]
            if not images:
                raise SlideFormatError(f"bioformats2raw container {root} holds no image (0/, ...)")
            image_dir = images[0]
            meta = ngff_metadata(image_dir) or {}
            if len(images) > 1:
                logger.info(
                    "%s: %d images; reading %s (the others: %s)",
                    root,
                    len(images),
                    image_dir.name,
                    ", ".join(d.name for d in images[1:]),
                )
        try:
            group = zarr.open_group(str(image_dir), mode="r")
        except Exception as exc:  # zarr raises several types for a broken store
            raise SlideFormatError(f"cannot open the Zarr group {image_dir}: {exc}") from exc
        multiscales = meta.get("multiscales")
        if not isinstance(multiscales, list) or not multiscales:
            raise SlideFormatError(f"{image_dir}: 'multiscales' must be a non-empty list")
        ms = multiscales[0]
        version = str(ms.get("version") or meta.get("version") or "?")
        datasets = ms.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            raise SlideFormatError(f"{image_dir}: multiscales has no datasets")
        raw_axes = ms.get("axes")
        arrays = []
        for ds in datasets:
            key = ds.get("path") if isinstance(ds, dict) else None
            try:
                arrays.append(group[str(key)])
            except (KeyError, TypeError) as exc:
                raise SlideFormatError(
                    f"{image_dir}: dataset {key!r} of multiscales is missing"
                ) from exc
        ndim = arrays[0].ndim
        if raw_axes is None:  # NGFF 0.1/0.2: always 5-D t, c, z, y, x
            raw_axes = ["t", "c", "z", "y", "x"][-ndim:]
        axes: list[dict[str, Any]] = [
            a if isinstance(a, dict) else {"name": str(a)} for a in raw_axes
        ]
        names = [str(a.get("name", "")).lower() for a in axes]
        if len(names) != ndim or "y" not in names or "x" not in names:
            raise SlideFormatError(
                f"{image_dir}: axes {names} do not fit arrays of {ndim} dimensions with y and x"
            )
        for i, arr in enumerate(arrays):
            if arr.ndim != ndim:
                raise SlideFormatError(f"{image_dir}: level {i} has {arr.ndim} dims, not {ndim}")
        c_candidates = [i for i, a in enumerate(axes) if a.get("type") == "channel"]
        if not c_candidates and "c" in names:
            c_candidates = [names.index("c")]
        c_index = c_candidates[0] if c_candidates else None
        self._names = names
        self._c_index = c_index
        shape0 = arrays[0].shape
        extra = {
            n: int(shape0[i]) for i, n in enumerate(names) if n not in ("y", "x") and i != c_index
        }
        self._plane = resolve_plane(parse_plane(self._plane_opt), extra, path=self.path)
        yi, xi = names.index("y"), names.index("x")
        self._yi, self._xi = yi, xi
        dims = tuple((int(a.shape[xi]), int(a.shape[yi])) for a in arrays)
        global_scale = _scale(ms.get("coordinateTransformations"), ndim)
        scales = [_scale(ds.get("coordinateTransformations"), ndim) for ds in datasets]
        if all(s is not None for s in scales) and scales[0][xi] > 0:
            downs = tuple(float(s[xi] / scales[0][xi]) for s in scales)  # type: ignore[index]
        else:
            downs = tuple(level_downsample(dims[0], d) for d in dims)
        self._mpp = self._find_mpp(axes, scales[0], global_scale, xi, yi)
        n_channels = int(shape0[c_index]) if c_index is not None else 1
        omero = meta.get("omero") if isinstance(meta.get("omero"), dict) else {}
        infos = [ChannelInfo() for _ in range(n_channels)]
        listed = omero.get("channels") if isinstance(omero, dict) else None
        if isinstance(listed, list) and len(listed) == n_channels:
            infos = [
                ChannelInfo(
                    name=(str(c.get("label") or "").strip() or None)
                    if isinstance(c, dict)
                    else None,
                    color=_hex_color(c.get("color")) if isinstance(c, dict) else None,
                )
                for c in listed
            ]
        elif listed:
            logger.warning(
                "%s: omero lists %d channels but the channel axis has %d; names not used",
                self.path,
                len(listed),
                n_channels,
            )
        self._arrays = arrays
        self._dims = dims
        self._downsamples = downs
        self._channels = tuple(infos)
        self._dtype = np.dtype(arrays[0].dtype)
        self._raw_max = raw_max(self._dtype)
        self._rgb = False
        self._image_dir = image_dir
        self.description = (
            f"OME-Zarr (NGFF {version}), {n_channels} channel(s) {self._dtype.name}, "
            f"{len(arrays)} level(s), axes {''.join(names)}"
        )
        logger.debug("%s: %s", self.path, self.description)

    def _find_mpp(
        self,
        axes: list[dict[str, Any]],
        scale0: list[float] | None,
        global_scale: list[float] | None,
        xi: int,
        yi: int,
    ) -> MppInfo:
        if scale0 is None:
            return MppInfo(None, None)
        values = {}
        for key, i in (("x", xi), ("y", yi)):
            v = scale0[i] * (global_scale[i] if global_scale else 1.0)
            unit = axes[i].get("unit")
            if unit is None:
                note = (
                    f"its NGFF axis {key!r} states no unit (scale {v:g} in unknown units); "
                    "the µm/px is not known"
                )
                return MppInfo(None, "NGFF coordinateTransformations", note)
            um = to_micrometres(v, str(unit))
            if um is None:
                note = f"its NGFF axis {key!r} has unit {unit!r}, which is not a length"
                return MppInfo(None, "NGFF coordinateTransformations", note)
            values[key] = um
        return mpp_from_xy(
            values["x"], values["y"], "NGFF coordinateTransformations scale", self.path
        )

    def _read_window(
        self, level: int, x0: int, y0: int, x1: int, y1: int, channels: tuple[int, ...]
    ) -> np.ndarray:
        if self._c_index is None and channels != (0,):
            raise ValueError(f"{self.path} has one channel, got channels {channels}")
        sel: list[Any] = []
        kept: list[int] = []
        for i, name in enumerate(self._names):
            if i == self._yi:
                sel.append(slice(y0, y1))
                kept.append(i)
            elif i == self._xi:
                sel.append(slice(x0, x1))
                kept.append(i)
            elif i == self._c_index:
                first = channels[0]
                if channels == tuple(range(first, first + len(channels))):
                    sel.append(slice(first, first + len(channels)))
                else:
                    sel.append(list(channels))
                kept.append(i)
            else:
                sel.append(self._plane[name])
        data = np.asarray(self._arrays[level].get_orthogonal_selection(tuple(sel)))
        order = [kept.index(self._yi), kept.index(self._xi)]
        if self._c_index is None:
            return np.ascontiguousarray(np.transpose(data, order)[..., None])
        order.append(kept.index(self._c_index))
        return np.ascontiguousarray(np.transpose(data, order))

    @property
    def plane(self) -> dict[str, int]:
        """The plane read on each extra axis (``{}`` for a 2-D image)."""
        return dict(self._plane)

    @property
    def quickhash(self) -> str:  # type: ignore[override]
        """SHA-256 of the OME metadata and the smallest level's samples (cheap at any size)."""
        if self._quickhash is None:
            digest = hashlib.sha256()
            meta = ngff_metadata(self._image_dir) or {}
            digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
            level = len(self._dims) - 1
            w, h = self._dims[level]
            corner = self.read_channels((0, 0), level, (min(w, 1024), min(h, 1024)))
            digest.update(np.ascontiguousarray(corner).tobytes())
            self._quickhash = digest.hexdigest()
        return self._quickhash

    def close(self) -> None:
        """Nothing to release (Zarr stores hold no open file between reads)."""


def _reopen(path: str, plane: PlaneSpec, channel: ChannelSpec | None, selection: Any) -> NgffReader:
    reader = NgffReader(path, plane=plane, channel=channel)
    reader.selection = selection
    return reader
