"""What a run records about its inputs: the slide's and the model's identity, package versions.

Every output stores these next to the resolved configuration (DESIGN.md, "Output"), and the
pipeline's resume fingerprint is built from the identities:

- :func:`slide_identity` — the slide's own provenance (``Slide.provenance()``: reader, vendor,
  OpenSlide quickhash, stain settings), its path, mpp and level-0 dimensions, and the SHA-256
  of the file when it is at most :data:`HASH_LIMIT` bytes (larger slides are identified by the
  quickhash alone: hashing tens of GB would cost more than the run);
- :func:`model_identity` — the weights' SHA-256, or a hash of the parameters of an in-memory
  network, or the qualified name of a plain callable;
- :func:`package_versions` — the versions of the packages that change the numbers.

Hashes are computed with :func:`wsi_hipe.models.file_sha256`, the project's one file hash.
"""

from __future__ import annotations

import hashlib
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from wsi_hipe.models import file_sha256

__all__ = [
    "HASH_LIMIT",
    "VERSIONED_PACKAGES",
    "slide_identity",
    "model_identity",
    "package_versions",
]

logger = logging.getLogger(__name__)

#: Slides up to this size (bytes) are identified by their SHA-256.
HASH_LIMIT = 4 << 30

#: Distributions whose versions every run records.
VERSIONED_PACKAGES = (
    "wsi-hipe",
    "torch",
    "segmentation-models-pytorch",
    "numpy",
    "zarr",
    "ome-zarr",
    "dask",
    "distributed",
    "openslide-python",
    "openslide-bin",
)


def slide_path(slide: Any) -> str | None:
    """The file a slide was opened from (its own ``path`` or its reader's), if it exists."""
    path = getattr(slide, "path", None)
    if path is None:
        reader = getattr(slide, "reader", None)
        path = getattr(reader, "path", None)
    if path is not None and Path(str(path)).exists():
        return str(path)
    return None


def slide_identity(slide: Any) -> dict[str, Any]:
    """Provenance of a slide and the facts that identify it.

    Parameters
    ----------
    slide : Slide
        An opened :class:`wsi_hipe.slide.Slide` (or anything with ``mpp`` and ``dimensions``;
        ``provenance()`` and ``path`` are used when present).

    Returns
    -------
    dict
        ``Slide.provenance()`` (when it has one; a failure there is logged, never raised) with
        ``path`` (None for an in-memory slide), ``mpp`` (µm per level-0 px), ``dimensions``
        (level-0 ``[width, height]``) and ``sha256`` (files up to :data:`HASH_LIMIT` bytes).
    """
    prov: dict[str, Any] = {}
    getter = getattr(slide, "provenance", None)
    if callable(getter):
        try:
            prov = dict(getter())
        except Exception:  # provenance must never stop a run
            logger.debug("slide provenance failed", exc_info=True)
    path = slide_path(slide)
    prov.setdefault("path", path)
    prov["mpp"] = float(slide.mpp)
    prov["dimensions"] = list(slide.dimensions)
    if not prov.get("sha256") and path is not None and Path(path).is_file():
        if Path(path).stat().st_size <= HASH_LIMIT:
            prov["sha256"] = file_sha256(path)
        else:  # OpenSlide's quickhash (metadata + smallest level) identifies huge files
            logger.info("slide larger than %d bytes: identified by quickhash", HASH_LIMIT)
    return prov


def model_identity(model: Any) -> str:
    """A string that changes whenever the model's outputs can change.

    Parameters
    ----------
    model : SegmentationModel
        A loaded model (:func:`wsi_hipe.models.load_model`).

    Returns
    -------
    str
        The weights file's SHA-256 (hex); ``"state:<sha256>"`` of the parameters and buffers of
        an in-memory network; ``"callable:<qualified name>"`` for a plain function.
    """
    sha = getattr(model.meta, "sha256", None)
    if sha:
        return sha
    network = getattr(model, "network", None)
    if network is None:
        fn = getattr(model, "_fn", None)
        return "callable:" + getattr(fn, "__qualname__", type(fn).__name__)
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "state:" + digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED_PACKAGES` (those not installed are left out)."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
