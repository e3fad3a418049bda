"""The fitted time and power model: kernel-class efficiencies and overheads learned from measured vLLM serving.

Step time, per GPU (every term from :mod:`llmco2_vllm.predict.step_terms`, seconds at datasheet speed)::

    t = smooth_max(weights_dense, compute_dense) + smooth_max(weights_expert, compute_expert)
        + activation, K/V and Mamba traffic x their factors + attention FLOPs x factor
        + all-reduce (bytes x factor + calls x seconds) + all-to-all (same)
        + blocks x layer_seconds + sequences x sequence_seconds + step_seconds

where each ``weights`` is a factor times the bytes streamed (narrow formats with their own learned
factor: their real, not nominal, speed-up), each ``compute`` a factor times the FLOPs at peak, and
``smooth_max(a, b) = (a^p + b^p)^(1/p)`` joins the memory- and compute-bound regimes of a GEMM
with a learned sharpness ``p``. The dense GEMM efficiencies, the all-reduce costs and the per-step
and per-sequence overheads are learned per vLLM version (the newest measured version stands in for
any other).

Power, per GPU: ``idle + (TDP - idle) x soft_clip(compute_activity x compute utilisation +
memory_activity x memory utilisation + communication_activity x collective share +
quantised_expert_activity x 8-/4-bit expert streaming share + overhead_activity)``, utilisations
being datasheet time over step time (narrow weights counted at the time they take: fused MoE kernels
that dequantise FP8 or MXFP4 experts keep the SMs busy and draw more than their bytes suggest); the
activities are learned per vLLM version; idle is the catalog's measured
idle power where there is one, else a learned fraction of TDP. Energy = power x time.

Fitting (``fit``): log residuals of measured step time, then, with the time parameters fixed, of
measured power and of measured energy (power x the fitted time: the quantity a prediction
multiplies out, so that the power terms also learn what the time terms systematically miss), half
weight each; plus a pull of every parameter toward a physical prior (a ridge in log space, its
weight ``prior_strength`` chosen by inner cross validation among ``PRIOR_STRENGTHS``), within
physical bounds; SciPy's ``least_squares`` (only fitting needs SciPy; prediction needs NumPy alone).
A measured serving row is the mean of its steps, not one mean step: prompts join whole, so most
steps only decode and a few also prefill a prompt (``StepTerms.serving_steps``), and what is not
linear in a step's tokens (the distinct experts they touch, the overlap of memory and compute,
power) is evaluated per step. The shipped parameters
and the cross-validated residual quantiles live in ``data/fitted_model.json`` (``llmco2 eval``
writes them, ``make model`` installs them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from llmco2_vllm.predict.hardware import GpuSpec
from llmco2_vllm.predict.step_shape import StepShape
from llmco2_vllm.predict.step_terms import TERM_INDEX, TERM_NAMES, WEIGHT_CLASSES, StepTerms

if TYPE_CHECKING:
    from llmco2_vllm.predict.predictor import StepPrediction

#: The vLLM version whose overheads stand in for versions never measured (the plugin's own among them).
NEWEST_SOFTWARE = "vllm-0.11.1"


@dataclass(frozen=True)
class Parameter:
    name: str
    prior: float
    low: float
    high: float
    doc: str
    prior_width: float = math.log(3.0)  # one standard deviation of the log-space prior


TIME_PARAMETERS: tuple[Parameter, ...] = (
    Parameter("expert_weight_factor", 1.4, 1.0, 10.0, "routed-expert weight streaming (grouped GEMMs of few tokens)"),
    Parameter("weight_8bit_factor", 1.0, 0.5, 3.0, "8-bit weights: extra time per byte vs 16-bit (dequantise, scales)"),
    Parameter("weight_4bit_factor", 1.0, 0.5, 4.0, "4-bit weights: extra time per byte vs 16-bit"),
    Parameter("expert_compute_factor", 2.0, 1.0, 20.0, "routed-expert GEMMs: measured / peak-FLOPs time"),
    Parameter("compute_8bit_factor", 1.3, 0.5, 3.0, "8-bit GEMMs: extra time vs their datasheet peak, relative to 16-bit"),
    Parameter("overlap_sharpness", 3.0, 1.0, 12.0, "p of the smooth max of memory and compute time", math.log(2.0)),
    Parameter("activation_factor", 1.5, 1.0, 20.0, "non-expert activation traffic: measured / datasheet-bandwidth time"),
    Parameter("expert_activation_factor", 2.0, 1.0, 50.0, "routed-token activation traffic (permute, intermediates)"),
    Parameter("kv_factor", 1.3, 1.0, 10.0, "attention K/V reads: measured / datasheet-bandwidth time"),
    Parameter("attention_compute_factor", 2.0, 1.0, 20.0, "attention FLOPs: measured / peak time"),
    Parameter("mamba_factor", 2.0, 1.0, 50.0, "Mamba-2 state traffic and scan: measured / datasheet time"),
    Parameter("alltoall_bytes_factor", 1.5, 1.0, 20.0, "expert-parallel dispatch/combine bytes: measured / link time"),
    Parameter("alltoall_call_seconds", 30e-6, 1e-6, 2e-3, "fixed cost of one dispatch or combine"),
    Parameter("layer_seconds", 10e-6, 1e-7, 300e-6, "per block and step: kernel launches, graph replay"),
)
#: Learned per vLLM version ("<name>@<software>").
SOFTWARE_PARAMETERS: tuple[Parameter, ...] = (
    Parameter("dense_compute_factor", 1.4, 1.0, 10.0, "non-expert GEMMs: measured / peak-FLOPs time"),
    Parameter("dense_weight_factor", 1.2, 1.0, 5.0, "non-expert weight streaming: measured / datasheet-bandwidth time"),
    Parameter("allreduce_bytes_factor", 1.5, 1.0, 20.0, "all-reduce bytes: measured / link-bandwidth time"),
    Parameter("allreduce_call_seconds", 10e-6, 1e-6, 300e-6, "fixed cost of one all-reduce call"),
    Parameter("sequence_seconds", 20e-6, 1e-7, 1e-3, "per scheduled sequence and step: input preparation, sampling"),
    Parameter("step_seconds", 2e-3, 1e-5, 0.05, "per step: scheduling, synchronisation, launch"),
)
POWER_PARAMETERS: tuple[Parameter, ...] = (
    Parameter("idle_fraction", 0.175, 0.05, 0.4, "idle power / TDP where the catalog has no measured idle power"),
    Parameter("quantised_expert_activity", 0.3, 1e-3, 3.0,
              "extra dynamic power share while fused MoE kernels stream and dequantise 8-/4-bit experts"),
)
#: Learned per vLLM version: how busy a version's kernels keep the GPU at a given utilisation.
SOFTWARE_POWER_PARAMETERS: tuple[Parameter, ...] = (
    Parameter("overhead_activity", 0.1, 1e-3, 1.0, "dynamic power share of a busy GPU at no utilisation (clocks up, host-bound gaps)"),
    Parameter("communication_activity", 0.2, 1e-3, 1.5, "dynamic power share during collectives and their waits"),
    Parameter("compute_activity", 1.0, 0.05, 3.0, "dynamic power share at 100 % of datasheet FLOP/s"),
    Parameter("memory_activity", 0.6, 0.05, 3.0, "dynamic power share at 100 % of datasheet memory bandwidth"),
)


#: Terms a deployment's measurements calibrate (``term_calibration``; names without "@version").
CALIBRATED_TIME_TERMS = (
    "dense_weight_factor", "dense_compute_factor", "expert_weight_factor", "expert_compute_factor",
    "activation_factor", "expert_activation_factor", "kv_factor", "attention_compute_factor", "mamba_factor",
    "allreduce_bytes_factor", "allreduce_call_seconds", "alltoall_bytes_factor", "alltoall_call_seconds",
    "layer_seconds", "sequence_seconds", "step_seconds",
)  # fmt: skip
#: ``idle_scale`` multiplies the GPU's idle power.
CALIBRATED_POWER_TERMS = ("idle_scale", "overhead_activity", "communication_activity", "compute_activity", "memory_activity")

#: The parts of a step's time (``FittedModel.linear_map``).
PARTS = (
    "dense_weights", "dense_compute", "expert_weights", "expert_compute", "memory", "attention",
    "communication", "overhead", "datasheet_compute", "datasheet_memory", "narrow_expert_weights",
)  # fmt: skip


_SOFTWARE_POWER_NAMES = tuple(p.name for p in SOFTWARE_POWER_PARAMETERS)

#: One standard deviation (log) of a model's own offset from the fitted model, split evenly between
#: its time and its power: the fitted model's held-out-model energy error is about 14 % (``llmco2 eval``).
MODEL_FACTOR_WIDTH = math.log(1.15) / math.sqrt(2.0)
MODEL_FACTOR_BOUNDS = (1 / 3, 3.0)
#: A measured model's own energy offset from the shared fit: one standard deviation (log) of the pull
#: toward none (``fit``), and how far one measured row scatters around it.
MODEL_ENERGY_WIDTH = math.log(1.15)
MODEL_ROW_NOISE = 0.07


def factors_for(factors: dict[str, tuple[float, float]], name: str) -> tuple[float, float] | None:
    """A model's entry in ``model_factors``: by its exact name, else by its last path component,
    case aside, where exactly one entry has it (``vllm serve /models/Llama-3.1-8B-Instruct`` is
    ``meta-llama/Llama-3.1-8B-Instruct``)."""
    if name in factors:
        return factors[name]
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    matches = [value for known, value in factors.items() if known.rsplit("/", 1)[-1].lower() == base]
    return matches[0] if len(matches) == 1 else None


def _soft_clip(x: np.ndarray) -> np.ndarray:
    """~x below 1, saturating at 1 (a GPU cannot draw more than its power limit)."""
    return x / (1.0 + x**4) ** 0.25


@dataclass
class FittedModel:
    """Fitted parameters, with the software versions they cover and the cross-validated error band."""

    parameters: dict[str, float]
    software: tuple[str, ...] = (NEWEST_SOFTWARE,)
    #: quantiles (10 %, 50 %, 90 %) of log(measured / predicted) energy in cross-validation by held-out model
    energy_log_quantiles: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: dict[str, Any] = field(default_factory=dict)
    #: model name -> (time factor, power factor): what each measured model needs beyond the shared
    #: parameters (``fit``), applied to that model on any GPU (``for_model``)
    model_factors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def for_model(self, name: str, factors: tuple[float, float] | None = None) -> "FittedModel":
        """The parameters for one model: with its factors (``factors``, else its own measured ones)
        folded in, and no factors left to fold in again."""
        time_factor, power_factor = factors or factors_for(self.model_factors, name) or (1.0, 1.0)
        if time_factor == power_factor == 1.0 and not self.model_factors:
            return self  # nothing to fold in (the online learner's solver asks at every evaluation)
        parameters = dict(self.parameters)
        if time_factor != 1.0 or power_factor != 1.0:
            # Every time term scales the step time (each part is linear in them, their combination
            # homogeneous); the activities scale the dynamic power (before the power limit's saturation).
            time_keys = {key for version in self.software for key in self.parameter_keys(CALIBRATED_TIME_TERMS, version)}
            power_keys = {f"{activity}@{version}" for version in self.software for activity in _SOFTWARE_POWER_NAMES}
            for key in time_keys:
                parameters[key] *= time_factor
            for key in (*power_keys, "quantised_expert_activity"):
                parameters[key] *= power_factor
        return dataclasses.replace(self, parameters=parameters, model_factors={})

    # --- prediction -----------------------------------------------------------------------
    def _software(self, software: str | None) -> str:
        return software if software in self.software else (NEWEST_SOFTWARE if NEWEST_SOFTWARE in self.software else self.software[-1])

    def linear_map(self, software: str | None = None) -> np.ndarray:
        """(PARTS x terms): the parts of a step's time are linear in its terms (``combine`` joins them)."""
        p = self.parameters
        version = self._software(software)
        i = TERM_INDEX
        matrix = np.zeros((len(PARTS), len(TERM_NAMES)))
        weight_factor = (1.0, p["weight_8bit_factor"], p["weight_4bit_factor"])
        for column, factor in enumerate(weight_factor):
            matrix[0, column] = p[f"dense_weight_factor@{version}"] * factor
            matrix[2, 3 + column] = p["expert_weight_factor"] * factor
            # Narrow weights keep the SMs dequantising while they stream: for power their bytes count
            # at the time they take relative to 16-bit ones.
            matrix[9, column] = matrix[9, 3 + column] = factor
            if column:  # routed experts in 8- or 4-bit: fused dequantising MoE kernels (their power below)
                matrix[10, 3 + column] = factor
        for row, (kind, factor) in ((1, ("dense", f"dense_compute_factor@{version}")), (3, ("expert", "expert_compute_factor"))):
            matrix[row, i[f"{kind}_compute_16bit"]] = p[factor]
            matrix[row, i[f"{kind}_compute_8bit"]] = p[factor] * p["compute_8bit_factor"]
            matrix[8, i[f"{kind}_compute_16bit"]] = matrix[8, i[f"{kind}_compute_8bit"]] = 1.0
        for term, factor in (("activations", "activation_factor"), ("expert_activations", "expert_activation_factor"),
                             ("kv_read", "kv_factor"), ("mamba", "mamba_factor")):  # fmt: skip
            matrix[4, i[term]] = p[factor]
            matrix[9, i[term]] = 1.0
        matrix[5, i["attention_compute"]] = p["attention_compute_factor"]
        matrix[8, i["attention_compute"]] = 1.0
        matrix[6, i["allreduce_bytes"]] = p[f"allreduce_bytes_factor@{version}"]
        matrix[6, i["allreduce_calls"]] = p[f"allreduce_call_seconds@{version}"]
        matrix[6, i["alltoall_bytes"]] = p["alltoall_bytes_factor"]
        matrix[6, i["alltoall_calls"]] = p["alltoall_call_seconds"]
        matrix[7, i["layers"]] = p["layer_seconds"]
        matrix[7, i["sequences"]] = p[f"sequence_seconds@{version}"]
        matrix[7, i["step"]] = p[f"step_seconds@{version}"]
        return matrix

    def combine(self, parts: np.ndarray) -> tuple[np.ndarray, ...]:
        """(seconds, datasheet compute seconds, datasheet memory seconds, communication seconds,
        8-/4-bit expert streaming seconds) from ``linear_map @ terms``: the arguments of
        ``power_watts``. The datasheet times over the step time are its utilisations."""
        p = self.parameters["overlap_sharpness"]
        # parts: an array (rows on axis 1) or a list of floats (one step)
        dense = (parts[0] ** p + parts[1] ** p) ** (1.0 / p)
        expert = (parts[2] ** p + parts[3] ** p) ** (1.0 / p)
        seconds = dense + expert + parts[4] + parts[5] + parts[6] + parts[7]
        return seconds, parts[8], parts[9], parts[6], parts[10]

    def time_parts(self, terms: np.ndarray, software: str | None = None) -> tuple[np.ndarray, ...]:
        """``combine`` of steps with these terms (axis 0)."""
        return self.combine(np.tensordot(self.linear_map(software), terms, axes=1))

    def step_seconds(self, terms: np.ndarray, software: str | None = None) -> np.ndarray:
        return self.time_parts(terms, software)[0]

    def idle_watts(self, gpu: GpuSpec) -> float:
        return gpu.idle_watts if gpu.idle_watts is not None else self.parameters["idle_fraction"] * gpu.tdp_watts

    def power_watts(
        self, gpu: GpuSpec, seconds: np.ndarray, compute: np.ndarray, memory: np.ndarray, communication: np.ndarray,
        narrow_experts: np.ndarray | float = 0.0, software: str | None = None,
    ) -> np.ndarray:
        """Average power of one GPU over steps with these time parts (``time_parts``): idle power plus
        dynamic power driven by the compute and memory utilisation and the share of time in collectives."""
        version = self._software(software)
        p = {name: self.parameters[f"{name}@{version}"] for name in _SOFTWARE_POWER_NAMES}
        idle = self.idle_watts(gpu)
        # Plain arithmetic, so that floats (the plugin's per-step path) and arrays (fitting) both work.
        busy = seconds > 0
        per_second = busy / (seconds + (1 - busy))  # 1 / seconds, 0 for an empty step
        activity = (
            p["compute_activity"] * compute + p["memory_activity"] * memory + p["communication_activity"] * communication
            + self.parameters["quantised_expert_activity"] * narrow_experts
        ) * per_second + p["overhead_activity"] * busy  # fmt: skip
        return idle + (gpu.tdp_watts - idle) * _soft_clip(activity)

    def parameter_keys(self, names: Sequence[str], software: str | None = None) -> list[str]:
        """The keys of these parameter names (per-version ones carry "@software"); ``idle_scale`` stays."""
        version = self._software(software)
        keys = []
        for name in names:
            if name == "idle_scale" or name in self.parameters:
                keys.append(name)
            elif f"{name}@{version}" in self.parameters:
                keys.append(f"{name}@{version}")
        return keys

    # --- persistence --------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "parameters": self.parameters, "software": list(self.software),
            "energy_log_quantiles": list(self.energy_log_quantiles), "notes": self.notes,
            "model_factors": {name: {"time": t, "power": p} for name, (t, p) in self.model_factors.items()},
        }, indent=1, sort_keys=True)  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> "FittedModel":
        """Parse and check a model file: every parameter the code needs must be there."""
        data = json.loads(text)
        software = tuple(data["software"])
        needed = {p.name for p in _parameter_table(software)} | {
            p.name for p in _parameter_table(software, POWER_PARAMETERS, SOFTWARE_POWER_PARAMETERS)
        }
        missing = sorted(needed - set(data["parameters"]))
        if missing:
            raise ValueError(
                f"fitted model file lacks parameters {', '.join(missing[:5])}: it was written by another version of "
                "llmco2-vllm; regenerate it with `make model` (llmco2 eval)"
            )
        return cls(
            parameters={k: float(v) for k, v in data["parameters"].items()},
            software=software,
            energy_log_quantiles=tuple(float(q) for q in data["energy_log_quantiles"]),  # type: ignore[arg-type]
            notes=dict(data.get("notes") or {}),
            model_factors={name: (float(f["time"]), float(f["power"])) for name, f in (data.get("model_factors") or {}).items()},
        )


