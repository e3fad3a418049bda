"""How many layers and which shapes fit in GPU memory: weights plus the largest shape's KV cache."""

from __future__ import annotations

from typing import Sequence

from llmco2_vllm.measure.collect.sweep import SweepShape
from llmco2_vllm.predict.model_description import ModelDescription

#: Share of free GPU memory the harness plans to use (the rest absorbs allocator slack).
MEMORY_PLAN_FRACTION = 0.85
MEMORY_HEADROOM_BYTES = 2 * 1024**3


def usable_bytes(free_bytes: float) -> float:
    """The part of ``free_bytes`` the harness plans with."""
    return free_bytes * MEMORY_PLAN_FRACTION - MEMORY_HEADROOM_BYTES


def _layer_weight_bytes(model: ModelDescription, bytes_per_element: int) -> float:
    """Average weight bytes of one layer, MoE and dense layers mixed as in the model."""
    mlp = (model.num_dense_layers * model.dense_mlp_params_per_layer
           + model.num_moe_layers * (model.num_experts * model.expert_params
                                     + model.shared_expert_params_per_layer + model.router_params_per_layer))
    return (model.attention_params_per_layer + mlp / model.num_layers) * bytes_per_element


def _kv_bytes_per_token_per_layer(model: ModelDescription, bytes_per_element: int) -> int:
    return 2 * model.num_kv_heads * model.head_dim * bytes_per_element


def _activation_bytes(model: ModelDescription, shape: SweepShape, bytes_per_element: int) -> float:
    """Rough peak activation memory of one step (a few hidden-size and MLP-width tensors per token)."""
    tokens = shape.batch_size * shape.tokens_per_request
    mlp_width = max(model.intermediate_size,
                    model.experts_per_token * model.moe_intermediate_size + model.shared_expert_intermediate_size)
    qkv = (model.num_attention_heads + 2 * model.num_kv_heads) * model.head_dim
    per_token = 8 * model.hidden_size + 3 * mlp_width + 2 * qkv
    group = model.num_attention_heads // model.num_kv_heads
    mask = group * shape.tokens_per_request * shape.kv_tokens_per_request * 4 if shape.context_tokens else 0
    logits = shape.batch_size * model.vocab_size * 4
    return tokens * per_token * bytes_per_element + mask + logits


def shape_bytes(model: ModelDescription, shape: SweepShape, num_layers: int, bytes_per_element: int) -> float:
    """KV cache plus activations a shape needs on top of the weights."""
    kv = num_layers * shape.batch_size * shape.kv_tokens_per_request * _kv_bytes_per_token_per_layer(
        model, bytes_per_element)
    return kv + _activation_bytes(model, shape, bytes_per_element)


def plan_num_layers(model: ModelDescription, shapes: Sequence[SweepShape], free_bytes: float,
                    bytes_per_element: int = 2) -> int:
    """Most layers (<= the model's) whose weights plus the largest shape's KV cache fit in memory."""
    budget = usable_bytes(free_bytes)
    budget -= (model.embedding_params + model.unique_lm_head_params) * bytes_per_element
    per_layer_weights = _layer_weight_bytes(model, bytes_per_element)
    for layers in range(model.num_layers, 0, -1):
        need = layers * per_layer_weights + max((shape_bytes(model, s, layers, bytes_per_element) for s in shapes),
                                                default=0.0)
        if need <= budget:
            return layers
    return 1
