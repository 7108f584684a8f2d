#!/usr/bin/env bash
# One bounded check on a GPU machine: parity of the shipped weights on the held-out digits through every GPU
# path (torch runtime, AOTInductor CUDA), then B1 latency (eager reference, deploy form from CUDA graphs,
# AOTInductor), the fp16 roofline, and a bench/1 document for `mixformer-deploy report`; see gpu_check.py.
#   benchmarks/gpu_check.sh DIR [--device cpu] [--budget-s S] [--dry-run]
# Needs only Python with torch, numpy (and optionally matplotlib) and a C++ compiler (AOTInductor); the
# project's code comes from this checkout via PYTHONPATH. Hard cap: 5 minutes (the plan fits a 270 s budget,
# counted from the process start; `--dry-run` prints it). Writes 5 files into DIR.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 DIR [--device cpu] [--budget-s S]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$1"
shift
mkdir -p "$DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec timeout --kill-after=10 300 "${PYTHON:-python3}" "$ROOT/benchmarks/gpu_check.py" "$DIR" "$@"
