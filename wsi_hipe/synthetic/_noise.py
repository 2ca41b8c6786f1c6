"""Counter-based random numbers and smooth noise at absolute coordinates.

Every random quantity of the virtual slide is a pure function of integer keys (the slide seed,
a domain name, lattice or pixel indices): a SplitMix64-style hash of those keys. Nothing depends
on the order in which regions are rendered, so any sub-window renders the same numbers as the
crop of a bigger window.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["domain", "hash64", "normal", "smoothstep", "uniform", "value_noise"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_U = np.uint64
_TWO_M53 = 2.0**-53


def domain(name: str) -> int:
    """A stable integer key for a named random stream (``"tissue"``, ``"pixel-noise"``, ...)."""
    return zlib.crc32(name.encode("utf-8"))


def _mix_int(z: int) -> int:
    # SplitMix64 finaliser (Steele, Lea & Flood 2014) on Python ints: a bijection of 64-bit
    # integers whose output bits all depend on all input bits.
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK
    return z ^ (z >> 31)


def _mix_arr(z: np.ndarray) -> np.ndarray:
    # The same finaliser on uint64 arrays (ndim >= 1: array integer ops wrap without warnings).
    z = (z ^ (z >> _U(30))) * _U(_MUL1)
    z = (z ^ (z >> _U(27))) * _U(_MUL2)
    return z ^ (z >> _U(31))


def hash64(*keys) -> np.ndarray:
    """Hash integer keys (ints or broadcastable int arrays) to uint64, elementwise.

    The result depends only on the key values, not on whether a key came as a Python int or an
    array, so scalar and vectorised callers agree.
    """
    h: int | np.ndarray = 0
    for key in keys:
        if isinstance(h, int) and np.ndim(key) == 0:
            h = _mix_int(((h + _GOLDEN) & _MASK) ^ (int(key) & _MASK))
            continue
        k = np.asarray(key)
        if k.ndim == 0:
            k = k.reshape(1)
        if k.dtype != np.uint64:
            k = k.astype(np.int64).view(np.uint64)
        if isinstance(h, int):
            h = _mix_arr(_U((h + _GOLDEN) & _MASK) ^ k)
        else:
            h = _mix_arr((h + _U(_GOLDEN)) ^ k)
    if isinstance(h, int):
        return np.asarray(h, dtype=np.uint64)
    return h


def uniform(*keys) -> np.ndarray:
    """Uniform float64 in ``[0, 1)`` from integer keys (53 random bits)."""
    return (hash64(*keys) >> _U(11)).astype(np.float64) * _TWO_M53


def normal(*keys, dtype=np.float32) -> np.ndarray:
    """Approximately standard normal numbers from integer keys.

    Irwin–Hall: the sum of the four 16-bit quarters of the hash, centred and scaled to unit
    variance (bounded by ±2√3 ≈ ±3.46). Cheap and plenty for image noise.
    """
    h = hash64(*keys)
    m = _U(0xFFFF)
    s = (h & m) + ((h >> _U(16)) & m) + ((h >> _U(32)) & m) + (h >> _U(48))
    out = (s.astype(dtype) - dtype(131070.0)) * dtype(np.sqrt(3.0) / 65536.0)
    return out


def smoothstep(t: np.ndarray) -> np.ndarray:
    """Cubic Hermite step: 0 below 0, 1 above 1, C1-smooth in between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def value_noise(seed: int, key: int, x_um, y_um, scale_um: float) -> np.ndarray:
    """Smooth value noise in ``[0, 1]`` at absolute positions (µm).

    Random values sit on a square lattice of spacing ``scale_um`` (hashed from the node index),
    turned by an angle drawn from ``(seed, key)`` so that thresholded shapes show no preferred
    axis; between nodes they are blended with a smoothstep. ``x_um`` and ``y_um`` broadcast
    against each other. Only the lattice nodes in the bounding box of the positions are hashed.
    """
    angle = 2.0 * np.pi * float(uniform(seed, key, -1))
    ca, sa = np.cos(angle) / scale_um, np.sin(angle) / scale_um
    x_um = np.asarray(x_um, dtype=np.float64)
    y_um = np.asarray(y_um, dtype=np.float64)
    gx = x_um * ca - y_um * sa
    gy = x_um * sa + y_um * ca
    fx = np.floor(gx)
    fy = np.floor(gy)
    sx = smoothstep(gx - fx)
    sy = smoothstep(gy - fy)
    ix = fx.astype(np.int64)
    iy = fy.astype(np.int64)
    x0, x1 = int(ix.min()), int(ix.max()) + 1
    y0, y1 = int(iy.min()), int(iy.max()) + 1
    n_points = np.broadcast_shapes(ix.shape, iy.shape)
    n_points = int(np.prod(n_points)) if n_points else 1
    if (x1 - x0 + 1) * (y1 - y0 + 1) <= 4 * n_points:
        # dense positions: hash each lattice node of the bounding box once, then gather
        table = uniform(seed, key, np.arange(y0, y1 + 1)[:, None], np.arange(x0, x1 + 1)[None, :])
        cx = ix - x0
        cy = iy - y0
        v00 = table[cy, cx]
        v10 = table[cy, cx + 1]
        v01 = table[cy + 1, cx]
        v11 = table[cy + 1, cx + 1]
    else:  # scattered positions: hash the four corners of each
        v00 = uniform(seed, key, iy, ix)
        v10 = uniform(seed, key, iy, ix + 1)
        v01 = uniform(seed, key, iy + 1, ix)
        v11 = uniform(seed, key, iy + 1, ix + 1)
    top = v00 + sx * (v10 - v00)
    bottom = v01 + sx * (v11 - v01)
    return top + sy * (bottom - top)
