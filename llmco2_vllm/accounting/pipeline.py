"""The accounting pipeline of one engine: step shape -> prediction -> attribution -> carbon -> metrics.

Runs in the plugin's worker (``accounting/worker.py``: a process by default, a thread of vLLM's
engine process with ``LLMCO2_WORKER=thread``), driven by the worker's reader loop: each batch of
``CompactStep`` is accounted on arrival (``process_steps``), and ``tick`` closes measurement
windows and publishes metrics and results when due. Every stage is guarded: a failure is counted
in ``llmco2_plugin_errors_total{stage}``, logged once per stage, and the step still counts its tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from llmco2_vllm.accounting.attribution import RequestLedger, split_step_energy
from llmco2_vllm.accounting.energy_windows import Meter, WindowAccountant
from llmco2_vllm.accounting.metrics import ENERGY_PHASES, PHASES, PluginMetrics, SnapshotWriter
from llmco2_vllm.accounting.request_log import RequestLog
from llmco2_vllm.accounting.step_contract import CompactStep
from llmco2_vllm.accounting.step_shapes import StepShapeBuilder
from llmco2_vllm.carbon.embodied import EmbodiedCarbon
from llmco2_vllm.carbon.intensity import JOULES_PER_KWH, GridIntensity
from llmco2_vllm.carbon.providers import IntensityProvider
from llmco2_vllm.carbon.static import StaticIntensity
from llmco2_vllm.predict.calibration import OnlineCalibrator
from llmco2_vllm.predict.hardware import Hardware
from llmco2_vllm.predict.predictor import StepPredictor
from llmco2_vllm.serve.request_record import FinishedRequest
from llmco2_vllm.serve.results_store import RequestResultStore
from llmco2_vllm.settings import Settings

logger = logging.getLogger(__name__)

_RUNNING_SAMPLES = 60  # publishes the engine's mean running batch is taken over (~30 s at the default interval)


class _PendingIncrements:
    """Counter increments of one batch of steps, added to Prometheus once per batch: a child's ``inc``
    takes a lock and checks its amount, which costs more than the dictionary update here."""

    __slots__ = ("amounts",)

    def __init__(self) -> None:
        self.amounts: dict = {}  # counter child -> amount to add

    def add(self, child, amount: float) -> None:
        amounts = self.amounts
        amounts[child] = amounts.get(child, 0.0) + amount

    def flush(self) -> None:
        """Add every positive amount; a negative one (a counter never goes backwards) is skipped and,
        beyond float rounding, reported once the others are added."""
        negative = []
        for child, amount in self.amounts.items():
            if amount > 0:
                child.inc(amount)
            elif amount < -1e-9:
                negative.append(amount)
        self.amounts.clear()
        if negative:
            raise ValueError(f"{len(negative)} negative counter increments skipped (the lowest {min(negative):.3g})")


class _StepSample:
    """The step sums of one measurement window, thinned to at most ``LIMIT`` kept (every n-th step)."""

    LIMIT = 4096

    def __init__(self) -> None:
        self.kept: list[np.ndarray] = []
        self.kept_seconds: list[float] = []  # the kept steps' own wall times
        self.count = 0  # steps in the window
        self.seconds = 0.0  # their measured wall time
        self._every = 1

    def add(self, sums: np.ndarray | None, seconds: float) -> None:
        if sums is None:
            return
        seconds = max(seconds, 0.0)
        self.seconds += seconds
        if self.count % self._every == 0:
            self.kept.append(sums)
            self.kept_seconds.append(seconds)
            if len(self.kept) >= self.LIMIT:
                self.kept, self.kept_seconds, self._every = self.kept[::2], self.kept_seconds[::2], self._every * 2
        self.count += 1

    def matrix(self) -> np.ndarray:
        return np.array(self.kept).T


class EnginePipeline:
    """Accounts one engine's steps; all methods are called from the worker's one reader thread."""

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
        step_token_budget: int | None = None,
    ) -> None:
        self.settings = settings
        self.predictor = predictor
        self.engine = engine
        self.intensity = intensity if hasattr(intensity, "current") else StaticIntensity(intensity)  # type: ignore[arg-type]
        self.embodied_grams_per_second = hardware.num_gpus * (embodied.grams_per_gpu_second if embodied else 0.0)
        self.store = store
        self._pending_actuals: list[FinishedRequest] = []  # for the results store
        self._next_cleanup = 0.0
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
        self.steps_processed = 0
        # The engine's token budget per step (vLLM's max_num_batched_tokens with chunked prefill);
        # unknown, the most tokens one step scheduled stands in (the budget once a chunked prompt
        # filled a step). Forecasts price a longer prompt in several prefill steps.
        self.step_token_budget = step_token_budget
        self.largest_step_tokens = 0
        self._increments = _PendingIncrements()
        self._running_samples: deque[int] = deque(maxlen=_RUNNING_SAMPLES)
        self._next_publish = time.monotonic() + settings.flush_interval_seconds
        self._unpublished = True

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
            for index, uuid in self.windows.metered_gpus:
                m.labels(m.gpu_energy, gpu_uuid=uuid, gpu_index=str(index))
        # The fitted model's own terms learn online from the measured windows (and, where NVML found the
        # GPU, the steps' measured times; never CPU wall time while predicting for a configured GPU).
        self.term_learner = None
        if measured and hasattr(predictor, "use_terms"):
            from llmco2_vllm.predict.term_calibration import OnlineTermCalibrator

            self.term_learner = OnlineTermCalibrator(predictor.parameters)
        self._step_times_measured = hardware.source == "nvml"
        self._window_steps = _StepSample()
        self._publish_calibration()

    # -- driven by the worker's reader loop --------------------------------------------------
    def process_steps(self, steps: Sequence[CompactStep]) -> int:
        """Account a batch of steps from the engine (in order)."""
        if not steps:
            return 0
        m = self.metrics
        m.labels(m.capture_lag).set(max(0.0, time.perf_counter() - steps[-1].finished))
        try:
            for step in steps:
                try:
                    self._process(step)
                except Exception as error:  # a part without its own guard: count it, keep the worker alive
                    self.failed("attribute", error)
        finally:
            try:
                self._increments.flush()
            except Exception as error:  # an uncaught error here ended the worker: count it, keep accounting
                self.failed("export", error)
        self._unpublished = True
        self._count_losses()
        return len(steps)

    def note_engine_state(self, dropped_total: int, queued: int, capture_errors: Sequence[str] = ()) -> None:
        """What the engine's recorder reported with a batch: steps it dropped, steps still queued, capture errors."""
        self.upstream_dropped = dropped_total
        self.metrics.labels(self.metrics.queue_depth).set(queued)
        for error in capture_errors:
            self.failed("capture", RuntimeError(error))
        self._count_losses()

    def tick(self) -> float:
        """Close the measurement window and publish when due; returns seconds until the next tick is due."""
        try:
            if self.windows.due():
                self.close_window()
                self._unpublished = True
            now = time.monotonic()
            if self._unpublished and now >= self._next_publish:
                self._publish()
                self._unpublished = False
                self._next_publish = now + self.settings.flush_interval_seconds
        except Exception as error:  # a dead loop would freeze every metric
            self.failed("export", error)
        until_publish = max(0.0, self._next_publish - time.monotonic()) if self._unpublished else None
        until_window = self.windows.seconds_until_due()
        return until_window if until_publish is None else min(until_publish, until_window)

    def close(self) -> None:
        """Close the last measurement window, publish once more, release the meter and the intensity provider."""
        self.close_window()
        self._publish()
        self.intensity.close()
        close_meter = getattr(self.windows.meter, "close", None)
        if close_meter is not None:
            close_meter()  # stops a power-sampling thread and shuts NVML down

    def report(self) -> dict:
        """What tests and benchmarks compare (plain data, so it crosses from the worker process too)."""
        return {
            "metrics": generate_latest(self.registry).decode(),
            "finished": [f.to_json() for f in self.finished],
            "ledger_size": len(self.ledger),
            "steps_processed": self.steps_processed,
        }

    def _count_losses(self) -> None:
        m = self.metrics
        dropped = self.upstream_dropped
        if dropped > self._dropped_seen:
            m.labels(m.dropped_steps).inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped
        if self.ledger.evicted > self._evicted_seen:
            m.labels(m.evicted_requests).inc(self.ledger.evicted - self._evicted_seen)
            self._evicted_seen = self.ledger.evicted

    def failed(self, stage: str, error: BaseException) -> None:
        self.metrics.labels(self.metrics.errors, stage=stage).inc()
        if stage not in self._logged_stages:
            self._logged_stages.add(stage)
            logger.error("llmco2: %s failed (counted in llmco2_plugin_errors_total; logged once): %r", stage, error)

    def _process(self, step: CompactStep) -> None:
        try:
            captured = self.builder.build(step)
        except Exception as error:  # vLLM changed a field we read
            self.failed("capture", error)
            return
        shape = captured.shape
        if shape.num_requests:
            series, add = self.metrics.per_step, self._increments.add
            self.steps_processed += 1
            add(series.steps, 1)
            add(series.step_wall_seconds, max(shape.wall_seconds, 0.0))
            prefill_tokens, decode_tokens = int(shape.prefill_tokens.sum()), int(shape.decode_tokens.sum())
            add(series.tokens["prefill"], prefill_tokens)
            add(series.tokens["decode"], decode_tokens)
            if prefill_tokens + decode_tokens > self.largest_step_tokens:
                self.largest_step_tokens = prefill_tokens + decode_tokens
            for request_id, tokens in captured.cached_tokens.items():
                add(series.tokens["cached"], tokens)
                self.ledger.add_cached_tokens(request_id, tokens)
            self._account_energy(shape)
        for request_id in captured.finished_request_ids:
            self._finish(request_id)

    def _account_energy(self, shape) -> None:
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
        if self.term_learner is not None:
            self._window_steps.add(getattr(self.predictor, "last_step_sums", None), shape.wall_seconds)
        try:
            series, add = self.metrics.per_step, self._increments.add
            grams_per_joule = self._grams_per_joule
            step_energy_j = prediction.energy_j
            for phase, energy_j, seconds, scale in (
                ("prefill", prediction.prefill_energy_j, prediction.prefill_seconds, prefill_scale),
                ("decode", prediction.decode_energy_j, prediction.decode_seconds, decode_scale),
            ):
                if not seconds and not energy_j:
                    continue  # a phase without work: nothing to add
                add(series.predicted_seconds[phase], seconds)
                for source, source_j in (("predicted", energy_j), ("calibrated", energy_j * scale)):
                    energy, carbon = series.energy_and_carbon[phase, source]
                    add(energy, source_j)
                    add(carbon, source_j * grams_per_joule)
                if embodied_g and step_energy_j > 0:
                    add(series.embodied_carbon[phase], embodied_g * energy_j / step_energy_j)
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
            for gpu in result.gpus:
                gpu_labels = {"gpu_uuid": gpu.uuid, "gpu_index": str(gpu.index)}
                m.labels(m.gpu_energy, **gpu_labels).inc(gpu.window_j)
                m.labels(m.gpu_power, **gpu_labels).set(gpu.window_j / result.seconds)
        except Exception as error:
            self.failed("export", error)
        self._learn_terms(result)
        try:
            self._publish_calibration()
        except Exception as error:
            self.failed("export", error)
        if self.settings.calibration_file and result.learned:
            try:
                self.calibrator.save(self.settings.calibration_file)
            except Exception as error:
                self.failed("calibrate", error)

    def _learn_terms(self, result) -> None:
        """Feed the closed window to the term learner and predict with what it learned."""
        steps, self._window_steps = self._window_steps, _StepSample()
        learner = self.term_learner
        if learner is None or result.measured_j is None or not result.complete or not steps.count:
            return
        try:
            predictor = self.predictor
            timed = self._step_times_measured
            learner.observe(predictor.terms, predictor.num_gpus, steps.matrix(), result.measured_j,
                            steps.seconds if timed else None, result.idle_seconds, steps.count,
                            np.array(steps.kept_seconds) if timed else None)  # fmt: skip
            learned = learner.model
            predictor.use_terms(learned.model, learned.with_idle(predictor.terms.gpu).idle_watts)
            # Saved with the scale state (LLMCO2_CALIBRATION_FILE): a restart predicts with them at once.
            terms = learner.terms()
            if terms is not None:
                # The learner started from the predictor's parameters, this model's own factors already
                # in them: factors of 1 say so, so that a restart does not apply them a second time.
                terms = dataclasses.replace(terms, model_factors={predictor.terms.model.name: (1.0, 1.0)})
                self.calibrator.terms = terms.to_dict()
        except Exception as error:
            self.failed("calibrate", error)

    def _publish_calibration(self) -> None:
        m = self.metrics
        ratios = getattr(self.predictor, "term_ratios", None)
        if ratios is not None:
            for parameter, ratio in ratios().items():
                m.labels(m.term_ratio, parameter=parameter).set(ratio)
            learner = self.term_learner
            for signal in ("energy", "time"):
                errors = learner.rolling_error(50, signal) if learner else (math.nan, math.nan)
                for correction, value in zip(("raw", "calibrated"), errors):
                    m.labels(m.term_error, signal=signal, correction=correction).set(value)
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
            # The one record of this request: the request log, the results store and report() read it.
            finished = FinishedRequest(
                engine_request_id=entry.request_id,
                prefill_tokens=entry.prefill_tokens,
                cached_tokens=entry.cached_tokens,
                decode_tokens=entry.decode_tokens,
                steps=entry.steps,
                prefill_energy_j=entry.prefill_energy_j,
                decode_energy_j=entry.decode_energy_j,
                calibrated_prefill_energy_j=entry.calibrated_prefill_energy_j,
                calibrated_decode_energy_j=entry.calibrated_decode_energy_j,
                operational_grams=entry.operational_grams,
                embodied_grams=entry.embodied_grams,
                finished_at=time.time(),
            )
            series = m.per_step
            self._increments.add(series.requests, 1)
            series.request_energy.observe(finished.energy_j)
            series.request_carbon.observe(finished.grams_co2e)
            self.finished.append(finished)
            if self.store is not None and len(self._pending_actuals) < 100_000:
                self._pending_actuals.append(finished)
            if self.request_log is not None:
                self.request_log.write(finished)
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
            finished, self._pending_actuals = self._pending_actuals, []
            store.record_actuals(finished)
            prefill_scale, decode_scale, idle_watts = self.calibrator.factors
            calibrated_error = self.calibrator.rolling_error()[1] if self.windows.meter is not None else float("nan")
            # Forecasts price a request in the batch the engine has recently been running, not the
            # instantaneous count: sampled at each publish (only while steps arrive, so idle time
            # does not dilute it), the last _RUNNING_SAMPLES of them.
            samples = self._running_samples
            samples.append(len(self.ledger))
            store.publish_engine_state(
                self.engine,
                {
                    "running_requests": len(self.ledger),
                    "mean_running_requests": sum(samples) / len(samples),
                    "step_token_budget": self.step_token_budget or self.largest_step_tokens or None,
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
