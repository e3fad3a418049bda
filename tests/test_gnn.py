"""Operator graph construction, GNN checkpoint round trip and the GnnPredictor contract."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

from llmco2_vllm.predict.gnn.graph import (  # noqa: E402
    EDGE_LAYER_LOOP,
    EDGE_RESIDUAL,
    GRAPH_FEATURES,
    NODE_FEATURES,
    StepGraphBuilder,
    UnsupportedGraphError,
    build_step_graph,
    check_supported,
)
from llmco2_vllm.predict.gnn.model import GnnEnsemble, GnnPredictor, default_checkpoint_path  # noqa: E402
from llmco2_vllm.predict.hardware import Hardware, find_gpu  # noqa: E402
from llmco2_vllm.predict.model_description import load_model  # noqa: E402
from llmco2_vllm.predict.predictor import StepPredictor  # noqa: E402
from llmco2_vllm.predict.step_shape import StepShape  # noqa: E402


def hardware(tp: int = 1, gpu: str = "H100-SXM5-80GB") -> Hardware:
    return Hardware(find_gpu(gpu), tp, tp, "configured")


DENSE_MHA = "huggyllama/llama-7b"
DENSE_GQA = "meta-llama/Llama-3.1-8B-Instruct"
MOE = "mistralai/Mixtral-8x7B-Instruct-v0.1"
MLA_MOE_SHARED = "deepseek-ai/DeepSeek-V3.1"

MIXED = StepShape.from_requests([("a", 100, 0, 0), ("b", 0, 1, 500), ("c", 64, 0, 128)])


def edges(builder: StepGraphBuilder) -> set[tuple[str, str]]:
    names = builder.node_names
    return {(names[a], names[b]) for a, b in builder.edge_index.t().tolist()}


@pytest.mark.parametrize(
    "model_name, tp, expected_nodes",
    [
        (DENSE_MHA, 1, 13),  # embedding, 2 norms, qkv, rope, attention, o_proj, 2 residual adds, gate_up, act, down, lm_head
        (DENSE_GQA, 1, 13),
        (MOE, 1, 12),  # router + experts instead of gate_up/activation/down
        (MOE, 4, 14),  # + 2 all-reduce nodes
        (MLA_MOE_SHARED, 8, 18),  # dense MLP (first layers) + router, routed experts, shared expert + 2 all-reduces
    ],
)
def test_graph_structure(model_name: str, tp: int, expected_nodes: int) -> None:
    builder = StepGraphBuilder(load_model(model_name), hardware(tp))
    graph, _ = builder.build(MIXED)
    assert graph.num_nodes == expected_nodes == len(builder.node_names)
    assert graph.x.shape == (expected_nodes, len(NODE_FEATURES))
    assert graph.u.shape == (1, len(GRAPH_FEATURES))
    assert torch.isfinite(graph.x).all() and torch.isfinite(graph.u).all()
    e = edges(builder)
    assert ("embedding", "input_norm") in e and ("input_norm", "qkv") in e and ("qkv", "rope") in e
    assert ("rope", "attention") in e and ("attention", "o_proj") in e and ("residual_mlp", "lm_head") in e
    types = dict(zip(((builder.node_names[a], builder.node_names[b]) for a, b in builder.edge_index.t().tolist()),
                     builder.edge_type.tolist()))
    assert types[("embedding", "residual_attn")] == EDGE_RESIDUAL
    assert types[("residual_attn", "residual_mlp")] == EDGE_RESIDUAL
    assert types[("residual_mlp", "input_norm")] == EDGE_LAYER_LOOP
    if tp > 1:
        assert ("o_proj", "all_reduce_attn") in e and ("all_reduce_mlp", "residual_mlp") in e
    else:
        assert not any("all_reduce" in n for n in builder.node_names)
    model = load_model(model_name)
    if model.is_moe:
        assert ("post_attn_norm", "moe_router") in e and ("moe_router", "moe_experts") in e
        assert ("shared_expert" in builder.node_names) == bool(model.shared_expert_intermediate_size)
    if model.num_dense_layers:
        assert ("gate_up", "activation") in e and ("activation", "down") in e
    # every node is reachable and no node is isolated
    touched = {a for a, _ in e} | {b for _, b in e}
    assert touched == set(builder.node_names)


@pytest.mark.parametrize("model_name, tp", [(DENSE_GQA, 1), (MOE, 4), (MLA_MOE_SHARED, 8), (DENSE_MHA, 2)])
def test_node_numbers_sum_to_roofline_ops(model_name: str, tp: int) -> None:
    builder = StepGraphBuilder(load_model(model_name), hardware(tp))
    cost = builder.roofline.cost(MIXED)
    graph, _ = builder.build(MIXED)
    raw = graph.raw.numpy()
    for j, op in enumerate(cost.op_names):
        idx = [i for i, o in enumerate(builder.node_ops) if o == op]
        assert idx, op
        total = (raw[idx, :5] * builder.node_mult[idx, None]).sum(axis=0)
        expected = [cost.op_flops[j], cost.op_weight_bytes[j], cost.op_activation_bytes[j],
                    cost.op_kv_cache_bytes[j], cost.op_interconnect_bytes[j]]
        np.testing.assert_allclose(total, expected, rtol=1e-9, err_msg=op)


def test_llama_8b_decode_hand_check() -> None:
    """Llama-3.1-8B, decode batch 1: the qkv node holds ONE layer's Q, K, V weights."""
    model = load_model(DENSE_GQA)
    step = StepShape.static_batch_decode(1, 400)
    graph = build_step_graph(model, hardware(1), step)
    builder = StepGraphBuilder(model, hardware(1))
    qkv = builder.node_names.index("qkv")
    assert graph.raw[qkv, 1].item() == 4096 * (4096 + 2 * 1024) * 2  # bf16 bytes
    assert graph.raw[qkv, 0].item() == 2 * 4096 * (4096 + 2 * 1024)  # 2 FLOPs per weight, one token
    attention = builder.node_names.index("attention")
    # K/V read for 400 cached tokens + the new one, plus the new token's K/V written:
    # (401 + 1) tokens x 8 kv heads x 128 x 2 (K and V) x 2 bytes
    assert graph.raw[attention, 3].item() == (401 + 1) * 8 * 128 * 2 * 2
    gate_up = builder.node_names.index("gate_up")
    assert graph.raw[gate_up, 1].item() == 2 * 4096 * 14336 * 2
    assert builder.node_mult[qkv] == 32 and builder.node_mult[builder.node_names.index("lm_head")] == 1


