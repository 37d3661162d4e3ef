"""FP8 block-quantised checkpoints: dequantisation against a float64 NumPy reference (blocks cut by the
tensor edge included), checkpoints written here (bf16 weights quantised by this file's own NumPy
quantiser, with DeepSeek-V3's `quantization_config` keys), sharded loads, transformers' own FP8 loading,
bf16 and FP8 exports (byte-identical when nothing was merged, fresh scales for merged experts) and
one-line errors for bad scales and configs."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file as torch_load
from safetensors.torch import save_file as torch_save

from conversion.export import export_hf
from conversion.families.base import ConversionError
from conversion.load import load_hf
from conversion.quant.fp8 import FP8, dequantize_fp8, quantize_fp8
from conversion.safetensors_dtypes import CheckpointError
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.core.model import model_from_arrays, param_view
from grape_jax.core.sharding import make_mesh
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import save_hf
from grape_jax.planners.plan import build_plan
from tests.family_configs import NEW_CONFIGS
from tests.hf_models import TINY, build_model, random_tokens, save_model, torch_logits
from tests.test_model_parity import assert_close_logits

BF16 = np.dtype(ml_dtypes.bfloat16)
# DeepSeek-V3 / R1's quantization_config (Kimi-K2 ships the same keys).
DEEPSEEK_V3_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
UNQUANTISED = ("embed_tokens", "lm_head", "norm", ".gate.weight", "router", "correction_bias")


_TO_NUMPY = {torch.bfloat16: BF16, torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn)}


def load_file(path: str) -> dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays (bf16/fp8 as ml_dtypes), read by the safetensors package."""
    out = {}
    for key, t in torch_load(path).items():
        dtype = _TO_NUMPY.get(t.dtype)
        out[key] = (
            t.numpy()
            if dtype is None
            else t.view(torch.uint16 if dtype.itemsize == 2 else torch.uint8).numpy().view(dtype)
        )
    return out


