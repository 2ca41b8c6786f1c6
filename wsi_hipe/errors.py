"""The project's exception hierarchy.

Every error a user can cause is one of these. Each also subclasses the closest built-in
(``OSError``, ``FileNotFoundError``, ``ValueError``) so callers may catch either, and each
message names the offending file or value and says how to fix it.
"""

from __future__ import annotations

__all__ = [
    "WsiHipeError",
    "SlideError",
    "SlideNotFoundError",
    "SlideFormatError",
    "SlideReadError",
    "MissingMppError",
    "StainError",
    "ModelError",
    "CheckpointError",
    "ConfigError",
    "OutputError",
    "ResumeMismatchError",
]


class WsiHipeError(Exception):
    """Base class of every error raised by wsi-hipe on purpose."""


# --- slides -------------------------------------------------------------------------------


class SlideError(WsiHipeError, OSError):
    """A slide could not be opened or read."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist, or a folder holds no slide."""


class SlideFormatError(SlideError):
    """The file exists but is not a slide OpenSlide can open (unsupported, corrupt, empty)."""


class SlideReadError(SlideError):
    """The slide opened, but reading the pixels of one region failed (e.g. corrupt tile data).

    Raised per region, so a pipeline can mark that tile failed and go on.
    """


class MissingMppError(WsiHipeError, ValueError):
    """The slide carries no µm/px metadata and no override was given."""


class StainError(WsiHipeError, ValueError):
    """The slide does not look like a single-stain fluorescence image (e.g. RGB brightfield)."""


# --- models -------------------------------------------------------------------------------


class ModelError(WsiHipeError, ValueError):
    """A model is unusable: wrong input channels, wrong output shape, unknown architecture."""


class CheckpointError(ModelError, OSError):
    """A checkpoint file is missing, corrupt, or disagrees with its sidecar."""


# --- configuration and outputs ------------------------------------------------------------


class ConfigError(WsiHipeError, ValueError):
    """A configuration file or option is invalid; the message names the key."""


class OutputError(WsiHipeError, OSError):
    """An output location cannot be used (exists without --overwrite, outside OUTDIR, ...)."""


class ResumeMismatchError(OutputError):
    """An existing output was made with another config, model or slide; refuse to resume into it."""
