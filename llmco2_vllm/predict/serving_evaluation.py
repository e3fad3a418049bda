"""``llmco2 eval``: the fitted time and power model, cross-validated on measured vLLM serving, beside the baselines.

Every number is an out-of-sample prediction of a real measured row (``serving_measurements``):

* leave-one-model-out on the ML.ENERGY v3 H100 rows: each model's rows predicted by a model fitted
  without any row of that model (v2 rows of the same model included);
* leave-one-GPU-out on the v2 rows (A100 <-> H100): no row of the held-out GPU in training (so the
  v3 rows, all H100, are out when H100 is held out);
* software-version transfer: fitted on v2 (vLLM 0.5.4) alone, predicting v3 (0.11.1), and back.

Baselines, scored on exactly the same rows: the project's analytic roofline and the shipped LLMCO2
GNN checkpoint (no refit: it was trained on the v2 rows, so only its v3 numbers are out of sample),
EcoLogits (as transcribed in ``baselines``), and a plain non-negative linear fit of energy per token
over roofline terms (weights, K/V, FLOPs, per-step constant over batch, TP communication), refitted
in every fold like the fitted model.

Intervals: the fitted model's point is its median, debiased, and its 80 % interval comes from the
10/50/90 % quantiles of log(measured / predicted) energy in an inner leave-one-model-out cross
validation on the training rows only (nested), so the held-out rows never inform it. The same
inner cross validation chooses how hard the fit pulls toward its physical priors
(``select_prior_strength``): the candidate whose inner fits predict held-out models best.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from llmco2_vllm.predict import fitted
from llmco2_vllm.predict.measurements import model_family
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.serving_measurements import (
    ASSUMED_PROMPT_TOKENS,
    ServingMeasurement,
    load_serving_measurements,
)

INTERVAL = (0.1, 0.5, 0.9)
INNER_FOLDS = 8  # inner cross-validation folds (models grouped) that set the interval
MIN_INTERVAL_ROWS = 30


# --- data -----------------------------------------------------------------------------------


@dataclasses.dataclass
class EvaluationData:
    measurements: list[ServingMeasurement]
    rows: list[fitted.FitRow]
    skipped: list[tuple[str, str]]  # (row id, reason)

    @classmethod
    def load(cls, prompt_scale: float = 1.0) -> "EvaluationData":
        measurements, rows, skipped = [], [], []
        for measurement in load_serving_measurements():
            try:
                rows.append(fitted.fit_row(measurement, _describe, prompt_scale))
            except ValueError as error:
                skipped.append((measurement.row_id, str(error)))
                continue
            measurements.append(measurement)
        return cls(measurements, rows, skipped)

    @functools.cached_property
    def energy(self) -> np.ndarray:
        return np.array([m.energy_per_request_j for m in self.measurements])

    def select(self, predicate: Callable[[ServingMeasurement], bool]) -> list[int]:
        return [i for i, m in enumerate(self.measurements) if predicate(m)]


@functools.cache
def _describe(model: str):
    return load_model(model)


def precision(model_id: str) -> str:
    description = _describe(model_id)
    expert = description.expert_weight_dtype
    return description.weight_dtype if expert == description.weight_dtype else f"{description.weight_dtype}+{expert} experts"


# --- learners ---------------------------------------------------------------------------------

#: (data, train ids, test ids) -> {"energy", "low", "high"} (+ "seconds", "power") arrays over the test ids.
Learner = Callable[[EvaluationData, Sequence[int], Sequence[int]], dict[str, np.ndarray]]


def _groups(data: EvaluationData, ids: Sequence[int], folds: int) -> list[list[int]]:
    """Training ids split by model into at most ``folds`` groups (models in name order, dealt round-robin)."""
    by_model: dict[str, list[int]] = defaultdict(list)
    for i in ids:
        by_model[data.measurements[i].model].append(i)
    groups: list[list[int]] = [[] for _ in range(min(folds, len(by_model)))]
    for index, model in enumerate(sorted(by_model)):
        groups[index % len(groups)].extend(by_model[model])
    return groups


def _predict(model: fitted.FittedModel, data: EvaluationData, ids: Sequence[int]) -> dict[str, np.ndarray]:
    return fitted.predict_serving(model, [data.rows[i] for i in ids], [data.measurements[i] for i in ids])


def _inner_residuals(
    data: EvaluationData, ids: Sequence[int], folds: int, dataset: str | None, prior_strength: float
) -> np.ndarray:
    """log(measured / predicted) energy of the rows of ``ids``, each predicted by a model fitted
    without its model's rows (``folds`` groups of models); with ``dataset``, only that dataset's
    rows' residuals (when there are at least ``MIN_INTERVAL_ROWS``)."""
    residuals, own = [], []
    for held in _groups(data, ids, folds):
        held_set = set(held)
        # Held-out models: no model's own factors would apply to them.
        model = fitted.fit([data.rows[i] for i in ids if i not in held_set], prior_strength, model_factors=False)
        predicted = _predict(model, data, held)["energy_per_request_j"]
        values = np.log(data.energy[held] / predicted)
        residuals.extend(values)
        own.extend(v for i, v in zip(held, values) if data.measurements[i].dataset == dataset)
    return np.array(own if len(own) >= MIN_INTERVAL_ROWS else residuals)


