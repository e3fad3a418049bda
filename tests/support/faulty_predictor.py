"""A predictor that always raises, loaded by a real ``vllm serve`` in ``test_vllm_serve.py`` through
``LLMCO2_PREDICTOR=tests.support.faulty_predictor:FailingPredictor`` (the repository root on PYTHONPATH)."""

from llmco2_vllm.predict.step_shape import StepShape


class FailingPredictor:
    name = "failing"

    def __init__(self, model, hardware, pipeline_parallel=1) -> None:
        self.model = model

    def predict_step(self, step: StepShape):
        raise RuntimeError("injected prediction failure")
