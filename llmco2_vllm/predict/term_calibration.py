"""Calibration of the fitted model's own terms from one deployment's measurements.

Where the scale calibration (``calibration.py``: measured ≈ a·prefill + b·decode + c·idle) can only
stretch a prediction, this re-fits the parameters of the time and power model itself for a
deployment — weight streaming, GEMM, K/V and memory efficiencies, collectives, per-sequence and
per-step overheads, and the power activities and idle power — so that a wrong *slope* in batch size
is corrected too. Each parameter starts at the shipped model's value (the prior), moves in log space
under a ridge pull toward it (``PRIOR_WIDTH``: a few measurements move only what they identify),
and stays within its physical bounds.

Two signals, in one fit of every term: measured time (a batch's wall time, or engine step times on a
GPU host) pins the time terms, and measured energy — predicted as power x time, so the two stay
consistent with the meter — what is left to the power terms. Without any time measurement the
energy alone moves both (energy-only calibration), the ridge keeping unidentified terms home.

Measured times do not always help the energy: a time is matched by moving time terms, and where the
rows differ in what the model's time structure misses (rows of different models, a vLLM version or
GPU the prior never saw) the moved terms fit the rows' own discrepancies, and the power terms then run
to their bounds to put the energy back. ``calibrate`` (``llmco2 calibrate``) therefore decides from the
rows themselves: each row with a measured energy is left out in turn and predicted from the others,
calibrated with and without the measured times, and the times are used unless leaving them out
predicts the left-out energies better (mean absolute log error). Nothing else is chosen, so with one
row, or without a measured energy, it is ``calibrate``.

Rows of several models (a fleet) differ most by each model's own offset, which no shared term can
take: each model then gets a time and a power factor of its own (``TermCalibration.model_factors``,
applied to that model by name), pulled toward its measured factor in the prior (or 1) by how far
models scatter around the fitted model, so the shared terms move only as far as the models agree.

An observation is a set of engine steps with multiplicities (their sums, ``step_terms.SUM_NAMES``)
and what was measured over them: a static batch (one prefill step + its decode steps), or the mean
step of steady-state serving.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmco2_vllm.predict import fitted
from llmco2_vllm.predict.fitted import FittedModel
from llmco2_vllm.predict.hardware import GpuSpec
from llmco2_vllm.predict.step_terms import StepTerms

#: One standard deviation of the log-space pull toward the shipped value (x1.5).
PRIOR_WIDTH = math.log(1.5)
#: Relative noise of one measurement (log units): how much a single row weighs against the prior.
MEASUREMENT_NOISE = 0.03
IDLE_SCALE_BOUNDS = (0.5, 2.0)
ROBUST_SIGMAS = 3.0


@dataclass(frozen=True)
class Observation:
    """Steps (``sums``: SUM_NAMES x k) run ``counts`` times each on a deployment (``terms``, the
    GPUs it draws power on), and what was measured over them."""

    terms: StepTerms
    num_gpus: float
    sums: np.ndarray
    counts: np.ndarray
    measured_seconds: float | None = None
    measured_energy_j: float | None = None
    idle_seconds: float = 0.0  # idle time inside the energy measurement (the GPUs' idle power over it)
    label: str = ""

    def energy_only(self) -> "Observation":
        return dataclasses.replace(self, measured_seconds=None)


def static_batch_observation(
    terms: StepTerms, num_gpus: float, batch_size: int, prompt_tokens: int, output_tokens: int,
    samples: int = fitted.STATIC_BATCH_SAMPLES, **measured,
) -> Observation:
    """A static batch: its prefill step and its decode steps (``StepTerms.static_batch_sums``)."""
    sums, counts = terms.static_batch_sums(batch_size, prompt_tokens, output_tokens, samples)
    return Observation(terms, num_gpus, sums, counts, **measured)


def serving_observation(terms: StepTerms, measurement) -> Observation:
    """The mean step of a measured steady-state serving row (``serving_measurements``): its steps
    (``StepTerms.serving_steps``: decode-only ones and ones that also prefill a prompt) with their
    shares as counts, its measured mean step time and the energy of a mean step (all GPUs)."""
    sums, shares = terms.serving_steps(measurement.batch_size / measurement.pipeline_parallel, measurement.prompt_tokens,
                                       measurement.output_tokens, measurement.running_age_tokens)  # fmt: skip
    return Observation(terms, measurement.num_gpus, sums, shares, measured_seconds=measurement.step_seconds,
                       measured_energy_j=measurement.power_watts * measurement.step_seconds, label=measurement.row_id)  # fmt: skip


@dataclass(frozen=True)
class TermCalibration:
    """Calibrated parameters of the fitted model: what a calibration file's ``terms`` holds."""

    software: str
    parameters: dict[str, float]  # parameter key -> calibrated value (only those that were calibrated)
    idle_scale: float = 1.0
    #: model name -> (time factor, power factor): what each model of a calibration over several
    #: models needs beyond the shared terms (``calibrate``); applied only to a model of that name
    model_factors: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": "fitted-terms", "software": self.software, "parameters": self.parameters,
                "idle_scale": self.idle_scale,
                "model_factors": {name: {"time": t, "power": p} for name, (t, p) in self.model_factors.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> "TermCalibration":
        """Check a file's ``terms``; raises ValueError with the reason."""
        if data.get("kind") != "fitted-terms":
            raise ValueError(f"terms of kind {data.get('kind')!r}, expected 'fitted-terms'")
        parameters = data.get("parameters")
        if not isinstance(parameters, dict) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in parameters.values()
        ):
            raise ValueError("terms.parameters must map names to positive numbers")
        idle_scale = float(data.get("idle_scale", 1.0))
        if not (IDLE_SCALE_BOUNDS[0] <= idle_scale <= IDLE_SCALE_BOUNDS[1]):
            raise ValueError(f"terms.idle_scale {idle_scale} outside {IDLE_SCALE_BOUNDS}")
        factors = data.get("model_factors") or {}
        low, high = fitted.MODEL_FACTOR_BOUNDS
        if not isinstance(factors, dict) or not all(
            isinstance(f, dict) and all(isinstance(f.get(k), (int, float)) and low <= f[k] <= high for k in ("time", "power"))
            for f in factors.values()
        ):  # fmt: skip
            raise ValueError(f"terms.model_factors must map model names to {{'time': t, 'power': p}} within {fitted.MODEL_FACTOR_BOUNDS}")
        return cls(str(data.get("software") or fitted.NEWEST_SOFTWARE), {k: float(v) for k, v in parameters.items()},
                   idle_scale, {str(n): (float(f["time"]), float(f["power"])) for n, f in factors.items()})  # fmt: skip

    def apply(self, model: FittedModel) -> FittedModel:
        """The model with these parameters (unknown names are refused: the file is for another model
        version); ``model_factors`` apply per model (``FittedModel.for_model``)."""
        unknown = sorted(set(self.parameters) - set(model.parameters))
        if unknown:
            raise ValueError(f"calibrated parameters {', '.join(unknown[:5])} are not in the fitted model: "
                             "recalibrate with this version's `llmco2 calibrate`")  # fmt: skip
        return dataclasses.replace(model, parameters={**model.parameters, **self.parameters})


