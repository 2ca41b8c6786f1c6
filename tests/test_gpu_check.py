"""benchmarks/gpu_check.sh, dry-run on the CPU with only what the lent GPU machine has.

The GPU check runs on a machine of its own (python3 3.12, torch 2.11 and the packages of
``benchmarks/gpu_machine_packages.txt``) with the wheels of ``benchmarks/gpu_wheels.txt``
carried along. Here the whole script runs with ``--device cpu --quick`` under an import guard
that hides every installed distribution that is neither on that machine nor carried, so a new
import the machine lacks, a renamed API, or a broken measurement fails here, not on the GPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

#: A sitecustomize that makes the distributions outside WSI_HIPE_DEVICE_DISTS unimportable.
GUARD = """
import importlib.abc, importlib.metadata, os, re, sys

def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

_allowed = {_norm(n) for n in os.environ["WSI_HIPE_DEVICE_DISTS"].split(",")}
_hidden = {
    top: dists
    for top, dists in importlib.metadata.packages_distributions().items()
    if not any(_norm(d) in _allowed for d in dists)
}

class _NotOnTheGpuMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in _hidden:
            raise ModuleNotFoundError(
                f"No module named {name!r}: {_hidden[top]} is neither on the GPU machine "
                "(benchmarks/gpu_machine_packages.txt) nor in benchmarks/gpu_wheels.txt",
                name=name,
            )
        return None

sys.meta_path.insert(0, _NotOnTheGpuMachine())
"""


def _names(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pins() -> dict[str, str]:
    return dict(line.split("==") for line in _names(BENCH / "gpu_wheels.txt"))


def _with_requirements(names: list[str]) -> set[str]:
    """``names`` and, for those installed here, what they require (recursively): the machine's
    own versions bring their own dependencies, which may differ from ours (huggingface-hub here
    needs httpx2, there httpx)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _off_device_requirements() -> list[str]:
    """What the carried wheels require only on other Pythons than the machine's 3.12 (e.g.
    dask's importlib_metadata below 3.12): needed by this dry run, not there."""
    from packaging.requirements import Requirement

    device = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.0"}
    out = []
    for name in _pins():
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(device):
                if req.marker.evaluate({"extra": ""}):
                    out.append(req.name)
    return out


def _guarded_env(tmp_path: Path) -> dict[str, str]:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD, encoding="utf-8")
    machine = _with_requirements(_names(BENCH / "gpu_machine_packages.txt"))
    off_device = _with_requirements(_off_device_requirements())
    allowed = sorted(machine | off_device) + list(_pins()) + ["wsi-hipe"]
    env = {**os.environ, "WSI_HIPE_DEVICE_DISTS": ",".join(allowed), "PYTHONPATH": str(guard)}
    env["PY"] = sys.executable
    env.pop("OUT", None)
    return env


def test_the_carried_wheels_are_the_versions_tested_here():
    for name, version in _pins().items():
        assert importlib.metadata.version(name) == version, (
            f"benchmarks/gpu_wheels.txt pins {name}=={version} but "
            f"{importlib.metadata.version(name)} is installed; update the pin"
        )


def test_the_import_guard_hides_what_the_gpu_machine_lacks(tmp_path):
    env = _guarded_env(tmp_path)
    env["WSI_HIPE_DEVICE_DISTS"] = ",".join(
        _with_requirements(_names(BENCH / "gpu_machine_packages.txt"))
    )
    code = "import numpy, torch\ntry:\n import zarr\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "'zarr'" in out.stdout and "gpu_wheels.txt" in out.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = ["bash", str(BENCH / "gpu_check.sh"), "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_guarded_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["failed"] == []
    assert [row["batch_size"] for row in data["hipe_vs_floor"]] == [4, 16]
    assert all(row["ratio"] > 0 and row["passes"] > 1 for row in data["hipe_vs_floor"])
    assert data["one_tile"]["status"] == "done" and data["one_tile"]["device"] == "cpu"
    for scheduler in ("sync", "local:1"):
        assert data["slide"][scheduler]["computed"] > 0
    assert data["slide"]["sync"]["passes"] == data["slide"]["local:1"]["passes"]
    # Tiles sharing HiPe batches (hipe.tiles_per_batch) refine the same windows.
    grouped = data["slide"]["sync tiles_per_batch=4"]
    assert grouped["tiles_per_batch"] == 4 and grouped["passes"] == data["slide"]["sync"]["passes"]
    assert data["autocast"]["saliency_max_rel_diff"] == 0.0  # float32 both ways on the CPU
    assert data["demo"]["passes"] > data["demo"]["tiles"] and data["demo"]["flop_per_pass"] > 0
    report = (out / "gpu_check.md").read_text()
    for title in ("HiPe against its forward floor", "One pipeline tile", "explain_slide",
                  "autocast on vs off", "The demo slide"):  # fmt: skip
        assert title in report
    assert re.search(r"GPU-marked tests: .*skipped.* \(exit 0\)", report)
    assert "No module named" not in proc.stdout + proc.stderr