def test_unsupported_architecture_is_declared_and_predictor_falls_back() -> None:
    base = load_model(MLA_MOE_SHARED)
    unsupported = dataclasses.replace(base, sliding_window=4096, num_sliding_window_layers=4)  # MLA + sliding window
    with pytest.raises(UnsupportedGraphError):
        check_supported(unsupported)
    with pytest.warns(RuntimeWarning, match="falling back to the analytic"):
        predictor = GnnPredictor(unsupported, hardware(8), checkpoint=GnnEnsemble(1))
    assert predictor.is_fallback
    from llmco2_vllm.predict.predictor import AnalyticPredictor

    got = predictor.predict_step(MIXED)
    want = AnalyticPredictor(unsupported, hardware(8)).predict_step(MIXED)
    assert got.energy_j == pytest.approx(want.energy_j) and got.seconds == pytest.approx(want.seconds)


def _perturbed_ensemble(members: int = 2) -> GnnEnsemble:
    torch.manual_seed(0)
    ensemble = GnnEnsemble(members)
    with torch.no_grad():  # heads start at zero: give them weights so outputs are non-trivial
        for member in ensemble.members:
            for head in (member.prefill_head, member.decode_head):
                head[-1].weight.normal_(0, 0.3)
                head[-1].bias.normal_(0, 0.3)
    ensemble.residual_quantiles = (-0.2, 0.25)
    return ensemble.eval()


def test_checkpoint_round_trip(tmp_path) -> None:
    ensemble = _perturbed_ensemble()
    path = tmp_path / "gnn.safetensors"
    ensemble.save(path)
    assert path.with_suffix(".json").exists()
    loaded = GnnEnsemble.load(path)
    model, hw = load_model(DENSE_GQA), hardware(1)
    a = GnnPredictor(model, hw, checkpoint=ensemble)
    b = GnnPredictor(model, hw, checkpoint=path)
    for step in (MIXED, StepShape.static_batch_decode(4, 300), StepShape.static_batch_prefill(2, 128)):
        pa, pb = a.predict_step_interval(step), b.predict_step_interval(step)
        assert pa[0].energy_j == pb[0].energy_j and pa[0].seconds == pb[0].seconds
        assert pa[1:] == pb[1:]
    assert loaded.residual_quantiles == (-0.2, 0.25)


