"""GPU readiness, proven on the CPU: HiPe runs where the model lives, with no copy per batch.

There is no GPU on the development machines, so these tests run the real code on a *fake
accelerator* (:class:`FakeAccelerator`): tensors that say they live on the device ``cpu:1`` and
behave there as tensors on a CUDA device do. Their data sit in ordinary CPU tensors, so every
operation computes exactly what it computes on the CPU, but

- an operation mixing a device tensor with a CPU tensor of one or more dimensions raises, as
  CUDA does ("Expected all tensors to be on the same device"); 0-d CPU tensors are scalars and
  allowed, as on CUDA;
- ``.numpy()`` of a device tensor raises (call ``.cpu()`` first), as on CUDA;
- every host→device copy (``.to(device)``, a CPU source copied or indexed into a device tensor)
  and every device→host transfer (``.cpu()``, ``.item()``, ``.tolist()``, ``bool(t)``) is
  recorded, in order, with markers the test adds (e.g. one per HiPe batch), so the copies per
  batch and the syncs per depth can be counted.

Why ``cpu:1``: it is the one device other than the CPU that a CPU-only torch accepts without a
backend (``meta`` has no autocast, which the score code enters; ``xpu``, ``hpu``, ``mtia``,
``privateuseone`` need a compiled backend or a device guard). The device's *type* is "cpu", so
the model wrapper takes its CPU path (no autocast, contiguous memory); what these tests check is
where tensors are and what crosses between host and device, not CUDA's kernels. The tests marked
``gpu`` check the same on a real CUDA device (``benchmarks/gpu_check.sh`` runs them).
"""

from __future__ import annotations

import math
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from _pipeline_support import SMALL, BrightBlobNet, synthetic_image, tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from wsi_hipe import hierarchical_perturbation, pipeline
from wsi_hipe.config import load_config
from wsi_hipe.models import ModelMeta, SegmentationModel
from wsi_hipe.slide import ArrayReader, open_slide

# torch 2.14 marks TorchScript deprecated; the widget test saves its model as TorchScript.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

FAKE = torch.device("cpu", 1)
aten = torch.ops.aten
CLASSES = ("background", "lymphocyte", "nucleus")

# --- the fake accelerator -----------------------------------------------------------------------

#: Operations that may take CPU tensors next to device tensors (as on CUDA), each counted as a
#: host→device copy: copying into a device tensor, and indexing with CPU indices.
_CROSSING_OPS = {aten.copy_.default, aten.index.Tensor, aten.index_put_.default,
                 aten.index_put.default}  # fmt: skip


