"""Core ML target: an ML program (``.mlpackage``) for iPhones, iPads and Macs, converted on any OS.

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

import contextlib
import io
import json
import logging
import os
import re
import uuid
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..errors import ArtifactError, ExportError, UsageError, one_line
from ..formats.coreml import (INPUT, LOGITS, all_ops, check_weights, coremltools, embedded_manifest, main_block,
                              read_spec, spec_path)
from ..manifest import EMBED_KEY
from .base import ExportOptions, Target, TargetOption, Tolerance

log = logging.getLogger(__name__)

RANK_PASS = "common::expand_high_rank_reshape_and_transpose"
SPEC_FILE = "Data/com.apple.CoreML/model.mlmodel"
DEBUG_MAP_FILE = "executorch_debug_handle_mapping.json"   # coremltools' ExecuTorch side file, not Core ML's
AUTHOR = "mixformer-deploy"
LICENSE = "Apache-2.0"
IMAGE_INPUT = "image"
CLASS_LABEL, PROBABILITIES = "classLabel", "classLabel_probs"

# deployment targets by platform, oldest first; ML programs start at iOS15 / macOS12
PLATFORMS = {
    "iOS": ("iOS13", "iOS14", "iOS15", "iOS16", "iOS17", "iOS18"),
    "macOS": ("macOS10.15", "macOS11", "macOS12", "macOS13", "macOS14", "macOS15"),
}
OLDEST_ML_PROGRAM = {"iOS": "iOS15", "macOS": "macOS12"}
DEFAULT_DEPLOYMENT_TARGET = "iOS16"
OFFERED = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15")
# Core ML specification version -> the deployment targets that introduced it
SPEC_VERSIONS = {6: "iOS15/macOS12", 7: "iOS16/macOS13", 8: "iOS17/macOS14", 9: "iOS18/macOS15"}
DTYPES = {10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16", 21: "int8", 22: "int16", 23: "int32", 24: "int64",
          31: "uint8", 32: "uint16", 1: "bool", 2: "string"}
FLOAT = ("fp16", "fp32", "bf16", "fp64")


def _platform_of(name: str) -> tuple[str, int] | None:
    for platform, names in PLATFORMS.items():
        for i, n in enumerate(names):
            if n.lower() == str(name).lower():
                return platform, i
    return None


def deployment_target(name: str) -> str:
    """A --minimum-deployment-target value -> its canonical spelling, or a UsageError: unknown names list
    the choices, targets too old for an ML program name the oldest that works."""
    found = _platform_of(name)
    if found is None:
        raise UsageError(f"bad --minimum-deployment-target {name!r}: choose one of {', '.join(OFFERED)}")
    platform, i = found
    oldest = OLDEST_ML_PROGRAM[platform]
    if i < PLATFORMS[platform].index(oldest):
        raise UsageError(f"--minimum-deployment-target {PLATFORMS[platform][i]} is too old: Core ML ML programs "
                         f"need {oldest} or newer; the oldest that works for this model is {oldest}")
    return PLATFORMS[platform][i]


@contextlib.contextmanager
def _quiet():
    """coremltools draws tqdm progress bars on stderr and warns freely; the CLI promises one line."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield
    if sink.getvalue().strip():
        log.debug("coremltools said: %s", sink.getvalue()[-2000:])


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
        if not module:
            return None
        return next((k for k in self.keeps if module == k or module.startswith(k + ".")), None)

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


