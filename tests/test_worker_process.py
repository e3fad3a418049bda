"""The plugin's worker process (``LLMCO2_WORKER=process``, the default), driven with real vLLM step objects.

The same recorded steps go through ``WorkerProcess`` (compacted in this process, accounted in a
real child process) and through an in-process ``EnginePipeline``: the results must be identical.
Also: a worker that cannot start fails the plugin at start-up with its reason; a worker that dies
leaves the engine side serving, with one log line and bounded memory; the worker ignores the
signals meant for the server and finishes its accounting when the engine closes the pipe.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time

import pytest

from conftest import REPO_ROOT, metric_sum, parse_metrics
from llmco2_vllm.hardware import Hardware, find_gpu
from llmco2_vllm.model_description import load_model
from llmco2_vllm.settings import Settings
from llmco2_vllm.worker_process import PipelineSpec, WorkerProcess, build_pipeline

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(autouse=True)
def _analytic_settings(monkeypatch):
    # The worker reads its settings from the environment it inherits, like in vllm serve.
    monkeypatch.setenv("LLMCO2_PREDICTOR", "analytic")
    monkeypatch.setenv("LLMCO2_MEASURE_ENERGY", "false")


def spec(tmp_path, engine: str = "0") -> PipelineSpec:
    return PipelineSpec(
        model_name=MODEL_ID,
        model=load_model(MODEL_ID),
        hardware=Hardware(find_gpu("H100"), 1, 1, "configured"),
        pipeline_parallel=1,
        engine=engine,
        gpu_indices=(0,),
        snapshot_path=str(tmp_path / f"engine-{engine}.prom"),
        results_dir=None,
    )


def simulated_steps(count: int, batch: int = 16, seed: int = 3):
    """Real vLLM SchedulerOutputs and engine outputs of a steady serving mix (requests finish and arrive)."""
    from step_recording import StepSimulator, engine_outputs_for

    simulator = StepSimulator(batch, random.Random(seed), "w")
    steps = []
    for _ in range(count):
        output = simulator.step()
        steps.append((output, engine_outputs_for(output) if len(steps) % 5 == 4 else {}))
    return steps


def record_all(recorder, steps) -> None:
    for output, engine_outputs in steps:
        recorder.record(output, engine_outputs, time.perf_counter())


def comparable(report: dict) -> dict:
    samples = parse_metrics(report["metrics"])
    return {
        "samples": {key: "nan" if value != value else value for key, value in samples.items()},
        "finished": sorted(
            (f["request_id"], round(f["prefill_energy_j"], 9), round(f["decode_energy_j"], 9), f["decode_tokens"])
            for f in report["finished"]
        ),
        "ledger_size": report["ledger_size"],
        "steps_processed": report["steps_processed"],
    }


def test_worker_process_accounts_exactly_like_the_in_process_pipeline(tmp_path):
    steps = simulated_steps(300)
    worker = WorkerProcess(spec(tmp_path / "process"), Settings.from_env())
    try:
        record_all(worker.recorder, steps)
        by_process = worker.report(timeout=60)
    finally:
        worker.stop()
    in_process = build_pipeline(spec(tmp_path / "thread"), Settings.from_env())
    record_all(in_process.recorder, steps)
    in_process.process_pending()
    by_thread = in_process.report()
    in_process.stop()

    assert by_process is not None
    assert by_process["steps_processed"] == 300
    got, expected = comparable(by_process), comparable(by_thread)
    assert len(got["finished"]) > 50
    assert got["finished"] == expected["finished"]
    assert got["ledger_size"] == expected["ledger_size"]
    # Wall-time-driven series (step wall seconds, embodied carbon in request carbon, capture lag, creation
    # times) differ between two runs; everything counted from the steps must be equal.
    timing = ("wall", "embodied", "lag", "age", "idle", "_created", "request_carbon")
    counted = {k: v for k, v in got["samples"].items() if not any(word in k[0] for word in timing)}
    assert counted == {k: v for k, v in expected["samples"].items() if not any(word in k[0] for word in timing)}
    assert metric_sum(got["samples"], "llmco2_steps_total") == 300
    assert metric_sum(got["samples"], "llmco2_plugin_errors_total") == 0
    # The final publish at stop wrote the snapshot the API server serves.
    snapshot = parse_metrics((tmp_path / "process" / "engine-0.prom").read_text())
    assert metric_sum(snapshot, "llmco2_steps_total") == 300


def test_worker_that_cannot_start_fails_the_plugin_at_startup(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCO2_PREDICTOR", "no_such_package.module:Predictor")
    with pytest.raises(RuntimeError, match="could not start.*no_such_package"):
        WorkerProcess(spec(tmp_path), Settings.from_env())


def test_dead_worker_leaves_the_engine_serving(tmp_path, caplog):
    worker = WorkerProcess(spec(tmp_path), Settings.from_env())
    try:
        record_all(worker.recorder, simulated_steps(20))
        assert worker.wait_idle(timeout=60)
        worker._process.kill()
        worker._process.wait(10)
        with caplog.at_level(logging.ERROR, logger="llmco2_vllm"):
            for _ in range(3):  # more steps after the death: forwarded nowhere, never piling up
                record_all(worker.recorder, simulated_steps(50, seed=4))
                deadline = time.monotonic() + 10
                while len(worker.recorder) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert len(worker.recorder) == 0
        assert not worker.alive
        assert worker.wait_idle(timeout=1) is False
        gone = [r for r in caplog.records if "worker process is gone" in r.getMessage()]
        assert len(gone) == 1
    finally:
        worker.stop(timeout=2)


def test_worker_ignores_server_signals_and_finishes_on_end_of_input(tmp_path):
    worker = WorkerProcess(spec(tmp_path), Settings.from_env())
    record_all(worker.recorder, simulated_steps(40))
    assert worker.wait_idle(timeout=60)
    record_all(worker.recorder, simulated_steps(10, seed=5))
    os.kill(worker._process.pid, signal.SIGTERM)
    os.kill(worker._process.pid, signal.SIGINT)
    time.sleep(0.3)
    assert worker.alive
    worker._stop.set()  # the engine goes away without saying stop: only the pipe closes
    worker._thread.join(5)
    worker.forward_pending()
    worker._process.stdin.close()
    assert worker._process.wait(30) == 0
    snapshot = parse_metrics((tmp_path / "engine-0.prom").read_text())
    assert metric_sum(snapshot, "llmco2_steps_total") == 50