@functools.cache
def shipped_model() -> FittedModel:
    """The parameters fitted on every measured row (``data/fitted_model.json``)."""
    text = resources.files("llmco2_vllm").joinpath("data/fitted_model.json").read_text(encoding="utf-8")
    return FittedModel.from_json(text)


# --- fitting -----------------------------------------------------------------------------------


def _parameter_table(software: Sequence[str], common: Sequence[Parameter] = TIME_PARAMETERS,
                     per_version: Sequence[Parameter] = SOFTWARE_PARAMETERS) -> list[Parameter]:  # fmt: skip
    table = list(common)
    for version in software:
        table += [Parameter(f"{p.name}@{version}", p.prior, p.low, p.high, p.doc, p.prior_width) for p in per_version]
    return table


def prior_model(software: Sequence[str] = (NEWEST_SOFTWARE,)) -> FittedModel:
    """The model at its priors (no data): what the fit starts from and is pulled toward."""
    parameters = {p.name: p.prior for p in _parameter_table(software)}
    parameters.update({p.name: p.prior for p in _parameter_table(software, POWER_PARAMETERS, SOFTWARE_POWER_PARAMETERS)})
    return FittedModel(parameters, tuple(software))


@dataclass(frozen=True)
class FitRow:
    """What fitting needs of one measured row: its mean-step terms and the measured values."""

    terms: np.ndarray  # TERM_NAMES
    software: str
    gpu: GpuSpec
    step_seconds: float
    power_watts_per_gpu: float
    weight: float = 1.0
    #: The steps the measured mean is over (TERM_NAMES x steps) and their shares of the steps
    #: (``StepTerms.serving_steps``); None: the one step ``terms``.
    step_terms: np.ndarray | None = None
    step_weights: np.ndarray | None = None
    model: str = ""  # the model's name: its own factors are learned from its rows ("" : none)

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """(terms x steps, shares of the steps)."""
        if self.step_terms is None:
            return self.terms[:, None], np.ones(1)
        return self.step_terms, self.step_weights  # type: ignore[return-value]


