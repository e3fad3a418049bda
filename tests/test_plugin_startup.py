"""The plugin's start-up in a vLLM process: files named by the settings are checked before vLLM serves.

Settings check values only; the grid-intensity file and the calibration file are read by their
providers, and ``register()`` (vLLM's general-plugin entry point, run in every vLLM process before
the engine starts) builds those checks, so a bad file stops ``vllm serve`` with the fix in the
message instead of switching the plugin off later in its worker.
"""

from __future__ import annotations

import pytest

from llmco2_vllm.plugin import entry_points


@pytest.fixture
def fresh_plugin(monkeypatch):
    monkeypatch.setattr(entry_points, "_registered", False)
    monkeypatch.setattr(entry_points, "_wrap_scheduler_selection", lambda: None)  # no vLLM needed here
    monkeypatch.setenv("LLMCO2_RUN_DIR", "/nonexistent-run-dir-not-created")


def test_bad_grid_intensity_file_stops_startup_with_the_fix(fresh_plugin, monkeypatch, tmp_path):
    series = tmp_path / "intensity.csv"
    series.write_text("timestamp,grams_co2e_per_kwh\n2026-01-01T00:00:00Z,not-a-number\n")
    monkeypatch.setenv("LLMCO2_GRID_INTENSITY_FILE", str(series))
    with pytest.raises(ValueError, match="LLMCO2_GRID_INTENSITY_FILE") as raised:
        entry_points.register()
    assert "line 2" in str(raised.value)
    assert entry_points._registered is False  # a later, fixed start is not skipped


def test_missing_grid_intensity_file_stops_startup(fresh_plugin, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCO2_GRID_INTENSITY_FILE", str(tmp_path / "absent.csv"))
    with pytest.raises(ValueError, match="no such file"):
        entry_points.register()


def test_corrupt_calibration_file_stops_startup_with_the_fix(fresh_plugin, monkeypatch, tmp_path):
    corrupt = tmp_path / "calibration.json"
    corrupt.write_text("{not json")
    monkeypatch.setenv("LLMCO2_CALIBRATION_FILE", str(corrupt))
    with pytest.raises(entry_points.SettingsError, match="LLMCO2_CALIBRATION_FILE"):
        entry_points.register()


def test_good_files_start(fresh_plugin, monkeypatch, tmp_path):
    series = tmp_path / "intensity.csv"
    series.write_text("timestamp,grams_co2e_per_kwh\n2026-01-01T00:00:00Z,120\n")
    monkeypatch.setenv("LLMCO2_GRID_INTENSITY_FILE", str(series))
    monkeypatch.setenv("LLMCO2_CALIBRATION_FILE", str(tmp_path / "calibration.json"))  # absent: starts fresh
    entry_points.register()
    assert entry_points._registered is True
