"""Simulated recalibration: how fast OnlineCalibrator learns a biased predictor and a step change.

Run: ``.venv/bin/python benchmarks/recalibration_simulation.py``
Writes ``benchmarks/results/recalibration.md`` and, if matplotlib imports, ``recalibration.png``.

Simulated deployment (one 8-GPU tensor-parallel replica, 10 s measurement windows):

* Each window is idle for a uniform 0-30% of its 10 s; the busy rest is split between prefill and
  decode with a prefill time share drawn from Beta(2, 5) (mean ~29%, from decode-heavy chat to
  prompt-heavy bursts), so the phase mix varies window to window.
* The predictor believes prefill draws 1000 W/GPU and decode 300 W/GPU. Truth before the step:
  a = 0.6 (600 W/GPU), b = 1.4 (420 W/GPU), idle 60 W/GPU, i.e. c = 480 W for the replica. The
  calibrator's prior idle is a spec-sheet guess of 70 W/GPU = 560 W.
* NVML noise: multiplicative Gaussian, sigma 5%. Glitches: 2% of windows read ×3 or ×0.2.
* At window 300 both true scales drop to 0.6× (a vLLM upgrade); 600 windows in all.

Metrics (all one-step-ahead: each window is predicted with the coefficients learnt before it):

* "windows to 5%": after the start (window 0) or the step (window 300), the first window from
  which the rolling 50-window MAPE of the corrected prediction vs the measurement stays below 5%
  until the end of the phase. With 5% Gaussian noise the MAPE floor is ~4% (0.8·sigma), and a
  50-window mean keeps every big early error for 50 windows, so this metric is bounded below by
  the window length; hence also:
* "model error to 5%": the same, but the error is taken against the noise-free true energy and
  averaged over the last 10 windows: how fast the calibration itself becomes right.

20 seeds (0-19); median and worst are reported.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmco2_vllm.predict.calibration import OnlineCalibrator  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPUS = 8
WINDOW_S = 10.0
PREDICTED_PREFILL_W_PER_GPU = 1000.0
PREDICTED_DECODE_W_PER_GPU = 300.0
TRUE_PREFILL_SCALE = 0.6
TRUE_DECODE_SCALE = 1.4
TRUE_IDLE_W = 60.0 * GPUS
PRIOR_IDLE_W = 70.0 * GPUS
STEP_WINDOW = 300
STEP_FACTOR = 0.6
N_WINDOWS = 600
NOISE_SIGMA = 0.05
GLITCH_RATE = 0.02
GLITCH_FACTORS = (3.0, 0.2)
ROLLING_WINDOWS = 50
MODEL_ERROR_WINDOWS = 10
TARGET_ERROR = 0.05
SEEDS = range(20)


@dataclass
class Trace:
    """Per-window series of one simulated run."""

    rolling_corrected: np.ndarray  # rolling 50-window MAPE vs measured, corrected prediction
    rolling_raw: np.ndarray  # same, raw prediction
    model_error: np.ndarray  # rolling 10-window error of corrected prediction vs noise-free truth
    factors: np.ndarray  # (N, 3) coefficients after each window
    true_factors: np.ndarray  # (N, 3)
    rejected: int


def simulate(seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    calibrator = OnlineCalibrator(forgetting=0.98, prior_idle_watts=PRIOR_IDLE_W)
    ape_corrected = np.empty(N_WINDOWS)
    ape_raw = np.empty(N_WINDOWS)
    model_ape = np.empty(N_WINDOWS)
    factors = np.empty((N_WINDOWS, 3))
    truth = np.empty((N_WINDOWS, 3))
    for k in range(N_WINDOWS):
        step = STEP_FACTOR if k >= STEP_WINDOW else 1.0
        a, b, c = TRUE_PREFILL_SCALE * step, TRUE_DECODE_SCALE * step, TRUE_IDLE_W
        idle_s = WINDOW_S * rng.uniform(0.0, 0.3)
        busy_s = WINDOW_S - idle_s
        prefill_share = rng.beta(2.0, 5.0)
        p = busy_s * prefill_share * GPUS * PREDICTED_PREFILL_W_PER_GPU
        d = busy_s * (1.0 - prefill_share) * GPUS * PREDICTED_DECODE_W_PER_GPU
        true_j = a * p + b * d + c * idle_s
        measured = true_j * (1.0 + NOISE_SIGMA * rng.standard_normal())
        if rng.uniform() < GLITCH_RATE:
            measured *= GLITCH_FACTORS[rng.integers(2)]
        corrected = sum(calibrator.correct(p, d, idle_s))  # one step ahead: before the update
        raw = p + d + PRIOR_IDLE_W * idle_s
        ape_corrected[k] = abs(corrected - measured) / measured
        ape_raw[k] = abs(raw - measured) / measured
        model_ape[k] = abs(corrected - true_j) / true_j
        calibrator.update(p, d, idle_s, measured)
        factors[k] = calibrator.factors
        truth[k] = (a, b, c)
    return Trace(
        rolling_corrected=_rolling_mean(ape_corrected, ROLLING_WINDOWS, exclude_above=None),
        rolling_raw=_rolling_mean(ape_raw, ROLLING_WINDOWS, exclude_above=None),
        model_error=_rolling_mean(model_ape, MODEL_ERROR_WINDOWS, exclude_above=None),
        factors=factors,
        true_factors=truth,
        rejected=calibrator.rejected_windows,
    )


def simulate_with_calibrator_rolling(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The calibrator's own rolling_error() after each window (it leaves rejected glitches out)."""
    rng = np.random.default_rng(seed)
    calibrator = OnlineCalibrator(forgetting=0.98, prior_idle_watts=PRIOR_IDLE_W)
    before = np.empty(N_WINDOWS)
    after = np.empty(N_WINDOWS)
    for k in range(N_WINDOWS):
        step = STEP_FACTOR if k >= STEP_WINDOW else 1.0
        a, b, c = TRUE_PREFILL_SCALE * step, TRUE_DECODE_SCALE * step, TRUE_IDLE_W
        idle_s = WINDOW_S * rng.uniform(0.0, 0.3)
        busy_s = WINDOW_S - idle_s
        prefill_share = rng.beta(2.0, 5.0)
        p = busy_s * prefill_share * GPUS * PREDICTED_PREFILL_W_PER_GPU
        d = busy_s * (1.0 - prefill_share) * GPUS * PREDICTED_DECODE_W_PER_GPU
        measured = (a * p + b * d + c * idle_s) * (1.0 + NOISE_SIGMA * rng.standard_normal())
        if rng.uniform() < GLITCH_RATE:
            measured *= GLITCH_FACTORS[rng.integers(2)]
        calibrator.update(p, d, idle_s, measured)
        before[k], after[k] = calibrator.rolling_error()
    return before, after


