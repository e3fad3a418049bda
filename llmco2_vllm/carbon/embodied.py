"""Embodied carbon: the hardware's manufacturing emissions, amortised per GPU-second held.

With the operational part (``intensity``) this gives the Software Carbon Intensity of a
request, SCI = E x PUE x I + M (Green Software Foundation, ISO/IEC 21031:2024). The default
figure (``llmco2_vllm/data/embodied_carbon.csv``) is 1/8 of an 8-GPU server node, so it
covers each GPU's share of the node's CPUs, DRAM, storage, chassis and packaging, not the
GPU die alone.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["EmbodiedCarbon", "embodied_grams_co2e", "default_embodied_carbon", "SECONDS_PER_YEAR"]

SECONDS_PER_YEAR: float = 365.25 * 86400.0  # Julian year
_EMBODIED_DATA_FILE = "embodied_carbon.csv"
# Rows of embodied_carbon.csv that the default is read from (column ``item``).
_EMBODIED_PER_GPU_ITEM = "per-GPU share of 8-GPU node"
_EMBODIED_LIFETIME_ITEM = "hardware lifetime for amortisation"


@dataclass(frozen=True)
class EmbodiedCarbon:
    """Manufacturing emissions of the hardware, amortised over its lifetime.

    Attributes:
        kg_co2e_per_gpu: Embodied carbon of one GPU including its share of the
            server (CPUs, DRAM, storage, chassis), kg CO2e. 0 switches it off.
        lifetime_years: Amortisation period, years.
        source: URL of the figure, or ``"user setting"``.
    """

    kg_co2e_per_gpu: float
    lifetime_years: float
    source: str

    def __post_init__(self) -> None:
        if not math.isfinite(self.kg_co2e_per_gpu) or self.kg_co2e_per_gpu < 0.0:
            raise ValueError(f"kg_co2e_per_gpu must be a finite number >= 0, got {self.kg_co2e_per_gpu!r}")
        if not math.isfinite(self.lifetime_years) or self.lifetime_years <= 0.0:
            raise ValueError(f"lifetime_years must be a finite number > 0, got {self.lifetime_years!r}")

    @property
    def grams_per_gpu_second(self) -> float:
        """Embodied grams CO2e charged per second one GPU is held (Julian years)."""
        return self.kg_co2e_per_gpu * 1000.0 / (self.lifetime_years * SECONDS_PER_YEAR)


def embodied_grams_co2e(gpu_seconds: float, embodied: EmbodiedCarbon) -> float:
    """Embodied emissions in gCO2e of holding GPUs for ``gpu_seconds`` (GPUs x wall seconds).

    Raises:
        ValueError: on negative or non-finite ``gpu_seconds``.
    """
    seconds = float(gpu_seconds)
    if not math.isfinite(seconds) or seconds < 0.0:
        raise ValueError(f"gpu_seconds must be a finite number >= 0, got {gpu_seconds!r}")
    return seconds * embodied.grams_per_gpu_second


@lru_cache(maxsize=1)
def default_embodied_carbon() -> EmbodiedCarbon:
    """The bundled default: 463 kg CO2e per GPU (1/8 of an 8-GPU node), over 4 years.

    Both numbers are read from ``data/embodied_carbon.csv`` (Morrison et al. 2025,
    who adopt Luccioni et al. 2023's 3700 kg per 8-GPU node), with the row's URL.
    """
    text = resources.files("llmco2_vllm").joinpath("data", _EMBODIED_DATA_FILE).read_text(encoding="utf-8")
    rows = {row["item"].strip(): row for row in csv.DictReader(io.StringIO(text))}
    per_gpu = rows[_EMBODIED_PER_GPU_ITEM]
    lifetime = rows[_EMBODIED_LIFETIME_ITEM]
    return EmbodiedCarbon(
        kg_co2e_per_gpu=float(per_gpu["value"]),
        lifetime_years=float(lifetime["value"]),
        source=per_gpu["source_url"].strip(),
    )
