"""Fault injection: the server keeps serving, the failure shows in a metric and one log line, nothing is double counted.

Faults covered elsewhere (README "Reliability" lists them all):
- prediction raising: ``test_vllm_serve.py::test_prediction_fault_keeps_serving`` (real server);
- the grid-intensity provider hanging or failing: ``test_grid_intensity.py::test_live_*`` and
  ``test_vllm_carbon.py::test_live_provider_outage_keeps_waiting_until_intensity_drops`` (real server);
- an unknown ``LLMCO2_TARGET_GPU``: ``test_vllm_serve.py::test_wrong_setting_fails_at_startup``;
- an architecture the GNN's graph builder does not know: ``test_gnn.py::test_load_predictor_gnn_degrades_*``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import random
import time

import pytest

from llmco2_vllm.dev.local_server import LocalVllmServer
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics
from llmco2_vllm.dev.step_simulator import MODEL_ID, StepSimulator, analytic_engine_pipeline
from llmco2_vllm.plugin.scheduler_hook import StepRecorder, compact_step
from tests.support.fake_nvml import FakeGpu, FakeNvml
from tests.support.served_workload import LONG_PROMPT, assert_reconciles, wait_for_requests


def plugin_error_lines(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if "llmco2" in line and " ERROR " in line]


# --------------------------------------------------------------------------------------------
# Real vllm serve
# --------------------------------------------------------------------------------------------
@pytest.mark.server
def test_burst_of_500_concurrent_requests(tiny_model_dir, tmp_path):
    """500 requests at once: all served, every counter exact, nothing dropped or evicted, no error."""
    log = tmp_path / "serve.log"
    args = ["--max-num-batched-tokens", "512", "--max-num-seqs", "64", "--enable-prefix-caching", "--block-size", "32"]
    rng = random.Random(7)
    jobs = [([rng.randrange(3, 500) for _ in range(rng.randint(2, 40))], rng.randint(1, 8)) for _ in range(480)]
    jobs += [(LONG_PROMPT, 2)] * 20  # repeated prompt: prefix-cache hits inside the burst
    with LocalVllmServer(tiny_model_dir, args, log_path=log) as server:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: complete(server, *job), jobs))
        for result, (_, max_tokens) in zip(results, jobs):
            assert result["usage"]["completion_tokens"] == max_tokens
        samples = wait_for_requests(server, len(jobs))
        assert_reconciles(samples, len(jobs))
        assert metric_sum(samples, "vllm:request_success_total") == len(jobs)
        assert metric_sum(samples, "llmco2_dropped_steps_total") == 0
        assert metric_sum(samples, "llmco2_evicted_requests_total") == 0
    assert plugin_error_lines(log.read_text(errors="replace")) == []


@pytest.mark.server
def test_unwritable_metrics_directory_keeps_serving(tiny_model_dir, tmp_path):
    """The run directory cannot be created (its parent is a file): vLLM serves, the plugin logs once.

    The engine counts the failure in ``llmco2_plugin_errors_total{stage="export"}``, but that
    counter travels through the same directory, so /metrics shows no llmco2 series at all: the
    ``Llmco2PluginMissing`` alert (vllm: metrics without llmco2_target_info) is what fires.
    """
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    log = tmp_path / "serve.log"
    env = {"LLMCO2_RUN_DIR": str(blocker / "run")}
    with LocalVllmServer(tiny_model_dir, ["--max-num-seqs", "8"], env=env, log_path=log) as server:
        send_workload_small(server)
        time.sleep(2.0)  # several flush intervals: each one fails again
        send_workload_small(server)
        time.sleep(1.0)
        samples = parse_metrics(server.metrics_text())
        assert metric_sum(samples, "vllm:request_success_total") == 8
        assert not [name for name, _ in samples if name.startswith("llmco2_")]
        assert server.complete([5, 6, 7], 2)["usage"]["completion_tokens"] == 2  # still serving
    text = log.read_text(errors="replace")
    failures = [line for line in text.splitlines() if "llmco2: export failed" in line]
    assert len(failures) == 1, failures
    assert "NotADirectoryError" in failures[0] or "FileExistsError" in failures[0], failures[0]


def complete(server: LocalVllmServer, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    return server.post("/v1/completions", body, timeout=300)


def send_workload_small(server: LocalVllmServer) -> None:
    for i in range(4):
        assert server.complete(list(range(3, 10 + 5 * i)), 3)["usage"]["completion_tokens"] == 3


# --------------------------------------------------------------------------------------------
# The engine pipeline with real vLLM scheduler outputs (NVML cannot exist here: a scripted fake)
# --------------------------------------------------------------------------------------------
def _pipeline_with_meter(meter):
    from llmco2_vllm.accounting.energy_windows import WindowAccountant

    pipeline = analytic_engine_pipeline("nvml-fault")

    pipeline.windows = WindowAccountant(meter, pipeline.calibrator, 100.0, window_seconds=3600.0)
    return pipeline


def test_nvml_failing_mid_run_is_counted_once_logged_once_and_not_double_counted(caplog, monkeypatch):
    from llmco2_vllm.measure import energy_meter
    from llmco2_vllm.measure.energy_meter import EnergyMeter

    monkeypatch.setattr(energy_meter, "_LOGGED_MESSAGES", set())
    gpu = FakeGpu()
    meter = EnergyMeter(pynvml_module=FakeNvml([gpu]))
    assert meter.available
    pipeline = _pipeline_with_meter(meter)
    labels = {"model_name": MODEL_ID, "engine": "nvml-fault"}
    sim = StepSimulator(8, random.Random(3), "n")

    def run_steps(count: int) -> None:
        recorder = StepRecorder(capacity=count)
        for _ in range(count):
            recorder.record(sim.step(), {}, time.perf_counter())
        pipeline.process_steps([compact_step(record) for record in recorder.drain()])

    def value(name: str, **extra: str) -> float:
        return pipeline.registry.get_sample_value(name, {**labels, **extra}) or 0.0

    def measured_total() -> float:
        return sum(value("llmco2_energy_joules_total", phase=p, source="measured") for p in ("prefill", "decode", "idle"))

    def gpu_uses_what_was_predicted() -> int:
        """Advance the driver counter by the window's predicted energy (a plausible measurement), in mJ."""
        used_mj = int(1000 * (pipeline.windows._prefill_j + pipeline.windows._decode_j)) + 1000
        gpu.counter_mj += used_mj
        return used_mj

    with caplog.at_level(logging.WARNING, logger="llmco2_vllm"):
        run_steps(20)
        metered_mj = gpu_uses_what_was_predicted()
        pipeline.close_window()  # a clean window: learned
        assert value("llmco2_calibration_windows") == 1
        assert measured_total() == pytest.approx(metered_mj / 1000)

        gpu.counter_error = FakeNvml.NVML_ERROR_UNKNOWN  # NVML fails mid-run, for three windows
        outage_mj = 0
        for _ in range(3):
            run_steps(20)
            outage_mj += gpu_uses_what_was_predicted()  # the driver counter keeps counting
            pipeline.close_window()
        assert value("llmco2_plugin_errors_total", stage="measure") == 3
        assert measured_total() == pytest.approx(metered_mj / 1000)  # last good value kept: nothing invented

        gpu.counter_error = None  # recovery: the counter shows everything used through the outage
        run_steps(20)
        metered_mj += outage_mj + gpu_uses_what_was_predicted()
        pipeline.close_window()
        assert measured_total() == pytest.approx(metered_mj / 1000)  # exactly once, none lost
        assert value("llmco2_calibration_windows") == 1  # disturbed windows and the one after are not learned
        run_steps(20)
        metered_mj += gpu_uses_what_was_predicted()
        pipeline.close_window()
        assert value("llmco2_calibration_windows") == 2  # learning resumes
        assert measured_total() == pytest.approx(metered_mj / 1000)

    assert value("llmco2_plugin_errors_total", stage="measure") == 3
    assert value("llmco2_steps_total") == 120  # every step still accounted
    assert sum(value("llmco2_plugin_errors_total", stage=s) for s in ("capture", "predict", "attribute", "export")) == 0
    nvml_lines = [r for r in caplog.records if "energy meter" in r.getMessage()]
    assert len(nvml_lines) == 1, [r.getMessage() for r in nvml_lines]
    meter.close()


