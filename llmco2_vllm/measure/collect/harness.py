"""The measuring harness: repeat one step inside an energy window, time it, scale it to the full model.

Every step is followed by ``torch.cuda.synchronize()`` (vLLM also waits for every step's sampled
tokens) until a window of at least ``min_window_seconds`` has passed, so NVML's energy counter,
which updates in coarse increments, resolves it. Steps of at most ``CUDA_GRAPH_MAX_TOKENS``
tokens are replayed from a CUDA graph, as vLLM runs them; on CUDA, attention is restricted to the
fused kernels serving uses. Energy comes from ``EnergyMeter`` windows; ``NvmlProbe`` reads the
provenance facts (driver, clocks, power limit) of the measured GPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TextIO

from llmco2_vllm.measure.collect.progress import progress
from llmco2_vllm.measure.collect.reference_model import attention_call, moe_experts_kernel
from llmco2_vllm.measure.collect.sweep import CollectConfig, SweepShape

#: vLLM's largest default CUDA-graph capture size (tokens per step); larger steps run eagerly there too.
CUDA_GRAPH_MAX_TOKENS = 512


class Meter(Protocol):
    """What the harness needs of ``llmco2_vllm.measure.energy_meter.EnergyMeter``."""

    available: bool

    def begin_window(self, name: str) -> None: ...

    def end_window(self, name: str) -> Any: ...  # Measurement(seconds, energy_j, gpus, complete)


@dataclass(frozen=True)
class NoMeasurement:
    """A window measured by nothing: duration only."""

    seconds: float
    energy_j: float = math.nan
    gpus: tuple[int, ...] = ()
    complete: bool = False


class NoEnergyMeter:
    """Stand-in for dry runs, CPU runs and machines without NVML: times windows, measures no energy."""

    available = False

    def __init__(self) -> None:
        self._starts: dict[str, float] = {}

    def begin_window(self, name: str) -> None:
        self._starts[name] = time.perf_counter()

    def end_window(self, name: str) -> NoMeasurement:
        return NoMeasurement(seconds=time.perf_counter() - self._starts.pop(name))


class NvmlProbe:
    """Provenance facts of the measured GPU from NVML; every read is optional and never raises."""

    def __init__(self, cuda_index: int | None, pynvml_module: Any = None) -> None:
        self.nvml: Any = None
        self.handle: Any = None
        if cuda_index is None:
            return
        try:
            nvml = pynvml_module
            if nvml is None:
                import pynvml as nvml  # type: ignore[no-redef]
            nvml.nvmlInit()
            import os

            from llmco2_vllm.measure.gpu_detection import visible_handles

            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                handles = visible_handles(nvml, handles, visible)
            self.nvml, self.handle = nvml, handles[cuda_index]
        except Exception:
            self.nvml = self.handle = None

    def _read(self, read: Callable[[], Any]) -> Any:
        if self.handle is None:
            return None
        try:
            value = read()
        except Exception:
            return None
        return value.decode() if isinstance(value, bytes) else value

    def gpu_name(self) -> str | None:
        return self._read(lambda: self.nvml.nvmlDeviceGetName(self.handle))

    def driver_version(self) -> str | None:
        return self._read(lambda: self.nvml.nvmlSystemGetDriverVersion())

    def power_limit_w(self) -> float | None:
        milliwatts = self._read(lambda: self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle))
        return None if milliwatts is None else milliwatts / 1000.0

    def clocks_mhz(self) -> tuple[int | None, int | None]:
        """Current (SM, memory) clocks."""
        sm = self._read(lambda: self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM))
        mem = self._read(lambda: self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_MEM))
        return sm, mem

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = self.handle = None


def package_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


@dataclass(frozen=True)
class WindowResult:
    """A measured window of ``steps`` identical steps."""

    steps: int
    wall_seconds: float  # host clock, every step synchronized
    window_seconds: float  # the meter's window length (host clock when the meter has none)
    energy_j: float  # NaN when nothing measured energy
    complete: bool
    gpu_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    energy_method: str = ""  # the meter's per-GPU method(s): "counter" or "power_sampling"

    @property
    def seconds_per_step(self) -> float:
        return self.wall_seconds / self.steps

    @property
    def energy_j_per_step(self) -> float:
        return self.energy_j / self.steps


def as_float(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def window_energy_j(meter: Meter, measurement: Any) -> float:
    """A window's joules, NaN when the meter could not measure (an unavailable meter reports 0)."""
    if not getattr(meter, "available", False):
        return math.nan
    return as_float(getattr(measurement, "energy_j", None))


