#!/usr/bin/env bash
# Core ML on a Mac: export B0/B1, gate parity on cpu_only / cpu_and_gpu / cpu_and_ne, benchmark; see mac_check.py.
#   benchmarks/mac_check.sh DIR [--variants B0,B1] [--size 224] [--budget-s 1200] [--quick]
# Needs macOS and Python with this project's coreml extra: pip install -e ".[coreml]"  (PYTHON=... to pick one).
# Writes mac_check.json, mac_check.log, bench-<machine>.json/.md and artifacts/ into DIR. Exit 3 off macOS.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 DIR [--variants B0,B1] [--size 224] [--budget-s S] [--quick]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$ROOT/benchmarks/mac_check.py" "$@"
