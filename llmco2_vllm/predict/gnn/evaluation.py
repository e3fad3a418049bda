"""``llmco2 eval``: cross-validated accuracy of the learned predictor beside the baselines.

On the real measured rows of ``load_measurements()`` only (no synthetic row is ever scored):

* leave-one-GPU-type-out: for each GPU, train on the rows of all other GPUs, predict its rows;
* leave-one-model-family-out: the same by model family (``measurements.model_family``).

Every row is predicted exactly once per scheme by a model that never saw its GPU (resp. family).
The baselines (``analytic``, ``llmcarbon``, ``ecologits``, ``ecologits_row_gpus`` from
``llmco2_vllm.predict.baselines``) need no training and are scored on exactly the same rows.
Writes ``gnn_eval.md``, ``gnn_eval_scatter.png`` (predicted vs measured, log-log) and
``gnn_eval_cdf.png`` (error CDF) into ``--out``; ``--json`` prints the headline numbers.

The CV trains fewer ensemble members / epochs than the shipped checkpoint to stay within a few
CPU minutes (flags; the values used are written into the report). ``--quick`` is a smoke run
(1 member, 3 epochs): its numbers are NOT an accuracy measurement and the report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from llmco2_vllm.predict import baselines as baselines
from llmco2_vllm.predict.measurements import load_measurements, model_family

BASELINES = ("analytic", "llmcarbon", "ecologits", "ecologits_row_gpus")
GPU_OUT, FAMILY_OUT = "gnn (leave-GPU-out)", "gnn (leave-family-out)"
SAME_STEPS = "analytic (same 4-sample steps as gnn)"
QUICK_MEMBERS, QUICK_EPOCHS = 1, 3

#: (data, train row ids, test row ids) -> (central, low, high) batch energy (J) of the test rows.
Learner = Callable[[Any, list[int], list[int]], tuple[np.ndarray, np.ndarray, np.ndarray]]


def metrics(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    """MAPE, median APE, share within 5/10/30 % (all in %), median pred/meas, over finite predictions."""
    ok = np.isfinite(pred)
    if not ok.any():
        return {"n": 0, "mape": float("nan"), "median": float("nan"), "w5": float("nan"), "w10": float("nan"),
                "w30": float("nan"), "ratio": float("nan")}
    ape = np.abs(pred[ok] - meas[ok]) / meas[ok]
    return {
        "n": int(ok.sum()), "mape": 100 * float(ape.mean()), "median": 100 * float(np.median(ape)),
        "w5": 100 * float((ape <= 0.05).mean()), "w10": 100 * float((ape <= 0.10).mean()),
        "w30": 100 * float((ape <= 0.30).mean()), "ratio": float(np.median(pred[ok] / meas[ok])),
    }


def table(groups: dict[str, list[int]], preds: dict[str, np.ndarray], meas: np.ndarray) -> list[str]:
    lines = ["| group | predictor | n | MAPE % | median APE % | within 5 % | within 10 % | within 30 % | median pred/meas |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for group in sorted(groups):
        idx = np.array(groups[group])
        for name, values in preds.items():
            m = metrics(values[idx], meas[idx])
            if m["n"] == 0:
                continue
            lines.append(f"| {group} | {name} | {m['n']} | {m['mape']:.1f} | {m['median']:.1f} | {m['w5']:.0f} | "
                         f"{m['w10']:.0f} | {m['w30']:.0f} | {m['ratio']:.3g} |")
    return lines


def mape_table(groups: dict[str, list[int]], preds: dict[str, np.ndarray], meas: np.ndarray) -> list[str]:
    """One line per group, one MAPE column per predictor (compact per-model view)."""
    names = list(preds)
    lines = ["| group | n | " + " | ".join(f"{n} MAPE %" for n in names) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for group in sorted(groups):
        idx = np.array(groups[group])
        cells = [f"{metrics(preds[n][idx], meas[idx])['mape']:.1f}" for n in names]
        lines.append(f"| {group} | {len(idx)} | " + " | ".join(cells) + " |")
    return lines


def gnn_learner(members: int, epochs: int, seed: int = 1, shrink_unseen_hardware: bool = True, log: list[str] | None = None) -> Learner:
    """The GNN as trained by ``llmco2 train``: the ensemble on the training rows and, when the test
    rows run on a GPU absent from them, the unseen-hardware scale chosen by an inner
    leave-one-GPU-type-out CV on the training rows only (nested: the held-out GPU never informs it)."""

    def learn(data, train: list[int], test: list[int]):
        from llmco2_vllm.predict.gnn.training import choose_unseen_hardware_scale, predict_rows, train_ensemble
        from llmco2_vllm.predict.hardware import find_gpu

        ensemble = train_ensemble(data, train, members=members, epochs=epochs, seed=seed)
        if shrink_unseen_hardware and any(not ensemble.knows(find_gpu(data.rows[i]["gpu"])) for i in test):
            scale, quantiles = choose_unseen_hardware_scale(data, train, members, epochs, seed, log)
            ensemble.unseen_hardware_scale, ensemble.unseen_residual_quantiles = scale, quantiles
            if log is not None:
                log.append(f"    unseen-hardware scale chosen on the training rows: {scale}")
        return predict_rows(ensemble, data, test)

    return learn


def cross_validate(data, key: Callable[[dict], str], learner: Learner, log: list[str], bar=None):
    """(central, low, high) of every row, each from a model trained without the row's fold."""
    n = len(data.rows)
    central, low, high = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    folds: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(data.rows):
        folds[key(row)].append(i)
    for held_out, test in sorted(folds.items()):
        held = set(test)
        train = [i for i in range(n) if i not in held]
        start = time.perf_counter()
        central[test], low[test], high[test] = learner(data, train, test)
        log.append(f"  fold {held_out!r}: train {len(train)} rows, test {len(test)} rows, "
                   f"{time.perf_counter() - start:.1f} s")
        if bar is not None and not bar.disable:
            bar.update(1)
        else:  # no terminal: one line per fold instead of a bar
            print(log[-1].strip(), file=sys.stderr, flush=True)
    return central, low, high


