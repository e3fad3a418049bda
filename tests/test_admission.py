"""Admission decisions, the per-request result store and request forecasts (no vLLM needed)."""

from __future__ import annotations

import numpy as np
import pytest

from llmco2_vllm import baselines
from llmco2_vllm.admission import ADMITTED, DEFERRED, REJECTED, AdmissionLimits, decide, parse_deferrable
from llmco2_vllm.forecast import ANALYTIC_RATIO_RANGE, RequestForecaster, estimate_output_tokens
from llmco2_vllm.hardware import Hardware, find_gpu
from llmco2_vllm.measurements import load_measurements
from llmco2_vllm.model_description import load_model
from llmco2_vllm.predictor import AnalyticPredictor
from llmco2_vllm.request_results import RequestActual, RequestResultStore, client_request_id
from llmco2_vllm.vllm_endpoints import RequestShapeError, request_shape

LIMITS = AdmissionLimits(max_request_grams=1.0, budget_grams=10.0, budget_window_seconds=60.0, defer_above_intensity=300.0)


def test_cap_rejects_above_and_admits_below():
    assert decide(LIMITS, 0.5, 100.0, 0.0, None, may_wait=False).decision == ADMITTED
    rejected = decide(LIMITS, 1.5, 100.0, 0.0, None, may_wait=True)
    assert (rejected.decision, rejected.policy) == (REJECTED, "cap")
    assert rejected.retry_after_seconds > 0 and rejected.numbers["cap_grams_co2e"] == 1.0


def test_budget_rejects_with_retry_after_or_defers_when_allowed():
    rejected = decide(LIMITS, 0.5, 100.0, 9.8, oldest_spend_age_seconds=45.0, may_wait=False)
    assert (rejected.decision, rejected.policy) == (REJECTED, "budget")
    assert rejected.retry_after_seconds == pytest.approx(15.0)  # the oldest spend leaves the window
    assert decide(LIMITS, 0.5, 100.0, 9.8, 45.0, may_wait=True).decision == DEFERRED
    assert decide(LIMITS, 0.5, 100.0, 9.4, 45.0, may_wait=False).decision == ADMITTED
    whole = AdmissionLimits(budget_grams=1.0, budget_window_seconds=60.0)
    assert decide(whole, 2.0, 100.0, 0.0, None, may_wait=True).decision == REJECTED  # can never fit: no waiting


def test_intensity_defers_only_deferrable_requests():
    assert decide(LIMITS, 0.5, 400.0, 0.0, None, may_wait=False).decision == ADMITTED
    deferred = decide(LIMITS, 0.5, 400.0, 0.0, None, may_wait=True)
    assert (deferred.decision, deferred.policy) == (DEFERRED, "intensity")
    assert decide(LIMITS, 0.5, 200.0, 0.0, None, may_wait=True).decision == ADMITTED
    assert decide(AdmissionLimits(), 1e9, 1e4, 1e9, None, may_wait=True).decision == ADMITTED  # all off
    with pytest.raises(ValueError):
        decide(LIMITS, float("nan"), 100.0, 0.0, None, may_wait=False)


def test_deferrable_header():
    assert parse_deferrable(None, 600) == 0
    assert parse_deferrable("false", 600) == 0
    assert parse_deferrable("true", 600) == 600
    assert parse_deferrable("30", 600) == 30
    assert parse_deferrable("9000", 600) == 600
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ValueError, match="X-Llmco2-Deferrable"):
            parse_deferrable(bad, 600)


def test_client_request_id_from_vllm_engine_ids():
    assert client_request_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc"
    assert client_request_id("2_cmpl-abc-1-1a2b3c4d") == "cmpl-abc"
    assert client_request_id("chatcmpl-x-y-1a2b3c4d") == "chatcmpl-x-y"
    assert client_request_id("cmpl-my-id-7-0-deadbeef") == "cmpl-my-id-7"


def _actual(engine_id: str, decode_tokens: int, grams: float, at: float) -> RequestActual:
    return RequestActual(engine_id, 10, 2, decode_tokens, decode_tokens + 1, 1.0, 2.0, 3.3, grams, grams / 10, at)


def test_store_sums_fanned_out_parts_and_budget_spend(tmp_path):
    store = RequestResultStore.in_directory(tmp_path)
    store.record_forecast("cmpl-a", {"max_tokens": 8}, grams=5.0, parts=2, now=1000.0)
    assert store.get("cmpl-a")["status"] == "running" and store.get("cmpl-a")["actual"] is None
    assert store.spent_grams(since=0) == pytest.approx(5.0)  # reserved by the forecast while running
    store.record_actuals([_actual("0_cmpl-a-0-1a2b3c4d", 3, 1.0, 1001.0)])
    assert store.get("cmpl-a")["status"] == "running"  # one of two parts finished
    assert store.spent_grams(since=0) == pytest.approx(5.0)  # max(forecast, actual so far)
    store.record_actuals([_actual("1_cmpl-a-0-1a2b3c4d", 4, 1.0, 1002.0)])
    result = RequestResultStore(store.path).get("cmpl-a")  # another process sees the same rows
    assert result["status"] == "finished"
    assert result["actual"]["output_tokens"] == 3 + 4 + 2  # the first token of each part comes from prefill
    assert result["actual"]["energy_j"] == pytest.approx(6.0)
    assert result["actual"]["grams_co2e"] == pytest.approx(2.2)
    assert store.spent_grams(since=0) == pytest.approx(2.2)
    assert store.spent_grams(since=1000.5) == 0.0
    store.record_actuals([_actual("chatcmpl-b-1a2b3c4d", 5, 0.5, 2000.0)])  # not forecast (offline path)
    assert store.get("chatcmpl-b")["status"] == "finished" and store.get("chatcmpl-b")["forecast"] is None
    assert store.recent_output_tokens() == [(4, 8)]  # per part, forecast rows only
    assert store.delete_older_than(1500.0) == 1 and store.get("cmpl-a") is None


