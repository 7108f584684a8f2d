#!/usr/bin/env bash
# The package as users install it: build the wheel, install it with the onnx extra into a fresh virtual
# environment (torch's CPU build first), and run the CLI from a directory outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf dist
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w dist .
WHEEL=$(ls dist/mixformer_deploy-*.whl)
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
echo "wheel check passed: $(basename "$WHEEL") from $WORK (outside $REPO)"
