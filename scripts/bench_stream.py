"""Peak RSS and time of `grape prune` with the model resident vs streamed layer by layer
(`--stream-layers off|on`), on random fp32 Mixtral models of several depths, each run in a child process
that reports its own peak RSS (ru_maxrss from wait4); the exports of the two modes are compared.

    python scripts/bench_stream.py [--layers 12 24] [--hidden 512] [--ffn 1024] [--experts 8]
        [--modes off on] [--num-samples 8] [--seq-len 64] [--per-layer 2] [--work DIR]
        [--large L,D,F,E]

Models are built by transformers (random init, norms perturbed), saved with a small trained tokenizer;
`grape prune` runs with the default method (grape-l: gradient sensitivities, operator 'fit' with its loss
check). Goal: the streamed peak does not grow with depth; streamed time <= 1.3x resident.

`--large L,D,F,E` also prunes, streamed only, a model too large to hold (e.g. `8,4096,512,64`: 15.05 GB
of fp32 weights, more than half of a 24 GiB machine; keep F small on CPU: the fit solves an F x F system
per kept expert on the host): L layers of hidden size D, E experts of size F. It
is written tensor by tensor with NumPy (random normal weights, std 0.02; no torch model in memory),
in 2 GB shards with an index, as transformers saves Mixtral.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def build(path: str, layers: int, args) -> float:
    """A random fp32 Mixtral with a tokenizer at `path`; returns its weights' GB."""
    import torch
    import transformers

    from grape_jax.data.text import default_calibration_texts
    from grape_jax.data.tokenizer import train_tokenizer

    tok = train_tokenizer(default_calibration_texts()[:60], vocab_size=300)
    cfg = transformers.MixtralConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() * 4 for p in model.parameters()) / 1e9


def build_large(path: str, shape: str) -> float:
    """A random fp32 Mixtral of `shape` ('L,D,F,E') written shard by shard; returns its weights' GB."""
    import transformers
    from safetensors.numpy import save_file

    from grape_jax.data.text import default_calibration_texts
    from grape_jax.data.tokenizer import train_tokenizer

    layers, d, f, e = (int(x) for x in shape.split(","))
    tok = train_tokenizer(default_calibration_texts()[:60], vocab_size=300)
    cfg = transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
        num_attention_heads=d // 128, num_key_value_heads=d // 128, num_local_experts=e,
        num_experts_per_tok=2, max_position_embeddings=512,
    )  # fmt: skip
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def tensors():
        yield "model.embed_tokens.weight", normal(len(tok), d)
        for i in range(layers):
            p = f"model.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{name}.weight", normal(d, d)
            yield p + "input_layernorm.weight", norm(d)
            yield p + "post_attention_layernorm.weight", norm(d)
            yield p + "block_sparse_moe.gate.weight", normal(e, d)
            for x in range(e):
                q = p + f"block_sparse_moe.experts.{x}."
                yield q + "w1.weight", normal(f, d)
                yield q + "w2.weight", normal(d, f)
                yield q + "w3.weight", normal(f, d)
        yield "model.norm.weight", norm(d)
        yield "lm_head.weight", normal(len(tok), d)

    weight_map, shard, size, total, names = {}, {}, 0, 0, []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        shard.clear()

    for key, value in tensors():
        shard[key] = value
        size += value.nbytes
        total += value.nbytes
        if size >= 2e9:
            flush()
            size = 0
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total / 1e9


def run(model: str, out: str, mode: str, args) -> dict:
    cmd = [
        sys.executable, "-m", "grape_jax.cli.main", "prune", model, "--out", out, "--overwrite",
        "--per-layer", str(args.per_layer), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
        "--stream-layers", mode,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    choice = next((line for line in output.splitlines() if "layer streaming:" in line), "")
    return {"mode": mode, "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 3), "log": choice}


def max_relative_difference(a: str, b: str) -> float:
    from safetensors.numpy import load_file

    def tensors(path: str) -> dict:
        out = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                out.update(load_file(os.path.join(path, name)))
        return out

    ta, tb = tensors(a), tensors(b)
    if sorted(ta) != sorted(tb):
        return float("inf")
    worst = 0.0
    for k in ta:
        x, y = ta[k].astype(np.float64), tb[k].astype(np.float64)
        worst = max(worst, float(np.abs(x - y).max()) / max(float(np.abs(x).max()), 1e-30))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[12, 24])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on", "auto"])
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--per-layer", type=int, default=2)
    ap.add_argument("--large", default=None, metavar="L,D,F,E", help="also prune this large model, streamed")
    ap.add_argument("--work", default=None, help="where models and exports go (default: a temporary directory)")
    args = ap.parse_args()
    if args.large and not (
        re.fullmatch(r"[1-9]\d*(,[1-9]\d*){3}", args.large) and int(args.large.split(",")[1]) % 128 == 0
    ):
        ap.error(f"--large {args.large!r}: expected L,D,F,E, positive integers with D a multiple of 128 (heads of 128)")
    work = args.work or tempfile.mkdtemp(prefix="bench_stream_")
    rows = []
    for layers in args.layers:
        model = os.path.join(work, f"mixtral_{layers}")
        gb = build(model, layers, args)
        outs = {}
        for mode in args.modes:
            outs[mode] = os.path.join(work, f"out_{layers}_{mode}")
            row = {"layers": layers, "weights_gb": round(gb, 3), **run(model, outs[mode], mode, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if "off" in outs and "on" in outs:
            diff = max_relative_difference(outs["off"], outs["on"])
            print(json.dumps({"layers": layers, "export_max_relative_difference": diff}), flush=True)
        shutil.rmtree(model, ignore_errors=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    if args.large:
        model = os.path.join(work, "mixtral_large")
        gb = build_large(model, args.large)
        row = {"layers": int(args.large.split(",")[0]), "weights_gb": round(gb, 3)}
        row.update(run(model, os.path.join(work, "out_large"), "on", args))
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(os.path.join(work, "out_large"), ignore_errors=True)
    print("| layers | weights GB | mode | peak RSS GB | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['weights_gb']} | {r['mode']} | {r['peak_rss_gb']} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