def terms_from_file(path: str) -> TermCalibration | None:
    """The term calibration a calibration file carries (None when it has none, or does not exist yet).

    Raises ``calibration.CalibrationFileError`` for a file that is not a valid calibration."""
    from llmco2_vllm.predict.calibration import CalibrationFileError, OnlineCalibrator

    terms = OnlineCalibrator.load(path).terms
    if terms is None:
        return None
    try:
        return TermCalibration.from_dict(terms)
    except ValueError as error:
        raise CalibrationFileError(f"calibration file {path}: {error}") from None


@dataclass
class CalibrationResult:
    model: FittedModel
    idle_scale: float
    changes: dict[str, tuple[float, float]]  # parameter -> (prior, calibrated)
    residuals_before: dict[str, list[float]]  # "seconds"/"energy" -> log(predicted / measured) per observation
    residuals_after: dict[str, list[float]]

    software: str = fitted.NEWEST_SOFTWARE
    #: whether the measured times were fitted (when ``calibrate`` chose), and the leave-one-out energy
    #: errors (mean absolute log) with and without them
    selection: dict | None = None
    model_factors: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    @property
    def terms(self) -> TermCalibration:
        return TermCalibration(self.software, {n: after for n, (_, after) in self.changes.items() if n != "idle_scale"},
                               self.idle_scale, dict(self.model_factors))  # fmt: skip

    @property
    def deployment(self) -> CalibratedModel:
        """The calibrated model, ready to predict observations."""
        return CalibratedModel(self.model, self.software, self.idle_scale, self.model_factors)

    def report(self) -> dict:
        """Parameters, their change from the prior, and the fit's residuals (log predicted / measured)."""
        return {
            "changes": {name: {"prior": before, "calibrated": after, "ratio": after / before}
                        for name, (before, after) in self.changes.items()},  # fmt: skip
            "residuals_before": self.residuals_before,
            "residuals_after": self.residuals_after,
            "model_factors": {name: {"time": t, "power": p} for name, (t, p) in self.model_factors.items()},
            **({"selection": self.selection} if self.selection is not None else {}),
        }


