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
- Mamba-2 layers (Nemotron-H): each row that computes reads and writes its sequence's recurrent
  state once per step; the selective scan counts 6 x heads x head_dim x state FLOPs per token and
  layer (``ModelDescription.mamba_scan_flops_per_token``), whatever the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmco2_vllm.predict.hardware import Hardware
from llmco2_vllm.predict.model_description import DTYPE_BYTES, ModelDescription
from llmco2_vllm.predict.step_shape import StepShape


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
    """Per-operator cost of one step and how it splits over the step's rows.

    Rows ``0..n-1`` are the prefill parts of the step's ``n`` requests, rows ``n..2n-1`` their decode
    parts. Each op's row quantities are linear in a few row features (``row_features``, one row
    per feature) with per-op coefficients (``op_coefficients``, ops x features): a row's share of an
    op is its share of the op's binding resource (FLOPs, bytes or interconnect bytes).
    """

    op_names: tuple[str, ...]
    op_flops: np.ndarray  # total over all GPUs
    op_weight_bytes: np.ndarray
    op_activation_bytes: np.ndarray
    op_kv_cache_bytes: np.ndarray  # attention K/V and the Mamba layers' recurrent state
    op_interconnect_bytes: np.ndarray
    op_seconds: np.ndarray
    op_energy_j: np.ndarray
    op_coefficients: np.ndarray  # (ops, features): the binding resource per unit of each feature
    row_features: np.ndarray  # (features, rows): tokens, keys, logit rows, K/V bytes, state bytes, token share
    num_requests: int
    # Per-feature weights that distribute op seconds / energy to rows (sum over ops of value/total x
    # coefficient), and what ops with no binding work leave to split by token share.
    seconds_per_feature: np.ndarray
    energy_per_feature: np.ndarray
    orphan_seconds: float = 0.0
    orphan_energy_j: float = 0.0

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
        return self.seconds_per_feature @ self.row_features + self.orphan_seconds * self.row_features[-1]

    def row_energy_j(self) -> np.ndarray:
        return self.energy_per_feature @ self.row_features + self.orphan_energy_j * self.row_features[-1]

    @property
    def row_share(self) -> np.ndarray:
        """(ops, rows) share matrix; each op's shares sum to 1 (for inspection and tests)."""
        per_op_rows = self.op_coefficients[:, :, None] * self.row_features[None, :, :]
        binding = per_op_rows.sum(axis=1)
        sums = binding.sum(axis=1, keepdims=True)
        return np.where(sums > 0, binding / np.where(sums > 0, sums, 1.0), self.row_features[-1])


#: Row features of ``StepCost``: tokens, attention keys, logit rows, K/V bytes, recurrent-state
#: bytes, token share (last: ops with no binding work split by it).
FEATURES = 6


