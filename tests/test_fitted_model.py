"""The fitted time and power model: measured serving rows, step terms, fitting, the plugin's predictor."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from llmco2_vllm.predict import fitted
from llmco2_vllm.predict.fitted import FitRow, FittedModel, FittedPredictor, prior_model, shipped_model
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.predictor import StepPredictor, load_predictor
from llmco2_vllm.predict.serving_evaluation import EvaluationData, schemes
from llmco2_vllm.predict.serving_measurements import (
    build_serving_measurements,
    load_serving_measurements,
    running_age,
)
from llmco2_vllm.predict.step_shape import StepShape
from llmco2_vllm.predict.step_terms import TERM_INDEX, StepTerms

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
H100 = find_gpu("H100")


# --- measured rows ------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "mlenergy_v3_h100.csv").is_file(), reason="shared reference data not beside the checkout")
def test_packaged_rows_are_rebuilt_from_the_shared_data() -> None:
    rebuilt, _ = build_serving_measurements(SHARED_DATA)
    packaged = load_serving_measurements()
    assert len(rebuilt) == len(packaged) == 507
    for new, old in zip(rebuilt, packaged):
        assert new.row_id == old.row_id and new.source_url == old.source_url
        assert new.step_seconds == pytest.approx(old.step_seconds, rel=1e-6)
        assert new.energy_per_request_j == pytest.approx(old.energy_per_request_j, rel=1e-6)


def test_rows_are_consistent_measurements() -> None:
    for row in load_serving_measurements():
        # energy per request = power x time per token x tokens per request, both as published
        per_token = row.power_watts * row.step_seconds / row.batch_size
        assert per_token == pytest.approx(row.energy_per_token_j, rel=0.05), row.row_id
        assert row.prompt_assumed and row.prompt_tokens > 0 and row.source_url.startswith("https://")
        assert row.num_gpus == row.tensor_parallel * row.pipeline_parallel * row.data_parallel


def test_running_age_weighs_long_requests() -> None:
    # Every request the same length L: the batch holds requests of every age 0..L-1, mean ~L/2 (the
    # quantile function's ramp from 1 to p10 over the shortest tenth adds a little spread).
    assert running_age(400, 400, 400, 400) == pytest.approx(200, rel=0.1)
    # Same mean, a long tail: long requests stay longer, so the running batch is older than L/2.
    assert running_age(400, 40, 250, 900) > running_age(400, 380, 400, 420) * 1.3
    # E[L^2] / (2 E[L]) by hand for the piecewise-linear quantile function through these points:
    # (0,1) (0.1,100) (0.5,300) (0.9,500) (1,max) with the mean 330 -> max = 2*(330 - 0.1*101/2
    # - 0.4*400/2 - 0.4*800/2)/0.1 - 500 = 1199.
    segments = [(0.1, 1, 100), (0.4, 100, 300), (0.4, 300, 500), (0.1, 500, 1199)]
    first = sum(w * (a + b) / 2 for w, a, b in segments)
    second = sum(w * (a * a + a * b + b * b) / 3 for w, a, b in segments)
    assert first == pytest.approx(330)
    assert running_age(330, 100, 300, 500) == pytest.approx(second / first / 2)


# --- step terms ------------------------------------------------------------------------------------


def test_decode_step_terms_by_hand() -> None:
    """Llama-3.1-8B on one H100, 16 sequences decoding at context 1000: bytes and FLOPs by hand."""
    model = load_model(LLAMA_8B)
    terms = StepTerms(model, H100)
    step = StepShape.static_batch_decode(16, 1000)
    t = terms.from_sums(terms.step_sums(step))
    bandwidth, peak = 3.35e12, 989.4e12
    h, layers, vocab, inter = 4096, 32, 128256, 14336
    attention = 2 * h * 32 * 128 + 2 * h * 8 * 128
    mlp = 3 * h * inter
    layer_params = layers * (attention + mlp)
    assert t[TERM_INDEX["dense_weights_16bit"]] == pytest.approx((layer_params + vocab * h) * 2 / bandwidth)
    assert t[TERM_INDEX["dense_compute_16bit"]] == pytest.approx((2 * layer_params * 16 + 2 * vocab * h * 16) / peak)
    kv_per_token = layers * 2 * 8 * 128 * 2
    assert t[TERM_INDEX["kv_read"]] == pytest.approx(16 * 1001 * kv_per_token / bandwidth)
    assert t[TERM_INDEX["attention_compute"]] == pytest.approx(16 * 1001 * layers * 4 * 32 * 128 / peak)
    assert t[TERM_INDEX["sequences"]] == 16 and t[TERM_INDEX["step"]] == 1 and t[TERM_INDEX["allreduce_calls"]] == 0
    assert np.allclose(terms.decode_sums(16, 1000), terms.step_sums(step))


def test_tensor_parallel_shards_weights_and_adds_all_reduces() -> None:
    model = load_model("meta-llama/Llama-3.1-70B-Instruct")
    one, four = StepTerms(model, H100, 1), StepTerms(model, H100, 4)
    sums = one.decode_sums(64, 500)
    t1, t4 = one.from_sums(sums), four.from_sums(sums)
    assert t4[TERM_INDEX["dense_weights_16bit"]] == pytest.approx(t1[TERM_INDEX["dense_weights_16bit"]] / 4)
    assert t4[TERM_INDEX["allreduce_calls"]] == 2 * 80 and t1[TERM_INDEX["allreduce_calls"]] == 0
    assert t4[TERM_INDEX["allreduce_bytes"]] > 0


def test_quantised_and_hybrid_models_use_their_own_terms() -> None:
    oss = StepTerms(load_model("openai/gpt-oss-120b"), H100).from_sums(np.array([8, 8, 8, 8000, 1000, 8000, 1000]))
    assert oss[TERM_INDEX["expert_weights_4bit"]] > 0 and oss[TERM_INDEX["expert_weights_16bit"]] == 0
    fp8 = StepTerms(load_model("meta-llama/Llama-3.1-405B-Instruct-FP8"), H100, 8)
    t = fp8.from_sums(fp8.decode_sums(8, 100))
    assert t[TERM_INDEX["dense_weights_8bit"]] > 0 and t[TERM_INDEX["dense_compute_8bit"]] > 0
    nemotron = StepTerms(load_model("nvidia/NVIDIA-Nemotron-Nano-12B-v2"), H100)
    t = nemotron.from_sums(nemotron.decode_sums(8, 100))
    assert t[TERM_INDEX["mamba"]] > 0


def test_kv_cache_capacity_bounds_the_running_context() -> None:
    terms = StepTerms(load_model(LLAMA_8B), H100)
    # 80 GB x 0.9 - 8.03 B bf16 weights - 4 GB reserve, 128 KiB of K/V per token
    capacity = (0.9 * 80e9 - 8.03e9 * 2 - 4e9) / (32 * 2 * 8 * 128 * 2)
    assert terms.kv_capacity_tokens == pytest.approx(capacity, rel=0.01)
    short = terms.serving_sums(64, 200, 400, 300)
    long = terms.serving_sums(64, 200, 40000, 30000)
    assert short[3] == pytest.approx(64 * 501 + 64 / 400 * 200)
    assert long[3] <= capacity + 64 / 40000 * 200 + 1


def test_serving_steps_prefill_whole_prompts_and_average_to_the_mean_step() -> None:
    qwen = StepTerms(load_model("Qwen/Qwen3-30B-A3B-Instruct-2507"), H100)
    for batch, output in ((8.0, 250.0), (750.0, 250.0), (64.0, 32.0)):
        sums, shares = qwen.serving_steps(batch, 1500, output, output / 2)
        joining = batch / output
        assert shares.sum() == pytest.approx(1.0) and np.all(shares > 0)
        # The steps' mean is the mean step; each step prefills a whole number of prompts.
        assert sums @ shares == pytest.approx(qwen.serving_sums(batch, 1500, output, output / 2))
        prompts = (sums[1] - batch) / 1500
        assert np.allclose(prompts, np.round(prompts)) and prompts.min() == math.floor(joining)
    # Few prompts join: most steps only decode and touch far fewer experts than the mean step would.
    sums, shares = qwen.serving_steps(8.0, 1500, 250.0, 125.0)
    touched = qwen.basis(sums)[-1] @ shares
    assert touched < 0.6 * qwen.basis(qwen.serving_sums(8.0, 1500, 250.0, 125.0))[-1]


def test_a_serving_row_is_predicted_as_the_mean_of_its_steps() -> None:
    row = next(m for m in load_serving_measurements("mlenergy_v3") if m.task == "sourcegraph-fim")
    fit_row = fitted.fit_row(row, load_model)
    step_terms, shares = fit_row.steps()
    assert step_terms.shape[1] == 2 and fit_row.terms == pytest.approx(step_terms @ shares)
    model = shipped_model().for_model(row.model)  # with that model's own factors, as predict_serving
    parts = model.time_parts(step_terms, row.software)
    power = model.power_watts(fit_row.gpu, *parts, software=row.software)
    predicted = fitted.predict_serving(shipped_model(), [fit_row], [row])
    assert predicted["step_seconds"][0] == pytest.approx(shares @ parts[0])
    assert predicted["power_watts"][0] == pytest.approx(shares @ (power * parts[0]) / (shares @ parts[0]) * row.num_gpus)


# --- fitting -------------------------------------------------------------------------------------------


def _synthetic_rows(truth: FittedModel, count: int = 120, energy_factors: dict[str, float] | None = None) -> list[FitRow]:
    """Rows whose 'measured' time and power come from ``truth`` (a model unlike the prior in shape);
    ``energy_factors``: models whose measured power is that much above the truth's."""
    rng = np.random.default_rng(0)
    rows = []
    for model_id, gpus in ((LLAMA_8B, 1), ("Qwen/Qwen3-30B-A3B-Instruct-2507", 1), ("meta-llama/Llama-3.1-70B-Instruct", 4)):
        terms = StepTerms(load_model(model_id), H100, gpus)
        for _ in range(count // 3):
            batch, prompt, output = rng.integers(4, 500), rng.integers(50, 2000), rng.integers(50, 3000)
            t = terms.from_sums(terms.serving_sums(float(batch), float(prompt), float(output), output * 0.8))
            parts = truth.time_parts(t[:, None])
            power = float(truth.power_watts(H100, *parts)[0]) * (energy_factors or {}).get(model_id, 1.0)
            rows.append(FitRow(t, fitted.NEWEST_SOFTWARE, H100, float(parts[0][0]), power, model=model_id))
    return rows


def test_a_model_keeps_its_own_energy_offset_and_only_that_model_gets_it() -> None:
    """One model draws 20 % more than the shared fit can explain: its own factor takes it (not its
    time), the others stay near 1, and every way of predicting that model applies it."""
    rows = _synthetic_rows(prior_model(), energy_factors={LLAMA_8B: 1.2})
    model = fitted.fit(rows, prior_strength=1.0)
    time_factor, power_factor = model.model_factors[LLAMA_8B]
    assert time_factor == 1.0 and power_factor > 1.1
    assert all(abs(p - 1) < abs(power_factor - 1) / 2 for name, (_, p) in model.model_factors.items() if name != LLAMA_8B)
    llama = [r for r in rows if r.model == LLAMA_8B]
    with_factor = fitted._predict_rows(model.for_model(LLAMA_8B), llama)
    without = fitted._predict_rows(model.for_model("another model"), llama)
    assert np.allclose(with_factor[0], without[0])  # the time is the shared fit's
    measured = np.array([r.power_watts_per_gpu * r.step_seconds for r in llama])
    error = lambda predicted: np.median(np.abs(predicted[0] * predicted[1] / measured - 1))  # noqa: E731
    assert error(with_factor) < error(without) / 2
    # Kept in the model file; the plugin's predictor for that model applies it.
    assert FittedModel.from_json(model.to_json()).model_factors == model.model_factors
    hardware = Hardware(H100, 1, 1, "configured")
    step = StepShape.from_requests([("a", 0, 1, 500)] * 8)
    for_llama = FittedPredictor(load_model(LLAMA_8B), hardware, parameters=model).predict_step(step)
    shared = FittedPredictor(load_model(LLAMA_8B), hardware, parameters=dataclasses.replace(model, model_factors={})).predict_step(step)
    assert for_llama.decode_seconds == pytest.approx(shared.decode_seconds) and for_llama.decode_energy_j > 1.05 * shared.decode_energy_j
    # Served from a local directory of the same name: the same model.
    local = dataclasses.replace(load_model(LLAMA_8B), name="/models/llama-3.1-8b-instruct/")
    assert FittedPredictor(local, hardware, parameters=model).predict_step(step).decode_energy_j == for_llama.decode_energy_j
    assert fitted.factors_for(model.model_factors, "someone/Llama-3.1-8B-Instruct-abliterated") is None


def test_fit_recovers_a_synthetic_truth() -> None:
    truth = prior_model()
    truth.parameters.update({"dense_weight_factor": 1.6, "kv_factor": 2.0, "sequence_seconds@vllm-0.11.1": 60e-6,
                             "step_seconds@vllm-0.11.1": 4e-3, "compute_activity": 0.7, "memory_activity": 0.9})
    rows = _synthetic_rows(truth)
    model = fitted.fit(rows, prior_strength=1e-4)
    seconds = model.step_seconds(np.stack([r.terms for r in rows], axis=1))
    assert np.allclose(seconds, [r.step_seconds for r in rows], rtol=0.02)
    assert model.parameters["sequence_seconds@vllm-0.11.1"] == pytest.approx(60e-6, rel=0.15)
    parts = model.time_parts(np.stack([r.terms for r in rows], axis=1))
    assert np.allclose(model.power_watts(H100, *parts), [r.power_watts_per_gpu for r in rows], rtol=0.02)
    # The prior alone is far off in shape (per-sequence cost): the fit is what matches.
    prior_seconds = prior_model().step_seconds(np.stack([r.terms for r in rows], axis=1))
    assert np.median(np.abs(prior_seconds / seconds - 1)) > 0.1


def test_unknown_software_uses_the_newest_measured_version() -> None:
    model = prior_model(("vllm-0.5.4", "vllm-0.11.1"))
    model.parameters["step_seconds@vllm-0.5.4"] = 0.01
    terms = StepTerms(load_model(LLAMA_8B), H100).from_sums(np.array([8, 8, 8, 8000, 0, 8000, 0]))[:, None]
    assert model.step_seconds(terms, "vllm-0.33.0") == model.step_seconds(terms, "vllm-0.11.1")
    assert model.step_seconds(terms, "vllm-0.5.4") > model.step_seconds(terms, "vllm-0.11.1")


def test_shipped_model_is_the_fit_on_every_row() -> None:
    """`llmco2 eval` writes the shipped parameters: a refit on the packaged rows, with the prior
    strength its leave-one-model-out chose (in the model's notes), reproduces them."""
    data = EvaluationData.load()
    strength = shipped_model().notes["prior_strength"]
    assert strength in fitted.PRIOR_STRENGTHS
    refit = fitted.fit(data.rows, strength)
    for name, value in shipped_model().parameters.items():
        assert refit.parameters[name] == pytest.approx(value, rel=1e-3), name
    assert set(refit.model_factors) == set(shipped_model().model_factors) == {m.model for m in data.measurements}
    for name, factors in shipped_model().model_factors.items():
        assert refit.model_factors[name] == pytest.approx(factors, rel=1e-3), name
    low, middle, high = shipped_model().energy_log_quantiles
    assert low < middle < high


def test_cross_validation_folds_never_train_on_what_they_test() -> None:
    data = EvaluationData.load()
    ms = data.measurements
    assert not data.skipped, data.skipped[:3]
    by_name = {scheme.name: scheme for scheme in schemes(data)}
    for label, train, test in by_name["leave-one-model-out (v3, H100)"].folds:
        assert test and {ms[i].model for i in test} == {label} and label not in {ms[i].model for i in train}
    for label, train, test in by_name["leave-one-GPU-out (v2, A100 <-> H100)"].folds:
        assert test and label not in {ms[i].gpu for i in train}
    for scheme in ("version transfer v2 -> v3", "version transfer v3 -> v2"):
        (_, train, test), = by_name[scheme].folds
        assert {ms[i].dataset for i in train}.isdisjoint({ms[i].dataset for i in test})


# --- the plugin's predictor ---------------------------------------------------------------------------


def _predictor(model_id: str = LLAMA_8B, tp: int = 1) -> FittedPredictor:
    return FittedPredictor(load_model(model_id), Hardware(H100, tp, tp, "configured"))


def test_fitted_predictor_is_the_default_and_a_step_predictor() -> None:
    from llmco2_vllm.predict.deployment import Deployment
    from llmco2_vllm.settings import Settings

    assert Settings().predictor == "fitted"
    predictor = load_predictor("fitted", Deployment(LLAMA_8B, load_model(LLAMA_8B), Hardware(H100, 1, 1, "configured")))
    assert isinstance(predictor, StepPredictor) and predictor.name == "fitted"


def test_step_prediction_splits_the_fitted_totals() -> None:
    predictor = _predictor()
    step = StepShape.from_requests([("a", 300, 0, 0), ("b", 0, 1, 900), ("c", 0, 1, 20), ("d", 50, 0, 200)])
    prediction = predictor.predict_step(step)
    seconds, energy = predictor.step_seconds_and_energy(predictor.terms.step_sums(step))
    assert prediction.seconds == pytest.approx(float(seconds)) and prediction.energy_j == pytest.approx(float(energy))
    assert prediction.prefill_energy_j > 0 and prediction.decode_energy_j > 0
    assert prediction.request_prefill_weights.sum() == pytest.approx(1.0)
    assert prediction.request_decode_weights.sum() == pytest.approx(1.0)
    # Energy over time: an H100's average power, between idle and TDP.
    assert H100.idle_watts < prediction.energy_j / prediction.seconds < H100.tdp_watts


def test_static_batch_closed_form_equals_the_step_by_step_sum() -> None:
    for model_id in (LLAMA_8B, "google/gemma-3-27b-it"):  # gemma-3: the sliding-window kink
        predictor = _predictor(model_id)
        prefill_s, prefill_j, decode_s, decode_j = predictor.static_batch(8, 700, 600)
        steps = [predictor.predict_step(StepShape.static_batch_decode(8, c)) for c in range(700, 700 + 599)]
        first = predictor.predict_step(StepShape.static_batch_prefill(8, 700))
        assert prefill_j == pytest.approx(first.energy_j) and prefill_s == pytest.approx(first.seconds)
        assert decode_j == pytest.approx(sum(s.energy_j for s in steps), rel=2e-3)
        assert decode_s == pytest.approx(sum(s.seconds for s in steps), rel=2e-3)


def test_interval_holds_the_point_and_widens_for_approximate_architectures() -> None:
    exact = _predictor()
    low, high = exact.ratio_range
    assert low < 1.0 < high
    approximate = FittedPredictor(
        dataclasses.replace(load_model(LLAMA_8B), approximation="test: parameter-count estimate"),
        Hardware(H100, 1, 1, "configured"),
    )
    assert approximate.ratio_range[0] < low and approximate.ratio_range[1] > high
    assert math.log(approximate.ratio_range[1]) == pytest.approx(2 * math.log(high))


def test_step_sums_from_the_roofline_basis_equal_the_direct_ones() -> None:
    """predict_step reads the step's sums off the roofline's basis; StepTerms.step_sums computes them directly."""
    for model_id in ("openai/gpt-oss-120b", "nvidia/NVIDIA-Nemotron-Nano-12B-v2", LLAMA_8B):
        predictor = _predictor(model_id, tp=2)
        step = StepShape.from_requests([("a", 300, 0, 0), ("b", 0, 1, 900), ("c", 0, 4, 20), ("d", 50, 0, 2000)])
        seconds, energy = predictor.step_seconds_and_energy(predictor.terms.step_sums(step))
        prediction = predictor.predict_step(step)
        assert prediction.seconds == pytest.approx(float(seconds), rel=1e-12)
        assert prediction.energy_j == pytest.approx(float(energy), rel=1e-12)


def test_closed_form_sums_equal_the_step_sums() -> None:
    for model_id in ("openai/gpt-oss-120b", LLAMA_8B):
        terms = StepTerms(load_model(model_id), H100)
        for prompt in (1, 100, 5000):
            assert np.allclose(terms.prefill_sums(3, prompt), terms.step_sums(StepShape.static_batch_prefill(3, prompt)))
        contexts = np.array([0.0, 50.0, 127.0, 128.0, 3000.0])
        together = terms.decode_sums(5, contexts)
        for column, context in enumerate(contexts):
            assert np.allclose(together[:, column], terms.step_sums(StepShape.static_batch_decode(5, int(context))))


def test_a_phase_without_tokens_costs_nothing_and_never_rounds_below_zero():
    """Prefill-only steps: the prefill phase's share of the fixed costs sums to 1 in floats, and once
    rounded past it the decode phase came out at -1e-16 J, which Prometheus refused as a counter
    increment (it ended the accounting worker in a burst of new requests)."""
    predictor = _predictor()
    rng = np.random.default_rng(0)
    for n in range(1, 65):
        prompts = rng.integers(1, 60, n)
        zeros = np.zeros(n, dtype=np.int64)
        step = StepShape.unchecked(tuple(f"r{i}" for i in range(n)), prompts, zeros, zeros, zeros, 0.01)
        prediction = predictor.predict_step(step)
        assert 0.0 <= prediction.decode_seconds < 1e-12 * prediction.prefill_seconds, n
        assert 0.0 <= prediction.decode_energy_j < 1e-12 * prediction.prefill_energy_j, n
        assert prediction.prefill_seconds > 0 and prediction.prefill_energy_j > 0
