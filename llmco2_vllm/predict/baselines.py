"""Baseline energy predictors, compared with the learned predictor on the same measured rows.

Every baseline has one signature, ``predict(row) -> float``: the energy in joules of a static
batch described by ``row`` (keys as in :mod:`llmco2_vllm.predict.measurements` / ``BatchPredictor``:
``model, gpu, num_gpus, tensor_parallel, batch_size, prompt_tokens, output_tokens``). A baseline
that is not defined for a row returns ``nan``.

* :func:`analytic` - the project's roofline model (``BatchPredictor``).
* :func:`llmcarbon` - LLMCarbon-style FLOPs / (peak x efficiency) x TDP (Faiz et al. 2023).
* :func:`ecologits` - EcoLogits 0.11.3's GPU energy regression, transcribed from its source.
* :func:`wilkins` - Wilkins et al.'s fitted e = a0*in + a1*out + a2*in*out (7 models).
"""

from __future__ import annotations

import csv
import functools
import io
import math
from typing import Any, Mapping

from llmco2_vllm.predict.hardware import find_gpu
from llmco2_vllm.predict.model_description import ModelDescription, load_model

# --- analytic ------------------------------------------------------------------------------


@functools.cache
def _batch_predictor():
    from llmco2_vllm.predict.batch_predict import BatchPredictor

    return BatchPredictor(predictor="analytic")


def _predict_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("model", "gpu", "num_gpus", "tensor_parallel", "batch_size", "prompt_tokens", "output_tokens")
    return {k: row[k] for k in keys}


def analytic(row: Mapping[str, Any]) -> float:
    """The project's analytic roofline model: ``BatchPredictor().predict(row)["energy_j"]``."""
    return float(_batch_predictor().predict(_predict_fields(row))["energy_j"])


# --- LLMCarbon ------------------------------------------------------------------------------

#: Hardware efficiency (achieved / peak FLOP/s) in the LLMCarbon-style equation.
#: UNVERIFIED ASSUMPTION: LLMCarbon (Faiz et al., "LLMCarbon: Modeling the end-to-end Carbon
#: Footprint of Large Language Models", ICLR 2024, arXiv:2309.14393) models hardware efficiency
#: as a function of the parallelism setting, fitted to training runs; the paper could not be
#: read in this session (no network access), so no value is quoted from it. 0.5 is a round
#: placeholder, not a figure from the paper. Energy scales as 1/efficiency, so a reader can
#: rescale the reported errors for any other constant.
LLMCARBON_HARDWARE_EFFICIENCY = 0.5


def llmcarbon(row: Mapping[str, Any], efficiency: float = LLMCARBON_HARDWARE_EFFICIENCY) -> float:
    """LLMCarbon-style operational energy of the batch (GPU TDP only, no PUE).

    FLOPs  = 2 x active_params x (prompt_tokens + output_tokens) x batch_size
    time   = FLOPs / (num_gpus x peak_flops x efficiency)
    energy = time x TDP x num_gpus           (= FLOPs x TDP / (peak_flops x efficiency))

    ``active_params`` is ``ModelDescription.active_params_per_token`` (matmul weights incl. the
    LM head); ``peak_flops`` is the GPU's dense peak for the model's activation dtype and TDP its
    catalog ``tdp_watts``. The GPU count cancels: in this model more GPUs finish sooner at the
    same energy. Attention FLOPs and memory traffic are ignored (that is the method).
    """
    model = load_model(str(row["model"]))
    gpu = find_gpu(str(row["gpu"]))
    num_gpus = int(row["num_gpus"])
    flops = 2.0 * model.active_params_per_token * (int(row["prompt_tokens"]) + int(row["output_tokens"])) \
        * int(row["batch_size"])
    seconds = flops / (num_gpus * gpu.peak_flops(model.activation_dtype) * efficiency)
    return seconds * gpu.tdp_watts * num_gpus


# --- EcoLogits ----------------------------------------------------------------------------
# Transcribed from ecologits 0.11.3 (PyPI wheel ecologits-0.11.3-py3-none-any.whl, file
# ecologits/impacts/llm.py: constants at module top, functions gpu_energy, model_required_memory
# and gpu_required_count). Only the GPU part is used: server_energy (1.2 kW x latency share) and
# the datacenter PUE are left out so that the numbers compare with GPU-only measurements. The
# package source does not say what data the regressions were fitted on (its online methodology
# pages, not read here, do); if that was ML.ENERGY leaderboard data, the ML.ENERGY rows here are
# partly in-sample for this baseline.

