"""Carbon endpoints and admission control in a real ``vllm serve`` (``VLLM_PLUGINS=llmco2``).

Thresholds are derived from the same forecast code the server runs, for the tiny model on the
default target GPU, so the test asks for "a cap between a small and a big request" rather than
for fixed numbers.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llmco2_vllm.dev.local_server import LocalVllmServer
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics
from llmco2_vllm.predict.forecast import RequestForecaster
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.predictor import AnalyticPredictor
from llmco2_vllm.settings import Settings
from tests.support.electricity_maps_server import FakeElectricityMaps

pytestmark = pytest.mark.server

SERVER_ARGS = ["--max-num-batched-tokens", "256", "--max-num-seqs", "8", "--block-size", "32"]
SMALL = {"prompt": list(range(1, 9)), "max_tokens": 4}
BIG = {"prompt": list(range(1, 301)), "max_tokens": 150, "n": 4}
HIGH, LOW = 900.0, 100.0
BUDGET_WINDOW_SECONDS = 10.0


def http(server: LocalVllmServer, method: str, path: str, body: object = None, headers: dict | None = None, timeout: float = 120):
    """(status, headers, JSON body) without raising on 4xx/5xx."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(
        server.base_url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"null")


def complete(server, body, headers=None):
    body = {"model": "tiny-llama", "ignore_eos": True, "temperature": 0.0, **body}
    return http(server, "POST", "/v1/completions", body, headers)


def offline_forecaster(model_dir: Path) -> RequestForecaster:
    config = json.loads((model_dir / "config.json").read_text())
    model = ModelDescription.from_hf_config(config, name="tiny-llama", weight_dtype="float32", kv_cache_dtype="auto")
    settings = Settings()
    predictor = AnalyticPredictor(model, Hardware(find_gpu(settings.target_gpu), 1, 1, "configured"))
    return RequestForecaster(predictor, 1, settings.embodied().grams_per_gpu_second, settings.pue)


def grams(forecaster: RequestForecaster, body: dict, intensity: float) -> float:
    prompts = body["prompt"]
    return forecaster.forecast(len(prompts), body["max_tokens"], intensity, parts=body.get("n", 1)).grams_co2e


def write_series(path: Path, rows: list[tuple[float, float]]) -> None:
    path.write_text("timestamp,grams_co2e_per_kwh\n" + "".join(f"{t:.3f},{v}\n" for t, v in rows))


