"""Running an artifact never imports an exporter (converters cost seconds to import and may be missing): a
fresh interpreter opens a runner on each backend's artifact and runs parity on it, and no
``mixformer_deploy.backends.<key>.export`` module (nor export_api) is loaded by that. One process for every
backend selected in this run; each backend's imports are attributed to it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import backends, exports_here, selected

TEST = "test_running_an_artifact_never_imports_an_exporter"

CHILD = r"""
import json, sys
jobs = json.loads(sys.argv[1])
from mixformer_deploy.backends import open_runner
from mixformer_deploy.errors import MixformerDeployError
from mixformer_deploy.parity import check_parity


def exporters():
    return {m for m in sys.modules if m == "mixformer_deploy.export_api"
            or (m.startswith("mixformer_deploy.backends.") and (m.endswith(".export") or ".export." in m))}


out = {"at_start": sorted(exporters())}
for job in jobs:
    before, rec = exporters(), {}
    try:
        runner = open_runner(job["path"], threads=1)
        rec["runner"] = type(runner).__module__
        runner.close()
        report = check_parity(job["path"], weights=job["weights"], inputs=["random"], random_count=2,
                              threads=1)
        rec["parity"] = bool(report.passed)
        rec["failures"] = list(report.failures)[:3]
    except MixformerDeployError as e:
        rec["error"], rec["exit_code"] = f"{type(e).__name__}: {e}", e.exit_code
    except Exception as e:   # a bug in a runner: reported, and the other backends still run
        rec["error"], rec["exit_code"] = f"{type(e).__name__}: {e}", 70
    rec["imported"] = sorted(exporters() - before)
    out[job["key"]] = rec
if jobs:   # the check itself: importing an exporter is seen
    import importlib
    importlib.import_module(jobs[0]["package"] + ".export")
    out["seen_after_import"] = sorted(exporters())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_runs(request, exported, weights_of):
    """One fresh interpreter over the artifacts of every backend this run selected for the test."""
    jobs = [{"key": spec.key, "package": spec.package, "path": str(exported(spec).path),
             "weights": str(weights_of(spec))} for spec in selected(request, TEST) if exports_here(spec, exported)]
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# AOTInductor's conformance export is a C++ compile (~20 s) that no other default test needs: slow run only
@pytest.mark.parametrize("spec", backends(slow=lambda s: s.key == "aoti"))
def test_running_an_artifact_never_imports_an_exporter(spec, exported, fresh_runs):
    exported(spec)   # skips or fails as the export does
    assert fresh_runs["at_start"] == [], "importing the registry and parity loads exporters"
    assert fresh_runs["seen_after_import"], "the check does not see an exporter that is imported"
    rec = fresh_runs[spec.key]
    assert rec["imported"] == [], f"running a {spec.key} artifact imported {rec['imported']}"
    from mixformer_deploy.backends import runner_class

    runner = runner_class(spec.runtime_for(exported(spec).path))
    if "error" in rec:
        assert not runner.status().get("can_run") and rec["exit_code"] == 3, rec["error"]
        return   # covered up to what runs here (e.g. Core ML prediction needs macOS)
    assert rec["runner"] == runner.__module__
    assert rec["parity"], rec["failures"]
