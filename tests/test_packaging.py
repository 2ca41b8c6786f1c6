"""The repository's install metadata agrees with itself."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_environment_yml_lists_the_pyproject_dependencies():
    project = _pyproject()["project"]
    wanted = {_name(r): r for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted.update({_name(r): r for r in extra})
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r): r for r in pip}
    assert sorted(listed) == sorted(wanted)
    pins = {
        _name(line): line
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    for name, req in listed.items():
        # Same specifier, except where constraints.txt pins the version the env file then uses.
        expected = pins.get(name, wanted[name])
        assert req.replace(" ", "") == expected.replace(" ", ""), name


def test_torch_is_never_allowed_past_the_pinned_build():
    pins = (REPO / "constraints.txt").read_text()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    assert "constraints.txt" in (REPO / "Makefile").read_text()


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)


def test_core_imports_without_qt_napari_dask_or_openslide():
    import subprocess
    import sys

    code = (
        "import sys, wsi_hipe, wsi_hipe.hipe;"
        "bad = [m for m in ('PyQt6', 'PyQt5', 'qtpy', 'napari', 'dask', 'openslide', 'zarr',"
        " 'matplotlib') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_top_level_namespace_lists_what_users_call():
    import wsi_hipe
    from wsi_hipe import pipeline

    assert {"explain_slide", "explain_region", "explain_cell", "BatchItem"} <= set(wsi_hipe.__all__)
    assert "TileOutcome" not in wsi_hipe.__all__ and "TileOutcome" not in pipeline.__all__
    for name in wsi_hipe.__all__:
        assert getattr(wsi_hipe, name) is not None, name
    assert wsi_hipe.explain_slide is pipeline.explain_slide
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name


LAYERS = {
    "errors": 0,
    "config": 0,
    "cache": 0,
    "hipe": 1,
    "scores": 1,
    "tiling": 1,
    "tissue": 1,
    "stitch": 1,
    "metrics": 1,
    "cells": 1,
    "slide": 2,
    "models": 2,
    "omezarr": 2,
    "synthetic": 2,
    "baselines": 2,
    "export": 2,
    "provenance": 3,  # slide and model identity: uses models (L2) for the one file hash
    "pipeline": 3,
    "schedule": 3,
    "evaluation": 3,
    "cli": 4,
    "viz": 4,
    "napari": 4,
}
# Third-party packages a layer must not import (DESIGN.md: hipe is a pure function of a callable
# and a tensor; only napari/ imports Qt).
FORBIDDEN = {
    "hipe": {"openslide", "dask", "distributed", "zarr", "matplotlib", "napari", "ome_zarr"},
    "*": {"PyQt6", "PyQt5", "PySide6", "qtpy", "napari", "magicgui"},
}


def _imports(path: Path) -> set[str]:
    """Dotted names of the modules a file imports (inside functions and TYPE_CHECKING too).

    ``from wsi_hipe import X`` depends on ``wsi_hipe.X`` when X is a submodule, and on the
    module that defines X when X is a name the package exports (``hierarchical_perturbation``).
    """
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "wsi_hipe":
                names.update(_top_level_dependency(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[: -node.level])
            names.add(f"{pkg}.{node.module}" if node.module else pkg)
    return names


def _top_level_dependency(name: str) -> str:
    """The module that ``from wsi_hipe import name`` depends on."""
    if (REPO / "wsi_hipe" / name).is_dir() or (REPO / "wsi_hipe" / f"{name}.py").is_file():
        return f"wsi_hipe.{name}"
    import wsi_hipe

    value = getattr(wsi_hipe, name)  # an exported name: where it is defined
    return getattr(value, "__module__", None) or "wsi_hipe"


def test_from_wsi_hipe_import_forms_are_checked():
    # A submodule imported from the package is a dependency on it; so is an exported name.
    assert _top_level_dependency("pipeline") == "wsi_hipe.pipeline"
    assert _top_level_dependency("hierarchical_perturbation") == "wsi_hipe.hipe"


def test_modules_import_only_from_layers_below():
    problems = []
    for path in sorted((REPO / "wsi_hipe").rglob("*.py")):
        rel = path.relative_to(REPO / "wsi_hipe").parts
        top = rel[0].removesuffix(".py")
        if top in ("__init__", "__main__") or top not in LAYERS:
            continue
        layer = LAYERS[top]
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "wsi_hipe" and len(parts) > 1 and parts[1] in LAYERS:
                other = parts[1]
                if other != top and LAYERS[other] > layer:
                    problems.append(f"{'/'.join(rel)} (L{layer}) imports {name} (L{LAYERS[other]})")
            if top != "napari" and parts[0] in FORBIDDEN["*"]:
                problems.append(f"{'/'.join(rel)} imports {parts[0]} (only napari/ may)")
            if parts[0] in FORBIDDEN.get(top, ()):
                problems.append(f"{'/'.join(rel)} imports {parts[0]}")
    assert not problems, "\n".join(problems)
