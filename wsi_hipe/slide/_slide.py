"""The :class:`Slide`: a slide read at a target µm/px as a normalised stain image.

:func:`open_slide` wraps a path (opened with the OpenSlide backend, one handle per process) or
any :class:`SlideReader`; :func:`iter_tiles` streams the windows of a tile grid. A
:class:`Slide` pickles as its path, options and resolved stain settings and reopens lazily in
the worker. A region whose pixels cannot be decoded raises :class:`SlideReadError` for that
region only (the handle is reopened for the next read).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_hipe.errors import MissingMppError, SlideReadError
from wsi_hipe.slide._openslide import evict_reader, open_reader, resolve_slide_path
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
    dimensions : (int, int)
        Level-0 ``(width, height)`` in px.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | SlideReader,
        *,
        mpp: float | None = None,
        channel: str | int = "auto",
        normalize: bool = True,
        allow_brightfield: bool = False,
        intensity: tuple[float, float] | None = None,
        analysis_size: int = ANALYSIS_SIZE,
    ) -> None:
        self._channel_opt = channel_option(channel)
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
        self._normalize = bool(normalize)
        self._allow_brightfield = bool(allow_brightfield)
        self._intensity_opt = intensity
        self._analysis_size = int(analysis_size)
        self._mpp_override = None if mpp is None else float(mpp)
        self._stain: Stain | None = None
        self._extract: Extract | None = None
        if isinstance(source, (str, os.PathLike)):
            reader = open_reader(resolve_slide_path(source))
            self._path: str | None = reader.path
            self._array_reader: SlideReader | None = None
        elif isinstance(source, SlideReader):
            self._path = None
            self._array_reader = source
            reader = source
        else:
            raise TypeError(
                f"open_slide needs a path or a SlideReader, got {type(source).__name__}"
            )
        self._bind(reader)

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
            raise MissingMppError(
                f"slide {reader.path} has no µm/px metadata (openslide.mpp-x); pass --mpp 0.5 "
                "(µm per level-0 px) or set slide.mpp in the config"
            )
        self.path = reader.path
        self.mpp = float(mpp)
        self.mpp_source = "override" if self._mpp_override is not None else "metadata"
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
        return open_reader(str(self._path))

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, dimensions={self.dimensions}, mpp={self.mpp:.4g})"

    def close(self) -> None:
        """Drop this process's cached handle of the slide (a later read reopens it)."""
        if self._path is not None:
            evict_reader(self._path)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stain analysis -------------------------------------------------------------------

    def _read_raw(
        self, x0: float, y0: float, width: int, height: int, scale: float, extract: Extract
    ) -> np.ndarray:
        try:
            return read_resampled(self.reader, x0, y0, width, height, scale, extract)
        except SlideReadError:
            if self._path is not None:
                evict_reader(self._path)  # an OpenSlide handle stays broken after an error
            raise

    def _analyse(self) -> Stain:
        if self._stain is not None:
            return self._stain
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

    def _ensure_analysed(self) -> tuple[Stain, Extract]:
        stain = self._analyse()
        if self._extract is None:
            self._extract = extractor(stain.mode, stain.channel)
        return stain, self._extract

    @property
    def channel(self) -> int | None:
        """The RGB channel read as the stain, or None (single channel: mean of R, G, B)."""
        return self._analyse().channel

    @property
    def intensity(self) -> tuple[float, float]:
        """``(low, high)`` raw stain values (0..255) mapped to 0 and 1."""
        stain = self._analyse()
        return stain.low, stain.high

    # --- reading --------------------------------------------------------------------------

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
        if not (isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a positive number of µm per target px, got {mpp!r}")
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer (target px), got {v!r}")
        if not (math.isfinite(x0) and math.isfinite(y0)):
            raise ValueError(f"x0, y0 must be finite level-0 px, got {(x0, y0)!r}")
        stain, extract = self._ensure_analysed()
        scale = float(mpp) / self.mpp
        raw = self._read_raw(float(x0), float(y0), int(width), int(height), scale, extract)
        return normalise(raw, stain)

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
        return normalise(self._read_raw(0.0, 0.0, w, h, scale, extract), stain)

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
        return {
            "path": self.path,
            "reader": type(self.reader).__name__,
            "vendor": self.vendor,
            "quickhash": self.quickhash,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "dimensions": list(self.dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "stain_mode": stain.mode,
            "channel": stain.channel,
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
    channel: str | int = "auto",
    normalize: bool = True,
    allow_brightfield: bool = False,
    intensity: tuple[float, float] | None = None,
    analysis_size: int = ANALYSIS_SIZE,
) -> Slide:
    """Open a slide for reading at a target resolution.

    Parameters
    ----------
    path_or_reader : str, PathLike or SlideReader
        A slide file, a folder holding one slide (DICOM), or a reader (e.g. ArrayReader).
    mpp : float, optional
        µm per level-0 px; overrides the metadata (``--mpp`` / ``slide.mpp``).
    channel : {'auto', 'mean', 0, 1, 2, 'red', 'green', 'blue'}, default 'auto'
        Which RGB channel holds the stain (see the module docs).
    normalize : bool, default True
        Scale intensities from thumbnail percentiles; False gives ``x / 255``.
    allow_brightfield : bool, default False
        Accept an RGB brightfield slide by inverting it instead of raising StainError.
    intensity : (float, float), optional
        Raw ``(low, high)`` values (0..255) mapped to 0 and 1, instead of the percentiles.
    analysis_size : int, default 1024
        Longer side of the thumbnail used to detect the channel and the intensity range.

    Returns
    -------
    Slide
        The channel and intensity range are found now; when the thumbnail's pixels cannot be
        decoded, that is logged and retried at the first read, which then raises
        SlideReadError.

    Raises
    ------
    SlideNotFoundError, SlideFormatError, SlideError
        Missing path, no/several slides in a folder, not a slide, corrupt, empty, no permission.
    MissingMppError
        No µm/px metadata and no ``mpp``.
    StainError
        RGB brightfield without ``allow_brightfield`` (and ``channel='auto'``).
    """
    slide = Slide(
        path_or_reader,
        mpp=mpp,
        channel=channel,
        normalize=normalize,
        allow_brightfield=allow_brightfield,
        intensity=intensity,
        analysis_size=analysis_size,
    )
    try:
        slide._analyse()
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