def on_fake(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device == FAKE


class OnFake(torch.Tensor):
    """A tensor on the fake device; its data are the CPU tensor ``_data``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> OnFake:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            data.size(),
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=FAKE,
            requires_grad=data.requires_grad,
            layout=data.layout,
        )
        out._data = data
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a fake-device tensor outside FakeAccelerator")

    def tolist(self):
        FakeAccelerator.active[-1].record("d2h", "tolist")
        return self._data.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {FAKE} device type tensor to numpy; use Tensor.cpu() first")

    def __repr__(self) -> str:
        return f"OnFake({self._data!r})"


def _data(t):
    return t._data if on_fake(t) else t


class _FakeFromData(TorchFunctionMode):
    """``torch.tensor(data, device=FAKE)`` / ``torch.as_tensor``: made on the host, then copied
    (a CPU-only torch would make them on the CPU: the device index of "cpu" is dropped)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None:
            if torch.device(device) == FAKE:
                rest = {k: v for k, v in kwargs.items() if k != "device"}
                if func is torch.as_tensor and on_fake(args[0]):
                    return args[0].to(**rest)
                return func(*args, **rest).to(FAKE)
        return func(*args, **kwargs)


class FakeAccelerator(TorchDispatchMode):
    """Runs every torch operation; tensors on :data:`FAKE` behave as on an accelerator.

    ``events`` lists ``(kind, what)`` in order: ``"h2d"`` and ``"d2h"`` transfers, and the
    markers added with :meth:`mark`.
    """

    active: list[FakeAccelerator] = []

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def record(self, kind: str, what: str) -> None:
        self.events.append((kind, what))

    def mark(self, what: str) -> None:
        self.events.append(("mark", what))

    def __enter__(self):
        FakeAccelerator.active.append(self)
        # nn.Module.to replaces parameters by the moved tensors (instead of swapping .data).
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        self._from_data = _FakeFromData()
        self._from_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._from_data.__exit__(*exc)
        FakeAccelerator.active.pop()
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        device = kwargs.get("device")
        to_fake = device is not None and torch.device(device) == FAKE
        if func is aten._to_copy.default:
            return self._to_copy(args[0], kwargs)
        if func is aten._local_scalar_dense.default:
            self.record("d2h", "item")
            return func(_data(args[0]))
        if not to_fake and not any(on_fake(a) for a in flat):
            return func(*args, **kwargs)
        host = [a for a in flat if isinstance(a, torch.Tensor) and not on_fake(a) and a.dim()]
        if host:
            if func not in _CROSSING_OPS:
                shapes = [tuple(a.shape) for a in host]
                raise RuntimeError(
                    f"{func}: expected all tensors to be on the same device, but found tensors "
                    f"on {FAKE} and on the CPU (shapes {shapes})"
                )
            self.record("h2d", str(func))
        kwargs = {k: torch.device("cpu") if k == "device" else v for k, v in kwargs.items()}
        out = func(*tree_map(_data, args), **tree_map(_data, kwargs))
        if not isinstance(out, torch.Tensor | tuple | list):  # a Python value: the host waits
            self.record("d2h", str(func))
        inputs = {id(_data(a)): a for a in flat if on_fake(a)}  # in-place ops return self

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            same = inputs.get(id(t))
            return same if same is not None else OnFake(t)

        return tree_map(wrap, out)

    def _to_copy(self, src, kwargs):
        kwargs = dict(kwargs)
        target = kwargs.pop("device", None)
        target = None if target is None else torch.device(target)
        if on_fake(src):
            out = aten._to_copy.default(src._data, **kwargs)
            if target is not None and target != FAKE:
                self.record("d2h", "copy")
                return out
            return OnFake(out)
        out = aten._to_copy.default(src, **kwargs)
        if target == FAKE:
            self.record("h2d", "copy")
            return OnFake(out)
        return out


class RecordingModel(SegmentationModel):
    """A model wrapper that records the device of every input it is given (before it moves it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_devices: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_devices.append(x.device)
        return super().forward(x)


def fake_model() -> RecordingModel:
    """The tests' BrightBlobNet, moved onto the fake device (weights included)."""
    model = RecordingModel(BrightBlobNet(), ModelMeta(class_names=CLASSES), device=FAKE)
    assert all(on_fake(p) for p in model.parameters())
    return model


def phases(events: list[tuple[str, str]]) -> list[Counter]:
    """Transfers counted per phase: before the first marker, between markers, after the last."""
    out = [Counter()]
    for kind, _ in events:
        if kind == "mark":
            out.append(Counter())
        else:
            out[-1][kind] += 1
    return out


def test_the_fake_accelerator_refuses_what_a_gpu_refuses_and_counts_copies():
    with FakeAccelerator() as fake:
        a = torch.arange(6.0).to(FAKE)
        b = torch.ones(6, device=FAKE)  # made there: no copy
        c = torch.tensor([1.0, 2.0], device=FAKE)  # made on the host, copied
        assert on_fake(c) and torch.as_tensor(c, device=FAKE) is c
        assert on_fake(a + b) and on_fake(a * torch.tensor(2.0))  # 0-d CPU tensor = scalar
        with pytest.raises(RuntimeError, match="same device"):
            _ = a + torch.ones(6)
        with pytest.raises(TypeError, match="cpu"):
            a.numpy()
        fake.mark("batch")
        host = (a * b).sum().cpu()
        assert float((a[2:4] * 10).sum()) == 50.0
        assert a.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert host.device.type == "cpu" and host.item() == 15.0
    assert fake.events == [("h2d", "copy"), ("h2d", "copy"), ("mark", "batch"), ("d2h", "copy"), ("d2h", "item"),
                           ("d2h", "tolist")]  # fmt: skip


# --- HiPe: batches on the device, no host→device copy per batch (issue 16) ---------------------


@pytest.mark.parametrize(
    "substrate, vector", [("mean", False), ("fade", False), ("blur", False), ("mean", True)]
)
def test_hipe_builds_its_batches_on_the_device_without_a_copy_per_batch(substrate, vector):
    """Every batch HiPe hands to ``forward`` is on the device; inside a depth no transfer
    crosses between host and device; between depths at most one copy each way (the depth's
    selection to the host, its windows to the device)."""
    gen = torch.Generator().manual_seed(0)
    x_host = torch.rand(1, 64, 56, generator=gen)
    weights_host = torch.rand(3 if vector else 1, 64, 56, generator=gen)
    with FakeAccelerator() as fake:
        x = x_host.to(FAKE)
        weights = weights_host.to(FAKE)
        seen: list[torch.device] = []

        def forward(batch):
            seen.append(batch.device)
            out = (batch * weights).flatten(2).sum(-1) ** 2  # (B, K)
            return out if vector else out[:, 0]

        fake.mark("start")
        res = hierarchical_perturbation(
            forward,
            x,
            substrate=substrate,
            batch_size=4,
            start_grid=2,
            device=FAKE,
            progress=lambda depth, done, total: fake.mark(f"batch {depth}"),
        )
        fake.mark("end")
        on_device = on_fake(res.saliency)
        saliency = res.saliency.cpu()
    assert set(seen) == {FAKE} and on_device
    assert len(res.masks_per_depth) == 3 and sum(res.masks_per_depth) > 10 * 4
    marks = [what for kind, what in fake.events if kind == "mark"]
    counts = phases(fake.events)[1:]  # after "start": one Counter per mark
    depth_of = [m.split()[1] if m.startswith("batch") else m for m in marks]
    for i in range(len(marks) - 1):
        here, after = depth_of[i], depth_of[i + 1]
        if after == "end":
            assert counts[i]["h2d"] == 0, f"host→device copy after the last batch: {counts[i]}"
        elif here == after:  # between two batches of one depth
            assert counts[i] == Counter(), f"transfer inside depth {here}: {counts[i]}"
        else:  # before the first batch of a depth: its windows go to the device once
            assert counts[i]["h2d"] <= 1 and counts[i]["d2h"] <= 1, (here, after, counts[i])
    # The very same numbers as on the CPU (the fake device computes with CPU kernels).
    ref = hierarchical_perturbation(
        lambda b: (lambda o: o if vector else o[:, 0])((b * weights_host).flatten(2).sum(-1) ** 2),
        x_host,
        substrate=substrate,
        batch_size=4,
        start_grid=2,
    )
    assert ref.masks_per_depth == res.masks_per_depth
    torch.testing.assert_close(saliency, ref.saliency, rtol=1e-6, atol=0)


# --- the pipeline's faces run HiPe on the model's device (issue 16) ----------------------------

FAST = {**SMALL, "hipe.max_depth": 2, "hipe.start_grid": 4}
W, H = 192, 128


@pytest.fixture(scope="module")
def slide():
    return open_slide(ArrayReader(synthetic_image(W, H, seed=3), mpp=0.5))


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=FAST)


