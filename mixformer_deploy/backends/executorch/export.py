"""ExecuTorch exporter: a `.pte` program with the model lowered to the XNNPACK delegate (Android/iOS CPUs).

Path: ``torch.export`` -> (int8: PT2E with the XNNPACK quantizer, per-channel int8 weights, int8 activations
calibrated on the shared calibration images) -> ``to_edge_transform_and_lower`` with the XnnpackPartitioner
-> ``to_executorch``. The graph lowered by default is the XNNPACK form of the deploy form
(``backends/xnnpack.py``: the same function with every Linear, matmul, conv and norm in a shape XNNPACK
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

import torch

from ...errors import ExportError, one_line
from ...optional import require
from ..exporter import ExportContext, Exporter, ExportOptions
from ..xnnpack import graph_form, kept_filter, pt2e_int8
from .spec import MANIFEST_METHOD

log = logging.getLogger(__name__)
# ops that move or view data: not "compute-heavy" when left off the delegate
LAYOUT_OPS = {"getitem", "view_copy", "permute_copy", "clone", "alloc", "_to_dim_order_copy", "expand_copy",
              "squeeze_copy", "unsqueeze_copy", "slice_copy", "cat", "split_with_sizes_copy", "select_copy",
              "quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel", "quantize_per_channel"}


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


class ExecuTorchExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        options, manifest = ctx.options, ctx.manifest
        exir = require("executorch.exir", self.spec.extra)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        module = graph_form(deploy_model, options.target.graph_form)
        example = (torch.zeros(options.batch, 3, options.height, options.width),)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = self._program(module, example, options, manifest)
            try:
                edge = exir.to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            except Exception as e:
                raise ExportError(f"ExecuTorch lowering to XNNPACK failed: {one_line(e)}") from e
            facts = {"graph_form": options.target.graph_form, "delegation": delegation_facts(edge.exported_program())}
            manifest.update(facts)
            blob = json.dumps(manifest, sort_keys=True).encode()
            embedded = hasattr(edge, "_config_methods")
            if embedded:  # constant methods are fixed at lowering; set the manifest once the facts are known
                edge._config_methods = {MANIFEST_METHOD: torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
            try:
                buffer = edge.to_executorch().buffer
            except Exception as e:
                raise ExportError(f"ExecuTorch serialization failed: {one_line(e)}") from e
        ctx.tmp.write_bytes(buffer)
        facts["manifest_embedded"] = embedded
        d = facts["delegation"]
        if d["non_delegated_ops"]:  # slow portable kernels: worth a line (all delegated is the normal case)
            log.warning("executorch: %d ops left on portable kernels (%s), %d in %d XNNPACK subgraphs",
                        d["non_delegated_ops"], d["non_delegated"], d["delegated_ops"], d["subgraphs"])
        else:
            log.debug("executorch: all %d ops in %d XNNPACK subgraphs", d["delegated_ops"], d["subgraphs"])
        return facts

    def _program(self, module, example, options: ExportOptions, manifest: dict):
        """The exported program to lower: the module as is, or (int8) quantized by PT2E with the XNNPACK
        quantizer: per-channel symmetric weights, per-tensor activations observed on the calibration
        images; kept modules and normalizations stay float32."""
        if options.precision == "int8":
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            quantizer.set_filter_function(kept_filter(options.keeps))
            module = pt2e_int8(module, example, quantizer, options.calibration, options.batch, self.spec.extra)
            manifest["quantization"] = {
                "scheme": "XNNPACKQuantizer symmetric int8, per-channel weights, per-tensor static activations "
                          "(HistogramObserver)",
                "float32": sorted(options.keeps) + ["every XnnLayerNorm (normalization statistics)"]}
        try:
            return torch.export.export(module, example, strict=False)
        except Exception as e:
            raise ExportError(f"torch.export failed: {one_line(e)}") from e
