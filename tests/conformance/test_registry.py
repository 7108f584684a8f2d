"""The registry: it fills itself from entry points (a backend another distribution installs is a target
like the built-in ones), and under CI every backend of the ``all`` extra imports (a broken install fails
here instead of passing as skips)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from mixformer_deploy.backends import ENTRY_POINT_GROUP, all_specs

FAKE_SPEC = '''
from dataclasses import dataclass

from mixformer_deploy.backends.spec import FP32, BackendSpec, Options, option


@dataclass(frozen=True)
class FakeOptions(Options):
    fake_level: int = option(1, "How fake (default 1).")


class FakeSpec(BackendSpec):
    key = "fake"
    suffix = ".fake"
    extra = "fake"
    runtime = "fakeruntime"
    runners = {"fakeruntime": "FakeRunner"}
    exporter_name = "FakeExporter"
    precisions = ("fp32",)
    tolerances = {"fp32": FP32}
    Options = FakeOptions
    versions = ("fake-backend",)
    capabilities = frozenset({"reproducible"})


SPEC = FakeSpec()
'''

CHILD = """
import json
from mixformer_deploy.backends import all_specs, get_spec, keys, option_owners, runtime_keys, spec_of_runtime
fake = get_spec("fake")
print(json.dumps({"exporting": [s.key for s in all_specs(exporting=True)], "keys": keys(),
                  "class": type(fake).__module__, "options": option_owners()["fake_level"][1],
                  "runtime": spec_of_runtime("fakeruntime").key, "runtimes": runtime_keys(),
                  "status": fake.status()["version"]}))
"""


def _distribution(root, name: str, entry: str):
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry}\n")


def _child(root, code: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_the_registry_fills_itself_from_entry_points(tmp_path):
    (tmp_path / "fakebackend").mkdir()
    (tmp_path / "fakebackend" / "__init__.py").write_text("")
    (tmp_path / "fakebackend" / "spec.py").write_text(FAKE_SPEC)
    _distribution(tmp_path, "fake_backend", "fake = fakebackend.spec:SPEC")
    r = _child(tmp_path, CHILD)
    assert r.returncode == 0, r.stderr[-1500:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    builtin = [s.key for s in all_specs(exporting=True)]
    assert sorted(got["exporting"]) == sorted(builtin + ["fake"]) and got["keys"] == got["exporting"]
    assert [k for k in got["exporting"] if k != "fake"] == builtin, "the built-ins' order changed"
    assert got["class"] == "fakebackend.spec" and got["options"] == ["fake"]
    assert got["runtime"] == "fake" and "fakeruntime" in got["runtimes"]
    assert got["status"] == "0.1"   # its own distribution's version
    assert "fake" not in builtin, "the entry point leaked into this process"


def test_an_entry_point_that_claims_a_built_in_key_is_refused(tmp_path):
    (tmp_path / "clash").mkdir()
    (tmp_path / "clash" / "__init__.py").write_text(
        "from mixformer_deploy.backends.spec import BackendSpec\n\n"
        "class Clash(BackendSpec):\n    key = 'onnx'\n    exporter_name = 'X'\n\nSPEC = Clash()\n")
    _distribution(tmp_path, "clash_backend", "clash = clash:SPEC")
    r = _child(tmp_path, "from mixformer_deploy.backends import all_specs; all_specs()")
    assert r.returncode != 0 and "two backends claim the key 'onnx'" in r.stderr, r.stderr[-800:]


# ---------------------------------------------------------------- CI: every backend of `all` installs

def _all_extra() -> set[str]:
    """The extras the ``all`` extra pulls in, from the installed distribution's metadata."""
    out: set[str] = set()
    for req in metadata.requires("mixformer-deploy") or []:
        name, _, marker = req.partition(";")
        if re.search(r"""extra\s*==\s*["']all["']""", marker):
            m = re.search(r"\[([^\]]*)\]", name)
            out |= {e.strip() for e in m.group(1).split(",")} if m else set()
    return out


@functools.cache
def _top_level() -> dict[str, list[str]]:
    """Installed distribution (normalized name) -> its top-level modules."""
    out: dict[str, list[str]] = {}
    for mod, dists in metadata.packages_distributions().items():
        for d in dists:
            if mod.isidentifier():
                out.setdefault(re.sub(r"[-_.]+", "-", d).lower(), []).append(mod)
    return out


def _modules_of(dist: str) -> list[str]:
    return sorted(_top_level().get(re.sub(r"[-_.]+", "-", dist).lower(), []))


def test_every_backend_of_the_all_extra_imports():
    extras = _all_extra()
    assert extras, "no `all` extra in the installed metadata"
    broken = []
    for spec in all_specs():
        if spec.extra not in extras:
            continue
        for i, dist in enumerate(spec.versions):
            modules = _modules_of(dist)
            if not modules or importlib.util.find_spec(modules[0]) is None:
                broken.append(f"{spec.key}: {dist} is not installed")
                continue
            if i == 0:   # the backend's own package: imported, not only found
                main = dist.replace("-", "_") if dist.replace("-", "_") in modules else modules[0]
                try:
                    importlib.import_module(main)
                except Exception as e:   # noqa: BLE001 - any import failure is a broken install
                    broken.append(f"{spec.key}: import {main} fails: {type(e).__name__}: {e}")
    if broken and not os.environ.get("CI"):
        pytest.skip("not under CI; these backends' tests skip here: " + "; ".join(broken))
    assert not broken, textwrap.shorten("; ".join(broken), 2000)