_HALF = math.sqrt(0.5)

#: Candidate weights of the pull toward the physical priors (``fit``), one chosen by inner cross
#: validation (``serving_evaluation.select_prior_strength``); the shipped model's choice is in its notes.
PRIOR_STRENGTHS = (0.03, 0.1, 0.3, 1.0)
DEFAULT_PRIOR_STRENGTH = 1.0


def fit(rows: Sequence[FitRow], prior_strength: float = DEFAULT_PRIOR_STRENGTH, model_factors: bool = True) -> FittedModel:
    """Fit time parameters on the rows' step times, then power parameters on their power and, given
    the fitted time, their energy (half each). A row with several steps (``FitRow.steps``) is
    predicted as their mean: time weighted by their shares, power by their time. Then, with
    ``model_factors``, each model's own factors (``FittedModel.model_factors``)."""
    from scipy.optimize import least_squares

    software = tuple(sorted({row.software for row in rows}))
    model = prior_model(software)
    # Every row's steps as columns: a row's measured step time is its steps' weighted mean.
    steps = [row.steps() for row in rows]
    terms = np.concatenate([step_terms for step_terms, _ in steps], axis=1)
    shares = np.concatenate([step_shares for _, step_shares in steps])
    owner = np.repeat(np.arange(len(rows)), [len(step_shares) for _, step_shares in steps])
    measured_seconds = np.array([row.step_seconds for row in rows])
    weights = np.sqrt(np.array([row.weight for row in rows]))
    groups: dict[str, list[int]] = {}
    for index in range(len(owner)):
        groups.setdefault(rows[owner[index]].software, []).append(index)

    def mean_over_steps(values: np.ndarray) -> np.ndarray:
        return np.bincount(owner, shares * values, minlength=len(rows))

    table = _parameter_table(software)
    names = [p.name for p in table]
    prior = np.log([p.prior for p in table])
    widths = np.array([p.prior_width for p in table])
    low, high = np.log([p.low for p in table]), np.log([p.high for p in table])
    scale = math.sqrt(prior_strength)

    def time_residuals(x: np.ndarray) -> np.ndarray:
        model.parameters.update(zip(names, np.exp(x)))
        predicted = np.empty(len(owner))
        for version, index in groups.items():
            predicted[index] = model.step_seconds(terms[:, index], version)
        predicted = mean_over_steps(predicted)
        return np.concatenate([weights * np.log(predicted / measured_seconds), scale * (x - prior) / widths])

    solution = least_squares(time_residuals, np.clip(prior, low, high), bounds=(low, high), method="trf", x_scale=1.0)
    model.parameters.update(zip(names, np.exp(solution.x)))

    parts = np.empty((5, len(owner)))
    for version, index in groups.items():
        parts[:, index] = np.array(model.time_parts(terms[:, index], version))
    row_seconds = mean_over_steps(parts[0])
    seconds_over_measured = row_seconds / measured_seconds
    measured_power = np.array([row.power_watts_per_gpu for row in rows])
    power_table = _parameter_table(software, POWER_PARAMETERS, SOFTWARE_POWER_PARAMETERS)
    power_names = [p.name for p in power_table]
    power_prior = np.log([p.prior for p in power_table])
    power_widths = np.array([p.prior_width for p in power_table])
    power_low, power_high = np.log([p.low for p in power_table]), np.log([p.high for p in power_table])

    by_gpu_and_version: dict[tuple[str, str], list[int]] = {}
    for index in range(len(owner)):
        row = rows[owner[index]]
        by_gpu_and_version.setdefault((row.gpu.name, row.software), []).append(index)
    gpu_of = {row.gpu.name: row.gpu for row in rows}

    def power_residuals(x: np.ndarray) -> np.ndarray:
        model.parameters.update(zip(power_names, np.exp(x)))
        predicted = np.empty(len(owner))
        for (gpu, version), index in by_gpu_and_version.items():
            predicted[index] = model.power_watts(gpu_of[gpu], *parts[:, index], software=version)
        # A row's average power: its steps' energy over their time.
        predicted = mean_over_steps(predicted * parts[0]) / row_seconds
        # Power, and energy given the fitted time (what a prediction multiplies), weigh half each.
        return np.concatenate([weights * np.log(predicted / measured_power) * _HALF,
                               weights * np.log(predicted * seconds_over_measured / measured_power) * _HALF,
                               scale * (x - power_prior) / power_widths])  # fmt: skip

    solution = least_squares(power_residuals, power_prior, bounds=(power_low, power_high), method="trf")
    model.parameters.update(zip(power_names, np.exp(solution.x)))
    if model_factors:
        model.model_factors = _model_factors(model, rows)
    return model


