"""The in-memory backend: :class:`ArrayReader` serves an array (tests, notebooks) as a slide."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from wsi_hipe.slide._resample import reader_thumbnail

__all__ = ["ArrayReader"]


class ArrayReader:
    """:class:`SlideReader` serving an image in memory.

    Parameters
    ----------
    array : (H, W), (H, W, 3) or (H, W, 4) ndarray
        uint8, or float in [0, 1] (scaled to 0..255). (H, W) is a single-channel stain (served
        as R = G = B); 4 channels are premultiplied RGBA.
    mpp : float, optional
        µm per px of ``array``; None imitates a slide without metadata.
    downsamples : sequence of int, default (1,)
        Pyramid levels to build by area averaging, starting with 1 (e.g. ``(1, 2, 4)``).
    path : str, default "<array>"
        Name used in messages and provenance.
    """

    vendor = "array"

    def __init__(
        self,
        array: np.ndarray,
        *,
        mpp: float | None = None,
        downsamples: Sequence[int] = (1,),
        path: str = "<array>",
    ) -> None:
        a = np.asarray(array)
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
            raise ValueError(f"array must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
        if a.dtype == np.uint8:
            pass
        elif np.issubdtype(a.dtype, np.floating):
            if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
                raise ValueError("a float array must hold values in [0, 1]; scale it first")
            a = np.round(a * 255.0).astype(np.uint8)
        else:
            raise ValueError(
                f"array must be uint8 or float in [0, 1], got {a.dtype}; convert it, e.g. "
                "(a / a.max() * 255).astype(np.uint8)"
            )
        if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
            raise ValueError(f"mpp must be a positive number of µm per px or None, got {mpp!r}")
        ds = [int(d) for d in downsamples]
        if not ds or ds[0] != 1 or any(b <= a_ for a_, b in zip(ds, ds[1:], strict=False)):
            raise ValueError(
                f"downsamples must start with 1 and increase, e.g. (1, 2, 4), got {downsamples!r}"
            )
        self.path = path
        self._mpp = None if mpp is None else float(mpp)
        self._levels: list[np.ndarray] = []
        for d in ds:
            h, w = a.shape[0] // d, a.shape[1] // d
            if h == 0 or w == 0:
                raise ValueError(f"downsample {d} is larger than the array {a.shape[:2]}")
            if d == 1:
                self._levels.append(a)
                continue
            block = a[: h * d, : w * d].astype(np.float32)
            block = block.reshape(h, d, w, d, *a.shape[2:]).mean(axis=(1, 3))
            self._levels.append(np.round(block).astype(np.uint8))
        self._downsamples = tuple(float(d) for d in ds)

    def __repr__(self) -> str:
        return f"ArrayReader({self.path!r}, shape={self._levels[0].shape}, mpp={self._mpp})"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.shape[1], lv.shape[0]) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        return self._mpp

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Premultiplied RGBA (height, width, 4) uint8; zeros outside the array."""
        if not 0 <= level < len(self._levels):
            raise ValueError(f"level must be in 0..{len(self._levels) - 1}, got {level}")
        width, height = int(size[0]), int(size[1])
        d = self._downsamples[level]
        x = int(math.floor(location[0] / d))
        y = int(math.floor(location[1] / d))
        src = self._levels[level]
        out = np.zeros((height, width, 4), dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, src.shape[1]), min(y + height, src.shape[0])
        if x1 <= x0 or y1 <= y0:
            return out
        part = src[y0:y1, x0:x1]
        dst = out[y0 - y : y1 - y, x0 - x : x1 - x]
        if part.ndim == 2:
            dst[..., :3] = part[..., None]
            dst[..., 3] = 255
        elif part.shape[2] == 3:
            dst[..., :3] = part
            dst[..., 3] = 255
        else:
            dst[...] = part
        return out

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """Premultiplied RGBA thumbnail (h, w, 4) uint8 whose longer side is ``<= max_size``."""
        return reader_thumbnail(self, max_size)

    def close(self) -> None:
        """Nothing to release."""
