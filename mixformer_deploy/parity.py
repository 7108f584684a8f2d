"""Parity: run an artifact and the PyTorch float32 reference on the same inputs and decide if they agree.

The pass rule (DESIGN), per output and per input: each input's max|a - r| <= atol + rtol * max|r| of that
same input, and that input's cosine(a, r) >= min_cosine; so one large logit elsewhere never widens a small
input's bound. Top-1 agreement is reported, and gated only on inputs whose reference top-1 margin exceeds
that input's bound (elsewhere a flip is within noise). On failure, the per-stage debug outputs
of both sides name the first stage that diverges, so a bad rewrite or conversion is found by stage.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from . import data
from .data import KEYWORD_INPUTS, RANDOM_COUNT, InputSet, fixed_batch, load_inputs, run_outputs, run_stages_batched
from .artifact import resolve_artifact
from .errors import ArtifactError, InputFileError, UsageError
from .numerics import rel_l2
from .backends import runner_class, runtime_for
from .backends.spec import FP32, INT8_PER_TENSOR, Tolerance

log = logging.getLogger(__name__)

SCHEMA = "mixformer-deploy/parity/1"
DEFAULT_INPUTS = ("photos", "random")
LOCALIZE_COUNT = 2       # inputs run through run_stages on failure (a fixed batch uses its own size)
STAGE_REL_L2_MIN = 1e-3  # good fp32 artifacts sit near 1e-6 per stage; a wrong weight is far above 1e-2
STAGE_REL_L2_MAX = 0.5
STAGE_REL_L2_FLOOR = 1e-5  # well above float32 noise between equivalent graphs (~1e-7 to 1e-6)


# ---------------------------------------------------------------- what the artifact is

def is_checkpoint(path: str | Path) -> bool:
    """A weights file used directly as an artifact (the torch runtime runs it; it has no target)."""
    from .checkpoints import SUFFIXES
    return Path(path).suffix.lower() in SUFFIXES


def checkpoint_manifest(path: str | Path) -> dict:
    """A manifest for a checkpoint, from its metadata (read the way export reads it), so that weights
    files and exported artifacts are handled alike (parity of the torch runtime, predict --weights)."""
    from .source import base_manifest, load_source
    from .shipped import DEFAULT_SIZE

    source = load_source(path)
    h, w = source.input_size or (DEFAULT_SIZE, DEFAULT_SIZE)
    return {**base_manifest(source, None, "torch", h, w, None, "fp32"), "stage_outputs": None}


def artifact_manifest(path: str | Path) -> dict:
    """The manifest of an exported artifact, or the one a checkpoint's metadata implies."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    if is_checkpoint(path):
        return checkpoint_manifest(path)
    from .artifact import read_manifest
    return read_manifest(path)


def default_tolerance(path: str | Path, precision: str) -> Tolerance:
    """The target's tolerance for this precision; a checkpoint (torch runtime, fp32) gets the defaults."""
    if is_checkpoint(path):
        return FP32
    from .artifact import target_of
    target = target_of(path)
    return target.tolerance(precision) if target else FP32


def manifest_summary(m: dict) -> dict:
    keys = ("target", "variant", "num_classes", "input_size", "batch", "precision", "weights", "seed")
    return {k: m.get(k) for k in keys}


# ---------------------------------------------------------------- the reference

@dataclass
class Reference:
    model: object
    source: str           # "weights" (given), "model" (in memory), "shipped", "seeded", "artifact" (itself)
    path: str | None
    sha256: str | None


def resolve_reference(artifact: Path, manifest: dict, weights: str | Path | None, warnings: list[str]) -> Reference:
    """Which float32 weights the artifact must reproduce: --weights, else what the manifest says it was
    exported from (the shipped weights, or a seeded random model), else a checkpoint artifact's own."""
    from .checkpoints import load_checkpoint
    from .shipped import DEFAULT_WEIGHTS, is_shipped

    mw = manifest.get("weights") or {}
    sha, seed = mw.get("sha256"), manifest.get("seed")
    norms = None
    if weights is not None:
        ck = load_checkpoint(weights)
        norms = ck.out_norms
        if sha and sha != ck.sha256:
            _warn(warnings, f"{Path(weights).name} is not the weights the artifact was exported from "
                            f"(sha256 {ck.sha256[:12]} vs {sha[:12]})")
        elif not sha and seed is not None:
            _warn(warnings, f"the artifact was exported from seeded random weights (seed {seed}), "
                            f"not from {Path(weights).name}")
        ref = Reference(ck.model, "weights", str(weights), ck.sha256)
    elif sha and is_shipped(sha):
        ref = Reference(load_checkpoint(DEFAULT_WEIGHTS).model, "shipped", str(DEFAULT_WEIGHTS), sha)
    elif not sha and seed is not None:
        ref = Reference(_seeded_model(manifest, int(seed)), "seeded", None, None)
    elif is_checkpoint(artifact):
        ck = load_checkpoint(artifact)
        ref = Reference(ck.model, "artifact", str(artifact), ck.sha256)
    else:
        raise UsageError(f"{artifact.name} was exported from {mw.get('name') or 'weights'} (sha256 {str(sha)[:12]}), "
                         "not the shipped weights: pass them with --weights")
    check_fit(manifest, ref.model.cfg)
    ref.model = reference_function(ref.model, manifest, norms, Path(ref.path).name if ref.path else "the weights")
    return ref


