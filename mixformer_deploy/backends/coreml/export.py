"""Core ML exporter: an ML program (``.mlpackage``) for iPhones, iPads and Macs, converted on any OS.

Why torch.export: coremltools' TorchScript frontend fails on the deploy form's window attention
(``converting 'int' op ... only 0-dimensional arrays can be converted``); its ``torch.export`` frontend,
fed ``run_decompositions({})`` (the core ATen op set), converts it. The pass
``common::expand_high_rank_reshape_and_transpose`` is removed from coremltools' pipeline: the deploy form
has no tensor above rank 5, and conversion must not depend on a pass that rewrites ranks above that.

fp16: coremltools' fp16 compute precision with an op selector. ``torch.export`` records, for every node,
the module it came from (``nn_module_stack``); coremltools names each MIL op after its FX node (passes
that fuse or deduplicate add a ``_<n>`` suffix). So an op is kept float32 when the deploy-form module it
came from is one of ``options.keeps`` or inside one; the kept ops are recorded in the manifest and
``inspect`` checks them against the program's actual dtypes. Input and output stay float32.

App-facing forms (opt-in, exceptions to the contract "first input = normalized NCHW float32 tensor,
first output = logits"):
- ``image_input``: the input is an RGB image (a ``CVPixelBuffer`` in an app). Core ML's image
  preprocessing is one scalar scale and a per-channel bias: scale 1/255 and bias -mean map pixels to
  ``x/255 - mean``; the per-channel 1/std is a multiply inside the graph.
- ``classifier``: a softmax inside the graph and coremltools' classifier outputs: ``classLabel`` (the
  top label) and ``classLabel_probs`` (label -> probability), with the manifest's labels.
Parity runs on the plain form; these forms are described by ``inspect`` and checked by
``benchmarks/mac_check.py`` on a Mac.

Reproducibility: coremltools writes random UUIDs into the package's Manifest.json and the conversion
date into the metadata; both are replaced (UUIDs derived from the item paths, the date from the
manifest's ``created``, which honours SOURCE_DATE_EPOCH), and the spec is serialized deterministically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...deploy.precision import kept_by
from ...errors import ArtifactError, ExportError, UsageError, one_line
from ...manifest import EMBED_KEY
from ..exporter import ExportContext, Exporter, ExportOptions
from .spec import (INPUT, LOGITS, PLATFORMS, coremltools, deployment_target, platform_of, read_spec,
                   spec_path)

log = logging.getLogger(__name__)

RANK_PASS = "common::expand_high_rank_reshape_and_transpose"
DEBUG_MAP_FILE = "executorch_debug_handle_mapping.json"   # coremltools' ExecuTorch side file, not Core ML's
AUTHOR = "mixformer-deploy"
LICENSE = "Apache-2.0"
IMAGE_INPUT = "image"
CLASS_LABEL, PROBABILITIES = "classLabel", "classLabel_probs"
MAX_BATCH = 1024   # the upper bound of a dynamic batch axis



def pass_pipeline():
    """coremltools' default pipeline without the rank-reducing pass (the deploy form stays at rank <= 5)."""
    ct = coremltools()
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes([RANK_PASS])
    return pipeline


class _Form(torch.nn.Module):
    """What is converted: the deploy form, plus (image input) the per-channel 1/std multiply and
    (classifier) a softmax."""

    def __init__(self, deploy: torch.nn.Module, inv_std: torch.Tensor | None, softmax: bool):
        super().__init__()
        self.deploy, self.softmax = deploy, softmax
        self.register_buffer("inv_std", inv_std if inv_std is not None else torch.ones(0), persistent=False)
        self.scaled = inv_std is not None

    def forward(self, x):
        if self.scaled:
            x = x * self.inv_std
        y = self.deploy(x)
        return torch.softmax(y, dim=-1) if self.softmax else y


def fx_modules(program) -> dict[str, str]:
    """FX node name -> the deploy-form module it came from ('' for the top level)."""
    out = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        path = re.sub(r"^deploy\.?", "", path)
        out[node.name] = path
    return out


class KeepSelector:
    """coremltools' fp16 op selector: False (keep float32) for ops that came from a kept module."""

    def __init__(self, modules: dict[str, str], keeps: list[str]):
        self.modules, self.keeps = modules, list(keeps)
        self.kept: dict[str, list[str]] = {}
        self.unmapped: Counter = Counter()

    def module_of(self, op_name: str) -> str | None:
        name = op_name
        while True:
            if name in self.modules:
                return self.modules[name]
            stripped = re.sub(r"_\d+$", "", name)  # fusion / dedup suffixes: mul_1_1 -> mul_1, linear_0 -> linear
            if stripped == name:
                return None
            name = stripped

    def keep(self, module: str | None) -> str | None:
        return kept_by(module, self.keeps) if module else None

    def __call__(self, op) -> bool:
        if op.op_type == "const":
            return True
        module = self.module_of(op.name)
        if module is None:
            self.unmapped[op.op_type] += 1
        k = self.keep(module)
        if k is None:
            return True
        self.kept.setdefault(k, []).append(op.name)
        return False