def residual_quantiles(
    data: EvaluationData, ids: Sequence[int], folds: int = INNER_FOLDS, dataset: str | None = None,
    prior_strength: float = fitted.DEFAULT_PRIOR_STRENGTH,
) -> tuple[float, float, float]:
    """Quantiles (INTERVAL) of log(measured / predicted) energy, each row predicted without its model.

    With ``dataset``, only that dataset's rows' residuals count (when there are at least
    ``MIN_INTERVAL_ROWS``): the error band of the software the predictions are for.
    """
    residuals = _inner_residuals(data, ids, folds, dataset, prior_strength)
    return tuple(float(q) for q in np.quantile(residuals, INTERVAL))  # type: ignore[return-value]


def select_prior_strength(
    data: EvaluationData, ids: Sequence[int], folds: int = INNER_FOLDS, dataset: str | None = None
) -> tuple[float, tuple[float, float, float], dict[float, float]]:
    """The prior strength (``fitted.PRIOR_STRENGTHS``) whose fits predict held-out models best, by an
    inner leave-models-out cross validation on ``ids`` alone; with the residual quantiles of that
    choice (the interval) and each candidate's inner MAPE (% of the debiased energy).

    How hard the fit pulls toward the physical priors is a property of how much the training rows
    say, not of physics: chosen on the training rows only (nested), so held-out rows never inform it.
    """
    scores: dict[float, float] = {}
    quantiles: dict[float, tuple[float, float, float]] = {}
    for strength in fitted.PRIOR_STRENGTHS:
        residuals = _inner_residuals(data, ids, folds, dataset, strength)
        low, middle, high = (float(q) for q in np.quantile(residuals, INTERVAL))
        scores[strength] = 100 * float(np.mean(np.abs(np.exp(middle - residuals) - 1)))
        quantiles[strength] = (low, middle, high)
    best = min(scores, key=lambda strength: (scores[strength], -strength))
    return best, quantiles[best], scores


def fitted_learner(data: EvaluationData, train: Sequence[int], test: Sequence[int], interval: bool = True) -> dict[str, np.ndarray]:
    datasets = [data.measurements[i].dataset for i in test]
    if interval:
        strength, (low, middle, high), _ = select_prior_strength(data, train, dataset=max(set(datasets), key=datasets.count))
    else:
        strength, (low, middle, high) = fitted.DEFAULT_PRIOR_STRENGTH, (math.nan, 0.0, math.nan)
    model = fitted.fit([data.rows[i] for i in train], strength)
    predicted = _predict(model, data, test)
    raw = predicted["energy_per_request_j"]
    return {"energy": raw * math.exp(middle), "low": raw * math.exp(low), "high": raw * math.exp(high),
            "seconds": predicted["step_seconds"], "power": predicted["power_watts"],
            "prior_strength": np.full(len(test), strength)}  # fmt: skip


