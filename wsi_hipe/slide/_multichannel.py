"""What the tifffile and OME-Zarr readers share: raw channels behind the :class:`SlideReader`.

A fluorescence file holds any number of channels of 8-, 12- or 16-bit (or float) samples. Its
readers (:class:`~wsi_hipe.slide._tiff.TiffReader`, :class:`~wsi_hipe.slide._ngff.NgffReader`)
satisfy :class:`ChannelReader`, which adds to :class:`SlideReader`:

* ``channels`` (one :class:`ChannelInfo` each: name, colour, ...), ``dtype``, ``raw_max``
  (the raw range, :func:`~wsi_hipe.slide._channels.raw_max`), ``is_rgb`` (the three channels
  are the R, G, B of one colour image, e.g. a brightfield TIFF that OpenSlide refuses);
* ``read_channels(location, level, size, channels)`` -> ``(height, width, len(channels))`` raw
  samples in ``dtype``, 0 outside the image;
* ``mpp_source`` and ``mpp_note`` (why the metadata's µm/px was not used, if it was not);
* ``selection`` (which reader was chosen for the file and why; set by
  :func:`~wsi_hipe.slide._choose.open_any_reader`).

``read_region`` still returns premultiplied RGBA ``uint8`` as the Protocol says: the RGB
channels of an RGB file, else the *display channel* (an option of the reader, by default the
first) as gray, ``raw / raw_max`` scaled to 0..255, alpha 255 on the image and 0 beyond it.
That 8-bit view serves callers that know only the Protocol; the stain of a multi-channel slide
is read at full precision with :func:`read_channel_resampled`, which resamples one raw
channel with the same exact box filter (:func:`wsi_hipe.slide._resample.read_resampled`) as
every other read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from wsi_hipe.errors import SlideReadError
from wsi_hipe.slide._channels import ChannelInfo, ChannelSpec, select_channel
from wsi_hipe.slide._metadata import MppInfo
from wsi_hipe.slide._resample import read_resampled, reader_thumbnail, thumbnail_geometry

__all__ = [
    "ChannelReader",
    "ChannelReaderBase",
    "ReaderChoice",
    "ChannelView",
    "RawChannels",
    "read_channel_resampled",
    "read_channels_resampled",
    "channel_thumbnail",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReaderChoice:
    """The reader chosen for a file and why (logged, and kept in the slide's provenance).

    Attributes
    ----------
    kind : {"openslide", "tiff", "ngff"}
    reason : str
        E.g. ``"auto: OME-TIFF (OpenSlide reads neither its channels nor its SubIFD levels)"``.
    """

    kind: str
    reason: str


@runtime_checkable
class ChannelReader(Protocol):
    """A :class:`SlideReader` that also serves raw channels (see the module docs)."""

    path: str

    @property
    def channels(self) -> tuple[ChannelInfo, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def raw_max(self) -> float: ...

    @property
    def is_rgb(self) -> bool: ...

    def read_channels(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        channels: Sequence[int] | None = None,
    ) -> np.ndarray: ...


class ChannelReaderBase:
    """Geometry, raw reads with padding and the RGBA view; subclasses provide the levels.

    A subclass sets, in ``__init__``: ``path``, ``vendor``, ``_dims`` (level (w, h) tuples),
    ``_downsamples``, ``_channels``, ``_dtype``, ``_raw_max``, ``_mpp`` (:class:`MppInfo`),
    ``_rgb`` and calls :meth:`_set_display`; and implements :meth:`_read_window`.
    """

    path: str
    vendor: str | None = None
    quickhash: str | None = None
    selection: ReaderChoice | None = None
    _dims: tuple[tuple[int, int], ...]
    _downsamples: tuple[float, ...]
    _channels: tuple[ChannelInfo, ...]
    _dtype: np.dtype
    _raw_max: float
    _mpp: MppInfo
    _rgb: bool = False
    _display: tuple[int, ...] = (0,)
    _display_method: str = "default: channel 0"

    # --- subclass hook ----------------------------------------------------------------------

    def _read_window(
        self, level: int, x0: int, y0: int, x1: int, y1: int, channels: tuple[int, ...]
    ) -> np.ndarray:
        """Raw ``(y1 - y0, x1 - x0, len(channels))`` of a window inside level ``level``."""
        raise NotImplementedError

    def _set_display(self, channel: ChannelSpec | None) -> None:
        if self._rgb and channel is None:
            self._display, self._display_method = (0, 1, 2), "RGB"
            return
        if channel is None:
            self._display, self._display_method = (0,), "default: channel 0"
            return
        index, how = select_channel(channel, self._channels, path=self.path)
        self._display, self._display_method = (index,), how

    # --- SlideReader ------------------------------------------------------------------------

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dims[0]

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        """µm per level-0 px from the metadata; None when absent or implausible."""
        return self._mpp.mpp

    @property
    def mpp_source(self) -> str | None:
        """Where :attr:`mpp` comes from (e.g. ``"OME PhysicalSizeX/Y"``), or None."""
        return self._mpp.source

    @property
    def mpp_note(self) -> str | None:
        """Why the metadata's µm/px is not used (implausible, unknown unit), or None."""
        return self._mpp.note

    # --- channels ---------------------------------------------------------------------------

    @property
    def channels(self) -> tuple[ChannelInfo, ...]:
        """The file's channels, in index order."""
        return self._channels

    @property
    def channel_names(self) -> tuple[str | None, ...]:
        return tuple(c.name for c in self._channels)

    @property
    def dtype(self) -> np.dtype:
        """The raw sample type."""
        return self._dtype

    @property
    def raw_max(self) -> float:
        """Largest raw sample value (``2**bits - 1`` of the stated bit depth, 1 for floats)."""
        return self._raw_max

    @property
    def is_rgb(self) -> bool:
        """The three channels are the red, green and blue of one colour image."""
        return self._rgb

    @property
    def display_channels(self) -> tuple[int, ...]:
        """The channel(s) that :meth:`read_region` shows (one gray channel, or R, G, B)."""
        return self._display

    def _level_px(self, location: tuple[int, int], level: int) -> tuple[int, int]:
        if not 0 <= level < len(self._dims):
            raise ValueError(f"level must be in 0..{len(self._dims) - 1}, got {level}")
        d = self._downsamples[level]
        return int(math.floor(location[0] / d)), int(math.floor(location[1] / d))

    def _check_channels(self, channels: Sequence[int] | None) -> tuple[int, ...]:
        if channels is None:
            return tuple(range(len(self._channels)))
        out = tuple(int(c) for c in channels)
        n = len(self._channels)
        if not out or any(not 0 <= c < n for c in out):
            raise ValueError(f"channels must be indices in 0..{n - 1}, got {channels!r}")
        return out

    def read_channels(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        channels: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Raw samples of a region.

        Parameters
        ----------
        location : (int, int)
            Top-left ``(x, y)`` in level-0 px.
        level : int
            Pyramid level.
        size : (int, int)
            ``(width, height)`` in px of ``level``.
        channels : sequence of int, optional
            Channel indices (default: all), in the order wanted.

        Returns
        -------
        (height, width, len(channels)) ndarray of :attr:`dtype`
            0 where the region lies beyond the image.

        Raises
        ------
        SlideReadError
            The pixels of this region cannot be read (corrupt or truncated data); other
            regions may still read.
        """
        chans = self._check_channels(channels)
        width, height = int(size[0]), int(size[1])
        if width < 0 or height < 0:
            raise ValueError(f"size must be (width, height) >= 0, got {size!r}")
        x, y = self._level_px(location, level)
        lw, lh = self._dims[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        inside = (x0, y0, x1, y1) == (x, y, x + width, y + height)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((height, width, len(chans)), dtype=self._dtype)
        try:
            part = self._read_window(level, x0, y0, x1, y1, chans)
        except SlideReadError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
            raise SlideReadError(
                f"{self.path}: cannot read region at level-0 {tuple(location)}, level {level}, "
                f"size {(width, height)}: {type(exc).__name__}: {exc}{self._damage_note()}"
            ) from exc
        if inside:
            return part
        out = np.zeros((height, width, len(chans)), dtype=self._dtype)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = part
        return out

    def _damage_note(self) -> str:
        """Extra words for a read error (e.g. that the file is truncated)."""
        return " (corrupt pixel data at that place)"

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Premultiplied RGBA ``(height, width, 4)`` uint8 of the display channel(s)."""
        width, height = int(size[0]), int(size[1])
        raw = self.read_channels(location, level, (width, height), self._display)
        out = np.zeros((height, width, 4), dtype=np.uint8)
        scaled = raw.astype(np.float32)
        scaled *= np.float32(255.0 / self._raw_max)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        np.round(scaled, out=scaled)
        out[..., :3] = scaled.astype(np.uint8)  # one gray channel broadcasts to R, G, B
        x, y = self._level_px(location, level)
        lw, lh = self._dims[level]
        out[
            max(0, -y) : max(0, min(height, lh - y)), max(0, -x) : max(0, min(width, lw - x)), 3
        ] = 255
        return out

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """Premultiplied RGBA thumbnail (h, w, 4) uint8 whose longer side is ``<= max_size``."""
        return reader_thumbnail(self, max_size)

    def close(self) -> None:
        """Release the file (subclasses close their handles)."""


class ChannelView:
    """A :class:`SlideReader` view whose ``read_region`` returns raw channels ``(h, w, k)``.

    :func:`~wsi_hipe.slide._resample.read_resampled` resamples it like any reader, with
    :class:`RawChannels` as the extract, so raw channels get the same exact box filter as RGBA.
    """

    def __init__(self, reader: ChannelReader, channels: Sequence[int]) -> None:
        n = len(reader.channels)
        self._reader = reader
        self.channels = tuple(int(c) for c in channels)
        if not self.channels or any(not 0 <= c < n for c in self.channels):
            raise ValueError(f"channels must be indices in 0..{n - 1}, got {channels!r}")
        self.path = reader.path

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._reader.dimensions  # type: ignore[attr-defined]

    @property
    def level_count(self) -> int:
        return self._reader.level_count  # type: ignore[attr-defined]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._reader.level_dimensions  # type: ignore[attr-defined]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._reader.level_downsamples  # type: ignore[attr-defined]

    @property
    def mpp(self) -> float | None:
        return self._reader.mpp  # type: ignore[attr-defined]

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        return self._reader.read_channels(location, level, size, self.channels)

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        raise NotImplementedError("a ChannelView is read through read_resampled")

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RawChannels:
    """The extract of a :class:`ChannelView` of ``k`` channels: float32 raw values.

    ``(h, w, k)`` samples become ``(h, w)`` for one channel, else ``(h, w, k)``. The
    ``(1, 1, 4)`` probe with which ``read_resampled`` learns an extract's output shape gets the
    shape of ``k`` channels.
    """

    k: int

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if a.shape[-1] != self.k:  # read_resampled's shape probe
            a = np.zeros((*a.shape[:-1], self.k), dtype=np.float32)
        if self.k == 1:
            return a[..., 0].astype(np.float32)
        return a.astype(np.float32)


def read_channel_resampled(
    reader: ChannelReader,
    x0: float,
    y0: float,
    width: int,
    height: int,
    scale: float,
    channel: int,
) -> np.ndarray:
    """One raw channel of a region at ``scale`` level-0 px per output px.

    Parameters
    ----------
    reader : ChannelReader
    x0, y0 : float
        Level-0 px of the region's top-left corner (fractional or outside the image allowed).
    width, height : int
        Output size in px.
    scale : float
        Level-0 px per output px.
    channel : int
        Channel index.

    Returns
    -------
    (height, width) float32 ndarray
        Raw values (0..``reader.raw_max``), area-averaged exactly as :func:`read_resampled`
        does for RGBA; 0 beyond the image.
    """
    if not 0 <= int(channel) < len(reader.channels):
        raise ValueError(f"channel must be in 0..{len(reader.channels) - 1}, got {channel!r}")
    view = ChannelView(reader, (channel,))
    return read_resampled(view, x0, y0, width, height, scale, RawChannels(1))  # type: ignore[arg-type]


def read_channels_resampled(
    reader: ChannelReader,
    x0: float,
    y0: float,
    width: int,
    height: int,
    scale: float,
    channels: Sequence[int],
) -> np.ndarray:
    """Several raw channels of a region, ``(height, width, len(channels))`` float32.

    As :func:`read_channel_resampled`, in one read per block for all channels.
    """
    view = ChannelView(reader, channels)
    extract = RawChannels(len(view.channels))
    out = read_resampled(view, x0, y0, width, height, scale, extract)  # type: ignore[arg-type]
    return out if out.ndim == 3 else out[..., None]


def channel_thumbnail(reader: ChannelReader, max_size: int, channel: int) -> np.ndarray:
    """Raw float32 thumbnail (h, w) of one channel, longer side ``<= max_size``."""
    scale, w, h = thumbnail_geometry(reader.dimensions, max_size)  # type: ignore[attr-defined]
    return read_channel_resampled(reader, 0.0, 0.0, w, h, scale, channel)