class CalibratedModel:
    """A fitted model with an idle-power scale: predicts observations."""

    def __init__(self, model: FittedModel, software: str | None = None, idle_scale: float = 1.0,
                 model_factors: dict[str, tuple[float, float]] | None = None) -> None:  # fmt: skip
        self.model, self.idle_scale = model, idle_scale
        self.software = model._software(software)
        self.model_factors = dict(model_factors or {})  # model name -> (time, power) (``TermCalibration``)

    def for_model(self, name: str) -> FittedModel:
        """The fitted model for a model of this name (with its calibrated factors, else its measured ones)."""
        return self.model.for_model(name, fitted.factors_for(self.model_factors, name))

    def with_idle(self, gpu: GpuSpec) -> GpuSpec:
        return dataclasses.replace(gpu, idle_watts=self.model.idle_watts(gpu) * self.idle_scale)

    def predict(self, observation: Observation) -> tuple[float, float]:
        """(seconds, energy J of all the deployment's GPUs) of the observation's steps."""
        return _StackedObservations([observation]).predict(self)[id(observation)]


class _StackedObservations:
    """Observations' steps stacked per deployment (``StepTerms``), their terms computed once: a
    solver step evaluates the model once per deployment, not once per observation."""

    def __init__(self, observations: Sequence[Observation]) -> None:
        by_terms: dict[int, list[Observation]] = {}
        for o in observations:
            if o.sums.shape[1]:
                by_terms.setdefault(id(o.terms), []).append(o)
        self._empty = [o for o in observations if not o.sums.shape[1]]  # idle time only
        self._groups = []
        for members in by_terms.values():
            sizes = [m.sums.shape[1] for m in members]
            terms = np.concatenate([m.terms.from_sums(m.sums) for m in members], axis=1)
            self._groups.append((members, terms, np.concatenate([m.counts for m in members]),
                                 np.cumsum([0, *sizes[:-1]]), np.array([m.idle_seconds for m in members]),
                                 np.array([m.num_gpus for m in members], dtype=np.float64)))  # fmt: skip

    def predict(self, deployment: CalibratedModel) -> dict[int, tuple[float, float]]:
        """``CalibratedModel.predict`` of every observation, by ``id``."""
        predicted = {id(o): (0.0, deployment.with_idle(o.terms.gpu).idle_watts * o.idle_seconds * o.num_gpus)
                     for o in self._empty}  # fmt: skip
        software = deployment.software
        for members, terms, counts, starts, idle_seconds, num_gpus in self._groups:
            model = deployment.for_model(members[0].terms.model.name)
            parts = model.time_parts(terms, software)
            gpu = deployment.with_idle(members[0].terms.gpu)
            busy = counts * parts[0]
            seconds = np.add.reduceat(busy, starts)
            power = model.power_watts(gpu, *parts, software=software)
            energy = (np.add.reduceat(busy * power, starts) + gpu.idle_watts * idle_seconds) * num_gpus
            predicted.update(zip(map(id, members), zip(seconds.tolist(), energy.tolist())))
        return predicted


def _bounds(name: str) -> tuple[float, float]:
    if name == "idle_scale":
        return IDLE_SCALE_BOUNDS
    base = name.split("@")[0]
    for parameter in (*fitted.TIME_PARAMETERS, *fitted.SOFTWARE_PARAMETERS, *fitted.POWER_PARAMETERS,
                      *fitted.SOFTWARE_POWER_PARAMETERS):  # fmt: skip
        if parameter.name == base:
            return parameter.low, parameter.high
    raise KeyError(name)


