"""Forecasts for whole requests from step predictions (``llmco2 predict``, request forecasts).

A static batch of B requests, each with P prompt tokens and O generated tokens, runs one prefill
step (which also yields the first output token) and O-1 decode steps whose KV context grows from P
to P+O-2. The analytic predictor sums them in closed form (``Roofline.static_batch``); for any other
predictor, decode cost is evaluated at up to ``samples`` evenly spaced contexts and integrated with
the trapezoid rule (exact for linear cost), as LLMCO2 does.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmco2_vllm.predict.predictor import AnalyticPredictor, StepPredictor
from llmco2_vllm.predict.step_shape import StepShape


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
_MIN_OUTCOMES = 16  # finished requests of a band before its correction replaces the prior
_OUTCOME_WINDOW = 256  # the rolling window of outcomes each band learns from, newest first
_OUTPUT_WINDOW = 128  # newest outcomes output lengths are learned from (the workload changes)
INTERVAL_QUANTILES = (0.1, 0.9)  # the 80 % interval


def length_band(max_tokens: int) -> int:
    """Requests of about the same ``max_tokens`` (a power-of-two band) share what is learned of them."""
    return max(1, int(max_tokens)).bit_length()


def batch_band(concurrent_requests: float) -> int:
    """Half-octaves of the batch a forecast priced a request in: a correction learned while the
    server ran 2 requests at a time says nothing about forecasts made while it runs 16."""
    return round(2.0 * math.log2(max(1.0, concurrent_requests)))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default), without numpy's overhead."""
    position = q * (len(sorted_values) - 1)
    below = int(position)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * (position - below)


@dataclass(frozen=True)
class OutputLengthEstimate:
    """Output tokens a request is expected to generate: the median and a 10-90 % range."""

    expected: int
    low: int
    high: int
    # "max_tokens" (no history yet: the upper bound), "learned" (recent requests) or "runs_to_max_tokens"
    # (the request ignores EOS: its length is known)
    source: str
    stopped_early_share: float | None = None  # learned probability that it stops on its own (EOS, stop) before max_tokens


def estimate_output_tokens(max_tokens: int, recent: list[tuple[int, int | None]]) -> OutputLengthEstimate:
    """Output length from ``max_tokens`` and recently finished requests ``(output tokens, their max_tokens)``.

    Where requests stop on their own (EOS, a stop string) is learned from recent requests - of this
    request's ``max_tokens`` band when it has enough of them (``max_tokens`` often says what kind of
    request it is), else of all - and this one generates that many tokens or ``max_tokens``, whichever
    comes first (quantiles 10/50/90 %). A request that ran to its own ``max_tokens`` only says that it
    would have stopped later (right-censored, Kaplan-Meier), so the stop-reason mix is part of the
    estimate, and a larger ``max_tokens`` does not by itself make a request longer.
    """
    return OutputLengths(recent).estimate(max_tokens)


class _StopPositions:
    """Kaplan-Meier estimate of the output length at which requests stop on their own, from
    ``(output tokens, max_tokens or None)``: one that reached its ``max_tokens`` is censored there."""

    def __init__(self, outcomes: list[tuple[int, int | None]]) -> None:
        ordered = sorted(outcomes)
        self._times: list[int] = []  # output lengths where some request stopped
        self._stopped: list[float] = []  # P(stopped at or before that length)
        survival, at_risk, i = 1.0, len(ordered), 0
        while i < len(ordered):
            length, stops, j = ordered[i][0], 0, i
            while j < len(ordered) and ordered[j][0] == length:
                limit = ordered[j][1]
                stops += limit is None or length < limit
                j += 1
            if stops:
                survival *= 1.0 - stops / at_risk
                self._times.append(length)
                self._stopped.append(1.0 - survival)
            at_risk -= j - i
            i = j
        self.quantiles = tuple(self._quantile(q) for q in (0.1, 0.5, 0.9))

    def _quantile(self, q: float) -> float:
        """The shortest length by which a share ``q`` has stopped; infinite beyond what was seen (they
        ran to their limits first)."""
        index = bisect.bisect_left(self._stopped, q - 1e-12)
        return self._times[index] if index < len(self._times) else math.inf

    def stopped_before(self, max_tokens: int) -> float:
        """P(a request stops on its own before generating ``max_tokens`` tokens)."""
        index = bisect.bisect_left(self._times, max_tokens)
        return self._stopped[index - 1] if index else 0.0


