"""Shared test fixtures: isolated caches, the real-data folder, tiny synthetic data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Libraries write caches under ~ (napari, matplotlib, dask scratch, huggingface): keep tests
# hermetic and offline. Set before those libraries are imported by any test module.
_CACHE = Path(tempfile.mkdtemp(prefix="wsi-hipe-test-cache-"))
for _var, _sub in [
    ("XDG_CACHE_HOME", "cache"),
    ("XDG_CONFIG_HOME", "config"),
    ("XDG_DATA_HOME", "data"),
    ("MPLCONFIGDIR", "mpl"),
    ("DASK_TEMPORARY_DIRECTORY", "dask"),
    ("NAPARI_CONFIG", "napari/settings.yaml"),
]:
    os.environ.setdefault(_var, str(_CACHE / _sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_HIPE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test files in ``../shared/data``; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set WSI_HIPE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def nuclei_dir(shared_data: Path) -> Path:
    return shared_data / "nuclei"