def test_explain_region_runs_every_forward_on_the_model_device(slide, cfg):
    with FakeAccelerator() as fake:
        model = fake_model()
        fake.mark("start")
        res = pipeline.explain_region(
            slide, 0, 0, W, H, config=cfg, model=model,
            progress=lambda done, total: fake.mark("progress"),
        )  # fmt: skip
    tiles = len(res.tiles)
    assert tiles == 6 and all(r["status"] == "done" for r in res.tiles)
    # Every input the model got (segmentation pass and every HiPe batch) was on its device.
    assert model.input_devices and set(model.input_devices) == {FAKE}
    assert len(model.input_devices) > 2 * tiles
    # Host→device: per tile the tile itself, the score's core mask, one window table per depth
    # and, for the default "background" substrate (a scipy opening on the host), the tile's
    # substitute image once; never one per batch (a progress mark follows every HiPe batch).
    copies = sum(c["h2d"] for c in phases(fake.events)[1:])
    substitute = 1 if cfg.hipe.substrate == "background" else 0
    assert copies <= tiles * (2 + cfg.hipe.max_depth + substitute)
    ref = pipeline.explain_region(slide, 0, 0, W, H, config=cfg, model=tiny_model())
    np.testing.assert_allclose(res.saliency, ref.saliency, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(res.segmentation, ref.segmentation)


def test_explain_cell_runs_every_forward_on_the_model_device(slide, cfg):
    ref_region = pipeline.explain_region(slide, 0, 0, W, H, config=cfg, model=tiny_model())
    ys, xs = np.nonzero(ref_region.segmentation == 1)
    y, x = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    with FakeAccelerator():
        model = fake_model()
        res = pipeline.explain_cell(slide, x + 0.5, y + 0.5, config=cfg, model=model)
    assert res.forward_passes > 1 and res.cell_mask.any()
    assert set(model.input_devices) == {FAKE} and len(model.input_devices) > 2
    ref = pipeline.explain_cell(slide, x + 0.5, y + 0.5, config=cfg, model=tiny_model())
    np.testing.assert_allclose(res.saliency, ref.saliency, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(res.cell_mask, ref.cell_mask)


def test_a_tile_task_runs_on_the_model_device(slide, cfg):
    """``run_tile`` (what the schedulers call) with the model passed in."""
    from wsi_hipe.pipeline._tile import ModelRef, TileJob, TileSpec, run_tile
    from wsi_hipe.tiling import make_grid

    grid = make_grid((W, H), slide_mpp=0.5, target_mpp=0.5, tile_size=64, halo=16)
    job = TileJob.of(grid, grid.tiles[1])
    with FakeAccelerator():
        model = fake_model()
        spec = TileSpec.of(cfg, ModelRef.of(model, cfg))
        out = run_tile(job, spec=spec, slide=slide, model=model)
    assert out.record["status"] == "done" and out.saliency.max() > 0
    assert set(model.input_devices) == {FAKE}


# --- the same on a real GPU (benchmarks/gpu_check.sh runs these) ------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cuda_region_equals_the_cpu_region_window_for_window(slide, cfg):
    """float32 on CUDA (TF32 off: exact_float32) selects the same windows as the CPU."""
    from wsi_hipe.models import exact_float32, load_model

    cuda = load_model(BrightBlobNet(), class_names=CLASSES, device="cuda", autocast=False)
    with exact_float32():
        res = pipeline.explain_region(slide, 0, 0, W, H, config=cfg, model=cuda)
    ref = pipeline.explain_region(slide, 0, 0, W, H, config=cfg, model=tiny_model())
    assert [t["passes"] for t in res.tiles] == [t["passes"] for t in ref.tiles]
    scale = float(ref.saliency.max())
    np.testing.assert_allclose(res.saliency, ref.saliency, rtol=1e-4, atol=1e-4 * scale)
    assert (res.segmentation != ref.segmentation).mean() <= 1e-3  # argmax ties may flip


@pytest.mark.gpu
@needs_cuda
def test_cuda_hipe_copies_nothing_to_the_device_per_batch():
    """CUDA's own count (the profiler's memcpy records): at most one host→device copy per depth."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 64, 56, generator=gen).cuda()
    weights = torch.rand(64, 56, generator=gen).cuda()
    forward = lambda b: ((b[:, 0] * weights).flatten(1).sum(-1)) ** 2  # noqa: E731
    hierarchical_perturbation(forward, x, batch_size=4, start_grid=2)  # warm up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res = hierarchical_perturbation(forward, x, batch_size=4, start_grid=2)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    to_device = [n for n in names if "Memcpy HtoD" in n]
    to_host = [n for n in names if "Memcpy DtoH" in n]
    if not to_host:
        pytest.skip("the profiler recorded no CUDA memcpy (CUPTI unavailable)")
    batches = sum(math.ceil((m + (d == 0)) / 4) for d, m in enumerate(res.masks_per_depth))
    assert len(to_device) <= res.depth < batches, (to_device, res.masks_per_depth)


# --- the compute dtype is part of an output's identity (issue 16) -----------------------------


class Bf16Model(SegmentationModel):
    """The same weights as a model that computes in bf16 (what CUDA autocast on an H200 gives):
    only the reported compute dtype differs."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def compute_dtype_on(self, device) -> torch.dtype:
        return torch.bfloat16


def test_an_output_resumes_only_in_the_dtype_it_was_computed_in(tmp_path, slide, cfg):
    from wsi_hipe.errors import ResumeMismatchError
    from wsi_hipe.omezarr import read_output

    out = tmp_path / "cpu.ome.zarr"
    first = pipeline.explain_slide(slide, out, config=cfg, model=tiny_model())
    assert first.ok and first.computed > 0
    assert read_output(out).provenance["model"]["compute_dtype"] == "float32"
    again = pipeline.explain_slide(slide, out, config=cfg, model=tiny_model())
    assert again.resumed == first.computed and again.computed == 0
    bf16 = Bf16Model(BrightBlobNet(), ModelMeta(class_names=CLASSES), device="cpu")
    with pytest.raises(ResumeMismatchError):
        pipeline.explain_slide(slide, out, config=cfg, model=bf16)


# --- the napari widget: models load in the run's worker thread (issue 16) ----------------------


@pytest.mark.napari
def test_the_widget_never_loads_a_model_on_the_gui_thread(request, tmp_path, monkeypatch):
    """Choosing a model file lists its classes from the sidecar; the model itself (and so a
    first CUDA initialisation) is loaded in the run's worker thread, on ``model.device``."""
    import json
    import os

    pytest.importorskip("napari")
    pytest.importorskip("pytestqt")
    if not os.environ.get("DISPLAY"):
        pytest.skip("napari tests need a display: xvfb-run -a env QT_QPA_PLATFORM=xcb pytest")
    from wsi_hipe import models, synthetic
    from wsi_hipe.napari._widget import ExplainWidget

    slide_path = tmp_path / "slide.tif"
    synthetic.write_slide(slide_path, size=(256, 256), mpp=0.5, tile_size=128, ground_truth=False)
    model_path = tmp_path / "immune.pt"
    torch.jit.script(BrightBlobNet()).save(str(model_path))
    names = ["background", "immune", "other"]
    sidecar = {"class_names": names, "activation": "softmax", "in_channels": 1, "mpp": 0.5}
    model_path.with_suffix(".json").write_text(json.dumps(sidecar))

    loads: list[tuple[bool, object]] = []
    real_load = models.load_model

    def recording_load(*args, **kwargs):
        loads.append((threading.current_thread() is threading.main_thread(), kwargs.get("device")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", recording_load)
    viewer = request.getfixturevalue("make_napari_viewer")()
    qtbot = request.getfixturevalue("qtbot")
    viewer.open(str(slide_path), plugin="wsi-hipe")
    overrides = {"tiling.tile_size": 64, "tiling.halo": 16, "model.device": "cpu"}
    widget = ExplainWidget(viewer, overrides=overrides)
    widget.set_settings(model=model_path, max_depth=2, target="immune")
    assert list(widget._target.choices) == names
    assert loads == []  # the GUI thread read the sidecar only
    widget.explain_region((20.0, 20.0, 40.0, 40.0))
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert widget.last_result is not None and widget.last_result.forward_passes > 1
    assert loads == [(False, "cpu")]  # once, in the worker thread, on the configured device
    widget.explain_region((20.0, 20.0, 40.0, 40.0))  # the loaded model is reused
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert loads == [(False, "cpu")]
