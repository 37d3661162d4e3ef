"""Per-layer normalised routing entropy (and perplexity) of a MoE model on held-out text.

Calibrates the model on `--num-samples` blocks of `--seq-len` tokens (default: the shipped held-out
text, `grape_jax/assets/kjv_heldout.txt`, blocks drawn with `--seed`), prints each MoE layer's
`grape_jax.calibration.stats.routing_entropy` (entropy of the routed top-k slots over experts / log E; 1 =
balanced), the minimum over layers, and the token-weighted perplexity of the same blocks.

    python scripts/routing_entropy.py grape_jax/assets/demo_model
    python scripts/routing_entropy.py MODEL_DIR --data my.txt --num-samples 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

import grape_jax as gj
from grape_jax.calibration.stats import StatsError, routing_entropy
from grape_jax.data.text import DataError


def measure(model_dir: str, *, data: list[str] | None, num_samples: int, seq_len: int, seed: int) -> dict:
    """Routing entropy per MoE layer, its minimum and the perplexity, on the given (or held-out) text."""
    blocks = gj.token_blocks(model_dir, data, seq_len=seq_len, num_samples=num_samples, seed=seed, heldout=not data)
    model = gj.load_hf(model_dir)
    stats = gj.calibrate(model, blocks, options=gj.CalibrationOptions(batch_size=8, cka="minibatch"), progress=False)
    entropy = {ls.layer: routing_entropy(ls) for ls in stats.layers}
    return {
        "model": model_dir,
        "data": data or "grape_jax/assets/kjv_heldout.txt (shipped)",
        "num_samples": int(blocks.shape[0]),
        "seq_len": seq_len,
        "seed": seed,
        "routing_entropy": entropy,
        "min_routing_entropy": min(entropy.values()),
        "perplexity": gj.perplexity(model, blocks).ppl,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--data", nargs="*", default=None, help="text files (default: the shipped held-out text)")
    p.add_argument("--num-samples", type=int, default=200, help="blocks drawn from the text")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    p.add_argument("--seed", type=int, default=1, help="seed that draws the blocks")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        result = measure(args.model, data=args.data, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed)
    except (DataError, StatsError, ValueError, OSError) as e:
        print(f"routing_entropy: {e}", file=sys.stderr)
        return 2
    for layer, h in result["routing_entropy"].items():
        print(f"layer {layer}: routing entropy {h:.4f}")
    print(f"min routing entropy {result['min_routing_entropy']:.4f}")
    print(f"perplexity {result['perplexity']:.3f} ({result['num_samples']} blocks of {result['seq_len']} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
