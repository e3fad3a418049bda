"""One id space for a client request: response id, engine ids, request log, results store (no vLLM).

The engine ids are built here the way vLLM 0.32 builds them (``completion/serving.py``: one engine
request per prompt, ``f"{request_id}-{i}"``; ``parallel_sampling.py``: ``f"{index}_{request_id}"``;
``input_processor.py``: ``f"{request_id}-{random_uuid():.8}"``). ``test_vllm_carbon.py`` checks the
same against a real ``vllm serve``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import pytest

from llmco2_vllm.accounting.request_log import RequestLog
from llmco2_vllm.carbon.intensity import GridIntensity
from llmco2_vllm.carbon.static import StaticIntensity
from llmco2_vllm.predict.forecast import RequestForecaster
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.predictor import AnalyticPredictor
from llmco2_vllm.serve.admission import ADMITTED
from llmco2_vllm.serve.carbon_service import CarbonService
from llmco2_vllm.serve.request_record import FinishedRequest, client_request_id, lookup_ids, response_id
from llmco2_vllm.serve.results_store import RequestResultStore
from llmco2_vllm.settings import Settings

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
TRICKY_X_REQUEST_IDS = ["abc", uuid.uuid4().hex, "my-id-7", "ends-with-hex-deadbeef", "1_looks-like-a-child", "a-0"]


def engine_ids(path: str, x_request_id: str, prompts: int, n: int) -> list[str]:
    """vLLM's engine request ids for one client request (the random suffix included)."""
    base = response_id(path, x_request_id)
    per_prompt = [f"{base}-{i}" for i in range(prompts)] if path == COMPLETIONS else [base]
    ids = []
    for request_id in per_prompt:
        suffixed = f"{request_id}-{uuid.uuid4().hex[:8]}"
        ids += [suffixed] if n == 1 else [f"{index}_{suffixed}" for index in range(n)]
    return ids


@pytest.mark.parametrize("x_request_id", TRICKY_X_REQUEST_IDS)
@pytest.mark.parametrize("path, prompts, n", [(COMPLETIONS, 1, 1), (COMPLETIONS, 1, 2), (COMPLETIONS, 3, 1), (COMPLETIONS, 2, 3), (CHAT, 1, 1), (CHAT, 1, 2)])
def test_every_engine_id_maps_back_to_the_response_id(path, prompts, n, x_request_id):
    expected = response_id(path, x_request_id)
    ids = engine_ids(path, x_request_id, prompts, n)
    assert len(set(ids)) == prompts * n
    assert {client_request_id(engine_id) for engine_id in ids} == {expected}
    # Without vLLM's randomisation (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION) the suffix is absent.
    if x_request_id != "ends-with-hex-deadbeef":  # indistinguishable from a suffix by its shape alone
        unsuffixed = [engine_id.rsplit("-", 1)[0] for engine_id in ids]
        assert {client_request_id(engine_id) for engine_id in unsuffixed} == {expected}


def test_response_ids_and_lookups():
    assert response_id(COMPLETIONS, "abc") == "cmpl-abc"
    assert response_id(CHAT, "abc") == "chatcmpl-abc"
    with pytest.raises(KeyError):
        response_id("/v1/embeddings", "abc")
    assert lookup_ids("cmpl-abc")[0] == "cmpl-abc"
    assert set(lookup_ids("abc")) == {"abc", "cmpl-abc", "chatcmpl-abc"}


def finished(engine_id: str, decode_tokens: int = 3, finished_at: float = 1000.0) -> FinishedRequest:
    return FinishedRequest(
        engine_id, prefill_tokens=6, cached_tokens=4, decode_tokens=decode_tokens, steps=decode_tokens + 2,
        prefill_energy_j=1.5, decode_energy_j=2.5, calibrated_prefill_energy_j=3.0, calibrated_decode_energy_j=5.0,
        operational_grams=0.25, embodied_grams=0.05, finished_at=finished_at,
    )  # fmt: skip


def test_finished_request_derives_its_client_id_once():
    record = finished("2_cmpl-abc-1-1a2b3c4d")
    assert record.client_request_id == "cmpl-abc"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.client_request_id = "cmpl-other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        FinishedRequest(**{**{f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.init}, "client_request_id": "x"})
    line = record.to_json()
    assert (line["request_id"], line["client_request_id"]) == ("2_cmpl-abc-1-1a2b3c4d", "cmpl-abc")
    assert line["prompt_tokens"] == 10 and line["energy_j"] == 4.0 and line["calibrated_energy_j"] == 8.0
    assert line["carbon_grams"] == pytest.approx(0.3) and line["finished_at"] == 1000.0


def test_request_log_and_results_store_file_a_request_under_the_same_id(tmp_path):
    log = RequestLog(str(tmp_path / "requests.jsonl"), {"model_name": "m"})
    store = RequestResultStore.in_directory(tmp_path)
    records = [finished(engine_id, decode_tokens=i + 1) for i, engine_id in enumerate(engine_ids(COMPLETIONS, "my-id-7", 2, 2))]
    for record in records:
        log.write(record)
    store.record_actuals(records)
    lines = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [line["request_id"] for line in lines] == [r.engine_request_id for r in records]
    assert {line["client_request_id"] for line in lines} == {"cmpl-my-id-7"} and lines[0]["model_name"] == "m"
    actual = store.get("cmpl-my-id-7")["actual"]
    assert actual["output_tokens"] == sum(line["decode_tokens"] + 1 for line in lines)
    assert actual["energy_j"] == pytest.approx(sum(line["energy_j"] for line in lines))
    assert actual["grams_co2e"] == pytest.approx(sum(line["carbon_grams"] for line in lines))


def test_carbon_service_answers_by_response_id_or_bare_x_request_id(tmp_path):
    model = load_model("meta-llama/Llama-3.1-8B-Instruct")
    predictor = AnalyticPredictor(model, Hardware(find_gpu("H100"), 1, 1, "configured"))
    forecaster = RequestForecaster(predictor, num_gpus=1, embodied_grams_per_gpu_second=0.0037, pue=1.2)
    store = RequestResultStore.in_directory(tmp_path)
    intensity = StaticIntensity(GridIntensity(400.0, "static", "average", None, "user setting"))
    service = CarbonService(Settings(), forecaster, store, intensity, "llama", max_model_len=4096)

    async def scenario() -> tuple[dict | None, dict | None, dict | None]:
        body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "n": 2}
        shape, forecast = await service.shape_and_forecast(body, chat=True)
        decision, waited = await service.admit(forecast, service.deferral_seconds(None))
        assert decision.decision == ADMITTED and waited == 0.0
        await service.record_forecast(response_id(CHAT, "x-1"), shape, forecast, decision)
        store.record_actuals([finished(engine_id) for engine_id in engine_ids(CHAT, "x-1", 1, 2)])
        return await service.result("chatcmpl-x-1"), await service.result("x-1"), await service.result("cmpl-x-1")

    by_response_id, by_bare_id, wrong_endpoint = asyncio.run(scenario())
    assert by_response_id == by_bare_id
    assert by_response_id["id"] == "chatcmpl-x-1" and by_response_id["status"] == "finished"
    assert by_response_id["forecast"]["parts"] == 2 and by_response_id["actual"]["output_tokens"] == 2 * (3 + 1)
    assert wrong_endpoint is None
