"""Models with ``in_channels > 1``: ``slide.channels`` feeds them in order; the channel names a
model was trained on (its sidecar's ``channel_names``) are checked against the slide's."""

from __future__ import annotations

import json

import pytest
import torch
from _pipeline_support import SMALL, save_tiny_model
from torch import nn
from typer.testing import CliRunner

from wsi_hipe import pipeline
from wsi_hipe.cli import app
from wsi_hipe.config import load_config
from wsi_hipe.errors import ModelError, StainError
from wsi_hipe.models import (
    ModelMeta,
    architecture_dict,
    build_unet,
    load_model,
    read_model_meta,
    read_sidecar,
    save_checkpoint,
)
from wsi_hipe.omezarr import read_output
from wsi_hipe.slide import open_slide
from wsi_hipe.synthetic import write_ome_tiff
from wsi_hipe.tiling import make_grid

CLASSES = ("background", "lymphocyte", "nucleus")
FAST = {**SMALL, "hipe.max_depth": 2, "hipe.start_grid": 4, "schedule.scheduler": "sync"}
W, H = 128, 128  # 2 x 2 tiles of 64 px
TRAINED = ("Hoechst", "CD45")


@pytest.fixture(scope="module")
def multiplex(tmp_path_factory):
    """A 3-channel synthetic OME-TIFF: Hoechst, CD45, PanCK."""
    path = tmp_path_factory.mktemp("mx") / "mx.ome.tiff"
    written = write_ome_tiff(path, size=(W, H), channels=3, seed=3, tile_size=64)
    assert written.channel_names == ("Hoechst", "CD45", "PanCK")
    return path


def _cfg(**overrides):
    return load_config(overrides={**FAST, **overrides})


class Recorder(nn.Module):
    """A 2-input 3-class net (1x1 conv) that keeps every unperturbed-sized (B = 1) input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0] = 6.0
            self.conv.weight[1, 1] = 3.0
            self.conv.bias.copy_(torch.tensor([0.0, -3.0, -4.0]))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            self.seen.append(x.detach().cpu().clone())
        return self.conv(x)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 2-input smp U-Net saved with its trained channel names."""
    torch.manual_seed(0)
    arch = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": (16, 8, 4)}
    net = build_unet(**arch, in_channels=2, classes=3)
    meta = ModelMeta(
        class_names=CLASSES,
        in_channels=2,
        channel_names=TRAINED,
        architecture=architecture_dict(**arch, in_channels=2, classes=3),
    )
    path = tmp_path_factory.mktemp("ckpt") / "two.safetensors"
    return save_checkpoint(net, path, meta=meta)


@pytest.fixture(scope="module")
def two(checkpoint):
    """The checkpoint, loaded once."""
    return load_model(checkpoint, device="cpu")


def test_channel_names_are_one_per_input_channel():
    assert ModelMeta(in_channels=2, channel_names=["a", "b"]).channel_names == ("a", "b")
    assert ModelMeta().channel_names is None
    with pytest.raises(ModelError, match="in_channels=2"):
        ModelMeta(in_channels=2, channel_names=("Hoechst",))
    with pytest.raises(ModelError, match="string"):
        ModelMeta(channel_names="Hoechst")


def test_bundled_sidecar_records_hoechst():
    meta = read_model_meta("bundled")
    assert meta.in_channels == 1 and meta.channel_names == ("Hoechst",)
    assert meta.to_json_dict()["channel_names"] == ["Hoechst"]


def test_checkpoint_round_trips_channel_names(checkpoint):
    record = read_sidecar(checkpoint)
    assert record["channel_names"] == list(TRAINED)
    model = load_model(checkpoint, device="cpu")
    assert model.meta.in_channels == 2 and model.meta.channel_names == TRAINED


def test_smp_checkpoint_runs_on_the_channels_in_order(multiplex, checkpoint, tmp_path):
    # a floor no tile reaches: one forward pass per tile, the U-Net is the point here
    cfg = _cfg(**{"slide.channels": ["hoechst", "CD45"], "score.floor": 1e9})
    out = tmp_path / "o.ome.zarr"
    result = pipeline.explain_slide(multiplex, out, config=cfg, model=checkpoint)
    assert result.tiles_total == 4 and not result.failed
    assert read_output(out).segmentation[0].shape[-2:] == (H, W)


