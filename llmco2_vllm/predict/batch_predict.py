"""Row-wise prediction of static batches: ``llmco2 predict`` in single and batch (CSV) mode.

A row describes a static batch like LLMCO2's input: ``batch_size`` requests, each with
``prompt_tokens`` prompt and ``output_tokens`` generated tokens, served by ``model`` on
``num_gpus`` x ``gpu`` with ``tensor_parallel`` (and optionally ``data_parallel`` replicas, which
split the batch; ``num_gpus / (tensor_parallel x data_parallel)`` is the pipeline-parallel depth).
Models, GPUs and predictors are cached, so thousands of rows take seconds.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

from llmco2_vllm.carbon.intensity import lookup_region, operational_grams_co2e
from llmco2_vllm.predict.deployment import Deployment
from llmco2_vllm.predict.forecast import forecast_static_batch
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.predictor import StepPredictor, load_predictor

BATCH_COLUMNS = ("model", "gpu", "num_gpus", "tensor_parallel", "batch_size", "prompt_tokens", "output_tokens")
OPTIONAL_BATCH_COLUMNS = ("region", "data_parallel", "expert_parallel")
OUTPUT_COLUMNS = ("prefill_j", "decode_j", "energy_j", "energy_j_low", "energy_j_high", "seconds", "carbon_g", "error")
MAX_TOKENS = 10_000_000


def _int(row: Mapping[str, Any], name: str, default: int | None = None, maximum: int = MAX_TOKENS) -> int:
    raw = row.get(name)
    if raw in (None, ""):
        if default is None:
            raise ValueError(f"{name} is missing")
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value.is_integer() or value < 1 or value > maximum:
        raise ValueError(f"{name}={raw!r} must be a whole number from 1 to {maximum}")
    return int(value)


@dataclass(frozen=True)
class BatchRow:
    """One static batch of a CSV row (``BATCH_COLUMNS``), checked; replicas share the batch."""

    model: str
    gpu: str
    num_gpus: int
    tensor_parallel: int
    data_parallel: int
    batch_size: int
    prompt_tokens: int
    output_tokens: int

    @classmethod
    def parse(cls, row: Mapping[str, Any]) -> "BatchRow":
        """Raises ValueError with the reason."""
        model, gpu = str(row.get("model") or "").strip(), str(row.get("gpu") or "").strip()
        if not model or not gpu:
            raise ValueError("model and gpu are required")
        tensor_parallel = _int(row, "tensor_parallel", 1, maximum=1024)
        data_parallel = _int(row, "data_parallel", 1, maximum=1024)
        num_gpus = _int(row, "num_gpus", tensor_parallel * data_parallel, maximum=100_000)
        if num_gpus % (tensor_parallel * data_parallel):
            raise ValueError(
                f"num_gpus={num_gpus} is not a multiple of tensor_parallel x data_parallel = {tensor_parallel * data_parallel}"
            )
        return cls(model, gpu, num_gpus, tensor_parallel, data_parallel, _int(row, "batch_size", maximum=1_000_000),
                   _int(row, "prompt_tokens"), _int(row, "output_tokens"))  # fmt: skip

    @property
    def pipeline_parallel(self) -> int:
        return self.num_gpus // (self.tensor_parallel * self.data_parallel)

    @property
    def per_replica(self) -> int:
        """Requests of the batch on one data-parallel replica (the last may hold fewer)."""
        return math.ceil(self.batch_size / self.data_parallel)

    def deployment(self) -> Deployment:
        """One replica: its TP x PP GPUs."""
        hardware = Hardware(find_gpu(self.gpu), self.tensor_parallel * self.pipeline_parallel, self.tensor_parallel,
                            "configured")  # fmt: skip
        return Deployment(self.model, load_model(self.model), hardware, self.pipeline_parallel)


class BatchPredictor:
    """Predicts rows; keeps one predictor per (model, gpu, parallelism)."""

    def __init__(self, calibration_path: str | None = None, pue: float = 1.0, predictor: str = "fitted") -> None:
        self.predictor_name = predictor
        self.calibration = None
        self.calibration_path = calibration_path
        if calibration_path:
            from llmco2_vllm.predict.calibration import OnlineCalibrator

            self.calibration = OnlineCalibrator.load(calibration_path)
        if not (math.isfinite(pue) and pue >= 1.0):
            raise ValueError(f"--pue {pue}: power usage effectiveness is a ratio >= 1.0")
        self.pue = pue

    @staticmethod
    @lru_cache(maxsize=256)
    def _predictor(name: str, batch: BatchRow, calibration_path: str | None = None) -> StepPredictor:
        return load_predictor(name, batch.deployment(), calibration_file=calibration_path)

    def predict(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One row -> the prediction fields (raises ValueError with the reason)."""
        batch = BatchRow.parse(row)
        model, gpu, num_gpus = batch.model, batch.gpu, batch.num_gpus
        tensor_parallel, data_parallel, batch_size = batch.tensor_parallel, batch.data_parallel, batch.batch_size
        prompt_tokens, output_tokens, per_replica = batch.prompt_tokens, batch.output_tokens, batch.per_replica
        predictor = self._predictor(self.predictor_name, batch, self.calibration_path)
        forecast = forecast_static_batch(predictor, per_replica, prompt_tokens, output_tokens)
        scale = batch_size / per_replica  # replicas share the batch; the last one may hold fewer
        prefill_j, decode_j = forecast.prefill_j * scale, forecast.decode_j * scale
        calibrated = False
        if self.calibration is not None:
            prefill_j, decode_j, _ = self.calibration.correct(prefill_j, decode_j, 0.0)
            calibrated = True
        energy_j = prefill_j + decode_j
        # The fitted model's cross-validated 80 % band (measured / predicted); the analytic model has none.
        band = None if calibrated else getattr(predictor, "ratio_range", None)
        result: dict[str, Any] = {
            "model": load_model(model).name,
            "gpu": find_gpu(gpu).name,
            "num_gpus": num_gpus,
            "tensor_parallel": tensor_parallel,
            "data_parallel": data_parallel,
            "batch_size": batch_size,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "predictor": predictor.name + ("+calibration" if calibrated else ""),
            "prefill_j": prefill_j,
            "decode_j": decode_j,
            "energy_j": energy_j,
            "energy_j_low": energy_j * band[0] if band else None,
            "energy_j_high": energy_j * band[1] if band else None,
            "seconds": forecast.seconds,
            "energy_j_per_output_token": energy_j / (batch_size * output_tokens),
        }
        region = str(row.get("region") or "").strip()
        if region:
            intensity = lookup_region(region)
            result["region"] = intensity.region
            result["grid_intensity_grams_per_kwh"] = intensity.grams_co2e_per_kwh
            result["pue"] = self.pue
            result["carbon_g"] = operational_grams_co2e(energy_j, intensity, self.pue)
        return result


