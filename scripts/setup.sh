#!/usr/bin/env bash
# Create .venv (if missing) and install timellm-job into it. Usage: scripts/setup.sh [extras]
# torch is pinned to the CPU wheel these machines carry; any torch in pyproject's range works.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# a link or a venv that no longer runs (its Python moved or was removed) is made anew
if [ -L .venv ] || { [ -e .venv ] && ! .venv/bin/python -c '' 2>/dev/null; }; then
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.4,<2.15"
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
