"""Physical terms of one engine step, per GPU, at datasheet speed: the inputs of the fitted time model.

A term is the time one kind of kernel work would take at the GPU's datasheet peak (bytes over
peak bandwidth, FLOPs over peak FLOP/s), or a plain count (all-reduce calls, layers, sequences,
the step itself). The fitted model (:mod:`llmco2_vllm.predict.fitted`) learns how far real vLLM
steps are from each of them: an efficiency per kernel class, the real speed-up of narrow weight
formats, the cost per collective call and per scheduled sequence. Terms are linear in a step's
sums (tokens, sequences, K/V tokens read, attention key pairs), so they are computed for one step
(the plugin's path) or for many rows at once (fitting) with the same arithmetic.

Parallelism, per GPU: tensor parallel ``tp`` shards every linear layer and the attention heads;
attention data parallel ``dp`` gives each rank 1/dp of the sequences (vLLM's expert parallelism
with TP < GPUs); expert parallel ``ep`` gives each GPU whole experts, 1/ep of them. Pipeline
stages run one after another for a micro-batch, so a step over all stages costs what one GPU
holding every layer would: callers pass the micro-batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from llmco2_vllm.predict.hardware import GpuSpec
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.step_shape import StepShape

#: vLLM's default ``--gpu-memory-utilization``: the share of GPU memory it may use.
GPU_MEMORY_UTILIZATION = 0.9
#: ASSUMPTION: memory per GPU vLLM keeps for activations, CUDA graphs and the sampler besides
#: weights and K/V cache (its profiler measures it at start-up; a few GB on these models).
RESERVED_BYTES_PER_GPU = 4e9

#: Weight storage classes by bytes per weight: the real speed-up of a narrower format is learned per class.
WEIGHT_CLASSES = ("16bit", "8bit", "4bit")

TERM_NAMES = (
    *(f"dense_weights_{c}" for c in WEIGHT_CLASSES),  # reading non-expert weights (s at peak bandwidth)
    *(f"expert_weights_{c}" for c in WEIGHT_CLASSES),  # reading the routed experts the step touches
    "dense_compute_16bit", "dense_compute_8bit",  # non-expert GEMM FLOPs at the 16-bit / 8-bit peak
    "expert_compute_16bit", "expert_compute_8bit",  # routed-expert GEMM FLOPs
    "activations",  # non-expert activations read and written per token (norms, residual, projections' outputs)
    "expert_activations",  # routed tokens' activations: gather, expert intermediates, weighted scatter
    "kv_read",  # K/V cache read and written by attention
    "attention_compute",  # attention score and value FLOPs
    "mamba",  # Mamba-2 state read + write and selective-scan FLOPs
    "allreduce_bytes", "allreduce_calls",  # tensor-parallel all-reduces of the residual stream
    "alltoall_bytes", "alltoall_calls",  # expert-parallel token dispatch and combine
    "layers",  # blocks the step runs through (kernel launches, CUDA-graph replay)
    "sequences",  # sequences scheduled on this GPU's engine (input preparation, sampling)
    "step",  # 1: the fixed cost of a step (scheduling, synchronisation)
)  # fmt: skip
TERM_INDEX = {name: index for index, name in enumerate(TERM_NAMES)}

#: Step sums, in this order, that every term is linear in (``StepTerms.from_sums``).
SUM_NAMES = ("sequences", "tokens", "logit_rows", "kv_full", "kv_sliding", "pairs_full", "pairs_sliding")
#: The sums plus 1 for a step that computes anything and the distinct routed experts its tokens touch.
BASIS_NAMES = (*SUM_NAMES, "busy", "touched_experts")


def weight_class(bytes_per_weight: float) -> str:
    return "16bit" if bytes_per_weight >= 1.5 else "8bit" if bytes_per_weight >= 0.75 else "4bit"


def blocks_count(model: ModelDescription) -> int:
    """Blocks a token passes through: attention, MLP (dense or MoE) and Mamba blocks, each ending in
    a residual add (and, with tensor parallelism, an all-reduce)."""
    return model.num_attention_layers + model.num_dense_layers + model.num_moe_layers + model.num_mamba_layers


def _keys_up_to(n: np.ndarray, window: float | None) -> np.ndarray:
    """Causal query-key pairs of the first n tokens (with a sliding window: at most ``window`` keys each)."""
    if window is None:
        return n * (n + 1) / 2
    return np.where(n <= window, n * (n + 1) / 2, window * (window + 1) / 2 + window * (n - window))


@functools.lru_cache(maxsize=8)
def _trapezoid(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` evenly spaced positions on [0, 1] and their trapezoid weights (summing to 1)."""
    weights = np.ones(samples)
    weights[[0, -1]] = 0.5
    return np.linspace(0.0, 1.0, samples), weights / (samples - 1)


