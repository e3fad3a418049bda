"""Grid carbon intensity and operational carbon of inference energy.

Static part: a bundled table of annual-average grid intensities
(``llmco2_vllm/data/grid_intensity.csv``) keyed by region code, and the
conversion from energy (joules) to operational emissions (grams CO2e).

Table scopes differ by source (the CSV ``kind`` column): Ember/OWID country
rows are *lifecycle* gCO2e/kWh of generation; EPA eGRID2022 US subregion rows
are *combustion CO2 only* and read lower than a lifecycle figure would.

Embodied part: the manufacturing emissions of the hardware, amortised over its
lifetime per GPU-second the engine holds the GPUs (``EmbodiedCarbon``). With the
operational part this gives the Software Carbon Intensity of a request,
SCI = E x PUE x I + M (Green Software Foundation, ISO/IEC 21031:2024).
The default embodied figure (``llmco2_vllm/data/embodied_carbon.csv``) is 1/8 of
an 8-GPU server node, so it covers each GPU's share of the node's CPUs, DRAM,
storage, chassis and packaging, not the GPU die alone.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Union, overload

import numpy as np
import numpy.typing as npt

__all__ = [
    "GridIntensity",
    "UnknownRegionError",
    "region_table",
    "lookup_region",
    "operational_grams_co2e",
    "JOULES_PER_KWH",
    "EmbodiedCarbon",
    "embodied_grams_co2e",
    "default_embodied_carbon",
]

JOULES_PER_KWH: float = 3.6e6
_DATA_FILE = "grid_intensity.csv"
_EMBODIED_DATA_FILE = "embodied_carbon.csv"
# Rows of embodied_carbon.csv that the default is read from (column ``item``).
_EMBODIED_PER_GPU_ITEM = "per-GPU share of 8-GPU node"
_EMBODIED_LIFETIME_ITEM = "hardware lifetime for amortisation"
SECONDS_PER_YEAR: float = 365.25 * 86400.0
_MAX_SUGGESTIONS = 5

FloatArray = npt.NDArray[np.float64]
EnergyLike = Union[float, int, npt.NDArray[np.floating]]


@dataclass(frozen=True)
class GridIntensity:
    """Carbon intensity of the electricity a deployment draws.

    Attributes:
        grams_co2e_per_kwh: Emissions per kWh consumed, in gCO2e/kWh.
        region: Region code (e.g. ``"FR"``, ``"CAMX"``), or ``"static"`` for a
            value the user set directly.
        kind: ``"average"`` for annual averages (every table value); live
            providers may later add ``"marginal"``.
        year: Year the value refers to, or ``None`` when unknown.
        source: URL the value was read from, or ``"user setting"``.
    """

    grams_co2e_per_kwh: float
    region: str
    kind: str
    year: int | None
    source: str

    def __post_init__(self) -> None:
        value = self.grams_co2e_per_kwh
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(
                f"grams_co2e_per_kwh must be a finite number >= 0, got {value!r}"
            )


class UnknownRegionError(ValueError):
    """Raised when a region code or name is not in the bundled table."""

    def __init__(self, region: str, suggestions: list[str]) -> None:
        self.region = region
        self.suggestions = suggestions
        hint = (
            f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        )
        super().__init__(
            f"Unknown grid region {region!r}.{hint} "
            "Run `llmco2 regions` to list all known regions."
        )


@dataclass(frozen=True)
class _Row:
    code: str
    region: str
    year: int
    grams_co2e_per_kwh: float
    source_url: str


def _read_rows() -> list[_Row]:
    text = (
        resources.files("llmco2_vllm")
        .joinpath("data", _DATA_FILE)
        .read_text(encoding="utf-8")
    )
    return [
        _Row(
            code=rec["code"].strip().upper(),
            region=rec["region"].strip(),
            year=int(rec["year"]),
            grams_co2e_per_kwh=float(rec["grams_co2e_per_kwh"]),
            source_url=rec["source_url"].strip(),
        )
        for rec in csv.DictReader(io.StringIO(text))
    ]


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, GridIntensity], dict[str, str], dict[str, str]]:
    """Latest value per code, lower-cased alias -> code, lower-cased alias -> display."""
    latest: dict[str, _Row] = {}
    aliases: dict[str, str] = {}
    display: dict[str, str] = {}
    for row in _read_rows():
        kept = latest.get(row.code)
        if kept is None or row.year > kept.year:
            latest[row.code] = row
        # Accept the full name and the name without its "(...)" part,
        # e.g. "WECC California (CAMX)" and "WECC California".
        short = re.sub(r"\s*\(.*?\)\s*", " ", row.region).strip()
        for alias in (row.code, row.region, short):
            if alias:
                aliases.setdefault(alias.lower(), row.code)
                display.setdefault(alias.lower(), alias)
    table = {
        code: GridIntensity(
            grams_co2e_per_kwh=row.grams_co2e_per_kwh,
            region=code,
            kind="average",
            year=row.year,
            source=row.source_url,
        )
        for code, row in sorted(latest.items())
    }
    return table, aliases, display


def region_table() -> dict[str, GridIntensity]:
    """Return the latest-year intensity for every region code (cached copy)."""
    return dict(_tables()[0])


def lookup_region(region: str) -> GridIntensity:
    """Find a region by code or name, case-insensitively.

    Examples: ``"FR"``, ``"france"``, ``"camx"``, ``"WECC California"``.

    Raises:
        UnknownRegionError: if nothing matches; the message lists up to five
            close codes or names.
    """
    table, aliases, display = _tables()
    key = region.strip().lower()
    code = aliases.get(key)
    if code is not None:
        return table[code]
    close = difflib.get_close_matches(key, list(aliases), n=_MAX_SUGGESTIONS, cutoff=0.6)
    raise UnknownRegionError(region, [display[alias] for alias in close])


@overload
def operational_grams_co2e(
    energy_j: float, intensity: GridIntensity, pue: float
) -> float: ...


@overload
def operational_grams_co2e(
    energy_j: npt.NDArray[np.floating], intensity: GridIntensity, pue: float
) -> FloatArray: ...


def operational_grams_co2e(
    energy_j: EnergyLike, intensity: GridIntensity, pue: float
) -> float | FloatArray:
    """Operational emissions in gCO2e of ``energy_j`` joules at the IT load.

    ``grams = energy_j / 3.6e6 * pue * grams_co2e_per_kwh``. Accepts a scalar
    (returns ``float``) or a numpy array (returns an array, same shape).

    Raises:
        ValueError: on negative or non-finite energy, ``pue < 1.0`` or a
            non-finite ``pue``.
    """
    if not math.isfinite(pue) or pue < 1.0:
        raise ValueError(f"pue must be a finite number >= 1.0, got {pue!r}")
    grams_per_kwh = intensity.grams_co2e_per_kwh
    if not math.isfinite(grams_per_kwh) or grams_per_kwh < 0.0:
        raise ValueError(
            f"grams_co2e_per_kwh must be a finite number >= 0, got {grams_per_kwh!r}"
        )
    factor = pue * grams_per_kwh / JOULES_PER_KWH

    if isinstance(energy_j, np.ndarray):
        values = energy_j.astype(np.float64, copy=False)
        if not np.all(np.isfinite(values)):
            raise ValueError("energy_j must be finite; got NaN or infinity")
        if np.any(values < 0.0):
            raise ValueError("energy_j must be >= 0; got a negative value")
        return values * factor

    scalar = float(energy_j)
    if not math.isfinite(scalar):
        raise ValueError(f"energy_j must be finite, got {energy_j!r}")
    if scalar < 0.0:
        raise ValueError(f"energy_j must be >= 0, got {energy_j!r}")
    return scalar * factor


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
