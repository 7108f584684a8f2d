#!/usr/bin/env bash
# The package as users install it: build the wheel, install it with the onnx extra into a fresh virtual
# environment (torch's CPU build first), and run the CLI from a directory outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf dist
# sdist first, then the wheel from the sdist: what a package index would hold
.venv/bin/python -P -m build -q --no-isolation --outdir dist . > /dev/null
WHEEL=$(ls "$REPO"/dist/mixformer_deploy-*.whl)
.venv/bin/python -c "import sys, zipfile; sys.exit(not any(n.endswith('.safetensors') for n in zipfile.ZipFile(sys.argv[1]).namelist()))" "$WHEEL"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip install -q "torch==2.13.0"
"$WORK/venv/bin/python" -m pip install -q "${WHEEL}[onnx]"
cd "$WORK"
"$WORK/venv/bin/mixformer-deploy" export -q --output out > export.log
test -f "$(tail -n 1 export.log)"
"$WORK/venv/bin/mixformer-deploy" export -q --profile onnx-fp16 --no-check --output out > fp16.log
"$WORK/venv/bin/mixformer-deploy" parity -q "$(tail -n 1 fp16.log)" --inputs photos > /dev/null
"$WORK/venv/bin/mixformer-deploy" predict -q "$("$WORK/venv/bin/python" -c 'import mixformer_deploy.shipped as s; print(next(iter(sorted(s.EXAMPLES_DIR.glob("*.png")))))')" > /dev/null
# one extra on its own, as users install it: the TensorRT-ready ONNX needs nothing from `dev`
"$WORK/venv/bin/python" -m pip install -q "${WHEEL}[tensorrt]"
"$WORK/venv/bin/mixformer-deploy" export -q --target trt --precision fp16 --onnx-only --output out > trt.log
test -f "$(tail -n 1 trt.log)"
echo "wheel check passed: $(basename "$WHEEL") from $WORK (outside $REPO)"
