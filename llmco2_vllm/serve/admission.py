"""Carbon-aware admission control: decide, from a request's forecast, whether it runs now.

Three policies, each off until configured (``LLMCO2_ADMISSION_*``), checked in this order:

1. **cap** - a request whose forecast carbon exceeds ``admission_max_request_grams`` is rejected.
2. **budget** - the carbon of the requests admitted in the last ``admission_budget_window_seconds``
   (actual once finished, forecast while running) plus this forecast may not exceed
   ``admission_budget_grams``. Over budget: a deferrable request waits for budget to free up, any
   other request is rejected until the oldest spend leaves the window.
3. **intensity** - while the grid intensity is above ``admission_defer_above_intensity``, deferrable
   requests wait (up to their deadline) for a cleaner period; at the deadline they run.

Requests that are not deferrable are never delayed, only rejected by cap or budget. This module is
the decision only (no HTTP, no vLLM): ``carbon_service`` turns decisions into waits, and the transport
(``plugin/http_endpoints.py``) into 429s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ADMITTED, REJECTED, DEFERRED = "admitted", "rejected", "deferred"
POLICIES = ("none", "cap", "budget", "intensity", "error")


@dataclass(frozen=True)
class AdmissionDecision:
    """One decision: ``decision`` is admitted, rejected or deferred (wait, then ask again)."""

    decision: str
    policy: str  # the policy that decided: none, cap, budget, intensity, error
    reason: str = ""
    retry_after_seconds: float | None = None  # for rejections: when asking again could succeed
    numbers: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        result: dict[str, object] = {"decision": self.decision, "policy": self.policy, "reason": self.reason}
        if self.retry_after_seconds is not None:
            result["retry_after_seconds"] = self.retry_after_seconds
        result.update(self.numbers)
        return result


@dataclass(frozen=True)
class AdmissionLimits:
    """The configured policies; 0 switches one off."""

    max_request_grams: float = 0.0
    budget_grams: float = 0.0
    budget_window_seconds: float = 3600.0
    defer_above_intensity: float = 0.0
    max_defer_seconds: float = 600.0
    intensity_refresh_seconds: float = 300.0  # a capped request may pass once the grid is cleaner

    @property
    def active(self) -> bool:
        return self.max_request_grams > 0 or self.budget_grams > 0 or self.defer_above_intensity > 0

    @classmethod
    def from_settings(cls, settings) -> "AdmissionLimits":
        return cls(
            max_request_grams=settings.admission_max_request_grams,
            budget_grams=settings.admission_budget_grams,
            budget_window_seconds=settings.admission_budget_window_seconds,
            defer_above_intensity=settings.admission_defer_above_intensity,
            max_defer_seconds=settings.admission_max_defer_seconds,
            intensity_refresh_seconds=settings.grid_intensity_refresh_seconds,
        )


def decide(
    limits: AdmissionLimits,
    grams_co2e: float,
    grid_intensity: float,
    spent_grams: float,
    oldest_spend_age_seconds: float | None,
    may_wait: bool,
) -> AdmissionDecision:
    """Decide for one request.

    ``spent_grams``: carbon already admitted in the budget window; ``oldest_spend_age_seconds``: age
    of the oldest spend in it (None when empty); ``may_wait``: the request is deferrable and its
    deadline has not passed.
    """
    if not math.isfinite(grams_co2e) or grams_co2e < 0:
        raise ValueError(f"forecast carbon must be a finite number >= 0, got {grams_co2e!r}")
    if limits.max_request_grams > 0 and grams_co2e > limits.max_request_grams:
        return AdmissionDecision(
            REJECTED,
            "cap",
            f"forecast {grams_co2e:.6g} gCO2e is above the per-request cap of {limits.max_request_grams:.6g} gCO2e",
            retry_after_seconds=limits.intensity_refresh_seconds,
            numbers={"forecast_grams_co2e": grams_co2e, "cap_grams_co2e": limits.max_request_grams},
        )
    if limits.budget_grams > 0 and spent_grams + grams_co2e > limits.budget_grams:
        numbers = {
            "forecast_grams_co2e": grams_co2e,
            "budget_grams_co2e": limits.budget_grams,
            "spent_grams_co2e": spent_grams,
            "budget_window_seconds": limits.budget_window_seconds,
        }
        if grams_co2e > limits.budget_grams:
            return AdmissionDecision(
                REJECTED,
                "budget",
                "forecast alone exceeds the whole carbon budget of the window",
                retry_after_seconds=limits.budget_window_seconds,
                numbers=numbers,
            )
        if may_wait:
            return AdmissionDecision(DEFERRED, "budget", "carbon budget spent; waiting for it to free up", numbers=numbers)
        age = oldest_spend_age_seconds if oldest_spend_age_seconds is not None else 0.0
        return AdmissionDecision(
            REJECTED,
            "budget",
            "carbon budget of the window is spent",
            retry_after_seconds=max(1.0, limits.budget_window_seconds - age),
            numbers=numbers,
        )
    if limits.defer_above_intensity > 0 and grid_intensity > limits.defer_above_intensity and may_wait:
        return AdmissionDecision(
            DEFERRED,
            "intensity",
            "grid intensity above the deferral threshold; waiting for a cleaner period",
            numbers={"grid_intensity_grams_per_kwh": grid_intensity, "threshold_grams_per_kwh": limits.defer_above_intensity},
        )
    return AdmissionDecision(ADMITTED, "none")


def parse_deferrable(header_value: str | None, max_defer_seconds: float) -> float:
    """Seconds a request may wait, from its ``X-Llmco2-Deferrable`` header (0 = not deferrable).

    ``true``/``yes`` wait up to ``admission_max_defer_seconds``; a number of seconds waits
    that long, at most ``admission_max_defer_seconds``.

    Raises:
        ValueError: on anything else, with the accepted forms.
    """
    if header_value is None:
        return 0.0
    text = header_value.strip().lower()
    if text in ("", "0", "false", "no"):
        return 0.0
    if text in ("true", "yes"):
        return max_defer_seconds
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(
            f"X-Llmco2-Deferrable: {header_value!r} is not understood; use true, false or a number of seconds"
        ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"X-Llmco2-Deferrable: {header_value!r} must be a number of seconds >= 0")
    return min(seconds, max_defer_seconds)
