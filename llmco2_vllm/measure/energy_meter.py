"""Measured GPU energy over named windows, via NVML (API shaped like Zeus's ``ZeusMonitor``).

Two ways to read energy, chosen per GPU when the meter starts:

* ``"counter"``: ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since driver load,
  Volta and newer). Exact up to one counter step, but coarse and not cheap: a read takes
  milliseconds and the counter advances only every ~100 ms, each time by that period's energy
  (read latency and step sizes: ``benchmarks/results/h200_2026-11-27/README.md``, from
  ``benchmarks/nvml_probe.py``). A window's error is therefore up to one step whatever its
  length, so the plugin reads the counter only at window boundaries, seconds apart, on the
  plugin's worker (``energy_windows.WindowAccountant``), plus once each at start-up and at
  shutdown; never per engine step.
* ``"power_sampling"``: older GPUs only report power (milliwatts). A daemon thread samples
  it every ``sampling_interval_seconds`` and integrates (trapezoid rule), so no caller
  ever waits on a power read. The reading is a lagging average, slow to follow a load step,
  so integrating it books part of a busy window's energy into the idle window after
  (``tests/test_energy_meter_recorded.py`` replays the recorded H200 trace that shows it).
  The counter is the reference wherever it exists.

The meter never raises for NVML trouble: without NVML it reports ``available=False`` and
measures zero; driver errors are counted in ``errors`` and mark windows incomplete.

Example::

    meter = EnergyMeter(gpu_indices=list(range(tensor_parallel)))
    meter.begin_window("sweep")
    ...  # seconds of work: a window much shorter than the counter's ~100 ms step is noise
    measurement = meter.end_window("sweep")  # measurement.energy_j, measurement.complete
    meter.close()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from llmco2_vllm.measure import gpu_detection
from llmco2_vllm.measure.gpu_detection import as_text

logger = logging.getLogger(__name__)

COUNTER = "counter"
POWER_SAMPLING = "power_sampling"
MIG_NOTE = "MIG: energy is the whole GPU's, shared with other instances"

# Fallbacks for the NVML constants, used when a (fake or trimmed) module lacks them.
_NVML_ERROR_GPU_IS_LOST = 15
_NVML_DEVICE_MIG_ENABLE = 1

# Messages already logged in this process: the plugin may build several meters (one per
# engine), and an unavailable-NVML warning per meter would only be noise.
_LOGGED_MESSAGES: set[str] = set()
_LOGGED_LOCK = threading.Lock()


def _log_once(level: int, message: str) -> None:
    with _LOGGED_LOCK:
        if message in _LOGGED_MESSAGES:
            return
        _LOGGED_MESSAGES.add(message)
    logger.log(level, message)


@dataclass(frozen=True)
class GpuReading:
    """One GPU's energy over a window."""

    index: int  # NVML index of the measured GPU (the parent GPU for a MIG instance)
    name: str
    energy_j: float
    method: str  # "counter" or "power_sampling"


@dataclass(frozen=True)
class Measurement:
    """Energy of all metered GPUs over one window."""

    seconds: float
    energy_j: float  # sum over GPUs
    gpus: tuple[GpuReading, ...]
    complete: bool  # False if a GPU errored, reset or was lost, or NVML is unavailable


@dataclass(frozen=True)
class GpuDevice:
    """A GPU the meter reads: what it is, how it is read, and whether it is MIG-partitioned."""

    index: int  # NVML index
    name: str
    method: str  # "counter" or "power_sampling"
    mig: bool  # True: the energy is the whole GPU's, not this process's instance
    uuid: str = ""  # NVML UUID of the measured (whole) GPU, "GPU-..."; "" if NVML would not say


@dataclass(frozen=True)
class GpuTotal:
    """One GPU's energy since the meter started: never decreases, across counter resets too."""

    index: int  # NVML index
    uuid: str  # NVML UUID ("GPU-..."), the label DCGM and Kepler join on
    name: str
    energy_j: float


class _GpuState:
    """Mutable per-GPU bookkeeping; every field is guarded by ``EnergyMeter._lock``."""

    def __init__(self, device: GpuDevice, handle: Any) -> None:
        self.device = device
        self.handle = handle
        self.lost = False
        self.energy_j = 0.0  # integrated since the meter started
        self.reported_j = 0.0  # high-water mark handed out: keeps totals monotonic
        self.last_counter_mj: int | None = None  # counter method: last good raw reading
        self.last_power_watts: float | None = None  # power method: last good sample
        self.last_sample_seconds = 0.0  # time.monotonic() of that sample


