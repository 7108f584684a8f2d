"""export(): weights -> deploy form -> a target's artifact (+ manifest) -> parity check.

An artifact only ever appears under its final name complete and, unless the check is skipped, verified:
it is written under a temporary name, and renamed when done. One that fails parity is kept for
inspection as ``<final name>.failed`` (with its sidecar), and an earlier good artifact is left alone.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import (publish, remove, remove_stale_temporaries, sidecar_path, temp_path, write_json,
                       write_json_atomic)
from .calibration import DEFAULT_SIZE as DEFAULT_CALIBRATION_SIZE
from .data import parse_size, photos
from .errors import ArtifactError, CheckpointError, ExportError, InputFileError, RewriteError, UsageError, one_line
from .manifest import artifact_name
from .numerics import rel_l2
from .source import SourceModel, base_manifest, load_source, resolve_size
from .targets import ExportOptions, Target, get_target

log = logging.getLogger(__name__)
REWRITE_MAX_REL_L2 = 1e-5


def rewrite_error(model: torch.nn.Module, deploy: torch.nn.Module, h: int, w: int) -> float:
    """Relative L2 between the deploy form and the reference on real photos: the rewrite's own error,
    reported apart from the backend's (a backbone's: its worst output's). It goes into the artifact, so it
    is measured on one thread (a float32 sum's order depends on the thread count) and kept to 3 significant
    digits: two exports of the same weights give the same bytes, whatever the machine's threads."""
    x = torch.from_numpy(photos(h, w, names=("chelsea", "astronaut"))[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref, dep = model(x), deploy(x)
    finally:
        torch.set_num_threads(threads)
    if isinstance(ref, torch.Tensor):
        err = rel_l2(dep, ref)
    else:
        err = max(rel_l2(d, r) for d, r in zip(dep, ref))
    return float(f"{err:.3g}")


HEADS = ("classifier", "none")


def check_head(head: str, out_indices, out_norm: bool) -> None:
    if head not in HEADS:
        raise UsageError(f"bad --head {head!r}: classifier (logits) or none (a backbone's feature maps)")
    if head != "none" and (out_indices is not None or out_norm):
        raise UsageError("--out-indices and --out-norm apply to backbones: add --head none")
    if head == "none":
        from .model.backbone import parse_out_indices
        parse_out_indices(out_indices)


def check_stride(h: int, w: int, stride: int = 32) -> None:
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise UsageError(f"input size {h}x{w} is not supported: each side must be a positive multiple of {stride}")


def parse_batch(batch: str | int | None) -> int | None:
    if batch is None or str(batch).lower() in ("dynamic", "dyn"):
        return None
    try:
        n = int(batch)
    except ValueError:
        raise UsageError(f"bad --batch {batch!r}: a positive integer or 'dynamic'") from None
    if n < 1:
        raise UsageError(f"bad --batch {batch!r}: a positive integer or 'dynamic'")
    return n


def check_output(output: str | Path | None, suffix: str) -> Path:
    """--output as given: a directory, or a path with the target's suffix (checked before any weights are read)."""
    out = Path(output) if output else Path("artifacts")
    if out.suffix and not out.is_dir() and not out.name.lower().endswith(suffix):
        raise UsageError(f"--output {out} must be a directory or a path ending in {suffix}")
    return out


def output_path(output: str | Path | None, name: str, suffix: str) -> Path:
    out = check_output(output, suffix)
    return out if out.name.lower().endswith(suffix) else out / name


def target_options_of(target: Target, given: dict | None) -> dict:
    """The target's own options, parsed, defaults filled. An option of another target is a usage error
    naming the targets that take it."""
    from .targets import option_owners

    mine = {o.name: o for o in target.options}
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for name in given:
        if name not in mine:
            owners = option_owners().get(name, (None, []))[1]
            flag = "--" + name.replace("_", "-")
            where = f"it belongs to {', '.join(owners)}" if owners else "no target takes it"
            raise UsageError(f"{flag} is not an option of the {target.key} target ({where})")
    return {name: opt.parse(given.get(name)) for name, opt in mine.items()}


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    parity: object | None = None
    after: object | None = None   # the target's after-publish step (TensorRT: trtexec line, engine, what is missing)

    @property
    def passed(self) -> bool:
        return self.parity is None or bool(self.parity.passed)

    def to_dict(self) -> dict:
        return {"artifact": str(self.path), "passed": self.passed, "manifest": self.manifest}


def export(weights: str | Path | None = None, target: str = "onnx", variant: str | None = None,
           img_size: str | int | None = None, batch: str | int | None = 1, precision: str = "fp32",
           output: str | Path | None = None, check: bool | None = None, num_classes: int | None = None,
           inputs: tuple[str, ...] | None = None, keep_fp32: tuple[str, ...] = (), default_keeps: bool = True,
           calibration: str | Path | None = None, calibration_size: int = DEFAULT_CALIBRATION_SIZE,
           target_options: dict | None = None, accuracy_set: str | Path | None = None,
           max_accuracy_drop: str | None = None, source: SourceModel | None = None, head: str = "classifier",
           out_indices: str | tuple[int, ...] | None = None, out_norm: bool = False) -> ExportResult:
    """Export weights to a target's artifact and (unless check=False) gate it on parity and accuracy.

    ``check``: None (the default) runs the parity gate where the target's runtime can run here, and
    otherwise records in the manifest why it was not run (Core ML on Linux); True insists (exit 3 where it
    cannot run); False skips it. ``source``: weights already loaded (``load_source``), so that several
    exports of one model read them once. ``head="none"``: a backbone artifact whose outputs are the
    feature maps of the stages in ``out_indices`` (features_0..3, NCHW), each after its LayerNorm from
    the checkpoint with ``out_norm``. Options are checked before any weights are read. The deploy form
    gates itself: a rewrite error above REWRITE_MAX_REL_L2 on real photos is an ExportError (exit 5)."""
    from .calibration import load_calibration
    from .deploy.precision import resolve_keeps

    tgt = get_target(target)
    n = parse_batch(batch)
    if img_size:  # the size is checked before any weights are read (every MixFormer's stride is 32)
        check_stride(*parse_size(img_size))
    check_head(head, out_indices, out_norm)
    options = ExportOptions(0, 0, n, precision, target_options=target_options_of(tgt, target_options))
    tgt.check(options)  # before any weights are read
    unjudged = tgt.unjudged_form(options)
    if unjudged and check:
        raise UsageError(f"--check: {unjudged}; check the plain form (export it without those options)")
    if precision == "fp32" and (keep_fp32 or not default_keeps):
        raise UsageError("--keep-fp32 / --no-default-keeps apply to reduced precisions, not fp32")
    if calibration is not None and precision not in tgt.calibrated:
        raise UsageError(f"--calibration applies to {', '.join(tgt.calibrated) or 'no precision'} of {tgt.key}, "
                         f"not {precision}")
    if calibration is not None and not Path(calibration).is_dir():
        raise InputFileError(f"calibration folder not found: {calibration}")
    check_output(output, tgt.suffix)
    if check is not False:
        from .parity import check_input_options
        check_input_options(inputs, accuracy_set, max_accuracy_drop)
    source = source or load_source(weights, variant, num_classes)
    h, w = resolve_size(source, img_size)
    options.height, options.width = h, w
    reference = source.model
    if head == "none":
        from .source import backbone_of
        reference = backbone_of(source, out_indices, out_norm)
    elif not source.has_classifier:
        raise CheckpointError(f"{source.weights.get('name')}: a backbone-only checkpoint (no classifier head): "
                              "export it with --head none")
    deploy = _to_deploy(reference, h, w)
    shipped = bool(source.weights.get("shipped"))
    if precision != "fp32":
        options.keeps = resolve_keeps(deploy, tuple(keep_fp32), default_keeps)
    if precision in tgt.calibrated:
        options.calibration = load_calibration(calibration, calibration_size, h, w, source.preprocessing, shipped)
    manifest = base_manifest(source, tgt.key, tgt.runtime, h, w, n, precision, tgt.versions)
    manifest["target_options"] = options.target_options
    manifest["head"] = head
    if head == "none":
        manifest["outputs"] = reference.outputs(h, w, n or "batch")
        manifest["out_indices"], manifest["out_norm"] = list(reference.out_indices), bool(out_norm)
    manifest["rewrite_error_rel_l2"] = err = rewrite_error(reference, deploy, h, w)
    if not err <= REWRITE_MAX_REL_L2:
        raise RewriteError(f"the deploy form differs from the reference by {err:.3g} relative L2 on photos "
                           f"(limit {REWRITE_MAX_REL_L2:g}): refusing to export")
    if precision != "fp32":
        manifest["precision_keeps"] = {"defaults": default_keeps, "patterns": list(keep_fp32),
                                       "modules": options.keeps}
    if options.calibration is not None:
        manifest["calibration"] = options.calibration.record
    if unjudged:
        check = False
        log.warning("parity not checked: %s", unjudged)
        manifest["parity"] = {"status": "not run", "reason": unjudged}
    if check is None:
        from .runtimes import runner_class
        status = runner_class(tgt.runtime).status()
        check = bool(status.get("can_run"))
        if not check:
            log.warning("parity not checked here: %s", status.get("note") or f"{tgt.runtime} cannot run here")
            manifest["parity"] = {"status": "not run", "reason": status.get("note")}
    name = artifact_name(source.model.cfg.name, h, w, n, precision, tgt.suffix, backbone=head == "none")
    final = output_path(output, name, tgt.suffix)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = temp_path(final)
    result = ExportResult(final, manifest)
    try:
        tgt.export(deploy, options, tmp, manifest)
        manifest["size_bytes"] = sum(f.stat().st_size for f in tgt.files(tmp))
        write_json(sidecar_path(tmp), manifest)  # a temporary already: its name carries the pid
        if check:
            from .parity import check_parity
            with _converter_rejects(tmp.name, final.name):
                result.parity = check_parity(tmp, weights_model=source, inputs=inputs, accuracy_set=accuracy_set,
                                             max_accuracy_drop=max_accuracy_drop, display_name=final.name)
            manifest["parity"] = result.parity.summary()
        if not result.passed:
            result.path = final = final.with_name(final.name + ".failed")
        publish(tmp, final)
        if result.parity is not None:
            result.parity.artifact = str(final)
    finally:
        remove(tmp)
        sidecar_path(tmp).unlink(missing_ok=True)
    write_json_atomic(sidecar_path(final), manifest)
    if result.passed:  # a stale failure of this name no longer describes what is there
        stale = final.with_name(final.name + ".failed")
        remove(stale)
        sidecar_path(stale).unlink(missing_ok=True)
    if result.passed and hasattr(tgt, "after_publish"):
        result.after = tgt.after_publish(final, options)
    return result


@contextmanager
def _converter_rejects(tmp_name: str, final_name: str):
    """A runtime that rejects what was just exported is the converter's failure (exit 5), not a bad input.
    The message names the artifact by its final name, never the temporary one."""
    try:
        yield
    except ArtifactError as e:
        raise ExportError(f"the freshly exported artifact was rejected: {str(e).replace(tmp_name, final_name)}") from e


def _to_deploy(model: torch.nn.Module, h: int, w: int):
    from .deploy import to_deploy
    try:
        return to_deploy(model, (h, w))
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError(f"deploy rewrite failed: {one_line(e, 200)}") from e
