"""Generate the example notebooks (outputs cleared) from the cell sources below.

Edit this file, not the ``.ipynb`` files, then run ``python notebooks/_build.py``; the test
suite checks that the committed notebooks match what this script writes and executes them
with small settings (``WSI_HIPE_NB_SMALL=1``).

Every notebook starts with a parameter cell (tagged ``parameters``, papermill-style) whose
settings shrink when ``WSI_HIPE_NB_SMALL=1``, so the whole notebook runs in seconds on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

_SMALL = 'SMALL = os.environ.get("WSI_HIPE_NB_SMALL") == "1"  # the test suite sets this'


def _md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def _code(text: str, *, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _params(text: str) -> nbformat.NotebookNode:
    return _code(text, tags=("parameters",))


def _notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    # Stable cell ids keep regenerated notebooks byte-identical (reviewable diffs).
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


# --- 01 quickstart ------------------------------------------------------------------------


def quickstart() -> nbformat.NotebookNode:
    return _notebook(
        [
            _md(
                """
# Quickstart: explain one tile

A synthetic Hoechst tile goes through the bundled residual U-Net; the scalar we explain is the
**expected lymphocyte area** of the tile, `Σ p_lymphocyte` in px²
(`wsi_hipe.scores.class_area`). Hierarchical Perturbation (HiPe) then finds which pixels that
number depends on, perturbing coarse windows first and refining only where it matters.

**CPU time:** at the full settings (a 256 px tile refined down to 4 px cells) about a minute on
one core of a laptop CPU (HiPe's forward passes at ~60 ms each; the progress bar counts
them); the small settings run in seconds.
"""
            ),
            _params(
                f"""
import os

{_SMALL}
TILE_SIZE = 128 if SMALL else 256  # px at 0.5 µm/px
SEED = 1  # which synthetic tile
MAX_DEPTH = 2 if SMALL else None  # HiPe depths (None: refine down to 4 px cells)
MODEL = os.environ.get("WSI_HIPE_NB_MODEL", "bundled")  # or a .safetensors checkpoint
"""
            ),
            _code(
                """
import matplotlib.pyplot as plt
import numpy as np
import torch

from wsi_hipe import hierarchical_perturbation
from wsi_hipe.metrics import pointing_game, relevance_mass
from wsi_hipe.models import load_model
from wsi_hipe.scores import class_area
from wsi_hipe.synthetic import render_tile
from tqdm.auto import tqdm
"""
            ),
            _md("## A tile, the model and the score"),
            _code(
                """
tile = render_tile(SEED, TILE_SIZE)
n_lymphocytes = np.count_nonzero(np.unique(tile.lymphocytes))
print(f"tile {tile.image.shape}, {n_lymphocytes} lymphocytes")

model = load_model(MODEL)  # the bundled U-Net (CUDA when available)
print("classes:", model.meta.class_names, "device:", model.device)
x = torch.from_numpy(tile.image)[None].to(model.device)  # (1, H, W), background ≈ 0
forward = class_area(model, class_index="lymphocyte")  # (B, 1, H, W) -> (B,)
print(f"expected lymphocyte area: {float(forward(x[None])[0]):.1f} px²")
"""
            ),
            _md("## HiPe"),
            _code(
                """
with tqdm(unit="window") as bar:

    def show(depth, done, total):  # HiPe's progress hook: windows of the current depth
        if bar.total != total or bar.n > done:
            bar.set_description(f"HiPe depth {depth}")
            bar.reset(total=total)
        bar.update(done - bar.n)

    res = hierarchical_perturbation(forward, x, max_depth=MAX_DEPTH, batch_size=16, progress=show)
saliency = res.saliency.cpu().numpy()
print("windows per depth:", res.masks_per_depth)
print("forward passes:", res.forward_passes)
"""
            ),
            _code(
                """
probs = model.probabilities(x[None])[0].cpu().numpy()
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].imshow(tile.image, cmap="gray")
axes[0].set_title("Hoechst (synthetic)")
axes[1].imshow(probs[1], vmin=0, vmax=1)
axes[1].set_title("p(lymphocyte)")
axes[2].imshow(tile.image, cmap="gray")
axes[2].imshow(saliency, cmap="inferno", alpha=0.6)
if n_lymphocytes:
    axes[2].contour(tile.lymphocytes > 0, levels=[0.5], colors="cyan", linewidths=0.5)
