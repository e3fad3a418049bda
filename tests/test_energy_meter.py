"""Tests for the NVML energy meter against a scripted fake pynvml (no GPU needed)."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from llmco2_vllm.measure.energy_meter import MIG_NOTE, EnergyMeter, Measurement
from tests.support.fake_nvml import FakeGpu, FakeMigDevice, FakeNvml, FakeNVMLError

pytestmark = pytest.mark.usefixtures("isolated_energy_meter")


def make_gpus(count: int) -> list[FakeGpu]:
    return [FakeGpu(uuid=f"GPU-{i:04d}-abcd") for i in range(count)]


def test_counter_energy_is_sum_of_deltas_over_two_gpus() -> None:
    gpus = make_gpus(2)
    gpus[0].counter_mj, gpus[1].counter_mj = 1_000_000, 5_000_000  # counters do not start at zero
    nvml = FakeNvml(gpus)
    meter = EnergyMeter(pynvml_module=nvml)
    assert meter.available and meter.reason == ""
    assert [(d.index, d.name, d.method, d.mig) for d in meter.devices] == [
        (0, "NVIDIA H100 80GB HBM3", "counter", False),
        (1, "NVIDIA H100 80GB HBM3", "counter", False),
    ]
    assert meter.total_energy_j() == 0.0

    meter.begin_window("step")
    gpus[0].counter_mj += 2_000  # 2 J
    gpus[1].counter_mj += 4_500  # 4.5 J
    measurement = meter.end_window("step")

    assert measurement.energy_j == pytest.approx(6.5)
    assert [(r.index, r.energy_j, r.method) for r in measurement.gpus] == [(0, 2.0, "counter"), (1, 4.5, "counter")]
    assert measurement.complete
    assert measurement.seconds >= 0
    assert meter.total_energy_j() == pytest.approx(6.5)
    assert meter.errors == {"read_error": 0, "counter_reset": 0, "gpu_lost": 0}
    meter.close()
    assert nvml.shutdown_calls == 1


def test_overlapping_windows_and_unknown_names() -> None:
    gpus = make_gpus(1)
    meter = EnergyMeter(pynvml_module=FakeNvml(gpus))
    meter.begin_window("request")
    gpus[0].counter_mj += 1_000
    meter.begin_window("step")
    gpus[0].counter_mj += 3_000
    assert meter.end_window("step").energy_j == pytest.approx(3.0)
    assert meter.end_window("request").energy_j == pytest.approx(4.0)
    with pytest.raises(ValueError, match="No open energy window 'request'"):
        meter.end_window("request")
    meter.begin_window("a")
    with pytest.raises(ValueError, match="already open"):
        meter.begin_window("a")
    meter.close()


def test_cuda_visible_devices_maps_engine_ordinals_to_nvml_indexes(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = make_gpus(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    meter = EnergyMeter(gpu_indices=[0, 1], pynvml_module=FakeNvml(gpus))
    assert [d.index for d in meter.devices] == [2, 3]
    meter.begin_window("w")
    for gpu in gpus:
        gpu.counter_mj += 1_000 * (gpus.index(gpu) + 1)  # 1, 2, 3, 4 J
    measurement = meter.end_window("w")
    assert measurement.energy_j == pytest.approx(3.0 + 4.0)  # only NVML GPUs 2 and 3

    single = EnergyMeter(gpu_indices=[1], pynvml_module=FakeNvml(gpus))
    assert [d.index for d in single.devices] == [3]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0001")  # UUID prefix
    by_uuid = EnergyMeter(pynvml_module=FakeNvml(gpus))
    assert [d.index for d in by_uuid.devices] == [1]


def test_ordinals_outside_the_visible_gpus_are_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    meter = EnergyMeter(gpu_indices=[0, 1], pynvml_module=FakeNvml(make_gpus(2)))
    assert meter.available
    assert [d.index for d in meter.devices] == [1]
    assert "[1]" in meter.reason and "ignored" in meter.reason


def test_no_visible_gpu_is_unavailable_and_releases_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    nvml = FakeNvml(make_gpus(2))
    meter = EnergyMeter(pynvml_module=nvml)
    assert not meter.available and "no GPU" in meter.reason
    assert nvml.shutdown_calls == 1
    meter.close()
    assert nvml.shutdown_calls == 1  # not twice


def test_unsupported_counter_falls_back_to_integrating_power_off_thread() -> None:
    gpus = make_gpus(1)
    gpus[0].counter_error = FakeNvml.NVML_ERROR_NOT_SUPPORTED  # pre-Volta
    gpus[0].power_mw = 300_000  # 300 W
    meter = EnergyMeter(pynvml_module=FakeNvml(gpus), sampling_interval_seconds=0.05)
    assert meter.devices[0].method == "power_sampling"
    assert meter._sampler is not None and meter._sampler.daemon

    meter.begin_window("w")
    meter.begin_window("spans close")
    time.sleep(0.3)
    measurement = meter.end_window("w")
    expected_j = 300.0 * measurement.seconds
    assert measurement.energy_j == pytest.approx(expected_j, rel=0.2)
    assert measurement.gpus[0].method == "power_sampling"
    assert measurement.complete

    sampler = meter._sampler
    meter.close()
    assert not sampler.is_alive()
    frozen_j = meter.total_energy_j()
    time.sleep(0.06)
    assert meter.total_energy_j() == frozen_j  # closed: no more sampling
    assert not meter.end_window("spans close").complete  # energy after close is unmeasured


def test_power_read_errors_are_counted_and_sampling_recovers() -> None:
    gpus = make_gpus(1)
    gpus[0].counter_error = FakeNvml.NVML_ERROR_NOT_SUPPORTED
    gpus[0].power_mw = 100_000
    meter = EnergyMeter(pynvml_module=FakeNvml(gpus), sampling_interval_seconds=0.01)
    meter.begin_window("w")
    gpus[0].power_error = FakeNvml.NVML_ERROR_UNKNOWN
    time.sleep(0.05)
    assert meter.errors["read_error"] >= 1
    gpus[0].power_error = None
    time.sleep(0.05)
    before_j = meter.total_energy_j()
    time.sleep(0.05)
    assert meter.total_energy_j() > before_j  # the sampler thread survived the errors
    assert not meter.end_window("w").complete
    meter.close()


def test_counter_reset_counts_from_zero_and_stays_monotonic() -> None:
    gpus = make_gpus(1)
    gpus[0].counter_mj = 10_000
    meter = EnergyMeter(pynvml_module=FakeNvml(gpus))
    gpus[0].counter_mj = 15_000
    assert meter.total_energy_j() == pytest.approx(5.0)

    meter.begin_window("w")
    gpus[0].counter_mj = 2_000  # driver reload: counter restarted and has counted 2 J since
    assert meter.total_energy_j() == pytest.approx(7.0)
    gpus[0].counter_mj = 3_000
    measurement = meter.end_window("w")
    assert measurement.energy_j == pytest.approx(3.0)
    assert not measurement.complete
    assert meter.errors["counter_reset"] == 1

    meter.begin_window("after")
    gpus[0].counter_mj = 4_000
    assert meter.end_window("after").complete  # later windows are clean again


def test_read_error_keeps_last_value_then_recovers() -> None:
    gpus = make_gpus(2)
    meter = EnergyMeter(pynvml_module=FakeNvml(gpus))
    meter.begin_window("w")
    gpus[0].counter_mj = 1_000
    gpus[1].counter_mj = 1_000
    assert meter.total_energy_j() == pytest.approx(2.0)

    gpus[0].counter_error = FakeNvml.NVML_ERROR_UNKNOWN
    gpus[0].counter_mj = 5_000
    gpus[1].counter_mj = 2_000
    assert meter.total_energy_j() == pytest.approx(1.0 + 2.0)  # GPU 0 kept its last good value
    assert meter.errors["read_error"] == 1

    gpus[0].counter_error = None  # recovery: the counter kept counting through the error
    measurement = meter.end_window("w")
    assert measurement.energy_j == pytest.approx(5.0 + 2.0)
    assert not measurement.complete

    meter.begin_window("clean")
    gpus[0].counter_mj += 1_000
    assert meter.end_window("clean").complete


def test_lost_gpu_is_dropped_from_reads() -> None:
    gpus = make_gpus(2)
    meter = EnergyMeter(pynvml_module=FakeNvml(gpus))
    meter.begin_window("w")
    gpus[0].counter_mj = 1_000
    gpus[1].counter_mj = 1_000
    meter.total_energy_j()
    gpus[1].counter_error = FakeNvml.NVML_ERROR_GPU_IS_LOST
    gpus[0].counter_mj = 3_000
    assert meter.total_energy_j() == pytest.approx(3.0 + 1.0)
    reads_after_loss = gpus[1].counter_reads
    gpus[0].counter_mj = 4_000
    measurement = meter.end_window("w")
    assert gpus[1].counter_reads == reads_after_loss  # never read again
    assert measurement.energy_j == pytest.approx(4.0 + 1.0)
    assert not measurement.complete
    assert meter.errors == {"read_error": 0, "counter_reset": 0, "gpu_lost": 1}

    meter.begin_window("later")
    gpus[0].counter_mj = 5_000
    later = meter.end_window("later")
    assert later.energy_j == pytest.approx(1.0)
    assert not later.complete  # GPU 1's energy is still missing


def _assert_safe_when_unavailable(meter: EnergyMeter) -> None:
    assert not meter.available
    assert meter.reason
    assert meter.devices == []
    assert meter.total_energy_j() == 0.0
    meter.begin_window("w")
    measurement = meter.end_window("w")
    assert isinstance(measurement, Measurement)
    assert measurement.energy_j == 0.0 and measurement.gpus == () and not measurement.complete
    meter.close()
    meter.close()


def test_init_failure_is_unavailable_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(make_gpus(1), init_error=FakeNVMLError(9))  # NVML_ERROR_DRIVER_NOT_LOADED
    with caplog.at_level(logging.WARNING, logger="llmco2_vllm"):
        first = EnergyMeter(pynvml_module=nvml)
        second = EnergyMeter(pynvml_module=nvml)
    assert "nvmlInit failed" in first.reason
    _assert_safe_when_unavailable(first)
    _assert_safe_when_unavailable(second)
    assert nvml.shutdown_calls == 0  # never initialized, so never shut down
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_missing_pynvml_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    meter = EnergyMeter()
    assert "pynvml" in meter.reason
    _assert_safe_when_unavailable(meter)


def test_unexpected_setup_error_never_raises() -> None:
    nvml = FakeNvml(make_gpus(1))
    nvml.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(FakeNVMLError(999))  # type: ignore[method-assign]
    meter = EnergyMeter(pynvml_module=nvml)
    assert "NVML setup failed" in meter.reason
    assert nvml.shutdown_calls == 1
    _assert_safe_when_unavailable(meter)


def test_mig_mode_measures_the_whole_parent_gpu(caplog: pytest.LogCaptureFixture) -> None:
    gpus = make_gpus(2)
    gpus[0].mig_mode = FakeNvml.NVML_DEVICE_MIG_ENABLE
    with caplog.at_level(logging.WARNING, logger="llmco2_vllm"):
        meter = EnergyMeter(pynvml_module=FakeNvml(gpus))
    assert meter.available
    assert [(d.index, d.mig) for d in meter.devices] == [(0, True), (1, False)]
    assert MIG_NOTE in meter.reason
    assert any(MIG_NOTE in r.getMessage() for r in caplog.records)
    meter.begin_window("w")
    gpus[0].counter_mj += 1_000
    assert meter.end_window("w").energy_j == pytest.approx(1.0)


def test_mig_uuid_in_cuda_visible_devices_measures_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = make_gpus(2)
    gpus[1].mig_devices = [FakeMigDevice("MIG-aaaa", gpus[1]), FakeMigDevice("MIG-bbbb", gpus[1])]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-bbbb")
    meter = EnergyMeter(pynvml_module=FakeNvml(gpus))
    assert [(d.index, d.mig, d.method) for d in meter.devices] == [(1, True, "counter")]
    assert MIG_NOTE in meter.reason
    meter.begin_window("w")
    gpus[0].counter_mj += 5_000
    gpus[1].counter_mj += 2_000
    measurement = meter.end_window("w")
    assert measurement.energy_j == pytest.approx(2.0)
    assert measurement.complete  # whole-GPU attribution is flagged in devices, not an error


def test_real_pynvml_on_this_machine_never_raises() -> None:
    meter = EnergyMeter()
    try:
        if meter.available:  # a GPU machine: at least sane numbers
            assert meter.devices and meter.total_energy_j() >= 0.0
        else:
            assert meter.reason
            assert meter.total_energy_j() == 0.0
    finally:
        meter.close()
