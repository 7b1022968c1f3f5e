#!/usr/bin/env bash
# The test command: set up ./.venv (scripts/setup.sh), lint (ruff), type-check (mypy; settings in
# pyproject.toml) and run the default test suite (offline, CPU-only; `slow` and `gpu` tests are
# deselected by pyproject's addopts; the layering rules are tests/test_layering.py).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${ARMOR_VENV:-.venv}/bin/python" -m ruff check src harness tests benchmarks examples
"${ARMOR_VENV:-.venv}/bin/python" -m mypy
exec "${ARMOR_VENV:-.venv}/bin/python" -m pytest -q "$@"
