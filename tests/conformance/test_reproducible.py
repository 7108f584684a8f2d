"""Two exports of the same weights with the same options give the same bytes, with SOURCE_DATE_EPOCH set.
The second one runs in another process (another pid in the temporary names, another hash seed) with another
thread count (the manifest inside carries a measured error), except where the plan says why the thread
count is part of the artifact. One process makes the second export of every backend selected in this run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EPOCH, artifact_bytes, backends, costly, exports_here, plan_of, selected

TEST = "test_two_exports_give_the_same_bytes"

CHILD = r"""
import json, sys
import torch
from mixformer_deploy.export_api import export
out = {}
for job in json.loads(sys.argv[1]):
    torch.set_num_threads(job["threads"])
    try:
        out[job["key"]] = {"path": str(export(job["weights"], target=job["key"], img_size=job["size"],
                                              output=job["output"], check=False,
                                              target_options=job["options"] or None).path)}
    except Exception as e:
        out[job["key"]] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def second_exports(request, exported, weights_of, tmp_path_factory):
    jobs = []
    for spec in selected(request, TEST):
        if not exports_here(spec, exported):
            continue
        plan = plan_of(spec)
        jobs.append({"key": spec.key, "weights": str(weights_of(spec)), "size": plan.size,
                     "options": plan.target_options, "threads": 1 if plan.threads_shape_bytes else 2,
                     "output": str(tmp_path_factory.mktemp(f"again-{spec.key}"))})
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHONHASHSEED": "7"}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True, env=env,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", backends("reproducible", slow=costly))
def test_two_exports_give_the_same_bytes(spec, exported, second_exports):
    first = exported(spec).path           # in this process, one torch thread
    again = second_exports[spec.key]
    assert "error" not in again, again.get("error")
    second = Path(again["path"])
    assert second.name == first.name
    a, b = artifact_bytes(spec, first), artifact_bytes(spec, second)
    assert sorted(a) == sorted(b), "not the same files"
    assert [name for name in a if a[name] != b[name]] == [], "files that differ"
