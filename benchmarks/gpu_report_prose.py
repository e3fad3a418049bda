"""The markdown of the GPU measurement report: per-folder READMEs and the cross-GPU index.

Rows, predictions, ratios and error metrics come from ``gpu_report_data`` (recomputed on every
run); this module chooses what to state about them (taking a median or a count where a sentence
needs one) and formats it. ``benchmarks/gpu_report.py`` writes the files.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_report_data import (  # noqa: E402
    RESULTS_DIR,
    Dataset,
    FolderResult,
    Predictors,
    RunMetadata,
    compute_bound_prefill_ratios,
    decode_flatness,
    error_summary,
    gpu_pairs,
    gpu_short,
    idle_gap,
    mape,
    med,
    median_ratio,
    phase_groups,
    phase_ratios,
    run_records,
    shape_label,
    training_gpu_names,
)

from llmco2_vllm.measure.collect import CUDA_GRAPH_MAX_TOKENS  # noqa: E402
from llmco2_vllm.predict.hardware import DEFAULT_IDLE_FRACTION_OF_TDP, GpuSpec  # noqa: E402

SCRIPT = "benchmarks/gpu_report.py"
#: Clock at which NVIDIA's H100/H200 SXM bf16 dense peak is quoted: 132 SMs x 4096 FLOP/clock x 1830 MHz
#: = 989.4 TFLOP/s.
PEAK_CLOCK_MHZ = 1830.0


# ==========================================================================================
# Formatting
# ==========================================================================================


def fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def ms(seconds: float) -> str:
    return fmt(seconds * 1e3)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if math.isfinite(a) and math.isfinite(b) and b != 0 else "-"


def display_path(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    try:
        return str(path.resolve().relative_to(RESULTS_DIR.parent.parent))
    except ValueError:
        return str(path)


def modes(ds: Dataset) -> str:
    """How the file's steps ran: eager, from CUDA graphs, or which shapes each way."""
    graphed = [r for r in ds.rows if r["graphed"]]
    if not graphed:
        return "all steps eager"
    if len(graphed) == len(ds.rows):
        return "all steps from CUDA graphs"
    eager = [r for r in ds.rows if not r["graphed"]]

    def listing(sel):
        return ", ".join(shape_label(r) for r in sel)

    decode_graphed = all(r["graphed"] for r in ds.rows if r["phase"] == "decode")
    prefill_graphed = [r for r in graphed if r["phase"] == "prefill"]
    if decode_graphed and all(r["phase"] == "prefill" for r in eager):
        return ("CUDA graphs for every decode step" + (f" and {listing(prefill_graphed)}" if prefill_graphed else "")
                + f"; the other prefill steps eager (over {CUDA_GRAPH_MAX_TOKENS} tokens)")
    return f"CUDA graphs for {len(graphed)} of {len(ds.rows)} shapes; eager: {listing(eager)}"


def short_modes(ds: Dataset) -> str:
    if not any(r["graphed"] for r in ds.rows):
        return "eager" + (", experts as a Python loop" if ds.moe_loop else "")
    return f"CUDA graphs <= {CUDA_GRAPH_MAX_TOKENS} tokens" + (", grouped experts" if ds.moe_grouped else "")


def gnn_hardware_note(gnn: Any, gpu: GpuSpec) -> str:
    """How the library decided whether ``gpu`` is one of the checkpoint's training GPUs."""
    from llmco2_vllm.predict.gnn.model import HARDWARE_MATCH_RTOL

    known = gnn.ensemble.training_hardware
    names = training_gpu_names(gnn)
    test = (f"`GnnEnsemble.knows` compares the catalog entry's datasheet signature (bf16 peak, memory bandwidth, "
            f"memory size, TDP) with the checkpoint's {len(known)} training-GPU signatures (catalog entries matching "
            f"them: {', '.join(f'`{n}`' for n in names)}) within {100 * HARDWARE_MATCH_RTOL:g} % on every feature")
    if gnn.unseen_hardware:
        return (f"{test}: `{gpu.name}` matches none ({gpu.memory_bandwidth_bytes_per_second / 1e12:g} TB/s, "
                f"{gpu.memory_bytes / 1e9:g} GB, {gpu.tdp_watts:g} W), so it is an unseen GPU and the log correction "
                f"is multiplied by the checkpoint's `unseen_hardware_scale`, {gnn.correction_scale:g}")
    return (f"{test}: `{gpu.name}` matches, so it is a training GPU and the log correction is applied in full "
            f"(scale {gnn.correction_scale:g}; the checkpoint's `unseen_hardware_scale`, "
            f"{gnn.ensemble.unseen_hardware_scale:g}, is not used)")


def gnn_note(preds: Predictors) -> str:
    return preds.gnn_unavailable or gnn_hardware_note(preds.gnn, preds.hardware.gpu)


# ==========================================================================================
# A folder's README
# ==========================================================================================


