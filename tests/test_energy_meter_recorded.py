"""EnergyMeter replaying NVML readings recorded on a real NVIDIA H200 (no GPU needed).

``benchmarks/nvml_probe.py`` polled ``nvmlDeviceGetTotalEnergyConsumption`` and
``nvmlDeviceGetPowerUsage`` every few milliseconds on an H200 (driver 580.159.04) through
2 s idle -> 4 s of bf16 matrix products -> 2 s idle, and wrote every poll to
``benchmarks/results/h200_2026-11-27/nvml_trace.csv`` (summary: ``nvml_probe.json``).

Here a fake ``pynvml`` (``FakeNvml`` from ``tests/support/fake_nvml.py``) answers each read with the last
recorded row at or before a replay clock that the test moves, and the meter's own clock is that
same replay clock, so windows open and close at exact recorded instants. Expectations come from
the recording itself (counter differences, phase boundaries, update cadence), not from constants.

What the recording shows, and these tests pin down:
* the counter advances every ~100 ms (about 12 J per step idle, 46-76 J under load) and never
  goes backwards, so a window is exact up to one increment at its ends: windows must be seconds
  long, not one engine step (this is why ``energy_windows.py`` compares over seconds);
* the power reading is a lagging average (it takes about a second to follow a load change), so
  integrating it moves energy from a busy window into the idle one after it: the counter is the
  reference, power sampling only the fallback for GPUs without a counter.
"""

from __future__ import annotations

import bisect
import csv
import json
import statistics
import types
from dataclasses import dataclass
from functools import lru_cache

import pytest

from llmco2_vllm.measure import energy_meter
from llmco2_vllm.measure.energy_meter import EnergyMeter
from tests.support import REPO_ROOT
from tests.support.fake_nvml import FakeGpu, FakeNvml

pytestmark = pytest.mark.usefixtures("isolated_energy_meter")

RECORDING = REPO_ROOT / "benchmarks" / "results" / "h200_2026-11-27"
PHASES = ("idle_before", "busy", "idle_after")
SHORT_WINDOW_SECONDS = 0.030  # shorter than any engine step worth metering alone, and than the counter's period
LONG_WINDOW_SECONDS = 2.0


@dataclass(frozen=True)
class Row:
    seconds: float  # since the first poll
    phase: str
    energy_mj: int  # nvmlDeviceGetTotalEnergyConsumption
    power_mw: int  # nvmlDeviceGetPowerUsage


@dataclass(frozen=True)
class Update:
    """One advance of the recorded counter, as first seen by the poller."""

    seconds: float
    increment_mj: int
    interval_seconds: float  # since the previous advance (nan for the first)


@dataclass(frozen=True)
class Recording:
    rows: tuple[Row, ...]
    summary: dict

    def phase(self, name: str) -> tuple[Row, Row]:
        """First and last recorded row of a phase (the probe summarised each phase over these)."""
        rows = [row for row in self.rows if row.phase == name]
        return rows[0], rows[-1]

    def counter_j(self, start: Row, end: Row) -> float:
        return (end.energy_mj - start.energy_mj) / 1000.0

    def updates(self, phase: str | None = None) -> list[Update]:
        found: list[Update] = []
        previous_change = None
        for before, row in zip(self.rows, self.rows[1:]):
            if row.energy_mj != before.energy_mj:
                interval = row.seconds - previous_change if previous_change is not None else float("nan")
                found.append(Update(row.seconds, row.energy_mj - before.energy_mj, interval))
                previous_change = row.seconds
        return [u for u in found if phase is None or self.phase_at(u.seconds) == phase]

    def phase_at(self, seconds: float) -> str:
        return self.rows[bisect.bisect_right([r.seconds for r in self.rows], seconds) - 1].phase


@lru_cache(maxsize=1)
def _load() -> Recording:
    with (RECORDING / "nvml_trace.csv").open(newline="") as handle:
        rows = tuple(
            Row(float(r["seconds"]), r["phase"], int(r["energy_mj"]), int(r["power_mw"])) for r in csv.DictReader(handle)
        )
    summary = json.loads((RECORDING / "nvml_probe.json").read_text())
    return Recording(rows, summary)


@pytest.fixture
def recording() -> Recording:
    return _load()


