#!/usr/bin/env bash
# One bounded check on a GPU machine (parity of the torch deploy form, then latency); see gpu_check.py.
#   benchmarks/gpu_check.sh DIR [--device cpu] [--budget-s S]
# Needs only Python with torch, numpy (and optionally matplotlib); the project's code comes from this
# checkout via PYTHONPATH. Hard cap: 5 minutes. Writes at most 5 files into DIR.
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
