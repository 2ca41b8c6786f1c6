"""Batches: many slides into one folder, one OME-Zarr each, from a folder, a glob or a manifest."""

from __future__ import annotations

import csv
import glob
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_hipe.config import Config
from wsi_hipe.errors import ConfigError, OutputError, SlideNotFoundError, WsiHipeError
from wsi_hipe.pipeline._inputs import load_for, runner_for, wants_gpu
from wsi_hipe.pipeline._results import SlideStatus
from wsi_hipe.pipeline._slide import explain_slide
from wsi_hipe.pipeline._types import (
    BatchInputs,
    BatchProgress,
    ConfigLike,
    ModelLike,
    SchedulerLike,
    as_config,
)
from wsi_hipe.schedule import OnError, Runner, SchedulerLostError
from wsi_hipe.slide import SLIDE_SUFFIXES

if TYPE_CHECKING:  # pragma: no cover
    from wsi_hipe.models import SegmentationModel

__all__ = ["BatchItem", "resolve_batch_inputs", "explain_batch", "tiles_per_second"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchItem:
    """One slide of a batch: its path, an optional mpp override and output name."""

    slide: Path
    mpp: float | None = None
    output: str | None = None


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _sanitize(name: str) -> str:
    """A safe file-name stem: letters, digits, ``._-``; no leading dots; never empty."""
    stem = _SAFE.sub("_", name).strip("._-") or "slide"
    return stem[:120]


def _slide_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def resolve_batch_inputs(inputs: BatchInputs) -> list[BatchItem]:
    """Turn a batch input into a list of slides.

    Parameters
    ----------
    inputs : path, glob or list
        A folder (its slide files, by suffix: :data:`wsi_hipe.slide.SLIDE_SUFFIXES`, not recursive), a glob
        pattern (``"slides/*.svs"``), a CSV manifest with a ``slide`` column and optional
        ``mpp`` and ``output`` columns (relative slide paths are taken from the manifest's
        folder), or a list of paths / :class:`BatchItem`.

    Returns
    -------
    list of BatchItem, in a deterministic (sorted or manifest) order.

    Raises
    ------
    SlideNotFoundError
        Nothing matched.
    ConfigError
        A manifest without a ``slide`` column or with a bad ``mpp``.
    """
    if isinstance(inputs, (list, tuple)):
        items = [i if isinstance(i, BatchItem) else BatchItem(Path(i)) for i in inputs]
    else:
        text = str(inputs)
        path = Path(text)
        if path.is_dir():
            items = [
                BatchItem(p)
                for p in sorted(path.iterdir())
                if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            ]
        elif path.is_file() and path.suffix.lower() == ".csv":
            items = _read_manifest(path)
        elif path.is_file():
            items = [BatchItem(path)]
        elif any(ch in text for ch in "*?["):
            items = [BatchItem(Path(p)) for p in sorted(glob.glob(text)) if Path(p).is_file()]
        else:
            raise SlideNotFoundError(f"batch input not found: {text}; pass a folder, glob or CSV")
    if not items:
        raise SlideNotFoundError(
            f"no slides found in {inputs!r} (slide suffixes: {', '.join(SLIDE_SUFFIXES)})"
        )
    return items


def _read_manifest(path: Path) -> list[BatchItem]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "slide" not in fields:
            raise ConfigError(f"{path}: a manifest needs a 'slide' column, got columns {fields}")
        items = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("slide"):
                continue
            slide = Path(row["slide"])
            if not slide.is_absolute():
                slide = path.parent / slide
            mpp = None
            if row.get("mpp"):
                try:
                    mpp = float(row["mpp"])
                except ValueError:
                    mpp = -1.0
                if not mpp > 0:
                    raise ConfigError(
                        f"{path}, line {line}: mpp must be a positive number (µm/px), "
                        f"got {row['mpp']!r}"
                    )
            items.append(BatchItem(slide, mpp, row.get("output") or None))
    return items


def _output_names(items: Sequence[BatchItem], outdir: Path) -> list[Path]:
    """Unique, sanitised outputs inside ``outdir`` (``a.ome.zarr``, ``a-2.ome.zarr``, ...)."""
    root = outdir.resolve()
    taken: set[str] = set()
    out = []
    for item in items:
        if item.output:
            requested = Path(item.output)
            if requested.is_absolute() or ".." in requested.parts:
                raise OutputError(
                    f"manifest output {item.output!r} for {item.slide} must be a relative path "
                    f"inside the output folder {outdir} (no '..', not absolute)"
                )
            parts = [_sanitize(p) for p in requested.parts]
            name = "/".join(parts)
            if not name.endswith(".zarr"):
                name += ".ome.zarr"
            if name.lower() in taken:
                raise OutputError(
                    f"manifest output {item.output!r} is used twice; give each slide its own"
                )
            candidate = root / name
            if root not in candidate.resolve().parents:
                raise OutputError(f"manifest output {item.output!r} leaves {outdir}; refused")
        else:
            stem = _sanitize(_slide_stem(item.slide))
            name = f"{stem}.ome.zarr"
            k = 2
            while name.lower() in taken:
                name = f"{stem}-{k}.ome.zarr"
                k += 1
            candidate = root / name
        taken.add(name.lower())
        out.append(candidate)
    return out


def explain_batch(
    inputs: BatchInputs,
    outdir: str | os.PathLike[str],
    *,
    config: ConfigLike | None = None,
    model: ModelLike | None = None,
    scheduler: SchedulerLike | None = None,
    overwrite: bool = False,
    skip_errors: bool = False,
    progress: BatchProgress | None = None,
    on_slide: Callable[[SlideStatus, int, int], object] | None = None,
    on_start: Callable[[str, Path], object] | None = None,
) -> list[SlideStatus]:
    """Explain many slides into ``outdir``, one OME-Zarr each, keeping the workers busy.

    Parameters
    ----------
    inputs : folder, glob, CSV manifest or list
        See :func:`resolve_batch_inputs`.
    outdir : path
        Created if needed. Outputs are named from the slides (sanitised, made unique:
        ``a.ome.zarr``, ``a-2.ome.zarr``) or by the manifest's ``output`` column; nothing is
        written outside ``outdir``.
    config, model, scheduler
        As for :func:`~wsi_hipe.pipeline.explain_slide`; the model is loaded and the scheduler
        started once.
    overwrite : bool
        Replace existing outputs. Without it an existing output is resumed if it matches, and
        reported as failed if not (``ResumeMismatchError``).
    skip_errors : bool
        Go on past a slide that fails. Without it no slide starts after the first failure
        (finished outputs are kept; slides not started are reported as "not run").
    progress : callable, optional
        ``progress(slide_name, done, total)`` during each slide, ``done`` and ``total`` in
        tiles as for :func:`~wsi_hipe.pipeline.explain_slide` (:data:`~wsi_hipe.pipeline.Progress`).
    on_slide : callable, optional
        ``on_slide(status, done_slides, total_slides)`` after each slide, in the order slides
        finish.
    on_start : callable, optional
        ``on_start(slide, output)`` before each slide runs, in the thread that runs it (e.g. to
        log into its output).

    Returns
    -------
    list of SlideStatus
        One per input slide, in input order.

    Raises
    ------
    SchedulerLostError
        The Dask scheduler went away: slides finished so far are complete, the others resume
        when the same call is made against a live scheduler.

    Notes
    -----
    Slides overlap on one scheduler: the next slide starts (tissue detection, output, first
    tiles) as soon as every tile of the current one has been submitted, so its tiles fill the
    workers while the last tiles of the previous slide finish and its pyramid is built. At
    most two slides are open at a time (each with its own window of ``max_in_flight`` tiles).
    With ``sync`` slides run one after the other.
    """
    cfg = as_config(config)
    outdir = Path(outdir)
    items = resolve_batch_inputs(inputs)
    outputs = _output_names(items, outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    runner, owned = runner_for(scheduler, cfg, gpu=wants_gpu(model, cfg))
    try:
        model_obj = load_for(model, cfg, remote=runner.remote)
        batch = _Batch(cfg, model_obj, runner, overwrite, progress, on_start)
        return batch.run(list(zip(items, outputs, strict=True)), skip_errors, on_slide)
    finally:
        if owned:
            runner.close()


_END = object()


class _Lane:
    """One slide's view of the batch's runner: the same runner, and an event set once every
    tile of the slide has been submitted (the batch then starts the next slide)."""

    def __init__(self, runner: Runner, submitted: threading.Event) -> None:
        self._runner = runner
        self.submitted = submitted

    @property
    def remote(self) -> bool:
        return self._runner.remote

    def map(self, fn, items, *, shared=None, errors: OnError = "raise"):
        def tracked():
            # One item ahead, so the event is set as the last item is handed out.
            iterator = iter(items)
            current = next(iterator, _END)
            while current is not _END:
                following = next(iterator, _END)
                if following is _END:
                    self.submitted.set()
                yield current
                current = following
            self.submitted.set()

        return self._runner.map(fn, tracked(), shared=shared, errors=errors)

    def close(self) -> None:
        """The batch owns the runner: nothing to close."""


@dataclass(frozen=True)
class _Batch:
    """What every slide of a batch shares: the config, the loaded model, the started runner."""

    cfg: Config
    model: SegmentationModel
    runner: Runner
    overwrite: bool
    progress: BatchProgress | None
    on_start: Callable[[str, Path], object] | None

    def run(
        self,
        slides: list[tuple[BatchItem, Path]],
        skip_errors: bool,
        on_slide: Callable[[SlideStatus, int, int], object] | None,
    ) -> list[SlideStatus]:
        """Every slide, the next one starting when the current one's tiles are all submitted."""
        overlap = getattr(self.runner, "kind", "sync") != "sync"
        statuses: dict[int, SlideStatus] = {}
        running: dict[Future, int] = {}
        pool = ThreadPoolExecutor(2 if overlap else 1, thread_name_prefix="wsi-hipe-slide")
        lost: list[BaseException] = []

        def collect(block: bool) -> None:
            done = wait(running, return_when=FIRST_COMPLETED)[0] if block else set()
            done |= {f for f in running if f.done()}
            for fut in sorted(done, key=running.get):
                index = running.pop(fut)
                try:
                    statuses[index] = fut.result()
                except SchedulerLostError as exc:
                    lost.append(exc)
                    continue
                if on_slide is not None:
                    on_slide(statuses[index], len(statuses), len(slides))

        clean = False
        try:
            for index, (item, out) in enumerate(slides):
                while len(running) >= (2 if overlap else 1):
                    collect(block=True)
                failed = any(s.status == "failed" for s in statuses.values())
                if lost or (failed and not skip_errors):
                    break
                submitted = threading.Event()
                fut = pool.submit(self.explain, item, out, _Lane(self.runner, submitted))
                fut.add_done_callback(lambda _f, event=submitted: event.set())
                running[fut] = index
                submitted.wait()
                collect(block=False)
            while running:
                collect(block=True)
            clean = True
        finally:
            # On an interrupt, do not wait for the open slides: closing the runner ends them.
            pool.shutdown(wait=clean, cancel_futures=True)
        if lost:
            raise lost[0]
        return [
            statuses.get(i) or SlideStatus(str(item.slide), out, "not run")
            for i, (item, out) in enumerate(slides)
        ]

    def explain(self, item: BatchItem, out: Path, lane: Runner | None = None) -> SlideStatus:
        """One slide of the batch; its failure is a status, never an exception (but a lost
        scheduler is raised: no later slide could run)."""
        cfg = self.cfg if item.mpp is None else self.cfg.with_overrides({"slide.mpp": item.mpp})
        t0 = time.perf_counter()
        hook = None
        if self.progress is not None:
            report, name = self.progress, item.slide.name

            def hook(done: float, total: int) -> None:
                report(name, done, total)

        if self.on_start is not None:
            self.on_start(str(item.slide), out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            result = explain_slide(
                item.slide,
                out,
                config=cfg,
                model=self.model,
                scheduler=lane or self.runner,
                overwrite=self.overwrite,
                progress=hook,
            )
        except SchedulerLostError:
            raise
        except Exception as exc:  # one slide's failure must not lose the batch's statuses
            if isinstance(exc, (WsiHipeError, OSError, ValueError)):
                logger.error("%s failed: %s", item.slide, exc)
            else:  # e.g. a torch RuntimeError (CUDA out of memory): keep the traceback
                logger.exception("%s failed unexpectedly", item.slide)
            error = f"{type(exc).__name__}: {exc}"
            return SlideStatus(
                str(item.slide), out, "failed", error, None, time.perf_counter() - t0
            )
        seconds = time.perf_counter() - t0
        state = "done" if result.ok else "partial"
        error = None if result.ok else f"{len(result.failed)} tile(s) failed"
        logger.info(
            "%s: %s, %d tile(s) computed in %.1f s (%.2f tiles/s)",
            item.slide,
            state,
            result.computed,
            seconds,
            tiles_per_second(result.computed, seconds),
        )
        return SlideStatus(str(item.slide), out, state, error, result, seconds)


def tiles_per_second(tiles: int, seconds: float) -> float:
    """Tiles computed per second of a slide's wall time (0 when nothing was computed)."""
    return tiles / seconds if tiles and seconds > 0 else 0.0
