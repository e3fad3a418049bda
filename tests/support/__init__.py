"""What several test modules share: fakes of outside services and the checks the real-server tests repeat.

Test modules import from here, never from each other (``tests.support.fake_nvml``, not ``test_energy_meter``);
benchmarks import nothing from tests (what they share with tests lives in ``llmco2_vllm.dev``).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
