"""``make demo``: a real ``vllm serve`` with the plugin, a short mixed workload, and what it cost.

Creates a tiny random-weight Llama under ``.demo/`` (no model hub), starts the server on
127.0.0.1, sends requests of different prompt and output lengths (some concurrent), then prints
each request's forecast and actual energy and carbon (from ``GET /v1/carbon/requests/{id}``), an
estimate (``POST /v1/carbon/estimate``) and the plugin's metric lines from ``/metrics``, and shuts
the server down.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time
import urllib.request
from pathlib import Path

from llmco2_vllm.dev.local_server import LocalVllmServer
from llmco2_vllm.dev.tiny_model import make_tiny_llama

WORKLOAD = [  # (prompt tokens, max output tokens)
    (8, 16),
    (40, 8),
    (120, 4),  # longer than the 64-token step budget: chunked prefill
    (16, 32),
    (64, 12),
    (200, 6),
    (120, 4),  # the same prompt as the third request: prefix-cache hit
    (24, 24),
]


def prompt(length: int) -> list[int]:
    return [(13 * i) % 500 + 3 for i in range(length)]


def main() -> int:
    workdir = Path(".demo")
    workdir.mkdir(exist_ok=True)
    print("Creating a tiny random-weight Llama in .demo/tiny-llama ...", flush=True)
    model_dir = make_tiny_llama(workdir / "tiny-llama")
    results_path = workdir / "requests.jsonl"
    results_path.unlink(missing_ok=True)
    env = {"LLMCO2_REQUEST_LOG": str(results_path.resolve()), "VLLM_PLUGINS": "llmco2"}
    args = ["--max-num-batched-tokens", "64", "--enable-prefix-caching", "--block-size", "32"]
    print("Starting vllm serve on 127.0.0.1 with the llmco2 plugin (log: .demo/serve.log) ...", flush=True)
    started = time.monotonic()
    with LocalVllmServer(model_dir, args, env=env, log_path=workdir / "serve.log") as server:
        print(f"Server ready in {time.monotonic() - started:.0f} s; sending {len(WORKLOAD)} requests, 4 at a time.")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda job: server.complete(prompt(job[0]), job[1]), WORKLOAD))
        records = _wait_for_records(results_path, len(WORKLOAD))
        metrics = _wait_for_metrics(server, len(WORKLOAD))
        results = [_get_json(server.base_url + f"/v1/carbon/requests/{response['id']}") for response in responses]
        estimate = server.post("/v1/carbon/estimate", {"prompt_tokens": 200, "max_tokens": 100})
        exact = server.post("/v1/carbon/estimate", {"prompt_tokens": 200, "max_tokens": 100, "ignore_eos": True})
    print()
    print(
        f"{'request':<30} {'prompt':>6} {'cached':>6} {'output':>6} {'forecast J':>11} {'80 % interval':>15} {'prefill J':>10} "
        f"{'decode J':>10} {'actual J':>10} {'gCO2e':>10}"
    )
    for response, result in zip(responses, results):
        usage = response["usage"]
        actual = (result or {}).get("actual")
        if not actual:
            print(f"{response['id'][:30]:<30} {usage['prompt_tokens']:>6} {'?':>6} {usage['completion_tokens']:>6}  (no result)")
            continue
        print(
            f"{response['id'][:30]:<30} {usage['prompt_tokens']:>6} {actual['cached_tokens']:>6} "
            f"{usage['completion_tokens']:>6} {result['forecast']['energy_j']:>11.4f} "
            f"{result['forecast']['energy_j_low']:>7.3f}-{result['forecast']['energy_j_high']:<7.3f} {actual['prefill_energy_j']:>10.4f} "
            f"{actual['decode_energy_j']:>10.4f} {actual['energy_j']:>10.4f} {actual['grams_co2e']:>10.6f}"
        )
    first = records[0] if records else {}
    forecast = estimate["forecast"]
    print(
        f"\nPredicted for {first.get('gpu', '?')} ({first.get('hardware_source', '?')}: no GPU here), "
        f"grid intensity {forecast['grid_intensity_grams_per_kwh']:.0f} gCO2e/kWh, PUE {first.get('pue', 1.0)}; "
        "gCO2e = operational + embodied share."
    )
    for label, answer in (("up to 100 output tokens (it may stop after one)", estimate),
                          ("exactly 100 output tokens (ignore_eos)", exact)):  # fmt: skip
        f = answer["forecast"]
        print(
            f"Estimate now for 200 prompt tokens and {label}: {f['energy_j']:.3f} J "
            f"(80 % interval {f['energy_j_low']:.3f}-{f['energy_j_high']:.3f}), {f['grams_co2e']:.6f} gCO2e; "
            f"admission: {answer['admission']['decision']}."
        )
    print("\nPlugin metrics on /metrics:")
    for line in metrics.splitlines():
        if line.startswith("llmco2_") and "_created" not in line and "_bucket" not in line:
            print("  " + line)
    print("\nServer stopped.")
    return 0


def _wait_for_metrics(server: LocalVllmServer, count: int, timeout: float = 30.0) -> str:
    """The plugin publishes every flush interval: wait until /metrics shows every request."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics_text()
        finished = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "llmco2_requests_total"
        )
        if finished >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _wait_for_records(path: Path, count: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    records: list[dict] = []
    while time.monotonic() < deadline:
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if len(records) >= count:
                break
        time.sleep(0.2)
    return records


if __name__ == "__main__":
    sys.exit(main())
