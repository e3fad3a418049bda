"""The GNN predictor on the plugin's hot path: a distilled correction table, no torch in vLLM's processes.

The full GNN (``model.py``) costs milliseconds per step (``benchmarks/results/gnn_forecast_speed.md``)
and needs torch-geometric, whose import disturbs vLLM's kernel registration when the model runs in the
same process. The plugin therefore evaluates the GNN once, in a short-lived child process, on a grid
of static batches for ITS model and hardware (``distill.py``), and runs with the resulting table of
log corrections: a step is the analytic prediction with its prefill part scaled by the table's factor
at (prefill requests, mean prompt tokens) and its decode part at (decode requests, mean context).
Pure floats: a few µs on top of the analytic model. ``benchmarks/gnn_forecast_speed.py`` measures how far the
table departs from the full GNN.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from llmco2_vllm.predict.deployment import Deployment
from llmco2_vllm.predict.gnn.table import CorrectionTable, corrected_static_batch
from llmco2_vllm.predict.hardware import Hardware
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.predictor import AnalyticPredictor, StepPrediction
from llmco2_vllm.predict.step_shape import StepShape

DISTIL_TIMEOUT_SECONDS = 180.0
RUN_DIR_VARIABLE = "LLMCO2_RUN_DIR"  # set by the plugin in every vLLM process of one server


def distil_in_child_process(deployment: Deployment, cache_dir: str | None = None) -> CorrectionTable:
    """Run the full GNN in a child process and return its correction table for this deployment.

    With ``cache_dir`` (the plugin's run directory, ``LLMCO2_RUN_DIR``, by default) the table is
    distilled once and shared: the engine's worker and every API server of one ``vllm serve`` ask
    for it at start-up, the first one distils it under a file lock, the others read its file (a
    failure is kept too, so it is not retried by each process).

    Raises:
        RuntimeError: with the child's reason (no torch-geometric, bad checkpoint, model the graph
            builder cannot express, timeout).
    """
    cache_dir = os.environ.get(RUN_DIR_VARIABLE) if cache_dir is None else cache_dir
    if not cache_dir:
        return _distil(deployment)
    path = Path(cache_dir) / f"gnn-table-{deployment.fingerprint}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            try:
                record: dict[str, Any] = {"table": _distil(deployment).to_json()}
            except RuntimeError as error:
                record = {"error": str(error)}
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(record))
            temporary.replace(path)
        record = json.loads(path.read_text())
    if "error" in record:
        raise RuntimeError(record["error"])
    return CorrectionTable.from_json(record["table"])


def _distil(deployment: Deployment) -> CorrectionTable:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "llmco2_vllm.predict.gnn.distill"],
            input=deployment.to_json(),
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
                table = distil_in_child_process(Deployment(model.name, model, hardware, pipeline_parallel))
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
        prefill_s, decode_s, prefill_j, decode_j, prefill_weights, decode_weights = self.roofline.predict_phases(step)
        table = self.table
        if table is not None:
            prefill, decode = step.prefill_tokens, step.decode_tokens
            prefill_requests = int(np.count_nonzero(prefill))
            if prefill_requests:
                mean_prompt = int(prefill.sum()) / prefill_requests
                factor = math.exp(table.log_factor(0, prefill_requests, mean_prompt))
                prefill_s, prefill_j = prefill_s * factor, prefill_j * factor
            decode_requests = int(np.count_nonzero(decode))
            if decode_requests:
                if decode_requests == len(decode):
                    mean_context = float(step.context_tokens.sum()) / decode_requests
                else:
                    mean_context = float(step.context_tokens[decode > 0].mean())
                factor = math.exp(table.log_factor(1, decode_requests, mean_context))
                decode_s, decode_j = decode_s * factor, decode_j * factor
        return StepPrediction(prefill_s, decode_s, prefill_j, decode_j, prefill_weights, decode_weights)

    def static_batch(self, batch_size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float, float, float]:
        return corrected_static_batch(self.roofline, self.table, batch_size, prompt_tokens, output_tokens)
