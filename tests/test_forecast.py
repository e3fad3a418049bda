"""The analytic request forecast's closed form against the step-by-step sum it replaces."""

from __future__ import annotations

import pytest

from llmco2_vllm.predict.forecast import forecast_static_batch
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.predictor import AnalyticPredictor
from llmco2_vllm.predict.step_shape import StepShape


def step_by_step(predictor: AnalyticPredictor, batch: int, prompt: int, output: int) -> tuple[float, float, float]:
    prefill = predictor.predict_step(StepShape.static_batch_prefill(batch, prompt))
    decode = [predictor.predict_step(StepShape.static_batch_decode(batch, c)) for c in range(prompt, prompt + output - 1)]
    return prefill.energy_j, sum(d.energy_j for d in decode), sum(d.seconds for d in decode)


@pytest.mark.parametrize(
    "model, gpu, tensor_parallel",
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "H100", 1),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "H100", 2),  # MoE + all-reduce
        ("google/gemma-2-9b-it", "L40S", 1),  # sliding-window layers (window 4096)
    ],
)
@pytest.mark.parametrize("batch, prompt, output", [(1, 100, 60), (64, 3000, 40), (8, 4070, 60), (256, 50, 30)])
def test_closed_form_equals_step_by_step(model, gpu, tensor_parallel, batch, prompt, output):
    hardware = Hardware(find_gpu(gpu), tensor_parallel, tensor_parallel, "configured")
    predictor = AnalyticPredictor(load_model(model), hardware)
    forecast = forecast_static_batch(predictor, batch, prompt, output)
    prefill_j, decode_j, decode_seconds = step_by_step(predictor, batch, prompt, output)
    assert forecast.prefill_j == pytest.approx(prefill_j, rel=1e-9)
    assert forecast.decode_j == pytest.approx(decode_j, rel=1e-6)
    assert forecast.decode_seconds == pytest.approx(decode_seconds, rel=1e-6)


def test_single_output_token_has_no_decode_step():
    predictor = AnalyticPredictor(load_model("meta-llama/Llama-3.1-8B-Instruct"), Hardware(find_gpu("H100"), 1, 1, "configured"))
    forecast = forecast_static_batch(predictor, 4, 512, 1)
    assert forecast.decode_j == 0 and forecast.prefill_j > 0


# --- the fitted default: chunked prefill priced like the engine runs it and attribution shares it ------


TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128, "vocab_size": 512,
              "tie_word_embeddings": False, "torch_dtype": "float32"}  # fmt: skip


def attributed_in_a_running_batch(predictor, batch: int, prompt: int, output: int, budget: int) -> float:
    """What attribution charges one request that arrives while ``batch - 1`` like requests decode: its
    prompt in chunks of what the step budget leaves (chunked prefill), then its decodes."""
    from llmco2_vllm.accounting.attribution import split_step_energy

    others = [(f"o{i}", 0, 1, prompt + 20 * i) for i in range(batch - 1)]
    charged, done, steps = 0.0, 0, []
    while done < prompt:
        chunk = min(prompt - done, budget - len(others))
        steps.append(StepShape.from_requests([("me", chunk, 0, done)] + others))
        done += chunk
    steps += [StepShape.from_requests([("me", 0, 1, prompt + k)] + others) for k in range(output - 1)]
    for step in steps:
        prefill_j, decode_j = split_step_energy(predictor.predict_step(step), step)
        charged += prefill_j[0] + decode_j[0]
    return charged


@pytest.mark.parametrize("prompt, output", [(400, 10), (400, 120), (60, 10), (250, 40)])
def test_fitted_forecast_follows_chunked_prefill(prompt: int, output: int) -> None:
    """On an overhead-dominated model a request's energy is its share of the steps it is scheduled in:
    a prompt longer than a step's budget takes several. With the engine's step budget the forecast
    counts them and lands on what attribution charges; without it, it prices one prefill step."""
    from llmco2_vllm.predict.fitted import FittedPredictor
    from llmco2_vllm.predict.forecast import RequestForecaster
    from llmco2_vllm.predict.model_description import ModelDescription

    predictor = FittedPredictor(ModelDescription.from_hf_config(TINY_LLAMA), Hardware(find_gpu("H100"), 1, 1, "configured"))
    forecaster = RequestForecaster(predictor, 1, 0.0, 1.0)
    actual = attributed_in_a_running_batch(predictor, 8, prompt, output, budget=128)
    chunked = forecaster.forecast(prompt, output, 400.0, running_requests=7, step_token_budget=128).energy_j
    one_step = forecaster.forecast(prompt, output, 400.0, running_requests=7).energy_j
    assert chunked / actual == pytest.approx(1.0, abs=0.05)
    chunks = -(-prompt // 121)
    if chunks > 1:
        assert one_step < chunked and one_step / actual < 0.99
    else:
        assert one_step == chunked
