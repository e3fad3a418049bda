"""Admission-control metrics of an API server process (the engine's metrics are in ``accounting/metrics.py``)."""

from __future__ import annotations

import math

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class AdmissionMetrics:
    """Admission-control metrics of one API server process, on prometheus_client's default registry.

    vLLM serves that registry on ``/metrics`` (several API servers: through its multiprocess
    directory, so counters add up and gauges take the most recent value).
    """

    _instance: "AdmissionMetrics | None" = None

    def __init__(
        self, model_name: str, budget_grams: float, max_waiting: int = 0, registry: CollectorRegistry | None = None
    ) -> None:
        registry = REGISTRY if registry is None else registry
        self.decisions = Counter(
            "llmco2_admission_decisions",
            "Admission decisions: admitted, rejected, deferred (a deferred request is later admitted or rejected too), "
            "by the policy that decided (none, cap, budget, intensity, error).",
            ["model_name", "decision", "policy"],
            registry=registry,
        )
        self.errors = Counter(
            "llmco2_admission_errors", "Failures inside admission control (fail-open unless configured fail-closed).",
            ["model_name"], registry=registry,
        ).labels(model_name=model_name)
        self.waiting = Gauge(
            "llmco2_admission_waiting_requests", "Deferrable requests waiting now.", ["model_name"],
            registry=registry, multiprocess_mode="livesum",
        ).labels(model_name=model_name)
        self.spent = Gauge(
            "llmco2_carbon_budget_spent_grams",
            "Carbon of the requests admitted in the budget window (actual when finished, forecast while running), grams CO2e.",
            ["model_name"], registry=registry, multiprocess_mode="mostrecent",
        ).labels(model_name=model_name)
        self.released = Counter(
            "llmco2_admission_released_requests",
            "Deferred requests let through: condition_cleared (paced, oldest first) or deadline_reached.",
            ["model_name", "reason"], registry=registry,
        )
        self.unforecast = Counter(
            "llmco2_admission_unforecast_requests",
            "Requests passed to vLLM without a forecast: body_too_large (over LLMCO2_ADMISSION_MAX_BODY_BYTES) "
            "or unreadable (vLLM answers them).",
            ["model_name", "reason"], registry=registry,
        )
        Gauge(
            "llmco2_admission_max_waiting_requests", "Configured cap on waiting deferrable requests (LLMCO2_ADMISSION_MAX_WAITING).",
            ["model_name"], registry=registry, multiprocess_mode="mostrecent",
        ).labels(model_name=model_name).set(max_waiting)
        self.forecast_error = Gauge(
            "llmco2_forecast_error_ratio",
            "Median |forecast / actual - 1| of the energy of recently finished requests (0.1 = forecasts 10 % off).",
            ["model_name"], registry=registry, multiprocess_mode="mostrecent",
        ).labels(model_name=model_name)
        self.interval_coverage = Gauge(
            "llmco2_forecast_interval_coverage_ratio",
            "Share of recently finished requests whose actual energy fell inside their forecast's 80 % interval.",
            ["model_name"], registry=registry, multiprocess_mode="mostrecent",
        ).labels(model_name=model_name)
        self.scored_requests = Gauge(
            "llmco2_forecast_scored_requests",
            "Recently finished requests the forecast error and interval coverage are measured over.",
            ["model_name"], registry=registry, multiprocess_mode="mostrecent",
        ).labels(model_name=model_name)
        self.model_name = model_name
        self.set_forecast_quality(None, None, 0)
        for reason in ("condition_cleared", "deadline_reached"):
            self.released.labels(model_name=model_name, reason=reason)
        for reason in ("body_too_large", "unreadable"):
            self.unforecast.labels(model_name=model_name, reason=reason)
        if budget_grams > 0:
            Gauge(
                "llmco2_carbon_budget_grams", "Configured rolling carbon budget per window, grams CO2e.", ["model_name"],
                registry=registry, multiprocess_mode="mostrecent",
            ).labels(model_name=model_name).set(budget_grams)
        for decision, policy in (
            ("admitted", "none"), ("admitted", "intensity"), ("admitted", "budget"), ("admitted", "error"),
            ("rejected", "cap"), ("rejected", "budget"), ("rejected", "error"), ("rejected", "waiting_cap"),
            ("deferred", "budget"), ("deferred", "intensity"),
        ):
            self.decisions.labels(model_name=model_name, decision=decision, policy=policy)

    @classmethod
    def for_model(cls, model_name: str, budget_grams: float, max_waiting: int = 0) -> "AdmissionMetrics":
        """One instance per process: registering a metric name twice fails."""
        if cls._instance is None:
            cls._instance = cls(model_name, budget_grams, max_waiting)
        return cls._instance

    def decision(self, decision: str, policy: str) -> None:
        self.decisions.labels(model_name=self.model_name, decision=decision, policy=policy).inc()

    def set_spent(self, grams: float) -> None:
        self.spent.set(grams)

    def set_forecast_quality(self, error_ratio: float | None, coverage: float | None, scored: int) -> None:
        """None: no finished request to measure them on yet (NaN, not a perfect 0)."""
        self.forecast_error.set(math.nan if error_ratio is None else error_ratio)
        self.interval_coverage.set(math.nan if coverage is None else coverage)
        self.scored_requests.set(scored)


__all__ = ["AdmissionMetrics"]
