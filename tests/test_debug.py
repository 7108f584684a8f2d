"""debug and its probes: names (deploy form <-> reference), the CLI's exit codes, verdict and JSON, a planted
fp16 overflow named at its MLP on a runtime that computes float16, and parity's pointer to debug. The
per-backend contract (a planted qkv fault named on every runtime here) is tests/conformance/test_debug.py."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, WEIGHTS, invoke_cli
from mixformer_deploy.checkpoints import load_checkpoint, save_safetensors


def test_probe_names_map_to_the_reference_and_change_nothing_computed():
    from mixformer_deploy import create_model
    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.probe import block_points, branch_points, make_probe, reference_name

    deploy = to_deploy(create_model("custom", seed=0, **TINY).eval(), (64, 64))
    points = block_points(deploy) + branch_points(deploy, "stages.2.1")
    assert points[:3] == ["patch_embed", "stages.0.0", "merges.0"]
    assert reference_name("stages.2.1") == "layers.2.blocks.1"
    assert reference_name("stages.2.1.proj_attn") == "layers.2.blocks.1.attn.proj_attn"
    assert reference_name("stages.2.1.mlp") == "layers.2.blocks.1.mlp"
    assert reference_name("merges.1") == "layers.1.downsample"
    probe = make_probe(deploy, points)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = probe(x)
        assert torch.equal(outs[0], deploy(x))
    assert len(outs) == 1 + len(points) and all(o.shape[0] == 2 for o in outs)


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory):
    from mixformer_deploy.export_api import export
    return export(WEIGHTS, target="onnx", img_size=64, output=tmp_path_factory.mktemp("onnx"), check=False).path


def planted(tmp_path, scale_qkv=1.0, scale_fc1=1.0):
    model = load_checkpoint(WEIGHTS).model
    block = model.layers[2].blocks[1]
    with torch.no_grad():
        block.attn.qkv.weight.mul_(scale_qkv)
        block.mlp.fc1.weight.mul_(scale_fc1)
        block.mlp.fc1.bias.mul_(scale_fc1)
    return save_safetensors(model, tmp_path / "planted.safetensors")


def test_cli_names_the_divergence_exit_1_with_json(onnx_fp32, tmp_path):
    report = tmp_path / "debug.json"
    r = invoke_cli("debug", onnx_fp32, "-w", planted(tmp_path, scale_qkv=1.5), "--artifact-weights", WEIGHTS,
                   "--json", report)
    assert r.code == 1, r.stderr
    verdict = "first divergence: stages.2.1 (layers.2.blocks.1) attention: rel L2 "
    assert verdict in r.stdout and r.stdout.rstrip().splitlines()[-1].startswith(verdict)
    d = json.loads(report.read_text())
    assert d["diverged"] and d["first_block"] == "stages.2.1" and d["first_branch"] == "stages.2.1.attention.logits"
    assert {"name", "reference", "rel_l2", "worst_cosine", "entering", "budget", "exceeded"} <= set(d["blocks"][0])
    assert d["budget_rule"]["growth"] > 1 and d["exports"] == 2


def test_cli_healthy_artifact_exit_0_and_bad_input_exits(onnx_fp32, tmp_path):
    r = invoke_cli("debug", onnx_fp32, "-w", WEIGHTS)
    assert r.code == 0, r.stderr
    assert "no divergence" in r.stdout
    assert invoke_cli("debug", tmp_path / "missing.onnx").code == 4
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    r = invoke_cli("debug", broken)
    assert r.code == 4 and "Traceback" not in r.stderr
    other = planted(tmp_path, scale_qkv=1.5)
    r = invoke_cli("debug", onnx_fp32, "-w", other)     # the probe needs the artifact's own weights
    assert r.code == 2 and "--artifact-weights" in r.stderr


def test_failing_parity_names_the_debug_command(onnx_fp32, tmp_path):
    r = invoke_cli("parity", onnx_fp32, "-w", planted(tmp_path, scale_qkv=1.5))
    assert r.code == 1
    assert f"mixformer-deploy debug {onnx_fp32}" in r.stderr


def test_planted_fp16_overflow_is_named_at_the_mlp_on_openvino_fp16(tmp_path):
    """fc1 of stages.2.1 scaled so that the MLP's output exceeds float16's range (65504): OpenVINO's CPU
    plugin computes float16 where the CPU has it; onnxruntime's CPU provider computes an fp16 graph in
    float32 (no overflow to find there, docs/debug.md)."""
    pytest.importorskip("openvino")
    from mixformer_deploy.backends.openvino.runner import cpu_capabilities
    from mixformer_deploy.debug import debug_artifact
    from mixformer_deploy.export_api import export

    import openvino as ov
    if "FP16" not in cpu_capabilities(ov.Core()):
        pytest.skip("this CPU cannot execute float16 in OpenVINO (no AVX512-FP16/AMX-FP16)")
    weights = planted(tmp_path, scale_fc1=1e6)
    art = export(weights, target="openvino", img_size=64, precision="fp16", output=tmp_path, check=False).path
    report = debug_artifact(art, weights=weights, runtime_options={"precision": "fp16"})
    assert report.precision == "fp16"
    assert report.first_block == "stages.2.1" and report.first_branch == "stages.2.1.mlp"
    assert report.verdict().startswith("first divergence: stages.2.1 (layers.2.blocks.1) mlp: rel L2 inf")


class _ProgramEvaluator:
    """The tests' numpy evaluator of a Core ML program (tests/coreml_mil.py) as debug's runner: each fp16
    op's result rounded to float16. It checks the probe where Core ML cannot predict; never a prediction."""

    precision = "fp16"

    def __init__(self, path):
        from coreml_mil import MilReference
        self.program = MilReference(path)

    def run(self, x):
        return self.program.run(x)

    def describe(self) -> dict:
        return {"runtime": "numpy evaluator of the ML program (tests only)"}

    def close(self) -> None:
        pass


@pytest.mark.slow
@pytest.mark.coreml
def test_core_ml_probe_is_exported_and_names_the_fp16_overflow_on_the_program_evaluator(tmp_path):
    """Core ML predicts on macOS only: here the probe (a Core ML fp16 package with named probe outputs) is
    exported for real and evaluated op by op in numpy."""
    pytest.importorskip("coremltools")
    from mixformer_deploy.debug import debug_artifact
    from mixformer_deploy.export_api import export

    weights = planted(tmp_path, scale_fc1=1e6)
    art = export(weights, target="coreml", img_size=64, precision="fp16", output=tmp_path, check=False).path
    report = debug_artifact(art, weights=weights, inputs=("photos",), loader=_ProgramEvaluator)
    assert report.probe_vs_artifact <= 1e-3
    assert report.first_block == "stages.2.1" and report.first_branch == "stages.2.1.mlp"
    assert all(p.rel_l2 < 2e-3 for p in report.blocks[:report.blocks.index(
        next(p for p in report.blocks if p.name == "stages.2.1"))])
