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