axes[2].set_title("HiPe saliency (lymphocyte GT in cyan)")
for ax in axes:
    ax.axis("off")
plt.show()
"""
            ),
            _md(
                """
## Does the map point at lymphocytes?

The pointing game asks whether the map's maximum lies on (within 3 px of) a lymphocyte; the
relevance mass is the share of the saliency that falls inside lymphocytes.
"""
            ),
            _code(
                """
if n_lymphocytes:
    print(pointing_game(saliency, tile.lymphocytes, tolerance=3))
    print(f"relevance mass: {relevance_mass(saliency, tile.lymphocytes):.2f}")
else:
    print("no lymphocytes in this tile: try another SEED")
"""
            ),
        ]
    )


# --- 02 whole slide -----------------------------------------------------------------------


def whole_slide() -> nbformat.NotebookNode:
    return _notebook(
        [
            _md(
                """
# A whole slide: tiles, Dask and the OME-Zarr pyramid

`wsi_hipe.pipeline.explain_slide` reads a slide through OpenSlide, finds the tissue, cuts it
into tiles (core + halo), segments and explains each tile (skipping tiles whose score is ~0),
and stitches saliency and segmentation into an OME-Zarr pyramid that napari opens
(`napari OUT.ome.zarr`, or `wsi_hipe.napari.view(...)`). Here the slide is synthetic.

**CPU time.** The full settings are the demo's (`wsi_hipe.cli.DEMO_OVERRIDES`, the settings
`wsi-hipe demo` runs) on the demo's 2048×1536 slide, one tile per core: within about 5 min on
a 2-core CPU (BENCHMARKS.md, "Slide-level evaluation and defaults", says what was measured).
The pipeline's full-depth defaults (`configs/default.yaml`) on a 4096×3072 slide are another
matter: about 190 tissue tiles × several thousand forward passes each is **hours on a 2-core
CPU** (set `SLIDE_SIZE = (4096, 3072)` and `OVERRIDES = {}` on a GPU machine, where it takes
minutes, or overnight on a laptop). The progress bar counts tiles.
"""
            ),
            _params(
                f"""
import os
from pathlib import Path

{_SMALL}
SLIDE_SIZE = (384, 256) if SMALL else (2048, 1536)  # level-0 px (width, height)
WORKERS = min(2, os.cpu_count() or 1)  # one tile per core
if SMALL:
    OVERRIDES = {{
        "tiling.tile_size": 128,
        "tiling.halo": 16,
        "hipe.start_grid": 4,
        "hipe.max_depth": 1,
        "hipe.batch_size": 32,
    }}
else:
    from wsi_hipe.cli import DEMO_OVERRIDES  # the demo's measured settings

    OVERRIDES = {{
        **DEMO_OVERRIDES,
        "schedule.scheduler": "threads",
        "schedule.workers": WORKERS,
    }}
OUT = Path(os.environ.get("WSI_HIPE_NB_OUT", "nb-output"))
MODEL = os.environ.get("WSI_HIPE_NB_MODEL", "bundled")  # or a .safetensors checkpoint
"""
            ),
            _code(
                """
import matplotlib.pyplot as plt
import numpy as np

from wsi_hipe.omezarr import read_output
from wsi_hipe.pipeline import explain_slide
from wsi_hipe.synthetic import write_slide
from tqdm.auto import tqdm

OUT.mkdir(parents=True, exist_ok=True)
slide_path = OUT / "synthetic.tiff"
write_slide(slide_path, size=SLIDE_SIZE, seed=0, mpp=0.5)
print("slide:", slide_path)
"""
            ),
            _md("## Run the pipeline"),
            _code(
                """
with tqdm(unit="tile", desc="explain_slide") as bar:

    def show(done, total):  # the pipeline's progress hook: tiles done of the tissue tiles
        bar.total = total
        bar.update(done - bar.n)

    result = explain_slide(
        slide_path,
        OUT / "synthetic.ome.zarr",
        config=OVERRIDES,
        model=MODEL,
        overwrite=True,
        progress=show,
    )
print(f"{result.tiles_total} tissue tiles: {result.counts}")
print(f"{result.forward_passes} forward passes in {result.seconds:.1f} s")
"""
            ),
            _md("## Look at the pyramid"),
            _code(
                """
