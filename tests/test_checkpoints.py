"""Reading checkpoints: every layout, variant inference, and every bad input (library and CLI)."""

from __future__ import annotations

import builtins
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mixformer_deploy.checkpoints import infer_config, load_checkpoint, read_raw, save_safetensors
from mixformer_deploy.cli.app import _load_commands, app
from mixformer_deploy.errors import CheckpointError
from mixformer_deploy.model import VARIANTS, create_model

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "tiny.pdparams"
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
DERIVED = ("relative_position_index", "num_batches_tracked")

_load_commands()
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    model = create_model("custom", 10, seed=0, **TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and ("norm" in name or "running" in name):
                t.copy_(t + 0.2 * torch.rand(t.shape, generator=g))
    return model


def plain(model) -> dict:
    """The state dict without derived buffers, detached copies."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(DERIVED)}


def assert_same_weights(loaded, model):
    want = plain(model)
    got = plain(loaded)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def cli_info(path) -> "object":
    return runner.invoke(app, ["info", "--weights", str(path), "--img-size", "32"])


def assert_cli_bad_file(path, *fragments):
    r = cli_info(path)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 4, (r.exit_code, r.stderr, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for f in fragments:
        assert f in lines[0]


# ---------------------------------------------------------------- layouts

LAYOUTS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model": lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
    "model_ema": lambda sd: {"model_ema": sd, "epoch": 5},
    "ema": lambda sd: {"ema": sd, "updates": 100},
    "module": lambda sd: {"module": sd},
    "ddp_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "ddp_in_state_dict": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "lightning": lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 7,
                             "global_step": 70, "pytorch-lightning_version": "2.4.0",
                             "hyper_parameters": {"lr": 0.001}},
    "compiled_prefix": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_layouts(tmp_path, tiny, layout):
    path = tmp_path / "w.pt"
    torch.save(LAYOUTS[layout](plain(tiny)), path)
    ck = load_checkpoint(path)
    assert ck.format == "torch" and ck.config == tiny.cfg
    assert_same_weights(ck.model, tiny)


def test_torch_legacy_serialization(tmp_path, tiny):
    """torch.save(..., _use_new_zipfile_serialization=False): a pickle, but torch's, not Paddle's."""
    torch.save({"state_dict": plain(tiny)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    ck = load_checkpoint(tmp_path / "legacy.pt")
    assert ck.format == "torch"
    assert_same_weights(ck.model, tiny)


def test_whole_module_pickle_is_refused(tmp_path, tiny):
    torch.save(tiny, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match=r"refused to load: it would import .*MixFormer.*state_dict"):
        load_checkpoint(tmp_path / "whole.pt")
    assert_cli_bad_file(tmp_path / "whole.pt", "refused")


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".bin"])
def test_torch_suffixes(tmp_path, tiny, suffix):
    torch.save({"state_dict": plain(tiny)}, tmp_path / f"w{suffix}")
    assert_same_weights(load_checkpoint(tmp_path / f"w{suffix}").model, tiny)


@pytest.mark.parametrize("derived", [True, False])
def test_derived_buffers_present_or_absent(tmp_path, tiny, derived):
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    if not derived:
        sd = {k: v for k, v in sd.items() if not k.endswith(DERIVED)}
    else:  # a stale or corrupted derived buffer is ignored and recomputed
        key = next(k for k in sd if k.endswith("relative_position_index"))
        sd[key] = torch.zeros_like(sd[key])
    assert any(k.endswith(DERIVED) for k in sd) == derived
    torch.save(sd, tmp_path / "w.pt")
    ck = load_checkpoint(tmp_path / "w.pt")
    assert_same_weights(ck.model, tiny)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ck.model(x), tiny(x))


def test_safetensors_plain_and_ours(tmp_path, tiny):
    save_file({k: v.contiguous() for k, v in plain(tiny).items()}, str(tmp_path / "plain.safetensors"))
    ck = load_checkpoint(tmp_path / "plain.safetensors")
    assert ck.format == "safetensors" and ck.metadata == {}
    assert_same_weights(ck.model, tiny)

    out = save_safetensors(tiny, tmp_path / "ours.safetensors", extra={"input_size": "64x64", "labels": ["a"]})
    ck = load_checkpoint(out)
    assert ck.metadata["input_size"] == "64x64" and ck.metadata["variant"] == "custom"
    assert ck.metadata["labels"] == '["a"]'
    assert_same_weights(ck.model, tiny)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary name is gone


def test_pdparams_fixture():
    ck = load_checkpoint(FIXTURE)
    assert ck.format == "paddle" and ck.config.name == "custom" and ck.config.num_classes == 10
    sd, fmt = read_raw(FIXTURE)
    assert fmt == "paddle"
    assert "StructuredToParameterName@@" not in sd
    assert any(k.endswith(".running_mean") for k in sd) and not any(k.endswith("._mean") for k in sd)


def _numpy1_pickle(data: bytes) -> bytes:
    """The fixture as numpy 1.x writes it: global `numpy.core.multiarray._reconstruct`.

    Rewritten opcode by opcode: the module name is a SHORT_BINUNICODE (its length byte changes), and the
    protocol-4 FRAME opcodes (whose sizes would no longer fit) are dropped, which the format allows.
    """
    out = bytearray()
    ops = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg == "numpy._core.multiarray":
            new = b"numpy.core.multiarray"
            out += b"\x8c" + bytes([len(new)]) + new
            continue
        out += data[pos:end]
    return bytes(out)


def test_pdparams_numpy1_global_name(tmp_path):
    data = FIXTURE.read_bytes()
    old = _numpy1_pickle(data)
    assert b"numpy._core" not in old and b"numpy.core.multiarray" in old
    assert [op.name for op, _, _ in pickletools.genops(old)][-1] == "STOP"  # well-formed opcodes
    path = tmp_path / "numpy1.pdparams"
    path.write_bytes(old)
    ck = load_checkpoint(path)
    ref = load_checkpoint(FIXTURE)
    assert_same_weights(ck.model, ref.model)


def test_raw_pickle_with_torch_suffix_goes_through_restricted_unpickler(tmp_path):
    """A plain pickle named .pt (not torch's zip) is read like a Paddle file: arrays only."""
    path = tmp_path / "paddle_named.pt"
    path.write_bytes(FIXTURE.read_bytes())
    ck = load_checkpoint(path)
    assert ck.format == "paddle" and ck.config.num_classes == 10


# ---------------------------------------------------------------- variant inference

@pytest.mark.parametrize("variant", VARIANTS)
def test_infer_named_variants(variant):
    model = create_model(variant, 3, seed=0)
    cfg = infer_config(model.state_dict())
    assert cfg.name == variant and cfg == model.cfg and cfg.num_classes == 3


def test_infer_named_variant_from_file(tmp_path):
    model = create_model("B0", 5, seed=0)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "b0.pth")
    ck = load_checkpoint(tmp_path / "b0.pth")
    assert ck.config.name == "B0" and ck.config.num_classes == 5
    assert_same_weights(ck.model, model)
    ck = load_checkpoint(tmp_path / "b0.pth", variant="b0", num_classes=5)  # explicit, case-insensitive
    assert ck.config.name == "B0"
    assert_same_weights(ck.model, model)


@pytest.mark.parametrize("overrides", [
    TINY,
    dict(embed_dim=16, depths=(2, 1), num_heads=(2, 2), mlp_ratio=2.0, head_dim=64, window_size=5),
])
def test_infer_custom_config(overrides):
    model = create_model("custom", 7, seed=0, **overrides)
    cfg = infer_config(plain(model))
    assert cfg == model.cfg and cfg.name == "custom"


def test_explicit_variant_that_does_not_fit(tmp_path, tiny):
    torch.save(plain(tiny), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "tiny.pt", variant="B1")
    with pytest.raises(CheckpointError, match="10 classes, not 3"):
        load_checkpoint(tmp_path / "tiny.pt", num_classes=3)
    r = runner.invoke(app, ["info", "--weights", str(tmp_path / "tiny.pt"), "--variant", "B1"])
    assert r.exit_code == 4 and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- bad inputs: library and CLI

def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture
def valid_files(tmp_path, tiny):
    pt = tmp_path / "ok.pt"
    torch.save(plain(tiny), pt)
    st = save_safetensors(tiny, tmp_path / "ok.safetensors")
    return {".pt": pt, ".safetensors": st, ".pdparams": FIXTURE}


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    assert_cli_bad_file(tmp_path / "nope.pt", "not found")


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    assert_cli_bad_file(tmp_path / "empty.pt", "empty")


@pytest.mark.parametrize("suffix", [".pt", ".pdparams", ".safetensors"])
def test_truncated(tmp_path, valid_files, suffix):
    bad = _truncate(valid_files[suffix], tmp_path / f"half{suffix}")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert_cli_bad_file(bad, bad.name)


@pytest.mark.parametrize("name", ["notes.pt", "notes.pdparams", "notes.safetensors", "notes.ckpt"])
def test_text_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("these are not the weights you are looking for\n" * 20)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert_cli_bad_file(path, name)


def test_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no MixFormer state dict"):
        load_checkpoint(tmp_path / "meta.pt")
    torch.save({"a.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot infer"):
        load_checkpoint(tmp_path / "other.pt")
    assert_cli_bad_file(tmp_path / "other.pt", "cannot infer")


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_System, _Eval])
@pytest.mark.parametrize("kind", ["pdparams", "pt_zip", "pt_legacy", "pt_raw_pickle"])
def test_malicious_pickle_never_runs(tmp_path, tiny, payload, kind):
    marker = tmp_path / "pwned"
    evil = payload(marker)
    arrays = {k: v.numpy() for k, v in list(plain(tiny).items())[:3]}
    if kind == "pdparams":
        path = tmp_path / "evil.pdparams"
        path.write_bytes(pickle.dumps({**arrays, "x": evil}, protocol=4))
    elif kind == "pt_raw_pickle":
        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps({"state_dict": evil}, protocol=2))
    else:
        path = tmp_path / "evil.pt"
        torch.save({"state_dict": plain(tiny), "hook": evil}, path,
                   _use_new_zipfile_serialization=kind == "pt_zip")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
    assert_cli_bad_file(path, path.name)
    assert not marker.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, tiny, value):
    sd = plain(tiny)
    sd["layers.1.blocks.0.attn.qkv.weight"][0, 0] = value
    torch.save(sd, tmp_path / "nonfinite.pt")
    with pytest.raises(CheckpointError, match="NaN or Inf") as e:
        load_checkpoint(tmp_path / "nonfinite.pt")
    assert "layers.1.blocks.0.attn.qkv.weight" in str(e.value)
    assert_cli_bad_file(tmp_path / "nonfinite.pt", "NaN or Inf")


