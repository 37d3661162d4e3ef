"""Pruned exports with per-layer expert counts, loaded through the remote-code modeling file.

Oracle: the stock transformers model before pruning, with the dropped experts masked out of its
routing. Masking is exact for every family here:
- softmax-then-top-k (Mixtral, Qwen2/3-MoE, OLMoE): a logit of -inf has probability exactly 0, so
  the softmax over all experts restricted to the kept ones *is* the pruned model's softmax (same
  exp terms, same denominator); top-k then picks the same experts (kept count >= k) with the same
  weights, renormalised or not;
- top-k-then-softmax with router bias (GPT-OSS): a -1e9 bias keeps the expert out of the top-k, and
  the softmax runs over the selected logits only;
- sigmoid + correction bias + group-limited top-k (DeepSeek-V3, GLM-4.5, MiniMax-M2): a -1e9
  correction bias keeps the expert out of its group's top-2 (each group keeps >= 2) and out of the
  top-k; the weights are the unbiased sigmoid scores of the selected experts, unchanged;
- softmax + correction bias (ERNIE-4.5): the kept experts' probabilities grow by one common factor
  when the dropped ones leave the softmax, so with one common bias on the kept experts (the test's)
  their ranking is unchanged, a -1e9 bias keeps the dropped ones out, and the renormalised weights
  do not depend on the softmax denominator;
- sparsemixer (Phi-3.5-MoE) and top-k-then-sigmoid (Llama-4): transformers' own routing on logits
  with the dropped experts at -inf, which is the pruned router's routing (an expert at -inf never
  wins, never passes the sparsemixer's threshold, and gets weight 0).
The kept experts keep their relative order, so the experts are even summed in the same order: the
two models agree to fp32 rounding.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from conversion.families import get_family
from conversion.remote_code import modeling_pruned_moe as pruned
from conversion.remote_code_export import write_remote_code
from tests.hf_models import TINY, build_model, random_tokens, torch_logits

LAYERS = 3
_BASE = dict(TINY, num_hidden_layers=LAYERS)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

# family -> (stock config, router/fused keys sliced on dim 0 (relative to the layer), kept experts per layer)
CASES = {
    "mixtral": (
        lambda: transformers.MixtralConfig(**_BASE, num_local_experts=6, num_experts_per_tok=2),
        ("block_sparse_moe.gate.weight",),
        [[0, 2, 3, 5], [1, 4], [0, 1, 2, 3, 5]],
    ),
    "qwen2_moe": (
        lambda: transformers.Qwen2MoeConfig(
            **_BASE,
            **_MOE,
            num_experts=6,
            shared_expert_intermediate_size=24,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
        ("mlp.gate.weight",),
        [[1, 2, 4, 5], [], [0, 3, 5]],
    ),
    "qwen3_moe": (
        lambda: transformers.Qwen3MoeConfig(**_BASE, **_MOE, num_experts=6, head_dim=8, norm_topk_prob=True),
        ("mlp.gate.weight",),
        [[0, 1, 2, 4, 5], [2, 3, 4], [1, 5]],
    ),
    "olmoe": (
        lambda: transformers.OlmoeConfig(**_BASE, num_experts=6, num_experts_per_tok=2),
        ("mlp.gate.weight",),
        [[3, 4, 5], [0, 1, 2, 4, 5], [0, 2]],
    ),
    "deepseek_v3": (
        lambda: transformers.DeepseekV3Config(
            **dict(_BASE, num_key_value_heads=4),
            **_MOE,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            routed_scaling_factor=1.5,
        ),
        ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
        [[], [0, 2, 3, 4, 5, 7], [1, 2, 4, 6]],  # groups {0..3}, {4..7}: drop 1 / 2 per group
    ),
    "gpt_oss": (
        lambda: transformers.GptOssConfig(**_BASE, num_local_experts=6, num_experts_per_tok=2, head_dim=8),
        (
            "mlp.router.weight",
            "mlp.router.bias",
            "mlp.experts.gate_up_proj",
            "mlp.experts.gate_up_proj_bias",
            "mlp.experts.down_proj",
            "mlp.experts.down_proj_bias",
        ),
        [[0, 1, 3, 4], [2, 5], [0, 1, 2, 4, 5]],
    ),
    "glm4_moe": (
        lambda: transformers.Glm4MoeConfig(
            **_BASE,
            **_MOE,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            use_qk_norm=True,
            head_dim=12,
            routed_scaling_factor=1.5,
        ),
        ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
        [[], [0, 1, 3, 4, 6, 7], [1, 2, 5, 6]],  # groups {0..3}, {4..7}
    ),
    "ernie4_5_moe": (
        lambda: transformers.Ernie4_5_MoeConfig(
            **_BASE,
            moe_num_experts=6,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
        ),
        ("mlp.gate.weight", "mlp.moe_statics.e_score_correction_bias"),
        [[], [0, 2, 3, 5], [1, 4]],  # layer 0 is dense (moe_layer_start_index 1)
    ),
    "minimax_m2": (
        lambda: transformers.MiniMaxM2Config(
            **_BASE,
            num_local_experts=6,
            num_experts_per_tok=2,
            head_dim=16,
            rotary_dim=8,
        ),
        ("block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias"),
        [[0, 1, 2, 5], [3, 4], [0, 2, 3, 4, 5]],
    ),
    "phimoe": (
        lambda: transformers.PhimoeConfig(
            **_BASE,
            num_local_experts=6,
            num_experts_per_tok=2,
            attention_bias=True,
            lm_head_bias=True,
        ),
        ("block_sparse_moe.gate.weight",),
        [[1, 2, 4], [0, 5], [0, 1, 2, 3, 5]],
    ),
    "llama4_text": (
        lambda: transformers.Llama4TextConfig(
            **_BASE,
            num_local_experts=6,
            num_experts_per_tok=1,
            intermediate_size_mlp=40,
            head_dim=8,
            moe_layers=[0, 2],
            attention_chunk_size=4,
        ),
        ("feed_forward.router.weight", "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
        [[0, 3, 4, 5], [], [1, 2]],
    ),
}
_EXPERT_KEY = re.compile(r"^(model\.layers\.(\d+)\..*\.experts\.)(\d+)(\..*)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def _build(family: str, seed: int = 0):
    model = build_model(CASES[family][0](), seed=seed)
    with torch.no_grad():  # non-zero router / correction biases, so slicing them is checked
        for name, p in model.named_parameters():
            if name.endswith(("router.bias", "proj_bias")):
                p.copy_(0.3 * torch.randn_like(p))
            if name.endswith("e_score_correction_bias"):  # ERNIE: a constant (see _mask_dropped)
                p.fill_(0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def _ff(layer):
    return getattr(layer, pruned.feed_forward_name(layer))


def _slice_checkpoint(src: str, dst: str, kept: list[list[int]], routed_keys: tuple[str, ...]) -> dict:
    """Write `dst/model.safetensors` keeping experts `kept[l]` of layer l (renumbered in order)."""
    out = {}
    with safe_open(os.path.join(src, "model.safetensors"), "np") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if m := _EXPERT_KEY.match(key):
                layer, expert = int(m[2]), int(m[3])
                if expert in kept[layer]:
                    out[f"{m[1]}{kept[layer].index(expert)}{m[4]}"] = tensor
                continue
            m = _LAYER_KEY.match(key)
            if m and m[2] in routed_keys:  # [E, ...], or ERNIE's correction bias [1, E]
                tensor = (
                    tensor[:, kept[int(m[1])]] if tensor.ndim == 2 and tensor.shape[0] == 1 else tensor[kept[int(m[1])]]
                )
            out[key] = np.ascontiguousarray(tensor)
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as fh:
        return json.load(fh)


def _mask_dropped(model, family: str, kept: list[list[int]]) -> None:
    """Make the original model route only to `kept[l]` in layer l (see the module docstring)."""
    for index, layer in enumerate(model.model.layers):
        if not kept[index]:
            continue
        mlp = _ff(layer)
        n_exp = mlp.experts.num_experts
        dropped = torch.tensor([e not in kept[index] for e in range(n_exp)])
        with torch.no_grad():
            if family == "gpt_oss":
                mlp.router.bias[dropped] = -1e9
            elif family in ("deepseek_v3", "glm4_moe"):
                mlp.gate.e_score_correction_bias[dropped] = -1e9
            elif family == "minimax_m2":
                mlp.e_score_correction_bias[dropped] = -1e9
            elif family == "ernie4_5_moe":
                mlp.gate.moe_statics.e_score_correction_bias[:, dropped] = -1e9
            elif family == "phimoe":
                mlp.router.register_forward_hook(_sparsemixer_mask(dropped))
            elif family == "llama4_text":
                mlp.router.register_forward_hook(_topk_sigmoid_mask(dropped))
            else:
                mlp.gate.register_forward_hook(_softmax_topk_mask(dropped))


def _sparsemixer_mask(dropped: torch.Tensor):
    """Phi-3.5-MoE: transformers' own sparsemixer on logits with the dropped experts at -inf."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    def hook(module, args, output):
        logits = output[0].masked_fill(dropped, float("-inf"))
        weights, index = sparsemixer(logits, jitter_eps=module.router_jitter_noise, training=False)
        return output[0], weights, index

    return hook