def test_recorded_input_is_the_channels_in_order(multiplex, tmp_path):
    net = Recorder()
    model = load_model(
        net, class_names=CLASSES, in_channels=2, channel_names=TRAINED, device="cpu", check=False
    )
    cfg = _cfg(**{"slide.channels": list(TRAINED)})
    result = pipeline.explain_slide(multiplex, tmp_path / "o.ome.zarr", config=cfg, model=model)
    assert result.tiles_total == 4 and not result.failed
    assert result.counts.get("done", 0) >= 1  # HiPe ran on (2, H, W) inputs
    assert net.seen and all(tuple(x.shape[:2]) == (1, 2) for x in net.seen)
    # each tile's input is (Hoechst, CD45) as the single-channel reads of the same window
    single = {name: open_slide(multiplex, channel=name) for name in TRAINED}
    grid = make_grid((W, H), slide_mpp=0.5, target_mpp=0.5, tile_size=64, halo=16)
    differ = False
    for tile in grid.tiles:
        rx, ry = grid.read_window(tile)[:2]
        want = [
            torch.from_numpy(single[name].read_input(rx, ry, 96, 96, mpp=0.5)[0])
            for name in TRAINED
        ]
        differ |= not torch.equal(want[0], want[1])
        assert any(
            torch.equal(x[0, 0], want[0]) and torch.equal(x[0, 1], want[1]) for x in net.seen
        ), f"tile {tile.index}: no model input equals (Hoechst, CD45) of its window"
    assert differ  # the two channels are distinguishable, so the order is what was checked


@pytest.mark.parametrize(
    ("channels", "match"),
    [
        (["CD45", "Hoechst"], "trained on 'Hoechst', slide gives 'CD45'"),
        (["Hoechst", "PanCK"], "trained on 'CD45', slide gives 'PanCK'"),
        (["Hoechst"], "takes 2 input channel"),
    ],
)
def test_wrong_channels_are_one_error_and_nothing_written(
    multiplex, two, tmp_path, channels, match
):
    out = tmp_path / "o.ome.zarr"
    cfg = _cfg(**{"slide.channels": channels})
    with pytest.raises(StainError, match=match) as info:
        pipeline.explain_slide(multiplex, out, config=cfg, model=two)
    assert "slide.channels" in str(info.value)
    assert not out.exists()
    with pytest.raises(StainError, match=match):
        pipeline.explain_region(multiplex, 0, 0, 64, 64, config=cfg, model=two)


def test_two_channel_model_needs_slide_channels(multiplex, two, tmp_path):
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(StainError, match="set slide.channels"):
        pipeline.explain_slide(multiplex, out, config=_cfg(), model=two)
    assert not out.exists()


def _one_channel_model(tmp_path):
    path = save_tiny_model(tmp_path / "tiny.pt")
    side = path.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "channel_names": ["Hoechst"]}))
    return path


def test_one_channel_model_keeps_working_with_channel(multiplex, tmp_path):
    model = _one_channel_model(tmp_path)
    (tmp_path / "small.yaml").write_text(
        "tiling: {tile_size: 64, halo: 16, min_tissue: 0.0}\n"
        "score: {floor: 0.0}\nhipe: {max_depth: 2, start_grid: 4}\n"
    )
    base = ["run", str(multiplex), "-c", str(tmp_path / "small.yaml"), "--model", str(model)]
    out = tmp_path / "o.ome.zarr"
    result = CliRunner().invoke(app, [*base, "-o", str(out), "--channel", "Hoechst"])
    assert result.exit_code == 0, result.output
    assert read_output(out).segmentation[0].shape[-2:] == (H, W)
    # the same model on a marker channel: refused by name, nothing written
    bad = tmp_path / "bad.ome.zarr"
    result = CliRunner().invoke(app, [*base, "-o", str(bad), "--channel", "CD45"])
    assert result.exit_code != 0
    assert "trained on 'Hoechst', slide gives 'CD45'" in result.output
    assert not bad.exists()


def test_overview_reopens_the_plane_of_a_zstack(tmp_path):
    import numpy as np
    import tifffile
    from _pipeline_support import synthetic_image

    from wsi_hipe.viz import overview_images

    hoechst = (synthetic_image(W, H, seed=3) * 40000).astype(np.uint16)
    marker = np.full_like(hoechst, 500)
    stack = np.stack([np.stack([hoechst // (z + 1), marker]) for z in range(3)])  # Z, C, Y, X
    path = tmp_path / "z.ome.tiff"
    meta = {"axes": "ZCYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    meta["Channel"] = {"Name": ["Hoechst", "CD45"]}
    tifffile.imwrite(path, stack, metadata=meta, photometric="minisblack")
    model = load_model(_one_channel_model(tmp_path), device="cpu")
    out = tmp_path / "o.ome.zarr"
    cfg = _cfg(**{"slide.plane": "z=1", "slide.reader": "tiff", "slide.channel": "Hoechst"})
    pipeline.explain_slide(path, out, config=cfg, model=model)
    # the overview's slide background is reopened with the run's reader and plane
    assert overview_images(out, max_size=64).has_slide
