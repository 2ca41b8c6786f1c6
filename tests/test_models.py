"""wsi_hipe.models: U-Net builder, safetensors checkpoints, TorchScript, callables, errors."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_hipe.errors import CheckpointError, ModelError
from wsi_hipe.models import (
    DEFAULT_CLASS_NAMES,
    ModelMeta,
    SegmentationModel,
    architecture_dict,
    autocast_dtype,
    build_unet,
    count_parameters,
    exact_float32,
    file_sha256,
    fold_batchnorm,
    load_model,
    logits_to_labels,
    model_sha256,
    read_model_meta,
    resolve_device,
    save_checkpoint,
    sidecar_path,
)

# torch 2.14 marks TorchScript deprecated; reading TorchScript files is still a supported input.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

TINY = {
    "encoder": "resnet18",
    "encoder_depth": 2,
    "decoder_channels": (8, 8),
    "in_channels": 1,
    "classes": 3,
}


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics, so that folding and saving are tested."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_unet(**TINY)
    _randomise_batchnorm(model)
    return model.eval()


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_model: nn.Module) -> Path:
    meta = ModelMeta(
        architecture=architecture_dict(**TINY),
        training={"data": "none (test)"},
        metrics={"dice": 0.0},
    )
    return save_checkpoint(tiny_model, tmp_path / "tiny.safetensors", meta=meta)


def _batch(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


# --- builder ------------------------------------------------------------------------------


def test_build_unet_output_shape_and_pruned_encoder() -> None:
    model = build_unet(**TINY).eval()
    with torch.no_grad():
        out = model(_batch(3, 32))
    assert out.shape == (3, 3, 32, 32)
    names = [n for n, _ in model.named_parameters()]
    # depth 2 runs only the stem and layer1; the unused stages hold no parameters
    assert not any(
        n.startswith(("encoder.layer2", "encoder.layer3", "encoder.layer4")) for n in names
    )
    full = build_unet(encoder="resnet18", encoder_depth=5, decoder_channels=(8, 8, 8, 8, 8))
    assert count_parameters(model) < count_parameters(full) / 10


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"encoder": "vgg11"}, "resnet18"),
        ({"encoder_depth": 3, "decoder_channels": (8, 8)}, "one entry per encoder stage"),
        ({"encoder_depth": 6, "decoder_channels": (8,) * 6}, "encoder_depth"),
        ({"classes": 0}, "classes"),
    ],
)
def test_build_unet_rejects_bad_arguments(kwargs: dict, needle: str) -> None:
    args = {**TINY, **kwargs}
    with pytest.raises(ModelError, match=needle):
        build_unet(**args)


def test_fold_batchnorm_keeps_the_function(tiny_model: nn.Module) -> None:
    x = _batch()
    with torch.no_grad():
        before = tiny_model(x)
    reference = build_unet(**TINY).eval()
    reference.load_state_dict(tiny_model.state_dict())
    fold_batchnorm(reference)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    with torch.no_grad():
        after = reference(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip_weights_equal(tiny_ckpt: Path, tiny_model: nn.Module) -> None:
    loaded = load_model(tiny_ckpt, device="cpu", fuse_batchnorm=False, channels_last=False)
    saved = tiny_model.state_dict()
    got = loaded.network.state_dict()
    assert set(got) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(got[name].cpu(), tensor), name
    x = _batch()
    with torch.no_grad():
        expected = tiny_model(x)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # the defaults fold batch norm and use channels-last: the same function up to rounding
    fused = load_model(tiny_ckpt, device="cpu")
    assert fused.network.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_is_safetensors_not_pickle(tiny_ckpt: Path) -> None:
    from safetensors import safe_open

    raw = tiny_ckpt.read_bytes()
    assert raw[:2] != b"PK"  # torch.save zip archive
    assert raw[:1] != b"\x80"  # pickle protocol opcode
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert "decoder.blocks.0.conv1.0.weight" in header
    with safe_open(str(tiny_ckpt), framework="pt") as fh:
        assert "segmentation_head.0.weight" in set(fh.keys())


def test_sidecar_content_and_hash(tiny_ckpt: Path) -> None:
    side = json.loads(sidecar_path(tiny_ckpt).read_text())
    assert side["class_names"] == list(DEFAULT_CLASS_NAMES)
    assert side["activation"] == "softmax"
    assert side["mpp"] == 0.5
    assert side["architecture"]["decoder_channels"] == [8, 8]
    assert side["training"] == {"data": "none (test)"}
    assert side["metrics"] == {"dice": 0.0}
    digest = hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert side["weights_sha256"] == digest
    loaded = load_model(tiny_ckpt, device="cpu")
    assert loaded.sha256 == digest == model_sha256(tiny_ckpt) == model_sha256(loaded)
    assert loaded.meta.format == "safetensors"
    assert loaded.meta.source == str(tiny_ckpt)


def test_missing_sidecar_is_a_clear_error(tiny_ckpt: Path) -> None:
    sidecar_path(tiny_ckpt).unlink()
    with pytest.raises(CheckpointError, match="sidecar") as info:
        load_model(tiny_ckpt, device="cpu")
    assert str(tiny_ckpt.with_suffix(".json")) in str(info.value)
    assert "save_checkpoint" in str(info.value)


def test_sidecar_disagreeing_with_weights(tiny_ckpt: Path) -> None:
    side = sidecar_path(tiny_ckpt)
    record = json.loads(side.read_text())
    record["architecture"]["decoder_channels"] = [16, 8]
    side.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="disagree with the architecture") as info:
        load_model(tiny_ckpt, device="cpu")
    assert str(tiny_ckpt) in str(info.value)


def test_sidecar_class_count_disagreeing(tiny_ckpt: Path) -> None:
    side = sidecar_path(tiny_ckpt)
    record = json.loads(side.read_text())
    record["class_names"] = ["background", "lymphocyte"]
    side.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="2 classes"):
        load_model(tiny_ckpt, device="cpu")


def test_weights_swapped_under_a_sidecar(tmp_path: Path, tiny_ckpt: Path) -> None:
    other = build_unet(**TINY)
    other_path = save_checkpoint(
        other, tmp_path / "other.safetensors", meta={"architecture": architecture_dict(**TINY)}
    )
    tiny_ckpt.write_bytes(other_path.read_bytes())  # same architecture, other weights
    with pytest.raises(CheckpointError, match="is not the file its sidecar"):
        load_model(tiny_ckpt, device="cpu")


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing.safetensors"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_model(path, device="cpu")
    assert str(path) in str(info.value)
    assert isinstance(info.value, OSError)


def test_corrupt_weights_file(tiny_ckpt: Path) -> None:
    raw = tiny_ckpt.read_bytes()
    tiny_ckpt.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="not the file its sidecar"):
        load_model(tiny_ckpt, device="cpu")
    # without a recorded hash the parser itself must refuse the truncated file
    side = sidecar_path(tiny_ckpt)
    record = json.loads(side.read_text())
    del record["weights_sha256"]
    side.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_model(tiny_ckpt, device="cpu")
    assert str(tiny_ckpt) in str(info.value)


def test_unreadable_sidecar_json(tiny_ckpt: Path) -> None:
    sidecar_path(tiny_ckpt).write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_model(tiny_ckpt, device="cpu")


def test_save_checkpoint_requires_safetensors_suffix(tmp_path: Path, tiny_model: nn.Module) -> None:
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_checkpoint(
            tiny_model, tmp_path / "m.pt", meta={"architecture": architecture_dict(**TINY)}
        )


class _SideEffect:
    """Unpickling this creates a file: proof that a loader unpickled arbitrary objects."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_torch_save_pickle_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.txt"
    path = tmp_path / "evil.pt"
    torch.save({"payload": _SideEffect(marker)}, path)
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_model(path, device="cpu")
    assert not marker.exists()
    raw_pickle = tmp_path / "evil.pth"
    raw_pickle.write_bytes(pickle.dumps(_SideEffect(marker)))
    with pytest.raises(CheckpointError):
        load_model(raw_pickle, device="cpu")
    assert not marker.exists()


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="suffix"):
        load_model(path, device="cpu")


