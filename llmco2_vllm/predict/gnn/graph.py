"""Operator graph of one engine step: the input of the GNN predictor (``gnn.py``).

One node per kernel of ONE representative transformer layer, plus the embedding and LM-head
nodes, with directed edges along the data flow (incl. the two residual edges and a ``layer loop``
edge from the layer's output back to its input that stands for the repetition over layers).

Every node's numbers come from :class:`~llmco2_vllm.predict.roofline.Roofline` so the graph and the
analytic model agree: a node's FLOPs/bytes are the roofline per-op totals of the step divided by
the number of layers the op spans (``num_layers`` for attention ops, ``num_dense_layers`` for the
dense MLP, ``num_moe_layers`` for MoE ops, 1 for embedding / LM head). Roofline ops that cover
several kernels are split deterministically:

* ``norms_residual_rope`` (activation bytes ``ab * (10h + 2 * rope_width)`` per token and layer)
  -> two norms (``2h`` each), two residual adds (``3h`` each) and RoPE (``2 * rope_width``);
* ``mlp`` -> gate_up ((m-1)/m of FLOPs and weights, ``h + w`` activation elements), activation
  (``2w``) and down (1/m, ``w + h``) with m = 3 (gated) or 2 matrices;
* ``moe_experts`` -> routed experts and (when present) the shared expert, FLOPs by active
  parameters, weight bytes by touched parameters, activation bytes by width;
* ``tensor_parallel_all_reduce`` -> one all-reduce after attention and one after the MLP (halves).

So for each roofline op the sum of its nodes' values times their layer multiplier equals the
roofline's op total (checked in ``tests/test_gnn.py``).

Node features (fixed log scaling here; the GNN standardises them again with statistics stored in
its checkpoint): log FLOPs, log weight / activation / KV / interconnect bytes, log arithmetic
intensity, log roofline seconds (per layer), compute-bound flag, log layer multiplier, node-kind
one-hot. Graph features: hardware as two ratios (ridge point = peak FLOP/s / bandwidth, TDP per
bandwidth), parallelism, batch summary, model dimensions and the analytic prediction's log time /
log energy of the step, and a serving-engine flag (HF transformers vs vLLM; only ML.ENERGY v1
training rows set it). There is deliberately no GPU-identity one-hot, and no absolute datasheet
figure (peak FLOP/s, bandwidth, memory, TDP, idle power, interconnect): with five training GPUs
those let the network recognise individual GPUs, and leave-one-GPU-type-out cross-validation got
worse with them (39.1 % vs 29.5 % MAPE with the ratios, same CV settings).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch_geometric.data import Data

from llmco2_vllm.predict.hardware import Hardware
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.roofline import Roofline, RooflineAssumptions, _compute_dtype
from llmco2_vllm.predict.step_shape import StepShape

NODE_KINDS: tuple[str, ...] = (
    "embedding", "norm", "qkv", "rope", "attention", "o_proj", "residual_add", "gate_up",
    "activation", "down", "moe_router", "moe_experts", "shared_expert", "all_reduce", "lm_head",
)
#: Numeric node features before the kind one-hot.
NODE_NUMERIC = (
    "log_flops", "log_weight_bytes", "log_activation_bytes", "log_kv_bytes", "log_interconnect_bytes",
    "log_arithmetic_intensity", "log_roofline_seconds", "compute_bound", "log_layer_multiplier",
)
NODE_FEATURES = NODE_NUMERIC + tuple(f"kind_{k}" for k in NODE_KINDS)
GRAPH_FEATURES: tuple[str, ...] = (
    "log_ridge_point", "log_tdp_per_bandwidth",
    "log_num_gpus", "log_tensor_parallel", "log_pipeline_parallel",
    "log_requests", "log_prefill_tokens", "log_decode_tokens", "log_mean_context", "log_max_context",
    "prefill_token_share",
    "log_hidden", "log_layers", "log_heads", "log_kv_heads", "log_intermediate", "log_vocab",
    "log_experts", "log_experts_per_token", "log_active_params", "is_mla", "weight_bytes_per_param",
    "sliding_layer_share",
    "analytic_log_seconds", "analytic_log_energy_j", "analytic_prefill_energy_share",
    "engine_hf_transformers",
)
#: Columns of ``Data.raw``: per-layer (per-node) physical quantities, unscaled, for tests/inspection.
RAW_COLUMNS = ("flops", "weight_bytes", "activation_bytes", "kv_cache_bytes", "interconnect_bytes", "seconds")

EDGE_FLOW, EDGE_RESIDUAL, EDGE_LAYER_LOOP = 0, 1, 2


class UnsupportedGraphError(ValueError):
    """The model cannot be expressed by the operator graph; callers fall back to analytic."""


def check_supported(model: ModelDescription) -> None:
    """Raise ``UnsupportedGraphError`` for field combinations the graph builder does not express.

    Declared unsupported: MLA attention combined with sliding-window layers (no such model is
    known; the graph has one attention node whose KV bytes assume one cache layout per layer),
    hybrid models whose blocks differ (Mamba-2 / attention / MLP), and a model whose layers are
    neither dense nor MoE (no MLP at all).
    """
    if model.is_hybrid:
        # One representative layer cannot stand for blocks of different kinds (Nemotron-H).
        raise UnsupportedGraphError(f"{model.name}: hybrid Mamba/attention/MLP blocks are not supported by the operator graph")
    if model.is_mla and model.num_sliding_window_layers > 0:
        raise UnsupportedGraphError(f"{model.name}: MLA with sliding-window layers is not supported by the operator graph")
    if model.num_dense_layers == 0 and model.num_moe_layers == 0:
        raise UnsupportedGraphError(f"{model.name}: layers with no MLP are not supported by the operator graph")
    if model.num_dense_layers > 0 and model.dense_mlp_params_per_layer == 0:
        raise UnsupportedGraphError(f"{model.name}: dense layers with intermediate_size 0 are not supported")


def _log(x: float, scale: float) -> float:
    return math.log10(1.0 + max(float(x), 0.0)) / scale


class StepGraphBuilder:
    """Builds step graphs for one (model, hardware, pipeline) triple; keeps one ``Roofline``."""

    def __init__(
        self,
        model: ModelDescription,
        hardware: Hardware,
        pipeline_parallel: int = 1,
        assumptions: RooflineAssumptions = RooflineAssumptions(),
    ) -> None:
        check_supported(model)
        self.model, self.hardware, self.pipeline_parallel = model, hardware, pipeline_parallel
        self.roofline = Roofline(model, hardware, assumptions, pipeline_parallel)
        self.assumptions = assumptions
        self._index = {name: i for i, name in enumerate(self.roofline.op_names)}
        self._static_graph_features = self._model_hw_features()
        self._structure()

    # ---- static structure --------------------------------------------------------------------
    def _structure(self) -> None:
        """Node list (name, kind, layer multiplier, launches, {roofline op: fractions}) and edges."""
        m = self.model
        h, L = m.hidden_size, m.num_layers
        rope_width = (m.num_attention_heads + (0 if m.is_mla else m.num_kv_heads)) * (
            m.qk_rope_head_dim if m.is_mla else m.head_dim
        )
        nrr = 10 * h + 2 * rope_width
        one = {"flops": 1.0, "weight": 1.0, "act": 1.0, "kv": 1.0, "link": 1.0}

        def part(act: float) -> dict[str, float]:
            return {"flops": 0.0, "weight": 0.0, "act": act, "kv": 0.0, "link": 0.0}

        nodes: list[tuple[str, str, int, int, str, dict[str, float]]] = []
        edges: list[tuple[str, str, int]] = []
        tp = self.hardware.tensor_parallel

        def add(name, kind, mult, launches, op, fractions):
            nodes.append((name, kind, mult, launches, op, fractions))

        add("embedding", "embedding", 1, 1, "embedding", one)
        add("input_norm", "norm", L, 1, "norms_residual_rope", part(2 * h / nrr))
        add("qkv", "qkv", L, 1, "qkv_projection", one)
        add("rope", "rope", L, 1, "norms_residual_rope", part(2 * rope_width / nrr))
        add("attention", "attention", L, 1, "attention", one)
        add("o_proj", "o_proj", L, 1, "output_projection", one)
        flow = ["embedding", "input_norm", "qkv", "rope", "attention", "o_proj"]
        if tp > 1:
            add("all_reduce_attn", "all_reduce", L, 1, "tensor_parallel_all_reduce", {**part(0.0), "link": 0.5})
            flow.append("all_reduce_attn")
        add("residual_attn", "residual_add", L, 1, "norms_residual_rope", part(3 * h / nrr))
        add("post_attn_norm", "norm", L, 1, "norms_residual_rope", part(2 * h / nrr))
        flow += ["residual_attn", "post_attn_norm"]
        edges += [(a, b, EDGE_FLOW) for a, b in zip(flow, flow[1:])]
        edges.append(("embedding", "residual_attn", EDGE_RESIDUAL))
        mlp_outputs: list[str] = []
        if "mlp" in self._index:
            Ld, w, mats = m.num_dense_layers, m.intermediate_size, (3 if m.gated_mlp else 2)
            denom = 2 * h + 4 * w
            add("gate_up", "gate_up", Ld, 1, "mlp",
                {"flops": (mats - 1) / mats, "weight": (mats - 1) / mats, "act": (h + w) / denom, "kv": 0.0, "link": 0.0})
            add("activation", "activation", Ld, 1, "mlp", part(2 * w / denom))
            add("down", "down", Ld, 1, "mlp",
                {"flops": 1 / mats, "weight": 1 / mats, "act": (w + h) / denom, "kv": 0.0, "link": 0.0})
            edges += [("post_attn_norm", "gate_up", EDGE_FLOW), ("gate_up", "activation", EDGE_FLOW),
                      ("activation", "down", EDGE_FLOW)]
            mlp_outputs.append("down")
        if "moe_experts" in self._index:
            Lm = m.num_moe_layers
            add("moe_router", "moe_router", Lm, 2, "moe_router", one)
            # Routed/shared split of moe_experts; weight fractions depend on the step (touched experts).
            add("moe_experts", "moe_experts", Lm, 3 if m.shared_expert_params_per_layer else 4, "moe_experts", {})
            edges += [("post_attn_norm", "moe_router", EDGE_FLOW), ("moe_router", "moe_experts", EDGE_FLOW)]
            mlp_outputs.append("moe_experts")
            if m.shared_expert_params_per_layer:
                add("shared_expert", "shared_expert", Lm, 1, "moe_experts", {})
                edges.append(("post_attn_norm", "shared_expert", EDGE_FLOW))
                mlp_outputs.append("shared_expert")
        tail = "residual_mlp"
        if tp > 1:
            add("all_reduce_mlp", "all_reduce", L, 1, "tensor_parallel_all_reduce", {**part(0.0), "link": 0.5})
            edges += [(o, "all_reduce_mlp", EDGE_FLOW) for o in mlp_outputs]
            edges.append(("all_reduce_mlp", "residual_mlp", EDGE_FLOW))
        else:
            edges += [(o, "residual_mlp", EDGE_FLOW) for o in mlp_outputs]
        add(tail, "residual_add", L, 1, "norms_residual_rope", part(3 * h / nrr))
        add("lm_head", "lm_head", 1, 1, "lm_head", one)
        edges += [("residual_attn", "residual_mlp", EDGE_RESIDUAL), ("residual_mlp", "lm_head", EDGE_FLOW),
                  ("residual_mlp", "input_norm", EDGE_LAYER_LOOP)]

        self.node_names = tuple(n[0] for n in nodes)
        self.node_kinds = tuple(n[1] for n in nodes)
        self.node_mult = np.array([n[2] for n in nodes], dtype=np.float64)
        self.node_launches = np.array([n[3] for n in nodes], dtype=np.float64)
        self.node_ops = tuple(n[4] for n in nodes)
        self._fractions = [n[5] for n in nodes]
        position = {name: i for i, name in enumerate(self.node_names)}
        self.edge_index = torch.tensor([[position[a] for a, _, _ in edges], [position[b] for _, b, _ in edges]],
                                       dtype=torch.long)
        self.edge_type = torch.tensor([t for _, _, t in edges], dtype=torch.long)
        kind_onehot = np.zeros((len(nodes), len(NODE_KINDS)), dtype=np.float32)
        for i, kind in enumerate(self.node_kinds):
            kind_onehot[i, NODE_KINDS.index(kind)] = 1.0
        self._kind_onehot = kind_onehot

    def _model_hw_features(self) -> list[float]:
        m, hw, pp = self.model, self.hardware, self.pipeline_parallel
        gpu = hw.gpu
        bandwidth = gpu.memory_bandwidth_bytes_per_second
        # Hardware enters as two ratios only (see module docstring: absolute datasheet figures let the
        # network recognise individual GPUs and did not transfer to held-out GPUs in cross-validation).
        return [
            math.log10(gpu.peak_flops(_compute_dtype(m)) / bandwidth) / 3.0,  # ridge point, FLOP per byte
            math.log10(gpu.tdp_watts / (bandwidth / 1e9)),  # watts per GB/s
            math.log2(hw.tensor_parallel * pp),
            math.log2(hw.tensor_parallel),
            math.log2(pp),
        ], [
            _log(m.hidden_size, 4.0), _log(m.num_layers, 2.0), _log(m.num_attention_heads, 2.0),
            _log(m.num_kv_heads, 2.0), _log(m.intermediate_size or m.moe_intermediate_size, 5.0),
            _log(m.vocab_size, 6.0), _log(m.num_experts, 2.0), _log(m.experts_per_token, 1.0),
            # Mean stored bytes per weight: with per-group dtypes (MXFP4 experts, bf16 LM head) the
            # bulk of the weights, not the linear-layer dtype alone, sets the bytes a step streams.
            _log(m.active_params_per_token, 12.0), float(m.is_mla), m.weight_bytes / m.total_params / 2.0,
            m.num_sliding_window_layers / m.num_layers,
        ]

    # ---- per step ----------------------------------------------------------------------------
    def node_quantities(self, cost) -> np.ndarray:
        """(nodes, 5) per-layer flops, weight, activation, KV, interconnect bytes of each node."""
        m = self.model
        out = np.zeros((len(self.node_names), 5))
        for i, (op, fractions) in enumerate(zip(self.node_ops, self._fractions)):
            j = self._index[op]
            totals = np.array([cost.op_flops[j], cost.op_weight_bytes[j], cost.op_activation_bytes[j],
                               cost.op_kv_cache_bytes[j], cost.op_interconnect_bytes[j]]) / self.node_mult[i]
            if op == "moe_experts":
                k, ep, sp = m.experts_per_token, m.expert_params, m.shared_expert_params_per_layer
                width_r, width_s = k * m.moe_intermediate_size, m.shared_expert_intermediate_size
                shared_weight = sp * m.weight_bytes_per_param if totals[1] > 0 else 0.0
                act_r = (2 * m.hidden_size + 4 * width_r) / (2 * m.hidden_size + 4 * (width_r + width_s))
                if self.node_names[i] == "moe_experts":
                    fr = [k * ep / (k * ep + sp), None, act_r]
                    weight = totals[1] - shared_weight
                else:
                    fr = [sp / (k * ep + sp), None, 1.0 - act_r]
                    weight = shared_weight
                out[i] = [totals[0] * fr[0], weight, totals[2] * fr[2], 0.0, 0.0]
            else:
                out[i] = totals * np.array([fractions["flops"], fractions["weight"], fractions["act"],
                                            fractions["kv"], fractions["link"]])
        return out

    def build(self, step: StepShape, hf_transformers: bool = False) -> Data:
        """``(graph, analytic StepPrediction)``. ``hf_transformers`` marks training rows served by HF
        transformers instead of vLLM (ML.ENERGY v1): a graph feature so the GNN can attribute that
        engine's overhead to the engine; always False when predicting for vLLM."""
        cost = self.roofline.cost(step)
        q = self.node_quantities(cost)
        r = self.roofline
        tp, launch = self.hardware.tensor_parallel, self.assumptions.kernel_launch_seconds
        compute = q[:, 0] / (tp * r.peak_flops)
        memory = (q[:, 1] + q[:, 2] + q[:, 3]) / (tp * r.bandwidth)
        link = q[:, 4] / (tp * r.link)
        busy = np.maximum(compute, np.maximum(memory, link))
        total_tokens = step.total_prefill_tokens + step.total_decode_tokens
        seconds = busy + (self.node_launches * launch if total_tokens > 0 else 0.0)
        bytes_ = q[:, 1] + q[:, 2] + q[:, 3]
        ai = np.divide(q[:, 0], bytes_, out=np.zeros_like(bytes_), where=bytes_ > 0)
        numeric = np.stack([
            np.log10(1 + q[:, 0]) / 15.0, np.log10(1 + q[:, 1]) / 12.0, np.log10(1 + q[:, 2]) / 12.0,
            np.log10(1 + q[:, 3]) / 12.0, np.log10(1 + q[:, 4]) / 12.0, np.log10(1 + ai) / 4.0,
            np.log10(1 + seconds * 1e6) / 6.0, (compute >= np.maximum(memory, link)).astype(np.float64) * (busy > 0),
            np.log10(1 + self.node_mult) / 2.0,
        ], axis=1)
        x = torch.from_numpy(np.concatenate([numeric.astype(np.float32), self._kind_onehot], axis=1))

        from llmco2_vllm.predict.predictor import prediction_from_cost

        pred = prediction_from_cost(cost)
        u = self.graph_features(step, pred, hf_transformers)
        raw = torch.from_numpy(np.concatenate([q, seconds[:, None]], axis=1))
        return Data(
            x=x, edge_index=self.edge_index, edge_type=self.edge_type, u=u.unsqueeze(0), raw=raw,
            analytic=torch.tensor([[pred.prefill_seconds, pred.decode_seconds, pred.prefill_energy_j,
                                    pred.decode_energy_j]], dtype=torch.float64),
            num_nodes=len(self.node_names),
        ), pred

    def graph_features(self, step: StepShape, pred, hf_transformers: bool = False) -> torch.Tensor:
        hw_f, model_f = self._static_graph_features
        n = step.num_requests
        ctx = step.context_tokens.astype(np.float64) + step.prefill_tokens + step.decode_tokens
        prefill, decode = step.total_prefill_tokens, step.total_decode_tokens
        energy, seconds = pred.energy_j, pred.seconds
        batch_f = [
            _log(n, 3.0), _log(prefill, 5.0), _log(decode, 4.0),
            _log(float(ctx.mean()) if n else 0.0, 5.0), _log(float(ctx.max()) if n else 0.0, 5.0),
            prefill / (prefill + decode) if prefill + decode else 0.0,
        ]
        analytic_f = [
            math.log10(max(seconds, 1e-9)) / 3.0, math.log10(max(energy, 1e-9)) / 4.0,
            pred.prefill_energy_j / energy if energy > 0 else 0.0,
            float(hf_transformers),
        ]
        return torch.tensor(hw_f + batch_f + model_f + analytic_f, dtype=torch.float32)


def build_step_graph(
    model: ModelDescription, hardware: Hardware, step: StepShape, pipeline_parallel: int = 1
) -> Data:
    """The operator graph of ``step`` (see module docstring); raises ``UnsupportedGraphError``."""
    return StepGraphBuilder(model, hardware, pipeline_parallel).build(step)[0]
