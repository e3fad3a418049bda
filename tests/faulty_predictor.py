"""A predictor that always raises: loaded by the fault test through LLMCO2_PREDICTOR."""

from llmco2_vllm.step_shape import StepShape


class FailingPredictor:
    name = "failing"

    def __init__(self, model, hardware, pipeline_parallel=1) -> None:
        self.model = model

    def predict_step(self, step: StepShape):
        raise RuntimeError("injected prediction failure")
