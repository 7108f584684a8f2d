"""The fleet wiring, checked here since it cannot run here: every workflow and the composite action against
GitHub's published schemas (check-jsonschema's bundled vendor schemas, offline), every `run:` script with
shellcheck, the action's shell steps run locally by a small stand-in for the runner, and `report` merging
the recorded results of several machines (CPU, the H100 GPU run, a replayed phone) into one page.

`python tests/test_fleet.py` rewrites the committed replayed phone document from the test adb.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # test_adb (its stand-in adb), also when run as a script

ACTION = ROOT / "action.yml"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml")) + sorted((ROOT / "examples" / "ci").glob("*.yml"))
BIN = Path(sys.executable).parent  # the environment's scripts: check-jsonschema, shellcheck, mixformer-deploy
RESULTS = ROOT / "benchmarks" / "results"
REPLAYED = RESULTS / "phone-replayed-sm8550-test-phone.json"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}", re.S)


def _tool(name: str) -> str:
    """A checker from the dev extra, beside this Python or on PATH (else the test skips)."""
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not path:
        pytest.skip(f"{name} is not installed (the dev extra has it)")
    return path


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- schemas

def test_the_files_exist():
    assert ACTION.is_file()
    assert {p.relative_to(ROOT).as_posix() for p in WORKFLOWS} >= {".github/workflows/ci.yml", "examples/ci/fleet.yml"}


@pytest.mark.parametrize("schema, paths", [("vendor.github-workflows", WORKFLOWS), ("vendor.github-actions", [ACTION])],
                         ids=["workflows", "action"])
def test_yaml_follows_githubs_schema(schema, paths):
    """check-jsonschema's vendor schemas ship in its wheel: no network (tested with none)."""
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", schema, *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_schema_check_does_catch_a_mistake(tmp_path):
    """The schema check is not vacuous: a misspelt key in a copy of the action fails it."""
    broken = tmp_path / "action.yml"
    broken.write_text(ACTION.read_text().replace("  using: composite", "  using: compsite"))
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "compsite" in proc.stdout


# ---------------------------------------------------------------- shellcheck

def _steps(doc: dict) -> list[dict]:
    """Every step of a workflow's jobs or of a composite action."""
    if "runs" in doc:
        return doc["runs"].get("steps") or []
    return [s for job in (doc.get("jobs") or {}).values() for s in job.get("steps") or []]


def _scripts(path: Path) -> list[tuple[str, str, str]]:
    """(where, shell, script) of every `run:`, and of a `with: script:` (android-emulator-runner's, run by sh)."""
    doc = _load(path)
    out = []
    for i, step in enumerate(_steps(doc)):
        where = f"{path.relative_to(ROOT)} step {i} ({step.get('name') or step.get('uses') or step.get('id')})"
        if "run" in step:
            out.append((where, step.get("shell", "bash"), step["run"]))
        script = (step.get("with") or {}).get("script")
        if script:
            out.append((where + " script", "sh", script))
    return out


def _placeholders(script: str) -> str:
    """`${{ ... }}` expressions as the plain words GitHub would have put there before the shell saw them."""
    return EXPRESSION.sub("expression_value", script)


SCRIPTS = [s for p in [ACTION, *WORKFLOWS] if p.is_file() for s in _scripts(p)]