def _rolling_mean(values: np.ndarray, n: int, exclude_above: float | None) -> np.ndarray:
    out = np.empty_like(values)
    for k in range(len(values)):
        chunk = values[max(0, k - n + 1) : k + 1]
        if exclude_above is not None:
            chunk = chunk[chunk <= exclude_above]
        out[k] = chunk.mean() if len(chunk) else math.nan
    return out


def windows_to_target(series: np.ndarray, start: int, end: int) -> int:
    """Windows after ``start`` until ``series`` is below target and stays there until ``end``;
    ``end - start`` + 1 if it never settles (reported as "never")."""
    above = np.nonzero(~(series[start:end] < TARGET_ERROR))[0]
    if len(above) == 0:
        return 0
    last = int(above[-1]) + 1
    return last if last < end - start else end - start + 1


def first_below_target(series: np.ndarray, start: int, end: int) -> int:
    """Windows after ``start`` until ``series`` first drops below target once the phase has
    pushed it above (a step's first windows are held, so the series lags the step by a few)."""
    above = np.nonzero(~(series[start:end] < TARGET_ERROR))[0]
    if len(above) == 0:
        return 0
    below = np.nonzero(series[start + above[0] : end] < TARGET_ERROR)[0]
    return int(above[0] + below[0]) if len(below) else end - start


