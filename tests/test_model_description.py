"""Tests for ModelDescription: parameter counts, KV bytes, dtypes and catalog loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmco2_vllm.predict.model_description import (
    DTYPE_BYTES,
    ModelDescription,
    UnknownModelError,
    UnsupportedArchitectureError,
    load_model,
    model_catalog,
)

LLAMA_31_8B: dict[str, Any] = {
    "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "intermediate_size": 18432,
    "num_attention_heads": 128, "num_key_value_heads": 128, "vocab_size": 129280,
    "tie_word_embeddings": False, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}

MIXTRAL_8X7B: dict[str, Any] = {
    "model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
    "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None, "torch_dtype": "bfloat16",
}

# The catalog's total_params_b for these entries is the ML.ENERGY leaderboard's rounded size
# label ("2B", "7B"), not a parameter count. The Gemma technical reports give the real totals
# (non-embedding + embedding): Gemma 2B 1.98B + 0.52B, Gemma 7B 7.75B + 0.79B
# (arXiv:2403.08295, Table 2); Gemma 2 2B 2.02B + 0.59B (arXiv:2408.00118, Table 2).
PUBLISHED_TOTAL_B_WHERE_CATALOG_HAS_A_LABEL = {
    "google/codegemma-1.1-2b": 2.51,
    "google/codegemma-7b": 8.54,
    "google/gemma-2-2b-it": 2.61,
}


def test_dtype_bytes() -> None:
    # MXFP4: 4-bit values plus one 8-bit E8M0 scale per 32 -> (4 + 8 / 32) / 8 = 0.53125 bytes.
    assert DTYPE_BYTES == {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5, "fp4": 0.5,
                           "mxfp4": (4 + 8 / 32) / 8}


def test_llama_31_8b_by_hand() -> None:
    m = ModelDescription.from_hf_config(LLAMA_31_8B, name="llama")
    assert m.head_dim == 128  # absent -> hidden / heads
    assert m.attention_params_per_layer == 4096 * 4096 * 2 + 2 * 4096 * 1024
    assert m.dense_mlp_params_per_layer == 3 * 4096 * 14336
    assert m.total_params == pytest.approx(8.03e9, rel=0.005)
    assert m.active_params_per_token == m.total_params - m.embedding_params
    assert m.kv_cache_bytes_per_token_per_layer == 2 * 8 * 128 * 2 == 4096
    assert not m.is_moe and not m.is_mla and m.num_moe_layers == 0 and m.num_dense_layers == 32
    assert m.weight_bytes_per_param == 2 and m.activation_bytes == 2
    assert m.num_sliding_window_layers == 0 and m.sliding_window is None


def test_llama_config_object_matches_dict() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA_31_8B.items() if k not in ("model_type", "torch_dtype")},
                                      dtype="bfloat16")
    from_object = ModelDescription.from_hf_config(config, name="llama")
    from_dict = ModelDescription.from_hf_config(LLAMA_31_8B, name="llama")
    assert from_object == from_dict


def test_deepseek_v3_mla_moe() -> None:
    m = ModelDescription.from_hf_config(DEEPSEEK_V3, name="dsv3")
    assert m.is_mla and m.is_moe
    assert m.kv_cache_bytes_per_token_per_layer == (512 + 64) * 2
    assert (m.num_dense_layers, m.num_moe_layers) == (3, 58)
    assert m.shared_expert_intermediate_size == 2048
    assert m.attention_params_per_layer == (
        7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    )
    assert m.total_params == pytest.approx(671e9, rel=0.01)
    assert m.active_params_per_token == pytest.approx(37e9, rel=0.03)
    assert m.weight_dtype == "fp8"  # from quantization_config
    assert m.activation_dtype == "bf16" and m.kv_cache_dtype == "bf16"


def test_mixtral_active_params() -> None:
    m = ModelDescription.from_hf_config(MIXTRAL_8X7B)
    assert m.total_params == pytest.approx(46.7e9, rel=0.01)
    # Mistral's 12.9B also counts the embedding table; ours counts only matmul weights.
    assert m.active_params_per_token == pytest.approx(12.9e9, rel=0.02)
    assert m.moe_intermediate_size == 14336 and m.num_dense_layers == 0


def test_moe_layer_placement_rules() -> None:
    qwen_moe = {**MIXTRAL_8X7B, "model_type": "qwen3_moe", "num_experts": 8, "decoder_sparse_step": 2,
                "mlp_only_layers": [1]}
    qwen_moe.pop("num_local_experts")
    # MoE where (i + 1) % 2 == 0 -> layers 1, 3, ..., 31 minus mlp_only layer 1 -> 15 MoE layers
    assert ModelDescription.from_hf_config(qwen_moe).num_moe_layers == 15
    maverick = load_model("Llama-4-Maverick-17B-128E-Instruct")
    assert (maverick.num_dense_layers, maverick.num_moe_layers) == (24, 24)
    assert maverick.intermediate_size == 16384 and maverick.shared_expert_intermediate_size == 8192


def test_shared_expert_intermediate_size_is_used() -> None:
    qwen2_moe = {**MIXTRAL_8X7B, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
                 "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_local_experts": 60}
    m = ModelDescription.from_hf_config(qwen2_moe)
    assert m.shared_expert_params_per_layer == 3 * 4096 * 5632
    assert m.router_params_per_layer == 4096 * 60


@pytest.mark.parametrize(
    ("quantization", "quant_config", "expected"),
    [
        ("fp8", None, "fp8"),
        ("awq", None, "int4"),
        ("awq_marlin", {"quant_method": "awq", "bits": 4}, "int4"),
        ("gptq_marlin", {"quant_method": "gptq", "bits": 8}, "int8"),
        ("bitsandbytes", None, "int4"),
        ("modelopt_fp4", None, "fp4"),
        ("compressed-tensors",
         {"quant_method": "compressed-tensors",
          "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}, "fp8"),
        ("compressed-tensors",
         {"quant_method": "compressed-tensors",
          "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}}}}, "int4"),
        (None, {"quant_method": "gptq", "bits": 4}, "int4"),
        (None, None, "bf16"),
    ],
)
def test_weight_dtype_from_quantization(quantization: str | None, quant_config: Any, expected: str) -> None:
    config = dict(LLAMA_31_8B)
    if quant_config is not None:
        config["quantization_config"] = quant_config
    m = ModelDescription.from_hf_config(config, quantization=quantization)
    assert m.weight_dtype == m.expert_weight_dtype == expected
    assert m.weight_bytes_per_param == DTYPE_BYTES[expected]
    assert m.lm_head_weight_dtype == "bf16"  # vLLM leaves embedding and LM head unquantised


@pytest.mark.parametrize(("quantization", "quant_config"), [("mxfp4", None), (None, {"quant_method": "mxfp4"})])
def test_mxfp4_quantises_only_routed_experts(quantization: str | None, quant_config: Any) -> None:
    # vLLM's MXFP4 method quantises fused-MoE layers only: a dense model stays bf16 throughout.
    config = dict(LLAMA_31_8B) if quant_config is None else {**LLAMA_31_8B, "quantization_config": quant_config}
    dense = ModelDescription.from_hf_config(config, quantization=quantization)
    assert (dense.weight_dtype, dense.expert_weight_dtype) == ("bf16", "mxfp4")
    assert dense.weight_bytes == dense.total_params * 2
    moe = ModelDescription.from_hf_config({**MIXTRAL_8X7B, "quantization_config": {"quant_method": "mxfp4"}})
    routed = 32 * 8 * 3 * 4096 * 14336  # layers x experts x (gate, up, down) x hidden x width
    assert moe.routed_expert_weight_bytes == routed * 0.53125
    assert moe.weight_bytes == routed * 0.53125 + (moe.total_params - routed) * 2


def test_fp8_gives_one_byte_per_param_and_kv_dtype_options() -> None:
    m = ModelDescription.from_hf_config(LLAMA_31_8B, quantization="fp8", kv_cache_dtype="fp8_e4m3")
    assert m.weight_bytes_per_param == 1
    assert m.kv_cache_bytes_per_token_per_layer == 2 * 8 * 128 * 1
    assert m.activation_bytes == 2
    auto = ModelDescription.from_hf_config({**LLAMA_31_8B, "torch_dtype": "float16"}, kv_cache_dtype="auto")
    assert auto.kv_cache_dtype == auto.activation_dtype == auto.weight_dtype == "fp16"
    assert ModelDescription.from_hf_config(LLAMA_31_8B, weight_dtype="int4").weight_bytes_per_param == 0.5


def test_sliding_window_configs() -> None:
    mistral = {**LLAMA_31_8B, "model_type": "mistral", "vocab_size": 32000, "sliding_window": 4096}
    m = ModelDescription.from_hf_config(mistral)
    assert (m.sliding_window, m.num_sliding_window_layers) == (4096, 32)
    gemma2 = {"model_type": "gemma2", "num_hidden_layers": 26, "hidden_size": 2304, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
              "sliding_window": 4096}
    g2 = ModelDescription.from_hf_config(gemma2)
    assert g2.num_sliding_window_layers == 13 and g2.tie_word_embeddings  # Gemma ties by default
    gemma3 = {**gemma2, "model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window": 1024,
              "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    assert ModelDescription.from_hf_config({"text_config": gemma3}).num_sliding_window_layers == 5
    qwen2 = {**LLAMA_31_8B, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    q = ModelDescription.from_hf_config(qwen2)
    assert (q.sliding_window, q.num_sliding_window_layers) == (None, 0)


def test_nested_text_config_inherits_outer_dtype_and_quantization() -> None:
    wrapped = {"model_type": "llava", "torch_dtype": "float16", "quantization_config": {"quant_method": "fp8"},
               "text_config": {k: v for k, v in LLAMA_31_8B.items() if k != "torch_dtype"}}
    m = ModelDescription.from_hf_config(wrapped, name="wrapped")
    assert m.num_layers == 32 and m.weight_dtype == "fp8" and m.activation_dtype == "fp16"


def test_unsupported_architectures_raise() -> None:
    missing = {k: v for k, v in LLAMA_31_8B.items() if k != "hidden_size"}
    with pytest.raises(UnsupportedArchitectureError, match="hidden_size"):
        ModelDescription.from_hf_config(missing)
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        ModelDescription.from_hf_config({**LLAMA_31_8B, "is_encoder_decoder": True})
    assert issubclass(UnsupportedArchitectureError, ValueError)


def _catalog_cases() -> list[tuple[str, float, float | None]]:
    return [
        (model_id, entry["total_params_b"], entry["active_params_b"])
        for model_id, entry in model_catalog().items()
        if entry["status"] == "complete" and entry["total_params_b"]
    ]


@pytest.mark.parametrize(("model_id", "total_b", "active_b"), _catalog_cases())
def test_catalog_parameter_counts(model_id: str, total_b: float, active_b: float | None) -> None:
    m = load_model(model_id)
    if model_id in PUBLISHED_TOTAL_B_WHERE_CATALOG_HAS_A_LABEL:
        # Keep the label honest: if the catalog is fixed, this override must go.
        assert total_b < 0.85 * PUBLISHED_TOTAL_B_WHERE_CATALOG_HAS_A_LABEL[model_id]
        total_b = active_b = PUBLISHED_TOTAL_B_WHERE_CATALOG_HAS_A_LABEL[model_id]
    assert m.total_params / 1e9 == pytest.approx(total_b, rel=0.06)
    if active_b:
        assert m.active_params_per_token / 1e9 == pytest.approx(active_b, rel=0.10)


def test_every_catalog_entry_describes_or_raises_unsupported() -> None:
    described, unsupported = 0, 0
    for model_id, entry in model_catalog().items():
        try:
            m = load_model(model_id)
        except UnsupportedArchitectureError:
            unsupported += 1
            assert entry["status"] != "complete", model_id
            continue
        described += 1
        assert m.total_params > 0 and m.name == model_id
        # Complete entries are described exactly; partial ones (e.g. no MLP width) may be estimates.
        assert not m.approximation or entry["status"] != "complete", model_id
    assert described >= 50
    nano9 = load_model("nvidia/NVIDIA-Nemotron-Nano-9B-v2")
    assert (nano9.num_mamba_layers, nano9.num_attention_layers, nano9.num_dense_layers) == (27, 4, 25)


def test_every_mlenergy_v3_model_resolves() -> None:
    import csv

    path = Path("/work/shared/data/mlenergy_v3_h100.csv")
    if not path.is_file():
        pytest.skip("shared ML.ENERGY v3 data not present")
    names = {row["model"] for row in csv.DictReader(path.open(newline="", encoding="utf-8"))}
    for name in names:
        m = load_model(name)
        assert m.name == name and not m.approximation
    assert load_model("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8").weight_dtype == "fp8"
    fp8_405b = load_model("meta-llama/Llama-3.1-405B-Instruct-FP8")
    assert (fp8_405b.weight_dtype, fp8_405b.lm_head_weight_dtype) == ("fp8", "bf16")


def test_catalog_sliding_window_summaries() -> None:
    assert load_model("google/gemma-3-27b-it").num_sliding_window_layers == 62 - 62 // 6
    assert load_model("openai/gpt-oss-20b").num_sliding_window_layers == 12
    assert load_model("google/gemma-2-9b-it").num_sliding_window_layers == 21
    assert load_model("mistralai/Mistral-7B-v0.1").num_sliding_window_layers == 32


def test_load_model_names_and_paths(tmp_path: Path) -> None:
    assert load_model("Llama-3.1-8B-Instruct").name == "meta-llama/Llama-3.1-8B-Instruct"
    assert load_model("META-LLAMA/llama-3.1-8b-instruct").name == "meta-llama/Llama-3.1-8B-Instruct"
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    from_dir = load_model(str(tmp_path))
    from_file = load_model(str(tmp_path / "config.json"))
    assert from_dir == from_file
    assert from_dir.total_params == ModelDescription.from_hf_config(LLAMA_31_8B).total_params
    with pytest.raises(UnknownModelError, match="Llama-3.1-8B"):
        load_model("Llama-3.1-8B-Instrukt")