def test_every_run_script_passes_shellcheck(tmp_path):
    assert len(SCRIPTS) >= 12
    files = []
    for i, (where, shell, script) in enumerate(SCRIPTS):
        shell = {"bash": "bash", "sh": "sh"}.get(shell.split()[0], shell)
        f = tmp_path / f"{i:02d}.{shell}"
        f.write_text(f"#!/usr/bin/env {shell}\n# {where}\n{_placeholders(script)}")
        files.append(str(f))
    proc = subprocess.run([_tool("shellcheck"), "--format=gcc", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "\n".join(f"{SCRIPTS[int(Path(line.split(':')[0]).stem)][0]}: {line}"
                                           for line in proc.stdout.splitlines())


def test_shellcheck_does_catch_a_mistake(tmp_path):
    f = tmp_path / "bad.bash"
    f.write_text("#!/usr/bin/env bash\n" + _placeholders('rm -rf $OUT/${{ inputs.output-dir }}\n'))
    proc = subprocess.run([_tool("shellcheck"), str(f)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "SC2086" in proc.stdout


# ---------------------------------------------------------------- the action's steps, run here

class LocalRunner:
    """Runs a composite action's `run:` steps as GitHub's runner would: `${{ }}` filled from inputs (with the
    action's defaults), earlier steps' outputs and the runner context; each step a `bash --noprofile --norc
    -eo pipefail` script with its own GITHUB_OUTPUT file; GITHUB_ENV, GITHUB_PATH and GITHUB_STEP_SUMMARY
    files shared. `uses:` steps are skipped and listed with their `with:` filled in (what the action would have
    been given). An expression it does not know fails the test."""

    def __init__(self, action: Path, inputs: dict, work: Path, env: dict):
        self.action, self.work = _load(action), work
        known = self.action.get("inputs") or {}
        unknown = set(inputs) - set(known)
        assert not unknown, f"the action has no inputs {sorted(unknown)}"
        self.inputs = {k: str(inputs.get(k, (v or {}).get("default", ""))) for k, v in known.items()}
        self.files = {k: work / f"{k.lower()}.txt" for k in ("GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY")}
        for f in self.files.values():
            f.write_text("")
        self.env = {**env, **{k: str(f) for k, f in self.files.items()}, "RUNNER_OS": "Linux", "RUNNER_ARCH": "X64",
                    "RUNNER_TEMP": str(work / "runner-temp"), "GITHUB_ACTION_PATH": str(action.parent),
                    "GITHUB_WORKSPACE": str(work), "CI": "true", "GITHUB_ACTIONS": "true"}
        (work / "runner-temp").mkdir(exist_ok=True)
        self.outputs: dict[str, dict] = {}
        self.ran: list[tuple[str, int]] = []
        self.skipped: list[tuple[str, dict]] = []

    def value(self, expr: str) -> str:
        m = re.fullmatch(r"inputs\.([\w-]+)", expr)
        if m:
            assert m.group(1) in self.inputs, f"unknown input in ${{{{ {expr} }}}}"
            return self.inputs[m.group(1)]
        m = re.fullmatch(r"steps\.([\w-]+)\.outputs\.([\w-]+)", expr)
        if m:
            return self.outputs.get(m.group(1), {}).get(m.group(2), "")
        context = {"runner.os": "Linux", "runner.arch": "X64", "github.action_path": self.env["GITHUB_ACTION_PATH"],
                   "runner.temp": self.env["RUNNER_TEMP"], "github.workspace": str(self.work)}
        assert expr in context, f"the local runner does not know ${{{{ {expr} }}}}"
        return context[expr]

    def fill(self, text) -> str:
        return EXPRESSION.sub(lambda m: self.value(m.group(1)), str(text))

    def should_run(self, step: dict, failed: bool) -> bool:
        condition = str(step.get("if", "success()")).strip()
        if condition in ("always()", "${{ always() }}"):
            return True
        assert condition == "success()", f"the local runner evaluates only always() on a run: step, not {condition!r}"
        return not failed

    def step_env(self, step: dict) -> dict:
        env = dict(self.env)
        for line in self.files["GITHUB_PATH"].read_text().splitlines():
            env["PATH"] = f"{line}{os.pathsep}{env['PATH']}"
        env.update(_read_key_values(self.files["GITHUB_ENV"]))
        env.update({k: self.fill(v) for k, v in (step.get("env") or {}).items()})
        return env

    def run(self, timeout: float = 300) -> dict:
        failed = False
        for i, step in enumerate(self.action["runs"]["steps"]):
            if "uses" in step:
                self.skipped.append((step["uses"], {k: self.fill(v) for k, v in (step.get("with") or {}).items()}))
                continue
            if not self.should_run(step, failed):
                continue
            assert step.get("shell") == "bash", "composite steps name their shell"
            script, output = self.work / f"step-{i}.sh", self.work / f"output-{i}.txt"
            script.write_text(self.fill(step["run"]))
            output.write_text("")
            env = {**self.step_env(step), "GITHUB_OUTPUT": str(output)}
            proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=self.work,
                                  env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            (self.work / f"step-{i}.log").write_text(proc.stdout + proc.stderr)
            self.ran.append((step.get("name", f"step {i}"), proc.returncode))
            if step.get("id"):
                self.outputs[step["id"]] = _read_key_values(output)
            failed = failed or proc.returncode != 0
        return {k: self.fill(v["value"]) for k, v in (self.action.get("outputs") or {}).items()}

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.work.glob("step-*.log")))


def _read_key_values(path: Path) -> dict[str, str]:
    """GitHub's file command format: NAME=value lines and NAME<<DELIMITER ... DELIMITER blocks."""
    out, lines = {}, path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, i + 1)
            out[name] = "\n".join(lines[i + 1:end])
            i = end + 1
            continue
        if "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
        i += 1
    return out


def _runner_env() -> dict:
    """This environment's scripts first on PATH, as an activated virtual environment would put them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "RUNNER_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# the tiny model at its quickest: every option still travels through an input into its command
TINY_INPUTS = {"weights": str(ROOT / "tests" / "data" / "tiny.pdparams"), "targets": "onnx", "precisions": "fp32",
               "export-args": "--img-size 64 --no-simplify", "parity-args": "--inputs random", "threads": "1",
               "bench-args": "--duration-s 0 --warmup-s 0 --min-iters 3 --no-floor", "path": str(ROOT),
               "python-version": ""}


def test_the_actions_steps_run_here(tmp_path):
    """The tiny model through every step (install: false uses this environment's mixformer-deploy; the
    install branch runs in the slow test below), then the outputs, the files and the job summary."""
    runner = LocalRunner(ACTION, {**TINY_INPUTS, "install": "false", "output-dir": str(tmp_path / "out")},
                         tmp_path, _runner_env())
    outputs = runner.run()
    assert [rc for _, rc in runner.ran] == [0] * 7, (runner.ran, runner.log())
    assert [uses for uses, _ in runner.skipped] == ["actions/setup-python@v5", "actions/upload-artifact@v4"]
    artifact = Path(outputs["artifact"])
    assert artifact.name == "mixformer-custom-64x64-b1-fp32.onnx" and artifact.is_file()
    assert outputs["artifacts"] == str(artifact) and outputs["verdict"] == "pass"
    assert outputs["name"] == "mixformer-deploy-linux-x64-cpu-onnx-fp32"
    upload = runner.skipped[1][1]
    assert upload["name"] == outputs["name"] and upload["path"] == outputs["directory"] == str(tmp_path / "out")
    reports = Path(outputs["directory"]) / "reports"
    assert json.loads((reports / f"parity-{artifact.name}.json").read_text())["passed"] is True
    assert "<testsuite" in (reports / f"parity-{artifact.name}.xml").read_text()
    from mixformer_deploy.reports.bench_json import read_results

    assert outputs["bench-json"] == str(reports / "bench-mixformer-deploy-linux-x64-cpu-onnx-fp32.json")
    doc = read_results(outputs["bench-json"])
    assert [r["artifact"] for r in doc["results"]] == [artifact.name] and doc["results"][0]["threads"] == 1
    summary = runner.files["GITHUB_STEP_SUMMARY"].read_text()
    assert f"| `{artifact.name}` | pass | 0 |" in summary and "| Artifact | Runtime |" in summary


@pytest.mark.slow
def test_the_action_installs_from_a_checkout_and_fails_a_failed_gate(tmp_path):
    """install: true into a fresh environment that sees this one's packages (torch and the extras are then
    already satisfied; the package itself is built from the checkout), and a gate that fails: the job fails
    in the last step, after the summary and the upload."""
    env = _runner_env()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    parent = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent-environment.pth").write_text(parent + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    checkout = _package_checkout(tmp_path / "checkout")  # pip builds in the tree: not in this one
    runner = LocalRunner(ACTION, {**TINY_INPUTS, "install": "true", "output-dir": str(tmp_path / "out"),
                                  "path": str(checkout),
                                  "parity-args": "--inputs random --atol 0 --rtol 0 --min-cosine 1"}, tmp_path, env)
    outputs = runner.run(timeout=900)
    assert (venv / "bin" / "mixformer-deploy").is_file(), runner.log()
    assert [rc for _, rc in runner.ran] == [0] * 6 + [1], (runner.ran, runner.log())
    assert outputs["verdict"] == "fail" and outputs["bench-json"] == ""
    assert "| fail | 1 |" in runner.files["GITHUB_STEP_SUMMARY"].read_text()


def _package_checkout(dest: Path) -> Path:
    """What building the package reads from a checkout, copied (pip builds in the tree it is given)."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "_shipped")
    for name in ("mixformer_deploy", "models", "export"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    return dest


def test_the_runner_reads_githubs_file_commands(tmp_path):
    f = tmp_path / "out"
    f.write_text("a=1\nb<<EOF\nx=y\nz\nEOF\nc=\n")
    assert _read_key_values(f) == {"a": "1", "b": "x=y\nz", "c": ""}


# ---------------------------------------------------------------- report: a fleet's results on one page

def replay_phone(work: Path) -> dict:
    """A phone document made by replaying the tools' documented output (tests/data/adb) through the stand-in
    adb of tests/test_adb.py: mixformer_deploy.adb end to end, labelled replayed, never a measurement."""
    from test_adb import FAKE_ADB, SAMPLES

    from mixformer_deploy.adb import bench_on_device
    from mixformer_deploy.reports.bench_json import merge

    adb = work / "bin" / "adb"
    adb.parent.mkdir(parents=True, exist_ok=True)
    adb.write_text(FAKE_ADB.format(log=work / "adb.log", samples=SAMPLES))
    adb.chmod(adb.stat().st_mode | stat.S_IEXEC)
    docs = []
    for target, suffix, precision, tool in (("litert", ".tflite", "int8", "benchmark_model"),
                                            ("executorch", ".pte", "fp32", "executor_runner")):
        artifact = _stand_in_artifact(work / target, target, suffix, precision)
        binary = work / target / tool
        binary.write_bytes(b"\x7fELF stand-in")
        docs.append(bench_on_device(artifact, "phone1", binary, runs=50, threads=2, adb=str(adb)))
    return _label_replayed(merge(docs), docs)


def _stand_in_artifact(folder: Path, target: str, suffix: str, precision: str) -> Path:
    """The artifact the samples name (its bytes are never run: the tool's output is replayed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"mixformer-b1-224x224-b1-{precision}{suffix}"
    path.write_bytes(b"stand-in artifact bytes")
    manifest = {"schema": "mixformer-deploy/manifest/1", "target": target, "runtime": target, "variant": "B1",
                "input_size": [224, 224], "batch": 1, "precision": precision, "num_classes": 1000,
                "weights": {"sha256": None}}
    (folder / (path.name + ".json")).write_text(json.dumps(manifest))
    return path


def _label_replayed(doc: dict, runs: list[dict]) -> dict:
    """Say so everywhere a reader looks: provenance, the machine's slug, the first warning; no temp paths."""
    note = ("tests/data/adb's documented tool output (illustrative numbers, not this project's "
            "models) through tests/test_adb.py's stand-in adb; not a measurement")
    doc["provenance"] = {"kind": "replayed", "note": note, "how": "mixformer_deploy.adb.bench_on_device",
                         "samples": ["tests/data/adb/benchmark_model_info.txt", "tests/data/adb/executor_runner.txt"]}
    doc["machine"] = {**doc["machine"], "slug": "replayed-" + doc["machine"]["slug"]}
    doc["environment"] = {**doc["environment"], "backends": {k: v for r in runs for k, v in
                                                             r["environment"]["backends"].items()}}
    doc["settings"] = {**doc["settings"], "timer": "benchmark_model / executor_runner (replayed)"}
    doc["warnings"] = [f"REPLAYED, not measured: {note}"] + doc["warnings"]
    for a in doc["artifacts"]:
        a["path"] = a["name"]
    return doc


def test_the_committed_replayed_phone_document_is_the_replay(tmp_path, monkeypatch):
    from mixformer_deploy.reports.bench_json import validate

    monkeypatch.setenv("ET_FILTER", "cat")
    doc = replay_phone(tmp_path)
    committed = json.loads(REPLAYED.read_text())
    assert validate(committed) == [] and committed["provenance"]["kind"] == "replayed"
    assert "replayed" in REPLAYED.name and committed["machine"]["slug"].startswith("replayed-")
    for key in ("machine", "provenance", "settings"):
        assert committed[key] == doc[key]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows]  # noqa: E731
    assert committed["results"] == doc["results"] and strip(committed["artifacts"]) == strip(doc["artifacts"])


