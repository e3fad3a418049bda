"""What NVML's energy counter really does on a lent GPU: read cost, update cadence, agreement with power.

Run on a machine with an NVIDIA GPU (the device image's python3 has torch and nvidia-ml-py):

    python3 benchmarks/nvml_probe.py --out DIR

Writes ``DIR/nvml_probe.json`` (summary) and ``DIR/nvml_trace.csv`` (every poll of the counter and
of instantaneous power through an idle -> busy -> idle sequence). The trace is the recorded real
data that ``tests/test_energy_meter_recorded.py`` replays through ``EnergyMeter``.

Measured:
  * call latency of ``nvmlDeviceGetTotalEnergyConsumption`` and ``nvmlDeviceGetPowerUsage``
    (the meter reads the counter once per window; this is its cost);
  * how often the counter changes and by how much (its resolution in time and joules);
  * energy over a busy window from the counter vs from integrating sampled power, and through
    ``EnergyMeter.begin_window/end_window`` (must equal the raw counter difference);
  * the catalog entry ``llmco2_vllm.predict.hardware.find_gpu`` picks for NVML's name.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _call_latency_us(call, repeats: int = 2000) -> dict[str, float]:
    durations = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        durations.append((time.perf_counter_ns() - start) / 1000)
    return {"p50_us": _percentile(durations, 0.5), "p99_us": _percentile(durations, 0.99),
            "max_us": max(durations), "calls": repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("nvml_probe_out"))
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--busy-seconds", type=float, default=4.0)
    parser.add_argument("--poll-seconds", type=float, default=0.002)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import pynvml
    import torch

    from llmco2_vllm.measure.energy_meter import EnergyMeter
    from llmco2_vllm.predict.hardware import find_gpu

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    name = pynvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    summary: dict[str, object] = {
        "gpu_name": name,
        "driver_version": str(pynvml.nvmlSystemGetDriverVersion()),
        "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
        "nvml_version": str(pynvml.nvmlSystemGetNVMLVersion()),
    }
    try:
        summary["catalog_gpu"] = find_gpu(name).name
    except Exception as exc:  # recorded, not fatal: the probe is about NVML
        summary["catalog_gpu"] = f"not found: {exc}"

    summary["energy_counter_read"] = _call_latency_us(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    summary["power_read"] = _call_latency_us(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))

    # Trace: a poller thread records (time, counter, power) while the main thread idles, runs bf16
    # matrix products, then idles again.
    trace: list[tuple[float, str, int, int]] = []
    phase = ["idle_before"]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            now = time.monotonic()
            trace.append((now, phase[0], pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
                          pynvml.nvmlDeviceGetPowerUsage(handle)))
            time.sleep(args.poll_seconds)

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    meter = EnergyMeter(gpu_indices=[0])
    summary["meter_available"] = meter.available
    summary["meter_devices"] = [dataclasses.asdict(device) for device in meter.devices]
    summary["meter_reason"] = meter.reason

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(args.idle_seconds)

    phase[0] = "busy"
    raw_start = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    busy_start = time.monotonic()
    meter.begin_window("busy")
    products = 0
    while time.monotonic() - busy_start < args.busy_seconds:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        products += 20
    measurement = meter.end_window("busy")
    busy_seconds = time.monotonic() - busy_start
    raw_end = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)

    phase[0] = "idle_after"
    time.sleep(args.idle_seconds)
    stop.set()
    poller.join()
    meter.close()

    summary["busy_window"] = {
        "seconds": busy_seconds,
        "matmul_tflops": products * 2 * 8192 ** 3 / busy_seconds / 1e12,
        "raw_counter_energy_j": (raw_end - raw_start) / 1000,
        "meter_energy_j": measurement.energy_j,
        "meter_seconds": measurement.seconds,
        "meter_complete": measurement.complete,
    }

    t0 = trace[0][0]
    with (args.out / "nvml_trace.csv").open("w", newline="") as handle_out:
        writer = csv.writer(handle_out)
        writer.writerow(["seconds", "phase", "energy_mj", "power_mw"])
        for now, label, energy_mj, power_mw in trace:
            writer.writerow([f"{now - t0:.6f}", label, energy_mj, power_mw])

    changes = [(trace[i][0], trace[i][2] - trace[i - 1][2]) for i in range(1, len(trace)) if trace[i][2] != trace[i - 1][2]]
    intervals_ms = [(changes[i][0] - changes[i - 1][0]) * 1000 for i in range(1, len(changes))]
    power_changes = [trace[i][0] for i in range(1, len(trace)) if trace[i][3] != trace[i - 1][3]]
    power_intervals_ms = [(power_changes[i] - power_changes[i - 1]) * 1000 for i in range(1, len(power_changes))]
    summary["counter_updates"] = {
        "polls": len(trace),
        "changes": len(changes),
        "interval_ms_p50": _percentile(intervals_ms, 0.5) if intervals_ms else None,
        "interval_ms_p90": _percentile(intervals_ms, 0.9) if intervals_ms else None,
        "increment_mj_min": min(d for _, d in changes) if changes else None,
        "increment_mj_p50": _percentile([d for _, d in changes], 0.5) if changes else None,
    }
    summary["power_updates"] = {
        "interval_ms_p50": _percentile(power_intervals_ms, 0.5) if power_intervals_ms else None,
    }
    for label in ("idle_before", "busy", "idle_after"):
        rows = [r for r in trace if r[1] == label]
        if len(rows) < 2:
            continue
        seconds = rows[-1][0] - rows[0][0]
        counter_w = (rows[-1][2] - rows[0][2]) / 1000 / seconds
        integrated_j = sum((rows[i][0] - rows[i - 1][0]) * (rows[i][3] + rows[i - 1][3]) / 2 / 1000
                           for i in range(1, len(rows)))
        summary[f"{label}_power"] = {
            "seconds": seconds,
            "counter_mean_w": counter_w,
            "sampled_power_mean_w": statistics.fmean(r[3] for r in rows) / 1000,
            "integrated_power_j": integrated_j,
            "counter_j": (rows[-1][2] - rows[0][2]) / 1000,
        }
    pynvml.nvmlShutdown()
    (args.out / "nvml_probe.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
