"""Calibration throughput, FLOP efficiency and memory against a plain PyTorch reference.

One random transformers MixtralForCausalLM (default: d 1024, 16 heads / 8 KV heads, 8 experts top-2,
f 2048, 4 layers, vocab 1024, fp32, ~0.8 B parameters) is saved to a temp dir and loaded with `load_hf`;
the same random token blocks feed, in one run:

  (a) ours   `calibrate` (after a warm-up call on two batches whose time, mostly XLA compile, is reported
             apart: the first and later steps compile separately, see `run_ours`); tokens/s over the whole
             call (step loop + finalize, which includes the data-free weight cosine) and of the loop alone.
  (b) torch  the transformers model with a forward hook on every MoE block that, on the block input,
             computes the router's top-k (routing frequency) and runs ALL experts on ALL tokens with the
             model's own fused weights (`experts.gate_up_proj [E, 2f, d]`, `experts.down_proj [E, d, f]`,
             transformers 5.x layout), then accumulates linear-CKA statistics in the same form ours uses:
             exact mode: the exact streaming cross-moments Σ y_i y_jᵀ (i <= j) and Σ y_i, CKA at the end;
             minibatch mode: unbiased HSIC_1 of the Gram matrices per token chunk, summed.
             torch.set_num_threads(os.cpu_count()). (The model's own sparse top-k MoE forward also runs:
             that is what a hook-based reference costs.) Ours computes more statistics per token (gate mass,
             REAP, router correlation, routed moments); they are O(E²d) per token, negligible here.
  (c) ours/torch ratio (goal >= 2x); achieved GFLOP/s of ours, counted by `calibration_flops` below, vs a
      plain fp32 jnp matmul measured in the same run (goal >= 50%).
  (d) peak RSS of ours on N and 8N tokens, each in its own child process (ru_maxrss from wait4): it must
      stay flat (token chunks bound the working set; the parameters dominate).
It asserts that ours and the reference agree on every layer's routing frequencies (same tokens) and
prints the largest CKA difference.

    python scripts/bench_calibration.py                  # CPU, ~5 min on 2 cores
    python scripts/bench_calibration.py --device gpu     # GPU: bf16 model, 65k tokens, TFLOP/s
    python scripts/bench_calibration.py --gradients      # ours with the gradient sensitivities (grape-l)

Ours runs without the gradient sensitivities unless `--gradients` (the reference computes none; the
library's default computes them, about one more forward and a backward per batch).

On GPU (`--device gpu`) the model is bf16 (`--dtype`), ours calibrates in the checkpoint's dtype
(bf16 experts and statistics matmuls, fp32 sums; `CalibrationOptions.compute_dtype`), the reference runs
the same hooks on CUDA in the model's dtype, and (c)'s matmul reference is a bf16 jnp matmul at
(4 x --matmul-n)^3 = 8192^3 (plus fp32 HIGHEST for scale). Routing frequencies are then reported, not
asserted: ours routes with an fp32 router and residual stream, the bf16 reference does not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# ----------------------------------------------------------------------------- model


def build_and_save(args: argparse.Namespace, path: str):
    """Random transformers Mixtral in `args.dtype` (norm weights perturbed so they matter), saved to `path`."""
    import torch
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(4096, args.seq_len),
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = transformers.MixtralForCausalLM._from_config(config, attn_implementation="sdpa")
    model = model.to(getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


# ----------------------------------------------------------------------------- FLOP count


def calibration_flops(cfg, *, seq_len: int, cka: str, chunk: int) -> dict[str, float]:
    """FLOPs per calibration token of one `calibration_step`, by part, summed over the MoE layers.

    Counted as the step executes them (multiply-add = 2 FLOPs), per token per layer:
      attention   q/k/v/o projections 2d(2·hq·hd + 2·hkv·hd) + scores and P·V over the full seq_len² square
                  (4·seq_len·hq·hd; the causal mask is applied after, so the masked half is computed too);
      router      2dE;
      experts     every expert on every token: gate, up [d→f] and down [f→d] = 6·E·d·f, + dense combine 2Ed;
      stats       exact CKA: 2·P·d² with P = E(E+1)/2 pairs (Σ y_i y_jᵀ), or minibatch HSIC: the Gram
                  2·E·c·d and the pair contraction 2·E²·c (c = chunk); plus routed moments 2E²d + Ed,
                  ‖y‖² 2Ed, Σy Ed, router outer product 2E².
    Embedding lookup, norms, RoPE, softmax and elementwise SwiGLU are not counted (O(d) per token).
    No LM head: calibration stops after the last decoder layer."""
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    parts = dict(attention=0.0, router=0.0, experts=0.0, stats_cka=0.0, stats_other=0.0)
    for layer in range(cfg.num_layers):
        parts["attention"] += 2 * d * (2 * hq * hd + 2 * hkv * hd) + 4 * seq_len * hq * hd
        e = cfg.num_experts[layer]
        if not e:
            parts["experts"] += 6 * d * cfg.dense_intermediate_size
            continue
        parts["router"] += 2 * d * e
        parts["experts"] += 6 * e * d * f + 2 * e * d
        if cka == "exact":
            parts["stats_cka"] += 2 * (e * (e + 1) // 2) * d * d
        else:
            parts["stats_cka"] += 2 * e * chunk * d + 2 * e * e * chunk + 2 * e * d
        parts["stats_other"] += 2 * e * e * d + e * d + 2 * e * d + e * d + 2 * e * e
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------- matmul references


def jnp_matmul_flops(n: int, repeat: int, precision=None, dtype: str = "float32") -> float:
    """FLOP/s of one jitted [n, n] @ [n, n] in `dtype` on the default JAX backend (best of `repeat`)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def torch_matmul_flops(n: int, repeat: int) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- torch reference


