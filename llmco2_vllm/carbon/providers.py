"""Where the grid carbon intensity comes from, chosen from the settings, and its start-up check.

Every provider answers ``current()`` from memory, so the plugin's worker never waits on a
network or a slow disk: the live provider (``electricity_maps``) fetches on its own daemon
thread, and the file provider (``time_series_file``) only re-reads its file when the file
changes. All values are *average* (attributional) intensities.

Precedence (``build_intensity_provider``): ``LLMCO2_GRID_INTENSITY_FILE`` >
``LLMCO2_GRID_INTENSITY_URL`` (live, with a static fallback) > ``LLMCO2_GRID_INTENSITY`` >
the annual average of ``LLMCO2_REGION`` (``static``).

The settings hold values only; whether the file they name exists and parses is checked here,
by ``check_intensity_sources`` at start-up and again by ``build_intensity_provider``.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol, runtime_checkable

from llmco2_vllm.carbon.electricity_maps import ElectricityMapsIntensity
from llmco2_vllm.carbon.intensity import GridIntensity
from llmco2_vllm.carbon.static import StaticIntensitySettings, static_intensity_from_settings
from llmco2_vllm.carbon.time_series_file import TimeSeriesIntensity

__all__ = [
    "IntensityProvider",
    "IntensitySettings",
    "IntensitySourceError",
    "build_intensity_provider",
    "check_intensity_sources",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class IntensityProvider(Protocol):
    """Source of the grid intensity in use. ``current()`` never blocks on I/O."""

    def current(self) -> GridIntensity: ...

    @property
    def age_seconds(self) -> float: ...

    @property
    def errors(self) -> int: ...

    def close(self) -> None: ...


class IntensitySettings(StaticIntensitySettings, Protocol):
    """The settings a provider is built from (``llmco2_vllm.settings.Settings`` has them)."""

    @property
    def grid_intensity_file(self) -> str: ...

    @property
    def grid_intensity_url(self) -> str: ...

    @property
    def grid_intensity_zone(self) -> str: ...

    @property
    def grid_intensity_api_key(self) -> str: ...

    @property
    def grid_intensity_refresh_seconds(self) -> float: ...

    @property
    def grid_intensity_timeout_seconds(self) -> float: ...


class IntensitySourceError(ValueError):
    """The grid-intensity source the settings name is unusable; the message names the setting and the fix."""


def check_intensity_sources(settings: IntensitySettings) -> None:
    """Start-up check: the time-series file, when set, exists and parses. Reads the file once.

    The live API is not contacted: it may be down at start, and the static fallback covers that.

    Raises:
        IntensitySourceError: the file is missing or unreadable, or a line of it is wrong.
    """
    if settings.grid_intensity_file:
        _open_time_series(settings).close()


def build_intensity_provider(settings: IntensitySettings) -> IntensityProvider:
    """The provider the settings ask for: file > live URL (static fallback) > value > region.

    Raises:
        IntensitySourceError: as ``check_intensity_sources``.
    """
    if settings.grid_intensity_file:
        if settings.grid_intensity_url:
            logger.info("llmco2: LLMCO2_GRID_INTENSITY_FILE is set, so LLMCO2_GRID_INTENSITY_URL is not used")
        return _open_time_series(settings)
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


def _open_time_series(settings: IntensitySettings) -> TimeSeriesIntensity:
    path = settings.grid_intensity_file
    if not os.path.isfile(path):
        raise IntensitySourceError(
            f"LLMCO2_GRID_INTENSITY_FILE={path!r}: no such file. Point it at a CSV "
            "(timestamp,grams_co2e_per_kwh) or JSON time series, or unset it."
        )
    try:
        return TimeSeriesIntensity(path, region=settings.grid_intensity_zone or None)
    except ValueError as error:  # names the file and the line or entry
        raise IntensitySourceError(f"LLMCO2_GRID_INTENSITY_FILE: {error}") from None