view = read_output(result.output)
for level in range(view.levels):
    print(f"level {level}: shape {view.saliency[level].shape}, µm/px {view.scale(level)}")
"""
            ),
            _code(
                """
level = min(1, view.levels - 1)
saliency = np.asarray(view.saliency[level][...])
segmentation = np.asarray(view.segmentation[level][...])
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].imshow(saliency, cmap="inferno")
axes[0].set_title(f"saliency, level {level}")
axes[1].imshow(segmentation, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
axes[1].set_title("segmentation (0 bg, 1 lymphocyte, 2 nucleus)")
for ax in axes:
    ax.axis("off")
plt.show()
"""
            ),
            _md(
                """
The overview PNG that `wsi-hipe demo` writes: the saliency over the slide in px² of expected
lymphocyte area per pixel (one colour scale for every tile) with the tissue outline.
"""
            ),
            _code(
                """
from IPython.display import Image, display

from wsi_hipe.viz import overview_png

display(Image(filename=str(overview_png(result.output, OUT / "overview.png"))))
"""
            ),
            _md("The per-tile table (position, score, forward passes, time, status):"),
            _code(
                """
for record in view.tiles[:8]:
    print(record)
"""
            ),
        ]
    )


# --- 03 saliency quality ------------------------------------------------------------------


def saliency_quality() -> nbformat.NotebookNode:
    return _notebook(
        [
            _md(
                """
# Saliency quality: HiPe against the baselines

`wsi_hipe.evaluation.run_evaluation` explains the expected lymphocyte area of synthetic
Hoechst tiles with each method and scores the maps:

- **forward passes** and **wall time** (what the map cost);
- **insertion AUC** (↑): start from a blurred tile, restore pixels in order of saliency, 1 %
  at a time; **deletion AUC** (↓): set pixels of the clean tile to 0 (the "fade" substrate)
  in the same order (Petsiuk et al.); scores are normalised by the clean score;
- **pointing game** (↑): is the map's maximum within 3 px of a lymphocyte;
- **relevance mass** (↑): the share of the saliency inside lymphocytes.

The second half evaluates HiPe settings **at slide scale** (`run_slide_evaluation`,
`configs/evaluate_slide.yaml`): whole synthetic slides at three lymphocyte densities, tiled as
the pipeline tiles them, scored against their ground truth.

**CPU time.** Full settings of this notebook: two 256² tiles without RISE 8000 (about 6 min
on one core) and three 1024² slides with two substrates (about 7 min): ≈ 13 min on a 2-core
CPU. The complete `configs/evaluate.yaml` (3 tiles, RISE 8000) needs about 30 min, and the
complete slide grid of `configs/evaluate_slide.yaml` (9 slides, 5 substrates, sanity checks)
a few hours on a CPU: run those from the command line (`wsi-hipe evaluate [--slide]`), which
resumes where it stopped. The small settings run in seconds.
"""
            ),
            _params(
                f"""
import os
from pathlib import Path

{_SMALL}
OVERRIDES = (
    {{
        "tiles.n": 1,
        "tiles.size": 64,
        "metrics.step_fraction": 0.05,
        "methods": [
            {{"name": "hipe", "method": "hipe"}},
            {{"name": "occlusion 16/8", "method": "occlusion", "options": {{"window": 16, "stride": 8}}}},
            {{"name": "rise 200", "method": "rise", "options": {{"n_masks": 200}}}},
            {{"name": "gradient", "method": "gradient"}},
        ],
    }}
    if SMALL
    else {{
        "tiles.n": 2,
        "methods": [
            {{"name": "hipe", "method": "hipe"}},
            {{"name": "occlusion 16/8", "method": "occlusion", "options": {{"window": 16, "stride": 8}}}},
            {{"name": "rise 2000", "method": "rise", "options": {{"n_masks": 2000}}}},
            {{"name": "gradient", "method": "gradient"}},
            {{"name": "integrated gradients", "method": "integrated_gradients", "options": {{"n_steps": 32}}}},
        ],
    }}
)
SLIDE_OVERRIDES = {{
    "slides.size": 256 if SMALL else 1024,  # px per side, 0.5 µm/px
    "slides.seeds": [0],
    "slides.densities": ["clustered"] if SMALL else ["sparse", "clustered", "dense"],
    "grid.substrates": ["mean", "background"],
    "grid.depths": [{{"start_grid": 4, "max_depth": 1 if SMALL else 2}}],
    "faithfulness.tiles_per_slide": 1,
    "faithfulness.step_fraction": 0.25 if SMALL else 0.1,
    "sanity.seeds": [] if SMALL else [0],
    "sanity.substrates": ["mean", "background"],
}}
if SMALL:
    SLIDE_OVERRIDES["pipeline"] = {{"tiling.tile_size": 64, "tiling.halo": 16, "score.floor": 5.0}}
OUT = Path(os.environ.get("WSI_HIPE_NB_OUT", "nb-output"))
MODEL = os.environ.get("WSI_HIPE_NB_MODEL", "bundled")  # or a .safetensors checkpoint
"""
            ),
            _code(
                """
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import wsi_hipe
from tqdm.auto import tqdm

from wsi_hipe.evaluation import run_evaluation, run_slide_evaluation

configs = Path(wsi_hipe.__file__).resolve().parents[1] / "configs"
CONFIG = configs / "evaluate.yaml" if (configs / "evaluate.yaml").is_file() else None
SLIDE_CONFIG = configs / "evaluate_slide.yaml"
SLIDE_CONFIG = SLIDE_CONFIG if SLIDE_CONFIG.is_file() else None  # None: the same defaults
"""
            ),
            _code(
                """
with tqdm(unit="map", desc="tile evaluation") as bar:

    def show(method, i, n):  # called before each map: method name, sample index, samples
        bar.set_postfix_str(method)
        bar.update(1)

    result = run_evaluation(
        CONFIG, model=MODEL, overrides=OVERRIDES, keep_maps=True, progress=show
    )
display(Markdown(result.to_markdown()))
"""
            ),
            _md("## Mean insertion and deletion curves"),
            _code(
                """
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for name in result.curves:
    for ax, kind in zip(axes, ("insertion", "deletion")):
        fractions, scores = result.mean_curve(name, kind)
        ax.plot(fractions, scores, label=name)
for ax, kind in zip(axes, ("insertion (blur substrate)", "deletion (fade substrate)")):
    ax.set_title(kind)
    ax.set_xlabel("fraction of pixels")
axes[0].set_ylabel("score / clean score")
axes[1].legend()
plt.show()
"""
            ),
            _md("## The maps of the first tile"),
            _code(
                """
names = list(result.maps)
fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3))
for ax, name in zip(axes, names):
    ax.imshow(result.maps[name][0], cmap="inferno")
    ax.set_title(name)
    ax.axis("off")