ECOLOGITS_VERSION = "0.11.3"
ECOLOGITS_GPU_ENERGY_ALPHA = 1.1665273170451914e-06
ECOLOGITS_GPU_ENERGY_BETA = -0.011205921025579175
ECOLOGITS_GPU_ENERGY_GAMMA = 4.052928146734005e-05
ECOLOGITS_GPU_MEMORY_GB = 80
ECOLOGITS_MODEL_QUANTIZATION_BITS = 16
_JOULES_PER_KWH = 3.6e6


def ecologits_gpu_energy_kwh_per_gpu(active_params_b: float, output_tokens: float, batch_size: float) -> float:
    """EcoLogits ``gpu_energy``: energy of ONE GPU for one request, kWh.

    per-token = (alpha x exp(beta x batch_size) x active_params_b + gamma) / 1000  [kWh]
    """
    per_token = ECOLOGITS_GPU_ENERGY_ALPHA * math.exp(ECOLOGITS_GPU_ENERGY_BETA * batch_size) * active_params_b \
        + ECOLOGITS_GPU_ENERGY_GAMMA
    per_token /= 1000  # EcoLogits' own "convert to kWh"
    return output_tokens * per_token


def ecologits_gpu_required_count(total_params_b: float) -> int:
    """EcoLogits ``model_required_memory`` + ``gpu_required_count`` (80 GB GPUs, 16-bit weights)."""
    memory_gb = 1.2 * total_params_b * ECOLOGITS_MODEL_QUANTIZATION_BITS / 8
    gpu_nb = math.ceil(memory_gb / ECOLOGITS_GPU_MEMORY_GB)
    return 2 ** math.ceil(math.log2(gpu_nb))  # round up to a power of two


def _params_b(model: ModelDescription) -> tuple[float, float]:
    return model.active_params_per_token / 1e9, model.total_params / 1e9


def ecologits(row: Mapping[str, Any], use_row_gpu_count: bool = False, batch_size: int | None = None) -> float:
    """EcoLogits GPU energy of the batch, J: batch_size x gpu_count x per-GPU request energy.

    ``batch_size`` is passed as EcoLogits' concurrent batch size (its default is 64). The GPU
    count is EcoLogits' own ``gpu_required_count`` from total parameters (exact transcription);
    ``use_row_gpu_count=True`` uses the row's ``num_gpus`` instead (a variant, not EcoLogits).
    ``batch_size`` overrides the concurrency fed to the regression (the package's tracers never
    pass one, so EcoLogits as shipped always uses its default ``BATCH_SIZE = 64``); the batch
    energy is still per-request energy x the row's ``batch_size``.
    Prompt tokens play no part in EcoLogits. Parameter counts come from ``load_model``
    (EcoLogits reads them from its own model repository).
    """
    model = load_model(str(row["model"]))
    active_b, total_b = _params_b(model)
    batch = int(row["batch_size"])
    concurrency = batch if batch_size is None else batch_size
    gpus = int(row["num_gpus"]) if use_row_gpu_count else ecologits_gpu_required_count(total_b)
    per_request_kwh = gpus * ecologits_gpu_energy_kwh_per_gpu(active_b, int(row["output_tokens"]), concurrency)
    return per_request_kwh * _JOULES_PER_KWH * batch


def ecologits_row_gpus(row: Mapping[str, Any]) -> float:
    """:func:`ecologits` with the row's GPU count instead of EcoLogits' memory-based count."""
    return ecologits(row, use_row_gpu_count=True)


#: EcoLogits' default concurrent batch size (``BATCH_SIZE`` in ecologits/impacts/llm.py).
ECOLOGITS_DEFAULT_BATCH_SIZE = 64


def ecologits_as_shipped(row: Mapping[str, Any]) -> float:
    """:func:`ecologits` with the regression at EcoLogits' default batch 64, as its tracers use it."""
    return ecologits(row, batch_size=ECOLOGITS_DEFAULT_BATCH_SIZE)


# --- Wilkins et al. 2024 ------------------------------------------------------------------

