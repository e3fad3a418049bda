"""Grid intensity from a time-series file: timestamp -> gCO2e/kWh, re-read when the file changes.

``current()`` answers from memory: the file is only re-read when its modification time or
size changes, and that is checked at most every few seconds, so the plugin's worker never
waits on a slow disk.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from llmco2_vllm.carbon.intensity import MAX_GRAMS_CO2E_PER_KWH, GridIntensity

__all__ = ["TimeSeriesIntensity"]

logger = logging.getLogger(__name__)

_TIMESTAMP_COLUMNS = ("timestamp", "datetime")
_VALUE_COLUMNS = ("grams_co2e_per_kwh", "carbonintensity")
_UNIX_MILLISECONDS_THRESHOLD = 1e11  # seconds since 1970 stay below this until the year 5138


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
                raise ValueError(f"{prefix} timestamp {raw!r} has no time zone; add Z (UTC) or an offset such as +02:00") from None
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
