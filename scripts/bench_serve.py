"""vLLM serving speed and resident weight memory of an MoE checkpoint and its grape-pruned exports, same run.

    .venv/bin/python scripts/bench_serve.py [--model /work/shared/models/gcide-moe-22m] [--remove 2 4]
        [--out runs/bench-serve] [--vllm-python .venv-vllm/bin/python] [--batch 16] [--max-tokens 128]

1. In grape-jax's environment (this interpreter): `grape prune MODEL --per-layer R` with the default
   method for each R in --remove, once (an existing export is reused).
2. In vLLM's environment (`bash scripts/setup_vllm.sh .venv-vllm`; this file again, with --worker):
   each model in turn is loaded by vLLM's offline `LLM` (the pruned ones through the grape_vllm
   plugin; engine and model in one process), its parameter bytes are summed (the weights it keeps resident),
   and greedy generation of --max-tokens tokens (EOS ignored) is timed for one prompt and for a batch
   of --batch prompts, after one untimed warm-up, median of --repeats runs.
Prints a Markdown table and writes it with the raw figures to OUT/bench_serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/work/shared/models/gcide-moe-22m", help="original HF MoE directory")
    p.add_argument("--remove", type=int, nargs="+", default=[2, 4], help="experts removed per MoE layer")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-serve"), help="exports and results")
    p.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    p.add_argument("--batch", type=int, default=16, help="prompts generated together in the batch run")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto: the checkpoint's)")
    p.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: eager)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: request JSON for step 2
    return p.parse_args(argv)


def prune(model: str, out: str, per_layer: int) -> str:
    """`grape prune --per-layer` with the default method into OUT/pruned-<r> (skipped when present)."""
    target = os.path.join(out, f"pruned-{per_layer}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    cmd = [sys.executable, "-m", "grape_jax.cli.main", "prune", model, "--out", target, "--per-layer", str(per_layer)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return target


def counts_of(path: str) -> list[int]:
    config = json.load(open(os.path.join(path, "config.json")))
    layers = int(config["num_hidden_layers"])
    return list(config.get("num_experts_per_layer") or [int(config["num_local_experts"])] * layers)


def _weight_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer vLLM holds for the model (run inside the engine's worker)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """Step 2 for one model, in the vLLM environment."""
    from vllm import LLM, SamplingParams  # noqa: PLC0415 - only the worker runs in vLLM's environment
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    start = time.perf_counter()
    llm = LLM(
        model=request["model"],
        dtype=request["dtype"],
        seed=0,
        max_model_len=512,
        enforce_eager=not request["compile"],
        distributed_executor_backend="uni",
    )
    load_s = time.perf_counter() - start
    weight_bytes = sum(llm.apply_model(_weight_bytes))
    vocab = int(json.load(open(os.path.join(request["model"], "config.json")))["vocab_size"])
    prompts = [
        TokensPrompt(prompt_token_ids=[(7919 * (i + 1) + 104729 * j) % (vocab - 10) + 5 for j in range(request["n"])])
        for i in range(request["batch"])
    ]
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    result: dict[str, Any] = {"load_s": round(load_s, 1), "weight_bytes": weight_bytes}
    for label, batch in (("single", prompts[:1]), ("batch", prompts)):
        rates = []
        for _ in range(request["repeats"]):
            t0 = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
        result[f"{label}_tok_s"] = round(statistics.median(rates), 1)
    llm.llm_engine.engine_core.shutdown()
    return result


def worker(path: str) -> int:
    # engine and model in this process (2 cores: no IPC between engine processes; apply_model runs here)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    request = json.load(open(path))
    results = {}
    for name, model in request["models"].items():
        results[name] = measure({**request, "model": model})
        print(f"bench_serve: {name}: {results[name]}", flush=True)
    json.dump(results, open(request["results"], "w"), indent=1)
    return 0


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if not os.path.exists(args.vllm_python):
        print(
            f"bench_serve: no vLLM environment at {args.vllm_python}; run bash scripts/setup_vllm.sh", file=sys.stderr
        )
        return 2
    os.makedirs(args.out, exist_ok=True)
    models = {"original": os.path.abspath(args.model)}
    for r in args.remove:
        models[f"pruned -{r}/layer"] = prune(args.model, args.out, r)
    request = {
        "models": models,
        "results": os.path.join(args.out, "vllm_results.json"),
        "dtype": args.dtype,
        "batch": args.batch,
        "n": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "compile": args.compile,
    }
    request_path = os.path.join(args.out, "vllm_request.json")
    json.dump(request, open(request_path, "w"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    subprocess.run([args.vllm_python, os.path.abspath(__file__), "--worker", request_path], env=env, check=True)
    results = json.load(open(request["results"]))
    base = results["original"]
    lines = [
        f"vLLM offline LLM in one process ({'compiled' if args.compile else 'eager'}), dtype {args.dtype}, greedy, "
        f"{args.prompt_tokens}-token prompts, {args.max_tokens} new "
        f"tokens each (EOS ignored), median of {args.repeats}; CPU: {cpu_name()}, {os.cpu_count()} cores",
        "",
        "| model | experts per layer | weights resident (MiB) | vs original | tok/s, 1 prompt | "
        f"tok/s, {args.batch} prompts | load (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        counts = counts_of(models[name])
        lines.append(
            f"| {name} | {counts} | {r['weight_bytes'] / 2**20:.1f} | {r['weight_bytes'] / base['weight_bytes']:.1%} "
            f"| {r['single_tok_s']} | {r['batch_tok_s']} | {r['load_s']} |"
        )
    table = "\n".join(lines)
    print(table)
    json.dump(
        {"table": table, "results": results, "models": models},
        open(os.path.join(args.out, "bench_serve.json"), "w"),
        indent=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
