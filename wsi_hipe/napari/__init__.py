"""napari plugin of wsi-hipe: a reader for outputs and slides, and the "Explain (HiPe)" widget.

The plugin is declared in ``napari.yaml`` (npe2), so napari lists it without importing it.
This package is the only part of wsi-hipe that imports napari or Qt, and it does so lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["view", "PLUGIN_NAME"]

#: The npe2 plugin name (the distribution name).
PLUGIN_NAME = "wsi-hipe"


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
        ``path`` is neither a wsi-hipe output nor a slide OpenSlide can open.
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
                "a slide OpenSlide can open"
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