def _topk_sigmoid_mask(dropped: torch.Tensor):
    """Llama-4: the router's top-k of logits and sigmoid scores, the dropped experts at -inf."""

    def hook(module, args, output):
        logits = output[1].masked_fill(dropped, float("-inf"))
        top, index = torch.topk(logits, module.top_k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, index, top)
        return torch.sigmoid(scores.float()).to(scores.dtype), output[1]

    return hook


def _softmax_topk_mask(dropped: torch.Tensor):
    def hook(module, args, output):
        logits = output[0]
        probs = torch.softmax(logits.float().masked_fill(dropped, float("-inf")), dim=-1)
        top, index = torch.topk(probs, module.top_k, dim=-1)
        if getattr(module, "norm_topk_prob", True):  # Mixtral always renormalises
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index

    return hook


def _export(tmp_path, family: str, kept: list[list[int]], *, remote: bool):
    original = _build(family)
    src = str(tmp_path / "original")
    original.save_pretrained(src)
    dst = str(tmp_path / f"pruned_{family}")
    config = _slice_checkpoint(src, dst, kept, CASES[family][1])
    counts = [len(k) for k in kept]
    if remote:
        config = write_remote_code(dst, config, family=family, num_experts_per_layer=counts)
    else:  # what export writes for uniform counts: the family's own config translation
        fam = get_family(config["model_type"])
        config = fam.config_to_hf(fam.config_from_hf(config).with_num_experts(tuple(counts)), config)
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(config, fh)
    _mask_dropped(original, family, kept)
    return original, dst


