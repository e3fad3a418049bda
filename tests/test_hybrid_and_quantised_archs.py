"""Nemotron-H (Mamba-2 hybrid), gpt-oss (MXFP4 experts) and Gemma 3 (sliding window) by hand.

Every expected number is worked out here from the config numbers, with the arithmetic written
out; the code under test is never asked for an expectation. Configs are those of
/work/shared/data/model_configs (HF config.json facts).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import ModelDescription, UnsupportedArchitectureError, load_model
from llmco2_vllm.predict.roofline import Roofline, RooflineAssumptions, step_cost
from llmco2_vllm.predict.step_shape import StepShape

NEMOTRON_NANO_12B: dict[str, Any] = {
    "model_type": "nemotron_h", "num_hidden_layers": 62, "hidden_size": 5120, "intermediate_size": 20480,
    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    "mamba_num_heads": 128, "mamba_head_dim": 80, "ssm_state_size": 128, "torch_dtype": "bfloat16",
}

GPT_OSS_120B: dict[str, Any] = {
    "model_type": "gpt_oss", "num_hidden_layers": 36, "hidden_size": 2880, "intermediate_size": 2880,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088,
    "num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128, "tie_word_embeddings": False,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "quantization_config": {"quant_method": "mxfp4"},
}

GEMMA_3_27B: dict[str, Any] = {
    "model_type": "gemma3_text", "num_hidden_layers": 62, "hidden_size": 5376, "intermediate_size": 21504,
    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 262144,
    "sliding_window": 1024, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
}

H100_BF16 = 989.4e12  # dense BF16 tensor peak of the catalog's H100-SXM (checked below)


def h100(tp: int = 1) -> Hardware:
    return Hardware(find_gpu("H100"), tp, tp, "configured")


def op(cost, name: str) -> int:
    return cost.op_names.index(name)


# ---- Nemotron-Nano-12B-v2 ------------------------------------------------------------------------
N_PATTERN = NEMOTRON_NANO_12B["hybrid_override_pattern"]
N_MAMBA, N_MLP, N_ATTN = 28, 28, 6  # counted in the pattern: M, -, *
assert (N_PATTERN.count("M"), N_PATTERN.count("-"), N_PATTERN.count("*")) == (N_MAMBA, N_MLP, N_ATTN)
assert N_MAMBA + N_MLP + N_ATTN == 62
N_H = 5120
N_D_INNER = 128 * 80                      # 10_240
N_GROUPS_STATE = 8 * 128                  # n_groups (default 8) x state = 1_024
N_CONV_DIM = N_D_INNER + 2 * N_GROUPS_STATE  # 12_288
N_IN_PROJ = N_H * (2 * N_D_INNER + 2 * N_GROUPS_STATE + 128)  # 5120 x 22_656 = 115_998_720
N_OUT_PROJ = N_D_INNER * N_H              # 52_428_800
N_CONV = N_CONV_DIM * 4                   # conv_kernel 4: 49_152
N_MAMBA_LAYER = N_IN_PROJ + N_OUT_PROJ + N_CONV  # 168_476_672
N_ATTN_LAYER = N_H * 40 * 128 * 2 + 2 * N_H * 8 * 128  # q, o: 26_214_400 each; k, v: 5_242_880 each
N_MLP_LAYER = 2 * N_H * 20480             # squared-ReLU up + down (not gated): 209_715_200
N_EMBED = 131072 * N_H                    # 671_088_640, LM head untied: the same again
N_TOTAL = N_MAMBA * N_MAMBA_LAYER + N_ATTN * N_ATTN_LAYER + N_MLP * N_MLP_LAYER + 2 * N_EMBED
assert (N_IN_PROJ, N_MAMBA_LAYER, N_ATTN_LAYER, N_MLP_LAYER) == (115_998_720, 168_476_672, 62_914_560, 209_715_200)
assert N_TOTAL == 12_309_037_056
# Recurrent state of one sequence: SSM 128 x 80 x 128 bf16 + conv (4 - 1) x 12_288 bf16, per Mamba layer.
N_STATE = N_MAMBA * (128 * 80 * 128 * 2 + 3 * N_CONV_DIM * 2)  # 28 x (2_621_440 + 73_728) = 75_464_704
assert N_STATE == 75_464_704
# Scan per token and Mamba layer: 6 x heads x head_dim x state + 2 x kernel x conv_dim.
N_SCAN = N_MAMBA * (6 * 128 * 80 * 128 + 2 * 4 * N_CONV_DIM)  # 28 x (7_864_320 + 98_304) = 222_953_472
assert N_SCAN == 222_953_472


@pytest.fixture(scope="module")
def nemotron() -> ModelDescription:
    return ModelDescription.from_hf_config(NEMOTRON_NANO_12B, name="nemotron-nano-12b-v2")


def test_nemotron_h_description(nemotron: ModelDescription) -> None:
    m = nemotron
    assert m.approximation == "" and m.is_hybrid and not m.gated_mlp
    assert (m.num_layers, m.num_mamba_layers, m.num_attention_layers, m.num_dense_layers) == (62, 28, 6, 28)
    assert (m.mamba_n_groups, m.mamba_conv_kernel, m.mamba_state_dtype) == (8, 4, "bf16")
    assert m.mamba_params_per_layer == N_MAMBA_LAYER
    assert m.attention_params_per_layer == N_ATTN_LAYER
    assert m.dense_mlp_params_per_layer == N_MLP_LAYER
    assert m.total_params == N_TOTAL  # 12.31 B: the "12B" of the name
    assert m.active_params_per_token == N_TOTAL - N_EMBED  # all but the embedding lookup
    assert m.weight_bytes == N_TOTAL * 2 and m.non_expert_weight_bytes == N_TOTAL * 2
    assert m.mamba_state_bytes_per_sequence == N_STATE
    assert m.mamba_scan_flops_per_token == N_SCAN
    # K/V only in the 6 attention layers: 2 x 8 heads x 128 x 2 bytes = 4096 per layer.
    assert m.kv_cache_bytes_per_token == 6 * 4096 == 24_576
    assert load_model("nvidia/NVIDIA-Nemotron-Nano-12B-v2").total_params == N_TOTAL


def test_nemotron_h_transformers_config_object_matches_config_json() -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "NemotronHConfig"):
        pytest.skip("this transformers has no NemotronHConfig")
    # transformers 5 keeps the pattern as layers_block_type ("linear_attention" = Mamba-2) and has MoE
    # defaults; the description must not depend on that spelling.
    fields = {k: v for k, v in NEMOTRON_NANO_12B.items() if k not in ("model_type", "torch_dtype")}
    config = transformers.NemotronHConfig(**fields, dtype="bfloat16", mamba_ssm_cache_dtype="bfloat16")
    assert ModelDescription.from_hf_config(config, name="n") == ModelDescription.from_hf_config(NEMOTRON_NANO_12B, name="n")


def test_nemotron_h_fp32_ssm_state() -> None:
    m = ModelDescription.from_hf_config({**NEMOTRON_NANO_12B, "mamba_ssm_cache_dtype": "float32"})
    # SSM state in fp32 (4 bytes), conv state stays in the model dtype (2 bytes).
    assert m.mamba_state_bytes_per_sequence == 28 * (128 * 80 * 128 * 4 + 3 * 12_288 * 2)


def test_nemotron_h_decode_step_by_hand(nemotron: ModelDescription) -> None:
    batch, context = 4, 1000
    cost = step_cost(nemotron, h100(), StepShape.static_batch_decode(batch, context))
    # Weights: every matmul weight once, bf16; the embedding table is gathered, not streamed.
    assert cost.weight_bytes == pytest.approx((N_TOTAL - N_EMBED) * 2, rel=1e-12)
    assert cost.op_weight_bytes[op(cost, "mamba")] == pytest.approx(N_MAMBA * N_MAMBA_LAYER * 2, rel=1e-12)
    assert cost.op_weight_bytes[op(cost, "qkv_projection")] == pytest.approx(
        N_ATTN * (N_ATTN_LAYER - 40 * 128 * N_H) * 2, rel=1e-12)
    assert cost.op_weight_bytes[op(cost, "mlp")] == pytest.approx(N_MLP * N_MLP_LAYER * 2, rel=1e-12)
    # FLOPs: 2 per projection weight per token (conv weights are in the scan term), the scan, and
    # attention over 1001 keys in 6 layers at 4 x 40 heads x 128 = 20_480 FLOPs per key.
    gemm_per_token = 2 * (N_MAMBA * (N_IN_PROJ + N_OUT_PROJ) + N_ATTN * N_ATTN_LAYER + N_MLP * N_MLP_LAYER + N_EMBED)
    assert gemm_per_token == 23_273_144_320
    attention = 20_480 * 1001 * 6  # 123_002_880 per request
    assert cost.op_flops[op(cost, "attention")] == pytest.approx(batch * attention, rel=1e-12)
    assert cost.op_flops[op(cost, "mamba")] == pytest.approx(
        batch * (2 * N_MAMBA * (N_IN_PROJ + N_OUT_PROJ) + N_SCAN), rel=1e-12)
    assert cost.flops == pytest.approx(batch * (gemm_per_token + N_SCAN + attention), rel=1e-12)
    # Cache traffic: K/V read 1001 + write 1 token in 6 layers; the state read and written once per row.
    assert cost.op_kv_cache_bytes[op(cost, "attention")] == pytest.approx(batch * 1002 * 6 * 4096, rel=1e-12)
    assert cost.op_kv_cache_bytes[op(cost, "mamba")] == pytest.approx(batch * 2 * N_STATE, rel=1e-12)
    assert batch * 2 * N_STATE == 603_717_632  # 0.6 GB: 2.6 % of the 23.3 GB of weights at batch 4
    # A prefill chunk moves the state once too, whatever its length.
    prefill = step_cost(nemotron, h100(), StepShape.static_batch_prefill(2, 3000))
    assert prefill.op_kv_cache_bytes[op(prefill, "mamba")] == pytest.approx(2 * 2 * N_STATE, rel=1e-12)
    assert prefill.op_flops[op(prefill, "attention")] == pytest.approx(2 * 20_480 * 6 * 3000 * 3001 / 2, rel=1e-12)


def test_nemotron_h_tensor_parallel_has_one_all_reduce_per_block(nemotron: ModelDescription) -> None:
    cost = step_cost(nemotron, h100(2), StepShape.static_batch_decode(3, 10))
    # 62 blocks x 3 tokens x 5120 x 2 bytes, ring factor 2(2-1)/2 = 1, on each of 2 GPUs.
    assert cost.op_interconnect_bytes[op(cost, "tensor_parallel_all_reduce")] == pytest.approx(
        62 * 3 * 5120 * 2 * 1 * 2, rel=1e-12)


# ---- gpt-oss-120b (MXFP4 experts) ---------------------------------------------------------------
G_H = 2880
G_ATTN_LAYER = 2 * G_H * 64 * 64 + 2 * G_H * 8 * 64  # q, o 11_796_480 each; k, v 1_474_560 each
G_EXPERT = 3 * G_H * 2880                  # gate, up, down: 24_883_200
G_ROUTER = G_H * 128                       # 368_640
G_EMBED = 201088 * G_H                     # 579_133_440 (LM head untied: the same again)
G_MXFP4 = (4 + 8 / 32) / 8                 # 4-bit E2M1 + one E8M0 scale per 32 weights = 0.53125 B
G_ROUTED = 36 * 128 * G_EXPERT             # 114_661_785_600 routed-expert weights
assert (G_ATTN_LAYER, G_EXPERT, G_ROUTED) == (26_542_080, 24_883_200, 114_661_785_600)
G_NON_EXPERT_BYTES = (36 * G_ATTN_LAYER + 36 * G_ROUTER + 2 * G_EMBED) * 2  # bf16: 4_254_105_600
G_WEIGHT_BYTES = G_NON_EXPERT_BYTES + G_ROUTED * G_MXFP4  # + 60_914_073_600
assert G_WEIGHT_BYTES == 65_168_179_200  # 65.2 GB: fits one 80 GB H100, as served


def test_gpt_oss_dtypes_and_bytes() -> None:
    m = ModelDescription.from_hf_config(GPT_OSS_120B, name="gpt-oss-120b")
    assert (m.weight_dtype, m.expert_weight_dtype, m.lm_head_weight_dtype) == ("bf16", "mxfp4", "bf16")
    assert m.expert_weight_bytes_per_param == 0.53125
    assert m.total_params == 36 * (G_ATTN_LAYER + G_ROUTER) + G_ROUTED + 2 * G_EMBED == 116_788_838_400
    assert m.non_expert_weight_bytes == G_NON_EXPERT_BYTES
    assert m.weight_bytes == G_WEIGHT_BYTES
    catalog = load_model("openai/gpt-oss-120b")
    assert catalog.weight_bytes == G_WEIGHT_BYTES and catalog.num_sliding_window_layers == 18


def test_gpt_oss_decode_step_by_hand() -> None:
    m = ModelDescription.from_hf_config(GPT_OSS_120B, name="gpt-oss-120b")
    roofline = Roofline(m, h100())
    cost = roofline.cost(StepShape.static_batch_decode(1, 1000))
    # One token routes to 4 of 128 experts: 128 x (1 - (1 - 4/128)^1) = 4 per layer, MXFP4 bytes.
    experts = 36 * 4 * G_EXPERT * G_MXFP4  # 1_903_564_800
    assert cost.op_weight_bytes[op(cost, "moe_experts")] == pytest.approx(experts, rel=1e-12)
    assert cost.op_weight_bytes[op(cost, "moe_router")] == pytest.approx(36 * G_ROUTER * 2, rel=1e-12)
    assert cost.op_weight_bytes[op(cost, "lm_head")] == pytest.approx(G_EMBED * 2, rel=1e-12)
    assert cost.weight_bytes == pytest.approx(experts + 36 * (G_ATTN_LAYER + G_ROUTER) * 2 + G_EMBED * 2, rel=1e-12)
    # Attention: 18 full layers see 1001 keys, 18 sliding layers 128; 4 x 64 heads x 64 = 16_384 per key.
    assert cost.op_flops[op(cost, "attention")] == pytest.approx(16_384 * (18 * 1001 + 18 * 128), rel=1e-12)
    # K/V: read 18 x 1001 + 18 x min(1001, 128 + 1 - 1), write 36; 2 x 8 x 64 x 2 = 2048 bytes each.
    assert cost.kv_cache_bytes == pytest.approx((18 * 1001 + 18 * 128 + 36) * 2048, rel=1e-12)
    # Expert FLOPs: 4 experts x 2 x 24_883_200 x 36 layers.
    assert cost.op_flops[op(cost, "moe_experts")] == pytest.approx(4 * 2 * G_EXPERT * 36, rel=1e-12)
    # The H100 has no FP4 units: MXFP4 experts are dequantised and every GEMM runs at the BF16 rate.
    assert find_gpu("H100").peak_flops("bf16") == H100_BF16
    np.testing.assert_allclose(roofline.op_peak_flops, H100_BF16 * 0.70, rtol=1e-12)
    assert find_gpu("H100").peak_flops("mxfp4") == H100_BF16


def test_fp8_checkpoint_keeps_lm_head_and_router_in_bf16() -> None:
    m = load_model("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8")
    roofline = Roofline(m, h100(4))
    cost = roofline.cost(StepShape.static_batch_decode(1, 100))
    h, vocab = 4096, 151936
    assert cost.op_weight_bytes[op(cost, "lm_head")] == pytest.approx(h * vocab * 2, rel=1e-12)
    assert cost.op_weight_bytes[op(cost, "moe_router")] == pytest.approx(94 * h * 128 * 2, rel=1e-12)
    # q, o: 4096 x 64 x 128; k, v: 4096 x 4 x 128 -> 71_303_168 per layer, 1 byte each.
    assert cost.op_weight_bytes[op(cost, "qkv_projection")] + cost.op_weight_bytes[op(cost, "output_projection")] == (
        pytest.approx(94 * (2 * h * 64 * 128 + 2 * h * 4 * 128) * 1, rel=1e-12))
    gpu = find_gpu("H100")
    peaks = dict(zip(roofline.op_names, roofline.op_peak_flops / 0.70))
    assert peaks["qkv_projection"] == pytest.approx(gpu.peak_flops("fp8"), rel=1e-12)
    assert peaks["moe_experts"] == pytest.approx(gpu.peak_flops("fp8"), rel=1e-12)
    for name in ("lm_head", "moe_router", "attention"):
        assert peaks[name] == pytest.approx(gpu.peak_flops("bf16"), rel=1e-12)


# ---- Gemma 3 27B (5 sliding : 1 global) ---------------------------------------------------------

def test_gemma3_sliding_window_prefill_and_decode_by_hand() -> None:
    m = ModelDescription.from_hf_config(GEMMA_3_27B, name="gemma-3-27b")
    # Pattern 6: layers 5, 11, ..., 59 are global -> 62 // 6 = 10 full, 52 sliding.
    assert (m.num_sliding_window_layers, m.sliding_window, m.tie_word_embeddings) == (52, 1024, True)
    per_key = 4 * 32 * 128  # 16_384
    kv_token_layer = 2 * 16 * 128 * 2  # 8192 bytes
    prefill = step_cost(m, h100(), StepShape.static_batch_prefill(1, 2000))
    full_keys = 2000 * 2001 // 2  # 2_001_000
    sliding_keys = 1024 * 1025 // 2 + (2000 - 1024) * 1024  # 524_800 + 999_424 = 1_524_224
    assert prefill.op_flops[op(prefill, "attention")] == pytest.approx(
        per_key * (10 * full_keys + 52 * sliding_keys), rel=1e-12)  # 1_626_433_912_832
    # K/V: each layer reads the 2000-token chunk it attends (the window covers it: min(2000, 1024 + 2000 - 1))
    # and writes 2000 tokens.
    assert prefill.kv_cache_bytes == pytest.approx((10 * 2000 + 52 * 2000 + 62 * 2000) * kv_token_layer, rel=1e-12)
    decode = step_cost(m, h100(), StepShape.static_batch_decode(2, 5000))
    assert decode.op_flops[op(decode, "attention")] == pytest.approx(2 * per_key * (10 * 5001 + 52 * 1024), rel=1e-12)
    assert decode.kv_cache_bytes == pytest.approx(2 * (10 * 5001 + 52 * 1024 + 62) * kv_token_layer, rel=1e-12)
    # Tied embeddings: the LM head still streams the 262_144 x 5376 table once per step.
    assert decode.op_weight_bytes[op(decode, "lm_head")] == pytest.approx(262_144 * 5376 * 2, rel=1e-12)


# ---- the fast paths agree with the per-operator cost on the new architectures -------------------

def _random_step(rng: np.random.Generator, n: int, kind: str) -> StepShape:
    context = rng.integers(0, 40_000, n) * (rng.random(n) < 0.9)
    if kind == "prefill":
        prefill, decode = rng.integers(1, 4096, n), np.zeros(n, dtype=np.int64)
    elif kind == "decode":
        prefill, decode = np.zeros(n, dtype=np.int64), rng.integers(1, 4, n)
    else:
        role = rng.integers(0, 4, n)  # prefill, decode, last chunk + decode, idle
        prefill = np.where((role == 0) | (role == 2), rng.integers(1, 2048, n), 0)
        decode = np.where((role == 1) | (role == 2), rng.integers(1, 4, n), 0)
    return StepShape(tuple(f"r{i}" for i in range(n)), prefill, decode, context, np.maximum(decode - 1, 0))


NEW_ARCHITECTURES = {
    "nemotron-h": NEMOTRON_NANO_12B,
    "nemotron-h-fp32-state": {**NEMOTRON_NANO_12B, "mamba_ssm_cache_dtype": "float32"},
    "gpt-oss-mxfp4": GPT_OSS_120B,
    "gemma-3-sliding": GEMMA_3_27B,
}


@pytest.mark.parametrize("name", list(NEW_ARCHITECTURES))
def test_predict_phases_equals_cost(name: str) -> None:
    from llmco2_vllm.predict.predictor import AnalyticPredictor, prediction_from_cost

    model = ModelDescription.from_hf_config(NEW_ARCHITECTURES[name], name=name)
    rng = np.random.default_rng(99)
    special = [
        StepShape.from_requests([]),
        StepShape.from_requests([("idle", 0, 0, 100)]),
        StepShape.static_batch_prefill(1, 1),
        StepShape.static_batch_decode(1, 0),
        StepShape.static_batch_decode(256, 3000),
        StepShape.static_batch_prefill(3, 60_000),
        StepShape.from_requests([("a", 0, 1, 5), ("b", 0, 0, 7), ("c", 200, 1, 50)]),
    ]
    for gpu, tp, pp in (("H100", 1, 1), ("A100", 4, 2), ("L4", 8, 1)):
        predictor = AnalyticPredictor(model, Hardware(find_gpu(gpu), tp * pp, tp, "configured"), pipeline_parallel=pp)
        steps = special + [_random_step(rng, int(rng.integers(1, 60)), kind) for kind in ("prefill", "decode", "mixed") * 4]
        for step in steps:
            fast, reference = predictor.predict_step(step), prediction_from_cost(predictor.cost(step))
            for field in ("prefill_seconds", "decode_seconds", "prefill_energy_j", "decode_energy_j"):
                assert getattr(fast, field) == pytest.approx(getattr(reference, field), rel=1e-9, abs=1e-300), (
                    gpu, field)
            for field in ("request_prefill_weights", "request_decode_weights"):
                np.testing.assert_allclose(getattr(fast, field), getattr(reference, field), rtol=1e-9, atol=1e-15)
            cost = predictor.cost(step)
            if cost.seconds > 0:
                np.testing.assert_allclose(cost.row_share.sum(axis=1), 1.0, rtol=1e-12)
                assert cost.row_energy_j().sum() == pytest.approx(cost.energy_j, rel=1e-12)


@pytest.mark.parametrize("name", list(NEW_ARCHITECTURES))
def test_static_batch_equals_step_by_step_sums(name: str) -> None:
    model = ModelDescription.from_hf_config(NEW_ARCHITECTURES[name], name=name)
    roofline = Roofline(model, h100(), RooflineAssumptions())
    batch, prompt, output = 8, 900, 300  # decode crosses gpt-oss's 128 and gemma's 1024-token windows
    prefill_s, prefill_j, decode_s, decode_j = roofline.static_batch(batch, prompt, output)
    first = roofline.cost(StepShape.static_batch_prefill(batch, prompt))
    assert (prefill_s, prefill_j) == pytest.approx((first.seconds, first.energy_j), rel=1e-12)
    steps = [roofline.cost(StepShape.static_batch_decode(batch, prompt + i)) for i in range(output - 1)]
    assert decode_j == pytest.approx(sum(c.energy_j for c in steps), rel=1e-3)
    assert decode_s == pytest.approx(sum(c.seconds for c in steps), rel=1e-3)


# ---- architectures that cannot be described degrade to a dense estimate --------------------------

XLSTM_LIKE: dict[str, Any] = {
    "model_type": "xlstm", "num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
    "vocab_size": 50304, "num_parameters": 1_300_000_000, "torch_dtype": "bfloat16",
}


def test_unknown_recurrent_family_degrades_to_dense_estimate(caplog: pytest.LogCaptureFixture) -> None:
    from llmco2_vllm.predict.forecast import forecast_static_batch
    from llmco2_vllm.predict.predictor import AnalyticPredictor

    with caplog.at_level(logging.WARNING, logger="llmco2_vllm.predict.model_description"):
        first = ModelDescription.from_hf_config(XLSTM_LIKE, name="test/xlstm-degrade-once")
        again = ModelDescription.from_hf_config(XLSTM_LIKE, name="test/xlstm-degrade-once")
    warnings = [r for r in caplog.records if "test/xlstm-degrade-once" in r.getMessage()]
    assert len(warnings) == 1  # one warning per model name
    assert first == again
    assert "xlstm" in first.approximation and "parameter count" in first.approximation
    # Dense equivalent: attention 4 x 2048^2 per layer (16 heads x 128 = 2048, no GQA), embedding and
    # untied LM head 50_304 x 2048 each; the gated MLP width fills the rest of the stated 1.3 B.
    attention, embed = 4 * 2048 * 2048, 50_304 * 2048
    width = round((1_300_000_000 - 24 * attention - 2 * embed) / 24 / (3 * 2048))  # 691_301_632 / 24 / 6144
    assert first.intermediate_size == width == 4_688
    assert first.total_params == pytest.approx(1.3e9, rel=1e-4)
    predictor = AnalyticPredictor(first, h100())
    forecast = forecast_static_batch(predictor, 4, 256, 64)
    assert math.isfinite(forecast.energy_j) and forecast.energy_j > 0


@pytest.mark.parametrize(
    "config",
    [
        {**XLSTM_LIKE, "model_type": "llama", "layer_types": ["full_attention", "mystery_mixer"] * 12},
        {**XLSTM_LIKE, "model_type": "rwkv6"},
        {**NEMOTRON_NANO_12B, "hybrid_override_pattern": "ME" * 31},  # MoE blocks: not described
        {**XLSTM_LIKE, "model_type": "llama", "num_parameters": None},  # no MLP width: 4 x hidden assumed
    ],
    ids=["unknown-layer-kind", "rwkv", "unknown-block-kind", "no-intermediate-size"],
)
def test_configs_that_cannot_be_described_are_approximated(config: dict[str, Any]) -> None:
    m = ModelDescription.from_hf_config(config, name=f"test/approx-{id(config)}")
    assert m.approximation and m.num_mamba_layers == 0 and m.num_attention_layers == m.num_layers
    cost = step_cost(m, h100(), StepShape.static_batch_decode(2, 100))
    assert math.isfinite(cost.energy_j) and cost.energy_j > 0


def test_missing_core_fields_still_raise() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="num_attention_heads"):
        ModelDescription.from_hf_config({k: v for k, v in XLSTM_LIKE.items() if k != "num_attention_heads"})
    exact = ModelDescription.from_hf_config({**XLSTM_LIKE, "model_type": "llama", "intermediate_size": 5632})
    assert exact.approximation == ""
