"""The accounting worker in both modes, driven with real vLLM step objects through the plugin's ``StepForwarder``.

The same recorded steps go through the worker process (``LLMCO2_WORKER=process``, the default:
compacted in this process, accounted in a real child process) and through the worker thread
(``thread``): the results must be identical, since both carry the same step contract.
Also: a worker that cannot start fails the plugin at start-up with its reason; a worker that dies
leaves the engine side serving, with one log line and bounded memory; the worker ignores the
signals meant for the server and finishes its accounting when the engine closes the pipe.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time

import pytest

from llmco2_vllm.accounting.worker import WorkerSpec
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics
from llmco2_vllm.dev.step_simulator import StepSimulator, engine_outputs_for
from llmco2_vllm.plugin.step_forwarder import StepForwarder
from llmco2_vllm.predict.deployment import Deployment
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.settings import Settings

MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(autouse=True)
def _analytic_settings(monkeypatch):
    # The worker reads its settings from the environment it inherits, like in vllm serve.
    monkeypatch.setenv("LLMCO2_PREDICTOR", "analytic")
    monkeypatch.setenv("LLMCO2_MEASURE_ENERGY", "false")


def spec(tmp_path, engine: str = "0") -> WorkerSpec:
    return WorkerSpec(
        deployment=Deployment(MODEL_ID, load_model(MODEL_ID), Hardware(find_gpu("H100"), 1, 1, "configured")),
        engine=engine,
        gpu_indices=(0,),
        snapshot_path=str(tmp_path / f"engine-{engine}.prom"),
        results_dir=None,
    )


def simulated_steps(count: int, batch: int = 16, seed: int = 3):
    """Real vLLM SchedulerOutputs and engine outputs of a steady serving mix (requests finish and arrive)."""
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


def account(steps, worker_spec: WorkerSpec) -> dict | None:
    forwarder = StepForwarder(worker_spec, Settings.from_env())
    try:
        record_all(forwarder.recorder, steps)
        return forwarder.report(timeout=60)
    finally:
        forwarder.stop()


def test_spec_crosses_processes_as_json(tmp_path):
    original = spec(tmp_path)
    assert WorkerSpec.from_json(original.to_json()) == original


def test_worker_process_accounts_exactly_like_the_worker_thread(tmp_path, monkeypatch):
    steps = simulated_steps(300)
    by_process = account(steps, spec(tmp_path / "process"))
    monkeypatch.setenv("LLMCO2_WORKER", "thread")
    by_thread = account(steps, spec(tmp_path / "thread"))

    assert by_process is not None and by_thread is not None
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
        StepForwarder(spec(tmp_path), Settings.from_env())


def test_dead_worker_leaves_the_engine_serving(tmp_path, caplog):
    worker = StepForwarder(spec(tmp_path), Settings.from_env())
    try:
        record_all(worker.recorder, simulated_steps(20))
        assert worker.wait_idle(timeout=60)
        worker._transport.process.kill()
        worker._transport.process.wait(10)
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
    worker = StepForwarder(spec(tmp_path), Settings.from_env())
    record_all(worker.recorder, simulated_steps(40))
    assert worker.wait_idle(timeout=60)
    record_all(worker.recorder, simulated_steps(10, seed=5))
    process = worker._transport.process
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGINT)
    time.sleep(0.3)
    assert worker.alive
    worker._stop.set()  # the engine goes away without saying stop: only the pipe closes
    worker._thread.join(5)
    worker.forward_pending()
    process.stdin.close()
    assert process.wait(30) == 0
    snapshot = parse_metrics((tmp_path / "engine-0.prom").read_text())
    assert metric_sum(snapshot, "llmco2_steps_total") == 50


def test_idle_worker_publishes_when_due_without_new_messages(tmp_path, monkeypatch):
    """The reader loop waits only until the next publication is due: steps show up on the snapshot while no
    more messages arrive and the engine keeps running (no stop, no sync)."""
    monkeypatch.setenv("LLMCO2_FLUSH_INTERVAL_SECONDS", "0.2")
    worker = StepForwarder(spec(tmp_path), Settings.from_env())
    try:
        record_all(worker.recorder, simulated_steps(20))
        snapshot_path = tmp_path / "engine-0.prom"
        deadline = time.monotonic() + 20
        steps = 0.0
        while time.monotonic() < deadline:
            if snapshot_path.exists():
                steps = metric_sum(parse_metrics(snapshot_path.read_text()), "llmco2_steps_total")
                if steps == 20:
                    break
            time.sleep(0.05)
        assert steps == 20
    finally:
        worker.stop()


def test_a_failing_batch_is_counted_and_the_worker_keeps_accounting():
    """A failure that escapes the pipeline's own guards costs that batch, never the rest of the run."""
    from llmco2_vllm.accounting.worker import _account

    class Pipeline:
        def __init__(self) -> None:
            self.batches: list = []
            self.failures: list = []

        def tick(self) -> float:
            return 0.0

        def note_engine_state(self, *state) -> None:
            pass

        def process_steps(self, steps) -> None:
            if steps == ["bad"]:
                raise ValueError("boom")
            self.batches.append(steps)

        def failed(self, stage: str, error: BaseException) -> None:
            self.failures.append((stage, repr(error)))

    messages = iter([("steps", ["bad"], 0, 0, []), ("steps", ["good"], 0, 0, []), ("stop",)])
    pipeline = Pipeline()
    _account(pipeline, lambda timeout: next(messages), lambda message: None)
    assert pipeline.batches == [["good"]] and pipeline.failures == [("attribute", "ValueError('boom')")]
