"""Aligning measured GPU energy with predicted steps.

Steps last milliseconds while NVML's energy counters update coarsely (every ~100 ms on an H100 and H200), so
measurement is compared with prediction over windows of several seconds: a window holds the
predicted prefill and decode energy of the steps that finished in it, its idle time (wall time not
covered by any step), and the energy the meter saw. Each closed window teaches the calibrator, and
its measured energy is split into prefill, decode and idle in proportion to the calibrated terms,
so the parts add up to exactly what was measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol


class Meter(Protocol):
    available: bool

    def total_energy_j(self) -> float: ...


class Calibrator(Protocol):
    def update(self, predicted_prefill_j: float, predicted_decode_j: float, idle_seconds: float, measured_j: float) -> bool: ...

    def correct(
        self, predicted_prefill_j: float, predicted_decode_j: float, idle_seconds: float = 0.0
    ) -> tuple[float, float, float]: ...


@dataclass(frozen=True)
class GpuWindowEnergy:
    """One metered GPU at a window's close: its total since the meter started, and the window's share."""

    index: int  # NVML index
    uuid: str  # NVML UUID, "GPU-..."
    total_j: float  # never decreases
    window_j: float


@dataclass(frozen=True)
class WindowResult:
    seconds: float
    idle_seconds: float
    predicted_prefill_j: float
    predicted_decode_j: float
    predicted_idle_j: float  # prior idle power x idle time
    calibrated_idle_j: float  # with the correction in force before this window was learned
    measured_j: float | None  # None without a meter
    measured_split_j: tuple[float, float, float] | None  # (prefill, decode, idle), sums to measured_j
    learned: bool  # the calibrator accepted the window
    # Meter incidents (read errors, counter resets, lost GPUs) seen since the last window closed. The
    # meter keeps its last good value through them, so the energy shifts into a later window: that
    # window and the next are not learned from, although their measured energy is still exported.
    meter_incidents: int = 0
    # Per GPU, for meters that read GPUs one by one (``EnergyMeter.gpu_totals``); empty otherwise.
    gpus: tuple[GpuWindowEnergy, ...] = ()
    # Measured with every GPU and no incident in this window or the one before: fit to learn from.
    complete: bool = False


class WindowAccountant:
    """Accumulates steps into windows and closes them against the meter (worker thread only)."""

    def __init__(
        self,
        meter: Meter | None,
        calibrator: Calibrator,
        prior_idle_watts: float,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.meter = meter if meter is not None and meter.available else None
        self.calibrator = calibrator
        self.prior_idle_watts = prior_idle_watts
        self.window_seconds = window_seconds
        self.clock = clock
        self._started = clock()
        self._gpu_start_j: dict[tuple[int, str], float] = {}
        self._gpu_joined = False  # a GPU first seen at this read: its energy before it is unknown
        self._meter_start = self._read_meter()[0] if self.meter else 0.0
        self.metered_gpus: tuple[tuple[int, str], ...] = tuple(self._gpu_start_j)  # (NVML index, UUID)
        self._incidents_seen = _meter_incidents(self.meter)
        self._previous_window_disturbed = False
        self._prefill_j = self._decode_j = self._busy_seconds = 0.0

    def add_step(self, predicted_prefill_j: float, predicted_decode_j: float, wall_seconds: float) -> None:
        self._prefill_j += predicted_prefill_j
        self._decode_j += predicted_decode_j
        self._busy_seconds += max(wall_seconds, 0.0)

    def due(self) -> bool:
        return self.clock() - self._started >= self.window_seconds

    def seconds_until_due(self) -> float:
        return max(0.0, self.window_seconds - (self.clock() - self._started))

    def close(self) -> WindowResult:
        now = self.clock()
        seconds = max(now - self._started, 1e-9)
        idle_seconds = max(seconds - self._busy_seconds, 0.0)
        prefill_j, decode_j = self._prefill_j, self._decode_j
        calibrated = self.calibrator.correct(prefill_j, decode_j, idle_seconds)
        measured = split = None
        learned = False
        new_incidents = 0
        complete = False
        gpus: tuple[GpuWindowEnergy, ...] = ()
        if self.meter is not None:
            total, gpus = self._read_meter()
            # Per GPU where the meter reads them one by one, so a GPU that joins adds only its window.
            measured = sum(gpu.window_j for gpu in gpus) if gpus else max(total - self._meter_start, 0.0)
            self._meter_start = total
            parts = sum(calibrated)
            if parts > 0:
                split = (
                    measured * calibrated[0] / parts,
                    measured * calibrated[1] / parts,
                    measured * calibrated[2] / parts,
                )
            else:
                split = (0.0, 0.0, measured)
            incidents = _meter_incidents(self.meter)
            new_incidents = incidents - self._incidents_seen
            self._incidents_seen = incidents
            # A GPU that joined in this window (a rank on another node that reported late) is missing
            # from its start: the window is exported but not learned from.
            disturbed = new_incidents > 0 or self._gpu_joined
            complete = not disturbed and not self._previous_window_disturbed
            if complete:
                learned = self.calibrator.update(prefill_j, decode_j, idle_seconds, measured)
            self._previous_window_disturbed = disturbed
        self._started = now
        self._prefill_j = self._decode_j = self._busy_seconds = 0.0
        return WindowResult(
            seconds=seconds,
            idle_seconds=idle_seconds,
            predicted_prefill_j=prefill_j,
            predicted_decode_j=decode_j,
            predicted_idle_j=self.prior_idle_watts * idle_seconds,
            calibrated_idle_j=calibrated[2],
            measured_j=measured,
            measured_split_j=split,
            learned=learned,
            meter_incidents=new_incidents,
            gpus=gpus,
            complete=complete,
        )

    def _read_meter(self) -> tuple[float, tuple[GpuWindowEnergy, ...]]:
        """(total energy, per-GPU energies) with one read of each GPU: a read costs milliseconds."""
        assert self.meter is not None
        read_gpus = getattr(self.meter, "gpu_totals", None)
        if read_gpus is None:
            return self.meter.total_energy_j(), ()
        gpus = []
        self._gpu_joined = False
        for gpu in read_gpus():
            key = (gpu.index, gpu.uuid)
            self._gpu_joined |= key not in self._gpu_start_j
            start_j = self._gpu_start_j.get(key, gpu.energy_j)
            self._gpu_start_j[key] = gpu.energy_j
            gpus.append(GpuWindowEnergy(gpu.index, gpu.uuid, gpu.energy_j, max(gpu.energy_j - start_j, 0.0)))
        return sum(gpu.total_j for gpu in gpus), tuple(gpus)


def _meter_incidents(meter: Meter | None) -> int:
    """Errors, resets and losses the meter counted so far (``EnergyMeter.errors``; 0 for meters without it)."""
    errors = getattr(meter, "errors", None)
    return int(sum(errors.values())) if isinstance(errors, dict) else 0