def _model_factors(model: FittedModel, rows: Sequence[FitRow]) -> dict[str, tuple[float, float]]:
    """Each measured model's own factors: the power factor its rows' energy needs beyond the shared
    parameters, pulled toward no change in energy (``MODEL_ENERGY_WIDTH``; rows scatter by
    ``MODEL_ROW_NOISE``); its time factor stays 1.

    Only the energy offset carries over to GPUs a fit did not see: on the ML.ENERGY v2 rows, a
    model's median offset from a fit without A100 rows, on H100 and on A100, correlates 0.73 in
    energy but 0.31 in step time and 0.28 in power (a model slower than the fit expects also draws
    less power), and likewise the other way round (0.71, 0.25, 0.34; ``benchmarks/model_offset_transfer.py``)."""
    by_model: dict[str, list[FitRow]] = {}
    for row in rows:
        if row.model:
            by_model.setdefault(row.model, []).append(row)
    return {name: (1.0, _power_factor(model, own)) for name, own in sorted(by_model.items())}


def _power_factor(model: FittedModel, rows: Sequence[FitRow]) -> float:
    """The power factor that brings these rows' predicted energy to their measured energy, with a
    pull of ``MODEL_ENERGY_WIDTH`` on the energy change it makes (``_model_factors``)."""
    from scipy.optimize import least_squares

    measured = np.log([row.power_watts_per_gpu * row.step_seconds for row in rows])
    shared = np.log(np.multiply(*_predict_rows(model, rows)))

    def residuals(x: np.ndarray) -> np.ndarray:
        energy = np.log(np.multiply(*_predict_rows(model.for_model("", (1.0, math.exp(x[0]))), rows)))
        return np.concatenate([(energy - measured) / MODEL_ROW_NOISE, [np.mean(energy - shared) / MODEL_ENERGY_WIDTH]])

    bounds = np.log(MODEL_FACTOR_BOUNDS)
    return float(math.exp(least_squares(residuals, np.zeros(1), bounds=(bounds[0], bounds[1]), method="trf").x[0]))