class Replay:
    """The recording played back: reads return the last row at or before ``now`` (seconds)."""

    def __init__(self, recording: Recording) -> None:
        self.rows = recording.rows
        self._times = [row.seconds for row in self.rows]
        self.now = self.rows[0].seconds
        self._changes = [(self.rows[0].seconds, self.rows[0].energy_mj)] + [
            (row.seconds, row.energy_mj) for before, row in zip(self.rows, self.rows[1:]) if row.energy_mj != before.energy_mj
        ]
        self._change_times = [t for t, _ in self._changes]

    def row(self) -> Row:
        index = bisect.bisect_right(self._times, self.now) - 1
        if index < 0:
            raise AssertionError(f"replay clock {self.now} is before the recording starts")
        return self.rows[index]

    def monotonic(self) -> float:
        return self.now

    def interpolated_energy_mj(self, seconds: float) -> float:
        """Best estimate of the true counter at ``seconds``: linear between the counter's advances.

        The counter shows the energy up to its last advance, so the truth lies between the shown
        value and the next advance's value; a straight line between advances stays inside that.
        """
        changes = self._changes
        index = bisect.bisect_right(self._change_times, seconds) - 1
        if index + 1 >= len(changes):
            return float(changes[-1][1])
        (t0, e0), (t1, e1) = changes[index], changes[index + 1]
        return e0 + (e1 - e0) * (seconds - t0) / (t1 - t0)


class ReplayNvml(FakeNvml):
    """``FakeNvml`` with one H200 whose counter and power come from the replay."""

    def __init__(self, replay: Replay, name: str) -> None:
        super().__init__([FakeGpu(name=name, uuid="GPU-h200-recorded")])
        self.replay = replay

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        handle.counter_mj = self.replay.row().energy_mj
        return super().nvmlDeviceGetTotalEnergyConsumption(handle)  # keeps counter_error / counter_reads

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        handle.power_mw = self.replay.row().power_mw
        return super().nvmlDeviceGetPowerUsage(handle)


@pytest.fixture
def replay(recording: Recording, monkeypatch: pytest.MonkeyPatch) -> Replay:
    """A replay at the first row; the meter's clock (``time.monotonic`` in energy_meter) is the replay's."""
    playback = Replay(recording)
    monkeypatch.setattr(energy_meter, "time", types.SimpleNamespace(monotonic=playback.monotonic))
    return playback


def _window(meter: EnergyMeter, replay: Replay, name: str, start: float, end: float) -> energy_meter.Measurement:
    replay.now = start
    meter.begin_window(name)
    replay.now = end
    return meter.end_window(name)


def test_recording_matches_its_summary_and_the_counter_never_goes_back(recording: Recording) -> None:
    rows, summary = recording.rows, recording.summary
    assert summary["gpu_name"] == "NVIDIA H200" and summary["meter_devices"][0]["method"] == "counter"
    assert len(rows) == summary["counter_updates"]["polls"]
    assert [row.phase for row in rows] == sorted((row.phase for row in rows), key=PHASES.index)  # phases in order
    assert all(b.seconds > a.seconds for a, b in zip(rows, rows[1:]))
    assert all(b.energy_mj >= a.energy_mj for a, b in zip(rows, rows[1:]))  # no reset, no jitter backwards

    updates = recording.updates()
    assert len(updates) == summary["counter_updates"]["changes"]
    intervals = [u.interval_seconds for u in updates[1:]]
    # The counter advances on its own ~100 ms clock, however fast it is polled (polls: ~5 ms apart).
    assert statistics.median(intervals) == pytest.approx(summary["counter_updates"]["interval_ms_p50"] / 1000, abs=0.005)
    assert 0.09 < min(intervals) and max(intervals) < 0.11
    assert statistics.median(b.seconds - a.seconds for a, b in zip(rows, rows[1:])) < min(intervals) / 10
    # Its steps are energy over that period: ~12 J idle (~120 W), several times that under load.
    idle_step = statistics.median(u.increment_mj for u in recording.updates("idle_before"))
    busy_step = statistics.median(u.increment_mj for u in recording.updates("busy"))
    assert busy_step > 4 * idle_step


