"""Which step shapes a collection measures, with what settings, and the CSV it writes.

Pure Python (no torch): the command line builds a ``CollectConfig`` from these presets before
anything heavy is imported.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmco2_vllm.predict.model_description import ModelDescription

SOURCE = "llmco2 collect reference-transformer"

CSV_COLUMNS: tuple[str, ...] = (
    "phase", "model", "gpu", "num_gpus", "tensor_parallel",
    "batch_size", "prompt_tokens", "context_tokens", "layers_measured", "layers_total",
    "seconds_per_step", "energy_j_per_step",
    "predicted_seconds_per_step", "predicted_energy_j_per_step",
    "idle_watts", "steps", "window_seconds", "complete",
    # raw measurements behind the layer scaling (see the package docstring)
    "measured_seconds_per_step", "measured_energy_j_per_step",
    "head_steps", "head_seconds_per_step", "head_energy_j_per_step",
    # provenance
    "dtype", "device", "attention_call", "energy_method", "driver_version", "cuda_version", "torch_version",
    "vllm_version", "gpu_clock_mhz", "memory_clock_mhz", "power_limit_w", "source", "measured_at",
    # how the step ran: replayed from a CUDA graph (as vLLM runs small steps) and the MoE experts' kernels
    "cuda_graph", "experts_kernel",
)


@dataclass(frozen=True)
class SweepShape:
    """One step shape: every request of the batch has the same token counts.

    ``prompt_tokens`` are prefill tokens computed per request (0 for decode); ``context_tokens``
    are tokens already in each request's KV cache before the step.
    """

    phase: str  # "prefill" or "decode"
    batch_size: int
    prompt_tokens: int
    context_tokens: int

    @property
    def tokens_per_request(self) -> int:
        """Query tokens each request computes in this step."""
        return self.prompt_tokens if self.phase == "prefill" else 1

    @property
    def kv_tokens_per_request(self) -> int:
        """KV-cache slots each request needs (context plus this step's tokens)."""
        return self.context_tokens + self.tokens_per_request

    @property
    def label(self) -> str:
        return f"{self.phase} b{self.batch_size} p{self.prompt_tokens} c{self.context_tokens}"


def _prefill(batch: int, prompt: int, context: int = 0) -> SweepShape:
    return SweepShape("prefill", batch, prompt, context)


def _decode(batch: int, context: int) -> SweepShape:
    return SweepShape("decode", batch, 0, context)


def dry_run_shapes() -> list[SweepShape]:
    """Tiny shapes for a CPU smoke test: prefill from scratch, a chunk after context, decode."""
    return [_prefill(1, 16), _prefill(2, 8, 8), _decode(1, 16), _decode(2, 32)]


def quick_shapes() -> list[SweepShape]:
    """About 5 minutes on one GPU: prefill 1/8 x 128/1024/4096, decode 1/8/32/128 x 512/2048."""
    prefill = [_prefill(b, p) for b in (1, 8) for p in (128, 1024, 4096)]
    decode = [_decode(b, c) for b in (1, 8, 32, 128) for c in (512, 2048)]
    return prefill + decode


#: Largest prefill tokens per step in the full sweep (vLLM's max_num_batched_tokens is 8k-16k).
FULL_SWEEP_MAX_PREFILL_TOKENS = 32768


def full_shapes() -> list[SweepShape]:
    """The default sweep: prefill from scratch, chunked prefill after context, and decode."""
    prefill = [
        _prefill(b, p)
        for b in (1, 2, 4, 8, 16)
        for p in (128, 256, 512, 1024, 2048, 4096, 8192)
        if b * p <= FULL_SWEEP_MAX_PREFILL_TOKENS
    ]
    chunked = [_prefill(b, chunk, ctx) for b in (1, 4) for chunk in (512, 2048) for ctx in (2048, 8192)]
    decode = [
        _decode(b, c)
        for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)
        for c in (128, 512, 1024, 2048, 4096, 8192)
    ]
    return prefill + chunked + decode


@dataclass(frozen=True)
class CollectConfig:
    """Everything a collection run needs (built from the command line by ``config_from_args``)."""

    model: ModelDescription
    shapes: tuple[SweepShape, ...]
    device: str = "cpu"
    num_layers: int | None = None  # None: all that fit in memory
    min_window_seconds: float = 1.0
    min_steps: int = 2
    warmup_seconds: float = 0.25
    idle_seconds: float = 5.0
    predict_gpu: str | None = None  # catalog GPU for the prediction; None: the NVML-detected GPU
    seed: int = 0
    cuda_graphs: bool = True  # replay steps of <= CUDA_GRAPH_MAX_TOKENS tokens from CUDA graphs (CUDA only)


def csv_cell(value: Any) -> Any:
    """CSV cell: NaN/None -> empty, floats with 6 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class CsvRowWriter:
    """Writes ``CSV_COLUMNS`` rows to a file as they come, flushing each."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=list(CSV_COLUMNS))
        self._writer.writeheader()
        self._file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({column: csv_cell(row.get(column)) for column in CSV_COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()