class TorchCalibration:
    """Forward hooks on every MixtralSparseMoeBlock: routing counts and CKA statistics of all experts."""

    def __init__(self, model, *, cka: str, chunk: int, device: str = "cpu"):
        import torch

        self.cka, self.chunk = cka, chunk
        self.blocks = [layer.mlp for layer in model.model.layers]
        cfg = model.config
        e, d = cfg.num_local_experts, cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.iu, self.ju = np.triu_indices(e)
        self.state = []
        for _ in self.blocks:
            self.state.append(
                dict(
                    n=0,
                    count=torch.zeros(e, dtype=torch.float64, device=device),
                    y_sum=torch.zeros(e, d, device=device),
                    moments=torch.zeros(len(self.iu), d, d, device=device) if cka == "exact" else None,
                    hsic=torch.zeros(e, e, dtype=torch.float64, device=device),
                )
            )
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]

    def _hook(self, index: int):
        import torch
        import torch.nn.functional as F

        def hook(module, inputs, output):
            st = self.state[index]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            logits = F.linear(x, module.gate.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            _, top = torch.topk(probs, self.top_k, dim=-1)
            st["count"] += torch.bincount(top.reshape(-1), minlength=probs.shape[1]).double()
            st["n"] += x.shape[0]
            ex = module.experts
            ys = []
            for e in range(ex.gate_up_proj.shape[0]):
                gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
                ys.append(F.linear(F.silu(gate) * up, ex.down_proj[e]))
            y = torch.stack(ys)  # [E, T, d]
            st["y_sum"] += y.sum(dim=1).float()
            if self.cka == "exact":
                for p, (i, j) in enumerate(zip(self.iu, self.ju)):
                    st["moments"][p] += (y[i].T @ y[j]).float()
            else:
                for s in range(0, y.shape[1], self.chunk):
                    st["hsic"] += self._hsic(y[:, s : s + self.chunk].float()).double()

        return hook

    @staticmethod
    def _hsic(y):
        """Unbiased HSIC_1 of every expert pair's linear Gram over one minibatch (Song et al. 2012)."""
        import torch

        n = y.shape[1]
        if n < 4:
            return torch.zeros(y.shape[0], y.shape[0])
        y = y - y.mean(dim=1, keepdim=True)
        k = y @ y.transpose(1, 2)
        k = k - torch.diag_embed(torch.diagonal(k, dim1=1, dim2=2))
        rows = k.sum(dim=2) / (n - 2)
        total = k.sum(dim=(1, 2)) / ((n - 1) * (n - 2))
        u = k - rows[:, :, None] - rows[:, None, :] + total[:, None, None]
        u = u - torch.diag_embed(torch.diagonal(u, dim1=1, dim2=2))
        return torch.einsum("eab,fab->ef", u, u) / (n * (n - 3))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def results(self) -> list[dict[str, np.ndarray]]:
        out = []
        for st in self.state:
            n = st["n"]
            st = {k: v.cpu() if hasattr(v, "cpu") else v for k, v in st.items()}
            if self.cka == "exact":
                ysum = st["y_sum"].double()
                c = st["moments"].double() - ysum[self.iu][:, :, None] * ysum[self.ju][:, None, :] / n
                frob = (c * c).sum(dim=(1, 2)).numpy()
                num = np.zeros((ysum.shape[0],) * 2)
                num[self.iu, self.ju] = frob
                num[self.ju, self.iu] = frob
            else:
                num = st["hsic"].numpy()
            scale = np.sqrt(np.clip(np.diag(num), 0, None))
            cka = num / np.outer(scale, scale)
            np.fill_diagonal(cka, 1.0)
            out.append(dict(freq=st["count"].numpy() / n, cka=cka, n=n))
        return out


def run_torch(model, blocks: np.ndarray, args, cka: str, chunk: int) -> tuple[float, list[dict]]:
    """Warm up on one batch, then time the reference over all blocks; returns (seconds, results)."""
    import torch

    gpu = args.device == "gpu"
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if gpu else "cpu"
    model = model.to(dev)
    bs = args.batch_size

    def sync():
        if gpu:
            torch.cuda.synchronize()

    with torch.inference_mode():
        warm = TorchCalibration(model, cka=cka, chunk=chunk, device=dev)
        model(input_ids=torch.as_tensor(blocks[:bs], dtype=torch.long, device=dev))
        warm.remove()
        ref = TorchCalibration(model, cka=cka, chunk=chunk, device=dev)
        sync()
        t0 = time.perf_counter()
        for s in range(0, blocks.shape[0], bs):
            model(input_ids=torch.as_tensor(blocks[s : s + bs], dtype=torch.long, device=dev))
        sync()
        seconds = time.perf_counter() - t0
        ref.remove()
    results = ref.results()
    model.to("cpu")
    if gpu:
        torch.cuda.empty_cache()
    return seconds, results


# ----------------------------------------------------------------------------- ours


def run_ours(model_dir: str, blocks: np.ndarray, args) -> dict:
    """load_hf + warm-up calibrate on one batch + timed calibrate on all blocks."""
    import jax

    from conversion.load import load_hf
    from grape_jax.calibration.calibrate import calibrate, calibration_step_jit
    from grape_jax.calibration.options import CalibrationOptions, choose_cka_mode
    from grape_jax.core.model import param_view

    t0 = time.perf_counter()
    loaded = load_hf(model_dir)
    jax.block_until_ready(param_view(loaded))
    load_s = time.perf_counter() - t0
    opts = CalibrationOptions(
        batch_size=args.batch_size, token_chunk=args.token_chunk, cka=args.cka, gradients=args.gradients
    )
    # Warm up on two batches: the first step gets freshly created (uncommitted) accumulators, later steps
    # the step's own committed outputs, and jit compiles one executable for each (see the report).
    before = calibration_step_jit._cache_size()
    t0 = time.perf_counter()
    calibrate(loaded, blocks[: 2 * args.batch_size], options=opts, progress=False)
    warm_s = time.perf_counter() - t0
    mid = calibration_step_jit._cache_size()
    t0 = time.perf_counter()
    stats = calibrate(loaded, blocks, options=opts, progress=False)
    seconds = time.perf_counter() - t0
    return dict(
        cfg=loaded.cfg,
        stats=stats,
        load_s=load_s,
        warm_s=warm_s,
        seconds=seconds,
        loop_s=stats.meta["calibration"]["seconds"],
        compiled=mid - before,
        recompiled=calibration_step_jit._cache_size() - mid,
        cka=choose_cka_mode(loaded.cfg, opts),
        chunk=stats.meta["calibration"]["token_chunk"],
        compute_dtype=stats.meta["calibration"]["compute_dtype"],
        param_bytes=sum(int(v.nbytes) for v in param_view(loaded).values()),
    )


def child_memory(model_dir: str, num_tokens: int, args) -> None:
    """Child process of (d): calibrate on `num_tokens` tokens, print one JSON line."""
    blocks = random_blocks(args, num_tokens)
    r = run_ours(model_dir, blocks, args)
    print(
        json.dumps(
            dict(
                tokens=int(blocks.size),
                seconds=r["seconds"],
                param_bytes=r["param_bytes"],
                self_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            )
        )
    )


def measure_memory(model_dir: str, num_tokens: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", model_dir, str(num_tokens)]
    cmd += ["--gradients"] if args.gradients else []
    for k in ("batch_size", "seq_len", "token_chunk", "cka", "vocab", "seed"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"memory child for {num_tokens} tokens failed (exit {proc.returncode})")
    info = json.loads(out.strip().splitlines()[-1])
    info["maxrss_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB
    return info


def random_blocks(args, num_tokens: int) -> np.ndarray:
    n = max(1, num_tokens // args.seq_len)
    return np.random.default_rng(args.seed).integers(0, args.vocab, size=(n, args.seq_len), dtype=np.int32)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="model dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--token-chunk", type=int, default=512)
    ap.add_argument("--cka", choices=("auto", "exact", "minibatch"), default="auto")
    ap.add_argument("--tokens", type=int, default=0, help="tokens timed in (a)/(b); 0: 2048 on CPU, 65536 on GPU")
    ap.add_argument("--mem-tokens", type=int, default=1024, help="N of (d) (runs N and 8N)")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradients", action="store_true", help="ours also accumulates the gradient sensitivities")
    ap.add_argument("--child-memory", nargs=2, metavar=("DIR", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    return args


def row(name: str, *values) -> str:
    return "| " + " | ".join([name, *map(str, values)]) + " |"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_memory:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        child_memory(args.child_memory[0], int(args.child_memory[1]), args)
        return
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:  # torch and jax share the GPU: no preallocation of 75% of its memory by XLA
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.device == "gpu":
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if not gpus:
            raise SystemExit(
                "bench_calibration: --device gpu asked for, but JAX finds no GPU backend here "
                f"(backends: {jax.default_backend()}); run without --device on CPU"
            )
    tokens = args.tokens or (65536 if args.device == "gpu" else 2048)
    blocks = random_blocks(args, tokens)
    ntok = int(blocks.size)
    load = os.getloadavg()
    print(f"# bench_calibration  device={jax.devices()[0]}  cpus={os.cpu_count()}  loadavg={load[0]:.2f}")
    print(
        f"# model: Mixtral d={args.hidden} f={args.intermediate} E={args.experts} top-{args.top_k} "
        f"L={args.layers} heads={args.heads}/{args.kv_heads} vocab={args.vocab} {args.dtype}; "
        f"tokens {blocks.shape[0]} x {args.seq_len} = {ntok}, batch {args.batch_size}, gradients {args.gradients}"
    )

    with tempfile.TemporaryDirectory(prefix="bench_calib_") as tmp:
        model_dir = os.path.join(tmp, "mixtral")
        t0 = time.perf_counter()
        model = build_and_save(args, model_dir)
        print(f"# built and saved the transformers model in {time.perf_counter() - t0:.1f} s")

        from conversion.families import get_family
        from conversion.hf_dir import read_hf_config
        from grape_jax.calibration.options import CalibrationOptions, choose_cka_mode

        hf = read_hf_config(model_dir)
        cfg0 = get_family(hf["model_type"]).config_from_hf(hf)
        cka = choose_cka_mode(cfg0, CalibrationOptions(token_chunk=args.token_chunk, cka=args.cka))
        chunk = min(args.token_chunk, args.batch_size * args.seq_len)
        torch_s, ref = run_torch(model, blocks, args, cka, chunk)
        torch_mm = torch_matmul_flops(args.matmul_n, 5) if args.device == "cpu" else None
        del model
        gc.collect()

        ours = run_ours(model_dir, blocks, args)
        cfg = ours["cfg"]
        flops = calibration_flops(cfg, seq_len=args.seq_len, cka=ours["cka"], chunk=ours["chunk"])
        mm = jnp_matmul_flops(args.matmul_n, 5)
        mm_highest = mm_bf16 = None
        if args.device == "gpu":
            mm_highest = jnp_matmul_flops(args.matmul_n * 4, 10, jax.lax.Precision.HIGHEST)
            mm = jnp_matmul_flops(args.matmul_n * 4, 10)
            mm_bf16 = jnp_matmul_flops(args.matmul_n * 4, 10, dtype="bfloat16")

        ours_tps = ntok / ours["seconds"]
        achieved = flops["total"] * ntok / ours["seconds"]
        unit, scale = ("TFLOP/s", 1e12) if args.device == "gpu" else ("GFLOP/s", 1e9)
        print(
            f"# CKA mode: {ours['cka']} (token chunk {ours['chunk']}); FLOPs per token (counted): "
            + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in flops.items())
        )
        print(
            f"# ours computes in {ours['compute_dtype']}; load_hf {ours['load_s']:.1f} s; "
            f"warm-up calibrate on two batches (compile + 2 steps + "
            f"finalize) {ours['warm_s']:.1f} s; calibration_step executables compiled in the warm-up: "
            f"{ours['compiled']}, in the timed call: {ours['recompiled']}"
        )
        print()
        print("| measurement | value |")
        print("|---|---|")
        per_batch = ours["seconds"] / (ntok / (args.batch_size * args.seq_len))
        print(
            row(
                f"ours: compile ({ours['compiled']} executables; warm-up call minus two timed batches)",
                f"{ours['warm_s'] - 2 * per_batch:.1f} s",
            )
        )
        print(
            row(
                "ours: calibrate tokens/s",
                f"{ours_tps:.1f} ({ntok} tok in {ours['seconds']:.2f} s; step loop {ours['loop_s']:.2f} s)",
            )
        )
        if torch_s is not None:
            torch_tps = ntok / torch_s
            where = "CUDA" if args.device == "gpu" else f"{os.cpu_count()} threads"
            print(row(f"torch reference tokens/s ({where}, {args.dtype})", f"{torch_tps:.1f} ({torch_s:.2f} s)"))
            print(row("ratio ours / torch (goal >= 2x)", f"{ours_tps / torch_tps:.2f}x"))
        print(
            row(
                f"ours achieved {unit} (whole call; step loop only)",
                f"{achieved / scale:.2f}; {flops['total'] * ntok / ours['loop_s'] / scale:.2f}",
            )
        )
        if mm_highest is not None:
            n4 = args.matmul_n * 4
            print(row(f"jnp bf16 matmul {n4}^3 {unit}", f"{mm_bf16 / scale:.2f}"))
            print(
                row(
                    f"jnp fp32 matmul {n4}^3 {unit} (default precision; HIGHEST)",
                    f"{mm / scale:.2f}; {mm_highest / scale:.2f}",
                )
            )
            print(row("ours / bf16 matmul (goal >= 50%)", f"{100 * achieved / mm_bf16:.0f}%"))
        else:
            print(row(f"jnp fp32 matmul {args.matmul_n}^3 {unit}", f"{mm / scale:.2f}"))
            print(row(f"torch fp32 matmul {args.matmul_n}^3 {unit}", f"{torch_mm / scale:.2f}"))
            print(row("ours / jnp matmul (goal >= 50%)", f"{100 * achieved / mm:.0f}%"))

        if ref is not None:
            worst_counts, worst_cka = 0.0, 0.0
            for layer, r in zip(ours["stats"].layers, ref):
                diff = np.abs(layer.freq - r["freq"]) * r["n"]  # routing decisions that differ
                worst_counts = max(worst_counts, float(diff.max()))
                worst_cka = max(worst_cka, float(np.abs(layer.sim["cka"] - r["cka"]).max()))
                assert layer.num_tokens == r["n"], (layer.num_tokens, r["n"])
                assert args.dtype != "float32" or diff.max() <= max(2, 1e-3 * r["n"]), (
                    f"layer {layer.layer}: routing frequencies differ: ours {layer.freq} torch {r['freq']}"
                )
            asserted = "asserted" if args.dtype == "float32" else "reported: bf16 reference"
            print(row(f"routing freq ours vs torch ({asserted})", f"max |Δcount| {worst_counts:.0f} of {ntok} tokens"))
            print(row("CKA ours vs torch", f"max |Δ| {worst_cka:.1e}"))

        if args.device == "cpu" and args.mem_tokens:
            for n in (args.mem_tokens, 8 * args.mem_tokens):
                m = measure_memory(model_dir, n, args)
                print(
                    row(
                        f"peak RSS ours, {m['tokens']} tokens (child)",
                        f"{m['maxrss_bytes'] / 2**30:.2f} GiB (params {m['param_bytes'] / 2**30:.2f} GiB; "
                        f"{m['tokens'] / m['seconds']:.1f} tok/s)",
                    )
                )
    print(f"# loadavg at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
