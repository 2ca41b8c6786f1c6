"""The ``wsi-hipe`` command line: run, batch, demo, synth, view, evaluate.

This is the only module that configures logging (console and ``OUT.ome.zarr/wsi_hipe/run.log``)
and draws progress bars; everything it does goes through :mod:`wsi_hipe.pipeline`.

Exit codes: 0 success; 1 an error (bad slide, configuration, output, a lost Dask scheduler:
rerun to resume); 2 a usage error (typer); 3 "partial": finished, but some tiles or slides
failed (rerun to retry them).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wsi_hipe.config import DEVICES, NGFF_VERSIONS, SCHEDULERS, SLIDE_READERS

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.pipeline import SlideResult, SlideStatus

__all__ = ["app", "main", "DEMO_OVERRIDES"]

logger = logging.getLogger("wsi_hipe.cli")

EXIT_ERROR = 1
EXIT_PARTIAL = 3

#: The demo's settings, measured to run the 2048x1536 demo slide in under 5 minutes on a 2-core
#: CPU (BENCHMARKS.md, "Slide-level evaluation and defaults" and "The demo"): 256 px tiles with
#: a 16 px halo (288 px model inputs), HiPe from a 9x9 grid for three depths, so the finest
#: cells are 8 px (4 µm, about half a lymphocyte), batches of 4 (no slower per pass on a CPU
#: than larger ones, and less memory). The substrate is the pipeline's default (background).
DEMO_OVERRIDES: dict[str, Any] = {
    "tiling.tile_size": 256,
    "tiling.halo": 16,
    "score.floor": 5.0,
    "hipe.start_grid": 9,
    "hipe.max_depth": 3,
    "hipe.min_cell_size": 8,
    "hipe.batch_size": 4,
}

app = typer.Typer(
    name="wsi-hipe",
    help="Hierarchical Perturbation saliency for U-Net segmentation of whole-slide images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- logging --------------------------------------------------------------------------------


class _DeferredFileHandler(logging.Handler):
    """Log into ``path`` once its folder exists (the output is created mid-run); buffer before."""

    def __init__(self, path: Path, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.path = Path(path)
        self._buffer: list[str] = []  # lines logged before the folder exists
        self._written: list[str] = []  # lines in the file (rewritten if the file is replaced)
        self._stream: Any = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self._stream is not None and not self.path.exists():
            # --overwrite removed the old output (and this file) after logging began: start the
            # new output's log with everything logged so far.
            self._stream.close()
            self._stream = None
            self._buffer = self._written + self._buffer
            self._written = []
        if self._stream is None and self.path.parent.is_dir():
            self._stream = open(self.path, "a", encoding="utf-8")
            for buffered in self._buffer:
                self._stream.write(buffered + "\n")
            self._written, self._buffer = self._buffer, []
        if self._stream is None:
            if len(self._buffer) < 10_000:
                self._buffer.append(line)
            return
        self._stream.write(line + "\n")
        self._stream.flush()
        if len(self._written) < 10_000:
            self._written.append(line)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


_STATE: dict[str, Any] = {"level": logging.INFO, "console": None}


def _console():
    from rich.console import Console

    if _STATE["console"] is None:
        _STATE["console"] = Console(stderr=True)
    return _STATE["console"]


def _setup_logging(level: int) -> None:
    from rich.logging import RichHandler

    root = logging.getLogger("wsi_hipe")
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_wsi_hipe_console", False):
            root.removeHandler(handler)
    handler = RichHandler(console=_console(), show_path=False, rich_tracebacks=False)
    handler.setLevel(level)
    handler._wsi_hipe_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    _STATE["level"] = level


@contextmanager
def _run_log(output: Path):
    """Also log (DEBUG and up) into ``output/wsi_hipe/run.log`` for the duration."""
    handler = _DeferredFileHandler(Path(output) / "wsi_hipe" / "run.log")
    root = logging.getLogger("wsi_hipe")
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    _console().print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


#: The library's errors name the fix a Python caller makes (a keyword argument); on the command
#: line the same fix is a flag.
_CLI_FIXES = (
    ("overwrite=True", "--overwrite"),
    ("with cells=True", "with wsi-hipe run --cells"),
    ("allow_brightfield=True", "--allow-brightfield"),
    ("to another path", "to another path (-o)"),
    ("rerun the same call", "rerun the same command (--scheduler tcp://HOST:PORT of the new one)"),
)


def _cli_message(message: str) -> str:
    """An error message with each library fix (``pass overwrite=True``) said as its CLI flag."""
    for library, flag in _CLI_FIXES:
        message = message.replace(library, flag)
    return message


@contextmanager
def _errors():
    """Turn the project's errors into a one-line message and exit code 1 (no traceback)."""
    from wsi_hipe.errors import WsiHipeError

    try:
        yield
    except WsiHipeError as exc:
        raise _fail(_cli_message(str(exc))) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; rerun the same command to resume", 130) from None