def calibrate(
    prior: FittedModel, observations: Sequence[Observation], software: str | None = None,
    prior_width: float = PRIOR_WIDTH, noise: float = MEASUREMENT_NOISE, start: CalibrationResult | None = None,
    weights: Sequence[float] | None = None, max_evaluations: int | None = None, robust: bool = False,
    use_time: bool | None = None,
) -> CalibrationResult:  # fmt: skip
    """Calibrate the prior's time and power terms on the observations' measured times and energies.

    ``use_time``: fit the measured times (True), or the measured energies alone (False; the times are
    still reported as residuals); None (default) chooses by leaving each row out (``_choose_time``);
    ``start``: a previous result to start from (the pull is still toward the prior); ``weights``: one
    per observation (e.g. forgetting: older windows weigh less); ``max_evaluations`` caps the solver;
    ``robust``: a Huber loss beyond ``ROBUST_SIGMAS`` noise units, so that a glitched window (a
    counter hiccup, a clock change mid-window) pulls linearly instead of quadratically.
    """
    from scipy.optimize import least_squares

    if use_time is None:
        return _choose_time(prior, observations, software, prior_width=prior_width, noise=noise, start=start,
                            weights=weights, max_evaluations=max_evaluations, robust=robust)  # fmt: skip
    initial = start.model if start is not None else prior
    model = dataclasses.replace(prior, parameters=dict(initial.parameters))
    deployment = CalibratedModel(model, software, start.idle_scale if start is not None else 1.0,
                                 start.model_factors if start is not None else None)  # fmt: skip
    version = deployment.software
    weight_of = dict(zip(map(id, observations), weights)) if weights is not None else {}
    timed = [o for o in observations if o.measured_seconds]
    metered = [o for o in observations if o.measured_energy_j]
    if not timed and not metered:
        raise ValueError("no observation has a measured time or energy")

    stacked = _StackedObservations(observations)

    def residuals(targets: Sequence[tuple[Observation, str]]) -> list[float]:
        predicted = stacked.predict(deployment)
        return [math.log(predicted[id(o)][0] / o.measured_seconds) if kind == "seconds"
                else math.log(predicted[id(o)][1] / o.measured_energy_j) for o, kind in targets]  # fmt: skip

    def both() -> dict[str, list[float]]:
        values = residuals([(o, "seconds") for o in timed] + [(o, "energy") for o in metered])
        return {"seconds": values[: len(timed)], "energy": values[len(timed) :]}

    before = both()

    # Rows of several models: each model gets its own time and power factor (the module's docstring).
    models = sorted({o.terms.model.name for o in observations})
    factor_names = [(kind, name) for name in models for kind in (0, 1)] if len(models) > 1 else []

    def solve(names: list[str], targets: list[tuple[Observation, str]]) -> None:
        factors = deployment.model_factors
        # A model the prior was fitted on starts from its own factors.
        measured = {name: fitted.factors_for(prior.model_factors, name) or (1.0, 1.0) for name in models}
        home = np.log([1.0 if n == "idle_scale" else prior.parameters[n] for n in names]
                      + [measured[name][kind] for kind, name in factor_names])  # fmt: skip
        x0 = np.log([deployment.idle_scale if n == "idle_scale" else model.parameters[n] for n in names]
                    + [factors.get(name, measured[name])[kind] for kind, name in factor_names])  # fmt: skip
        bounds = np.log([_bounds(n) for n in names] + [fitted.MODEL_FACTOR_BOUNDS] * len(factor_names)).T
        x0 = np.clip(x0, bounds[0] + 1e-9, bounds[1] - 1e-9)
        widths = np.array([prior_width] * len(names) + [fitted.MODEL_FACTOR_WIDTH] * len(factor_names))
        scale = np.sqrt([weight_of.get(id(o), 1.0) for o, _ in targets]) / noise

        def assign(x: np.ndarray) -> None:
            values = np.exp(x).tolist()
            for name, value in zip(names, values):
                if name == "idle_scale":
                    deployment.idle_scale = value
                else:
                    model.parameters[name] = value
            found = dict(zip(factor_names, values[len(names) :]))
            deployment.model_factors = {name: (found[0, name], found[1, name]) for name in models if (0, name) in found}

        def function(x: np.ndarray) -> np.ndarray:
            assign(x)
            data = np.array(residuals(targets))
            return np.concatenate([data * scale, (x - home) / widths])

        loss = {"loss": "huber", "f_scale": ROBUST_SIGMAS} if robust else {}
        assign(least_squares(function, x0, bounds=bounds, method="trf", max_nfev=max_evaluations, **loss).x)

    time_names = model.parameter_keys(fitted.CALIBRATED_TIME_TERMS, version)
    power_names = model.parameter_keys(fitted.CALIBRATED_POWER_TERMS, version)
    # One fit of every term on every signal: measured time pins the time terms, measured energy
    # (= power x time) then what is left to the power terms; the ridge keeps unidentified terms home.
    fitted_times = timed if use_time or not metered else []
    solve(time_names + power_names, [(o, "seconds") for o in fitted_times] + [(o, "energy") for o in metered])
    after = both()
    changes = {n: (prior.parameters[n], model.parameters[n]) for n in time_names + power_names if n != "idle_scale"}
    changes["idle_scale"] = (1.0, deployment.idle_scale)
    return CalibrationResult(model, deployment.idle_scale, changes, before, after, version,
                             model_factors=deployment.model_factors)  # fmt: skip


