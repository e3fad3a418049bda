"""Roofline step costs checked against FLOP / byte counts worked out by hand.

Every expected number below is derived in the test from the architecture (layers, widths, dtypes)
with the arithmetic written out, never taken from ``llmco2_vllm`` itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.roofline import RooflineAssumptions, step_cost
from llmco2_vllm.predict.step_shape import StepShape

REL = 0.01  # "within 1 %"

LLAMA_31_8B: dict[str, Any] = {
    "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

MIXTRAL_8X7B: dict[str, Any] = {
    "model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
    "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None, "torch_dtype": "bfloat16",
}

DEEPSEEK_V3_BF16: dict[str, Any] = {
    "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "intermediate_size": 18432,
    "num_attention_heads": 128, "num_key_value_heads": 128, "vocab_size": 129280,
    "tie_word_embeddings": False, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "torch_dtype": "bfloat16",
}

MISTRAL_7B_SLIDING: dict[str, Any] = {
    "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
    "tie_word_embeddings": False, "sliding_window": 4096, "torch_dtype": "bfloat16",
}

# ---- Llama-3.1-8B by hand -------------------------------------------------------------------
L_LAYERS = 32
L_H = 4096
L_HEADS, L_KV_HEADS, L_HEAD_DIM = 32, 8, 128
L_FFN = 14336
L_VOCAB = 128256
# q: 4096 x (32*128) = 16_777_216 ; k and v: 4096 x (8*128) = 4_194_304 each ; o: (32*128) x 4096
L_Q = L_H * L_HEADS * L_HEAD_DIM            # 16_777_216
L_KV = 2 * L_H * L_KV_HEADS * L_HEAD_DIM    # 8_388_608
L_O = L_HEADS * L_HEAD_DIM * L_H            # 16_777_216
L_MLP = 3 * L_H * L_FFN                     # gate, up, down: 176_160_768
L_PER_LAYER = L_Q + L_KV + L_O + L_MLP      # 218_103_808
L_LM_HEAD = L_H * L_VOCAB                   # 525_336_576 (untied, read by the logits matmul)
L_LINEAR = L_LAYERS * L_PER_LAYER           # 6_979_321_856
assert L_PER_LAYER == 218_103_808 and L_LM_HEAD == 525_336_576
# K and V of one token in one layer: 2 (K,V) * 8 heads * 128 dims * 2 bytes (bf16)
L_KV_BYTES_PER_TOKEN_LAYER = 2 * 8 * 128 * 2
assert L_KV_BYTES_PER_TOKEN_LAYER == 4096
# attention FLOPs per (query, key) pair per layer: QK^T 2*H*d plus PV 2*H*d
L_ATTN_FLOPS_PER_KEY = 4 * L_HEADS * L_HEAD_DIM  # 16_384


def h100(tp: int = 1) -> Hardware:
    return Hardware(find_gpu("H100"), tp, tp, "configured")


@pytest.fixture(scope="module")
def llama() -> ModelDescription:
    return ModelDescription.from_hf_config(LLAMA_31_8B, name="llama-3.1-8b")


def op(cost, name: str) -> int:
    return cost.op_names.index(name)


# ---- dense decode / prefill ------------------------------------------------------------------

def test_llama_decode_batch1_weights_flops_kv(llama: ModelDescription) -> None:
    cost = step_cost(llama, h100(), StepShape.static_batch_decode(1, 1000))

    # Weights: every linear weight of all 32 layers plus the lm_head, 2 bytes each.
    # (32 * 218_103_808 + 525_336_576) * 2 = 7_504_658_432 * 2 = 15_009_316_864 bytes.
    expected_weight_bytes = (L_LINEAR + L_LM_HEAD) * 2
    assert expected_weight_bytes == 15_009_316_864
    assert cost.weight_bytes == pytest.approx(expected_weight_bytes, rel=REL)
    # The embedding table (another 525M params, 1.05 GB) must NOT be read wholesale: a decode
    # gathers one row. Reading the table would add 7 % and fail the 1 % tolerance above; check
    # explicitly that the embedding op charges no weight bytes and only O(hidden) activation bytes.
    emb = op(cost, "embedding")
    assert cost.op_weight_bytes[emb] == 0.0
    assert cost.op_activation_bytes[emb] <= 4 * L_H * 2  # a few rows of 4096 bf16, not 128256 rows

    # FLOPs: 2 per weight per token, and attention over keys = context + 1 = 1001 in all 32 layers.
    linear_flops = 2 * 1 * (L_LINEAR + L_LM_HEAD)        # 15_009_316_864
    attention_flops = L_ATTN_FLOPS_PER_KEY * 1001 * L_LAYERS  # 16_384 * 1001 * 32 = 524_812_288
    assert attention_flops == 524_812_288
    assert cost.flops == pytest.approx(linear_flops + attention_flops, rel=REL)  # 15_534_129_152
    assert cost.op_flops[op(cost, "attention")] == pytest.approx(attention_flops, rel=1e-9)

    # KV: read 1001 tokens (1000 cached + the new one) and write 1 per layer, 4096 bytes each:
    # (1001 + 1) * 32 * 4096 = 131_334_144 bytes.
    expected_kv = (1001 + 1) * L_LAYERS * L_KV_BYTES_PER_TOKEN_LAYER
    assert expected_kv == 131_334_144
    assert cost.kv_cache_bytes == pytest.approx(expected_kv, rel=REL)


def test_llama_prefill_512_from_empty_context(llama: ModelDescription) -> None:
    cost = step_cost(llama, h100(), StepShape.static_batch_prefill(1, 512))
    # Causal attention: query i (1..512) sees i keys -> 512 * 513 / 2 = 131_328 pairs per layer.
    keys = 512 * 513 // 2
    assert keys == 131_328
    attention = L_ATTN_FLOPS_PER_KEY * keys * L_LAYERS  # 16_384 * 131_328 * 32 = 68_853_694_464
    # Linear layers for 512 tokens; the lm_head only for the last position (one logit row).
    linear = 2 * 512 * L_LINEAR + 2 * 1 * L_LM_HEAD     # 7_146_825_580_544 + 1_050_673_152
    expected = attention + linear
    assert cost.flops == pytest.approx(expected, rel=REL)
    assert cost.op_flops[op(cost, "attention")] == pytest.approx(attention, rel=1e-9)
    # Weights read once, as for a decode: 15_009_316_864 bytes.
    assert cost.weight_bytes == pytest.approx((L_LINEAR + L_LM_HEAD) * 2, rel=REL)
    # KV: 512 tokens read (just written, attended by the chunk) + 512 written, per layer.
    assert cost.kv_cache_bytes == pytest.approx((512 + 512) * L_LAYERS * 4096, rel=REL)


def test_llama_batch64_decode_reads_weights_once_and_does_64x_linear_flops(llama: ModelDescription) -> None:
    one = step_cost(llama, h100(), StepShape.static_batch_decode(1, 1000))
    many = step_cost(llama, h100(), StepShape.static_batch_decode(64, 1000))
    # Weights are read once per step, whatever the batch.
    assert many.weight_bytes == pytest.approx((L_LINEAR + L_LM_HEAD) * 2, rel=REL)
    assert many.weight_bytes == one.weight_bytes
    # Linear FLOPs (all ops but attention): 64 tokens x 2 x 7_504_658_432 = 960_596_279_296.
    attn = op(many, "attention")
    linear_many = many.flops - many.op_flops[attn]
    assert linear_many == pytest.approx(64 * 2 * (L_LINEAR + L_LM_HEAD), rel=REL)
    assert linear_many / (one.flops - one.op_flops[attn]) == pytest.approx(64, rel=1e-6)
    # Attention: 64 requests x 1001 keys x 16_384 x 32 layers.
    assert many.op_flops[attn] == pytest.approx(64 * 1001 * L_ATTN_FLOPS_PER_KEY * L_LAYERS, rel=1e-9)
    # KV: each of the 64 requests reads 1001 and writes 1 token per layer.
    assert many.kv_cache_bytes == pytest.approx(64 * 1002 * L_LAYERS * 4096, rel=REL)
    # A batch of 64 costs much less than 64 single decodes (memory bound on weights).
    assert many.seconds < 4 * one.seconds


def test_gqa_vs_mha_kv_and_qkv_weights() -> None:
    gqa = ModelDescription.from_hf_config(LLAMA_31_8B)
    mha = ModelDescription.from_hf_config({**LLAMA_31_8B, "num_key_value_heads": 32})
    step = StepShape.static_batch_decode(1, 1000)
    c_gqa, c_mha = step_cost(gqa, h100(), step), step_cost(mha, h100(), step)
    # MHA caches 2 * 32 * 128 * 2 = 16_384 bytes per token per layer, 4x the GQA 4096.
    assert c_mha.kv_cache_bytes == pytest.approx(1002 * 32 * 16_384, rel=REL)
    assert c_mha.kv_cache_bytes / c_gqa.kv_cache_bytes == pytest.approx(4.0, rel=1e-9)
    # QKV projection weights per layer: GQA 4096*(4096 + 2*1024) = 25_165_824;
    # MHA 4096*(3*4096) = 50_331_648; x 32 layers x 2 bytes.
    qkv = op(c_gqa, "qkv_projection")
    assert c_gqa.op_weight_bytes[qkv] == pytest.approx(4096 * (4096 + 2 * 1024) * 32 * 2, rel=REL)
    assert c_mha.op_weight_bytes[qkv] == pytest.approx(4096 * 3 * 4096 * 32 * 2, rel=REL)
    # Attention FLOPs depend on query heads only: identical.
    attn = op(c_gqa, "attention")
    assert c_mha.op_flops[attn] == pytest.approx(c_gqa.op_flops[attn], rel=1e-12)


# ---- MoE ---------------------------------------------------------------------------------------

def test_mixtral_expert_weights_touched() -> None:
    model = ModelDescription.from_hf_config(MIXTRAL_8X7B)
    expert_params = 3 * 4096 * 14336  # gate, up, down of one expert = 176_160_768
    layers = 32

    one = step_cost(model, h100(), StepShape.static_batch_decode(1, 100))
    # One token routes to top-2 experts: 8 * (1 - (1 - 2/8)^1) = 8 * 0.25 = 2 experts per layer.
    # 2 * 176_160_768 * 2 bytes * 32 layers = 22_548_578_304 bytes.
    expected_one = 2 * expert_params * 2 * layers
    assert expected_one == 22_548_578_304
    experts = op(one, "moe_experts")
    assert one.op_weight_bytes[experts] == pytest.approx(expected_one, rel=REL)
    # FLOPs of the experts: top-2 per token -> 2 * 2 * 176_160_768 * 32.
    assert one.op_flops[experts] == pytest.approx(2 * 2 * expert_params * layers, rel=REL)

    # 256 tokens: 8 * (1 - 0.75^256) = 8 - 8 * 1.0e-32 -> every expert.
    many = step_cost(model, h100(), StepShape.static_batch_decode(256, 100))
    assert many.op_weight_bytes[experts] == pytest.approx(8 * expert_params * 2 * layers, rel=REL)
    # Same for a 256-token prefill of one request: it is tokens, not requests, that route.
    prefill = step_cost(model, h100(), StepShape.static_batch_prefill(1, 256))
    assert prefill.op_weight_bytes[experts] == pytest.approx(8 * expert_params * 2 * layers, rel=REL)

    # T = 2 tokens: 8 * (1 - 0.75^2) = 8 * 0.4375 = 3.5 experts expected.
    two = step_cost(model, h100(), StepShape.static_batch_decode(2, 100))
    assert two.op_weight_bytes[experts] == pytest.approx(3.5 * expert_params * 2 * layers, rel=REL)


def test_deepseek_mla_kv_bytes_per_token() -> None:
    model = ModelDescription.from_hf_config(DEEPSEEK_V3_BF16)
    # MLA caches the 512-wide latent plus the 64-wide rope key: 576 elements x 2 bytes.
    assert model.kv_cache_bytes_per_token_per_layer == 576 * 2
    layers = 61
    context = 4000
    cost = step_cost(model, h100(), StepShape.static_batch_decode(1, context))
    # Read 4001 tokens + write 1, per layer: 4002 * 61 * 1152 = 281_228_544 bytes.
    expected = (context + 1 + 1) * layers * 1152
    assert expected == 281_228_544
    assert cost.kv_cache_bytes == pytest.approx(expected, rel=REL)
    # Absorbed MLA attention: QK over 576 dims and PV over 512 dims per head:
    # 2 * 128 * (576 + 512) = 278_528 FLOPs per key per layer; keys = 4001.
    assert cost.op_flops[op(cost, "attention")] == pytest.approx(2 * 128 * (576 + 512) * 4001 * layers, rel=REL)
    # 3 dense layers (MLP 3 * 7168 * 18432) and 58 MoE layers with 8 of 256 routed experts plus
    # the shared expert (each 3 * 7168 * 2048) -> expert FLOPs for one token:
    expert = 3 * 7168 * 2048  # 44_040_192
    assert cost.op_flops[op(cost, "moe_experts")] == pytest.approx(2 * (8 + 1) * expert * 58, rel=REL)
    assert cost.op_flops[op(cost, "mlp")] == pytest.approx(2 * 3 * 7168 * 18432 * 3, rel=REL)
    # Batch-1 decode touches 8 routed experts (256*(1-(1-8/256)^1) = 8) + the shared one.
    assert cost.op_weight_bytes[op(cost, "moe_experts")] == pytest.approx((8 + 1) * expert * 2 * 58, rel=REL)


# ---- tensor parallel ---------------------------------------------------------------------------

def test_tensor_parallel_all_reduce_and_time(llama: ModelDescription) -> None:
    step = StepShape.static_batch_decode(8, 1000)
    tp1 = step_cost(llama, h100(1), step)
    tp2 = step_cost(llama, h100(2), step)
    assert "tensor_parallel_all_reduce" not in tp1.op_names
    ar = op(tp2, "tensor_parallel_all_reduce")
    # 2 all-reduces per layer of tokens x hidden bf16 values; a ring moves 2(tp-1)/tp of it per GPU,
    # on each of the tp GPUs: 2 * 32 * 8 tokens * 4096 * 2 bytes * (2 * 1 / 2) * 2 GPUs.
    expected = 2 * 32 * 8 * 4096 * 2 * (2 * (2 - 1) / 2) * 2
    assert expected == 8_388_608
    assert tp2.op_interconnect_bytes[ar] == pytest.approx(expected, rel=REL)
    assert tp2.op_interconnect_bytes.sum() == pytest.approx(expected, rel=REL)
    # Same total work, split two ways: faster, but not twice as fast (launches, all-reduce).
    assert tp2.flops == pytest.approx(tp1.flops, rel=1e-12)
    assert tp2.weight_bytes == pytest.approx(tp1.weight_bytes, rel=1e-12)
    assert tp1.seconds / 2 < tp2.seconds < tp1.seconds
    # Energy counts both GPUs.
    gpu = find_gpu("H100")
    assert tp2.energy_j >= 2 * gpu.idle_watts_or_default() * tp2.seconds


def test_tensor_parallel_all_reduce_tp4(llama: ModelDescription) -> None:
    cost = step_cost(llama, Hardware(find_gpu("H100"), 4, 4, "configured"), StepShape.static_batch_decode(1, 10))
    # 2 * 32 layers * 1 token * 4096 * 2 bytes = 524_288 per GPU-reduce; ring factor 2*3/4 = 1.5
    # -> 786_432 per GPU; x 4 GPUs = 3_145_728.
    expected = 2 * 32 * 1 * 4096 * 2 * (2 * 3 / 4) * 4
    assert expected == 3_145_728
    assert cost.op_interconnect_bytes[op(cost, "tensor_parallel_all_reduce")] == pytest.approx(expected, rel=REL)


# ---- sliding window ----------------------------------------------------------------------------

def test_sliding_window_bounds_keys_and_kv_reads() -> None:
    model = ModelDescription.from_hf_config(MISTRAL_7B_SLIDING)
    assert model.num_sliding_window_layers == 32 and model.sliding_window == 4096
    cost = step_cost(model, h100(), StepShape.static_batch_decode(1, 10_000))
    # Query at position 10_001 sees min(10_001, 4096) = 4096 keys in each of the 32 layers.
    keys = min(10_000 + 1, 4096)
    assert cost.op_flops[op(cost, "attention")] == pytest.approx(4 * 32 * 128 * keys * 32, rel=1e-9)
    # KV: ~4096 tokens read + 1 written per layer (not 10_001 read).
    assert cost.kv_cache_bytes == pytest.approx((keys + 1) * 32 * 4096, rel=REL)
    full = ModelDescription.from_hf_config({**MISTRAL_7B_SLIDING, "sliding_window": None})
    full_cost = step_cost(full, h100(), StepShape.static_batch_decode(1, 10_000))
    assert full_cost.kv_cache_bytes == pytest.approx((10_001 + 1) * 32 * 4096, rel=REL)
    # Below the window the window does not matter: context 100 -> 101 keys either way.
    short = step_cost(model, h100(), StepShape.static_batch_decode(1, 100))
    assert short.kv_cache_bytes == pytest.approx((101 + 1) * 32 * 4096, rel=1e-9)


def test_sliding_window_decode_reads_exactly_window_tokens() -> None:
    model = ModelDescription.from_hf_config(MISTRAL_7B_SLIDING)
    cost = step_cost(model, h100(), StepShape.static_batch_decode(1, 10_000))
    # read min(10_001, 4096) = 4096 tokens + write 1, per layer, 4096 bytes each.
    assert cost.kv_cache_bytes == pytest.approx((4096 + 1) * 32 * 4096, rel=1e-9)


# ---- energy and row shares ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "step",
    [
        StepShape.static_batch_decode(1, 1000),
        StepShape.static_batch_decode(64, 1000),
        StepShape.static_batch_prefill(4, 2048),
        StepShape.from_requests([("a", 300, 0, 0), ("b", 0, 1, 5000), ("c", 0, 4, 20)]),
    ],
    ids=["decode1", "decode64", "prefill4x2048", "mixed"],
)
@pytest.mark.parametrize("tp", [1, 2])
def test_energy_bounded_by_idle_and_tdp(llama: ModelDescription, step: StepShape, tp: int) -> None:
    gpu = find_gpu("H100")
    cost = step_cost(llama, h100(tp), step)
    # H100-SXM: TDP 700 W, idle 121 W as measured with NVML (gpus.csv).
    idle, tdp = 121.0, 700.0
    assert gpu.tdp_watts == tdp and gpu.idle_watts_or_default() == pytest.approx(idle)
    assert cost.seconds > 0
    assert idle * cost.seconds * tp <= cost.energy_j * (1 + 1e-12)
    assert cost.energy_j <= tdp * cost.seconds * tp * (1 + 1e-12)
    # Strictly above idle: the GPU is doing work.
    assert cost.energy_j > idle * cost.seconds * tp * 1.01
    # Every op with work distributes exactly all of itself over the rows.
    sums = cost.row_share.sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, rtol=1e-12)
    assert (cost.row_share >= 0).all()
    # Row energies add up to the step energy.
    assert cost.row_energy_j().sum() == pytest.approx(cost.energy_j, rel=1e-12)
    assert cost.row_seconds().sum() == pytest.approx(cost.seconds, rel=1e-12)


def test_pure_decode_step_puts_nothing_on_prefill_rows(llama: ModelDescription) -> None:
    step = StepShape.from_requests([("a", 0, 1, 10), ("b", 0, 1, 30_000), ("c", 0, 3, 500)])
    cost = step_cost(llama, h100(), step)
    n = 3
    assert cost.row_share.shape == (len(cost.op_names), 2 * n)
    assert np.all(cost.row_share[:, :n] == 0.0)
    np.testing.assert_allclose(cost.row_share[:, n:].sum(axis=1), 1.0, rtol=1e-12)
    # The long-context request dominates attention (its K/V bytes): 30_001 of 30_001+11+503 reads.
    attention = cost.row_share[op(cost, "attention")]
    assert attention[n + 1] > 0.9
    # Pure prefill is the mirror image.
    prefill = step_cost(llama, h100(), StepShape.static_batch_prefill(2, 100))
    assert np.all(prefill.row_share[:, 2:] == 0.0)


def test_empty_step_costs_nothing(llama: ModelDescription) -> None:
    cost = step_cost(llama, h100(), StepShape.from_requests([]))
    assert cost.seconds == 0.0 and cost.energy_j == 0.0 and cost.flops == 0.0


def test_memory_bound_decode_time_matches_bandwidth(llama: ModelDescription) -> None:
    a = RooflineAssumptions()
    cost = step_cost(llama, h100(), StepShape.static_batch_decode(1, 1000), a)
    # Batch-1 decode is memory bound: ~15.0 GB weights + 0.13 GB KV over 3.35 TB/s * 0.8 = 2.68 TB/s
    # -> ~5.65 ms, plus launch overhead (< 1 ms at 2 us x a few hundred kernels).
    streaming = (15_009_316_864 + 131_334_144) / (3350e9 * 0.8)
    assert streaming == pytest.approx(5.6495e-3, rel=1e-3)
    assert streaming < cost.seconds < streaming + 1e-3


# ---- the per-step fast path (Roofline.predict_phases) against the per-operator StepCost ------------

def random_shape(rng: np.random.Generator, n: int, kind: str) -> StepShape:
    """A step of ``n`` requests: "prefill" chunks, "decode" (some speculative), or "mixed" (both,
    plus requests that finish their prompt and decode in the same step, and idle ones)."""
    context = rng.integers(0, 70_000, n) * (rng.random(n) < 0.9)
    if kind == "prefill":
        prefill, decode = rng.integers(1, 8192, n), np.zeros(n, dtype=np.int64)
    elif kind == "decode":
        prefill, decode = np.zeros(n, dtype=np.int64), rng.integers(1, 6, n)
    else:
        role = rng.integers(0, 4, n)  # 0 prefill, 1 decode, 2 last chunk + decode, 3 nothing scheduled
        prefill = np.where((role == 0) | (role == 2), rng.integers(1, 4096, n), 0)
        decode = np.where((role == 1) | (role == 2), rng.integers(1, 5, n), 0)
    return StepShape(tuple(f"r{i}" for i in range(n)), prefill, decode, context, np.maximum(decode - 1, 0))


def catalog_models() -> list[ModelDescription]:
    from llmco2_vllm.predict.model_description import UnsupportedArchitectureError, load_model, model_catalog

    models = []
    for model_id in model_catalog():
        try:
            models.append(load_model(model_id))
        except UnsupportedArchitectureError:
            continue
    return models


def test_fast_step_prediction_equals_the_per_operator_cost_on_catalog_models() -> None:
    from llmco2_vllm.predict.predictor import AnalyticPredictor, prediction_from_cost

    models = catalog_models()
    # The catalog must exercise every branch of the fast path, or this test proves less than it says.
    assert any(m.is_mla for m in models)
    assert any(0 < m.num_sliding_window_layers < m.num_layers for m in models)
    assert any(m.num_sliding_window_layers == m.num_layers for m in models)
    assert any(m.num_experts and m.num_dense_layers for m in models)
    rng = np.random.default_rng(1234)
    checked = 0
    for index, model in enumerate(models):
        for gpu, tp, pp in (("H100", 1, 1), ("A100", 4, 2), ("L4", 8, 1)):
            predictor = AnalyticPredictor(model, Hardware(find_gpu(gpu), tp * pp, tp, "configured"), pipeline_parallel=pp)
            for kind in ("prefill", "decode", "mixed"):
                n = int(rng.integers(0, 300)) if (index + checked) % 7 == 0 else int(rng.integers(1, 40))
                step = random_shape(rng, n, kind)
                fast = predictor.predict_step(step)
                reference = prediction_from_cost(predictor.cost(step))
                for name in ("prefill_seconds", "decode_seconds", "prefill_energy_j", "decode_energy_j"):
                    assert getattr(fast, name) == pytest.approx(getattr(reference, name), rel=1e-9, abs=1e-300), (
                        model.name, gpu, tp, pp, kind, n, name,
                    )
                for name in ("request_prefill_weights", "request_decode_weights"):
                    np.testing.assert_allclose(getattr(fast, name), getattr(reference, name), rtol=1e-9, atol=1e-15)
                checked += 1
    assert checked >= 3 * 3 * 50


def test_fast_step_prediction_of_special_steps(llama: ModelDescription) -> None:
    from llmco2_vllm.predict.predictor import AnalyticPredictor, prediction_from_cost

    predictor = AnalyticPredictor(llama, h100(2))
    steps = [
        StepShape.from_requests([]),
        StepShape.from_requests([("idle", 0, 0, 100)]),  # listed but computing nothing
        StepShape.static_batch_prefill(1, 1),
        StepShape.static_batch_decode(1, 0),
        StepShape.static_batch_prefill(3, 100_000),  # compute bound
        StepShape.from_requests([("a", 0, 1, 5), ("b", 0, 0, 7)]),
    ]
    for step in steps:
        fast, reference = predictor.predict_step(step), prediction_from_cost(predictor.cost(step))
        assert (fast.prefill_energy_j, fast.decode_energy_j) == pytest.approx(
            (reference.prefill_energy_j, reference.decode_energy_j), rel=1e-12, abs=0.0
        )
        assert (fast.prefill_seconds, fast.decode_seconds) == pytest.approx(
            (reference.prefill_seconds, reference.decode_seconds), rel=1e-12, abs=0.0
        )
        np.testing.assert_allclose(fast.request_prefill_weights, reference.request_prefill_weights, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(fast.request_decode_weights, reference.request_decode_weights, rtol=1e-12, atol=1e-15)
    assert predictor.predict_step(steps[0]).energy_j == 0.0


def test_distilled_gnn_step_prediction_is_the_analytic_one_times_the_table() -> None:
    from llmco2_vllm.predict.gnn.distilled import DistilledGnnPredictor
    from llmco2_vllm.predict.gnn.table import CorrectionTable
    from llmco2_vllm.predict.predictor import prediction_from_cost

    log_batch = [0.0, np.log(8.0), np.log(256.0)]
    log_tokens = ([0.0, np.log(512.0), np.log(8192.0)], [0.0, np.log(1024.0), np.log(32768.0)])
    table = CorrectionTable(log_batch, log_tokens, ([[0.1, -0.2, 0.3], [0.0, 0.2, -0.1], [0.4, 0.1, 0.0]],
                                                    [[-0.3, 0.2, 0.1], [0.05, -0.1, 0.2], [0.0, 0.3, -0.2]]))
    model = ModelDescription.from_hf_config(MISTRAL_7B_SLIDING, name="mistral-sliding")
    predictor = DistilledGnnPredictor(model, h100(), table=table)
    rng = np.random.default_rng(7)
    for kind in ("prefill", "decode", "mixed") * 10:
        step = random_shape(rng, int(rng.integers(1, 80)), kind)
        reference = prediction_from_cost(predictor.roofline.cost(step))
        # The straightforward reading of the docstring: prefill x factor at (prefill requests, mean
        # prompt tokens), decode x factor at (decode requests, mean context of the decoding requests).
        prefilling, decoding = step.prefill_tokens > 0, step.decode_tokens > 0
        prefill_factor = decode_factor = 1.0
        if prefilling.any():
            prefill_factor = np.exp(table.log_factor(0, prefilling.sum(), step.prefill_tokens[prefilling].mean()))
        if decoding.any():
            decode_factor = np.exp(table.log_factor(1, decoding.sum(), step.context_tokens[decoding].mean()))
        fast = predictor.predict_step(step)
        assert fast.prefill_energy_j == pytest.approx(reference.prefill_energy_j * prefill_factor, rel=1e-9)
        assert fast.prefill_seconds == pytest.approx(reference.prefill_seconds * prefill_factor, rel=1e-9)
        assert fast.decode_energy_j == pytest.approx(reference.decode_energy_j * decode_factor, rel=1e-9)
        assert fast.decode_seconds == pytest.approx(reference.decode_seconds * decode_factor, rel=1e-9)
        np.testing.assert_allclose(fast.request_decode_weights, reference.request_decode_weights, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(fast.request_prefill_weights, reference.request_prefill_weights, rtol=1e-9, atol=1e-15)
