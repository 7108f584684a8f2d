"""ONNX target: TorchScript-based export of the deploy form, onnxslim simplification, embedded manifest.

Why the TorchScript exporter: on the deploy form (static shapes, rank <= 5) it yields a clean graph at
any opset >= 17 in seconds; the dynamo exporter starts at opset 18 and its down-conversion to 17 fails.
Why onnxslim: pure Python on top of onnx (no compiled wheel to miss on a new Python), and it folds the
constants the deploy form leaves (reshape targets, the precomputed relative bias) in one pass.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import torch

from ..backends import require
from ..errors import ArtifactError, ExportError, UsageError
from ..manifest import EMBED_KEY
from .base import ExportOptions, Target, Tolerance

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17
DEBUG_PREFIX = "debug_"


class _Exportable(torch.nn.Module):
    """Logits first, then (for the localizer) the raw per-stage tensors, with optional fp16 inside and
    float32 at the edges."""

    def __init__(self, deploy: torch.nn.Module, fp16: bool, debug: bool):
        super().__init__()
        self.deploy = deploy.half() if fp16 else deploy
        self.fp16, self.debug = fp16, debug

    def forward(self, x):
        outs = self.deploy.stage_tensors(x.half() if self.fp16 else x)
        logits = outs[-1].float()
        return (logits, *outs[:-1]) if self.debug else logits


def _drop_dead_nodes(graph) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))


class OnnxTarget(Target):
    key = "onnx"
    suffix = ".onnx"
    extra = "onnx"
    runtime = "onnxruntime"
    precisions = ("fp32", "fp16")
    tolerances = {"fp32": Tolerance(1e-4, 1e-4, 0.99999), "fp16": Tolerance(2e-2, 2e-2, 0.999)}

    def export(self, deploy_model, options: ExportOptions, out: Path, manifest: dict) -> dict:
        onnx = require("onnx", self.extra)
        self.check(options.precision, options.opset)
        opset = options.opset or DEFAULT_OPSET
        names = deploy_model.stage_names()[:-1]
        debug_names = [DEBUG_PREFIX + n for n in names] if options.debug_outputs else []
        module = _Exportable(deploy_model, options.precision == "fp16", options.debug_outputs).eval()
        example = torch.zeros(options.batch or 2, 3, options.height, options.width)
        dynamic = None
        if options.batch is None:
            dynamic = {n: {0: "batch"} for n in ["input", "logits", *debug_names]}
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits", *debug_names],
                                  dynamic_axes=dynamic, do_constant_folding=True)
            model = onnx.load_from_string(buf.getvalue())
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        nodes_exported = len(model.graph.node)
        if options.simplify:
            model = self._simplify(model)
        if options.debug_outputs:  # keep the stage tensors' names, but ship logits only
            kept = [o for o in model.graph.output if not o.name.startswith(DEBUG_PREFIX)]
            del model.graph.output[:]
            model.graph.output.extend(kept)
            _drop_dead_nodes(model.graph)
            manifest["stage_outputs"] = {**deploy_model.stage_layout(), "tensors": dict(zip(names, debug_names))}
        manifest.update({"opset": opset, "nodes": {"exported": nodes_exported, "shipped": len(model.graph.node)}})
        embed = model.metadata_props.add()
        embed.key, embed.value = EMBED_KEY, json.dumps(manifest)
        model.producer_name, model.producer_version = "mixformer-deploy", manifest["versions"]["mixformer-deploy"]
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported model: {' '.join(str(e).split())[:300]}") from e
        onnx.save(model, str(out))
        return {"opset": opset, "nodes": manifest["nodes"]}

    @staticmethod
    def _simplify(model):
        slim = require("onnxslim", "onnx")
        try:
            return slim.slim(model)
        except Exception as e:
            raise ExportError(f"onnxslim failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e

    def check(self, precision: str, opset: int | None) -> None:
        super().check(precision, opset)
        if opset is not None and opset < 17:
            raise UsageError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")

    def read_embedded(self, path: Path) -> dict | None:
        model = load_onnx(path, load_weights=False)
        for prop in model.metadata_props:
            if prop.key == EMBED_KEY:
                try:
                    return json.loads(prop.value)
                except ValueError as e:
                    raise ArtifactError(f"{Path(path).name}: embedded manifest is not valid JSON") from e
        return None


def load_onnx(path: str | Path, load_weights: bool = True):
    """onnx.load with one-line errors for files that are missing, not ONNX, or truncated."""
    onnx = require("onnx", "onnx")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as e:
        raise ArtifactError(f"{path.name}: not a readable ONNX model ({type(e).__name__})") from e
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise ArtifactError(f"{path.name}: not a usable ONNX model (empty graph, inputs or outputs)")
    return model
