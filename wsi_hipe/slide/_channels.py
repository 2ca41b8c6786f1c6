"""Channels of multi-channel (fluorescence, multiplex) slides: names, choice, planes, raw range.

Choosing a channel
------------------
:func:`select_channel` takes what a user passes as ``slide.channel`` / ``--channel``:

* an index (``2`` or ``"2"``);
* a name from the file's metadata (OME ``Channel@Name``, QPTIFF ``Name``/``Biomarker``, NGFF
  ``omero`` labels), case-insensitive; an exact name wins, else a unique prefix (``"hoe"`` for
  ``"Hoechst 33342"``); several channels matching is an error listing them;
* ``"auto"``: the nuclear stain by name, or the only channel (``"mean"`` also names the only
  channel, as it names the gray of an RGB slide). A name is a nuclear stain when
  one of its words is (or is followed only by digits) one of :data:`NUCLEAR_STAINS` — DAPI,
  Hoechst, DNA, DRAQ5/7, NucBlue, "nuclear", "nuclei", SYTO, TO-PRO, RedDot, or an iridium
  DNA intercalator of imaging mass cytometry (Ir191/Ir193). When every match is the same stain
  (a cyclic immunofluorescence file has a DNA channel per cycle: DNA_1, DNA_2, ...), the first
  is used (the first cycle's, the registration reference); matches of different stains, or no
  match among several channels, are an error that lists the channels and names the option. A
  channel that the metadata marks as transmitted light (OME ``IlluminationType``) is not taken
  as a stain by ``"auto"``.

:func:`select_channels` does the same for ``slide.channels`` (several channels fed to a model
with ``in_channels > 1``, in that order); :func:`check_model_channels` compares them with the
names a model was trained on (nuclear stains are interchangeable: a model trained on Hoechst
reads DAPI).

Planes
------
Z-stacks and time series (4-D/5-D files) need one plane per extra axis: ``slide.plane``
(:func:`parse_plane`: ``3``, ``"z=3"``, ``"z=3,t=0"`` or a mapping) is checked against the file's
axes by :func:`resolve_plane`, whose errors name the axes and their sizes.

Raw range
---------
:func:`raw_max` is the largest value a channel can hold: ``2**bits - 1`` for the significant
bits a file states (12-bit cameras store uint16), else the dtype's maximum (8/16-bit), 1 for
floats. Intensities are scaled on this raw range, never on a uint8 rendering of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from wsi_hipe.errors import ConfigError, SlideFormatError, StainError

__all__ = [
    "ChannelInfo",
    "ChannelSpec",
    "PlaneSpec",
    "NUCLEAR_STAINS",
    "describe_channels",
    "nuclear_stain",
    "select_channel",
    "select_channels",
    "check_model_channels",
    "parse_plane",
    "resolve_plane",
    "raw_max",
]

logger = logging.getLogger(__name__)

#: What ``slide.channel`` accepts for a multi-channel slide: an index, a name or "auto".
ChannelSpec = int | str
#: What ``slide.plane`` accepts: a plane index, "z=3,t=0", or {"z": 3, "t": 0}.
PlaneSpec = int | str | Mapping[str, int] | None

#: Nuclear stains recognised by name: stain -> words (a word may be followed by digits).
NUCLEAR_STAINS: dict[str, tuple[str, ...]] = {
    "DAPI": ("dapi",),
    "Hoechst": ("hoechst", "hoe", "h33342", "h33258"),
    "DNA": ("dna",),
    "DRAQ": ("draq",),
    "nuclear": ("nuclear", "nuclei", "nucleus", "nuc", "nucblue", "nucspot", "nucred"),
    "SYTO": ("syto",),
    "TO-PRO": ("topro",),
    "RedDot": ("reddot",),
}
_IRIDIUM = re.compile(r"^(ir19[13](di)?|19[13]ir)$")
#: Most channels an error message lists one by one.
_LIST_MAX = 64


@dataclass(frozen=True)
class ChannelInfo:
    """One channel as the file describes it.

    Attributes
    ----------
    name : str or None
        The name in the metadata (None when the file names none).
    color : (int, int, int) or None
        Display colour (RGB 0..255) from the metadata.
    fluor : str or None
        Fluorophore (OME ``Fluor``), if stated.
    illumination : str or None
        OME ``IlluminationType`` ("Epifluorescence", "Transmitted", ...), if stated.
    """

    name: str | None = None
    color: tuple[int, int, int] | None = None
    fluor: str | None = None
    illumination: str | None = None

    @property
    def transmitted(self) -> bool:
        """The metadata says this is transmitted light (brightfield), not fluorescence."""
        text = " ".join(v for v in (self.illumination, self.fluor) if v).lower()
        return "transmitted" in text or "brightfield" in text


def _label(i: int, info: ChannelInfo) -> str:
    return f"{i} {info.name!r}" if info.name else f"{i} (no name)"


def describe_channels(channels: Sequence[ChannelInfo]) -> str:
    """The channels for a message: ``"0 'DAPI', 1 'CD3'"``, or ``"48 channels without names"``."""
    if not channels:
        return "no channels"
    if not any(c.name for c in channels):
        return f"{len(channels)} channel(s) without names (0-{len(channels) - 1})"
    parts = [_label(i, c) for i, c in enumerate(channels[:_LIST_MAX])]
    if len(channels) > _LIST_MAX:
        parts.append(f"... ({len(channels)} in all)")
    return ", ".join(parts)


def _words(name: str) -> set[str]:
    low = name.lower()
    words = set(re.findall(r"[a-z0-9µ]+", low))
    words.update(re.findall(r"[a-z0-9µ]+", low.replace("-", "")))
    return words


def nuclear_stain(name: str | None) -> str | None:
    """The nuclear stain a channel name denotes (a key of :data:`NUCLEAR_STAINS`), or None."""
    if not name:
        return None
    for word in _words(name):
        if _IRIDIUM.match(word):
            return "iridium"
        for stain, keys in NUCLEAR_STAINS.items():
            for key in keys:
                if word == key or (word.startswith(key) and word[len(key) :].isdigit()):
                    return stain
    return None


def _as_index(spec: object) -> int | None:
    if isinstance(spec, (bool, np.bool_)):
        return None
    if isinstance(spec, (int, np.integer)):
        return int(spec)
    if isinstance(spec, str) and spec.strip().isdigit():
        return int(spec.strip())
    return None


def select_channel(
    spec: ChannelSpec, channels: Sequence[ChannelInfo], *, path: str, option: str = "channel"
) -> tuple[int, str]:
    """The channel index that ``spec`` denotes, and how it was chosen (for provenance).

    Parameters
    ----------
    spec : int or str
        An index, a channel name (case-insensitive, exact or a unique prefix) or ``"auto"``.
    channels : sequence of ChannelInfo
        The file's channels, in order.
    path : str
        The slide, for messages.
    option : str, default "channel"
        The option named in messages (``--channel`` / ``slide.channel``).

    Returns
    -------
    (int, str)
        The index and a sentence such as ``"by name: 'DAPI' (channel 0)"``.

    Raises
    ------
    StainError
        Out-of-range index, unknown or ambiguous name, or ``"auto"`` without a single nuclear
        stain; the message lists the channels and the option to pass.
    """
    n = len(channels)
    fix = f"pass --{option} NAME or INDEX (slide.{option})"
    index = _as_index(spec)
    if index is not None:
        if not 0 <= index < n:
            raise StainError(
                f"{option} {index} is out of range: slide {path} has {n} channel(s): "
                f"{describe_channels(channels)}"
            )
        return index, f"explicit: channel {_label(index, channels[index])}"
    if not isinstance(spec, str) or not spec.strip():
        raise StainError(f"{option} must be 'auto', a channel index or a name, got {spec!r}")
    text = spec.strip()
    if text.lower() == "auto":
        return _auto_channel(channels, path=path, fix=fix)
    if text.lower() == "mean" and n == 1:  # RGB slides' "mean of R, G, B" of a gray image
        return 0, "explicit: mean (single channel)"
    low = text.lower()
    exact = [i for i, c in enumerate(channels) if c.name and c.name.strip().lower() == low]
    matches = exact or [
        i for i, c in enumerate(channels) if c.name and c.name.strip().lower().startswith(low)
    ]
    if len(matches) == 1:
        i = matches[0]
        how = "name" if exact else "name prefix"
        return i, f"by {how} {text!r}: channel {_label(i, channels[i])}"
    if not matches:
        raise StainError(
            f"slide {path} has no channel named {text!r}; its channels: "
            f"{describe_channels(channels)}; {fix}"
        )
    listed = ", ".join(_label(i, channels[i]) for i in matches)
    raise StainError(
        f"{option} {text!r} matches several channels of slide {path} ({listed}); give the full "
        f"name or the index: {fix}"
    )


def _auto_channel(channels: Sequence[ChannelInfo], *, path: str, fix: str) -> tuple[int, str]:
    n = len(channels)
    found = [(i, nuclear_stain(c.name)) for i, c in enumerate(channels)]
    found = [(i, s) for i, s in found if s is not None and not channels[i].transmitted]
    stains = sorted({s for _, s in found})
    if len(stains) == 1:
        i = found[0][0]
        others = len(found) - 1
        more = f" (and {others} more {stains[0]} channel(s); the first is used)" if others else ""
        if others:
            logger.info(
                "%s: %d %s channels; using the first, %s",
                path,
                others + 1,
                stains[0],
                _label(i, channels[i]),
            )
        return i, f"auto: nuclear stain by name, channel {_label(i, channels[i])}{more}"
    if len(stains) > 1:
        listed = ", ".join(_label(i, channels[i]) for i, _ in found)
        raise StainError(f"slide {path} has several nuclear stains ({listed}); choose one: {fix}")
    if n == 1:
        if channels[0].transmitted:
            raise StainError(
                f"the only channel of slide {path}, {_label(0, channels[0])}, is transmitted "
                f"light (illumination {channels[0].illumination!r}, fluor "
                f"{channels[0].fluor!r}), not a fluorescence nuclear stain; pass --channel 0 "
                "(slide.channel) to use it anyway"
            )
        return 0, "auto: single channel"
    if n == 0:
        raise SlideFormatError(f"slide {path} has no channels")
    raise StainError(
        f"cannot tell which channel of slide {path} is the nuclear stain: no channel name is a "
        f"nuclear stain (DAPI, Hoechst, DNA, ...); its channels: {describe_channels(channels)}; "
        f"{fix}"
    )


def select_channels(
    specs: Sequence[ChannelSpec],
    channels: Sequence[ChannelInfo],
    *,
    path: str,
    option: str = "channels",
) -> tuple[tuple[int, ...], str]:
    """Indices for ``slide.channels`` (in that order; no channel twice) and how they were chosen.

    Each item is resolved as by :func:`select_channel` (``"auto"`` = the nuclear stain).

    Raises
    ------
    StainError
        An empty list, a channel that cannot be resolved, or a channel given twice.
    """
    if isinstance(specs, (str, bytes)) or not len(specs):
        raise StainError(
            f"{option} must be a non-empty list of channel names or indices, got {specs!r}"
        )
    picks = [select_channel(s, channels, path=path, option=option) for s in specs]
    indices = tuple(i for i, _ in picks)
    seen: dict[int, int] = {}
    for pos, i in enumerate(indices):
        if i in seen:
            raise StainError(
                f"{option} lists channel {_label(i, channels[i])} twice (items {seen[i]} and "
                f"{pos}: {specs[seen[i]]!r}, {specs[pos]!r})"
            )
        seen[i] = pos
    return indices, "; ".join(how for _, how in picks)


def _same_channel(trained: str, name: str | None) -> bool:
    if name is None:
        return True
    if trained.strip().lower() == name.strip().lower():
        return True
    a, b = nuclear_stain(trained), nuclear_stain(name)
    return a is not None and b is not None


def check_model_channels(
    model_channels: Sequence[str] | None,
    used: Sequence[ChannelInfo],
    *,
    path: str,
    model: str = "the model",
) -> None:
    """Refuse slide channels that differ from those ``model`` was trained on.

    Parameters
    ----------
    model_channels : sequence of str or None
        Channel names from the model's sidecar, in input order (None: not recorded, accepted).
    used : sequence of ChannelInfo
        The slide channels that will be fed to the model, in order.

    Raises
    ------
    StainError
        A different number of channels, or a named channel that is not the one trained on
        (nuclear stains match each other; unnamed slide channels are accepted with a warning).
    """
    if model_channels is None:
        return
    names = [c.name for c in used]
    if len(model_channels) != len(used):
        raise StainError(
            f"{model} was trained on {len(model_channels)} channel(s) {list(model_channels)}, "
            f"but {len(used)} channel(s) of slide {path} are selected ({names}); set "
            "slide.channels to the slide's names for them, in that order"
        )
    wrong = [
        (i, t, n)
        for i, (t, n) in enumerate(zip(model_channels, names, strict=True))
        if not _same_channel(t, n)
    ]
    if wrong:
        detail = "; ".join(f"input {i}: trained on {t!r}, slide gives {n!r}" for i, t, n in wrong)
        raise StainError(
            f"the channels of slide {path} do not match {model}'s ({detail}); set slide.channels "
            f"to the slide's names for {list(model_channels)}, in that order"
        )
    if any(n is None for n in names):
        logger.warning(
            "%s: unnamed channels fed to %s (trained on %s); check slide.channels",
            path,
            model,
            list(model_channels),
        )


def parse_plane(value: PlaneSpec) -> dict[str, int]:
    """``slide.plane`` as ``{axis: index}``; a bare index has the key ``""`` (the one extra axis).

    Accepts None (no plane), an int, ``"3"``, ``"z=3"``, ``"z=3,t=0"`` or a mapping.

    Raises
    ------
    ConfigError
        Anything else, or a negative index (a ``ValueError`` too).
    """
    if value is None:
        return {}
    items: list[tuple[str, object]]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items = [("", int(value))]
    elif isinstance(value, str):
        items = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, num = part.partition("=")
            items.append((key.strip(), num.strip()) if sep else ("", key.strip()))
    else:
        raise ConfigError(f"plane must be an index or 'z=3,t=0', got {value!r}")
    out: dict[str, int] = {}
    for key, raw in items:
        index = _as_index(raw)
        if index is None or index < 0 or (key and not key.isalpha()):
            raise ConfigError(f"plane must be an index or 'z=3,t=0', got {value!r}")
        out[key.lower()] = index
    return out


def resolve_plane(
    plane: Mapping[str, int], extra_axes: Mapping[str, int], *, path: str
) -> dict[str, int]:
    """One index per extra axis (not y, x or the channel axis) of a file.

    Parameters
    ----------
    plane : mapping
        From :func:`parse_plane`.
    extra_axes : mapping
        Axis name (lower case: "z", "t", ...) -> size, for every axis besides y, x, channels.

    Returns
    -------
    dict
        ``{axis: index}`` for every extra axis (size-1 axes get 0).

    Raises
    ------
    SlideFormatError
        An axis of size > 1 with no index ("a Z-stack: pick one plane with slide.plane").
    ConfigError
        An index out of range or an axis the file does not have (a ``ValueError`` too).
    """
    sizes = {k.lower(): int(v) for k, v in extra_axes.items()}
    deep = {k: v for k, v in sizes.items() if v > 1}
    given = dict(plane)
    if "" in given:
        if len(deep) != 1:
            what = ", ".join(f"{k} ({v})" for k, v in deep.items()) or "none of size > 1"
            raise ConfigError(
                f"plane {given['']} is ambiguous for slide {path}: its extra axes are {what}; "
                "name the axis, e.g. --plane z=0"
            )
        given[next(iter(deep))] = given.pop("")
    for key in given:
        if key not in sizes:
            axes = ", ".join(f"{k} ({v})" for k, v in sizes.items()) or "only y, x and channels"
            raise ConfigError(
                f"slide {path} has no {key!r} axis to pick a plane from ({axes}); fix or drop "
                "slide.plane (--plane)"
            )
    missing = [k for k in deep if k not in given]
    if missing:
        what = " and ".join(f"{deep[k]} {k}-planes" for k in missing)
        kind = "a Z-stack" if missing == ["z"] else "more than 2-D"
        example = ",".join(f"{k}={deep[k] // 2}" for k in missing)
        raise SlideFormatError(
            f"slide {path} is {kind} ({what}); pick one plane with --plane {example} (slide.plane)"
        )
    out = {}
    for key, size in sizes.items():
        index = given.get(key, 0)
        if not 0 <= index < size:
            raise ConfigError(
                f"plane {key}={index} is out of range for slide {path} ({key}: {size})"
            )
        out[key] = index
    return out


def raw_max(dtype: np.dtype | type, significant_bits: int | None = None) -> float:
    """The largest raw value of a channel: ``2**bits - 1``, the integer maximum, or 1 (float)."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return 1.0
    if dt.kind in "ui":
        top = int(np.iinfo(dt).max)
        if significant_bits and 0 < int(significant_bits) < dt.itemsize * 8:
            return float(min(top, 2 ** int(significant_bits) - 1))
        return float(top)
    return 1.0
