"""The "Explain (HiPe)" dock widget: explain a drawn region, the current view, or one cell.

Every run calls :func:`wsi_hipe.pipeline.explain_region` or :func:`wsi_hipe.pipeline.explain_cell`
(nothing here re-implements a pipeline step) in a napari thread worker, with a napari progress
bar and a Cancel button wired to the pipeline's ``should_stop`` hook. Results become layers
placed in µm on the slide they were computed from.

The GUI thread never loads a model: choosing a model file reads its class names from the
sidecar (:func:`wsi_hipe.models.read_model_meta`), and the model is loaded, on the run's
``model.device`` (CUDA by default where there is one), in the run's worker thread, once per
file and device. A first CUDA load (context creation, weights upload: seconds) therefore
never freezes the viewer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    PushButton,
    SpinBox,
)

from wsi_hipe.config import PIPELINE_SUBSTRATES, HipeConfig, canonical_substrate
from wsi_hipe.models import DEFAULT_CLASS_NAMES
from wsi_hipe.napari._layers import (
    CELL_COLORINGS,
    cell_row_at,
    color_cells,
    describe_cell,
    result_layer_data,
    slide_info,
)
from wsi_hipe.tiling import pixel_transform

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    import napari

    from wsi_hipe.config import Config
    from wsi_hipe.models import SegmentationModel
    from wsi_hipe.pipeline import RegionResult

__all__ = ["ExplainWidget", "RegionBox"]

logger = logging.getLogger(__name__)

#: Class names of the bundled model, shown before a model is loaded.
BUNDLED_CLASSES: tuple[str, ...] = DEFAULT_CLASS_NAMES

REGION_SOURCES = ("drawn rectangle", "current view")

#: Progress-bar steps per tile: the pipeline reports ``progress(done, total)`` in tiles, with
#: ``done`` a float that also counts HiPe's depths inside the current tile.
PROGRESS_STEPS_PER_TILE = 100

#: Largest region side (level-0 px) the widget sends to the pipeline; HiPe's cost grows
#: with the area, and an interactive run should take seconds, not hours.
MAX_REGION_SIDE = 4096


@dataclass(frozen=True)
class RegionBox:
    """A rectangle of a slide in level-0 pixels (OpenSlide convention: x right, y down).

    Attributes
    ----------
    x0, y0 : int
        Top-left level-0 pixel.
    width, height : int
        Size in level-0 pixels (≥ 1).
    """

    x0: int
    y0: int
    width: int
    height: int

    @classmethod
    def from_world(
        cls, y_min: float, x_min: float, y_max: float, x_max: float, *, mpp: float
    ) -> RegionBox:
        """The level-0 pixels whose areas a world rectangle (µm) touches.

        Level-0 pixel ``i`` is centred at world ``i·mpp`` and covers ``[(i − ½)·mpp, (i + ½)·mpp)``
        (:func:`wsi_hipe.tiling.pixel_transform`).
        """
        if not mpp > 0:
            raise ValueError(f"mpp must be positive (µm per level-0 px), got {mpp!r}")
        if y_max < y_min:
            y_min, y_max = y_max, y_min
        if x_max < x_min:
            x_min, x_max = x_max, x_min
        level0 = pixel_transform(mpp)
        y0, x0 = (math.floor(v) for v in level0.to_edge(y_min, x_min))
        y1, x1 = (math.ceil(v) for v in level0.to_edge(y_max, x_max))
        return cls(x0=x0, y0=y0, width=max(1, x1 - x0), height=max(1, y1 - y0))

    def clipped(self, width: int, height: int) -> RegionBox:
        """This box clipped to a slide of level-0 size ``(width, height)``."""
        x0 = min(max(self.x0, 0), width - 1)
        y0 = min(max(self.y0, 0), height - 1)
        x1 = min(max(self.x0 + self.width, x0 + 1), width)
        y1 = min(max(self.y0 + self.height, y0 + 1), height)
        return RegionBox(x0=x0, y0=y0, width=x1 - x0, height=y1 - y0)


class ExplainWidget(Container):
    """Dock widget running HiPe on a region or a cell of the slide shown in napari.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose slide layer, shapes and clicks the widget uses.
    overrides : mapping, optional
        Further configuration overrides (dotted keys, e.g. ``{"tiling.tile_size": 128}``)
        applied under the widget's own settings, for scripts and notebooks.

    Notes
    -----
    :meth:`explain_region` and :meth:`explain_cell` return the started thread worker, so
    scripts and tests can wait for ``worker.finished``; :attr:`last_result` holds the
    pipeline's result and :attr:`last_layers` the layers it added.
    """

    def __init__(
        self, viewer: napari.viewer.Viewer, *, overrides: dict[str, Any] | None = None
    ) -> None:
        self._viewer = viewer
        self._extra_overrides = dict(overrides or {})
        self._models: dict[tuple[str, str, bool], SegmentationModel] = {}
        self._models_lock = threading.Lock()
        self._stop = threading.Event()
        self._picking = False
        self._busy = False
        self._runs = 0
        self.worker: Any = None
        self.last_result: RegionResult | None = None
        self.last_layers: list[Any] = []
        self.last_cell_row: dict[str, Any] | None = None

        self._slide = ComboBox(label="slide", choices=self._slide_choices)
        self._model = ComboBox(label="model", choices=("bundled", "file"), value="bundled")
        self._model_file = FileEdit(
            label="model file", mode="r", filter="*.safetensors *.pt *.ts", visible=False
        )
        self._substrate = ComboBox(
            label="substrate", choices=PIPELINE_SUBSTRATES, value=HipeConfig().substrate
        )
        self._batch = SpinBox(label="batch size", min=1, max=4096, value=32)
        self._depth = SpinBox(
            label="max depth", min=0, max=32, value=0, tooltip="0 = refine until cells are 4 px"
        )
        self._target = ComboBox(label="target class", choices=BUNDLED_CLASSES, value="lymphocyte")
        self._source = ComboBox(label="region", choices=REGION_SOURCES, value="drawn rectangle")
        self._shapes = ComboBox(label="rectangles", choices=self._shapes_choices)
        self._region_button = PushButton(text="Explain region")
        self._cell_button = PushButton(text="Explain cell (click one)")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._rerun = CheckBox(
            text="re-run cells in a cells table", value=False,
            tooltip="off: a cell of an output's cells layer shows its stored numbers at once",
        )  # fmt: skip
        self._cell_color = ComboBox(
            label="colour cells", choices=tuple(CELL_COLORINGS), value="label",
            tooltip="colour the cells layers by a column of their table",
        )  # fmt: skip
        self._status = Label(value="ready")
        super().__init__(
            widgets=[
                self._slide,
                self._model,
                self._model_file,
                self._substrate,
                self._batch,
                self._depth,
                self._target,
                self._source,
                self._shapes,
                self._region_button,
                self._cell_button,
                self._rerun,
                self._cell_color,
                self._cancel_button,
                self._status,
            ],
            labels=True,
        )
        self._slide.changed.connect(self._on_slide_changed)
        self._model.changed.connect(self._on_model_kind)
        self._model_file.changed.connect(self._on_model_file)
        self._region_button.changed.connect(self._on_region_clicked)
        self._cell_button.changed.connect(self._on_cell_clicked)
        self._cancel_button.changed.connect(self.cancel)
        self._cell_color.changed.connect(self.color_cells)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        viewer.mouse_drag_callbacks.append(self._on_mouse)
        self.reset_choices()
        if self._slide.value is not None:  # a slide opened before the widget
            self._on_slide_changed(self._slide.value)

    # --- choices --------------------------------------------------------------------------

    def _slide_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [
            (layer.name, layer) for layer in self._viewer.layers if slide_info(layer) is not None
        ]

    def _shapes_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if layer.__class__.__name__ == "Shapes"
        ]

    def _on_slide_changed(self, layer: Any) -> None:
        """Take the HiPe settings of the run that made the chosen slide's output, if any."""
        config = (slide_info(layer) or {}).get("config") if layer is not None else None
        if not isinstance(config, dict):
            return
        hipe = config.get("hipe") or {}
        score = config.get("score") or {}
        model_path = (config.get("model") or {}).get("path")
        if model_path == "bundled":
            self._model.value = "bundled"
        elif model_path and Path(model_path).is_file():
            self.set_settings(model=model_path)
        substrate = hipe.get("substrate")
        if isinstance(substrate, str) and canonical_substrate(substrate) in PIPELINE_SUBSTRATES:
            self._substrate.value = canonical_substrate(substrate)
        if isinstance(hipe.get("batch_size"), int):
            self._batch.value = hipe["batch_size"]
        if "max_depth" in hipe:
            self._depth.value = int(hipe["max_depth"] or 0)
        index = score.get("class", score.get("class_index"))
        names = list(self._target.choices)
        if isinstance(index, int) and 0 <= index < len(names):
            self._target.value = names[index]

    def _on_model_kind(self, value: str) -> None:
        self._model_file.visible = value == "file"
        self._update_classes()

    def _on_model_file(self, _value: Any) -> None:
        self._update_classes()

    def _update_classes(self) -> None:
        try:
            spec = self.model_spec
        except ValueError:  # "file" chosen, no file yet
            self._status.value = "choose a model file"
            return
        if spec == "bundled":
            names: tuple[str, ...] = BUNDLED_CLASSES
        else:
            from wsi_hipe.models import read_model_meta

            try:  # the sidecar only: loading the model (maybe onto a GPU) waits for a run
                names = tuple(read_model_meta(spec).class_names)
            except Exception as exc:  # shown to the user, who picks another file
                self._status.value = f"cannot read model: {exc}"
                return
        current = self._target.value
        self._target.choices = names
        if current in names:
            self._target.value = current
        elif len(names) > 1:
            self._target.value = names[1]

    # --- settings -------------------------------------------------------------------------

    @property
    def model_spec(self) -> str:
        """``"bundled"`` or the path of the chosen model file."""
        if self._model.value == "file":
            path = Path(self._model_file.value)
            if str(path) in ("", ".") or not path.is_file():
                raise ValueError(
                    f"model file {str(path)!r} does not exist; choose a .safetensors or "
                    "TorchScript file, or set model to 'bundled'"
                )
            return str(path)
        return "bundled"

    @property
    def busy(self) -> bool:
        """True from the start of a run until its worker has finished (on the GUI thread)."""
        return self._busy

    def set_settings(
        self,
        *,
        model: str | Path | None = None,
        substrate: str | None = None,
        batch_size: int | None = None,
        max_depth: int | None = None,
        target: str | None = None,
    ) -> None:
        """Set the widget's options from code.

        ``model`` is ``"bundled"`` or a model file; ``max_depth=0`` means no limit.
        """
        if model is not None:
            if str(model) == "bundled":
                self._model.value = "bundled"
            else:
                self._model_file.value = Path(model)
                self._model.value = "file"
                self._update_classes()
        if substrate is not None:
            if substrate not in PIPELINE_SUBSTRATES:
                raise ValueError(
                    f"substrate must be one of {list(PIPELINE_SUBSTRATES)}, got {substrate!r}"
                )
            self._substrate.value = substrate
        if batch_size is not None:
            self._batch.value = int(batch_size)
        if max_depth is not None:
            self._depth.value = int(max_depth)
        if target is not None:
            if target not in self._target.choices:
                raise ValueError(
                    f"target must be one of {list(self._target.choices)}, got {target!r}"
                )
            self._target.value = target

    def overrides(self) -> dict[str, Any]:
        """The configuration overrides the current settings stand for (dotted keys)."""
        return {
            **self._extra_overrides,
            "hipe.substrate": self._substrate.value,
            "hipe.batch_size": int(self._batch.value),
            "hipe.max_depth": int(self._depth.value) or None,
            "score.class": list(self._target.choices).index(self._target.value),
            "model.path": self.model_spec,
        }

    def config(self, slide_layer: Any) -> Config:
        """The run configuration: the output's resolved config (when the slide came from a
        wsi-hipe output) or the defaults, with the widget's settings on top."""
        from wsi_hipe.config import Config, load_config
        from wsi_hipe.errors import ConfigError

        info = slide_info(slide_layer) or {}
        base = info.get("config")
        overrides = self.overrides()
        config = None
        if isinstance(base, dict):
            try:
                config = Config.model_validate(base).with_overrides(overrides)
            except (ConfigError, ValueError) as exc:  # an older output's config
                logger.warning("ignoring the output's config (%s); using the defaults", exc)
        if config is None:
            if info.get("mpp_override") is not None:
                overrides["slide.mpp"] = info["mpp_override"]
            config = load_config(overrides=overrides)
        if overrides["hipe.max_depth"] is None and config.hipe.max_depth is not None:
            # overrides skip None values: "no limit" has to replace the section's value
            hipe = config.hipe.model_copy(update={"max_depth": None})
            config = config.model_copy(update={"hipe": hipe})
        return config

    def _load_model(self, spec: str, config: Config) -> SegmentationModel:
        """The model of ``spec`` on ``config.model.device``, loaded once (called from the run's
        worker thread, never the GUI thread)."""
        key = (spec, config.model.device, bool(config.model.autocast))
        with self._models_lock:
            model = self._models.get(key)
            if model is None:
                from wsi_hipe.models import load_model

                model = load_model(spec, device=key[1], autocast=key[2])
                self._models[key] = model
        return model

    # --- target selection ----------------------------------------------------------------

    def slide_layer(self) -> Any:
        """The chosen slide layer (the first one when none is chosen)."""
        self._slide.reset_choices()
        layer = self._slide.value
        if layer is None:
            choices = self._slide_choices()
            if not choices:
                raise ValueError(
                    "no slide layer: open a wsi-hipe output (.ome.zarr) or a slide file first"
                )
            layer = choices[0][1]
        return layer

    def current_view_box(self) -> tuple[float, float, float, float]:
        """The world rectangle (y_min, x_min, y_max, x_max) in µm shown on the canvas."""
        viewer = self._viewer
        centre = np.asarray(viewer.camera.center)[-2:]
        zoom = float(viewer.camera.zoom)
        size = np.asarray(viewer.canvas.size, dtype=float)[-2:]
        half = size / (2 * zoom)
        return (
            float(centre[0] - half[0]),
            float(centre[1] - half[1]),
            float(centre[0] + half[0]),
            float(centre[1] + half[1]),
        )

    def drawn_box(self) -> tuple[float, float, float, float]:
        """The world rectangle of the selected (else the last) shape of the rectangles layer."""
        self._shapes.reset_choices()
        layer = self._shapes.value
        if layer is None:
            choices = self._shapes_choices()
            layer = choices[-1][1] if choices else None
        if layer is None or len(layer.data) == 0:
            raise ValueError(
                "no rectangle drawn: add a Shapes layer and draw a rectangle, or set region "
                "to 'current view'"
            )
        selected = sorted(layer.selected_data)
        index = selected[0] if selected else len(layer.data) - 1
        vertices = np.asarray(layer.data[index], dtype=float)[:, -2:]
        world = np.array([layer.data_to_world(v) for v in vertices])[:, -2:]
        y_min, x_min = world.min(axis=0)
        y_max, x_max = world.max(axis=0)
        return float(y_min), float(x_min), float(y_max), float(x_max)

    # --- runs ---------------------------------------------------------------------------

    def explain_region(self, box_um: tuple[float, float, float, float] | None = None) -> Any:
        """Explain a region of the slide; returns the started thread worker.

        Parameters
        ----------
        box_um : (y_min, x_min, y_max, x_max) floats in µm, optional
            The world rectangle; default: the drawn rectangle or the current view, as the
            "region" setting says.
        """
        layer = self.slide_layer()
        info = slide_info(layer)
        if box_um is None:
            box_um = (
                self.drawn_box()
                if self._source.value == REGION_SOURCES[0]
                else (self.current_view_box())
            )
        box = RegionBox.from_world(*box_um, mpp=info["mpp"])
        width, height = info["dimensions"]
        box = box.clipped(width, height)
        if max(box.width, box.height) > MAX_REGION_SIDE:
            raise ValueError(
                f"region of {box.width}x{box.height} level-0 px is larger than "
                f"{MAX_REGION_SIDE} px per side; draw a smaller rectangle or zoom in"
            )
        return self._start("region", layer, box=box)

    def color_cells(self, by: str | None = None) -> None:
        """Colour every cells layer by ``by`` (a ``CELL_COLORINGS`` key; default the widget's)."""
        by = self._cell_color.value if by is None else by
        for layer in self._viewer.layers:
            if layer.metadata.get("wsi_hipe", {}).get("kind") == "cells":
                color_cells(layer, by)

    def explain_cell(self, y_um: float, x_um: float) -> Any:
        """Explain the segmented cell under the world point ``(y_um, x_um)`` (µm); the score
        is that cell's area. Returns the started thread worker.

        A cell of an output's cells layer shows its stored row at once (``last_cell_row``,
        the status line); with "re-run cells" on, it is also explained again at the widget's
        depth (0 = full depth). Returns None when only the stored numbers are shown."""
        row = cell_row_at(self._viewer.layers, float(y_um), float(x_um))
        self.last_cell_row = row
        if row is not None:
            self._status.value = describe_cell(row)
            if not self._rerun.value:
                return None
        layer = self.slide_layer()
        info = slide_info(layer)
        # Level-0 pixel i is centred at world i·mpp and spans continuous coordinates [i, i+1).
        y, x = pixel_transform(info["mpp"]).to_edge(float(y_um), float(x_um))
        width, height = info["dimensions"]
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"point ({y_um:.1f}, {x_um:.1f}) µm lies outside the slide; click on the tissue"
            )
        return self._start("cell", layer, point=(x, y))

    def cancel(self, *_args: Any) -> None:
        """Ask the running explanation to stop at its next check."""
        self._stop.set()
        self._status.value = "cancelling…"

    def _on_region_clicked(self, *_args: Any) -> None:
        try:
            self.explain_region()
        except ValueError as exc:
            self._status.value = str(exc)
            _notify(str(exc))

    def _on_cell_clicked(self, *_args: Any) -> None:
        self._picking = True
        self._status.value = "click a segmented cell in the viewer"

    def _on_mouse(self, viewer: Any, event: Any) -> None:
        if not self._picking or event.type != "mouse_press":
            return
        self._picking = False
        y_um, x_um = (float(v) for v in event.position[-2:])
        try:
            self.explain_cell(y_um, x_um)
        except ValueError as exc:
            self._status.value = str(exc)
            _notify(str(exc))

    def _start(self, kind: str, layer: Any, **target: Any) -> Any:
        from napari.qt.threading import create_worker

        if self._busy:
            raise ValueError("an explanation is already running; wait for it or press Cancel")
        info = slide_info(layer)
        config = self.config(layer)
        spec = self.model_spec
        self._stop.clear()
        self._runs += 1
        run = self._runs
        shared: dict[str, Any] = {}
        worker = create_worker(
            _run_explanation,
            kind,
            info,
            config,
            spec,
            self._load_model,
            self._stop,
            target,
            shared,
            _progress={"desc": f"HiPe {kind}", "total": 0},
        )
        shared["pbar"] = getattr(worker, "pbar", None)
        worker.returned.connect(lambda out: self._on_returned(out, kind, run, info))
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._busy = True
        self._cancel_button.enabled = True
        self._region_button.enabled = False
        self._cell_button.enabled = False
        self._status.value = f"explaining {kind}…"
        worker.start()
        return worker

    def _on_returned(
        self, out: tuple[RegionResult, float], kind: str, run: int, info: dict
    ) -> None:
        result, seconds = out
        self.last_result = result
        passes = getattr(result, "forward_passes", None)
        passes_text = "?" if passes is None else str(passes)
        if result is None or getattr(result, "stopped", False):
            self._status.value = (
                f"{kind} #{run} cancelled after {passes_text} forward passes, {seconds:.1f} s"
            )
            self.last_layers = []
            return
        layers = []
        for data, kwargs, layer_type in result_layer_data(
            result, slide_mpp=info["mpp"], name=f"HiPe {kind} #{run}"
        ):
            add = getattr(self._viewer, f"add_{layer_type}")
            layers.append(add(data, **kwargs))
        self.last_layers = layers
        self._status.value = f"{kind} #{run}: {passes_text} forward passes, {seconds:.1f} s"

    def _on_errored(self, exc: BaseException) -> None:
        self._status.value = f"failed: {exc}"
        logger.error("HiPe run failed: %s", exc)

    def _on_finished(self) -> None:
        self._busy = False
        self._cancel_button.enabled = False
        self._region_button.enabled = True
        self._cell_button.enabled = True


