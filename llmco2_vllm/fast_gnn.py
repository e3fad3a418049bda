"""The GNN predictor on the plugin's hot path: a distilled correction table, no torch in vLLM's processes.

The full GNN (``gnn.py``) costs ~11 ms per step and needs torch-geometric, whose import disturbs
vLLM's kernel registration when the model runs in the same process. The plugin therefore evaluates
the GNN once, in a short-lived child process, on a grid of static batches for ITS model and
hardware (``gnn.DistilledCorrection``), and runs with the resulting table of log corrections:
a step is the analytic prediction with its prefill part scaled by the table's factor at (prefill
requests, mean prompt tokens) and its decode part at (decode requests, mean context). Pure floats:
a few µs on top of the analytic model. ``benchmarks/gnn_forecast_speed.py`` measures how far the
table departs from the full GNN.
"""

from __future__ import annotations

import bisect
import json
import math
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .hardware import Hardware, find_gpu
from .model_description import ModelDescription
from .predictor import AnalyticPredictor, StepPrediction
from .step_shape import StepShape

DISTIL_TIMEOUT_SECONDS = 180.0


class CorrectionTable:
    """Log corrections of the analytic prefill (phase 0) and decode (phase 1) energy on a grid of
    (ln batch size, ln tokens), interpolated bilinearly and clamped to the grid's edges."""

    def __init__(
        self,
        log_batch: list[float],
        log_tokens: tuple[list[float], list[float]],
        tables: tuple[list[list[float]], list[list[float]]],
        ratio_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.log_batch = log_batch
        self.log_tokens = log_tokens
        self.tables = tables
        self.ratio_range = ratio_range  # measured/predicted range from the checkpoint's residuals

    @staticmethod
    def _locate(grid: list[float], value: float) -> tuple[int, float]:
        """(cell index, position 0..1 inside the cell) of ``value`` clamped to the grid."""
        if value <= grid[0]:
            return 0, 0.0
        if value >= grid[-1]:
            return len(grid) - 2, 1.0
        i = bisect.bisect_right(grid, value) - 1
        return i, (value - grid[i]) / (grid[i + 1] - grid[i])

    def log_factor(self, phase: int, batch_size: float, tokens: float) -> float:
        """Log correction of the prefill (phase 0; tokens = prompt tokens) or decode (1; tokens = context)."""
        i, a = self._locate(self.log_batch, math.log(max(batch_size, 1.0)))
        j, b = self._locate(self.log_tokens[phase], math.log(max(tokens, 1.0)))
        t = self.tables[phase]
        return (1 - a) * ((1 - b) * t[i][j] + b * t[i][j + 1]) + a * ((1 - b) * t[i + 1][j] + b * t[i + 1][j + 1])

    def to_json(self) -> dict[str, Any]:
        return {
            "log_batch": self.log_batch,
            "log_tokens": list(self.log_tokens),
            "tables": list(self.tables),
            "ratio_range": list(self.ratio_range),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CorrectionTable":
        prefill_tokens, decode_tokens = data["log_tokens"]
        prefill, decode = data["tables"]
        low, high = data.get("ratio_range", (1.0, 1.0))
        return cls(list(data["log_batch"]), (list(prefill_tokens), list(decode_tokens)), (prefill, decode), (low, high))


@dataclass(frozen=True)
class _Request:
    model: dict[str, Any]
    gpu: str
    num_gpus: int
    tensor_parallel: int
    source: str
    pipeline_parallel: int


def distil_in_child_process(model: ModelDescription, hardware: Hardware, pipeline_parallel: int = 1) -> CorrectionTable:
    """Run the full GNN in a child process and return its correction table for this deployment.

    Raises:
        RuntimeError: with the child's reason (no torch-geometric, bad checkpoint, model the graph
            builder cannot express, timeout).
    """
    request = _Request(
        asdict(model), hardware.gpu.name, hardware.num_gpus, hardware.tensor_parallel, hardware.source, pipeline_parallel
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "llmco2_vllm.fast_gnn"],
            input=json.dumps(asdict(request)),
            capture_output=True,
            text=True,
            timeout=DISTIL_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"distilling the GNN took longer than {DISTIL_TIMEOUT_SECONDS:.0f} s") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"distilling the GNN failed: {reason}")
    return CorrectionTable.from_json(json.loads(done.stdout))