# --- TorchScript --------------------------------------------------------------------------


class _Affine(nn.Module):
    """A 1x1 convolution 1 -> 3 channels: simple, scriptable, with known outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 2.0, -1.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_torchscript_scripted_without_sidecar(tmp_path: Path, caplog) -> None:
    path = tmp_path / "affine.ts"
    torch.jit.script(_Affine()).save(str(path))
    with caplog.at_level(logging.WARNING, logger="wsi_hipe.models"):
        model = load_model(path, device="cpu")
    assert "no sidecar" in caplog.text
    assert model.meta.class_names == DEFAULT_CLASS_NAMES
    assert model.meta.format == "torchscript"
    assert model.sha256 == file_sha256(path)
    x = _batch(2, 8)
    expected = torch.cat([torch.full_like(x, 0.5), 2 * x - 1, -x], dim=1)
    torch.testing.assert_close(model(x), expected)


def test_torchscript_traced_unet_with_sidecar(tmp_path: Path, tiny_model: nn.Module) -> None:
    path = tmp_path / "unet.pt"
    x = _batch(1, 32)
    with torch.no_grad():
        torch.jit.trace(tiny_model, x).save(str(path))
        expected = tiny_model(_batch(2, 32, seed=5))
    names = ["bg", "lymph", "other"]
    sidecar_path(path).write_text(json.dumps({"class_names": names, "mpp": 0.65}))
    model = load_model(path, device="cpu")
    assert model.meta.class_names == tuple(names)
    assert model.meta.mpp == 0.65
    torch.testing.assert_close(model(_batch(2, 32, seed=5)), expected, rtol=1e-5, atol=1e-5)


def test_torchscript_class_names_argument(tmp_path: Path) -> None:
    path = tmp_path / "affine.torchscript"
    torch.jit.script(_Affine()).save(str(path))
    model = load_model(path, device="cpu", class_names=("a", "b", "c"), activation="sigmoid")
    assert model.meta.class_names == ("a", "b", "c")
    assert model.meta.activation == "sigmoid"
    probs = model.probabilities(_batch(1, 8))
    torch.testing.assert_close(
        probs[:, 0], torch.full((1, 8, 8), torch.sigmoid(torch.tensor(0.5)).item())
    )


def test_segment_from_given_logits_equals_segmenting_the_input() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:  # class 1 where x > 0.5; class 2 never
        return torch.cat([torch.zeros_like(x), 4 * (x - 0.5), torch.full_like(x, -3.0)], dim=1)

    x = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    expected = (x[:, 0] > 0.5).long()
    for activation in ("softmax", "sigmoid"):
        model = load_model(fn, device="cpu", class_names=("a", "b", "c"), activation=activation)
        labels = model.segment(x)
        assert labels.dtype == torch.int64 and labels.shape == (1, 8, 8)
        assert torch.equal(model.segment(x, logits=model(x)), labels)
        assert torch.equal(logits_to_labels(model(x), activation), labels)
        # (sigmoid: where no channel exceeds 0.5 the label is background, whatever the argmax)
        assert torch.equal(labels, expected), activation


# --- callables and the wrapper's checks ---------------------------------------------------


def test_callable_is_wrapped_and_described() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)

    model = load_model(fn, device="cpu", class_names=("background", "cell"), mpp=0.25)
    assert isinstance(model, SegmentationModel)
    assert model.sha256 is None and model.meta.format == "callable"
    x = _batch(2, 4)
    torch.testing.assert_close(model(x), torch.cat([-x, x], dim=1))
    probs = model.probabilities(x)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 4, 4))
    assert load_model(model) is model


def test_wrong_number_of_input_channels(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, device="cpu")
    with pytest.raises(ModelError, match="1 input channel"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ModelError, match=r"x\[None\]"):
        model(torch.rand(1, 32, 32))
    with pytest.raises(ModelError, match="floating point"):
        model(torch.ones(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ModelError, match="multiples of 4"):
        model(torch.rand(1, 1, 30, 32))


def test_model_returning_the_wrong_shape() -> None:
    def two_classes(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=1)

    with pytest.raises(ModelError, match=r"returned shape \(1, 2, 64, 64\)"):
        load_model(two_classes, device="cpu")  # default: 3 classes, probed at load
    model = load_model(two_classes, device="cpu", check=False)
    with pytest.raises(ModelError, match="class_names"):
        model(_batch(1, 8))

    def shrinks(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x, x], dim=1)[..., ::2, ::2]

    with pytest.raises(ModelError, match="expected"):
        load_model(shrinks, device="cpu")


def test_a_callable_that_fails_is_reported() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(ModelError, match="boom"):
        load_model(broken, device="cpu")
    with pytest.raises(ModelError, match="cannot load a model"):
        load_model(42, device="cpu")


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="device must be"):
        resolve_device("gpu0")
    with pytest.raises(ModelError, match="cuda:N"):  # the choices come from config.DeviceName
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")


def test_to_keeps_the_input_device_in_step(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, device="cpu")
    assert model.to(torch.float32).device == torch.device("cpu")
    assert model.to("cpu").device == torch.device("cpu")
    assert model.cpu() is model
    assert load_model(model, device="cpu") is model


def test_inference_mode_unless_the_input_needs_grad(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, device="cpu")
    plain = model(_batch())
    assert plain.is_inference() and not plain.requires_grad
    x = _batch().requires_grad_(True)
    out = model(x)
    out[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_meta_validation() -> None:
    with pytest.raises(ModelError, match="activation"):
        ModelMeta(activation="relu")
    with pytest.raises(ModelError, match="unique"):
        ModelMeta(class_names=("a", "a"))
    with pytest.raises(ModelError, match="mpp"):
        ModelMeta(mpp=-1)
    meta = ModelMeta()
    assert meta.class_index("nucleus") == 2
    with pytest.raises(ModelError, match="lymphocyte"):
        meta.class_index("tumour")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_returns_float32_close_to_fp32(tiny_ckpt: Path) -> None:
    fp32 = load_model(tiny_ckpt, device="cuda", autocast=False)
    amp = load_model(tiny_ckpt, device="cuda", autocast=True)
    assert amp.autocast_enabled and not fp32.autocast_enabled
    x = _batch(4, 64)
    ref = fp32(x)
    out = amp(x)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    probs_ref = torch.softmax(ref, 1)
    probs = torch.softmax(out, 1)
    assert (probs - probs_ref).abs().max() < 0.05


@pytest.mark.parametrize(
    "device_type, capability, expected",
    [
        ("cuda", (9, 0), torch.bfloat16),  # H100 / H200
        ("cuda", (8, 0), torch.bfloat16),  # A100
        ("cuda", (8, 6), torch.bfloat16),  # RTX 30xx, A40
        ("cuda", (7, 5), torch.float16),  # T4: bf16 only emulated (is_bf16_supported() says yes)
        ("cuda", (7, 0), torch.float16),  # V100
        ("cuda", (6, 1), None),  # P40 / GTX 10xx: half precision gains nothing
        ("cuda", None, None),
        ("cpu", None, None),
        ("cpu", (9, 0), None),
        ("mps", None, None),
    ],
)
def test_autocast_dtype_follows_the_compute_capability(device_type, capability, expected) -> None:
    assert autocast_dtype(device_type, capability) is expected


def test_cpu_models_compute_in_float32_whatever_autocast_says(tiny_ckpt: Path) -> None:
    for autocast in (None, True, False):
        model = load_model(tiny_ckpt, device="cpu", autocast=autocast)
        assert not model.autocast_enabled and model.compute_dtype is torch.float32
        assert "compute_dtype=float32" in repr(model)


def test_exact_float32_switches_tf32_off_and_restores_the_settings() -> None:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        settings = [
            (conv, "fp32_precision", "ieee"),
            (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
        ]
    else:
        settings = [
            (torch.backends.cudnn, "allow_tf32", False),
            (torch.backends.cuda.matmul, "allow_tf32", False),
        ]
    before = [getattr(obj, name) for obj, name, _ in settings]
    with exact_float32():
        assert [getattr(obj, name) for obj, name, _ in settings] == [v for _, _, v in settings]
    assert [getattr(obj, name) for obj, name, _ in settings] == before
    with pytest.raises(KeyError), exact_float32():
        raise KeyError("restored on errors too")
    assert [getattr(obj, name) for obj, name, _ in settings] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_dtype_is_decided_once_from_the_capability(
    tiny_ckpt: Path, monkeypatch
) -> None:
    amp = load_model(tiny_ckpt, device="cuda", autocast=True)
    capability = torch.cuda.get_device_capability()
    expected = autocast_dtype("cuda", capability) or torch.float32
    assert amp.compute_dtype is expected
    seen = []
    first_conv = next(m for m in amp.network.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))

    def asked(*args, **kwargs):
        raise AssertionError("is_bf16_supported() asked during a forward")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", asked)
    out = amp(_batch(2, 64))
    assert out.dtype == torch.float32 and seen == [expected]


def test_read_model_meta_reads_the_sidecar_without_loading(tiny_ckpt: Path, tmp_path: Path) -> None:
    meta = read_model_meta(tiny_ckpt)
    assert meta == load_model(tiny_ckpt, device="cpu").meta.replace(sha256=None)
    assert read_model_meta("bundled").class_names == DEFAULT_CLASS_NAMES
    bare = tmp_path / "bare.pt"
    bare.write_bytes(b"not even TorchScript: only the (absent) sidecar is read")
    assert read_model_meta(bare).class_names == DEFAULT_CLASS_NAMES
    with pytest.raises(CheckpointError, match="not found"):
        read_model_meta(tmp_path / "missing.safetensors")
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(b"")
    with pytest.raises(CheckpointError, match="sidecar"):
        read_model_meta(lonely)