def _expert_counts(model) -> list[int]:
    return [_ff(layer).experts.num_experts if hasattr(_ff(layer), "experts") else 0 for layer in model.model.layers]


@pytest.mark.parametrize("family", sorted(CASES))
def test_per_layer_counts_load_and_match_masked_original(tmp_path, family):
    kept = CASES[family][2]
    original, dst = _export(tmp_path, family, kept, remote=True)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        dst, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    assert type(model).__name__ == pruned.class_names(family)[1]
    assert type(model).__module__.startswith("transformers_modules")  # the copy in the export dir
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert _expert_counts(model) == [len(k) for k in kept]
    tokens = random_tokens(model.config.vocab_size, batch=2, seq=10, seed=1)
    want = torch_logits(original, tokens)
    got = torch_logits(model, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.1  # not a degenerate comparison

    # save_pretrained writes the family's on-disk layout (per-expert keys), which reloads identically.
    resaved = str(tmp_path / "resaved")
    model.save_pretrained(resaved)
    with (
        safe_open(os.path.join(dst, "model.safetensors"), "np") as a,
        safe_open(os.path.join(resaved, "model.safetensors"), "np") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key), err_msg=key)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True, dtype=torch.float32)
    np.testing.assert_array_equal(torch_logits(reloaded.eval(), tokens), got)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_uniform_counts_need_no_remote_code(tmp_path, family):
    n_layers_kept = {
        "mixtral": [[0, 2, 5], [1, 3, 4], [0, 1, 2]],
        "qwen2_moe": [[1, 2, 4], [], [0, 3, 5]],
        "gpt_oss": [[0, 4, 5], [1, 2, 3], [2, 3, 5]],
    }[family]
    original, dst = _export(tmp_path, family, n_layers_kept, remote=False)
    assert not os.path.exists(os.path.join(dst, "modeling_pruned_moe.py"))
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers.models.")
    assert _expert_counts(model) == [len(k) for k in n_layers_kept]
    tokens = random_tokens(model.config.vocab_size, seed=2)
    np.testing.assert_allclose(torch_logits(model, tokens), torch_logits(original, tokens), rtol=0, atol=1e-5)