def plots(meas: np.ndarray, preds: dict[str, np.ndarray], out_dir: Path, panels: Sequence[str]) -> list[Path]:
    from llmco2_vllm.predict.report_plots import PlotStyle, accuracy_plots

    style = PlotStyle(band=1.3, panel_inches=5, dpi=110, quantity="batch energy (J)",
                      scatter_title=f"Predicted vs measured ({len(meas)} real rows; dotted: +-30 %)",
                      cdf_title=f"Error CDF on the same {len(meas)} rows", cdf_lines_percent=(10.0, 30.0))  # fmt: skip
    return accuracy_plots(meas, {name: preds[name] for name in panels}, preds, out_dir / "gnn_eval_scatter.png",
                          out_dir / "gnn_eval_cdf.png", style)  # fmt: skip


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc="eval folds", unit="fold", file=sys.stderr, disable=None)


def evaluate(
    out_dir: str | Path,
    members: int = 2,
    epochs: int = 25,
    samples: int = 4,
    quick: bool = False,
    learners: dict[str, Learner] | None = None,
) -> dict[str, Any]:
    """Run both CV schemes, score the baselines on the same rows, write the report; returns a summary.

    ``learners`` maps a label to a learner run through both schemes (default: the GNN with
    ``members`` x ``epochs``); each yields the columns ``<label> (leave-GPU-out)`` and
    ``<label> (leave-family-out)``.
    """
    import torch

    from llmco2_vllm.predict.gnn.training import RowDataset

    torch.set_num_threads(1)  # shared CPUs; per-fold work is small
    if quick:
        members, epochs = QUICK_MEMBERS, QUICK_EPOCHS
    out_dir = Path(out_dir)
    start = time.perf_counter()
    rows = load_measurements()
    data = RowDataset.from_rows(rows, samples)
    meas = np.array([r["energy_j"] for r in rows], dtype=float)
    log: list[str] = []
    learners = learners or {"gnn": gnn_learner(members, epochs, log=log)}
    schemes = (("leave-GPU-out", lambda r: r["gpu"]), ("leave-family-out", lambda r: model_family(r["model"])))
    fold_count = sum(len({key(r) for r in rows}) for _, key in schemes) * len(learners)
    bar = _progress(fold_count)
    preds: dict[str, np.ndarray] = {}
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for label, learner in learners.items():
            for scheme, key in schemes:
                log.append(f"{label}, {scheme}")
                c, lo, hi = cross_validate(data, key, learner, log, bar)
                preds[f"{label} ({scheme})"] = c
                intervals[f"{label} ({scheme})"] = (lo, hi)
    finally:
        if bar is not None:
            bar.close()
    learned = list(preds)
    for name in BASELINES:
        preds[name] = np.array([baselines.BASELINES[name](row) for row in rows], dtype=float)
    preds[SAME_STEPS.replace("4", str(samples))] = data.analytic_energy()
    elapsed = time.perf_counter() - start

    lines = _report(rows, meas, preds, intervals, learned, log, members, epochs, samples, quick, elapsed)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "gnn_eval.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    gpu_out = [n for n in learned if n.endswith("(leave-GPU-out)")]
    fam_out = [n for n in learned if n.endswith("(leave-family-out)")]
    pngs = plots(meas, {k: v for k, v in preds.items() if not k.startswith("analytic (same")}, out_dir,
                 [gpu_out[0], fam_out[0], "analytic"])
    return {
        "rows": len(rows), "members": members, "epochs": epochs, "samples": samples, "quick": quick,
        "seconds": round(time.perf_counter() - start, 1),
        "overall": {name: metrics(values, meas) for name, values in preds.items()},
        "files": [str(report), *map(str, pngs)],
    }


