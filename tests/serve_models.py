"""Tiny pruned exports of every family vLLM serves, made by grape-jax's pipeline, for the serve tests.

Each model is a random transformers model of its family (head_dim 32: vLLM's CPU attention takes only
some head sizes), calibrated on random tokens, planned by a *global* planner (so layers keep different
expert counts), merged and exported with `save_hf`: the export a user would serve.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import transformers

from conversion.load import load_hf
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.fit.operator import fit_inputs
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import save_hf
from grape_jax.planners import make_plan
from tests.hf_models import build_model, random_tokens, save_model

# 3 layers, hidden 64 in 2 heads of 32 (one KV head), vocab 128
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)
# vLLM's CPU MLA kernel takes only DeepSeek's latent size kv_lora_rank 512 + rope 64
_MLA = dict(
    num_key_value_heads=2,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=32,
    qk_rope_head_dim=64,
    v_head_dim=32,
)

# family -> config of the unpruned model (each with >= 6 routed experts in every MoE layer)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**BASE, head_dim=32, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **BASE, **_MOE, num_experts=6, shared_expert_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=False
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**BASE, **_MOE, num_experts=6, head_dim=32, norm_topk_prob=True),
    "olmoe": lambda: transformers.OlmoeConfig(**BASE, num_experts=6, num_experts_per_tok=2, clip_qkv=2.5),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **{**BASE, **_MLA},
        **_MOE,
        n_routed_experts=6,
        first_k_dense_replace=1,
        n_shared_experts=1,
        topk_method="greedy",  # as DeepSeek-V2-Lite's config.json (vLLM reads these)
        n_group=1,
        topk_group=1,
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**BASE, **_MLA},
        **_MOE,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        topk_method="noaux_tc",  # as DeepSeek-V3's config.json (vLLM reads these; transformers assumes them)
        scoring_func="sigmoid",
    ),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **BASE,
        **_MOE,
        head_dim=32,
        partial_rotary_factor=0.5,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
        use_qk_norm=True,
        routed_scaling_factor=1.5,
    ),
    "ernie4_5_moe": lambda: transformers.Ernie4_5_MoeConfig(
        **BASE, moe_num_experts=6, moe_k=2, moe_intermediate_size=24, moe_num_shared_experts=1
    ),
    "minimax_m2": lambda: transformers.MiniMaxM2Config(
        **BASE,
        num_local_experts=6,
        num_experts_per_tok=2,
        head_dim=32,
        rotary_dim=16,
        scoring_func="sigmoid",  # as MiniMax-M2's config.json (vLLM reads them; transformers assumes them)
        use_routing_bias=True,
    ),
    "phimoe": lambda: transformers.PhimoeConfig(**BASE, num_local_experts=6, num_experts_per_tok=2),
    "gpt_oss": lambda: transformers.GptOssConfig(
        **{**BASE, "intermediate_size": 32}, head_dim=32, num_local_experts=6, num_experts_per_tok=2, sliding_window=4
    ),
    # 4 layers, MoE every second (1 and 3: top-1 by logit, sigmoid weight, shared expert), layer 3 without RoPE
    "llama4_text": lambda: transformers.Llama4TextConfig(
        **{**BASE, "intermediate_size": 24, "num_hidden_layers": 4},
        intermediate_size_mlp=40,
        head_dim=32,
        num_local_experts=6,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layers=[1, 1, 1, 0],
        attention_chunk_size=8192,
    ),
}


# experts removed in total where a quarter would leave equal counts (two MoE layers of 8 in groups of 4:
# 16 - 6 = 10 cannot split into two equal multiples of the group count)
BUDGETS = {"deepseek_v3": 6, "glm4_moe": 6}


@dataclasses.dataclass(frozen=True)
class Export:
    """A pruned export: its directory, its per-layer counts, the original's counts and directory."""

    name: str
    path: str
    counts: tuple[int, ...]
    original: tuple[int, ...]
    source: str


def _perturb_router_bias(model: torch.nn.Module) -> None:
    """Non-zero score-correction biases, so selection differs from the scores (as real checkpoints)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.3 * torch.randn(bias.shape, generator=gen) - 0.1)


def make_export(family: str, root: str | os.PathLike, *, operator: str = "freq", name: str | None = None) -> Export:
    """Build `family`'s tiny model, prune a quarter of its routed experts with the global grape planner
    (`operator`: how removed experts are folded into kept ones, e.g. 'freq' or the least-squares 'fit'),
    and export it; the export's layers keep different expert counts (asserted)."""
    name = name or family
    model = build_model(CONFIGS[family](), seed=1)
    _perturb_router_bias(model)
    src = save_model(model, os.path.join(root, name + "-src"))
    loaded = load_hf(src)
    cfg = loaded.cfg
    blocks = random_tokens(cfg.vocab_size, batch=4, seq=16, seed=2)
    stats = calibrate(loaded, blocks, options=CalibrationOptions(batch_size=4, token_chunk=64), progress=False)
    budget = BUDGETS.get(family, sum(cfg.num_experts) // 4)
    plan = make_plan(stats, method="grape", budget=budget, guard="none", operator=operator)
    # 'fit' solves each merged expert by least squares on the calibration blocks' activations
    inputs = fit_inputs(loaded, plan, blocks) if operator == "fit" else None
    merged = merge_model(loaded, plan, inputs=inputs)
    out = save_hf(merged, os.path.join(root, name))
    counts = tuple(json.load(open(os.path.join(out, "config.json"))).get("num_experts_per_layer", ()))
    if len({c for c in counts if c}) < 2:
        raise AssertionError(f"{family}: the global plan kept uniform counts {counts}; the test needs unequal ones")
    return Export(name, out, counts, tuple(cfg.num_experts), src)


def greedy_reference(path: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """transformers' greedy continuation of each prompt (remote code for per-layer counts) and the
    float64 log-softmax of each step's logits, as `[{"tokens": [...], "logprobs": tensor [steps, vocab]}]`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    model.eval()
    outputs = []
    for prompt in prompts:
        ids, steps = list(prompt), []
        for _ in range(max_tokens):  # plain greedy loop, full forward each step: no cache, no EOS rule
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            steps.append(torch.log_softmax(logits.double(), dim=-1))
            ids.append(int(torch.argmax(logits)))
        outputs.append({"tokens": ids[len(prompt) :], "logprobs": torch.stack(steps)})
    return outputs