class OutputLengths:
    """``estimate_output_tokens`` with the history's stop positions estimated once per band (a
    forecast then reads them in O(log n))."""

    def __init__(self, recent: list[tuple[int, int | None]]) -> None:
        pooled: list[tuple[int, int | None]] = []
        bands: dict[int, list[tuple[int, int | None]]] = {}
        for output, limit in recent:
            if output > 0:
                limit = limit if limit and limit > 0 else None
                pooled.append((output, limit))
                if limit is not None:
                    bands.setdefault(length_band(limit), []).append((output, limit))
        self._all = _StopPositions(pooled) if len(pooled) >= _MIN_LEARNED_SAMPLES else None
        self._bands = {band: _StopPositions(items) for band, items in bands.items() if len(items) >= _MIN_LEARNED_SAMPLES}

    def estimate(self, max_tokens: int) -> OutputLengthEstimate:
        positions = self._bands.get(length_band(max_tokens)) or self._all
        if positions is None:
            return OutputLengthEstimate(max_tokens, 1, max_tokens, "max_tokens")
        low, expected, high = (max(1, int(min(max_tokens, q))) for q in positions.quantiles)
        return OutputLengthEstimate(expected, low, high, "learned", positions.stopped_before(max_tokens))


@dataclass(frozen=True)
class ForecastOutcome:
    """A finished request's forecast beside its actual (all of its parts), as the results store keeps them."""

    max_tokens: int
    output_tokens: int  # actual, per part
    prompt_tokens: int  # actual, per part
    cached_tokens: int  # actual, per part
    raw_energy_j: float | None  # the forecast before the learned correction (None: an older row)
    energy_j: float  # the forecast point
    energy_j_low: float
    energy_j_high: float
    actual_energy_j: float  # calibrated, attributed to this request by the engine
    concurrent_requests: float = 0.0  # the batch the forecast priced it in (0: unknown)
    output_tokens_source: str = ""  # how its forecast priced the output length (OutputLengthEstimate.source)


@dataclass(frozen=True)
class ForecastCorrection:
    """What recent outcomes of a band say about its forecasts: actual / raw forecast, median and 80 % range."""

    ratio: float
    ratio_low: float
    ratio_high: float
    samples: int
    band: str  # "length band N" or "all"


class ForecastLearner:
    """Learns from finished requests: output lengths, prefix-cache hits and a rolling correction per band.

    Built from the results store's recent outcomes (newest first) every few seconds off the event
    loop; the forecast reads it without touching the store. The correction is the distribution of
    actual / raw forecast of the band's last ``_OUTCOME_WINDOW`` requests: its median corrects the
    point and its split-conformal 80 % range (about its 10-90 % quantiles) gives the interval, so the
    interval's coverage is measured, not assumed, and already holds output-length and model error together.
    """

    def __init__(self, outcomes: list[ForecastOutcome]) -> None:
        self.outcomes = outcomes
        # Where requests stop is learned from those that could stop; those that ignored EOS ran to their limit.
        could_stop = [o for o in outcomes if o.output_tokens_source != "runs_to_max_tokens"][:_OUTPUT_WINDOW]
        self.output_lengths = OutputLengths([(o.output_tokens, o.max_tokens) for o in could_stop])
        prompts = sum(o.prompt_tokens for o in outcomes)
        self.cached_share = min(0.95, sum(o.cached_tokens for o in outcomes) / prompts) if prompts > 0 else 0.0
        # Forecasts that priced the output length differently (known, max_tokens before any history,
        # learned) err differently: each is corrected by outcomes priced the same way (a correction
        # learned while lengths were priced at max_tokens would count early stops twice once learned).
        by_band: dict[tuple[int, int, str], list[float]] = {}
        by_batch: dict[tuple[int, str], list[float]] = {}
        every: list[float] = []
        for outcome in outcomes:
            if outcome.raw_energy_j and outcome.raw_energy_j > 0 and outcome.actual_energy_j > 0:
                ratio = outcome.actual_energy_j / outcome.raw_energy_j
                batch, source = batch_band(outcome.concurrent_requests), outcome.output_tokens_source
                for ratios in (every, by_batch.setdefault((batch, source), []),
                               by_band.setdefault((length_band(outcome.max_tokens), batch, source), [])):  # fmt: skip
                    if len(ratios) < _OUTCOME_WINDOW:
                        ratios.append(ratio)
        self._all = self._correction(every, "all")
        self._batches = {band: self._correction(ratios, _band_name(None, *band)) for band, ratios in by_batch.items()}
        self._bands = {band: self._correction(ratios, _band_name(*band)) for band, ratios in by_band.items()}
        scored = [o for o in outcomes[:_OUTCOME_WINDOW] if o.actual_energy_j > 0 and o.energy_j > 0]
        errors = sorted(abs(o.energy_j / o.actual_energy_j - 1.0) for o in scored)
        self.error_ratio = _quantile(errors, 0.5) if errors else None
        inside = [o.energy_j_low <= o.actual_energy_j <= o.energy_j_high for o in scored]
        self.interval_coverage = sum(inside) / len(inside) if inside else None
        self.scored_requests = len(scored)

    @staticmethod
    def _correction(ratios: list[float], band: str) -> ForecastCorrection | None:
        if len(ratios) < _MIN_OUTCOMES:
            return None
        ordered = sorted(ratios)
        n = len(ordered)
        low, high = INTERVAL_QUANTILES
        # Split-conformal order statistics: a new outcome exchangeable with these n falls between the
        # k-th smallest and the j-th with probability (j - k) / (n + 1) >= 80 % (wider than the sample
        # quantiles when n is small: with 16 outcomes, their extremes).
        below = max(1, math.floor((n + 1) * low))
        above = min(n, math.ceil((n + 1) * high))
        return ForecastCorrection(_quantile(ordered, 0.5), ordered[below - 1], ordered[above - 1], n, band)

    def correction(
        self, max_tokens: int, concurrent_requests: float | None = None, output_tokens_source: str = ""
    ) -> ForecastCorrection | None:
        """The correction of outcomes forecast for about this length and batch, their output length
        priced the same way, when there are enough of them, else of this batch at any length; None
        (the prior) when there are too few. Without a batch: of all outcomes."""
        if concurrent_requests is None:
            return self._all
        batch = batch_band(concurrent_requests)
        band = self._bands.get((length_band(max_tokens), batch, output_tokens_source))
        return band or self._batches.get((batch, output_tokens_source))


