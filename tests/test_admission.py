"""Admission decisions, the per-request result store and request forecasts (no vLLM needed)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import types

import numpy as np
import pytest
from prometheus_client import REGISTRY

from llmco2_vllm.carbon.intensity import GridIntensity
from llmco2_vllm.carbon.static import StaticIntensity
from llmco2_vllm.plugin.http_endpoints import AdmissionMiddleware
from llmco2_vllm.predict import baselines
from llmco2_vllm.predict.forecast import (
    ANALYTIC_RATIO_RANGE,
    ForecastLearner,
    ForecastOutcome,
    RequestForecaster,
    estimate_output_tokens,
)
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.measurements import load_measurements
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.predictor import AnalyticPredictor
from llmco2_vllm.serve.admission import ADMITTED, DEFERRED, REJECTED, AdmissionLimits, decide, parse_deferrable
from llmco2_vllm.serve.carbon_service import CarbonService
from llmco2_vllm.serve.request_parsing import RequestShapeError, request_shape
from llmco2_vllm.serve.request_record import FinishedRequest, client_request_id
from llmco2_vllm.serve.results_store import RequestResultStore
from llmco2_vllm.settings import Settings

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


def _actual(engine_id: str, decode_tokens: int, grams: float, at: float) -> FinishedRequest:
    return FinishedRequest(
        engine_id, prefill_tokens=8, cached_tokens=2, decode_tokens=decode_tokens, steps=decode_tokens + 1,
        prefill_energy_j=1.0, decode_energy_j=2.0, calibrated_prefill_energy_j=1.1, calibrated_decode_energy_j=2.2,
        operational_grams=grams, embodied_grams=grams / 10, finished_at=at,
    )


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
    assert result["actual"]["prompt_tokens"] == 2 * 10 and result["actual"]["calibrated_energy_j"] == pytest.approx(6.6)
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
    # A hundred requests with max_tokens 100 stopped at 1, 2, ... 99 tokens; the last ran to its limit.
    history = [(n, 100) for n in range(1, 101)]
    learned = estimate_output_tokens(200, history)
    assert learned.source == "learned"
    # Where they stop does not grow with max_tokens: 10/50/90 % of them stopped by 10, 50, 90 tokens.
    assert (learned.low, learned.expected, learned.high) == (10, 50, 90)
    assert learned.stopped_early_share == pytest.approx(0.99)
    capped = estimate_output_tokens(40, history)  # a lower limit stops the longer ones at it
    assert (capped.low, capped.expected, capped.high) == (10, 40, 40)
    assert capped.stopped_early_share == pytest.approx(0.39)
    # Those that ran to their limit only say their stop lies beyond it (censored, not stopped there):
    # half stopped at 10 tokens, half reached a limit of 20, so most of those would run on past 20.
    censored = estimate_output_tokens(100, [(10, 1000)] * 20 + [(20, 20)] * 20)
    assert (censored.low, censored.expected, censored.high) == (10, 10, 100)
    assert censored.stopped_early_share == pytest.approx(0.5)
    # max_tokens says what kind of request it is: a band with enough history is learned on its own.
    titles_and_chats = [(12, 32)] * 20 + [(600, 4096)] * 20
    assert estimate_output_tokens(32, titles_and_chats).expected == 12
    assert estimate_output_tokens(4096, titles_and_chats).expected == 600


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


# -- forecasts a client can trust -------------------------------------------------------------------
def _outcome(max_tokens: int, output: int, raw: float, actual: float, low: float = 0.0, high: float = 0.0) -> ForecastOutcome:
    return ForecastOutcome(max_tokens, output, 100, 0, raw, raw, low or raw, high or raw, actual, 0.0, "learned")


def test_point_is_the_median_inside_its_interval_in_every_regime():
    forecaster = _forecaster()
    always_to_the_limit = [(200, 200)] * 40  # the README bug: learned low == expected, then x1.04 put low above the point
    stopping_early = [(n, 200) for n in range(5, 200, 5)]
    learners = [
        None,
        ForecastLearner([_outcome(200, 200, 10.0, 10.0 * r) for r in np.linspace(1.1, 1.6, 40)]),  # all above 1
        ForecastLearner([_outcome(200, 200, 10.0, 10.0 * r) for r in np.linspace(0.3, 0.5, 40)]),  # all below 1
    ]
    for history in ([], always_to_the_limit, stopping_early):
        for learner in learners:
            for relative_error in (None, 0.0, 0.05, 3.0):
                for running, parts in ((0, 1), (15, 1), (3, 4)):
                    forecast = forecaster.forecast(
                        500, 200, 400.0, parts=parts, running_requests=running, recent_outputs=history,
                        relative_error=relative_error, learner=learner,
                    )
                    assert forecast.energy_j_low <= forecast.energy_j <= forecast.energy_j_high
                    assert forecast.grams_co2e_low <= forecast.grams_co2e <= forecast.grams_co2e_high
    learned_at_limit = forecaster.forecast(500, 200, 400.0, recent_outputs=always_to_the_limit)
    assert learned_at_limit.output_tokens.low == learned_at_limit.output_tokens.expected == 200
    assert learned_at_limit.energy_j_low == learned_at_limit.energy_j < learned_at_limit.energy_j_high
    assert learned_at_limit.output_tokens.stopped_early_share == 0.0


def test_interval_from_outcomes_covers_80_percent_and_point_is_their_median():
    forecaster = _forecaster()
    rng = np.random.default_rng(7)
    ratios = rng.lognormal(np.log(0.6), 0.3, 400)  # actuals 0.6x the raw forecast, spread like a real workload
    raw = forecaster.forecast(500, 200, 400.0).raw_energy_j
    learner = ForecastLearner([_outcome(200, 200, raw, raw * r) for r in ratios[:200]])
    forecast = forecaster.forecast(500, 200, 400.0, learner=learner)
    assert forecast.correction is not None and forecast.correction.samples == 200
    assert forecast.energy_j == pytest.approx(raw * np.median(ratios[:200]))
    inside = np.mean([(forecast.energy_j_low <= raw * r <= forecast.energy_j_high) for r in ratios[200:]])
    assert 0.7 <= inside <= 0.9  # held-out actuals: an honest 80 % interval
    assert forecast.energy_j_high / forecast.energy_j_low < 3.0  # and not a 300x-wide one


def test_learner_measures_error_and_coverage_and_bands_by_max_tokens():
    short = [_outcome(16, 16, 1.0, 2.0, low=1.5, high=2.5) for _ in range(20)]  # forecast 2x too low, inside
    long = [_outcome(512, 400, 10.0, 5.0, low=11.0, high=30.0) for _ in range(20)]  # 2x too high, outside
    learner = ForecastLearner(short + long)
    assert learner.correction(16, 1.0, "learned").ratio == pytest.approx(2.0) and learner.correction(16, 1.0, "learned").band == "length band 5, batch band 0, output length learned"
    assert learner.correction(600, 1.0, "learned").ratio == pytest.approx(0.5)  # 512-1023: the same band as 512
    assert learner.correction(4000, 1.0, "learned").band == "batch band 0, output length learned"  # a length band without outcomes: its batch band
    assert learner.correction(16, 8.0, "learned") is None  # learned at another batch: the prior, not a stale correction
    assert learner.error_ratio == pytest.approx(0.75)  # |1/2 - 1| and |2 - 1|: median of 0.5s and 1s
    assert learner.interval_coverage == pytest.approx(0.5)
    assert ForecastLearner(short[:5]).correction(16, 1.0, "learned") is None  # too few outcomes: the prior stays
    # Few outcomes: the conformal range reaches their extremes (a new one is inside with probability 15/17).
    few = ForecastLearner([_outcome(16, 16, 1.0, r) for r in np.linspace(1.0, 2.0, 16)]).correction(16, 1.0, "learned")
    assert (few.ratio_low, few.ratio, few.ratio_high) == pytest.approx((1.0, 1.5, 2.0))


def test_service_learns_from_finished_requests_in_a_real_store(tmp_path):
    store = RequestResultStore.in_directory(tmp_path)
    ticks = iter(range(0, 10**6, 10))  # every read of the clock is 10 s later: caches always refresh
    service = CarbonService(Settings(), _forecaster(), store, _static(400.0), "llama", 4096, clock=lambda: float(next(ticks)))
    rng = np.random.default_rng(3)

    async def one(index: int, max_tokens: int) -> tuple[dict, float]:
        body = {"prompt_tokens": 300, "max_tokens": max_tokens}
        shape, forecast = await service.shape_and_forecast(body, chat=False)
        decision, _ = await service.admit(forecast, 0.0)
        await service.record_forecast(f"cmpl-{index}", shape, forecast, decision)
        output = int(rng.integers(max_tokens // 4, max_tokens + 1))  # some stop early
        # The server really shares ~16-wide batches: each token costs about a third of the lone forecast.
        actual = forecast.raw_energy_j * (0.2 + 0.8 * output / forecast.output_tokens.expected) / 3 * rng.lognormal(0, 0.1)
        split = actual / 2
        store.record_actuals([
            FinishedRequest(
                f"cmpl-{index}-0-1a2b3c4d", 290, 10, output - 1, output, split, split, split, split,
                operational_grams=actual * 1e-4, embodied_grams=0.0, finished_at=1000.0 + index,
            )
        ])
        return store.get(f"cmpl-{index}"), actual

    async def workload() -> list[tuple[dict, float]]:
        return [await one(i, 128) for i in range(120)]

    results = asyncio.run(workload())
    first, actual_first = results[0]
    assert first["forecast"]["correction_samples"] == 0 and first["forecast"]["energy_j"] > 2 * actual_first
    late = results[60:]
    ratios = [r["forecast"]["energy_j"] / actual for r, actual in late]
    assert 0.85 <= float(np.median(ratios)) <= 1.15
    inside = np.mean([r["forecast"]["energy_j_low"] <= actual <= r["forecast"]["energy_j_high"] for r, actual in late])
    assert inside >= 0.7
    assert all(r["forecast"]["energy_j_low"] <= r["forecast"]["energy_j"] <= r["forecast"]["energy_j_high"] for r, _ in results)
    assert late[-1][0]["forecast"]["output_tokens_source"] == "learned"
    assert late[-1][0]["forecast"]["cached_share"] == pytest.approx(10 / 300)
    # The result keeps the forecast beside the actual, and the metrics say how good forecasts are.
    assert late[-1][0]["actual"]["calibrated_energy_j"] == pytest.approx(late[-1][1])
    labels = {"model_name": service.metrics.model_name}
    assert 0.0 < REGISTRY.get_sample_value("llmco2_forecast_error_ratio", labels) < 0.5
    assert 0.5 < REGISTRY.get_sample_value("llmco2_forecast_interval_coverage_ratio", labels) <= 1.0


def test_the_learner_rereads_the_store_after_a_burst_of_finished_requests(tmp_path):
    store = RequestResultStore.in_directory(tmp_path)
    now = [0.0]
    service = CarbonService(Settings(), _forecaster(), store, _static(400.0), "llama", 4096, clock=lambda: now[0])

    def output_source() -> str:
        shape, forecast = asyncio.run(service.shape_and_forecast({"prompt_tokens": 100, "max_tokens": 64}, chat=False))
        return forecast.output_tokens.source

    assert output_source() == "max_tokens"  # the first forecast read the store: nothing finished yet
    # Thirty short requests finish within a second (they stopped at a quarter of max_tokens).
    forecast = {"max_tokens": 64, "raw_energy_j": 4.0, "energy_j": 4.0, "energy_j_low": 1.0, "energy_j_high": 8.0,
                "concurrent_requests": 4.0, "output_tokens_source": "max_tokens"}  # fmt: skip
    for index in range(30):
        store.record_forecast(f"cmpl-{index}", forecast, 1e-4, 1)
    store.record_actuals([
        FinishedRequest(f"cmpl-{index}-0-1a2b3c4d", 90, 10, 15, 16, 0.5, 0.5, 0.5, 0.5, 1e-4, 0.0, 1000.0 + index)
        for index in range(30)
    ])  # fmt: skip
    tickets = [service.request_arrived() for _ in range(30)]
    now[0] = 0.5
    for ticket in tickets[:7]:
        service.request_finished(ticket)
    assert output_source() == "max_tokens"  # a few finished and the periodic re-read is not due: no store read
    service.request_finished(tickets[7])
    now[0] = 0.6
    assert output_source() == "learned"  # eight finished since the last read: re-read before the period
    # With no request arriving, the gauges still follow the requests that finish.
    labels = {"model_name": service.metrics.model_name}
    service.metrics.set_forecast_quality(None, None, 0)
    assert math.isnan(REGISTRY.get_sample_value("llmco2_forecast_error_ratio", labels))  # unknown, not perfect
    now[0] = 3.0
    asyncio.run(service.refresh_gauges())
    assert REGISTRY.get_sample_value("llmco2_forecast_scored_requests", labels) == 30
    assert REGISTRY.get_sample_value("llmco2_forecast_error_ratio", labels) == pytest.approx(3.0)  # 4 J for 1 J


def test_output_lengths_are_learned_from_requests_that_arrived_before_the_oldest_still_running(tmp_path):
    # In a burst the short requests finish first: learning from whatever finished would price lengths short.
    store = RequestResultStore.in_directory(tmp_path)
    now = [100.0]
    service = CarbonService(Settings(), _forecaster(), store, _static(400.0), "llama", 4096, clock=lambda: now[0])
    body = {"prompt_tokens": 100, "max_tokens": 64}

    def forecast_now(at: float, ticket: int | None = None):
        now[0] = at
        return asyncio.run(service.shape_and_forecast(body, chat=False, ticket=ticket))[1]

    long_running = service.request_arrived()
    forecast_now(100.0, long_running)  # it runs from t = 100 on
    forecast = {"max_tokens": 64, "raw_energy_j": 4.0, "energy_j": 4.0, "energy_j_low": 1.0, "energy_j_high": 8.0,
                "concurrent_requests": 4.0, "output_tokens_source": "max_tokens"}  # fmt: skip
    for index in range(30):  # thirty more arrive after it and stop at a quarter of max_tokens
        store.record_forecast(f"cmpl-{index}", forecast, 1e-4, 1, now=101.0 + index)
    store.record_actuals([
        FinishedRequest(f"cmpl-{index}-0-1a2b3c4d", 90, 10, 15, 16, 0.5, 0.5, 0.5, 0.5, 1e-4, 0.0, 102.0 + index)
        for index in range(30)
    ])  # fmt: skip
    assert forecast_now(140.0).output_tokens.source == "max_tokens"  # nothing learned while the first one runs
    service.request_finished(long_running)
    learned = forecast_now(143.0).output_tokens
    assert (learned.source, learned.expected) == ("learned", 16)
    # A request never reported finished holds learning back for ten minutes at most.
    stuck = service.request_arrived()
    forecast_now(200.0, stuck)
    for index in range(30, 60):
        store.record_forecast(f"cmpl-{index}", forecast, 1e-4, 1, now=201.0 + index)
    store.record_actuals([
        FinishedRequest(f"cmpl-{index}-0-1a2b3c4d", 90, 10, 47, 48, 0.5, 0.5, 0.5, 0.5, 1e-4, 0.0, 202.0 + index)
        for index in range(30, 60)
    ])  # fmt: skip
    assert forecast_now(300.0).output_tokens.high == 16  # the newer, longer requests wait for the running one
    assert forecast_now(1000.0).output_tokens.high == 48  # ... but not for ever


def test_requests_that_ignore_eos_run_to_max_tokens_and_teach_nothing_about_stopping(tmp_path):
    shape = request_shape({"prompt_tokens": 10, "max_tokens": 50, "ignore_eos": True}, False, None, 256)
    assert shape.runs_to_max_tokens
    for body in ({"ignore_eos": True, "stop": ["\n"]}, {"ignore_eos": True, "stop_token_ids": [7]}, {"min_tokens": 10}, {}):
        assert not request_shape({"prompt_tokens": 10, "max_tokens": 50, **body}, False, None, 256).runs_to_max_tokens
    assert request_shape({"prompt_tokens": 10, "max_tokens": 50, "min_tokens": 50}, False, None, 256).runs_to_max_tokens

    def outcome(output: int, ratio: float, source: str) -> ForecastOutcome:
        return ForecastOutcome(200, output, 100, 0, 10.0, 10.0, 10.0, 10.0, 10.0 * ratio, 4.0, source)

    # Requests that stopped at about a quarter of max_tokens, priced at max_tokens before there was
    # a history (corrected 0.3x) and at the learned length since (corrected 1.5x), beside
    # benchmark-style ones that ignored EOS (always 200 tokens, corrected 0.8x).
    learner = ForecastLearner([outcome(50, 0.3, "max_tokens") for _ in range(30)] + [outcome(50, 1.5, "learned") for _ in range(30)]
                              + [outcome(200, 0.8, "runs_to_max_tokens") for _ in range(30)])  # fmt: skip
    forecaster = _forecaster()
    could_stop = forecaster.forecast(500, 200, 400.0, running_requests=3, learner=learner)
    assert (could_stop.output_tokens.source, could_stop.output_tokens.expected) == ("learned", 50)
    assert could_stop.correction.ratio == pytest.approx(1.5)  # not the 0.3 of lengths priced at max_tokens
    known = forecaster.forecast(500, 200, 400.0, running_requests=3, learner=learner, runs_to_max_tokens=True)
    assert (known.output_tokens.source, known.output_tokens.expected) == ("runs_to_max_tokens", 200)
    assert known.correction.ratio == pytest.approx(0.8) and "runs_to_max_tokens" in known.correction.band
    assert known.raw_energy_j > 2 * could_stop.raw_energy_j
    store = RequestResultStore.in_directory(tmp_path)  # the kind survives the store, which the learner reads
    for request_id, forecast in (("cmpl-known", known), ("cmpl-guessed", could_stop)):
        store.record_forecast(request_id, forecast.to_json(), forecast.grams_co2e, 1, now=1000.0)
        store.record_actuals([FinishedRequest(f"{request_id}-0-1a2b3c4d", 500, 0, 199, 200, 1.0, 1.0, 1.0, 1.0,
                                              operational_grams=1e-4, embodied_grams=0.0, finished_at=1001.0)])  # fmt: skip
    sources = {o.energy_j: o.output_tokens_source for o in store.recent_outcomes()}
    assert sources == {known.energy_j: "runs_to_max_tokens", could_stop.energy_j: "learned"}


# -- admission under abuse -------------------------------------------------------------------------
class SwitchableIntensity:
    """A grid that turns clean when the test says so."""

    def __init__(self, grams_per_kwh: float) -> None:
        self.grams_per_kwh = grams_per_kwh

    def current(self) -> GridIntensity:
        return GridIntensity(self.grams_per_kwh, "static", "average", None, "test")

    age_seconds = 0.0
    errors = 0

    def close(self) -> None:
        pass


def _static(grams_per_kwh: float) -> StaticIntensity:
    return StaticIntensity(GridIntensity(grams_per_kwh, "static", "average", None, "user setting"))


def _deferring_service(tmp_path, grid, **settings) -> CarbonService:
    configured = Settings(admission_defer_above_intensity=300.0, **settings)
    return CarbonService(configured, _forecaster(), RequestResultStore.in_directory(tmp_path), grid, "llama", 4096)


def _released(service: CarbonService, reason: str) -> float:
    return REGISTRY.get_sample_value(
        "llmco2_admission_released_requests_total", {"model_name": service.metrics.model_name, "reason": reason}
    )


def test_waiting_cap_rejects_beyond_it_with_retry_after_and_the_rest_run_at_their_deadline(tmp_path):
    service = _deferring_service(tmp_path, _static(500.0), admission_max_waiting=3)
    forecast = service.forecaster.forecast(100, 16, 500.0)
    deadline_before = _released(service, "deadline_reached")

    async def scenario():
        return await asyncio.gather(*(service.admit(forecast, 0.6) for _ in range(5)))

    decisions = [decision for decision, _ in asyncio.run(scenario())]
    rejected = [d for d in decisions if d.decision == REJECTED]
    assert len(rejected) == 2 and all(d.policy == "waiting_cap" and d.retry_after_seconds >= 1 for d in rejected)
    admitted = [d for d in decisions if d.decision == ADMITTED]
    assert len(admitted) == 3 and all(d.reason == "deadline reached" and d.numbers["waited_seconds"] >= 0.59 for d in admitted)
    assert _released(service, "deadline_reached") - deadline_before == 3
    assert len(service.waiting_line) == 0


def test_released_requests_are_paced_oldest_first(tmp_path):
    grid = SwitchableIntensity(500.0)
    service = _deferring_service(tmp_path, grid, admission_release_per_second=10.0)
    forecast = service.forecaster.forecast(100, 16, 500.0)
    released_at: list[tuple[int, float]] = []

    async def parked(index: int) -> None:
        decision, _ = await service.admit(forecast, 60.0)
        assert decision.decision == ADMITTED and decision.reason == "condition cleared"
        released_at.append((index, time.monotonic()))

    async def scenario() -> None:
        tasks = []
        for index in range(6):
            tasks.append(asyncio.create_task(parked(index)))
            await asyncio.sleep(0.01)  # arrival order
        await asyncio.sleep(0.2)
        assert len(service.waiting_line) == 6 and not released_at
        grid.grams_per_kwh = 100.0  # the grid turns clean
        await asyncio.wait_for(asyncio.gather(*tasks), 10.0)

    asyncio.run(scenario())
    assert [index for index, _ in released_at] == list(range(6))  # oldest first
    gaps = np.diff([at for _, at in released_at])
    assert gaps.min() >= 0.09  # one every 0.1 s, not all at once
    assert gaps.sum() < 1.5


def test_middleware_bounds_the_body_it_buffers(tmp_path):
    service = CarbonService(
        Settings(admission_max_body_bytes=1024), _forecaster(), RequestResultStore.in_directory(tmp_path),
        _static(400.0), "llama", 4096,
    )
    received: list[bytes] = []

    async def vllm_app(scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        received.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = types.SimpleNamespace(state=types.SimpleNamespace(llmco2=service))
    middleware = AdmissionMiddleware(vllm_app)

    async def post(chunks: list[bytes]) -> list[dict]:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        pending = iter(messages)
        sent: list[dict] = []

        async def receive() -> dict:
            return next(pending, {"type": "http.disconnect"})

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": [], "app": app}
        await middleware(scope, receive, send)
        return sent

    def headers(sent: list[dict]) -> dict[bytes, bytes]:
        return dict(sent[0]["headers"])

    small = json.dumps({"prompt": "hello", "max_tokens": 8}).encode()
    big = json.dumps({"prompt": "x" * 3000, "max_tokens": 8}).encode()
    labels = {"model_name": service.metrics.model_name, "reason": "body_too_large"}
    too_large_before = REGISTRY.get_sample_value("llmco2_admission_unforecast_requests_total", labels)
    assert b"x-llmco2-forecast-energy-j" in headers(asyncio.run(post([small[:10], small[10:]])))
    sent = asyncio.run(post([big[:700], big[700:1400], big[1400:]]))
    assert b"x-llmco2-forecast-energy-j" not in headers(sent)  # passed on unforecast
    assert received == [small, big]  # the whole body reached vLLM, streamed on past the bound
    assert REGISTRY.get_sample_value("llmco2_admission_unforecast_requests_total", labels) - too_large_before == 1


def test_requests_arriving_together_are_forecast_in_one_batch(tmp_path):
    service = CarbonService(Settings(), _forecaster(), RequestResultStore.in_directory(tmp_path), _static(400.0), "llama", 4096)
    inside: list[int] = []
    all_inside = asyncio.Event()

    async def vllm_app(scope, receive, send) -> None:
        inside.append(service._in_flight)
        if len(inside) == 4:
            all_inside.set()
        await asyncio.wait_for(all_inside.wait(), 10)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = AdmissionMiddleware(vllm_app)
    app = types.SimpleNamespace(state=types.SimpleNamespace(llmco2=service))
    body = json.dumps({"prompt_tokens": 100, "max_tokens": 8}).encode()

    async def post(index: int) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            pass

        headers = [(b"x-request-id", f"together-{index}".encode())]
        await middleware({"type": "http", "path": "/v1/completions", "method": "POST", "headers": headers, "app": app}, receive, send)

    async def together() -> None:
        service.request_arrived()  # one more request arrived and is being forecast
        await asyncio.gather(*(post(index) for index in range(4)))
        service.request_finished()

    asyncio.run(together())
    assert max(inside) == 5 and service._in_flight == 0  # every response ended: none left counted
    # Each saw the one arriving beside it: none was priced as if it ran alone.
    batches = [service.store.get(f"cmpl-together-{index}")["forecast"]["concurrent_requests"] for index in range(4)]
    assert min(batches) >= 2.0


def test_forecast_batch_follows_the_engine_but_forgets_load_that_has_gone(tmp_path):
    service = CarbonService(Settings(), _forecaster(), RequestResultStore.in_directory(tmp_path), _static(400.0), "llama", 4096)

    def batch(mean: float | None, running: int, in_flight: int = 0) -> float:
        service._in_flight = in_flight
        service._engine_state = (float("inf"), {"running_requests": running, "mean_running_requests": mean,
                                                "prefill_scale": 1.0, "decode_scale": 1.0})  # fmt: skip
        return asyncio.run(service.shape_and_forecast({"prompt_tokens": 100, "max_tokens": 8}, chat=False))[1].concurrent_requests

    assert batch(7.6, 7) == pytest.approx(7.6)  # steady load: the recent mean
    assert batch(7.6, 0) == 1.0  # the busy phase is over: the engine runs nothing now
    assert batch(7.6, 2) == 3.0
    assert batch(3.0, 9) == 9.0  # load rising: what runs now
    assert batch(7.6, 0, in_flight=5) == 5.0  # this server's requests arriving together (itself among them)
    assert batch(None, 0) == 1.0


def test_prior_interval_spans_the_batch_over_the_request_life():
    """Before outcomes are learned, the interval holds the batch changing while the request runs:
    its high end the batch left if the running requests end as expected (none arriving; those of
    which nothing is known at once), its low end the batch the engine ran recently. The point stays
    at the batch it joins."""
    forecaster = _forecaster()  # output length known (ignore_eos), model error 0: the batch alone widens it

    def forecast(**kwargs):
        return forecaster.forecast(500, 100, 400.0, relative_error=0.0, runs_to_max_tokens=True, **kwargs)

    alone = forecast()
    # Seven others with 100+ steps left outlive it: the interval is the point.
    outliving = forecast(running_requests=7, running=[(150.0, 1)] * 7)
    assert outliving.energy_j_low == outliving.energy_j == outliving.energy_j_high < alone.energy_j / 4
    # The seven end within 10 steps of its 100: for 90 % of its life it is alone. It pays each
    # step's cost over that step's batch: 1/8 for 10 steps and all of it for 90, as in a batch of
    # 100 / (10/8 + 90) = 1.096 throughout (the harmonic mean), not of 1.7 (the plain mean).
    ending = forecast(running_requests=7, running=[(10.0, 1)] * 7)
    assert ending.energy_j == outliving.energy_j
    assert ending.energy_j_high == pytest.approx(forecast(mean_running_requests=100 / (10 / 8 + 90)).energy_j)
    steps = forecaster.forecast(500, 100, 400.0, relative_error=0.0, runs_to_max_tokens=True, mean_running_requests=8.0)
    paid = (10 * steps.energy_j + 90 * alone.energy_j) / 100  # step by step, for a cost that is mostly fixed per step
    assert abs(ending.energy_j_high / paid - 1) < 0.1 < abs(forecast(mean_running_requests=1.7).energy_j / paid - 1)
    assert ending.grams_co2e_high > outliving.grams_co2e_high
    # Nothing known of how long the seven run (the engine's count): the high end is priced alone.
    unknown = forecast(running_requests=7)
    assert unknown.energy_j == outliving.energy_j and unknown.energy_j_high == pytest.approx(alone.energy_j)
    # The engine ran 32 at a time a moment ago: load that may return prices the low end.
    busy = forecast(running_requests=7, running=[(150.0, 1)] * 7, busy_batch=32.0)
    assert busy.energy_j == outliving.energy_j and busy.energy_j_high == outliving.energy_j_high
    assert busy.energy_j_low == pytest.approx(forecast(running_requests=31).energy_j)


def test_service_expects_running_requests_to_leave_by_their_expected_length(tmp_path):
    """Each forecast request counts as running its expected steps; how fast steps pass is learned
    from the wall time finished requests took per expected step."""
    clock = [1000.0]
    service = CarbonService(Settings(), _forecaster(), RequestResultStore.in_directory(tmp_path), _static(400.0),
                            "llama", 4096, clock=lambda: clock[0])  # fmt: skip
    service._engine_state = (float("inf"), {"running_requests": 0, "mean_running_requests": None,
                                            "prefill_scale": 1.0, "decode_scale": 1.0})  # fmt: skip

    def forecast(max_tokens: int, ticket: int | None):
        body = {"prompt_tokens": 100, "max_tokens": max_tokens, "ignore_eos": True}
        return asyncio.run(service.shape_and_forecast(body, False, ticket))[1]

    alone = service.forecaster.forecast(100, 200, 400.0, runs_to_max_tokens=True)
    # Before any request finished, running requests are taken as just started: three of 10 steps
    # leave a request of 200 steps alone for 95 % of its life.
    short = [service.request_arrived() for _ in range(3)]
    for ticket in short:
        forecast(10, ticket)
    ticket = service.request_arrived()
    long = forecast(200, ticket)
    assert long.concurrent_requests == 4.0
    assert 0.9 * alone.energy_j_high < long.energy_j_high <= alone.energy_j_high
    assert 0.9 * alone.energy_j_high < service.forecaster.forecast(
        100, 200, 400.0, runs_to_max_tokens=True, running_requests=3, running=[(10.0, 1)] * 3
    ).energy_j_high
    clock[0] += 1.0
    for finished in short:
        service.request_finished(finished)  # 10 steps in 1 s: 0.1 s per step
    assert service._step_period == pytest.approx(0.1)
    # The long one has run 10 of its 200 steps; a new one of 20 steps expects it to outlive it.
    newcomer = service.request_arrived()
    beside = forecast(20, newcomer)
    outliving = service.forecaster.forecast(100, 20, 400.0, runs_to_max_tokens=True, running_requests=1, running=[(190.0, 1)])
    assert beside.energy_j_high == pytest.approx(outliving.energy_j_high)
    assert beside.energy_j_high < service.forecaster.forecast(100, 20, 400.0, runs_to_max_tokens=True, running_requests=1).energy_j_high
    clock[0] += 17.0  # the long one has 20 steps left (half of a 40-step life), the newcomer none
    last = service.request_arrived()
    late = forecast(40, last)
    expected = service.forecaster.forecast(100, 40, 400.0, runs_to_max_tokens=True, running_requests=2, running=[(20.0, 1), (-150.0, 1)])
    assert late.concurrent_requests == 3.0 and late.energy_j_high == pytest.approx(expected.energy_j_high)
    assert expected.energy_j_high > 1.5 * late.energy_j * service.forecaster.uncalibrated_ratio_range[1]
    for finished in (ticket, newcomer, last):
        service.request_finished(finished)
    assert service._running == {} and service._in_flight == 0


def test_sole_api_server_trusts_its_own_count_over_a_stale_engine_count(tmp_path):
    """One API server in front of one engine sees every request: an engine count above its own
    requests in flight is a publish old (the worker lags on a busy host), not load."""

    def batch(sees_every_request: bool) -> float:
        service = CarbonService(Settings(), _forecaster(), RequestResultStore.in_directory(tmp_path), _static(400.0),
                                "llama", 4096, sees_every_request=sees_every_request)  # fmt: skip
        service._in_flight = 2  # this request and one other
        service._engine_state = (float("inf"), {"running_requests": 8, "mean_running_requests": 8.0,
                                                "prefill_scale": 1.0, "decode_scale": 1.0})  # fmt: skip
        return asyncio.run(service.shape_and_forecast({"prompt_tokens": 100, "max_tokens": 8}, chat=False))[1].concurrent_requests

    assert batch(False) == 8.0  # other API servers' requests may be running there
    assert batch(True) == 2.0
