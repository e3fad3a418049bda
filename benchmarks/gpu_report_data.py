"""Inputs and numbers of the GPU measurement report (``benchmarks/gpu_report.py``); no prose here.

Reads a results folder: every ``collect_*.csv`` (rows of ``llmco2 collect``), the ``run*.log``
consoles of ``benchmarks/gpu_collect.sh`` (which run wrote which CSV), ``run.json`` (how the runs
were started, on what; checked against the other files), ``nvml_probe.json`` and
``nvml_trace.csv`` (``benchmarks/nvml_probe.py``). Each row gets the predictions for its shape
(analytic roofline, GNN, distilled GNN table) and derived quantities (dynamic energy, power,
achieved FLOP/s and bytes/s, roofline bound); the functions below reduce rows to the numbers the
report's tables and sentences print.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmco2_vllm.predict.hardware import GpuSpec, Hardware, find_gpu, gpu_catalog  # noqa: E402
from llmco2_vllm.predict.model_description import load_model  # noqa: E402
from llmco2_vllm.predict.predictor import AnalyticPredictor  # noqa: E402
from llmco2_vllm.predict.step_shape import StepShape  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Metadata file of a results folder; the folders that have one are the report's default inputs.
RUN_METADATA_NAME = "run.json"
#: Eager decode whose step time stays within this factor as the batch grows is on the launch floor.
FLAT_DECODE_RATIO = 1.3

Row = dict[str, Any]


# ==========================================================================================
# Run metadata (run.json)
# ==========================================================================================


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """How one run of ``benchmarks/gpu_collect.sh`` was started: what the result files do not contain."""

    log: str | None  # its console log in the folder, or None when the log did not come back
    command: str | None
    csvs: tuple[str, ...]  # collect_*.csv files the run wrote (used when ``log`` is absent)
    nvml_probe: bool  # whether it ran benchmarks/nvml_probe.py
    note: str | None = None  # what did not come back, or another caveat about the run's files


@dataclasses.dataclass(frozen=True)
class RunMetadata:
    """A folder's ``run.json``: the device, the software and the runs; None for what nothing recorded."""

    path: Path
    date: str | None
    device: dict[str, Any]
    software: dict[str, Any]
    runs: tuple[RunRecord, ...]

    @property
    def device_description(self) -> str | None:
        return self.device.get("description")


def read_run_metadata(folder: Path) -> RunMetadata | None:
    path = folder / RUN_METADATA_NAME
    if not path.exists():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    runs = tuple(RunRecord(log=run.get("log"), command=run.get("command"), csvs=tuple(run.get("csvs") or ()),
                           nvml_probe=bool(run.get("nvml_probe")), note=run.get("note"))
                 for run in raw.get("runs") or ())
    return RunMetadata(path, raw.get("date"), dict(raw.get("device") or {}), dict(raw.get("software") or {}), runs)


def run_metadata_conflicts(meta: RunMetadata, datasets: list[Dataset], probe: dict[str, Any] | None) -> list[str]:
    """Where ``run.json`` contradicts the measured files (values it leaves null are not checked)."""
    rows = [r for ds in datasets for r in ds.rows]
    recorded: dict[str, set[Any]] = {
        "date": {r["measured_at"][:10] for r in rows if r.get("measured_at")},
        "device.nvml_name": {r["gpu"] for r in rows},
        "device.catalog_gpu": {ds.preds.hardware.gpu.name for ds in datasets},
        "device.gpus": {int(r["num_gpus"]) for r in rows},
        "device.power_limit_w": {r["power_limit_w"] for r in rows},
        "software.driver_version": {r["driver_version"] for r in rows},
        "software.cuda_version": {r["cuda_version"] for r in rows},
        "software.torch_version": {r["torch_version"] for r in rows},
    }
    if probe is not None:
        recorded["device.nvml_name"].add(probe["gpu_name"])
        recorded["device.catalog_gpu"].add(probe["catalog_gpu"])
        recorded["device.power_limit_w"].add(probe["power_limit_w"])
        recorded["software.driver_version"].add(probe["driver_version"])
        recorded["software.nvml_version"] = {probe["nvml_version"]}
    sections = {"device": meta.device, "software": meta.software}
    conflicts = []
    for key, found in recorded.items():
        section, _, name = key.partition(".")
        value = sections[section].get(name) if name else meta.date
        if value is not None and found != {value}:
            conflicts.append(f"{key} is {value!r}, the files say {sorted(map(str, found))}")
    present = {path.name for path in meta.path.parent.glob("collect_*.csv")}
    for run in meta.runs:
        conflicts += [f"a run lists {name}, which is not in the folder" for name in run.csvs if name not in present]
        if run.log and not (meta.path.parent / run.log).exists():
            conflicts.append(f"a run's log {run.log} is not in the folder (write null when it did not come back)")
    return conflicts