def kernel_gnn_learner(data: EvaluationData, train: Sequence[int], test: Sequence[int]) -> dict[str, np.ndarray]:
    """The per-kernel GNN on the fitted model (``predict.gnn.kernel_model``), trained on the training rows."""
    import torch

    from llmco2_vllm.predict.gnn import kernel_model

    torch.set_num_threads(1)
    contexts = [kernel_model.serving_context(m, r, _describe(m.model)) for m, r in zip(data.measurements, data.rows)]
    model, _ = kernel_model.train([data.rows[i] for i in train], [contexts[i] for i in train])
    seconds, power = kernel_model.predict(model, [data.rows[i] for i in test], [contexts[i] for i in test])
    ms = [data.measurements[i] for i in test]
    power = power * np.array([m.num_gpus for m in ms])
    energy = power * seconds / np.array([m.batch_size for m in ms]) * np.array([m.output_tokens for m in ms])
    nan = np.full(len(test), np.nan)
    return {"energy": energy, "low": nan, "high": nan, "seconds": seconds, "power": power}


def _linear_features(data: EvaluationData, ids: Sequence[int]) -> np.ndarray:
    """Energy-per-token features of the plain linear baseline: roofline terms in GPU-seconds x TDP per token."""
    from llmco2_vllm.predict.step_terms import TERM_INDEX

    features = []
    for i in ids:
        m, terms = data.measurements[i], data.rows[i].terms
        scale = m.num_gpus * data.rows[i].gpu.tdp_watts / m.batch_size
        weights = terms[0:6].sum()
        flops = terms[[TERM_INDEX[k] for k in ("dense_compute_16bit", "dense_compute_8bit", "expert_compute_16bit",
                                                "expert_compute_8bit", "attention_compute")]].sum()  # fmt: skip
        communication = terms[TERM_INDEX["allreduce_bytes"]] + terms[TERM_INDEX["alltoall_bytes"]]
        features.append(scale * np.array([weights, terms[TERM_INDEX["kv_read"]], flops, 1e-3, communication]))
    return np.array(features)


def linear_learner(data: EvaluationData, train: Sequence[int], test: Sequence[int]) -> dict[str, np.ndarray]:
    """Non-negative least squares of energy per token on roofline terms, relative error (rows scaled by 1/y)."""
    from scipy.optimize import nnls

    per_token = np.array([m.energy_per_token_j for m in data.measurements])
    x = _linear_features(data, train)
    y = per_token[list(train)]
    coefficients, _ = nnls(x / y[:, None], np.ones(len(train)))
    output = np.array([data.measurements[i].output_tokens for i in test])
    energy = _linear_features(data, test) @ coefficients * output
    nan = np.full(len(test), np.nan)
    return {"energy": energy, "low": nan, "high": nan}


def fixed_predictions(data: EvaluationData) -> dict[str, np.ndarray]:
    """Baselines that are not refitted per fold: energy per request of every row (nan where undefined)."""
    from llmco2_vllm.predict import baselines

    predictors: dict[str, Callable[[dict], float]] = {"analytic": baselines.analytic, "ecologits": baselines.ecologits}
    gnn = _gnn_batch_predictor()
    if gnn is not None:
        predictors["gnn (shipped)"] = lambda row: gnn.predict(row)["energy_j"]
    columns: dict[str, list[float]] = {name: [] for name in predictors}
    for m in data.measurements:
        # A static batch as large as the mean running batch, each request with the mean lengths.
        batch = max(1, round(m.batch_size))
        row = {"model": m.model, "gpu": m.gpu, "num_gpus": m.num_gpus, "tensor_parallel": m.tensor_parallel,
               "batch_size": batch, "prompt_tokens": m.prompt_tokens, "output_tokens": max(1, round(m.output_tokens))}  # fmt: skip
        for name, predict in predictors.items():
            try:
                columns[name].append(float(predict(row)) / batch)
            except ValueError:
                columns[name].append(math.nan)
    return {name: np.array(values) for name, values in columns.items()}


def _gnn_batch_predictor():
    """The shipped GNN (needs torch-geometric), or None where it is not installed."""
    if importlib.util.find_spec("torch_geometric") is None:
        return None
    from llmco2_vllm.predict.batch_predict import BatchPredictor

    return BatchPredictor(predictor="gnn")


# --- schemes ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    #: (label, train ids, test ids) folds
    folds: list[tuple[str, list[int], list[int]]]

    @property
    def test(self) -> list[int]:
        return [i for _, _, test in self.folds for i in test]


