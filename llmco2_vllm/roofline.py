"""Operator-level roofline costs of one engine step.

A step is cut into *rows*: the prefill part and the decode part of each request (2 rows per
request). Every operator (the kernels of all layers, aggregated by kind) gets FLOPs and bytes per
row; its time on the hardware is a roofline (compute or memory bound, whichever is slower) plus
kernel-launch overhead, and each row's share of the operator is its share of the binding resource.
This gives the analytic predictor its numbers and every other predictor its attribution weights.

Deliberate simplifications (documented in the README, "What is approximate"):
- K/V of a request are read once per layer and step (FlashAttention re-reads per query tile; L2
  absorbs most of it).
- Logits are computed for one token per scheduled request plus speculative tokens (vLLM computes
  the last position of every scheduled request and discards non-final prefill chunks).
- Pipeline-parallel stages run one after another, so step time is that of one TP group holding all
  layers; all TP x PP GPUs draw power during the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .hardware import Hardware
from .model_description import DTYPE_BYTES, ModelDescription
from .step_shape import StepShape

# The kernels one transformer layer launches in eager order (norm, qkv, rope, attention, o_proj,
# residual add, norm, gate_up, activation, down, residual add).
KERNELS_PER_LAYER = 11


@dataclass(frozen=True)
class RooflineAssumptions:
    """Efficiency and power constants of the analytic model; assumptions, not fits (see README)."""

    compute_efficiency: float = 0.70  # share of dense peak FLOP/s that large GEMMs reach
    memory_efficiency: float = 0.80  # share of peak HBM bandwidth that streaming kernels reach
    interconnect_efficiency: float = 0.70
    kernel_launch_seconds: float = 2.0e-6  # per kernel, with CUDA graphs in decode
    compute_power_fraction: float = 1.0  # dynamic power of a fully compute-bound kernel, share of (TDP - idle)
    memory_power_fraction: float = 0.6  # dynamic power of a fully memory-bound kernel, share of (TDP - idle)


@dataclass(frozen=True)
class StepCost:
    """Per-operator cost of one step and each row's share of it.

    Rows ``0..n-1`` are the prefill parts of the step's ``n`` requests, rows ``n..2n-1`` their decode parts.
    """

    op_names: tuple[str, ...]
    op_flops: np.ndarray  # total over all GPUs
    op_weight_bytes: np.ndarray
    op_activation_bytes: np.ndarray
    op_kv_cache_bytes: np.ndarray
    op_interconnect_bytes: np.ndarray
    op_seconds: np.ndarray
    op_energy_j: np.ndarray
    row_share: np.ndarray  # (ops, rows); each op's column-sum is 1 where the op did work
    num_requests: int

    @property
    def flops(self) -> float:
        return float(self.op_flops.sum())

    @property
    def weight_bytes(self) -> float:
        return float(self.op_weight_bytes.sum())

    @property
    def kv_cache_bytes(self) -> float:
        return float(self.op_kv_cache_bytes.sum())

    @property
    def seconds(self) -> float:
        return float(self.op_seconds.sum())

    @property
    def energy_j(self) -> float:
        return float(self.op_energy_j.sum())

    def row_seconds(self) -> np.ndarray:
        return self.op_seconds @ self.row_share

    def row_energy_j(self) -> np.ndarray:
        return self.op_energy_j @ self.row_share


def _sliding_keys(context: np.ndarray, tokens: np.ndarray, window: int | None) -> np.ndarray:
    """Sum over the step's query tokens of the number of keys each attends to (causal, optional window)."""

    def keys_up_to(n: np.ndarray) -> np.ndarray:
        n = n.astype(np.float64)
        if window is None:
            return n * (n + 1) / 2
        w = float(window)
        return np.where(n <= w, n * (n + 1) / 2, w * (w + 1) / 2 + w * (n - w))

    return keys_up_to(context + tokens) - keys_up_to(context)


