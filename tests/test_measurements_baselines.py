"""The measured-rows table and the baseline predictors."""

from __future__ import annotations

import math

import pytest

from llmco2_vllm.predict import baselines
from llmco2_vllm.predict.hardware import find_gpu
from llmco2_vllm.predict.measurements import COLUMNS, load_measurements
from llmco2_vllm.predict.model_description import load_model

ALL_ROWS = load_measurements(include_no_kv_cache=True)
MLENERGY_ROWS = [r for r in ALL_ROWS if r["dataset"].startswith("mlenergy")]


def test_every_row_resolves_and_is_positive():
    assert len(ALL_ROWS) > 300
    for row in ALL_ROWS:
        assert set(COLUMNS) <= set(row)
        assert load_model(row["model"]).name == row["model"]
        assert find_gpu(row["gpu"]).name == row["gpu"]
        assert math.isfinite(row["energy_j"]) and row["energy_j"] > 0, row["row_id"]
        assert row["batch_size"] >= 1 and row["output_tokens"] >= 1 and row["prompt_tokens"] >= 1
        assert row["num_gpus"] % row["tensor_parallel"] == 0
        assert row["source_url"].startswith("https://")
        assert row["derivation"] and row["boundary"] in ("gpu", "node")
        if row["phase_split_available"]:
            assert row["prefill_j"] + row["decode_j"] == pytest.approx(row["energy_j"], rel=1e-4)


def test_row_ids_unique_and_kv_filter():
    ids = [r["row_id"] for r in ALL_ROWS]
    assert len(ids) == len(set(ids))
    default = load_measurements()
    assert all(r["kv_cache"] for r in default)
    assert {r["dataset"] for r in ALL_ROWS if not r["kv_cache"]} == {"wilkins2024"}
    assert len(default) < len(ALL_ROWS)
    assert all(r["prompt_assumed"] for r in MLENERGY_ROWS)


def test_mlenergy_v2_derivation():
    # First mlenergy_v2_vllm.csv row: gemma-2-27b-it chat, A100 TP4, avg batch 127.72,
    # 230.644433524673 J per request, 392.47 average output tokens.
    row = next(r for r in ALL_ROWS if r["row_id"] == "mlenergy_v2:chat:A100-SXM4-40GB:google/gemma-2-27b-it:tp4pp1:mbs128")
    assert row["batch_size"] == 128 and row["output_tokens"] == 392 and row["num_gpus"] == 4
    assert row["energy_j"] == pytest.approx(230.644433524673 * 128, rel=1e-5)


@pytest.mark.parametrize("name", ["analytic", "llmcarbon", "ecologits", "ecologits_row_gpus", "ecologits_b64"])
def test_baselines_finite_positive_on_mlenergy(name):
    predict = baselines.BASELINES[name]
    for row in MLENERGY_ROWS:
        value = predict(row)
        assert math.isfinite(value) and value > 0, (name, row["row_id"], value)


def test_wilkins_defined_only_for_its_models():
    values = {r["model"]: baselines.wilkins(r) for r in MLENERGY_ROWS}
    assert math.isnan(values["google/gemma-2-9b-it"])
    assert math.isnan(values["huggyllama/llama-7b"])  # same shape as Llama-2-7B, different org: not matched
    mixtral = next(r for r in MLENERGY_ROWS if r["model"] == "mistralai/Mixtral-8x7B-Instruct-v0.1")
    a0, a1, a2 = -8.48, 105.54, 0.0986  # wilkins_fitted_models.csv, Mixtral (8x7B)
    tin, tout = mixtral["prompt_tokens"], mixtral["output_tokens"]
    assert baselines.wilkins(mixtral) == pytest.approx(mixtral["batch_size"] * (a0 * tin + a1 * tout + a2 * tin * tout))


def test_llmcarbon_by_hand():
    row = {"model": "meta-llama/Llama-3.1-8B-Instruct", "gpu": "H100-SXM5-80GB", "num_gpus": 2,
           "tensor_parallel": 2, "batch_size": 16, "prompt_tokens": 300, "output_tokens": 200}
    active = load_model(row["model"]).active_params_per_token
    # 2 x N x (300 + 200) x 16 FLOPs on H100 (989.4 TFLOP/s BF16 dense, 700 W TDP), efficiency 0.5;
    # two GPUs finish in half the time at twice the power: the count cancels.
    flops = 2 * active * 500 * 16
    expected = flops / (2 * 989.4e12 * 0.5) * 700 * 2
    assert baselines.llmcarbon(row) == pytest.approx(expected, rel=1e-9)
    assert baselines.llmcarbon(dict(row, num_gpus=4, tensor_parallel=4)) == pytest.approx(expected, rel=1e-9)
    assert baselines.llmcarbon(row, efficiency=0.25) == pytest.approx(2 * expected, rel=1e-9)


def test_ecologits_transcription_by_hand():
    # EcoLogits 0.11.3 constants: alpha 1.1665273170451914e-06, beta -0.011205921025579175,
    # gamma 4.052928146734005e-05 (Wh per token after its /1000 -> kWh). For 7 B active params,
    # batch 64, 100 output tokens, one GPU:
    #   exp(-0.011205921025579175 * 64) = 0.488126...
    #   per token = 1.1665273e-06 * 0.488126 * 7 + 4.0529281e-05 = 4.451524e-05 Wh
    #   x 100 tokens x 3600 J/Wh = 16.0255 J per request on one GPU.
    kwh = baselines.ecologits_gpu_energy_kwh_per_gpu(7.0, 100, 64)
    assert kwh * 3.6e6 == pytest.approx(16.0255, rel=1e-4)
    # GPU count: 1.2 x 70 B x 2 bytes = 168 GB -> ceil(168 / 80) = 3 -> next power of two = 4.
    assert baselines.ecologits_gpu_required_count(70.0) == 4
    assert baselines.ecologits_gpu_required_count(7.0) == 1
    # Whole batch = batch x GPUs x per-GPU request energy.
    row = {"model": "mistralai/Mistral-7B-Instruct-v0.3", "gpu": "H100-SXM5-80GB", "num_gpus": 1,
           "tensor_parallel": 1, "batch_size": 64, "prompt_tokens": 10, "output_tokens": 100}
    active_b = load_model(row["model"]).active_params_per_token / 1e9
    expected = 64 * baselines.ecologits_gpu_energy_kwh_per_gpu(active_b, 100, 64) * 3.6e6
    assert baselines.ecologits(row) == pytest.approx(expected, rel=1e-12)
    assert baselines.ecologits_as_shipped(dict(row, batch_size=1)) == pytest.approx(expected / 64, rel=1e-12)


def test_analytic_matches_batch_predictor():
    from llmco2_vllm.predict.batch_predict import BatchPredictor

    row = MLENERGY_ROWS[0]
    assert baselines.analytic(row) == pytest.approx(BatchPredictor(predictor="analytic").predict(row)["energy_j"])
