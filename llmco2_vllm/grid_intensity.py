"""Where the grid carbon intensity comes from: a fixed value, a time-series file, or a live API.

Every provider answers ``current()`` from memory, so the plugin's worker never waits on a
network or a slow disk: the live provider fetches on its own daemon thread, and the file
provider only re-reads its file when the file's modification time changes (checked at most
every few seconds).

All values are *average* (attributional) intensities: what the grid's mix emitted per kWh,
which answers "what did this request emit". Marginal intensity (what one more kWh would
emit now) is not provided: Electricity Maps' ``carbonIntensity`` and the bundled annual
tables are averages, and marginal signals (WattTime) need another service and licence.

Precedence (``build_intensity_provider``): ``LLMCO2_GRID_INTENSITY_FILE`` >
``LLMCO2_GRID_INTENSITY_URL`` (live, with a static fallback) > ``LLMCO2_GRID_INTENSITY`` >
the annual average of ``LLMCO2_REGION``.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from .carbon import GridIntensity, lookup_region

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "IntensityProvider",
    "StaticIntensity",
    "TimeSeriesIntensity",
    "ElectricityMapsIntensity",
    "build_intensity_provider",
    "static_intensity_from_settings",
]

logger = logging.getLogger("llmco2_vllm")

MAX_GRAMS_CO2E_PER_KWH = 5000.0  # same bound as LLMCO2_GRID_INTENSITY; above it the unit is wrong
_TIMESTAMP_COLUMNS = ("timestamp", "datetime")
_VALUE_COLUMNS = ("grams_co2e_per_kwh", "carbonintensity")
_MAX_RESPONSE_BYTES = 1 << 20  # a latest-value answer is a few hundred bytes
_UNIX_MILLISECONDS_THRESHOLD = 1e11  # seconds since 1970 stay below this until the year 5138


@runtime_checkable
class IntensityProvider(Protocol):
    """Source of the grid intensity in use. ``current()`` never blocks on I/O."""

    def current(self) -> GridIntensity: ...

    @property
    def age_seconds(self) -> float: ...

    @property
    def errors(self) -> int: ...

    def close(self) -> None: ...


class StaticIntensity:
    """One fixed value: the user's ``LLMCO2_GRID_INTENSITY`` or a region's annual average."""

    def __init__(self, intensity: GridIntensity) -> None:
        self._intensity = intensity

    def current(self) -> GridIntensity:
        return self._intensity

    @property
    def age_seconds(self) -> float:
        return 0.0

    @property
    def errors(self) -> int:
        return 0

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Series:
    timestamps: tuple[float, ...]  # unix seconds, ascending, unique
    values: tuple[float, ...]  # gCO2e/kWh
    zone: str | None  # from Electricity Maps' history shape, when present


class TimeSeriesIntensity:
    """A file of timestamp -> gCO2e/kWh; the value at ``now()`` is the latest row at or before it.

    Before the first row the first row is used; after the last row the last one stays in use
    and ``age_seconds`` keeps growing. Formats (sniffed from the content):

    * CSV with header ``timestamp,grams_co2e_per_kwh`` or ``datetime,carbonIntensity``
      (case-insensitive; other columns are ignored);
    * JSON: a list of such objects, or Electricity Maps' history answer
      ``{"zone": ..., "history": [{"datetime": ..., "carbonIntensity": ...}, ...]}``.

    Timestamps are ISO-8601 with ``Z`` or an offset, or unix seconds. An empty value (JSON
    ``null``) is a gap in the data: the previous row stays in force. A bad file raises
    ``ValueError`` naming the file and line (or JSON entry) at construction; a file that
    turns bad later is counted in ``errors``, logged once, and the previous series is kept.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        region: str | None = None,
        now: Callable[[], float] = time.time,
        reload_check_seconds: float = 5.0,
    ) -> None:
        self._path = os.path.abspath(os.fspath(path))
        self._now = now
        self._reload_check_seconds = reload_check_seconds
        try:
            signature = _file_signature(self._path)  # before reading: a write in between is seen as a change
        except OSError as error:
            raise ValueError(f"grid intensity file {self._path}: cannot read it ({error.strerror or error})") from None
        self._series = _read_series(self._path)
        self._signature = signature
        self._region = region or self._series.zone or "file"
        self._next_check = time.monotonic() + reload_check_seconds
        self._errors = 0
        self._logged_kinds: set[str] = set()
        self._reload_lock = threading.Lock()

    @property
    def path(self) -> str:
        return self._path

    def current(self) -> GridIntensity:
        self._maybe_reload()
        series = self._series
        index = self._row_index(series, self._now())
        timestamp = series.timestamps[index]
        return GridIntensity(
            grams_co2e_per_kwh=series.values[index],
            region=self._region,
            kind="average",
            year=datetime.fromtimestamp(timestamp, tz=timezone.utc).year,
            source=self._path,
        )

    @property
    def age_seconds(self) -> float:
        series = self._series
        now = self._now()
        return max(0.0, now - series.timestamps[self._row_index(series, now)])

    @property
    def errors(self) -> int:
        return self._errors

    def close(self) -> None:
        pass  # no thread: reloads happen inside current()

    @staticmethod
    def _row_index(series: _Series, now: float) -> int:
        return max(0, bisect.bisect_right(series.timestamps, now) - 1)

    def _maybe_reload(self) -> None:
        # A stat every few seconds is the whole cost in the common case; a concurrent caller
        # never waits for another one's reload, it uses the series in hand.
        if time.monotonic() < self._next_check or not self._reload_lock.acquire(blocking=False):
            return
        try:
            self._next_check = time.monotonic() + self._reload_check_seconds
            try:
                signature = _file_signature(self._path)
                if signature == self._signature:
                    return
                series = _read_series(self._path)
            except (OSError, ValueError) as error:
                self._errors += 1
                self._log_once(type(error).__name__, f"llmco2: grid intensity file unusable, keeping the previous values: {error}")
                return
            self._series, self._signature = series, signature
            logger.info("llmco2: reloaded grid intensity file %s (%d rows)", self._path, len(series.values))
        finally:
            self._reload_lock.release()

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            logger.warning("%s (counted; logged once)", message)


