"""Real measured inference-energy rows: the table the predictors are trained and evaluated on.

Every row is read as a *static batch*: ``batch_size`` requests, each with ``prompt_tokens``
prompt tokens and ``output_tokens`` generated tokens, served by ``model`` on ``num_gpus`` x
``gpu``; ``energy_j`` is the energy of the whole batch. Each row keeps the URL it was read
from (``source_url``) and one sentence saying how ``energy_j`` was computed (``derivation``).

The packaged table ``data/measurements.csv`` is produced by :func:`build_measurements` from the
project's shared reference data (``/work/shared/data``: ``mlenergy_v2_vllm.csv`` and
``public_measurements.csv``); run ``python -m llmco2_vllm.predict.measurements [shared_data_dir]`` to
rebuild it. At run time only the packaged copy is read (:func:`load_measurements`).

Sources and how they are turned into rows (details in each row's ``derivation``/``notes``):

* ``mlenergy_v2`` (ML.ENERGY Leaderboard v2, vLLM 0.5.4, steady-state serving, GPU-only energy):
  ``batch_size = round(avg_batch_size)``, ``output_tokens = round(avg_output_tokens)``,
  ``energy_j = energy_per_request_joules x batch_size``. Continuous batching at a steady average
  batch is read as a static batch of that size: an approximation (requests join and leave).
  Prompt length is NOT published: see :data:`ASSUMED_PROMPT_TOKENS` (``prompt_assumed=true``).
* ``mlenergy_v1`` (legacy leaderboard, HF/FastChat, batch 1, GPU energy per response): one
  request per row, prompt length assumed as above. Rows on "A100 (variant unspecified)" are
  dropped: the catalog's generic ``A100`` alias would silently pick a memory variant.
* ``tokenpowerbench`` (GH200 validation runs, vLLM 0.10.1.1, batch 1): the prefill and decode
  rows of one request are summed into one row with its phase split.
* ``wilkins2024`` (HF transformers, batch 1, GPU-only, KV cache DISABLED): kept with
  ``kv_cache=false`` so evaluation can exclude them (worst-case recomputation, not comparable to
  vLLM). ``device_map=auto`` splits layers across GPUs: ``tensor_parallel=1`` and
  ``num_gpus`` GPUs, i.e. pipeline depth ``num_gpus`` for the analytic model.

Dropped (counts in :func:`build_measurements`'s report): Chung et al. 2025 Table 1 (output
length not published), Table 4 (prefill/decode-disaggregated serving, batch size not
published), Table 5 (GPU count not published); Luccioni et al. 2024 (no per-row token counts;
node boundary incl. idle GPUs); Samsi et al. 2023 (no energy value); ML.ENERGY v2 rows of
``public_measurements.csv`` (duplicates of ``mlenergy_v2_vllm.csv``, which has unrounded
values); rows whose model does not resolve via ``load_model`` or GPU via ``find_gpu``.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import sys
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from llmco2_vllm.predict.hardware import find_gpu
from llmco2_vllm.predict.model_description import load_model

#: Columns of ``data/measurements.csv``, in order.
COLUMNS = (
    "row_id", "dataset", "model", "gpu", "num_gpus", "tensor_parallel", "batch_size",
    "prompt_tokens", "output_tokens", "energy_j", "phase_split_available", "prefill_j",
    "decode_j", "boundary", "software", "kv_cache", "derivation", "source_url",
    "prompt_assumed", "task", "source_model", "source_gpu", "notes",
)
_INT_COLUMNS = ("num_gpus", "tensor_parallel", "batch_size", "prompt_tokens", "output_tokens")
_FLOAT_COLUMNS = ("energy_j", "prefill_j", "decode_j")
_BOOL_COLUMNS = ("phase_split_available", "kv_cache", "prompt_assumed")

#: ASSUMPTION, not a measurement. Neither ML.ENERGY v1 nor v2 publishes prompt lengths, and no
#: figure for the ShareGPT or HumanEval+ prompt lengths of these runs was found in the project's
#: shared notes. The only published fact is v2's chat filter (prompt <= 800 tokens); 400 is the
#: midpoint of [0, 800]. HumanEval+ (v2 ``code``) and v1 chat prompts get the same value for want
#: of any figure. Rows using it carry ``prompt_assumed=true``; benchmarks should report the
#: sensitivity of prompt-dependent predictors to it.
ASSUMED_PROMPT_TOKENS = 400

#: Source model names that are not catalog ids -> catalog id, with the reason for each mapping.
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "meta-llama/Meta-Llama-3.1-8B-Instruct": (
        "meta-llama/Llama-3.1-8B-Instruct", "HF renamed the Meta-Llama-3.1-* repos to Llama-3.1-*"),
    "meta-llama/Meta-Llama-3.1-70B-Instruct": (
        "meta-llama/Llama-3.1-70B-Instruct", "HF renamed the Meta-Llama-3.1-* repos to Llama-3.1-*"),
    "meta-llama/Meta-Llama-3.1-405B-Instruct": (
        "meta-llama/Llama-3.1-405B-Instruct", "HF renamed the Meta-Llama-3.1-* repos to Llama-3.1-*"),
    "metaai/llama-7B": ("huggyllama/llama-7b", "catalog note: ML.ENERGY v1 metaai/llama-7B = original LLaMA-7B"),
    "metaai/llama-13B": ("huggyllama/llama-13b", "catalog note: ML.ENERGY v1 metaai/llama-13B = original LLaMA-13B"),
    "metaai/Llama-2-7b-chat-hf": ("meta-llama/Llama-2-7b-chat-hf", "org prefix differs only"),
    "metaai/Llama-2-13b-chat-hf": ("meta-llama/Llama-2-13b-chat-hf", "org prefix differs only"),
    "tatsu-lab/alpaca-7B": ("tatsu-lab/alpaca-7b-wdiff", "catalog entry for the leaderboard's Alpaca link"),
    "Llama-2 (7B)": ("meta-llama/Llama-2-7b-chat-hf", "catalog note: Wilkins job scripts use the chat model"),
    "Llama-2 (13B)": ("meta-llama/Llama-2-13b-chat-hf", "our mapping, same chat family as Wilkins' 7B"),
    "Llama-2 (70B)": ("meta-llama/Llama-2-70b-chat-hf", "our mapping, same chat family as Wilkins' 7B"),
    "Mistral (7B)": ("mistralai/Mistral-7B-v0.1", "catalog note: Wilkins job scripts name Mistral-7B-v0.1"),
    "Mixtral (8x7B)": ("mistralai/Mixtral-8x7B-v0.1", "our mapping (base model; Instruct has the same architecture)"),
    "Falcon (7B)": ("tiiuae/falcon-7b", "our mapping"),
    "Falcon (40B)": ("tiiuae/falcon-40b", "our mapping"),
    "DeepSeek-R1-Distill-Qwen3-8B (paper: 'DeepSeek distilled Qwen 3 8B')": (
        "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "catalog note: paper name mapped to this HF id"),
    "Qwen/Qwen3-235B-A22B (thinking)": ("Qwen/Qwen3-235B-A22B", "thinking mode of the same checkpoint"),
}

DEFAULT_SHARED_DIR = Path("/work/shared/data")
_MLENERGY_V2_TASK_PROMPTS = {
    "chat": "ShareGPT first-turn prompts (prompt <= 800 tokens filter)",
    "code": "HumanEval+ prompts",
}


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


def _fmt(value: float) -> str:
    return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.1f}"


@functools.cache
def _resolve_model(name: str) -> tuple[str | None, str]:
    """Source model name -> (catalog id or None, reason when None)."""
    target = MODEL_ALIASES.get(name, (name, ""))[0]
    try:
        return load_model(target).name, ""
    except ValueError as error:  # UnknownModelError / UnsupportedArchitectureError
        return None, f"model not describable by load_model: {target} ({type(error).__name__}: {str(error)[:60]})"


@functools.cache
def _resolve_gpu(name: str) -> tuple[str | None, str]:
    try:
        return find_gpu(name).name, ""
    except ValueError:
        return None, f"gpu not resolvable by find_gpu: {name!r}"


def _note_field(notes: str, key: str) -> str | None:
    for part in notes.split(";"):
        part = part.strip()
        if part.startswith(key + "="):
            return part.split("=", 1)[1].strip()
    return None


def _mlenergy_v2_rows(shared: Path, drops: Counter) -> list[dict[str, Any]]:
    rows = []
    with open(shared / "mlenergy_v2_vllm.csv", newline="", encoding="utf-8") as handle:
        for src in csv.DictReader(handle):
            model, why = _resolve_model(src["model"])
            gpu, why_gpu = _resolve_gpu(src["gpu"])
            if model is None or gpu is None:
                drops[f"mlenergy_v2: {why or why_gpu}"] += 1
                continue
            tp, pp = int(src["tensor_parallel"]), int(src["pipeline_parallel"])
            avg_batch = float(src["avg_batch_size"])
            batch = max(1, round(avg_batch))
            per_request = float(src["energy_per_request_joules"])
            avg_out = float(src["avg_output_tokens"])
            rows.append({
                "row_id": f"mlenergy_v2:{src['task']}:{gpu}:{model}:tp{tp}pp{pp}:mbs{src['max_batch_size']}",
                "dataset": "mlenergy_v2", "model": model, "gpu": gpu,
                "num_gpus": tp * pp, "tensor_parallel": tp, "batch_size": batch,
                "prompt_tokens": ASSUMED_PROMPT_TOKENS, "output_tokens": max(1, round(avg_out)),
                "energy_j": per_request * batch, "phase_split_available": False,
                "prefill_j": None, "decode_j": None, "boundary": "gpu", "software": "vllm-0.5.4",
                "kv_cache": True,
                "derivation": (
                    f"energy_per_request_joules {per_request:.6g} J x batch_size {batch} "
                    f"(= round(avg_batch_size {avg_batch:.4g})); steady-state GPU energy of all "
                    f"{tp * pp} GPUs; output_tokens = round(avg_output_tokens {avg_out:.5g})"
                ),
                "source_url": src["source"], "prompt_assumed": True, "task": src["task"],
                "source_model": src["model"], "source_gpu": src["gpu"],
                "notes": (
                    f"prompt length not published ({_MLENERGY_V2_TASK_PROMPTS.get(src['task'], src['task'])}); "
                    f"prompt_tokens={ASSUMED_PROMPT_TOKENS} is an assumption; max_batch_size="
                    f"{src['max_batch_size']}; avg_tpot_s={src['avg_tpot_s']}; token_throughput_tok_s="
                    f"{src['token_throughput_tok_s']}; continuous batching read as a static batch"
                ),
            })
    return rows


def _public_rows(shared: Path, drops: Counter) -> list[dict[str, Any]]:
    with open(shared / "public_measurements.csv", newline="", encoding="utf-8") as handle:
        source = list(enumerate(csv.DictReader(handle), start=2))
    rows: list[dict[str, Any]] = []
    tpb_pending: dict[tuple[str, str], dict[str, Any]] = {}
    for line, src in source:
        name = src["source_name"]
        if name.startswith("ML.ENERGY Leaderboard v2"):
            drops["mlenergy_v2 (public_measurements.csv copy): duplicate of mlenergy_v2_vllm.csv"] += 1
            continue
        if name.startswith("Chung et al. 2025"):
            table = name.split("Table")[1].split()[0] if "Table" in name else "?"
            reason = {
                "1": "output_tokens not published",
                "4": "prefill/decode-disaggregated serving, batch_size not published",
                "5": "num_gpus not published",
            }.get(table, "not a static batch")
            drops[f"chung2025 Table {table}: {reason}"] += 1
            continue
        if name.startswith("Samsi"):
            drops["samsi2023: no energy value (text statement only)"] += 1
            continue
        if name.startswith("Luccioni"):
            drops["luccioni2024: token counts per row not published; node boundary incl. idle GPUs"] += 1
            continue
        if name.startswith("ML.ENERGY Leaderboard v1"):
            dataset = "mlenergy_v1"
        elif name.startswith("TokenPowerBench"):
            dataset = "tokenpowerbench"
        elif name.startswith("Wilkins"):
            dataset = "wilkins2024"
        else:
            drops[f"unknown source: {name}"] += 1
            continue
        model, why = _resolve_model(src["model"])
        gpu, why_gpu = _resolve_gpu(src["gpu"])
        if model is None or gpu is None:
            drops[f"{dataset}: {why or why_gpu}"] += 1
            continue
        energy = float(src["energy_joules"])
        if dataset == "mlenergy_v1":
            out = float(src["output_tokens"])
            task = _note_field(src["notes"], "system-prompt task") or ""
            rows.append({
                "row_id": f"mlenergy_v1:{line}", "dataset": dataset, "model": model, "gpu": gpu,
                "num_gpus": 1, "tensor_parallel": 1, "batch_size": 1,
                "prompt_tokens": ASSUMED_PROMPT_TOKENS, "output_tokens": max(1, round(out)),
                "energy_j": energy, "phase_split_available": False, "prefill_j": None, "decode_j": None,
                "boundary": "gpu", "software": "hf-transformers (FastChat), pytorch-2.0.1",
                "kv_cache": True,
                "derivation": (f"energy_joules {energy:.6g} J per response (Zeus, GPU only) x batch_size 1; "
                               f"output_tokens = round(avg {out:.5g})"),
                "source_url": src["source_url"], "prompt_assumed": True, "task": task,
                "source_model": src["model"], "source_gpu": src["gpu"],
                "notes": (f"prompt length not published (ShareGPT first prompts); prompt_tokens="
                          f"{ASSUMED_PROMPT_TOKENS} is an assumption; HF generate() keeps its KV cache by "
                          f"default; {src['notes']}"),
            })
        elif dataset == "wilkins2024":
            num_gpus = int(src["num_gpus"])
            rows.append({
                "row_id": f"wilkins2024:{line}", "dataset": dataset, "model": model, "gpu": gpu,
                "num_gpus": num_gpus, "tensor_parallel": 1, "batch_size": 1,
                "prompt_tokens": int(src["prompt_tokens"]), "output_tokens": int(src["output_tokens"]),
                "energy_j": energy, "phase_split_available": False, "prefill_j": None, "decode_j": None,
                "boundary": "gpu", "software": "hf-transformers-4.39", "kv_cache": False,
                "derivation": (f"energy_joules {energy:.6g} J = mean GPU energy per request over repeated "
                               f"runs (pyJoules/NVML) x batch_size 1; output_tokens is the max_new_tokens "
                               f"limit (min_new_tokens = 0.9 x limit)"),
                "source_url": src["source_url"], "prompt_assumed": False, "task": "",
                "source_model": src["model"], "source_gpu": src["gpu"],
                "notes": f"KV cache DISABLED: not comparable with vLLM serving; {src['notes']}",
            })
        else:  # tokenpowerbench
            if src["phase"] in ("prefill", "decode"):
                key = (src["model"], src["notes"].split(";")[0])
                entry = tpb_pending.setdefault(key, {"line": line, "src": src})
                entry[src["phase"]] = energy
                if "prefill" in entry and "decode" in entry:
                    prefill, decode = entry.pop("prefill"), entry.pop("decode")
                    first = entry["src"]
                    rows.append({
                        "row_id": f"tokenpowerbench:{entry['line']}", "dataset": dataset, "model": model,
                        "gpu": gpu, "num_gpus": int(first["num_gpus"]),
                        "tensor_parallel": int(first["tensor_parallel"]), "batch_size": 1,
                        "prompt_tokens": int(first["prompt_tokens"]), "output_tokens": int(first["output_tokens"]),
                        "energy_j": prefill + decode, "phase_split_available": True,
                        "prefill_j": prefill, "decode_j": decode, "boundary": "gpu",
                        "software": "vllm-0.10.1.1", "kv_cache": True,
                        "derivation": (f"prefill {prefill:.6g} J (submit->first token) + decode {decode:.6g} J "
                                       f"of one request, NVML GPU energy, batch 1"),
                        "source_url": first["source_url"], "prompt_assumed": False, "task": "",
                        "source_model": src["model"], "source_gpu": src["gpu"],
                        "notes": first["notes"],
                    })
                    del tpb_pending[key]
            else:
                drops[f"{dataset}: total-only rows without per-response prompt length"] += 1
    for _ in tpb_pending:
        drops["tokenpowerbench: phase row without its pair"] += 1
    return rows


def build_measurements(shared_dir: str | Path = DEFAULT_SHARED_DIR) -> tuple[list[dict[str, Any]], Counter]:
    """Read the shared reference data into measurement rows; also return drop counts by reason."""
    shared = Path(shared_dir)
    drops: Counter = Counter()
    rows = _mlenergy_v2_rows(shared, drops) + _public_rows(shared, drops)
    ids = Counter(row["row_id"] for row in rows)
    duplicated = [row_id for row_id, n in ids.items() if n > 1]
    if duplicated:
        raise ValueError(f"duplicate row_id(s): {duplicated[:5]}")
    for row in rows:
        if not (math.isfinite(row["energy_j"]) and row["energy_j"] > 0):
            raise ValueError(f"{row['row_id']}: energy_j {row['energy_j']} is not a positive number")
    return rows, drops


def write_measurements(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            out = {}
            for column in COLUMNS:
                value = row[column]
                if value is None:
                    out[column] = ""
                elif isinstance(value, bool):
                    out[column] = _bool_text(value)
                elif isinstance(value, float):
                    out[column] = _fmt(value)
                else:
                    out[column] = value
            writer.writerow(out)


def _parse(row: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = dict(row)
    for column in _INT_COLUMNS:
        parsed[column] = int(row[column])
    for column in _FLOAT_COLUMNS:
        parsed[column] = float(row[column]) if row[column] != "" else None
    for column in _BOOL_COLUMNS:
        parsed[column] = row[column] == "true"
    return parsed


@functools.cache
def _all_measurements() -> tuple[dict[str, Any], ...]:
    text = resources.files("llmco2_vllm").joinpath("data/measurements.csv").read_text(encoding="utf-8")
    return tuple(_parse(row) for row in csv.DictReader(io.StringIO(text)))


def load_measurements(include_no_kv_cache: bool = False) -> list[dict[str, Any]]:
    """The packaged measured rows, typed (ints, floats, bools; ``None`` for empty phase energies).

    ``include_no_kv_cache=False`` (default) leaves out rows measured without a KV cache (Wilkins
    et al. 2024), whose energy is a worst case not comparable with KV-cached serving. Returns
    fresh dicts (callers may mutate them); the file is parsed once per process.
    """
    return [dict(row) for row in _all_measurements() if include_no_kv_cache or row["kv_cache"]]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    shared = Path(args[0]) if args else DEFAULT_SHARED_DIR
    rows, drops = build_measurements(shared)
    out = Path(__file__).resolve().parent / "data" / "measurements.csv"
    write_measurements(rows, out)
    print(f"wrote {len(rows)} rows -> {out}")
    for dataset, n in sorted(Counter(r["dataset"] for r in rows).items()):
        print(f"  kept {dataset}: {n}")
    for reason, n in sorted(drops.items()):
        print(f"  dropped {n:4d}  {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


_FAMILIES = (  # substring of the model id -> family, for leave-one-family-out evaluation
    ("codellama", "codellama"), ("codegemma", "gemma"), ("gemma", "gemma"), ("mixtral", "mixtral"),
    ("mistral", "mistral"), ("llama", "llama"), ("phi-", "phi"), ("starcoder", "starcoder2"),
    ("qwen", "qwen"), ("dolly", "dolly (gpt-neox)"), ("nemotron", "nemotron"), ("gpt-oss", "gpt-oss"),
)


def model_family(model_id: str) -> str:
    """The model family of a catalog id (fine-tunes and sizes of one architecture line share one)."""
    name = model_id.split("/")[-1].lower()
    for key, label in _FAMILIES:
        if key in name:
            return label
    return "other"
