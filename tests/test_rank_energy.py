"""Multi-node metering: where an engine's GPUs are, and remote ranks reporting their GPU energy.

The transport is real (ZeroMQ on 127.0.0.1); NVML is the scripted fake, one per reporting worker.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from llmco2_vllm.accounting.energy_windows import WindowAccountant
from llmco2_vllm.measure.energy_meter import EnergyMeter, GpuTotal
from llmco2_vllm.measure.rank_energy import NodesEnergyMeter, RankEnergyReceiver, RankEnergyReporter, RankReport
from llmco2_vllm.plugin.placement import engine_placement
from tests.support.fake_nvml import FakeGpu, FakeNvml


def _parallel(**values):
    defaults = dict(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_index=0, data_parallel_rank=0,
                    data_parallel_rank_local=0, nnodes_within_dp=1, master_addr="10.0.0.1")  # fmt: skip
    return SimpleNamespace(**{**defaults, **values})


def test_dense_data_parallel_engines_keep_their_index_as_label():
    # vLLM resets data_parallel_rank to 0 in each replica of a dense model; the index stays.
    placement = engine_placement(_parallel(data_parallel_index=1, data_parallel_rank=0, data_parallel_rank_local=1), 29620)
    assert placement.engine == "1"
    assert placement.gpu_indices == (1,)
    assert placement.remote_ranks == () and placement.rank_energy_address is None


def test_tensor_parallel_engines_take_their_block_of_gpus():
    placement = engine_placement(_parallel(tensor_parallel_size=2, data_parallel_index=1, data_parallel_rank_local=1), 1)
    assert placement.gpu_indices == (2, 3)


def test_assigned_physical_gpus_map_through_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    placement = engine_placement(_parallel(tensor_parallel_size=2, assigned_physical_gpu_ids=[6, 7]), 1)
    assert placement.gpu_indices == (2, 3)


def test_assigned_physical_gpus_of_one_engine_only():
    # vLLM gives each data-parallel engine only its shard of GPUs for Ray and device-isolating platforms.
    placement = engine_placement(_parallel(tensor_parallel_size=2, data_parallel_index=1, data_parallel_rank_local=1,
                                           assigned_physical_gpu_ids=[2, 3]), 1)  # fmt: skip
    assert placement.gpu_indices == (2, 3)
    whole_node = _parallel(data_parallel_index=1, data_parallel_rank_local=1, assigned_physical_gpu_ids=[5, 4])  # --device-ids
    assert engine_placement(whole_node, 1).gpu_indices == (4,)


def test_engine_across_nodes_meters_its_node_and_expects_the_others():
    parallel = _parallel(tensor_parallel_size=8, pipeline_parallel_size=2, nnodes_within_dp=2, data_parallel_index=1)
    placement = engine_placement(parallel, 29620)
    assert placement.gpu_indices == tuple(range(8))
    assert placement.remote_ranks == tuple(range(8, 16))
    assert placement.rank_energy_address == "tcp://10.0.0.1:29621"


def test_report_round_trip_and_bad_reports_rejected():
    report = RankReport(3, "node-b", (GpuTotal(0, "GPU-b0", "H100", 12.5),), 0, True, "")
    assert RankReport.from_bytes(report.to_bytes()) == report
    for bad in (b"not json", b'{"rank": 1}', report.to_bytes().replace(b"12.5", b"-1.0"), b"x" * 100_000):
        with pytest.raises(ValueError):
            RankReport.from_bytes(bad)


def _free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_two_remote_workers_report_their_gpus_and_windows_add_them(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    local_gpu = FakeGpu(uuid="GPU-local")
    remote_gpus = {1: [FakeGpu(uuid="GPU-b0"), FakeGpu(uuid="GPU-b1")], 2: [FakeGpu(uuid="GPU-c0")]}
    address = _free_address()
    receiver = RankEnergyReceiver(address, (1, 2))
    meter = NodesEnergyMeter(EnergyMeter(gpu_indices=[0], pynvml_module=FakeNvml([local_gpu])), receiver)
    # Each worker has its own NVML (its own node) and meters its own GPU: rank 1 uses ordinal 1 there.
    reporters = [
        RankEnergyReporter(address, 1, [1], pynvml_module=FakeNvml(remote_gpus[1]), interval_seconds=0.05),
        RankEnergyReporter(address, 2, [0], pynvml_module=FakeNvml(remote_gpus[2]), interval_seconds=0.05),
    ]
    try:
        _wait_for(lambda: set(receiver.reports()) == {1, 2})
        calibrator = SimpleNamespace(update=lambda *a: True, correct=lambda p, d, i=0.0: (p, d, i))
        windows = WindowAccountant(meter, calibrator, prior_idle_watts=0.0, window_seconds=1.0)
        assert {uuid for _, uuid in windows.metered_gpus} == {"GPU-local", "GPU-b1", "GPU-c0"}  # not GPU-b0
        local_gpu.counter_mj += 1000
        remote_gpus[1][1].counter_mj += 2000
        remote_gpus[2][0].counter_mj += 3000
        remote_gpus[1][0].counter_mj += 99_000  # on rank 1's node but not its GPU
        _wait_for(lambda: meter.total_energy_j() >= 6.0 - 1e-9)
        result = windows.close()
        assert result.measured_j == pytest.approx(6.0)
        assert {gpu.uuid: gpu.window_j for gpu in result.gpus} == pytest.approx({"GPU-local": 1.0, "GPU-b1": 2.0, "GPU-c0": 3.0})
        assert result.learned and result.complete
        assert meter.errors["rank_missing"] == 0
    finally:
        for reporter in reporters:
            reporter.close()
        meter.close()


def test_a_missing_rank_keeps_windows_from_being_learned_and_restarts_never_go_backwards():
    clock = [100.0]
    receiver = SimpleNamespace(expected_ranks=(1,), rejected=0, reports=lambda: reports, close=lambda: None)
    local = SimpleNamespace(available=True, reason="", devices=[], errors={"read_error": 0},
                            gpu_totals=lambda: (GpuTotal(0, "GPU-local", "H100", clock[0]),), close=lambda: None)  # fmt: skip
    reports: dict = {}
    meter = NodesEnergyMeter(local, receiver, stale_after_seconds=5.0)
    assert meter.gpu_totals() == (GpuTotal(0, "GPU-local", "H100", 100.0),)
    assert meter.errors["rank_missing"] == 1  # rank 1 never reported
    reports[1] = (0.5, RankReport(1, "b", (GpuTotal(0, "GPU-b0", "H100", 50.0),), 0, True, ""))
    assert meter.total_energy_j() == pytest.approx(150.0)
    assert meter.errors["rank_missing"] == 1
    reports[1] = (0.5, RankReport(1, "b", (GpuTotal(0, "GPU-b0", "H100", 4.0),), 0, True, ""))  # worker restarted
    assert meter.gpu_totals()[1].energy_j == pytest.approx(54.0)
    reports[1] = (30.0, reports[1][1])  # silent for 30 s
    meter.gpu_totals()
    assert meter.errors["rank_missing"] == 2


def test_rank_not_yet_started_is_counted_but_warned_about_only_after_the_grace_period(caplog):
    from llmco2_vllm.measure.rank_energy import STARTUP_GRACE_SECONDS

    clock = [0.0]
    receiver = SimpleNamespace(expected_ranks=(1,), rejected=0, reports=lambda: reports, close=lambda: None)
    local = SimpleNamespace(available=True, reason="", devices=[], errors={}, gpu_totals=lambda: (), close=lambda: None)
    reports: dict = {}
    meter = NodesEnergyMeter(local, receiver, clock=lambda: clock[0])
    with caplog.at_level("WARNING", logger="llmco2_vllm.measure.rank_energy"):
        meter.gpu_totals()
        clock[0] = STARTUP_GRACE_SECONDS / 2
        meter.gpu_totals()
        assert meter.errors["rank_missing"] == 2 and "rank 1" not in caplog.text  # loading: counted, not warned
        clock[0] = STARTUP_GRACE_SECONDS + 1
        meter.gpu_totals()
        meter.gpu_totals()
    assert caplog.text.count("rank 1 has not reported") == 1  # then once


def test_remote_incident_count_never_goes_backwards_when_a_worker_restarts():
    receiver = SimpleNamespace(expected_ranks=(1,), rejected=0, reports=lambda: reports, close=lambda: None)
    local = SimpleNamespace(available=True, reason="", devices=[], errors={}, gpu_totals=lambda: (), close=lambda: None)
    gpu = GpuTotal(0, "GPU-b0", "H100", 1.0)
    reports = {1: (0.5, RankReport(1, "b", (gpu,), 3, True, ""))}
    meter = NodesEnergyMeter(local, receiver)
    meter.gpu_totals()
    assert meter.errors["remote_incident"] == 3
    reports[1] = (0.5, RankReport(1, "b", (gpu,), 1, True, ""))  # restarted, one new incident
    meter.gpu_totals()
    assert meter.errors["remote_incident"] == 4