class ElectricityMapsIntensity:
    """Live average intensity from the Electricity Maps API v3, refreshed on a daemon thread.

    ``GET {base_url}/carbon-intensity/latest?zone=ZONE`` with header ``auth-token``. The last
    good value is used while it is at most ``max_stale_seconds`` old (default three refresh
    periods); before the first success, and when the service has been failing for longer, the
    ``fallback`` provider's value is used (``fallback_active``). Failures (timeout, HTTP
    errors, bad JSON, a missing or negative ``carbonIntensity``) are counted in ``errors`` and
    logged once per kind. ``timeout_seconds`` bounds each socket operation of a fetch.
    The API key is sent only in the header and never logged.
    """

    def __init__(
        self,
        base_url: str,
        zone: str,
        api_key: str,
        fallback: IntensityProvider,
        *,
        refresh_seconds: float = 300.0,
        timeout_seconds: float = 5.0,
        max_stale_seconds: float | None = None,
    ) -> None:
        if not (math.isfinite(refresh_seconds) and refresh_seconds > 0):
            raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
        if not (math.isfinite(timeout_seconds) and timeout_seconds > 0):
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
        if not zone:
            raise ValueError("zone must be an Electricity Maps zone code such as 'FR' or 'US-CAL-CISO'")
        self.url = f"{base_url.rstrip('/')}/carbon-intensity/latest?{urllib.parse.urlencode({'zone': zone})}"
        self.zone = zone
        self._api_key = api_key
        self._fallback = fallback
        self._refresh_seconds = refresh_seconds
        self._timeout_seconds = timeout_seconds
        self._max_stale_seconds = 3.0 * refresh_seconds if max_stale_seconds is None else max_stale_seconds
        self._lock = threading.Lock()
        self._last: GridIntensity | None = None
        self._last_obtained_monotonic = time.monotonic()
        self._emission_factor_type: str | None = None
        self._errors = 0
        self._successes = 0
        self._logged_kinds: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmco2-grid-intensity", daemon=True)
        self._thread.start()

    def current(self) -> GridIntensity:
        with self._lock:
            last, obtained = self._last, self._last_obtained_monotonic
        if last is not None and time.monotonic() - obtained <= self._max_stale_seconds:
            return last
        return self._fallback.current()

    @property
    def fallback_active(self) -> bool:
        with self._lock:
            last, obtained = self._last, self._last_obtained_monotonic
        return last is None or time.monotonic() - obtained > self._max_stale_seconds

    @property
    def age_seconds(self) -> float:
        """Seconds since the live service last answered (since start before it ever did).

        It keeps growing while the fallback is in use, so an alert on it sees the outage.
        """
        with self._lock:
            return time.monotonic() - self._last_obtained_monotonic

    @property
    def errors(self) -> int:
        with self._lock:
            return self._errors

    @property
    def successes(self) -> int:
        """Good fetches so far (tests and diagnostics)."""
        with self._lock:
            return self._successes

    @property
    def emission_factor_type(self) -> str | None:
        """``"lifecycle"`` or ``"direct"`` as the service reported it; ``None`` before a success."""
        with self._lock:
            return self._emission_factor_type

    @property
    def thread_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        # A fetch in flight finishes within its socket timeout.
        self._thread.join(timeout=self._timeout_seconds + 1.0)
        self._fallback.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._fetch_once()
            except Exception as error:  # never let the refresh thread die
                self._record_error("unexpected", f"unexpected error {error!r}")
            self._stop.wait(self._refresh_seconds)

    def _fetch_once(self) -> None:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json", "User-Agent": "llmco2-vllm"})
        if self._api_key:
            # Unredirected: a redirect to another host must not carry the key.
            request.add_unredirected_header("auth-token", self._api_key)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_seconds) as response:
                body = response.read(_MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as error:
            error.close()
            self._record_error(f"http_{error.code}", _http_error_message(error.code))
            return
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                self._record_error("timeout", f"no answer within {self._timeout_seconds} s")
            else:
                self._record_error("connection", f"cannot connect: {error.reason}")
            return
        except TimeoutError:
            self._record_error("timeout", f"no answer within {self._timeout_seconds} s")
            return
        except OSError as error:
            self._record_error("connection", f"connection failed: {error!r}")
            return
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self._record_error("bad_json", "the answer is not JSON")
            return
        raw = payload.get("carbonIntensity") if isinstance(payload, dict) else None
        if raw is None:
            self._record_error("missing_field", "the answer has no carbonIntensity")
            return
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not (
            math.isfinite(raw) and 0.0 <= raw <= MAX_GRAMS_CO2E_PER_KWH
        ):
            self._record_error("bad_value", f"carbonIntensity {raw!r} is not a number between 0 and {MAX_GRAMS_CO2E_PER_KWH:g}")
            return
        intensity = GridIntensity(
            grams_co2e_per_kwh=float(raw),
            region=self.zone,
            kind="average",
            year=_year_of(payload.get("datetime")),
            source=self.url,
        )
        factor_type = payload.get("emissionFactorType")
        with self._lock:
            self._last = intensity
            self._last_obtained_monotonic = time.monotonic()
            self._emission_factor_type = factor_type if isinstance(factor_type, str) else "lifecycle"
            self._successes += 1
            first = self._successes == 1
        if first:
            logger.info(
                "llmco2: live grid intensity for %s: %.1f gCO2e/kWh (%s) from %s",
                self.zone, intensity.grams_co2e_per_kwh, self._emission_factor_type, self.url,
            )

    def _record_error(self, kind: str, detail: str) -> None:
        with self._lock:
            self._errors += 1
            if kind in self._logged_kinds:
                return
            self._logged_kinds.add(kind)
        logger.warning(
            "llmco2: grid intensity from %s failed: %s; using %s (counted; logged once per kind)",
            self.url, detail, "the last good value while fresh, else the fallback",
        )


def static_intensity_from_settings(settings: "Settings") -> StaticIntensity:
    """``LLMCO2_GRID_INTENSITY`` when set, else the annual average of ``LLMCO2_REGION``."""
    if settings.grid_intensity is not None:
        return StaticIntensity(GridIntensity(settings.grid_intensity, "static", "average", None, "user setting"))
    return StaticIntensity(lookup_region(settings.region))


def build_intensity_provider(settings: "Settings") -> IntensityProvider:
    """The provider the settings ask for: file > live URL (static fallback) > value > region."""
    if settings.grid_intensity_file:
        if settings.grid_intensity_url:
            logger.info("llmco2: LLMCO2_GRID_INTENSITY_FILE is set, so LLMCO2_GRID_INTENSITY_URL is not used")
        return TimeSeriesIntensity(settings.grid_intensity_file, region=settings.grid_intensity_zone or None)
    if settings.grid_intensity_url:
        return ElectricityMapsIntensity(
            settings.grid_intensity_url,
            settings.grid_intensity_zone or settings.region,
            settings.grid_intensity_api_key,
            fallback=static_intensity_from_settings(settings),
            refresh_seconds=settings.grid_intensity_refresh_seconds,
            timeout_seconds=settings.grid_intensity_timeout_seconds,
        )
    return static_intensity_from_settings(settings)


def _http_error_message(code: int) -> str:
    if code in (401, 403):
        return (
            f"HTTP {code}: the API key was refused; check LLMCO2_GRID_INTENSITY_API_KEY "
            "(sent as the auth-token header) and that it covers this zone"
        )
    if code == 429:
        return "HTTP 429: rate limited; raise LLMCO2_GRID_INTENSITY_REFRESH_SECONDS"
    return f"HTTP {code}"


def _year_of(raw: Any) -> int | None:
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw).year
    except ValueError:
        return None


