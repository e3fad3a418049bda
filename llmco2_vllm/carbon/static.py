"""A fixed grid intensity: the user's ``LLMCO2_GRID_INTENSITY`` or a region's annual average."""

from __future__ import annotations

from typing import Protocol

from llmco2_vllm.carbon.intensity import GridIntensity, lookup_region

__all__ = ["StaticIntensity", "StaticIntensitySettings", "static_intensity_from_settings"]


class StaticIntensity:
    """One fixed value; meets ``providers.IntensityProvider``."""

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


class StaticIntensitySettings(Protocol):
    """The settings a static value is chosen from (``llmco2_vllm.settings.Settings`` has them)."""

    @property
    def grid_intensity(self) -> float | None: ...

    @property
    def region(self) -> str: ...


def static_intensity_from_settings(settings: StaticIntensitySettings) -> StaticIntensity:
    """``LLMCO2_GRID_INTENSITY`` when set, else the annual average of ``LLMCO2_REGION``."""
    if settings.grid_intensity is not None:
        return StaticIntensity(GridIntensity(settings.grid_intensity, "static", "average", None, "user setting"))
    return StaticIntensity(lookup_region(settings.region))