def test_missing_unexpected_misshaped_keys(tmp_path, tiny):
    sd = plain(tiny)
    for k in ("layers.0.blocks.0.attn.proj.bias", "layers.2.blocks.1.norm2.weight", "norm.bias",
              "layers.1.downsample.norm.running_var"):
        del sd[k]
    sd["extra.weight"] = torch.zeros(2)
    sd["layers.0.blocks.0.mlp.fc2.weight"] = torch.zeros(16, 32)  # hidden 64 by fc1
    torch.save(sd, tmp_path / "bad_keys.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad_keys.pt")
    msg = str(e.value)
    assert "missing 4: layers.0.blocks.0.attn.proj.bias" in msg and "(4 in all)" in msg
    assert "unexpected 1: extra.weight" in msg
    assert "mis-shaped 1: layers.0.blocks.0.mlp.fc2.weight (16, 32) vs (16, 64)" in msg
    assert_cli_bad_file(tmp_path / "bad_keys.pt", "missing 4", "unexpected 1", "mis-shaped 1")


def test_many_missing_keys_are_previewed(tmp_path, tiny):
    sd = {k: v for k, v in plain(tiny).items() if not k.startswith("layers.2.")}
    sd.update({k: v for k, v in plain(tiny).items() if k.startswith("layers.2.blocks.0.attn.relative")})
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "partial.pt")
    assert "missing" in str(e.value) and "in all)" in str(e.value)


def test_converted_arrays_are_not_views_of_the_file(tmp_path):
    """A Paddle file's arrays end up in the model by copy: changing the loaded model leaves a reload intact."""
    a = load_checkpoint(FIXTURE).model
    with torch.no_grad():
        a.head.weight.zero_()
    b = load_checkpoint(FIXTURE).model
    assert float(b.head.weight.detach().abs().sum()) > 0
    assert np.isfinite(b.head.weight.detach().numpy()).all()
