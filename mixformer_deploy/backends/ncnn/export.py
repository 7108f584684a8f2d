"""ncnn export: the deploy form -> its ncnn form (rank <= 4, graph.py) -> pnnx -> ``<name>.ncnn/`` holding
``model.ncnn.param``, ``model.ncnn.bin`` and the manifest (``manifest.json``: the param/bin pair has no
metadata slot). fp16 stores the weights in half precision; ncnn computes in fp16 where the CPU has fp16
arithmetic (ARMv8.2 and later), in fp32 elsewhere (x86), and its param format has no per-layer float32
keep, so the manifest says the keeps were not applied."""

from __future__ import annotations

import json

from ..exporter import ExportContext, Exporter
from .spec import MANIFEST, sha256_file


class NcnnExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        from .convert import convert
        from .graph import to_ncnn_form

        o = ctx.options
        ctx.tmp.mkdir(parents=True, exist_ok=True)
        net = convert(to_ncnn_form(deploy_model), (o.height, o.width), ctx.tmp, fp16=o.precision == "fp16")
        facts = {"input_shape": list(net.input_shape), "output_shapes": [list(s) for s in net.output_shapes],
                 "output_blobs": net.output_blobs, "runs": "one image per extractor run (converted at batch 1)",
                 "bin_sha256": sha256_file(net.bin)}
        ctx.manifest["ncnn"] = facts
        if o.precision == "fp16" and "precision_keeps" in ctx.manifest:
            ctx.manifest["precision_keeps"]["applied"] = False  # ncnn's param format has no per-layer keep
        (ctx.tmp / MANIFEST).write_text(json.dumps(ctx.manifest, indent=2) + "\n")
        return facts