def given_reference(source, manifest: dict) -> Reference:
    """A reference model handed over in memory (export's check of the artifact it just wrote)."""
    model = getattr(source, "model", source)
    info = getattr(source, "weights", None) or {}
    check_fit(manifest, model.cfg)
    model = reference_function(model, manifest, getattr(source, "out_norms", None), info.get("name") or "the weights")
    return Reference(model, "model", info.get("name"), info.get("sha256"))


def reference_function(model, manifest: dict, out_norms: dict | None, name: str):
    """What the artifact computes, in PyTorch: the classifier itself, or (a backbone artifact, head
    "none") its feature maps, with the checkpoint's per-output LayerNorms when it was exported with them."""
    if manifest.get("head") != "none":
        return model
    from .model.backbone import backbone
    return backbone(model, manifest.get("out_indices"), bool(manifest.get("out_norm")), out_norms, name)


def output_names(manifest: dict) -> list[str]:
    """The artifact's outputs: ["logits"], or a backbone's feature maps."""
    return [o["name"] for o in manifest.get("outputs") or []] or ["logits"]


def _seeded_model(manifest: dict, seed: int):
    from .model import create_model
    cfg = {k: v for k, v in (manifest.get("config") or {}).items() if k != "name"}
    if not cfg:
        raise ArtifactError("the manifest records a seed but no model config to rebuild the weights from")
    return create_model("custom", seed=seed, **cfg)


def check_fit(manifest: dict, cfg) -> None:
    """Weights that do not fit the artifact's architecture make parity meaningless: refuse (exit 4)."""
    from .model import MixFormerConfig

    classes = manifest.get("num_classes")
    if classes is not None and int(classes) != cfg.num_classes:
        raise ArtifactError(f"artifact has {classes} classes, weights have {cfg.num_classes}")
    if not manifest.get("config"):
        return
    mine = MixFormerConfig.from_dict(manifest["config"]).to_dict()
    theirs = cfg.to_dict()
    diff = [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if k != "name" and mine[k] != theirs[k]]
    if diff:
        raise ArtifactError(f"artifact's architecture differs from the weights': {'; '.join(diff)}")


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


# ---------------------------------------------------------------- inputs

def check_input_options(inputs: Sequence[str] | None, accuracy_set: str | Path | None,
                        max_accuracy_drop: str | None) -> None:
    """The input options checked without reading anything, so that export fails on a typo before the
    weights are read and the conversion runs, not after."""
    for spec in inputs or ():
        if spec not in KEYWORD_INPUTS and not Path(spec).is_dir():
            raise InputFileError(f"inputs {spec!r}: neither {', '.join(KEYWORD_INPUTS)} nor an image folder")
    if accuracy_set is not None and not Path(accuracy_set).is_dir():
        raise InputFileError(f"accuracy set not found: {accuracy_set} (a folder with one sub-folder per class)")
    if max_accuracy_drop is not None:
        allowed_extra("fp32", 1, True, max_accuracy_drop)


# ---------------------------------------------------------------- metrics