class StepTerms:
    """Per-unit constants of one deployment (model, GPU, parallelism), computed once."""

    def __init__(
        self,
        model: ModelDescription,
        gpu: GpuSpec,
        tensor_parallel: int = 1,
        data_parallel: int = 1,
        expert_parallel: int = 1,
    ) -> None:
        self.model = model
        self.gpu = gpu
        tp, dp, ep = tensor_parallel, data_parallel, expert_parallel
        self.tensor_parallel, self.data_parallel, self.expert_parallel = tp, dp, ep
        bandwidth = gpu.memory_bandwidth_bytes_per_second
        peak_16 = gpu.peak_flops("bf16")
        peak_8 = gpu.peak_flops("fp8")
        link = max(gpu.interconnect_bytes_per_second, 1.0)
        h = model.hidden_size
        act = model.activation_bytes

        attention_layers = model.num_attention_layers
        mamba_layers = model.num_mamba_layers
        self.sliding_layers = model.num_sliding_window_layers
        self.full_layers = attention_layers - self.sliding_layers
        self.window = float(model.sliding_window) if model.sliding_window else None
        dense_bytes = model.weight_bytes_per_param
        expert_bytes = model.expert_weight_bytes_per_param
        head_bytes = model.lm_head_weight_bytes_per_param

        # Non-expert weights every step reads (per GPU, all sharded by TP), each group in its dtype:
        # attention, Mamba projections, dense MLPs and shared experts in the checkpoint's weight dtype;
        # routers, Mamba convolutions and the LM head in theirs (vLLM leaves them unquantised).
        per_class = dict.fromkeys(WEIGHT_CLASSES, 0.0)
        layer_params = (
            attention_layers * model.attention_params_per_layer
            + mamba_layers * model.mamba_projection_params_per_layer
            + model.num_dense_layers * model.dense_mlp_params_per_layer
            + model.num_moe_layers * model.shared_expert_params_per_layer
        )
        other_params = (
            mamba_layers * model.mamba_conv_params_per_layer
            + model.num_moe_layers * model.router_params_per_layer
            + model.lm_head_params
        )
        per_class[weight_class(dense_bytes)] += layer_params * dense_bytes / tp
        per_class[weight_class(head_bytes)] += other_params * head_bytes / tp
        self.dense_weight_seconds = np.array([per_class[c] / bandwidth for c in WEIGHT_CLASSES])
        self.expert_class = WEIGHT_CLASSES.index(weight_class(expert_bytes))
        # One routed expert's weights in all MoE layers, per GPU holding it (TP shards it, EP does not).
        self.expert_seconds = model.expert_params * model.num_moe_layers * expert_bytes / (tp if ep == 1 else 1) / bandwidth
        self.local_experts = model.num_experts / ep if model.num_experts else 0.0

        # FLOPs per token (per GPU) of the non-expert GEMMs and of the routed experts.
        dense_active = layer_params + other_params - model.lm_head_params  # every token, once each
        self.compute_8bit = dense_bytes < 1.5 and "fp8" in gpu.peak_flops_per_second
        dense_peak = peak_8 if self.compute_8bit else peak_16
        self.dense_seconds_per_token = 2 * dense_active / tp / dense_peak / dp
        self.head_seconds_per_row = 2 * model.lm_head_params / tp / peak_16 / dp
        expert_peak = peak_8 if (expert_bytes < 1.5 and expert_bytes >= 0.75 and "fp8" in gpu.peak_flops_per_second) else peak_16
        self.expert_compute_8bit = expert_peak == peak_8 and peak_8 != peak_16
        share = tp if ep == 1 else ep
        self.expert_seconds_per_token = (
            2 * model.experts_per_token * model.expert_params * model.num_moe_layers / share / expert_peak
        )

        # Activation bytes per token: norms and residual adds run on the whole hidden state on every
        # GPU; projection outputs are split by TP.
        q_width = model.num_attention_heads * (model.v_head_dim if model.is_mla else model.head_dim)
        kv_width = 2 * model.num_kv_heads * model.head_dim if not model.is_mla else model.kv_lora_rank
        mlp_width = (4 if model.gated_mlp else 3) * model.intermediate_size
        activation_bytes = (
            blocks_count(model) * 6 * h
            + attention_layers * (2 * q_width + kv_width) / tp
            + model.num_dense_layers * mlp_width / tp
        ) * act
        self.activation_seconds_per_token = activation_bytes / bandwidth / dp
        expert_width = (4 if model.gated_mlp else 3) * model.moe_intermediate_size / (tp if ep == 1 else 1)
        # With expert parallelism vLLM gathers every rank's tokens on every GPU (all-gather dispatch,
        # reduce-scatter combine): routing and permutation see all tokens, each GPU computes only the
        # tokens routed to its own experts.
        self.expert_activation_seconds_per_token = model.num_moe_layers * (
            2 * h * act * (1 if ep > 1 else model.experts_per_token)
            + model.experts_per_token * expert_width * act / (ep if ep > 1 else 1)
        ) / bandwidth

        # K/V bytes per token per attention layer on one GPU: KV heads split by TP (replicated when
        # there are fewer KV heads than GPUs); MLA's latent is replicated on every GPU.
        kv = model.kv_cache_bytes_per_token_per_layer
        if not model.is_mla and model.num_kv_heads:
            kv *= math.ceil(model.num_kv_heads / tp) / model.num_kv_heads
        self.kv_seconds_per_token_layer = kv / bandwidth / dp
        if model.is_mla:
            flops_per_pair = 2 * model.num_attention_heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
        else:
            flops_per_pair = 4 * model.num_attention_heads * model.head_dim
        self.attention_seconds_per_pair = flops_per_pair / tp / peak_16 / dp

        state = model.mamba_state_bytes_per_sequence
        scan = model.mamba_scan_flops_per_token
        self.mamba_seconds_per_sequence = 2 * state / tp / bandwidth / dp  # read and written once per step
        self.mamba_seconds_per_token = scan / tp / peak_16 / dp

        blocks = blocks_count(model)
        self.layers = float(blocks)
        self.allreduce_calls = float(blocks) if tp > 1 else 0.0  # one per block output (row-parallel)
        self.allreduce_seconds_per_token = (blocks * h * act * 2 * (tp - 1) / tp / link / dp) if tp > 1 else 0.0
        moe_layers = model.num_moe_layers
        # A collective's fixed cost grows with the steps of its algorithm, ~log2 of the GPUs taking part.
        self.alltoall_calls = 2.0 * moe_layers * math.log2(ep) if ep > 1 else 0.0
        self.alltoall_seconds_per_token = (2 * moe_layers * h * act * (ep - 1) / ep / link) if ep > 1 else 0.0
        self.experts = model.num_experts
        self.experts_per_token = model.experts_per_token

        # K/V cache capacity (tokens of context over all sequences of all DP ranks): what vLLM leaves
        # after weights and its reserve. Long-context serving fills it, and vLLM then runs fewer or
        # shorter sequences than the output lengths alone suggest (it preempts).
        weights_per_gpu = model.non_expert_weight_bytes / tp + model.routed_expert_weight_bytes / (ep if ep > 1 else tp)
        free = GPU_MEMORY_UTILIZATION * gpu.memory_bytes - weights_per_gpu - RESERVED_BYTES_PER_GPU
        per_token = kv * self.full_layers + (kv * self.sliding_layers if self.window is None else 0.0)
        self.kv_capacity_tokens = dp * max(free, 0.0) / per_token if per_token > 0 else math.inf

    # --- sums ---------------------------------------------------------------------------------
    def step_sums(self, step: StepShape) -> np.ndarray:
        """The step's sums (``SUM_NAMES``) from its per-request tokens and contexts."""
        tokens = (step.prefill_tokens + step.decode_tokens).astype(np.float64)
        context = step.context_tokens.astype(np.float64)
        working = tokens > 0
        sequences = float(working.sum())
        total = float(tokens.sum())
        # One logit row per request whose last position is computed, plus every speculative position.
        logit_rows = float(((step.prefill_tokens > 0) & (step.decode_tokens == 0)).sum() + step.decode_tokens.sum())
        kv_full = float((context + tokens)[working].sum())
        pairs_full = float((_keys_up_to(context + tokens, None) - _keys_up_to(context, None)).sum())
        kv_sliding = pairs_sliding = 0.0
        if self.sliding_layers and self.window:
            kv_sliding = float(np.minimum(context + tokens, self.window + tokens - 1)[working].sum())
            pairs_sliding = float((_keys_up_to(context + tokens, self.window) - _keys_up_to(context, self.window)).sum())
        return np.array([sequences, total, logit_rows, kv_full, kv_sliding, pairs_full, pairs_sliding])

    def decode_sums(self, batch: float, context: np.ndarray | float) -> np.ndarray:
        """Sums of decode steps of ``batch`` sequences, each with ``context`` tokens before its new one
        (``context`` may be an array: one column per context)."""
        context = np.asarray(context, dtype=np.float64)
        keys = batch * (context + 1)
        sliding = batch * np.minimum(context + 1, self.window) if self.sliding_layers and self.window else 0.0 * keys
        ones = np.full_like(keys, batch)
        return np.array([ones, ones, ones, keys, sliding, keys, sliding])

    def prefill_sums(self, batch: float, prompt_tokens: float) -> np.ndarray:
        """Sums of the prefill step of ``batch`` sequences of ``prompt_tokens`` each, from an empty cache."""
        pairs = prompt_tokens * (prompt_tokens + 1) / 2
        sliding = 0.0
        if self.sliding_layers and self.window:
            sliding = float(_keys_up_to(np.float64(prompt_tokens), self.window))
        return batch * np.array([1.0, prompt_tokens, 1.0, prompt_tokens, prompt_tokens if sliding else 0.0, pairs, sliding])

    def static_batch_sums(self, batch: float, prompt_tokens: int, output_tokens: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
        """(sums, counts) of a static batch: its prefill step (count 1), then its decode steps at
        ``samples`` evenly spaced contexts whose counts are trapezoid weights summing to the
        output_tokens - 1 decode steps (step cost is linear in the context, kinked where a sliding
        window fills)."""
        steps = output_tokens - 1
        prefill = self.prefill_sums(batch, prompt_tokens)[:, None]
        if steps <= 0:
            return prefill, np.ones(1)
        if steps == 1 or samples < 2:
            contexts, counts = np.array([float(prompt_tokens)]), np.array([float(steps)])
        else:
            positions, trapezoid = _trapezoid(samples)  # evenly spaced: the weights are fixed
            contexts = prompt_tokens + positions * (steps - 1)
            counts = trapezoid * steps
        return np.concatenate([prefill, self.decode_sums(batch, contexts)], axis=1), np.concatenate([[1.0], counts])

    def serving_sums(self, batch: float, prompt_tokens: float, output_tokens: float, running_age: float) -> np.ndarray:
        """Sums of the mean step of steady-state serving: ``batch`` requests decoding, and the prompts
        of the batch / output_tokens requests that join each step prefilled in it (chunked prefill).

        A running request's context is its prompt plus its age (tokens generated so far);
        ``running_age`` is the batch's mean age (``serving_measurements.running_age``). The sums are
        linear in the prompts joining, so this is also the mean of ``serving_steps``' steps.
        """
        return self._serving_step(batch, prompt_tokens, running_age, batch / output_tokens)

    def serving_steps(self, batch: float, prompt_tokens: float, output_tokens: float, running_age: float) -> tuple[np.ndarray, np.ndarray]:
        """(sums, weights) of the steps of steady-state serving: prompts join whole, so with j =
        batch / output_tokens prompts joining per step on average, a share j - floor(j) of the steps
        prefills floor(j) + 1 prompts and the others floor(j) (all of them with the batch decoding).
        Their mean sums are ``serving_sums``; what is not linear in the sums (the distinct experts a
        step touches, the overlap of memory and compute, power) is evaluated per step, not at the mean:
        a step that prefills a prompt touches nearly every expert, the many steps that only decode
        touch far fewer."""
        joining = batch / output_tokens
        whole = math.floor(joining)
        share = joining - whole
        if share < 1e-9:
            return self._serving_step(batch, prompt_tokens, running_age, whole)[:, None], np.ones(1)
        steps = [self._serving_step(batch, prompt_tokens, running_age, k) for k in (whole, whole + 1)]
        return np.stack(steps, axis=1), np.array([1.0 - share, share])

    def _serving_step(self, batch: float, prompt_tokens: float, running_age: float, joining: float) -> np.ndarray:
        """Sums of a step of ``batch`` decoding requests (mean age ``running_age``) that prefills
        ``joining`` prompts of ``prompt_tokens`` each."""
        prefill = joining * prompt_tokens
        context = prompt_tokens + running_age
        # Full-attention contexts of the running sequences cannot exceed the K/V cache.
        context = min(context, max(self.kv_capacity_tokens / batch - 1.0, 1.0))
        pairs_full = batch * (context + 1) + joining * prompt_tokens * (prompt_tokens + 1) / 2
        kv_full = batch * (context + 1) + joining * prompt_tokens
        kv_sliding = pairs_sliding = 0.0
        if self.sliding_layers and self.window:
            w = self.window
            kv_sliding = batch * min(context + 1, w) + joining * prompt_tokens
            pairs_sliding = batch * min(context + 1, w) + joining * float(_keys_up_to(np.float64(prompt_tokens), w))
        return np.array([batch + joining, batch + prefill, batch + joining, kv_full, kv_sliding, pairs_full, pairs_sliding])

    # --- terms --------------------------------------------------------------------------------
    def from_sums(self, sums: np.ndarray) -> np.ndarray:
        """Terms (``TERM_NAMES``, axis 0) from sums (``SUM_NAMES``, axis 0; more axes broadcast)."""
        return np.tensordot(self.matrix, self.basis(sums), axes=1)

    def basis(self, sums: np.ndarray) -> np.ndarray:
        """The sums plus the two quantities terms are not linear in (``BASIS_NAMES``)."""
        tokens = np.asarray(sums[1], dtype=np.float64)
        busy = (tokens > 0).astype(np.float64)
        return np.concatenate([np.asarray(sums, dtype=np.float64), busy[None], self.touched_experts(tokens)[None]])

    def step_basis(self, sums: list[float]) -> np.ndarray:
        """``basis`` of one step's sums, in plain floats (the plugin worker's per-step path)."""
        tokens = sums[1]
        return np.array([*sums, 1.0 if tokens > 0 else 0.0, self.touched_experts(tokens)])

    def touched_experts(self, tokens: Any) -> Any:
        """Distinct experts a step's tokens route to (uniform routing), of those this GPU holds."""
        if not self.experts:
            return 0.0 * tokens
        return self.local_experts * (1.0 - (1.0 - self.experts_per_token / self.experts) ** tokens)

    @functools.cached_property
    def matrix(self) -> np.ndarray:
        """(terms x basis): every term is linear in the basis."""
        matrix = np.zeros((len(TERM_NAMES), len(BASIS_NAMES)))
        b = {name: index for index, name in enumerate(BASIS_NAMES)}

        def put(term: str, basis: str, value: float) -> None:
            matrix[TERM_INDEX[term], b[basis]] += value

        for index, weight_class_name in enumerate(WEIGHT_CLASSES):
            put(f"dense_weights_{weight_class_name}", "busy", self.dense_weight_seconds[index])
        if self.experts:
            put(f"expert_weights_{WEIGHT_CLASSES[self.expert_class]}", "touched_experts", self.expert_seconds)
            put("expert_compute_8bit" if self.expert_compute_8bit else "expert_compute_16bit", "tokens",
                self.expert_seconds_per_token)  # fmt: skip
        dense = "dense_compute_8bit" if self.compute_8bit else "dense_compute_16bit"
        put(dense, "tokens", self.dense_seconds_per_token)
        put(dense, "logit_rows", self.head_seconds_per_row)
        put("activations", "tokens", self.activation_seconds_per_token)
        put("expert_activations", "tokens", self.expert_activation_seconds_per_token)
        put("kv_read", "kv_full", self.kv_seconds_per_token_layer * self.full_layers)
        put("kv_read", "kv_sliding", self.kv_seconds_per_token_layer * self.sliding_layers)
        put("attention_compute", "pairs_full", self.attention_seconds_per_pair * self.full_layers)
        put("attention_compute", "pairs_sliding", self.attention_seconds_per_pair * self.sliding_layers)
        put("mamba", "sequences", self.mamba_seconds_per_sequence)
        put("mamba", "tokens", self.mamba_seconds_per_token)
        put("allreduce_bytes", "tokens", self.allreduce_seconds_per_token)
        put("allreduce_calls", "busy", self.allreduce_calls)
        put("alltoall_bytes", "tokens", self.alltoall_seconds_per_token)
        put("alltoall_calls", "busy", self.alltoall_calls)
        put("layers", "busy", self.layers)
        put("sequences", "sequences", 1.0 / self.data_parallel)
        put("step", "busy", 1.0)
        return matrix
