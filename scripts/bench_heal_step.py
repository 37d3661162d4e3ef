"""Healing training steps/s: grape-jax's `heal` step vs a PyTorch knowledge-distillation step, same model.

A random transformers Mixtral (Mixtral-8x7B layer dims by default: d 4096, f 14336, 8 experts top-2; 1 layer;
bf16) is built and saved, then one framework runs (one per process, so the two never share the GPU):

  jax    `grape_jax.healing.heal.heal` with the live teacher (the same checkpoint), every parameter trained
         (fp32 master copies, AdamW, clip 1.0), KL at temperature 1; its forward is `dispatch="auto"`
         (on GPU: tokamax's kernel where installed, `grape_jax.core.dispatch.select_grouped_kind`);
         `--no-tokamax` hides tokamax to time the earlier GPU choice. Steps/s after compilation.
  torch  the same step in PyTorch: bf16 teacher forward under no_grad, fp32 student forward (`--torch
         fp32`: TF32 matmuls, like JAX's default fp32 precision on GPU; `--torch autocast`: bf16
         autocast, the usual mixed-precision recipe), KL(teacher || student), backward, clip 1.0,
         fused AdamW. Steps/s after `--warmup` steps.

    python scripts/bench_heal_step.py --framework jax --device gpu
    python scripts/bench_heal_step.py --framework torch --device gpu --torch fp32
    python scripts/bench_heal_step.py --framework jax --small            # CPU smoke run, a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

FULL = {"hidden": 4096, "ffn": 14336, "experts": 8, "top_k": 2, "layers": 1, "heads": 32, "kv_heads": 8}
SMALL = {"hidden": 128, "ffn": 256, "experts": 8, "top_k": 2, "layers": 1, "heads": 4, "kv_heads": 2}


def build(path: str, dims: dict, vocab: int, device: str) -> None:
    """A random bf16 (GPU) / fp32 (CPU) transformers Mixtral saved to `path`."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=vocab,
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        num_local_experts=dims["experts"],
        num_experts_per_tok=dims["top_k"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if device == "gpu" else "cpu"):
        model = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16 if device == "gpu" else torch.float32)
    model.save_pretrained(path, max_shard_size="2GB")


def run_jax(path: str, blocks: np.ndarray, args) -> tuple[float, str]:
    """(steps/s, what ran) of `heal` over `args.steps` steps (compilation excluded)."""
    import jax

    from grape_jax.api import HealOptions, heal, load_hf
    from grape_jax.core import dispatch

    if args.no_tokamax:
        dispatch.tokamax_module = lambda: None  # the rule then picks the pre-tokamax GPU kernel
    model = load_hf(path)
    shape = {"num_experts": 8, "top_k": 2, "tokens": args.batch_size * args.seq_len}
    kind = dispatch.choose("auto", **shape, hidden=args.dims["hidden"], ffn=args.dims["ffn"])
    options = HealOptions(
        steps=args.steps, batch_size=args.batch_size, warmup=1, val_blocks=0, val_every=args.steps, train="all"
    )
    result = heal(model, model, blocks, options=options, progress=False)
    tokens_per_step = args.batch_size * (args.seq_len - 1)  # heal counts the positions its loss scores
    return result.tokens_per_second / tokens_per_step, f"jax {jax.__version__} heal, dispatch auto -> {kind}"


def run_torch(path: str, blocks: np.ndarray, args) -> tuple[float, str]:
    """(steps/s, what ran) of a PyTorch KD step over `args.steps` steps after `args.warmup`."""
    import contextlib

    import torch
    import transformers

    dev = "cuda" if args.device == "gpu" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = args.torch == "fp32"
    teacher = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0, fused=dev == "cuda")
    autocast = torch.autocast(dev, dtype=torch.bfloat16) if args.torch == "autocast" else contextlib.nullcontext()

    def step(ids: torch.Tensor) -> None:
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        with autocast:
            logits = student(input_ids=ids).logits[:, :-1]
        log_p = torch.log_softmax(logits.float(), -1)
        loss = (target.exp() * (target - log_p)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    batches = [torch.as_tensor(blocks[i : i + args.batch_size], dtype=torch.long, device=dev) for i in range(0, 64, 8)]
    sync = torch.cuda.synchronize if dev == "cuda" else lambda: None
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    sync()
    what = f"torch {torch.__version__} KD step ({args.torch}), transformers {transformers.__version__}"
    return args.steps / (time.perf_counter() - t0), what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=("jax", "torch"), required=True)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--small", action="store_true", help="small dims (CPU smoke run)")
    ap.add_argument("--torch", choices=("fp32", "autocast"), default="fp32", help="the PyTorch student's precision")
    ap.add_argument("--no-tokamax", action="store_true", help="jax: time the GPU kernel chosen without tokamax")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="torch: untimed steps first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args(argv)
    if args.steps < 2 or args.batch_size < 1 or args.seq_len < 2:
        ap.error("--steps >= 2, --batch-size >= 1 and --seq-len >= 2")
    args.dims = SMALL if args.small else FULL
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    blocks = np.random.default_rng(0).integers(0, args.vocab, (64, args.seq_len), dtype=np.int32)
    with tempfile.TemporaryDirectory(prefix="bench_heal_step_") as tmp:
        build(tmp, args.dims, args.vocab, args.device)
        steps_per_s, what = (run_jax if args.framework == "jax" else run_torch)(tmp, blocks, args)
    d = args.dims
    print(
        f"heal step: {what}; d {d['hidden']} f {d['ffn']} {d['experts']} experts top-{d['top_k']} "
        f"{d['layers']} layer(s), batch {args.batch_size} x {args.seq_len}: {steps_per_s:.3f} steps/s "
        f"({steps_per_s * args.batch_size * args.seq_len:,.0f} tokens/s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
