"""A real ``vllm serve`` on 127.0.0.1 with the plugin installed (no flag needed: entry points).

The plugin's counters reconcile with vLLM's own: the identities are in ``tests/support/served_workload.py``.
"""

from __future__ import annotations

import subprocess

import pytest

from llmco2_vllm.dev.local_server import LocalVllmServer
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics
from tests.support import REPO_ROOT
from tests.support.served_workload import (
    assert_reconciles,
    prompt_tokens_accounted,
    send_workload,
    wait_for_requests,
    wait_until,
)

pytestmark = pytest.mark.server

SERVER_ARGS = ["--max-num-batched-tokens", "64", "--max-num-seqs", "8", "--enable-prefix-caching", "--block-size", "32"]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with LocalVllmServer(tiny_model_dir, SERVER_ARGS, log_path=log) as server:
        requests = send_workload(server)
        first = server.metrics_text()
        samples = wait_for_requests(server, requests)
        text = server.metrics_text()
        yield {"server": server, "requests": requests, "first": first, "samples": samples, "text": text, "log": log}


def test_counters_reconcile_with_vllm(served):
    assert_reconciles(served["samples"], served["requests"])


def test_metrics_parse_and_are_labelled(served):
    text = served["text"]
    samples = parse_metrics(text)  # prometheus_client's exposition parser; raises on malformed text
    names = {name for name, _ in samples}
    for expected in (
        "llmco2_energy_joules_total",
        "llmco2_carbon_grams_total",
        "llmco2_tokens_total",
        "llmco2_steps_total",
        "llmco2_request_energy_joules_bucket",
        "llmco2_request_carbon_grams_bucket",
        "llmco2_target_info",
        "llmco2_plugin_errors_total",
        "llmco2_dropped_steps_total",
        "llmco2_grid_intensity_grams_per_kwh",
        "llmco2_pue",
        "llmco2_energy_measurement_available",
        "llmco2_calibration_scale",
        "llmco2_calibration_idle_watts",
        "llmco2_calibration_windows",
        "llmco2_prediction_error_ratio",
        "llmco2_calibrated_term_ratio",
        "llmco2_term_calibration_error_ratio",
    ):
        assert expected in names, expected
    # The fitted model's terms as shipped (no calibration file, no NVML here): every ratio is 1.
    ratios = {dict(labels)["parameter"]: value for (name, labels), value in samples.items()
              if name == "llmco2_calibrated_term_ratio"}  # fmt: skip
    assert ratios and all(value == 1.0 for value in ratios.values()), ratios
    for (name, labels) in samples:
        if name.startswith("llmco2_"):
            label_names = dict(labels)
            assert label_names.get("model_name") == "tiny-llama"
            assert "request_id" not in label_names
    # One series per (model, engine, ...) - the snapshot bridge must not duplicate families.
    assert text.count("# TYPE llmco2_energy_joules_total counter") == 1


def test_counters_only_grow(served):
    before = parse_metrics(served["first"])
    after = parse_metrics(served["server"].metrics_text())
    for key, value in before.items():
        if key[0].startswith("llmco2_") and (key[0].endswith("_total") or key[0].endswith("_count")):
            assert after.get(key, 0) >= value, key


@pytest.mark.skipif(not __import__("shutil").which("promtool"), reason="promtool not installed")
def test_promtool_accepts_metrics(served):
    lines = [line for line in served["text"].splitlines() if "llmco2_" in line]
    result = subprocess.run(["promtool", "check", "metrics"], input="\n".join(lines) + "\n", text=True, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_api_servers_count_once(tiny_model_dir, tmp_path):
    args = SERVER_ARGS + ["--api-server-count", "2"]
    env = {"VLLM_PLUGINS": "llmco2"}  # with the HTTP part: its counters add up over the API servers
    with LocalVllmServer(tiny_model_dir, args, env=env, log_path=tmp_path / "serve.log") as server:
        requests = send_workload(server)
        samples = wait_for_requests(server, requests)
        assert_reconciles(samples, requests)
        assert metric_sum(samples, "llmco2_admission_decisions_total", decision="admitted") == requests
        # Every API server serves the same totals, and the results of every request (shared database).
        for _ in range(4):
            again = parse_metrics(server.metrics_text())
            assert metric_sum(again, "llmco2_tokens_total") == metric_sum(samples, "llmco2_tokens_total")
        for _ in range(4):
            result = server.get(f"/v1/carbon/requests/{server.complete([1, 2, 3], 2)['id']}")
            assert result["forecast"]["max_tokens"] == 2


def test_prediction_fault_keeps_serving(tiny_model_dir, tmp_path):
    env = {"LLMCO2_PREDICTOR": "tests.support.faulty_predictor:FailingPredictor", "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / "serve.log"
    with LocalVllmServer(tiny_model_dir, SERVER_ARGS, env=env, log_path=log) as server:
        send_workload(server)  # asserts every request completes
        # Tokens are still accounted when prediction fails.
        def accounted_with_failures(samples) -> bool:
            return prompt_tokens_accounted(samples) and metric_sum(samples, "llmco2_plugin_errors_total", stage="predict") > 0

        samples = wait_until(server, accounted_with_failures)
        assert prompt_tokens_accounted(samples), log.read_text()[-3000:]
        assert metric_sum(samples, "llmco2_plugin_errors_total", stage="predict") > 0
    assert log.read_text().count("injected prediction failure") == 1  # logged once


def test_wrong_setting_fails_at_startup(tiny_model_dir, tmp_path):
    log = tmp_path / "serve.log"
    server = LocalVllmServer(tiny_model_dir, env={"LLMCO2_TARGET_GPU": "H900"}, log_path=log, startup_timeout_seconds=120)
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()
    text = log.read_text()
    assert "LLMCO2_TARGET_GPU='H900'" in text and "llmco2 gpus" in text
