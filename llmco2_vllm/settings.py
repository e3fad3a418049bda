"""The plugin's settings: one place, environment variables ``LLMCO2_*`` over an optional TOML file.

Precedence: built-in default < file named by ``LLMCO2_CONFIG`` < environment variable. Every value
is validated at start-up; a wrong one raises ``SettingsError`` whose message says how to fix it.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import dataclass, fields
from typing import Any, Mapping

ENV_PREFIX = "LLMCO2_"
# Variables the plugin sets or reads for its own plumbing, not user settings.
INTERNAL_VARIABLES = {"LLMCO2_CONFIG", "LLMCO2_RUN_DIR"}


class SettingsError(ValueError):
    """A setting is wrong; the message names it and says how to fix it."""


@dataclass(frozen=True)
class Settings:
    """All user settings. Field ``name`` is read from ``LLMCO2_NAME`` or key ``name`` in the file."""

    enabled: bool = True
    target_gpu: str = "H100-SXM5-80GB"  # predicted-for GPU when NVML sees none (CPU hosts, tests)
    region: str = "WORLD"  # grid region code (ISO 3166 country, eGRID subregion, WORLD)
    grid_intensity: float | None = None  # gCO2e/kWh; overrides the region's annual average
    pue: float = 1.0  # 1.0 = GPU-only boundary; set your facility's power usage effectiveness
    predictor: str = "analytic"  # "gnn" (LLMCO2 checkpoint, not yet the default: see benchmarks/results/gnn_eval.md) or "package.module:Class"
    queue_capacity: int = 8192  # steps waiting for the worker before new ones are dropped (and counted)
    flush_interval_seconds: float = 0.5  # how often the engine publishes metrics to the API server
    max_tracked_requests: int = 100_000  # running requests kept in the attribution ledger
    request_log: str = ""  # JSON-lines file: one record per finished request (audits); empty = off
    measure_energy: bool = True  # read the GPUs' energy counters through NVML when a GPU is present
    calibration_file: str = ""  # where the online calibration is kept across restarts; empty = not kept
    calibration_window_seconds: float = 5.0  # measured energy is compared with predictions over windows this long
    calibration_forgetting: float = 0.98  # weight of the previous window in the online fit (~50-window memory)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = environ.get("LLMCO2_CONFIG")
        if path:
            file_values = _read_file(path)
            known_names = [f.name for f in fields(cls)]
            for name in file_values:
                if name not in known_names:
                    raise SettingsError(_unknown_message(name, known_names, f"config file {path}"))
            values.update(file_values)
        known = {f.name for f in fields(cls)}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX) or key in INTERNAL_VARIABLES:
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in known:
                raise SettingsError(_unknown_message(key, [ENV_PREFIX + k.upper() for k in known]))
            values[name] = raw
        return cls.from_mapping(values, origin="environment")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], origin: str = "settings") -> "Settings":
        kwargs: dict[str, Any] = {}
        for field in fields(cls):
            if field.name in values:
                kwargs[field.name] = _convert(field.name, values[field.name], field.type)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(_unknown_message(sorted(unknown)[0], [f.name for f in fields(cls)], origin))
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check values against the catalogs; raise SettingsError with the fix."""
        from .carbon import UnknownRegionError, lookup_region
        from .hardware import UnknownGpuError, find_gpu

        try:
            find_gpu(self.target_gpu)
        except UnknownGpuError as error:
            raise SettingsError(f"LLMCO2_TARGET_GPU={self.target_gpu!r}: {error}") from None
        if self.grid_intensity is None:
            try:
                lookup_region(self.region)
            except UnknownRegionError as error:
                raise SettingsError(
                    f"LLMCO2_REGION={self.region!r}: {error} Or set LLMCO2_GRID_INTENSITY to a value in gCO2e/kWh."
                ) from None
        elif not (math.isfinite(self.grid_intensity) and 0 <= self.grid_intensity <= 5000):
            raise SettingsError(
                f"LLMCO2_GRID_INTENSITY={self.grid_intensity}: give gCO2e/kWh between 0 and 5000 (world average ~470)."
            )
        if not (math.isfinite(self.pue) and 1.0 <= self.pue <= 5.0):
            raise SettingsError(f"LLMCO2_PUE={self.pue}: power usage effectiveness is a ratio >= 1.0 (e.g. 1.2), at most 5.")
        if self.queue_capacity < 16:
            raise SettingsError(f"LLMCO2_QUEUE_CAPACITY={self.queue_capacity}: use at least 16 (default 8192).")
        if not (0.05 <= self.flush_interval_seconds <= 60):
            raise SettingsError(
                f"LLMCO2_FLUSH_INTERVAL_SECONDS={self.flush_interval_seconds}: use 0.05 to 60 seconds (default 0.5)."
            )
        if self.max_tracked_requests < 100:
            raise SettingsError(f"LLMCO2_MAX_TRACKED_REQUESTS={self.max_tracked_requests}: use at least 100.")
        if self.request_log:
            parent = os.path.dirname(os.path.abspath(self.request_log))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise SettingsError(
                    f"LLMCO2_REQUEST_LOG={self.request_log!r}: directory {parent!r} does not exist or is not writable."
                )
        if not (0.5 <= self.calibration_window_seconds <= 3600):
            raise SettingsError(
                f"LLMCO2_CALIBRATION_WINDOW_SECONDS={self.calibration_window_seconds}: use 0.5 to 3600 seconds "
                "(NVML energy counters update every few tens of milliseconds; default 5)."
            )
        if not (0.5 <= self.calibration_forgetting <= 1.0):
            raise SettingsError(
                f"LLMCO2_CALIBRATION_FORGETTING={self.calibration_forgetting}: use 0.5 to 1.0 "
                "(1.0 never forgets; default 0.98 remembers ~50 windows)."
            )
        if self.calibration_file:
            from .calibration import CalibrationFileError, OnlineCalibrator

            parent = os.path.dirname(os.path.abspath(self.calibration_file))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise SettingsError(
                    f"LLMCO2_CALIBRATION_FILE={self.calibration_file!r}: directory {parent!r} does not exist or is not writable."
                )
            try:
                OnlineCalibrator.load(self.calibration_file)
            except CalibrationFileError as error:
                raise SettingsError(f"LLMCO2_CALIBRATION_FILE: {error}") from None
        if self.predictor not in ("analytic", "gnn") and ":" not in self.predictor:
            raise SettingsError(
                f"LLMCO2_PREDICTOR={self.predictor!r}: use 'analytic', 'gnn' or an import path 'package.module:Class'."
            )


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"LLMCO2_CONFIG={path!r}: no such file. Point it at a TOML file or unset it.") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"LLMCO2_CONFIG={path!r} is not valid TOML: {error}") from None
    return dict(data.get("llmco2", data))


def _convert(name: str, raw: Any, annotation: Any) -> Any:
    kind = str(annotation)
    variable = ENV_PREFIX + name.upper()
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("float | None"):
            return None if raw in (None, "") else float(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "a whole number", "float": "a number"}.get(kind, "a number")
        raise SettingsError(f"{variable}={raw!r}: expected {expected}.") from None


def _unknown_message(name: str, known: list[str], origin: str = "environment") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return f"Unknown llmco2 setting {name!r} in {origin}.{hint} Known settings: {', '.join(sorted(known))}."
