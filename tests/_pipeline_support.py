"""Small deterministic models and slides shared by the pipeline, schedule and CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsi_hipe.errors import SlideReadError
from wsi_hipe.slide import ArrayReader

#: Settings that keep HiPe small: 64 px cores + 16 px halo = 96 px tiles, 3 depths.
SMALL = {
    "tiling.tile_size": 64,
    "tiling.halo": 16,
    "tiling.min_tissue": 0.0,
    "score.floor": 0.0,
    "hipe.batch_size": 64,
}


class BrightBlobNet(nn.Module):
    """A fixed 3-class "segmenter": lymphocyte logit rises with the local mean brightness.

    Logits: background 0; lymphocyte ``12 · (mean_5x5(x) − 0.45)``; nucleus −4. Its receptive
    field is 5×5 px, so a 16 px halo makes tiled segmentation equal untiled segmentation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=5, padding=2)
        with torch.no_grad():
            weight = torch.zeros(3, 1, 5, 5)
            weight[1] = 12.0 / 25.0
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(torch.tensor([0.0, -12.0 * 0.45, -4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def tiny_model():
    """The BrightBlobNet as a SegmentationModel (in memory)."""
    from wsi_hipe.models import load_model

    return load_model(
        BrightBlobNet(), class_names=("background", "lymphocyte", "nucleus"), device="cpu"
    )


def save_tiny_model(path: Path) -> Path:
    """Save BrightBlobNet as TorchScript (+ sidecar), loadable by ``--model PATH``."""
    import json

    path = Path(path)
    torch.jit.script(BrightBlobNet()).save(str(path))
    sidecar = {
        "class_names": ["background", "lymphocyte", "nucleus"],
        "activation": "softmax",
        "in_channels": 1,
        "mpp": 0.5,
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def synthetic_image(width: int = 384, height: int = 256, seed: int = 3) -> np.ndarray:
    """A synthetic Hoechst image in [0, 1] (the virtual slide of ``seed``)."""
    from wsi_hipe.synthetic import render_region

    region = render_region(0, 0, width, height, seed=seed, slide_size=(width, height))
    return np.clip(region.image, 0.0, 1.0)


class FailingReader(ArrayReader):
    """An in-memory slide whose level-0 reads fail inside one level-0 box (a corrupt area).

    Whole-image reads (stain analysis) and reads of coarser levels (thumbnails) succeed.
    """

    def __init__(self, array, *, bad_box, mpp=0.5):
        super().__init__(array, mpp=mpp, downsamples=(1, 2, 4), path="<failing>")
        self.bad_box = bad_box  # (x0, y0, x1, y1) level-0 px

    def read_region(self, location, level, size):
        x, y = location
        w, h = size
        bx0, by0, bx1, by1 = self.bad_box
        whole = (w, h) == tuple(self.dimensions)
        if level == 0 and not whole and x < bx1 and x + w > bx0 and y < by1 and y + h > by0:
            raise SlideReadError(f"corrupt tile data at {location} (test)")
        return super().read_region(location, level, size)