@dataclass
class OutputMetrics:
    """How one output (the logits) of the artifact compares with the reference over a set of inputs.
    The pass rule holds per input: each input's bound is atol + rtol * max|r| of that input, so one
    large logit elsewhere never widens the bound for a small one."""

    count: int
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    min_sample_cosine: float       # the worst input's cosine (the rule's cosine)
    top1_agreement: float
    top5_agreement: float          # inputs whose top-5 classes are the same set
    top1_disagreements: int
    gated: int                     # inputs whose reference top-1 margin exceeds their bound
    gated_disagreements: int
    nonfinite: int                 # NaN/Inf values in the artifact's output
    worst_input: int               # index of the input closest to (or furthest past) its bound
    max_ref_abs: float             # max|r| of the worst input (the scale rtol multiplies there)
    bound: float                   # the worst input's bound: atol + rtol * max_ref_abs
    worst_abs: float               # the worst input's max|a-r|
    smallest_atol: float           # the smallest atol that would have passed at this rtol
    smallest_rtol: float           # the smallest rtol that would have passed at this atol
    implied_rtol: float            # max over inputs of max|a-r| / max|r| (the rtol the error implies at atol 0)
    largest_min_cosine: float      # the largest min-cosine that would have passed
    max_abs_ok: bool
    cosine_ok: bool
    top1_ok: bool
    accuracy_artifact: float | None = None
    accuracy_reference: float | None = None
    worst_input_name: str | None = None

    @property
    def passed(self) -> bool:
        return self.max_abs_ok and self.cosine_ok and self.top1_ok

    def failures(self, tol: Tolerance) -> list[str]:
        """One readable reason per broken part of the pass rule, with the numbers."""
        out = []
        where = f" on {self.worst_input_name}" if self.worst_input_name else f" on input {self.worst_input}"
        if self.nonfinite:
            out.append(f"{self.nonfinite} non-finite value(s) in the artifact's logits")
        if not self.max_abs_ok:
            out.append(f"max|a-r| {_g(self.worst_abs)} > {_g(self.bound)} (atol {tol.atol:g} + rtol {tol.rtol:g} "
                       f"x max|r| {_g(self.max_ref_abs)}){where}")
        if not self.cosine_ok:
            out.append(f"cosine {self.min_sample_cosine:.8f} < {tol.min_cosine:g} (worst input)")
        if not self.top1_ok:
            out.append(f"top-1 differs on {self.gated_disagreements} of {self.gated} inputs whose reference "
                       f"margin exceeds their bound")
        return out

    def to_dict(self) -> dict:
        return {**_clean(asdict(self)), "passed": self.passed}


def _g(v: float) -> str:
    return f"{v:.3g}"


def _clean(d: dict) -> dict:
    """Non-finite floats become null so that the report is strict JSON."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def _cosine(a: np.ndarray, r: np.ndarray) -> float:
    na, nr = np.linalg.norm(a), np.linalg.norm(r)
    if na == 0 or nr == 0:
        return 1.0 if na == nr else 0.0
    return float(np.dot(a, r) / (na * nr))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-x, axis=1, kind="stable")[:, :k], axis=1)


def compare_outputs(a: np.ndarray, r: np.ndarray, tol: Tolerance, labels: np.ndarray | None = None,
                    ids: Sequence[str] | None = None) -> OutputMetrics:
    """Metrics of artifact logits ``a`` against reference ``r`` (N x classes), the rule applied per input."""
    a64, r64 = a.astype(np.float64).reshape(len(a), -1), r.astype(np.float64).reshape(len(r), -1)
    diff = np.abs(a64 - r64)
    per_diff = np.nan_to_num(diff.max(1), nan=np.inf)
    scale = np.abs(r64).max(1)
    bounds = tol.atol + tol.rtol * scale
    cosines = np.array([_cosine(x, y) if np.isfinite(x).all() else -1.0 for x, y in zip(a64, r64)])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bounds > 0, per_diff / np.where(bounds > 0, bounds, 1), np.where(per_diff > 0, np.inf, 0))
        implied = np.where(scale > 0, per_diff / np.where(scale > 0, scale, 1), np.where(per_diff > 0, np.inf, 0))
    worst = int(np.argmax(ratio))
    n, classes = r64.shape
    k = min(5, classes)
    agree = a64.argmax(1) == r64.argmax(1)
    top2 = np.sort(r64, axis=1)[:, -2:] if classes > 1 else np.full((n, 2), [-np.inf, 0.0])
    gated = ((top2[:, 1] - top2[:, 0]) > bounds) & tol.gate_top1
    m = OutputMetrics(
        count=n, max_abs=float(per_diff.max()), mean_abs=float(diff.mean()), rel_l2=rel_l2(a64, r64),
        cosine=_cosine(a64.ravel(), r64.ravel()), min_sample_cosine=float(cosines.min()),
        top1_agreement=float(agree.mean()), top5_agreement=float((_topk(a64, k) == _topk(r64, k)).all(1).mean()),
        top1_disagreements=int((~agree).sum()), gated=int(gated.sum()),
        gated_disagreements=int((gated & ~agree).sum()), nonfinite=int((~np.isfinite(a64)).sum()),
        worst_input=worst, max_ref_abs=float(scale[worst]), bound=float(bounds[worst]),
        worst_abs=float(per_diff[worst]),
        smallest_atol=float(max(0.0, (per_diff - tol.rtol * scale).max())),
        smallest_rtol=float(max(0.0, ((per_diff - tol.atol) / np.where(scale > 0, scale, np.inf)).max())),
        implied_rtol=float(implied.max()), largest_min_cosine=float(cosines.min()),
        max_abs_ok=bool((per_diff <= bounds).all()), cosine_ok=bool(cosines.min() >= tol.min_cosine),
        top1_ok=bool(not (gated & ~agree).any()),
        worst_input_name=str(ids[worst]) if ids is not None else None)
    if labels is not None:
        m.accuracy_artifact = float((a64.argmax(1) == labels).mean())
        m.accuracy_reference = float((r64.argmax(1) == labels).mean())
    return m


# ---------------------------------------------------------------- localization

@dataclass
class StageError:
    name: str
    shape: list[int]
    max_abs: float
    rel_l2: float
    cosine: float
    diverged: bool

    def to_dict(self) -> dict:
        return _clean(asdict(self))


def stage_tolerance(tol: Tolerance, scale: float) -> float:
    """Relative L2 a stage may reach before it counts as diverged: 10x the pass rule's relative scale,
    clamped so fp32 noise (~1e-6) never trips it and a wrong weight (>1e-2) always does."""
    relative = tol.rtol + (tol.atol / scale if scale > 0 else 0.0)
    return float(min(STAGE_REL_L2_MAX, max(STAGE_REL_L2_MIN, 10 * relative)))


def compare_stages(artifact: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                   threshold: float) -> list[StageError]:
    """Each stage both sides expose, in the reference's order (stem, stage0..N, features, logits)."""
    out = []
    for name, r in reference.items():
        if name not in artifact:
            continue
        a = artifact[name]
        if a.shape != r.shape:
            out.append(StageError(name, list(a.shape), float("inf"), float("inf"), 0.0, True))
            continue
        a64, r64 = a.astype(np.float64).ravel(), r.astype(np.float64).ravel()
        rel = rel_l2(a64, r64)
        rel = rel if np.isfinite(rel) else float("inf")
        out.append(StageError(name, list(r.shape), float(np.abs(a64 - r64).max()), rel, _cosine(a64, r64),
                              bool(rel > threshold)))
    return out