def _preprocessing(manifest: dict) -> tuple[list[float], list[float]]:
    prep = manifest.get("preprocessing") or {}
    return list(prep.get("mean") or (0.485, 0.456, 0.406)), list(prep.get("std") or (0.229, 0.224, 0.225))


def _labels(manifest: dict) -> list[str]:
    labels = manifest.get("labels")
    n = manifest.get("num_classes") or 0
    if labels and len(labels) == n:
        return [str(x) for x in labels]
    return [f"class_{i}" for i in range(n)]


@dataclass
class _Plan:
    """What one conversion makes: the deployment target, the app-facing forms and the preprocessing."""

    target_name: str
    image: bool
    classifier: bool
    mean: list[float]
    std: list[float]

    @classmethod
    def of(cls, options: ExportOptions, manifest: dict) -> "_Plan":
        mean, std = _preprocessing(manifest)
        return cls(deployment_target(options.target.minimum_deployment_target), options.target.image_input,
                   options.target.classifier, mean, std)

    @property
    def form(self) -> str:
        forms = [f for f, on in (("classifier", self.classifier), ("image", self.image)) if on]
        return "+".join(forms) or "plain"


class CoreMlExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        ct = coremltools()
        plan = _Plan.of(ctx.options, ctx.manifest)
        features = _features(ct, deploy_model, ctx.options, plan, ctx.manifest)
        program = _torch_export(deploy_model, ctx.options, plan)
        model, selector = _convert(ct, program, ctx.options, plan, features)
        facts = _facts(model.get_spec(), ctx.options, plan, selector, _labels(ctx.manifest))
        _record(ctx.manifest, facts, plan)
        _describe(model, ctx.manifest, plan.image, plan.classifier)
        _save(model, ctx.tmp)
        return {"coreml": facts}


def _torch_export(deploy_model, options: ExportOptions, plan: _Plan):
    """The deploy form (with the app-facing additions) as a core-ATen ExportedProgram."""
    inv_std = torch.tensor([1.0 / s for s in plan.std], dtype=torch.float32).view(1, 3, 1, 1) if plan.image else None
    form = _Form(deploy_model, inv_std, plan.classifier).eval()
    example = torch.zeros(options.batch or 2, 3, options.height, options.width)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}} if options.batch is None else None
    try:
        with torch.no_grad():
            return torch.export.export(form, (example,), dynamic_shapes=dynamic).run_decompositions({})
    except Exception as e:
        raise ExportError(f"torch.export of the deploy form failed: {one_line(e)}") from e


def _features(ct, deploy_model, options: ExportOptions, plan: _Plan, manifest: dict) -> dict:
    """coremltools' inputs, outputs and classifier config for the plain or app-facing form."""
    from ..onnx.export import output_names

    batch = ct.RangeDim(1, MAX_BATCH, default=1) if options.batch is None else options.batch
    shape = (batch, 3, options.height, options.width)
    if plan.image:
        inputs = [ct.ImageType(name=IMAGE_INPUT, shape=shape, scale=1.0 / 255.0, bias=[-m for m in plan.mean],
                               color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=INPUT, shape=shape, dtype=np.float32)]
    names = output_names(deploy_model)
    if plan.classifier and names != [LOGITS]:
        raise UsageError("--classifier needs logits: a backbone (--head none) has feature maps")
    return {"inputs": inputs,
            "outputs": None if plan.classifier else [ct.TensorType(name=n, dtype=np.float32) for n in names],
            "classifier_config": ct.ClassifierConfig(_labels(manifest)) if plan.classifier else None}


def _convert(ct, program, options: ExportOptions, plan: _Plan, features: dict):
    """The ML program (not loaded: Core ML runs on macOS only) and the fp16 keep selector (or None)."""
    selector = None
    if options.precision == "fp16":
        selector = KeepSelector(fx_modules(program), options.keeps)
        precision = ct.transform.FP16ComputePrecision(op_selector=selector)
    else:
        precision = ct.precision.FLOAT32
    try:
        model = ct.convert(program, convert_to="mlprogram", compute_precision=precision,
                           minimum_deployment_target=getattr(ct.target, plan.target_name.replace(".", "_")),
                           pass_pipeline=pass_pipeline(), skip_model_load=True, **features)
    except Exception as e:
        _too_old(e, plan.target_name)
        raise ExportError(f"coremltools conversion failed: {one_line(e)}") from e
    return model, selector


def _too_old(error: Exception, target_name: str) -> None:
    """A conversion that fails because an op needs a newer OS: name the oldest target that works."""
    text = str(error)
    if not re.search(r"(deployment target|opset|iOS\d+|macOS\d+)", text, re.I):
        return
    platform, i = platform_of(target_name)
    newer = PLATFORMS[platform][i + 1:]
    mentioned = [n for n in newer if n.lower() in text.lower()]
    if mentioned:
        raise UsageError(f"--minimum-deployment-target {target_name} is too old for the ops this model uses "
                         f"({one_line(error, 160)}); the oldest that works is {mentioned[0]}") from error


