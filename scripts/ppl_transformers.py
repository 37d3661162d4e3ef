"""Held-out perplexity of an HF model directory in PyTorch transformers, on the blocks bench_quality.py uses.

The blocks are grape-jax's (`grape_jax.data.text`, the model's tokenizer: BOS-led blocks of `--seq-len` tokens,
EOS between paragraphs, `--num-samples` drawn with `--seed`), so the number is comparable with the
grape-jax perplexities of BENCHMARKS.md; perplexity = exp(mean next-token NLL over every block's
`seq_len - 1` predicted tokens), fp32 forward. Pruned exports with per-layer expert counts load through
their modeling file (`trust_remote_code`).

    python scripts/ppl_transformers.py runs/models/qwen3-fg --data $M/heldout.txt
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers

from grape_jax.data.text import DataSpec
from grape_jax.pipeline import blocks_for


def perplexity(model_dir: str, data: list[str], *, num_samples: int, seq_len: int, seed: int, batch: int = 8) -> float:
    """exp(mean NLL) of the model on the blocks (module docstring)."""
    blocks = blocks_for(model_dir, DataSpec(paths=tuple(data), seq_len=seq_len, num_samples=num_samples, seed=seed))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = torch.as_tensor(blocks[i : i + batch], dtype=torch.long)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="+", help="HF model directories")
    p.add_argument("--data", nargs="+", required=True, help="held-out text files")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(2)
    for m in args.model:
        ppl = perplexity(m, args.data, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed)
        print(f"{m}: transformers perplexity {ppl:.3f} ({args.num_samples} blocks of {args.seq_len} tokens)")


if __name__ == "__main__":
    main()
