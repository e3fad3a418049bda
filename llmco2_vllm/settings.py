"""The plugin's settings: one place, environment variables ``LLMCO2_*`` over an optional TOML file.

Precedence: built-in default < file named by ``LLMCO2_CONFIG`` < environment variable. Each
setting is declared once, as a field of ``Settings``: its type and default, the range or choices
it allows, the fix its error message gives, and its line of the README's settings table.
Parsing, validation and that table are generated from the declarations; a wrong value raises
``SettingsError`` whose message says how to fix it.

Settings check values, not the files they name: the grid-intensity file is checked by
``llmco2_vllm.carbon.providers.check_intensity_sources`` and the calibration file by
``OnlineCalibrator.load``, both at start-up. The one look at the disk here is whether the
directory a setting will write into exists and is writable.

The README table is regenerated with ``python -m llmco2_vllm.settings --update-readme README.md``.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, fields, replace
from dataclasses import field as dataclass_field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import tomllib

from llmco2_vllm.carbon.embodied import EmbodiedCarbon, default_embodied_carbon
from llmco2_vllm.carbon.intensity import MAX_GRAMS_CO2E_PER_KWH, UnknownRegionError, lookup_region
from llmco2_vllm.predict.hardware import UnknownGpuError, find_gpu

__all__ = [
    "Settings",
    "SettingsError",
    "SettingDeclaration",
    "setting_declarations",
    "settings_table_markdown",
    "with_settings_table",
]

ENV_PREFIX = "LLMCO2_"
# Variables the plugin sets or reads for its own plumbing, not user settings.
INTERNAL_VARIABLES = {"LLMCO2_CONFIG", "LLMCO2_RUN_DIR"}
TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"
_RULE_KEY = "llmco2_setting"


class SettingsError(ValueError):
    """A setting is wrong; the message names it and says how to fix it."""


# --- value checks the range and choices cannot express; each raises ValueError(the fix) --------------------------------


def _known_gpu(name: str) -> None:
    try:
        find_gpu(name)
    except UnknownGpuError as error:
        raise ValueError(str(error)) from None


PREDICTOR_NAMES = ("fitted", "analytic", "gnn")


def _predictor_name(name: str) -> None:
    if name not in PREDICTOR_NAMES and ":" not in name:
        raise ValueError("use 'fitted', 'analytic', 'gnn' or an import path 'package.module:Class'.")


def _writable_directory(path: str) -> None:
    if path:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"directory {parent!r} does not exist or is not writable.")


def _http_base_url(url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if url and (parsed.scheme not in ("http", "https") or not parsed.netloc):
        raise ValueError(
            "give the http(s) base URL of the Electricity Maps API v3, e.g. https://api.electricitymaps.com/v3."
        )


@dataclass(frozen=True)
class _Rule:
    doc: str
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...]
    check: Callable[[Any], None] | None
    fix: str
    secret: bool


def _setting(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    check: Callable[[Any], None] | None = None,
    fix: str = "",
    secret: bool = False,
) -> Any:
    """Declare one setting (the ``Settings`` field it is assigned to gives its name and type).

    ``doc`` is its README meaning (markdown); ``fix`` is what an out-of-range or unlisted value's
    error says after ``VARIABLE=value:``. Both may name ``{minimum}``, ``{maximum}`` and
    ``{default}``, filled in from the declaration. ``check`` raises ``ValueError(fix)`` for what a
    range or choices cannot say. A ``secret`` value never appears in repr or in messages.
    """
    rule = _Rule(doc, minimum, maximum, choices, check, fix, secret)
    return dataclass_field(default=default, repr=not secret, metadata={_RULE_KEY: rule})


@dataclass(frozen=True)
class Settings:
    """All user settings. Field ``name`` is read from ``LLMCO2_NAME`` or key ``name`` in the file.

    The fields appear in this order in the README table.
    """

    enabled: bool = _setting(True, "`false` leaves vLLM untouched")
    target_gpu: str = _setting(
        "H100-SXM5-80GB",
        "GPU to predict for when NVML sees none (any name or alias from `llmco2 gpus`). "
        "With a GPU present, the detected one is used.",
        check=_known_gpu,
    )
    region: str = _setting(  # checked with grid_intensity in _check_combinations
        "WORLD",
        "grid region for carbon: ISO 3166 country (`FR`, `US`), eGRID subregion (`CAMX`), `EU`, `WORLD` (`llmco2 regions`)",
    )
    grid_intensity: float | None = _setting(
        None,
        "gCO2e/kWh; overrides the region's annual average",
        minimum=0.0,
        maximum=MAX_GRAMS_CO2E_PER_KWH,
        fix="give gCO2e/kWh between {minimum} and {maximum} (world average ~470).",
    )
    pue: float = _setting(
        1.0,
        "data-centre power usage effectiveness; 1.0 = GPU-only boundary (like ML.ENERGY). Set your facility's value.",
        minimum=1.0,
        maximum=5.0,
        fix="power usage effectiveness is a ratio >= 1.0 (e.g. 1.2), at most {maximum}.",
    )
    predictor: str = _setting(
        "fitted",
        "`fitted` (the time and power model fitted on measured vLLM serving: the most accurate in `llmco2 eval`), "
        "`gnn` (the LLMCO2 GNN, distilled into a table for the plugin), `analytic` (the roofline model alone), "
        "or `package.module:Class` for your own `StepPredictor`",
        check=_predictor_name,
    )
    request_log: str = _setting(
        "", "JSON-lines file, one record per finished request (audits)", check=_writable_directory
    )
    measure_energy: bool = _setting(True, "read the engine's GPUs' energy counters through NVML when a GPU is present")
    rank_energy_port: int = _setting(
        29620,
        "multi-node engines (`--nnodes` > 1): each vLLM worker on another node meters its own GPU and reports it "
        "to the engine at `--master-addr` on this TCP port (+ the data-parallel rank)",
        minimum=1024,
        maximum=65000,
        fix="use a free TCP port from {minimum} to {maximum} (default {default}), open between the nodes.",
    )
    calibration_file: str = _setting(
        "",
        "where the online calibration is kept across restarts (loaded at start; a corrupt file stops start-up with the fix)",
        check=_writable_directory,
    )
    calibration_window_seconds: float = _setting(
        5.0,
        "measured energy is compared with predictions over windows this long",
        minimum=0.5,
        maximum=3600.0,
        fix="use {minimum} to {maximum} seconds (NVML energy counters advance every ~100 ms; default {default}).",
    )
    calibration_forgetting: float = _setting(
        0.98,
        "forgetting factor of the online fit (remembers ~50 windows; 1.0 never forgets)",
        minimum=0.5,
        maximum=1.0,
        fix="use {minimum} to 1.0 (1.0 never forgets; default {default} remembers ~50 windows).",
    )
    worker: str = _setting(
        "process",
        "`process`: the accounting runs in the plugin's own worker process, vLLM's engine process keeps only the "
        "step hook and a forwarding thread; `thread`: in a thread of the engine process "
        "(see [How it works](#how-it-works-inside-vllm))",
        choices=("process", "thread"),
        fix="use 'process' (default: accounting off vLLM's engine process) or 'thread'.",
    )
    queue_capacity: int = _setting(
        8192,
        "captured steps waiting for the worker; beyond it steps are dropped and counted, never blocking vLLM",
        minimum=16,
        fix="use at least {minimum} (default {default}).",
    )
    flush_interval_seconds: float = _setting(
        0.5,
        "how often the engine publishes its metrics to the API server",
        minimum=0.05,
        maximum=60.0,
        fix="use {minimum} to {maximum} seconds (default {default}).",
    )
    max_tracked_requests: int = _setting(
        100_000,
        "running requests held in the attribution ledger (bounded memory)",
        minimum=100,
        fix="use at least {minimum}.",
    )
    grid_intensity_file: str = _setting(
        "",
        "CSV or JSON time series of gCO2e/kWh (see [Carbon](#carbon)); wins over the live API and the static value; "
        "checked at start, re-read when it changes",
    )
    grid_intensity_url: str = _setting(
        "",
        "Electricity Maps API v3 base URL, e.g. `https://api.electricitymaps.com/v3`, for live intensity "
        "(the static value or region average is the fallback)",
        check=_http_base_url,
    )
    grid_intensity_zone: str = _setting(
        "",
        "Electricity Maps zone (`FR`, `DE`, `US-CAL-CISO`); unset = `LLMCO2_REGION`. Also the region label of a file's values",
    )
    grid_intensity_api_key: str = _setting("", "sent as the `auth-token` header; never logged", secret=True)
    grid_intensity_refresh_seconds: float = _setting(
        300.0,
        "how often the live value is fetched ({minimum} to {maximum}; free tiers allow tens of requests per hour)",
        minimum=10.0,
        maximum=86400.0,
        fix="use {minimum} to {maximum} seconds (default {default}; free API tiers allow tens of requests per hour).",
    )
    grid_intensity_timeout_seconds: float = _setting(
        5.0,
        "timeout of each fetch's socket operations ({minimum} to {maximum}); fetches run on their own thread",
        minimum=0.1,
        maximum=60.0,
        fix="use {minimum} to {maximum} seconds (default {default}).",
    )
    embodied_kg_per_gpu: float | None = _setting(
        None,
        "embodied kgCO2e per GPU including its share of the server; unset = bundled default (463), "
        "`0` = no embodied carbon",
        minimum=0.0,
        maximum=10000.0,
        fix="give kgCO2e per GPU including its share of the server, {minimum} to {maximum} (bundled default 463 = "
        "1/8 of an 8-GPU node; 0 switches embodied carbon off; unset for the default).",
    )
    hardware_lifetime_years: float = _setting(
        4.0,
        "years the embodied carbon is amortised over ({minimum} to {maximum})",
        minimum=0.5,
        maximum=15.0,
        fix="use {minimum} to {maximum} years (default {default}).",
    )
    admission_max_request_grams: float = _setting(
        0.0,
        "reject a request whose forecast gCO2e exceeds this; 0 = off",
        minimum=0.0,
        fix="give gCO2e per request >= {minimum} (0 switches it off).",
    )
    admission_budget_grams: float = _setting(
        0.0,
        "rolling carbon budget, gCO2e per window; 0 = off",
        minimum=0.0,
        fix="give gCO2e per budget window >= {minimum} (0 switches it off).",
    )
    admission_budget_window_seconds: float = _setting(
        3600.0,
        "length of the rolling budget window ({minimum} to {maximum})",
        minimum=1.0,
        maximum=30 * 86400.0,
        fix="use {minimum} to {maximum} seconds (30 days; default {default}).",
    )
    admission_defer_above_intensity: float = _setting(
        0.0,
        "gCO2e/kWh; deferrable requests wait while the grid intensity is above it; 0 = off",
        minimum=0.0,
        maximum=MAX_GRAMS_CO2E_PER_KWH,
        fix="give gCO2e/kWh between {minimum} and {maximum} (0 switches deferral off; world average ~470).",
    )
    admission_max_defer_seconds: float = _setting(
        600.0,
        "longest a deferrable request waits ({minimum} to {maximum})",
        minimum=0.0,
        maximum=86400.0,
        fix="use {minimum} to {maximum} seconds (default {default}).",
    )
    admission_fail_closed: bool = _setting(
        False, "a failure inside the admission code rejects the request instead of admitting it"
    )
    admission_max_waiting: int = _setting(
        256,
        "most deferrable requests waiting at once per API server; beyond it HTTP 429 with Retry-After",
        minimum=1,
        maximum=100_000,
        fix="use {minimum} to {maximum} requests (default {default}).",
    )
    admission_release_per_second: float = _setting(
        4.0,
        "pace at which waiting deferrable requests are released, oldest first, once their condition clears",
        minimum=0.01,
        maximum=10_000.0,
        fix="use {minimum} to {maximum} requests per second (default {default}).",
    )
    admission_max_body_bytes: int = _setting(
        8 * 1024 * 1024,
        "largest request body admission control buffers to forecast (vLLM sets no limit); larger ones pass unforecast",
        minimum=1024,
        maximum=1024 * 1024 * 1024,
        fix="use {minimum} to {maximum} bytes (default {default}).",
    )
    request_results_retention_seconds: float = _setting(
        3600.0,
        "how long per-request results stay queryable ({minimum} to {maximum})",
        minimum=60.0,
        maximum=7 * 86400.0,
        fix="use {minimum} to {maximum} seconds (7 days; default {default}).",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        names = [declaration.name for declaration in setting_declarations()]
        values: dict[str, Any] = {}
        path = environ.get("LLMCO2_CONFIG")
        if path:
            file_values = _read_file(path)
            for name in file_values:
                if name not in names:
                    raise SettingsError(_unknown_message(name, names, f"config file {path}"))
            values.update(file_values)
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX) or key in INTERNAL_VARIABLES:
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in names:
                raise SettingsError(_unknown_message(key, [ENV_PREFIX + known.upper() for known in names]))
            values[name] = raw
        return cls.from_mapping(values, origin="environment")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], origin: str = "settings") -> "Settings":
        declarations = setting_declarations()
        kwargs = {d.name: d.parse(values[d.name]) for d in declarations if d.name in values}
        unknown = set(values) - {d.name for d in declarations}
        if unknown:
            raise SettingsError(_unknown_message(sorted(unknown)[0], [d.name for d in declarations], origin))
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check every value against its declaration, then the combinations; raise SettingsError with the fix."""
        for declaration in setting_declarations():
            declaration.check_value(getattr(self, declaration.name))
        self._check_combinations()

    def embodied(self) -> EmbodiedCarbon:
        """Embodied carbon in force: the user's kg per GPU, else the bundled default, over the set lifetime."""
        if self.embodied_kg_per_gpu is None:
            default = default_embodied_carbon()
            if self.hardware_lifetime_years == default.lifetime_years:
                return default
            return replace(default, lifetime_years=self.hardware_lifetime_years)
        return EmbodiedCarbon(self.embodied_kg_per_gpu, self.hardware_lifetime_years, "user setting")

    def _check_combinations(self) -> None:
        if self.grid_intensity is None:  # a value of one's own makes the region a label only
            try:
                lookup_region(self.region)
            except UnknownRegionError as error:
                raise SettingsError(
                    f"LLMCO2_REGION={self.region!r}: {error} Or set LLMCO2_GRID_INTENSITY to a value in gCO2e/kWh."
                ) from None
        if self.grid_intensity_url:
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


