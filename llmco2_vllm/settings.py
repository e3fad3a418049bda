"""The plugin's settings: one place, environment variables ``LLMCO2_*`` over an optional TOML file.

Precedence: built-in default < file named by ``LLMCO2_CONFIG`` < environment variable. Every value
is validated at start-up; a wrong one raises ``SettingsError`` whose message says how to fix it.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import urllib.parse
from dataclasses import dataclass, fields
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .carbon import EmbodiedCarbon

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
    predictor: str = "gnn"  # LLMCO2 GNN (distilled for the hot path), "analytic" (roofline only) or "package.module:Class"
    worker: str = "process"  # "process": accounting runs in a worker process, off vLLM's engine process; "thread": in it
    queue_capacity: int = 8192  # steps waiting for the worker before new ones are dropped (and counted)
    flush_interval_seconds: float = 0.5  # how often the engine publishes metrics to the API server
    max_tracked_requests: int = 100_000  # running requests kept in the attribution ledger
    request_log: str = ""  # JSON-lines file: one record per finished request (audits); empty = off
    measure_energy: bool = True  # read the GPUs' energy counters through NVML when a GPU is present
    calibration_file: str = ""  # where the online calibration is kept across restarts; empty = not kept
    calibration_window_seconds: float = 5.0  # measured energy is compared with predictions over windows this long
    calibration_forgetting: float = 0.98  # weight of the previous window in the online fit (~50-window memory)
    grid_intensity_file: str = ""  # CSV/JSON time series of gCO2e/kWh; wins over the live API and the static value
    grid_intensity_url: str = ""  # Electricity Maps v3 base URL, e.g. https://api.electricitymaps.com/v3; empty = no live data
    grid_intensity_zone: str = ""  # Electricity Maps zone (FR, DE, US-CAL-CISO); empty = region
    grid_intensity_api_key: str = dataclass_field(default="", repr=False)  # sent as the auth-token header; never logged or shown
    grid_intensity_refresh_seconds: float = 300.0  # how often the live value is fetched (free tiers allow tens per hour)
    grid_intensity_timeout_seconds: float = 5.0  # per fetch socket operation; the worker never waits on it
    embodied_kg_per_gpu: float | None = None  # embodied kgCO2e per GPU incl. its server share; None = bundled 463 kg; 0 = off
    hardware_lifetime_years: float = 4.0  # amortisation period of the embodied carbon
    admission_max_request_grams: float = 0.0  # reject a request whose forecast gCO2e exceeds this; 0 = off
    admission_budget_grams: float = 0.0  # rolling carbon budget over the window below; 0 = off
    admission_budget_window_seconds: float = 3600.0  # length of the rolling budget window
    admission_defer_above_intensity: float = 0.0  # gCO2e/kWh above which deferrable requests wait; 0 = off
    admission_max_defer_seconds: float = 600.0  # longest a deferrable request may wait
    admission_fail_closed: bool = False  # a failure inside admission rejects instead of admitting
    request_results_retention_seconds: float = 3600.0  # how long per-request results stay queryable

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
        if self.worker not in ("process", "thread"):
            raise SettingsError(
                f"LLMCO2_WORKER={self.worker!r}: use 'process' (default: accounting off vLLM's engine process) or 'thread'."
            )
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
                "(NVML energy counters advance every ~100 ms; default 5)."
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
        self._validate_grid_intensity_source()
        self._validate_embodied()
        self._validate_admission()

    def embodied(self) -> "EmbodiedCarbon":
        """Embodied carbon in force: the user's kg per GPU, else the bundled default, over the set lifetime."""
        from dataclasses import replace

        from .carbon import EmbodiedCarbon, default_embodied_carbon

        if self.embodied_kg_per_gpu is None:
            default = default_embodied_carbon()
            if self.hardware_lifetime_years == default.lifetime_years:
                return default
            return replace(default, lifetime_years=self.hardware_lifetime_years)
        return EmbodiedCarbon(self.embodied_kg_per_gpu, self.hardware_lifetime_years, "user setting")

    def _validate_grid_intensity_source(self) -> None:
        if self.grid_intensity_file:
            from .grid_intensity import TimeSeriesIntensity

            if not os.path.isfile(self.grid_intensity_file):
                raise SettingsError(
                    f"LLMCO2_GRID_INTENSITY_FILE={self.grid_intensity_file!r}: no such file. Point it at a CSV "
                    "(timestamp,grams_co2e_per_kwh) or JSON time series, or unset it."
                )
            try:
                TimeSeriesIntensity(self.grid_intensity_file).close()
            except ValueError as error:
                raise SettingsError(f"LLMCO2_GRID_INTENSITY_FILE: {error}") from None
        if self.grid_intensity_url:
            parsed = urllib.parse.urlparse(self.grid_intensity_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise SettingsError(
                    f"LLMCO2_GRID_INTENSITY_URL={self.grid_intensity_url!r}: give the http(s) base URL of the "
                    "Electricity Maps API v3, e.g. https://api.electricitymaps.com/v3."
                )
            zone = self.grid_intensity_zone or self.region
            if zone.strip().upper() in ("WORLD", "EU"):
                raise SettingsError(
                    f"LLMCO2_GRID_INTENSITY_URL is set but the zone would be {zone!r}, which Electricity Maps does not "
                    "serve: set LLMCO2_GRID_INTENSITY_ZONE (e.g. FR, DE, US-CAL-CISO) or LLMCO2_REGION to a country."
                )
        elif self.grid_intensity_api_key:
            raise SettingsError(
                "LLMCO2_GRID_INTENSITY_API_KEY is set but LLMCO2_GRID_INTENSITY_URL is not: set the URL "
                "(e.g. https://api.electricitymaps.com/v3) to use live data, or unset the key."
            )
        if self.grid_intensity_zone and not (self.grid_intensity_url or self.grid_intensity_file):
            raise SettingsError(
                f"LLMCO2_GRID_INTENSITY_ZONE={self.grid_intensity_zone!r} has no effect without "
                "LLMCO2_GRID_INTENSITY_URL or LLMCO2_GRID_INTENSITY_FILE: set one of them, or use LLMCO2_REGION."
            )
        if not (10 <= self.grid_intensity_refresh_seconds <= 86400):
            raise SettingsError(
                f"LLMCO2_GRID_INTENSITY_REFRESH_SECONDS={self.grid_intensity_refresh_seconds}: use 10 to 86400 seconds "
                "(default 300; free API tiers allow tens of requests per hour)."
            )
        if not (0.1 <= self.grid_intensity_timeout_seconds <= 60):
            raise SettingsError(
                f"LLMCO2_GRID_INTENSITY_TIMEOUT_SECONDS={self.grid_intensity_timeout_seconds}: use 0.1 to 60 seconds (default 5)."
            )

    def _validate_embodied(self) -> None:
        kg = self.embodied_kg_per_gpu
        if kg is not None and not (math.isfinite(kg) and 0 <= kg <= 10000):
            raise SettingsError(
                f"LLMCO2_EMBODIED_KG_PER_GPU={kg}: give kgCO2e per GPU including its share of the server, 0 to 10000 "
                "(bundled default 463 = 1/8 of an 8-GPU node; 0 switches embodied carbon off; unset for the default)."
            )
        if not (0.5 <= self.hardware_lifetime_years <= 15):
            raise SettingsError(
                f"LLMCO2_HARDWARE_LIFETIME_YEARS={self.hardware_lifetime_years}: use 0.5 to 15 years (default 4)."
            )

    def _validate_admission(self) -> None:
        for variable, value, fix in (
            ("LLMCO2_ADMISSION_MAX_REQUEST_GRAMS", self.admission_max_request_grams, "gCO2e per request"),
            ("LLMCO2_ADMISSION_BUDGET_GRAMS", self.admission_budget_grams, "gCO2e per budget window"),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise SettingsError(f"{variable}={value}: give {fix} >= 0 (0 switches it off).")
        if not (1 <= self.admission_budget_window_seconds <= 2592000):
            raise SettingsError(
                f"LLMCO2_ADMISSION_BUDGET_WINDOW_SECONDS={self.admission_budget_window_seconds}: use 1 to 2592000 "
                "seconds (30 days; default 3600)."
            )
        if not (math.isfinite(self.admission_defer_above_intensity) and 0 <= self.admission_defer_above_intensity <= 5000):
            raise SettingsError(
                f"LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY={self.admission_defer_above_intensity}: give gCO2e/kWh between "
                "0 and 5000 (0 switches deferral off; world average ~470)."
            )
        if not (0 <= self.admission_max_defer_seconds <= 86400):
            raise SettingsError(
                f"LLMCO2_ADMISSION_MAX_DEFER_SECONDS={self.admission_max_defer_seconds}: use 0 to 86400 seconds (default 600)."
            )
        if not (60 <= self.request_results_retention_seconds <= 604800):
            raise SettingsError(
                f"LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS={self.request_results_retention_seconds}: use 60 to 604800 "
                "seconds (7 days; default 3600)."
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