#: Source model label in ``wilkins_fitted_models.csv`` -> catalog id (same mapping as
#: :data:`llmco2_vllm.predict.measurements.MODEL_ALIASES`).
WILKINS_MODEL_IDS = {
    "Falcon (7B)": "tiiuae/falcon-7b",
    "Falcon (40B)": "tiiuae/falcon-40b",
    "Llama-2 (7B)": "meta-llama/Llama-2-7b-chat-hf",
    "Llama-2 (13B)": "meta-llama/Llama-2-13b-chat-hf",
    "Llama-2 (70B)": "meta-llama/Llama-2-70b-chat-hf",
    "Mistral (7B)": "mistralai/Mistral-7B-v0.1",
    "Mixtral (8x7B)": "mistralai/Mixtral-8x7B-v0.1",
}

#: Coefficients copied from /work/shared/data/wilkins_fitted_models.csv (Wilkins MPhil thesis,
#: Cambridge 2024, Tables 5.2/5.3; source URL below). Units: J per input token, J per output
#: token, J per (input x output) token pair. Fitted on HF transformers runs WITHOUT KV cache, batch
#: 1, A100-40GB, total (CPU+GPU) energy per the thesis; valid for 8-2048 input, 8-4096 output.
WILKINS_SOURCE_URL = (
    "https://github.com/grantwilkins/energy-inference/blob/5c2cfa4a9bdbccc6a037ece3d2eb64322db115ea/gfw27_project.pdf"
)
_WILKINS_CSV = """label,a0,a1,a2
Falcon (7B),-8.81,41.28,0.0891
Falcon (40B),-20.76,197.37,0.235
Llama-2 (7B),-3.89,31.52,0.0427
Llama-2 (13B),-6.79,56.01,0.0729
Llama-2 (70B),-12.03,414.82,0.315
Mistral (7B),-3.12,31.69,0.0353
Mixtral (8x7B),-8.48,105.54,0.0986
"""
WILKINS_COEFFICIENTS: dict[str, tuple[float, float, float]] = {
    r["label"]: (float(r["a0"]), float(r["a1"]), float(r["a2"])) for r in csv.DictReader(io.StringIO(_WILKINS_CSV))
}


def _architecture(model: ModelDescription) -> tuple:
    """A description minus its name and dtypes: equal tuples are the same network shape."""
    fields = dict(model.__dict__)
    for key in ("name", "weight_dtype", "kv_cache_dtype", "activation_dtype"):
        fields.pop(key)
    return tuple(sorted(fields.items()))


@functools.cache
def _wilkins_label(model_id: str) -> str | None:
    """The Wilkins fit for ``model_id``: same catalog id, or a same-organisation twin with an
    identical architecture (e.g. Mixtral-8x7B-Instruct-v0.1 vs the base model Wilkins ran; LLaMA-1
    checkpoints under another org do not count). None if no fit applies."""
    try:
        wanted = load_model(model_id)
    except ValueError:
        return None
    for label, fitted_id in WILKINS_MODEL_IDS.items():
        if fitted_id.lower() == wanted.name.lower():
            return label
    for label, fitted_id in WILKINS_MODEL_IDS.items():
        if fitted_id.split("/")[0].lower() != wanted.name.split("/")[0].lower():
            continue
        try:
            if _architecture(load_model(fitted_id)) == _architecture(wanted):
                return label
        except ValueError:
            continue
    return None


def wilkins(row: Mapping[str, Any]) -> float:
    """Wilkins et al. fitted energy, J: batch_size x (a0*in + a1*out + a2*in*out); nan elsewhere.

    The fit is per request at batch 1 (requests served one after another), so a batch of B
    requests costs B times one request: no batching benefit, by construction of the fit. Defined
    only for the 7 fitted models (or identical-architecture twins); the GPU is not checked
    (the fits are A100-40GB), so rows on other GPUs get an out-of-domain value.
    """
    label = _wilkins_label(str(row["model"]))
    if label is None:
        return math.nan
    a0, a1, a2 = WILKINS_COEFFICIENTS[label]
    tin, tout = int(row["prompt_tokens"]), int(row["output_tokens"])
    return int(row["batch_size"]) * (a0 * tin + a1 * tout + a2 * tin * tout)


#: All baselines by name, in report order.
BASELINES = {
    "analytic": analytic,
    "llmcarbon": llmcarbon,
    "ecologits": ecologits,
    "ecologits_row_gpus": ecologits_row_gpus,
    "ecologits_b64": ecologits_as_shipped,
    "wilkins": wilkins,
}