def header_sections(folder: Path, datasets: list[Dataset], meta: RunMetadata | None) -> list[str]:
    all_rows = [r for ds in datasets for r in ds.rows]
    first = all_rows[0]
    gpu = datasets[0].preds.hardware.gpu
    short = gpu_short(gpu)
    dates = sorted(r["measured_at"] for r in all_rows if r.get("measured_at"))
    out = [
        f"# {short} measurement runs, {dates[0][:10]}: reference-transformer steps vs the predictors",
        "",
        f"Generated by `.venv/bin/python {SCRIPT} {display_path(folder)}` (or without arguments, for "
        "every results folder) from the files in this folder; rerun it after adding `collect_*.csv` files instead "
        "of editing this page. Across GPUs: `../gpu_measurements.md`.",
        "",
        "**What this is and is not.** These measurements time and meter a *reference PyTorch transformer* "
        f"(`llmco2_vllm/measure/collect/`: the real models' shapes, random weights, bf16) on one {short}, not vLLM. They test "
        "the predictors' physics (FLOPs, bytes, power) on real hardware; they do not say how accurate the plugin is "
        "inside vLLM, whose kernels, fused MoE, paged KV cache and scheduler differ.",
        "",
        "## How the data was made",
        "",
        f"- Machine: one {(meta.device_description if meta else None) or first['gpu']} (NVML name `{first['gpu']}`; catalog entry "
        f"`{gpu.name}`: {gpu.peak_flops('bf16') / 1e12:g} TFLOP/s bf16 dense, "
        f"{gpu.memory_bandwidth_bytes_per_second / 1e12:g} TB/s, "
        f"TDP {gpu.tdp_watts:g} W), enforced power limit {first['power_limit_w']:g} W, driver {first['driver_version']}, "
        f"CUDA {first['cuda_version']}, torch {first['torch_version']} (from the CSV columns); lent through the "
        f"project's device tool. Measured {dates[0]} to {dates[-1]} (UTC, `measured_at`).",
        "- Each row is one step shape, a uniform batch. Prefill: `batch` requests each computing `prompt_tokens` new "
        "tokens after `context_tokens` cached ones (all prefill rows here start from an empty cache). Decode: `batch` "
        "requests each computing 1 token over `context_tokens` of context. The step (all layers; the LM head on the "
        "last position of each request) is repeated with `torch.cuda.synchronize()` after each step for a window of "
        ">= 1 s, and the window's energy is read from NVML's energy counter through `EnergyMeter`; "
        "`seconds_per_step` and `energy_j_per_step` are window totals / steps. Idle power is measured for 5 s before "
        "each model's sweep, weights loaded and CUDA context open.",
        "",
        "Runs (repository root, on the device; " + ("commands as recorded in `run.json`, " if meta else "")
        + "console output in the log named):",
        "",
    ]
    probe_files = [name for name in ("nvml_probe.json", "nvml_trace.csv") if (folder / name).exists()]
    for rec, members in run_records(folder, datasets, meta):
        stamps = sorted(r["measured_at"] for ds in members for r in ds.rows if r.get("measured_at"))
        if rec is None:
            head, command = "unrecorded run", "command not recorded here, see the header of `benchmarks/gpu_collect.sh`"
        else:
            head = f"`{rec.log}`" if rec.log and (folder / rec.log).exists() else "run log not in this folder"
            command = f"`{rec.command}`" if rec.command else "command not recorded"
        with_probe = rec is not None and rec.nvml_probe and probe_files
        out.append(f"- {head} ({stamps[0][11:19]}-{stamps[-1][11:19]} UTC): {command} -> "
                   + ", ".join(f"`{ds.path.name}`" for ds in members)
                   + (f"; also {', '.join(f'`{name}`' for name in probe_files)}" if with_probe else "")
                   + (f". Note: {rec.note}." if rec is not None and rec.note else ""))
    out += [
        "",
        "| file | model | layers measured | how steps ran | MoE experts | idle W |",
        "| --- | --- | ---: | --- | --- | ---: |",
    ]
    for ds in datasets:
        r0 = ds.rows[0]
        experts = (r0["experts_kernel"] or "per-expert loop") if ds.preds.is_moe else "-"
        out.append(f"| `{ds.path.name}` | {ds.preds.model_name} | {r0['layers_measured']}/{r0['layers_total']} | "
                   f"{modes(ds)} | {experts} | {r0['idle_watts']:.1f} |")
    scaled = [ds for ds in datasets if any(r["layers_measured"] < r["layers_total"] for r in ds.rows)]
    out.append("")
    if scaled:
        out.append(
            "- Layer scaling: " + ", ".join(f"`{ds.label}` measured {ds.rows[0]['layers_measured']} of "
                                             f"{ds.rows[0]['layers_total']} layers" for ds in scaled)
            + f" (GPU memory), so each of {'its' if len(scaled) == 1 else 'their'} shapes also timed the non-layer part "
            "alone (head window) and "
            "`collect` extrapolated: full = head + (measured - head) / L_measured x L_total, for seconds and "
            "joules (raw values in the `measured_*` / `head_*` columns). Every other file measured all layers."
            + (" `complete` is True on every row." if all(r["complete"] == "True" for r in all_rows) else ""))
        out.append("")
    out += ["Caveats (the `llmco2_vllm.measure.collect` docstring, and what the data shows):", ""]
    eager_files = [ds for ds in datasets if not any(r["graphed"] for r in ds.rows)]
    mixed_files = [ds for ds in datasets if any(r["graphed"] for r in ds.rows) and not all(r["graphed"] for r in ds.rows)]
    if eager_files or mixed_files:
        where = ([f"every row of {', '.join(f'`{ds.path.name}`' for ds in eager_files)}"] if eager_files else []) + (
            [f"prefill above {CUDA_GRAPH_MAX_TOKENS} tokens in the `*_graphs` files, as in vLLM, whose CUDA graphs "
             "cover small steps only"]
            if mixed_files else [])
        out.append(f"- **Eager PyTorch** in rows marked `eager` ({'; '.join(where)}): every kernel is launched "
                   "from Python.")
        for ds in eager_files:
            if ds.preds.is_moe:
                continue
            flat = decode_flatness(ds.rows)
            for context, points, flat_to in flat:
                listing = ", ".join(f"{value:.1f}" for _, value in points)
                batches = ", ".join(str(batch) for batch, _ in points)
                out.append(f"  - `{ds.label}` eager decode, context {context}: {listing} ms per step at batch "
                           f"{batches}" + (f", flat up to batch {flat_to}." if flat_to > points[0][0] else "."))
            if any(flat_to > points[0][0] for _, points, flat_to in flat):
                out.append(
                    "  - A step time that stays put while the batch, and the work, grow many-fold means these steps "
                    "are **kernel-launch (CPU) bound**: the GPU waits for Python between kernels. Their time, and "
                    "the idle-power energy over it, describe eager PyTorch, not the GPU; compare the CUDA-graph rows.")
    loop = [ds for ds in datasets if ds.moe_loop]
    if loop:
        rows = [r for ds in loop for r in ds.rows]
        times = [r["seconds_per_step"] for r in rows]
        over = [r["seconds_per_step"] / r["an_s"] for r in rows]
        out.append(
            f"- **MoE with a per-expert Python loop ({', '.join(f'`{ds.label}`' for ds in loop)}): not representative "
            f"of anything vLLM does.** The first run's reference MoE layer read the per-expert token counts to the host "
            f"(one sync per layer) and ran each expert's matmuls in a Python loop: {min(times):.2f}-{max(times):.2f} s "
            f"per step, {min(over):.0f}-{max(over):.0f}x the analytic time. Listed for completeness, excluded from "
            f"every accuracy number.")
    grouped = [ds for ds in datasets if ds.moe_grouped]
    if grouped:
        out.append(
            f"- **MoE with grouped expert products ({', '.join(f'`{ds.label}`' for ds in grouped)})**: all experts "
            "of a layer in two `torch._grouped_mm` calls, no host sync, so decode is graph-captured. Much closer to "
            "serving than the loop, but the routing around it (softmax, top-k, sort, gather, weighted scatter) is "
            "several separate PyTorch kernels per layer and the grouped GEMM is not vLLM's fused MoE kernel. Shown "
            "in a separate, indicative table, not in the accuracy claims.")
    out += [
        "- Uniform batches and a contiguous per-request KV cache (vLLM: packed variable-length batches, paged KV "
        "cache); attention through `torch.nn.functional.scaled_dot_product_attention` restricted to fused kernels "
        "(prefill: `is_causal` + `enable_gqa`; decode: query heads folded per KV head), not vLLM's paged "
        "FlashAttention/FlashInfer kernels; one GPU, no tensor parallelism; full attention in every layer; no "
        "sampling; random weights and tokens (so MoE routing is near-uniform, as the roofline assumes).",
        f"- Each shape was measured once, in windows of {min(r['window_seconds'] for r in all_rows):.1f}-"
        f"{max(r['window_seconds'] for r in all_rows):.1f} s of a counter that advances every ~100 ms: a few % "
        "of noise per row (next section).",
        "",
    ]
    return out


