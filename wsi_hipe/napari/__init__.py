"""napari plugin of wsi-hipe: a reader for outputs and slides, and the "Explain (HiPe)" widget.

The plugin is declared in ``napari.yaml`` (npe2), so napari lists it without importing it.
This package is the only part of wsi-hipe that imports napari or Qt, and it does so lazily.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["view", "PLUGIN_NAME"]

logger = logging.getLogger(__name__)

#: The npe2 plugin name (the distribution name).
PLUGIN_NAME = "wsi-hipe"


def _system_llvm_loaded() -> bool:
    """True when a shared LLVM library is mapped into this process (Linux; else False)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def _avoid_llvm_clash() -> None:
    """Keep triton's LLVM and Mesa's LLVM from meeting in one process.

    Triton (torch's compiler backend, installed with CUDA builds of torch) bundles its own
    LLVM. Loading it into a process where Mesa's software OpenGL (llvmpipe: Xvfb, remote
    desktops, machines without a GPU driver) has already mapped the system LLVM crashes the
    process with a segmentation fault; loading triton first is fine. torch imports triton
    lazily (e.g. when segmentation-models-pytorch imports torchvision), which inside napari
    happens after the OpenGL context exists. So: when this package is imported before any
    LLVM is mapped (``view()``, scripts, the test suite), import triton now; when the system
    LLVM is already there, make ``import triton`` fail cleanly, so torch runs without it
    (inference needs no compiler).
    """
    if "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is None:
        return
    if _system_llvm_loaded():
        sys.modules["triton"] = None  # type: ignore[assignment]
        logger.info("OpenGL's LLVM is loaded: running torch without triton in this process")
        return
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install: torch will not use it either
        logger.debug("triton failed to import (%s)", exc)


_avoid_llvm_clash()


def view(
    path: str | Path | None = None,
    *,
    widgets: bool = True,
    block: bool = True,
    viewer: Any = None,
) -> Any:
    """Open napari with a wsi-hipe output (or a slide) and the explain widget docked.

    Parameters
    ----------
    path : str or Path, optional
        A wsi-hipe ``*.ome.zarr`` or a slide file; None opens an empty viewer.
    widgets : bool, optional
        Dock the "Explain (HiPe)" widget.
    block : bool, optional
        Run the Qt event loop until the window closes (what ``wsi-hipe view`` wants); False
        returns at once (notebooks, scripts, tests).
    viewer : napari.Viewer, optional
        Use this viewer instead of making a new one.

    Returns
    -------
    napari.Viewer

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is neither a wsi-hipe output nor a slide wsi-hipe reads (a format OpenSlide
        opens, an OME-TIFF, QPTIFF or plain TIFF tifffile decodes, or an OME-Zarr image).
    ImportError
        napari is not installed (``pip install 'wsi-hipe[napari]'``).
    """
    if path is not None:
        from wsi_hipe.napari._reader import napari_get_reader

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; pass a wsi-hipe .ome.zarr (e.g. from `wsi-hipe demo`) "
                "or a slide file"
            )
        reader = napari_get_reader(str(path))
        if reader is None:
            raise ValueError(
                f"{path} is neither a wsi-hipe output (.ome.zarr with wsi_hipe provenance) nor "
                "a slide wsi-hipe can read: a whole-slide format OpenSlide opens (.svs, .ndpi, "
                ".mrxs, ...), an OME-TIFF, QPTIFF or plain TIFF that tifffile decodes, or an "
                "OME-Zarr image folder; check the file, or convert it (e.g. bioformats2raw "
                "writes OME-Zarr)"
            )
    try:
        import napari
    except ImportError as exc:
        raise ImportError(
            f"napari is not installed ({exc}); install the plugin's extra: "
            "pip install 'wsi-hipe[napari]'"
        ) from exc

    if viewer is None:
        viewer = napari.Viewer(title=f"wsi-hipe — {path.name}" if path is not None else "wsi-hipe")
    if path is not None:
        viewer.open(str(path), plugin=PLUGIN_NAME)
    if widgets:
        from wsi_hipe.napari._widget import ExplainWidget

        widget = ExplainWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Explain (HiPe)", area="right")
    if block:
        napari.run()
    return viewer