def _report(rows, meas, preds, intervals, learned, log, members, epochs, samples, quick, elapsed) -> list[str]:
    by_gpu: dict[str, list[int]] = defaultdict(list)
    by_family: dict[str, list[int]] = defaultdict(list)
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_gpu[row["gpu"]].append(i)
        by_family[model_family(row["model"])].append(i)
        by_model[row["model"]].append(i)
    overall = {name: metrics(v, meas) for name, v in preds.items()}
    best_baseline = min(BASELINES, key=lambda n: overall[n]["mape"])
    verdict = []
    for scheme in learned:
        for name in BASELINES:
            for metric, label, lower_is_better in (("mape", "MAPE", True), ("median", "median APE", True),
                                                   ("w30", "within-30 %", False)):
                g, b = overall[scheme][metric], overall[name][metric]
                if (g > b) if lower_is_better else (g < b):
                    verdict.append(f"- {scheme} does NOT beat `{name}` on {label} overall ({g:.1f} vs {b:.1f}).")
    group_losses = []
    for suffix, title, groups in (("(leave-GPU-out)", "GPU", by_gpu), ("(leave-family-out)", "model family", by_family)):
        for scheme in (s for s in learned if s.endswith(suffix)):
            for group, idx in sorted(groups.items()):
                g = metrics(preds[scheme][idx], meas[idx])["mape"]
                losers = [n for n in BASELINES if metrics(preds[n][idx], meas[idx])["mape"] < g]
                if losers:
                    group_losses.append(
                        f"- held-out {title} `{group}` ({len(idx)} rows): {scheme} MAPE {g:.1f} % is worse than "
                        + ", ".join(f"`{n}` {metrics(preds[n][idx], meas[idx])['mape']:.1f} %" for n in losers))
    coverage = [f"{name} {100 * float(((lo <= meas) & (meas <= hi)).mean()):.0f} %"
                for name, (lo, hi) in intervals.items()]
    datasets = defaultdict(int)
    for row in rows:
        datasets[row["dataset"]] += 1
    gpu_cols = {k: v for k, v in preds.items() if not k.endswith("(leave-family-out)")}
    fam_cols = {k: v for k, v in preds.items() if not k.endswith("(leave-GPU-out)")}
    return [
        "# GNN predictor: cross-validated accuracy vs baselines",
        "",
        f"Generated by `llmco2 eval` (CV: {members} ensemble members x {epochs} epochs per fold, {samples} decode "
        "contexts per row; the shipped checkpoint uses 5 members x 40 epochs on all rows). "
        f"Wall time of this run: {elapsed:.0f} s on a 2-core CPU.",
        "",
        *(["**QUICK SMOKE RUN (`--quick`): too few epochs to learn anything; these numbers are not an accuracy "
           "measurement.**", ""] if quick else []),
        f"Rows: the {len(rows)} real KV-cache rows of `load_measurements()` ("
        + ", ".join(f"{d} {n}" for d, n in sorted(datasets.items())) + "); ML.ENERGY prompt length is ASSUMED "
        "to be 400 tokens (`prompt_assumed=true`). No synthetic rows are used in training or evaluation.",
        "",
        "- `... (leave-GPU-out)`: each row predicted by a model trained without any row of its GPU type.",
        "- `... (leave-family-out)`: each row predicted by a model trained without any row of its model family.",
        "- baselines from `llmco2_vllm.predict.baselines` (no training; scored on exactly the same rows): `analytic` (roofline, "
        "closed form), `llmcarbon`, `ecologits`, `ecologits_row_gpus`; `analytic (same N-sample steps as gnn)` is the "
        "GNN's own starting point (GNN output 0), shown to separate the learned correction from the step sampling.",
        "",
        "Caveats: the GNN corrects the analytic model toward these very datasets; ML.ENERGY v2 dominates, so a held-out "
        "GPU/family still shares software stack, prompt assumption and measurement boundary with the training rows. "
        "Leave-GPU-out for A40/V100/GH200 means extrapolating to different software (HF transformers, vLLM 0.10) as "
        "well as different hardware. The GNN sees a serving-engine flag (HF transformers vs vLLM; set only for the "
        "ML.ENERGY v1 rows) so it can attribute that engine's overhead to the engine; the vLLM plugin always predicts "
        "with the flag off.",
        "",
        f"## Overall ({len(rows)} rows)",
        "",
        *table({"all": list(range(len(rows)))}, preds, meas),
        "",
        "Interval coverage (share of measured values inside the predictor's [low, high]): " + ", ".join(coverage) + ".",
        "",
        "## Where the learned predictor does not beat a baseline",
        "",
        *(verdict or ["- Overall, both CV schemes beat every baseline on MAPE, median APE and within-30 %."]),
        *group_losses,
        "",
        f"Best overall baseline by MAPE: `{best_baseline}`.",
        "",
        "## Per held-out GPU (leave-one-GPU-type-out predictions)",
        "",
        *table(by_gpu, gpu_cols, meas),
        "",
        "## Per held-out model family (leave-one-model-family-out predictions)",
        "",
        *table(by_family, fam_cols, meas),
        "",
        "## Per model (MAPE; both CV schemes and the baselines)",
        "",
        *mape_table(by_model, preds, meas),
        "",
        "## Plots",
        "",
        "![predicted vs measured](gnn_eval_scatter.png)",
        "",
        "![error CDF](gnn_eval_cdf.png)",
        "",
        "## Fold log",
        "",
        "Inner-fold lines (the nested choice of the unseen-hardware scale) precede the outer fold they belong to.",
        "",
        "```",
        *log,
        "```",
        "",
    ]


def run(args: argparse.Namespace) -> int:
    summary = evaluate(args.out, args.members, args.epochs, args.samples, args.quick)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, m in summary["overall"].items():
            print(f"{name:<42} MAPE {m['mape']:6.1f} %  median {m['median']:6.1f} %  within 30 % {m['w30']:5.1f} %")
        print("wrote " + ", ".join(summary["files"]) + f" in {summary['seconds']:.0f} s")
    return 0