def test_counter_windows_equal_the_recorded_counter_differences(recording: Recording, replay: Replay) -> None:
    meter = EnergyMeter(pynvml_module=ReplayNvml(replay, recording.summary["gpu_name"]))
    assert [(d.name, d.method) for d in meter.devices] == [("NVIDIA H200", "counter")]
    measured = {}
    for phase in PHASES:
        first, last = recording.phase(phase)
        measurement = _window(meter, replay, phase, first.seconds, last.seconds)
        expected_j = recording.counter_j(first, last)
        assert measurement.energy_j == pytest.approx(expected_j, abs=1e-9), phase  # exact to the millijoule
        assert measurement.energy_j == pytest.approx(recording.summary[f"{phase}_power"]["counter_j"], abs=1e-9)
        assert measurement.seconds == pytest.approx(last.seconds - first.seconds)
        assert measurement.complete
        measured[phase] = measurement
    # The real meter's busy window on the H200 read the same counter difference.
    assert measured["busy"].energy_j == pytest.approx(recording.summary["busy_window"]["meter_energy_j"], abs=1e-9)

    # Busy mean power is plausible by the recording's own standards: above the idle phases'
    # counter power, at most the enforced power limit NVML reported.
    busy_watts = measured["busy"].energy_j / measured["busy"].seconds
    idle_watts = max(measured[p].energy_j / measured[p].seconds for p in ("idle_before", "idle_after"))
    assert idle_watts < busy_watts <= recording.summary["power_limit_w"]
    assert busy_watts == pytest.approx(recording.summary["busy_power"]["counter_mean_w"])
    assert meter.errors == {"read_error": 0, "counter_reset": 0, "gpu_lost": 0}
    meter.close()


def test_total_energy_is_monotonic_over_the_whole_replay(recording: Recording, replay: Replay) -> None:
    nvml = ReplayNvml(replay, "NVIDIA H200")
    meter = EnergyMeter(pynvml_module=nvml)
    start_mj = recording.rows[0].energy_mj
    totals = []
    rows = recording.rows
    for row, following in zip(rows, rows[1:] + rows[-1:]):
        # At a recorded poll, and halfway to the next one: the meter sees the last value polled.
        for replay.now in (row.seconds, (row.seconds + following.seconds) / 2):
            totals.append(meter.total_energy_j())
            assert totals[-1] == pytest.approx((row.energy_mj - start_mj) / 1000, abs=1e-6)
    assert all(b >= a for a, b in zip(totals, totals[1:]))
    assert totals[-1] == pytest.approx(recording.counter_j(recording.rows[0], recording.rows[-1]), abs=1e-6)
    assert totals[-1] > totals[0]
    assert meter.errors == {"read_error": 0, "counter_reset": 0, "gpu_lost": 0}
    meter.close()


def _sliding_windows(
    recording: Recording, replay: Replay, meter: EnergyMeter, seconds: float
) -> list[tuple[float, float]]:
    """(measured J, interpolated true J) for windows of ``seconds`` starting at every busy poll."""
    _, last = recording.phase("busy")
    results = []
    for index, row in enumerate(r for r in recording.rows if r.phase == "busy"):
        if row.seconds + seconds > last.seconds:
            break
        measurement = _window(meter, replay, f"w{index}", row.seconds, row.seconds + seconds)
        truth_mj = replay.interpolated_energy_mj(row.seconds + seconds) - replay.interpolated_energy_mj(row.seconds)
        results.append((measurement.energy_j, truth_mj / 1000))
    return results


def test_windows_shorter_than_the_counter_period_read_zero_or_one_increment(recording: Recording, replay: Replay) -> None:
    busy_updates = recording.updates("busy")
    period = min(u.interval_seconds for u in busy_updates)
    assert SHORT_WINDOW_SECONDS < period  # so at most one advance falls inside a short window
    increments_j = {u.increment_mj / 1000 for u in busy_updates}
    largest_increment_j = max(increments_j)

    meter = EnergyMeter(pynvml_module=ReplayNvml(replay, "NVIDIA H200"))
    short = _sliding_windows(recording, replay, meter, SHORT_WINDOW_SECONDS)
    assert len(short) > 300
    for measured_j, _ in short:
        assert measured_j == 0.0 or any(measured_j == pytest.approx(inc, abs=1e-9) for inc in increments_j)
    hits = sum(1 for measured_j, _ in short if measured_j > 0)
    # Whether a window sees the advance is luck: about window / period of them do.
    median_period = statistics.median(u.interval_seconds for u in busy_updates)
    assert hits / len(short) == pytest.approx(SHORT_WINDOW_SECONDS / median_period, abs=0.1)

    # Error bound: the counter lags the truth by less than one increment at either end, and both
    # ends lag the same way, so |measured - true| <= one increment, however short the window.
    errors_j = [abs(measured_j - true_j) for measured_j, true_j in short]
    assert max(errors_j) <= largest_increment_j + 1e-9
    assert max(errors_j) > 0.5 * statistics.median(true_j for _, true_j in short)  # and it is hit: short windows are noise

    # The same absolute bound is small against windows of seconds (what energy_windows.py uses).
    long = _sliding_windows(recording, replay, meter, LONG_WINDOW_SECONDS)
    assert long
    assert max(abs(m - t) for m, t in long) <= largest_increment_j + 1e-9
    short_bound = largest_increment_j / statistics.median(t for _, t in short)
    long_bound = largest_increment_j / min(t for _, t in long)
    assert short_bound > 1.0  # a 30 ms window can be off by more than its whole energy
    assert long_bound < 0.1  # a 2 s window is within 10 %
    meter.close()


