"""Run a benchmark suite (TOML) on this machine and record it under benchmarks/results/.

    python benchmarks/run_suite.py [SUITE.toml] [--variants B0,B1] [--quick] [--out DIR] [--artifacts DIR]

For each variant: export the suite's artifacts through the library (seeded random weights), then time them
and, if asked, the PyTorch eager reference, interleaved in one run (mixformer_deploy.bench). The runs are
merged into results/<machine-slug>.json (schema mixformer-deploy/bench/1) with a Markdown table beside it;
--quick (short timings, for a rehearsal) writes <machine-slug>-quick.* instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
log = logging.getLogger("run_suite")

QUICK = {"warmup_s": 0.2, "min_iters": 5, "duration_s": 1.0}


def load_suite(path: Path) -> dict:
    if tomllib is None:
        sys.exit("run_suite.py needs Python >= 3.11 (tomllib)")
    suite = tomllib.loads(path.read_text())
    missing = [k for k in ("device", "input_size", "batches", "variants", "artifacts") if k not in suite]
    if missing:
        sys.exit(f"{path}: missing {', '.join(missing)}")
    return suite


def export_artifacts(variant: str, suite: dict, out: Path) -> list[tuple[Path, str]]:
    """(artifact, runtime) for each [[artifacts]] entry; one that fails its parity gate is not timed."""
    from mixformer_deploy.export_api import export

    h, w = suite["input_size"]
    done = []
    for spec in suite["artifacts"]:
        t0 = time.perf_counter()
        result = export(None, spec["target"], variant, f"{h}x{w}", spec.get("batch", "dynamic"),
                        spec.get("precision", "fp32"), output=out, check=spec.get("check", True),
                        num_classes=suite.get("num_classes", 1000))
        if not result.passed:
            log.error("%s failed its parity gate: not timed", result.path.name)
            continue
        log.info("exported %s in %.0f s", result.path.name, time.perf_counter() - t0)
        done.append((result.path, spec.get("runtime", "auto")))
    return done


def run_variant(variant: str, suite: dict, policy, artifacts_dir: Path) -> dict | None:
    from mixformer_deploy.bench import artifact_subject, benchmark_subjects, reference_subject

    exported = export_artifacts(variant, suite, artifacts_dir)
    if not exported:
        return None
    threads = suite.get("threads")
    subjects = [artifact_subject(p, rt, suite["device"], threads) for p, rt in exported]
    if suite.get("reference", True):
        subjects.append(reference_subject(subjects[0]))
    return benchmark_subjects(subjects, suite["batches"], policy,
                              progress=lambda f, text: log.debug("%s %s %.0f%%", variant, text, 100 * f))


def write(docs: list[dict], out: Path, quick: bool) -> Path:
    from mixformer_deploy.reports.bench_json import merge, write_results
    from mixformer_deploy.reports.markdown import bench_markdown

    doc = merge(docs)
    stem = doc["machine"]["slug"] + ("-quick" if quick else "")
    path = write_results(out / f"{stem}.json", doc)
    plots = {}
    try:
        from mixformer_deploy.reports.plots import report_plots
        plots = {k: p.name for k, p in report_plots([doc], out, stem).items()}
    except Exception as e:  # noqa: BLE001 - plots need the plot extra; the numbers do not
        log.warning("no plots: %s", e)
    (out / f"{stem}.md").write_text(bench_markdown([doc], plots))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", nargs="?", type=Path, default=HERE / "suite-cpu.toml")
    ap.add_argument("--variants", help="comma-separated subset, e.g. B0,B1")
    ap.add_argument("--quick", action="store_true", help="short timings; writes <slug>-quick.*")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--artifacts", type=Path, default=HERE.parent / "artifacts" / "suite",
                    help="where the exports go (default: the git-ignored artifacts/suite/)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from mixformer_deploy.bench import Policy

    suite = load_suite(args.suite)
    policy = Policy(**(QUICK if args.quick else suite.get("timing", {})))
    variants = args.variants.split(",") if args.variants else suite["variants"]
    docs = []
    for variant in variants:
        log.info("%s: exporting and timing", variant)
        doc = run_variant(variant, suite, policy, args.artifacts)
        if doc:
            docs.append(doc)
    if not docs:
        log.error("nothing was timed")
        return 1
    log.info("wrote %s", write(docs, args.out, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
