"""A real vLLM engine (offline ``LLM``, engine in this process) with the plugin's scheduler hook.

Identities checked (no preemption in these runs):
- computed prefill tokens + prefix-cache hit tokens = prompt tokens, per request and in total;
- decode tokens + 1 per request = generated tokens (the first output token comes from the last
  prefill step, every further one from one decode position);
- per-request attributed energy sums to the engine's energy counters.
"""

from __future__ import annotations

import os

import pytest

from conftest import metric_sum, parse_metrics

MAX_BATCHED_TOKENS = 32  # so a 70-token prompt runs as chunked prefill


@pytest.fixture(scope="module")
def offline_run(tiny_model_dir):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
    from prometheus_client import generate_latest
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from llmco2_vllm.vllm_plugin import engine_pipelines

    llm = LLM(
        model=str(tiny_model_dir),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        max_num_seqs=8,
        enable_prefix_caching=True,
        block_size=32,
        seed=0,
    )
    long_prompt = [(7 * i) % 500 + 3 for i in range(70)]
    prompts = [[5, 6, 7, 8, 9], list(range(10, 30)), long_prompt]
    max_tokens = [3, 8, 5]
    first = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0) for m in max_tokens],
    )
    # The same long prompt again: its full blocks come from the prefix cache.
    second = llm.generate([TokensPrompt(prompt_token_ids=long_prompt)], SamplingParams(max_tokens=4, ignore_eos=True))
    pipeline = engine_pipelines()[-1]
    assert pipeline.wait_idle(timeout=30)
    text = generate_latest(pipeline.registry).decode()
    yield {"outputs": first + second, "pipeline": pipeline, "samples": parse_metrics(text), "text": text}
    del llm


def test_prompt_tokens_reconcile_with_prefix_cache(offline_run):
    outputs, samples = offline_run["outputs"], offline_run["samples"]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    cached_by_vllm = sum(o.num_cached_tokens or 0 for o in outputs)
    prefill = metric_sum(samples, "llmco2_tokens_total", phase="prefill")
    cached = metric_sum(samples, "llmco2_tokens_total", phase="cached")
    assert cached_by_vllm > 0, "the repeated prompt should hit the prefix cache"
    assert cached == cached_by_vllm
    assert prefill + cached == prompt_tokens


def test_generated_tokens_reconcile(offline_run):
    outputs, samples = offline_run["outputs"], offline_run["samples"]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    decode = metric_sum(samples, "llmco2_tokens_total", phase="decode")
    assert decode + len(outputs) == generated


def test_per_request_records(offline_run):
    outputs, pipeline = offline_run["outputs"], offline_run["pipeline"]
    finished = {f.request_id.rsplit("-", 1)[0]: f for f in pipeline.finished}
    assert len(pipeline.ledger) == 0, "finished requests must leave the ledger"
    for output in outputs:
        energy = finished[output.request_id].energy  # engine ids are the client's id plus "-<hex>"
        assert energy.prefill_tokens + energy.cached_tokens == len(output.prompt_token_ids)
        assert energy.decode_tokens + 1 == len(output.outputs[0].token_ids)
        assert energy.prefill_energy_j > 0 and energy.decode_energy_j > 0
    # The chunked prompt (70 tokens, 32-token budget) took several prefill steps.
    long_record = max(pipeline.finished, key=lambda f: f.energy.prefill_tokens)
    assert long_record.energy.steps >= 3 + 4


def test_attributed_energy_sums_to_step_energy(offline_run):
    samples, pipeline = offline_run["samples"], offline_run["pipeline"]
    step_energy = sum(
        metric_sum(samples, "llmco2_energy_joules_total", source="predicted", phase=phase) for phase in ("prefill", "decode")
    )
    request_energy = sum(f.energy.energy_j for f in pipeline.finished)
    assert step_energy > 0
    assert request_energy == pytest.approx(step_energy, rel=1e-3)
    histogram_sum = metric_sum(samples, "llmco2_request_energy_joules_sum")
    assert histogram_sum == pytest.approx(step_energy, rel=1e-3)
    carbon = sum(
        metric_sum(samples, "llmco2_carbon_grams_total", source="predicted", phase=phase) for phase in ("prefill", "decode")
    )
    assert carbon == pytest.approx(metric_sum(samples, "llmco2_request_carbon_grams_sum"), rel=1e-3)


def test_target_hardware_is_labelled(offline_run):
    samples = offline_run["samples"]
    info = [labels for (name, labels), value in samples.items() if name == "llmco2_target_info" and value == 1]
    assert len(info) == 1
    labels = dict(info[0])
    assert labels["hardware_source"] == "configured"  # no GPU on this machine
    assert labels["gpu"] == "H100-SXM5-80GB"
    assert labels["predictor"] == "analytic"
    assert metric_sum(samples, "llmco2_plugin_errors_total") == 0
    assert metric_sum(samples, "llmco2_dropped_steps_total") == 0


def test_calibration_path_without_gpu(offline_run):
    """On a CPU host the measured path is absent, the calibrated path equals the prediction."""
    samples, pipeline = offline_run["samples"], offline_run["pipeline"]
    assert metric_sum(samples, "llmco2_energy_measurement_available") == 0
    assert not any(dict(labels).get("source") == "measured" for _, labels in samples)
    for phase in ("prefill", "decode"):
        predicted = metric_sum(samples, "llmco2_energy_joules_total", source="predicted", phase=phase)
        calibrated = metric_sum(samples, "llmco2_energy_joules_total", source="calibrated", phase=phase)
        assert calibrated == pytest.approx(predicted, rel=1e-9)
        assert metric_sum(samples, "llmco2_calibration_scale", phase=phase) == 1.0
    assert metric_sum(samples, "llmco2_calibration_windows") == 0
    for record in pipeline.finished:
        assert record.energy.calibrated_energy_j == pytest.approx(record.energy.energy_j)