def _choose_time(prior: FittedModel, observations: Sequence[Observation], software: str | None = None,
                 weights: Sequence[float] | None = None, **options) -> CalibrationResult:  # fmt: skip
    """``calibrate``, with the measured times used only where they help predict energy on these rows:
    each row with a measured energy is left out and predicted from the others, calibrated with and
    without the times; the times stay unless leaving them out gives the lower mean absolute log
    error. The result's ``selection`` records the choice and both errors."""
    observations = list(observations)
    metered = [i for i, o in enumerate(observations) if o.measured_energy_j]
    timed = any(o.measured_seconds for o in observations)
    if not timed or not metered or len(observations) < 2:
        return calibrate(prior, observations, software, weights=weights, use_time=True, **options)
    weight_of = dict(zip(map(id, observations), weights)) if weights is not None else {}
    errors: dict[bool, list[float]] = {True: [], False: []}
    for left_out in metered:
        rest = [o for i, o in enumerate(observations) if i != left_out]
        if not any(o.measured_energy_j or o.measured_seconds for o in rest):
            continue
        target = observations[left_out]
        for use_time in (True, False):
            if not use_time and not any(o.measured_energy_j for o in rest):
                errors[use_time].append(math.inf)  # nothing left to fit without the times
                continue
            rest_weights = [weight_of.get(id(o), 1.0) for o in rest]
            result = calibrate(prior, rest, software, weights=rest_weights, use_time=use_time, **options)
            _, energy = result.deployment.predict(target)
            errors[use_time].append(abs(math.log(energy / target.measured_energy_j)))
    with_time, without_time = (float(np.mean(errors[k])) if errors[k] else math.nan for k in (True, False))
    use_time = not (without_time < with_time)
    result = calibrate(prior, observations, software, weights=weights, use_time=use_time, **options)
    finite = {"time + energy": with_time, "energy only": without_time}
    result.selection = {"time_used": use_time,
                        "leave_one_out_energy_error": {k: v if math.isfinite(v) else None for k, v in finite.items()}}  # fmt: skip
    return result