def _file_signature(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


def _read_series(path: str) -> _Series:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as error:
        raise ValueError(f"grid intensity file {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ValueError(f"grid intensity file {path}: not UTF-8 text; give a CSV or JSON file") from None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        rows, zone = _json_rows(path, stripped)
    else:
        rows, zone = _csv_rows(path, text), None
    by_time: dict[float, tuple[float, str]] = {}
    for where, timestamp, value in rows:
        if timestamp in by_time:
            raise ValueError(f"grid intensity file {path}: {where}: duplicate timestamp (also at {by_time[timestamp][1]})")
        if value is not None:
            by_time[timestamp] = (value, where)
    if not by_time:
        raise ValueError(f"grid intensity file {path}: no rows with a value; expected timestamp and gCO2e/kWh rows")
    ordered = sorted(by_time)
    return _Series(tuple(ordered), tuple(by_time[t][0] for t in ordered), zone)


def _csv_rows(path: str, text: str) -> list[tuple[str, float, float | None]]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[tuple[str, float, float | None]] = []
    for record in reader:
        if not record or all(not cell.strip() for cell in record):
            continue
        where = f"line {reader.line_num}"
        if header is None:
            header = [cell.strip().lower() for cell in record]
            time_column = next((header.index(c) for c in _TIMESTAMP_COLUMNS if c in header), None)
            value_column = next((header.index(c) for c in _VALUE_COLUMNS if c in header), None)
            if time_column is None or value_column is None:
                raise ValueError(
                    f"grid intensity file {path}: {where}: the header must name the columns "
                    f"timestamp,grams_co2e_per_kwh (or datetime,carbonIntensity as Electricity Maps exports); got {record}"
                )
            continue
        if len(record) <= max(time_column, value_column):
            raise ValueError(f"grid intensity file {path}: {where}: expected {len(header)} columns, got {len(record)}")
        timestamp = _parse_timestamp(path, where, record[time_column].strip())
        rows.append((where, timestamp, _parse_value(path, where, record[value_column].strip() or None)))
    if header is None:
        raise ValueError(f"grid intensity file {path}: empty; expected a header timestamp,grams_co2e_per_kwh and rows")
    return rows


def _json_rows(path: str, text: str) -> tuple[list[tuple[str, float, float | None]], str | None]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"grid intensity file {path}: line {error.lineno}: invalid JSON ({error.msg})") from None
    zone = None
    if isinstance(data, dict):
        if not isinstance(data.get("history"), list):
            raise ValueError(
                f"grid intensity file {path}: a JSON object must be Electricity Maps' history answer "
                '{"zone": ..., "history": [...]}; or give a list of {"timestamp", "grams_co2e_per_kwh"} objects'
            )
        zone = data.get("zone") if isinstance(data.get("zone"), str) else None
        data = data["history"]
    if not isinstance(data, list):
        raise ValueError(f"grid intensity file {path}: expected a JSON list of rows")
    rows: list[tuple[str, float, float | None]] = []
    for number, entry in enumerate(data, start=1):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            raise ValueError(f"grid intensity file {path}: {where}: expected an object, got {entry!r}")
        keys = {key.lower(): key for key in entry}
        time_key = next((keys[c] for c in _TIMESTAMP_COLUMNS if c in keys), None)
        value_key = next((keys[c] for c in _VALUE_COLUMNS if c in keys), None)
        if time_key is None or value_key is None:
            raise ValueError(
                f"grid intensity file {path}: {where}: needs timestamp and grams_co2e_per_kwh "
                f"(or datetime and carbonIntensity); got keys {sorted(entry)}"
            )
        rows.append((where, _parse_timestamp(path, where, entry[time_key]), _parse_value(path, where, entry[value_key])))
    return rows, zone


def _parse_timestamp(path: str, where: str, raw: Any) -> float:
    prefix = f"grid intensity file {path}: {where}:"
    seconds: float | None = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        seconds = float(raw)
    elif isinstance(raw, str):
        try:
            seconds = float(raw)
        except ValueError:
            try:
                moment = datetime.fromisoformat(raw)
            except ValueError:
                raise ValueError(
                    f"{prefix} timestamp {raw!r} is neither ISO-8601 (2024-05-01T13:00:00Z) nor unix seconds"
                ) from None
            if moment.tzinfo is None:
                raise ValueError(f"{prefix} timestamp {raw!r} has no time zone; add Z (UTC) or an offset such as +02:00")
            return moment.timestamp()
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"{prefix} timestamp {raw!r} is neither ISO-8601 nor unix seconds")
    if abs(seconds) >= _UNIX_MILLISECONDS_THRESHOLD:
        raise ValueError(f"{prefix} timestamp {raw!r} looks like milliseconds; give unix seconds")
    return seconds


def _parse_value(path: str, where: str, raw: Any) -> float | None:
    if raw is None:
        return None  # a gap in the data
    prefix = f"grid intensity file {path}: {where}:"
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{prefix} intensity {raw!r} is not a number (gCO2e/kWh)") from None
    if not (math.isfinite(value) and 0.0 <= value <= MAX_GRAMS_CO2E_PER_KWH):
        raise ValueError(f"{prefix} intensity {raw!r} must be between 0 and {MAX_GRAMS_CO2E_PER_KWH:g} gCO2e/kWh")
    return value