def test_unexpected_failure_in_the_worker_is_counted_and_the_worker_survives(caplog):
    """A part of step processing without its own guard raises: before this was fixed, the worker thread died,
    every metric froze and the capture queue filled up."""
    pipeline = analytic_engine_pipeline("worker-fault")
    labels = {"model_name": MODEL_ID, "engine": "worker-fault"}

    def broken_finish(request_id):
        raise KeyError("injected ledger failure")

    pipeline.ledger.finish = broken_finish
    sim = StepSimulator(8, random.Random(5), "w")
    recorder = StepRecorder(capacity=50)
    with caplog.at_level(logging.ERROR, logger="llmco2_vllm"):
        for _ in range(50):
            recorder.record(sim.step(), {}, time.perf_counter())
        for record in recorder.drain():  # one by one, as the worker's reader loop does: it must survive each
            pipeline.process_steps([compact_step(record)])
            pipeline.tick()
        pipeline.close()
    assert pipeline.steps_processed == 50
    assert pipeline.registry.get_sample_value("llmco2_steps_total", labels) == 50
    assert pipeline.registry.get_sample_value("llmco2_plugin_errors_total", {**labels, "stage": "attribute"}) > 0
    assert len([r for r in caplog.records if "injected ledger failure" in r.getMessage()]) == 1


