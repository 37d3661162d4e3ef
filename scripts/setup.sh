#!/usr/bin/env bash
# Create .venv (if missing) and install grape-jax with its test extras (CPU torch for parity tests).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import grape_jax, conversion, jax, flax, torch, transformers, pytest, hypothesis" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.grape-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch==2.13.0 is pinned in the test extra: on these machines it resolves to a local CPU wheel.
  # setuptools warns on every editable install ("BuildBackendWarning: Editable installation ..."), a
  # dozen alarming lines about nothing wrong: that one warning is filtered (by its message) for the
  # install only; every other warning and error still prints, and the import check below catches failures.
  PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import grape_jax, conversion, jax, flax, torch, transformers, pytest, hypothesis"
  touch .venv/.grape-installed
fi
