"""The static grid-intensity table, operational carbon arithmetic, and embodied carbon."""

from __future__ import annotations

import csv
import math
from importlib import resources

import numpy as np
import pytest

from llmco2_vllm.carbon.embodied import EmbodiedCarbon, default_embodied_carbon, embodied_grams_co2e
from llmco2_vllm.carbon.intensity import (
    GridIntensity,
    UnknownRegionError,
    lookup_region,
    operational_grams_co2e,
    region_table,
)


def _csv_rows() -> list[dict[str, str]]:
    text = resources.files("llmco2_vllm").joinpath("data", "grid_intensity.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("FR", "FR"),
        ("fr", "FR"),
        ("France", "FR"),
        ("US", "US"),
        ("united states", "US"),
        ("WORLD", "WORLD"),
        ("world", "WORLD"),
        ("CAMX", "CAMX"),
        ("camx", "CAMX"),
        ("WECC California (CAMX)", "CAMX"),
        ("WECC California", "CAMX"),
        ("  erct ", "ERCT"),
        ("European Union", "EU"),
    ],
)
def test_lookup_by_code_and_name(query: str, code: str) -> None:
    intensity = lookup_region(query)
    assert intensity.region == code
    assert intensity.kind == "average"
    assert intensity.grams_co2e_per_kwh > 0


def test_latest_year_is_chosen() -> None:
    france = lookup_region("FR")
    assert france.year == 2024
    assert france.grams_co2e_per_kwh == pytest.approx(44.2)
    assert france.source.startswith("https://")
    assert lookup_region("WORLD").grams_co2e_per_kwh == pytest.approx(473.0)
    assert lookup_region("CAMX").year == 2022
    assert lookup_region("CAMX").grams_co2e_per_kwh == pytest.approx(225.6)
    # Only a 2023 value exists for the EU.
    assert lookup_region("EU").year == 2023


def test_table_matches_csv_latest_years() -> None:
    table = region_table()
    latest: dict[str, int] = {}
    for row in _csv_rows():
        latest[row["code"]] = max(latest.get(row["code"], 0), int(row["year"]))
    assert set(table) == set(latest)
    assert all(table[code].year == year for code, year in latest.items())


