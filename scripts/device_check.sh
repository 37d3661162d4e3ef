#!/usr/bin/env bash
# Every GPU figure of the tokamax kernels and the accelerator goals in one run on one H100/H200, under 10 minutes; nothing is
# downloaded there. Needs python3 with jax[cuda], torch (CUDA), transformers, safetensors and grape-jax's
# other imports (flax, jaxtyping, ml_dtypes, optax, orbax, tokenizers); the project is used from this
# checkout. tokamax and the packages it needs that the device image lacks travel as wheels in .whl/
# (pure Python except pydantic-core). Prepare them once, here, in the repo root (not committed):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     tokamax==0.0.12 qwix==0.1.8 einshape==1.0 immutabledict==4.3.1 tensorboardx==2.6.5 typeguard==2.13.3 \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0
#
# (3.6 MB; check `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` if a version changes), then
# run it with the device tool: carry [".whl"], timeout_s 600, command `bash scripts/device_check.sh`.
# Without .whl/ the tokamax rows are skipped (reported as not installed) and the rest still runs.
#
# Each step has its own time limit, so one slow step loses only its own figures. Output: $OUT/*.txt
# (default ./device_check_out), one file per step, and the same on stdout.
#
#   1 convert          first-call load_hf of a 9.2 GB bf16 Mixtral-8x7B-dims checkpoint vs
#                      safetensors.torch to CUDA (goal: >= 80% of torch)
#   2 tokamax-grad     tokamax_mosaic / tokamax_triton vs dense in bf16 on the GPU: MoE output and the
#                      gradients healing takes (the CPU tests cover fp32 through tokamax's xla)
#   3 forward-mixtral  evaluation forward tokens/s, JAX dense / blocked / batched / ragged_dot(+pallas) /
#   4 forward-qwen3    tokamax_mosaic / tokamax_triton vs the transformers forward (grouped_mm), same run,
#                      Mixtral-8x7B and Qwen3-30B-A3B dims (goal: >= 1.2x at both)
#   5 heal-jax         healing steps/s (`heal`, dispatch auto: tokamax where installed), 1 layer at
#   6 heal-jax-no-tk   Mixtral-8x7B dims; then the same without tokamax (the earlier GPU kernel);
#   7 heal-torch       a PyTorch KD step, fp32 student with TF32 (like JAX's fp32 default) and
#   8 heal-torch-amp   bf16 autocast (goal: JAX >= 1.0x the PyTorch step)
#   9 e2e              the default pipeline (grape-l + fit) end to end at Mixtral-8x7B layer dims, export
#                      checked in transformers (not measured before)
# EXTRA=1 adds the earlier figures: ragged_dot under XLA's cuDNN ragged-dot fusion, and calibration.
# tokamax's fused attention is not tried here (not measured).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-device_check_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing .whl/ failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and jax share the GPU
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

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
from grape_jax.core import dispatch
try:
    tk = dispatch.tokamax_module()
    print(f"tokamax: {'not installed' if tk is None else 'imported from ' + tk.__file__}")
except Exception as e:  # an installed tokamax that does not import with this jax: say why, go on
    print(f"tokamax: installed but not importable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
cap = dispatch.compute_capability("gpu")
print(f"compute capability {cap}; dispatch='routed'/'auto' on this GPU runs {dispatch.grouped_matmul_kind('gpu')}")
PYEOF

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v "it/s\]\|Writing model shards\|Loading weights" "$OUT/$name.txt" | tail -n 40
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

tokamax_grad() {
  "$PY" - <<'PYEOF'
import jax, jax.numpy as jnp, numpy as np
from grape_jax.core import dispatch, transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.params import init_params

if dispatch.tokamax_module() is None:
    raise SystemExit("tokamax-grad: tokamax not installed")
cfg = MoEConfig(family="mixtral", vocab_size=8, hidden_size=1024, num_layers=1, num_heads=1, num_kv_heads=1,
                head_dim=64, moe_intermediate_size=512, num_experts=(64,), top_k=8)
p = "layers.0.mlp."
params = {n: jnp.asarray(v, jnp.bfloat16) for n, v in init_params(cfg, seed=0, scale=0.05).items() if n.startswith(p)}
x = jnp.asarray(np.random.default_rng(1).standard_normal((2048, 1024)), jnp.bfloat16)
probe = jnp.asarray(np.random.default_rng(2).standard_normal((2048, 1024)), jnp.bfloat16)

def grads(kind):
    loss = lambda prm, x: jnp.sum((transformer.moe_output(prm, p, cfg, x, dispatch=kind) * probe).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

ref_loss, (ref_p, ref_x) = grads("dense")
for kind in ("tokamax_mosaic", "tokamax_triton", "ragged_dot", "batched"):
    try:
        loss, (g_p, g_x) = grads(kind)
    except Exception as e:  # a kernel missing on this GPU / jax is a finding, not a stop
        print(f"{kind}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        continue
    worst = max(rel(g_p[k], ref_p[k]) for k in ref_p)
    print(f"{kind}: bf16 vs dense: loss {rel(loss, ref_loss):.1e}, dx {rel(g_x, ref_x):.1e}, d(params) max {worst:.1e}")
PYEOF
}

step convert 60 "$PY" scripts/bench_convert.py --device gpu
step tokamax-grad 50 tokamax_grad
step forward-mixtral 100 "$PY" scripts/bench_forward.py --device gpu --full --shape mixtral
step forward-qwen3 80 "$PY" scripts/bench_forward.py --device gpu --full --shape qwen3
step heal-jax 55 "$PY" scripts/bench_heal_step.py --framework jax --device gpu
step heal-jax-no-tk 45 "$PY" scripts/bench_heal_step.py --framework jax --device gpu --no-tokamax
step heal-torch 35 "$PY" scripts/bench_heal_step.py --framework torch --device gpu --torch fp32
step heal-torch-amp 35 "$PY" scripts/bench_heal_step.py --framework torch --device gpu --torch autocast
step e2e 110 "$PY" scripts/bench_e2e.py
if [ "${EXTRA:-0}" = 1 ]; then
  step forward-cudnn 50 env XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true \
    "$PY" scripts/bench_forward.py --device gpu --full --shape all --variants ragged_dot --no-torch --batches 8
  step calibration 70 "$PY" scripts/bench_calibration.py --device gpu
fi
echo "== device_check done; outputs in $OUT/"
