"""A real vLLM engine (offline ``LLM``, engine core in-process, run by ``support/offline_engine_run.py`` in a
child process of the test) with the plugin's scheduler hook.

Identities checked (no preemption in these runs):
- computed prefill tokens + prefix-cache hit tokens = prompt tokens, per request and in total;
- decode tokens + 1 per request = generated tokens (the first output token comes from the last
  prefill step, every further one from one decode position);
- per-request attributed energy sums to the engine's energy counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics

pytestmark = pytest.mark.server

MAX_BATCHED_TOKENS = 32  # so a 70-token prompt runs as chunked prefill


@pytest.fixture(scope="module", params=["process", "thread"])
def offline_run(request, tiny_model_dir):
    """The same run with the accounting in a worker process (the default) and in a thread."""
    script = Path(__file__).parent / "support" / "offline_engine_run.py"
    env = {**os.environ}
    if request.param == "thread":
        env["LLMCO2_WORKER"] = "thread"
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(MAX_BATCHED_TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("LLMCO2_RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    run = json.loads(lines[-1].removeprefix("LLMCO2_RESULT "))
    assert run["idle"], "the plugin's worker did not catch up"
    assert run["worker"] == request.param
    run["samples"] = parse_metrics(run["metrics"])
    return run


def test_prompt_tokens_reconcile_with_prefix_cache(offline_run):
    outputs, samples = offline_run["outputs"], offline_run["samples"]
    prompt_tokens = sum(o["prompt_tokens"] for o in outputs)
    cached_by_vllm = sum(o["cached_tokens"] for o in outputs)
    prefill = metric_sum(samples, "llmco2_tokens_total", phase="prefill")
    cached = metric_sum(samples, "llmco2_tokens_total", phase="cached")
    assert cached_by_vllm > 0, "the repeated prompt should hit the prefix cache"
    assert cached == cached_by_vllm
    assert prefill + cached == prompt_tokens


def test_generated_tokens_reconcile(offline_run):
    outputs, samples = offline_run["outputs"], offline_run["samples"]
    generated = sum(o["generated_tokens"] for o in outputs)
    decode = metric_sum(samples, "llmco2_tokens_total", phase="decode")
    assert decode + len(outputs) == generated


def test_per_request_records(offline_run):
    outputs, records = offline_run["outputs"], offline_run["finished"]
    finished = {f["request_id"].rsplit("-", 1)[0]: f for f in records}
    assert offline_run["ledger_size"] == 0, "finished requests must leave the ledger"
    for output in outputs:
        energy = finished[output["request_id"]]  # engine ids are the client's id plus "-<hex>"
        assert energy["prefill_tokens"] + energy["cached_tokens"] == output["prompt_tokens"]
        assert energy["decode_tokens"] + 1 == output["generated_tokens"]
        assert energy["prefill_energy_j"] > 0 and energy["decode_energy_j"] > 0
    # The chunked prompt (70 tokens, 32-token budget) took several prefill steps.
    long_record = max(records, key=lambda f: f["prefill_tokens"])
    assert long_record["steps"] >= 3 + 4


def test_attributed_energy_sums_to_step_energy(offline_run):
    samples, records = offline_run["samples"], offline_run["finished"]
    step_energy = sum(
        metric_sum(samples, "llmco2_energy_joules_total", source="predicted", phase=phase) for phase in ("prefill", "decode")
    )
    request_energy = sum(f["prefill_energy_j"] + f["decode_energy_j"] for f in records)
    assert step_energy > 0
    assert request_energy == pytest.approx(step_energy, rel=1e-3)
    histogram_sum = metric_sum(samples, "llmco2_request_energy_joules_sum")
    assert histogram_sum == pytest.approx(step_energy, rel=1e-3)
    # A request's carbon: operational (of calibrated energy) + its share of the steps' embodied carbon.
    carbon = sum(
        metric_sum(samples, "llmco2_carbon_grams_total", source="calibrated", phase=phase)
        + metric_sum(samples, "llmco2_embodied_carbon_grams_total", phase=phase)
        for phase in ("prefill", "decode")
    )
    assert carbon == pytest.approx(metric_sum(samples, "llmco2_request_carbon_grams_sum"), rel=1e-3)


def test_target_hardware_is_labelled(offline_run):
    samples = offline_run["samples"]
    info = [labels for (name, labels), value in samples.items() if name == "llmco2_target_info" and value == 1]
    assert len(info) == 1
    labels = dict(info[0])
    assert labels["hardware_source"] == "configured"  # no GPU on this machine
    assert labels["gpu"] == "H100-SXM5-80GB"
    assert labels["predictor"] == "fitted"  # the default
    assert metric_sum(samples, "llmco2_plugin_errors_total") == 0
    assert metric_sum(samples, "llmco2_dropped_steps_total") == 0


def test_calibration_path_without_gpu(offline_run):
    """On a CPU host the measured path is absent, the calibrated path equals the prediction."""
    samples, records = offline_run["samples"], offline_run["finished"]
    assert metric_sum(samples, "llmco2_energy_measurement_available") == 0
    assert not any(dict(labels).get("source") == "measured" for _, labels in samples)
    for phase in ("prefill", "decode"):
        predicted = metric_sum(samples, "llmco2_energy_joules_total", source="predicted", phase=phase)
        calibrated = metric_sum(samples, "llmco2_energy_joules_total", source="calibrated", phase=phase)
        assert calibrated == pytest.approx(predicted, rel=1e-9)
        assert metric_sum(samples, "llmco2_calibration_scale", phase=phase) == 1.0
    assert metric_sum(samples, "llmco2_calibration_windows") == 0
    for record in records:
        calibrated = record["calibrated_prefill_energy_j"] + record["calibrated_decode_energy_j"]
        assert calibrated == pytest.approx(record["prefill_energy_j"] + record["decode_energy_j"])
