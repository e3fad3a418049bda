"""Architecture description of a decoder-only LLM, reduced to what drives inference cost.

Energy per token is governed by the bytes moved (weights, KV cache) and the FLOPs done
(~2 x active parameters per token plus attention, plus the selective scan of Mamba-2
layers). This module turns a Hugging Face ``config.json`` (or a catalog entry) into those
counts. Norm and bias parameters are ignored: they are < 0.1 % of weights in every catalog
model.

Layers need not be uniform: a Nemotron-H ``hybrid_override_pattern`` gives Mamba-2, attention
and MLP blocks separately. A config whose layers this module cannot describe (an unknown
recurrent family, an unknown layer kind) is described as a dense transformer of the same size,
with ``approximation`` saying so, instead of failing.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

#: Bytes per element of each storage/compute dtype (4-bit types pack two per byte). "mxfp4" is
#: OCP MXFP4 as gpt-oss stores its experts: 4-bit E2M1 values plus one E8M0 (8-bit) scale per
#: block of 32, i.e. 4 + 8/32 = 4.25 bits = 0.53125 bytes per weight.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5, "fp4": 0.5,
    "mxfp4": 0.53125,
}

_TORCH_DTYPES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "bf16": "bf16", "fp16": "fp16",
}

#: Model types whose MLP is up -> activation -> down (2 matrices) rather than gated (3).
_NON_GATED_MODEL_TYPES = frozenset({
    "gpt2", "gpt_bigcode", "gpt_neox", "gptj", "gpt_neo", "falcon", "bloom", "opt",
    "starcoder2", "phi", "mpt", "codegen", "nemotron_h",
})
#: Model types whose transformers config class ties input/output embeddings by default,
#: used when a config.json omits ``tie_word_embeddings`` (checked against transformers 5).
_TIED_BY_DEFAULT_MODEL_TYPES = frozenset({
    "gemma", "gemma2", "gemma3", "gemma3_text", "starcoder2", "falcon", "bloom", "gpt2",
    "gpt_bigcode", "cohere", "cohere2",
})
#: Model types that need an MLP width of 4 x hidden when the config omits it.
_FOUR_X_MLP_MODEL_TYPES = frozenset({"falcon", "bloom", "gpt2", "gpt_bigcode", "gptj", "gpt_neo"})
#: Recurrent / state-space families: their per-token cost is not attention + MLP. Nemotron-H
#: with a pattern of known block kinds is described exactly; the others are approximated.
_RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "jamba", "nemotron_h", "zamba", "zamba2", "bamba", "falcon_h1",
    "granitemoehybrid", "rwkv", "rwkv5", "rwkv6", "recurrent_gemma", "qwen3_next", "lfm2",
    "xlstm", "minimax", "plamo2",
})


class UnsupportedArchitectureError(ValueError):
    """A config cannot be expressed as attention + (dense or MoE) MLP layers."""


class UnknownModelError(ValueError):
    """A model name is neither a catalog id nor a path to a config.json."""


@dataclass(frozen=True)
class ModelDescription:
    """Layer shapes and dtypes of a decoder-only model (dense, MoE, GQA, MLA or Mamba-2 hybrid).

    Layer counts: ``num_layers`` blocks in all; ``num_attention_layers`` of them have attention,
    ``num_mamba_layers`` a Mamba-2 mixer, ``num_dense_layers`` a dense MLP and the rest (MoE
    models) a MoE MLP. A standard transformer has attention and an MLP in every layer; a
    Nemotron-H block has exactly one of attention, Mamba-2 or MLP.

    Weight dtypes by group: ``weight_dtype`` for the linear layers (attention, dense MLP, shared
    experts, Mamba projections), ``expert_weight_dtype`` for routed experts, and
    ``lm_head_weight_dtype`` for the embedding, the LM head and the MoE router, which vLLM leaves
    unquantised in fp8 / MXFP4 checkpoints.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (0 if none)
    vocab_size: int
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # SwiGLU/GeGLU: gate, up, down matrices
    num_experts: int = 0  # routed experts per MoE layer (0 = dense model)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # total width of always-on shared experts
    num_dense_layers: int = -1  # -1: all layers when dense, none when MoE
    q_lora_rank: int = 0  # MLA (DeepSeek-V2/V3) when kv_lora_rank > 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int | None = None
    num_sliding_window_layers: int = 0  # among the attention layers
    weight_dtype: str = "bf16"
    kv_cache_dtype: str = "bf16"
    activation_dtype: str = "bf16"
    num_attention_layers: int = -1  # -1: every layer
    num_mamba_layers: int = 0
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    ssm_state_size: int = 0
    mamba_n_groups: int = 8  # Nemotron-H's n_groups default
    mamba_conv_kernel: int = 4
    mamba_state_dtype: str = ""  # SSM state; "": the activation dtype (vLLM's mamba_ssm_cache_dtype="auto")
    layer_pattern: str = ""  # Nemotron-H hybrid_override_pattern: one block kind per layer
    expert_weight_dtype: str = ""  # "": weight_dtype
    lm_head_weight_dtype: str = ""  # "": the activation dtype when weights are quantised, else weight_dtype
    approximation: str = ""  # "" when the description is exact, else why it is an estimate

    def __post_init__(self) -> None:
        if self.num_dense_layers < 0:
            object.__setattr__(self, "num_dense_layers", 0 if self.num_experts > 0 else self.num_layers)
        if self.num_attention_layers < 0:
            object.__setattr__(self, "num_attention_layers", self.num_layers)
        if not self.mamba_state_dtype:
            object.__setattr__(self, "mamba_state_dtype", self.activation_dtype)
        if not self.expert_weight_dtype:
            object.__setattr__(self, "expert_weight_dtype", self.weight_dtype)
        if not self.lm_head_weight_dtype:
            quantised = DTYPE_BYTES.get(self.weight_dtype, 2.0) < DTYPE_BYTES.get(self.activation_dtype, 2.0)
            object.__setattr__(self, "lm_head_weight_dtype", self.activation_dtype if quantised else self.weight_dtype)
        if self.num_dense_layers > self.num_layers:
            raise ValueError(f"num_dense_layers {self.num_dense_layers} > num_layers {self.num_layers}")
        for label in ("num_attention_layers", "num_mamba_layers"):
            if not 0 <= getattr(self, label) <= self.num_layers:
                raise ValueError(f"{label} must be in 0..{self.num_layers}, got {getattr(self, label)}")
        if self.num_experts > 0 and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token must be in 1..{self.num_experts}, got {self.experts_per_token}")
        if not 0 <= self.num_sliding_window_layers <= self.num_attention_layers:
            raise ValueError(f"num_sliding_window_layers out of range: {self.num_sliding_window_layers}")
        if self.num_mamba_layers and min(self.mamba_num_heads, self.mamba_head_dim, self.ssm_state_size) <= 0:
            raise ValueError("Mamba layers need mamba_num_heads, mamba_head_dim and ssm_state_size > 0")
        for label in ("weight_dtype", "kv_cache_dtype", "activation_dtype", "mamba_state_dtype",
                      "expert_weight_dtype", "lm_head_weight_dtype"):
            if getattr(self, label) not in DTYPE_BYTES:
                raise ValueError(f"{label} must be one of {sorted(DTYPE_BYTES)}, got {getattr(self, label)!r}")

    # --- structure -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention: the KV cache stores one compressed latent per token."""
        return self.kv_lora_rank > 0

    @property
    def is_hybrid(self) -> bool:
        """Blocks of different kinds (Nemotron-H): each layer is one residual block, not two."""
        return bool(self.layer_pattern) or self.num_mamba_layers > 0 or self.num_attention_layers < self.num_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def num_residual_blocks(self) -> int:
        """Pre-norm + residual-add sub-blocks: two per transformer layer (mixer, MLP), one per hybrid block."""
        return self.num_layers if self.is_hybrid else 2 * self.num_layers

    @property
    def _mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    # --- parameter counts --------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        """Q, K, V and output projection weights of one attention layer (MLA: its low-rank factors)."""
        h, heads = self.hidden_size, self.num_attention_heads
        if not self.is_mla:
            q_and_o = 2 * h * heads * self.head_dim
            return q_and_o + 2 * h * self.num_kv_heads * self.head_dim
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank > 0:
            q = h * self.q_lora_rank + self.q_lora_rank * heads * qk_head_dim
        else:
            q = h * heads * qk_head_dim
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = heads * self.v_head_dim * h
        return q + kv_a + kv_b + o

    @property
    def dense_mlp_params_per_layer(self) -> int:
        return self._mlp_matrices * self.hidden_size * self.intermediate_size

    @property
    def mamba_d_inner(self) -> int:
        """Width of the Mamba-2 inner stream (x and z): heads x head_dim."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the causal conv1d: x plus the grouped B and C (n_groups x state each)."""
        return self.mamba_d_inner + 2 * self.mamba_n_groups * self.ssm_state_size

    @property
    def mamba_projection_params_per_layer(self) -> int:
        """in_proj (hidden -> z, x, B, C, dt) plus out_proj (d_inner -> hidden): the GEMM weights."""
        in_proj = self.hidden_size * (self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads)
        return in_proj + self.mamba_d_inner * self.hidden_size

    @property
    def mamba_conv_params_per_layer(self) -> int:
        return self.mamba_conv_dim * self.mamba_conv_kernel

    @property
    def mamba_params_per_layer(self) -> int:
        """One Mamba-2 mixer: in_proj hidden x (2 d_inner + 2 n_groups state + heads), out_proj
        d_inner x hidden, and the depthwise conv1d weights (conv_dim x kernel)."""
        return self.mamba_projection_params_per_layer + self.mamba_conv_params_per_layer

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert."""
        return self._mlp_matrices * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_expert_params_per_layer(self) -> int:
        return self._mlp_matrices * self.hidden_size * self.shared_expert_intermediate_size

    @property
    def router_params_per_layer(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Weights of the output projection matmul, counted even when tied (it is still computed)."""
        return self.vocab_size * self.hidden_size

    @property
    def unique_lm_head_params(self) -> int:
        """LM-head weights stored in addition to the embedding (0 when tied)."""
        return 0 if self.tie_word_embeddings else self.lm_head_params

    @property
    def _moe_layer_params(self) -> int:
        routed = self.num_experts * self.expert_params
        return routed + self.shared_expert_params_per_layer + self.router_params_per_layer

    @property
    def _mixer_and_dense_params(self) -> int:
        """Attention, Mamba and dense-MLP weights of the whole model (all of them in matmuls)."""
        return (
            self.num_attention_layers * self.attention_params_per_layer
            + self.num_mamba_layers * self.mamba_params_per_layer
            + self.num_dense_layers * self.dense_mlp_params_per_layer
        )

    @property
    def total_params(self) -> int:
        """All stored weights (what must sit in GPU memory)."""
        return (
            self._mixer_and_dense_params
            + self.num_moe_layers * self._moe_layer_params
            + self.embedding_params
            + self.unique_lm_head_params
        )

    @property
    def active_params_per_token(self) -> int:
        """Weights in matmuls per token: drives FLOPs (x2). Excludes the embedding lookup."""
        active_moe = (
            self.experts_per_token * self.expert_params
            + self.shared_expert_params_per_layer
            + self.router_params_per_layer
        )
        return self._mixer_and_dense_params + self.num_moe_layers * active_moe + self.lm_head_params

    # --- bytes ------------------------------------------------------------------------
    @property
    def weight_bytes_per_param(self) -> float:
        """Bytes per weight of the linear layers outside the routed experts."""
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def expert_weight_bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.expert_weight_dtype]

    @property
    def lm_head_weight_bytes_per_param(self) -> float:
        """Bytes per weight of the embedding, LM head and MoE router."""
        return DTYPE_BYTES[self.lm_head_weight_dtype]

    @property
    def routed_expert_weight_bytes(self) -> float:
        return self.num_moe_layers * self.num_experts * self.expert_params * self.expert_weight_bytes_per_param

    @property
    def non_expert_weight_bytes(self) -> float:
        """Stored bytes of every weight but the routed experts (shared experts included: every
        token uses them), each group in its own dtype: what any step reads at least once."""
        lm = self.lm_head_weight_bytes_per_param
        return (
            (self.num_attention_layers * self.attention_params_per_layer
             + self.num_mamba_layers * self.mamba_projection_params_per_layer
             + self.num_dense_layers * self.dense_mlp_params_per_layer
             + self.num_moe_layers * self.shared_expert_params_per_layer) * self.weight_bytes_per_param
            + (self.num_mamba_layers * self.mamba_conv_params_per_layer
               + self.num_moe_layers * self.router_params_per_layer
               + self.embedding_params + self.unique_lm_head_params) * lm
        )  # fmt: skip

    @property
    def weight_bytes(self) -> float:
        """All stored weight bytes, every group in its own dtype (quantisation scales included
        where the dtype counts them, as MXFP4 does)."""
        return self.non_expert_weight_bytes + self.routed_expert_weight_bytes

    @property
    def kv_cache_bytes_per_token_per_layer(self) -> float:
        """KV-cache bytes one token adds to one attention layer (MLA caches the latent + rope key)."""
        if self.is_mla:
            elements = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            elements = 2 * self.num_kv_heads * self.head_dim
        return elements * DTYPE_BYTES[self.kv_cache_dtype]

    @property
    def kv_cache_bytes_per_token(self) -> float:
        """KV-cache bytes one token adds over all attention layers (Mamba layers cache none)."""
        return self.num_attention_layers * self.kv_cache_bytes_per_token_per_layer

    @property
    def mamba_state_bytes_per_sequence(self) -> float:
        """Recurrent state one sequence holds over all Mamba layers, whatever its length.

        Per layer: the SSM state heads x head_dim x state in ``mamba_state_dtype`` (bf16 unless
        the config asks for fp32 through ``mamba_ssm_cache_dtype``: vLLM's default "auto" is the
        model dtype) and the conv state (conv_kernel - 1) x (d_inner + 2 n_groups state) in the
        activation dtype (vLLM keeps the conv state in the model dtype).
        """
        ssm = self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size * DTYPE_BYTES[self.mamba_state_dtype]
        conv = (self.mamba_conv_kernel - 1) * self.mamba_conv_dim * self.activation_bytes
        return self.num_mamba_layers * (ssm + conv)

    @property
    def mamba_scan_flops_per_token(self) -> float:
        """Non-GEMM work per token over all Mamba layers: 6 x heads x head_dim x state + 2 x kernel x conv_dim.

        Why 6: a decode step updates every state element h[p, n] = exp(dt A) h + (dt x[p]) B[n]
        (a multiply and a fused multiply-add, 3 FLOPs) and reads it out y[p] += C[n] h[p, n]
        (2 FLOPs): 5 per element. Prefill runs the chunked SSD algorithm: per token and head the
        intra-chunk product (C B^T masked) X costs 2 x chunk x head_dim, the chunk states B^T X
        2 x state x head_dim and their read-out C h 2 x state x head_dim; with chunk = state = 128
        (Nemotron-H) that is 6 per element. 6 covers both within 20 %. The depthwise causal
        conv1d adds a multiply-add per channel and tap.
        """
        per_layer = (6 * self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size
                     + 2 * self.mamba_conv_kernel * self.mamba_conv_dim)  # fmt: skip
        return float(self.num_mamba_layers * per_layer)

    @property
    def activation_bytes(self) -> float:
        """Bytes per activation element (hidden states, attention inputs)."""
        return DTYPE_BYTES[self.activation_dtype]

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def from_hf_config(
        cls,
        config: Any,
        name: str | None = None,
        weight_dtype: str | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str | None = None,
    ) -> ModelDescription:
        """Describe a model from a transformers ``PretrainedConfig`` or a config.json dict.

        ``quantization`` is vLLM's ``--quantization`` name; ``kv_cache_dtype`` is vLLM's
        ``--kv-cache-dtype`` ("auto" = activation dtype). A config whose layers cannot be
        described exactly gives a dense transformer of the same size with ``approximation`` set
        (one warning per model name). Raises ``UnsupportedArchitectureError`` only when the core
        fields (layers, hidden size, heads, vocabulary) are missing, or for encoder-decoders.
        """
        cfg = _flatten_config(config)
        model_type = str(cfg.get("model_type") or "").split("/")[-1]
        if model_type == "nemotron_h":
            cfg = _nemotron_h_pattern(cfg)
        if cfg.get("is_encoder_decoder"):
            raise UnsupportedArchitectureError(
                f"{model_type or 'model'} is encoder-decoder; only decoder-only is described")

        num_layers = _int_field(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
        hidden = _int_field(cfg, "hidden_size", "n_embd", "d_model")
        heads = _int_field(cfg, "num_attention_heads", "n_head", "num_heads")
        vocab = _int_field(cfg, "vocab_size", "padded_vocab_size")
        missing = [label for label, v in (("num_hidden_layers", num_layers), ("hidden_size", hidden),
                                          ("num_attention_heads", heads), ("vocab_size", vocab)) if not v]
        if missing:
            raise UnsupportedArchitectureError(f"config lacks core field(s): {', '.join(missing)}")
        assert num_layers and hidden and heads and vocab
        name = name or str(cfg.get("_name_or_path") or cfg.get("model_id") or model_type or "unknown")
        activation = _activation_dtype(cfg)
        dense_dtype, expert_dtype = _weight_dtypes(cfg, weight_dtype, quantization, activation)
        dtypes = {
            "weight_dtype": dense_dtype,
            "expert_weight_dtype": expert_dtype,
            "lm_head_weight_dtype": activation,  # vLLM quantises neither embedding, LM head nor router
            "kv_cache_dtype": _kv_cache_dtype(kv_cache_dtype, activation),
            "activation_dtype": activation,
        }

        reason = _why_not_exact(cfg, model_type, num_layers)
        if not reason:
            try:
                return cls._exact(cfg, model_type, name, num_layers, hidden, heads, vocab, dtypes)
            except UnsupportedArchitectureError as error:
                reason = str(error)
        return cls._dense_equivalent(cfg, model_type, name, num_layers, hidden, heads, vocab, dtypes, reason)

    @classmethod
    def _exact(
        cls, cfg: Mapping[str, Any], model_type: str, name: str, num_layers: int, hidden: int, heads: int,
        vocab: int, dtypes: Mapping[str, str],
    ) -> ModelDescription:
        kv_heads = _int_field(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv")
        if cfg.get("multi_query") and not cfg.get("new_decoder_architecture"):
            kv_heads = 1  # Falcon-7B / GPT-BigCode multi-query attention
        if kv_heads is None:
            kv_heads = heads
        head_dim = _int_field(cfg, "head_dim") or hidden // heads

        pattern = str(cfg.get("hybrid_override_pattern") or "")
        # A hybrid pattern places any MoE blocks ("E", approximated); its MoE fields are class defaults.
        num_experts = 0 if pattern else (
            _int_field(cfg, "n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts") or 0)
        is_llama4 = model_type.startswith("llama4")
        intermediate = _int_field(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim")
        if intermediate is None and model_type in _FOUR_X_MLP_MODEL_TYPES:
            intermediate = 4 * hidden
        if intermediate is None:
            raise UnsupportedArchitectureError("config lacks intermediate_size")
        moe_intermediate = (_int_field(cfg, "moe_intermediate_size") or intermediate) if num_experts else 0
        shared_width = _int_field(cfg, "shared_expert_intermediate_size") or 0
        shared_width += (_int_field(cfg, "n_shared_experts") or 0) * moe_intermediate
        experts_per_token = _int_field(
            cfg, "num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k") if num_experts else 0
        if experts_per_token is None:
            raise UnsupportedArchitectureError("MoE config lacks num_experts_per_tok")
        if is_llama4:
            # Llama 4: intermediate_size is the expert width, every MoE layer adds one shared
            # expert of that width, and dense layers use intermediate_size_mlp.
            shared_width = moe_intermediate
            intermediate = _int_field(cfg, "intermediate_size_mlp") or _LLAMA4_DEFAULT_DENSE_MLP

        hybrid: dict[str, Any] = {}
        num_attention_layers = num_layers
        num_dense_layers = _count_dense_layers(cfg, num_layers, num_experts)
        if pattern:  # Nemotron-H: M = Mamba-2 mixer, * = attention, - = MLP, one per block
            num_attention_layers = pattern.count("*")
            num_dense_layers = pattern.count("-")
            mamba_heads = _int_field(cfg, "mamba_num_heads") or 0
            state_dtype = cfg.get("mamba_ssm_cache_dtype")
            hybrid = {
                "num_mamba_layers": pattern.count("M"),
                "mamba_num_heads": mamba_heads,
                "mamba_head_dim": _int_field(cfg, "mamba_head_dim")
                or ((_int_field(cfg, "expand") or 2) * hidden // mamba_heads if mamba_heads else 0),
                "ssm_state_size": _int_field(cfg, "ssm_state_size", "state_size") or 0,
                "mamba_n_groups": _int_field(cfg, "n_groups", "mamba_n_groups") or 8,
                "mamba_conv_kernel": _int_field(cfg, "conv_kernel", "mamba_d_conv") or 4,
                "mamba_state_dtype": _normalize_dtype_name(str(state_dtype))
                if state_dtype not in (None, "", "auto") else "",
                "layer_pattern": pattern,
            }

        sliding_window = _int_field(cfg, "sliding_window")
        num_sliding = min(_count_sliding_layers(cfg, model_type, num_layers, sliding_window), num_attention_layers)

        mla = (_int_field(cfg, "kv_lora_rank") or 0) > 0
        return cls(
            name=name,
            num_layers=num_layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=(_int_field(cfg, "qk_nope_head_dim") or 0) + (_int_field(cfg, "qk_rope_head_dim") or 0)
            if mla else head_dim,
            intermediate_size=intermediate,
            vocab_size=vocab,
            tie_word_embeddings=_tied(cfg, model_type),
            gated_mlp=model_type not in _NON_GATED_MODEL_TYPES,
            num_experts=num_experts,
            experts_per_token=experts_per_token,
            moe_intermediate_size=moe_intermediate,
            shared_expert_intermediate_size=shared_width if num_experts else 0,
            num_dense_layers=num_dense_layers,
            q_lora_rank=_int_field(cfg, "q_lora_rank") or 0,
            kv_lora_rank=_int_field(cfg, "kv_lora_rank") or 0,
            qk_rope_head_dim=_int_field(cfg, "qk_rope_head_dim") or 0,
            qk_nope_head_dim=_int_field(cfg, "qk_nope_head_dim") or 0,
            v_head_dim=_int_field(cfg, "v_head_dim") or 0,
            sliding_window=sliding_window if num_sliding else None,
            num_sliding_window_layers=num_sliding,
            num_attention_layers=num_attention_layers,
            **hybrid,
            **dtypes,
        )

    @classmethod
    def _dense_equivalent(
        cls, cfg: Mapping[str, Any], model_type: str, name: str, num_layers: int, hidden: int, heads: int,
        vocab: int, dtypes: Mapping[str, str], reason: str,
    ) -> ModelDescription:
        """A dense GQA transformer with the config's core shape; its MLP width is solved so the total
        matches a stated parameter count, else taken from the config (4 x hidden if absent)."""
        kv_heads = _int_field(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv") or heads
        head_dim = _int_field(cfg, "head_dim") or hidden // heads
        tied = _tied(cfg, model_type)
        shell = cls(name=name, num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
                    num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=0, vocab_size=vocab,
                    tie_word_embeddings=tied, **dtypes)
        stated = _stated_parameter_count(cfg)
        if stated:
            mlp_per_layer = (stated - shell.total_params) / num_layers
            intermediate = max(0, round(mlp_per_layer / (3 * hidden)))
            basis = f"the stated parameter count ({stated / 1e9:.3g}B)"
        else:
            intermediate = _int_field(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim") or 4 * hidden
            basis = "the parameter count implied by its core shape"
        approximation = (
            f"{model_type or name}: {reason}; costs are estimated as a dense transformer of "
            f"{num_layers} layers x {hidden} hidden sized to {basis}."
        )
        if name not in _WARNED_APPROXIMATIONS:
            _WARNED_APPROXIMATIONS.add(name)
            logger.warning("%s: approximate energy model. %s", name, approximation)
        return cls(name=name, num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
                   num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
                   tie_word_embeddings=tied, approximation=approximation, **dtypes)


_LLAMA4_DEFAULT_DENSE_MLP = 16384  # transformers Llama4TextConfig default intermediate_size_mlp


# --- config helpers ----------------------------------------------------------------------

def _flatten_config(config: Any) -> dict[str, Any]:
    """A plain dict of the text model's config; multimodal wrappers keep it in ``text_config``."""
    cfg = dict(config) if isinstance(config, Mapping) else dict(config.to_dict())
    text = cfg.get("text_config")
    if isinstance(text, Mapping) or hasattr(text, "to_dict"):
        inner = dict(text) if isinstance(text, Mapping) else dict(text.to_dict())
        for key in ("quantization_config", "torch_dtype", "dtype", "tie_word_embeddings", "_name_or_path"):
            if inner.get(key) is None and cfg.get(key) is not None:
                inner[key] = cfg[key]
        cfg = inner
    return cfg


def _int_field(cfg: Mapping[str, Any], *keys: str) -> int | None:
    """First non-null value among ``keys``, as int (configs spell one field many ways)."""
    for key in keys:
        value = cfg.get(key)
        if value is not None and not isinstance(value, (list, dict, str)):
            return int(value)
    return None


#: Block kinds of a Nemotron-H ``hybrid_override_pattern`` that are described exactly.
_HYBRID_BLOCK_KINDS = frozenset("M*-")
#: Substrings of a ``layer_types`` / ``layers_block_type`` entry naming a non-attention mixer.
_RECURRENT_LAYER_MARKS = ("mamba", "linear", "recurrent", "rwkv", "ssm", "lstm", "conv", "delta", "retention")
#: Fields stating a model's total parameter count (``total_params_b`` in billions: the catalog's).
_PARAMETER_COUNT_FIELDS = ("num_parameters", "n_params", "num_params", "total_params", "total_parameters")

_WARNED_APPROXIMATIONS: set[str] = set()


#: transformers 5's NemotronHConfig lists block kinds in ``layers_block_type`` (Mamba-2 mixers as
#: "linear_attention") instead of the config.json's ``hybrid_override_pattern``.
_NEMOTRON_H_BLOCK_CHARS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                           "mlp": "-", "moe": "E"}


def _nemotron_h_pattern(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config with ``hybrid_override_pattern`` (and the layer count) rebuilt from ``layers_block_type``."""
    kinds = cfg.get("layers_block_type")
    if cfg.get("hybrid_override_pattern") or not isinstance(kinds, list) or not kinds:
        return cfg
    cfg = dict(cfg)
    cfg["hybrid_override_pattern"] = "".join(_NEMOTRON_H_BLOCK_CHARS.get(str(k), "?") for k in kinds)
    cfg.pop("layers_block_type")
    if cfg.get("num_hidden_layers") is None:
        cfg["num_hidden_layers"] = len(kinds)
    return cfg


def _why_not_exact(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> str:
    """Why the config's layers cannot be described exactly ("" when they can)."""
    pattern = cfg.get("hybrid_override_pattern")
    if pattern:
        pattern = str(pattern)
        unknown = sorted(set(pattern) - _HYBRID_BLOCK_KINDS)
        if unknown:
            return f"hybrid_override_pattern has block kinds {''.join(unknown)!r} besides M, * and -"
        if len(pattern) != num_layers:
            return f"hybrid_override_pattern has {len(pattern)} blocks for {num_layers} layers"
        if "M" in pattern and not (_int_field(cfg, "mamba_num_heads") and _int_field(cfg, "ssm_state_size", "state_size")):
            return "Mamba blocks without mamba_num_heads / ssm_state_size"
        return ""
    if model_type in _RECURRENT_MODEL_TYPES:
        return "a recurrent/state-space family whose layers are not attention + MLP"
    for key in ("layers_block_type", "layer_types"):
        kinds = cfg.get(key)
        if isinstance(kinds, list):
            odd = sorted({str(k) for k in kinds
                          if "attention" not in str(k) or any(m in str(k) for m in _RECURRENT_LAYER_MARKS)})
            if odd:
                return f"{key} has layer kinds {', '.join(odd)} that are not attention"
    return ""


def _stated_parameter_count(cfg: Mapping[str, Any]) -> float | None:
    for key in _PARAMETER_COUNT_FIELDS:
        value = cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    billions = cfg.get("total_params_b")
    if isinstance(billions, (int, float)) and not isinstance(billions, bool) and billions > 0:
        return float(billions) * 1e9
    return None


def _tied(cfg: Mapping[str, Any], model_type: str) -> bool:
    value = cfg.get("tie_word_embeddings")
    return bool(value) if value is not None else model_type in _TIED_BY_DEFAULT_MODEL_TYPES


def _count_dense_layers(cfg: Mapping[str, Any], num_layers: int, num_experts: int) -> int:
    """Layers with a dense MLP, applying every MoE placement rule the config states.

    DeepSeek: layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0.
    Qwen-MoE: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    Llama 4: i in moe_layers, else (i + 1) % interleave_moe_layer_step == 0.
    """
    if num_experts == 0:
        return num_layers
    first_k = _int_field(cfg, "first_k_dense_replace") or 0
    freq = _int_field(cfg, "moe_layer_freq") or 1
    sparse_step = _int_field(cfg, "decoder_sparse_step") or 1
    interleave = _int_field(cfg, "interleave_moe_layer_step") or 1
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    moe_layers = cfg.get("moe_layers")
    moe_count = 0
    for i in range(num_layers):
        if isinstance(moe_layers, list):
            is_moe = i in moe_layers
        else:
            is_moe = (i + 1) % interleave == 0
        is_moe = is_moe and i >= first_k and i % freq == 0 and (i + 1) % sparse_step == 0 and i not in mlp_only
        moe_count += is_moe
    return num_layers - moe_count


def _count_sliding_layers(cfg: Mapping[str, Any], model_type: str, num_layers: int, window: int | None) -> int:
    """Layers with sliding-window attention (bounded KV cache)."""
    if not window:
        return 0
    if cfg.get("use_sliding_window") is False:  # Qwen2/3 ship a window but disable it
        return 0
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        return sum(1 for kind in layer_types[:num_layers] if kind == "sliding_attention")
    pattern = _int_field(cfg, "sliding_window_pattern")
    if pattern is None and model_type == "gemma2":
        pattern = 2  # Gemma 2 alternates local (even layers) and global attention
    if pattern:
        return sum(1 for i in range(num_layers) if (i + 1) % pattern != 0)
    max_window_layers = _int_field(cfg, "max_window_layers")
    if cfg.get("use_sliding_window") and max_window_layers is not None:
        return max(0, num_layers - max_window_layers)  # Qwen2: layers >= max_window_layers
    return num_layers  # Mistral/Mixtral/Starcoder2/Phi-3: every layer


def _torch_dtype(cfg: Mapping[str, Any]) -> str | None:
    raw = cfg.get("torch_dtype") or cfg.get("dtype")
    if raw is None:
        return None
    return _TORCH_DTYPES.get(str(raw).lower().removeprefix("torch."))


def _activation_dtype(cfg: Mapping[str, Any]) -> str:
    """Compute dtype vLLM's dtype="auto" picks: fp16 checkpoints stay fp16, the rest bf16.

    float32 checkpoints (often re-save artefacts) are served in 16-bit by vLLM.
    """
    return "fp16" if _torch_dtype(cfg) == "fp16" else "bf16"


def _dtype_from_bits(bits: int, is_float: bool = False) -> str:
    if bits >= 16:
        return "bf16"
    if bits >= 8:
        return "fp8" if is_float else "int8"
    return "fp4" if is_float else "int4"  # <= 4-bit formats counted as 4-bit


def _dtype_from_quant_config(qc: Mapping[str, Any]) -> str | None:
    """Weight dtype stated by a checkpoint's ``quantization_config`` (None if unreadable)."""
    method = str(qc.get("quant_method") or "").lower()
    if method in ("fp8", "fbgemm_fp8") or str(qc.get("fmt") or "").lower() in ("e4m3", "e5m2"):
        return "fp8"
    if method == "mxfp4":
        return "mxfp4"
    if method == "nvfp4":
        return "fp4"
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or "").upper()
        return "fp4" if "FP4" in algo else "fp8" if "FP8" in algo else None
    if method == "bitsandbytes":
        return "int8" if qc.get("load_in_8bit") else "int4"
    if method == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("num_bits"):
                return _dtype_from_bits(int(weights["num_bits"]), weights.get("type") == "float")
        return None
    bits = qc.get("bits") or qc.get("w_bit") or qc.get("weight_bits")
    if bits:
        return _dtype_from_bits(int(bits))
    if method in ("awq", "gptq"):
        return "int4"
    return None


def _weight_dtype(cfg: Mapping[str, Any], explicit: str | None, quantization: str | None, activation: str) -> str:
    """Storage dtype of the weights: explicit > vLLM quantization > quantization_config > torch_dtype."""
    if explicit:
        return _normalize_dtype_name(explicit)
    qc = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), Mapping) else {}
    method = (quantization or "").lower()
    if method:
        if method in ("fp8", "fbgemm_fp8", "ptpc_fp8", "fp8_e4m3", "fp8_e5m2"):
            return "fp8"
        if method == "mxfp4":
            return "mxfp4"
        if method in ("nvfp4", "modelopt_fp4"):
            return "fp4"
        if method in ("experts_int8", "int8"):
            return "int8"
        if method.startswith(("awq", "gptq", "marlin")):
            bits = qc.get("bits") or qc.get("w_bit")
            return _dtype_from_bits(int(bits)) if bits else "int4"
        if method == "bitsandbytes":
            return "int8" if qc.get("load_in_8bit") else "int4"
        from_qc = _dtype_from_quant_config(qc) if qc else None
        if from_qc:
            return from_qc
        if method == "modelopt":
            return "fp8"
        raise UnsupportedArchitectureError(f"cannot tell the weight dtype of quantization {quantization!r}")
    if qc:
        from_qc = _dtype_from_quant_config(qc)
        if from_qc:
            return from_qc
    return activation


def _weight_dtypes(
    cfg: Mapping[str, Any], explicit: str | None, quantization: str | None, activation: str
) -> tuple[str, str]:
    """(linear-layer dtype, routed-expert dtype).

    vLLM's MXFP4 method quantises fused-MoE layers only (its linear layers take the unquantised
    path), so an MXFP4 checkpoint such as gpt-oss keeps attention in the activation dtype.
    """
    dtype = _weight_dtype(cfg, explicit, quantization, activation)
    if dtype == "mxfp4" and not explicit:
        return activation, "mxfp4"
    return dtype, dtype


def _normalize_dtype_name(dtype: str) -> str:
    key = dtype.lower().removeprefix("torch.")
    key = _TORCH_DTYPES.get(key, key)
    if key.startswith("fp8") or key.startswith("float8"):
        return "fp8"
    if key not in DTYPE_BYTES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return key


def _kv_cache_dtype(kv_cache_dtype: str | None, activation: str) -> str:
    """vLLM ``--kv-cache-dtype``: "auto" follows the activations, any "fp8*" is 1 byte."""
    if not kv_cache_dtype or kv_cache_dtype == "auto":
        return activation
    return _normalize_dtype_name(kv_cache_dtype)


# --- catalog ------------------------------------------------------------------------------

@functools.cache
def model_catalog() -> dict[str, dict[str, Any]]:
    """Catalog entries (flattened HF config facts + sources) keyed by model id."""
    text = resources.files("llmco2_vllm").joinpath("data/model_archs.json").read_text(encoding="utf-8")
    return {entry["model_id"]: entry for entry in json.loads(text)}


def _catalog_entry_to_config(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a catalog entry into config.json form.

    The catalog's ``layer_types`` is a prose summary, not HF's per-layer list; it is
    translated to the equivalent ``sliding_window_pattern`` or list.
    """
    cfg = {k: v for k, v in entry.items() if v is not None}
    summary = cfg.pop("layer_types", None)
    if isinstance(summary, list):
        cfg["layer_types"] = summary
    elif isinstance(summary, str):
        pattern = re.search(r"sliding_window_pattern\s+(\d+)", summary)
        counts = re.search(r"'sliding_attention':\s*(\d+),\s*'full_attention':\s*(\d+)", summary)
        if pattern:
            cfg["sliding_window_pattern"] = int(pattern.group(1))
        elif counts:
            cfg["layer_types"] = ["sliding_attention"] * int(counts.group(1)) + ["full_attention"] * int(counts.group(2))
        elif "alternating" in summary:
            cfg["sliding_window_pattern"] = 2
    return cfg


def load_model(name_or_path: str) -> ModelDescription:
    """Describe a catalog model (id, case-insensitive, org prefix optional) or a config.json path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        return ModelDescription.from_hf_config(config, name=config.get("_name_or_path") or path.parent.name)

    catalog = model_catalog()
    wanted = name_or_path.strip().lower()
    by_id = {model_id.lower(): model_id for model_id in catalog}
    model_id = by_id.get(wanted)
    if model_id is None:
        by_short = [mid for mid in catalog if mid.split("/")[-1].lower() == wanted.split("/")[-1]]
        if len(by_short) == 1:
            model_id = by_short[0]
    if model_id is None:
        close = difflib.get_close_matches(wanted, list(by_id), n=3, cutoff=0.4)
        hint = f" Close matches: {', '.join(by_id[c] for c in close)}." if close else ""
        raise UnknownModelError(f"Unknown model {name_or_path!r}: not a catalog id nor a config.json path.{hint}")
    return ModelDescription.from_hf_config(_catalog_entry_to_config(catalog[model_id]), name=model_id)