def step_cost(
    model: ModelDescription,
    hardware: Hardware,
    step: StepShape,
    assumptions: RooflineAssumptions = RooflineAssumptions(),
    pipeline_parallel: int = 1,
) -> StepCost:
    """Roofline cost of one engine step of ``model`` on ``hardware``."""
    n = step.num_requests
    tokens = np.concatenate([step.prefill_tokens, step.decode_tokens]).astype(np.float64)
    context = np.concatenate([step.context_tokens, step.context_tokens + step.prefill_tokens]).astype(np.float64)
    total_tokens = float(tokens.sum())
    has_tokens = tokens > 0
    # One logit row per scheduled request (its last position) plus every speculative position.
    logit_rows = np.concatenate(
        [
            np.where((step.prefill_tokens > 0) & (step.decode_tokens == 0), 1.0, 0.0),
            np.where(step.decode_tokens > 0, step.decode_tokens, 0).astype(np.float64),
        ]
    )

    h = model.hidden_size
    layers = model.num_layers
    wb = model.weight_bytes_per_param
    ab = model.activation_bytes
    kvb = model.kv_cache_bytes_per_token_per_layer
    heads = model.num_attention_heads
    tp = hardware.tensor_parallel
    gpus = tp * pipeline_parallel

    ops: list[tuple[str, np.ndarray, float, np.ndarray, np.ndarray, np.ndarray, int]] = []
    # (name, flops per row, weight bytes, activation bytes per row, kv bytes per row, interconnect bytes per row, launches)

    zero = np.zeros_like(tokens)
    ops.append(("embedding", zero, 0.0, tokens * h * ab * 2, zero, zero, 1))

    # Norms, residual adds and rotary embeddings: memory bound elementwise kernels.
    v_dim = model.v_head_dim if model.is_mla else model.head_dim
    rope_width = (model.num_attention_heads + (0 if model.is_mla else model.num_kv_heads)) * (
        model.qk_rope_head_dim if model.is_mla else model.head_dim
    )
    elementwise_bytes = layers * tokens * ab * (10 * h + 2 * rope_width)
    ops.append(("norms_residual_rope", zero, 0.0, elementwise_bytes, zero, zero, 5 * layers))

    o_params = heads * v_dim * h
    qkv_params = model.attention_params_per_layer - o_params
    q_width = qkv_params / h
    ops.append(
        (
            "qkv_projection",
            2 * tokens * qkv_params * layers,
            qkv_params * wb * layers,
            tokens * (h + q_width) * ab * layers,
            zero,
            zero,
            layers,
        )
    )

    # Attention: FLOPs per (query, key) pair and per layer.
    if model.is_mla:
        flops_per_pair = 2 * heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
        qo_width = heads * (model.kv_lora_rank + model.qk_rope_head_dim) + heads * model.kv_lora_rank
    else:
        flops_per_pair = 4 * heads * model.head_dim
        qo_width = 2 * heads * model.head_dim
    full_layers = layers - model.num_sliding_window_layers
    sliding_layers = model.num_sliding_window_layers
    keys = full_layers * _sliding_keys(context, tokens, None)
    kv_read_tokens = full_layers * (context + tokens)
    if sliding_layers:
        window = int(model.sliding_window or 0)
        keys = keys + sliding_layers * _sliding_keys(context, tokens, window)
        kv_read_tokens = kv_read_tokens + sliding_layers * np.minimum(context + tokens, window + tokens - 1)  # the window includes the query itself
    kv_bytes = np.where(has_tokens, (kv_read_tokens + layers * tokens) * kvb, 0.0)  # read context + write new
    ops.append(("attention", flops_per_pair * keys, 0.0, tokens * qo_width * ab * layers, kv_bytes, zero, layers))

    ops.append(
        (
            "output_projection",
            2 * tokens * o_params * layers,
            o_params * wb * layers,
            tokens * (heads * v_dim + h) * ab * layers,
            zero,
            zero,
            layers,
        )
    )

    dense_layers = model.num_dense_layers
    if dense_layers and model.dense_mlp_params_per_layer:
        width = model.intermediate_size
        ops.append(
            (
                "mlp",
                2 * tokens * model.dense_mlp_params_per_layer * dense_layers,
                model.dense_mlp_params_per_layer * wb * dense_layers,
                tokens * (h + 3 * width + width + h) * ab * dense_layers,
                zero,
                zero,
                3 * dense_layers,
            )
        )
    moe_layers = model.num_moe_layers
    if moe_layers:
        experts = model.num_experts
        k = model.experts_per_token
        # Expected number of distinct experts the step's tokens route to (uniform routing).
        touched = experts * (1.0 - (1.0 - k / experts) ** total_tokens) if total_tokens else 0.0
        expert_weights = (touched * model.expert_params + model.shared_expert_params_per_layer) * wb * moe_layers
        per_token_params = k * model.expert_params + model.shared_expert_params_per_layer
        width = k * model.moe_intermediate_size + model.shared_expert_intermediate_size
        ops.append(
            (
                "moe_router",
                2 * tokens * model.router_params_per_layer * moe_layers,
                model.router_params_per_layer * wb * moe_layers,
                tokens * (h + experts) * ab * moe_layers,
                zero,
                zero,
                2 * moe_layers,
            )
        )
        ops.append(
            (
                "moe_experts",
                2 * tokens * per_token_params * moe_layers,
                expert_weights,
                tokens * (h + 4 * width + h) * ab * moe_layers,
                zero,
                zero,
                4 * moe_layers,
            )
        )

    lm_head_params = model.hidden_size * model.vocab_size
    ops.append(("lm_head", 2 * logit_rows * lm_head_params, lm_head_params * wb, logit_rows * (h * ab + model.vocab_size * 4), zero, zero, 1))

    if tp > 1:
        # Two all-reduces per layer of the residual stream; ring all-reduce moves 2(tp-1)/tp of it per GPU.
        per_gpu = 2 * layers * tokens * h * ab * 2 * (tp - 1) / tp
        ops.append(("tensor_parallel_all_reduce", zero, 0.0, zero, zero, per_gpu * tp, 2 * layers))

    names = tuple(op[0] for op in ops)
    flops = np.array([op[1] for op in ops], dtype=np.float64).reshape(len(ops), -1)
    weight_bytes = np.array([op[2] for op in ops], dtype=np.float64)
    activation = np.array([op[3] for op in ops], dtype=np.float64).reshape(len(ops), -1)
    kv = np.array([op[4] for op in ops], dtype=np.float64).reshape(len(ops), -1)
    interconnect = np.array([op[5] for op in ops], dtype=np.float64).reshape(len(ops), -1)
    launches = np.array([op[6] for op in ops], dtype=np.float64)

    # Weights are read once per step and shared by all rows in proportion to their tokens.
    token_share = tokens / total_tokens if total_tokens else np.zeros_like(tokens)
    row_bytes = activation + kv + np.outer(weight_bytes, token_share)

    gpu = hardware.gpu
    peak_flops = gpu.peak_flops(_compute_dtype(model)) * assumptions.compute_efficiency
    bandwidth = gpu.memory_bandwidth_bytes_per_second * assumptions.memory_efficiency
    link = max(gpu.interconnect_bytes_per_second, 1.0) * assumptions.interconnect_efficiency

    # Per GPU of the TP group: FLOPs and bytes split tp ways.
    compute_seconds = flops.sum(axis=1) / tp / peak_flops
    memory_seconds = row_bytes.sum(axis=1) / tp / bandwidth
    link_seconds = interconnect.sum(axis=1) / tp / link
    busy = np.maximum(np.maximum(compute_seconds, memory_seconds), link_seconds)
    any_work = total_tokens > 0
    op_seconds = busy + (launches * assumptions.kernel_launch_seconds if any_work else 0.0)

    idle_watts = gpu.idle_watts_or_default()
    dynamic_watts = max(gpu.tdp_watts - idle_watts, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dynamic_fraction = np.where(
            op_seconds > 0,
            np.minimum(
                1.0,
                (
                    assumptions.compute_power_fraction * compute_seconds
                    + assumptions.memory_power_fraction * np.maximum(memory_seconds, link_seconds)
                )
                / op_seconds,
            ),
            0.0,
        )
    op_energy = gpus * op_seconds * (idle_watts + dynamic_watts * dynamic_fraction)

    # Each row's share of an op: share of its binding resource.
    compute_bound = compute_seconds >= np.maximum(memory_seconds, link_seconds)
    binding = np.where(compute_bound[:, None], flops, np.where((link_seconds > memory_seconds)[:, None], interconnect, row_bytes))
    sums = binding.sum(axis=1, keepdims=True)
    fallback = np.broadcast_to(token_share, binding.shape)
    share = np.where(sums > 0, binding / np.where(sums > 0, sums, 1.0), fallback)

    return StepCost(
        op_names=names,
        op_flops=flops.sum(axis=1),
        op_weight_bytes=weight_bytes,
        op_activation_bytes=activation.sum(axis=1),
        op_kv_cache_bytes=kv.sum(axis=1),
        op_interconnect_bytes=interconnect.sum(axis=1),
        op_seconds=op_seconds,
        op_energy_j=op_energy,
        row_share=share,
        num_requests=n,
    )


def _compute_dtype(model: ModelDescription) -> str:
    """The tensor-core precision the GEMMs run in: fp8 weights run fp8 GEMMs; int4/fp4 weight-only
    kernels dequantise to the activation dtype except fp4 on GPUs with fp4 units (handled by the fallback chain)."""
    if model.weight_dtype in ("fp8", "fp4"):
        return model.weight_dtype
    return model.activation_dtype if model.activation_dtype in DTYPE_BYTES else "bf16"