def _fleet_files() -> list[Path]:
    """The bench/1 results recorded here, the H100 run, and the replayed phone."""
    here = [p for p in sorted(RESULTS.glob("*.json"))
            if json.loads(p.read_text()).get("schema") == "mixformer-deploy/bench/1" and p != REPLAYED]
    return here + sorted((RESULTS / "gpu-h100").glob("bench-*.json")) + [REPLAYED]


def _cli(*args):
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    return CliRunner().invoke(app, [str(a) for a in args])


def test_report_merges_a_fleet_into_one_page(tmp_path):
    pytest.importorskip("matplotlib")
    files = _fleet_files()
    assert len(files) >= 6
    out, table = tmp_path / "fleet" / "report.html", tmp_path / "comparison.md"
    r = _cli("report", *files, "--output", out, "--comparison", table)
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.strip().splitlines()[-1] == str(out)
    page, md = out.read_text(), table.read_text()
    for slug in ("amd-epyc-2c-2t", "intel-xeon-2c-2t", "intel-xeon-16c-16t-h100-80gb-hbm3",
                 "replayed-sm8550-test-phone-8c-2t"):
        assert f"<h2>{slug}</h2>" in page and f"| {slug} |" in md  # its section and its comparison rows
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Machine")]
    expected = sum(len({(r["artifact"], r.get("run")) for r in d["results"]}) for d in _docs(files))
    assert len(rows) == expected  # one row per (machine, artifact) of every file: nothing lost
    h100 = next(r for r in rows if r.startswith("| intel-xeon-16c-16t-h100"))
    assert "NVIDIA H100 80GB HBM3 (driver 580.159.04, cuda 13.0)" in h100 and "torch 2.11.0" in h100
    phone = [r for r in rows if r.startswith("| replayed-")]
    assert len(phone) == 2 and all(r.rstrip(" |").endswith("replayed") for r in phone)
    assert any("Android 15 (arm64-v8a)" in r and "SM8550 (Test Phone)" in r and "| 23.1 |" in r for r in phone)
    assert "Source" in page and "not a measurement" in page and "<h2>Machines side by side</h2>" in page