# ---------------------------------------------------------------- the accuracy gate

# Extra misclassifications an artifact may make beyond the reference's, in images: on the 360 held-out
# digits, and as a fraction of a --accuracy-set folder (at least 1 image where any drop is allowed).
ALLOWED_EXTRA_HELDOUT = {"fp32": 0, "fp16": 1, "bf16": 1, "int8": 3}
ALLOWED_EXTRA_FRACTION = {"fp32": 0.0, "fp16": 0.003, "bf16": 0.003, "int8": 0.01}


@dataclass
class AccuracyGate:
    set: str
    count: int
    reference_errors: int
    artifact_errors: int
    allowed_extra: int
    rule: str

    @property
    def extra(self) -> int:
        return self.artifact_errors - self.reference_errors

    @property
    def passed(self) -> bool:
        return self.extra <= self.allowed_extra

    def to_dict(self) -> dict:
        return {**asdict(self), "extra": self.extra, "passed": self.passed}


def allowed_extra(precision: str, count: int, heldout: bool, override: str | None = None) -> tuple[int, str]:
    """(images, rule text). ``override``: 'N' images or 'P%' of the set (--max-accuracy-drop)."""
    if override is not None:
        text = str(override).strip()
        try:
            if text.endswith("%"):
                return int(np.ceil(float(text[:-1]) / 100 * count - 1e-9)), f"--max-accuracy-drop {text}"
            n = int(text)
        except ValueError:
            raise UsageError(f"bad --max-accuracy-drop {override!r}: N images or P%") from None
        if n < 0:
            raise UsageError(f"bad --max-accuracy-drop {override!r}: N images or P%")
        return n, f"--max-accuracy-drop {text}"
    base = precision if precision in ALLOWED_EXTRA_HELDOUT else "int8" if "int" in precision else "fp16"
    if heldout:
        return ALLOWED_EXTRA_HELDOUT[base], f"{base}: at most {ALLOWED_EXTRA_HELDOUT[base]} more of the held-out digits"
    frac = ALLOWED_EXTRA_FRACTION[base]
    n = max(1, int(np.ceil(frac * count - 1e-9))) if frac > 0 else 0
    return n, f"{base}: at most {100 * frac:g}% more of the set (at least 1 image)" if frac else f"{base}: no drop"


