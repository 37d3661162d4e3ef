"""Train the embedded demo MoE (deterministic; a few minutes on 2 CPU cores) into an HF directory.

python scripts/train_tiny_moe.py --out grape_jax/assets/demo_model
"""

from __future__ import annotations

import argparse

from grape_jax.demo.model import shipped_path, train_demo_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=shipped_path())
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(train_demo_model(args.out, steps=args.steps, seed=args.seed))


if __name__ == "__main__":
    main()