def _band_name(length: int | None, batch: int, output_tokens_source: str) -> str:
    name = f"batch band {batch}" if length is None else f"length band {length}, batch band {batch}"
    return f"{name}, output length {output_tokens_source or 'unknown'}"


def batch_if_none_arrive(batch: float, parts: int, steps: int, running: Sequence[tuple[float, int]]) -> float:
    """The batch a request's ``steps`` are priced in if the ``running`` requests (``(steps left, parts)``)
    end as expected and none arrive in their place: requests running now that end during its life
    leave it a smaller batch for the rest. The rest of ``batch`` (requests of which nothing is known:
    the engine's count of another API server's, or of ones that just finished) is taken to leave at once.

    A step's cost is shared by its batch, so over a life in changing batches a request pays the mean
    of 1 / batch: this is the harmonic mean of its batch over its steps, not the plain mean (4 for a
    tenth of the steps and alone after: 1.08, not 1.3, which priced such a request 17 % low)."""
    if not running or steps <= 0:
        return float(parts)
    leaving = sorted((min(max(left, 0.0), float(steps)), p) for left, p in running)
    size = parts + sum(p for left, p in leaving if left > 0)
    inverse_sum, start = 0.0, 0.0
    for left, p in leaving:  # the batch is constant between two requests' ends
        if left > 0:
            inverse_sum += (left - start) / max(float(parts), min(batch, size))
            start, size = left, size - p
    inverse_sum += (steps - start) / max(float(parts), min(batch, size))
    return steps / inverse_sum


