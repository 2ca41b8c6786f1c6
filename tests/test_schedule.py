"""Dask scheduling: bounded task runner, per-process caches, identical output on every scheduler."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from _pipeline_support import SMALL, save_tiny_model

from wsi_hipe import pipeline
from wsi_hipe.config import load_config
from wsi_hipe.omezarr import read_output
from wsi_hipe.schedule import (
    TaskError,
    TaskRunner,
    WorkerValue,
    parse_scheduler,
    ship_model,
    worker_cache,
)

# --- module-level task functions (picklable for process schedulers) ---------------------------

_BUILDS: list[int] = []


def _square(item, *, offset=0):
    return item * item + offset


def _pid_and_cached(item, *, key):
    token = worker_cache(("test-cache", key), lambda: (os.getpid(), id(object())))
    return os.getpid(), token


def _fail_on_three(item):
    if item == 3:
        raise RuntimeError("task 3 broke")
    return item


def test_parse_scheduler():
    assert parse_scheduler("sync", 4) == ("sync", 1, None)
    assert parse_scheduler("threads", 3) == ("threads", 3, None)
    assert parse_scheduler("local:5", 1) == ("local", 5, None)
    assert parse_scheduler("local", 2) == ("local", 2, None)
    assert parse_scheduler("tcp://10.0.0.1:8786", 2) == ("tcp", 2, "tcp://10.0.0.1:8786")
    for bad in ("mpi", "local:0", "local:x", "thread"):
        with pytest.raises(ValueError, match="scheduler"):
            parse_scheduler(bad)
    with pytest.raises(ValueError, match="workers"):
        parse_scheduler("threads", 0)
    with pytest.raises(ValueError, match="max_in_flight"):
        TaskRunner("sync", max_in_flight=0)
    assert TaskRunner("processes").remote and TaskRunner("local:2").remote
    assert not TaskRunner("threads").remote and not TaskRunner("sync").remote


@pytest.mark.parametrize("spec", ["sync", "threads"])
def test_map_returns_every_result(spec):
    with TaskRunner(spec, workers=2) as runner:
        out = dict(runner.map(_square, range(11), shared={"offset": 1}))
    assert out == {i: i * i + 1 for i in range(11)}


@pytest.mark.parametrize("spec", ["sync", "threads"])
def test_in_flight_is_bounded(spec):
    pulled = []
    lock = threading.Lock()

    def items():
        for i in range(20):
            with lock:
                pulled.append(i)
            yield i

    returned = 0
    with TaskRunner(spec, workers=2, max_in_flight=3) as runner:
        assert runner.max_in_flight == 3
        for _item, _result in runner.map(_square, items()):
            returned += 1
            # Items are pulled lazily: never more than the window ahead of what came back.
            assert len(pulled) - returned <= 3 - 1 + 1
    assert returned == 20
    assert TaskRunner("threads", workers=4).max_in_flight == 8


def test_errors_propagate():
    with TaskRunner("threads", workers=2) as runner:
        with pytest.raises(RuntimeError, match="task 3 broke"):
            list(runner.map(_fail_on_three, range(6)))


def test_worker_cache_builds_once_per_process():
    calls = []
    first = worker_cache(("k", 1), lambda: calls.append(1) or "value")
    again = worker_cache(("k", 1), lambda: calls.append(1) or "other")
    assert first == again == "value" and calls == [1]


class _Counted(WorkerValue):
    """A worker value that counts how often this process pickles it (a stand-in for a model)."""

    pickled = 0

    def __init__(self) -> None:
        self.payload = bytes(1 << 20)

    @property
    def key(self):
        return ("counted", len(self.payload))

    def build(self):
        return ("built in", os.getpid())

    def __getstate__(self):
        type(self).pickled += 1
        return self.__dict__


def _pid_cached_and_value(item, *, key, value):
    return (*_pid_and_cached(item, key=key), value)


def test_process_pool_loads_once_per_worker_process():
    _Counted.pickled = 0
    shared = {"key": "m", "value": _Counted()}
    with TaskRunner("processes", workers=2, max_in_flight=4) as runner:
        results = [r for _, r in runner.map(_pid_cached_and_value, range(12), shared=shared)]
        again = [r for _, r in runner.map(_pid_cached_and_value, range(4), shared=shared)]
    # The worker value (a model) is pickled once, not with every task nor every map call;
    # each worker process builds it once, there.
    assert _Counted.pickled == 1
    assert {v for *_, v in results + again} == {("built in", pid) for pid, *_ in results + again}
    results = [(pid, token) for pid, token, _ in results]
    pids = {pid for pid, _ in results}
    assert os.getpid() not in pids
    # One cached object per worker process, reused by all its tasks (the pool lives across
    # batches, so the model would be loaded once per worker).
    tokens = {pid: {tok for p, tok in results if p == pid} for pid in pids}
    assert all(len(t) == 1 for t in tokens.values())
    assert 1 <= len(pids) <= 2


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    from wsi_hipe.synthetic import write_slide

    folder = tmp_path_factory.mktemp("sched")
    path = folder / "s.tiff"
    write_slide(path, size=(192, 128), seed=3, mpp=0.5, tile_size=128, ground_truth=False)
    return path


def test_output_identical_whatever_the_scheduler(tmp_path, slide_file):
    """sync vs threads vs processes vs a 2-process LocalCluster: bit-identical output."""
    model = save_tiny_model(tmp_path / "tiny.pt")
    cfg = load_config(
        overrides={**SMALL, "hipe.max_depth": 2, "hipe.start_grid": 4, "model.path": str(model)}
    )
    views = {}
    for spec in ("sync", "threads", "processes", "local:2"):
        out = tmp_path / f"{spec.replace(':', '')}.ome.zarr"
        result = pipeline.explain_slide(
            slide_file, out, config=cfg.with_overrides({"schedule.workers": 2}), scheduler=spec
        )
        assert result.ok and result.computed == result.tiles_total == 6
        views[spec] = read_output(out)
    ref = views["sync"]
    for spec, view in views.items():
        for level in range(ref.levels):
            np.testing.assert_array_equal(
                np.asarray(view.saliency[level]), np.asarray(ref.saliency[level]), err_msg=spec
            )
            np.testing.assert_array_equal(
                np.asarray(view.segmentation[level]), np.asarray(ref.segmentation[level])
            )
        scores = {t["index"]: (t["score"], t["passes"], t["status"]) for t in view.tiles}
        assert scores == {t["index"]: (t["score"], t["passes"], t["status"]) for t in ref.tiles}
        assert view.fingerprint == ref.fingerprint
    assert np.asarray(ref.saliency[0]).max() > 0
    # Groups of tiles per task (hipe.tiles_per_batch) reach worker processes the same way; the
    # maps differ from one tile per task only by the rounding of other batch shapes.
    grouped = cfg.with_overrides({"schedule.workers": 2, "hipe.tiles_per_batch": 4})
    out = tmp_path / "grouped.ome.zarr"
    result = pipeline.explain_slide(slide_file, out, config=grouped, scheduler="processes")
    assert result.ok and result.computed == 6
    view, sal = read_output(out), np.asarray(ref.saliency[0])
    np.testing.assert_allclose(np.asarray(view.saliency[0]), sal, rtol=1e-5, atol=1e-5 * sal.max())
    np.testing.assert_array_equal(np.asarray(view.segmentation[0]), np.asarray(ref.segmentation[0]))


class _Handle:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_worker_cache_evicts_and_closes_the_least_recently_used():
    from wsi_hipe.schedule import clear_worker_cache

    clear_worker_cache()
    handles = [worker_cache(("evict", i), _Handle) for i in range(8)]
    assert worker_cache(("evict", 0), _Handle) is handles[0]  # 0 is now the most recent
    extra = worker_cache(("evict", 8), _Handle)  # a ninth entry evicts the LRU one: 1
    assert handles[1].closed and not handles[0].closed and not extra.closed
    assert worker_cache(("evict", 1), _Handle) is not handles[1]
    clear_worker_cache()
    assert all(h.closed for h in handles if h is not handles[1]) and extra.closed


# --- streaming, retries ---------------------------------------------------------------------------

_RELEASE = threading.Event()
_TRIES: dict[int, int] = {}
_TRIES_LOCK = threading.Lock()


def _first_waits(item):
    if item == 0:
        return "released" if _RELEASE.wait(timeout=60) else "timed out"
    return item


@pytest.mark.parametrize("spec", ["threads"])
def test_no_task_waits_for_another(spec):
    """Task 0 finishes only once three later tasks have come back: results must stream
    (a batch of the window would wait for task 0 and time out)."""
    _RELEASE.clear()
    order = []
    with TaskRunner(spec, workers=2, max_in_flight=4) as runner:
        for item, result in runner.map(_first_waits, range(8)):
            order.append((item, result))
            if len(order) == 3:
                _RELEASE.set()
    assert dict(order)[0] == "released"
    assert order.index((0, "released")) >= 3
    assert sorted(i for i, _ in order) == list(range(8))


def _fails_until(item, *, succeed_on):
    with _TRIES_LOCK:
        _TRIES[item] = _TRIES.get(item, 0) + 1
        tries = _TRIES[item]
    if item % 3 == 0 and tries < succeed_on:
        raise RuntimeError(f"task {item} try {tries} broke")
    return item


@pytest.mark.parametrize("spec", ["sync", "threads"])
def test_retries_then_failed_tasks_are_returned(spec):
    _TRIES.clear()
    with TaskRunner(spec, workers=2, retries=2) as runner:
        out = dict(runner.map(_fails_until, range(7), shared={"succeed_on": 3}))
    assert out == {i: i for i in range(7)}  # 0, 3, 6 succeeded on their third try
    assert _TRIES == {i: 3 if i % 3 == 0 else 1 for i in range(7)}
    _TRIES.clear()
    with TaskRunner(spec, workers=2, retries=1) as runner:
        out = dict(runner.map(_fails_until, range(7), shared={"succeed_on": 3}, errors="return"))
    failed = {i: r for i, r in out.items() if isinstance(r, TaskError)}
    assert sorted(failed) == [0, 3, 6]  # a failing task loses only itself
    assert all(r.attempts == 2 and "try 2 broke" in r.error for r in failed.values())
    assert {i: r for i, r in out.items() if i not in failed} == {1: 1, 2: 2, 4: 4, 5: 5}
    with pytest.raises(ValueError, match="errors"):
        list(TaskRunner("sync").map(_square, [1], errors="ignore"))
    with pytest.raises(ValueError, match="retries"):
        TaskRunner("sync", retries=-1)


# --- models shipped to workers ------------------------------------------------------------------


def test_shipped_models_are_cpu_weights_rebuilt_on_the_worker_device(tmp_path):
    import torch
    from _pipeline_support import tiny_model

    from wsi_hipe.models import load_model

    x = torch.rand(2, 1, 32, 32)
    script = load_model(str(save_tiny_model(tmp_path / "tiny.pt")), device="cpu")
    for model in (tiny_model(), script):
        shipped = ship_model(model, device="cpu")
        assert ship_model(model, device="cpu").key == shipped.key  # one build per worker
        assert ship_model(model, device="auto").key != shipped.key
        rebuilt = shipped.build()
        assert rebuilt is not model and rebuilt.device.type == "cpu"
        assert rebuilt.meta == model.meta
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert "ShippedModel(" in repr(shipped) and "bytes" in repr(shipped)