def nvml_section(folder: Path, probe: dict[str, Any] | None, gpu: GpuSpec, idle_range: tuple[float, float],
                 catalog_idle: float, window_range: tuple[float, float]) -> list[str]:
    if probe is None:
        return ["## NVML energy counter on this GPU", "", "No `nvml_probe.json` in this folder.", ""]
    read, pread = probe["energy_counter_read"], probe["power_read"]
    updates, busy = probe["counter_updates"], probe["busy_window"]
    idle_b, busy_p, idle_a = probe["idle_before_power"], probe["busy_power"], probe["idle_after_power"]
    period_ms = updates["interval_ms_p50"]
    same = busy["meter_energy_j"] == busy["raw_counter_energy_j"]
    lines = [
        "## NVML energy counter on this GPU (`benchmarks/nvml_probe.py`)",
        "",
        f"{' / '.join(f'`{n}`' for n in ('nvml_probe.json', 'nvml_trace.csv') if (folder / n).exists())}: "
        f"{probe['gpu_name']}, driver {probe['driver_version']}, "
        f"NVML {probe['nvml_version']}, enforced power limit {probe['power_limit_w']:g} W, catalog entry "
        f"`{probe['catalog_gpu']}`. The probe times {read['calls']} calls of each NVML read, then polls the counter and "
        f"the power reading every ~2-5 ms through {idle_b['seconds']:.0f} s idle, {busy_p['seconds']:.0f} s of "
        f"bf16 8192x8192 matrix products and {idle_a['seconds']:.0f} s idle."
        + ("" if probe["trace"] else " The polled trace (`nvml_trace.csv`) is not in this folder, so the table and "
           "findings use the probe's own summary and the lag of sampled power is not measured here."),
        "",
        "| what | value |",
        "| --- | --- |",
        f"| `nvmlDeviceGetTotalEnergyConsumption` call | p50 {read['p50_us'] / 1e3:.2f} ms, p99 "
        f"{read['p99_us'] / 1e3:.1f} ms, max {read['max_us'] / 1e3:.1f} ms |",
        f"| `nvmlDeviceGetPowerUsage` call | p50 {pread['p50_us']:.2f} µs, p99 {pread['p99_us']:.2f} µs |",
        f"| counter update period | p50 {period_ms:.1f} ms, p90 {updates['interval_ms_p90']:.1f} ms "
        f"({updates['changes']} changes in {updates['polls']} polls) |",
        f"| counter increment | min {updates['increment_mj_min'] / 1e3:.2f} J, p50 {updates['increment_mj_p50'] / 1e3:.2f} J |",
        f"| sampled-power update period | p50 {probe['power_updates']['interval_ms_p50']:.1f} ms |",
        f"| idle power (counter, CUDA context open) | {idle_b['counter_mean_w']:.1f} W |",
        f"| busy matmul throughput | {busy['matmul_tflops']:.0f} TFLOP/s bf16 |",
        f"| busy counter power over the window (incl. ramp) | {busy_p['counter_mean_w']:.0f} W |",
        f"| `EnergyMeter` window vs raw counter difference | {busy['meter_energy_j']:.3f} J vs "
        f"{busy['raw_counter_energy_j']:.3f} J ({'identical' if same else 'DIFFERENT'}) |",
        "",
        "Findings:",
        "",
        f"- **Reading the counter is slow: ~{read['p50_us'] / 1e3:.0f} ms (p99 {read['p99_us'] / 1e3:.0f} ms)**, "
        f"about {read['p50_us'] / max(pread['p50_us'], 1e-9):,.0f}x a power read, on this driver and lent machine (a "
        f"VM, per `energy_meter.py`; bare metal may be faster). Fine at window boundaries seconds apart "
        f"(`collect`: >= 1 s windows; the plugin: `calibration_window_seconds`, 5 s), not per engine step.",
        f"- **The counter advances every ~{period_ms:.0f} ms by that period's energy** "
        f"(~{updates['increment_mj_p50'] / 1e3:.0f} J at ~{idle_b['counter_mean_w']:.0f} W idle): the resolution is "
        f"in time, not a fixed energy quantum, and between updates the value is stale. A window's energy is "
        f"therefore off by up to one period of power at each end: up to about +-{period_ms / 10:.0f} % for a 1 s "
        f"window (s.d. ~{period_ms / 10 / math.sqrt(6):.0f} % for steady power), +-{period_ms / 50:.0f} % for 5 s. The "
        f"collect windows are {window_range[0]:.1f}-{window_range[1]:.1f} s and each shape was measured once, so single rows carry a few % of noise; "
        f"the medians below are less affected.",
        f"- **The `EnergyMeter` window equals the raw counter difference** ({'to the millijoule' if same else 'NOT'}).",
        f"- **Idle power is {idle_b['counter_mean_w']:.0f} W** with a CUDA context open; the collect runs measured "
        f"{idle_range[0]:.0f}-{idle_range[1]:.0f} W before their sweeps (`idle_watts`). "
        + (f"The catalog has no {gpu_short(gpu)} idle figure, so the predictors use the default "
           f"{100 * DEFAULT_IDLE_FRACTION_OF_TDP:g} % of TDP = "
           f"{catalog_idle:.0f} W." if gpu.idle_watts is None else f"The predictors use the catalog's {catalog_idle:.0f} W."),
    ]
    lag = probe["trace"]
    sum_counter = busy_p["counter_j"] + idle_a["counter_j"]
    sum_sampled = busy_p["integrated_power_j"] + idle_a["integrated_power_j"]
    if lag is None:
        lines.append(
            f"- **Sampled power trails the counter**: integrated over the busy window `nvmlDeviceGetPowerUsage` "
            f"gives {busy_p['integrated_power_j']:.0f} J against the counter's {busy_p['counter_j']:.0f} J "
            f"({100 * (busy_p['integrated_power_j'] / busy_p['counter_j'] - 1):+.0f} %; mean {busy_p['sampled_power_mean_w']:.0f} W "
            f"against {busy_p['counter_mean_w']:.0f} W), over the idle tail {idle_a['integrated_power_j']:.0f} J against "
            f"{idle_a['counter_j']:.0f} J, over both {sum_sampled:.0f} J against {sum_counter:.0f} J: delayed, not lost. "
            f"Without the trace the lag itself is not measured here.")
    else:
        lines.append(
            f"- **Sampled power lags the counter by ~{(lag['lag_up_s'] + lag['lag_down_s']) / 2:.1f} s** (half-way "
            f"crossing {lag['lag_up_s']:.2f} s after the counter's on the rise, {lag['lag_down_s']:.2f} s on the fall) "
            f"and ramps over {lag['sampled_rise_s']:.1f} s (10-90 %), where counter-derived power steps within one "
            f"update: `nvmlDeviceGetPowerUsage` behaves like a ~1 s moving average. Integrated over the busy window "
            f"it gives {busy_p['integrated_power_j']:.0f} J against the counter's {busy_p['counter_j']:.0f} J "
            f"({100 * (busy_p['integrated_power_j'] / busy_p['counter_j'] - 1):+.0f} %), over the idle tail "
            f"{idle_a['integrated_power_j']:.0f} J against {idle_a['counter_j']:.0f} J, over both {sum_sampled:.0f} J "
            f"against {sum_counter:.0f} J: delayed, not lost. Busy plateau: counter {lag['counter_busy_w']:.0f} W, "
            f"sampled {lag['sampled_busy_w']:.0f} W (limit {probe['power_limit_w']:g} W).")
    lines += [
        f"- **Busy matmuls reach {busy['matmul_tflops']:.0f} TFLOP/s**, "
        f"{100 * busy['matmul_tflops'] * 1e12 / gpu.peak_flops('bf16'):.0f} % of the {gpu.peak_flops('bf16') / 1e12:g} "
        f"TFLOP/s bf16 dense datasheet figure, at the {probe['power_limit_w']:g} W cap "
        f"(the roofline assumes 70 % for large GEMMs).",
        "",
    ]
    return lines


def predictors_section(datasets: list[Dataset]) -> list[str]:
    all_rows = [r for ds in datasets for r in ds.rows]
    analytic_dev = max(max(abs(r["an_s"] / r["predicted_seconds_per_step"] - 1),
                           abs(r["an_j"] / r["predicted_energy_j_per_step"] - 1))
                       for r in all_rows if math.isfinite(r["predicted_seconds_per_step"]))
    gnn_rows = [r for r in all_rows if math.isfinite(r["gnn_j"])]
    table_dev = max((abs(r["tab_j"] / r["gnn_j"] - 1) for r in gnn_rows), default=math.nan)
    notes = sorted({gnn_note(ds.preds) for ds in datasets})
    roofline = datasets[0].preds.analytic.roofline
    a = roofline.assumptions
    return [
        "## Predictors compared",
        "",
        f"- **analytic**: `AnalyticPredictor`, a roofline per operator: compute at {100 * a.compute_efficiency:.0f} % of "
        f"the datasheet peak, memory at {100 * a.memory_efficiency:.0f} % of peak bandwidth, "
        f"{a.kernel_launch_seconds * 1e6:g} µs per kernel as under CUDA graphs; power = idle + (TDP - idle) x "
        f"activity, activity {a.compute_power_fraction:g} when compute-bound and {a.memory_power_fraction:g} when "
        f"memory-bound. Catalog `{datasets[0].preds.hardware.gpu.name}`, idle {roofline.idle_watts:g} W (default {100 * DEFAULT_IDLE_FRACTION_OF_TDP:g} % of "
        f"TDP), the model as measured (bf16 weights and KV). Recomputed through the library, it matches the CSVs' "
        f"`predicted_*` columns within {100 * analytic_dev:.4f} % (their 6 significant digits).",
        f"- **GNN**, the plugin's default (`LLMCO2_PREDICTOR=gnn`): the shipped checkpoint "
        f"`llmco2_vllm/data/gnn_default.safetensors` applies a learned log correction to the analytic energy of each "
        f"phase; time is not learned (the analytic time is scaled by the same factor, so the GNN's ms column is not "
        f"an independent prediction). Computed with the full `GnnPredictor` and with the distilled table the plugin "
        f"runs inside vLLM (`DistilledGnnPredictor`): they agree within {100 * table_dev:.1g} % here (every shape lies "
        f"on the table's grid). " + "; ".join(notes) + ". It was trained on ML.ENERGY vLLM rows (A100/H100, "
        "whole-request energy, prompt length assumed 400) plus a few A40/V100/GH200 rows.",
        "- Both predictions are **total** GPU energy, idle power included (`Roofline._op_cost`: seconds x (idle + "
        "dynamic x activity)), so they compare directly with the counter. The *dynamic* columns subtract each side's "
        "own idle power x its own time (measured idle for the measurement, the predictor's idle for the prediction), "
        "separating the energy of the work from the energy of being powered for the step's duration.",
        "",
    ]


