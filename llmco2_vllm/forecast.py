"""Forecasts for whole requests from step predictions (``llmco2 predict``, request forecasts).

A static batch of B requests, each with P prompt tokens and O generated tokens, runs one prefill
step (which also yields the first output token) and O-1 decode steps whose KV context grows from P
to P+O-2. The analytic predictor sums them in closed form (``Roofline.static_batch``); for any other
predictor, decode cost is evaluated at up to ``samples`` evenly spaced contexts and integrated with
the trapezoid rule (exact for linear cost), as LLMCO2 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .predictor import AnalyticPredictor, StepPredictor
from .step_shape import StepShape


@dataclass(frozen=True)
class BatchForecast:
    """Predicted cost of a static batch on the predictor's hardware."""

    batch_size: int
    prompt_tokens: int
    output_tokens: int
    prefill_j: float
    decode_j: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def energy_j(self) -> float:
        return self.prefill_j + self.decode_j

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


def forecast_static_batch(
    predictor: StepPredictor, batch_size: int, prompt_tokens: int, output_tokens: int, samples: int = 16
) -> BatchForecast:
    """Energy and time of a static batch (see module docstring)."""
    if batch_size < 1 or prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("batch_size, prompt_tokens and output_tokens must each be at least 1")
    roofline = getattr(predictor, "roofline", None)
    if isinstance(predictor, AnalyticPredictor) and roofline is not None:
        # The analytic model has a closed form per step: a few float evaluations, no arrays.
        prefill_seconds, prefill_j, decode_seconds, decode_j = roofline.static_batch(
            batch_size, prompt_tokens, output_tokens
        )
        return BatchForecast(
            batch_size, prompt_tokens, output_tokens, prefill_j, decode_j, prefill_seconds, decode_seconds
        )
    prefill = predictor.predict_step(StepShape.static_batch_prefill(batch_size, prompt_tokens))
    decode_steps = output_tokens - 1
    decode_j = decode_seconds = 0.0
    if decode_steps > 0:
        contexts = np.unique(np.linspace(prompt_tokens, prompt_tokens + decode_steps - 1, min(samples, decode_steps)).round())
        energies, times = [], []
        for context in contexts:
            step = predictor.predict_step(StepShape.static_batch_decode(batch_size, int(context)))
            energies.append(step.decode_energy_j)
            times.append(step.decode_seconds)
        decode_j = _integrate(contexts, np.array(energies), decode_steps)
        decode_seconds = _integrate(contexts, np.array(times), decode_steps)
    return BatchForecast(
        batch_size,
        prompt_tokens,
        output_tokens,
        prefill.prefill_energy_j + prefill.decode_energy_j,
        decode_j,
        prefill.seconds,
        decode_seconds,
    )


def _integrate(contexts: np.ndarray, values: np.ndarray, steps: int) -> float:
    """Sum of per-step values over ``steps`` consecutive contexts, from samples at ``contexts``."""
    if len(contexts) == 1:
        return float(values[0]) * steps
    # Mean of the piecewise-linear interpolant over the sampled range, times the number of steps.
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    mean = trapezoid(values, contexts) / (contexts[-1] - contexts[0])
    return float(mean) * steps