def _sliding_keys(context: np.ndarray, tokens: np.ndarray, window: int | None) -> np.ndarray:
    """Sum over the step's query tokens of the number of keys each attends to (causal, optional window)."""
    context = np.asarray(context, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if window is None:  # keys(n) = n (n + 1) / 2, differenced between context and context + tokens
        return tokens * (2 * context + tokens + 1) / 2
    # keys(n) = m (m + 1) / 2 + w (n - m) with m = min(n, w): differenced in closed form, where
    # grown = m(context + tokens) - m(context) keys enter the window and the other tokens see w each.
    w = float(window)
    before = np.minimum(context, w)
    after = np.minimum(context + tokens, w)
    grown = after - before
    # grown (after + before + 1) / 2 + w (tokens - grown), in place: the worker runs this every step
    after += before
    after += 1.0
    after *= 0.5
    after -= w
    after *= grown
    after += w * tokens
    return after


class Roofline:
    """Per-operator coefficients of one (model, hardware) pair, computed once.

    Every operator's FLOPs and bytes are linear in a few per-row quantities (tokens, attention
    keys, K/V tokens read, logit rows, rows that carry a recurrent state), so the operator loop
    runs on the step's sums in plain floats. ``cost`` keeps every per-operator number
    (inspection, the GNN's graph features); ``predict_phases`` gives only what a step prediction
    needs, in a few array operations: the plugin's worker calls it once per engine step.

    Each operator runs at the tensor-core rate of its own precision: GEMMs of fp8 weights at the
    FP8 rate, of MXFP4 experts at the rate the GPU has for them (BF16 where it lacks FP4 units),
    attention, the selective scan and the unquantised LM head / router at the activation rate.
    """

    def __init__(
        self,
        model: ModelDescription,
        hardware: Hardware,
        assumptions: RooflineAssumptions = RooflineAssumptions(),
        pipeline_parallel: int = 1,
    ) -> None:
        self.model = model
        self.hardware = hardware
        self.assumptions = assumptions
        h = model.hidden_size
        attention_layers = model.num_attention_layers
        blocks = model.num_residual_blocks
        wb = model.weight_bytes_per_param
        lb = model.lm_head_weight_bytes_per_param
        ab = model.activation_bytes
        heads = model.num_attention_heads
        tp = hardware.tensor_parallel
        self.tensor_parallel = tp
        self.gpus = tp * pipeline_parallel
        act = model.activation_dtype
        dense_gemm = _gemm_dtype(model.weight_dtype, act)
        expert_gemm = _gemm_dtype(model.expert_weight_dtype, act)
        head_gemm = _gemm_dtype(model.lm_head_weight_dtype, act)

        v_dim = model.v_head_dim if model.is_mla else model.head_dim
        rope_width = (heads + (0 if model.is_mla else model.num_kv_heads)) * (
            model.qk_rope_head_dim if model.is_mla else model.head_dim
        )
        o_params = heads * v_dim * h
        qkv_params = model.attention_params_per_layer - o_params
        if model.is_mla:
            flops_per_pair = 2 * heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
            qo_width = heads * (model.kv_lora_rank + model.qk_rope_head_dim) + heads * model.kv_lora_rank
        else:
            flops_per_pair = 4 * heads * model.head_dim
            qo_width = 2 * heads * model.head_dim

        # name: (flops/token, flops/key, flops/logit row, weight bytes, act bytes/token, act bytes/logit row,
        #        interconnect bytes/token, launches, state bytes/working row), compute dtype.
        # Each residual block has a pre-norm (2h: read, write) and a residual add (3h); RoPE reads
        # and writes q and k of the attention layers.
        ops: list[tuple[str, tuple[float, ...], str]] = [
            ("embedding", (0, 0, 0, 0, 2 * h * ab, 0, 0, 1, 0), act),
            ("norms_residual_rope", (0, 0, 0, 0, ab * (5 * h * blocks + 2 * rope_width * attention_layers), 0, 0,
                                     2 * blocks + attention_layers, 0), act),
            ("qkv_projection", (2 * qkv_params * attention_layers, 0, 0, qkv_params * wb * attention_layers,
                                (h + qkv_params / h) * ab * attention_layers, 0, 0, attention_layers, 0), dense_gemm),
            ("attention", (0, flops_per_pair, 0, 0, qo_width * ab * attention_layers, 0, 0, attention_layers, 0), act),
            ("output_projection", (2 * o_params * attention_layers, 0, 0, o_params * wb * attention_layers,
                                   (heads * v_dim + h) * ab * attention_layers, 0, 0, attention_layers, 0), dense_gemm),
        ]  # fmt: skip
        mamba_layers = model.num_mamba_layers
        self._state_row_bytes = 0.0
        if mamba_layers:
            projections = model.mamba_projection_params_per_layer
            d_inner, heads_m = model.mamba_d_inner, model.mamba_num_heads
            groups_state = model.mamba_n_groups * model.ssm_state_size
            conv_dim = model.mamba_conv_dim
            # Activation traffic per token and layer: in_proj reads h and writes z, x, B, C, dt; the
            # conv reads and writes x, B, C; the scan reads x, B, C, dt and writes y; the gated norm
            # reads y, z and writes d_inner; out_proj reads d_inner and writes h.
            elements = (2 * h + (2 * d_inner + 2 * groups_state + heads_m) + 2 * conv_dim
                        + (conv_dim + heads_m + d_inner) + 3 * d_inner + d_inner)  # fmt: skip
            # The selective scan reads and writes every sequence's state once per step: bytes per row
            # that computes anything, independent of its token count.
            self._state_row_bytes = 2.0 * model.mamba_state_bytes_per_sequence
            ops.append(("mamba", (2 * projections * mamba_layers + model.mamba_scan_flops_per_token, 0, 0,
                                  (projections * wb + model.mamba_conv_params_per_layer * lb) * mamba_layers,
                                  elements * ab * mamba_layers, 0, 0, 5 * mamba_layers, self._state_row_bytes),
                        dense_gemm))  # fmt: skip
        dense_layers = model.num_dense_layers
        if dense_layers and model.dense_mlp_params_per_layer:
            width = model.intermediate_size
            params = model.dense_mlp_params_per_layer
            ops.append(("mlp", (2 * params * dense_layers, 0, 0, params * wb * dense_layers,
                                (2 * h + 4 * width) * ab * dense_layers, 0, 0, 3 * dense_layers, 0), dense_gemm))  # fmt: skip
        moe_layers = model.num_moe_layers
        self.moe_index = -1
        if moe_layers:
            experts = model.num_experts
            width = model.experts_per_token * model.moe_intermediate_size + model.shared_expert_intermediate_size
            per_token_params = model.experts_per_token * model.expert_params + model.shared_expert_params_per_layer
            router = model.router_params_per_layer
            ops.append(("moe_router", (2 * router * moe_layers, 0, 0, router * lb * moe_layers,
                                       (h + experts) * ab * moe_layers, 0, 0, 2 * moe_layers, 0), head_gemm))  # fmt: skip
            self.moe_index = len(ops)
            # Weight bytes depend on how many distinct experts the step touches: set per step.
            ops.append(("moe_experts", (2 * per_token_params * moe_layers, 0, 0, 0,
                                        (2 * h + 4 * width) * ab * moe_layers, 0, 0, 4 * moe_layers, 0), expert_gemm))  # fmt: skip
        lm_head_params = h * model.vocab_size
        ops.append(("lm_head", (0, 0, 2 * lm_head_params, lm_head_params * lb, 0, h * ab + model.vocab_size * 4, 0, 1, 0),
                    head_gemm))
        if tp > 1:
            # One all-reduce per residual block of the residual stream; a ring moves 2(tp-1)/tp of it per GPU.
            ops.append(("tensor_parallel_all_reduce", (0, 0, 0, 0, 0, 0, blocks * h * ab * 2 * (tp - 1), blocks, 0), act))

        table = np.array([op[1] for op in ops], dtype=np.float64)
        self.op_names = tuple(op[0] for op in ops)
        (self.flops_per_token, self.flops_per_key, self.flops_per_logit, self.weight_bytes,
         self.act_per_token, self.act_per_logit, self.link_per_token, self.launches, self.state_per_row) = table.T  # fmt: skip
        self.attention_mask = np.array([name == "attention" for name in self.op_names], dtype=np.float64)
        # The step loop runs over ~10 ops: plain floats are several times faster than numpy there.
        self._op_rows = [tuple(float(v) for v in row) for row in table]
        self._attention_index = self.op_names.index("attention")

        gpu = hardware.gpu
        self.peak_flops = gpu.peak_flops(_compute_dtype(model)) * assumptions.compute_efficiency
        self.op_peak_flops = np.array([gpu.peak_flops(op[2]) * assumptions.compute_efficiency for op in ops])
        self.bandwidth = gpu.memory_bandwidth_bytes_per_second * assumptions.memory_efficiency
        self.link = max(gpu.interconnect_bytes_per_second, 1.0) * assumptions.interconnect_efficiency
        self.idle_watts = gpu.idle_watts_or_default()
        self.dynamic_watts = max(gpu.tdp_watts - self.idle_watts, 0.0)

        # The per-step fast path (``predict_phases``): each op's constants with the very divisors
        # ``_op_cost`` uses, so both paths take the same roofline branch for the same sums.
        launch = assumptions.kernel_launch_seconds
        self._compute_divisors = [tp * float(peak) for peak in self.op_peak_flops]
        self._fast_ops = [
            (f_tok, f_key, f_logit, weight, a_tok, a_logit, l_tok, launches * launch, s_row,
             index == self._attention_index, index == self.moe_index, self._compute_divisors[index])
            for index, (f_tok, f_key, f_logit, weight, a_tok, a_logit, l_tok, launches, s_row)
            in enumerate(self._op_rows)
        ]  # fmt: skip
        self._memory_divisor = tp * self.bandwidth
        self._link_divisor = tp * self.link
        self._kv_bytes = float(model.kv_cache_bytes_per_token_per_layer)
        self._attention_layers = attention_layers
        self._sliding_layers = model.num_sliding_window_layers
        self._full_layers = attention_layers - self._sliding_layers
        self._window = int(model.sliding_window or 0)
        if self.moe_index >= 0:  # (experts, 1 - k / experts, bytes of one expert in all layers, shared bytes)
            moe_layers = model.num_moe_layers
            self._moe_constants = (
                float(model.num_experts),
                1.0 - model.experts_per_token / model.num_experts,
                model.expert_params * model.expert_weight_bytes_per_param * moe_layers,
                model.shared_expert_params_per_layer * model.weight_bytes_per_param * moe_layers,
            )

    def _moe_weight_bytes(self, total_tokens: float) -> float:
        """Expert weights a step reads: the expected distinct experts its tokens route to (uniform
        routing), routed experts in their own dtype (MXFP4 in gpt-oss), shared ones in the linear dtype."""
        if self.moe_index < 0 or not total_tokens:
            return 0.0
        experts, untouched_per_token, expert_bytes, shared_bytes = self._moe_constants
        return experts * (1.0 - untouched_per_token**total_tokens) * expert_bytes + shared_bytes

    def _op_cost(
        self, index: int, row: tuple, total_tokens: float, key_sum: float, logit_sum: float, kv_sum: float,
        state_sum: float, moe_bytes: float,
    ) -> tuple[float, ...]:
        """One operator's totals, roofline times, seconds and energy for a step with these sums.

        Cache bytes are the attention op's K/V and the Mamba op's recurrent state."""
        f_tok, f_key, f_logit, weight, a_tok, a_logit, l_tok, launches, s_row = row
        a, tp = self.assumptions, self.tensor_parallel
        if not total_tokens:
            weight = 0.0  # an empty step reads nothing
        elif index == self.moe_index:
            weight = moe_bytes
        flops = f_tok * total_tokens + f_key * key_sum + f_logit * logit_sum
        activation = a_tok * total_tokens + a_logit * logit_sum
        cache = kv_sum if index == self._attention_index else state_sum if s_row else 0.0
        link = l_tok * total_tokens
        compute_seconds = flops / self._compute_divisors[index]
        memory_seconds = (activation + cache + weight) / (tp * self.bandwidth)
        link_seconds = link / (tp * self.link)
        transfer_seconds = max(memory_seconds, link_seconds)
        seconds = max(compute_seconds, transfer_seconds) + (launches * a.kernel_launch_seconds if total_tokens else 0.0)
        activity = a.compute_power_fraction * compute_seconds + a.memory_power_fraction * transfer_seconds
        dynamic_fraction = min(1.0, activity / seconds) if seconds > 0 else 0.0
        energy = self.gpus * seconds * (self.idle_watts + self.dynamic_watts * dynamic_fraction)
        return flops, weight, activation, cache, link, compute_seconds, memory_seconds, link_seconds, seconds, energy

    def step_totals(
        self, total_tokens: float, key_sum: float, logit_sum: float, kv_sum: float, state_sum: float = 0.0
    ) -> tuple[float, float]:
        """(seconds, energy_j) of a step from its sums alone: no per-row split, plain floats (fast).

        ``state_sum``: recurrent-state bytes moved (2 x state per sequence for each row that computes)."""
        moe_bytes = self._moe_weight_bytes(total_tokens)
        seconds = energy = 0.0
        for index, row in enumerate(self._op_rows):
            cost = self._op_cost(index, row, total_tokens, key_sum, logit_sum, kv_sum, state_sum, moe_bytes)
            seconds += cost[8]
            energy += cost[9]
        return seconds, energy

    def _attended(self, context: float, tokens: float) -> tuple[float, float]:
        """(keys attended, K/V tokens read) per request over all attention layers, for ``tokens`` new tokens after ``context``."""
        model = self.model
        sliding = model.num_sliding_window_layers
        full = model.num_attention_layers - sliding
        keys = full * (tokens * context + tokens * (tokens + 1) / 2)
        kv_read = full * (context + tokens)
        if sliding:
            window = float(model.sliding_window or 0)

            def up_to(n: float) -> float:
                return n * (n + 1) / 2 if n <= window else window * (window + 1) / 2 + window * (n - window)

            keys += sliding * (up_to(context + tokens) - up_to(context))
            kv_read += sliding * min(context + tokens, window + tokens - 1)
        return keys, kv_read

    def static_batch(self, batch_size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float, float, float]:
        """(prefill_seconds, prefill_j, decode_seconds, decode_j) of a static batch, in a few float evaluations.

        Decode step cost is piecewise linear in the context (affine terms inside max/min); the sum
        over the O-1 decode steps uses the trapezoid rule between the end contexts, split at the
        sliding-window edge where the key count stops growing. Exact where no operator changes its
        binding resource inside the range; tests bound the error elsewhere against step-by-step sums.
        """
        kv_bytes = self.model.kv_cache_bytes_per_token_per_layer
        layers = self._attention_layers
        b = float(batch_size)
        state_sum = b * self._state_row_bytes  # every request computes in every step
        keys, kv_read = self._attended(0.0, float(prompt_tokens))
        prefill_seconds, prefill_j = self.step_totals(
            b * prompt_tokens, b * keys, b, b * (kv_read + layers * prompt_tokens) * kv_bytes, state_sum
        )

        def decode_step(context: float) -> tuple[float, float]:
            keys, kv_read = self._attended(context, 1.0)
            return self.step_totals(b, b * keys, b, b * (kv_read + layers) * kv_bytes, state_sum)

        steps = output_tokens - 1
        if steps <= 0:
            return prefill_seconds, prefill_j, 0.0, 0.0
        first, last = float(prompt_tokens), float(prompt_tokens + steps - 1)
        edges = [first]
        if self.model.num_sliding_window_layers and self.model.sliding_window:
            edge = float(self.model.sliding_window - 1)  # last context whose query still sees every key
            if first < edge < last:
                edges += [edge, edge + 1]
        edges.append(last)
        decode_seconds = decode_j = 0.0
        for start, end in zip(edges[0::2], edges[1::2]):
            count = end - start + 1
            (s0, e0), (s1, e1) = decode_step(start), decode_step(end)
            decode_seconds += count * (s0 + s1) / 2
            decode_j += count * (e0 + e1) / 2
        return prefill_seconds, prefill_j, decode_seconds, decode_j

    def predict_phases(self, step: StepShape) -> tuple[float, float, float, float, np.ndarray, np.ndarray]:
        """(prefill_seconds, decode_seconds, prefill_j, decode_j, prefill weights, decode weights) of a step.

        The same numbers as ``prediction_from_cost(self.cost(step))`` (to float rounding; the tests
        compare them), in a few array operations: every row feature of ``cost`` is linear in
        the basis t, c*(t>0), t*c, t^2, logit rows (plus two sliding-window terms, and t>0 for
        models with a recurrent state), t and c being a row's tokens and context. So the step's
        sums, the phase totals and the per-row energies are a (basis x 2 phases) sum and two small
        dot products; the per-op arithmetic runs once on those sums in plain floats. This is the
        plugin worker's per-step path.
        """
        return self.phases_from_basis(*self.phase_basis(step))

    def phase_basis(self, step: StepShape) -> tuple[np.ndarray, np.ndarray]:
        """(basis, phase sums) of ``predict_phases``: the basis (rows as in ``BASIS_ROWS``) of the
        step's 2n rows, and its sums over each phase's rows (basis x 2)."""
        n = len(step.request_ids)
        prefill, decode = step.prefill_tokens, step.decode_tokens
        sliding = self._sliding_layers
        stateful = self._state_row_bytes > 0
        rows = 5 + (2 if sliding else 0) + (1 if stateful else 0)
        basis = np.empty((rows, 2 * n))
        tokens, context = basis[0], basis[1]
        tokens[:n] = prefill
        tokens[n:] = decode
        context[:n] = step.context_tokens
        np.add(context[:n], tokens[:n], out=context[n:])  # decode rows follow the step's prefill
        np.multiply(tokens, context, out=basis[2])
        np.multiply(tokens, tokens, out=basis[3])
        np.logical_and(prefill, decode == 0, out=basis[4, :n])  # one logit row per request: its last position
        basis[4, n:] = decode
        working = np.minimum(tokens, 1.0)  # 1 where the row computes anything, else 0
        if sliding:
            window = self._window
            basis[5] = _sliding_keys(context, tokens, window)
            np.minimum(context + tokens, tokens + (window - 1), out=basis[6])
            basis[6] *= working
        if stateful:
            basis[rows - 1] = working
        np.multiply(context, working, out=context)  # row 1 becomes c*(t>0)
        return basis, basis.reshape(rows, 2, n).sum(axis=2)  # (basis, phase)

    def phases_from_basis(
        self, basis: np.ndarray, phase_sums: np.ndarray
    ) -> tuple[float, float, float, float, np.ndarray, np.ndarray]:
        """``predict_phases`` from ``phase_basis``."""
        n = basis.shape[1] // 2
        sliding = self._sliding_layers
        stateful = self._state_row_bytes > 0
        rows = basis.shape[0]
        sums = phase_sums.tolist()

        full = self._full_layers
        layers = self._attention_layers
        kv_bytes = self._kv_bytes
        state_bytes = self._state_row_bytes
        total_tokens = sums[0][0] + sums[0][1]
        token_pairs = sums[2][0] + sums[2][1]
        token_squares = sums[3][0] + sums[3][1]
        logit_sum = sums[4][0] + sums[4][1]
        context_sum = sums[1][0] + sums[1][1]
        key_sum = full * (token_pairs + (token_squares + total_tokens) / 2)
        kv_tokens = full * (context_sum + total_tokens) + layers * total_tokens
        if sliding:
            key_sum += sliding * (sums[5][0] + sums[5][1])
            kv_tokens += sliding * (sums[6][0] + sums[6][1])
        kv_sum = kv_tokens * kv_bytes
        state_sum = state_bytes * (sums[rows - 1][0] + sums[rows - 1][1]) if stateful else 0.0
        seconds_weights, energy_weights, orphan_seconds, orphan_energy = self._feature_weights(
            total_tokens, key_sum, logit_sum, kv_sum, state_sum
        )

        def basis_weights(feature: list[float], orphan: float) -> list[float]:
            f_tokens, f_keys, f_logits, f_kv, f_state, f_share = feature
            share = (f_share + orphan) / total_tokens if total_tokens else 0.0
            weights = [
                f_tokens + f_keys * full / 2 + f_kv * kv_bytes * (full + layers) + share,
                f_kv * kv_bytes * full,
                f_keys * full,
                f_keys * full / 2,
                f_logits,
            ]
            if sliding:
                weights += [f_keys * sliding, f_kv * kv_bytes * sliding]
            if stateful:
                weights.append(f_state * state_bytes)
            return weights

        weights = np.array([basis_weights(seconds_weights, orphan_seconds), basis_weights(energy_weights, orphan_energy)])
        (prefill_seconds, decode_seconds), (prefill_j, decode_j) = (weights @ phase_sums).tolist()
        row_energy = weights[1] @ basis
        prefill_weights = row_energy[:n] / prefill_j if prefill_j > 0 else np.zeros(n)
        decode_weights = row_energy[n:] / decode_j if decode_j > 0 else np.zeros(n)
        return prefill_seconds, decode_seconds, prefill_j, decode_j, prefill_weights, decode_weights

    def _feature_weights(
        self, total_tokens: float, key_sum: float, logit_sum: float, kv_sum: float, state_sum: float
    ) -> tuple[list[float], list[float], float, float]:
        """Per-feature seconds and energy weights of ``StepCost`` (seconds_per_feature, ...) from a
        step's sums: the operator loop of ``cost`` in plain floats, without the per-op arrays."""
        if not total_tokens:  # an empty step reads and computes nothing: every op costs 0
            return [0.0] * FEATURES, [0.0] * FEATURES, 0.0, 0.0
        a = self.assumptions
        memory_divisor, link_divisor = self._memory_divisor, self._link_divisor
        compute_fraction, memory_fraction = a.compute_power_fraction, a.memory_power_fraction
        gpus, idle_watts, dynamic_watts = self.gpus, self.idle_watts, self.dynamic_watts
        moe_bytes = self._moe_weight_bytes(total_tokens)
        s_tok = s_key = s_logit = s_kv = s_state = s_share = 0.0
        e_tok = e_key = e_logit = e_kv = e_state = e_share = 0.0
        orphan_seconds = orphan_energy = 0.0
        for (f_tok, f_key, f_logit, weight, a_tok, a_logit, l_tok, launch_seconds, s_row, is_attention, is_moe,
             compute_divisor) in self._fast_ops:  # fmt: skip
            if is_moe:
                weight = moe_bytes
            flops = f_tok * total_tokens + f_key * key_sum + f_logit * logit_sum
            activation = a_tok * total_tokens + a_logit * logit_sum
            kv = kv_sum if is_attention else 0.0
            state = state_sum if s_row else 0.0
            link = l_tok * total_tokens
            compute_seconds = flops / compute_divisor
            memory_seconds = (activation + kv + state + weight) / memory_divisor
            link_seconds = link / link_divisor
            transfer_seconds = max(memory_seconds, link_seconds)
            seconds = max(compute_seconds, transfer_seconds) + launch_seconds
            activity = compute_fraction * compute_seconds + memory_fraction * transfer_seconds
            dynamic_fraction = min(1.0, activity / seconds) if seconds > 0 else 0.0
            energy = gpus * seconds * (idle_watts + dynamic_watts * dynamic_fraction)
            # A row's share of the op is its share of the op's binding resource (as in ``cost``).
            if compute_seconds >= transfer_seconds:
                if flops > 0:
                    s, e = seconds / flops, energy / flops
                    s_tok += s * f_tok
                    s_key += s * f_key
                    s_logit += s * f_logit
                    e_tok += e * f_tok
                    e_key += e * f_key
                    e_logit += e * f_logit
                    continue
            elif link_seconds > memory_seconds:
                if link > 0:
                    s, e = seconds / link, energy / link
                    s_tok += s * l_tok
                    e_tok += e * l_tok
                    continue
            else:
                moved = activation + kv + state + weight
                if moved > 0:
                    s, e = seconds / moved, energy / moved
                    s_tok += s * a_tok
                    s_logit += s * a_logit
                    e_tok += e * a_tok
                    e_logit += e * a_logit
                    if kv:
                        s_kv += s
                        e_kv += e
                    if state:
                        s_state += s
                        e_state += e
                    s_share += s * weight
                    e_share += e * weight
                    continue
            orphan_seconds += seconds
            orphan_energy += energy
        return (
            [s_tok, s_key, s_logit, s_kv, s_state, s_share],
            [e_tok, e_key, e_logit, e_kv, e_state, e_share],
            orphan_seconds,
            orphan_energy,
        )

    def cost(self, step: StepShape) -> StepCost:
        model = self.model
        n = step.num_requests
        prefill, decode = step.prefill_tokens, step.decode_tokens
        tokens = np.concatenate([prefill, decode]).astype(np.float64)
        context = np.concatenate([step.context_tokens, step.context_tokens + prefill]).astype(np.float64)
        total_tokens = float(tokens.sum())
        # One logit row per scheduled request (its last position) plus every speculative position.
        logits = np.concatenate([((prefill > 0) & (decode == 0)).astype(np.float64), decode.astype(np.float64)])
        layers = model.num_attention_layers
        sliding_layers = model.num_sliding_window_layers
        full_layers = layers - sliding_layers
        keys = full_layers * _sliding_keys(context, tokens, None)
        kv_read_tokens = full_layers * (context + tokens)
        if sliding_layers:
            window = int(model.sliding_window or 0)
            keys = keys + sliding_layers * _sliding_keys(context, tokens, window)
            # The window includes the query itself: a chunk of T tokens reads at most w + T - 1 keys.
            kv_read_tokens = kv_read_tokens + sliding_layers * np.minimum(context + tokens, window + tokens - 1)
        kv_row = (kv_read_tokens + layers * tokens) * (model.kv_cache_bytes_per_token_per_layer * (tokens > 0))
        state_row = self._state_row_bytes * (tokens > 0)
        token_share = tokens / total_tokens if total_tokens else np.zeros_like(tokens)
        key_sum, logit_sum, kv_sum = float(keys.sum()), float(logits.sum()), float(kv_row.sum())
        state_sum = float(state_row.sum())

        moe_weight_bytes = self._moe_weight_bytes(total_tokens)

        columns: list[list[float]] = [[] for _ in range(6)]  # flops, weight, act, cache, link, seconds
        energies: list[float] = []
        coefficients: list[tuple[float, ...]] = []
        seconds_per_feature = [0.0] * FEATURES
        energy_per_feature = [0.0] * FEATURES
        orphan_seconds = orphan_energy = 0.0
        for index, row in enumerate(self._op_rows):
            f_tok, f_key, f_logit, _, a_tok, a_logit, l_tok, _, _ = row
            flops, weight, activation, cache, link, compute_seconds, memory_seconds, link_seconds, seconds, energy = (
                self._op_cost(index, row, total_tokens, key_sum, logit_sum, kv_sum, state_sum, moe_weight_bytes)
            )
            moved = activation + cache + weight
            transfer_seconds = max(memory_seconds, link_seconds)
            is_attention = index == self._attention_index
            # A row's share of the op is its share of the op's binding resource.
            if compute_seconds >= transfer_seconds:
                coefficient, total = (f_tok, f_key, f_logit, 0.0, 0.0, 0.0), flops
            elif link_seconds > memory_seconds:
                coefficient, total = (l_tok, 0.0, 0.0, 0.0, 0.0, 0.0), link
            else:
                coefficient = (a_tok, 0.0, a_logit, 1.0 if cache and is_attention else 0.0,
                               1.0 if cache and not is_attention else 0.0, weight)  # fmt: skip
                total = moved
            if total > 0:
                for feature in range(FEATURES):
                    seconds_per_feature[feature] += seconds / total * coefficient[feature]
                    energy_per_feature[feature] += energy / total * coefficient[feature]
            else:
                orphan_seconds += seconds
                orphan_energy += energy
            for column, value in zip(columns, (flops, weight, activation, cache, link, seconds)):
                column.append(value)
            energies.append(energy)
            coefficients.append(coefficient)

        return StepCost(
            op_names=self.op_names,
            op_flops=np.array(columns[0]),
            op_weight_bytes=np.array(columns[1]),
            op_activation_bytes=np.array(columns[2]),
            op_kv_cache_bytes=np.array(columns[3]),
            op_interconnect_bytes=np.array(columns[4]),
            op_seconds=np.array(columns[5]),
            op_energy_j=np.array(energies),
            op_coefficients=np.array(coefficients),
            row_features=np.stack([tokens, keys, logits, kv_row, state_row, token_share]),
            num_requests=n,
            seconds_per_feature=np.array(seconds_per_feature),
            energy_per_feature=np.array(energy_per_feature),
            orphan_seconds=orphan_seconds,
            orphan_energy_j=orphan_energy,
        )


def step_cost(
    model: ModelDescription,
    hardware: Hardware,
    step: StepShape,
    assumptions: RooflineAssumptions = RooflineAssumptions(),
    pipeline_parallel: int = 1,
) -> StepCost:
    """Roofline cost of one engine step of ``model`` on ``hardware`` (builds a ``Roofline`` each call)."""
    return Roofline(model, hardware, assumptions, pipeline_parallel).cost(step)


def _gemm_dtype(weight_dtype: str, activation_dtype: str) -> str:
    """The tensor-core precision of a GEMM with weights in ``weight_dtype``: fp8 weights run fp8
    GEMMs (W8A8); fp4/MXFP4 run at the GPU's FP4 rate where it has one (the fallback chain in
    ``hardware.py`` handles GPUs without); int4/int8 weight-only kernels dequantise to the
    activation dtype, as do unquantised weights."""
    if weight_dtype in ("fp8", "fp4", "mxfp4"):
        return weight_dtype
    return activation_dtype if activation_dtype in DTYPE_BYTES else "bf16"


def _compute_dtype(model: ModelDescription) -> str:
    """The precision of the model's main (non-expert linear) GEMMs; routed experts use
    ``_gemm_dtype(model.expert_weight_dtype, ...)``."""
    return _gemm_dtype(model.weight_dtype, model.activation_dtype)