def _run_explanation(
    kind: str,
    info: dict,
    config: Config,
    spec: str,
    load_model: Callable[[str, Config], SegmentationModel],
    stop: threading.Event,
    target: dict[str, Any],
    shared: dict[str, Any],
) -> tuple[RegionResult, float]:
    """Worker body: open the slide, run the pipeline, report progress (runs off the GUI thread)."""
    from wsi_hipe import pipeline
    from wsi_hipe.slide import open_slide

    pbar = shared.get("pbar")
    start = time.perf_counter()

    def progress(done: float, total: int) -> None:
        """``wsi_hipe.pipeline.Progress``: tiles done (with the current tile's share) of total."""
        if pbar is None or total <= 0:
            return
        steps = total * PROGRESS_STEPS_PER_TILE
        if pbar.total != steps:
            pbar.total = steps
        reached = min(steps, round(done * PROGRESS_STEPS_PER_TILE))
        if reached > pbar.n:
            pbar.update(reached - pbar.n)

    model = load_model(spec, config)
    slide = open_slide(
        info["path"],
        mpp=info.get("mpp_override"),
        channel=info.get("channel", "auto"),
        allow_brightfield=bool(info.get("allow_brightfield", False)),
        **_reopen_options(info, config),
    )
    try:
        common = {
            "config": config,
            "model": model,
            "progress": progress,
            "should_stop": stop.is_set,
        }
        if kind == "region":
            box: RegionBox = target["box"]
            result = pipeline.explain_region(slide, box.x0, box.y0, box.width, box.height, **common)
        else:
            x, y = target["point"]
            result = pipeline.explain_cell(slide, x, y, **common)
    finally:
        close = getattr(slide, "close", None)
        if callable(close):
            close()
    return result, time.perf_counter() - start


def _reopen_options(info: dict, config: Config) -> dict[str, Any]:
    """``reader``, ``plane`` and ``channels`` to reopen a layer's slide as it was read: the
    layer's own (a forced reader, the plane of a Z-stack), else the run configuration's
    (``slide.channels`` of an output's run feeds a multi-input model the same channels)."""
    reader = info.get("reader") or config.slide.reader
    plane = info.get("plane")
    if plane is None or (isinstance(plane, (dict, tuple)) and not plane):
        plane = config.slide.plane
    if isinstance(plane, tuple):  # a hashable plane key: back to the mapping
        plane = dict(plane)
    channels = info.get("channels") or config.slide.channels
    options: dict[str, Any] = {"reader": reader, "plane": plane}
    if channels:
        options["channels"] = tuple(channels)
    return options


def _notify(message: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(message)
    except Exception:  # no napari notification manager (e.g. scripts): the status label says it
        logger.warning("%s", message)
