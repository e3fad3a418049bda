"""Grid carbon intensity and the operational carbon of inference energy.

A bundled table of annual-average grid intensities (``llmco2_vllm/data/grid_intensity.csv``)
keyed by region code, and the conversion from energy (joules) to operational emissions
(grams CO2e). Where a changing intensity comes from (a file, a live API) is in the provider
modules beside this one; embodied carbon is in ``embodied``.

Table scopes differ by source (the CSV ``kind`` column): Ember/OWID country
rows are *lifecycle* gCO2e/kWh of generation; EPA eGRID2022 US subregion rows
are *combustion CO2 only* and read lower than a lifecycle figure would.
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
    "MAX_GRAMS_CO2E_PER_KWH",
]

JOULES_PER_KWH: float = 3.6e6
# Coal-fired generation is ~1000 gCO2e/kWh; a value above this bound is in the wrong unit.
MAX_GRAMS_CO2E_PER_KWH: float = 5000.0
_DATA_FILE = "grid_intensity.csv"
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