@app.callback()
def _main(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-v, -vv).")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    """Explain U-Net segmentations of whole-slide Hoechst images with HiPe."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    _setup_logging(level)


# --- progress -------------------------------------------------------------------------------


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_console(),
        transient=False,
        disable=_STATE["level"] > logging.INFO or not _console().is_terminal,
    )


# --- options --------------------------------------------------------------------------------

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML configuration (configs/*.yaml).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="'bundled', a .safetensors checkpoint or TorchScript."),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help=f"{', '.join(DEVICES)} or cuda:N (model.device)."),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help=f"{', '.join(SCHEDULERS)}, local:N (a LocalCluster of N workers) or tcp://host:port.",
    ),
]
WorkersOpt = Annotated[int | None, typer.Option("--workers", "-w", min=1, help="Workers.")]
MppOpt = Annotated[
    float | None,
    typer.Option("--mpp", help="µm per level-0 px of the slide (overrides its metadata)."),
]
TargetMppOpt = Annotated[
    float | None, typer.Option("--target-mpp", help="Target µm/px (tiling.mpp).")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output instead of resuming.")
]
ChannelOpt = Annotated[
    str | None,
    typer.Option(
        "--channel",
        help="Stain channel: auto (the nuclear stain by name), an index or a channel name "
        "(DAPI, Hoechst; case-insensitive, unique prefix); RGB slides: mean, 0/1/2, red/green/blue.",
    ),
]
ChannelsOpt = Annotated[
    str | None,
    typer.Option(
        "--channels",
        help="Channels fed to a multi-input model, in order: names or indices, comma-separated "
        "(slide.channels), e.g. DAPI,CD45.",
    ),
]
ReaderOpt = Annotated[
    str | None,
    typer.Option(
        "--reader",
        help=f"Slide reader: {', '.join(SLIDE_READERS)} (slide.reader; auto decides from the file).",
    ),
]
PlaneOpt = Annotated[
    str | None,
    typer.Option("--plane", help="Plane of a Z-stack or time series: 3, z=3 or z=3,t=0."),
]
BrightfieldOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-brightfield/--no-allow-brightfield",
        help="Run on RGB brightfield (H&E) slides by inverting them.",
        show_default=False,
    ),
]
NgffOpt = Annotated[
    str | None, typer.Option("--ngff", help=f"OME-NGFF version: {' or '.join(NGFF_VERSIONS)}.")
]
TileOpt = Annotated[
    int | None, typer.Option("--tile-size", help="Tile core, target px (multiple of 16).")
]
DepthOpt = Annotated[int | None, typer.Option("--max-depth", help="HiPe depths (hipe.max_depth).")]
FloorOpt = Annotated[
    float | None, typer.Option("--floor", help="Score floor below which HiPe is skipped.")
]
JobScriptOpt = Annotated[
    bool,
    typer.Option(
        "--print-job-script",
        help="With --scheduler slurm|pbs|lsf: print the worker job script and exit.",
    ),
]


def _overrides(**values: Any) -> dict[str, Any]:
    keys = {
        "model": "model.path",
        "device": "model.device",
        "scheduler": "schedule.scheduler",
        "workers": "schedule.workers",
        "mpp": "slide.mpp",
        "target_mpp": "tiling.mpp",
        "ngff": "output.ngff",
        "tile_size": "tiling.tile_size",
        "max_depth": "hipe.max_depth",
        "floor": "score.floor",
        "channel": "slide.channel",
        "channels": "slide.channels",
        "reader": "slide.reader",
        "plane": "slide.plane",
        "allow_brightfield": "slide.allow_brightfield",
    }
    return {keys[k]: v for k, v in values.items() if v is not None}


def _load_config(config: Path | None, overrides: dict[str, Any]):
    from wsi_hipe.config import load_config

    with _errors():
        cfg = load_config(config, overrides)
    # "--workers N" alone asks for N workers: a LocalCluster (the config's sync default has one).
    workers = overrides.get("schedule.workers")
    if workers and workers > 1 and "schedule.scheduler" not in overrides:
        if cfg.schedule.scheduler == "sync":
            cfg = cfg.with_overrides({"schedule.scheduler": f"local:{workers}"})
    return cfg


def _print_result(result: SlideResult) -> None:
    from rich.table import Table

    counts = result.counts
    table = Table(title=f"{Path(result.slide).name} → {result.output}", show_header=True)
    for column in ("tiles", "done", "skipped", "failed", "computed now", "passes", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(
        str(result.tiles_total),
        str(counts.get("done", 0)),
        str(counts.get("skipped", 0)),
        str(counts.get("failed", 0)),
        str(result.computed),
        str(result.forward_passes),
        f"{result.seconds:.1f}",
    )
    _console().print(table)
    for record in result.failed[:20]:
        _console().print(
            f"[red]failed tile {record['index']} (y={record['y']}, x={record['x']}):[/] "
            f"{record['error']}",
            highlight=False,
        )
    if len(result.failed) > 20:
        _console().print(f"[red]... and {len(result.failed) - 20} more failed tiles[/]")


def _run_slide(
    slide, output: Path, cfg, *, overwrite: bool, label: str = "tiles", cells: bool = False
):
    from wsi_hipe.pipeline import explain_slide

    with _progress() as bars, _run_log(output):
        task = bars.add_task(label, total=None)

        def progress(done: float, total: int) -> None:  # wsi_hipe.pipeline.Progress: tiles
            bars.update(task, completed=done, total=total)

        logger.info("wsi-hipe run %s -o %s (config %s)", slide, output, cfg.fingerprint()[:12])
        result = explain_slide(
            slide, output, config=cfg, overwrite=overwrite, progress=progress, cells=cells
        )
    return result


# --- commands -------------------------------------------------------------------------------


@app.command()
def run(
    slide: Annotated[Path, typer.Argument(help="The slide file (or DICOM folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output OUT.ome.zarr folder.")],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    mpp: MppOpt = None,
    target_mpp: TargetMppOpt = None,
    overwrite: OverwriteOpt = False,
    ngff: NgffOpt = None,
    tile_size: TileOpt = None,
    max_depth: DepthOpt = None,
    floor: FloorOpt = None,
    channel: ChannelOpt = None,
    channels: ChannelsOpt = None,
    reader: ReaderOpt = None,
    plane: PlaneOpt = None,
    allow_brightfield: BrightfieldOpt = None,
    print_job_script: JobScriptOpt = False,
    cells: Annotated[
        bool,
        typer.Option(
            "--cells",
            help="Also explain every cell of the score class (each lymphocyte): labels/cells "
            "and the tables/cells table (wsi-hipe export writes them for QuPath / as CSV).",
        ),
    ] = False,
) -> None:
    """Explain one slide into an OME-Zarr (resumes an interrupted run of the same command)."""
    cfg = _load_config(
        config,
        _overrides(
            model=model,
            device=device,
            scheduler=scheduler,
            workers=workers,
            channel=channel,
            channels=channels,
            reader=reader,
            plane=plane,
            allow_brightfield=allow_brightfield,
            mpp=mpp,
            target_mpp=target_mpp,
            ngff=ngff,
            tile_size=tile_size,
            max_depth=max_depth,
            floor=floor,
        ),
    )
    if print_job_script:
        _print_job_script(cfg)
        return
    with _errors():
        result = _run_slide(slide, output, cfg, overwrite=overwrite, cells=cells)
    _print_result(result)
    if result.cells is not None:
        _console().print(f"{result.cells} cells in {result.output / 'tables' / 'cells'}")
    typer.echo(str(result.output))
    if not result.ok:
        raise _fail(
            f"{len(result.failed)} tile(s) failed (unreadable pixels, or a task that raised on "
            f"each of its {1 + cfg.schedule.retries} tries); the output is written without "
            "them. Rerun the same command to retry them.",
            EXIT_PARTIAL,
        )


def _print_job_script(cfg) -> None:
    """Print the job script of the configured batch system (``--print-job-script``)."""
    from wsi_hipe.config import JOBQUEUE_SCHEDULERS
    from wsi_hipe.schedule import job_script

    kind = cfg.schedule.scheduler
    if kind not in JOBQUEUE_SCHEDULERS:
        raise typer.BadParameter(
            f"--print-job-script needs --scheduler {' | '.join(JOBQUEUE_SCHEDULERS)}, got {kind!r}"
        )
    with _errors():
        gpu = cfg.model.device.startswith("cuda")
        typer.echo(job_script(kind, cfg.schedule.jobqueue, gpu=gpu))


@app.command()
def batch(
    inputs: Annotated[
        str, typer.Argument(help="A folder of slides, a glob ('slides/*.svs') or a CSV manifest.")
    ],
    outdir: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    target_mpp: TargetMppOpt = None,
    overwrite: OverwriteOpt = False,
    ngff: NgffOpt = None,
    tile_size: TileOpt = None,
    max_depth: DepthOpt = None,
    floor: FloorOpt = None,
    channel: ChannelOpt = None,
    channels: ChannelsOpt = None,
    reader: ReaderOpt = None,
    plane: PlaneOpt = None,
    allow_brightfield: BrightfieldOpt = None,
    skip_errors: Annotated[
        bool,
        typer.Option("--skip-errors", help="Go on past slides that fail (default: stop)."),
    ] = False,
    print_job_script: JobScriptOpt = False,
) -> None:
    """Explain many slides, one OUTDIR/<slide>.ome.zarr each, with a summary table."""
    from wsi_hipe.pipeline import explain_batch, resolve_batch_inputs

    cfg = _load_config(
        config,
        _overrides(
            model=model,
            device=device,
            scheduler=scheduler,
            workers=workers,
            channel=channel,
            channels=channels,
            reader=reader,
            plane=plane,
            allow_brightfield=allow_brightfield,
            target_mpp=target_mpp,
            ngff=ngff,
            tile_size=tile_size,
            max_depth=max_depth,
            floor=floor,
        ),
    )
    if print_job_script:
        _print_job_script(cfg)
        return
    with _errors():
        n_slides = len(resolve_batch_inputs(inputs))
    outdir.mkdir(parents=True, exist_ok=True)
    with _batch_logs(outdir) as on_start, _errors(), _progress() as bars:
        progress, on_slide = _batch_bars(bars, n_slides)
        statuses = explain_batch(
            inputs,
            outdir,
            config=cfg,
            overwrite=overwrite,
            skip_errors=skip_errors,
            progress=progress,
            on_slide=on_slide,
            on_start=on_start,
        )
    _print_batch(statuses, outdir)
    bad = [s for s in statuses if s.status in ("failed", "not run")]
    partial = [s for s in statuses if s.status == "partial"]
    if bad:
        names = ", ".join(Path(s.slide).name for s in bad)
        raise _fail(f"{len(bad)} of {len(statuses)} slide(s) failed or did not run: {names}")
    if partial:
        names = ", ".join(Path(s.slide).name for s in partial)
        raise _fail(f"some tiles failed in: {names}; rerun to retry them", EXIT_PARTIAL)


@contextmanager
def _batch_logs(outdir: Path):
    """Log into ``OUTDIR/wsi-hipe-batch.log``, and each slide into its own output's run.log;
    yields the batch's ``on_start`` hook that switches the slide log.

    Two slides may run at once (each in its own thread): a slide's log takes the records of
    the thread that runs it."""
    import threading

    root = logging.getLogger("wsi_hipe")
    handler = _DeferredFileHandler(outdir / "wsi-hipe-batch.log")
    slide_log: dict[int, _DeferredFileHandler] = {}  # thread id -> its slide's log
    root.addHandler(handler)

    def on_start(slide: str, output: Path) -> None:
        thread = threading.get_ident()
        old = slide_log.pop(thread, None)
        if old is not None:
            root.removeHandler(old)
            old.close()
        new = _DeferredFileHandler(Path(output) / "wsi_hipe" / "run.log")
        new.addFilter(lambda record: record.thread == thread)
        slide_log[thread] = new
        root.addHandler(new)

    try:
        yield on_start
    finally:
        for extra in [handler, *slide_log.values()]:
            root.removeHandler(extra)
            extra.close()


def _batch_bars(bars: Any, n_slides: int):
    """The batch's ``progress`` and ``on_slide`` hooks, drawing a slides bar and a tiles bar."""
    slides_task = bars.add_task("slides", total=n_slides)
    tiles_task = bars.add_task("tiles", total=None)

    def progress(name: str, done: float, total: int) -> None:  # done, total: tiles
        bars.update(tiles_task, description=f"tiles {name}", completed=done, total=total)

    def on_slide(status: SlideStatus, done: int, total: int) -> None:
        bars.update(slides_task, completed=done)
        log = logger.info if status.status == "done" else logger.error
        error = f" ({_cli_message(status.error)})" if status.error else ""
        log("%s: %s%s", status.slide, status.status, error)

    return progress, on_slide


def _print_batch(statuses: list[SlideStatus], outdir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"wsi-hipe batch → {outdir}")
    columns = ("slide", "status", "output", "tiles", "failed tiles", "seconds", "tiles/s", "error")
    for column in columns:
        table.add_column(column, overflow="fold")
    for s in statuses:
        r = s.result
        table.add_row(
            str(s.slide),
            s.status,
            str(s.output) if s.status in ("done", "partial") else "",
            str(r.tiles_total) if r else "",
            str(len(r.failed)) if r else "",
            f"{s.seconds:.1f}",
            f"{r.computed / s.seconds:.2f}" if r and s.seconds > 0 else "",
            _cli_message(s.error or ""),
        )
    Console(width=200).print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo files.")] = Path(
        "wsi-hipe-demo"
    ),
    model: ModelOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic slide.")] = 0,
    size: Annotated[
        str, typer.Option(help="Slide size, WIDTHxHEIGHT px (the demo is timed at 2048x1536).")
    ] = "2048x1536",
    config: ConfigOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--resume", help="Start the demo output afresh.")
    ] = True,
) -> None:
    """Make a synthetic Hoechst slide and run the bundled model and HiPe on it, end to end."""
    from wsi_hipe.synthetic import write_slide
    from wsi_hipe.viz import overview_png

    width, height = _parse_size(size)
    overrides = {} if config is not None else dict(DEMO_OVERRIDES)
    if config is None and scheduler is None:
        # One tile per core, one torch thread each (identical results to any scheduler).
        overrides["schedule.scheduler"] = "threads"
        overrides["schedule.workers"] = max(1, min(4, os.cpu_count() or 1))
    overrides.update(_overrides(model=model, scheduler=scheduler, workers=workers))
    cfg = _load_config(config, overrides)
    out.mkdir(parents=True, exist_ok=True)
    slide_path = out / "demo_slide.tiff"
    t0 = time.perf_counter()
    with _errors():
        if overwrite or not slide_path.exists():
            logger.info("writing a %dx%d synthetic slide to %s", width, height, slide_path)
            write_slide(slide_path, size=(width, height), seed=seed, mpp=0.5)
        output = out / "demo.ome.zarr"
        result = _run_slide(slide_path, output, cfg, overwrite=overwrite)
        png = overview_png(output, out / "overview.png", slide=slide_path)
    _print_result(result)
    console = _console()
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s", highlight=False)
    console.print(f"  slide:    {slide_path}", highlight=False)
    console.print(f"  output:   {output}", highlight=False)
    console.print(f"  overview: {png}", highlight=False)
    console.print(f"  view it:  wsi-hipe view {output}", highlight=False)
    typer.echo(str(output))
    typer.echo(str(png))


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", text.lower())
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
        raise typer.BadParameter(f"size must be WIDTHxHEIGHT or one number (px), got {text!r}")
    width = int(match.group(1))
    return width, int(match.group(2)) if match.group(2) else width


SYNTH_FORMATS = ("tiff", "ome-tiff")


@app.command()
def synth(
    output: Annotated[Path, typer.Argument(help="The slide to write (.tiff or .ome.tiff).")],
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT in px, or one number.")] = "2048x1536",
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same slide.")] = 0,
    mpp: Annotated[float, typer.Option(help="µm per px.")] = 0.5,
    layout: Annotated[
        str, typer.Option(help="--format tiff: gray (one channel) or rgb (Hoechst in blue).")
    ] = "gray",
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="tiff (a pyramidal TIFF that OpenSlide opens, with ground truth) or ome-tiff "
            "(a multiplex OME-TIFF with SubIFD levels: Hoechst, CD45, PanCK, CD3, Ki67, ...).",
        ),
    ] = "tiff",
    channels: Annotated[
        int, typer.Option("--channels", min=1, help="--format ome-tiff: number of channels.")
    ] = 3,
    bits: Annotated[int, typer.Option(help="--format ome-tiff: 8, 12 or 16 bits.")] = 16,
    artefacts: Annotated[
        bool, typer.Option("--artefacts/--no-artefacts", help="Blur, debris, folds.")
    ] = True,
) -> None:
    """Write a synthetic Hoechst slide (tiled pyramidal TIFF with its ground truth, or a
    multiplex OME-TIFF)."""
    from wsi_hipe.synthetic import write_ome_tiff, write_slide

    if format_ not in SYNTH_FORMATS:
        raise typer.BadParameter(f"--format must be one of {list(SYNTH_FORMATS)}, got {format_!r}")
    if layout not in ("gray", "rgb"):
        raise typer.BadParameter(f"layout must be 'gray' or 'rgb', got {layout!r}")
    if bits not in (8, 12, 16):
        raise typer.BadParameter(f"--bits must be 8, 12 or 16, got {bits}")
    width, height = _parse_size(size)
    with _errors():
        if format_ == "ome-tiff":
            written = write_ome_tiff(
                output,
                size=(width, height),
                channels=channels,
                seed=seed,
                mpp=mpp,
                bits=bits,
                artefacts=artefacts,
            )
            logger.info("wrote %s (channels %s)", written.path, ", ".join(written.channel_names))
        else:
            slide = write_slide(
                output, size=(width, height), seed=seed, mpp=mpp, layout=layout, artefacts=artefacts
            )
            logger.info("wrote %s (%s cells)", slide.path, slide.n_cells)
    typer.echo(str(output))


@app.command()
def export(
    output: Annotated[Path, typer.Argument(help="An OUT.ome.zarr written with --cells.")],
    geojson: Annotated[
        Path | None,
        typer.Option("--geojson", help="Write the cells as QuPath detections (GeoJSON)."),
    ] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Write the cells table as CSV.")] = None,
) -> None:
    """Export an output's cells: QuPath detections (--geojson) and/or a CSV table (--csv)."""
    from wsi_hipe.export import export_csv, export_geojson

    if geojson is None and csv is None:
        raise _fail("nothing to export: pass --geojson FILE and/or --csv FILE", 2)
    with _errors():
        if geojson is not None:
            n = export_geojson(output, geojson)
            _console().print(f"{n} cells → {geojson} (QuPath: File ▸ Import objects from file)")
        if csv is not None:
            n = export_csv(output, csv)
            _console().print(f"{n} cells → {csv}")


@app.command()
def view(
    path: Annotated[Path | None, typer.Argument(help="An OUT.ome.zarr or a slide.")] = None,
) -> None:
    """Open napari with an output (or a slide) and the explain widget."""
    try:
        from wsi_hipe.napari import view as napari_view
    except ImportError as exc:  # napari is an optional dependency
        raise _fail(f"napari is not installed ({exc}); pip install 'wsi-hipe[napari]'") from None
    with _errors():
        napari_view(path)


@app.command()
def evaluate(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="configs/evaluate.yaml (tiles) or configs/evaluate_slide.yaml."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder.")] = Path(
        "evaluate-results"
    ),
    model: ModelOpt = None,
    slide: Annotated[
        bool,
        typer.Option(
            "--slide",
            help="Slide-level evaluation: localisation, faithfulness, MPRT and cost of HiPe "
            "settings on synthetic slides with ground truth (resumes from --out).",
        ),
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE override, e.g. --set tiles.n=2 (repeatable)."),
    ] = None,
) -> None:
    """Score HiPe against the baselines on synthetic tiles, or (--slide) HiPe settings on
    whole synthetic slides (wsi_hipe.evaluation)."""
    import json

    import yaml

    from wsi_hipe.evaluation import run_evaluation, run_slide_evaluation

    overrides: dict[str, Any] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects KEY=VALUE (e.g. tiles.n=2), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    if slide:
        with _errors(), _progress() as bars:
            task = bars.add_task("slide evaluation", total=None)
            result = run_slide_evaluation(
                config, out=out, model=model, overrides=overrides,
                progress=lambda done, total: bars.update(task, completed=done, total=total),
            )  # fmt: skip
        typer.echo(result.to_markdown())
        for path in sorted(out.glob("*")):
            if path.is_file():
                typer.echo(str(path))
        return
    with _errors():
        result = run_evaluation(config, model=model, overrides=overrides)
        paths = result.save(out)
    (out / "settings.json").write_text(
        json.dumps(result.settings, indent=2, default=str), encoding="utf-8"
    )
    typer.echo(result.to_markdown())
    for path in paths.values():
        typer.echo(str(path))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``wsi-hipe``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app(args=argv if argv is not None else sys.argv[1:], prog_name="wsi-hipe")


if __name__ == "__main__":
    main()