def test_output_length_learned_from_recent_requests():
    assert estimate_output_tokens(100, []) == estimate_output_tokens(100, [(50, 100)] * 3)  # too few: max_tokens
    assert estimate_output_tokens(100, []).expected == 100
    learned = estimate_output_tokens(200, [(n, 100) for n in range(1, 101)])
    assert learned.source == "learned"
    assert learned.low < learned.expected < learned.high <= 200
    assert learned.expected == pytest.approx(100, abs=4)  # half of max_tokens, like the history


def test_analytic_ratio_range_matches_the_real_measurements():
    ratios = [row["energy_j"] / baselines.analytic(row) for row in load_measurements()]
    low, high = np.quantile(ratios, [0.1, 0.9])
    assert (low, high) == pytest.approx(ANALYTIC_RATIO_RANGE, abs=0.01)


def _forecaster() -> RequestForecaster:
    model = load_model("meta-llama/Llama-3.1-8B-Instruct")
    predictor = AnalyticPredictor(model, Hardware(find_gpu("H100"), 1, 1, "configured"))
    return RequestForecaster(predictor, num_gpus=1, embodied_grams_per_gpu_second=0.0037, pue=1.2)


def test_request_forecast_scales_with_load_parts_and_intensity():
    forecaster = _forecaster()
    alone = forecaster.forecast(500, 200, grams_co2e_per_kwh=400.0)
    assert alone.energy_j_low < alone.energy_j < alone.energy_j_high
    assert alone.grams_co2e_low < alone.grams_co2e < alone.grams_co2e_high
    assert alone.operational_grams_co2e == pytest.approx(alone.energy_j / 3.6e6 * 1.2 * 400.0)
    assert alone.embodied_grams_co2e == pytest.approx(alone.seconds * 0.0037)
    busy = forecaster.forecast(500, 200, grams_co2e_per_kwh=400.0, running_requests=31)
    assert busy.concurrent_requests == 32 and busy.energy_j < alone.energy_j / 4  # weights shared by the batch
    two = forecaster.forecast(500, 200, grams_co2e_per_kwh=400.0, parts=2)
    assert two.energy_j == pytest.approx(2 * forecaster.forecast(500, 200, 400.0, running_requests=1).energy_j)
    clean = forecaster.forecast(500, 200, grams_co2e_per_kwh=40.0)
    assert clean.operational_grams_co2e == pytest.approx(alone.operational_grams_co2e / 10)
    calibrated = forecaster.forecast(500, 200, 400.0, scales=(2.0, 2.0), relative_error=0.05)
    assert calibrated.energy_j == pytest.approx(2 * alone.energy_j)
    assert calibrated.energy_j_high == pytest.approx(calibrated.energy_j * 1.05)


def test_request_shape_reads_openai_bodies_and_rejects_bad_ones():
    shape = request_shape({"prompt": [[1, 2, 3], [4, 5, 6, 7, 8]], "max_tokens": 5, "n": 2}, False, None, 256)
    assert (shape.prompt_tokens, shape.max_tokens, shape.parts, shape.prompt_tokens_estimated) == (4, 5, 4, False)
    assert request_shape({"prompt": "x" * 40}, False, None, 256).prompt_tokens == 10  # no tokenizer: ~4 chars/token
    chat = request_shape({"messages": [{"role": "user", "content": "hello"}]}, True, None, 256)
    assert chat.max_tokens == 256 - chat.prompt_tokens
    assert request_shape({"prompt_tokens": 100, "max_tokens": 50}, False, None, 256).parts == 1
    for bad, message in (
        ({}, "give prompt"),
        ({"prompt_tokens": -3, "max_tokens": 5}, "prompt_tokens must be between"),
        ({"prompt_tokens": "12", "max_tokens": 5}, "whole number"),
        ({"prompt_tokens": 10, "max_tokens": 10**9}, "max_tokens must be between"),
        ({"prompt_tokens": 200, "max_tokens": 100}, "exceeds the model's context"),
        ({"prompt": [1, "a"]}, "prompt must be|each prompt"),
        ([1, 2], "JSON object"),
    ):
        with pytest.raises(RequestShapeError, match=message):
            request_shape(bad, False, None, 256)