@dataclass
class FileRun:
    """Outcome of a batch file: how many rows were predicted and why the others were skipped."""

    rows: int
    predicted: int
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"row": data row number (1 = first), "reason"}


def skip_row(skipped: list[dict[str, Any]], number: int, error: BaseException, path: str) -> None:
    """Record why row ``number`` of ``path`` is unusable and say so on stderr (one line per row)."""
    reason = str(error) or type(error).__name__
    skipped.append({"row": number, "reason": reason})
    print(f"llmco2: {path}: row {number} skipped: {reason}", file=sys.stderr)


def predict_file(predictor: BatchPredictor, in_path: str, out_path: str) -> FileRun:
    """Predict every usable row of ``in_path`` into ``out_path``; unusable rows get their reason in
    the ``error`` column (and on stderr) and the run goes on with the rest."""
    with open(in_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in BATCH_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{in_path}: missing columns {', '.join(missing)} (needed: {', '.join(BATCH_COLUMNS)})")
        rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
    out_columns = columns + [c for c in OUTPUT_COLUMNS if c not in columns]
    run = FileRun(rows=len(rows), predicted=0)
    with open(out_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=out_columns, extrasaction="ignore")
        writer.writeheader()
        for number, row in enumerate(_progress(rows, "predict"), start=1):
            out = dict(row)
            try:
                result = predictor.predict(row)
                for name in OUTPUT_COLUMNS[:-1]:
                    value = result.get(name)
                    out[name] = "" if value is None else f"{value:.6g}"
                out["error"] = ""
                run.predicted += 1
            except Exception as error:  # a bad row must not stop the run
                skip_row(run.skipped, number, error, in_path)
                out.update({name: "" for name in OUTPUT_COLUMNS})
                out["error"] = run.skipped[-1]["reason"]
            writer.writerow(out)
    print(f"llmco2: {run.predicted} rows predicted, {len(run.skipped)} skipped -> {out_path}", file=sys.stderr)
    return run


def _progress(rows: list, description: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar
        return rows
    # disable=None: a bar on terminals only, none in logs
    return tqdm(rows, desc=description, unit="row", disable=None if len(rows) >= 50 else True)
