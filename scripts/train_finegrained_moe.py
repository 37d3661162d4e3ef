"""Train the fine-grained benchmark MoEs in PyTorch transformers, deterministically, on CPU.

Two models, both on the text of `/work/shared/models/gcide-moe-22m` (GCIDE dictionary + fortunes, its
4096-token byte-level BPE tokenizer) with that model's `heldout.txt` paragraphs removed from training:

  qwen3-fg   Qwen3-MoE: 4 layers, d 192, 32 experts of f 96 per layer, top-4, normalised top-k
  qwen2-fg   Qwen2-MoE: 4 layers, d 192, 32 routed experts of f 96, top-4 (not normalised, as Qwen2-MoE),
             plus a gated shared expert of f 384 in every layer

The training text is rebuilt from Debian's packages (`apt-get install dict-gcide fortunes`): every
paragraph (blank-line separated) of `/usr/share/dictd/gcide.dict.dz` and of the fortune files, the
held-out paragraphs dropped (whitespace-normalised match), shuffled with the seed, tokenised and packed
by `grape_jax.data.text.tokenize_and_pack` (BOS-led blocks of 128 tokens, EOS between paragraphs) exactly as
the benchmarks read text. Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, clip 1.0),
batch 16 x 128 tokens, next-token loss + `router_aux_loss_coef` (0.05) x a load-balancing loss, fp32,
experts by `grouped_mm`; lr linear warm-up (`--warmup`) then cosine to 10% over `--steps`.
`--balance per-layer` (the default): the Switch-Transformer loss of transformers' `load_balancing_loss_func`,
E * sum_i f_i * P_i (f_i: share of the top-k slots routed to expert i, P_i: mean router probability of i;
4.0 = balanced for top-4), computed on each layer's router logits separately and averaged over the layers,
so every layer is pushed to balance. `--balance global` is transformers' own loss (the function applied to
all layers' logits concatenated: it balances usage summed over layers, so one layer can stay skewed while
others compensate; the first benchmark models were trained with it).
Every `--eval-every` steps the held-out loss (64 blocks of `heldout.txt`) is logged; a run stops at
`--steps`, `--stop-step`, `--max-minutes`, or when the held-out loss gained less than `--flat` over the
last `--patience` evaluations. `--init DIR` continues from a saved model (a second, decay stage: a
fresh optimizer and schedule; its log is appended to the first stage's). Weights are written as bf16
safetensors with the tokenizer, train_info.json and TRAINING.md into `--out/NAME` (`runs/` is ignored by
git). Deterministic for a seed on one machine (the step count of a run stopped by time is in its log:
pass it as `--stop-step` to reproduce). The benchmark models of BENCHMARKS.md (2 cores shared with
another engineer's jobs, both models at once, 1 thread each, per-layer balancing): stage 1, warm-up and a
cosine decayed to its floor (2e-4) at `--steps`; stage 2, a decay stage from there (fresh optimizer, lr
2e-4 cosine to 2e-5, seed 1: a fresh batch order), written over the stage-1 weights:

    S=train_finegrained_moe.py
    nice -n 10 python scripts/$S qwen3-fg --out runs/models --steps 1200 --threads 1 --eval-every 50 \
        --patience 6 --max-minutes 45
    nice -n 10 python scripts/$S qwen2-fg --out runs/models --steps 900 --threads 1 --eval-every 50 \
        --patience 6 --max-minutes 45
    for m in qwen3-fg qwen2-fg; do
      nice -n 10 python scripts/$S $m --out runs/models --init runs/models/$m --steps 300 --warmup 10 \
          --lr 2e-4 --seed 1 --threads 1 --eval-every 50 --patience 6 --max-minutes 12
    done

No run was stopped by `--max-minutes` or by the flat rule: all ran to `--steps`, so no `--stop-step` is
needed. The first versions of these models (`--balance global`, a first stage stopped by time and a
decay stage) are in this file's git history.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import re
import time

import numpy as np
import torch
import transformers

from grape_jax.data.text import tokenize_and_pack

GCIDE = "/work/shared/models/gcide-moe-22m"
SEQ_LEN = 128
COMMON = dict(
    vocab_size=4096,
    hidden_size=192,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    moe_intermediate_size=96,
    num_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    output_router_logits=True,
    router_aux_loss_coef=0.05,
    bos_token_id=0,
    eos_token_id=0,
)
MODELS = {
    "qwen3-fg": lambda: transformers.Qwen3MoeConfig(**COMMON, intermediate_size=384, norm_topk_prob=True),
    "qwen2-fg": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=384, shared_expert_intermediate_size=384, norm_topk_prob=False
    ),
}


def _norm(text: str) -> str:
    return " ".join(text.split())


def paragraphs(path: str) -> list[str]:
    """Blank-line separated paragraphs of a text file (gzip/dictzip read transparently), stripped."""
    opener = gzip.open if path.endswith(".dz") or path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if "/fortunes/" in path:
        text = text.replace("\n%\n", "\n\n")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def training_texts(seed: int) -> list[str]:
    """GCIDE + fortunes paragraphs minus gcide-moe-22m's held-out ones, shuffled with `seed`."""
    sources = ["/usr/share/dictd/gcide.dict.dz"] + sorted(
        p for p in glob.glob("/usr/share/games/fortunes/*") if "." not in os.path.basename(p)
    )
    missing = [p for p in sources[:1] if not os.path.isfile(p)]
    if missing or len(sources) < 2:
        raise SystemExit("training text missing: apt-get install dict-gcide fortunes")
    held = {_norm(p) for p in paragraphs(os.path.join(GCIDE, "heldout.txt"))}
    texts = [p for src in sources for p in paragraphs(src) if _norm(p) not in held]
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.permutation(len(texts))]


