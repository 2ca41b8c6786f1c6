"""The example notebooks: in sync with notebooks/_build.py, outputs cleared, and they run.

Each notebook is executed with nbclient under the current interpreter (a kernelspec written to a
temporary JUPYTER_PATH; nothing is registered globally) with ``WSI_HIPE_NB_SMALL=1``, which
shrinks its parameter cell so it runs in seconds. Each notebook shows a progress bar
(``tqdm.auto`` on the library's progress hook) and states its CPU time at full size. 01-03 run the bundled model (its weights are
committed: a missing file is a failure). Only optional third-party packages (the notebook
runner, Captum) may skip a test; the project's own modules are imported plainly.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from wsi_hipe.models import bundled_model_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
KERNEL = "wsi-hipe-test"


def _load_builder():
    spec = importlib.util.spec_from_file_location("_nb_build", NB_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_builder()


def test_committed_notebooks_match_the_generator():
    built = BUILD.build()
    assert sorted(built) == sorted(p.name for p in NB_DIR.glob("*.ipynb"))
    for name, nb in built.items():
        on_disk = (NB_DIR / name).read_text(encoding="utf-8")
        assert on_disk == BUILD.render(nb), f"{name} is stale: run python notebooks/_build.py"


def test_notebooks_have_cleared_outputs_and_a_parameter_cell():
    for path in sorted(NB_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert "parameters" in code[0].metadata.get("tags", []), path.name
        assert "WSI_HIPE_NB_SMALL" in code[0].source, path.name
        # The introduction says what the full-size settings cost on a CPU.
        assert "CPU time" in nb.cells[0].source, path.name
        assert "tqdm" in "".join(c.source for c in code), path.name


@pytest.fixture(scope="session")
def notebook_model() -> str:
    """The bundled model (``bundled_model_path`` raises CheckpointError if its file is gone)."""
    assert Path(bundled_model_path()).is_file()
    return "bundled"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch, request):
    """A kernelspec for this interpreter in a temporary JUPYTER_PATH, small settings on."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "wsi-hipe test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("WSI_HIPE_NB_SMALL", "1")
    monkeypatch.setenv("WSI_HIPE_NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "notebook_model" in request.fixturenames:
        monkeypatch.setenv("WSI_HIPE_NB_MODEL", request.getfixturevalue("notebook_model"))
    work = tmp_path / "work"
    work.mkdir()
    return work


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NB_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=180,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return nb


def _text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/markdown", ""))
                parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def test_04_paper_figure3_runs_and_reproduces_the_counts(kernel_env):
    pytest.importorskip("captum")
    nb = _execute("04_paper_figure3.ipynb", kernel_env)
    text = _text_outputs(nb)
    # The table cell shows the published mid-range counts next to the mean-threshold ones.
    assert "| 1 | 81 |" in text and "| 4 | 81 |" in text
    assert "RISE: 200 passes; HiPe mid-range: 265" in text
    assert any(
        o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", [])
    )


def test_01_quickstart_runs(notebook_model, kernel_env):
    text = _text_outputs(_execute("01_quickstart.ipynb", kernel_env))
    assert "forward passes:" in text and "expected lymphocyte area" in text
    assert "HiPe depth 1" in text and "window" in text  # the progress bar on HiPe's hook


def test_02_whole_slide_runs(notebook_model, kernel_env):
    nb = _execute("02_whole_slide.ipynb", kernel_env)
    text = _text_outputs(nb)
    assert "tissue tiles" in text and "level 0: shape" in text
    assert "explain_slide" in text and "tile" in text  # the progress bar on the pipeline's hook
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_03_saliency_quality_runs(notebook_model, kernel_env):
    pytest.importorskip("captum")
    text = _text_outputs(_execute("03_saliency_quality.ipynb", kernel_env))
    assert "| method | forward passes" in text and "| rise 200 | 200 |" in text
    # The slide-level evaluation: its tables and its progress bar.
    assert "| setting | cells px | slides | AUROC" in text
    assert "| mean · mid-range · 4×1 |" in text and "| background · mid-range · 4×1 |" in text
    assert "Faithfulness on tiles" in text and "slide evaluation" in text


def test_05_cells_context_runs_and_separates_the_models(notebook_model, kernel_env):
    text = _text_outputs(_execute("05_cells_context.ipynb", kernel_env))
    assert "| model | cells | context share" in text
    assert "| bundled U-Net |" in text and "| neighbour toy |" in text
    # the notebook asserts the separation itself; its numbers are printed
    assert "called lymphocytes by both: the toy's context share is higher for" in text
    assert "QuPath detections in" in text