def _energy_method(measurement: Any) -> str:
    methods = sorted({str(getattr(gpu, "method", "")) for gpu in getattr(measurement, "gpus", ()) or ()} - {""})
    return "+".join(methods)


def measure_window(
    step: Callable[[], Any],
    meter: Meter,
    name: str,
    synchronize: Callable[[], None],
    min_window_seconds: float,
    min_steps: int,
    warmup_seconds: float = 0.0,
    warmup_steps: int = 1,
    clocks: Callable[[], tuple[int | None, int | None]] = lambda: (None, None),
) -> WindowResult:
    """Warm up, then repeat ``step`` (synchronized) for >= ``min_window_seconds`` and >= ``min_steps``
    inside one meter window. Clocks are sampled once, halfway through the window."""
    warm_start = time.perf_counter()
    done = 0
    while done < warmup_steps or time.perf_counter() - warm_start < warmup_seconds:
        step()
        synchronize()
        done += 1
    meter.begin_window(name)
    start = time.perf_counter()
    steps, sampled = 0, None
    try:
        while True:
            step()
            synchronize()
            steps += 1
            elapsed = time.perf_counter() - start
            if sampled is None and elapsed >= min_window_seconds / 2:
                sampled = clocks()
            if steps >= min_steps and elapsed >= min_window_seconds:
                break
    except BaseException:
        meter.end_window(name)  # close the window so a retry can reuse its name
        raise
    wall = time.perf_counter() - start
    measurement = meter.end_window(name)
    window = as_float(getattr(measurement, "seconds", None))
    sm, mem = sampled or (None, None)
    return WindowResult(
        steps=steps,
        wall_seconds=wall,
        window_seconds=window if math.isfinite(window) else wall,
        energy_j=window_energy_j(meter, measurement),
        complete=bool(getattr(measurement, "complete", False)) and bool(getattr(meter, "available", False)),
        gpu_clock_mhz=sm,
        memory_clock_mhz=mem,
        energy_method=_energy_method(measurement),
    )


@dataclass(frozen=True)
class ScaledStep:
    """Per-step cost of the full model from a measured window and, when layers were cut, a head window."""

    seconds: float
    energy_j: float
    clamped: bool  # the layer part came out negative and was set to 0


def scale_to_full_model(measured_per_step: float, head_per_step: float | None,
                        layers_measured: int, layers_total: int) -> tuple[float, bool]:
    """``head + (measured - head) / layers_measured * layers_total``; returns (value, clamped).

    With all layers measured (or no head window) the measured value is returned unchanged.
    """
    if layers_measured == layers_total or head_per_step is None:
        return measured_per_step, False
    layer_part = measured_per_step - head_per_step
    clamped = layer_part < 0
    return head_per_step + max(layer_part, 0.0) / layers_measured * layers_total, clamped


def scale_step(step: WindowResult, head: WindowResult | None, layers_measured: int, layers_total: int) -> ScaledStep:
    seconds, clamped_s = scale_to_full_model(
        step.seconds_per_step, head.seconds_per_step if head else None, layers_measured, layers_total)
    energy, clamped_e = scale_to_full_model(
        step.energy_j_per_step, head.energy_j_per_step if head else None, layers_measured, layers_total)
    return ScaledStep(seconds, energy, clamped_s or (math.isfinite(energy) and clamped_e))


def measure_shape_with_fallback(reference: Any, shape: SweepShape, config: CollectConfig, meter: Meter,
                                synchronize: Callable[[], None], probe: NvmlProbe,
                                stream: TextIO | None) -> dict[str, Any]:
    """Measure a shape; if no fused kernel takes is_causal + enable_gqa, switch to the masked fold once."""
    try:
        return _measure_shape(reference, shape, config, meter, synchronize, probe)
    except RuntimeError as error:
        uses_causal_gqa = attention_call(shape, reference.fused_causal_gqa) == "sdpa is_causal enable_gqa"
        if not uses_causal_gqa or "out of memory" in str(error).lower():
            raise
        progress(stream, f"{shape.label}: SDPA is_causal+enable_gqa failed ({str(error).splitlines()[0]}); "
                         "using the grouped-query fold with a causal mask from now on")
        reference.fused_causal_gqa = False
        return _measure_shape(reference, shape, config, meter, synchronize, probe)