def schemes(data: EvaluationData) -> list[Scheme]:
    ms = data.measurements
    everything = range(len(ms))
    v3_models = sorted({m.model for m in ms if m.dataset == "mlenergy_v3"})
    lomo = [(model, [i for i in everything if ms[i].model != model],
             [i for i in everything if ms[i].model == model and ms[i].dataset == "mlenergy_v3"]) for model in v3_models]
    v2_gpus = sorted({m.gpu for m in ms if m.dataset == "mlenergy_v2"})
    logo = [(gpu, [i for i in everything if ms[i].gpu != gpu],
             [i for i in everything if ms[i].gpu == gpu and ms[i].dataset == "mlenergy_v2"]) for gpu in v2_gpus]
    v2 = [i for i in everything if ms[i].dataset == "mlenergy_v2"]
    v3 = [i for i in everything if ms[i].dataset == "mlenergy_v3"]
    return [
        Scheme("leave-one-model-out (v3, H100)", lomo),
        Scheme("leave-one-GPU-out (v2, A100 <-> H100)", logo),
        Scheme("version transfer v2 -> v3", [("v2 -> v3", v2, v3)]),
        Scheme("version transfer v3 -> v2", [("v3 -> v2", v3, v2)]),
    ]  # fmt: skip


def run_scheme(data: EvaluationData, scheme: Scheme, learners: dict[str, Learner], log: list[str], progress=None):
    n = len(data.measurements)
    out = {name: {k: np.full(n, np.nan) for k in ("energy", "low", "high", "seconds", "power")} for name in learners}
    for label, train, test in scheme.folds:
        for name, learner in learners.items():
            start = time.perf_counter()
            predicted = learner(data, train, test)
            strength = predicted.pop("prior_strength", None)
            for key, values in predicted.items():
                out[name][key][test] = values
            chosen = f", prior strength {strength[0]:g}" if strength is not None and len(strength) else ""
            log.append(f"{scheme.name} | {label} | {name}: train {len(train)}, test {len(test)}, "
                       f"{time.perf_counter() - start:.1f} s{chosen}")
        if progress is not None:
            progress.update(1)
    return out


# --- metrics and report -----------------------------------------------------------------------


def metrics(predicted: np.ndarray, measured: np.ndarray, low: np.ndarray | None = None,
            high: np.ndarray | None = None) -> dict[str, float]:  # fmt: skip
    ok = np.isfinite(predicted) & (predicted > 0)
    result: dict[str, float] = {"n": int(ok.sum()), "predicted_share": float(ok.mean()) if len(ok) else math.nan}
    if not ok.any():
        return result | {"mape": math.nan, "median_ape": math.nan, "within_10": math.nan, "ratio": math.nan,
                         "coverage": math.nan}  # fmt: skip
    ape = np.abs(predicted[ok] / measured[ok] - 1)
    result |= {"mape": 100 * float(ape.mean()), "median_ape": 100 * float(np.median(ape)),
               "within_10": 100 * float((ape <= 0.1).mean()), "ratio": float(np.median(predicted[ok] / measured[ok]))}  # fmt: skip
    if low is not None and high is not None and np.isfinite(low[ok]).all():
        result["coverage"] = 100 * float(((low[ok] <= measured[ok]) & (measured[ok] <= high[ok])).mean())
    else:
        result["coverage"] = math.nan
    return result


