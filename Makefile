# Two entry points on a fresh clone: `make run` (set up, export + check the shipped weights) and
# `make test` (set up, run the test suite). Set-up installs torch's CPU build first so that the
# dependency resolver never pulls a multi-GB CUDA build on a CPU machine; then every backend (`all`), then
# the test tools (`dev`): one resolution of both at once sends pip's resolver into a dead end.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[all]"
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/mixformer-deploy export

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "not gpu"

bench: setup
	$(BIN)/python benchmarks/onnx_speedup.py
	$(BIN)/python benchmarks/run_suite.py benchmarks/suite-cpu.toml
	$(BIN)/python benchmarks/openvino_bench.py
	$(BIN)/python benchmarks/aoti_bench.py
	$(BIN)/python benchmarks/mobile_bench.py
	$(BIN)/python benchmarks/onnx_fp16_keeps.py
	$(BIN)/python benchmarks/backbone_bench.py
	$(BIN)/python benchmarks/block_forms.py
	$(BIN)/python benchmarks/debug_budgets.py
	$(BIN)/python benchmarks/precision_search.py
	$(BIN)/python benchmarks/aoti_load.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