def accuracy_gate(name: str, a: np.ndarray, r: np.ndarray, labels: np.ndarray, precision: str, heldout: bool,
                  override: str | None) -> AccuracyGate:
    allowed, rule = allowed_extra(precision, len(labels), heldout, override)
    return AccuracyGate(name, len(labels), int((r.argmax(1) != labels).sum()), int((a.argmax(1) != labels).sum()),
                        allowed, rule)


# ---------------------------------------------------------------- the report

@dataclass
class ParityReport:
    artifact: str
    manifest: dict
    runtime: dict                   # the artifact runner's describe()
    reference: dict                 # where the reference weights came from
    tolerance: dict
    inputs: list[dict]              # name and count of each input set
    sets: dict[str, OutputMetrics]
    overall: OutputMetrics
    passed: bool
    failures: list[str] = field(default_factory=list)
    stages: list[StageError] | None = None
    stage_tolerance: float | None = None
    first_failing_stage: str | None = None
    accuracy: list[AccuracyGate] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    created: str = ""
    seconds: float = 0.0            # wall time of the whole check
    outputs: dict[str, OutputMetrics] | None = None   # a backbone's: each feature map over all inputs

    def summary(self) -> dict:
        """The few numbers an artifact's manifest records about its check."""
        return _clean(_summary(self))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "artifact": self.artifact, "passed": self.passed, "failures": self.failures,
            "first_failing_stage": self.first_failing_stage, "manifest": self.manifest, "runtime": self.runtime,
            "reference": self.reference, "tolerance": self.tolerance, "inputs": self.inputs,
            "sets": {k: v.to_dict() for k, v in self.sets.items()}, "overall": self.overall.to_dict(),
            "stage_tolerance": self.stage_tolerance, "accuracy_gate": [g.to_dict() for g in self.accuracy],
            "stages": None if self.stages is None else [s.to_dict() for s in self.stages],
            "warnings": self.warnings, "versions": self.versions, "created": self.created,
            "seconds": self.seconds,
            "outputs": None if self.outputs is None else {k: v.to_dict() for k, v in self.outputs.items()},
        }


def _summary(report: "ParityReport") -> dict:
    o = report.overall
    accuracy = {name: {"artifact": m.accuracy_artifact, "reference": m.accuracy_reference}
                for name, m in report.sets.items() if m.accuracy_reference is not None}
    return {"passed": report.passed, "inputs": report.inputs, "tolerance": report.tolerance,
            **{k: getattr(o, k) for k in ("max_abs", "mean_abs", "rel_l2", "cosine", "min_sample_cosine",
                                          "top1_agreement", "top5_agreement", "implied_rtol")},
            "accuracy": accuracy or None, "accuracy_gate": [g.to_dict() for g in report.accuracy] or None, "first_failing_stage": report.first_failing_stage,
            "runtime": report.runtime, "reference": report.reference.get("source"), "created": report.created,
            **({"outputs": {k: {"max_abs": m.max_abs, "rel_l2": m.rel_l2, "min_sample_cosine": m.min_sample_cosine,
                                "passed": m.passed} for k, m in report.outputs.items()}} if report.outputs else {})}


# The last reference's input sets and outputs, keyed by the reference model object (held, so never a reused
# id) and everything that decides them: one entry, so memory stays bounded.
_LAST_REFERENCE: dict = {}


