"""Online term calibration against a simulated deployment whose truth differs from the prior in shape.

Run: ``.venv/bin/python benchmarks/online_calibration_simulation.py`` ->
``benchmarks/results/online_calibration.md`` / ``.json``

A continuous-batching engine is simulated step by step (the concurrency cycles through 8, 96, 24,
160 and 48 running requests every 400 steps; prompts and outputs log-normal, medians 300 and 220
tokens; prefill chunks of at most 512 tokens per step). The
"measured" step times and energies come from a **truth**: the shipped fitted model with its shape
changed (per-sequence overhead x3, K/V reads x1.3, memory-bound power x0.8, idle power x1.1). After
``CHANGE_AT`` windows the truth changes again (per-step overhead x2, compute power x1.25: a driver or
clock change). Windows close every 5 s of simulated time; the meter's energy carries 1 % noise.

``OnlineTermCalibrator`` (``predict/term_calibration.py``) learns from each window: with the steps'
measured times (each step's, grouped by batch size, as the plugin passes them on a GPU host) and the
meter, and from the meter alone. Beside it, on the same windows,
the scale calibration the plugin runs today (``OnlineCalibrator``: measured ≈ a·prefill + b·decode).
Reported: each learner's one-step-ahead energy error (the window predicted before it is learned),
how many windows it takes to stay within 5 %, and its one-step-ahead error of the window's step time.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmco2_vllm.predict.calibration import OnlineCalibrator  # noqa: E402
from llmco2_vllm.predict.fitted import FittedModel, shipped_model  # noqa: E402
from llmco2_vllm.predict.hardware import find_gpu  # noqa: E402
from llmco2_vllm.predict.model_description import load_model  # noqa: E402
from llmco2_vllm.predict.step_shape import StepShape  # noqa: E402
from llmco2_vllm.predict.step_terms import StepTerms  # noqa: E402
from llmco2_vllm.predict.term_calibration import CalibratedModel, Observation, OnlineTermCalibrator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL, GPU = "meta-llama/Llama-3.1-8B-Instruct", "H100"
WINDOW_SECONDS, WINDOWS, CHANGE_AT = 5.0, 90, 45
TARGET = 0.05
LOADS, LOAD_PERIOD = (8, 96, 24, 160, 48), 400
VERSION = "vllm-0.11.1"


def changed(model: FittedModel, factors: dict[str, float], idle: float = 1.0) -> tuple[FittedModel, float]:
    parameters = dict(model.parameters)
    for name, factor in factors.items():
        parameters[name] *= factor
    return FittedModel(parameters, model.software, model.energy_log_quantiles), idle


def simulate_steps(rng: np.random.Generator, count: int) -> list[StepShape]:
    """Steps of a continuous-batching engine whose load changes every ``LOAD_PERIOD`` steps (the
    concurrency cycles through ``LOADS``): a calibration that only rescales is right at one load only."""
    running: list[list[int]] = []  # [request id, prompt left, context, output left]
    next_id, steps = 0, []
    for index in range(count):
        load = LOADS[(index // LOAD_PERIOD) % len(LOADS)]
        while len(running) < load:
            prompt = int(rng.lognormal(math.log(300), 0.7)) + 8
            output = int(rng.lognormal(math.log(220), 0.8)) + 4
            running.append([next_id, prompt, 0, output])
            next_id += 1
        budget, requests = 512, []
        for request in running:
            rid, prompt_left, context, output_left = request
            if prompt_left:
                chunk = min(prompt_left, budget)
                if chunk:
                    requests.append((f"r{rid}", chunk, 0, context))
                    request[1] -= chunk
                    request[2] += chunk
                    budget -= chunk
            else:
                requests.append((f"r{rid}", 0, 1, context))
                request[2] += 1
                request[3] -= 1
        running = [r for r in running if r[3] > 0][: max(load, 1) * 2]  # a load drop preempts the excess
        steps.append(StepShape.from_requests(requests))
    return steps


def main() -> int:
    started = time.perf_counter()
    rng = np.random.default_rng(7)
    prior = shipped_model().for_model(MODEL)  # as the plugin's predictor holds it: with the model's own factors
    model = load_model(MODEL)
    gpu = find_gpu(GPU)
    terms = StepTerms(model, gpu)
    truths = [
        changed(prior, {f"sequence_seconds@{VERSION}": 3.0, "kv_factor": 1.3, f"memory_activity@{VERSION}": 0.8}, 1.1),
        changed(prior, {f"sequence_seconds@{VERSION}": 3.0, "kv_factor": 1.3, f"memory_activity@{VERSION}": 0.8,
                        f"step_seconds@{VERSION}": 2.0, f"compute_activity@{VERSION}": 1.25}, 1.1),
    ]  # fmt: skip
    steps = simulate_steps(rng, 40000)
    sums = np.array([terms.step_sums(step) for step in steps]).T  # SUM_NAMES x steps
    prefill = np.array([step.total_prefill_tokens > 0 for step in steps])

    def per_step(truth: tuple[FittedModel, float]) -> tuple[np.ndarray, np.ndarray]:
        calibrated = CalibratedModel(truth[0], VERSION, truth[1])
        gpu_with_idle = calibrated.with_idle(gpu)
        parts = truth[0].time_parts(terms.from_sums(sums), VERSION)
        return parts[0], truth[0].power_watts(gpu_with_idle, *parts, software=VERSION) * parts[0]

    truth_steps = [per_step(t) for t in truths]
    prior_parts = prior.time_parts(terms.from_sums(sums), VERSION)
    prior_energy = prior.power_watts(gpu, *prior_parts, software=VERSION) * prior_parts[0]

    learners = {"terms: step times + meter": OnlineTermCalibrator(prior, VERSION),
                "terms: meter only": OnlineTermCalibrator(prior, VERSION)}  # fmt: skip
    scale = OnlineCalibrator(prior_idle_watts=gpu.idle_watts)
    errors: dict[str, list[float]] = {name: [] for name in (*learners, "scale (today's online calibration)", "uncalibrated")}
    time_errors: dict[str, list[float]] = {name: [] for name in learners}
    observe_seconds: dict[str, list[float]] = {name: [] for name in learners}  # CPU of the worker per window
    start = 0
    for window in range(WINDOWS):
        seconds, energy = truth_steps[0 if window < CHANGE_AT else 1]
        end = start + int(np.searchsorted(np.cumsum(seconds[start:]), WINDOW_SECONDS)) + 1
        window_sums = sums[:, start:end]
        measured_energy = float(energy[start:end].sum()) * (1 + rng.normal(0, 0.01))
        measured_seconds = float(seconds[start:end].sum())
        observation = Observation(terms, 1, window_sums, np.ones(end - start))
        for name, learner in learners.items():
            predicted_seconds, predicted = learner.model.predict(observation)
            errors[name].append(abs(predicted / measured_energy - 1))
            time_errors[name].append(abs(predicted_seconds / measured_seconds - 1))
            timed = "times" in name
            began = time.process_time()
            learner.observe(terms, 1, window_sums, measured_energy, measured_seconds if timed else None,
                            step_seconds=seconds[start:end] if timed else None)  # fmt: skip
            observe_seconds[name].append(time.process_time() - began)
        p = float(prior_energy[start:end][prefill[start:end]].sum())
        d = float(prior_energy[start:end][~prefill[start:end]].sum())
        errors["scale (today's online calibration)"].append(abs(sum(scale.correct(p, d, 0.0)) / measured_energy - 1))
        scale.update(p, d, 0.0, measured_energy)
        errors["uncalibrated"].append(abs((p + d) / measured_energy - 1))
        start = end

    def settle(values: list[float], first: int) -> int | None:
        """Windows after ``first`` until the error stays within the target for the rest of the phase."""
        for index in range(first, len(values)):
            if all(v <= TARGET for v in values[index:]):
                return index - first + 1
        return None

    rows, summary = [], {}
    for name, values in errors.items():
        before, after = values[:CHANGE_AT], values[CHANGE_AT:]
        entry = {
            "windows_to_5pct": settle(before, 0), "windows_to_5pct_after_change": settle(values, CHANGE_AT),
            "mean_error_windows_10_45": 100 * float(np.mean(before[10:])),
            "mean_error_last_20": 100 * float(np.mean(after[-20:])),
            "max_error_windows_3_45": 100 * float(np.max(before[2:])),
            "mean_time_error_windows_10_45": 100 * float(np.mean(time_errors[name][10:CHANGE_AT])) if name in time_errors else None,
            "observe_cpu_ms_median_max": ([1000 * float(f(observe_seconds[name])) for f in (np.median, np.max)]
                                          if name in observe_seconds else None),
        }
        summary[name] = entry
        time_error, cpu = entry["mean_time_error_windows_10_45"], entry["observe_cpu_ms_median_max"]
        rows.append(f"| {name} | {entry['windows_to_5pct'] or 'never'} | {entry['windows_to_5pct_after_change'] or 'never'} | "
                    f"{entry['mean_error_windows_10_45']:.1f} | {entry['max_error_windows_3_45']:.1f} | "
                    f"{entry['mean_error_last_20']:.1f} | {'-' if time_error is None else f'{time_error:.1f}'} | "
                    f"{'-' if cpu is None else '{:.0f} / {:.0f}'.format(*cpu)} |")
    text = [
        "# Online term calibration: simulated deployment, shape differs from the prior",
        "",
        f"Generated by `benchmarks/online_calibration_simulation.py` in {time.perf_counter() - started:.0f} s "
        f"({MODEL} on one {gpu.name}; {WINDOWS} windows of {WINDOW_SECONDS:.0f} s, the truth changes after window {CHANGE_AT}). "
        "One-step-ahead energy error of each window, predicted before it is learned.",
        "",
        "| learner | windows to stay within 5 % | windows to stay within 5 % after the change | mean error, windows 11-45 (%) "
        "| max error, windows 3-45 (%) | mean error, last 20 windows (%) | step-time error, windows 11-45 (%) "
        "| CPU to learn a window, median / max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Target (issue 14): within 5 % in 30 windows, and again after a shape change. The plugin's worker runs the "
        "same learner on its NVML windows (`accounting/pipeline.py`); here it runs on simulated windows.",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "online_calibration.md").write_text("\n".join(text), encoding="utf-8")
    (RESULTS / "online_calibration.json").write_text(json.dumps({"summary": summary, "errors": errors, "time_errors": time_errors}, indent=1))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