def save_file(tensors: dict[str, np.ndarray], path: str, metadata=None) -> None:
    def to_torch(a: np.ndarray) -> torch.Tensor:
        for torch_dtype, dtype in _TO_NUMPY.items():
            if a.dtype == dtype:
                bits = np.ascontiguousarray(a).view(np.uint16 if dtype.itemsize == 2 else np.uint8)
                return torch.from_numpy(bits.astype(np.int16 if dtype.itemsize == 2 else np.uint8)).view(torch_dtype)
        return torch.from_numpy(np.ascontiguousarray(a))

    torch_save({k: to_torch(v) for k, v in tensors.items()}, path, metadata=metadata)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def reference_dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float64, element by element block lookup: the exact product, rounded to fp32 then bf16 (what
    transformers computes: an fp32 product, one cast)."""
    out = np.empty(weight.shape, np.float64)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            out[i, j] = float(weight[i, j]) * float(scale_inv[i // block[0], j // block[1]])
    return out.astype(np.float32).astype(BF16)


def numpy_quantize(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """This test's quantiser (DeepSeek's convention: scale_inv = amax / 448, fp8 = w / scale_inv), in
    float64 per block, edge blocks cut short."""
    w = np.asarray(w, np.float64)
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    q = np.empty(w.shape, FP8)
    s = np.empty(grid, np.float32)
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            tile = w[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]]
            amax = np.abs(tile).max()
            s[bi, bj] = np.float32(amax / 448.0) if amax > 0 else np.float32(1.0)
            q[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]] = np.clip(
                tile / float(s[bi, bj]), -448, 448
            ).astype(FP8)
    return q, s


def write_fp8_checkpoint(model, path: str, quant: dict) -> str:
    """Save `model` in bf16, then store every linear weight but routers, embeddings, norms and lm_head as
    FP8 + `weight_scale_inv`, and add `quant` as config.json's quantization_config."""
    save_model(model.to(torch.bfloat16), path)
    block = tuple(quant["weight_block_size"])
    tensors = load_file(os.path.join(path, "model.safetensors"))
    out = {}
    for key, value in tensors.items():
        if key.endswith(".weight") and value.ndim == 2 and not any(u in key for u in UNQUANTISED):
            out[key], out[key + "_scale_inv"] = numpy_quantize(value.astype(np.float32), block)
        else:
            out[key] = value
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = read_json(os.path.join(path, "config.json"))
    config["quantization_config"] = dict(quant)
    write_json(os.path.join(path, "config.json"), config)
    return path


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A tiny DeepSeek-V3 (MLA, group-limited router, shared experts, a dense layer) in the V3 FP8 layout."""
    cfg = transformers.DeepseekV3Config(
        **{**TINY, "num_key_value_heads": 4},
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_shared_experts=1,
    )
    return write_fp8_checkpoint(build_model(cfg, seed=7), str(tmp_path_factory.mktemp("v3fp8")), DEEPSEEK_V3_QUANT)


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    """MiniMax-M2 with [8, 16] blocks: most weights span several blocks, many cut by the edge (20 rows)."""
    quant = {**DEEPSEEK_V3_QUANT, "weight_block_size": [8, 16]}
    return write_fp8_checkpoint(
        build_model(NEW_CONFIGS["minimax_m2"](), seed=8), str(tmp_path_factory.mktemp("mmfp8")), quant
    )


def test_dequantize_matches_float64_reference_on_edge_blocks_and_slices():
    rng = np.random.default_rng(0)
    block = (16, 8)
    weight = rng.integers(0, 256, size=(37, 29), dtype=np.uint8).view(FP8)
    weight[np.isnan(weight.astype(np.float32))] = 0  # e4m3fn's two NaN codes
    scale = (rng.random((3, 4)) * 2.0 ** rng.integers(-12, 4, size=(3, 4))).astype(np.float32)
    want = reference_dequantize(weight, scale, block)
    np.testing.assert_array_equal(dequantize_fp8(weight, scale, block).view(np.uint16), want.view(np.uint16))
    for r0, r1, c0, c1 in ((5, 33, 3, 29), (16, 32, 8, 16), (36, 37, 0, 1), (0, 37, 7, 9)):
        part = dequantize_fp8(
            weight[r0:r1, c0:c1], scale[r0 // 16 : -(-r1 // 16), c0 // 8 : -(-c1 // 8)], block, row0=r0, col0=c0
        )
        np.testing.assert_array_equal(part.view(np.uint16), want[r0:r1, c0:c1].view(np.uint16))


def test_quantiser_reuses_exact_scales_and_bounds_fresh_error():
    rng = np.random.default_rng(1)
    block = (16, 16)
    w = (rng.standard_normal((40, 24)) * 0.05).astype(BF16)
    q, s = numpy_quantize(w.astype(np.float32), block)
    back = reference_dequantize(q, s, block)
    q2, s2 = quantize_fp8(back, block, reuse=s)  # the scales represent `back` exactly: same bytes
    assert q2.tobytes() == q.tobytes() and s2.tobytes() == s.tobytes()
    changed = back.copy()
    changed[0, 0] = BF16.type(float(back[0, 0]) + 0.01)  # block (0, 0) no longer fits its old scale
    q3, s3 = quantize_fp8(changed, block, reuse=s)
    assert s3[0, 0] != s[0, 0] and (s3.ravel()[1:] == s.ravel()[1:]).all()
    fresh = dequantize_fp8(q3, s3, block, dtype=np.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 of each block's largest value (normal range)
    amax = np.abs(changed.astype(np.float32)).max()
    assert np.abs(fresh - changed.astype(np.float32)).max() <= amax * 2.0**-4


def test_quantiser_matches_transformers_fresh_quantisation():
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    class Quantizer:
        quantization_config = FineGrainedFP8Config(weight_block_size=(16, 8))

    w = (np.random.default_rng(2).standard_normal((32, 24)) * 0.1).astype(np.float32)
    w[:16, :8] = 0.0  # an all-zero block keeps scale 1
    ref = Fp8Quantize(Quantizer())._quantize_one("x.weight", torch.from_numpy(w))
    q, s = quantize_fp8(w, (16, 8))
    assert q.tobytes() == ref["x.weight"].view(torch.uint8).numpy().tobytes()
    assert s.tobytes() == ref["x.weight_scale_inv"].numpy().tobytes()


def test_load_dequantises_like_the_reference_on_one_and_eight_devices(minimax):
    single = param_view(load_hf(minimax))
    sharded = param_view(load_hf(minimax, mesh=make_mesh("fsdp=2,expert=4")))
    stored = load_file(os.path.join(minimax, "model.safetensors"))
    w1 = stored["model.layers.1.block_sparse_moe.experts.5.w1.weight"]  # [20, 32]: rows cut at 16..20
    want = reference_dequantize(w1, stored["model.layers.1.block_sparse_moe.experts.5.w1.weight_scale_inv"], (8, 16))
    np.testing.assert_array_equal(np.asarray(single["layers.1.mlp.w_gate"])[5].T.view(np.uint16), want.view(np.uint16))
    q = stored["model.layers.0.self_attn.q_proj.weight"]
    want = reference_dequantize(q, stored["model.layers.0.self_attn.q_proj.weight_scale_inv"], (8, 16))
    np.testing.assert_array_equal(np.asarray(single["layers.0.attn.q_proj"]).T.view(np.uint16), want.view(np.uint16))
    assert np.asarray(single["layers.0.mlp.router"]).dtype == BF16  # the router stays as stored
    for name, value in single.items():
        assert np.asarray(sharded[name]).tobytes() == np.asarray(value).tobytes(), name


def test_transformers_loads_the_same_fp8_checkpoint(v3):
    """transformers dequantises FP8 checkpoints to bf16 on CPU; with one block per tensor (128 > every
    dim) its grid and ours agree. Both models then run in fp32, so any weight that dequantised
    differently (one bf16 ulp is 0.4%) would show far above the fp32 tolerance."""
    loaded = load_hf(v3)
    tokens = random_tokens(TINY["vocab_size"], batch=2, seq=12, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(v3).eval()
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ours = model_from_arrays(loaded.cfg, {k: v.astype(np.float32) for k, v in param_view(loaded).items()})
    assert_close_logits(ours(tokens), torch_logits(model.float(), tokens))


@pytest.mark.parametrize("fixture", ["v3", "minimax"])
def test_export_fp8_round_trip_is_byte_identical_and_bf16_export_drops_quantization(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    loaded = load_hf(src)
    out = export_hf(loaded, tmp_path / "fp8", quantize="fp8")
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    assert (
        read_json(os.path.join(out, "config.json"))["quantization_config"]
        == loaded.info.hf_config["quantization_config"]
    )
    plain = export_hf(loaded, tmp_path / "bf16")
    assert "quantization_config" not in read_json(os.path.join(plain, "config.json"))
    tensors = load_file(os.path.join(plain, "model.safetensors"))
    assert not any(k.endswith("_scale_inv") for k in tensors)
    again = param_view(load_hf(plain))
    for name, value in param_view(loaded).items():
        assert np.asarray(again[name]).tobytes() == np.asarray(value).tobytes(), name


def test_pruned_fp8_export_keeps_unmerged_scales_and_requantises_merged(tmp_path, minimax):
    loaded = load_hf(minimax)
    cfg = loaded.cfg
    stats = calibrate(
        loaded,
        random_tokens(cfg.vocab_size, batch=2, seq=12, seed=4),
        options=CalibrationOptions(batch_size=2, token_chunk=24),
        progress=False,
    )
    groups = [[[0, 1], *[[e] for e in range(2, 8)]], [*[[e] for e in range(7)]]]  # merge 0+1; drop 7
    plan = build_plan(stats, groups, method="hand", budget=2, operator="freq", dropped_per_layer=[(), (7,)])
    merged = merge_model(loaded, plan)
    new_cfg = merged.cfg
    out = save_hf(merged, tmp_path / "out", quantize="fp8")
    a, b = load_file(os.path.join(minimax, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    expert = "model.layers.{}.block_sparse_moe.experts.{}.w1.weight"
    for new, old in ((1, 2), (6, 7)):  # layer 0: unmerged experts shifted down by one, same bytes
        for suffix in ("", "_scale_inv"):
            assert b[expert.format(0, new) + suffix].tobytes() == a[expert.format(0, old) + suffix].tobytes()
    for e in range(7):  # layer 1: pruning only
        assert b[expert.format(1, e) + "_scale_inv"].tobytes() == a[expert.format(1, e) + "_scale_inv"].tobytes()
    fresh = expert.format(0, 0)
    assert b[fresh + "_scale_inv"].tobytes() != a[fresh + "_scale_inv"].tobytes()
    back = dequantize_fp8(b[fresh], b[fresh + "_scale_inv"], (8, 16), dtype=np.float32)
    want = np.asarray(param_view(merged)["layers.0.mlp.w_gate"])[0].T.astype(np.float32)
    assert np.abs(back - want).max() <= np.abs(want).max() * 2.0**-4
    again = load_hf(out)
    assert again.cfg == new_cfg
    tokens = random_tokens(cfg.vocab_size, batch=2, seq=12, seed=5)
    assert_close_logits(again(tokens), merged(tokens), tol=5e-2)


def _edit(src: str, dst: str, change) -> str:
    """A copy of checkpoint `src` with `change(tensors, config)` applied."""
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    config = read_json(os.path.join(src, "config.json"))
    change(tensors, config)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(dst, "config.json"), config)
    return dst


SCALE = "model.layers.1.block_sparse_moe.experts.3.w1.weight_scale_inv"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t, c: t.update({SCALE: t[SCALE][:-1]}),  # the edge row of blocks missing
            r"weight_scale_inv' has shape \(2, 2\), but config.json implies \(3, 2\)",
        ),
        (lambda t, c: t.update({SCALE: t[SCALE].reshape(-1)}), r"has shape \(6,\), but config.json implies \(3, 2\)"),
        (
            lambda t, c: t.update({SCALE: t[SCALE].astype(np.int32)}),
            r"has dtype I32, .* one of \['F32', 'BF16', 'F16'\]",
        ),
        (lambda t, c: c["quantization_config"].pop("weight_block_size"), "weight_block_size None is not supported"),
        (lambda t, c: c["quantization_config"].update(activation_scheme="static"), "activation_scheme='static'"),
        (
            lambda t, c: t.update({"model.embed_tokens.weight_scale_inv": np.ones((1, 1), np.float32)}),
            "FP8 is read for linear weights only, not for embed",
        ),
    ],
)
def test_bad_scales_and_configs_get_one_line_errors(tmp_path, minimax, change, message):
    path = _edit(minimax, str(tmp_path / "bad"), change)
    with pytest.raises(ConversionError, match=message) as err:
        load_hf(path)
    assert "\n" not in str(err.value)


def test_truncated_scale_file_and_fp8_export_of_a_bf16_source_are_refused(tmp_path, minimax):
    path = _edit(minimax, str(tmp_path / "cut"), lambda t, c: None)
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 64)
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(path)
    src = save_model(build_model(NEW_CONFIGS["minimax_m2"](), seed=1), tmp_path / "bf16")
    loaded = load_hf(src)
    with pytest.raises(ConversionError, match="--quantize fp8 requantises like the source checkpoint"):
        export_hf(loaded, tmp_path / "x", quantize="fp8")
    assert not os.path.exists(tmp_path / "x")


def test_cli_convert_merge_export_fp8(tmp_path, minimax, capsys):
    """`grape convert -> merge -> export --quantize fp8`: the merged checkpoint's plan tells export which
    experts are unchanged copies, so they keep their bytes."""
    from grape_jax.cli.main import main as grape

    loaded = load_hf(minimax)
    stats = calibrate(
        loaded,
        random_tokens(loaded.cfg.vocab_size, batch=2, seq=12, seed=4),
        options=CalibrationOptions(batch_size=2, token_chunk=24),
        progress=False,
    )
    plan = build_plan(
        stats,
        [[[0], [1], [2], [3, 4], [5], [6], [7]], [[e] for e in range(8)]],
        method="hand",
        budget=1,
        operator="freq",
    )
    plan.save(tmp_path / "plan.json")
    ckpt, merged, out = (str(tmp_path / n) for n in ("ckpt", "merged", "out"))
    assert grape(["convert", minimax, ckpt]) == 0
    assert grape(["merge", ckpt, str(tmp_path / "plan.json"), "--out", merged]) == 0
    assert grape(["export", merged, out, "--quantize", "fp8"]) == 0
    capsys.readouterr()
    a, b = load_file(os.path.join(minimax, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    key = "model.layers.0.block_sparse_moe.experts.{}.w2.weight_scale_inv"
    assert b[key.format(4)].tobytes() == a[key.format(5)].tobytes()  # expert 5 became 4, unchanged
    assert b[key.format(3)].tobytes() != a[key.format(3)].tobytes()  # 3 + 4 merged: fresh scales
    assert (
        b["model.layers.1.self_attn.q_proj.weight"].tobytes() == a["model.layers.1.self_attn.q_proj.weight"].tobytes()
    )
    with pytest.raises(SystemExit):  # argparse refuses other formats
        grape(["export", merged, str(tmp_path / "bad"), "--quantize", "fp4"])
    assert "invalid choice: 'fp4'" in capsys.readouterr().err