def with_word_tokenizer(model_dir: Path, directory: Path) -> Path:
    """The tiny model plus a word-level tokenizer ("w<id>" -> id) with a chat template: chat needs a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}  # every id decodes
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=template)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    for path in model_dir.iterdir():
        (directory / path.name).symlink_to(path.resolve())
    return directory


@pytest.fixture(scope="module")
def carbon_server(tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("carbon")
    forecaster = offline_forecaster(tiny_model_dir)
    small_low, small_high, big_high = grams(forecaster, SMALL, LOW), grams(forecaster, SMALL, HIGH), grams(forecaster, BIG, HIGH)
    assert big_high > 20 * small_high
    series = directory / "intensity.csv"
    write_series(series, [(0.0, HIGH)])
    env = {
        "VLLM_PLUGINS": "llmco2",
        "LLMCO2_PREDICTOR": "analytic",  # the thresholds above come from the analytic forecast
        "LLMCO2_GRID_INTENSITY_FILE": str(series),
        "LLMCO2_ADMISSION_MAX_REQUEST_GRAMS": repr((small_high * big_high) ** 0.5),
        # Room for two small requests at high intensity (~10 at low) per window.
        "LLMCO2_ADMISSION_BUDGET_GRAMS": repr(max(2.5 * small_high, 6.5 * small_low)),
        "LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS": str(BUDGET_WINDOW_SECONDS),
        "LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY": "500",
        "LLMCO2_REQUEST_LOG": str(directory / "requests.jsonl"),
        "LLMCO2_RUN_DIR": str(directory / "run"),
    }
    (directory / "run").mkdir()
    log = directory / "serve.log"
    model_dir = with_word_tokenizer(tiny_model_dir, directory / "model")
    with LocalVllmServer(model_dir, [*SERVER_ARGS, "--no-skip-tokenizer-init"], env=env, log_path=log) as server:
        yield {"server": server, "series": series, "forecaster": forecaster, "log": log, "small_high": small_high,
               "run_dir": directory / "run"}  # fmt: skip


def test_estimate_matches_the_forecast_model_and_validates_input(carbon_server):
    server = carbon_server["server"]
    status, _, body = http(server, "POST", "/v1/carbon/estimate", {"prompt": SMALL["prompt"], "max_tokens": 4})
    assert status == 200, body
    forecast = body["forecast"]
    assert forecast["grams_co2e"] == pytest.approx(carbon_server["small_high"], rel=1e-6)
    assert forecast["energy_j_low"] < forecast["energy_j"] < forecast["energy_j_high"]
    assert body["admission"]["decision"] == "admitted"
    assert body["admission_if_deferrable"] == {**body["admission_if_deferrable"], "decision": "deferred", "policy": "intensity"}
    status, _, counted = http(server, "POST", "/v1/carbon/estimate", {"prompt_tokens": 8, "max_tokens": 4})
    assert status == 200 and counted["forecast"]["energy_j"] == pytest.approx(forecast["energy_j"])
    for bad, message in (
        ({"max_tokens": 4}, "give prompt"),
        ({"prompt_tokens": -1, "max_tokens": 4}, "prompt_tokens must be between"),
        ({"prompt_tokens": 10, "max_tokens": 10**12}, "max_tokens must be between"),
        ({"prompt_tokens": "ten", "max_tokens": 4}, "whole number"),
        ({"prompt_tokens": 500, "max_tokens": 100}, "exceeds the model's context"),
        (b"{not json", "not valid JSON"),
    ):
        status, _, error = http(server, "POST", "/v1/carbon/estimate", bad)
        assert status == 400 and message in error["error"]["message"], (bad, error)


def test_engine_publishes_vllm_step_token_budget_for_chunked_prefill(carbon_server):
    """Forecasts price a long prompt in the prefill steps vLLM chunks it into: the engine's own
    --max-num-batched-tokens, not only the largest step seen (small requests never fill one)."""
    from llmco2_vllm.serve.results_store import RequestResultStore

    status, _, _ = complete(carbon_server["server"], SMALL)
    assert status == 200
    store = RequestResultStore.in_directory(carbon_server["run_dir"])
    deadline = time.monotonic() + 30
    while not store.engine_states() and time.monotonic() < deadline:
        time.sleep(0.2)
    (state,) = store.engine_states()
    assert state["step_token_budget"] == int(SERVER_ARGS[1])
    time.sleep(BUDGET_WINDOW_SECONDS + 1)  # this request's spend leaves the budget window


def test_cap_rejects_big_request_and_leaves_others_alone(carbon_server):
    server = carbon_server["server"]
    status, headers, body = complete(server, BIG)
    assert status == 429, body
    assert int(headers["retry-after"]) > 0
    assert body["error"]["llmco2"]["admission"]["policy"] == "cap"
    assert "per-request cap" in body["error"]["message"]
    status, headers, body = complete(server, SMALL)  # not deferrable: high intensity does not delay it
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    assert headers["x-llmco2-admission"] == "admitted; policy=none"
    assert headers["x-llmco2-request-id"] == body["id"]
    # Streaming passes through the middleware untouched, with the same headers.
    stream = {"model": "tiny-llama", "prompt": SMALL["prompt"], "max_tokens": 4, "stream": True, "ignore_eos": True}
    request = urllib.request.Request(
        server.base_url + "/v1/completions", data=json.dumps(stream).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = response.read().decode()
        assert response.headers["x-llmco2-admission"] == "admitted; policy=none"
    assert events.count("data: ") == 4 + 1 and events.rstrip().endswith("data: [DONE]")


def test_deferrable_request_waits_for_lower_intensity(carbon_server):
    server = carbon_server["server"]
    time.sleep(BUDGET_WINDOW_SECONDS + 1)  # the cap test's spend leaves the budget window
    drop_at = time.time() + 8.0
    write_series(carbon_server["series"], [(0.0, HIGH), (drop_at, LOW)])
    started = time.monotonic()
    status, headers, body = complete(server, SMALL, {"X-Llmco2-Deferrable": "120"})
    waited = time.monotonic() - started
    assert status == 200, body
    assert headers["x-llmco2-admission"] == "admitted; policy=intensity"
    assert time.time() >= drop_at - 0.5 and waited < 60
    samples = parse_metrics(server.metrics_text())
    assert metric_sum(samples, "llmco2_admission_decisions_total", decision="deferred", policy="intensity") >= 1
    assert metric_sum(samples, "llmco2_admission_decisions_total", decision="admitted", policy="intensity") >= 1
    status, _, body = complete(server, SMALL, {"X-Llmco2-Deferrable": "soon"})
    assert status == 400 and "X-Llmco2-Deferrable" in body["error"]["message"]


def test_budget_runs_out_and_refills(carbon_server):
    server = carbon_server["server"]
    time.sleep(BUDGET_WINDOW_SECONDS + 1)  # earlier tests' spend leaves the window
    statuses = []
    for _ in range(40):
        status, headers, body = complete(server, SMALL)
        statuses.append(status)
        if status == 429:
            break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert 3 <= len(statuses) < 40, statuses
    assert body["error"]["llmco2"]["admission"]["policy"] == "budget"
    rejected = http(server, "GET", f"/v1/carbon/requests/{headers['x-llmco2-request-id']}")[2]
    assert rejected["status"] == "rejected" and rejected["actual"] is None
    retry_after = int(headers["retry-after"])
    assert 1 <= retry_after <= BUDGET_WINDOW_SECONDS
    samples = parse_metrics(server.metrics_text())
    assert metric_sum(samples, "llmco2_carbon_budget_spent_grams") > 0
    assert metric_sum(samples, "llmco2_admission_decisions_total", decision="rejected", policy="budget") >= 1
    time.sleep(retry_after + 1)
    status, _, body = complete(server, SMALL)
    assert status == 200, body


def test_every_exported_metric_is_documented(carbon_server):
    # The API server's admission metrics and the engine's accounting metrics, on one /metrics.
    text = carbon_server["server"].metrics_text()
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE llmco2_")}
    families = {name.removesuffix("_created") for name in families}  # the README says counters expose _created
    assert "llmco2_forecast_error_ratio" in families and "llmco2_energy_joules_total" in families
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    undocumented = sorted(name for name in families if f"`{name}`" not in readme and f"`{name}_total`" not in readme)
    assert not undocumented, f"exported, not in the README's metric tables: {undocumented}"


def test_results_per_request_match_the_metrics(carbon_server):
    server = carbon_server["server"]
    time.sleep(BUDGET_WINDOW_SECONDS + 1)  # the budget test's spend leaves the window
    body = {"prompt": [[5, 6, 7], list(range(1, 40))], "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 1}
    status, _, body = complete(server, body, {"X-Llmco2-Deferrable": "30"})
    assert status == 200, body
    deadline = time.monotonic() + 30
    while True:
        status, _, result = http(server, "GET", f"/v1/carbon/requests/{body['id']}")
        if status == 200 and result["status"] == "finished" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert result["status"] == "finished", result
    assert result["forecast"]["parts"] == 4 and result["actual"]["output_tokens"] == 4 * 5
    actual = result["actual"]
    assert actual["energy_j"] == pytest.approx(actual["prefill_energy_j"] + actual["decode_energy_j"])
    assert actual["grams_co2e"] == pytest.approx(actual["operational_grams_co2e"] + actual["embodied_grams_co2e"])
    assert result["forecast"]["energy_j_low"] <= result["forecast"]["energy_j_high"]
    # The bare X-Request-Id works too, and an unknown id is a clear 404.
    assert http(server, "GET", f"/v1/carbon/requests/{body['id'].removeprefix('cmpl-')}")[0] == 200
    status, _, missing = http(server, "GET", "/v1/carbon/requests/nope")
    assert status == 404 and "no carbon result" in missing["error"]["message"]

    # Every finished request's actual adds up to the engine's counters.
    time.sleep(1.5)  # one publish interval: the log and the metrics are written by the same worker pass
    records = [json.loads(line) for line in (carbon_server["log"].parent / "requests.jsonl").read_text().splitlines()]
    samples = parse_metrics(server.metrics_text())
    assert metric_sum(samples, "llmco2_requests_total") == len(records)
    energy = sum(metric_sum(samples, "llmco2_energy_joules_total", source="predicted", phase=p) for p in ("prefill", "decode"))
    assert sum(r["energy_j"] for r in records) == pytest.approx(energy, rel=1e-6)
    operational = sum(metric_sum(samples, "llmco2_carbon_grams_total", source="calibrated", phase=p) for p in ("prefill", "decode"))
    embodied = sum(metric_sum(samples, "llmco2_embodied_carbon_grams_total", phase=p) for p in ("prefill", "decode"))
    assert sum(r["carbon_grams"] for r in records) == pytest.approx(operational + embodied, rel=1e-6)
    assert metric_sum(samples, "llmco2_request_carbon_grams_sum") == pytest.approx(operational + embodied, rel=1e-6)
    assert metric_sum(samples, "llmco2_grid_intensity_grams_per_kwh") == LOW
    assert metric_sum(samples, "llmco2_admission_errors_total") == 0
    assert metric_sum(samples, "llmco2_plugin_errors_total") == 0


# (path, body, engine requests it fans out to)
ID_CASES = {
    "single completion": ("/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 3}, 1),
    "n=2 completion": ("/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 3}, 2),
    "two-prompt completion": ("/v1/completions", {"prompt": [[5, 6, 7], [9, 10, 11, 12]], "max_tokens": 3}, 2),
    "chat completion": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5 w6 w7"}], "max_tokens": 3}, 1),
}


def test_request_ids_agree_across_header_results_and_request_log(carbon_server):
    server = carbon_server["server"]
    write_series(carbon_server["series"], [(0.0, LOW)])  # as the deferrable test leaves it: deferral only for budget
    time.sleep(BUDGET_WINDOW_SECONDS + 1)  # earlier tests' spend leaves the window; the series is reloaded
    responses = {}
    for case, (path, body, _parts) in ID_CASES.items():
        body = {"model": "tiny-llama", "ignore_eos": True, "temperature": 0.0, **body}
        status, headers, response = http(server, "POST", path, body, {"X-Llmco2-Deferrable": "60"})  # waits out the budget
        assert status == 200, (case, response)
        assert headers["x-llmco2-request-id"] == response["id"], case
        assert response["id"].startswith("chatcmpl-" if "chat" in path else "cmpl-"), case
        responses[case] = response

    log_path = carbon_server["log"].parent / "requests.jsonl"
    deadline = time.monotonic() + 30
    while True:  # the log line and the stored actual are written by the worker's passes: wait for both
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        results = {case: http(server, "GET", f"/v1/carbon/requests/{r['id']}") for case, r in responses.items()}
        logged = {case: [line for line in lines if line["client_request_id"] == r["id"]] for case, r in responses.items()}
        done = all(status == 200 and result["status"] == "finished" for status, _, result in results.values())
        if done and all(len(logged[case]) == ID_CASES[case][2] for case in responses) or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    for case, response in responses.items():
        parts, completion_tokens = ID_CASES[case][2], response["usage"]["completion_tokens"]
        status, _, result = results[case]
        assert status == 200 and result["id"] == response["id"] and result["status"] == "finished", (case, result)
        actual = result["actual"]
        assert result["forecast"]["parts"] == parts and actual["output_tokens"] == completion_tokens, (case, result)
        records = logged[case]
        assert len(records) == parts, (case, records)
        assert len({r["request_id"] for r in records}) == parts  # one line per engine request
        assert sum(r["decode_tokens"] + 1 for r in records) == completion_tokens
        assert sum(r["energy_j"] for r in records) == pytest.approx(actual["energy_j"], rel=1e-9)
        assert sum(r["carbon_grams"] for r in records) == pytest.approx(actual["grams_co2e"], rel=1e-9)
    chat = results["chat completion"][2]
    assert chat["forecast"]["prompt_tokens_estimated"] is False  # counted with the server's tokenizer

    # Every line of the log, from every test so far, names a request its results answer for.
    for client_id in {line["client_request_id"] for line in lines}:
        status, _, result = http(server, "GET", f"/v1/carbon/requests/{client_id}")
        assert status == 200 and result["id"] == client_id, (client_id, result)


def test_live_provider_outage_keeps_waiting_until_intensity_drops(tiny_model_dir, tmp_path):
    fake = FakeElectricityMaps(value=HIGH)
    refresh = 10.0
    env = {
        "VLLM_PLUGINS": "llmco2",
        "LLMCO2_REGION": "DE",
        "LLMCO2_GRID_INTENSITY_URL": fake.url,
        "LLMCO2_GRID_INTENSITY_API_KEY": "test-key",
        "LLMCO2_GRID_INTENSITY_REFRESH_SECONDS": str(refresh),
        "LLMCO2_GRID_INTENSITY_TIMEOUT_SECONDS": "1",
        "LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY": "500",
    }
    log = tmp_path / "serve.log"
    result: dict = {}
    try:
        with LocalVllmServer(tiny_model_dir, SERVER_ARGS, env=env, log_path=log) as server:

            def deferrable_request() -> None:
                started = time.monotonic()
                result["response"] = complete(server, SMALL, {"X-Llmco2-Deferrable": "true"})
                result["waited"] = time.monotonic() - started

            client = threading.Thread(target=deferrable_request)
            client.start()
            # The service hangs past the timeout, then fails: the last known (high) value stays in use.
            for mode in ("hang", "500"):
                fake.mode = mode
                time.sleep(refresh + 2)
                assert client.is_alive(), f"released during the {mode} phase: {result}"
            fake.mode, fake.value = "ok", LOW
            client.join(timeout=3 * refresh)
            assert not client.is_alive()
            status, headers, body = result["response"]
            assert status == 200, body
            assert headers["x-llmco2-admission"] == "admitted; policy=intensity"
            assert result["waited"] >= 2 * refresh
            samples = parse_metrics(server.metrics_text())
            assert metric_sum(samples, "llmco2_admission_waiting_requests") == 0
            deadline = time.monotonic() + 20
            while metric_sum(samples, "llmco2_grid_intensity_errors_total") < 1 and time.monotonic() < deadline:
                time.sleep(1)
                samples = parse_metrics(server.metrics_text())
            assert metric_sum(samples, "llmco2_grid_intensity_errors_total") >= 1  # the engine's provider saw them too
            assert "test-key" not in log.read_text()
    finally:
        fake.close()