def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token loss over `blocks` (no aux loss)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), 16):
            b = blocks[i : i + 16]
            logits = model(input_ids=b, output_router_logits=False).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"
            ).item()
    model.train()
    return total / (blocks.shape[0] * (blocks.shape[1] - 1))


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of each layer, averaged over the layers (`--balance per-layer`).

    Per layer (logits [tokens, E]): p = softmax(logits), f_i = (top-k slots routed to i) / tokens,
    P_i = mean_t p_ti, loss = E * sum_i f_i P_i (top_k when balanced). The same formula and top-k selection as
    transformers' `load_balancing_loss_func`, which instead pools the tokens of all layers before the product.
    Gradients flow through P only (f is a count), as there. Returns a tensor of one loss per layer.
    """
    losses = []
    for logits in router_logits:
        probs = torch.nn.functional.softmax(logits.float(), dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        # histc on float indices: deterministic on CPU (as transformers does)
        counts = torch.histc(chosen.reshape(-1).float(), bins=num_experts, min=0, max=num_experts)
        f = counts / probs.shape[0]
        losses.append(num_experts * torch.sum(f * probs.mean(dim=0)))
    return torch.stack(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--out", default="runs/models")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--flat", type=float, default=0.005, help="held-out loss gain (nats) below which it is flat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument(
        "--stop-step", type=int, default=None, help="stop after this step (the schedule still spans --steps)"
    )
    p.add_argument(
        "--init", default=None, help="continue from this saved model (a decay stage) instead of a fresh init"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--balance",
        choices=("per-layer", "global"),
        default="per-layer",
        help="load-balancing loss: each layer's (averaged) or transformers' pooled over layers",
    )
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(GCIDE)
    t0 = time.perf_counter()
    train = tokenize_and_pack(training_texts(args.seed), tok, seq_len=SEQ_LEN, num_samples=None)
    held_texts = paragraphs(os.path.join(GCIDE, "heldout.txt"))
    held = tokenize_and_pack(held_texts, tok, seq_len=SEQ_LEN, num_samples=64, seed=2)
    log = [f"{args.name}: {train.shape[0]} training blocks of {SEQ_LEN} tokens ({time.perf_counter() - t0:.0f} s)"]
    print(log[-1], flush=True)

    previous = ""
    if args.init:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.init, dtype=torch.float32, experts_implementation="grouped_mm"
        )
        model.config.output_router_logits = True
        with open(os.path.join(args.init, "TRAINING.md")) as f:
            previous = f.read()
        log.append(f"continuing from {args.init} (stage above)")
    else:
        cfg = MODELS[args.name]()
        cfg._experts_implementation = "grouped_mm"
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    warm = args.warmup

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        t = min((step - warm) / max(args.steps - warm, 1), 1.0)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng(args.seed)
    held_t = torch.as_tensor(held, dtype=torch.long)
    history: list[tuple[int, float]] = []
    start = time.perf_counter()
    step = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = rng.choice(train.shape[0], size=args.batch_size, replace=False)
        batch = torch.as_tensor(train[idx], dtype=torch.long)
        if args.balance == "global":
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
            loss, aux, aux_layers = out.loss, out.aux_loss, None
        else:
            out = model(input_ids=batch, output_router_logits=True)
            logits = out.logits[:, :-1].float()
            lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            aux_layers = per_layer_balance_loss(
                out.router_logits, model.config.num_experts, model.config.num_experts_per_tok
            )
            aux = aux_layers.mean()
            loss = lm + model.config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.perf_counter() - start
        last = step == args.steps - 1 or step == args.stop_step or elapsed > 60 * args.max_minutes
        if step % args.eval_every == 0 or last:
            h = heldout_loss(model, held_t)
            history.append((step, h))
            aux_text = f"{float(aux.detach()):.3f}" if aux is not None else "nan"
            if aux_layers is not None:
                aux_text += " (" + "/".join(f"{float(a):.2f}" for a in aux_layers.detach()) + ")"
            log.append(
                f"step {step:5d}  loss {loss.item():.3f}  aux {aux_text}  held-out {h:.3f} "
                f"(ppl {math.exp(h):.2f})  lr {lr_at(step):.2e}  {elapsed:.0f} s"
            )
            print(log[-1], flush=True)
            recent = [
                history[i - 1][1] - history[i][1] for i in range(max(len(history) - args.patience, 1), len(history))
            ]
            if len(history) > args.patience + 3 and max(recent) < args.flat:
                log.append(f"held-out loss flat (gain < {args.flat} nats over {args.patience} evaluations): stop")
                print(log[-1], flush=True)
                break
        if last:
            break
    out_dir = os.path.join(args.out, args.name)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    info = {
        "name": args.name,
        "params": n_params,
        "steps": step + 1,
        "seconds": round(time.perf_counter() - start),
        "heldout_loss": history[-1][1],
        "args": vars(args),
        "previous_stage": json.load(open(os.path.join(args.init, "train_info.json"))) if args.init else None,
    }
    with open(os.path.join(out_dir, "train_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(out_dir, "TRAINING.md"), "w") as f:
        f.write(
            (previous + "\n## Next stage\n\n" if previous else f"# {args.name}\n\n{__doc__}\n\n")
            + f"{n_params:,} parameters; arguments {vars(args)}.\n\n```\n"
            + "\n".join(log)
            + "\n```\n"
        )
    print(f"wrote {out_dir} ({n_params:,} parameters)", flush=True)


if __name__ == "__main__":
    main()
