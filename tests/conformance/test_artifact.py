"""What an export leaves: the artifact whole under its final name, its sidecar manifest, nothing else; and
the manifest inside the artifact, which travels with it when the sidecar does not."""

from __future__ import annotations

import json

import pytest

from conftest import artifact_bytes, backends, copy_artifact, costly, plan_of

from mixformer_deploy.artifact import read_manifest, sidecar_path, target_of

# What identifies an artifact and how to feed it: the embedded manifest must say what the sidecar says.
IMPORTANT = ("schema", "target", "runtime", "variant", "config", "num_classes", "labels", "input_size", "input",
             "batch", "precision", "preprocessing", "weights", "head", "created", "target_options",
             "rewrite_error_rel_l2")


@pytest.mark.parametrize("spec", backends(slow=costly))   # the costly ones' own modules export them in the default run
def test_export_writes_the_artifact_whole_under_its_final_name_with_a_sidecar(spec, exported):
    result = exported(spec)
    path, size = result.path, plan_of(spec).size
    assert path.name == f"mixformer-custom-{size}x{size}-b1-fp32{spec.suffix}"
    assert path.is_dir() == spec.is_dir, "a directory format writes a directory, a file format a file"
    files = artifact_bytes(spec, path)
    assert files and all(files.values()), "an empty file in the artifact"
    # nothing but the artifact and its sidecar: no temporary, no log, no '.failed' left in the folder
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, sidecar_path(path).name])
    side = json.loads(sidecar_path(path).read_text())
    assert side["target"] == spec.key and side["runtime"] == spec.runtime_for(path)
    assert side["precision"] == "fp32" and side["input_size"] == [size, size] and side["batch"] == 1
    assert side["size_bytes"] == sum(f.stat().st_size for f in spec.files(path)) > 0
    assert side == json.loads(json.dumps(result.manifest))
    assert target_of(path).key == spec.key


@pytest.mark.parametrize("spec", backends("embedded_manifest", slow=costly))
def test_the_embedded_manifest_says_what_the_sidecar_says(spec, exported, tmp_path):
    path = exported(spec).path
    side = json.loads(sidecar_path(path).read_text())
    embedded = spec.read_embedded(path)
    assert embedded is not None, "no manifest inside the artifact"
    assert {k: embedded.get(k) for k in IMPORTANT} == {k: side.get(k) for k in IMPORTANT}
    assert set(embedded) <= set(side), "the embedded manifest has keys the sidecar lacks"
    # it travels with the artifact: a copy under another name, without its sidecar, is still known
    copy = copy_artifact(path, tmp_path / f"renamed{spec.suffix}")
    assert not sidecar_path(copy).exists()
    assert target_of(copy).key == spec.key
    assert {k: read_manifest(copy).get(k) for k in IMPORTANT} == {k: side.get(k) for k in IMPORTANT}
