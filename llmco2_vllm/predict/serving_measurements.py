"""Measured steady-state vLLM serving: the rows the time and power model is fitted and judged on.

Each row is one serving configuration measured at steady state (ML.ENERGY Leaderboard v2 and
v3): a model on ``num_gpus`` GPUs running an average of ``batch_size`` requests at a time. What
was measured, per row: the mean engine step time (``step_seconds`` = average batch / output
token throughput: every running request emits one token per step), the average power of all the
GPUs (``power_watts``), and the energy per generated token and per request.

The packaged table ``data/serving_measurements.csv`` is built from the project's shared reference
data by ``python -m llmco2_vllm.predict.serving_measurements [shared_data_dir]``; at run time only
the packaged copy is read (:func:`load_serving_measurements`). Every row keeps its ``source_url``.

Prompt lengths are not published by either leaderboard. ``prompt_tokens`` is the assumption of
:data:`ASSUMED_PROMPT_TOKENS` for the row's task (``prompt_assumed`` is always true here), chosen
from what the task's prompts are, never from the fit; the evaluation reports how much the
accuracy moves when every assumed prompt is halved or doubled.
"""

from __future__ import annotations

import csv
import functools
import io
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

from llmco2_vllm.predict.hardware import find_gpu

#: ASSUMPTIONS, not measurements: the mean prompt length (tokens, chat template included) of each
#: task's prompts. LMArena conversations are mostly short questions with a long tail of pasted
#: text; GPQA prompts are a graduate-level question, four answer options and an instruction; the
#: Sourcegraph fill-in-the-middle prompts carry the code before and after the cursor; ML.ENERGY v2
#: chat used ShareGPT first turns filtered to <= 800 tokens, and its code task HumanEval+ function
#: signatures with docstrings.
ASSUMED_PROMPT_TOKENS: dict[str, int] = {
    "lm-arena-chat": 200,
    "gpqa": 300,
    "sourcegraph-fim": 1500,
    "chat": 250,
    "code": 150,
}

DEFAULT_SHARED_DIR = Path("/work/shared/data")

_SOFTWARE = {"mlenergy_v3": "vllm-0.11.1", "mlenergy_v2": "vllm-0.5.4"}

#: Source model names that are not catalog ids (HF renamed the Meta-Llama-3.1 repositories).
_MODEL_ALIASES = {
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Meta-Llama-3.1-405B-Instruct": "meta-llama/Llama-3.1-405B-Instruct",
}


@dataclass(frozen=True)
class ServingMeasurement:
    """One measured steady-state serving configuration."""

    row_id: str
    dataset: str  # mlenergy_v3 | mlenergy_v2
    software: str  # the vLLM version that was measured
    model: str
    gpu: str  # catalog name
    num_gpus: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    expert_parallel: int
    task: str
    max_num_seqs: int
    batch_size: float  # average running requests
    output_tokens: float  # mean generated tokens per request
    output_tokens_p10: float | None  # published percentiles (v3 only)
    output_tokens_p50: float | None
    output_tokens_p90: float | None
    running_age_tokens: float  # mean tokens generated so far by the running requests (see running_age)
    prompt_tokens: int  # ASSUMED (see ASSUMED_PROMPT_TOKENS)
    prompt_assumed: bool
    step_seconds: float  # measured mean step time: batch_size / output tokens per second
    power_watts: float  # measured average power of all num_gpus GPUs
    energy_per_token_j: float
    energy_per_request_j: float
    source_url: str