@dataclass(frozen=True)
class RequestForecast:
    """Forecast energy and carbon of one client request, before it runs (all its prompts x n).

    ``energy_j`` is the median; ``energy_j_low``/``energy_j_high`` an 80 % interval around it
    (always ``low <= point <= high``).
    """

    prompt_tokens: int
    max_tokens: int
    parts: int  # engine requests: prompts x n
    output_tokens: OutputLengthEstimate
    concurrent_requests: float  # the batch it is expected to share the GPUs with, itself included
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
    raw_energy_j: float = 0.0  # before the learned correction (what the outcomes are compared with)
    correction: ForecastCorrection | None = None
    cached_share: float = 0.0  # expected share of the prompt found in the prefix cache

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
            "output_tokens_stopped_early_share": self.output_tokens.stopped_early_share,
            "concurrent_requests": self.concurrent_requests,
            "cached_share": self.cached_share,
            "energy_j": self.energy_j,
            "energy_j_low": self.energy_j_low,
            "energy_j_high": self.energy_j_high,
            "raw_energy_j": self.raw_energy_j,
            "correction_ratio": self.correction.ratio if self.correction else None,
            "correction_samples": self.correction.samples if self.correction else 0,
            "correction_band": self.correction.band if self.correction else None,
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
    """Forecasts a request on the server's model and hardware under the server's recent batching.

    A request is treated as one of a static batch of like-shaped requests as large as the batch the
    engine has recently been running (its published mean, or the running count plus this request,
    whichever is larger) and gets a 1/batch share of that batch's energy and embodied carbon: the
    marginal cost under load, the same attribution the engine applies later. Prefill is discounted
    by the prefix-cache hits recent requests had. A ``ForecastLearner`` then corrects the point by
    what recent outcomes of the same band showed and supplies the measured 80 % interval.
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

    def _shares(
        self, priced: Sequence[tuple[float, int]], prompt_tokens: int, scales: tuple[float, float], cached_share: float,
        step_token_budget: float | None = None,
    ) -> list[tuple[float, float]]:
        """(energy J, seconds) of one request in a batch, for each ``(batch, output length)`` priced.

        A predictor that evaluates several static batches at once (``static_batches``) prices them
        all in one call, a fractional batch as is (its sums are linear in the batch); any other
        prices whole batches, a fractional one interpolated between the two around it.

        With the engine's ``step_token_budget`` known, and a predictor whose attribution shares a step's
        fixed costs equally among the sequences it schedules (``static_batches_with_fixed``), a prompt longer
        than what a step leaves it (the budget less one token per other running request) runs in
        several prefill steps (chunked prefill), each with its share of a step's fixed cost: the
        static batch priced one."""
        prefill_scale, decode_scale = scales
        many = getattr(self.predictor, "static_batches", None)
        if many is None:
            shares = []
            for batch, output in priced:
                whole = max(1, int(batch))
                fraction = batch - whole
                around = [forecast_static_batch(self.predictor, size, prompt_tokens, output)
                          for size in ((whole, whole + 1) if fraction > 1e-6 else (whole,))]  # fmt: skip
                # Prompt tokens found in the prefix cache are not computed again; the context stays as long.
                values = [((f.prefill_j * (1.0 - cached_share) * prefill_scale + f.decode_j * decode_scale) / f.batch_size,
                           f.seconds) for f in around]  # fmt: skip
                energy_j, seconds = values[0]
                if len(values) == 2:
                    energy_j += (values[1][0] - energy_j) * fraction
                    seconds += (values[1][1] - seconds) * fraction
                shares.append((energy_j, seconds))
            return shares
        with_fixed = getattr(self.predictor, "static_batches_with_fixed", None)
        extra_steps = [0] * len(priced)
        if with_fixed is not None and step_token_budget and math.isfinite(step_token_budget):
            uncached = prompt_tokens * (1.0 - cached_share)
            # The running requests decode a token each in every step: what is left of the budget takes the prompt.
            extra_steps = [max(0, math.ceil(uncached / max(1.0, step_token_budget - (batch - 1.0)) - 1e-9) - 1)
                           for batch, _ in priced]  # fmt: skip
        results = (with_fixed if any(extra_steps) else many)([(batch, prompt_tokens, output) for batch, output in priced])
        shares = []
        for (batch, _), extra, (prefill_seconds, prefill_j, decode_seconds, decode_j, *fixed) in zip(priced, extra_steps, results):
            # Each prefill step after the first: one step of the whole batch, its fixed costs shared equally.
            extra_seconds, extra_j = (extra * fixed[0], extra * fixed[1]) if extra else (0.0, 0.0)
            energy_j = ((prefill_j * (1.0 - cached_share) + extra_j) * prefill_scale + decode_j * decode_scale) / batch
            shares.append((energy_j, prefill_seconds + decode_seconds + extra_seconds))
        return shares

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
        mean_running_requests: float | None = None,
        learner: ForecastLearner | None = None,
        step_token_budget: float | None = None,
        runs_to_max_tokens: bool = False,
        busy_batch: float | None = None,
        running: Sequence[tuple[float, int]] = (),
    ) -> RequestForecast:
        """``runs_to_max_tokens``: the request ignores EOS, so it generates ``max_tokens`` tokens.

        ``relative_error``: the calibrated model's measured error ratio; None = not calibrated yet.

        ``step_token_budget``: the most tokens the engine schedules in one step (None: unknown, a
        prompt is priced as one prefill step).

        ``mean_running_requests``: the batch the engine has been running (a lower bound); ``learner``: what recent
        outcomes taught (output lengths, prefix-cache hits, correction), else ``recent_outputs`` only.

        ``busy_batch``: the batch the engine ran recently, however long ago (load that may return);
        ``running``: ``(steps left, parts)`` of each request running beside this one (requests that may end).

        The interval: with a learned correction, its measured 10-90 % ratios; before, the
        output-length range times the model's error range (before calibration the predictor's
        measured/predicted range on real data, after it ``1 / (1 + e) .. 1 + e``), widened to hold 1,
        and priced over the batch's own range: its low end in ``busy_batch``, its high end in the batch
        left if the running requests end as expected and none arrive in their place.
        """
        if prompt_tokens < 1 or max_tokens < 1 or parts < 1:
            raise ValueError("prompt_tokens, max_tokens and parts must each be at least 1")
        if runs_to_max_tokens:
            outputs = OutputLengthEstimate(max_tokens, max_tokens, max_tokens, "runs_to_max_tokens", 0.0)
        elif learner is not None:
            outputs = learner.output_lengths.estimate(max_tokens)
        else:
            outputs = estimate_output_tokens(max_tokens, recent_outputs or [])
        cached_share = learner.cached_share if learner is not None else 0.0
        batch = float(running_requests + parts)
        if mean_running_requests is not None and math.isfinite(mean_running_requests):
            batch = max(batch, float(mean_running_requests))
        correction = learner.correction(max_tokens, batch, outputs.source) if learner is not None else None
        # A learned correction's measured range already holds the spread of output lengths and of the
        # batch over the request's life: the expected length alone is priced, in the expected batch.
        priced = dict.fromkeys(("point", "low", "high"), (batch, outputs.expected))
        if correction is None:
            most = max(batch, busy_batch) if busy_batch is not None and math.isfinite(busy_batch) else batch
            priced["low"] = (most, outputs.low)
            priced["high"] = (batch_if_none_arrive(batch, parts, outputs.high, running), outputs.high)
        distinct = list(dict.fromkeys(priced.values()))
        share_of = dict(zip(distinct, self._shares(distinct, prompt_tokens, scales, cached_share, step_token_budget)))
        expected = share_of[priced["point"]]
        energy_j, seconds = expected
        grams_per_joule = grams_co2e_per_kwh * self.pue / 3.6e6
        # Embodied carbon follows the time the GPUs are held, shared by the batch.
        embodied_per_gpu_second = self.embodied_grams_per_gpu_second * self.num_gpus

        def grams(which: str, factor: float) -> float:
            share_j, share_seconds = share_of[priced[which]]
            return parts * factor * (share_j * grams_per_joule + share_seconds * embodied_per_gpu_second / priced[which][0])

        if correction is not None:
            point, low_factor, high_factor = correction.ratio, correction.ratio_low, correction.ratio_high
        else:
            if relative_error is None:
                ratio_low, ratio_high = self.uncalibrated_ratio_range
            else:
                ratio_low, ratio_high = 1.0 / (1.0 + relative_error), 1.0 + relative_error
            point, low_factor, high_factor = 1.0, min(ratio_low, 1.0), max(ratio_high, 1.0)
        low, high = share_of[priced["low"]], share_of[priced["high"]]
        point_energy_j = energy_j * parts * point
        point_grams = grams("point", point)
        return RequestForecast(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            parts=parts,
            output_tokens=outputs,
            concurrent_requests=batch,
            energy_j=point_energy_j,
            # The point is inside its interval by construction; min/max keep it so under rounding.
            energy_j_low=min(point_energy_j, low[0] * parts * low_factor),
            energy_j_high=max(point_energy_j, high[0] * parts * high_factor),
            seconds=seconds * point,
            operational_grams_co2e=energy_j * parts * point * grams_per_joule,
            embodied_grams_co2e=seconds * parts * point * embodied_per_gpu_second / batch,
            grams_co2e_low=min(point_grams, grams("low", low_factor)),
            grams_co2e_high=max(point_grams, grams("high", high_factor)),
            grid_intensity_grams_per_kwh=grams_co2e_per_kwh,
            calibrated=relative_error is not None,
            raw_energy_j=energy_j * parts,
            correction=correction,
            cached_share=cached_share,
        )