plt.show()
"""
            ),
            _md(
                """
## At slide scale: substrates on whole slides with ground truth

Each setting explains every tissue tile of a slide as `explain_slide` does, and the stitched
map is compared with the slide's lymphocytes:

- **AUROC** (↑) of the saliency for lymphocyte pixels against the pixels of the other nuclei;
- **relevance mass** (↑) on lymphocytes, next to its **chance** level (their share of the
  tissue);
- **tile ρ** (↑): Spearman of per-tile saliency with per-tile lymphocyte area, and the
  **densest rank** (1 = the tile with the most lymphocytes got the most saliency: a map that
  misses the densest cluster shows here);
- **faithfulness**: insertion/deletion on tiles with *every* metric substrate, next to a random
  pixel order, since a map made with the metric's own substrate is favoured by it;
- **sanity**: Spearman with the trained model's map after randomising the head, the decoder and
  the encoder blocks in turn (MPRT), and for a random model (↓ is good);
- **cost**: forward passes and CPU seconds per tissue tile.
"""
            ),
            _code(
                """
with tqdm(unit="unit", desc="slide evaluation") as bar:

    def show_units(done, total):  # a slide x a setting, or a sanity tile x a setting
        bar.total = total
        bar.update(done - bar.n)

    slides = run_slide_evaluation(
        SLIDE_CONFIG,
        out=OUT / "slide-evaluation",  # slides and records: a rerun resumes
        model=MODEL,
        overrides=SLIDE_OVERRIDES,
        keep_maps=True,
        progress=show_units,
    )
display(Markdown(slides.to_markdown()))
"""
            ),
            _code(
                """
import numpy as np
import tifffile

