"""What a prediction is for: a model served on some GPUs with some parallelism."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import ModelDescription


@dataclass(frozen=True)
class Deployment:
    """The served model on its GPUs: what every predictor is built for.

    Crosses processes as JSON (``to_json``/``from_json``): the GPU travels by catalog name.
    """

    model_name: str
    model: ModelDescription
    hardware: Hardware
    pipeline_parallel: int = 1

    def to_dict(self) -> dict[str, Any]:
        hardware = self.hardware
        return {
            "model_name": self.model_name,
            "model": dataclasses.asdict(self.model),
            "hardware": {
                "gpu": hardware.gpu.name,
                "num_gpus": hardware.num_gpus,
                "tensor_parallel": hardware.tensor_parallel,
                "source": hardware.source,
            },
            "pipeline_parallel": self.pipeline_parallel,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Deployment":
        hardware = values["hardware"]
        return cls(
            model_name=values["model_name"],
            model=ModelDescription(**values["model"]),
            hardware=Hardware(
                find_gpu(hardware["gpu"]), int(hardware["num_gpus"]), int(hardware["tensor_parallel"]), hardware["source"]
            ),
            pipeline_parallel=int(values["pipeline_parallel"]),
        )

    @classmethod
    def from_json(cls, text: str) -> "Deployment":
        return cls.from_dict(json.loads(text))

    @property
    def fingerprint(self) -> str:
        """Stable short id of what predictions depend on (the hardware's detection source aside)."""
        values = self.to_dict()
        values["hardware"].pop("source")
        values.pop("model_name")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["Deployment"]
