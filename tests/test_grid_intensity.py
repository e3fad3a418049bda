"""Grid-intensity providers: static, time-series files, and the live Electricity Maps client.

The live client talks to a real HTTP server on 127.0.0.1 (``http.server`` in a thread, random
port) that answers in Electricity Maps v3's shape; nothing leaves the machine.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import pytest

from llmco2_vllm.carbon.electricity_maps import ElectricityMapsIntensity
from llmco2_vllm.carbon.intensity import GridIntensity, lookup_region
from llmco2_vllm.carbon.providers import (
    IntensityProvider,
    IntensitySourceError,
    build_intensity_provider,
    check_intensity_sources,
)
from llmco2_vllm.carbon.static import StaticIntensity
from llmco2_vllm.carbon.time_series_file import TimeSeriesIntensity
from llmco2_vllm.settings import Settings
from tests.support.electricity_maps_server import FakeElectricityMaps

API_KEY = "test-key-5f3a9c"
FALLBACK = GridIntensity(470.0, "static", "average", None, "user setting")


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --- static -------------------------------------------------------------------------------


def test_static_provider() -> None:
    provider = StaticIntensity(lookup_region("FR"))
    assert isinstance(provider, IntensityProvider)
    assert provider.current() == lookup_region("FR")
    assert (provider.age_seconds, provider.errors) == (0.0, 0)
    provider.close()


# --- time series ----------------------------------------------------------------------------

SERIES_CSV = "timestamp,grams_co2e_per_kwh\n2024-05-01T00:00:00Z,100\n2024-05-01T01:00:00Z,200\n2024-05-01T02:00:00+02:00,300\n"
# The third row is 00:00 UTC written with an offset: it sorts first.


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_csv_step_function(tmp_path: Path) -> None:
    path = tmp_path / "series.csv"
    path.write_text("timestamp,grams_co2e_per_kwh\n2024-05-01T01:00:00Z,100\n2024-05-01T02:00:00Z,200\n2024-05-01T05:00:00+02:00,300\n")
    clock = Clock(utc("2024-05-01T01:30:00"))
    provider = TimeSeriesIntensity(path, now=clock)
    assert isinstance(provider, IntensityProvider)
    value = provider.current()
    assert (value.grams_co2e_per_kwh, value.kind, value.year, value.region) == (100.0, "average", 2024, "file")
    assert value.source == str(path)
    assert provider.age_seconds == pytest.approx(1800.0)
    clock.now = utc("2024-05-01T02:00:00")  # exactly on a row: that row
    assert provider.current().grams_co2e_per_kwh == 200.0
    assert provider.age_seconds == 0.0
    clock.now = utc("2024-05-01T02:59:59")
    assert provider.current().grams_co2e_per_kwh == 200.0
    clock.now = utc("2024-05-01T03:00:00")  # 05:00+02:00
    assert provider.current().grams_co2e_per_kwh == 300.0
    clock.now = utc("2024-04-30T00:00:00")  # before the first row: the first row
    assert provider.current().grams_co2e_per_kwh == 100.0
    assert provider.age_seconds == 0.0
    clock.now = utc("2024-05-02T03:00:00")  # after the last row: the last row, and it ages
    assert provider.current().grams_co2e_per_kwh == 300.0
    assert provider.age_seconds == pytest.approx(86400.0)
    assert provider.errors == 0


def test_unsorted_rows_and_unix_seconds(tmp_path: Path) -> None:
    path = tmp_path / "unix.csv"
    path.write_text("timestamp,grams_co2e_per_kwh\n1700003600,250.5\n1700000000,120\n1700007200.5,80\n")
    clock = Clock(1700003599.0)
    provider = TimeSeriesIntensity(path, now=clock)
    assert provider.current().grams_co2e_per_kwh == 120.0
    clock.now = 1700003600.0
    assert provider.current().grams_co2e_per_kwh == 250.5
    clock.now = 1700007300.0
    assert provider.current().grams_co2e_per_kwh == 80.0
    assert provider.age_seconds == pytest.approx(99.5)


def test_electricity_maps_csv_header_and_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "em.csv"
    path.write_text(
        "zone,datetime,carbonIntensity,isEstimated\n"
        "DE,2024-05-01T00:00:00.000Z,322,false\n"
        "DE,2024-05-01T01:00:00.000Z,,true\n"  # a gap: the previous value stays in force
        "DE,2024-05-01T02:00:00.000Z,280,false\n"
    )
    clock = Clock(utc("2024-05-01T01:30:00"))
    provider = TimeSeriesIntensity(path, now=clock)
    assert provider.current().grams_co2e_per_kwh == 322.0
    assert provider.age_seconds == pytest.approx(5400.0)


def test_json_list(tmp_path: Path) -> None:
    path = tmp_path / "series.json"
    path.write_text(json.dumps([
        {"timestamp": 1714521600, "grams_co2e_per_kwh": 50},
        {"timestamp": "2024-05-01T01:00:00Z", "grams_co2e_per_kwh": 60.5},
    ]))
    clock = Clock(1714521600 + 10)
    provider = TimeSeriesIntensity(path, now=clock, region="FR")
    assert provider.current().grams_co2e_per_kwh == 50.0
    assert provider.current().region == "FR"
    clock.now = utc("2024-05-01T01:00:00")
    assert provider.current().grams_co2e_per_kwh == 60.5


def test_json_electricity_maps_history(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    path.write_text(json.dumps({
        "zone": "DE",
        "history": [
            {"zone": "DE", "carbonIntensity": 302, "datetime": "2024-05-01T00:00:00.000Z", "isEstimated": False},
            {"zone": "DE", "carbonIntensity": None, "datetime": "2024-05-01T01:00:00.000Z", "isEstimated": True},
            {"zone": "DE", "carbonIntensity": 311, "datetime": "2024-05-01T02:00:00.000Z", "isEstimated": False},
        ],
    }))
    clock = Clock(utc("2024-05-01T01:10:00"))
    provider = TimeSeriesIntensity(path, now=clock)
    value = provider.current()
    assert (value.grams_co2e_per_kwh, value.region) == (302.0, "DE")  # zone from the file
    clock.now = utc("2024-05-01T02:10:00")
    assert provider.current().grams_co2e_per_kwh == 311.0


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("nohdr.csv", "time,value\n2024-05-01T00:00:00Z,1\n", ["line 1", "timestamp,grams_co2e_per_kwh"]),
        ("badts.csv", "timestamp,grams_co2e_per_kwh\n2024-05-01T00:00:00Z,1\nyesterday,2\n", ["line 3", "'yesterday'", "ISO-8601"]),
        ("naive.csv", "timestamp,grams_co2e_per_kwh\n2024-05-01T00:00:00,1\n", ["line 2", "no time zone", "Z"]),
        ("badval.csv", "timestamp,grams_co2e_per_kwh\n2024-05-01T00:00:00Z,lots\n", ["line 2", "'lots'", "not a number"]),
        ("negative.csv", "timestamp,grams_co2e_per_kwh\n2024-05-01T00:00:00Z,-5\n", ["line 2", "between 0 and 5000"]),
        ("millis.csv", "timestamp,grams_co2e_per_kwh\n1714521600000,5\n", ["line 2", "milliseconds"]),
        ("short.csv", "timestamp,grams_co2e_per_kwh\n1714521600\n", ["line 2", "columns"]),
        ("dup.csv", "timestamp,grams_co2e_per_kwh\n1714521600,1\n2024-05-01T00:00:00Z,2\n", ["line 3", "duplicate", "line 2"]),
        ("empty.csv", "", ["empty"]),
        ("gaps.csv", "timestamp,grams_co2e_per_kwh\n1714521600,\n", ["no rows with a value"]),
        ("bad.json", '[{"timestamp": 1714521600, "grams_co2e_per_kwh": 1},\n  oops]', ["line 2", "invalid JSON"]),
        ("keys.json", '[{"timestamp": 1714521600, "grams_co2e_per_kwh": 1}, {"time": 1}]', ["entry 2", "timestamp"]),
        ("obj.json", '{"zone": "DE", "data": []}', ["history"]),
        ("boolval.json", '[{"timestamp": 1714521600, "grams_co2e_per_kwh": true}]', ["entry 1", "not a number"]),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, name: str, content: str, fragments: list[str]) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        TimeSeriesIntensity(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        TimeSeriesIntensity(tmp_path / "absent.csv")


def test_reload_when_file_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "series.csv"
    path.write_text("timestamp,grams_co2e_per_kwh\n1700000000,100\n")
    provider = TimeSeriesIntensity(path, now=lambda: 1700000100.0, reload_check_seconds=0.0)
    assert provider.current().grams_co2e_per_kwh == 100.0
    path.write_text("timestamp,grams_co2e_per_kwh\n1700000000,100\n1700000050,175\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))  # mtime granularity need not matter
    assert provider.current().grams_co2e_per_kwh == 175.0
    # A broken rewrite keeps the previous series, counts once per check, and logs once.
    with caplog.at_level(logging.WARNING, logger="llmco2_vllm"):
        path.write_text("timestamp,grams_co2e_per_kwh\n1700000000,oops\n")
        assert provider.current().grams_co2e_per_kwh == 175.0
        assert provider.current().grams_co2e_per_kwh == 175.0
        path.unlink()
        assert provider.current().grams_co2e_per_kwh == 175.0
    assert provider.errors == 3
    assert len([r for r in caplog.records if "grid intensity file" in r.getMessage()]) == 2  # ValueError, OSError
    path.write_text("timestamp,grams_co2e_per_kwh\n1700000000,90\n")
    assert provider.current().grams_co2e_per_kwh == 90.0


def test_reload_check_is_rate_limited(tmp_path: Path) -> None:
    path = tmp_path / "series.csv"
    path.write_text("timestamp,grams_co2e_per_kwh\n1700000000,100\n")
    provider = TimeSeriesIntensity(path, now=lambda: 1700000100.0, reload_check_seconds=3600.0)
    path.write_text("timestamp,grams_co2e_per_kwh\n1700000000,999\n")
    assert provider.current().grams_co2e_per_kwh == 100.0  # not checked again within the hour


# --- live: Electricity Maps v3 against a local server --------------------------------------------


@pytest.fixture
def fake_api() -> Iterator[tuple[FakeElectricityMaps, str]]:
    with FakeElectricityMaps() as state:
        yield state, state.url


def live(base_url: str, **kwargs: float) -> ElectricityMapsIntensity:
    options = {"refresh_seconds": 0.05, "timeout_seconds": 0.3, **kwargs}
    return ElectricityMapsIntensity(base_url, "DE", API_KEY, StaticIntensity(FALLBACK), **options)


def test_live_good_value_header_and_refresh(fake_api: tuple[FakeElectricityMaps, str], caplog: pytest.LogCaptureFixture) -> None:
    state, base_url = fake_api
    with caplog.at_level(logging.DEBUG, logger="llmco2_vllm"):
        provider = live(base_url)
        try:
            assert isinstance(provider, IntensityProvider)
            wait_for(lambda: provider.successes >= 1)
            value = provider.current()
            assert (value.grams_co2e_per_kwh, value.region, value.kind, value.year) == (322.0, "DE", "average", 2024)
            assert value.source == f"{base_url}/carbon-intensity/latest?zone=DE"
            assert provider.fallback_active is False
            assert provider.emission_factor_type == "lifecycle"
            assert 0.0 <= provider.age_seconds < 5.0
            assert state.requests[0] == ("/v3/carbon-intensity/latest?zone=DE", API_KEY)
            with state.lock:
                state.value = 101.5
            wait_for(lambda: provider.current().grams_co2e_per_kwh == 101.5)
            assert provider.errors == 0
        finally:
            provider.close()
    assert all(API_KEY not in record.getMessage() for record in caplog.records)
    assert API_KEY not in repr(Settings(grid_intensity_url=base_url, grid_intensity_zone="DE", grid_intensity_api_key=API_KEY))


def test_live_fallback_before_first_success_and_constructor_does_not_block(
    fake_api: tuple[FakeElectricityMaps, str],
) -> None:
    state, base_url = fake_api
    state.mode = "hang"
    started = time.perf_counter()
    provider = live(base_url, timeout_seconds=0.5)
    try:
        assert time.perf_counter() - started < 0.05
        assert provider.fallback_active is True
        assert provider.current() == FALLBACK
        assert provider.age_seconds < 0.05  # counted from start until the service first answers
        wait_for(lambda: len(state.requests) >= 1)
        # The server is hanging right now: current() still answers at once, every time.
        for _ in range(20):
            started = time.perf_counter()
            assert provider.current() == FALLBACK
            assert time.perf_counter() - started < 0.05
            time.sleep(0.01)
        wait_for(lambda: provider.errors >= 1)  # the fetch timed out
    finally:
        state.release.set()
        provider.close()


def test_live_keeps_last_value_while_fresh_then_falls_back(fake_api: tuple[FakeElectricityMaps, str]) -> None:
    state, base_url = fake_api
    provider = live(base_url, max_stale_seconds=0.6)
    try:
        wait_for(lambda: provider.successes >= 1)
        with state.lock:
            state.mode = "500"
        failing_since = time.monotonic()
        wait_for(lambda: provider.errors >= 2)
        if time.monotonic() - failing_since < 0.4:  # certainly still fresh: the last good value is kept
            assert provider.current().grams_co2e_per_kwh == 322.0
            assert provider.fallback_active is False
        wait_for(lambda: provider.fallback_active)
        assert provider.current() == FALLBACK
        assert provider.age_seconds > 0.6  # the live value's age keeps growing while the fallback serves
        with state.lock:
            state.mode = "ok"
            state.value = 55
        wait_for(lambda: not provider.fallback_active)
        assert provider.current().grams_co2e_per_kwh == 55.0
    finally:
        provider.close()


def test_live_last_value_kept_when_service_goes_down(fake_api: tuple[FakeElectricityMaps, str]) -> None:
    state, base_url = fake_api
    provider = live(base_url, max_stale_seconds=60.0)
    try:
        wait_for(lambda: provider.successes >= 1)
        with state.lock:
            state.mode = "hang"
        wait_for(lambda: provider.errors >= 1)
        assert provider.current().grams_co2e_per_kwh == 322.0
        assert provider.fallback_active is False
        assert provider.age_seconds >= 0.3  # the timeout passed since the value was obtained
    finally:
        state.release.set()
        provider.close()


@pytest.mark.parametrize(
    ("mode", "value", "log_fragment"),
    [
        ("401", 322, "LLMCO2_GRID_INTENSITY_API_KEY"),
        ("500", 322, "HTTP 500"),
        ("bad_json", 322, "not JSON"),
        ("missing", 322, "no carbonIntensity"),
        ("ok", -3, "carbonIntensity -3"),
        ("ok", "high", "carbonIntensity 'high'"),
    ],
)
def test_live_errors_counted_logged_once_and_fall_back(
    fake_api: tuple[FakeElectricityMaps, str], caplog: pytest.LogCaptureFixture, mode: str, value: object, log_fragment: str
) -> None:
    state, base_url = fake_api
    state.mode, state.value = mode, value
    with caplog.at_level(logging.WARNING, logger="llmco2_vllm"):
        provider = live(base_url)
        try:
            wait_for(lambda: provider.errors >= 3)
            assert provider.current() == FALLBACK
            assert provider.fallback_active is True
            assert provider.successes == 0
        finally:
            provider.close()
    warnings = [r.getMessage() for r in caplog.records if "grid intensity from" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert log_fragment in warnings[0]
    assert API_KEY not in warnings[0]


def test_live_connection_refused_is_counted() -> None:
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = live(f"http://127.0.0.1:{port}/v3")
    try:
        wait_for(lambda: provider.errors >= 2)
        assert provider.current() == FALLBACK
    finally:
        provider.close()


def test_close_stops_the_thread(fake_api: tuple[FakeElectricityMaps, str]) -> None:
    state, base_url = fake_api
    provider = live(base_url)
    wait_for(lambda: provider.successes >= 2)
    assert provider.thread_alive
    provider.close()
    assert not provider.thread_alive
    count = len(state.requests)
    time.sleep(0.2)  # four refresh periods
    assert len(state.requests) == count


# --- built from settings ----------------------------------------------------------------------------


def test_build_precedence(tmp_path: Path, fake_api: tuple[FakeElectricityMaps, str]) -> None:
    state, base_url = fake_api
    state.mode = "500"  # the live provider stays on its fallback
    series = tmp_path / "series.csv"
    series.write_text("timestamp,grams_co2e_per_kwh\n1700000000,42\n")

    region = build_intensity_provider(Settings(region="FR"))
    assert isinstance(region, StaticIntensity) and region.current() == lookup_region("FR")

    value = build_intensity_provider(Settings(region="FR", grid_intensity=123.0))
    assert isinstance(value, StaticIntensity)
    assert (value.current().grams_co2e_per_kwh, value.current().source) == (123.0, "user setting")

    settings = Settings(region="FR", grid_intensity=123.0, grid_intensity_url=base_url, grid_intensity_api_key=API_KEY)
    live_provider = build_intensity_provider(settings)
    try:
        assert isinstance(live_provider, ElectricityMapsIntensity)
        assert live_provider.zone == "FR"  # the region when no zone is set
        wait_for(lambda: live_provider.errors >= 1)
        assert live_provider.current().grams_co2e_per_kwh == 123.0  # the fallback is the user value
        assert state.requests[0] == ("/v3/carbon-intensity/latest?zone=FR", API_KEY)
    finally:
        live_provider.close()

    from_file = build_intensity_provider(Settings(
        region="FR", grid_intensity=123.0, grid_intensity_url=base_url, grid_intensity_file=str(series), grid_intensity_zone="DE",
    ))
    assert isinstance(from_file, TimeSeriesIntensity)
    assert (from_file.current().grams_co2e_per_kwh, from_file.current().region) == (42.0, "DE")


# --- start-up check of the file the settings name (settings hold values only) ----------------------


def test_start_up_check_of_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    settings = Settings.from_env(environ={"LLMCO2_GRID_INTENSITY_FILE": str(missing)})  # a value: accepted
    with pytest.raises(IntensitySourceError) as info:
        check_intensity_sources(settings)
    message = str(info.value)
    assert "LLMCO2_GRID_INTENSITY_FILE" in message and str(missing) in message and "no such file" in message
    assert "unset it" in message  # the fix
    with pytest.raises(IntensitySourceError, match="no such file"):
        build_intensity_provider(settings)


def test_start_up_check_parses_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,grams_co2e_per_kwh\n2024-05-01T00:00:00Z,120\nnot-a-time,3\n")
    settings = Settings.from_env(environ={"LLMCO2_GRID_INTENSITY_FILE": str(bad)})
    with pytest.raises(IntensitySourceError) as info:
        check_intensity_sources(settings)
    message = str(info.value)
    assert message.startswith("LLMCO2_GRID_INTENSITY_FILE:")
    assert str(bad) in message and "line 3" in message and "ISO-8601" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(IntensitySourceError, match="line 3"):
        build_intensity_provider(settings)


def test_start_up_check_passes_good_sources_without_calling_the_api(
    tmp_path: Path, fake_api: tuple[FakeElectricityMaps, str]
) -> None:
    state, base_url = fake_api
    series = tmp_path / "series.csv"
    series.write_text("timestamp,grams_co2e_per_kwh\n1700000000,42\n")
    check_intensity_sources(Settings(grid_intensity_file=str(series)))
    check_intensity_sources(Settings(region="FR"))
    check_intensity_sources(Settings(region="FR", grid_intensity_url=base_url, grid_intensity_api_key=API_KEY))
    time.sleep(0.1)  # a refresh thread, had one been started, would have asked by now
    assert state.requests == []  # the live API may be down at start: the fallback covers it, no check needed
