"""One command for a Mac: export B0/B1 to Core ML, gate parity on each compute unit, benchmark them.

    benchmarks/mac_check.sh DIR [--variants B0,B1] [--size 224] [--budget-s 1200] [--quick]

Needs macOS (the Core ML framework) and this repository installed with the coreml extra
(`pip install -e ".[coreml]"`; the script also works from the checkout via PYTHONPATH). Per variant:
1. export fp32 and fp16 ML programs (seeded random weights at --size; the shipped B0 digits weights too);
2. parity against PyTorch eager float32 on each compute unit (cpu_only, cpu_and_gpu, cpu_and_ne) with the
   target's tolerances; the Neural Engine computes in float16 whatever the model's precision, so an fp32
   program on cpu_and_ne is gated with the fp16 tolerance (recorded as such);
3. the app-facing form (image input + classifier, fp16) of B0: photos given as images must give the
   same top-1 as PyTorch on the same 8-bit pixels, and probabilities within 2e-2;
4. an interleaved benchmark of every (precision, compute unit) at batch 1;
5. `debug` of the shipped fp16 program on each compute unit (the per-block curve; informative, not gated).
Writes into DIR: mac_check.json (everything), mac_check.log, bench-<machine>.json (schema
mixformer-deploy/bench/1, which `mixformer-deploy report` merges), bench-<machine>.md, and artifacts/.
Exit status: 0 all passed; 1 a gate failed or a step errored; 3 not macOS or coremltools missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("mac_check")
SCHEMA = "mixformer-deploy/mac-check/1"
UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne")
PRECISIONS = ("fp32", "fp16")


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, needed_s: float) -> bool:
        return self.elapsed + needed_s <= self.seconds


def setup_logging(out: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.FileHandler(out / "mac_check.log", mode="w"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def preflight() -> str | None:
    """Why this machine cannot run the check (None when it can)."""
    if sys.platform != "darwin":
        return (f"Core ML prediction needs macOS (this is {platform.system()}): run benchmarks/mac_check.sh "
                "on a Mac")
    try:
        from mixformer_deploy.backends.coreml.spec import coremltools
        coremltools()
    except Exception as e:  # noqa: BLE001 - MissingBackendError names the extra
        return str(e)
    return None


def export_all(variant: str | None, size: tuple[int, int], out: Path) -> dict[str, Path]:
    """fp32, fp16 and (B0) the app-facing fp16 form; variant None = the shipped weights."""
    from mixformer_deploy.export_api import export

    img = f"{size[0]}x{size[1]}" if variant else None
    paths = {}
    for precision in PRECISIONS:
        t0 = time.perf_counter()
        r = export(variant=variant, img_size=img, precision=precision, target="coreml", output=out, check=False)
        paths[precision] = r.path
        log.info("exported %s in %.1f s", r.path.name, time.perf_counter() - t0)
    if variant in ("B0", None):
        app_dir = out / f"app-{variant or 'shipped'}"
        r = export(variant=variant, img_size=img, precision="fp16", target="coreml", output=app_dir, check=False,
                   target_options={"image_input": True, "classifier": True})
        paths["app"] = r.path
    return paths


def parity_rows(paths: dict[str, Path], weights: str | None) -> list[dict]:
    from mixformer_deploy.parity import check_parity
    from mixformer_deploy.backends import get_spec

    rows = []
    target = get_spec("coreml")
    for precision in PRECISIONS:
        for units in UNITS:
            gate = "fp16" if units == "cpu_and_ne" else precision
            tol = target.tolerance(gate)
            t0 = time.perf_counter()
            report = check_parity(paths[precision], weights=weights, atol=tol.atol, rtol=tol.rtol,
                                  min_cosine=tol.min_cosine, runtime_options={"compute_units": units})
            o = report.overall
            row = {"artifact": paths[precision].name, "precision": precision, "compute_units": units,
                   "gated_as": gate, "passed": bool(report.passed), "failures": report.failures,
                   "max_abs": o.max_abs, "cosine": o.cosine, "top1_agreement": o.top1_agreement,
                   "report": report.to_dict(), "seconds": round(time.perf_counter() - t0, 1)}
            log.info("parity %s on %s (as %s): %s (max|a-r| %.3g, cosine %.7f)", row["artifact"], units, gate,
                     "pass" if row["passed"] else "FAIL " + "; ".join(row["failures"]), o.max_abs, o.cosine)
            rows.append(row)
    return rows


def debug_rows(path: Path) -> list[dict]:
    """`debug` of the shipped fp16 package on each compute unit: the per-block curve where Core ML predicts
    (Linux only exports the probe). Informative: a divergence named here is not a failed check."""
    from mixformer_deploy.debug import debug_artifact

    rows = []
    for units in UNITS:
        report = debug_artifact(path, runtime_options={"compute_units": units})
        rows.append({"compute_units": units, "verdict": report.verdict(), "report": report.to_dict()})
        log.info("debug %s on %s: %s", path.name, units, report.verdict())
    return rows


def app_form_rows(path: Path, reference) -> list[dict]:
    """The image + classifier form: photos as 8-bit RGB images vs PyTorch on the same pixels."""
    import numpy as np
    import torch
    from PIL import Image

    from mixformer_deploy.artifact import read_manifest
    from mixformer_deploy.data import Preprocessing, photos
    from mixformer_deploy.backends.coreml.runner import CoreMlRunner

    m = read_manifest(path)
    h, w = m["input_size"]
    prep = Preprocessing.from_dict(m.get("preprocessing"))
    mean, std = np.asarray(prep.mean, np.float32)[:, None, None], np.asarray(prep.std, np.float32)[:, None, None]
    x, names = photos(h, w, prep)
    pixels = np.clip(np.rint((x * std + mean) * 255), 0, 255).astype(np.uint8)          # what an app has
    normalized = ((pixels.astype(np.float32) / 255 - mean) / std).astype(np.float32)
    with torch.no_grad():
        probs_ref = torch.softmax(reference(torch.from_numpy(normalized)), -1).numpy()
    labels = m["coreml"]["classifier"]["labels"]
    rows = []
    for units in UNITS:
        runner = CoreMlRunner.load(path, options={"compute_units": units})
        worst, agree = 0.0, 0
        for i, name in enumerate(names):
            out = runner.predict({"image": Image.fromarray(pixels[i].transpose(1, 2, 0), "RGB")})
            probs = np.array([out["classLabel_probs"][lab] for lab in labels])
            worst = max(worst, float(np.abs(probs - probs_ref[i]).max()))
            agree += out["classLabel"] == labels[int(probs_ref[i].argmax())]
        runner.close()
        row = {"artifact": path.name, "compute_units": units, "images": len(names),
               "top1_agreement": agree / len(names),
               "max_abs_probability": worst, "passed": agree == len(names) and worst <= 2e-2}
        log.info("app form on %s: top-1 %d/%d, max |p - p_ref| %.3g: %s", units, agree, len(names), worst,
                 "pass" if row["passed"] else "FAIL")
        rows.append(row)
    return rows


def bench_run(paths: dict[str, Path], policy: dict, threads: int | None) -> dict:
    from mixformer_deploy.bench import Policy, artifact_subject, benchmark_subjects

    subjects = []
    for precision in PRECISIONS:
        for units in UNITS:
            s = artifact_subject(paths[precision], "coreml", f"coreml:{units}", threads)
            subjects.append(dataclasses.replace(s, name=f"{paths[precision].name} [{units}]"))
    return benchmark_subjects(subjects, [1], Policy(**policy))


def write_outputs(out: Path, report: dict, docs: list[dict]) -> None:
    from mixformer_deploy.artifact import write_json_atomic

    write_json_atomic(out / "mac_check.json", report)
    if not docs:
        return
    from mixformer_deploy.reports.bench_json import merge
    from mixformer_deploy.reports.markdown import bench_markdown

    doc = merge(docs)
    slug = doc["machine"]["slug"]
    write_json_atomic(out / f"bench-{slug}.json", doc)
    (out / f"bench-{slug}.md").write_text(bench_markdown([doc], {}))


def step(report: dict, name: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded, and the check goes on
        log.error("%s failed: %s: %s", name, type(e).__name__, e)
        report["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc(limit=8)})
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="output directory (created)")
    ap.add_argument("--variants", default="B0,B1", help="comma-separated (default B0,B1)")
    ap.add_argument("--size", default="224", help="input size, N or HxW (default 224)")
    ap.add_argument("--budget-s", type=float, default=1200.0, help="stop starting new steps after this (s)")
    ap.add_argument("--threads", type=int, default=None, help="worker threads (default: all)")
    ap.add_argument("--quick", action="store_true", help="short benchmark durations (a rehearsal)")
    args = ap.parse_args(argv)

    why = preflight()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 3
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    budget = Budget(args.budget_s)
    h, _, w = args.size.lower().partition("x")
    size = (int(h), int(w or h))
    policy = ({"warmup_s": 0.2, "duration_s": 0.5, "min_iters": 5} if args.quick
              else {"warmup_s": 1.0, "duration_s": 3.0, "min_iters": 20})

    from mixformer_deploy import __version__
    from mixformer_deploy.reports.bench_json import environment

    report = {"schema": SCHEMA, "tool_version": __version__, "macos": platform.mac_ver()[0],
              "machine": platform.machine(), "environment": environment("cpu", args.threads),
              "size": list(size), "units": list(UNITS), "exports": {}, "parity": [], "app_form": [], "debug": [],
              "bench_runs": 0, "skipped": [], "errors": [], "elapsed_s": None, "passed": None}
    art = out / "artifacts"
    docs = []
    jobs = [(None, "shipped B0 (digits)")] + [(v.strip().upper(), v.strip().upper()) for v in args.variants.split(",")]
    for variant, label in jobs:
        if not budget.allows(120):
            report["skipped"].append(f"{label}: time budget")
            continue
        paths = step(report, f"export {label}", export_all, variant, size, art / (variant or "shipped"))
        if not paths:
            continue
        report["exports"][label] = {k: str(p) for k, p in paths.items()}
        report["parity"] += step(report, f"parity {label}", parity_rows, paths, None) or []
        if variant is None and "fp16" in paths:
            report["debug"] += step(report, f"debug {label}", debug_rows, paths["fp16"]) or []
        if "app" in paths:
            from mixformer_deploy.source import load_source
            reference = load_source(None, variant).model  # the same weights export used (seeded for a variant)
            report["app_form"] += step(report, f"app form {label}", app_form_rows, paths["app"], reference) or []
        write_outputs(out, {**report, "elapsed_s": round(budget.elapsed, 1)}, docs)
        if variant and budget.allows(90):
            doc = step(report, f"bench {label}", bench_run, paths, policy, args.threads)
            if doc:
                docs.append(doc)
                report["bench_runs"] = len(docs)
        elif variant:
            report["skipped"].append(f"bench {label}: time budget")
        write_outputs(out, {**report, "elapsed_s": round(budget.elapsed, 1)}, docs)
    checks = report["parity"] + report["app_form"]
    report["passed"] = bool(checks) and all(c["passed"] for c in checks) and not report["errors"]
    report["elapsed_s"] = round(budget.elapsed, 1)
    write_outputs(out, report, docs)
    log.info("done in %.0f s: %s; files in %s", budget.elapsed, "PASSED" if report["passed"] else "FAILED", out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