def running_age(mean: float, p10: float, p50: float, p90: float) -> float:
    """Mean number of tokens the running requests have generated so far, from the output-length distribution.

    A request of length L spends L steps in the batch at ages 0..L-1, so the batch's mean age is
    E[L^2] / (2 E[L]): long requests stay longer and weigh more than their share of requests. The
    quantile function is taken piecewise linear through (0, 1), (0.1, p10), (0.5, p50), (0.9, p90)
    and (1, max), with max set so that its mean is the published mean (never below p90).
    """
    points = [(0.0, 1.0), (0.1, p10), (0.5, p50), (0.9, p90)]
    known = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    points.append((1.0, max(p90, 2 * (mean - known) / 0.1 - p90)))
    first = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    second = sum((b[0] - a[0]) * (a[1] ** 2 + a[1] * b[1] + b[1] ** 2) / 3 for a, b in zip(points, points[1:]))
    return second / first / 2


def _v3_rows(path: Path, drops: Counter) -> list[ServingMeasurement]:
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for src in csv.DictReader(handle):
            batch = float(src["avg_batch_size"])
            throughput = float(src["output_throughput_tokens_per_sec"])
            if not (batch > 0 and throughput > 0):
                drops["mlenergy_v3: no batch or throughput"] += 1
                continue
            gpus, tp, ep = int(src["num_gpus"]), int(src["tensor_parallel"]), int(src["expert_parallel"])
            dp = int(src["data_parallel"])
            # INTERPRETATION: vLLM's expert parallelism spans TP x DP, so "TP 1, EP = GPUs" is read as
            # `--tensor-parallel-size GPUs --enable-expert-parallel` (attention sharded, experts whole).
            # The other reading, data-parallel attention, predicts per-sequence costs split over DP
            # engines and a step time that grows with batch ~1.4x slower than measured (see the report).
            if ep > 1 and tp * dp < gpus:
                tp = gpus // dp
            pp = max(1, gpus // (tp * dp))
            task = src["task"]
            rows.append(ServingMeasurement(
                row_id=f"mlenergy_v3:{task}:{src['model']}:g{gpus}tp{tp}ep{ep}:mns{src['max_num_seqs']}",
                dataset="mlenergy_v3", software=_SOFTWARE["mlenergy_v3"], model=src["model"],
                gpu=find_gpu(src["gpu"]).name, num_gpus=gpus, tensor_parallel=tp, pipeline_parallel=pp,
                data_parallel=dp, expert_parallel=ep, task=task, max_num_seqs=int(src["max_num_seqs"]),
                batch_size=batch, output_tokens=float(src["avg_output_len"]),
                output_tokens_p10=float(src["output_len_p10"]), output_tokens_p50=float(src["output_len_p50"]),
                output_tokens_p90=float(src["output_len_p90"]),
                running_age_tokens=running_age(*(float(src[k]) for k in (
                    "avg_output_len", "output_len_p10", "output_len_p50", "output_len_p90"))),
                prompt_tokens=ASSUMED_PROMPT_TOKENS[task], prompt_assumed=True,
                step_seconds=batch / throughput, power_watts=float(src["avg_power_watts"]),
                energy_per_token_j=float(src["energy_per_token_joules"]),
                energy_per_request_j=float(src["energy_per_request_joules"]), source_url=src["source"],
            ))  # fmt: skip
    return rows


def _v2_rows(path: Path, drops: Counter, age_per_mean: float) -> list[ServingMeasurement]:
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for src in csv.DictReader(handle):
            batch = float(src["avg_batch_size"])
            throughput = float(src["token_throughput_tok_s"])
            output = float(src["avg_output_tokens"])
            per_request = float(src["energy_per_request_joules"])
            if not (batch > 0 and throughput > 0 and output > 0 and per_request > 0):
                drops["mlenergy_v2: missing batch, throughput, output or energy"] += 1
                continue
            tp, pp = int(src["tensor_parallel"]), int(src["pipeline_parallel"])
            task = src["task"]
            per_token = per_request / output
            rows.append(ServingMeasurement(
                row_id=f"mlenergy_v2:{task}:{src['gpu']}:{src['model']}:tp{tp}pp{pp}:mbs{src['max_batch_size']}",
                dataset="mlenergy_v2", software=_SOFTWARE["mlenergy_v2"],
                model=_MODEL_ALIASES.get(src["model"], src["model"]), gpu=find_gpu(src["gpu"]).name,
                num_gpus=tp * pp, tensor_parallel=tp, pipeline_parallel=pp, data_parallel=1, expert_parallel=1,
                task=task, max_num_seqs=int(src["max_batch_size"]), batch_size=batch, output_tokens=output,
                output_tokens_p10=None, output_tokens_p50=None, output_tokens_p90=None,
                running_age_tokens=age_per_mean * output, prompt_tokens=ASSUMED_PROMPT_TOKENS[task], prompt_assumed=True,
                step_seconds=batch / throughput,
                # Steady state: energy per token x tokens per second = the average power of all GPUs.
                power_watts=per_token * throughput, energy_per_token_j=per_token,
                energy_per_request_j=per_request, source_url=src["source"],
            ))  # fmt: skip
    return rows


def build_serving_measurements(shared_dir: str | Path = DEFAULT_SHARED_DIR) -> tuple[list[ServingMeasurement], Counter]:
    shared = Path(shared_dir)
    drops: Counter = Counter()
    v3 = _v3_rows(shared / "mlenergy_v3_h100.csv", drops)
    # v2 publishes only mean output lengths: their running age is the mean times the median
    # age / mean ratio of the v3 chat rows, whose percentiles are published.
    age_per_mean = statistics.median(r.running_age_tokens / r.output_tokens for r in v3 if r.task == "lm-arena-chat")
    rows = v3 + _v2_rows(shared / "mlenergy_v2_vllm.csv", drops, age_per_mean)
    # The v3 source publishes a few configurations twice (same visible settings, separate runs, other
    # numbers): both are kept, told apart by their order in the source.
    seen: Counter = Counter()
    for index, row in enumerate(rows):
        seen[row.row_id] += 1
        if seen[row.row_id] > 1:
            rows[index] = replace(row, row_id=f"{row.row_id}:run{seen[row.row_id]}")
    return rows, drops


_COLUMNS = tuple(f.name for f in fields(ServingMeasurement))


def write_serving_measurements(rows: list[ServingMeasurement], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_COLUMNS)
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            writer.writerow({k: ("" if v is None else f"{v:.8g}" if isinstance(v, float) else
                                 str(v).lower() if isinstance(v, bool) else v) for k, v in values.items()})


def _parse(raw: dict[str, str]) -> ServingMeasurement:
    values: dict = {}
    for f in fields(ServingMeasurement):
        text = raw[f.name]
        if f.type == "int":
            values[f.name] = int(text)
        elif f.type == "float":
            values[f.name] = float(text)
        elif f.type == "float | None":
            values[f.name] = float(text) if text else None
        elif f.type == "bool":
            values[f.name] = text == "true"
        else:
            values[f.name] = text
    return ServingMeasurement(**values)


@functools.cache
def _packaged() -> tuple[ServingMeasurement, ...]:
    text = resources.files("llmco2_vllm").joinpath("data/serving_measurements.csv").read_text(encoding="utf-8")
    return tuple(_parse(row) for row in csv.DictReader(io.StringIO(text)))


def load_serving_measurements(dataset: str | None = None) -> list[ServingMeasurement]:
    """The packaged measured serving rows (optionally of one dataset: ``mlenergy_v3`` or ``mlenergy_v2``)."""
    return [row for row in _packaged() if dataset is None or row.dataset == dataset]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rows, drops = build_serving_measurements(Path(args[0]) if args else DEFAULT_SHARED_DIR)
    out = Path(__file__).resolve().parent.parent / "data" / "serving_measurements.csv"
    write_serving_measurements(rows, out)
    print(f"wrote {len(rows)} rows -> {out}")
    for dataset, n in sorted(Counter(r.dataset for r in rows).items()):
        print(f"  {dataset}: {n}")
    for reason, n in sorted(drops.items()):
        print(f"  dropped {n:4d}  {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