def _predict_rows(model: FittedModel, rows: Sequence[FitRow]) -> tuple[np.ndarray, np.ndarray]:
    """(mean step seconds, average power per GPU) of fit rows: the mean over each row's steps
    (time-weighted for power), the steps of rows on the same GPU and version evaluated at once."""
    steps = [row.steps() for row in rows]
    owner = np.repeat(np.arange(len(rows)), [len(shares) for _, shares in steps])
    terms = np.concatenate([step_terms for step_terms, _ in steps], axis=1)
    shares = np.concatenate([step_shares for _, step_shares in steps])
    seconds, energy = np.empty(len(owner)), np.empty(len(owner))
    groups: dict[tuple[str, str], list[int]] = {}
    for index in range(len(owner)):
        row = rows[owner[index]]
        groups.setdefault((row.gpu.name, row.software), []).append(index)
    for index in groups.values():
        row = rows[owner[index[0]]]
        parts = model.time_parts(terms[:, index], row.software)
        seconds[index] = parts[0]
        energy[index] = model.power_watts(row.gpu, *parts, software=row.software) * parts[0]
    row_seconds = np.bincount(owner, shares * seconds, minlength=len(rows))
    return row_seconds, np.bincount(owner, shares * energy, minlength=len(rows)) / row_seconds


