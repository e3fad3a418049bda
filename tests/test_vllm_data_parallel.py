"""A real ``vllm serve --data-parallel-size 2`` (two engine processes, one API server) with a
scripted NVML of two GPUs: each engine is labelled by its data-parallel index, meters its own GPU
(DP rank r holds CUDA ordinal r), and the plugin's counters add up to vLLM's own.

Requests are routed to an engine with vLLM's ``X-data-parallel-rank`` header and sent one at a
time: vLLM's CPU build hangs under concurrent load with two engines, with or without the plugin
(checked with ``LLMCO2_ENABLED=false``), so concurrency is not what this test can show.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from llmco2_vllm.dev.local_server import LocalVllmServer
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics
from tests.support import REPO_ROOT

pytestmark = pytest.mark.server

GPUS = [{"uuid": "GPU-dp-0", "watts": 120.0}, {"uuid": "GPU-dp-1", "watts": 480.0}]
PER_ENGINE = {"0": 2, "1": 3}


def test_two_data_parallel_engines_are_labelled_metered_and_add_up(tiny_model_dir, tmp_path):
    script = tmp_path / "nvml.json"
    script.write_text(json.dumps({"gpus": GPUS}))
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests/support/scripted_nvml"), os.environ.get("PYTHONPATH", "")]),
        "SCRIPTED_NVML_FILE": str(script),
        "LLMCO2_CALIBRATION_WINDOW_SECONDS": "1",
    }
    log = tmp_path / "serve.log"
    with LocalVllmServer(tiny_model_dir, ["--data-parallel-size", "2"], env=env, log_path=log) as server:
        for engine, count in PER_ENGINE.items():
            for _ in range(count):
                body = {"model": "tiny-llama", "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 8, "ignore_eos": True}
                reply = server.post("/v1/completions", body, headers={"X-data-parallel-rank": engine})
                assert reply["usage"]["completion_tokens"] == 8
        deadline = time.monotonic() + 60
        while True:
            samples = parse_metrics(server.metrics_text())
            requests = {engine: metric_sum(samples, "llmco2_requests_total", engine=engine) for engine in PER_ENGINE}
            power = {
                (dict(labels)["engine"], dict(labels)["gpu_uuid"]): value
                for (name, labels), value in samples.items()
                if name == "llmco2_gpu_power_watts"
            }
            if (requests == PER_ENGINE and len(power) == 2) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert requests == PER_ENGINE, log.read_text()[-3000:]
        # vLLM's own count of finished requests, both engines together.
        assert metric_sum(samples, "vllm:request_success_total") == sum(PER_ENGINE.values())
        assert set(power) == {("0", "GPU-dp-0"), ("1", "GPU-dp-1")}
        assert power[("0", "GPU-dp-0")] == pytest.approx(120.0, rel=0.15)
        assert power[("1", "GPU-dp-1")] == pytest.approx(480.0, rel=0.15)
        for engine in PER_ENGINE:
            assert metric_sum(samples, "llmco2_energy_joules_total", engine=engine, source="measured") == pytest.approx(
                metric_sum(samples, "llmco2_gpu_energy_joules_total", engine=engine), rel=1e-6
            )