def per_shape_tables(ds: Dataset) -> list[str]:
    has_gnn = ds.preds.gnn is not None
    lines = [
        "| shape | run | measured ms | analytic ms | GNN ms | measured J | analytic J | GNN J | meas/analytic J | meas/GNN J |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in ds.rows:
        lines.append(
            f"| {shape_label(r)} | {r['mode']} | {ms(r['seconds_per_step'])} | {ms(r['an_s'])} | "
            f"{ms(r['gnn_s']) if has_gnn else '-'} | {fmt(r['energy_j_per_step'])} | {fmt(r['an_j'])} | "
            f"{fmt(r['gnn_j']) if has_gnn else '-'} | {ratio(r['energy_j_per_step'], r['an_j'])} | "
            f"{ratio(r['energy_j_per_step'], r['gnn_j'])} |")
    lines += [
        "",
        "| shape | measured W | analytic W | measured dyn J | analytic dyn J | GNN dyn J | roofline bound | achieved TFLOP/s | achieved TB/s | SM MHz | steps x window |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in ds.rows:
        lines.append(
            f"| {shape_label(r)} | {r['meas_w']:.0f} | {r['an_w']:.0f} | {fmt(r['meas_dyn_j'])} | {fmt(r['an_dyn_j'])} | "
            f"{fmt(r['gnn_dyn_j']) if has_gnn else '-'} | {r['bound']} | {fmt(r['tflops'])} | {fmt(r['tbs'])} | "
            f"{r['gpu_clock_mhz']:.0f} | {r['steps']} x {r['window_seconds']:.2f} s |")
    return lines


def metrics_table(groups: list[tuple[str, str, list[dict[str, Any]], bool]]) -> list[str]:
    lines = [
        "| data | phase | n | predictor | energy MAPE % | energy meas/pred (median) | time MAPE % | time meas/pred | dynamic-energy MAPE % | dynamic meas/pred | power meas/pred |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, phase, rows, has_gnn in groups:
        for name, key in (("analytic", "an"), ("GNN", "gnn")):
            if key == "gnn" and not has_gnn:
                continue
            m = error_summary(rows, key)
            lines.append(
                f"| {label} | {phase} | {m.n} | {name} | {m.energy_mape:.0f} | {m.energy_ratio:.2f} | "
                f"{m.time_mape:.0f} | {m.time_ratio:.2f} | {m.dynamic_mape:.0f} | {m.dynamic_ratio:.2f} | "
                f"{m.power_ratio:.2f} |")
    return lines


def eager_vs_graph(datasets: list[Dataset]) -> list[str]:
    """Same model measured eagerly and from CUDA graphs: the rows that changed."""
    lines: list[str] = []
    by_model: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_model.setdefault(ds.preds.model_name, []).append(ds)
    for model, group in by_model.items():
        eager = next((d for d in group if not any(r["graphed"] for r in d.rows)), None)
        graphed = next((d for d in group if any(r["graphed"] for r in d.rows)), None)
        if eager is None or graphed is None:
            continue
        index = {shape_label(r): r for r in eager.rows}
        pairs = [(index[shape_label(r)], r) for r in graphed.rows if r["graphed"] and shape_label(r) in index]
        if not pairs:
            continue
        kernels = {d.rows[0]["experts_kernel"] or "per-expert loop" for d in (eager, graphed)} if eager.preds.is_moe else set()
        lines += [
            f"`{eager.label}` (eager) vs `{graphed.label}` (CUDA graph), {model}, the shapes the second run replayed "
            f"from graphs" + (f" (the experts kernel changed too: {' -> '.join(sorted(kernels, key=lambda k: k != (eager.rows[0]['experts_kernel'] or 'per-expert loop')))})"
                              if len(kernels) > 1 else "") + ":",
            "",
            "| shape | eager ms | graph ms | analytic ms | eager J | graph J | analytic J | GNN J | graph W |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for e, g in pairs:
            lines.append(
                f"| {shape_label(g)} | {ms(e['seconds_per_step'])} | {ms(g['seconds_per_step'])} | {ms(g['an_s'])} | "
                f"{fmt(e['energy_j_per_step'])} | {fmt(g['energy_j_per_step'])} | {fmt(g['an_j'])} | {fmt(g['gnn_j'])} | "
                f"{g['meas_w']:.0f} |")
        lines.append("")
    return lines


def interpretation(datasets: list[Dataset]) -> list[str]:
    """Data-driven reading (numbers recomputed on every run)."""
    lines = ["## Reading the numbers", ""]
    scored = [r for ds in datasets for r in ds.scored]
    if scored:
        low_a = sum(r["energy_j_per_step"] > r["an_j"] for r in scored)
        low_g = sum(r["energy_j_per_step"] > r["gnn_j"] for r in scored if math.isfinite(r["gnn_j"]))
        n_g = sum(math.isfinite(r["gnn_j"]) for r in scored)
        big_pre = [r for r in scored if r["phase"] == "prefill" and r["bound"] == "compute"]
        graph_dec = [r for r in scored if r["phase"] == "decode" and r["graphed"]]
        a = datasets[0].preds.analytic.roofline.assumptions
        eager_dec = [r for r in scored if r["phase"] == "decode" and not r["graphed"]]
        verdicts = []
        for what, sel in (("CUDA-graph decode" if graph_dec else "decode", graph_dec or
                           [r for r in scored if r["phase"] == "decode"]),
                          ("prefill", [r for r in scored if r["phase"] == "prefill"])):
            sel = [r for r in sel if math.isfinite(r["gnn_j"])]
            if sel:
                e = [r["energy_j_per_step"] for r in sel]
                m_a, m_g = mape(e, [r["an_j"] for r in sel]), mape(e, [r["gnn_j"] for r in sel])
                verdicts.append(f"{'helps' if m_g < m_a else 'hurts'} {what} (energy MAPE {m_g:.0f} % against the "
                                f"analytic {m_a:.0f} %)")
        lines.append(
            f"In short: the analytic predictor is low on {low_a} of {len(scored)} dense rows and the GNN on {low_g} of "
            f"{n_g}. Its power model holds (median measured/predicted average power over the rows that are not "
            f"launch-bound eager decode: "
            f"{med([r for r in scored if r['phase'] == 'prefill' or r['graphed']], 'meas_w', 'an_w'):.2f}); "
            f"the error is in **time**: "
            + (f"compute-bound prefill takes {med(big_pre, 'seconds_per_step', 'an_s'):.2f}x the predicted time "
               f"(an effective compute efficiency of ~{a.compute_efficiency / med(big_pre, 'seconds_per_step', 'an_s'):.2f} "
               f"instead of {a.compute_efficiency:g} at the {big_pre[0]['power_limit_w']:g} W cap)" if big_pre else "")
            + (f", CUDA-graph decode {med(graph_dec, 'seconds_per_step', 'an_s'):.2f}x (memory efficiency "
               f"~{a.memory_efficiency / med(graph_dec, 'seconds_per_step', 'an_s'):.2f} instead of "
               f"{a.memory_efficiency:g}, kernel overheads included)" if graph_dec else "")
            + (", and eager decode far more (launch-bound)" if eager_dec else "") + ". "
            + (f"Over these rows the GNN's correction {' and '.join(verdicts)}. " if verdicts else "")
            + "Whether vLLM's kernels get closer to the roofline than this reference is not measured here.")
        lines.append("")
    for ds in datasets:
        rows = ds.scored
        if not rows:
            continue
        gpu = ds.preds.hardware.gpu
        peak, bandwidth = gpu.peak_flops("bf16"), gpu.memory_bandwidth_bytes_per_second
        pre = [r for r in rows if r["phase"] == "prefill" and not r["graphed"]]
        if pre:
            big = max(pre, key=lambda r: r["flops"])
            clock = big["gpu_clock_mhz"]
            pre_factor = statistics.median(r["gnn_factor"] for r in pre)
            right_way = (pre_factor - 1) * (med(pre, "energy_j_per_step", "an_j") - 1) > 0
            lines.append(
                f"- `{ds.label}` eager prefill: measured time {med(pre, 'seconds_per_step', 'an_s'):.2f}x the analytic "
                f"time (median), average power {med(pre, 'meas_w', 'an_w'):.2f}x: the energy gap "
                f"({med(pre, 'energy_j_per_step', 'an_j'):.2f}x) is a time gap, the power model holds for compute-bound "
                f"steps. The largest shape ({shape_label(big)}) runs at {big['tflops']:.0f} TFLOP/s = "
                f"{100 * big['tflops'] * 1e12 / peak:.0f} % of the datasheet peak (the roofline assumes "
                f"{100 * ds.preds.analytic.roofline.assumptions.compute_efficiency:.0f} %), with the "
                f"SM clock down to {clock:.0f} MHz at the {big['power_limit_w']:g} W limit (the peak is quoted at "
                f"{PEAK_CLOCK_MHZ:.0f} MHz, so at {clock:.0f} MHz it is ~{peak / 1e12 * clock / PEAK_CLOCK_MHZ:.0f} "
                f"TFLOP/s and the step reaches {100 * big['tflops'] * 1e12 / (peak * clock / PEAK_CLOCK_MHZ):.0f} % of "
                + (f"that). The GNN scales prefill energy by x{pre_factor:.2f} (median), "
                   f"{'the right way' if right_way else 'the wrong way'} here." if ds.preds.gnn else "that)."))
        eager = [r for r in rows if r["phase"] == "decode" and not r["graphed"]]
        if eager:
            def idle_share(r: dict[str, Any]) -> float:
                gap = r["energy_j_per_step"] - r["an_j"]
                return (r["idle_watts"] * r["seconds_per_step"] - r["idle_catalog_w"] * r["an_s"]) / gap

            by_batch = sorted(eager, key=lambda r: (r["batch_size"], r["context_tokens"]))
            lines.append(
                f"- `{ds.label}` eager decode: energy {med(eager, 'energy_j_per_step', 'an_j'):.2f}x the analytic "
                f"prediction (median), time {med(eager, 'seconds_per_step', 'an_s'):.2f}x, average power "
                f"{med(eager, 'meas_w', 'an_w'):.2f}x. The under-prediction is a **time** under-prediction: the eager "
                f"steps sit on the ~13 ms launch floor while the roofline assumes graph launches; the GPU idles between "
                f"kernels, so its average power is *below* the prediction ({min(r['meas_w'] for r in eager):.0f}-"
                f"{max(r['meas_w'] for r in eager):.0f} W measured, {min(r['an_w'] for r in eager):.0f}-"
                f"{max(r['an_w'] for r in eager):.0f} W predicted). Idle power x the extra time is "
                f"{100 * idle_share(by_batch[0]):.0f} % of the energy gap at {shape_label(by_batch[0])} and "
                f"{100 * idle_share(by_batch[-1]):.0f} % at {shape_label(by_batch[-1])}.")
        graphed = [r for r in rows if r["phase"] == "decode" and r["graphed"]]
        if graphed:
            e_graphed = [r["energy_j_per_step"] for r in graphed]
            mape_a = mape(e_graphed, [r["an_j"] for r in graphed])
            mape_g = mape(e_graphed, [r["gnn_j"] for r in graphed]) if ds.preds.gnn else math.nan
            gnn_med = med(graphed, "energy_j_per_step", "gnn_j") if ds.preds.gnn else math.nan
            verdict = ("lands closer here" if mape_g < mape_a
                       else "overshoots here" if gnn_med < 1 else "does not land closer here")
            small = min(graphed, key=lambda r: r["bytes"])
            large = max(graphed, key=lambda r: r["bytes"])
            factors = sorted((r["batch_size"], r["context_tokens"], r["gnn_factor"]) for r in graphed)
            lines.append(
                f"- `{ds.label}` decode from CUDA graphs: energy {med(graphed, 'energy_j_per_step', 'an_j'):.2f}x the "
                f"analytic prediction (median), time {med(graphed, 'seconds_per_step', 'an_s'):.2f}x, average power "
                f"{med(graphed, 'meas_w', 'an_w'):.2f}x. Again the power model is about right and the time is short: "
                f"{shape_label(small)} moves {small['bytes'] / 1e9:.1f} GB in {small['seconds_per_step'] * 1e3:.2f} ms = "
                f"{small['tbs']:.2f} TB/s ({100 * small['tbs'] * 1e12 / bandwidth:.0f} % of the "
                f"{bandwidth / 1e12:g} TB/s datasheet bandwidth) and {shape_label(large)} "
                f"{large['bytes'] / 1e9:.0f} GB at {large['tbs']:.2f} TB/s ({100 * large['tbs'] * 1e12 / bandwidth:.0f} %), "
                f"where the roofline assumes {100 * ds.preds.analytic.roofline.assumptions.memory_efficiency:.0f} % plus "
                f"{ds.preds.analytic.roofline.assumptions.kernel_launch_seconds * 1e6:g} µs for each of its "
                f"{ds.preds.analytic.roofline.launches.sum():.0f} kernels. "
                + (f"The GNN scales decode energy by x{factors[0][2]:.2f} at batch {factors[0][0]} up to "
                   f"x{factors[-1][2]:.2f} at batch {factors[-1][0]} (learned from ML.ENERGY's vLLM rows, where "
                   f"large-batch decode costs more than the roofline says), which {verdict}: energy "
                   f"{gnn_med:.2f}x the GNN (median), MAPE {mape_g:.0f} % against the analytic {mape_a:.0f} %."
                   if ds.preds.gnn else ""))
    return lines


def moe_interpretation(datasets: list[Dataset]) -> list[str]:
    lines = []
    for ds in datasets:
        if not ds.moe_grouped:
            continue
        graphed = [r for r in ds.rows if r["phase"] == "decode" and r["graphed"]]
        pre = [r for r in ds.rows if r["phase"] == "prefill" and not r["graphed"]]
        text = f"- `{ds.label}` (MoE, grouped expert products; indicative only): "
        if graphed:
            b1 = min(graphed, key=lambda r: (r["batch_size"], r["context_tokens"]))
            text += (f"decode from CUDA graphs takes {med(graphed, 'seconds_per_step', 'an_s'):.2f}x the analytic time "
                     f"(median); at {shape_label(b1)} {b1['seconds_per_step'] * 1e3:.1f} ms against "
                     f"{b1['an_s'] * 1e3:.1f} ms predicted while moving only {b1['bytes'] / 1e9:.1f} GB: the step is "
                     f"bound by its number of small kernels (routing and expert bookkeeping in {ds.rows[0]['layers_total']} "
                     f"layers), not by bandwidth. ")
        if ds.rows[0]["layers_measured"] < ds.rows[0]["layers_total"]:
            text += (f"({ds.rows[0]['layers_measured']} of the {ds.rows[0]['layers_total']} layers measured, the rest "
                     "extrapolated per layer.) ")
        if pre:
            big = max(pre, key=lambda r: r["flops"])
            text += (f"Eager prefill takes {med(pre, 'seconds_per_step', 'an_s'):.2f}x the analytic time; the largest "
                     f"shape reaches {big['tflops']:.0f} TFLOP/s, far below dense GEMMs, as "
                     f"{ds.preds.analytic.model.num_experts} experts x "
                     f"{ds.preds.analytic.model.moe_intermediate_size}-wide products are small. ")
        text += ("How much of this vLLM's fused MoE kernel would recover is not measured here; the roofline's "
                 "70 %-of-peak for expert GEMMs and its kernel count for MoE layers are both optimistic for this "
                 "reference.")
        lines.append(text)
    return lines


def build_report(folder: Path, datasets: list[Dataset], probe: dict[str, Any] | None, meta: RunMetadata | None,
                 plot_name: str | None) -> str:
    """The folder's README; ``plot_name``: its measured-vs-predicted figure, None when none was drawn."""
    all_rows = [r for ds in datasets for r in ds.rows]
    idles = [r["idle_watts"] for r in all_rows if math.isfinite(r["idle_watts"])]
    catalog_idle = datasets[0].preds.analytic.roofline.idle_watts
    out = header_sections(folder, datasets, meta)
    windows = [r["window_seconds"] for r in all_rows if math.isfinite(r["window_seconds"])]
    out += nvml_section(folder, probe, datasets[0].preds.hardware.gpu, (min(idles), max(idles)), catalog_idle,
                        (min(windows), max(windows)))
    out += predictors_section(datasets)

    scored_groups = phase_groups(datasets, lambda ds: ds.scored)
    out += [
        "## Summary: dense models",
        "",
        "MAPE = mean |predicted - measured| / measured; meas/pred is the median ratio (> 1: the predictor is low); "
        "same rows for both predictors. Errors against a reference PyTorch transformer on one GPU, each shape "
        "measured once: **not** the plugin's accuracy in vLLM. Rows from CUDA graphs (all decode rows of the "
        "`*_graphs` files) are the closest to how vLLM runs decode; eager decode rows mostly measure Python launch "
        "overhead.",
        "",
    ]
    out += metrics_table(scored_groups) if scored_groups else ["No dense-model rows."]
    out.append("")
    moe_groups = phase_groups([ds for ds in datasets if ds.moe_grouped], lambda ds: ds.rows)
    if moe_groups:
        out += ["MoE with grouped expert products, **indicative only** (reference MoE, not vLLM's fused kernel; "
                "not an accuracy claim):", ""]
        out += metrics_table(moe_groups)
        out.append("")
    out += eager_vs_graph(datasets)
    if plot_name:
        out += [f"![measured vs predicted J/step]({plot_name})", "",
                "Hollow markers: MoE rows, not scored. Dashed: measured = predicted; dotted: +-30 %.", ""]
    out += interpretation(datasets)
    out += moe_interpretation(datasets)
    if idles:
        idle_med, share, gap = idle_gap(datasets)
        scored = any(ds.scored for ds in datasets)
        size = "a small part of" if share < gap / 3 else "a sizeable part of"
        out.append(
            f"- Idle power: measured {min(idles):.0f}-{max(idles):.0f} W against the predictors' {catalog_idle:.0f} W "
            f"default; at ~{idle_med:.0f} W that is {idle_med - catalog_idle:.0f} W x the step time"
            + (f", {size} the gaps above (a median {100 * share:.0f} % of the measured energy of the dense rows, "
               f"against a median {100 * gap:.0f} % under-prediction by the analytic model)" if scored else "")
            + f". An {gpu_short(datasets[0].preds.hardware.gpu)} "
            f"`idle_watts` of ~{statistics.median(idles):.0f} W "
            f"(CUDA context open) in `gpus.csv` would remove it.")
    out += ["", "## Per shape", "",
            "Second table of each file: average power (J/s), dynamic energy (energy - idle power x step time), the "
            "roofline's binding resource, what the step achieved (the roofline's FLOPs and bytes divided by the "
            "MEASURED time) and the SM clock sampled mid-window.", ""]
    for ds in datasets:
        scored = "" if ds.scored else " (MoE: not scored)"
        out += [f"### `{ds.label}`: {ds.preds.model_name}{scored}", "",
                f"{modes(ds)[0].upper() + modes(ds)[1:]}; idle {ds.rows[0]['idle_watts']:.1f} W; attention: "
                + ", ".join(sorted({r['attention_call'] for r in ds.rows}))
                + (f"; experts: {ds.rows[0]['experts_kernel'] or 'per-expert loop (column absent)'}" if ds.preds.is_moe else "")
                + ".", ""]
        out += per_shape_tables(ds)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ==========================================================================================
# Index across GPUs
# ==========================================================================================


def index_overview(results: list[FolderResult]) -> list[str]:
    out = ["## What was measured where", "",
           "| GPU | folder | file | model | layers measured | steps |",
           "| --- | --- | --- | --- | ---: | --- |"]
    for res in results:
        for ds in res.datasets:
            r0 = ds.rows[0]
            out.append(
                f"| {res.short} | [`{res.folder.name}`]({res.folder.name}/README.md) | `{ds.path.name}` | "
                f"{ds.preds.model_name} | {r0['layers_measured']}/{r0['layers_total']} | {short_modes(ds)} |")
    out.append("")
    for res in results:
        gpu = res.gpu
        rows = [r for ds in res.datasets for r in ds.rows]
        stamps = sorted(r["measured_at"] for r in rows if r.get("measured_at"))
        r0 = rows[0]
        scaled = [ds for ds in res.datasets if ds.rows[0]["layers_measured"] < ds.rows[0]["layers_total"]]
        missing = [rec.note for rec in (res.meta.runs if res.meta else ()) if rec.note]
        out.append(
            f"- {res.short}: NVML name `{r0['gpu']}`, catalog entry `{gpu.name}` ({gpu.peak_flops('bf16') / 1e12:g} "
            f"TFLOP/s bf16 dense, {gpu.memory_bandwidth_bytes_per_second / 1e12:g} TB/s, {gpu.memory_bytes / 1e9:g} GB, "
            f"TDP {gpu.tdp_watts:g} W); measured {stamps[0][:10]} {stamps[0][11:16]}-{stamps[-1][11:16]} UTC, power limit "
            f"{r0['power_limit_w']:g} W, driver {r0['driver_version']}, CUDA {r0['cuda_version']}, torch "
            f"{r0['torch_version']}; NVML probe: {'yes' if res.probe else 'no'}"
            + ("; layer scaling (GPU memory): " + ", ".join(
                f"{ds.preds.model_name.split('/')[-1]} {ds.rows[0]['layers_measured']}/{ds.rows[0]['layers_total']}"
                for ds in scaled) + " layers measured, the rest extrapolated per layer from a head window "
               "(`llmco2_vllm.measure.collect`, \"Layer scaling\")" if scaled else "")
            + (f"; {'; '.join(missing)}" if missing else "") + ".")
    out.append("")
    return out


def headline_prefill_note(results: list[FolderResult]) -> str:
    rows = [r for res in results for ds in res.graph_dense for r in ds.rows if r["phase"] == "prefill"]
    shapes = sorted({shape_label(r) for r in rows})
    graphed = sorted({shape_label(r).removeprefix("prefill ") for r in rows if r["graphed"]})
    return (f"Of the {len(shapes)} prefill shapes only {', '.join(graphed) or 'none'} "
            f"{'does' if len(graphed) == 1 else 'do'} (the others exceed {CUDA_GRAPH_MAX_TOKENS} tokens and run "
            "eagerly, as in vLLM).")


def index_headline(results: list[FolderResult]) -> list[str]:
    out = ["## Headline: dense models, CUDA-graph runs (`*_graphs` files)", "",
           "Energy per step against each predictor on the measured GPU's catalog entry. MAPE = mean |predicted - "
           "measured| / measured; meas/pred = median ratio (> 1: predictor low). "
           + ("Every decode row replays a CUDA graph. " if all(
               r["graphed"] for res in results for ds in res.graph_dense for r in ds.rows if r["phase"] == "decode")
              else "Not every decode row replays a CUDA graph (see `cuda_graph`). ")
           + headline_prefill_note(results) + " "
           "Time meas/pred is the analytic model's (the GNN does not learn time).", "",
           "| GPU | model | phase | n | analytic MAPE % | analytic meas/pred | GNN MAPE % | GNN meas/pred | time meas/pred (analytic) | GNN correction |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for res in results:
        graph = res.graph_dense
        if not graph:
            continue
        gnn = graph[0].preds.gnn
        scale = ("-" if gnn is None else f"x{gnn.correction_scale:g} ({'unseen' if gnn.unseen_hardware else 'training'} GPU)")
        groups = [(ds.preds.model_name.split("/")[-1], ds.rows) for ds in graph]
        if len(graph) > 1:
            groups.append(("all dense", [r for ds in graph for r in ds.rows]))
        for name, rows in groups:
            for phase in ("prefill", "decode"):
                sel = [r for r in rows if r["phase"] == phase]
                if not sel:
                    continue
                e = [r["energy_j_per_step"] for r in sel]
                bold = "**" if name == "all dense" else ""
                g = ([r["gnn_j"] for r in sel] if gnn is not None else None)
                out.append(
                    f"| {res.short} | {bold}{name}{bold} | {phase} | {len(sel)} | {mape(e, [r['an_j'] for r in sel]):.0f} | "
                    f"{median_ratio(e, [r['an_j'] for r in sel]):.2f} | {mape(e, g):.0f} | {median_ratio(e, g):.2f} | "
                    f"{med(sel, 'seconds_per_step', 'an_s'):.2f} | {scale} |" if g else
                    f"| {res.short} | {name} | {phase} | {len(sel)} | {mape(e, [r['an_j'] for r in sel]):.0f} | "
                    f"{median_ratio(e, [r['an_j'] for r in sel]):.2f} | - | - | {med(sel, 'seconds_per_step', 'an_s'):.2f} | - |")
    out.append("")
    for res in results:
        rows = [r for ds in res.graph_dense for r in ds.rows]
        if not rows:
            continue
        dec = [r for r in rows if r["phase"] == "decode"]
        pre = [r for r in rows if r["phase"] == "prefill"]
        low_a = sum(r["energy_j_per_step"] > r["an_j"] for r in rows)
        low_g = sum(r["energy_j_per_step"] > r["gnn_j"] for r in rows)
        big_dec = [r for r in dec if r["batch_size"] == max(x["batch_size"] for x in dec)]
        small_dec = [r for r in dec if r["batch_size"] == min(x["batch_size"] for x in dec)]
        grows = (statistics.median(r["gnn_factor"] for r in big_dec)
                 > statistics.median(r["gnn_factor"] for r in small_dec))
        power = med(rows, "meas_w", "an_w")
        out.append(
            f"- {res.short}: the analytic model is low on {low_a} of {len(rows)} rows (median measured/predicted "
            f"average power {power:.2f}, time {med(rows, 'seconds_per_step', 'an_s'):.2f}"
            + (": the power is right, the time short" if abs(power - 1) < 0.1 < med(rows, "seconds_per_step", "an_s") - 1
               else "") + f"), the GNN on {low_g}. "
            f"The GNN's decode correction {'grows' if grows else 'does not grow'} with the batch: at batch "
            f"{big_dec[0]['batch_size']} it predicts "
            f"x{statistics.median(r['gnn_factor'] for r in big_dec):.2f} the analytic energy (median) where the "
            f"measurement is x{med(big_dec, 'energy_j_per_step', 'an_j'):.2f}; on prefill it predicts "
            f"x{statistics.median(r['gnn_factor'] for r in pre):.2f} where the measurement is "
            f"x{med(pre, 'energy_j_per_step', 'an_j'):.2f}.")
    out.append("")
    return out


def index_compare(results: list[FolderResult]) -> list[str]:
    """Same file label, model and shape measured on two GPUs (the CUDA-graph runs)."""
    out: list[str] = []
    for pair in gpu_pairs(results):
        # a: the lower-bandwidth GPU; ratios are a / b (> 1: slower / more energy on a).
        a, b = pair.slow, pair.fast
        bw, pk = pair.bandwidth_ratio, pair.peak_ratio
        out += [f"## {a.short} vs {b.short}, same shapes", "",
                f"Ratios {a.short} / {b.short} (> 1: the {a.short} takes longer / more energy) for the shapes both "
                f"`*_graphs` runs measured. Datasheet: bandwidth {b.short}/{a.short} = "
                f"{b.gpu.memory_bandwidth_bytes_per_second / 1e12:g}/{a.gpu.memory_bandwidth_bytes_per_second / 1e12:g} "
                f"TB/s = {1 / bw:.2f}x, bf16 peak {1 / pk:.2f}x, TDP {a.gpu.tdp_watts:g} W both."
                if a.gpu.tdp_watts == b.gpu.tdp_watts else
                f"Datasheet: bandwidth ratio {1 / bw:.2f}x, bf16 peak ratio {1 / pk:.2f}x.", "",
                f"| model | phase | n | measured time ratio, median (range) | analytic time ratio, median (range) | "
                f"measured energy ratio | analytic energy ratio | decode achieved TB/s {a.short} / {b.short} (% of datasheet) |",
                "| --- | --- | ---: | --- | --- | ---: | ---: | --- |"]
        ratios = phase_ratios(pair)
        for r in ratios:
            moe = " (MoE, indicative)" if r.is_moe else ""
            tbs = (f"{r.tbs[0]:.2f} / {r.tbs[1]:.2f} ({r.bandwidth_percent[0]:.0f} % / {r.bandwidth_percent[1]:.0f} %)"
                   if r.tbs else "")
            out.append(
                f"| {r.model}{moe} | {r.phase} | {r.n} | "
                f"{statistics.median(r.time):.2f} ({min(r.time):.2f}-{max(r.time):.2f}) | "
                f"{statistics.median(r.predicted_time):.2f} ({min(r.predicted_time):.2f}-{max(r.predicted_time):.2f}) | "
                f"{statistics.median(r.energy):.2f} | {statistics.median(r.predicted_energy):.2f} | {tbs or '-'} |")
        out.append("")
        labels = {ds.label for ds, _, _ in pair.matched}
        layer_note = [f"{d.preds.model_name.split('/')[-1]} on the {res.short} {d.rows[0]['layers_measured']}/"
                      f"{d.rows[0]['layers_total']}" for res in (a, b) for d in res.datasets
                      if d.label in labels and d.rows[0]["layers_measured"] < d.rows[0]["layers_total"]]
        for r in ratios:
            if r.phase != "decode" or r.is_moe:
                continue
            m, lo, hi = statistics.median(r.time), min(r.time), max(r.time)
            pred = statistics.median(r.predicted_time)
            fa, fb = r.bandwidth_percent
            faster = (f"the {b.short} is faster" if m > 1 else f"the {b.short} is NOT faster")
            vs_model = ("by less than the analytic model predicts, so the model overstates the "
                        f"{b.short}'s advantage" if 1 < m < pred else
                        "by more than the analytic model predicts" if m > pred else "")
            out.append(
                f"- {r.model} decode: {faster}{', ' + vs_model if vs_model else ''}: the {a.short} takes {m:.2f}x the "
                f"{b.short}'s time (median, {lo:.2f}-{hi:.2f}) where the analytic model predicts {pred:.2f}x (the "
                f"datasheet bandwidth ratio {1 / bw:.2f}x, diluted by the fixed per-kernel time it adds). The "
                f"{b.short} reaches {fb:.0f} % of its datasheet bandwidth, the {a.short} {fa:.0f} % (median achieved "
                f"TB/s). Energy per step: {statistics.median(r.energy):.2f}x measured, "
                f"{statistics.median(r.predicted_energy):.2f}x predicted.")
        for r in ratios:
            if r.phase != "decode" or not r.is_moe:
                continue
            m, pred = statistics.median(r.time), statistics.median(r.predicted_time)
            out.append(
                f"- {r.model} decode (MoE, indicative): {a.short}/{b.short} time {m:.2f} against {pred:.2f} predicted"
                + (": the reference MoE decode step gains little from the extra bandwidth, being bound by its "
                   "many small routing and expert kernels (folder READMEs)." if m - 1 < (pred - 1) / 2 else "."))
        mt, pt = compute_bound_prefill_ratios(pair)
        if mt:
            same = pk == 1 and len({r["power_limit_w"] for res in (a, b) for ds in res.datasets for r in ds.rows}) == 1
            out.append(f"- Compute-bound prefill (dense, {len(mt)} shapes): {a.short}/{b.short} time "
                       f"{statistics.median(mt):.2f} (median, {min(mt):.2f}-{max(mt):.2f}), analytic "
                       f"{statistics.median(pt):.2f}"
                       + (": same bf16 peak and the same power limit, same speed." if same else "."))
        if layer_note:
            out.append(f"- Layer scaling enters these ratios: {', '.join(layer_note)} layers measured.")
        out.append("")
    return out


def index_nvml(results: list[FolderResult]) -> list[str]:
    with_probe = [res for res in results if res.probe]
    if not with_probe:
        return []

    def cells(fn) -> str:
        return " | ".join(fn(res) for res in with_probe)

    def lag(res: FolderResult) -> str:
        t = res.probe["trace"]
        return (f"~{(t['lag_up_s'] + t['lag_down_s']) / 2:.1f} s (rise {t['lag_up_s']:.2f} s, fall {t['lag_down_s']:.2f} s)"
                if t else "not measured (no `nvml_trace.csv`)")

    def plateau(res: FolderResult) -> str:
        t = res.probe["trace"]
        return f"{t['counter_busy_w']:.0f} W vs {t['sampled_busy_w']:.0f} W" if t else "- (no trace)"

    def idle_collect(res: FolderResult) -> str:
        idles = [r["idle_watts"] for ds in res.datasets for r in ds.rows if math.isfinite(r["idle_watts"])]
        return f"{min(idles):.0f}-{max(idles):.0f} W (predictors: {res.datasets[0].preds.analytic.roofline.idle_watts:.0f} W)"

    def busy(res: FolderResult) -> str:
        b = res.probe["busy_power"]
        return (f"{b['counter_mean_w']:.0f} W vs {b['sampled_power_mean_w']:.0f} W; energy {b['counter_j']:.0f} J vs "
                f"{b['integrated_power_j']:.0f} J ({100 * (b['integrated_power_j'] / b['counter_j'] - 1):+.0f} %)")

    def both(res: FolderResult) -> str:
        b, a = res.probe["busy_power"], res.probe["idle_after_power"]
        return f"{b['counter_j'] + a['counter_j']:.0f} J vs {b['integrated_power_j'] + a['integrated_power_j']:.0f} J"

    def matmul(res: FolderResult) -> str:
        tf = res.probe["busy_window"]["matmul_tflops"]
        return f"{tf:.0f} TFLOP/s ({100 * tf * 1e12 / res.gpu.peak_flops('bf16'):.0f} % of datasheet)"

    def meter(res: FolderResult) -> str:
        b = res.probe["busy_window"]
        return "identical" if b["meter_energy_j"] == b["raw_counter_energy_j"] else "DIFFERENT"

    p = lambda res: res.probe  # noqa: E731
    out = ["## NVML energy counter, side by side (`benchmarks/nvml_probe.py`)", "",
           "| | " + " | ".join(f"{res.short} (`{res.probe['gpu_name']}`)" for res in with_probe) + " |",
           "| --- | " + " | ".join("---" for _ in with_probe) + " |",
           "| `nvmlDeviceGetTotalEnergyConsumption` call p50 / p99 | "
           + cells(lambda r: f"{p(r)['energy_counter_read']['p50_us'] / 1e3:.2f} ms / {p(r)['energy_counter_read']['p99_us'] / 1e3:.1f} ms") + " |",
           "| `nvmlDeviceGetPowerUsage` call p50 | " + cells(lambda r: f"{p(r)['power_read']['p50_us']:.2f} µs") + " |",
           "| counter update period p50 / p90 | "
           + cells(lambda r: f"{p(r)['counter_updates']['interval_ms_p50']:.1f} / {p(r)['counter_updates']['interval_ms_p90']:.1f} ms") + " |",
           "| counter increment p50 | " + cells(lambda r: f"{p(r)['counter_updates']['increment_mj_p50'] / 1e3:.1f} J") + " |",
           "| idle power, probe (counter, CUDA context open) | "
           + cells(lambda r: f"{p(r)['idle_before_power']['counter_mean_w']:.0f} W") + " |",
           "| idle power, collect runs (`idle_watts`) | " + cells(idle_collect) + " |",
           "| busy matmul window: counter vs sampled power (mean incl. ramp; energy) | " + cells(busy) + " |",
           "| busy + idle tail: counter vs sampled energy | " + cells(both) + " |",
           "| busy plateau: counter vs sampled power (trace) | " + cells(plateau) + " |",
           "| sampled power lags the counter by | " + cells(lag) + " |",
           f"| busy matmul throughput (bf16 8192^3, power limit {with_probe[0].probe['power_limit_w']:g} W) | " + cells(matmul) + " |",
           "| `EnergyMeter` window vs raw counter difference | " + cells(meter) + " |",
           ""]
    reads = [p(r)["energy_counter_read"]["p50_us"] / 1e3 for r in with_probe]
    periods = [p(r)["counter_updates"]["interval_ms_p50"] for r in with_probe]

    def span(lo, hi, f):
        return f"~{lo:{f}}" if f"{lo:{f}}" == f"{hi:{f}}" else f"{lo:{f}}-{hi:{f}}"

    out += [f"Both GPUs behave alike: the counter costs {span(min(reads), max(reads), '.1f')} ms per read (so it is "
            f"read at window boundaries, not per step), advances every {span(min(periods), max(periods), '.0f')} ms by "
            "that period's "
            "energy, and `nvmlDeviceGetPowerUsage` trails it (less energy during a busy window, more after; the sums "
            "agree), so sampled power must not be integrated over short windows.", ""]
    return out


def build_index(results: list[FolderResult]) -> str:
    probes = [res.probe for res in results if res.probe]
    period = statistics.median(p["counter_updates"]["interval_ms_p50"] for p in probes) if probes else math.nan
    windows = [r["window_seconds"] for res in results for ds in res.datasets for r in ds.rows
               if math.isfinite(r["window_seconds"])]
    out = ["# GPU measurements: reference-transformer steps vs the predictors", "",
           f"Generated by `.venv/bin/python {SCRIPT}` (no arguments) with the per-GPU READMEs it links; rerun it "
           "instead of editing this page. Details, per-shape tables and plots are in each folder's README.", "",
           "**These are not vLLM measurements.** `llmco2 collect` times and meters a *reference PyTorch transformer* "
           "(`llmco2_vllm/measure/collect/`: real model shapes, random weights, bf16, uniform batches, contiguous KV cache, "
           "SDPA attention, grouped-GEMM MoE) one step shape at a time, energy from NVML's counter. It tests the "
           "predictors' physics on real GPUs; how accurate the plugin is inside vLLM is not measured here.", ""]
    out += index_overview(results)
    out += index_headline(results)
    out += index_compare(results)
    out += index_nvml(results)
    out += ["## Caveats", "",
            "- Reference transformer, not vLLM: other kernels (no fused MoE, no paged FlashAttention/FlashInfer), "
            "uniform batches, one GPU, no sampling. MoE rows are indicative only and kept out of the headline.",
            f"- One window per shape, each shape measured once, windows {min(windows):.1f}-{max(windows):.1f} s: the "
            f"counter advances every ~{period:.0f} ms, so each window end can be off by up to one update's energy "
            f"(up to about +-{period / 10:.0f} % for a 1 s window, +-{period / 50:.0f} % for 5 s). Single rows carry a "
            "few % of noise; medians less. One machine per GPU type, minutes apart: GPU-to-GPU spread is not assessed.",
            f"- Prefill above {CUDA_GRAPH_MAX_TOKENS} tokens runs eagerly (Python kernel launches) in the `*_graphs` files, as vLLM's CUDA "
            "graphs also cover small steps only."
            + "".join(f" `{res.folder.name}` also holds all-eager files ("
                      + ", ".join(f"`{ds.path.name}`" for ds in res.datasets if not any(r["graphed"] for r in ds.rows))
                      + "), whose decode is launch-bound: kept out of the headline."
                      for res in results if any(not any(r["graphed"] for r in ds.rows) for ds in res.datasets)),
            "- Predictor idle power: " + "; ".join(
                f"{res.short} {res.datasets[0].preds.analytic.roofline.idle_watts:.0f} W"
                + (f" ({100 * DEFAULT_IDLE_FRACTION_OF_TDP:g} % of TDP, no catalog figure)" if res.gpu.idle_watts is None
                   else " (catalog)")
                for res in results)
            + "; the GPUs idled at the `idle_watts` above with a CUDA context open.",
            "- Layer scaling (models larger than the GPU's memory, listed in the overview) assumes the measured layers "
            "are representative of the rest.",
            ""]
    return "\n".join(out).rstrip() + "\n"
