"""Configuration: defaults, YAML files, overrides, key-naming errors, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_hipe.config import Config, load_config
from wsi_hipe.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid_and_documented_values():
    cfg = load_config()
    assert cfg.tiling.mpp == 0.5
    assert cfg.tiling.tile_size % 16 == 0
    assert (cfg.tiling.tile_size + 2 * cfg.tiling.halo) % 16 == 0
    assert cfg.score.kind == "area" and cfg.score.class_index == 1
    assert cfg.output.ngff == "0.4"
    assert cfg.schedule.scheduler == "sync"


#: Run configurations (configs/ also holds other tools' files, e.g. evaluate.yaml).
RUN_CONFIGS = ("default.yaml", "fast.yaml", "gpu.yaml")


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_bundled_config_files_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_default_yaml_equals_builtin_defaults():
    assert load_config(CONFIGS / "default.yaml") == Config()


def test_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "tiling:\n  tile_size: 128\n  halo: 16\nscore:\n  class: 2\noutput:\n  ngff: 0.5\n"
    )
    cfg = load_config(path, overrides={"tiling.tile_size": 64, "hipe": {"max_depth": 2}})
    assert cfg.tiling.tile_size == 64  # flag beats file
    assert cfg.tiling.halo == 16  # file beats default
    assert cfg.score.class_index == 2  # YAML key "class"
    assert cfg.output.ngff == "0.5"  # YAML float 0.5 accepted
    assert cfg.hipe.max_depth == 2


def test_none_overrides_are_ignored():
    assert load_config(overrides={"tiling.tile_size": None, "slide.mpp": None}) == Config()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tiling.tile_size": 250}, "tiling.tile_size: must be a multiple of 16, got 250"),
        ({"tiling.halo": 12}, "tiling.halo: must be a multiple of 8"),
        ({"tiling.tile_sise": 128}, "tiling.tile_sise: unknown key"),
        ({"colour": 1}, "colour: unknown key"),
        ({"tiling.min_tissue": 1.5}, "tiling.min_tissue"),
        ({"score.kind": "volume"}, "score.kind"),
        ({"score.class": -1}, "score.class"),
        ({"hipe.max_depth": 0}, "hipe.max_depth"),
        ({"output.ngff": "0.3"}, "output.ngff"),
        ({"schedule.scheduler": "mpi"}, "schedule.scheduler"),
        ({"model.device": "tpu"}, "model.device"),
        ({"slide.channel": -1}, "slide.channel: must be 'auto', 'mean', a channel index"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(overrides=overrides)


@pytest.mark.parametrize(
    ("value", "expected"), [("Blue", "blue"), ("2", 2), (0, 0), ("mean", "mean")]
)
def test_channel_options(value, expected):
    assert load_config(overrides={"slide.channel": value}).slide.channel == expected


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(overrides={"tiling.tile_size": 250})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_fingerprint_tracks_results_not_scheduling():
    base = load_config()
    assert base.fingerprint() == load_config().fingerprint()
    assert len(base.fingerprint()) == 64
    same = [
        {"schedule.scheduler": "local:2"},
        {"schedule.workers": 4},
        {"model.device": "cpu"},
        {"model.path": "other.safetensors"},  # the model is identified by its hash instead
    ]
    for override in same:
        assert base.with_overrides(override).fingerprint() == base.fingerprint(), override
    changed = [
        {"tiling.tile_size": 128},
        {"tiling.halo": 16},
        {"tiling.mpp": 1.0},
        {"score.floor": 0.0},
        {"score.class": 2},
        {"hipe.max_depth": 2},
        {"hipe.substrate": "fade"},
        {"hipe.early_stop": False},
        {"slide.mpp": 0.25},
        {"output.ngff": "0.5"},
    ]
    prints = {base.with_overrides(o).fingerprint() for o in changed}
    assert base.fingerprint() not in prints
    assert len(prints) == len(changed)


def test_config_is_frozen_and_round_trips():
    cfg = load_config(overrides={"score.class": 2, "hipe.max_depth": 3})
    with pytest.raises(ValueError):
        cfg.tiling.tile_size = 64  # type: ignore[misc]
    assert Config.model_validate(cfg.to_dict()) == cfg
    assert cfg.to_dict()["score"]["class"] == 2