def check_parity(artifact: str | Path, weights: str | Path | None = None, inputs: Sequence[str] | None = None,
                 atol: float | None = None, rtol: float | None = None, min_cosine: float | None = None,
                 runtime: str = "auto", device: str = "cpu", threads: int | None = None, batch_size: int = 16,
                 random_count: int = RANDOM_COUNT, weights_model=None, runtime_options: dict | None = None,
                 accuracy_set: str | Path | None = None, max_accuracy_drop: str | None = None,
                 display_name: str | None = None) -> ParityReport:
    """Compare ``artifact`` with PyTorch eager float32 of its reference weights.

    ``weights``: a weights file; ``weights_model``: an already loaded reference instead (a MixFormer, or
    export's source with ``.model`` and a ``.weights`` info dict), so that export does not load it twice.
    ``inputs``: any of photos, random, dataset, or image folders; the default is photos + random, plus
    the held-out digits when the reference is the shipped weights. Tolerances default to the target's for
    the artifact's precision. The accuracy gate runs on every labelled set (the held-out digits, an
    ``accuracy_set`` folder with one sub-folder per class): at most a few more misclassified images than
    the reference, by precision (see ALLOWED_EXTRA_*). Raises ArtifactError when the artifact is bad or does not fit the weights;
    a failed comparison is not an error here: read ``report.passed``.
    """
    start = time.perf_counter()
    artifact = resolve_artifact(artifact)
    manifest = artifact_manifest(artifact)
    runtime, runtime_options = _usable_runtime(artifact, runtime, runtime_options)
    warnings: list[str] = []
    runner, reference = _open_artifact(artifact, runtime, device, threads, runtime_options), None
    try:
        ref = (given_reference(weights_model, manifest) if weights_model is not None
               else resolve_reference(artifact, manifest, weights, warnings))
        sets, cached, cache_key = _input_sets(ref, manifest, inputs, random_count, accuracy_set, warnings)
        reference = runner_class("torch")(ref.model)  # PyTorch eager float32 of the reference, on the CPU
        precision = getattr(runner, "precision", None) or manifest.get("precision") or "fp32"
        names, batch = output_names(manifest), fixed_batch(manifest)
        tol = _judging_tolerance(artifact, manifest, precision, len(names) > 1, atol, rtol, min_cosine)
        log.info("parity of %s (%s) against %s on %s", display_name or artifact.name, runner.key, ref.path or "seeded weights",
                 ", ".join(f"{s.name} ({len(s.x)})" for s in sets))
        ref_outs = _reference_outputs(reference, sets, cached, cache_key, batch_size)
        outs = _artifact_outputs(runner, artifact, sets, names, ref_outs, batch, batch_size)
        result = (_compare_classifier(outs, sets, tol, precision, max_accuracy_drop) if len(names) == 1
                  else _compare_backbone(outs, sets, names, tol))
        report = _build_report(artifact, manifest, ref, runner, reference, tol, sets, result, warnings)
        if not result.overall.passed:
            _localize(report, runner, reference, sets, result.all_a, result.all_r, batch, tol)
    finally:
        runner.close()
        if reference is not None:
            reference.close()
    report.seconds = round(time.perf_counter() - start, 3)
    log.info("parity %s: max|a-r| %s, cosine %.8f", "passed" if report.passed else "FAILED",
             _g(result.overall.max_abs), result.overall.cosine)
    return report


def _usable_runtime(artifact: Path, runtime: str, options: dict | None) -> tuple[str, dict]:
    """(the runtime's key, its options checked), the runtime able to run here (Core ML on Linux is not),
    before any weights are read: a typo or a missing runtime is then the only error, and a quick one."""
    from .artifact import target_of
    from .errors import MissingBackendError

    spec = target_of(artifact)
    if spec is not None:
        spec.verify(artifact)  # a broken artifact is exit 4 even where its runtime cannot run (Core ML on Linux)
    if runtime in (None, "auto"):  # the artifact's own runtime (its manifest was just read: not again)
        runtime = spec.runtime_for(artifact) if spec is not None else runtime_for(artifact)
    runner_cls = runner_class(runtime)
    options = runner_cls.check_options(options)
    status = runner_cls.status()
    if not status.get("can_run", True):
        raise MissingBackendError(status.get("reason") or status.get("note") or f"the {runner_cls.key} runtime cannot run here")
    return runtime, options


def _input_sets(ref: Reference, manifest: dict, inputs: Sequence[str] | None, random_count: int,
                accuracy_set: str | Path | None, warnings: list[str]) -> tuple[list[InputSet], dict, tuple]:
    """(sets, the reference outputs already known for them, the cache key). Several artifacts of one model
    in a row (export --target all) read the inputs and run the reference once: the last ones are kept."""
    from .shipped import is_shipped

    height, width = (int(v) for v in manifest["input_size"])
    prep = data.Preprocessing.from_dict(manifest.get("preprocessing"))
    shipped = is_shipped(ref.sha256)
    if inputs is None:
        inputs = DEFAULT_INPUTS + (("dataset",) if shipped else ())
    elif "dataset" in inputs and not shipped:
        _warn(warnings, "the held-out digits are the shipped weights' data set: accuracy on them means "
                        "little for other weights")
    key = (tuple(inputs), random_count, height, width, json.dumps(prep.to_dict(), sort_keys=True),
           str(accuracy_set), manifest.get("head"), str(manifest.get("out_indices")), manifest.get("out_norm"))
    cache_key = (getattr(ref.model, "model", ref.model), key)  # a backbone wraps the weights' model
    cached = _LAST_REFERENCE.get("entry")
    if cached is not None and cached[0] is cache_key[0] and cached[1] == key:
        return cached[2], cached[3], cache_key
    sets = load_inputs(inputs, height, width, prep, random_count)
    if accuracy_set is not None:
        x, ids, y = data.labelled_folder(accuracy_set, manifest.get("labels"),
                                         int(manifest.get("num_classes") or 0), height, width, prep)
        sets.append(InputSet(f"accuracy-set {Path(accuracy_set).name}", x, ids, y))
    return sets, {}, cache_key


