"""ExecuTorch target: a `.pte` program with the model lowered to the XNNPACK delegate (Android/iOS CPUs).

Path: ``torch.export`` -> (int8: PT2E with the XNNPACK quantizer, per-channel int8 weights, int8 activations
calibrated on the shared calibration images) -> ``to_edge_transform_and_lower`` with the XnnpackPartitioner
-> ``to_executorch``. The graph lowered by default is the XNNPACK form of the deploy form
(``deploy/xnnpack.py``: the same function with every Linear, matmul, conv and norm in a shape XNNPACK
takes); ``--graph-form deploy`` lowers the deploy form as is, for comparison.

Manifest: a .pte has no free-form metadata field, but a program may carry constant methods; the manifest
is embedded as the method ``mixformer_manifest`` returning its UTF-8 JSON as a uint8 tensor (read back
through the ExecuTorch runtime), and written as the sidecar as every target's is. The manifest records the
delegation: ops inside XNNPACK subgraphs and ops left on the portable kernels, by name.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..backends import require
from ..errors import ArtifactError, ExportError, UsageError, one_line
from ..deploy.xnnpack import kept_filter
from ..formats.executorch import MANIFEST_METHOD, embedded_manifest, load_program
from .base import INT8_PER_TENSOR, ExportOptions, Target, TargetOption, Tolerance

log = logging.getLogger(__name__)
# ops that move or view data: not "compute-heavy" when left off the delegate
LAYOUT_OPS = {"getitem", "view_copy", "permute_copy", "clone", "alloc", "_to_dim_order_copy", "expand_copy",
              "squeeze_copy", "unsqueeze_copy", "slice_copy", "cat", "split_with_sizes_copy", "select_copy",
              "quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel", "quantize_per_channel"}

_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "fp16", 6: "fp32", 7: "fp64",
                 11: "bool", 15: "bf16"}  # c10::ScalarType codes
GRAPH_FORM = TargetOption(
    "graph_form", "Graph lowered to XNNPACK: 'xnnpack' (the deploy form in XNNPACK's shapes, default) or "
    "'deploy' (the deploy form as is).", str, "xnnpack", ("xnnpack", "deploy"))


def op_name(target) -> str:
    """'aten.addmm.default' / '<EdgeOpOverload: aten.addmm.default>: schema...' -> 'addmm'."""
    s = str(getattr(target, "__name__", None) or target)
    s = s.split(":")[0].replace("<EdgeOpOverload", "").strip(" <>")
    parts = [p for p in s.split(".") if p]
    if len(parts) >= 2 and parts[0] in ("aten", "quantized_decomposed", "dim_order_ops", "torchao", "prims"):
        return parts[1]
    return parts[-2] if len(parts) >= 3 and parts[-1] in ("default", "out", "Tensor", "dim", "int") else s


def delegation_facts(edge_program) -> dict:
    """Ops inside the XNNPACK delegates and ops left outside, by name (from the lowered edge program)."""
    gm = edge_program.graph_module
    inside: Counter = Counter()
    outside: Counter = Counter()
    subgraphs = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node.target)
        if name == "executorch_call_delegate":
            subgraphs += 1
            lowered = getattr(gm, node.args[0].target)
            for n in lowered.original_module.graph_module.graph.nodes:
                if n.op == "call_function":
                    inside[op_name(n.target)] += 1
        elif name != "getitem":
            outside[op_name(node.target)] += 1
    heavy = {k: v for k, v in outside.items() if k not in LAYOUT_OPS}
    return {"delegate": "XnnpackBackend", "subgraphs": subgraphs, "delegated_ops": sum(inside.values()),
            "non_delegated_ops": sum(outside.values()), "delegated": dict(sorted(inside.items())),
            "non_delegated": dict(sorted(outside.items())), "compute_off_delegate": dict(sorted(heavy.items()))}


class ExecuTorchTarget(Target):
    key = "executorch"
    suffix = ".pte"
    extra = "executorch"
    runtime = "executorch"
    precisions = ("fp32", "int8")
    calibrated = ("int8",)
    tolerances = {"fp32": Tolerance(1e-4, 1e-4, 0.99999), "int8": INT8_PER_TENSOR}
    options = (GRAPH_FORM,)
    versions = ("executorch", "torchao")
    description = "ExecuTorch .pte with the XNNPACK delegate (Android and iOS CPUs)"

    def check(self, options: ExportOptions) -> None:
        super().check(options)
        if options.batch is None:
            raise UsageError("executorch exports a fixed batch (the .pte's memory is planned for one shape): "
                             "use --batch N")
        _installed("executorch", self.extra)

    def export(self, deploy_model, options: ExportOptions, out: Path, manifest: dict) -> dict:
        self.check(options)
        exir = require("executorch.exir", self.extra)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        form = options.opt("graph_form") or GRAPH_FORM.default
        module = _form(deploy_model, form)
        example = (torch.zeros(options.batch, 3, options.height, options.width),)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if options.precision == "int8":
                program = self._quantized_program(module, example, options, manifest)
            else:
                try:
                    program = torch.export.export(module, example, strict=False)
                except Exception as e:
                    raise ExportError(f"torch.export failed: {one_line(e)}") from e
            try:
                edge = exir.to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            except Exception as e:
                raise ExportError(f"ExecuTorch lowering to XNNPACK failed: {one_line(e)}") from e
            facts = {"graph_form": form, "delegation": delegation_facts(edge.exported_program())}
            manifest.update(facts)
            blob = json.dumps(manifest, sort_keys=True).encode()
            embedded = hasattr(edge, "_config_methods")
            if embedded:  # constant methods are fixed at lowering; set the manifest once the facts are known
                edge._config_methods = {MANIFEST_METHOD: torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
            try:
                buffer = edge.to_executorch().buffer
            except Exception as e:
                raise ExportError(f"ExecuTorch serialization failed: {one_line(e)}") from e
        Path(out).write_bytes(buffer)
        facts["manifest_embedded"] = embedded
        d = facts["delegation"]
        log.info("executorch: %d ops in %d XNNPACK subgraphs, %d left on portable kernels (%s)",
                 d["delegated_ops"], d["subgraphs"], d["non_delegated_ops"], d["non_delegated"])
        return facts

    def _quantized_program(self, module, example, options: ExportOptions, manifest: dict):
        """PT2E static int8 with the XNNPACK quantizer: per-channel symmetric weights, per-tensor
        activations observed on the calibration images; kept modules and normalizations stay float32."""
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                                get_symmetric_quantization_config)
        pt2e = require("torchao.quantization.pt2e.quantize_pt2e", self.extra)
        if options.calibration is None:
            raise UsageError("executorch int8 needs calibration images")
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        quantizer.set_filter_function(kept_filter(options.keeps))
        x = torch.from_numpy(options.calibration.x).float()
        b = options.batch
        try:
            captured = torch.export.export(module, example, strict=False).module()
            prepared = pt2e.prepare_pt2e(captured, quantizer)
            for i in range(0, len(x) - len(x) % b or len(x), b):
                prepared(x[i:i + b])
            converted = pt2e.convert_pt2e(prepared)
            program = torch.export.export(converted, example, strict=False)
        except Exception as e:
            raise ExportError(f"XNNPACK PT2E quantization failed: {one_line(e)}") from e
        manifest["quantization"] = {"scheme": "XNNPACKQuantizer symmetric int8, per-channel weights, "
                                              "per-tensor static activations (HistogramObserver)",
                                    "float32": sorted(options.keeps) + ["every XnnLayerNorm (normalization statistics)"]}
        return program

    # ------------------------------------------------------------------ reading artifacts

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        program = load_program(path)
        meta = program.metadata("forward")

        def desc(infos):
            return [{"shape": list(t.sizes()), "dtype": _SCALAR_TYPES.get(int(t.dtype()), str(t.dtype()))}
                    for t in infos]

        inputs = desc(meta.input_tensor_meta(i) for i in range(meta.num_inputs()))
        outputs = desc(meta.output_tensor_meta(i) for i in range(meta.num_outputs()))
        instructions, delegates = _instruction_histogram(path)
        manifest = self.read_embedded(path) or {}
        d = manifest.get("delegation") or {}
        return {
            "format": "executorch", "inputs": inputs, "outputs": outputs,
            "methods": sorted(program.method_names),
            "instructions": instructions, "delegates": delegates,
            "ops": {"delegated": d.get("delegated"), "non_delegated": d.get("non_delegated")},
            "delegated_ops": d.get("delegated_ops"), "non_delegated_ops": d.get("non_delegated_ops"),
            "compute_off_delegate": d.get("compute_off_delegate"),
            "graph_form": manifest.get("graph_form"), "max_rank": None,
            "precisions": {manifest.get("precision", "unknown"): d.get("delegated_ops")},
            "kept_fp32": (manifest.get("quantization") or {}).get("float32", []),
        }


def _installed(module: str, extra: str) -> None:
    """Cheap presence check (no import: importing the converter costs seconds)."""
    import importlib.util

    from ..errors import MissingBackendError
    if importlib.util.find_spec(module) is None:
        raise MissingBackendError(f"{module} is not installed: pip install \"mixformer-deploy[{extra}]\"")


def _form(deploy_model, form: str):
    if form == "deploy":
        return deploy_model.eval()
    from ..deploy.xnnpack import to_xnnpack
    return to_xnnpack(deploy_model)


def _instruction_histogram(path: Path) -> tuple[dict, list]:
    """The forward plan's instructions: kernel calls by operator name, delegate calls by backend."""
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary
        program = deserialize_pte_binary(Path(path).read_bytes()).program
    except Exception as e:
        raise ArtifactError(f"{Path(path).name}: cannot parse the program ({one_line(e, 200)})") from e
    plan = next((p for p in program.execution_plan if p.name == "forward"), program.execution_plan[0])
    hist: Counter = Counter()
    for chain in plan.chains:
        for ins in chain.instructions:
            args = ins.instr_args
            kind = type(args).__name__
            if kind == "KernelCall":
                op = plan.operators[args.op_index]
                hist[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
            elif kind == "DelegateCall":
                hist[f"delegate:{plan.delegates[args.delegate_index].id}"] += 1
            else:
                hist[kind] += 1
    return dict(sorted(hist.items())), [d.id for d in plan.delegates]