def test_csv_rows_unique_and_kinds_valid() -> None:
    rows = _csv_rows()
    keys = [(r["code"], r["year"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["kind"] for r in rows} == {"lifecycle", "combustion_co2"}
    assert all(r["kind"] == "combustion_co2" for r in rows if r["code"] == "CAMX")
    assert all(r["kind"] == "lifecycle" for r in rows if r["code"] == "FR")


def test_region_table_returns_copy() -> None:
    table = region_table()
    table.pop("FR")
    assert "FR" in region_table()


def test_unknown_region_suggests_close_matches() -> None:
    with pytest.raises(UnknownRegionError) as excinfo:
        lookup_region("Frnace")
    err = excinfo.value
    assert isinstance(err, ValueError)
    assert "France" in err.suggestions
    assert 0 < len(err.suggestions) <= 5
    assert "llmco2 regions" in str(err)
    assert "France" in str(err)


def test_unknown_region_without_matches() -> None:
    with pytest.raises(UnknownRegionError, match="llmco2 regions"):
        lookup_region("zzzzzzzzzz")


def test_hand_computed_case() -> None:
    intensity = GridIntensity(100.0, "static", "average", None, "user setting")
    # 3.6e6 J = 1 kWh; x PUE 1.5 x 100 g/kWh = 150 g.
    grams = operational_grams_co2e(3.6e6, intensity, pue=1.5)
    assert isinstance(grams, float)
    assert grams == pytest.approx(150.0)
    assert operational_grams_co2e(0.0, intensity, pue=1.0) == 0.0


def test_vector_input() -> None:
    intensity = GridIntensity(100.0, "static", "average", None, "user setting")
    energy_j = np.array([0.0, 3.6e6, 7.2e6])
    grams = operational_grams_co2e(energy_j, intensity, pue=1.5)
    assert isinstance(grams, np.ndarray)
    assert grams.shape == energy_j.shape
    np.testing.assert_allclose(grams, [0.0, 150.0, 300.0])
    ints = operational_grams_co2e(np.array([3_600_000]), intensity, pue=1.0)
    np.testing.assert_allclose(ints, [100.0])


def test_with_table_region() -> None:
    france = lookup_region("FR")
    grams = operational_grams_co2e(3.6e6, france, pue=1.0)
    assert grams == pytest.approx(france.grams_co2e_per_kwh)


@pytest.mark.parametrize(
    ("energy_j", "pue", "match"),
    [
        (-1.0, 1.2, "energy_j"),
        (math.nan, 1.2, "energy_j"),
        (math.inf, 1.2, "energy_j"),
        (np.array([1.0, -1.0]), 1.2, "energy_j"),
        (np.array([1.0, np.nan]), 1.2, "energy_j"),
        (1.0, 0.99, "pue"),
        (1.0, math.nan, "pue"),
        (1.0, math.inf, "pue"),
    ],
)
def test_invalid_inputs_raise(energy_j: object, pue: float, match: str) -> None:
    intensity = GridIntensity(100.0, "static", "average", None, "user setting")
    with pytest.raises(ValueError, match=match):
        operational_grams_co2e(energy_j, intensity, pue=pue)  # type: ignore[call-overload]


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_invalid_intensity_raises(value: float) -> None:
    with pytest.raises(ValueError, match="grams_co2e_per_kwh"):
        GridIntensity(value, "static", "average", None, "user setting")


def test_embodied_rate_hand_computed() -> None:
    # 31.5576 kg over one Julian year (31 557 600 s) = 31 557.6 g / 31 557 600 s = 0.001 g per GPU-second.
    embodied = EmbodiedCarbon(kg_co2e_per_gpu=31.5576, lifetime_years=1.0, source="user setting")
    assert embodied.grams_per_gpu_second == pytest.approx(0.001)
    assert embodied_grams_co2e(1000.0, embodied) == pytest.approx(1.0)
    # 8 GPUs held for one hour = 28 800 GPU-seconds.
    assert embodied_grams_co2e(8 * 3600.0, embodied) == pytest.approx(28.8)
    assert embodied_grams_co2e(0.0, embodied) == 0.0


def test_embodied_zero_switches_it_off() -> None:
    off = EmbodiedCarbon(kg_co2e_per_gpu=0.0, lifetime_years=4.0, source="user setting")
    assert off.grams_per_gpu_second == 0.0
    assert embodied_grams_co2e(3600.0, off) == 0.0


def test_default_embodied_is_read_from_the_data_file() -> None:
    default = default_embodied_carbon()
    assert default.kg_co2e_per_gpu == 463.0  # 1/8 of the 3700 kg 8-GPU node
    assert default.lifetime_years == 4.0
    assert default.source == "https://arxiv.org/abs/2503.05804"
    text = resources.files("llmco2_vllm").joinpath("data", "embodied_carbon.csv").read_text()
    rows = {row["item"]: row for row in csv.DictReader(text.splitlines())}
    node = float(rows["8-GPU server node (BLOOM/Luccioni et al. 2023 assumption)"]["value"])
    assert default.kg_co2e_per_gpu == pytest.approx(node / 8, abs=0.5)
    # Independent row of the same paper: 0.013 kg per GPU-hour over a 4-year life (rounded to 2 significant digits).
    per_gpu_hour_kg = float(rows["amortized embodied per H100 GPU-hour (4-yr life)"]["value"])
    assert default.grams_per_gpu_second * 3600 / 1000 == pytest.approx(per_gpu_hour_kg, abs=0.0005)


@pytest.mark.parametrize("gpu_seconds", [-1.0, math.nan, math.inf])
def test_embodied_rejects_bad_gpu_seconds(gpu_seconds: float) -> None:
    with pytest.raises(ValueError, match="gpu_seconds"):
        embodied_grams_co2e(gpu_seconds, default_embodied_carbon())


@pytest.mark.parametrize(
    ("kg", "years", "match"),
    [(-1.0, 4.0, "kg_co2e_per_gpu"), (math.nan, 4.0, "kg_co2e_per_gpu"), (463.0, 0.0, "lifetime_years"), (463.0, math.inf, "lifetime_years")],
)
def test_embodied_carbon_validates(kg: float, years: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbodiedCarbon(kg, years, "user setting")