def _cell(value: float, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _table(rows: list[tuple[str, str, dict[str, float]]]) -> list[str]:
    lines = ["| group | predictor | n | MAPE % | median APE % | within 10 % | 80 % interval coverage % | median pred/meas |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for group, name, m in rows:
        lines.append(f"| {group} | {name} | {m['n']} | {_cell(m['mape'])} | {_cell(m['median_ape'])} | "
                     f"{_cell(m['within_10'], 0)} | {_cell(m['coverage'], 0)} | {_cell(m['ratio'], 2)} |")
    return lines


def evaluate(out_dir: str | Path, quick: bool = False) -> dict[str, Any]:
    """Every scheme, learner and baseline; writes the report. ``quick``: no GNN, no nested intervals
    and no sensitivity runs (a smoke run of the pipeline: its accuracy is real, its coverage absent)."""
    start = time.perf_counter()
    data = EvaluationData.load()
    fixed = fixed_predictions(data)
    learners: dict[str, Learner] = {"fitted": fitted_learner, "linear (NNLS)": linear_learner}
    if quick:
        learners["fitted"] = functools.partial(fitted_learner, interval=False)
    elif importlib.util.find_spec("torch_geometric") is not None:
        learners["gnn (per-kernel, on fitted)"] = kernel_gnn_learner
    sensitivity = not quick
    log: list[str] = []
    all_schemes = schemes(data)
    progress = _progress(sum(len(s.folds) for s in all_schemes))
    results: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    try:
        for scheme in all_schemes:
            results[scheme.name] = run_scheme(data, scheme, learners, log, progress)
    finally:
        if progress is not None:
            progress.close()

    shipped = fit_shipped(data, interval=not quick)
    sensitivity_rows = prompt_sensitivity(all_schemes[0]) if sensitivity else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = _summary(data, all_schemes, results, fixed)
    lines = _report(data, all_schemes, results, fixed, summary, shipped, sensitivity_rows, log,
                    time.perf_counter() - start, quick)  # fmt: skip
    (out_dir / "model_eval.md").write_text("\n".join(lines), encoding="utf-8")
    (out_dir / "model_eval.json").write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    (out_dir / "fitted_model.json").write_text(shipped.to_json() + "\n", encoding="utf-8")
    pngs = _plots(data, all_schemes[0], results[all_schemes[0].name], fixed, out_dir)
    return {"summary": summary, "files": [str(out_dir / n) for n in ("model_eval.md", "model_eval.json", "fitted_model.json")]
            + [str(p) for p in pngs], "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def fit_shipped(data: EvaluationData, interval: bool = True) -> fitted.FittedModel:
    """The model fitted on every row, with its error band from leave-one-model-out over every model."""
    everything = list(range(len(data.rows)))
    strength, quantiles, scores = fitted.DEFAULT_PRIOR_STRENGTH, None, {}
    if interval:
        # The prior strength by leave-one-model-out over every model, and the band of its choice.
        # The plugin predicts for current vLLM: the band of the newest measured version's rows.
        strength, quantiles, scores = select_prior_strength(
            data, everything, folds=len({m.model for m in data.measurements}), dataset="mlenergy_v3"
        )
    model = fitted.fit(data.rows, strength)
    if quantiles is not None:
        model.energy_log_quantiles = quantiles
    model.notes = {
        "prior_strength": strength,
        "prior_strength_inner_mape": {f"{k:g}": round(v, 2) for k, v in scores.items()},
        "rows": len(everything),
        "datasets": sorted({m.dataset for m in data.measurements}),
        "assumed_prompt_tokens": ASSUMED_PROMPT_TOKENS,
        "made_by": "llmco2 eval (llmco2_vllm.predict.serving_evaluation.fit_shipped)",
    }
    return model


def prompt_sensitivity(lomo: Scheme) -> list[tuple[float, dict[str, float]]]:
    """Leave-one-model-out energy error of the fitted model (as in the headline: prior strength and
    debiasing by inner cross validation) with every assumed prompt scaled."""
    rows = []
    for scale in (0.5, 1.0, 2.0):
        data = EvaluationData.load(prompt_scale=scale)
        predicted = np.full(len(data.rows), np.nan)
        for _, train, test in lomo.folds:
            predicted[test] = fitted_learner(data, train, test)["energy"]
        test = lomo.test
        rows.append((scale, metrics(predicted[test], data.energy[test])))
    return rows


def _summary(data, all_schemes, results, fixed) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scheme in all_schemes:
        test = scheme.test
        measured = data.energy[test]
        entry = {}
        for name, out in results[scheme.name].items():
            entry[name] = metrics(out["energy"][test], measured, out["low"][test], out["high"][test])
        for name, values in fixed.items():
            entry[name] = metrics(values[test], measured)
        fitted_out = results[scheme.name]["fitted"]
        seconds = np.array([m.step_seconds for m in data.measurements])[test]
        power = np.array([m.power_watts for m in data.measurements])[test]
        entry["fitted: step time"] = metrics(fitted_out["seconds"][test], seconds)
        entry["fitted: power"] = metrics(fitted_out["power"][test], power)
        summary[scheme.name] = entry
    return summary


def _by_group(data, ids, key, results_scheme, fixed) -> list[tuple[str, str, dict[str, float]]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in ids:
        groups[key(data.measurements[i])].append(i)
    rows = []
    for group in sorted(groups):
        idx = groups[group]
        for name, out in results_scheme.items():
            rows.append((group, name, metrics(out["energy"][idx], data.energy[idx], out["low"][idx], out["high"][idx])))
        for name, values in fixed.items():
            rows.append((group, name, metrics(values[idx], data.energy[idx])))
    return rows


def _report(data, all_schemes, results, fixed, summary, shipped, sensitivity_rows, log, elapsed, quick) -> list[str]:
    lomo = all_schemes[0]
    lomo_results = results[lomo.name]
    names = [*results[lomo.name], *fixed]
    headline = []
    for scheme in all_schemes:
        for name in [*names, "fitted: step time", "fitted: power"]:
            headline.append((scheme.name, name, summary[scheme.name][name]))
    losses = []
    for scheme in all_schemes:
        ours = summary[scheme.name]["fitted"]["mape"]
        for name in names:
            if name != "fitted" and summary[scheme.name][name]["mape"] < ours:
                losses.append(f"- {scheme.name}: `{name}` {summary[scheme.name][name]['mape']:.1f} % beats `fitted` {ours:.1f} %")
    for key, title in ((lambda m: model_family(m.model), "family"), (lambda m: precision(m.model), "precision"),
                       (lambda m: f"{m.num_gpus} GPU", "GPU count"), (lambda m: m.task, "task")):  # fmt: skip
        groups: dict[str, list[int]] = defaultdict(list)
        for i in lomo.test:
            groups[key(data.measurements[i])].append(i)
        for group, idx in sorted(groups.items()):
            ours = metrics(lomo_results["fitted"]["energy"][idx], data.energy[idx])["mape"]
            better = [(n, metrics(fixed[n][idx], data.energy[idx])["mape"]) for n in fixed]
            better += [(n, metrics(lomo_results[n]["energy"][idx], data.energy[idx])["mape"]) for n in lomo_results if n != "fitted"]
            better = [(n, v) for n, v in better if v < ours]
            if better:
                losses.append(f"- leave-one-model-out, {title} `{group}` ({len(idx)} rows): fitted {ours:.1f} % vs "
                              + ", ".join(f"`{n}` {v:.1f} %" for n, v in better))
    datasets = defaultdict(int)
    for m in data.measurements:
        datasets[m.dataset] += 1
    parameters = [f"| `{name}` | {value:.4g} |" for name, value in sorted(shipped.parameters.items())]
    q = shipped.energy_log_quantiles
    return [
        "# Fitted time and power model: cross-validated accuracy on measured vLLM serving",
        "",
        f"Generated by `llmco2 eval` in {elapsed:.0f} s (2-core CPU). Rows: {len(data.measurements)} measured steady-state "
        "serving configurations (" + ", ".join(f"{d} {n}" for d, n in sorted(datasets.items())) + "), "
        f"{len(data.skipped)} skipped (reason per row at the end). Target: energy per request "
        "(= measured average power of all GPUs x measured mean step time x output tokens / batch).",
        "",
        "Prompt lengths are not published: assumed per task (tokens) " + ", ".join(f"{k} {v}" for k, v in ASSUMED_PROMPT_TOKENS.items())
        + "; their effect is in 'Sensitivity'. Every prediction below is out of sample: see the scheme descriptions in "
        "`llmco2_vllm/predict/serving_evaluation.py`. `gnn (shipped)` and `analytic` are not refitted; the GNN "
        "checkpoint was trained on the v2 rows, so its v2 numbers are in-sample and only its v3 numbers are a test. "
        "Interval coverage: share of measured values inside the 80 % interval (nested inner CV).",
        "",
        *(["**QUICK SMOKE RUN (`--quick`): no per-kernel GNN, no intervals, no sensitivity runs, and the "
           "fitted_model.json written here has no error band.**", ""] if quick else []),
        "## Headline (energy per request; the last two lines of each scheme: the fitted model's step time and power)",
        "",
        *_table(headline),
        "",
        "## Where the fitted model loses",
        "",
        *(losses or ["- nowhere: the fitted model has the lowest MAPE in every scheme and every group below."]),
        "",
        "## Leave-one-model-out (v3) by model family, precision, GPU count and task",
        "",
        *_table(_by_group(data, lomo.test, lambda m: model_family(m.model), lomo_results, fixed)),
        "",
        *_table(_by_group(data, lomo.test, lambda m: precision(m.model), lomo_results, fixed)),
        "",
        *_table(_by_group(data, lomo.test, lambda m: f"{m.num_gpus} GPU", lomo_results, fixed)),
        "",
        *_table(_by_group(data, lomo.test, lambda m: m.task, lomo_results, fixed)),
        "",
        "## Leave-one-model-out (v3) per model",
        "",
        *_table(_by_group(data, lomo.test, lambda m: m.model, lomo_results, fixed)),
        "",
        "## Sensitivity to the assumed prompt lengths (fitted model, leave-one-model-out v3, every prompt scaled)",
        "",
        "| prompt scale | MAPE % | median APE % | within 10 % |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {scale:g} | {_cell(m['mape'])} | {_cell(m['median_ape'])} | {_cell(m['within_10'], 0)} |" for scale, m in sensitivity_rows],
        "",
        "## The shipped model (`llmco2_vllm/data/fitted_model.json`: fitted on every row)",
        "",
        f"Energy error band from leave-one-model-out over all {len({m.model for m in data.measurements})} models: "
        f"log(measured/predicted) quantiles 10/50/90 % = {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} "
        f"(x{math.exp(q[0]):.2f} / x{math.exp(q[1]):.2f} / x{math.exp(q[2]):.2f}). "
        f"Prior strength {shipped.notes.get('prior_strength', fitted.DEFAULT_PRIOR_STRENGTH):g}, chosen by the same "
        "leave-one-model-out (inner MAPE % of each candidate: "
        + (", ".join(f"{k} {v}" for k, v in shipped.notes.get("prior_strength_inner_mape", {}).items()) or "not run")
        + "); the prior strength chosen in each fold of the schemes above is in the fold log.",
        "",
        "| parameter | value |",
        "| --- | ---: |",
        *parameters,
        "",
        "Each measured model's own power factor (its energy beyond the shared parameters, applied to that model on "
        "any GPU; time factors stay 1: `fitted.fit`):",
        "",
        "| model | power factor |",
        "| --- | ---: |",
        *[f"| {name} | {power:.3f} |" for name, (_, power) in sorted(shipped.model_factors.items())],
        "",
        "## Plots",
        "",
        "![predicted vs measured](model_eval_scatter.png)",
        "",
        "![error CDF](model_eval_cdf.png)",
        "",
        "## Skipped rows",
        "",
        *([f"- `{row}`: {reason}" for row, reason in data.skipped] or ["- none"]),
        "",
        "## Fold log",
        "",
        "```",
        *log,
        "```",
        "",
    ]


def _plots(data, lomo: Scheme, lomo_results, fixed, out_dir: Path) -> list[Path]:
    if importlib.util.find_spec("matplotlib") is None:
        return []
    from llmco2_vllm.predict.report_plots import PlotStyle, accuracy_plots

    test = lomo.test
    columns = {name: out["energy"][test] for name, out in lomo_results.items()} | {n: v[test] for n, v in fixed.items()}
    style = PlotStyle(band=1.1, panel_inches=4, dpi=100, quantity="J / request",
                      scatter_title=f"Leave-one-model-out, {len(test)} v3 rows (dotted: +-10 %)",
                      cdf_title="Error CDF, leave-one-model-out (v3)", cdf_from_percent=0.3)  # fmt: skip
    return accuracy_plots(data.energy[test], columns, columns, out_dir / "model_eval_scatter.png",
                          out_dir / "model_eval_cdf.png", style)  # fmt: skip


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="eval folds", unit="fold", file=sys.stderr, disable=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="benchmarks/results", help="folder for model_eval.md/.json, fitted_model.json, PNGs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: no per-kernel GNN, no nested intervals, no sensitivity runs (seconds)")
    parser.add_argument("--json", action="store_true", help="print the headline numbers as JSON")


def run(args: argparse.Namespace) -> int:
    result = evaluate(args.out, quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for scheme, entry in result["summary"].items():
        print(scheme)
        for name, m in entry.items():
            print(f"  {name:<22} MAPE {_cell(m['mape']):>6} %  within 10 % {_cell(m['within_10'], 0):>4} %  "
                  f"coverage {_cell(m['coverage'], 0):>4} %")
    print("wrote " + ", ".join(result["files"]) + f" in {result['seconds']:.0f} s")
    return 0
