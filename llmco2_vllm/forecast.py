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
    # The analytic model (and the GNN's distilled correction of it) has a closed form per step:
    # a few float evaluations, no arrays.
    closed_form = getattr(predictor, "static_batch", None)
    if closed_form is None and isinstance(predictor, AnalyticPredictor):
        closed_form = predictor.roofline.static_batch
    if closed_form is not None:
        prefill_seconds, prefill_j, decode_seconds, decode_j = closed_form(batch_size, prompt_tokens, output_tokens)
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


# Measured / predicted energy of the analytic model on the 298 real rows of measurements.csv, 10th
# and 90th percentiles (tests/test_forecast.py recomputes them): before the online calibration has
# measured this deployment, the truth typically lies 1.04x-2.64x above an analytic forecast.
ANALYTIC_RATIO_RANGE = (1.04, 2.64)
OTHER_PREDICTOR_RATIO_RANGE = (0.5, 2.0)  # a predictor without a measured error band: a factor of two
_MIN_LEARNED_SAMPLES = 20


@dataclass(frozen=True)
class OutputLengthEstimate:
    """Output tokens a request is expected to generate: a point value and a 10-90 % range."""

    expected: int
    low: int
    high: int
    source: str  # "max_tokens" (no history yet: the upper bound) or "learned" (recent requests)


def estimate_output_tokens(max_tokens: int, recent: list[tuple[int, int | None]]) -> OutputLengthEstimate:
    """Output length from ``max_tokens`` and recently finished requests ``(output tokens, their max_tokens)``.

    Requests often stop before ``max_tokens``; the share of ``max_tokens`` they used is learned from
    recent requests and applied to this one (quantiles 10/50/90 %), never above ``max_tokens``.
    """
    ratios = sorted(
        min(output / limit, 1.0) for output, limit in recent if limit and limit > 0 and output > 0
    )
    if len(ratios) < _MIN_LEARNED_SAMPLES:
        return OutputLengthEstimate(max_tokens, 1, max_tokens, "max_tokens")

    def quantile(q: float) -> int:
        ratio = ratios[min(int(q * len(ratios)), len(ratios) - 1)]
        return max(1, min(max_tokens, round(ratio * max_tokens)))

    return OutputLengthEstimate(quantile(0.5), quantile(0.1), quantile(0.9), "learned")


@dataclass(frozen=True)
class RequestForecast:
    """Forecast energy and carbon of one client request, before it runs (all its prompts x n)."""

    prompt_tokens: int
    max_tokens: int
    parts: int  # engine requests: prompts x n
    output_tokens: OutputLengthEstimate
    concurrent_requests: int  # the batch it is expected to share the GPUs with, itself included
    energy_j: float
    energy_j_low: float
    energy_j_high: float
    seconds: float
    operational_grams_co2e: float
    embodied_grams_co2e: float
    grams_co2e_low: float
    grams_co2e_high: float
    grid_intensity_grams_per_kwh: float
    calibrated: bool

    @property
    def grams_co2e(self) -> float:
        return self.operational_grams_co2e + self.embodied_grams_co2e

    def to_json(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "parts": self.parts,
            "output_tokens": self.output_tokens.expected,
            "output_tokens_low": self.output_tokens.low,
            "output_tokens_high": self.output_tokens.high,
            "output_tokens_source": self.output_tokens.source,
            "concurrent_requests": self.concurrent_requests,
            "energy_j": self.energy_j,
            "energy_j_low": self.energy_j_low,
            "energy_j_high": self.energy_j_high,
            "seconds": self.seconds,
            "operational_grams_co2e": self.operational_grams_co2e,
            "embodied_grams_co2e": self.embodied_grams_co2e,
            "grams_co2e": self.grams_co2e,
            "grams_co2e_low": self.grams_co2e_low,
            "grams_co2e_high": self.grams_co2e_high,
            "grid_intensity_grams_per_kwh": self.grid_intensity_grams_per_kwh,
            "calibrated": self.calibrated,
        }


