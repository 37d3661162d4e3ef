#!/usr/bin/env bash
# Every GPU figure of the accelerator goals in one run on one H200 (under 10 minutes; nothing downloaded).
# Needs python3 with jax[cuda], torch (CUDA), transformers, safetensors and grape-jax's other imports
# (flax, jaxtyping, ml_dtypes, optax, orbax, tokenizers); the project is used from this checkout.
# Each step has its own time limit, so one slow step loses only its own figures. Output: $OUT/*.txt
# (default ./device_check_out), one file per step, and the same on stdout.
#
#   1 convert      load_hf of a 9.2 GB bf16 Mixtral-8x7B-dims checkpoint vs safetensors.torch to CUDA
#                  (goal: >= 80% of torch, first call)
#   2 forward      evaluation forward tokens/s, JAX dense / blocked / batched / ragged_dot (/ Pallas) vs the
#                  transformers forward, Mixtral-8x7B dims (goal: >= 1.2x) and Qwen3-30B-A3B dims (>= 2x)
#   3 forward-cudnn  ragged_dot under XLA's cuDNN ragged-dot fusion flag, if this XLA knows the flag
#   4 calibration  bf16 calibration TFLOP/s vs a bf16 8192^3 matmul (goal: >= 50%), torch hooks on CUDA
#   5 e2e          the default pipeline (grape-l + fit) end to end at Mixtral-8x7B layer dims, export
#                  checked in transformers
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-device_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and jax share the GPU
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/environment.txt" || exit 1
import importlib.util, sys
need = ["jax", "torch", "transformers", "safetensors", "flax", "jaxtyping", "ml_dtypes", "numpy", "tokenizers"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"device_check: missing Python packages {missing}")
import jax, torch, transformers
print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}")
print(f"torch {torch.__version__} cuda {torch.cuda.is_available()} transformers {transformers.__version__}")
print(f"Pallas Triton ragged_dot lowering shipped: {importlib.util.find_spec('jax._src.lax.pallas_lowerings') is not None}")
if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    sys.exit("device_check: needs a GPU visible to both jax and torch")
PYEOF

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v "it/s\]\|Writing model shards" "$OUT/$name.txt" | tail -n 40
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

step convert 80 "$PY" scripts/bench_convert.py --device gpu
step forward-mixtral 80 "$PY" scripts/bench_forward.py --device gpu --full --shape mixtral
step forward-qwen3 70 "$PY" scripts/bench_forward.py --device gpu --full --shape qwen3
step forward-cudnn 50 env XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true \
  "$PY" scripts/bench_forward.py --device gpu --full --shape all --variants ragged_dot --no-torch --batches 8
step calibration 70 "$PY" scripts/bench_calibration.py --device gpu
step e2e 150 "$PY" scripts/bench_e2e.py
echo "== device_check done; outputs in $OUT/"
