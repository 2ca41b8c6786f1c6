"""The :class:`Slide`: a slide read at a target µm/px as a normalised stain image.

:func:`open_slide` wraps a path (opened with the reader :func:`~wsi_hipe.slide.choose_reader`
picks: OpenSlide, tifffile or OME-Zarr; one handle per process) or any :class:`SlideReader`;
:func:`iter_tiles` streams the windows of a tile grid. A :class:`Slide` pickles as its path,
options and resolved stain settings and reopens lazily in the worker. A region whose pixels
cannot be decoded raises :class:`SlideReadError` for that region only (the handle is reopened
for the next read).

The stain and the model input
-----------------------------
:meth:`Slide.read` gives the *stain*: one normalised channel (background ≈ 0, bright nuclei ≈ 1)
used for tissue detection, overviews and napari, and by default also the model's one input.
On an RGB slide it is a channel of the RGB (or their mean); on a multi-channel fluorescence
file (tifffile / OME-Zarr readers) it is the channel ``channel`` names ("auto": the nuclear
stain by name), read at full precision and scaled on its raw range (8, 12, 16 bit or float).
:meth:`Slide.read_input` gives the model input ``(C, H, W)``: the stain (C = 1), or the
channels listed in ``channels`` in that order, each scaled on its own percentiles.
:meth:`Slide.check_model` compares that input with a model's ``in_channels`` and the channel
names it was trained on.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_hipe.errors import MissingMppError, SlideNotFoundError, SlideReadError, StainError
from wsi_hipe.slide._channels import (
    ChannelInfo,
    ChannelSpec,
    PlaneSpec,
    check_model_channels,
    select_channel,
    select_channels,
)
from wsi_hipe.slide._choose import cached_reader, evict_cached_reader
from wsi_hipe.slide._multichannel import ChannelReader, RawChannels
from wsi_hipe.slide._protocol import CLIP_MAX, SlideReader
from wsi_hipe.slide._resample import Extract, as_float, read_resampled, thumbnail_geometry
from wsi_hipe.slide._stain import (
    Stain,
    channel_option,
    choose_stain,
    extractor,
    intensity_range,
    normalise,
)
from wsi_hipe.tissue import TissueMask, detect_tissue

__all__ = ["ANALYSIS_SIZE", "Slide", "TileData", "open_slide", "iter_tiles"]

logger = logging.getLogger(__name__)

#: Side (px) of the thumbnail used to detect the stain channel and intensity range.
ANALYSIS_SIZE = 1024


class Slide:
    """A slide read as a normalised single-stain image. Make it with :func:`open_slide`.

    Attributes
    ----------
    path : str
        The slide file (or the reader's name).
    mpp : float
        µm per level-0 px (after an override).
    mpp_source : str
        Where ``mpp`` comes from: ``"override"``, or the metadata field (e.g. ``"OME
        PhysicalSizeX/Y"``; ``"metadata"`` for OpenSlide's ``openslide.mpp-x``).
    dimensions : (int, int)
        Level-0 ``(width, height)`` in px.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | SlideReader,
        *,
        mpp: float | None = None,
        channel: ChannelSpec = "auto",
        channels: Sequence[ChannelSpec] | None = None,
        normalize: bool = True,
        allow_brightfield: bool = False,
        intensity: tuple[float, float] | None = None,
        analysis_size: int = ANALYSIS_SIZE,
        reader: str = "auto",
        plane: PlaneSpec = None,
    ) -> None:
        if mpp is not None and not (
            isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0
        ):
            raise ValueError(
                f"mpp must be a positive number of µm per px (--mpp / slide.mpp), got {mpp!r}"
            )
        if intensity is not None:
            low, high = (float(v) for v in intensity)
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(
                    f"intensity must be (low, high) raw values with high > low, got {intensity!r}"
                )
            intensity = (low, high)
        if channels is not None:
            if isinstance(channels, (str, bytes)) or not len(channels):
                raise ValueError(
                    "channels must be a non-empty list of channel names or indices "
                    f"(slide.channels), got {channels!r}"
                )
            channels = tuple(channels)
        self._channel_spec = channel
        self._channels_opt: tuple[ChannelSpec, ...] | None = channels
        self._reader_opt = reader
        self._plane_opt = plane
        self._normalize = bool(normalize)
        self._allow_brightfield = bool(allow_brightfield)
        self._intensity_opt = intensity
        self._analysis_size = int(analysis_size)
        self._mpp_override = None if mpp is None else float(mpp)
        self._stain: Stain | None = None
        self._inputs: tuple[Stain, ...] | None = None
        self._extract: Extract | None = None
        if isinstance(source, (str, os.PathLike)):
            where = Path(source).expanduser()
            if not where.exists():
                raise SlideNotFoundError(f"slide not found: {where} (no such file or folder)")
            self._path: str | None = str(where.resolve())
            self._array_reader: SlideReader | None = None
            reader_obj = cached_reader(self._path, reader=reader, plane=plane)
        elif isinstance(source, SlideReader):
            self._path = None
            self._array_reader = source
            reader_obj = source
        else:
            raise TypeError(
                f"open_slide needs a path or a SlideReader, got {type(source).__name__}"
            )
        #: A multi-channel (fluorescence) reader: the stain is one raw channel chosen by name.
        self._multi = isinstance(reader_obj, ChannelReader) and not reader_obj.is_rgb
        self._channel_opt = channel if self._multi else channel_option(channel)
        if channels is not None and not self._multi:
            raise StainError(
                f"slide.channels selects channels of a multi-channel fluorescence file "
                f"(OME-TIFF, QPTIFF, TIFF, OME-Zarr), but {reader_obj.path} is read as RGB by "
                f"{type(reader_obj).__name__}; use slide.channel (--channel) instead"
            )
        self._bind(reader_obj)

    # --- pickling: path + options + resolved stain settings; handles reopen lazily ----------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_extract"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _bind(self, reader: SlideReader) -> None:
        mpp = self._mpp_override if self._mpp_override is not None else reader.mpp
        if mpp is None:
            note = getattr(reader, "mpp_note", None)
            what = f"no usable µm/px metadata: {note}" if note else "no µm/px metadata"
            raise MissingMppError(
                f"slide {reader.path} has {what}; pass --mpp 0.5 (µm per level-0 px) or set "
                "slide.mpp in the config"
            )
        self.path = reader.path
        self.mpp = float(mpp)
        self.mpp_source = (
            "override"
            if self._mpp_override is not None
            else getattr(reader, "mpp_source", None) or "metadata"
        )
        self.dimensions = tuple(reader.dimensions)
        self.level_dimensions = tuple(tuple(d) for d in reader.level_dimensions)
        self.level_downsamples = tuple(reader.level_downsamples)
        self.vendor = getattr(reader, "vendor", None)
        self.quickhash = getattr(reader, "quickhash", None)

    @property
    def reader(self) -> SlideReader:
        """The slide reader of this process (reopened from the cache after unpickling)."""
        if self._array_reader is not None:
            return self._array_reader
        return cached_reader(str(self._path), reader=self._reader_opt, plane=self._plane_opt)

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, dimensions={self.dimensions}, mpp={self.mpp:.4g})"

    def close(self) -> None:
        """Drop this process's cached handle of the slide (a later read reopens it)."""
        if self._path is not None:
            evict_cached_reader(self._path, reader=self._reader_opt, plane=self._plane_opt)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stain analysis -------------------------------------------------------------------

    def _read_raw(
        self,
        x0: float,
        y0: float,
        width: int,
        height: int,
        scale: float,
        extract: Extract,
        channels: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """Resampled raw values: ``extract`` of the RGBA, or (``channels``) raw channels."""
        from wsi_hipe.slide._multichannel import ChannelView

        try:
            source = self.reader
            if channels is not None:
                source = ChannelView(source, channels)  # type: ignore[arg-type]
            return read_resampled(source, x0, y0, width, height, scale, extract)
        except SlideReadError:
            if self._path is not None:  # an OpenSlide handle stays broken after an error
                evict_cached_reader(self._path, reader=self._reader_opt, plane=self._plane_opt)
            raise

    def _channel_range(self, index: int) -> tuple[float, float, str]:
        """``(low, high, how)`` raw values of channel ``index`` mapped to 0 and 1."""
        reader = self.reader
        top = float(reader.raw_max)  # type: ignore[attr-defined]
        if not self._normalize:
            return 0.0, top, f"none (x / {top:g}, the raw range)"
        if self._intensity_opt is not None:
            low, high = self._intensity_opt
            return low, high, "explicit (raw values)"
        float_samples = np.dtype(reader.dtype).kind == "f"  # type: ignore[attr-defined]
        extract = RawChannels(1)
        read_raw = functools.partial(self._read_raw, channels=(index,))
        scale, w, h = thumbnail_geometry(self.dimensions, self._analysis_size)
        thumb = read_raw(0.0, 0.0, w, h, scale, extract)
        low, high, how = intensity_range(
            thumb,
            np.ones(thumb.shape, dtype=bool),
            scale,
            extract,
            mpp=self.mpp,
            path=self.path,
            read_raw=read_raw,
            min_contrast=top / 255.0 if float_samples else 1.0,
        )
        return low, high, f"{how} (raw range 0..{top:g})"

    def _analyse_channels(self) -> Stain:
        """The stain of a multi-channel (tifffile/OME-Zarr) slide: a channel chosen by name."""
        channels = self.reader.channels  # type: ignore[attr-defined]
        index, method = select_channel(self._channel_spec, channels, path=self.path)
        low, high, how = self._channel_range(index)
        return Stain("channel", index, method, False, low, high, how)

    def _analyse(self) -> Stain:
        if self._stain is not None:
            return self._stain
        if self._multi:
            stain = self._analyse_channels()
            logger.info(
                "%s: stain %s; intensity low %.6g, high %.6g (%s)",
                self.path,
                stain.method,
                stain.low,
                stain.high,
                stain.intensity_method,
            )
            self._stain = stain
            return stain
        opt = self._channel_opt
        # The thumbnail is needed to detect the layout (auto), to check for brightfield when
        # inversion is allowed, and for the percentiles.
        need_layout = opt == "auto" or self._allow_brightfield
        need_range = self._normalize and self._intensity_opt is None
        thumb = None
        scale = 1.0
        if need_layout or need_range:
            scale, w, h = thumbnail_geometry(self.dimensions, self._analysis_size)
            thumb = self._read_raw(0.0, 0.0, w, h, scale, as_float)
        mode, channel, method, brightfield = choose_stain(
            thumb if need_layout else None,
            opt,
            allow_brightfield=self._allow_brightfield,
            path=self.path,
        )
        extract = extractor(mode, channel)
        if not self._normalize:
            low, high, how = 0.0, 255.0, "none (x / 255)"
        elif self._intensity_opt is not None:
            low, high = self._intensity_opt
            how = "explicit"
        elif thumb is not None:
            low, high, how = intensity_range(
                extract(thumb),
                thumb[..., 3] > 0,
                scale,
                extract,
                mpp=self.mpp,
                path=self.path,
                read_raw=self._read_raw,
            )
        stain = Stain(mode, channel, method, brightfield, low, high, how)
        logger.info(
            "%s: stain %s; intensity low %.4g, high %.4g (%s)", self.path, method, low, high, how
        )
        self._stain = stain
        return stain

    def _analyse_inputs(self) -> tuple[Stain, ...]:
        """The model input channels: the stain, or ``channels`` each with its own range."""
        if self._inputs is not None:
            return self._inputs
        stain = self._analyse()
        if self._channels_opt is None:
            self._inputs = (stain,)
            return self._inputs
        infos = self.reader.channels  # type: ignore[attr-defined]
        indices, _ = select_channels(self._channels_opt, infos, path=self.path)
        inputs = []
        for spec, index in zip(self._channels_opt, indices, strict=True):
            _, method = select_channel(spec, infos, path=self.path, option="channels")
            if index == stain.channel:
                inputs.append(replace(stain, method=method))
                continue
            low, high, how = self._channel_range(index)
            inputs.append(Stain("channel", index, method, False, low, high, how))
        self._inputs = tuple(inputs)
        logger.info(
            "%s: model input channels %s",
            self.path,
            ", ".join(f"{s.channel} ({s.low:.6g}..{s.high:.6g})" for s in self._inputs),
        )
        return self._inputs

    def _ensure_analysed(self) -> tuple[Stain, Extract]:
        stain = self._analyse()
        if self._multi:
            return stain, RawChannels(1)
        if self._extract is None:
            self._extract = extractor(stain.mode, stain.channel)
        return stain, self._extract

    @property
    def channel(self) -> int | None:
        """The channel read as the stain, or None (a single-channel image, or RGB's mean)."""
        stain = self._analyse()
        if self._multi and len(self.reader.channels) == 1:  # type: ignore[attr-defined]
            return None
        return stain.channel

    @property
    def channel_name(self) -> str | None:
        """The stain channel's name in the file's metadata (multi-channel files), else None."""
        if not self._multi:
            return None
        return self.reader.channels[self._analyse().channel].name  # type: ignore[attr-defined]

    @property
    def intensity(self) -> tuple[float, float]:
        """``(low, high)`` raw stain values (0..255 for RGB, the raw range otherwise) mapped
        to 0 and 1."""
        stain = self._analyse()
        return stain.low, stain.high

    @property
    def input_channels(self) -> tuple[ChannelInfo, ...]:
        """The channels :meth:`read_input` gives the model, in order.

        The stain alone unless ``channels`` was given; a stain without a name in the file (an
        RGB slide, a gray TIFF) is named ``"nuclear stain"``, which is what this pipeline
        takes it to be.
        """
        inputs = self._analyse_inputs()
        if not self._multi:
            return (ChannelInfo(name="nuclear stain"),)
        infos = self.reader.channels  # type: ignore[attr-defined]
        out = tuple(infos[s.channel] for s in inputs)
        if self._channels_opt is None and out[0].name is None:
            return (replace(out[0], name="nuclear stain"),)
        return out

    def check_model(
        self,
        in_channels: int,
        trained_channels: Sequence[str] | None = None,
        *,
        model: str = "the model",
    ) -> None:
        """Refuse a model whose input does not fit :meth:`read_input`.

        Parameters
        ----------
        in_channels : int
            The model's input channels.
        trained_channels : sequence of str, optional
            The channel names it was trained on, in order (its sidecar); None: not recorded.
        model : str
            The model, for messages.

        Raises
        ------
        StainError
            ``in_channels`` differs from the number of input channels, or the names differ
            (nuclear stains match each other); the message says how to set ``slide.channels``.
        """
        used = self.input_channels
        if int(in_channels) != len(used):
            names = [c.name for c in used]
            trained = f" (trained on {list(trained_channels)})" if trained_channels else ""
            if self._multi:
                listed = ", ".join(
                    repr(c.name) if c.name else str(i)
                    for i, c in enumerate(self.reader.channels)  # type: ignore[attr-defined]
                )
                fix = (
                    f"set slide.channels (--channels) to {in_channels} of the slide's channels "
                    f"[{listed}], in the order the model was trained on"
                )
            else:
                fix = "this slide has a single stain; use a model with in_channels = 1"
            raise StainError(
                f"{model} takes {in_channels} input channel(s){trained}, but {len(used)} "
                f"channel(s) of slide {self.path} are selected ({names}); {fix}"
            )
        check_model_channels(trained_channels, used, path=self.path, model=model)

    # --- reading --------------------------------------------------------------------------

    def _check_region(self, x0: float, y0: float, width: int, height: int, mpp: float) -> None:
        if not (isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a positive number of µm per target px, got {mpp!r}")
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer (target px), got {v!r}")
        if not (math.isfinite(x0) and math.isfinite(y0)):
            raise ValueError(f"x0, y0 must be finite level-0 px, got {(x0, y0)!r}")

    def read(self, x0: float, y0: float, width: int, height: int, *, mpp: float) -> np.ndarray:
        """Read a region of the normalised stain at a target resolution.

        Parameters
        ----------
        x0, y0 : float
            Level-0 px position of the region's top-left corner (may be fractional or outside
            the slide).
        width, height : int
            Region size in target px.
        mpp : float
            Target µm per px.

        Returns
        -------
        (height, width) float32 ndarray
            Normalised stain (background ≈ 0, bright nuclei ≈ 1, clipped to [0, CLIP_MAX]);
            0 outside the slide.

        Raises
        ------
        SlideReadError
            The pixels of this region cannot be decoded (other regions may still read).
        StainError
            The slide looks like brightfield and ``allow_brightfield`` is off.
        """
        self._check_region(x0, y0, width, height, mpp)
        stain, extract = self._ensure_analysed()
        scale = float(mpp) / self.mpp
        channels = (stain.channel,) if self._multi else None
        raw = self._read_raw(
            float(x0), float(y0), int(width), int(height), scale, extract, channels
        )
        return normalise(raw, stain)

    def read_input(
        self, x0: float, y0: float, width: int, height: int, *, mpp: float
    ) -> np.ndarray:
        """Read a region as the model's input: the stain, or the ``channels`` in order.

        Parameters are those of :meth:`read`.

        Returns
        -------
        (C, height, width) float32 ndarray
            C = 1 (the stain, as :meth:`read` gives it) or ``len(channels)``, each channel
            normalised on its own range (background ≈ 0, bright ≈ 1, clipped to
            [0, CLIP_MAX]); 0 outside the slide.
        """
        if self._channels_opt is None:
            return self.read(x0, y0, width, height, mpp=mpp)[None]
        self._check_region(x0, y0, width, height, mpp)
        inputs = self._analyse_inputs()
        indices = tuple(int(s.channel) for s in inputs)  # type: ignore[arg-type]
        scale = float(mpp) / self.mpp
        raw = self._read_raw(
            float(x0), float(y0), int(width), int(height), scale, RawChannels(len(indices)), indices
        )
        if raw.ndim == 2:
            raw = raw[..., None]
        for j, stain in enumerate(inputs):
            normalise(raw[..., j], stain)
        return np.ascontiguousarray(np.moveaxis(raw, -1, 0))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide as a normalised stain image, longer side ``<= max_size``.

        Returns
        -------
        (h, w) float32 ndarray
            Thumbnail px ``(r, c)`` covers level-0 ``[c·d, (c+1)·d) x [r·d, (r+1)·d)`` with
            ``d = thumbnail_downsample(max_size)``.
        """
        stain, extract = self._ensure_analysed()
        scale, w, h = thumbnail_geometry(self.dimensions, max_size)
        channels = (stain.channel,) if self._multi else None
        return normalise(self._read_raw(0.0, 0.0, w, h, scale, extract, channels), stain)

    def thumbnail_downsample(self, max_size: int = 1024) -> float:
        """Level-0 px per px of ``thumbnail(max_size)``."""
        return thumbnail_geometry(self.dimensions, max_size)[0]

    def detect_tissue(self, *, max_size: int = 1024, **options: Any) -> TissueMask:
        """Tissue mask from ``thumbnail(max_size)``; options go to :func:`detect_tissue`."""
        return detect_tissue(
            self.thumbnail(max_size),
            downsample=self.thumbnail_downsample(max_size),
            mpp=self.mpp,
            **options,
        )

    def provenance(self) -> dict[str, Any]:
        """Where the pixels came from and how they were turned into the stain image."""
        stain = self._analyse()
        reader = self.reader
        selection = getattr(reader, "selection", None)
        extra: dict[str, Any] = {}
        if self._multi:
            extra = {
                "channel_name": self.channel_name,
                "channel_names": list(reader.channel_names),  # type: ignore[attr-defined]
                "dtype": str(reader.dtype),  # type: ignore[attr-defined]
                "raw_max": float(reader.raw_max),  # type: ignore[attr-defined]
                "plane": getattr(reader, "plane", {}),
                "format": getattr(reader, "description", None),
            }
        if self._channels_opt is not None:
            extra["input_channels"] = [
                {
                    "index": s.channel,
                    "name": info.name,
                    "method": s.method,
                    "intensity_low": s.low,
                    "intensity_high": s.high,
                    "intensity_method": s.intensity_method,
                }
                for s, info in zip(self._analyse_inputs(), self.input_channels, strict=True)
            ]
        return {
            "path": self.path,
            "reader": type(reader).__name__,
            "reader_choice": None if selection is None else selection.reason,
            **extra,
            "vendor": self.vendor,
            "quickhash": self.quickhash,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "dimensions": list(self.dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "stain_mode": stain.mode,
            "channel": self.channel,
            "channel_method": stain.method,
            "brightfield": stain.brightfield,
            "normalize": self._normalize,
            "intensity_low": stain.low,
            "intensity_high": stain.high,
            "intensity_method": stain.intensity_method,
            "clip_max": CLIP_MAX,
        }


def open_slide(
    path_or_reader: str | os.PathLike[str] | SlideReader,
    *,
    mpp: float | None = None,
    channel: ChannelSpec = "auto",
    channels: Sequence[ChannelSpec] | None = None,
    normalize: bool = True,
    allow_brightfield: bool = False,
    intensity: tuple[float, float] | None = None,
    analysis_size: int = ANALYSIS_SIZE,
    reader: str = "auto",
    plane: PlaneSpec = None,
) -> Slide:
    """Open a slide for reading at a target resolution.

    Parameters
    ----------
    path_or_reader : str, PathLike or SlideReader
        A slide file, a folder holding one slide (DICOM) or an OME-Zarr image, or a reader
        (e.g. ArrayReader).
    mpp : float, optional
        µm per level-0 px; overrides the metadata (``--mpp`` / ``slide.mpp``).
    channel : int or str, default 'auto'
        The stain. RGB slides: ``'auto'``, ``'mean'``, 0/1/2 or ``'red'``/``'green'``/
        ``'blue'``. Multi-channel files: ``'auto'`` (the nuclear stain by name, or the only
        channel), an index or a channel name (case-insensitive, or a unique prefix).
    channels : sequence of int or str, optional
        Channels of a multi-channel file fed to the model by :meth:`Slide.read_input`, in
        order (``slide.channels``); default: the stain alone.
    normalize : bool, default True
        Scale intensities from thumbnail percentiles; False gives ``x / 255`` (RGB) or
        ``x / raw_max`` (the raw range of a multi-channel file).
    allow_brightfield : bool, default False
        Accept an RGB brightfield slide by inverting it instead of raising StainError.
    intensity : (float, float), optional
        Raw ``(low, high)`` values mapped to 0 and 1 (0..255 for RGB, raw values otherwise),
        instead of the percentiles; with ``channels``, for every channel.
    analysis_size : int, default 1024
        Longer side of the thumbnail used to detect the channel and the intensity range.
    reader : {'auto', 'openslide', 'tiff', 'ngff'}, default 'auto'
        The reader (``slide.reader``); ``'auto'`` decides from the file
        (:func:`~wsi_hipe.slide.choose_reader`).
    plane : int, str or mapping, optional
        The plane of a Z-stack or time series (``slide.plane``: ``"z=3"``, ``{"z": 3}``).

    Returns
    -------
    Slide
        The channel and intensity range are found now; when the thumbnail's pixels cannot be
        decoded, that is logged and retried at the first read, which then raises
        SlideReadError.

    Raises
    ------
    SlideNotFoundError, SlideFormatError, SlideError
        Missing path, no/several slides in a folder, not a slide, corrupt, empty, no permission,
        OME-XML that disagrees with the pages, a Z-stack without ``plane``.
    MissingMppError
        No (plausible) µm/px metadata and no ``mpp``.
    StainError
        RGB brightfield without ``allow_brightfield`` (and ``channel='auto'``); a channel name
        that is not in the file, or no nuclear stain to choose.
    """
    slide = Slide(
        path_or_reader,
        mpp=mpp,
        channel=channel,
        channels=channels,
        normalize=normalize,
        allow_brightfield=allow_brightfield,
        intensity=intensity,
        analysis_size=analysis_size,
        reader=reader,
        plane=plane,
    )
    try:
        slide._analyse_inputs()
    except SlideReadError as exc:
        logger.warning("%s: cannot analyse the thumbnail yet (%s)", slide.path, exc)
    return slide


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileData:
    """One streamed tile: the tile, its window (or None) and the read error (or None)."""

    tile: Any
    image: np.ndarray | None
    error: SlideReadError | None = None


def iter_tiles(slide: Slide, grid: Any, *, halo: bool = True) -> Iterator[TileData]:
    """Read the tiles of a grid one at a time (bounded memory: one window alive per step).

    Parameters
    ----------
    slide : Slide
        The slide the grid was made for.
    grid : TileGrid
        From :func:`wsi_hipe.tiling.make_grid` with this slide's dimensions and mpp.
    halo : bool, default True
        Read core + halo windows (``grid.window`` square) or only the cores.

    Yields
    ------
    TileData
        ``image`` is (h, w) float32; a tile whose pixels cannot be decoded comes with
        ``image=None`` and its ``SlideReadError``, and the stream goes on.
    """
    if tuple(grid.level0_size) != tuple(slide.dimensions) or not math.isclose(
        grid.slide_mpp, slide.mpp, rel_tol=1e-9
    ):
        raise ValueError(
            f"grid was made for a slide of {grid.level0_size} px at {grid.slide_mpp} µm/px, "
            f"not {slide.dimensions} at {slide.mpp}; make it with make_grid(slide.dimensions, "
            "slide_mpp=slide.mpp, ...)"
        )
    for tile in grid.tiles:
        x0, y0, w, h = grid.read_window(tile, halo=halo)
        try:
            image = slide.read(x0, y0, w, h, mpp=grid.target_mpp)
        except SlideReadError as exc:
            yield TileData(tile, None, exc)
            continue
        yield TileData(tile, image)
