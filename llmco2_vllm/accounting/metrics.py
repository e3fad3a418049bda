"""Prometheus metrics of the plugin, and the bridge that puts them on vLLM's ``/metrics``.

The metrics are updated in the EngineCore process (where steps are captured), but ``/metrics`` is
served by the API server process. Two cases:

- One API server (no ``PROMETHEUS_MULTIPROC_DIR``): the engine writes its registry, in the text
  exposition format, to ``$LLMCO2_RUN_DIR/engine-<index>.prom`` every flush interval;
  ``SnapshotCollector``, registered in the API server, serves those files.
- Several API servers (vLLM sets ``PROMETHEUS_MULTIPROC_DIR``): prometheus_client writes the
  engine's values to that directory itself and every API server serves them, counted once because
  one engine process owns them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PHASES = ("prefill", "decode")
ENERGY_PHASES = ("prefill", "decode", "idle")
TOKEN_PHASES = ("prefill", "decode", "cached")
ERROR_STAGES = ("capture", "predict", "attribute", "calibrate", "measure", "carbon", "export")

# Per-request energy spans a tiny CPU test model to long generations of large models.
REQUEST_ENERGY_BUCKETS_J = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
REQUEST_CARBON_BUCKETS_G = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class PluginMetrics:
    """Every metric the plugin exports, bound to one engine's labels. See README "Metrics"."""

    def __init__(self, registry: CollectorRegistry, model_name: str, engine: str) -> None:
        base = ["model_name", "engine"]
        self.registry = registry
        self._labels = {"model_name": model_name, "engine": engine}
        self._children: dict[tuple, object] = {}
        self._intensity_labels: tuple[str, str] | None = None
        self.energy = Counter(
            "llmco2_energy_joules",
            "Energy of inference on the engine's GPUs, by phase and source (predicted, later measured/calibrated).",
            base + ["phase", "source"],
            registry=registry,
        )
        self.carbon = Counter(
            "llmco2_carbon_grams",
            "Operational carbon (energy x PUE x grid intensity), grams CO2e, by phase and energy source.",
            base + ["phase", "source"],
            registry=registry,
        )
        self.embodied_carbon = Counter(
            "llmco2_embodied_carbon_grams",
            "Embodied carbon of the engine's GPUs amortised over their lifetime, grams CO2e, by phase (idle = between steps).",
            base + ["phase"],
            registry=registry,
        )
        self.tokens = Counter(
            "llmco2_tokens",
            "Tokens the plugin accounted: prefill (computed prompt), decode (generated positions), cached (prefix-cache hits).",
            base + ["phase"],
            registry=registry,
        )
        self.steps = Counter("llmco2_steps", "Engine steps with scheduled tokens.", base, registry=registry)
        self.predicted_seconds = Counter(
            "llmco2_predicted_gpu_seconds",
            "Predicted busy time of the target GPUs, by phase.",
            base + ["phase"],
            registry=registry,
        )
        self.step_wall_seconds = Counter(
            "llmco2_step_wall_seconds", "Measured host wall time of engine steps.", base, registry=registry
        )
        self.requests = Counter("llmco2_requests", "Finished requests with attributed energy.", base, registry=registry)
        self.request_energy = Histogram(
            "llmco2_request_energy_joules",
            "Predicted energy per finished request.",
            base,
            buckets=REQUEST_ENERGY_BUCKETS_J,
            registry=registry,
        )
        self.request_carbon = Histogram(
            "llmco2_request_carbon_grams",
            "Carbon per finished request, grams CO2e: operational (calibrated energy) + embodied.",
            base,
            buckets=REQUEST_CARBON_BUCKETS_G,
            registry=registry,
        )
        self.errors = Counter(
            "llmco2_plugin_errors", "Failures caught inside the plugin, by pipeline stage.", base + ["stage"], registry=registry
        )
        self.dropped_steps = Counter(
            "llmco2_dropped_steps", "Steps not accounted because the capture queue was full.", base, registry=registry
        )
        self.evicted_requests = Counter(
            "llmco2_evicted_requests",
            "Running requests dropped from the attribution ledger because it was full.",
            base,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "llmco2_queue_depth", "Captured steps waiting for the worker.", base, registry=registry, multiprocess_mode="mostrecent"
        )
        self.capture_lag = Gauge(
            "llmco2_capture_lag_seconds",
            "Age of the oldest step the worker processed in its last pass.",
            base,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.target_info = Gauge(
            "llmco2_target_info",
            "Hardware and predictor the numbers are for (value 1). hardware_source is nvml or configured.",
            base + ["gpu", "num_gpus", "tensor_parallel", "hardware_source", "predictor"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.grid_intensity = Gauge(
            "llmco2_grid_intensity_grams_per_kwh",
            "Grid carbon intensity in use, gCO2e/kWh.",
            base + ["region", "kind"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.grid_intensity_age = Gauge(
            "llmco2_grid_intensity_age_seconds",
            "Age of the grid intensity value in use (0 for static values; grows while a live provider is down).",
            base,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.grid_intensity_errors = Counter(
            "llmco2_grid_intensity_errors",
            "Failed reads of the grid intensity provider (the last good or the static value stays in use).",
            base,
            registry=registry,
        )
        self.pue = Gauge("llmco2_pue", "Power usage effectiveness in use.", base, registry=registry, multiprocess_mode="mostrecent")
        self.measurement_available = Gauge(
            "llmco2_energy_measurement_available",
            "1 when the engine's GPU energy is measured through NVML, 0 when only predicted.",
            base,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        # Per GPU, only where a meter reads the GPUs; gpu_uuid/gpu_index join with DCGM and Kepler (README "Metrics").
        self.gpu_energy = Counter(
            "llmco2_gpu_energy_joules",
            "Measured energy of each of the engine's GPUs since the engine started (NVML; never decreases, "
            "across counter resets too). Read at each measurement window's close.",
            base + ["gpu_uuid", "gpu_index"],
            registry=registry,
        )
        self.gpu_power = Gauge(
            "llmco2_gpu_power_watts",
            "Mean measured power of each of the engine's GPUs over the last measurement window (NVML).",
            base + ["gpu_uuid", "gpu_index"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.calibration_scale = Gauge(
            "llmco2_calibration_scale",
            "Online calibration: measured / predicted energy factor in force, by phase.",
            base + ["phase"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.calibration_idle_watts = Gauge(
            "llmco2_calibration_idle_watts",
            "Online calibration: idle power of the engine's GPUs in force, watts.",
            base,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.calibration_windows = Gauge(
            "llmco2_calibration_windows",
            "Measurement windows the calibration has learned (kept across restarts with LLMCO2_CALIBRATION_FILE).",
            base,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.prediction_error = Gauge(
            "llmco2_prediction_error_ratio",
            "Rolling mean absolute percentage error (as a ratio) of window energy vs NVML, "
            "before (raw) and after (calibrated) the online correction; NaN until windows were measured.",
            base + ["correction"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.term_ratio = Gauge(
            "llmco2_calibrated_term_ratio",
            "The fitted model's terms in force (offline `llmco2 calibrate` and online learning) over their shipped "
            "values, by parameter; 1 where nothing was calibrated.",
            base + ["parameter"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.term_error = Gauge(
            "llmco2_term_calibration_error_ratio",
            "Rolling mean absolute percentage error (as a ratio) of window energy (signal=energy) or measured step "
            "time (signal=time), one step ahead, with the shipped terms (raw) and the learned ones (calibrated); "
            "NaN until windows were measured.",
            base + ["signal", "correction"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self._initialise_series()
        self.per_step = StepSeries(self)

    def _initialise_series(self) -> None:
        """Create every labelled series at zero so rates and absent() work from the first scrape."""
        labels = self._labels
        for phase in ENERGY_PHASES:
            for source in ("predicted", "calibrated"):
                self.energy.labels(**labels, phase=phase, source=source)
                self.carbon.labels(**labels, phase=phase, source=source)
        for phase in PHASES:
            self.predicted_seconds.labels(**labels, phase=phase)
        for phase in TOKEN_PHASES:
            self.tokens.labels(**labels, phase=phase)
        for stage in ERROR_STAGES:
            self.errors.labels(**labels, stage=stage)
        for phase in ENERGY_PHASES:
            self.embodied_carbon.labels(**labels, phase=phase)
        for metric in (
            self.steps,
            self.step_wall_seconds,
            self.requests,
            self.dropped_steps,
            self.evicted_requests,
            self.grid_intensity_errors,
        ):
            metric.labels(**labels)
        self.request_energy.labels(**labels)
        self.request_carbon.labels(**labels)

    def set_grid_intensity(self, region: str, kind: str, grams_co2e_per_kwh: float) -> None:
        """Export the intensity in use; a change of region or kind replaces the series (one value in force)."""
        current = (region, kind)
        previous = self._intensity_labels
        if previous is not None and previous != current:
            self.grid_intensity.remove(self._labels["model_name"], self._labels["engine"], *previous)
            self._children.pop((id(self.grid_intensity), (("region", previous[0]), ("kind", previous[1]))), None)
        self._intensity_labels = current
        self.labels(self.grid_intensity, region=region, kind=kind).set(grams_co2e_per_kwh)

    def labels(self, metric, **extra: str):
        """The metric's child for this engine's labels plus ``extra`` (cached: the worker calls this per step)."""
        key = (id(metric), tuple(extra.items()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**self._labels, **extra)
        return child


class StepSeries:
    """The series the worker updates on every engine step, bound to the engine's labels once
    (``PluginMetrics.labels`` hashes its labels on each call)."""

    def __init__(self, metrics: PluginMetrics) -> None:
        label = metrics.labels
        self.steps = label(metrics.steps)
        self.step_wall_seconds = label(metrics.step_wall_seconds)
        self.tokens = {phase: label(metrics.tokens, phase=phase) for phase in TOKEN_PHASES}
        self.predicted_seconds = {phase: label(metrics.predicted_seconds, phase=phase) for phase in PHASES}
        self.embodied_carbon = {phase: label(metrics.embodied_carbon, phase=phase) for phase in PHASES}
        self.requests = label(metrics.requests)
        self.request_energy = label(metrics.request_energy)
        self.request_carbon = label(metrics.request_carbon)
        # (phase, source) -> (energy child, carbon child), for the predicted and calibrated sources.
        self.energy_and_carbon = {
            (phase, source): (
                label(metrics.energy, phase=phase, source=source),
                label(metrics.carbon, phase=phase, source=source),
            )
            for phase in PHASES
            for source in ("predicted", "calibrated")
        }


class SnapshotWriter:
    """Writes a registry in the text format to a file, atomically (readers never see half a file)."""

    def __init__(self, registry: CollectorRegistry, path: Path) -> None:
        self.registry = registry
        self.path = path

    def write(self) -> None:
        data = generate_latest(self.registry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".prom")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class SnapshotCollector:
    """Serves the engines' snapshot files from the API server's registry (one family per name)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for path in sorted(self.directory.glob("engine-*.prom")):
            try:
                text = path.read_text()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        return list(merged.values())