def _open_artifact(artifact: Path, runtime: str, device: str, threads: int | None, options: dict):
    """The artifact on the runtime and device asked for, opened before any weights are read: a bad
    artifact is then the only error line."""
    from .backends import open_runner

    return open_runner(artifact, runtime, device, threads=threads, options=options)


def _judging_tolerance(artifact: Path, manifest: dict, precision: str, backbone: bool, atol, rtol,
                       min_cosine) -> Tolerance:
    """The target's tolerance for the precision the runner executes (a runtime option may change it, e.g.
    OpenVINO bf16), given values replacing its own. A backbone's int8 feature maps take the per-tensor one
    (out-of-distribution noise drifts most there), and feature maps have no classes to gate top-1 on."""
    if backbone and precision == "int8":
        tol = _tolerance(artifact, manifest, atol, rtol, min_cosine, base=INT8_PER_TENSOR)
    else:
        tol = _tolerance(artifact, {**manifest, "precision": precision}, atol, rtol, min_cosine)
    return replace(tol, gate_top1=False) if backbone else tol


def _tolerance(artifact: Path, manifest: dict, atol, rtol, min_cosine, base: Tolerance | None = None) -> Tolerance:
    base = base or default_tolerance(artifact, manifest.get("precision") or "fp32")
    return Tolerance(atol=base.atol if atol is None else float(atol),
                     rtol=base.rtol if rtol is None else float(rtol),
                     min_cosine=base.min_cosine if min_cosine is None else float(min_cosine),
                     gate_top1=base.gate_top1)


def _reference_outputs(reference, sets: list[InputSet], known: dict, cache_key: tuple,
                       batch_size: int) -> dict[str, list[np.ndarray]]:
    """Each set's reference outputs, run only where not already known, then kept as the last reference's
    (the artifact may still fail: its inputs and reference are no less valid for the next one)."""
    for s in sets:
        if s.name not in known:
            known[s.name] = run_outputs(reference, s.x, None, batch_size)
    _LAST_REFERENCE["entry"] = (*cache_key, sets, known)
    return known