def main() -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    traces = [simulate(seed) for seed in SEEDS]
    own = [simulate_with_calibrator_rolling(seed) for seed in SEEDS]
    phases = {"start (window 0)": (0, STEP_WINDOW), "step (window 300)": (STEP_WINDOW, N_WINDOWS)}

    def table_rows(series_of: callable) -> list[str]:
        rows = []
        for name, (start, end) in phases.items():
            counts = np.array([windows_to_target(series_of(i), start, end) for i in SEEDS])
            never = int(np.sum(counts > end - start))
            worst = "never" if never else str(int(counts.max()))
            first = np.array([first_below_target(series_of(i), start, end) for i in SEEDS])
            rows.append(
                f"| {name} | {int(np.median(counts))} | {worst} | {never}/{len(SEEDS)} |"
                f" {int(np.median(first))} | {int(first.max())} |"
            )
        return rows

    spec_rows = table_rows(lambda i: traces[i].rolling_corrected)
    own_rows = table_rows(lambda i: own[i][1])
    model_rows = table_rows(lambda i: traces[i].model_error)

    pre_end = STEP_WINDOW - 1
    final = np.array([t.factors[pre_end] for t in traces])
    final_post = np.array([t.factors[-1] for t in traces])
    truth_pre = traces[0].true_factors[pre_end]
    truth_post = traces[0].true_factors[-1]
    raw_pre = np.array([t.rolling_raw[pre_end] for t in traces])
    raw_post = np.array([t.rolling_raw[-1] for t in traces])
    corr_pre = np.array([t.rolling_corrected[pre_end] for t in traces])
    corr_post = np.array([t.rolling_corrected[-1] for t in traces])
    own_raw_pre = np.array([o[0][pre_end] for o in own])
    own_raw_post = np.array([o[0][-1] for o in own])
    own_corr_pre = np.array([o[1][pre_end] for o in own])
    own_corr_post = np.array([o[1][-1] for o in own])

    def spread(values: np.ndarray) -> str:
        return f"{np.median(values):.1%} ({values.min():.1%}–{values.max():.1%})"
    rejected = np.array([t.rejected for t in traces])

    def factor_row(label: str, values: np.ndarray, truth: np.ndarray) -> str:
        med = np.median(values, axis=0)
        lo, hi = values.min(axis=0), values.max(axis=0)
        cells = [
            f"{truth[j]:.3g} | {med[j]:.3g} ({lo[j]:.3g}–{hi[j]:.3g})" for j in range(3)
        ]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        "# Recalibration simulation",
        "",
        "Generated by `benchmarks/recalibration_simulation.py` (see its docstring for the model).",
        f"8-GPU replica, {WINDOW_S:.0f} s windows, idle 0–30%, prefill time share ~ Beta(2, 5);",
        f"truth a={TRUE_PREFILL_SCALE}, b={TRUE_DECODE_SCALE}, idle {TRUE_IDLE_W:.0f} W "
        f"(prior {PRIOR_IDLE_W:.0f} W); noise {NOISE_SIGMA:.0%}; glitches {GLITCH_RATE:.0%} "
        f"(×3 or ×0.2); at window {STEP_WINDOW} a and b drop to {STEP_FACTOR}×. "
        f"OnlineCalibrator(forgetting=0.98). Seeds {SEEDS.start}–{SEEDS.stop - 1}.",
        "",
        "## Windows until the error falls below 5% and stays there",
        "",
        "Counted from the start of each phase; 'stays' means until the end of the phase, 'first"
        " below' is the first window under 5%. With 5% Gaussian noise a 50-window MAPE vs the"
        " measurement sits at ~4.0 ± 0.4% even for a perfect calibration, so 'stays' on those"
        " series measures noise flicker across the 5% line as much as learning; the model-error"
        " table is the clean measure of adaptation speed.",
        "",
        "**Rolling 50-window MAPE, corrected (one-step-ahead) prediction vs measured, every window**"
        " (glitches included; 5% noise alone gives ~4%):",
        "",
        "| phase | stays: median | stays: worst | never settled | first below: median |"
        " first below: worst |",
        "|---|---|---|---|---|---|",
        *spec_rows,
        "",
        "**The calibrator's own `rolling_error()`** (50 windows; rejected glitches left out):",
        "",
        "| phase | stays: median | stays: worst | never settled | first below: median |"
        " first below: worst |",
        "|---|---|---|---|---|---|",
        *own_rows,
        "",
        "**Model error**: rolling 10-window error of the corrected prediction vs the noise-free"
        " true energy (how fast the calibration itself is right):",
        "",
        "| phase | stays: median | stays: worst | never settled | first below: median |"
        " first below: worst |",
        "|---|---|---|---|---|---|",
        *model_rows,
        "",
        "## Errors at the end of each phase",
        "",
        "Rolling 50-window MAPE vs measured, median (range) over seeds; raw = P + D + prior idle"
        " W × I, corrected = one step ahead. 'rolling_error()' leaves rejected glitches out;"
        " 'all windows' keeps them (each ×3 glitch alone adds ~4% to a 50-window mean).",
        "",
        "| phase | raw, rolling_error() | corrected, rolling_error() | raw, all windows |"
        " corrected, all windows |",
        "|---|---|---|---|---|",
        f"| before step (window {pre_end}) | {spread(own_raw_pre)} | {spread(own_corr_pre)} |"
        f" {spread(raw_pre)} | {spread(corr_pre)} |",
        f"| after step (window {N_WINDOWS - 1}) | {spread(own_raw_post)} |"
        f" {spread(own_corr_post)} | {spread(raw_post)} | {spread(corr_post)} |",
        "",
        "## Final factors vs truth (median, range over seeds)",
        "",
        "| phase | a true | a learnt | b true | b learnt | idle W true | idle W learnt |",
        "|---|---|---|---|---|---|---|",
        factor_row(f"window {pre_end}", final, truth_pre),
        factor_row(f"window {N_WINDOWS - 1}", final_post, truth_post),
        "",
        f"Windows rejected as outliers per run: median {int(np.median(rejected))}, "
        f"range {rejected.min()}–{rejected.max()} (about {GLITCH_RATE * N_WINDOWS:.0f} glitches "
        "injected per run).",
        "",
        "The idle power is weakly identified: idle is only ~1–4% of a window's energy, so with 5%"
        " noise and ~50 windows of memory the idle coefficient wanders by ~±200 W around the truth;"
        " its effect on the total is about 1%.",
        "",
    ]
    report = RESULTS_DIR / "recalibration.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    _plot(traces[0], own[0], RESULTS_DIR / "recalibration.png")


