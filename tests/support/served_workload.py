"""The workload the real-server tests send, and the identities between the plugin's and vLLM's counters.

Reconciliation identities against vLLM's own counters (no preemption here):
- llmco2_tokens_total{phase="prefill"} == vllm:prompt_tokens_by_source_total{source="local_compute"}
- llmco2_tokens_total{phase="cached"}  == vllm:prompt_tokens_by_source_total{source="local_cache_hit"}
- prefill + cached == vllm:prompt_tokens_total
- llmco2_tokens_total{phase="decode"} + finished requests == vllm:generation_tokens_total
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from llmco2_vllm.dev.local_server import LocalVllmServer
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics

LONG_PROMPT = [(11 * i) % 500 + 3 for i in range(120)]  # > max-num-batched-tokens: chunked prefill


def send_workload(server: LocalVllmServer) -> int:
    """Mixed prompt and output lengths, some concurrent, one chunked and one repeated prompt."""
    jobs = [(list(range(1, 6 + 9 * i)), 3 + 2 * i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: server.complete(*job), jobs))
    results.append(server.complete(LONG_PROMPT, 6))
    results.append(server.complete(LONG_PROMPT, 4))  # prefix-cache hit
    for result, max_tokens in zip(results, [j[1] for j in jobs] + [6, 4]):
        assert result["usage"]["completion_tokens"] == max_tokens
    return len(results)


def wait_until(server: LocalVllmServer, condition, timeout: float = 60.0) -> dict:
    """Poll /metrics until ``condition(samples)`` holds (the plugin publishes periodically); return the samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = parse_metrics(server.metrics_text())
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def prompt_tokens_accounted(samples: dict) -> bool:
    accounted = metric_sum(samples, "llmco2_tokens_total", phase="prefill") + metric_sum(
        samples, "llmco2_tokens_total", phase="cached"
    )
    return accounted == metric_sum(samples, "vllm:prompt_tokens_total")


def wait_for_requests(server: LocalVllmServer, count: int) -> dict:
    # Generous: on a slow, shared CI machine the worker may still be accounting a burst's last steps.
    return wait_until(server, lambda samples: metric_sum(samples, "llmco2_requests_total") >= count, timeout=180.0)


def assert_reconciles(samples: dict, requests: int) -> None:
    prefill = metric_sum(samples, "llmco2_tokens_total", phase="prefill")
    decode = metric_sum(samples, "llmco2_tokens_total", phase="decode")
    cached = metric_sum(samples, "llmco2_tokens_total", phase="cached")
    counted = {name: metric_sum(samples, name) for name in (
        "llmco2_requests_total", "vllm:request_success_total", "llmco2_dropped_steps_total", "llmco2_evicted_requests_total",
        "llmco2_plugin_errors_total", "llmco2_queue_depth", "llmco2_capture_lag_seconds")}  # fmt: skip
    assert counted["llmco2_requests_total"] == requests, counted  # the others say why when it is not
    assert cached > 0, "the repeated long prompt must hit the prefix cache"
    assert prefill == metric_sum(samples, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert cached == metric_sum(samples, "vllm:prompt_tokens_by_source_total", source="local_cache_hit")
    assert prefill + cached == metric_sum(samples, "vllm:prompt_tokens_total")
    assert decode + requests == metric_sum(samples, "vllm:generation_tokens_total")
    energy = sum(
        metric_sum(samples, "llmco2_energy_joules_total", source="predicted", phase=phase) for phase in ("prefill", "decode")
    )
    assert energy > 0
    assert metric_sum(samples, "llmco2_request_energy_joules_sum") == pytest.approx(energy, rel=1e-3)
    assert metric_sum(samples, "llmco2_request_energy_joules_count") == requests
    assert metric_sum(samples, "llmco2_plugin_errors_total") == 0