from wsi_hipe.synthetic import ground_truth_paths

slide_name = next(iter(slides.maps))[0]  # e.g. "clustered s0"
stem = slide_name.replace(" ", "-")
path = next(p for p in slides.settings["slides"] if Path(p).name.startswith(stem))
lymph = tifffile.imread(ground_truth_paths(path)["lymphocytes"]) > 0
keys = [k for k in slides.maps if k[0] == slide_name]
fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 5))
for ax, key in zip(np.atleast_1d(axes), keys):
    ax.imshow(slides.maps[key], cmap="magma")
    ax.contour(lymph, levels=[0.5], colors="cyan", linewidths=0.3)
    ax.set_title(f"{slide_name}: {key[1]}", fontsize=9)
    ax.axis("off")
plt.show()
"""
            ),
        ]
    )


# --- 04 the paper's Figure 3 --------------------------------------------------------------


def figure3() -> nbformat.NotebookNode:
    return _notebook(
        [
            _md(
                """
# The paper's Figure 3: mid-range vs mean threshold

A 256×256 input holding one centred Gaussian blob (σ = 4 px), a "model" that sums its input,
and the "fade" substrate (zeros). Every window that touches the blob matters; HiPe should spend
its passes there. The authors' implementation perturbs **81, 25, 77, 81** windows at depths
1–4 with the mid-range threshold; the mean threshold keeps more windows per depth. RISE (8000
masks in the paper) is shown for scale.