@dataclass(frozen=True)
class SettingDeclaration:
    """One setting as declared on ``Settings``: what it accepts and what the README says of it."""

    name: str
    value_type: type  # bool, int, float or str
    optional: bool  # None (unset) is a value
    default: Any
    doc: str
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...]
    check: Callable[[Any], None] | None
    fix: str
    secret: bool

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def fix_text(self) -> str:
        return self._fill(self.fix)

    @property
    def doc_text(self) -> str:
        return self._fill(self.doc)

    def parse(self, raw: Any) -> Any:
        """The value of ``raw`` (env text or TOML value) as this setting's type."""
        try:
            if self.optional and raw in (None, ""):
                return None
            if self.value_type is bool:
                if isinstance(raw, bool):
                    return raw
                text = str(raw).strip().lower()
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            return self.value_type(raw)
        except (TypeError, ValueError):
            expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(self.value_type, "text")
            raise SettingsError(f"{self.variable}={self._shown(raw)}: expected {expected}.") from None

    def check_value(self, value: Any) -> None:
        """Raise SettingsError with the fix when ``value`` is outside the range or choices, or fails ``check``."""
        if value is None and self.optional:
            return
        if self.value_type in (int, float) and not (
            math.isfinite(value)
            and (self.minimum is None or value >= self.minimum)
            and (self.maximum is None or value <= self.maximum)
        ):
            raise SettingsError(f"{self.variable}={value}: {self.fix_text}")
        if self.choices and value not in self.choices:
            raise SettingsError(f"{self.variable}={self._shown(value)}: {self.fix_text}")
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as error:
                raise SettingsError(f"{self.variable}={self._shown(value)}: {error}") from None

    def default_text(self) -> str:
        """The default as the README shows it."""
        if self.default is None or self.default == "":
            return "unset"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if isinstance(self.default, (int, float)):
            return f"`{_number(self.default)}`"
        return f"`{self.default}`"

    def _fill(self, text: str) -> str:
        numeric_default = self.value_type in (int, float) and self.default is not None
        return text.format(
            minimum=_number(self.minimum),
            maximum=_number(self.maximum),
            default=_number(self.default) if numeric_default else self.default,
        )

    def _shown(self, value: Any) -> str:
        return "'<hidden>'" if self.secret else repr(value)