def _artifact_outputs(runner, artifact: Path, sets: list[InputSet], names: list[str], ref_outs: dict,
                      batch: int | None, batch_size: int) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Each set's artifact outputs, paired with the reference's. An artifact whose outputs are not the ones
    its manifest names cannot be compared output by output: a bad artifact (exit 4), not a failed check."""
    outs = {s.name: (run_outputs(runner, s.x, batch, batch_size), ref_outs[s.name]) for s in sets}
    if any(len(a) != len(names) for a, _ in outs.values()):
        raise ArtifactError(f"{artifact.name}: {len(next(iter(outs.values()))[0])} output(s), its manifest names "
                            f"{len(names)} ({', '.join(names)})")
    return outs


@dataclass
class _Comparison:
    overall: OutputMetrics                     # what passes or fails the rule (a backbone: its worst map)
    sets: dict[str, OutputMetrics]
    outputs: dict[str, OutputMetrics] | None   # a backbone's: each feature map over all inputs
    failures: list[str]
    gates: list[AccuracyGate]
    all_a: np.ndarray                          # every input's outputs, one row per input: what localizing ranks
    all_r: np.ndarray

    @property
    def passed(self) -> bool:
        return (self.overall.passed and all(m.passed for m in (self.outputs or {}).values())
                and all(g.passed for g in self.gates))


def _all_ids(sets: list[InputSet]) -> list[str]:
    return [f"{s.name}/{i}" for s in sets for i in s.ids]


def _compare_classifier(outs: dict, sets: list[InputSet], tol: Tolerance, precision: str,
                        max_accuracy_drop: str | None) -> _Comparison:
    """The logits of every input judged together (the rule holds per input, so one verdict covers all
    sets), reported per set, and the accuracy gate on each labelled set."""
    outs = {k: (a[0], r[0]) for k, (a, r) in outs.items()}
    all_a = np.concatenate([a for a, _ in outs.values()])
    all_r = np.concatenate([r for _, r in outs.values()])
    overall = compare_outputs(all_a, all_r, tol, ids=_all_ids(sets))
    per_set = {s.name: compare_outputs(*outs[s.name], tol, s.labels, s.ids) for s in sets}
    gates = [accuracy_gate(s.name, *outs[s.name], s.labels, precision, s.name == "dataset", max_accuracy_drop)
             for s in sets if s.labels is not None]
    return _Comparison(overall, per_set, None, overall.failures(tol), gates, all_a, all_r)


def _compare_backbone(outs: dict, sets: list[InputSet], names: list[str], tol: Tolerance) -> _Comparison:
    """Every feature map judged on its own by the rule (maps differ in scale: pooled, a large one would hide
    a small one's error); the worst map stands for the whole. No top-1, no accuracy: maps have no classes."""
    all_ids = _all_ids(sets)
    per_output, per_set, failures = {}, {}, []
    for k, name in enumerate(names):
        a = np.concatenate([a[k] for a, _ in outs.values()])
        r = np.concatenate([r[k] for _, r in outs.values()])
        per_output[name] = compare_outputs(a, r, tol, ids=all_ids)
        failures += [f"{name}: {f}" for f in per_output[name].failures(tol)]
        for s in sets:
            per_set[f"{s.name} {name}"] = compare_outputs(outs[s.name][0][k], outs[s.name][1][k], tol, ids=s.ids)
    overall = max(per_output.values(), key=lambda m: (not m.passed, m.worst_abs / m.bound if m.bound else 0))
    count = sum(len(s.x) for s in sets)
    all_a, all_r = (np.concatenate([np.concatenate([o[k] for o in side]).reshape(count, -1)
                                    for k in range(len(names))], axis=1)
                    for side in ([a for a, _ in outs.values()], [r for _, r in outs.values()]))
    return _Comparison(overall, per_set, per_output, failures, [], all_a, all_r)


def _failure_lines(result: _Comparison) -> list[str]:
    """The broken parts of the pass rule, then each failed accuracy gate, with the numbers: the report's
    first line is the CLI's error message."""
    return result.failures + [
        f"accuracy on {g.set}: {g.artifact_errors} of {g.count} misclassified vs {g.reference_errors} by the "
        f"reference ({g.extra:+d}; {g.rule})" for g in result.gates if not g.passed]


def _build_report(artifact: Path, manifest: dict, ref: Reference, runner, reference, tol: Tolerance,
                  sets: list[InputSet], result: _Comparison, warnings: list[str]) -> ParityReport:
    """Everything needed to judge the result later without rerunning it: what ran where, against which
    weights, under which tolerance, on which inputs, and the tool versions."""
    from .manifest import now_iso, tool_versions

    return ParityReport(
        artifact=str(artifact), manifest=manifest_summary(manifest), runtime=runner.describe(),
        reference={"source": ref.source, "path": ref.path, "sha256": ref.sha256, **reference.describe()},
        tolerance=asdict(tol), inputs=[{"name": s.name, "count": len(s.x)} for s in sets],
        sets=result.sets, overall=result.overall, outputs=result.outputs, passed=result.passed,
        failures=_failure_lines(result), accuracy=result.gates,
        warnings=warnings, versions=tool_versions(), created=now_iso())


def _localize(report: ParityReport, runner, reference, sets: list[InputSet], all_a: np.ndarray,
              all_r: np.ndarray, batch: int | None, tol: Tolerance) -> None:
    """Run the worst inputs stage by stage on both sides and name the first stage that diverges."""
    x = np.concatenate([s.x for s in sets])
    err = np.nan_to_num(np.abs(all_a - all_r).reshape(len(x), -1).max(1), nan=np.inf)
    worst = x[np.argsort(-err, kind="stable")[:batch or LOCALIZE_COUNT]]
    try:
        exposed = run_stages_batched(runner, worst, batch)
    except ArtifactError as e:
        _warn(report.warnings, f"cannot run the artifact's per-stage outputs: {e}")
        exposed = {}
    stages = compare_stages(exposed, run_stages_batched(reference, worst, None), float("inf"))
    # A stage diverges above the rule's scale, or, for an artifact that fails only narrowly, where at least
    # a tenth of the final error has already appeared (stages before a wrong weight stay at float noise).
    final = stages[-1].rel_l2 if stages else 0.0
    threshold = min(stage_tolerance(tol, report.overall.max_ref_abs), max(STAGE_REL_L2_FLOOR, final / 10))
    for st in stages:
        st.diverged = bool(st.rel_l2 > threshold)
    report.stages, report.stage_tolerance = stages, threshold
    report.first_failing_stage = next((s.name for s in stages if s.diverged), None)
    if len(stages) <= 1:
        _warn(report.warnings, "the artifact exposes no per-stage outputs: cannot localize the divergence")
    elif report.first_failing_stage:
        s = next(s for s in stages if s.diverged)
        log.info("first diverging stage: %s (relative L2 %s > %s)", s.name, _g(s.rel_l2), _g(threshold))
    else:
        log.info("no stage's relative L2 exceeds %s: the error accumulates gradually", _g(threshold))
