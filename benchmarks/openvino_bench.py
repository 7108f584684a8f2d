"""OpenVINO on the CPU: f32, bf16 execution, fp16 weights and NNCF int8 of the deploy form, against
onnxruntime fp32 and OpenVINO's own conversion of the reference module, interleaved in one run.

    python benchmarks/openvino_bench.py [--variants B0,B1,B2,B3,B4] [--batches 1,8] [--threads 2] [--duration-s 10]
                                        [--calibration-size 32] [--no-profile] [--out benchmarks/results]

Per variant and batch (seeded random weights, 224x224): exports with `mixformer_deploy.export_api.export`
(onnx fp32, openvino fp32 / fp16 / int8 - int8 calibrated on crops of the bundled photos, as the seeded
weights have no data set), converts the reference module directly (`openvino.convert_model`, saved
uncompressed), and times every subject through `mixformer_deploy.bench.benchmark_subjects` (each in its
own worker process, interleaved rounds, FLOP floor measured in the same run). bf16 execution is the fp32
IR run with the runner's `precision=bf16` (skipped where the CPU lacks bf16). Then OpenVINO's per-op
performance counters, summed per op type, for f32, bf16, int8 and the direct conversion; and the
conversion time of the two OpenVINO routes (the deploy form's ONNX via Core.read_model, as the target
does, vs openvino.convert_model of the deploy module). Writes results/openvino-<machine-slug>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GOALS = {"int8_vs_f32": 1.6, "bf16_vs_f32": 1.5, "deploy_f32_vs_direct": 1 / 1.05}


def calibration_folder(folder: Path, count: int, size: int) -> Path:
    """``count`` deterministic crops (random position, scale, flip) of the bundled photos as PNGs."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from mixformer_deploy.data import PHOTOS

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) == count:
        return folder
    for p in folder.glob("*.png"):
        p.unlink()
    rng = np.random.default_rng(0)
    for i in range(count):
        img = getattr(skdata, PHOTOS[i % len(PHOTOS)])()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        s = int(min(h, w) * rng.uniform(0.4, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = img[y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size)).save(folder / f"crop-{i:03d}.png")
    return folder


def telemetry_free_convert(module, example):
    """openvino.convert_model with OpenVINO's own telemetry stub in place of openvino_telemetry."""
    import openvino as ov
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils

    saved = convert_impl.tm, telemetry_utils.tm
    convert_impl.tm = telemetry_utils.tm = telemetry_stub
    try:
        return ov.convert_model(module, example_input=example)
    finally:
        convert_impl.tm, telemetry_utils.tm = saved


def direct_conversion(model, manifest: dict, path: Path, batch: int, h: int, w: int) -> dict:
    """OpenVINO's conversion of the reference PyTorch module (no deploy form), saved uncompressed."""
    import openvino as ov
    import torch

    from mixformer_deploy.artifact import remove, sidecar_path, write_json_atomic

    t0 = time.perf_counter()
    with torch.no_grad():
        ovm = telemetry_free_convert(model.eval(), torch.zeros(batch, 3, h, w))
    seconds = time.perf_counter() - t0
    remove(path)
    path.mkdir(parents=True)
    ov.save_model(ovm, str(path / "model.xml"), compress_to_fp16=False)
    write_json_atomic(sidecar_path(path), {**manifest, "form": "reference module, openvino.convert_model",
                                           "stage_outputs": None, "parity": None})
    return {"seconds": seconds, "ops": len(ovm.get_ordered_ops())}


def conversion_routes(deploy, h: int, w: int, batch: int, work: Path) -> dict:
    """Time and size of the two ways to get the deploy form into OpenVINO."""
    import onnx
    import openvino as ov
    import torch

    from mixformer_deploy.backends import get_spec
    from mixformer_deploy.backends.exporter import ExportOptions
    from mixformer_deploy.backends.onnx.export import export_onnx
    from mixformer_deploy.backends.openvino.export import offline_transformations

    t0 = time.perf_counter()
    proto = export_onnx(deploy, ExportOptions(h, w, batch, "fp32", target=get_spec("onnx").parse_options({})), {})
    src = work / ".route.onnx"
    onnx.save(proto, str(src))
    a = ov.Core().read_model(str(src))
    offline_transformations(a)  # what the exporter applies after the frontend
    t1 = time.perf_counter()
    src.unlink()
    with torch.no_grad():
        b = telemetry_free_convert(deploy, torch.zeros(batch, 3, h, w))
    t2 = time.perf_counter()
    return {"onnx_read_model_moc": {"seconds": t1 - t0, "ops": len(a.get_ordered_ops())},
            "convert_model_of_deploy_module": {"seconds": t2 - t1, "ops": len(b.get_ordered_ops())}}


def profile(path: Path, options: dict, threads: int, batch: int, h: int, w: int) -> dict:
    from mixformer_deploy.data import random_inputs
    from mixformer_deploy.backends.openvino.runner import OpenVinoRunner

    runner = OpenVinoRunner.load(path, threads=threads, options=options)
    try:
        per_type = runner.profile(random_inputs(batch, h, w, seed=0)[0], runs=30)
    finally:
        runner.close()
    return {"total_ms": sum(v["ms"] for v in per_type.values()), "per_type": per_type}


def accuracy_vs_reference(paths: dict, options: dict, model, h: int, w: int) -> dict:
    """Relative L2 of each subject's logits against PyTorch float32 on the bundled photos."""
    import numpy as np
    import torch

    from mixformer_deploy.data import photos
    from mixformer_deploy.numerics import rel_l2
    from mixformer_deploy.backends import open_runner

    x = photos(h, w)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = {}
    for name, path in paths.items():
        r = open_runner(path, options=options.get(name))
        got = np.concatenate([r.run(x[i:i + 1]) for i in range(len(x))]) if r else None
        r.close()
        out[name] = rel_l2(got, ref)
    return out


def run_variant(variant: str, batch: int, args, rows_md: list[str]) -> dict:
    from mixformer_deploy.bench import Policy, artifact_subject, benchmark_subjects
    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.export_api import export
    from mixformer_deploy.backends.openvino.runner import OpenVinoRunner
    from mixformer_deploy.source import load_source

    h = w = args.size
    work = args.work / f"{variant.lower()}-b{batch}"
    work.mkdir(parents=True, exist_ok=True)
    cal = calibration_folder(args.work / "calibration", args.calibration_size, h)
    timings = {}

    def timed(label, output=work, **kw):
        t0 = time.perf_counter()
        r = export(None, variant=variant, img_size=h, batch=batch, output=output, check=False, **kw)
        timings[label] = time.perf_counter() - t0
        return r.path

    paths = {
        "onnxruntime fp32": timed("onnx fp32", target="onnx"),
        "openvino f32": timed("openvino fp32", target="openvino"),
        "openvino fp16-weights": timed("openvino fp16", target="openvino", precision="fp16"),
        "openvino int8": timed("openvino int8", target="openvino", precision="int8", calibration=cal,
                               calibration_size=args.calibration_size),
        # what was tried: no precision keeps (LayerNorms, attention logits + softmax quantized too)
        "openvino int8 no keeps": timed("openvino int8 no keeps", output=work / "no-keeps", target="openvino",
                                        precision="int8", calibration=cal, calibration_size=args.calibration_size,
                                        default_keeps=False),
    }
    source = load_source(None, variant)
    manifest = json.loads((work / (paths["openvino f32"].name + ".json")).read_text())
    direct = work / f"direct-{variant.lower()}-{h}x{w}-b{batch}-fp32.openvino"
    direct_info = direct_conversion(source.model, manifest, direct, batch, h, w)
    paths["openvino direct conversion (reference module) f32"] = direct
    routes = conversion_routes(to_deploy(source.model, (h, w)), h, w, batch, work)
    bf16 = bool(OpenVinoRunner.status(probe=True).get("bf16"))
    options = {"openvino f32": {"precision": "fp32"}, "openvino fp16-weights": {"precision": "fp32"},
               "openvino int8": {"precision": "fp32"}, "openvino int8 no keeps": {"precision": "fp32"},
               "openvino direct conversion (reference module) f32": {"precision": "fp32"}}
    if bf16:
        paths["openvino bf16 execution"] = paths["openvino f32"]
        options["openvino bf16 execution"] = {"precision": "bf16"}
    subjects = [replace(artifact_subject(p, threads=args.threads, options=options.get(name)), name=name)
                for name, p in paths.items()]
    policy = Policy(warmup_s=2.0, duration_s=args.duration_s, min_iters=50 if batch == 1 else 20)
    doc = benchmark_subjects(subjects, [batch], policy, progress=None)
    p50 = {r["artifact"]: r["latency_ms"]["p50"] for r in doc["results"]}
    f32 = p50["openvino f32"]
    ratios = {
        "int8_vs_f32": f32 / p50["openvino int8"],
        "bf16_vs_f32": f32 / p50["openvino bf16 execution"] if bf16 else None,
        "deploy_f32_vs_direct": p50["openvino direct conversion (reference module) f32"] / f32,
        "openvino_f32_vs_onnxruntime": p50["onnxruntime fp32"] / f32,
        "fp16_weights_vs_f32": f32 / p50["openvino fp16-weights"],
        "int8_no_keeps_vs_f32": f32 / p50["openvino int8 no keeps"],
    }
    extra = {"variant": variant, "batch": batch, "p50_ms": p50, "ratios": ratios, "goals": GOALS,
             "export_seconds": timings, "direct_conversion": direct_info, "conversion_routes": routes,
             "bf16_available": bf16, "rel_l2_vs_pytorch_on_photos": accuracy_vs_reference(
                 paths, options, source.model, h, w) if batch == 1 else None}
    if args.profile and batch == 1 and variant in args.profile_variants.upper().split(","):
        # where the time goes: B1 at batch 1 is the case the goals judge
        extra["profiles"] = {name: profile(paths[name], options.get(name) or {}, args.threads, batch, h, w)
                             for name in paths if name.startswith("openvino")}
    doc["openvino"] = extra
    rows_md.append(f"| {variant} | {batch} | " + " | ".join(
        f"{p50[n]:.2f}" if n in p50 else "–" for n in SUBJECT_ORDER) +
        f" | {ratios['int8_vs_f32']:.2f}x | {ratios['bf16_vs_f32'] or float('nan'):.2f}x | "
        f"{ratios['deploy_f32_vs_direct']:.2f}x |")
    return doc


SUBJECT_ORDER = ["onnxruntime fp32", "openvino f32", "openvino bf16 execution", "openvino fp16-weights",
                 "openvino int8", "openvino int8 no keeps", "openvino direct conversion (reference module) f32"]


def profile_table(profiles: dict, top: int = 12) -> list[str]:
    names = list(profiles)
    types = sorted({t for p in profiles.values() for t in p["per_type"]},
                   key=lambda t: -max(p["per_type"].get(t, {}).get("ms", 0) for p in profiles.values()))[:top]
    lines = ["| op type | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in types:
        lines.append(f"| {t} | " + " | ".join(
            f"{profiles[n]['per_type'][t]['ms']:.2f} ({profiles[n]['per_type'][t]['count']})"
            if t in profiles[n]["per_type"] else "–" for n in names) + " |")
    lines.append("| **sum of counters** | " + " | ".join(f"**{profiles[n]['total_ms']:.2f}**" for n in names) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="B0,B1,B2,B3,B4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=10.0)
    ap.add_argument("--calibration-size", type=int, default=32)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile-variants", default="B1", help="variants whose batch-1 IRs get a per-op profile")
    ap.add_argument("--note", action="append", default=[], help="a note recorded with the results")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=Path("artifacts/openvino-bench"))
    args = ap.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows_md: list[str] = []
    docs: list[dict] = []
    for v in args.variants.split(","):
        for b in args.batches.split(","):
            docs.append(run_variant(v.strip().upper(), int(b), args, rows_md))
            path = write_results(docs, rows_md, args)  # after each run: a stopped benchmark keeps what it measured
    print(path)


def write_results(docs: list[dict], rows_md: list[str], args) -> Path:
    from mixformer_deploy.artifact import write_json_atomic

    env = docs[0]["environment"]
    slug = docs[0]["machine"]["slug"]
    result = {"schema": "mixformer-deploy/openvino-bench/1", "machine": docs[0]["machine"],
              "cpu": env.get("cpu_model"), "notes": args.note, "runs": docs}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"openvino-{slug}.json", result)

    lines = [f"# OpenVINO on the CPU ({args.size}x{args.size}, {args.threads} threads, seeded weights)", "",
             f"Machine: `{slug}` ({env.get('cpu_model')}). Each variant/batch is one interleaved run; p50 ms.",
             *(f"Note: {n}" for n in args.note), "",
             "| variant | batch | " + " | ".join(SUBJECT_ORDER) + " | int8 vs f32 | bf16 vs f32 | direct / deploy f32 |",
             "|---|---|" + "---|" * (len(SUBJECT_ORDER) + 3), *rows_md, "",
             f"Goals: int8 >= {GOALS['int8_vs_f32']}x over f32, bf16 >= {GOALS['bf16_vs_f32']}x, deploy-form f32 "
             "within 5% of the direct conversion (direct / deploy >= 0.95).", ""]
    for d in docs:
        o = d["openvino"]
        floors = {r["artifact"]: r.get("floor_fraction") for r in d["results"]}
        lines += [f"## {o['variant']} batch {o['batch']}", "",
                  "FLOP-floor fraction: " + ", ".join(f"{k} {v:.0%}" for k, v in floors.items() if v), "",
                  "Export seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in o["export_seconds"].items()), "",
                  "Conversion routes (deploy form into OpenVINO): " + ", ".join(
                      f"{k} {v['seconds']:.1f} s / {v['ops']} ops" for k, v in o["conversion_routes"].items()), ""]
        if o.get("rel_l2_vs_pytorch_on_photos"):
            lines += ["Relative L2 vs PyTorch fp32 on the photos: " + ", ".join(
                f"{k} {v:.2g}" for k, v in o["rel_l2_vs_pytorch_on_photos"].items()), ""]
        if o.get("profiles"):
            lines += ["Per-op-type time (OpenVINO performance counters, ms per inference, (layers)):", "",
                      *profile_table(o["profiles"]), ""]
    from mixformer_deploy.reports.markdown import bench_markdown
    lines += ["## Full results", "", bench_markdown(docs)]
    (args.out / f"openvino-{slug}.md").write_text("\n".join(lines) + "\n")
    return args.out / f"openvino-{slug}.md"


if __name__ == "__main__":
    main()