def _input_name(program) -> str:
    return next(s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT")


def _preprocessing(manifest: dict) -> tuple[list[float], list[float]]:
    prep = manifest.get("preprocessing") or {}
    return list(prep.get("mean") or (0.485, 0.456, 0.406)), list(prep.get("std") or (0.229, 0.224, 0.225))


def _labels(manifest: dict) -> list[str]:
    labels = manifest.get("labels")
    n = manifest.get("num_classes") or 0
    if labels and len(labels) == n:
        return [str(x) for x in labels]
    return [f"class_{i}" for i in range(n)]


class CoreMlTarget(Target):
    key = "coreml"
    suffix = ".mlpackage"
    is_dir = True
    extra = "coreml"
    runtime = "coreml"
    precisions = ("fp32", "fp16")
    # fp32: the design's defaults (untested on a Mac here); fp16: as loose as the ONNX fp16 target
    tolerances = {"fp32": Tolerance(1e-4, 1e-4, 0.99999), "fp16": Tolerance(2e-2, 2e-2, 0.999)}
    options = (
        TargetOption("minimum_deployment_target",
                     f"Oldest OS the ML program runs on: {', '.join(OFFERED)} (default {DEFAULT_DEPLOYMENT_TARGET}).",
                     str, DEFAULT_DEPLOYMENT_TARGET),
        TargetOption("image_input", "App-facing form: an RGB image input (CVPixelBuffer) instead of the "
                     "normalized tensor (parity does not run on it).", bool, False),
        TargetOption("classifier", "App-facing form: a classifier with the labels (classLabel + probabilities "
                     "outputs) instead of logits (parity does not run on it).", bool, False),
    )
    versions = ("coremltools",)
    description = "Core ML ML program (.mlpackage) for iOS/macOS; converts anywhere, predicts on macOS only"

    def unjudged_form(self, options: ExportOptions) -> str | None:
        forms = [f"--{k.replace('_', '-')}" for k in ("image_input", "classifier") if options.opt(k)]
        if forms:
            return (f"parity judges the plain form only, not {' '.join(forms)} (an app-facing form; "
                    "benchmarks/mac_check.py checks its inputs and outputs)")
        return None

    def check(self, options: ExportOptions) -> None:
        super().check(options)
        deployment_target(options.opt("minimum_deployment_target") or DEFAULT_DEPLOYMENT_TARGET)
        coremltools()  # exit 3 naming the extra before any weights are read

    # ------------------------------------------------------------------ export

    def export(self, deploy_model, options: ExportOptions, out: Path, manifest: dict) -> dict:
        self.check(options)
        ct = coremltools()
        import numpy as np

        out = Path(out)
        target_name = deployment_target(options.opt("minimum_deployment_target") or DEFAULT_DEPLOYMENT_TARGET)
        image, classifier = bool(options.opt("image_input")), bool(options.opt("classifier"))
        mean, std = _preprocessing(manifest)
        inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(1, 3, 1, 1) if image else None
        form = _Form(deploy_model, inv_std, classifier).eval()
        h, w, batch = options.height, options.width, options.batch
        example = torch.zeros(batch or 2, 3, h, w)
        try:
            with _quiet(), torch.no_grad():
                dynamic = ({"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if batch is None else None)
                program = torch.export.export(form, (example,), dynamic_shapes=dynamic).run_decompositions({})
        except Exception as e:
            raise ExportError(f"torch.export of the deploy form failed: {one_line(e)}") from e

        shape = (ct.RangeDim(1, 1024, default=1) if batch is None else batch, 3, h, w)
        if image:
            inputs = [ct.ImageType(name=IMAGE_INPUT, shape=shape, scale=1.0 / 255.0, bias=[-m for m in mean],
                                   color_layout=ct.colorlayout.RGB)]
        else:
            inputs = [ct.TensorType(name=INPUT, shape=shape, dtype=np.float32)]
        from .onnx import output_names
        names = output_names(deploy_model)
        if classifier and names != [LOGITS]:
            raise UsageError("--classifier needs logits: a backbone (--head none) has feature maps")
        outputs = None if classifier else [ct.TensorType(name=n, dtype=np.float32) for n in names]
        classifier_config = ct.ClassifierConfig(_labels(manifest)) if classifier else None

        pipeline = pass_pipeline()
        selector = None
        if options.precision == "fp16":
            selector = KeepSelector(fx_modules(program), options.keeps)
            precision = ct.transform.FP16ComputePrecision(op_selector=selector)
        else:
            precision = ct.precision.FLOAT32
        try:
            with _quiet():
                model = ct.convert(program, convert_to="mlprogram", inputs=inputs, outputs=outputs,
                                   classifier_config=classifier_config, compute_precision=precision,
                                   minimum_deployment_target=getattr(ct.target, target_name.replace(".", "_")),
                                   pass_pipeline=pipeline, skip_model_load=True)
        except Exception as e:
            self._too_old(e, target_name)
            raise ExportError(f"coremltools conversion failed: {one_line(e)}") from e

        spec = model.get_spec()
        facts = {
            "minimum_deployment_target": target_name,
            "specification_version": spec.specificationVersion,
            "form": "classifier+image" if image and classifier else
                    "image" if image else "classifier" if classifier else "plain",
            "inputs": [d.name for d in spec.description.input],
            "outputs": [d.name for d in spec.description.output],
            "passes_removed": [RANK_PASS],
            "compute_precision": options.precision,
        }
        if image:
            facts["image_preprocessing"] = {"color_layout": "RGB", "scale": 1.0 / 255.0, "bias": [-m for m in mean],
                                            "in_graph_multiply": [1.0 / s for s in std]}
        if classifier:
            facts["classifier"] = {"labels": _labels(manifest), "softmax_in_graph": True}
        if selector is not None:
            facts["kept_fp32"] = {k: sorted(v) for k, v in sorted(selector.kept.items())}
            facts["kept_fp32_unmatched"] = sorted(set(options.keeps) - set(selector.kept))
            if selector.unmapped:
                facts["ops_without_module"] = dict(sorted(selector.unmapped.items()))
        manifest["coreml"] = facts
        if image or classifier:
            manifest["input"] = {**(manifest.get("input") or {}), "name": facts["inputs"][0],
                                 "kind": "image" if image else "tensor"}
            manifest["outputs"] = facts["outputs"]

        self._describe(model, manifest, image, classifier)
        try:
            with _quiet():
                model.save(str(out))
        except Exception as e:
            raise ExportError(f"coremltools could not save the package: {one_line(e)}") from e
        _make_reproducible(out, model.get_spec())
        try:
            read_spec(out)
        except ArtifactError as e:
            raise ExportError(f"the written package does not read back: {e}") from e
        return {"coreml": facts}

    @staticmethod
    def _too_old(error: Exception, target_name: str) -> None:
        """A conversion that fails because an op needs a newer OS: name the oldest target that works."""
        text = str(error)
        if not re.search(r"(deployment target|opset|iOS\d+|macOS\d+)", text, re.I):
            return
        platform, i = _platform_of(target_name)
        newer = PLATFORMS[platform][i + 1:]
        mentioned = [n for n in newer if n.lower() in text.lower()]
        if mentioned:
            raise UsageError(f"--minimum-deployment-target {target_name} is too old for the ops this model uses "
                             f"({one_line(error, 160)}); the oldest that works is {mentioned[0]}") from error

    @staticmethod
    def _describe(model, manifest: dict, image: bool, classifier: bool) -> None:
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

    # ------------------------------------------------------------------ reading

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def inspect(self, path: Path) -> dict:
        coremltools()
        path = Path(path)
        spec = read_spec(path)
        check_weights(path, spec)
        embedded = self.read_embedded(path) or {}
        facts = program_facts(spec)
        recorded = (embedded.get("coreml") or {}).get("kept_fp32") or {}
        fp32_names = facts.pop("_fp32_names")
        kept = sorted(m for m, names in recorded.items() if any(n in fp32_names for n in names))
        meta = spec.description.metadata
        return {
            "format": "coreml mlprogram",
            "specification_version": spec.specificationVersion,
            "minimum_deployment_target": SPEC_VERSIONS.get(spec.specificationVersion,
                                                           f"spec {spec.specificationVersion}"),
            "form": (embedded.get("coreml") or {}).get("form"),
            "inputs": [_feature(d) for d in spec.description.input],
            "outputs": [_feature(d) for d in spec.description.output],
            **facts,
            "kept_fp32": kept,
            "metadata": {"author": meta.author, "license": meta.license, "version": meta.versionString,
                         "short_description": meta.shortDescription,
                         "user_defined": sorted(k for k in meta.userDefined)},
            "files": {str(f.relative_to(path)): f.stat().st_size for f in self.files(path)},
        }


# ---------------------------------------------------------------------- inspect helpers

def _tensor_type(value_type):
    return value_type.tensorType if value_type.HasField("tensorType") else None


def program_facts(spec) -> dict:
    """Op histogram, maximum rank, ops per compute precision (an op's precision is its first output's
    float type; const and cast ops are counted apart)."""
    block = main_block(spec)
    if block is None:
        return {"ops": None, "max_rank": None, "precisions": None, "ops_fp16": None, "ops_fp32": None,
                "casts": None, "_fp32_names": set()}
    ops: Counter = Counter()
    per_precision: Counter = Counter()
    by_precision: dict[str, Counter] = {"fp16": Counter(), "fp32": Counter()}
    fp32_names: set[str] = set()
    max_rank = 0
    for op in all_ops(block):
        ops[op.type] += 1
        for o in op.outputs:
            t = _tensor_type(o.type)
            if t is not None:
                max_rank = max(max_rank, t.rank)
        if op.type in ("const", "cast") or not op.outputs:
            continue
        t = _tensor_type(op.outputs[0].type)
        p = DTYPES.get(t.dataType) if t is not None else None
        if p not in FLOAT:
            continue
        per_precision[p] += 1
        by_precision.setdefault(p, Counter())[op.type] += 1
        if p == "fp32":
            name = op.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in op.attributes else ""
            fp32_names.add(name)
    return {"ops": dict(sorted(ops.items())), "nodes": sum(ops.values()),
            "compute_ops": sum(per_precision.values()), "max_rank": max_rank,
            "precisions": dict(sorted(per_precision.items())),
            "ops_fp16": dict(sorted(by_precision["fp16"].items())),
            "ops_fp32": dict(sorted(by_precision["fp32"].items())),
            "casts": ops.get("cast", 0), "_fp32_names": fp32_names}


def _feature(desc) -> dict:
    t = desc.type
    kind = t.WhichOneof("Type")
    out = {"name": desc.name, "kind": kind}
    if kind == "multiArrayType":
        m = t.multiArrayType
        out["dtype"] = {65568: "fp32", 65552: "fp16", 65600: "fp64", 131104: "int32"}.get(m.dataType, str(m.dataType))
        out["shape"] = list(m.shape)
        if m.HasField("shapeRange"):
            out["shape_range"] = [[r.lowerBound, r.upperBound] for r in m.shapeRange.sizeRanges]
    elif kind == "imageType":
        im = t.imageType
        out.update({"width": im.width, "height": im.height,
                    "color_space": {10: "grayscale", 20: "RGB", 30: "BGR"}.get(im.colorSpace, str(im.colorSpace))})
    elif kind == "dictionaryType":
        out["key"] = t.dictionaryType.WhichOneof("KeyType")
    if desc.shortDescription:
        out["description"] = desc.shortDescription
    return out


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


__all__ = ["CoreMlTarget", "check_weights", "deployment_target", "program_facts", "read_spec", "spec_path"]