# --------------------------------------------------------------------------------------------
# Start-up faults, on vLLM's real config object of the tiny model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_config(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
                      enforce_eager=True, served_model_name=["tiny-llama"])  # fmt: skip
    return args.create_engine_config()


def test_unknown_gpu_name_from_nvml_predicts_for_the_configured_target(vllm_config, monkeypatch, caplog):
    from llmco2_vllm.measure import gpu_detection
    from llmco2_vllm.plugin.entry_points import start_accounting

    monkeypatch.setattr(gpu_detection, "detect_gpus", lambda pynvml_module=None: ["NVIDIA Hypothetical X900"])
    monkeypatch.setenv("LLMCO2_MEASURE_ENERGY", "false")
    monkeypatch.setenv("LLMCO2_PREDICTOR", "analytic")  # the hardware fallback is the point, not the GNN table
    monkeypatch.delenv("LLMCO2_RUN_DIR", raising=False)
    with caplog.at_level(logging.WARNING, logger="llmco2_vllm"):
        pipeline = start_accounting(vllm_config)
    try:
        info = parse_metrics(pipeline.report()["metrics"])  # from the worker process
        target = [dict(labels) for name, labels in info if name == "llmco2_target_info"]
        assert target and target[0]["hardware_source"] == "configured" and target[0]["gpu"].startswith("H100")
        warnings = [r.getMessage() for r in caplog.records if "X900" in r.getMessage()]
        assert len(warnings) == 1 and "not in the catalog" in warnings[0]
    finally:
        pipeline.stop()


def test_architecture_the_plugin_cannot_describe_leaves_vllm_untouched(vllm_config, monkeypatch, caplog):
    """An encoder-decoder (unknown recurrent layers are approximated, but this is refused): the plugin
    logs why once and steps pass through unchanged."""
    from llmco2_vllm.plugin.entry_points import start_accounting
    from llmco2_vllm.plugin.scheduler_hook import capturing_scheduler

    class Scheduler:
        def __init__(self, vllm_config) -> None:
            self.vllm_config = vllm_config
            self.steps = 0

        def schedule(self):
            self.steps += 1
            return object()

        def update_from_output(self, scheduler_output, model_runner_output):
            return {"step": self.steps}

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(vllm_config.model_config.hf_text_config, "is_encoder_decoder", True, raising=False)
    with caplog.at_level(logging.WARNING, logger="llmco2_vllm"):
        scheduler = capturing_scheduler(Scheduler, start_accounting)(vllm_config)
        for _ in range(3):
            assert scheduler.update_from_output(scheduler.schedule(), None) == {"step": scheduler.steps}
        scheduler.shutdown()
    assert scheduler._llmco2 is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "vLLM runs without the plugin" in errors[0].getMessage()
    assert "encoder-decoder" in str(errors[0].exc_info[1])


# --------------------------------------------------------------------------------------------
# The GNN predictor's checkpoint (LLMCO2_PREDICTOR=gnn): corrupt or missing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "corrupt", "wrong sidecar"])
def test_gnn_checkpoint_damage_degrades_to_analytic_with_one_warning(tmp_path, damage):
    pytest.importorskip("torch_geometric")
    import warnings

    from llmco2_vllm.predict.gnn.model import GnnPredictor, default_checkpoint_path
    from llmco2_vllm.predict.hardware import Hardware, find_gpu
    from llmco2_vllm.predict.model_description import load_model
    from llmco2_vllm.predict.predictor import AnalyticPredictor
    from llmco2_vllm.predict.step_shape import StepShape

    shipped = default_checkpoint_path()
    path = tmp_path / "gnn.safetensors"
    if damage == "corrupt":  # truncated weights beside a valid sidecar
        path.write_bytes(shipped.read_bytes()[:200])
        path.with_suffix(".json").write_bytes(shipped.with_suffix(".json").read_bytes())
    elif damage == "wrong sidecar":
        path.write_bytes(shipped.read_bytes())
        path.with_suffix(".json").write_text(json.dumps({"format": "something-else"}))
    model = load_model("meta-llama/Llama-3.1-8B-Instruct")
    hardware = Hardware(find_gpu("H100"), 1, 1, "configured")
    step = StepShape.static_batch_decode(8, 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = GnnPredictor(model, hardware, checkpoint=path)
        got = [predictor.predict_step(step) for _ in range(3)]
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert predictor.is_fallback and len(runtime) == 1, [str(w.message) for w in caught]
    want = AnalyticPredictor(model, hardware).predict_step(step)
    assert all(p.energy_j == want.energy_j for p in got)