class OnlineTermCalibrator:
    """Learns a deployment's terms while it serves: one observation per measurement window.

    Each window brings the steps it ran (their sums; at most ``STEPS_PER_WINDOW`` kept, evenly
    spread, each standing for its share of the window's steps), the meter's energy and, where a real
    GPU timed them, the steps' measured time (the window's total, or each step's: then fitted in
    ``TIME_GROUPS`` groups by batch size). After each window the terms are refitted on the last
    ``memory`` windows, newer ones weighing more (``forgetting`` per window), from the previous fit
    and pulled toward the prior. Before refitting, the window is predicted with the terms in force
    (one step ahead) and with the prior: the rolling errors say how much calibration helps. A run of
    ``DRIFT_WINDOWS`` windows off by more than ``DRIFT_ERROR`` in the same direction (a driver or
    clock change) drops the history, so the new regime is learned from its own windows.
    """

    STEPS_PER_WINDOW = 48
    TIME_GROUPS = 4
    DRIFT_WINDOWS = 4
    DRIFT_ERROR = 0.15
    ERROR_WINDOWS = 256  # one-step-ahead errors kept (bounded: a server runs for months)

    def __init__(self, prior: FittedModel, software: str | None = None, memory: int = 30, forgetting: float = 0.9,
                 max_evaluations: int = 200) -> None:  # fmt: skip
        self.prior, self.software = prior, software
        self.memory, self.forgetting, self.max_evaluations = memory, forgetting, max_evaluations
        self.history: list[list[tuple[Observation, float]]] = []  # per window: (observation, weight in it)
        self.result: CalibrationResult | None = None
        # (prior, calibrated) one-step-ahead relative errors of window energy and of measured time
        self.errors: deque[tuple[float, float]] = deque(maxlen=self.ERROR_WINDOWS)
        self.time_errors: deque[tuple[float, float]] = deque(maxlen=self.ERROR_WINDOWS)
        self.windows = 0
        self.resets = 0
        self._drift: deque[float] = deque(maxlen=self.DRIFT_WINDOWS)

    @property
    def model(self) -> CalibratedModel:
        if self.result is None:
            return CalibratedModel(self.prior, self.software)
        return CalibratedModel(self.result.model, self.software, self.result.idle_scale)

    def observe(self, terms: StepTerms, num_gpus: float, step_sums: np.ndarray, measured_energy_j: float | None,
                measured_seconds: float | None = None, idle_seconds: float = 0.0,
                total_steps: int | None = None, step_seconds: np.ndarray | None = None) -> None:  # fmt: skip
        """One closed window: the sums of its steps (SUM_NAMES x steps; ``total_steps`` when these are
        a sample of them), its idle time, and what was measured (energy includes the idle time).
        ``step_seconds``: each of these steps' measured time, where a GPU timed them."""
        steps = step_sums.shape[1]
        if steps == 0 or not (measured_energy_j or measured_seconds):
            return
        keep = np.unique(np.linspace(0, steps - 1, min(steps, self.STEPS_PER_WINDOW)).round().astype(int))
        counts = np.full(len(keep), (total_steps or steps) / len(keep))
        label = f"window {self.windows}"
        observation = Observation(terms, num_gpus, step_sums[:, keep], counts, measured_seconds, measured_energy_j,
                                  idle_seconds, label=label)  # fmt: skip
        self._score(observation)
        window = [(observation, 1.0)]  # (observation, its weight within the window)
        if step_seconds is not None and measured_seconds:
            # The window's time again, by batch size: one total cannot tell a per-sequence cost from
            # a per-step one, steps of different batches can. The groups share the window's weight.
            order = np.argsort(step_sums[0, keep], kind="stable")  # by scheduled sequences
            groups = [g for g in np.array_split(order, self.TIME_GROUPS) if len(g)]
            window = [(observation.energy_only(), 1.0)] + [
                (Observation(terms, num_gpus, step_sums[:, keep[g]], counts[g], float(step_seconds[keep[g]] @ counts[g]),
                             label=f"{label} batch group {i}"), 1.0 / len(groups))
                for i, g in enumerate(groups)
            ]  # fmt: skip
        self.history = [*self.history, window][-self.memory :]
        ages = np.arange(len(self.history))[::-1]
        weighted = [(o, self.forgetting**age * share) for age, window in zip(ages, self.history) for o, share in window]
        self.result = calibrate(self.prior, [o for o, _ in weighted], self.software, start=self.result,
                                weights=[w for _, w in weighted], max_evaluations=self.max_evaluations, robust=True,
                                use_time=True)  # fmt: skip
        self.windows += 1

    def _score(self, observation: Observation) -> None:
        prior_seconds, prior_energy = CalibratedModel(self.prior, self.software).predict(observation)
        seconds, energy = self.model.predict(observation)
        if observation.measured_energy_j:
            measured = observation.measured_energy_j
            self.errors.append((abs(prior_energy / measured - 1), abs(energy / measured - 1)))
            self._drift.append(energy / measured - 1)
        if observation.measured_seconds:
            measured = observation.measured_seconds
            self.time_errors.append((abs(prior_seconds / measured - 1), abs(seconds / measured - 1)))
        recent = self._drift
        if len(recent) == self.DRIFT_WINDOWS and (all(e > self.DRIFT_ERROR for e in recent)
                                                  or all(e < -self.DRIFT_ERROR for e in recent)):  # fmt: skip
            self.history, self.result = [], None
            self._drift.clear()
            self.resets += 1

    def terms(self) -> TermCalibration | None:
        """What was learned, in the calibration file's form (None before the first window)."""
        return None if self.result is None else self.result.terms

    def rolling_error(self, windows: int = 10, signal: str = "energy") -> tuple[float, float]:
        """Mean (prior, calibrated) one-step-ahead relative error over the last windows, of window
        energy or (``signal="time"``) of the measured step time; NaN before any."""
        errors = self.errors if signal == "energy" else self.time_errors
        recent = list(errors)[-windows:]
        if not recent:
            return math.nan, math.nan
        return sum(e[0] for e in recent) / len(recent), sum(e[1] for e in recent) / len(recent)