**CPU time:** seconds (a toy model; RISE's 8000 passes of a sum are cheap).
"""
            ),
            _params(
                f"""
import os

{_SMALL}
RISE_MASKS = 200 if SMALL else 8000
"""
            ),
            _code(
                """
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from tqdm.auto import tqdm

from wsi_hipe import hierarchical_perturbation
from wsi_hipe.baselines import explain


def gaussian_blob(size=256, sigma=4.0):
    r = torch.arange(size, dtype=torch.float32)
    c = size // 2
    return torch.exp(-((r[:, None] - c) ** 2 + (r[None, :] - c) ** 2) / (2 * sigma**2))[None]


def total(batch):
    return batch.flatten(1).sum(1)


def progress_bar(bar):  # HiPe's progress hook (depth, windows done, windows) on a tqdm bar

    def show(depth, done, n):
        if bar.total != n or bar.n > done:
            bar.set_description(f"{bar.desc.split(':')[0]}: depth {depth}")
            bar.reset(total=n)
        bar.update(done - bar.n)

    return show
"""
            ),
            _code(
                """
x = gaussian_blob()
runs = {}
for threshold in ("mid-range", "mean"):
    with tqdm(desc=threshold, unit="window") as bar:
        runs[threshold] = hierarchical_perturbation(
            total, x, substrate="fade", threshold=threshold, progress=progress_bar(bar)
        )
mid, mean = runs["mid-range"], runs["mean"]
rows = ["| depth | windows, mid-range | windows, mean |", "|---:|---:|---:|"]
for d in range(max(len(mid.masks_per_depth), len(mean.masks_per_depth))):
    a = mid.masks_per_depth[d] if d < len(mid.masks_per_depth) else "-"
    b = mean.masks_per_depth[d] if d < len(mean.masks_per_depth) else "-"
    rows.append(f"| {d + 1} | {a} | {b} |")
rows.append(f"| total passes | {mid.forward_passes} | {mean.forward_passes} |")
display(Markdown("\\n".join(rows)))

assert mid.masks_per_depth == [81, 25, 77, 81], mid.masks_per_depth  # the published counts
peak = divmod(int(mid.saliency.argmax()), 256)
print("maximum of the mid-range map at", peak, "(centre (128, 128))")
"""
            ),
            _code(
                """
rise = explain("rise", total, x, n_masks=RISE_MASKS, batch_size=250)
print(f"RISE: {rise.forward_passes} passes; HiPe mid-range: {mid.forward_passes}")

panels = [
    ("input", x[0]),
    (f"HiPe mid-range ({mid.forward_passes} passes)", mid.saliency),
    (f"HiPe mean ({mean.forward_passes} passes)", mean.saliency),
    (f"RISE ({rise.forward_passes} passes)", rise.saliency),
]
fig, axes = plt.subplots(1, 4, figsize=(14, 3.5))
for ax, (title, image) in zip(axes, panels):
    ax.imshow(image[96:160, 96:160], cmap="inferno")  # the central 64×64 px
    ax.set_title(title, fontsize=9)
    ax.axis("off")
plt.show()
"""
            ),
            _md(
                """
## A larger salient region (σ = 16 px)

With a bigger blob more windows matter at every depth, so both thresholds keep more of them.
"""
            ),
            _code(
                """
big = gaussian_blob(sigma=16.0)
for threshold in ("mid-range", "mean"):
    r = hierarchical_perturbation(total, big, substrate="fade", threshold=threshold)
    print(f"{threshold:>9}: windows per depth {r.masks_per_depth}, passes {r.forward_passes}")
"""
            ),
        ]
    )


# --- 05 cells: the cell or its neighbours? ---------------------------------------------------


def cells_context() -> nbformat.NotebookNode:
    return _notebook(
        [
            _md(
                """
# Does the model look at the cell or its neighbours?

Why did the model call this nucleus a lymphocyte: because of the nucleus itself, or because of
what surrounds it? `explain_slide(..., cells=True)` (`wsi-hipe run --cells`) explains **every
cell** of the score class: each tile's cells are one vector target of HiPe, explained in the
tile's own passes, and each cell's map is condensed into its saliency *inside* its mask, in a
*ring* of 3 µm around it and *beyond*. The **context share** = saliency outside the cell / its
total saliency.

Two models on the same synthetic slide:

- the bundled U-Net, and
- a deliberately **context-driven toy**: a nucleus (stain > 0.5) is a lymphocyte when the
  annulus 3–6 µm around it is bright, whatever the nucleus itself looks like.

HiPe credits a score drop to every pixel of the perturbed window, so a pixel sum favours the
coarse windows: even a model that looks only at the cell has most of a small cell's mass outside
it. Context shares are therefore compared *between models on the same cells*, not read as
absolute numbers.

**CPU time:** about 20 s per model for the small region (the test suite's setting), a few
minutes for the full one; every tile is explained to HiPe's full depth (4 px cells).
"""
            ),
            _params(
                f"""
import os
from pathlib import Path

{_SMALL}
REGION = (192, 128) if SMALL else (576, 384)  # px at 0.5 µm/px (width, height)
OVERRIDES = {{
    "tiling.tile_size": 64,  # 64 px cores + 16 px halo: windows of 96 px, HiPe depth 3
    "tiling.halo": 16,
    "tiling.min_tissue": 0.0,
    "hipe.batch_size": 64,
    "schedule.scheduler": "sync",
}}
OUT = Path(os.environ.get("WSI_HIPE_NB_OUT", "nb-output"))
MODEL = os.environ.get("WSI_HIPE_NB_MODEL", "bundled")  # or a .safetensors checkpoint
"""
            ),
            _code(
                """
import anndata
import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn
from tqdm.auto import tqdm

from wsi_hipe.models import load_model
from wsi_hipe.pipeline import explain_slide
from wsi_hipe.slide import ArrayReader, open_slide
from wsi_hipe.synthetic import render_region

OUT.mkdir(parents=True, exist_ok=True)
# a dense part of the demo's virtual slide (seed 0), served from memory
region = render_region(752, 600, *REGION, seed=0, slide_size=(2048, 1536))
slide = open_slide(ArrayReader(np.clip(region.image, 0, 1), mpp=0.5))
truth = sum(c["cls"] == "lymphocyte" for c in region.cells)
print(f"region {REGION[0]}x{REGION[1]} px, {truth} lymphocytes in the ground truth")
"""
            ),
            _md("## The context-driven toy"),
            _code(
                """
class NeighbourToy(nn.Module):
    \"\"\"Lymphocyte logit = nucleus + 40 · (mean stain of the 6..12 px annulus − 0.12).\"\"\"

    def forward(self, x):
        big = nn.functional.avg_pool2d(x, 25, stride=1, padding=12, count_include_pad=False)
        small = nn.functional.avg_pool2d(x, 11, stride=1, padding=5, count_include_pad=False)
        annulus = (big * 25**2 - small * 11**2) / (25**2 - 11**2)
        nucleus = 40 * (x - 0.5)
        return torch.cat([-nucleus, nucleus + 40 * (annulus - 0.12), nucleus], dim=1)


toy = load_model(NeighbourToy(), class_names=("background", "lymphocyte", "nucleus"))
models = {"bundled U-Net": MODEL, "neighbour toy": toy}
"""
            ),
            _md("## Every cell explained, for each model"),
            _code(
                """
tables = {}
for name, model in models.items():
    out = OUT / f"cells-{name.split()[0]}.ome.zarr"
    with tqdm(unit="tile", desc=name) as bar:

        def show(done, total):  # the pipeline's progress hook: tiles
            bar.total = total
            bar.update(done - bar.n)

        result = explain_slide(
            slide, out, config=OVERRIDES, model=model, cells=True, overwrite=True, progress=show
        )
    table = anndata.read_zarr(out / "tables" / "cells")
    tables[name] = table.obs[table.obs["status"] == "done"]
    print(f"{name}: {result.cells} cells, {result.forward_passes} passes for "
          f"{result.tiles_total} tiles in {result.seconds:.0f} s")
"""
            ),
            _md(
                """
## Context share, model against model

The toy calls many more nuclei lymphocytes (any nucleus in a bright neighbourhood), so the
comparison that answers the question pairs the cells **both** models call lymphocytes (centroids
within 2 µm).
"""
            ),
            _code(
                """
from IPython.display import Markdown, display

rows = ["| model | cells | context share (10 / 50 / 90 %) | beyond 3 µm (median) |",
        "|---|---|---|---|"]
for name, obs in tables.items():
    p10, p50, p90 = np.percentile(obs["context_share"], [10, 50, 90])
    beyond = np.median(obs["saliency_beyond"] / obs["saliency_total"])
    rows.append(f"| {name} | {len(obs)} | {p10:.3f} / {p50:.3f} / {p90:.3f} | {beyond:.3f} |")
display(Markdown("\\n".join(rows)))

a, b = tables["bundled U-Net"], tables["neighbour toy"]
xy = ["centroid_x_um", "centroid_y_um"]
distance, match = cKDTree(b[xy].to_numpy()).query(a[xy].to_numpy())
paired = distance < 2.0
share_a = a["context_share"].to_numpy()[paired]
share_b = b["context_share"].to_numpy()[match[paired]]
higher = float(np.mean(share_b > share_a))
shift = float(np.median(share_b - share_a))
print(f"{paired.sum()} cells called lymphocytes by both: the toy's context share is higher for "
      f"{higher:.0%} of them (median shift {shift:+.3f})")
assert paired.sum() >= 5 and higher >= 0.7 and shift > 0.01, "the context share must separate"
"""
            ),
            _md(
                """
## Open them

- napari: `wsi-hipe view OUT/cells-bundled.ome.zarr` shows a `cells` labels layer; hovering a
  cell shows its row (score, saliency inside / ring / beyond, context share).
- QuPath: `wsi-hipe export OUT/cells-bundled.ome.zarr --geojson cells.geojson`, then
  *File ▸ Import objects from file*: one detection per cell with those measurements.
- scverse: `anndata.read_zarr("OUT/cells-bundled.ome.zarr/tables/cells")` (SpatialData's table
  model: `uns["spatialdata_attrs"]`, `obsm["spatial"]` in µm).
"""
            ),
            _code(
                """
from wsi_hipe.export import export_geojson

n = export_geojson(OUT / "cells-bundled.ome.zarr", OUT / "cells-bundled.geojson")
print(f"{n} QuPath detections in {OUT / 'cells-bundled.geojson'}")
"""
            ),
        ]
    )


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_whole_slide.ipynb": whole_slide,
    "03_saliency_quality.ipynb": saliency_quality,
    "04_paper_figure3.ipynb": figure3,
    "05_cells_context.ipynb": cells_context,
}


def build() -> dict[str, nbformat.NotebookNode]:
    """Every notebook, by file name, validated against the nbformat schema."""
    out = {}
    for name, make in NOTEBOOKS.items():
        nb = make()
        nbformat.validate(nb)
        out[name] = nb
    return out


def render(nb: nbformat.NotebookNode) -> str:
    """The exact text written to disk for a notebook."""
    return nbformat.writes(nb) + "\n"


def main(out_dir: Path = HERE) -> int:
    for name, nb in build().items():
        (out_dir / name).write_text(render(nb), encoding="utf-8")
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