@cache
def setting_declarations() -> tuple[SettingDeclaration, ...]:
    """Every setting, in the order of ``Settings``' fields (and of the README table)."""
    hints = typing.get_type_hints(Settings)
    declarations = []
    for field in fields(Settings):
        rule: _Rule = field.metadata[_RULE_KEY]
        annotation = hints[field.name]
        members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        value_types = [member for member in members if member is not type(None)]
        if len(value_types) != 1 or value_types[0] not in (bool, int, float, str):
            raise TypeError(f"setting {field.name}: type {annotation} is not bool, int, float or str (or that | None)")
        declarations.append(
            SettingDeclaration(
                name=field.name,
                value_type=value_types[0],
                optional=len(members) > 1,
                default=field.default,
                doc=rule.doc,
                minimum=rule.minimum,
                maximum=rule.maximum,
                choices=rule.choices,
                check=rule.check,
                fix=rule.fix,
                secret=rule.secret,
            )
        )
    return tuple(declarations)


def settings_table_markdown() -> str:
    """The README's settings table (markdown, one row per setting), generated from the declarations."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for declaration in setting_declarations():
        meaning = declaration.doc_text.replace("|", "\\|")
        lines.append(f"| `{declaration.variable}` | {declaration.default_text()} | {meaning} |")
    return "\n".join(lines) + "\n"


def with_settings_table(readme: str) -> str:
    """``readme`` with the text between the settings-table markers replaced by the generated table."""
    pattern = re.compile(re.escape(TABLE_START) + r"\n.*?" + re.escape(TABLE_END), re.DOTALL)
    if len(pattern.findall(readme)) != 1:
        raise ValueError(f"expected one {TABLE_START} ... {TABLE_END} block")
    return pattern.sub(lambda _: f"{TABLE_START}\n{settings_table_markdown()}{TABLE_END}", readme)


def _number(value: float | None) -> str:
    """A bound or default as people write it: ``5``, ``0.05``, ``2592000`` (never ``5.0`` or ``2.592e+06``)."""
    if value is None:
        return ""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"LLMCO2_CONFIG={path!r}: no such file. Point it at a TOML file or unset it.") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"LLMCO2_CONFIG={path!r} is not valid TOML: {error}") from None
    table = data.get("llmco2", data)
    if not isinstance(table, dict):
        raise SettingsError(f"LLMCO2_CONFIG={path!r}: 'llmco2' must be a table, [llmco2], holding the settings.")
    return dict(table)


def _unknown_message(name: str, known: list[str], origin: str = "environment") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return f"Unknown llmco2 setting {name!r} in {origin}.{hint} Known settings: {', '.join(sorted(known))}."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmco2_vllm.settings", description="The settings table, generated from the declarations."
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the table")
    action.add_argument("--update-readme", metavar="README", type=Path, help="rewrite the table between its markers")
    arguments = parser.parse_args(argv)
    if arguments.markdown:
        print(settings_table_markdown(), end="")
        return 0
    readme: Path = arguments.update_readme
    readme.write_text(with_settings_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
