"""The default pipeline end to end on one accelerator, at Mixtral-8x7B layer dims (3 layers, bf16, random
weights built by transformers): load, calibrate (with the gradient sensitivities), plan with the default
(grape-l), fit + merge, export, and the export's logits in transformers against the JAX model's.

    python3 scripts/bench_e2e.py [--layers 3] [--blocks 64] [--seq-len 512]

Needs torch with CUDA (the model is built on the GPU); prints each stage's seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=64, help="calibration blocks")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    import torch
    import transformers

    import grape_jax as gj

    t_all = time.time()
    work = tempfile.mkdtemp(prefix="bench_e2e_")
    hf = work + "/hf"
    cfg = transformers.MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        built = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16)
    built.save_pretrained(hf, max_shard_size="2GB")
    del built
    torch.cuda.empty_cache()
    print(f"built in {time.time() - t_all:.1f} s", flush=True)

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, cfg.vocab_size, size=(args.blocks, args.seq_len), dtype=np.int32)
    held = rng.integers(0, cfg.vocab_size, size=(8, args.seq_len), dtype=np.int32)
    seconds = {}
    t0 = time.time()
    model = gj.load_hf(hf)
    seconds["load"] = time.time() - t0
    t0 = time.time()
    stats = gj.calibrate(model, blocks, progress=False)
    seconds["calibrate"] = time.time() - t0
    t0 = time.time()
    plan = gj.make_plan(stats, per_layer=2)
    seconds[f"plan ({plan.method})"] = time.time() - t0
    t0 = time.time()
    pruned = gj.apply_plan(model, plan, blocks=blocks)
    seconds[f"merge ({plan.operator})"] = time.time() - t0
    print({k: round(v, 1) for k, v in seconds.items()}, "kept", pruned.cfg.num_experts, flush=True)
    print(f"held-out ppl (random tokens) {gj.perplexity(model, held).ppl:.1f} -> {gj.perplexity(pruned, held).ppl:.1f}")
    del model
    t0 = time.time()
    gj.save_hf(pruned, work + "/out")
    print(f"export {time.time() - t0:.1f} s", flush=True)
    ours = np.asarray(pruned(held[:1, :64]), np.float32)
    del pruned
    loaded = transformers.AutoModelForCausalLM.from_pretrained(work + "/out", dtype=torch.bfloat16).cuda().eval()
    with torch.inference_mode():
        ref = loaded(torch.as_tensor(held[:1, :64], device="cuda")).logits.float().cpu().numpy()
    print(
        f"export in transformers: logits max |diff| {np.abs(ours - ref).max():.3g} at scale {np.abs(ref).max():.3g} "
        f"(bf16); total {time.time() - t_all:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
