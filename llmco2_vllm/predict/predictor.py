"""Step predictors: time and energy of one engine step, split into its prefill and decode parts.

Every predictor implements ``StepPredictor``; the plugin picks one by name (``LLMCO2_PREDICTOR``),
so swapping the analytic model for a learned one is one setting. ``StepPrediction`` also carries
the roofline's per-request work shares, which attribution uses whatever predictor produced the totals.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from llmco2_vllm.predict.hardware import Hardware
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.roofline import Roofline, RooflineAssumptions, StepCost
from llmco2_vllm.predict.step_shape import StepShape

if TYPE_CHECKING:
    from llmco2_vllm.predict.deployment import Deployment


@dataclass(frozen=True)
class StepPrediction:
    """Predicted cost of one step on the target hardware (all GPUs of the engine)."""

    prefill_seconds: float
    decode_seconds: float
    prefill_energy_j: float
    decode_energy_j: float
    # Attribution weights, aligned with the step's requests: each phase's weights sum to 1 when the
    # phase did any work (roofline energy shares; see attribution.py).
    request_prefill_weights: np.ndarray
    request_decode_weights: np.ndarray

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def energy_j(self) -> float:
        return self.prefill_energy_j + self.decode_energy_j


@runtime_checkable
class StepPredictor(Protocol):
    """What the plugin needs from a predictor."""

    name: str

    def predict_step(self, step: StepShape) -> StepPrediction: ...


def _normalised(values: np.ndarray) -> np.ndarray:
    total = float(values.sum())
    return values / total if total > 0 else np.zeros_like(values)


def prediction_from_cost(cost: StepCost) -> StepPrediction:
    """Phase totals and per-request weights from a roofline cost."""
    n = cost.num_requests
    row_seconds = cost.row_seconds()
    row_energy = cost.row_energy_j()
    return StepPrediction(
        prefill_seconds=float(row_seconds[:n].sum()),
        decode_seconds=float(row_seconds[n:].sum()),
        prefill_energy_j=float(row_energy[:n].sum()),
        decode_energy_j=float(row_energy[n:].sum()),
        request_prefill_weights=_normalised(row_energy[:n]),
        request_decode_weights=_normalised(row_energy[n:]),
    )


class AnalyticPredictor:
    """Roofline time per operator plus an idle + load-dependent power model (the baseline)."""

    name = "analytic"

    def __init__(
        self,
        model: ModelDescription,
        hardware: Hardware,
        pipeline_parallel: int = 1,
        assumptions: RooflineAssumptions = RooflineAssumptions(),
    ) -> None:
        self.model = model
        self.hardware = hardware
        self.pipeline_parallel = pipeline_parallel
        self.roofline = Roofline(model, hardware, assumptions, pipeline_parallel)

    def cost(self, step: StepShape) -> StepCost:
        return self.roofline.cost(step)

    def predict_step(self, step: StepShape) -> StepPrediction:
        # ``Roofline.predict_phases`` equals ``prediction_from_cost(self.cost(step))`` to float
        # rounding (tests compare them) at a fraction of its cost: this runs once per engine step.
        return StepPrediction(*self.roofline.predict_phases(step))


class PredictorLoadError(ValueError):
    """``LLMCO2_PREDICTOR`` names nothing that can be built."""


def load_predictor(
    name: str, deployment: "Deployment", in_server: bool = False, calibration_file: str | None = None
) -> StepPredictor:
    """Build a predictor by name for a deployment: ``fitted`` (the time and power model fitted on
    measured vLLM serving; the default), ``analytic``, ``gnn`` (the shipped LLMCO2 checkpoint; needs
    torch and torch-geometric), or ``package.module:Class`` for a custom one.

    ``in_server``: inside vLLM's processes "gnn" is the distilled table (``predict.gnn.distilled``),
    built in a child process so torch-geometric never loads beside vLLM. A custom class is called
    as ``Class(model=..., hardware=..., pipeline_parallel=...)``.

    ``calibration_file``: where a ``llmco2 calibrate`` result is kept; the fitted model takes the
    deployment's calibrated terms from it (the scale calibration in it applies to any predictor).
    """
    model, hardware, pipeline_parallel = deployment.model, deployment.hardware, deployment.pipeline_parallel
    if name == "analytic":
        return AnalyticPredictor(model, hardware, pipeline_parallel)
    if name == "fitted":
        # Imported by name: fitted.py builds StepPredictions (an import here would be a cycle).
        fitted_module = importlib.import_module("llmco2_vllm.predict.fitted")
        terms = None
        if calibration_file:
            terms = importlib.import_module("llmco2_vllm.predict.term_calibration").terms_from_file(calibration_file)
        return fitted_module.FittedPredictor(model, hardware, pipeline_parallel, terms=terms)
    if name == "gnn":
        name = "llmco2_vllm.predict.gnn.distilled:DistilledGnnPredictor" if in_server else "llmco2_vllm.predict.gnn.model:GnnPredictor"
    if ":" not in name:
        raise PredictorLoadError(
            f"Unknown predictor {name!r}. Use 'fitted', 'analytic', 'gnn' or an import path 'package.module:Class'."
        )
    module_name, _, attribute = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise PredictorLoadError(f"Cannot import predictor {name!r}: {error}") from error
    predictor = factory(model=model, hardware=hardware, pipeline_parallel=pipeline_parallel)
    if not isinstance(predictor, StepPredictor):
        raise PredictorLoadError(f"{name!r} does not implement StepPredictor (name, predict_step)")
    return predictor
