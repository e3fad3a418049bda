"""The engine-side pipeline: capture -> step shape -> prediction -> attribution -> carbon -> metrics.

Runs on one daemon worker thread per engine, inside the plugin's worker process by default
(``worker_process.py``) or inside vLLM's engine process (``LLMCO2_WORKER=thread``). Every stage is guarded: a failure is counted in
``llmco2_plugin_errors_total{stage}``, logged once per stage, and the step still counts its tokens.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from .attribution import RequestEnergy, RequestLedger, split_step_energy
from .calibration import OnlineCalibrator
from .capture import CompactStep, StepRecord, StepRecorder, StepShapeBuilder, compact_step
from .carbon import JOULES_PER_KWH, EmbodiedCarbon, GridIntensity
from .energy_windows import Meter, WindowAccountant
from .grid_intensity import IntensityProvider, StaticIntensity
from .hardware import Hardware
from .metrics import ENERGY_PHASES, PHASES, PluginMetrics, SnapshotWriter
from .predictor import StepPredictor
from .request_results import RequestActual, RequestResultStore, actual_from_energy
from .settings import Settings

logger = logging.getLogger("llmco2_vllm")


@dataclass(frozen=True)
class FinishedRequest:
    """What the plugin knows about a request once it finished."""

    request_id: str
    energy: RequestEnergy
    carbon_grams: float


class RequestLog:
    """Appends one JSON line per finished request (the audit log, ``LLMCO2_REQUEST_LOG``)."""

    def __init__(self, path: str, context: dict[str, object]) -> None:
        self.path = path
        self.context = context

    def write(self, finished: FinishedRequest) -> None:
        energy = finished.energy
        record = {
            "request_id": finished.request_id,
            # vLLM's engine id is the client's id plus "-<8 hex>".
            "client_request_id": finished.request_id.rsplit("-", 1)[0],
            "finished_at": time.time(),
            "prompt_tokens": energy.prefill_tokens + energy.cached_tokens,
            "cached_tokens": energy.cached_tokens,
            "prefill_tokens": energy.prefill_tokens,
            "decode_tokens": energy.decode_tokens,
            "steps": energy.steps,
            "prefill_energy_j": energy.prefill_energy_j,
            "decode_energy_j": energy.decode_energy_j,
            "energy_j": energy.energy_j,
            "calibrated_energy_j": energy.calibrated_energy_j,
            "operational_grams_co2e": energy.operational_grams,
            "embodied_grams_co2e": energy.embodied_grams,
            "carbon_grams": finished.carbon_grams,
            **self.context,
        }
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class EnginePipeline:
    """Owns the recorder (the scheduler hook calls ``recorder.record``) and the worker thread (everything else)."""

    def __init__(
        self,
        settings: Settings,
        predictor: StepPredictor,
        hardware: Hardware,
        intensity: GridIntensity | IntensityProvider,
        model_name: str,
        engine: str = "0",
        snapshot_path: Path | None = None,
        meter: Meter | None = None,
        calibrator: OnlineCalibrator | None = None,
        embodied: EmbodiedCarbon | None = None,
        store: RequestResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.predictor = predictor
        self.engine = engine
        self.intensity = intensity if hasattr(intensity, "current") else StaticIntensity(intensity)  # type: ignore[arg-type]
        self.embodied_grams_per_second = hardware.num_gpus * (embodied.grams_per_gpu_second if embodied else 0.0)
        self.store = store
        self._pending_actuals: list[RequestActual] = []
        self._next_cleanup = 0.0
        self.recorder = StepRecorder(settings.queue_capacity)
        self.builder = StepShapeBuilder()
        self.ledger = RequestLedger(settings.max_tracked_requests)
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = PluginMetrics(self.registry, model_name, engine)
        self.snapshot = SnapshotWriter(self.registry, snapshot_path) if snapshot_path else None
        self.request_log = (
            RequestLog(
                settings.request_log,
                {
                    "model_name": model_name,
                    "gpu": hardware.gpu.name,
                    "num_gpus": hardware.num_gpus,
                    "hardware_source": hardware.source,
                    "predictor": predictor.name,
                    "pue": settings.pue,
                },
            )
            if settings.request_log
            else None
        )
        # The most recent finished requests, for clients and audits (bounded).
        self.finished: deque[FinishedRequest] = deque(maxlen=10_000)
        self._logged_stages: set[str] = set()
        self._dropped_seen = 0
        self.upstream_dropped = 0  # steps the engine's recorder dropped before they reached this process
        self._evicted_seen = 0
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps_processed = 0

        m = self.metrics
        m.labels(
            m.target_info,
            gpu=hardware.gpu.name,
            num_gpus=str(hardware.num_gpus),
            tensor_parallel=str(hardware.tensor_parallel),
            hardware_source=hardware.source,
            predictor=predictor.name,
        ).set(1)
        self._intensity_errors_seen = 0
        self._grams_per_joule = self._publish_intensity()
        m.labels(m.pue).set(settings.pue)

        prior_idle_watts = hardware.num_gpus * hardware.gpu.idle_watts_or_default()
        self.calibrator = calibrator or OnlineCalibrator(
            forgetting=settings.calibration_forgetting, prior_idle_watts=prior_idle_watts
        )
        self.windows = WindowAccountant(meter, self.calibrator, prior_idle_watts, settings.calibration_window_seconds)
        measured = self.windows.meter is not None
        m.labels(m.measurement_available).set(1 if measured else 0)
        if measured:  # the measured series exist only where something is measured
            for phase in ENERGY_PHASES:
                m.labels(m.energy, phase=phase, source="measured")
                m.labels(m.carbon, phase=phase, source="measured")
        self._publish_calibration()

    # -- worker thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmco2-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Process what is queued, close the last measurement window, publish once more, stop the worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.process_pending()
        self.close_window()
        self._publish()
        self.intensity.close()
        close_meter = getattr(self.windows.meter, "close", None)
        if close_meter is not None:
            close_meter()  # stops a power-sampling thread and shuts NVML down

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every recorded step has been processed (tests, demo, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.recorder) == 0 and self._idle.is_set():
                return True
            time.sleep(0.005)
        return False

    def report(self, timeout: float = 30.0) -> dict:
        """What tests and benchmarks compare, once every recorded step is processed (plain data, so
        it crosses from the worker process too)."""
        self.wait_idle(timeout)
        return {
            "metrics": generate_latest(self.registry).decode(),
            "finished": [{"request_id": f.request_id, **asdict(f.energy)} for f in self.finished],
            "ledger_size": len(self.ledger),
            "steps_processed": self.steps_processed,
        }

    def _run(self) -> None:
        next_publish = time.monotonic() + self.settings.flush_interval_seconds
        dirty = True
        while not self._stop.is_set():
            try:
                if self.process_pending():
                    dirty = True
                else:
                    self._stop.wait(0.005)
                if self.windows.due():
                    self.close_window()
                    dirty = True
                if dirty and time.monotonic() >= next_publish:
                    self._publish()
                    dirty = False
                    next_publish = time.monotonic() + self.settings.flush_interval_seconds
            except Exception as error:  # a dead worker would freeze every metric and fill the queue
                self.failed("export", error)
                self._stop.wait(0.1)

    def process_pending(self) -> int:
        self._idle.clear()  # before draining: wait_idle must not see an empty queue while a batch is in hand
        records = self.recorder.drain()
        if not records:
            self._idle.set()
            return 0
        now = time.perf_counter()
        m = self.metrics
        m.labels(m.capture_lag).set(max(0.0, now - records[0].finished))
        for record in records:
            try:
                self._process(record)
            except Exception as error:  # a part without its own guard: count it, keep the worker alive
                self.failed("attribute", error)
        m.labels(m.queue_depth).set(len(self.recorder))
        dropped = self.recorder.dropped + self.upstream_dropped
        if dropped > self._dropped_seen:
            m.labels(m.dropped_steps).inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped
        if self.ledger.evicted > self._evicted_seen:
            m.labels(m.evicted_requests).inc(self.ledger.evicted - self._evicted_seen)
            self._evicted_seen = self.ledger.evicted
        return len(records)

    def failed(self, stage: str, error: BaseException) -> None:
        self.metrics.labels(self.metrics.errors, stage=stage).inc()
        if stage not in self._logged_stages:
            self._logged_stages.add(stage)
            logger.error("llmco2: %s failed (counted in llmco2_plugin_errors_total; logged once): %r", stage, error)

    def _process(self, record: StepRecord | CompactStep) -> None:
        m = self.metrics
        try:
            step = record if isinstance(record, CompactStep) else compact_step(record)
            captured = self.builder.build(step)
        except Exception as error:  # vLLM changed a field we read
            self.failed("capture", error)
            return
        shape = captured.shape
        if shape.num_requests:
            self.steps_processed += 1
            m.labels(m.steps).inc()
            m.labels(m.step_wall_seconds).inc(max(shape.wall_seconds, 0.0))
            m.labels(m.tokens, phase="prefill").inc(shape.total_prefill_tokens)
            m.labels(m.tokens, phase="decode").inc(shape.total_decode_tokens)
            for request_id, tokens in captured.cached_tokens.items():
                m.labels(m.tokens, phase="cached").inc(tokens)
                self.ledger.add_cached_tokens(request_id, tokens)
            self._account_energy(shape)
        for request_id in captured.finished_request_ids:
            self._finish(request_id)

    def _account_energy(self, shape) -> None:
        m = self.metrics
        try:
            prediction = self.predictor.predict_step(shape)
        except Exception as error:
            self.failed("predict", error)
            return
        prefill_scale, decode_scale, _ = self.calibrator.factors
        embodied_g = max(shape.wall_seconds, 0.0) * self.embodied_grams_per_second
        try:
            prefill_j, decode_j = split_step_energy(prediction, shape)
            self.ledger.add_step(
                shape, prefill_j, decode_j, prefill_scale, decode_scale, self._grams_per_joule, embodied_g
            )
        except Exception as error:
            self.failed("attribute", error)
            return
        self.windows.add_step(prediction.prefill_energy_j, prediction.decode_energy_j, shape.wall_seconds)
        try:
            for phase, energy_j, seconds, scale in (
                ("prefill", prediction.prefill_energy_j, prediction.prefill_seconds, prefill_scale),
                ("decode", prediction.decode_energy_j, prediction.decode_seconds, decode_scale),
            ):
                m.labels(m.predicted_seconds, phase=phase).inc(seconds)
                self._add_energy(phase, "predicted", energy_j)
                self._add_energy(phase, "calibrated", energy_j * scale)
                if prediction.energy_j > 0:
                    m.labels(m.embodied_carbon, phase=phase).inc(embodied_g * energy_j / prediction.energy_j)
        except Exception as error:
            self.failed("export", error)

    def _add_energy(self, phase: str, source: str, energy_j: float) -> None:
        m = self.metrics
        m.labels(m.energy, phase=phase, source=source).inc(energy_j)
        m.labels(m.carbon, phase=phase, source=source).inc(energy_j * self._grams_per_joule)

    def close_window(self) -> None:
        """Compare a window's predictions with the meter, learn, export idle and measured energy."""
        try:
            result = self.windows.close()
        except Exception as error:
            self.failed("calibrate", error)
            return
        if result.meter_incidents:
            # NVML trouble: the meter logged it once and keeps its last good value; count it here.
            self.metrics.labels(self.metrics.errors, stage="measure").inc(result.meter_incidents)
        try:
            m = self.metrics
            m.labels(m.embodied_carbon, phase="idle").inc(result.idle_seconds * self.embodied_grams_per_second)
            self._add_energy("idle", "predicted", result.predicted_idle_j)
            self._add_energy("idle", "calibrated", result.calibrated_idle_j)
            if result.measured_split_j is not None:
                for phase, energy_j in zip(ENERGY_PHASES, result.measured_split_j):
                    self._add_energy(phase, "measured", energy_j)
            self._publish_calibration()
        except Exception as error:
            self.failed("export", error)
        if self.settings.calibration_file and result.learned:
            try:
                self.calibrator.save(self.settings.calibration_file)
            except Exception as error:
                self.failed("calibrate", error)

    def _publish_calibration(self) -> None:
        m = self.metrics
        prefill_scale, decode_scale, idle_watts = self.calibrator.factors
        m.labels(m.calibration_scale, phase="prefill").set(prefill_scale)
        m.labels(m.calibration_scale, phase="decode").set(decode_scale)
        m.labels(m.calibration_idle_watts).set(idle_watts)
        m.labels(m.calibration_windows).set(self.calibrator.windows)
        raw, calibrated = self.calibrator.rolling_error()
        m.labels(m.prediction_error, correction="raw").set(raw)
        m.labels(m.prediction_error, correction="calibrated").set(calibrated)

    def _publish_intensity(self) -> float:
        """Export the grid intensity in use; return grams CO2e per joule at the IT load (x PUE)."""
        m = self.metrics
        intensity = self.intensity.current()
        m.set_grid_intensity(intensity.region, intensity.kind, intensity.grams_co2e_per_kwh)
        m.labels(m.grid_intensity_age).set(self.intensity.age_seconds)
        errors = self.intensity.errors
        if errors > self._intensity_errors_seen:
            m.labels(m.grid_intensity_errors).inc(errors - self._intensity_errors_seen)
            self._intensity_errors_seen = errors
        return intensity.grams_co2e_per_kwh * self.settings.pue / JOULES_PER_KWH

    def _finish(self, request_id: str) -> None:
        entry = self.ledger.finish(request_id)
        if entry is None:
            return
        m = self.metrics
        try:
            grams = entry.grams_co2e
            m.labels(m.requests).inc()
            m.labels(m.request_energy).observe(entry.energy_j)
            m.labels(m.request_carbon).observe(grams)
            result = FinishedRequest(request_id, entry, grams)
            self.finished.append(result)
            if self.store is not None and len(self._pending_actuals) < 100_000:
                self._pending_actuals.append(actual_from_energy(entry, time.time()))
            if self.request_log is not None:
                self.request_log.write(result)
        except Exception as error:
            self.failed("export", error)

    def _publish(self) -> None:
        """Periodic work off the hot path: grid intensity, per-request results, metrics snapshot."""
        try:
            self._grams_per_joule = self._publish_intensity()
        except Exception as error:
            self.failed("carbon", error)
        if self.store is not None:
            self._publish_results()
        if self.snapshot is None:
            return
        try:
            self.snapshot.write()
        except Exception as error:
            self.failed("export", error)

    def _publish_results(self) -> None:
        store = self.store
        assert store is not None
        try:
            actuals, self._pending_actuals = self._pending_actuals, []
            store.record_actuals(actuals)
            prefill_scale, decode_scale, idle_watts = self.calibrator.factors
            calibrated_error = self.calibrator.rolling_error()[1] if self.windows.meter is not None else float("nan")
            store.publish_engine_state(
                self.engine,
                {
                    "running_requests": len(self.ledger),
                    "prefill_scale": prefill_scale,
                    "decode_scale": decode_scale,
                    "idle_watts": idle_watts,
                    # The calibrated model's measured error, once windows were measured (NaN -> None).
                    "calibrated_error": calibrated_error if calibrated_error == calibrated_error else None,
                },
            )
            now = time.time()
            if now >= self._next_cleanup:
                retention = max(self.settings.request_results_retention_seconds, self.settings.admission_budget_window_seconds)
                store.delete_older_than(now - retention)
                self._next_cleanup = now + 60.0
        except Exception as error:
            self.failed("export", error)


__all__ = ["EnginePipeline", "FinishedRequest", "PHASES"]
