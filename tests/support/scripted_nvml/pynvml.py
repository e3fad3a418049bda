"""A ``pynvml`` module for vLLM processes started by tests: GPUs scripted by a JSON file.

Put this directory first on ``PYTHONPATH`` and name the file in ``SCRIPTED_NVML_FILE``:
``{"gpus": [{"uuid": "GPU-a", "watts": 200.0}, ...]}``. Each GPU draws its constant power, so its
energy counter grows by ``watts x seconds`` from the process's first ``nvmlInit``. vLLM itself
imports its own copy (``vllm.third_party.pynvml``), so this replaces only what the plugin reads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository, for tests.support

from tests.support.fake_nvml import FakeGpu, FakeNvml  # noqa: E402


class _PoweredGpu(FakeGpu):
    """A GPU at constant power: its counter follows the wall clock."""

    def __init__(self, uuid: str, watts: float, name: str) -> None:
        super().__init__(name=name, uuid=uuid)
        self.watts = watts
        self.power_mw = int(watts * 1000)
        self._started = time.monotonic()

    @property
    def counter_mj(self) -> int:  # type: ignore[override]
        return int((time.monotonic() - self._started) * self.watts * 1000)

    @counter_mj.setter
    def counter_mj(self, value: int) -> None:
        pass


_script = json.loads(Path(os.environ["SCRIPTED_NVML_FILE"]).read_text())
_nvml = FakeNvml(
    [_PoweredGpu(gpu["uuid"], float(gpu["watts"]), gpu.get("name", "NVIDIA H100 80GB HBM3")) for gpu in _script["gpus"]]
)

NVMLError = _nvml.NVMLError
NVML_ERROR_NOT_SUPPORTED = _nvml.NVML_ERROR_NOT_SUPPORTED
NVML_ERROR_GPU_IS_LOST = _nvml.NVML_ERROR_GPU_IS_LOST
NVML_ERROR_UNKNOWN = _nvml.NVML_ERROR_UNKNOWN
NVML_DEVICE_MIG_ENABLE = _nvml.NVML_DEVICE_MIG_ENABLE
for _name in dir(_nvml):
    if _name.startswith("nvml"):
        globals()[_name] = getattr(_nvml, _name)