def _measure_shape(reference: Any, shape: SweepShape, config: CollectConfig, meter: Meter,
                   synchronize: Callable[[], None], probe: NvmlProbe) -> dict[str, Any]:
    """One shape: a window of full steps and, when layers were cut, a window of the head alone."""
    import torch  # lazy: `--help` and the CLI must not need torch

    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    token_ids = torch.randint(0, reference.description.vocab_size,
                              (shape.batch_size, shape.tokens_per_request), generator=generator).to(reference.device)
    cache = reference.new_kv_cache(shape.batch_size, shape.kv_tokens_per_request)
    run_step = _step_runner(lambda: reference(token_ids, cache, shape.context_tokens), reference.device,
                            config.cuda_graphs and shape.batch_size * shape.tokens_per_request <= CUDA_GRAPH_MAX_TOKENS)
    window_args = dict(meter=meter, synchronize=synchronize, min_window_seconds=config.min_window_seconds,
                       min_steps=config.min_steps, warmup_seconds=config.warmup_seconds, clocks=probe.clocks_mhz)
    name = shape.label.replace(" ", "-")
    with torch.inference_mode(), _fused_attention_only(reference.device):
        step = measure_window(run_step, name=name, **window_args)
        head = None
        if reference.layers_measured < reference.layers_total:
            run_head = _step_runner(lambda: reference.forward_head(token_ids), reference.device,
                                    getattr(run_step, "cuda_graph", False))
            head = measure_window(run_head, name=f"{name}-head", **window_args)
    graphed = getattr(run_step, "cuda_graph", False)
    cache = run_step = None  # free the graph's memory pool before the next shape
    scaled = scale_step(step, head, reference.layers_measured, reference.layers_total)
    return {
        "phase": shape.phase, "batch_size": shape.batch_size, "prompt_tokens": shape.prompt_tokens,
        "context_tokens": shape.context_tokens,
        "seconds_per_step": scaled.seconds, "energy_j_per_step": scaled.energy_j,
        "steps": step.steps, "window_seconds": step.window_seconds,
        "complete": step.complete and (head is None or head.complete) and not scaled.clamped,
        "measured_seconds_per_step": step.seconds_per_step, "measured_energy_j_per_step": step.energy_j_per_step,
        "head_steps": head.steps if head else None,
        "head_seconds_per_step": head.seconds_per_step if head else None,
        "head_energy_j_per_step": head.energy_j_per_step if head else None,
        "attention_call": attention_call(shape, reference.fused_causal_gqa),
        "energy_method": step.energy_method,
        "gpu_clock_mhz": step.gpu_clock_mhz, "memory_clock_mhz": step.memory_clock_mhz,
        "cuda_graph": graphed,
        "experts_kernel": moe_experts_kernel() if reference.description.num_experts else "",
    }


class _GraphedStep:
    """A step captured once in a CUDA graph and replayed: no Python or launch cost per kernel."""

    cuda_graph = True

    def __init__(self, run: Callable[[], Any]) -> None:
        import torch

        side = torch.cuda.Stream()  # PyTorch asks for warm-up on a side stream before capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            run()

    def __call__(self) -> None:
        self.graph.replay()


def _step_runner(run: Callable[[], Any], device: Any, graphed: bool) -> Callable[[], Any]:
    """``run`` itself, or its CUDA-graph replay when asked for on CUDA and the capture works."""
    if not graphed or device.type != "cuda":
        return run
    try:
        return _GraphedStep(run)
    except RuntimeError as error:  # an op that cannot be captured: measure eagerly, say so
        import torch

        torch.cuda.synchronize()
        progress(None, f"CUDA graph capture failed ({str(error).splitlines()[0]}); this shape runs eagerly")
        return run


def _fused_attention_only(device: Any) -> Any:
    """On CUDA, forbid SDPA's math fallback: measure the fused kernels serving uses or fail the shape."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def make_meter(config: CollectConfig, dry_run: bool, stream: TextIO | None = None) -> Meter:
    """``EnergyMeter`` on the measured GPU; a ``NoEnergyMeter`` for dry runs, CPU, or without NVML."""
    import torch

    device = torch.device(config.device)
    if dry_run or device.type != "cuda":
        return NoEnergyMeter()
    try:
        from llmco2_vllm.measure.energy_meter import EnergyMeter
    except ImportError as error:
        progress(stream, f"WARNING: no energy meter ({error}); energy columns stay empty")
        return NoEnergyMeter()
    meter = EnergyMeter(gpu_indices=[device.index or 0])
    if not meter.available:
        progress(stream, "WARNING: NVML energy counter unavailable; energy columns stay empty")
    return meter
