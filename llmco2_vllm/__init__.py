"""llmco2-vllm: energy and carbon of LLM inference, predicted and measured from inside vLLM.

The public Python API (documented in the README), importable from here; each name loads its
module on first use, so ``import llmco2_vllm`` stays cheap in vLLM's processes:

    from llmco2_vllm import load_model, Hardware, find_gpu, Deployment, AnalyticPredictor, StepShape
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "ModelDescription": "llmco2_vllm.predict.model_description",
    "load_model": "llmco2_vllm.predict.model_description",
    "Hardware": "llmco2_vllm.predict.hardware",
    "GpuSpec": "llmco2_vllm.predict.hardware",
    "find_gpu": "llmco2_vllm.predict.hardware",
    "Deployment": "llmco2_vllm.predict.deployment",
    "StepShape": "llmco2_vllm.predict.step_shape",
    "StepPrediction": "llmco2_vllm.predict.predictor",
    "StepPredictor": "llmco2_vllm.predict.predictor",
    "AnalyticPredictor": "llmco2_vllm.predict.predictor",
    "load_predictor": "llmco2_vllm.predict.predictor",
    "forecast_static_batch": "llmco2_vllm.predict.forecast",
    "GridIntensity": "llmco2_vllm.carbon.intensity",
    "lookup_region": "llmco2_vllm.carbon.intensity",
    "operational_grams_co2e": "llmco2_vllm.carbon.intensity",
    "EnergyMeter": "llmco2_vllm.measure.energy_meter",
    "Settings": "llmco2_vllm.settings",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'llmco2_vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