def test_gnn_predictor_contract() -> None:
    checkpoint = default_checkpoint_path() if default_checkpoint_path().exists() else _perturbed_ensemble()
    model, hw = load_model(MOE), hardware(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model must not fall back
        predictor = GnnPredictor(model, hw, checkpoint=checkpoint)
    assert isinstance(predictor, StepPredictor) and predictor.name == "gnn" and not predictor.is_fallback
    from llmco2_vllm.predict.predictor import AnalyticPredictor

    analytic = AnalyticPredictor(model, hw).predict_step(MIXED)
    pred, low, high = predictor.predict_step_interval(MIXED)
    for value in (pred.prefill_seconds, pred.decode_seconds, pred.prefill_energy_j, pred.decode_energy_j, low, high):
        assert math.isfinite(value) and value > 0
    assert low <= pred.energy_j <= high
    np.testing.assert_allclose(pred.request_prefill_weights, analytic.request_prefill_weights)
    np.testing.assert_allclose(pred.request_decode_weights, analytic.request_decode_weights)
    # the correction is bounded: exp(+-MAX_LOG_CORRECTION) of the analytic phase energy
    assert 0.1 < pred.prefill_energy_j / analytic.prefill_energy_j < 10
    empty = StepShape.from_requests([("idle", 0, 0, 10)])
    assert predictor.predict_step(empty).energy_j == pytest.approx(AnalyticPredictor(model, hw).predict_step(empty).energy_j)


def test_load_predictor_gnn_degrades_to_analytic_with_one_warning() -> None:
    """An architecture the graph builder rejects: load_predictor("gnn") still works, warns once, predicts analytically."""
    from llmco2_vllm.predict.deployment import Deployment
    from llmco2_vllm.predict.predictor import AnalyticPredictor, load_predictor

    unsupported = dataclasses.replace(load_model(MLA_MOE_SHARED), sliding_window=4096, num_sliding_window_layers=4)
    steps = (MIXED, StepShape.static_batch_decode(8, 1000), StepShape.static_batch_prefill(2, 512))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = load_predictor("gnn", Deployment("unsupported", unsupported, hardware(8)))
        got = [predictor.predict_step(step) for step in steps]
    fallback_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(fallback_warnings) == 1, [str(w.message) for w in caught]
    assert "sliding-window" in str(fallback_warnings[0].message) and "analytic" in str(fallback_warnings[0].message)
    assert predictor.name == "analytic-fallback" and predictor.is_fallback and "sliding-window" in predictor.fallback_reason
    analytic = AnalyticPredictor(unsupported, hardware(8))
    for step, prediction in zip(steps, got):
        want = analytic.predict_step(step)
        assert prediction.energy_j == want.energy_j and prediction.seconds == want.seconds


def test_step_failure_after_start_falls_back_per_step_with_one_warning() -> None:
    """A step whose graph cannot be built (fault injected into the real builder) is predicted analytically."""
    predictor = GnnPredictor(load_model(DENSE_GQA), hardware(1), checkpoint=_perturbed_ensemble(1))
    assert not predictor.is_fallback
    healthy = predictor.predict_step(MIXED)

    def broken_build(step, hf_transformers=False):
        raise FloatingPointError("injected")

    predictor.builder.build = broken_build
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = predictor.predict_step(MIXED)
        predictor.predict_step(StepShape.static_batch_decode(2, 64))
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert predictor.fallback_steps == 2 and "injected" in predictor.fallback_reason
    from llmco2_vllm.predict.predictor import AnalyticPredictor

    assert first.energy_j == AnalyticPredictor(load_model(DENSE_GQA), hardware(1)).predict_step(MIXED).energy_j
    assert first.energy_j != healthy.energy_j  # the perturbed GNN did change the healthy prediction


def test_distilled_table_matches_gnn_on_its_grid_and_fast_path_tracks_full_forecast() -> None:
    from llmco2_vllm.predict.forecast import forecast_static_batch
    from llmco2_vllm.predict.gnn.model import DISTIL_BATCH_SIZES, DISTIL_DECODE_CONTEXTS, DISTIL_PREFILL_TOKENS

    predictor = GnnPredictor(load_model(DENSE_GQA), hardware(1), checkpoint=_perturbed_ensemble(2))
    table = predictor.distilled
    for b, t in ((DISTIL_BATCH_SIZES[0], DISTIL_PREFILL_TOKENS[2]), (DISTIL_BATCH_SIZES[4], DISTIL_PREFILL_TOKENS[-1])):
        logs, _ = predictor._member_logs(StepShape.static_batch_prefill(b, t))
        assert table.log_factor(0, b, t) == pytest.approx(float(logs.mean(0)[0]), abs=1e-5)
    for b, t in ((DISTIL_BATCH_SIZES[-1], DISTIL_DECODE_CONTEXTS[0]), (DISTIL_BATCH_SIZES[3], DISTIL_DECODE_CONTEXTS[3])):
        logs, _ = predictor._member_logs(StepShape.static_batch_decode(b, t))
        assert table.log_factor(1, b, t) == pytest.approx(float(logs.mean(0)[1]), abs=1e-5)
    # clamped outside the grid, never extrapolated
    assert table.log_factor(1, 10_000, 10**7) == table.log_factor(1, DISTIL_BATCH_SIZES[-1], DISTIL_DECODE_CONTEXTS[-1])
    # the fast path is the analytic closed form times the two phase factors
    b, p, o = 8, 700, 300
    analytic = predictor.analytic.roofline.static_batch(b, p, o)
    fast = predictor.static_batch(b, p, o)
    assert fast[1] / analytic[1] == pytest.approx(math.exp(table.log_factor(0, b, p)))
    assert fast[3] / analytic[3] == pytest.approx(math.exp(table.log_factor(1, b, p + (o - 2) / 2)))
    full = forecast_static_batch(predictor, b, p, o)
    assert fast[1] + fast[3] == pytest.approx(full.energy_j, rel=0.05)


def test_fast_path_of_a_fallback_predictor_is_the_analytic_closed_form() -> None:
    unsupported = dataclasses.replace(load_model(MLA_MOE_SHARED), sliding_window=4096, num_sliding_window_layers=4)
    with pytest.warns(RuntimeWarning):
        predictor = GnnPredictor(unsupported, hardware(8))
    assert predictor.distilled is None
    assert predictor.static_batch(4, 300, 100) == predictor.analytic.roofline.static_batch(4, 300, 100)


def test_unseen_hardware_shrinks_the_correction_and_widens_the_interval(tmp_path) -> None:
    from llmco2_vllm.predict.gnn.model import hardware_signature

    ensemble = _perturbed_ensemble(2)
    ensemble.training_hardware = [hardware_signature(find_gpu("H100-SXM5-80GB"))]
    ensemble.unseen_hardware_scale, ensemble.unseen_residual_quantiles = 0.5, (-0.6, 0.7)
    path = tmp_path / "gnn.safetensors"
    ensemble.save(path)
    loaded = GnnEnsemble.load(path)
    assert loaded.training_hardware == ensemble.training_hardware
    assert (loaded.unseen_hardware_scale, loaded.unseen_residual_quantiles) == (0.5, (-0.6, 0.7))

    model = load_model(DENSE_GQA)
    step = StepShape.static_batch_decode(16, 900)
    seen = GnnPredictor(model, hardware(1, "H100-SXM5-80GB"), checkpoint=loaded)
    assert seen.correction_scale == 1.0 and not seen.unseen_hardware
    unseen = GnnPredictor(model, hardware(1, "A100-SXM4-80GB"), checkpoint=loaded)
    assert unseen.correction_scale == 0.5 and unseen.unseen_hardware
    loaded.training_hardware = []  # no record of training GPUs: full correction everywhere
    full = GnnPredictor(model, hardware(1, "A100-SXM4-80GB"), checkpoint=loaded)
    assert full.correction_scale == 1.0
    pred, low, high = unseen.predict_step_interval(step)
    reference = full.predict_step(step)
    analytic = full.analytic.predict_step(step)
    assert math.log(pred.decode_energy_j / analytic.decode_energy_j) == pytest.approx(
        0.5 * math.log(reference.decode_energy_j / analytic.decode_energy_j), rel=1e-5)
    assert low <= pred.energy_j * math.exp(-0.6) * 1.0001 and high >= pred.energy_j * math.exp(0.7) * 0.9999
    # the distilled fast path carries the same scale
    b, p, o = 16, 900, 2
    assert unseen.static_batch(b, p, o)[1] / unseen.analytic.roofline.static_batch(b, p, o)[1] == pytest.approx(
        math.exp(unseen.distilled.log_factor(0, b, p)))
    assert unseen.distilled.log_factor(0, b, p) == pytest.approx(0.5 * full.distilled.log_factor(0, b, p), rel=1e-6)