class RequestForecaster:
    """Forecasts a request on the server's model and hardware at the current load.

    A request arriving while ``running`` others run is treated as one of a static batch of
    ``running + 1`` like-shaped requests and gets a 1/batch share of that batch's energy and
    embodied carbon: the marginal cost under load, the same attribution the engine applies later.
    """

    def __init__(self, predictor: StepPredictor, num_gpus: int, embodied_grams_per_gpu_second: float, pue: float) -> None:
        self.predictor = predictor
        own_range = getattr(predictor, "ratio_range", None)  # the distilled GNN's, from its residuals
        if isinstance(predictor, AnalyticPredictor) or getattr(predictor, "is_fallback", False):
            self.uncalibrated_ratio_range = ANALYTIC_RATIO_RANGE
        else:
            self.uncalibrated_ratio_range = tuple(own_range) if own_range else OTHER_PREDICTOR_RATIO_RANGE
        self.num_gpus = num_gpus
        self.embodied_grams_per_gpu_second = embodied_grams_per_gpu_second
        self.pue = pue

    def _share(self, batch: int, prompt_tokens: int, output_tokens: int, scales: tuple[float, float]) -> tuple[float, float]:
        forecast = forecast_static_batch(self.predictor, batch, prompt_tokens, output_tokens)
        energy_j = (forecast.prefill_j * scales[0] + forecast.decode_j * scales[1]) / batch
        return energy_j, forecast.seconds

    def forecast(
        self,
        prompt_tokens: int,
        max_tokens: int,
        grams_co2e_per_kwh: float,
        parts: int = 1,
        running_requests: int = 0,
        recent_outputs: list[tuple[int, int | None]] | None = None,
        scales: tuple[float, float] = (1.0, 1.0),
        relative_error: float | None = None,
    ) -> RequestForecast:
        """``relative_error``: the calibrated model's measured error ratio; None = not calibrated yet.

        The interval spans the output-length range and the model's error: before calibration the
        measured/predicted range of the predictor on real data, after it ``1 / (1 + e) .. 1 + e``.
        """
        if prompt_tokens < 1 or max_tokens < 1 or parts < 1:
            raise ValueError("prompt_tokens, max_tokens and parts must each be at least 1")
        outputs = estimate_output_tokens(max_tokens, recent_outputs or [])
        batch = running_requests + parts
        expected = self._share(batch, prompt_tokens, outputs.expected, scales)
        low = expected if outputs.low == outputs.expected else self._share(batch, prompt_tokens, outputs.low, scales)
        high = expected if outputs.high == outputs.expected else self._share(batch, prompt_tokens, outputs.high, scales)
        energy_j, seconds = expected
        if relative_error is None:
            ratio_low, ratio_high = self.uncalibrated_ratio_range
        else:
            ratio_low, ratio_high = 1.0 / (1.0 + relative_error), 1.0 + relative_error
        grams_per_joule = grams_co2e_per_kwh * self.pue / 3.6e6
        # Embodied carbon follows the time the GPUs are held, shared by the batch.
        embodied_per_second = self.embodied_grams_per_gpu_second * self.num_gpus / batch
        return RequestForecast(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            parts=parts,
            output_tokens=outputs,
            concurrent_requests=batch,
            energy_j=energy_j * parts,
            energy_j_low=low[0] * parts * ratio_low,
            energy_j_high=high[0] * parts * ratio_high,
            seconds=seconds,
            operational_grams_co2e=energy_j * parts * grams_per_joule,
            embodied_grams_co2e=seconds * parts * embodied_per_second,
            grams_co2e_low=parts * (low[0] * grams_per_joule * ratio_low + low[1] * embodied_per_second),
            grams_co2e_high=parts * (high[0] * grams_per_joule * ratio_high + high[1] * embodied_per_second),
            grid_intensity_grams_per_kwh=grams_co2e_per_kwh,
            calibrated=relative_error is not None,
        )
