"""Shared fixtures: a tiny random-weight Llama written once per test session; NVML-free energy-meter state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmco2_vllm.dev.local_server import CPU_ENVIRONMENT
from llmco2_vllm.dev.tiny_model import make_tiny_llama

for _key, _value in CPU_ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def isolated_energy_meter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GPU visible (no CUDA_VISIBLE_DEVICES) and the meter's log-once memory empty, for one test."""
    from llmco2_vllm.measure import energy_meter

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(energy_meter, "_LOGGED_MESSAGES", set())
