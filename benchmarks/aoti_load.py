"""AOTInductor on a busy machine: the runner's thread choice against the fixed settings, quiet and busy.

    python benchmarks/aoti_load.py [--variant B1] [--out benchmarks/results]

One B1 fp32 package (seeded weights, 224x224, batch 1), exported once. Each setting runs in a fresh
process (OpenMP reads OMP_WAIT_POLICY once, at start-up): median latency with the machine quiet, then
with one busy process beside it (a single-threaded spin loop, started after the package has loaded, as
a server's neighbour would be). Settings: the runner's default (threads = the CPUs free when it loads,
environment.free_cpus_now), every usable CPU with OpenMP's default wait, and with OMP_WAIT_POLICY=PASSIVE.
Writes results/aoti-load-<machine-slug>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BUSY = "while True: pass"
SETTINGS = {  # name -> (environment, runner threads: None = the runner's default)
    "runner default (free CPUs)": ({}, None),
    "all CPUs, OpenMP default wait": ({}, "all"),
    "all CPUs, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, "all"),
}


def median_ms(runner, x, n: int) -> float:
    import numpy as np
    for _ in range(5):
        runner.run(x)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times)), 2)


def child(package: str, threads: str) -> None:
    """One setting: load (choosing threads), time quiet, start the neighbour, load again, time busy."""
    import numpy as np
    from mixformer_deploy.backends.aoti.runner import AotiRunner

    n = None if threads == "none" else (len(os.sched_getaffinity(0)) if threads == "all" else int(threads))
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    quiet_runner = AotiRunner(Path(package), threads=n)
    quiet = median_ms(quiet_runner, x, 40)
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(1.0)
        busy_runner = AotiRunner(Path(package), threads=n)   # a server starting next to a busy neighbour
        loaded = median_ms(busy_runner, x, 20)
    finally:
        busy.kill()
    print(json.dumps({"quiet_ms": quiet, "quiet_threads": quiet_runner.threads, "busy_ms": loaded,
                      "busy_threads": busy_runner.threads}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B1")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "aoti-load")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from mixformer_deploy.artifact import write_json_atomic
    from mixformer_deploy.export_api import export
    from mixformer_deploy.reports.bench_json import environment, fingerprint

    pkg = export(None, "aoti", args.variant, 224, 1, "fp32", output=args.work, check=False).path
    rows = []
    for name, (env, threads) in SETTINGS.items():
        out = subprocess.run([sys.executable, __file__, "--child", str(pkg), threads or "none"], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append({"setting": name, **json.loads(out)})
        print(name, rows[-1], file=sys.stderr)
    machine = fingerprint(environment("cpu", len(os.sched_getaffinity(0))))
    doc = {"machine": machine, "variant": args.variant, "input_size": [224, 224], "batch": 1, "neighbour": BUSY,
           "rows": rows}
    slug = machine["slug"]
    write_json_atomic(args.out / f"aoti-load-{slug}.json", doc)
    lines = [f"# AOTInductor under load ({args.variant} fp32, 224x224, batch 1)", "",
             f"Machine: `{slug}` ({machine['cpu_model']}). Each setting in a fresh process; busy = one "
             "single-threaded spin loop beside it, started before the package loads.", "",
             "| setting | quiet ms (threads) | busy ms (threads) | busy / quiet |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['quiet_ms']} ({r['quiet_threads']}) | {r['busy_ms']} ({r['busy_threads']}) "
                     f"| {r['busy_ms'] / r['quiet_ms']:.2f}x |")
    (args.out / f"aoti-load-{slug}.md").write_text("\n".join(lines) + "\n")
    print(args.out / f"aoti-load-{slug}.md")


if __name__ == "__main__":
    main()