def _docs(files: list[Path]) -> list[dict]:
    from mixformer_deploy.reports.fleet import read_fleet_results

    return [d for f in files for d in read_fleet_results(f)]


def test_report_reads_the_benchmark_scripts_runs_and_refuses_other_schemas(tmp_path):
    from mixformer_deploy.reports.fleet import read_fleet_results

    runs = read_fleet_results(RESULTS / "mobile-amd-epyc-2c-2t.json")
    assert len(runs) == 2 and {d["schema"] for d in runs} == {"mixformer-deploy/bench/1"}
    for path, why in ((RESULTS / "gpu-h100" / "gpu_check.json", "bench-<machine>.json written beside it"),
                      (RESULTS / "tensorrt-onnx-amd-epyc.json", "no timings")):
        r = _cli("report", path, "--output", tmp_path / "r.md")
        assert r.exit_code == 4 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    unknown = tmp_path / "other.json"
    unknown.write_text(json.dumps({"schema": "someone-else/bench/7", "results": []}))
    r = _cli("report", unknown, "--output", tmp_path / "r.md")
    assert r.exit_code == 4 and len(r.stderr.strip().splitlines()) == 1
    assert "not a mixformer-deploy/bench/1 document" in r.stderr
    assert not (tmp_path / "r.md").exists()


def test_one_document_keeps_todays_report():
    """`bench --markdown` of one run: its section, no comparison table."""
    from mixformer_deploy.reports.markdown import bench_markdown

    doc = json.loads((RESULTS / "ncnn-intel-xeon-2c-2t.json").read_text())
    assert "Machines side by side" not in bench_markdown([doc])
    assert "Machines side by side" in bench_markdown([doc, json.loads(REPLAYED.read_text())])


if __name__ == "__main__":
    import tempfile

    os.environ["ET_FILTER"] = "cat"
    with tempfile.TemporaryDirectory() as work:
        from mixformer_deploy.reports.bench_json import write_results

        print(write_results(REPLAYED, replay_phone(Path(work))))
