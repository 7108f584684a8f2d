"""The TensorRT-ready ONNX at fp32 / fp16 / int8: node counts, Q/DQ and Cast counts, lint, parity figures,
and the shipped weights' held-out accuracy at each precision.

    python benchmarks/tensorrt_onnx_report.py [--variant B1] [--size 224] [--calibration-size 32]
                                              [--out benchmarks/results]

Part 1: B1 with seeded random weights at 224x224 (random weights: parity and graph facts only, no
accuracy), int8 calibrated on seeded random inputs. Part 2: the shipped B0-digits weights at their
32x32 training size through `export` (int8 calibrated on the digits training split), parity and the
held-out accuracy gate on onnxruntime's CPU provider. No TensorRT is involved: this is the function
TensorRT compiles, not its speed (the Q/DQ graph is made for TensorRT; its onnxruntime CPU latency
says nothing about TensorRT). Writes results/tensorrt-onnx-<machine-slug>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def graph_facts(path: Path) -> dict:
    import onnx

    from mixformer_deploy.backends.tensorrt.lint import lint

    m = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    return {"nodes": len(m.graph.node), "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0), "cast": ops.get("Cast", 0),
            "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "size_bytes": path.stat().st_size,
            "lint_11_clean": lint(m, "11").clean, "lint_10_clean": lint(m, "10").clean}


def seeded_part(variant: str, size: int, calibration_size: int, out: Path) -> list[dict]:
    """B1 seeded: the exporter's export() directly (random calibration), parity vs PyTorch on photos+random."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from mixformer_deploy.data import photos, random_inputs
    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.deploy.precision import resolve_keeps
    from mixformer_deploy.model import create_model
    from mixformer_deploy.numerics import rel_l2
    from mixformer_deploy.backends import get_spec
    from mixformer_deploy.backends.exporter import Calibration, ExportContext, ExportOptions

    model = create_model(variant.lower(), seed=0).eval()
    deploy = to_deploy(model, (size, size))
    keeps = resolve_keeps(deploy)
    x = np.concatenate([photos(size, size)[0], random_inputs(4, size, size)[0]])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    calib = np.random.RandomState(1).randn(calibration_size, 3, size, size).astype(np.float32)
    spec = get_spec("tensorrt")
    exporter = spec.exporter()
    rows = []
    for precision in ("fp32", "fp16", "int8"):
        opts = ExportOptions(size, size, 1, precision, keeps=keeps if precision != "fp32" else [],
                             calibration=Calibration(calib, {"source": "seeded random"}) if precision == "int8" else None,
                             target=spec.parse_options({}))
        path = out / f"{variant.lower()}-{size}-{precision}.trt.onnx"
        start = time.perf_counter()
        manifest = {"target": "tensorrt", "precision": precision, "versions": {"mixformer-deploy": "benchmark"}}
        exporter.export(deploy, ExportContext(final=path, tmp=path, options=opts, manifest=manifest))
        seconds = time.perf_counter() - start
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        a = np.concatenate([s.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
        cos = [float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) for u, v in zip(a, ref)]
        rows.append({"weights": f"{variant} seeded", "size": size, "precision": precision, **graph_facts(path),
                     "export_s": round(seconds, 1), "rel_l2": rel_l2(a, ref),
                     "max_abs": float(np.abs(a - ref).max()), "min_sample_cosine": min(cos),
                     "top1_agreement": float((a.argmax(1) == ref.argmax(1)).mean())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def shipped_part(calibration_size: int, out: Path) -> list[dict]:
    """The shipped weights through export(): parity + the held-out accuracy gate, as users get it."""
    from mixformer_deploy.export_api import export

    rows = []
    for precision in ("fp32", "fp16", "int8"):
        start = time.perf_counter()
        result = export(target="tensorrt", precision=precision, output=out, calibration_size=calibration_size,
                        target_options={"onnx_only": True})
        p = result.manifest["parity"]
        acc = (p.get("accuracy") or {}).get("dataset") or {}
        rows.append({"weights": "shipped B0-digits", "size": 32, "precision": precision,
                     **graph_facts(result.path), "export_and_check_s": round(time.perf_counter() - start, 1),
                     "passed": result.passed, "rel_l2": p["rel_l2"], "max_abs": p["max_abs"],
                     "min_sample_cosine": p["min_sample_cosine"], "top1_agreement": p["top1_agreement"],
                     "heldout_accuracy": acc.get("artifact"), "heldout_accuracy_reference": acc.get("reference")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="B1")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calibration-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--skip-seeded", action="store_true")
    ap.add_argument("--skip-shipped", action="store_true")
    args = ap.parse_args()

    from mixformer_deploy.environment import _cpu_model
    from mixformer_deploy.manifest import tool_versions
    from mixformer_deploy.reports.bench_json import _slug_part

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_seeded:
            rows += seeded_part(args.variant, args.size, args.calibration_size, Path(tmp))
        if not args.skip_shipped:
            rows += shipped_part(300, Path(tmp))
    slug = _slug_part(_cpu_model())
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": "mixformer-deploy/tensorrt-onnx/1", "machine": _cpu_model() or platform.machine(),
           "versions": tool_versions("onnx", "onnxruntime", "nvidia-modelopt", "torch"), "rows": rows,
           "note": "onnxruntime CPU provider; no TensorRT. Seeded weights: parity only. int8 seeded: random "
                   f"calibration ({args.calibration_size} inputs)."}
    (args.out / f"tensorrt-onnx-{slug}.json").write_text(json.dumps(doc, indent=2) + "\n")
    cols = ["weights", "size", "precision", "nodes", "quantize_linear", "cast", "rel_l2", "max_abs",
            "min_sample_cosine", "top1_agreement", "heldout_accuracy"]
    lines = [f"# TensorRT-ready ONNX ({slug})", "", doc["note"], "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    (args.out / f"tensorrt-onnx-{slug}.md").write_text("\n".join(lines) + "\n")
    print(args.out / f"tensorrt-onnx-{slug}.md")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    main()