def test_power_sampling_lags_and_underestimates_the_busy_window(recording: Recording, replay: Replay) -> None:
    nvml = ReplayNvml(replay, "NVIDIA H200")
    nvml.gpus[0].counter_error = FakeNvml.NVML_ERROR_NOT_SUPPORTED  # as a pre-Volta GPU: no counter
    # Park the sampler thread (it would sample on the wall clock) and take its place: one sample
    # every 0.1 s of replay time, the meter's default interval and the power reading's own cadence.
    meter = EnergyMeter(pynvml_module=nvml, sampling_interval_seconds=3600)
    assert meter.devices[0].method == "power_sampling"
    interval = 0.1
    power_changes = [b.seconds for a, b in zip(recording.rows, recording.rows[1:]) if b.power_mw != a.power_mw]
    assert statistics.median(b - a for a, b in zip(power_changes, power_changes[1:])) == pytest.approx(interval, abs=0.01)

    boundaries = {phase: recording.phase(phase) for phase in PHASES}
    events: list[tuple[float, int, str]] = []  # (time, order, what): sample before opening/closing
    for phase, (first, last) in boundaries.items():
        events += [(first.seconds, 1, f"begin {phase}"), (last.seconds, 1, f"end {phase}")]
    t = recording.rows[0].seconds
    while t <= recording.rows[-1].seconds:
        events.append((t, 0, "sample"))
        t += interval
    sampled_j = {}
    for when, _, what in sorted(events):
        replay.now = when
        if what == "sample":
            meter._sample_power()  # what the sampler thread does every interval
        elif what.startswith("begin"):
            meter.begin_window(what.split()[1])
        else:
            measurement = meter.end_window(what.split()[1])
            assert measurement.complete and measurement.gpus[0].method == "power_sampling"
            sampled_j[what.split()[1]] = measurement.energy_j
    meter.close()

    counter_j = {phase: recording.counter_j(*boundaries[phase]) for phase in PHASES}
    # The counter is the reference. The power reading trails a load change by about a second, so
    # sampling it misses the start of the busy phase and books the busy tail into the idle after.
    assert sampled_j["busy"] < counter_j["busy"]
    assert sampled_j["idle_after"] > counter_j["idle_after"]
    missed_j = counter_j["busy"] - sampled_j["busy"]
    assert missed_j > 0.05 * counter_j["busy"]
    # Energy is mostly moved in time, not lost: the idle window after gets most of it back, and
    # over the whole trace the two methods agree several times better than over the busy window.
    assert sampled_j["idle_after"] - counter_j["idle_after"] > 0.5 * missed_j
    whole_trace_error = abs(sum(sampled_j.values()) - sum(counter_j.values())) / sum(counter_j.values())
    assert whole_trace_error < (missed_j / counter_j["busy"]) / 4

    # The lag itself: after the load starts, the counter's steps reach 90 % of the busy mean power
    # at least half a second before the power reading does.
    busy_first, busy_last = boundaries["busy"]
    busy_watts = counter_j["busy"] / (busy_last.seconds - busy_first.seconds)
    counter_up = next(u.seconds for u in recording.updates("busy") if u.increment_mj / u.interval_seconds / 1000 >= 0.9 * busy_watts)
    power_up = next(r.seconds for r in recording.rows if r.phase == "busy" and r.power_mw / 1000 >= 0.9 * busy_watts)
    assert power_up - counter_up > 0.5