def _facts(spec, options: ExportOptions, plan: _Plan, selector: KeepSelector | None, labels: list[str]) -> dict:
    """What the manifest records of the conversion (``inspect`` checks the kept ops against the program)."""
    facts = {
        "minimum_deployment_target": plan.target_name,
        "specification_version": spec.specificationVersion,
        "form": plan.form,
        "inputs": [d.name for d in spec.description.input],
        "outputs": [d.name for d in spec.description.output],
        "passes_removed": [RANK_PASS],
        "compute_precision": options.precision,
    }
    if plan.image:
        facts["image_preprocessing"] = {"color_layout": "RGB", "scale": 1.0 / 255.0, "bias": [-m for m in plan.mean],
                                        "in_graph_multiply": [1.0 / s for s in plan.std]}
    if plan.classifier:
        facts["classifier"] = {"labels": labels, "softmax_in_graph": True}
    if selector is not None:
        facts["kept_fp32"] = {k: sorted(v) for k, v in sorted(selector.kept.items())}
        facts["kept_fp32_unmatched"] = sorted(set(options.keeps) - set(selector.kept))
        if selector.unmapped:
            facts["ops_without_module"] = dict(sorted(selector.unmapped.items()))
    return facts


def _record(manifest: dict, facts: dict, plan: _Plan) -> None:
    """Put the facts into the manifest; an app-facing form also renames its input and outputs there."""
    manifest["coreml"] = facts
    if plan.image or plan.classifier:
        manifest["input"] = {**(manifest.get("input") or {}), "name": facts["inputs"][0],
                             "kind": "image" if plan.image else "tensor"}
        manifest["outputs"] = facts["outputs"]


def _describe(model, manifest: dict, image: bool, classifier: bool) -> None:
    """The metadata Xcode shows (author, license, descriptions of the model and its features) and the
    manifest, embedded; the conversion date is the manifest's, so two exports give the same bytes."""
    variant = manifest.get("variant", "?")
    h, w = manifest.get("input_size") or ("?", "?")
    model.author = AUTHOR
    model.license = LICENSE
    model.version = str((manifest.get("versions") or {}).get("mixformer-deploy") or "")
    backbone = manifest.get("head") == "none"
    what = "backbone (multi-scale feature maps)" if backbone else \
        f"image classifier, {manifest.get('num_classes')} classes"
    model.short_description = (f"MixFormer {variant} {what}, {h}x{w}, {manifest.get('precision')} "
                               "(exported by mixformer-deploy)")
    if image:
        model.input_description[IMAGE_INPUT] = "RGB image, resized to the model's input size"
    else:
        model.input_description[INPUT] = ("normalized images, NCHW float32: (pixels/255 - mean) / std, "
                                          "mean/std in the manifest")
    if classifier:
        model.output_description[CLASS_LABEL] = "most probable label"
        model.output_description[PROBABILITIES] = "label -> probability (softmax of the logits)"
    elif backbone:
        for o in manifest.get("outputs") or []:
            model.output_description[o["name"]] = (f"stage feature map, NCHW, {o['channels']} channels, "
                                                   f"stride {o['stride']}")
    else:
        model.output_description[LOGITS] = "class logits (before softmax)"
    meta = model.user_defined_metadata
    created = str(manifest.get("created") or "")
    if created:  # coremltools stamps today's date; use the manifest's (SOURCE_DATE_EPOCH) instead
        meta["com.github.apple.coremltools.conversion_date"] = created[:10]
    meta[EMBED_KEY] = json.dumps(manifest, sort_keys=True)


def _save(model, out: Path) -> None:
    """Save the package, make its bytes reproducible and check that it reads back."""
    try:
        model.save(str(out))
    except Exception as e:
        raise ExportError(f"coremltools could not save the package: {one_line(e)}") from e
    _make_reproducible(out, model.get_spec())
    try:
        read_spec(out)
    except ArtifactError as e:
        raise ExportError(f"the written package does not read back: {e}") from e


def _make_reproducible(package: Path, spec) -> None:
    """Same inputs, same bytes: stable item identifiers in Manifest.json, a deterministic spec
    serialization, and no ExecuTorch debug-handle side file."""
    package = Path(package)
    (package / DEBUG_MAP_FILE).unlink(missing_ok=True)
    manifest = package / "Manifest.json"
    info = json.loads(manifest.read_text())
    entries = info.get("itemInfoEntries", {})
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"mixformer-deploy:{e.get('path')}")).upper()
               for old, e in entries.items()}
    info["itemInfoEntries"] = {renamed[k]: v for k, v in sorted(entries.items(), key=lambda kv: renamed[kv[0]])}
    info["rootModelIdentifier"] = renamed.get(info.get("rootModelIdentifier"), info.get("rootModelIdentifier"))
    manifest.write_text(json.dumps(info, indent=4, sort_keys=True) + "\n")
    spec_path(package).write_bytes(spec.SerializeToString(deterministic=True))
    for f in package.rglob("*"):  # file times do not matter to Core ML; keep them equal too
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        if epoch and epoch.isdigit():
            os.utime(f, (int(epoch), int(epoch)), follow_symlinks=False)