class DistilledGnnPredictor:
    """``StepPredictor`` "gnn" for the plugin: analytic step prediction x the distilled GNN correction.

    Never raises: when the table cannot be built it predicts with the analytic model, warns once
    (``fallback_reason`` says why) and is named "analytic-fallback" (``llmco2_target_info{predictor}``).
    """

    name = "gnn"

    def __init__(
        self,
        model: ModelDescription,
        hardware: Hardware,
        pipeline_parallel: int = 1,
        table: CorrectionTable | None = None,
    ) -> None:
        self.analytic = AnalyticPredictor(model, hardware, pipeline_parallel)
        self.roofline = self.analytic.roofline
        self.fallback_reason = ""
        if table is None:
            try:
                table = distil_in_child_process(model, hardware, pipeline_parallel)
            except Exception as error:  # any failure means "use the analytic model"
                self.fallback_reason = str(error)
                self.name = "analytic-fallback"
                warnings.warn(
                    f"llmco2 gnn predictor ({model.name}): falling back to the analytic predictor: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.table = table

    @property
    def is_fallback(self) -> bool:
        return self.table is None

    @property
    def ratio_range(self) -> tuple[float, float] | None:
        return None if self.table is None else self.table.ratio_range

    def predict_step(self, step: StepShape) -> StepPrediction:
        prediction = self.analytic.predict_step(step)
        table = self.table
        if table is None:
            return prediction
        prefill_factor = decode_factor = 1.0
        prefill_requests = int(np.count_nonzero(step.prefill_tokens))
        if prefill_requests:
            mean_prompt = step.total_prefill_tokens / prefill_requests
            prefill_factor = math.exp(table.log_factor(0, prefill_requests, mean_prompt))
        decode_requests = int(np.count_nonzero(step.decode_tokens))
        if decode_requests:
            if decode_requests == step.num_requests:
                mean_context = float(step.context_tokens.sum()) / decode_requests
            else:
                mean_context = float(step.context_tokens[step.decode_tokens > 0].mean())
            decode_factor = math.exp(table.log_factor(1, decode_requests, mean_context))
        return StepPrediction(
            prediction.prefill_seconds * prefill_factor,
            prediction.decode_seconds * decode_factor,
            prediction.prefill_energy_j * prefill_factor,
            prediction.decode_energy_j * decode_factor,
            prediction.request_prefill_weights,
            prediction.request_decode_weights,
        )

    def static_batch(self, batch_size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float, float, float]:
        return corrected_static_batch(self.roofline, self.table, batch_size, prompt_tokens, output_tokens)


def corrected_static_batch(
    roofline: Any, table: CorrectionTable | None, batch_size: int, prompt_tokens: int, output_tokens: int
) -> tuple[float, float, float, float]:
    """(prefill_seconds, prefill_j, decode_seconds, decode_j) of a static batch: the analytic closed
    form (``Roofline.static_batch``) times the table's correction of each phase; decode at the mean
    context of its O-1 steps. Without a table, the analytic value."""
    prefill_s, prefill_j, decode_s, decode_j = roofline.static_batch(batch_size, prompt_tokens, output_tokens)
    if table is None:
        return prefill_s, prefill_j, decode_s, decode_j
    fp = math.exp(table.log_factor(0, batch_size, prompt_tokens))
    fd = math.exp(table.log_factor(1, batch_size, prompt_tokens + (output_tokens - 2) / 2))
    return prefill_s * fp, prefill_j * fp, decode_s * fd, decode_j * fd


def _main() -> int:
    """Child process: JSON request on stdin -> the correction table as JSON on stdout."""
    import torch

    from .gnn import GnnPredictor

    torch.set_num_threads(1)  # a short job beside a starting vLLM
    request = _Request(**json.load(sys.stdin))
    model = ModelDescription(**request.model)
    hardware = Hardware(find_gpu(request.gpu), request.num_gpus, request.tensor_parallel, request.source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        predictor = GnnPredictor(model, hardware, request.pipeline_parallel)
    if predictor.distilled is None or predictor.ensemble is None:
        print(predictor.fallback_reason or "the GNN could not be distilled", file=sys.stderr)
        return 1
    ensemble = predictor.ensemble
    quantiles = ensemble.unseen_residual_quantiles if predictor.unseen_hardware else ensemble.residual_quantiles
    table = predictor.distilled
    table.ratio_range = (math.exp(min(quantiles[0], 0.0)), math.exp(max(quantiles[1], 0.0)))
    json.dump(table.to_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