def _plot(trace: Trace, own: tuple[np.ndarray, np.ndarray], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: plot skipped")
        return
    windows = np.arange(N_WINDOWS)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.plot(windows, 100 * trace.rolling_raw, label="raw prediction (rolling 50)")
    top.plot(windows, 100 * trace.rolling_corrected, label="corrected, one step ahead (rolling 50)")
    top.plot(windows, 100 * own[1], label="calibrator rolling_error() (glitches excluded)")
    top.plot(windows, 100 * trace.model_error, label="corrected vs noise-free truth (rolling 10)")
    top.axhline(100 * TARGET_ERROR, color="grey", linestyle=":", label="5%")
    top.axvline(STEP_WINDOW, color="black", linestyle="--", linewidth=0.8)
    top.set_ylabel("MAPE (%)")
    top.set_yscale("log")
    top.legend(fontsize=8)
    top.set_title("OnlineCalibrator, seed 0")
    for j, (name, colour) in enumerate((("prefill scale a", "C0"), ("decode scale b", "C1"))):
        bottom.plot(windows, trace.factors[:, j], color=colour, label=f"{name} learnt")
        bottom.plot(windows, trace.true_factors[:, j], color=colour, linestyle=":", label="truth")
    idle_axis = bottom.twinx()
    idle_axis.plot(windows, trace.factors[:, 2], color="C2", alpha=0.6, label="idle W learnt")
    idle_axis.plot(windows, trace.true_factors[:, 2], color="C2", linestyle=":")
    idle_axis.set_ylabel("idle W")
    bottom.axvline(STEP_WINDOW, color="black", linestyle="--", linewidth=0.8)
    bottom.set_xlabel("window")
    bottom.set_ylabel("scale")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
