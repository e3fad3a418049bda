"""The reference transformer ``llmco2 collect`` times: a real model's shapes, random weights.

Built from a ``ModelDescription`` (dense Llama-style GQA layers, or top-k routed MoE layers):
bf16 on CUDA, float32 on CPU. Each layer is RMSNorm -> fused QKV linear -> rotary -> attention
over a KV cache through ``torch.nn.functional.scaled_dot_product_attention`` -> output
projection -> RMSNorm -> SwiGLU MLP (or routed experts). Logits are computed for the last
position of each request only, as vLLM does. The ``nn.Module`` classes are defined on first use,
so importing this module needs no torch.
"""

from __future__ import annotations

from typing import Any

from llmco2_vllm.measure.collect.progress import progress
from llmco2_vllm.measure.collect.sweep import SweepShape
from llmco2_vllm.predict.model_description import ModelDescription

ROPE_BASE = 10000.0
RMS_NORM_EPS = 1e-5


def _build_reference_classes() -> dict[str, type]:
    """Define the nn.Module classes on first use, so importing this module needs no torch."""
    import torch  # lazy: `--help` and the CLI must not need torch
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
                    progress(None, f"grouped expert products failed ({str(error).splitlines()[0]}); "
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


def moe_experts_kernel() -> str:
    """How MoE experts run now: "grouped_mm", or "loop" once grouped products failed (for the whole run)."""
    return _classes()["MoEMLP"].experts_kernel


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
    if model.is_hybrid:
        raise ValueError(f"{model.name} mixes Mamba-2, attention and MLP blocks, which the reference "
                         "transformer does not implement")
    if model.is_mla:
        raise ValueError(f"{model.name} uses multi-head latent attention (MLA), which the reference "
                         "transformer does not implement")
    if model.num_attention_heads % model.num_kv_heads:
        raise ValueError(f"{model.name}: attention heads {model.num_attention_heads} not a multiple "
                         f"of KV heads {model.num_kv_heads}")


def build_reference_model(model: ModelDescription, num_layers: int, device: str, seed: int = 0) -> Any:
    """Random-weight reference transformer: bf16 on CUDA, float32 elsewhere, in eval mode."""
    import torch  # lazy, as above

    check_supported(model)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with torch.no_grad():
        return _classes()["ReferenceTransformer"](model, num_layers, device, dtype).eval()
