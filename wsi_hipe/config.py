"""Run configuration: YAML files validated with pydantic, overridable from the command line.

A configuration has seven sections (``slide``, ``tiling``, ``model``, ``score``, ``hipe``,
``output``, ``schedule``); every key has a default that works, unknown keys are rejected and
every error names the offending key::

    >>> cfg = load_config(overrides={"tiling.tile_size": 128})
    >>> cfg.tiling.tile_size
    128

:meth:`Config.fingerprint` hashes the settings that change the numbers a run writes (not the
scheduler or the device choice); the pipeline stores it with each output and refuses to resume
into an output made with a different one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wsi_hipe.errors import ConfigError

__all__ = [
    "Config",
    "SlideConfig",
    "TilingConfig",
    "ModelConfig",
    "ScoreConfig",
    "HipeConfig",
    "OutputConfig",
    "ScheduleConfig",
    "JobqueueConfig",
    "load_config",
    "Substrate",
    "PipelineSubstrate",
    "MetricSubstrate",
    "Threshold",
    "ScoreKind",
    "NgffVersion",
    "SchedulerName",
    "JobqueueScheduler",
    "DeviceName",
    "SlideReaderName",
    "SUBSTRATES",
    "PIPELINE_SUBSTRATES",
    "METRIC_SUBSTRATES",
    "THRESHOLDS",
    "SCORE_KINDS",
    "NGFF_VERSIONS",
    "SCHEDULERS",
    "JOBQUEUE_SCHEDULERS",
    "DEVICES",
    "SLIDE_READERS",
    "canonical_substrate",
    "check_scheduler",
    "check_device",
]

logger = logging.getLogger(__name__)

# --- option vocabularies: each is defined here once; hipe, metrics, the CLI and the napari
# --- widget take their choices from these aliases (``typing.get_args``).

#: What a perturbed window is replaced by (HiPe) or what removed pixels become (metrics):
#: ``"mean"`` each channel's mean over the window, ``"fade"`` zeros (the dark background of
#: fluorescence; the paper's "fade"), ``"blur"`` a Gaussian blur, ``"noise"`` Gaussian noise.
Substrate = Literal["mean", "fade", "blur", "noise"]
#: The pipeline's substrates (``hipe.substrate``): the engine's, and ``"background"``, the local
#: tissue background (:func:`wsi_hipe.metrics.tissue_background`: the window's nuclei removed,
#: its autofluorescence kept), which the pipeline passes to the engine as a callable.
PipelineSubstrate = Literal["mean", "fade", "blur", "noise", "background"]
#: The substrates of the insertion/deletion metrics (a subset of :data:`Substrate`).
MetricSubstrate = Literal["fade", "mean", "blur"]
#: Old spellings still accepted on input and mapped to their one name.
SUBSTRATE_ALIASES: dict[str, str] = {"zero": "fade"}
#: How HiPe's refinement threshold is computed from the previous depth's saliency.
Threshold = Literal["mid-range", "mean"]
#: Score kinds a run can explain; all but ``"logit"`` are non-negative (see ``score.floor``).
ScoreKind = Literal["area", "mean", "logit"]
#: OME-NGFF versions the writer offers: 0.4 (Zarr v2, read everywhere) or 0.5 (Zarr v3).
NgffVersion = Literal["0.4", "0.5"]
#: Batch systems whose jobs become Dask workers (dask-jobqueue; ``schedule.jobqueue``).
JobqueueScheduler = Literal["slurm", "pbs", "lsf"]
#: Named schedulers; besides these, ``"local:N"`` and ``"tcp://host:port"`` (:func:`check_scheduler`).
SchedulerName = Literal["sync", "threads", "processes", "local", JobqueueScheduler]
#: Named devices; besides these, ``"cuda:N"`` (:func:`check_device`).
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
#: Slide readers (``slide.reader``, ``--reader``): ``"auto"`` decides from the file.
SlideReaderName = Literal["auto", "openslide", "tiff", "ngff"]

SUBSTRATES: tuple[str, ...] = get_args(Substrate)
PIPELINE_SUBSTRATES: tuple[str, ...] = get_args(PipelineSubstrate)
METRIC_SUBSTRATES: tuple[str, ...] = get_args(MetricSubstrate)
THRESHOLDS: tuple[str, ...] = get_args(Threshold)
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
NGFF_VERSIONS: tuple[str, ...] = get_args(NgffVersion)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
JOBQUEUE_SCHEDULERS: tuple[str, ...] = get_args(JobqueueScheduler)
DEVICES: tuple[str, ...] = get_args(DeviceName)
SLIDE_READERS: tuple[str, ...] = get_args(SlideReaderName)


def canonical_substrate(name: str) -> str:
    """``name`` with old spellings (``"zero"``) mapped to their one name (``"fade"``)."""
    return SUBSTRATE_ALIASES.get(name, name)


def check_scheduler(value: str) -> str:
    """``value`` if it is a scheduler spec (:data:`SchedulerName`, ``local:N``, ``tcp://…``)."""
    if value in SCHEDULERS or value.startswith("tcp://"):
        return value
    if value.startswith("local:") and value[6:].isdigit() and int(value[6:]) >= 1:
        return value
    names = ", ".join(repr(name) for name in SCHEDULERS)
    raise ValueError(f"must be {names}, 'local:N' or 'tcp://host:port', got {value!r}")


def check_device(value: str) -> str:
    """``value`` if it names a device (:data:`DeviceName` or ``cuda:N``)."""
    if value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")


_CHANNEL_NAMES = ("auto", "mean", "red", "green", "blue")


def _channel_spec(value: Any, allowed: str) -> str | int:
    """A channel as an index (``"2"`` -> 2), a lower-cased keyword, or a stripped name."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().lower() in _CHANNEL_NAMES:
        return value.strip().lower()
    if isinstance(value, str) and value.strip():
        return value.strip()  # a channel name: checked against the slide's channels
    raise ValueError(f"must be {allowed} a channel name, got {value!r}")


#: The U-Net's encoder halves the input four times, so a tile with its halo must be a
#: multiple of 16 px on each side.
_UNET_MULTIPLE = 16


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SlideConfig(_Section):
    """How slides are opened.

    Attributes
    ----------
    mpp : float or None
        µm per level-0 pixel; overrides the slide's metadata (needed when it has none).
    channel : "auto", "mean", int or str
        The stain. RGB(A) slides: ``"auto"`` detects it, or ``"mean"``, 0/1/2,
        ``"red"``/``"green"``/``"blue"``. Multi-channel files: ``"auto"`` (the nuclear stain
        by name), a channel index or a channel name (case-insensitive, or a unique prefix),
        checked against the file (see :func:`wsi_hipe.slide.open_slide`).
    channels : list of int or str, or None
        Channels of a multi-channel file fed to a model with ``in_channels > 1``, in order
        (names or indices); None: the stain alone.
    reader : {"auto", "openslide", "tiff", "ngff"}
        The slide reader; ``"auto"`` decides from the file (:func:`wsi_hipe.slide.choose_reader`).
    plane : int, str, mapping or None
        The plane of a Z-stack or time series: ``3``, ``"z=3"``, ``"z=3,t=0"`` or ``{z: 3}``.
    allow_brightfield : bool
        Run on slides that look like RGB brightfield (H&E) instead of refusing them.
    """

    mpp: float | None = Field(default=None, gt=0)
    channel: str | int = "auto"
    channels: tuple[str | int, ...] | None = None
    reader: SlideReaderName = "auto"
    plane: int | str | dict[str, int] | None = None
    allow_brightfield: bool = False

    @field_validator("channel", mode="before")
    @classmethod
    def _channel_option(cls, value: Any) -> Any:
        return _channel_spec(value, "'auto', 'mean', a channel index, 'red'/'green'/'blue' or")

    @field_validator("channels", mode="before")
    @classmethod
    def _channels_option(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # "DAPI,CD45" from a flag
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"must be a non-empty list of channel names or indices, got {value!r}")
        return tuple(_channel_spec(v, "a channel index or") for v in value)


class TilingConfig(_Section):
    """The tile grid at the target resolution.

    Attributes
    ----------
    mpp : float
        Target resolution in µm per pixel (the model's training resolution).
    tile_size : int
        Side of a tile's core in target px; a multiple of 16. Also the output chunk size.
    halo : int
        Context around the core in target px (the model and HiPe see core + 2·halo); a
        multiple of 8 so that core + 2·halo stays a multiple of 16.
    min_tissue : float
        Fraction of a tile's core that must be tissue for the tile to be processed, in [0, 1].
    """

    mpp: float = Field(default=0.5, gt=0)
    tile_size: int = Field(default=256, ge=_UNET_MULTIPLE)
    halo: int = Field(default=32, ge=0)
    min_tissue: float = Field(default=0.05, ge=0, le=1)

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple(cls, value: int) -> int:
        if value % _UNET_MULTIPLE:
            raise ValueError(f"must be a multiple of {_UNET_MULTIPLE}, got {value}")
        return value

    @field_validator("halo")
    @classmethod
    def _halo_multiple(cls, value: int) -> int:
        if value % (_UNET_MULTIPLE // 2):
            raise ValueError(
                f"must be a multiple of {_UNET_MULTIPLE // 2} (so that tile_size + 2*halo is a "
                f"multiple of {_UNET_MULTIPLE}), got {value}"
            )
        return value


class ModelConfig(_Section):
    """Which segmentation model runs, and where.

    Attributes
    ----------
    path : str
        ``"bundled"`` (the weights shipped with the package), a ``.safetensors`` checkpoint
        or a TorchScript file.
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    autocast : bool
        bf16/fp16 autocast on CUDA (scores and saliency stay float32); ignored on CPU.
    """

    path: str = "bundled"
    device: str = "auto"
    autocast: bool = True

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        return check_device(value)


class ScoreConfig(_Section):
    """The scalar that HiPe explains per tile.

    Attributes
    ----------
    kind : {"area", "mean", "logit"}
        ``"area"``: expected area (px² at the target resolution) of class ``class`` inside the
        tile core, ``sum(p_class · core)``; ``"mean"``: its mean probability over the core;
        ``"logit"``: the sum of its logits over the core (can be negative).
    class_index : int
        Output class explained (YAML key ``class``); 1 = lymphocyte for the bundled model.
    floor : float
        Tiles whose score is ≤ ``floor`` (in the score's units) skip HiPe and get zero
        saliency; see :mod:`wsi_hipe.pipeline` for the bound that makes this safe. ``0``
        skips only tiles whose score is exactly zero. Ignored for ``"logit"``.
    """

    kind: ScoreKind = "area"
    class_index: int = Field(default=1, ge=0, alias="class")
    floor: float = Field(default=1.0, ge=0)


class HipeConfig(_Section):
    """Options passed to :func:`wsi_hipe.hierarchical_perturbation`.

    Attributes
    ----------
    substrate : {"background", "mean", "fade", "blur", "noise"}
        What a perturbed window is replaced by. ``"background"`` (the default): the local
        tissue background, the window with its nuclei removed
        (:func:`wsi_hipe.metrics.tissue_background`); chosen by the slide-level evaluation
        (BENCHMARKS.md, "Slide-level evaluation and defaults"): it localises the densest
        lymphocyte cluster where ``"mean"`` (the engine's default, the authors') leaves a bright
        patch the model still calls lymphocyte, and its maps decorrelate when the model is
        randomised. The others as :func:`wsi_hipe.hierarchical_perturbation`.
    background_radius_um : float
        Disk radius (µm) of the ``"background"`` substrate's opening: wider than the largest
        nucleus (7 µm: a 14 µm lymphocyte fits inside the disk's diameter).
    threshold : {"mid-range", "mean"}
        How the refinement threshold is computed from the previous depth's saliency.
    batch_size : int
        Perturbed inputs per forward pass (memory, not results).
    tiles_per_batch : int
        Tiles a task explains together, their windows sharing forward batches
        (:func:`wsi_hipe.hipe_many.hierarchical_perturbation_many`): late depths select few
        windows per tile, so on a GPU a batch of one tile's windows runs mostly empty. Maps
        are those of one tile per task up to float rounding; 1 (default) suits a CPU.
        Ignored with cells (each tile is one vector run).
    max_depth : int or None
        Stop after this many depths (None: until cells reach ``min_cell_size``).
    min_cell_size : int
        Smallest cell side in px.
    start_grid : int or None
        Cells per side at depth 1 (None: the authors' rule, 2·⌊⌈log2 m⌉/2⌋ for an m px
        tile). A coarser start (e.g. 4) perturbs fewer windows at depth 1.
    early_stop : bool
        Stop refining when no perturbation of a depth moves the score (a flat model, e.g. on
        an empty tile). False reproduces the authors' code, which refines regardless (used as
        the naive baseline in ``benchmarks/bench_pipeline.py``).
    """

    substrate: PipelineSubstrate = "background"
    background_radius_um: float = Field(default=7.0, gt=0)
    threshold: Threshold = "mid-range"
    batch_size: int = Field(default=32, ge=1)
    tiles_per_batch: int = Field(default=1, ge=1)
    max_depth: int | None = Field(default=None, ge=1)
    min_cell_size: int = Field(default=4, ge=1)
    start_grid: int | None = Field(default=None, ge=1)
    early_stop: bool = True


class CellsConfig(_Section):
    """How ``--cells`` finds and summarises cells (:mod:`wsi_hipe.cells`; used only with cells).

    Attributes
    ----------
    split_depth_um : float
        Depth (h) of the distance-map maxima that split touching cells, µm: smaller splits more
        (fewer fused nuclei, more nuclei cut in two; BENCHMARKS.md, "Cells").
    min_area_um2 : float
        Smallest cell, µm²; smaller instances merge into a neighbour or are dropped.
    ring_um : float
        Width of the ring around a cell in which its saliency counts as "ring", µm.
    margin_um : float
        Margin by which a cell's mask grows into its score region, µm.
    """

    split_depth_um: float = Field(default=0.5, ge=0)
    min_area_um2: float = Field(default=4.0, ge=0)
    ring_um: float = Field(default=3.0, gt=0)
    margin_um: float = Field(default=1.5, ge=0)


class OutputConfig(_Section):
    """The output format.

    Attributes
    ----------
    ngff : {"0.4", "0.5"}
        OME-NGFF version: 0.4 (Zarr v2, read everywhere) or 0.5 (Zarr v3).
    """

    ngff: NgffVersion = "0.4"

    @field_validator("ngff", mode="before")
    @classmethod
    def _ngff_from_number(cls, value: Any) -> Any:
        # YAML reads ``ngff: 0.4`` as a float.
        if isinstance(value, float):
            return f"{value:.1f}"
        return value


class JobqueueConfig(_Section):
    """Dask workers as batch jobs (``schedule.scheduler: slurm | pbs | lsf``), through
    dask-jobqueue; see docs/cluster.md.

    Each job runs ``processes`` Dask worker processes sharing ``cores`` cores and ``memory``;
    the run keeps between ``minimum_jobs`` and ``maximum_jobs`` jobs queued or running
    (dask-jobqueue's ``adapt``), so a job killed at its walltime is replaced.

    Attributes
    ----------
    cores : int
        Cores per job (the workers' threads: ``cores / processes`` each).
    processes : int
        Worker processes per job.
    memory : str
        Memory per job, e.g. ``"16GB"``.
    walltime : str
        Job walltime, ``HH:MM:SS``.
    queue, account : str or None
        Partition/queue and account (``#SBATCH -p`` / ``-A``).
    job_extra_directives : list of str
        Extra scheduler directives, e.g. ``["--gres=gpu:1"]`` for one GPU per SLURM job.
    job_script_prologue : list of str
        Shell lines run before the worker starts (``module load``, ``source .venv/bin/activate``).
    worker_extra_args : list of str
        Extra ``dask worker`` arguments, e.g. ``["--lifetime", "55m", "--lifetime-stagger",
        "4m"]`` to retire workers cleanly before the walltime.
    interface : str or None
        Network interface of the scheduler and workers (``ib0``, ``eth0``); None = default.
    local_directory, log_directory : str or None
        Workers' scratch folder; folder for the jobs' output files.
    python : str or None
        Python of the workers; None = this interpreter.
    minimum_jobs, maximum_jobs : int
        Bounds of the adaptive number of jobs.
    dashboard_address : str or None
        Address of the scheduler's dashboard (``":8787"``); None = no dashboard.
    """

    cores: int = Field(default=2, ge=1)
    processes: int = Field(default=1, ge=1)
    memory: str = "8GB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    job_extra_directives: list[str] = []
    job_script_prologue: list[str] = []
    worker_extra_args: list[str] = []
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None
    minimum_jobs: int = Field(default=0, ge=0)
    maximum_jobs: int = Field(default=4, ge=1)
    dashboard_address: str | None = None

    @field_validator("maximum_jobs")
    @classmethod
    def _bounds(cls, value: int, info: Any) -> int:
        low = info.data.get("minimum_jobs", 0)
        if value < low:
            raise ValueError(f"must be >= minimum_jobs ({low}), got {value}")
        return value

    def cluster_kwargs(self, *, gpu: bool = False, threads: int | None = None) -> dict[str, Any]:
        """Keyword arguments of dask-jobqueue's ``SLURMCluster`` / ``PBSCluster`` / ``LSFCluster``.

        ``gpu``: workers offer ``threads`` (default ``cores / processes``) ``GPU`` resource slots.
        """
        extra = list(self.worker_extra_args)
        if gpu:
            slots = threads or max(1, self.cores // self.processes)
            extra += ["--resources", f"GPU={slots}"]
        kwargs: dict[str, Any] = {
            "cores": self.cores,
            "processes": self.processes,
            "memory": self.memory,
            "walltime": self.walltime,
            "queue": self.queue,
            "account": self.account,
            "job_extra_directives": list(self.job_extra_directives),
            "job_script_prologue": list(self.job_script_prologue),
            "worker_extra_args": extra,
            "interface": self.interface,
            "local_directory": self.local_directory,
            "log_directory": self.log_directory,
            "python": self.python,
            "scheduler_options": {"dashboard_address": self.dashboard_address},
        }
        return {k: v for k, v in kwargs.items() if v is not None}


class ScheduleConfig(_Section):
    """Where and how tiles run (never changes the numbers written).

    Attributes
    ----------
    scheduler : str
        ``"sync"``, ``"threads"``, ``"processes"``, ``"local"`` / ``"local:N"`` (a local Dask
        cluster of N worker processes), ``"tcp://host:port"`` (join a running Dask cluster) or
        a batch system, ``"slurm"``, ``"pbs"``, ``"lsf"`` (workers as jobs, ``jobqueue``).
    workers : int
        Worker count for ``threads``, ``processes`` and ``local`` (``local:N`` wins).
    max_in_flight : int or None
        Tiles submitted but not yet written; None = 2 × worker threads. Bounds memory.
    threads_per_worker : int or None
        torch intra-op threads per worker; None = 1 for every scheduler. CPU float reductions
        may round differently with another thread count, so outputs are bit-identical across
        schedulers only for equal values (resuming with another value mixes both).
    retries : int
        Extra tries of a tile whose task raised (Dask's ``retries=``): with the default 2 a
        tile is tried at most 3 times, then recorded as failed; the next run retries it.
    jobqueue : JobqueueConfig
        The batch jobs of ``slurm``/``pbs``/``lsf``.
    """

    scheduler: str = "sync"
    workers: int = Field(default=1, ge=1)
    max_in_flight: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    retries: int = Field(default=2, ge=0)
    jobqueue: JobqueueConfig = JobqueueConfig()

    @field_validator("scheduler")
    @classmethod
    def _scheduler_name(cls, value: str) -> str:
        return check_scheduler(value)


class Config(_Section):
    """A whole run configuration; every section defaults to working values."""

    slide: SlideConfig = SlideConfig()
    tiling: TilingConfig = TilingConfig()
    model: ModelConfig = ModelConfig()
    score: ScoreConfig = ScoreConfig()
    hipe: HipeConfig = HipeConfig()
    cells: CellsConfig = CellsConfig()
    output: OutputConfig = OutputConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data, with YAML key names (``score.class``)."""
        return self.model_dump(mode="json", by_alias=True)

    def results_dict(self) -> dict[str, Any]:
        """The part of the configuration that changes the arrays a run writes.

        Excludes ``schedule`` (any scheduler gives identical output), ``model.device`` and
        ``model.path`` (the model is identified by its weights' hash, stored separately).
        """
        data = self.to_dict()
        del data["schedule"]
        data["model"] = {"autocast": data["model"]["autocast"]}
        return data

    def fingerprint(self) -> str:
        """SHA-256 (hex) of :meth:`results_dict` in canonical JSON."""
        text = json.dumps(self.results_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> Config:
        """A copy with ``overrides`` applied (dotted keys or nested dicts; None values ignored)."""
        data = self.to_dict()
        _merge(data, _nest(overrides or {}))
        return _validate(data, source="overrides")


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read a YAML configuration and apply command-line overrides.

    Parameters
    ----------
    path : str or Path, optional
        A YAML file with any subset of the sections; None = all defaults.
    overrides : mapping, optional
        Values that win over the file, as dotted keys (``{"tiling.tile_size": 128}``) or
        nested dicts (``{"tiling": {"tile_size": 128}}``). Keys whose value is None are
        ignored, so unset command-line flags can be passed through unchanged.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        The file is missing or not YAML, a key is unknown, or a value is invalid; the message
        names the key, e.g. ``tiling.tile_size: must be a multiple of 16, got 250``.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        import yaml

        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    _merge(data, _nest(overrides or {}))
    cfg = _validate(data, source=source)
    logger.debug("configuration from %s: %s", source, cfg.to_dict())
    return cfg


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``{"a.b": 1, "c": {"d": 2}}`` into nested dicts, dropping None values."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if not isinstance(key, str) or not key:
            raise ConfigError(f"override keys must be non-empty strings, got {key!r}")
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is both a value and a section")
            node = child
        if isinstance(value, Mapping):
            child = node.setdefault(parts[-1], {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: is both a value and a section")
            _merge(child, _nest(value))
        else:
            node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _validate(data: dict[str, Any], *, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def _error_key(loc: tuple[Any, ...]) -> tuple[str, type[BaseModel]]:
    """The dotted key of a pydantic error location and the section it lies in: section names
    down to the field (``schedule.jobqueue.cores``); pydantic's union-member suffixes
    (``.int``) dropped."""
    section: type[BaseModel] = Config
    parts: list[str] = []
    for part in loc:
        parts.append(str(part))
        field = section.model_fields.get(str(part))
        kind = getattr(field, "annotation", None)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            section = kind
            continue
        break
    return ".".join(parts) or "<top level>", section


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    seen = set()
    for err in exc.errors():
        key, section = _error_key(tuple(err["loc"]))
        if key in seen:
            continue
        seen.add(key)
        if err["type"] == "extra_forbidden":
            valid = sorted(field.alias or name for name, field in section.model_fields.items())
            lines.append(f"{key}: unknown key; valid keys here: {', '.join(valid)}")
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if "got" not in msg:
            msg = f"{msg}, got {err.get('input')!r}"
        lines.append(f"{key}: {msg}")
    head = f"invalid configuration ({source})"
    return head + ": " + "; ".join(lines)