def test_from_config_builds_per_layer_blocks_and_initialises_them():
    config = pruned.PrunedQwen2MoeConfig(**CASES["qwen2_moe"][0]().to_dict() | {"num_experts_per_layer": [5, 0, 2]})
    model = pruned.PrunedQwen2MoeForCausalLM(config)
    assert _expert_counts(model) == [5, 0, 2]
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (5, 2 * 16, TINY["hidden_size"])
    assert model.model.layers[0].mlp.gate.weight.shape == (5, TINY["hidden_size"])
    assert torch.isfinite(experts.gate_up_proj).all() and experts.gate_up_proj.std() > 0
    assert model.config.num_experts == 6 and model.num_experts == 6  # the full-model count is restored
    logits = model(input_ids=torch.tensor(random_tokens(TINY["vocab_size"]), dtype=torch.long)).logits
    assert torch.isfinite(logits).all()


def test_bad_configs_are_refused(tmp_path):
    base = CASES["mixtral"][0]().to_dict()
    with pytest.raises(ValueError, match="fewer than num_experts_per_tok"):
        pruned.PrunedMixtralConfig(**base | {"num_experts_per_layer": [4, 1, 3]})
    with pytest.raises(ValueError, match="3 decoder layers"):
        pruned.PrunedMixtralConfig(**base | {"num_experts_per_layer": [4, 3]})
    with pytest.raises(ValueError, match="no num_experts_per_layer"):
        pruned.PrunedMixtralForCausalLM(pruned.PrunedMixtralConfig(**base))
    qwen = CASES["qwen2_moe"][0]().to_dict()  # layer 1 is dense (mlp_only_layers)
    with pytest.raises(ValueError, match="layer 1 is a dense layer"):
        pruned.PrunedQwen2MoeForCausalLM(pruned.PrunedQwen2MoeConfig(**qwen | {"num_experts_per_layer": [4, 4, 4]}))
    deepseek = CASES["deepseek_v3"][0]().to_dict()
    with pytest.raises(ValueError, match="multiple of n_group=2"):
        pruned.PrunedDeepseekV3Config(**deepseek | {"num_experts_per_layer": [0, 5, 4]})
    with pytest.raises(ValueError, match="does not match family"):
        write_remote_code(tmp_path, base, family="qwen2_moe", num_experts_per_layer=[4, 2, 3])
    with pytest.raises(ValueError, match="unsupported MoE family"):
        write_remote_code(tmp_path, base, family="llama", num_experts_per_layer=[4, 2, 3])
    assert not os.path.exists(tmp_path / "modeling_pruned_moe.py")  # nothing written for refused configs


def test_write_remote_code_config_fields(tmp_path):
    base = CASES["olmoe"][0]().to_dict()
    out = write_remote_code(tmp_path, base, family="olmoe", num_experts_per_layer=[3, 5, 2])
    assert out["model_type"] == "olmoe" and out["base_model_type"] == "olmoe"
    assert out["num_experts_per_layer"] == [3, 5, 2] and out["num_experts"] == 5
    assert out["architectures"] == ["PrunedOlmoeForCausalLM"]
    assert out["auto_map"] == {
        "AutoConfig": "modeling_pruned_moe.PrunedOlmoeConfig",
        "AutoModelForCausalLM": "modeling_pruned_moe.PrunedOlmoeForCausalLM",
    }
    assert out["grape_remote_code_transformers_version"] == transformers.__version__
    assert base["model_type"] == "olmoe"  # the input is not modified
    with open(tmp_path / "modeling_pruned_moe.py") as fh:
        imports = {line.split()[1].split(".")[0] for line in fh if line.startswith(("import ", "from "))}
    assert imports <= {"copy", "torch", "transformers"}