def first_measured_at(folder: Path) -> str:
    """Earliest ``measured_at`` of the folder's CSVs (orders the folders: the first-measured GPU first)."""
    stamps = []
    for path in folder.glob("collect_*.csv"):
        with path.open(newline="", encoding="utf-8") as handle:
            stamps += [row["measured_at"] for row in csv.DictReader(handle) if row.get("measured_at")]
    return min(stamps, default="")


def result_folders(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Folders of ``results_dir`` with a ``run.json``, in the order they were measured."""
    folders = [path.parent for path in results_dir.glob(f"*/{RUN_METADATA_NAME}")]
    return sorted(folders, key=lambda folder: (first_measured_at(folder), folder.name))


# ==========================================================================================
# Reading
# ==========================================================================================


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_collect_csv(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = dict(raw)
            for key in ("seconds_per_step", "energy_j_per_step", "predicted_seconds_per_step",
                        "predicted_energy_j_per_step", "idle_watts", "window_seconds", "gpu_clock_mhz",
                        "memory_clock_mhz", "power_limit_w", "head_seconds_per_step"):
                row[key] = _float(raw.get(key))
            for key in ("batch_size", "prompt_tokens", "context_tokens", "layers_measured", "layers_total", "steps"):
                value = _float(raw.get(key))
                row[key] = int(value) if math.isfinite(value) else 0
            # Columns added to collect.py after the first H200 run: absent means that run's behaviour
            # (every step eager; MoE experts as a per-expert loop).
            row["graphed"] = (raw.get("cuda_graph") or "").strip() == "True"
            row["mode"] = "CUDA graph" if row["graphed"] else "eager"
            row["experts_kernel"] = (raw.get("experts_kernel") or "").strip()
            rows.append(row)
    return rows


def run_logs(folder: Path) -> dict[str, str]:
    """CSV file name -> the ``run*.log`` that wrote it (from 'wrote N rows to .../collect_X.csv')."""
    owner: dict[str, str] = {}
    for log in sorted(folder.glob("run*.log")):
        for match in re.finditer(r"wrote \d+ rows to \S*?(collect_[\w.-]+\.csv)", log.read_text(errors="replace")):
            owner.setdefault(match.group(1), log.name)
    return owner


def shape_label(row: dict[str, Any]) -> str:
    if row["phase"] == "decode":
        return f"decode b{row['batch_size']} c{row['context_tokens']}"
    context = f" c{row['context_tokens']}" if row["context_tokens"] else ""
    return f"prefill b{row['batch_size']} p{row['prompt_tokens']}{context}"


def step_for(row: dict[str, Any]) -> StepShape:
    """The collect shape as a step: a uniform batch (as ``collect._predict`` builds it)."""
    b, p, c = row["batch_size"], row["prompt_tokens"], row["context_tokens"]
    if row["phase"] == "decode":
        return StepShape.static_batch_decode(b, c)
    return StepShape.from_requests([(f"r{i}", p, 0, c) for i in range(b)])


# ==========================================================================================
# Predictions
# ==========================================================================================


@dataclasses.dataclass
class Predictors:
    """The predictors one model's rows are compared with, on the catalog entry of the measured GPU."""

    model_name: str
    is_moe: bool
    hardware: Hardware
    analytic: AnalyticPredictor
    gnn: Any  # GnnPredictor or None
    table: Any  # DistilledGnnPredictor or None
    gnn_unavailable: str  # why the GNN columns are empty ("" when they are not)


def build_predictors(model_name: str, gpu_name: str) -> Predictors:
    described = load_model(model_name)
    measured_as = dataclasses.replace(described, weight_dtype="bf16", kv_cache_dtype="bf16", activation_dtype="bf16")
    hardware = Hardware(find_gpu(gpu_name), 1, 1, "nvml")
    analytic = AnalyticPredictor(measured_as, hardware)
    gnn = table = None
    try:
        from llmco2_vllm.predict.gnn.distilled import DistilledGnnPredictor
        from llmco2_vllm.predict.gnn.model import GnnPredictor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gnn = GnnPredictor(measured_as, hardware)
        if gnn.is_fallback:
            unavailable = f"GNN unavailable for {model_name}, fell back to analytic: {gnn.fallback_reason}"
            gnn = None
        else:
            table = DistilledGnnPredictor(measured_as, hardware, table=gnn.distilled)
            unavailable = ""
    except ImportError as error:
        unavailable = f"GNN not importable here ({error}); GNN columns empty"
    return Predictors(model_name, described.num_moe_layers > 0, hardware, analytic, gnn, table, unavailable)


def training_gpu_names(gnn: Any) -> list[str]:
    """Catalog GPUs whose datasheet signature matches one of the checkpoint's training GPUs."""
    from llmco2_vllm.predict.gnn.model import hardware_signature, is_known_hardware

    known = gnn.ensemble.training_hardware
    return sorted(spec.name for spec in gpu_catalog().values() if is_known_hardware(hardware_signature(spec), known))


def predict_row(row: dict[str, Any], preds: Predictors) -> None:
    """Add the predictions and derived quantities to ``row`` (in place)."""
    step = step_for(row)
    roofline = preds.analytic.roofline
    cost = preds.analytic.cost(step)
    a = preds.analytic.predict_step(step)
    row["an_s"], row["an_j"] = a.seconds, a.energy_j
    row["gnn_s"] = row["gnn_j"] = row["tab_s"] = row["tab_j"] = math.nan
    if preds.gnn is not None:
        g = preds.gnn.predict_step(step)
        t = preds.table.predict_step(step)
        row["gnn_s"], row["gnn_j"], row["tab_s"], row["tab_j"] = g.seconds, g.energy_j, t.seconds, t.energy_j
    idle_catalog = roofline.idle_watts
    row["idle_catalog_w"] = idle_catalog
    t_meas, e_meas = row["seconds_per_step"], row["energy_j_per_step"]
    row["meas_dyn_j"] = e_meas - row["idle_watts"] * t_meas
    row["an_dyn_j"] = row["an_j"] - idle_catalog * row["an_s"]
    row["gnn_dyn_j"] = row["gnn_j"] - idle_catalog * row["gnn_s"]
    row["meas_w"] = e_meas / t_meas if t_meas > 0 else math.nan
    row["an_w"] = row["an_j"] / row["an_s"] if row["an_s"] > 0 else math.nan
    row["gnn_factor"] = row["gnn_j"] / row["an_j"] if row["an_j"] > 0 else math.nan
    total_bytes = cost.weight_bytes + float(cost.op_activation_bytes.sum()) + cost.kv_cache_bytes
    row["flops"], row["bytes"] = cost.flops, total_bytes
    row["tflops"] = cost.flops / t_meas / 1e12 if t_meas > 0 else math.nan
    row["tbs"] = total_bytes / t_meas / 1e12 if t_meas > 0 else math.nan
    row["bound"] = "compute" if cost.flops / roofline.peak_flops > total_bytes / roofline.bandwidth else "memory"


# ==========================================================================================
# Metrics
# ==========================================================================================


def mape(measured: list[float], predicted: list[float]) -> float:
    return 100 * statistics.fmean(abs(p - m) / abs(m) for m, p in zip(measured, predicted))


def median_ratio(measured: list[float], predicted: list[float]) -> float:
    return statistics.median(m / p for m, p in zip(measured, predicted))


def med(rows: list[dict[str, Any]], measured: str, predicted: str) -> float:
    return median_ratio([r[measured] for r in rows], [r[predicted] for r in rows])


@dataclasses.dataclass(frozen=True)
class ErrorSummary:
    """One predictor against the measurement over some rows: MAPE % and median measured/predicted."""

    n: int
    energy_mape: float
    energy_ratio: float
    time_mape: float
    time_ratio: float
    dynamic_mape: float
    dynamic_ratio: float
    power_ratio: float


def error_summary(rows: list[Row], key: str) -> ErrorSummary:
    """``key``: "an" (analytic) or "gnn"; power is each side's energy / time."""
    e = [r["energy_j_per_step"] for r in rows]
    t = [r["seconds_per_step"] for r in rows]
    d = [r["meas_dyn_j"] for r in rows]
    w = [r["meas_w"] for r in rows]
    pe = [r[f"{key}_j"] for r in rows]
    pt = [r[f"{key}_s"] for r in rows]
    pd = [r[f"{key}_dyn_j"] for r in rows]
    pw = [j / s for j, s in zip(pe, pt)]
    return ErrorSummary(len(rows), mape(e, pe), median_ratio(e, pe), mape(t, pt), median_ratio(t, pt),
                        mape(d, pd), median_ratio(d, pd), median_ratio(w, pw))


# ==========================================================================================
# Datasets and folders
# ==========================================================================================


@dataclasses.dataclass
class Dataset:
    """One ``collect_*.csv`` with its rows predicted."""

    label: str  # file stem without "collect_"
    path: Path
    rows: list[dict[str, Any]]
    preds: Predictors
    log: str  # run*.log that wrote it ("" if unknown)

    @property
    def moe_loop(self) -> bool:
        return self.preds.is_moe and any(r["experts_kernel"] != "grouped_mm" for r in self.rows)

    @property
    def moe_grouped(self) -> bool:
        return self.preds.is_moe and not self.moe_loop

    @property
    def scored(self) -> list[dict[str, Any]]:
        """Rows that enter the accuracy tables (dense models, energy measured)."""
        if self.preds.is_moe:
            return []
        return [r for r in self.rows if math.isfinite(r["energy_j_per_step"]) and r["energy_j_per_step"] > 0]


def gpu_short(gpu: GpuSpec) -> str:
    """'H200' for 'H200-SXM-141GB': the catalog name up to the form factor."""
    return gpu.name.split("-")[0]


@dataclasses.dataclass
class FolderResult:
    """Everything the report knows about one results folder."""

    folder: Path
    datasets: list[Dataset]
    probe: dict[str, Any] | None
    meta: RunMetadata | None

    @property
    def gpu(self) -> GpuSpec:
        return self.datasets[0].preds.hardware.gpu

    @property
    def short(self) -> str:
        return gpu_short(self.gpu)

    @property
    def graph_dense(self) -> list[Dataset]:
        """The CUDA-graph runs of dense models: the headline data."""
        return [ds for ds in self.datasets if ds.scored and any(r["graphed"] for r in ds.rows)]


def phase_groups(datasets: list[Dataset],
                 rows_of: Callable[[Dataset], list[Row]]) -> list[tuple[str, str, list[Row], bool]]:
    groups = []
    for ds in datasets:
        for phase in ("prefill", "decode"):
            sel = [r for r in rows_of(ds) if r["phase"] == phase]
            if sel:
                groups.append((ds.label, phase, sel, ds.preds.gnn is not None))
    return groups


def decode_flatness(rows: list[dict[str, Any]]) -> list[tuple[int, list[tuple[int, float]], int]]:
    """Per context of eager decode rows: (context, [(batch, ms)], largest batch still within
    ``FLAT_DECODE_RATIO`` of the fastest smaller batch, i.e. on the launch floor)."""
    out = []
    eager = [r for r in rows if r["phase"] == "decode" and not r["graphed"]]
    for context in sorted({r["context_tokens"] for r in eager}):
        sel = sorted((r for r in eager if r["context_tokens"] == context), key=lambda r: r["batch_size"])
        if len(sel) < 2:
            continue
        points = [(r["batch_size"], r["seconds_per_step"] * 1e3) for r in sel]
        floor, flat_to = points[0][1], points[0][0]
        for batch, value in points[1:]:
            if value > FLAT_DECODE_RATIO * floor:
                break
            floor, flat_to = min(floor, value), batch
        out.append((context, points, flat_to))
    return out


def load_datasets(folder: Path) -> list[Dataset]:
    owners = run_logs(folder)
    cache: dict[tuple[str, str], Predictors] = {}
    datasets = []
    for path in sorted(folder.glob("collect_*.csv")):
        rows = read_collect_csv(path)
        if not rows:
            continue
        key = (rows[0]["model"], rows[0]["gpu"])
        if key not in cache:
            cache[key] = build_predictors(*key)
        for row in rows:
            predict_row(row, cache[key])
        datasets.append(Dataset(path.stem.removeprefix("collect_"), path, rows, cache[key], owners.get(path.name, "")))
    if not datasets:
        raise SystemExit(f"no collect_*.csv with rows in {folder}")
    gpus = {r["gpu"] for ds in datasets for r in ds.rows}
    if len(gpus) != 1:
        raise SystemExit(f"{folder}: one GPU per results folder expected, found {sorted(gpus)}")
    return datasets


def run_records(folder: Path, datasets: list[Dataset],
                meta: RunMetadata | None) -> list[tuple[RunRecord | None, list[Dataset]]]:
    """(run, its datasets) for the runs ``run.json`` records, then (None, the rest)."""
    out: list[tuple[RunRecord | None, list[Dataset]]] = []
    seen: set[str] = set()
    for rec in meta.runs if meta is not None else ():
        if rec.log and (folder / rec.log).exists():
            members = [ds for ds in datasets if ds.log == rec.log]
            if {ds.path.name for ds in members} != set(rec.csvs):
                print(f"warning: {folder / rec.log} wrote {sorted(ds.path.name for ds in members)}, "
                      f"{RUN_METADATA_NAME} says {sorted(rec.csvs)}", file=sys.stderr)
        else:
            members = [ds for ds in datasets if ds.path.name in rec.csvs]
        members = [ds for ds in members if ds.path.name not in seen]
        if members:
            seen.update(ds.path.name for ds in members)
            out.append((rec, members))
    rest = [ds for ds in datasets if ds.path.name not in seen]
    if rest:
        out.append((None, rest))
    return out


def idle_gap(datasets: list[Dataset]) -> tuple[float, float, float]:
    """(median measured idle W, median share of the measured energy that the idle-power difference
    explains, median analytic under-prediction) over the dense rows; NaN where there are none."""
    idles = [r["idle_watts"] for ds in datasets for r in ds.rows if math.isfinite(r["idle_watts"])]
    if not idles:
        return math.nan, math.nan, math.nan
    idle_med = statistics.median(idles)
    catalog_idle = datasets[0].preds.analytic.roofline.idle_watts
    scored = [r for ds in datasets for r in ds.scored]
    share = statistics.median((idle_med - catalog_idle) * r["seconds_per_step"] / r["energy_j_per_step"]
                              for r in scored) if scored else math.nan
    gap = statistics.median(r["energy_j_per_step"] / r["an_j"] - 1 for r in scored) if scored else math.nan
    return idle_med, share, gap


# ==========================================================================================
# NVML probe
# ==========================================================================================


def nvml_trace_analysis(trace_path: Path, idle_w: float) -> dict[str, float]:
    """Lag of NVML's sampled power behind the energy counter, from the recorded trace."""
    t, phase, energy, power = [], [], [], []
    with trace_path.open(newline="", encoding="utf-8") as handle:
        for r in csv.DictReader(handle):
            t.append(float(r["seconds"]))
            phase.append(r["phase"])
            energy.append(int(r["energy_mj"]))
            power.append(int(r["power_mw"]) / 1000)
    # Counter-derived power: mean power between consecutive counter updates, stamped at the update.
    changes = [i for i in range(1, len(t)) if energy[i] != energy[i - 1]]
    counter_t, counter_w = [], []
    for prev, cur in zip(changes, changes[1:]):
        counter_t.append(t[cur])
        counter_w.append((energy[cur] - energy[prev]) / 1000 / (t[cur] - t[prev]))
    busy_start = next(t[i] for i in range(len(t)) if phase[i] == "busy")
    busy_end = next(t[i] for i in range(len(t)) if phase[i] == "idle_after")
    busy_w = statistics.median(w for ct, w in zip(counter_t, counter_w) if busy_start + 1.2 <= ct <= busy_end)
    sampled_busy = statistics.median(p for x, p in zip(t, power) if busy_start + 1.2 <= x <= busy_end)

    def first(times: list[float], values: list[float], after: float, test) -> float:
        return next((x for x, v in zip(times, values) if x >= after and test(v)), math.nan)

    mid = (idle_w + busy_w) / 2
    low10, high90 = idle_w + 0.1 * (busy_w - idle_w), idle_w + 0.9 * (busy_w - idle_w)
    return {
        "counter_busy_w": busy_w,
        "sampled_busy_w": sampled_busy,
        "lag_up_s": first(t, power, busy_start, lambda v: v > mid) - first(counter_t, counter_w, busy_start, lambda v: v > mid),
        "lag_down_s": first(t, power, busy_end, lambda v: v < mid) - first(counter_t, counter_w, busy_end, lambda v: v < mid),
        "sampled_rise_s": first(t, power, busy_start, lambda v: v > high90) - first(t, power, busy_start, lambda v: v > low10),
        "counter_rise_s": first(counter_t, counter_w, busy_start, lambda v: v > high90)
        - first(counter_t, counter_w, busy_start, lambda v: v > low10),
    }


def read_probe(folder: Path) -> dict[str, Any] | None:
    """``nvml_probe.json`` plus, when ``nvml_trace.csv`` is there, its analysis under ``"trace"``."""
    probe_path = folder / "nvml_probe.json"
    if not probe_path.exists():
        return None
    probe = json.loads(probe_path.read_text(encoding="utf-8"))
    trace_path = folder / "nvml_trace.csv"
    probe["trace"] = (nvml_trace_analysis(trace_path, probe["idle_before_power"]["counter_mean_w"])
                      if trace_path.exists() else None)
    return probe


# ==========================================================================================
# Across GPUs
# ==========================================================================================


@dataclasses.dataclass(frozen=True)
class GpuPair:
    """Two GPUs' CUDA-graph runs of the same files: ``slow`` has the lower memory bandwidth."""

    slow: FolderResult
    fast: FolderResult
    #: (dataset on ``slow``, same file label on ``fast``, rows of the same shape on both)
    matched: list[tuple[Dataset, Dataset, list[tuple[Row, Row]]]]

    @property
    def bandwidth_ratio(self) -> float:
        return self.slow.gpu.memory_bandwidth_bytes_per_second / self.fast.gpu.memory_bandwidth_bytes_per_second

    @property
    def peak_ratio(self) -> float:
        return self.slow.gpu.peak_flops("bf16") / self.fast.gpu.peak_flops("bf16")


def gpu_pairs(results: list[FolderResult]) -> list[GpuPair]:
    """Every pair of folders that measured a file label with CUDA graphs on both GPUs."""
    pairs_out = []
    for i, first in enumerate(results):
        for second in results[i + 1:]:
            slower = second.gpu.memory_bandwidth_bytes_per_second < first.gpu.memory_bandwidth_bytes_per_second
            slow, fast = (second, first) if slower else (first, second)
            matched = []
            for ds_slow in slow.datasets:
                ds_fast = next((d for d in fast.datasets if d.label == ds_slow.label), None)
                if ds_fast is None or not any(r["graphed"] for r in ds_slow.rows):
                    continue
                index = {shape_label(r): r for r in ds_fast.rows}
                pairs = [(r, index[shape_label(r)]) for r in ds_slow.rows if shape_label(r) in index]
                if pairs:
                    matched.append((ds_slow, ds_fast, pairs))
            if matched:
                pairs_out.append(GpuPair(slow, fast, matched))
    return pairs_out


@dataclasses.dataclass(frozen=True)
class PhaseRatios:
    """Per-shape ratios slow / fast of one file and phase (> 1: slower / more energy on ``slow``)."""

    model: str  # short model name
    is_moe: bool
    phase: str
    time: list[float]  # measured
    predicted_time: list[float]  # analytic
    energy: list[float]
    predicted_energy: list[float]
    #: decode only: median achieved TB/s on each GPU and its share of the datasheet bandwidth, %
    tbs: tuple[float, float] | None
    bandwidth_percent: tuple[float, float] | None

    @property
    def n(self) -> int:
        return len(self.time)


def phase_ratios(pair: GpuPair) -> list[PhaseRatios]:
    out = []
    for ds_slow, _, pairs in pair.matched:
        for phase in ("prefill", "decode"):
            sel = [(x, y) for x, y in pairs if x["phase"] == phase]
            if not sel:
                continue
            tbs = percent = None
            if phase == "decode":
                ta = statistics.median(x["tbs"] for x, _ in sel)
                tb = statistics.median(y["tbs"] for _, y in sel)
                tbs = (ta, tb)
                percent = (100 * ta * 1e12 / pair.slow.gpu.memory_bandwidth_bytes_per_second,
                           100 * tb * 1e12 / pair.fast.gpu.memory_bandwidth_bytes_per_second)
            out.append(PhaseRatios(
                ds_slow.preds.model_name.split("/")[-1], ds_slow.preds.is_moe, phase,
                [x["seconds_per_step"] / y["seconds_per_step"] for x, y in sel],
                [x["an_s"] / y["an_s"] for x, y in sel],
                [x["energy_j_per_step"] / y["energy_j_per_step"] for x, y in sel],
                [x["an_j"] / y["an_j"] for x, y in sel], tbs, percent))
    return out


def compute_bound_prefill_ratios(pair: GpuPair) -> tuple[list[float], list[float]]:
    """(measured, analytic) time ratios slow / fast of the dense compute-bound prefill shapes."""
    pre = [(x, y) for ds, _, pairs in pair.matched if not ds.preds.is_moe for x, y in pairs
           if x["phase"] == "prefill" and x["bound"] == "compute"]
    return ([x["seconds_per_step"] / y["seconds_per_step"] for x, y in pre], [x["an_s"] / y["an_s"] for x, y in pre])