# --- predictions for serving rows --------------------------------------------------------------


def fit_row(measurement: Any, describe, prompt_scale: float = 1.0) -> FitRow:
    """The mean step of a measured serving row (``serving_measurements.ServingMeasurement``) as a ``FitRow``."""
    step_terms, shares = serving_steps(measurement, describe, prompt_scale)
    return FitRow(
        terms=step_terms @ shares, software=measurement.software, gpu=_gpu(measurement.gpu),
        step_seconds=measurement.step_seconds, power_watts_per_gpu=measurement.power_watts / measurement.num_gpus,
        step_terms=step_terms, step_weights=shares, model=measurement.model,
    )  # fmt: skip


def _gpu(name: str) -> GpuSpec:
    from llmco2_vllm.predict.hardware import find_gpu

    return find_gpu(name)


def serving_steps(measurement: Any, describe, prompt_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(terms x steps, shares) of the steps of steady-state serving for a measured row's configuration
    (``StepTerms.serving_steps``)."""
    builder = StepTerms(
        describe(measurement.model), _gpu(measurement.gpu), measurement.tensor_parallel,
        measurement.data_parallel, measurement.expert_parallel,
    )  # fmt: skip
    # Pipeline stages each hold a micro-batch: a request advances one token per pass of all stages.
    micro_batch = measurement.batch_size / measurement.pipeline_parallel
    sums, shares = builder.serving_steps(
        micro_batch, measurement.prompt_tokens * prompt_scale, measurement.output_tokens, measurement.running_age_tokens
    )
    return builder.from_sums(sums), shares


def serving_terms(measurement: Any, describe, prompt_scale: float = 1.0) -> np.ndarray:
    """Terms of the mean step of steady-state serving for a measured row's configuration (the steps'
    mean: exact for the terms linear in the step's sums)."""
    step_terms, shares = serving_steps(measurement, describe, prompt_scale)
    return step_terms @ shares


def predict_serving(model: FittedModel, rows: Sequence[FitRow], measurements: Sequence[Any]) -> dict[str, np.ndarray]:
    """Predicted step seconds, power (all GPUs) and energy per request of measured serving rows: the
    mean over each row's steps (time-weighted for power)."""
    seconds, power = np.empty(len(rows)), np.empty(len(rows))
    by_model: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_model.setdefault(row.model, []).append(index)
    for name, index in by_model.items():  # each with its model's own factors, where the fit had its rows
        seconds[index], power[index] = _predict_rows(model.for_model(name), [rows[i] for i in index])
    power *= np.array([m.num_gpus for m in measurements])
    batch = np.array([m.batch_size for m in measurements])
    output = np.array([m.output_tokens for m in measurements])
    # With pipeline stages every stage works on its own micro-batch: batch tokens per full pass.
    energy_per_token = power * seconds / batch
    return {"step_seconds": seconds, "power_watts": power, "energy_per_request_j": energy_per_token * output}


# --- the plugin's predictor ----------------------------------------------------------------------


class FittedPredictor:
    """Step time and energy from the fitted model (``LLMCO2_PREDICTOR=fitted``, the default).

    The fitted model gives a step's total time and energy; the roofline splits them into the prefill
    and decode parts and over the step's requests (its per-phase and per-request work shares).
    Energy is the model's median: the raw prediction times the cross-validated median ratio.
    ``ratio_range`` is the 80 % band of measured / predicted around that median, wider for a model
    whose architecture is only approximated (``ModelDescription.approximation``).
    """

    name = "fitted"

    def __init__(
        self, model: Any, hardware: Any, pipeline_parallel: int = 1, parameters: FittedModel | None = None,
        terms: Any = None,
    ) -> None:
        """``terms``: a ``term_calibration.TermCalibration`` of this deployment (``llmco2 calibrate``)."""
        from llmco2_vllm.predict.roofline import Roofline

        base = parameters or shipped_model()
        self.gpu = hardware.gpu
        # With the model's own factors: calibrated for it in the file, else measured in the fit.
        calibrated = base if terms is None else terms.apply(base)
        self.parameters = calibrated.for_model(model.name, None if terms is None else factors_for(terms.model_factors, model.name))
        if terms is not None:
            self.gpu = dataclasses.replace(self.gpu, idle_watts=self.parameters.idle_watts(self.gpu) * terms.idle_scale)
            self.name = "fitted+terms"
        self.num_gpus = hardware.num_gpus
        self.terms = StepTerms(model, hardware.gpu, hardware.tensor_parallel)
        self.shipped = base.for_model(model.name)
        self.last_step_sums: np.ndarray | None = None  # the sums of the step predicted last (online learning)
        self._use(self.parameters)
        self.roofline = Roofline(model, hardware, pipeline_parallel=pipeline_parallel)
        low, middle, high = self.parameters.energy_log_quantiles
        self.median_factor = math.exp(middle)
        widen = APPROXIMATION_WIDENING if model.approximation else 1.0
        self.ratio_range = (math.exp((low - middle) * widen), math.exp((high - middle) * widen))

    def _use(self, parameters: FittedModel) -> None:
        self.parameters = parameters
        # Sums -> parts of the step time in one small matrix product (per step: ~10 x 9).
        linear = parameters.linear_map()
        self._parts_of_basis = linear @ self.terms.matrix
        # The step's fixed costs, what it costs whatever tokens its sequences schedule: streaming the
        # dense weights once (the smooth max's value without compute), scheduling, launches and
        # synchronisation, input preparation and sampling per scheduled sequence (the same for
        # each) and each collective call's fixed cost. Rows: their seconds, the collective calls'
        # seconds and the dense weights' datasheet memory seconds (for their power) among them.
        communication, dense = PARTS.index("communication"), PARTS.index("dense_weights")
        calls, weights = np.zeros_like(linear), np.zeros_like(linear)
        for term in ("allreduce_calls", "alltoall_calls"):
            calls[communication, TERM_INDEX[term]] = linear[communication, TERM_INDEX[term]]
        for weight_class_name in WEIGHT_CLASSES:
            column = TERM_INDEX[f"dense_weights_{weight_class_name}"]
            weights[PARTS.index("datasheet_memory"), column] = linear[PARTS.index("datasheet_memory"), column]
        calls_of_basis = (calls @ self.terms.matrix)[communication]
        weights_of_basis = (weights @ self.terms.matrix)[PARTS.index("datasheet_memory")]
        fixed_of_basis = self._parts_of_basis[PARTS.index("overhead")] + calls_of_basis + self._parts_of_basis[dense]
        self._fixed_of_basis = np.stack([fixed_of_basis, calls_of_basis, weights_of_basis])
        version = parameters._software(None)
        activity = [parameters.parameters[f"{name}@{version}"] for name in _SOFTWARE_POWER_NAMES]
        idle = parameters.idle_watts(self.gpu)
        # (idle W, dynamic W, overhead, communication, compute, memory, 8-/4-bit expert activity)
        self._power_terms = (idle, self.gpu.tdp_watts - idle, *activity, parameters.parameters["quantised_expert_activity"])

    def use_terms(self, model: FittedModel, idle_watts: float) -> None:
        """Predict with learned terms from now on (``idle_watts``: one GPU's idle power)."""
        self.gpu = dataclasses.replace(self.gpu, idle_watts=idle_watts)
        self._use(model)

    def term_ratios(self) -> dict[str, float]:
        """Each calibrated term in force over its shipped value (1 where nothing was calibrated)."""
        keys = self.parameters.parameter_keys(CALIBRATED_TIME_TERMS + CALIBRATED_POWER_TERMS)
        ratios = {key.split("@")[0]: self.parameters.parameters[key] / self.shipped.parameters[key]
                  for key in keys if key != "idle_scale"}  # fmt: skip
        ratios["idle_scale"] = self.parameters.idle_watts(self.gpu) / self.shipped.idle_watts(self.terms.gpu)
        return ratios

    def step_seconds_and_energy(self, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(seconds, energy J of all GPUs) of steps with these sums (``SUM_NAMES`` on axis 0)."""
        return self._totals(self._parts_of_basis @ self.terms.basis(sums))

    def _totals(self, linear_parts):
        """(seconds, energy) from ``linear_map @ terms``: arrays, or, for one step, a list of floats
        (plain float arithmetic is several times faster than NumPy on scalars: the per-step path)."""
        parts = self.parameters.combine(linear_parts)
        power = self.parameters.power_watts(self.gpu, *parts) * self.num_gpus
        return parts[0], power * parts[0] * self.median_factor

    def _fixed_fraction(self, parts: Sequence[Any], fixed_seconds: Any, call_seconds: Any, weight_seconds: Any) -> Any:
        """The share of a step's energy its fixed costs take (``parts``: ``combine``'s; floats for one
        step, arrays for several).

        Their part of the power model's own sum: idle power over their time plus the dynamic power
        their activity adds (overhead activity over their time, communication activity over the
        collective calls' time, memory activity over the weights' datasheet time), saturated like
        all dynamic power. Exact where power is linear; at most 1.
        """
        seconds, compute, memory, communication, narrow = parts
        idle, dynamic, overhead, communication_activity, compute_activity, memory_activity, narrow_activity = self._power_terms
        busy = seconds > 0
        per_second = busy / (seconds + (1 - busy))  # 1 / seconds, 0 for an empty step
        activity = (compute_activity * compute + memory_activity * memory + communication_activity * communication
                    + narrow_activity * narrow) * per_second + overhead  # fmt: skip
        per_activity = dynamic / (1.0 + activity**4) ** 0.25  # _soft_clip(a) / a
        total = idle * seconds + per_activity * activity * seconds
        fixed = idle * fixed_seconds + per_activity * (
            overhead * fixed_seconds + communication_activity * call_seconds + memory_activity * weight_seconds
        )
        return np.minimum(1.0, fixed * busy / (total + (1 - busy)))

    def fixed_step_cost(self, sums: np.ndarray) -> tuple[float, float]:
        """(seconds, J of all GPUs) of the fixed costs of one step with these sums (``SUM_NAMES``)."""
        basis = self.terms.basis(np.asarray(sums, dtype=np.float64))
        parts = self.parameters.combine((self._parts_of_basis @ basis).tolist())
        power = self.parameters.power_watts(self.gpu, *parts) * self.num_gpus
        fixed_seconds, call_seconds, weight_seconds = (self._fixed_of_basis @ basis).tolist()
        energy = power * parts[0] * self.median_factor
        return fixed_seconds, energy * self._fixed_fraction(parts, fixed_seconds, call_seconds, weight_seconds)

    def predict_step(self, step: StepShape) -> "StepPrediction":
        from llmco2_vllm.predict.predictor import StepPrediction

        # The roofline's per-row basis gives the step's sums too (its rows: tokens, context of working
        # rows, tokens x context, tokens^2, logit rows, then the sliding-window keys and K/V).
        basis, phase_sums = self.roofline.phase_basis(step)
        total = phase_sums.sum(axis=1).tolist()
        n = basis.shape[1] // 2
        request_tokens = basis[0, :n] + basis[0, n:]  # each request's prefill and decode tokens
        sequences = float(np.count_nonzero(request_tokens))
        tokens = total[0]
        sums = [sequences, tokens, total[4], total[1] + tokens, 0.0, total[2] + (total[3] + tokens) / 2, 0.0]
        if self.terms.sliding_layers and self.terms.window:
            sums[4], sums[6] = total[6], total[5]
        step_basis = self.terms.step_basis(sums)
        self.last_step_sums = step_basis[: len(sums)]
        parts = self.parameters.combine((self._parts_of_basis @ step_basis).tolist())
        t = parts[0]
        e = self.parameters.power_watts(self.gpu, *parts) * self.num_gpus * t * self.median_factor
        prefill_s, decode_s, prefill_j, decode_j, prefill_w, decode_w = self.roofline.phases_from_basis(basis, phase_sums)
        time_share = prefill_s / (prefill_s + decode_s) if prefill_s + decode_s > 0 else 0.0
        energy_share = prefill_j / (prefill_j + decode_j) if prefill_j + decode_j > 0 else 0.0
        fixed_s, call_s, weight_s = (self._fixed_of_basis @ step_basis).tolist()
        fixed_j = e * self._fixed_fraction(parts, fixed_s, call_s, weight_s)
        # The work (what tokens add) splits by the roofline's phase and per-request work shares; the
        # fixed costs equally among the scheduled sequences, since none of them depends on how many
        # tokens a sequence scheduled (a sequence with both phases' tokens splits its share by them).
        work_s, work_j = t - fixed_s, e - fixed_j
        np.maximum(request_tokens, 1.0, out=request_tokens)
        request_tokens *= max(sequences, 1.0)
        per_sequence = basis[0, :n] / request_tokens  # each scheduled sequence's prefill part of 1 / sequences
        decode_per_sequence = basis[0, n:] / request_tokens
        # The prefill phase's share of the fixed costs, in [0, 1]: its float sum can round just past 1
        # in a prefill-only step, which made the decode phase a tiny negative energy and time (and a
        # counter increment Prometheus refuses).
        prefill_sequences = min(1.0, float(per_sequence.sum()))
        prefill_total_j = max(0.0, work_j * energy_share + fixed_j * prefill_sequences)
        decode_total_j = max(0.0, work_j * (1.0 - energy_share) + fixed_j * (1.0 - prefill_sequences))
        if prefill_total_j > 0:
            prefill_w = (work_j * energy_share * prefill_w + fixed_j * per_sequence) / prefill_total_j
        if decode_total_j > 0:
            decode_w = (work_j * (1.0 - energy_share) * decode_w + fixed_j * decode_per_sequence) / decode_total_j
        return StepPrediction(
            max(0.0, work_s * time_share + fixed_s * prefill_sequences),
            max(0.0, work_s * (1.0 - time_share) + fixed_s * (1.0 - prefill_sequences)),
            prefill_total_j,
            decode_total_j,
            prefill_w,
            decode_w,
        )

    def static_batch(self, batch_size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float, float, float]:
        """(prefill_seconds, prefill_j, decode_seconds, decode_j) of a static batch (``static_batches``)."""
        return self.static_batches([(batch_size, prompt_tokens, output_tokens)])[0]

    def static_batches(self, shapes: Sequence[tuple[int, int, int]]) -> list[tuple[float, float, float, float]]:
        """``static_batch`` of several (batch, prompt, output) shapes in one array evaluation (a
        request forecast needs up to six). Each batch is its prefill step and its decode steps,
        evaluated at ``STATIC_BATCH_SAMPLES`` contexts and summed with the trapezoid rule: step time
        is linear in the context (kinked where a sliding window fills) and energy nearly so."""
        return self._static_batches(shapes, False)  # type: ignore[return-value]

    def static_batches_with_fixed(self, shapes: Sequence[tuple[int, int, int]]) -> list[tuple[float, ...]]:
        """``static_batches``, each with the fixed costs (seconds, J: ``fixed_step_cost``) of one step
        of the whole batch at the prompt's context (its first decode step; its prefill step without
        one): what each further step the batch runs adds to be shared equally (chunked prefill)."""
        return self._static_batches(shapes, True)

    def _static_batches(self, shapes: Sequence[tuple[int, int, int]], with_fixed: bool) -> list[tuple[float, ...]]:
        columns = [self.terms.static_batch_sums(batch, prompt, output, STATIC_BATCH_SAMPLES) for batch, prompt, output in shapes]
        basis = self.terms.basis(np.concatenate([sums for sums, _ in columns], axis=1))
        parts = self.parameters.combine(self._parts_of_basis @ basis)
        seconds = parts[0]
        energy = self.parameters.power_watts(self.gpu, *parts) * self.num_gpus * seconds * self.median_factor
        if with_fixed:
            fixed_seconds, call_seconds, weight_seconds = self._fixed_of_basis @ basis
            fixed_j = energy * self._fixed_fraction(parts, fixed_seconds, call_seconds, weight_seconds)
        results: list[tuple[float, ...]] = []
        start = 0
        for _, counts in columns:
            end = start + len(counts)
            decode = counts[1:]  # the prefill step is the first column of each batch
            result = (float(seconds[start]), float(energy[start]), float(decode @ seconds[start + 1 : end]),
                      float(decode @ energy[start + 1 : end]))  # fmt: skip
            if with_fixed:
                step = start + 1 if end > start + 1 else start
                result += (float(fixed_seconds[step]), float(fixed_j[step]))
            results.append(result)
            start = end
        return results


#: A model whose architecture is only approximated (parameter count) gets its log error band this much wider.
APPROXIMATION_WIDENING = 2.0
STATIC_BATCH_SAMPLES = 9

__all__ = ["FittedModel", "FittedPredictor", "FitRow", "fit", "prior_model", "shipped_model", "NEWEST_SOFTWARE"]
