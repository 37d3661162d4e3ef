"""Evaluation forward throughput: routed vs dense MoE dispatch vs the transformers forward, one run.

For each shape (`mixtral`: few large experts; `qwen3`: many fine-grained experts) a random transformers
model is built (fp32 on CPU, bf16 on GPU; norm weights perturbed), saved, and loaded with `load_hf`;
the same random token batches then go through, in one process:

  jax dense     `grape_jax.core.model.logits(..., dispatch="dense")`: every expert on every token;
  jax blocked / ragged_dot
                each token through its top-k experts by that grouped matmul (`grape_jax.core.dispatch`; on
                GPU also `ragged_dot+pallas`, ragged_dot through the Pallas Triton lowering, where the
                installed jax ships it); the title line says which one `dispatch="routed"` and
                `dispatch="auto"` (what evaluation uses by default) run here;
  jax tokamax_mosaic / tokamax_triton / tokamax_xla
                the same through `tokamax.ragged_dot` where tokamax is installed (mosaic on Hopper GPUs,
                triton on any GPU, xla on request: on CPU it is `jax.lax.ragged_dot` again);
  transformers  the model's own forward (its default experts implementation, printed), torch threads =
                CPU count on CPU.

Tokens/s exclude compilation (one warm-up batch, timed apart). Every JAX variant's logits are checked
against dense on the first batch and the transformers logits against JAX dense (max |diff| relative to
the logits' scale is printed; the routed variants must agree with dense to fp32/bf16 rounding).

`--sweep` times the MoE block alone (dense / blocked / batched / ragged_dot, and tokamax_xla where tokamax
is installed; fp32) over a grid of shapes on the chosen backend and prints what `dispatch="auto"` picks
for each: the measurements behind the CPU rule in `grape_jax/core/dispatch.py`.

    python scripts/bench_forward.py                       # CPU, small shapes, about a minute on 2 cores
    python scripts/bench_forward.py --sweep               # CPU, MoE block only, the auto rule's grid
    python scripts/bench_forward.py --demo                # CPU, the embedded demo model's evaluation
    python scripts/bench_forward.py --device gpu --full   # Mixtral-8x7B / Qwen3-30B-A3B layer dims, bf16
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np

SHAPES = {
    # Mixtral-8x7B layer dims (d 4096, f 14336, 8 experts top-2); small: the same ratios, scaled down
    "mixtral": {
        "full": {
            "hidden": 4096,
            "ffn": 14336,
            "experts": 8,
            "top_k": 2,
            "layers": 3,
            "heads": 32,
            "kv_heads": 8,
            "vocab": 32000,
        },
        "small": {
            "hidden": 512,
            "ffn": 1024,
            "experts": 8,
            "top_k": 2,
            "layers": 2,
            "heads": 8,
            "kv_heads": 4,
            "vocab": 1024,
        },
    },
    # Qwen3-30B-A3B MoE dims (d 2048, 128 experts of f 768, top-8)
    "qwen3": {
        "full": {
            "hidden": 2048,
            "ffn": 768,
            "experts": 128,
            "top_k": 8,
            "layers": 4,
            "heads": 32,
            "kv_heads": 4,
            "vocab": 32000,
        },
        "small": {
            "hidden": 512,
            "ffn": 192,
            "experts": 128,
            "top_k": 8,
            "layers": 2,
            "heads": 8,
            "kv_heads": 4,
            "vocab": 1024,
        },
    },
}

# --sweep: (label, d, f, E, k, tokens) for the MoE block alone
SWEEP = [
    ("tests: tiny Mixtral", 32, 48, 4, 2, 24),
    ("tests: tiny OLMoE", 32, 48, 8, 3, 24),
    ("tests: tiny DeepSeek-V3", 32, 16, 8, 3, 24),
    ("tests: tiny Mixtral, 4 x 32 tokens", 32, 48, 4, 2, 128),
    ("d 64, 8 experts top-2, 256 tokens", 64, 128, 8, 2, 256),
    ("demo model, eval batch 8 x 128", 128, 256, 8, 2, 1024),
    ("demo model, 1 x 128 tokens", 128, 256, 8, 2, 128),
    ("Mixtral-like small, 4 x 128", 512, 1024, 8, 2, 512),
    ("pruned to 4 experts top-2", 512, 1024, 4, 2, 512),
    ("pruned to 3 experts top-2", 512, 1024, 3, 2, 512),
    ("16 experts top-2", 512, 512, 16, 2, 1024),
    ("32 experts top-4", 512, 384, 32, 4, 1024),
    ("64 experts top-6 (DeepSeek-MoE-like)", 512, 256, 64, 6, 1024),
    ("128 experts top-8 (Qwen3-like small)", 512, 192, 128, 8, 1024),
    ("128 experts top-8, 128 tokens", 512, 192, 128, 8, 128),
    ("8 experts top-2, 64 tokens", 512, 1024, 8, 2, 64),
]


# ----------------------------------------------------------------------------- model


def build_and_save(kind: str, dims: dict, path: str, *, device: str, seed: int):
    """A random transformers model of `kind` (fp32 on CPU, bf16 on GPU), saved to `path`."""
    import torch
    import transformers

    common = {
        "vocab_size": dims["vocab"],
        "hidden_size": dims["hidden"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "num_experts_per_tok": dims["top_k"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=dims["ffn"], num_local_experts=dims["experts"], sliding_window=None
        )
    else:
        config = transformers.Qwen3MoeConfig(
            **common,
            moe_intermediate_size=dims["ffn"],
            intermediate_size=dims["ffn"],
            num_experts=dims["experts"],
            norm_topk_prob=True,
            head_dim=dims["hidden"] // dims["heads"],
        )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "gpu" else torch.float32
    with torch.device("cuda" if device == "gpu" else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


# ----------------------------------------------------------------------------- timing


def time_batches(run, batches) -> tuple[float, float, object]:
    """(compile+first-call seconds, seconds per token over the remaining batches, first output)."""
    t0 = time.perf_counter()
    first = run(batches[0])
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches[1:]:
        run(b)
    seconds = time.perf_counter() - t0
    return warm, seconds / max(1, sum(b.size for b in batches[1:])), first


def jax_variants(platform: str, requested: str | None) -> list[str]:
    """The JAX forwards to time: dense and each grouped matmul (on GPU also ragged_dot through the Pallas
    Triton lowering where the installed jax ships it, and tokamax's kernels where it is installed: mosaic
    on Hopper, triton; on CPU by default only dense, blocked and batched); `requested`: a comma-separated
    subset."""
    import importlib.util

    from grape_jax.core.dispatch import MOSAIC_GPU_MAJORS, compute_capability

    out = ["dense", "blocked", "batched", "ragged_dot"]
    if platform == "gpu" and importlib.util.find_spec("jax._src.lax.pallas_lowerings") is not None:
        out.append("ragged_dot+pallas")
    if importlib.util.find_spec("tokamax") is not None:
        if platform == "gpu":
            hopper = (compute_capability("gpu") or "").split(".")[0] in MOSAIC_GPU_MAJORS
            out += ["tokamax_mosaic", "tokamax_triton"] if hopper else ["tokamax_triton"]
        else:
            out.append("tokamax_xla")
    if platform == "cpu" and not requested:  # XLA:CPU expands ragged_dot densely (see --sweep): skip it
        requested = "dense,blocked,batched"
    if requested:
        unknown = set(requested.split(",")) - set(out)
        if unknown:
            raise SystemExit(f"bench_forward: --variants {sorted(unknown)} not available here; choose from {out}")
        out = [v for v in out if v in requested.split(",")]
    return out


def run_jax(loaded, batches, variant: str):
    import jax
    import jax.numpy as jnp

    dispatch = variant.replace("+pallas", "")
    pallas = variant.endswith("+pallas")
    flag = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    before = bool(getattr(jax.config, flag, False))
    if pallas:
        jax.config.update(flag, True)
    try:

        def run(tokens):
            out = loaded(jnp.asarray(tokens), dispatch=dispatch)
            return out.block_until_ready()

        warm, per_token, first = time_batches(run, batches)
    finally:
        if pallas:
            jax.config.update(flag, before)
    return warm, per_token, np.asarray(first, np.float32)


def run_torch(model, batches, device: str):
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if device == "gpu" else "cpu"

    def run(tokens):
        with torch.inference_mode():
            out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long, device=dev)).logits
        if device == "gpu":
            torch.cuda.synchronize()
        return out

    warm, per_token, first = time_batches(run, batches)
    return warm, per_token, first.float().cpu().numpy()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def bench_model(kind: str, args) -> list[str]:
    import gc

    import torch

    from conversion.load import load_hf

    dims = SHAPES[kind]["full" if args.full else "small"]
    rng = np.random.default_rng(args.seed)
    n = args.batches + 1
    batches = [rng.integers(0, dims["vocab"], size=(args.batch_size, args.seq_len), dtype=np.int32) for _ in range(n)]
    with tempfile.TemporaryDirectory(prefix="bench_forward_") as tmp:
        t0 = time.perf_counter()
        model = build_and_save(kind, dims, tmp, device=args.device, seed=args.seed)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_hf(tmp)
        load_s = time.perf_counter() - t0
    impl = getattr(model.config, "_experts_implementation", "?")
    from grape_jax.core.dispatch import choose

    shape = {
        "num_experts": dims["experts"],
        "top_k": dims["top_k"],
        "tokens": args.batch_size * args.seq_len,
        "hidden": dims["hidden"],
        "ffn": dims["ffn"],
    }
    auto, routed = choose("auto", **shape), choose("routed", **shape)
    params = loaded.num_params
    title = (
        f"## {kind} ({'full' if args.full else 'small'}): d {dims['hidden']}, f {dims['ffn']}, "
        f"{dims['experts']} experts top-{dims['top_k']}, {dims['layers']} layers, {params / 1e9:.2f} B params, "
        f"{loaded.embed.get_value().dtype!s}; {args.batches} x {args.batch_size} x {args.seq_len} tokens timed "
        f"(built {built:.1f} s, load_hf {load_s:.1f} s); here dispatch='auto' runs {auto}, 'routed' runs {routed}"
    )
    lines = [
        title,
        "",
        "| forward | tokens/s | vs transformers | vs jax dense | first call s | logits vs reference |",
        "|---|---|---|---|---|---|",
    ]
    results = {}
    for variant in jax_variants(args.device, args.variants):
        try:
            results[variant] = run_jax(loaded, batches, variant)
        except Exception as e:  # noqa: BLE001 - a lowering that does not exist here is reported, not fatal
            print(f"# {kind} {variant}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
        gc.collect()
    torch_res = None if args.no_torch else run_torch(model, batches, args.device)
    del model
    gc.collect()
    if args.device == "gpu":
        torch.cuda.empty_cache()
    dense = results.get("dense")
    torch_tps = None if torch_res is None else 1 / torch_res[1]
    for variant, (warm, per_token, first) in results.items():
        check = f"{rel_diff(first, dense[2]):.1e} vs dense" if dense is not None and variant != "dense" else "-"
        tps = 1 / per_token
        vs_dense = f"{tps * dense[1]:.2f}x" if dense is not None else "-"
        vs_torch = f"{tps / torch_tps:.2f}x" if torch_tps else "-"
        lines.append(f"| jax {variant} | {tps:,.0f} | {vs_torch} | {vs_dense} | {warm:.1f} | {check} |")
    if torch_res is not None:
        check = f"{rel_diff(torch_res[2], dense[2]):.1e} vs jax dense" if dense is not None else "-"
        lines.append(f"| transformers ({impl}) | {torch_tps:,.0f} | 1.00x | - | {torch_res[0]:.1f} | {check} |")
    return lines


# ----------------------------------------------------------------------------- sweep


def sweep(args) -> list[str]:
    import jax
    import jax.numpy as jnp

    from grape_jax.core import transformer
    from grape_jax.core.config import MoEConfig
    from grape_jax.core.dispatch import choose, tokamax_module
    from grape_jax.core.params import init_params

    platform = jax.default_backend()
    kinds = ["dense", "blocked", "batched", "ragged_dot"] + (["tokamax_xla"] if tokamax_module() else [])
    lines = [
        "| shape | d | f | E | k | tokens | " + " | ".join(f"{k} ms" for k in kinds) + " | best | auto picks |",
        "|---|---|---|---|---|---|" + "---|" * (len(kinds) + 2),
    ]
    for label, d, f, e, k, t in SWEEP:
        cfg = MoEConfig(
            family="mixtral",
            vocab_size=8,
            hidden_size=d,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=d,
            moe_intermediate_size=f,
            num_experts=(e,),
            top_k=k,
        )
        params = {n: jnp.asarray(v) for n, v in init_params(cfg, seed=0, scale=0.05).items() if ".mlp." in n}
        x = jnp.asarray(np.random.default_rng(0).standard_normal((t, d), np.float32))
        times = {}
        for kind in kinds:
            fn = jax.jit(functools.partial(transformer.moe_output, p="layers.0.mlp.", cfg=cfg, dispatch=kind))
            fn(params, x=x).block_until_ready()
            reps, best = 0, float("inf")
            t_end = time.perf_counter() + args.sweep_seconds
            while reps < 1 or time.perf_counter() < t_end:  # at least once, then for the budget
                t0 = time.perf_counter()
                fn(params, x=x).block_until_ready()
                best = min(best, time.perf_counter() - t0)
                reps += 1
            times[kind] = best * 1e3
        best = min(times, key=times.get)
        auto = choose("auto", num_experts=e, top_k=k, tokens=t, hidden=d, ffn=f, platform=platform)
        cells = " | ".join(f"{times[kind]:.3f}" for kind in kinds)
        lines.append(f"| {label} | {d} | {f} | {e} | {k} | {t} | {cells} | {best} | {auto} |")
        print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------- demo


def demo(args) -> list[str]:
    """The embedded demo model (fp32, as `grape demo` evaluates it): perplexity of random 8 x 128 token
    batches by dispatch, tokens/s and the perplexities (which must agree)."""
    import jax

    from conversion.load import load_hf
    from grape_jax.demo.model import shipped_path
    from grape_jax.evaluation.scoring import perplexity

    loaded = load_hf(shipped_path(), dtype="float32")
    blocks = np.random.default_rng(args.seed).integers(0, loaded.cfg.vocab_size, (args.demo_blocks, 128), np.int32)
    lines = ["| demo model forward | tokens/s | vs dense | perplexity |", "|---|---|---|---|"]
    dense_tps = None
    for dispatch in ("dense", "auto", "blocked"):

        def fn(tokens, mask, dispatch=dispatch):
            return loaded(tokens, mask, dispatch=dispatch)

        perplexity(fn, blocks[:8], batch_size=8)  # compile
        t0 = time.perf_counter()
        result = perplexity(fn, blocks, batch_size=8)
        tps = blocks.size / (time.perf_counter() - t0)
        dense_tps = dense_tps or tps
        lines.append(f"| {dispatch} | {tps:,.0f} | {tps / dense_tps:.2f}x | {result.ppl:.6f} |")
        print(lines[-1], flush=True)
    jax.clear_caches()
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--shape", choices=("mixtral", "qwen3", "all"), default="all")
    ap.add_argument("--full", action="store_true", help="real layer dims (default: --small, scaled down)")
    ap.add_argument("--small", dest="full", action="store_false", help="scaled-down shapes (the default)")
    ap.add_argument("--batches", type=int, default=0, help="timed batches (0: 3 on CPU, 16 on GPU)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=0, help="0: 128 on CPU, 512 on GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated JAX forwards to time (default: all): dense, blocked, batched, ragged_dot, "
        "ragged_dot+pallas (GPU), tokamax_mosaic (Hopper), tokamax_triton (GPU), tokamax_xla (with tokamax)",
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers forward")
    ap.add_argument("--sweep", action="store_true", help="time the MoE block alone over a grid of shapes")
    ap.add_argument("--sweep-seconds", type=float, default=0.5, help="timing budget per sweep cell")
    ap.add_argument("--demo", action="store_true", help="the embedded demo model's evaluation by dispatch")
    ap.add_argument("--demo-blocks", type=int, default=64)
    args = ap.parse_args(argv)
    args.batches = args.batches or (16 if args.device == "gpu" else 3)
    args.seq_len = args.seq_len or (512 if args.device == "gpu" else 128)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:  # torch and jax share the GPU: no preallocation of 75% of its memory by XLA
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"bench_forward: --device gpu asked for, but JAX's backend is {jax.default_backend()}")
    print(
        f"# bench_forward  device={jax.devices()[0]}  jax {jax.__version__}  cpus={os.cpu_count()}  "
        f"loadavg={os.getloadavg()[0]:.2f}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    if args.sweep:
        print("\n".join(sweep(args)))
        return 0
    if args.demo:
        demo(args)
        return 0
    for kind in ("mixtral", "qwen3") if args.shape == "all" else (args.shape,):
        print("\n".join(bench_model(kind, args)), flush=True)
        print()
    print(f"# loadavg at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