@dataclass
class _Window:
    start_seconds: float
    start_energy_j: tuple[float, ...]  # per GPU, same order as EnergyMeter._gpus
    start_incidents: int


class EnergyMeter:
    """Measures the energy of the GPUs an engine uses, over named windows.

    ``gpu_indices`` are CUDA ordinals as the engine sees them (e.g. tensor-parallel ranks
    ``0..tp-1``), mapped through ``CUDA_VISIBLE_DEVICES`` to NVML devices; ``None`` means
    every visible GPU. Construction never raises: check ``available`` and ``reason``.
    """

    def __init__(
        self,
        gpu_indices: list[int] | None = None,
        pynvml_module: Any = None,
        sampling_interval_seconds: float = 0.1,
    ) -> None:
        if sampling_interval_seconds <= 0:
            raise ValueError(f"sampling_interval_seconds must be > 0, got {sampling_interval_seconds}")
        self.available = False
        self.reason = ""
        self.devices: list[GpuDevice] = []
        self.errors: dict[str, int] = {"read_error": 0, "counter_reset": 0, "gpu_lost": 0}
        self._sampling_interval_seconds = sampling_interval_seconds
        self._nvml: Any = None
        self._gpus: list[_GpuState] = []
        self._windows: dict[str, _Window] = {}
        self._incidents = 0  # errors/resets/losses so far; a window that sees one is incomplete
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._closed = False
        self._initialized_nvml = False
        try:
            self._start(gpu_indices, pynvml_module)
        except Exception as exc:  # never let metering break the engine
            self._fail(f"NVML setup failed: {exc!r}")
        if not self.available:
            _log_once(logging.WARNING, f"llmco2 energy meter unavailable: {self.reason}")
        elif self.reason:
            _log_once(logging.WARNING, f"llmco2 energy meter: {self.reason}")

    # -- setup ---------------------------------------------------------------------------

    def _start(self, gpu_indices: list[int] | None, pynvml_module: Any) -> None:
        nvml = pynvml_module
        if nvml is None:
            try:
                import pynvml as nvml  # type: ignore[no-redef]  # lazy: optional at run time
            except ImportError as exc:
                self.reason = f"pynvml (nvidia-ml-py) is not importable: {exc}"
                return
        try:
            nvml.nvmlInit()
        except Exception as exc:
            self.reason = f"nvmlInit failed (no NVIDIA driver or GPU?): {exc}"
            return
        self._nvml = nvml
        self._initialized_nvml = True

        all_handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible_handles = all_handles if visible is None else gpu_detection.visible_handles(nvml, all_handles, visible)

        notes: list[str] = []
        wanted = list(range(len(visible_handles))) if gpu_indices is None else list(gpu_indices)
        bad = [i for i in wanted if not 0 <= i < len(visible_handles)]
        if bad:
            # Measuring fewer GPUs than asked would silently under-report; say so in reason.
            notes.append(f"GPU ordinals {bad} are not among the {len(visible_handles)} visible GPUs; ignored")

        seen: set[int] = set()
        mig_indices: list[int] = []
        for ordinal in wanted:
            if ordinal in bad:
                continue
            handle, nvml_index, via_mig_uuid = self._parent_gpu(all_handles, visible_handles[ordinal])
            if nvml_index in seen:  # two MIG instances of one GPU: count its energy once
                continue
            seen.add(nvml_index)
            mig = via_mig_uuid or self._mig_enabled(handle)
            if mig:
                mig_indices.append(nvml_index)
            device = GpuDevice(
                index=nvml_index,
                name=as_text(nvml.nvmlDeviceGetName(handle)),
                method=COUNTER if self._counter_works(handle) else POWER_SAMPLING,
                mig=mig,
                uuid=self._uuid(handle),
            )
            self._gpus.append(_GpuState(device, handle))
        self.devices = [gpu.device for gpu in self._gpus]

        if mig_indices:
            notes.append(f"{MIG_NOTE} (GPU {', '.join(map(str, mig_indices))})")
        if not self._gpus:
            notes.append("no GPU to measure (CUDA_VISIBLE_DEVICES empty or no NVIDIA GPU)")
            self.reason = "; ".join(notes)
            self._shutdown_nvml()
            return
        self.reason = "; ".join(notes)
        self.available = True

        now = time.monotonic()
        for gpu in self._gpus:
            gpu.last_sample_seconds = now
            if gpu.device.method == COUNTER:
                self._read_counter(gpu)  # baseline: totals count from meter start
        if any(gpu.device.method == POWER_SAMPLING for gpu in self._gpus):
            self._sample_power()  # baseline sample, so the first interval is not lost
            self._sampler = threading.Thread(target=self._sample_loop, name="llmco2-energy-sampler", daemon=True)
            self._sampler.start()

    def _parent_gpu(self, all_handles: list[Any], handle: Any) -> tuple[Any, int, bool]:
        """(whole-GPU handle, NVML index, came from a MIG UUID) for a visible device.

        ``visible_handles`` returns either an element of ``all_handles`` (compared by
        identity: pynvml handles are ctypes pointers without value equality) or a MIG
        instance handle, whose energy NVML only reports for the parent GPU.
        """
        for index, candidate in enumerate(all_handles):
            if candidate is handle:
                return handle, index, False
        parent = self._nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        return parent, int(self._nvml.nvmlDeviceGetIndex(parent)), True

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current_mode = self._nvml.nvmlDeviceGetMigMode(handle)[0]
        except Exception:  # pre-Ampere GPUs: MIG not supported, so not enabled
            return False
        return bool(current_mode == getattr(self._nvml, "NVML_DEVICE_MIG_ENABLE", _NVML_DEVICE_MIG_ENABLE))

    def _uuid(self, handle: Any) -> str:
        try:
            return as_text(self._nvml.nvmlDeviceGetUUID(handle))
        except Exception:  # a label is not worth failing the meter for
            return ""

    def _counter_works(self, handle: Any) -> bool:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:  # NOT_SUPPORTED before Volta; any other failure: sampling may still work
            return False
        return True

    def _fail(self, reason: str) -> None:
        self.available = False
        self.reason = reason
        self._gpus = []
        self.devices = []
        self._stop.set()
        self._shutdown_nvml()

    def _shutdown_nvml(self) -> None:
        if self._initialized_nvml:
            self._initialized_nvml = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    # -- reading -------------------------------------------------------------------------

    def _record_error(self, gpu: _GpuState, exc: Exception) -> None:
        """Count a failed read; GPU_IS_LOST drops the GPU from all further reads. Lock held."""
        self._incidents += 1
        lost_code = getattr(self._nvml, "NVML_ERROR_GPU_IS_LOST", _NVML_ERROR_GPU_IS_LOST)
        if getattr(exc, "value", None) == lost_code:
            gpu.lost = True
            self.errors["gpu_lost"] += 1
            _log_once(logging.WARNING, f"llmco2 energy meter: GPU {gpu.device.index} is lost; no longer measured")
        else:
            self.errors["read_error"] += 1
            _log_once(
                logging.WARNING,
                f"llmco2 energy meter: reading GPU {gpu.device.index} failed ({exc!r}); keeping its last value",
            )

    def _read_counter(self, gpu: _GpuState) -> None:
        """Advance a counter GPU's energy from the driver's millijoule counter. Lock held.

        The read takes milliseconds (see the module docstring) and the lock is held through
        it, which is why callers read totals only at window boundaries, off the engine's path.
        """
        if gpu.lost:
            return
        try:
            counter_mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
        except Exception as exc:
            self._record_error(gpu, exc)
            return
        if gpu.last_counter_mj is not None:
            if counter_mj >= gpu.last_counter_mj:
                gpu.energy_j += (counter_mj - gpu.last_counter_mj) / 1000.0
            else:
                # The counter went down (driver reload, GPU reset): it restarted from zero,
                # so everything it shows now is new. Energy between our last read and the
                # reset is lost, hence an incident.
                gpu.energy_j += counter_mj / 1000.0
                self.errors["counter_reset"] += 1
                self._incidents += 1
                _log_once(logging.WARNING, f"llmco2 energy meter: GPU {gpu.device.index} energy counter reset")
        gpu.last_counter_mj = counter_mj

    def _sample_power(self) -> None:
        """Take one power sample of every sampling GPU and integrate it (sampler thread)."""
        for gpu in self._gpus:
            if gpu.device.method != POWER_SAMPLING or gpu.lost:
                continue
            try:
                # Read outside the lock: this thread is the only writer of power state, and
                # a slow driver call must not block callers reading totals.
                power_watts = self._nvml.nvmlDeviceGetPowerUsage(gpu.handle) / 1000.0
                error = None
            except Exception as exc:
                error = exc
            now = time.monotonic()
            with self._lock:
                if error is not None:
                    # Keep the last good sample: the next good one bridges the gap.
                    self._record_error(gpu, error)
                    continue
                if gpu.last_power_watts is not None:
                    gpu.energy_j += 0.5 * (gpu.last_power_watts + power_watts) * (now - gpu.last_sample_seconds)
                gpu.last_power_watts = power_watts
                gpu.last_sample_seconds = now

    def _sample_loop(self) -> None:
        while not self._stop.wait(self._sampling_interval_seconds):
            try:
                self._sample_power()
            except Exception as exc:  # a daemon thread must not die silently mid-run
                _log_once(logging.WARNING, f"llmco2 energy sampler error: {exc!r}")

    def _energies_j(self) -> tuple[float, ...]:
        """Per-GPU energy since start, refreshed now and never decreasing. Lock held."""
        now = time.monotonic()
        energies = []
        for gpu in self._gpus:
            if gpu.device.method == COUNTER:
                if not self._closed:
                    self._read_counter(gpu)
                estimate_j = gpu.energy_j
            else:
                # The sampler lags by up to one interval; extrapolate the last sample over
                # that gap (capped at one interval, so a stalled or failing sampler cannot
                # invent energy). The high-water mark below keeps the result monotonic
                # when the next trapezoid comes out below the extrapolation.
                estimate_j = gpu.energy_j
                if gpu.last_power_watts is not None and not gpu.lost and not self._closed:
                    gap_seconds = min(max(now - gpu.last_sample_seconds, 0.0), self._sampling_interval_seconds)
                    estimate_j += gpu.last_power_watts * gap_seconds
            gpu.reported_j = max(gpu.reported_j, estimate_j)
            energies.append(gpu.reported_j)
        return tuple(energies)

    # -- public API ----------------------------------------------------------------------

    def total_energy_j(self) -> float:
        """Energy of all metered GPUs since the meter started; never decreases (0.0 if unavailable)."""
        with self._lock:
            return sum(self._energies_j())

    def gpu_totals(self) -> tuple[GpuTotal, ...]:
        """Per-GPU energy since the meter started, one read of each GPU; each never decreases.

        For the energy windows, which read it once per window: the sum is ``total_energy_j()``.
        """
        with self._lock:
            energies_j = self._energies_j()
            return tuple(
                GpuTotal(gpu.device.index, gpu.device.uuid, gpu.device.name, energy_j)
                for gpu, energy_j in zip(self._gpus, energies_j)
            )

    def begin_window(self, name: str) -> None:
        """Start measuring a window called ``name``; windows may overlap but names must be unique."""
        with self._lock:
            if name in self._windows:
                raise ValueError(f"Energy window {name!r} is already open")
            self._windows[name] = _Window(time.monotonic(), self._energies_j(), self._incidents)

    def end_window(self, name: str) -> Measurement:
        """Close the window ``name`` and return its duration and energy.

        Raises ValueError for a name that was never begun (or already ended).
        """
        with self._lock:
            window = self._windows.pop(name, None)
            if window is None:
                raise ValueError(f"No open energy window {name!r}; open windows: {sorted(self._windows)}")
            energies_j = self._energies_j()
            seconds = time.monotonic() - window.start_seconds
            readings = tuple(
                GpuReading(gpu.device.index, gpu.device.name, end_j - start_j, gpu.device.method)
                for gpu, start_j, end_j in zip(self._gpus, window.start_energy_j, energies_j)
            )
            complete = (
                self.available
                and not self._closed
                and self._incidents == window.start_incidents
                and not any(gpu.lost for gpu in self._gpus)  # a GPU lost earlier is still missing
            )
        return Measurement(seconds, sum(r.energy_j for r in readings), readings, complete)

    def close(self) -> None:
        """Stop the sampler and release NVML; later totals stay frozen, later windows incomplete."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=max(1.0, 5 * self._sampling_interval_seconds))
            self._sampler = None
        with self._lock:
            if not self._closed and self.available:
                self._energies_j()  # last reading, so the frozen total is up to date
            self._closed = True
            self._shutdown_nvml()

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
