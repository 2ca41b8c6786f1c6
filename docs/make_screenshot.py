"""Make ``docs/img/plugin.png``: the napari plugin on the demo output, one cell explained.

Run it after ``wsi-hipe demo`` (which writes ``wsi-hipe-demo/demo.ome.zarr``; ``make demo``
writes ``demo-output/demo.ome.zarr``), under a virtual X server when there is no display::

    xvfb-run -a -s "-screen 0 1600x1000x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python docs/make_screenshot.py [wsi-hipe-demo/demo.ome.zarr]

It opens the output with :func:`wsi_hipe.napari.view` (slide, saliency, segmentation), docks
the "Explain (HiPe)" widget, explains the most salient segmented lymphocyte with the widget
(as a click on it would) and saves a screenshot of the whole window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _salient_lymphocyte(output: Path) -> tuple[float, float]:
    """World (y, x) µm of the centre of the segmented lymphocyte with the most saliency."""
    from scipy import ndimage

    from wsi_hipe.omezarr import read_output

    view = read_output(output)
    # the finest level small enough to read whole (the demo output is small)
    level = next(
        (k for k in range(view.levels) if np.prod(view.saliency[k].shape) <= 4096 * 4096),
        view.levels - 1,
    )
    saliency = np.asarray(view.saliency[level])
    lymphocytes, n = ndimage.label(np.asarray(view.segmentation[level]) == 1)
    if n == 0:
        raise SystemExit(f"{output}: no lymphocyte is segmented; nothing to explain")
    totals = ndimage.sum(saliency, lymphocytes, index=np.arange(1, n + 1))
    best = int(np.argmax(totals)) + 1
    cy, cx = ndimage.center_of_mass(lymphocytes == best)
    return view.transform(level).to_world(cy, cx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "output", nargs="?", type=Path, default=None,
        help="a wsi-hipe output (default: wsi-hipe-demo/ or demo-output/demo.ome.zarr)",
    )  # fmt: skip
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "img" / "plugin.png")
    parser.add_argument("--field-um", type=float, default=160.0, help="field of view, µm")
    parser.add_argument("--max-depth", type=int, default=3, help="HiPe depths of the cell run")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it")
    parser.add_argument("--no-cell", action="store_true", help="skip the cell explanation")
    parser.add_argument("--model", help="model for the cell run (default: the output's run's)")
    args = parser.parse_args(argv)
    if args.output is None:  # `wsi-hipe demo` writes wsi-hipe-demo/, `make demo` demo-output/
        candidates = [Path(d) / "demo.ome.zarr" for d in ("wsi-hipe-demo", "demo-output")]
        args.output = next((c for c in candidates if c.exists()), candidates[0])
    if not args.output.exists():
        print(f"{args.output} does not exist: run `wsi-hipe demo` first", file=sys.stderr)
        return 1

    from qtpy.QtWidgets import QApplication

    from wsi_hipe.napari import view
    from wsi_hipe.napari._widget import ExplainWidget

    viewer = view(args.output, widgets=False, block=False)
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain (HiPe)", area="right")
    viewer.window.resize(1500, 950)
    for layer in viewer.layers:
        if layer.name == "segmentation":
            layer.opacity = 0.35
    y_um, x_um = _salient_lymphocyte(args.output)
    viewer.camera.center = (y_um, x_um)
    viewer.camera.zoom = min(viewer.canvas.size) / args.field_um
    app = QApplication.instance()

    if not args.no_cell:
        widget.set_settings(max_depth=args.max_depth, batch_size=16, model=args.model)
        widget.explain_cell(y_um, x_um)
        start = time.perf_counter()
        while widget.busy:
            app.processEvents()
            time.sleep(0.05)
            if time.perf_counter() - start > args.timeout:
                widget.cancel()
                print("the cell explanation timed out; try --max-depth 2", file=sys.stderr)
                return 1
        for layer in widget.last_layers:
            if layer.name.endswith("cell"):
                layer.opacity = 0.25
        print(widget._status.value)
    for _ in range(20):  # let napari load the visible chunks and draw them
        app.processEvents()
        time.sleep(0.05)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(args.png), canvas_only=False, flash=False)
    print(args.png)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
