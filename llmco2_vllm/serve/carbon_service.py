"""The API server's side of the plugin: forecasts, admission decisions, the carbon budget, results.

One ``CarbonService`` per API server process. The transport (``plugin/http_endpoints.py``) calls
its public coroutines; they run heavy or blocking work (tokenising, SQLite) on one worker thread,
never on the event loop. The engine's worker writes the actuals and engine state this service reads,
through the shared results store (``results_store.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable

from llmco2_vllm.carbon.providers import IntensityProvider
from llmco2_vllm.predict.forecast import ForecastLearner, RequestForecast, RequestForecaster
from llmco2_vllm.serve.admission import (
    ADMITTED,
    DEFERRED,
    REJECTED,
    AdmissionDecision,
    AdmissionLimits,
    decide,
    parse_deferrable,
)
from llmco2_vllm.serve.metrics import AdmissionMetrics
from llmco2_vllm.serve.request_parsing import RequestShape, request_shape
from llmco2_vllm.serve.request_record import lookup_ids
from llmco2_vllm.serve.results_store import RequestResultStore
from llmco2_vllm.settings import Settings

logger = logging.getLogger(__name__)

_DEFER_POLL_SECONDS = 1.0
_ENGINE_STATE_MAX_AGE_SECONDS = 1.0  # running requests change quickly; calibration slowly
_LEARNER_MAX_AGE_SECONDS = 2.0  # outcomes of finished requests are re-read at least this often when forecasting
# ... and sooner once this many requests finished here since the last read (a burst of short requests
# outruns a fixed period), but at most every _LEARNER_MIN_AGE_SECONDS: each read parses up to 1000 rows.
_LEARNER_REFRESH_FINISHED = 8
_LEARNER_MIN_AGE_SECONDS = 0.25
# Requests running longer than this stop holding back what is learned (``_learner``): a bound, should
# one never be reported finished.
_LEARNER_COHORT_MAX_SECONDS = 600.0
_OUTCOMES_READ = 1000
_SPENT_MAX_AGE_SECONDS = 1.0  # admissions in between are added locally (``_spent_since_read``)
_GAUGE_REFRESH_SECONDS = 5.0
_STEP_SAMPLES = 64  # finished requests the wall seconds per step are learned from


class WaitingLine:
    """Deferred requests in arrival order, released oldest first and paced.

    Only the oldest waiting request asks the policies again (once a poll); the others sleep until
    it leaves or their deadline comes, so a thousand parked requests cost a thousand sleeping
    coroutines, not a thousand polls. When its condition clears, the oldest is released and wakes
    the next, which waits for the next release slot (``interval_seconds`` after the previous one):
    no thundering herd when the grid turns clean. A request whose deadline comes is let through
    at once, unpaced: the deadline is what it was promised.
    """

    def __init__(self, interval_seconds: float, clock: Callable[[], float]) -> None:
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._waiting: dict[int, asyncio.Event] = {}  # insertion order = arrival order
        self._next_ticket = 0
        self._last_release = -math.inf

    def __len__(self) -> int:
        return len(self._waiting)

    def join(self) -> int:
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        self._waiting[ticket] = asyncio.Event()
        if len(self._waiting) == 1:
            self._waiting[ticket].set()
        return ticket

    def is_oldest(self, ticket: int) -> bool:
        return next(iter(self._waiting)) == ticket

    async def wait_turn(self, ticket: int, timeout_seconds: float) -> None:
        """Sleep until ``ticket`` is the oldest, or ``timeout_seconds`` passed."""
        try:
            await asyncio.wait_for(self._waiting[ticket].wait(), timeout_seconds)
        except asyncio.TimeoutError:
            pass

    def seconds_until_release(self) -> float:
        """0 and the slot is taken, or how long until the next release slot."""
        now = self.clock()
        wait = self._last_release + self.interval_seconds - now
        if wait <= 0:
            self._last_release = now
            return 0.0
        return wait

    def leave(self, ticket: int) -> None:
        self._waiting.pop(ticket, None)
        if self._waiting:
            self._waiting[next(iter(self._waiting))].set()


class CarbonService:
    """Forecasts, admission and results of one API server process."""

    def __init__(
        self,
        settings: Settings,
        forecaster: RequestForecaster,
        store: RequestResultStore,
        intensity: IntensityProvider,
        model_name: str,
        max_model_len: int,
        tokenizer: Any = None,
        clock: Callable[[], float] = time.time,
        sees_every_request: bool = False,
    ) -> None:
        """``sees_every_request``: this is the only API server in front of the only engine (its requests
        in flight are then all the engine runs)."""
        self.settings = settings
        self.sees_every_request = sees_every_request
        self.forecaster = forecaster
        self.store = store
        self.intensity = intensity
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer  # None: prompts are counted from characters
        self.clock = clock
        self.limits = AdmissionLimits.from_settings(settings)
        self.metrics = AdmissionMetrics.for_model(model_name, self.limits.budget_grams, settings.admission_max_waiting)
        self.waiting_line = WaitingLine(1.0 / settings.admission_release_per_second, clock)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmco2-api")
        self._engine_state: tuple[float, dict[str, Any]] = (-math.inf, {})
        self._learned: tuple[float, ForecastLearner] = (-math.inf, ForecastLearner([]))
        self._finished_since_learned = 0  # responses completed here since the learner's last read
        self._spent: tuple[float, float] = (-math.inf, 0.0)  # (read at, grams) from the store
        self._spent_since_read = 0.0  # admitted here after that read
        self._logged_error = False
        self._in_flight = 0  # arrived here, not waiting deferred, response not complete: the batch a new request joins
        self._last_ticket = 0
        # Requests forecast here and not finished, for how soon they leave the batch later requests join:
        # ticket -> (forecast at, expected steps, parts), and the wall seconds per step recent ones took.
        self._running: dict[int | None, tuple[float, int, int]] = {}
        self._running_lock = threading.Lock()  # registered on the worker thread, removed on the event loop
        self._seconds_per_step: deque[float] = deque(maxlen=_STEP_SAMPLES)
        self._step_period: float | None = None

    # -- public API (the transport's) -------------------------------------------------------------
    def deferral_seconds(self, header: str | None) -> float:
        """How long a request may wait, from its ``X-Llmco2-Deferrable`` header; ValueError when malformed."""
        return parse_deferrable(header, self.limits.max_defer_seconds)

    async def shape_and_forecast(
        self, body: Any, chat: bool, ticket: int | None = None
    ) -> tuple[RequestShape, RequestForecast]:
        """Read a parsed completions/chat body and forecast it; RequestShapeError when it cannot be read.

        With the ``ticket`` of ``request_arrived``, later forecasts expect this request to run about its
        expected output length beside them (until ``request_finished``)."""
        return await self._run(self._shape_and_forecast, body, chat, True, ticket)

    async def estimate(self, body: Any) -> dict[str, Any]:
        """``POST /v1/carbon/estimate``: a forecast and what admission would decide now, without running."""
        shape, forecast = await self._run(self._shape_and_forecast, body, False, False)
        now = await self._run(self._decide, forecast.grams_co2e, False)
        deferrable = await self._run(self._decide, forecast.grams_co2e, True)
        return {
            "object": "carbon.estimate",
            "model": self.model_name,
            "prompt_tokens_estimated": shape.prompt_tokens_estimated,
            "forecast": forecast.to_json(),
            "admission": now.to_json(),
            "admission_if_deferrable": deferrable.to_json(),
        }

    async def admit(
        self, forecast: RequestForecast, wait_seconds: float, ticket: int | None = None
    ) -> tuple[AdmissionDecision, float]:
        """Decide, waiting in the waiting line while a deferrable request is deferred; returns the decision and the wait."""
        if not self.limits.active:
            self.metrics.decision(ADMITTED, "none")
            return AdmissionDecision(ADMITTED, "none"), 0.0
        started = self.clock()
        deadline = started + wait_seconds
        grams = forecast.grams_co2e
        decision = await self._run(self._decide, grams, wait_seconds > 0)
        deferred_by: str | None = None
        released_by = ""
        if decision.decision == DEFERRED:
            line = self.waiting_line
            if len(line) >= self.settings.admission_max_waiting:
                decision = AdmissionDecision(
                    REJECTED,
                    "waiting_cap",
                    f"{len(line)} deferrable requests are already waiting (LLMCO2_ADMISSION_MAX_WAITING)",
                    # The line drains at the release pace once the condition clears.
                    retry_after_seconds=max(1.0, len(line) * line.interval_seconds),
                    numbers={"waiting_requests": float(len(line))},
                )
            else:
                deferred_by = decision.policy
                self.metrics.decision(DEFERRED, deferred_by)
                self.metrics.waiting.inc()
                place = line.join()
                self._in_flight -= 1  # waiting, it shares no batch
                with self._running_lock:
                    running = self._running.pop(ticket, None)
                try:
                    decision, released_by = await self._wait_in_line(place, grams, deadline)
                finally:
                    line.leave(place)
                    self.metrics.waiting.dec()
                    self._in_flight += 1
                    if running is not None:
                        with self._running_lock:
                            self._running[ticket] = (self.clock(), *running[1:])
        waited = self.clock() - started
        if decision.decision == ADMITTED and deferred_by is not None:
            self.metrics.released.labels(model_name=self.model_name, reason=released_by).inc()
            reason = released_by.replace("_", " ")
            decision = AdmissionDecision(ADMITTED, deferred_by, reason, numbers={"waited_seconds": waited})
        self.metrics.decision(decision.decision, decision.policy)
        if decision.decision == ADMITTED:
            self._spent_since_read += grams
        else:
            with self._running_lock:
                self._running.pop(ticket, None)  # it will not run
        logger.log(
            logging.INFO if decision.decision == REJECTED or deferred_by else logging.DEBUG,
            "llmco2: %s by %s policy (%s); forecast %.6g gCO2e, waited %.1f s",
            decision.decision,
            decision.policy,
            decision.reason,
            grams,
            waited,
        )
        return decision, waited

    async def _wait_in_line(self, ticket: int, grams: float, deadline: float) -> tuple[AdmissionDecision, str]:
        """Wait until released (oldest first, paced) or the deadline; the final decision and how it came."""
        line = self.waiting_line
        while True:
            now = self.clock()
            if now >= deadline:
                return await self._run(self._decide, grams, False), "deadline_reached"
            if not line.is_oldest(ticket):
                await line.wait_turn(ticket, deadline - now)
                continue
            decision = await self._run(self._decide, grams, True)
            if decision.decision == REJECTED:
                return decision, ""
            if decision.decision == ADMITTED:
                pause = line.seconds_until_release()
                if pause == 0.0:
                    return decision, "condition_cleared"
            else:
                pause = _DEFER_POLL_SECONDS
            await asyncio.sleep(max(0.01, min(pause, deadline - self.clock())))

    def request_arrived(self) -> int:
        """A request reached the server: its ticket (the transport calls ``request_finished`` with it when
        its response ends)."""
        self._in_flight += 1
        self._last_ticket += 1
        return self._last_ticket

    def request_finished(self, ticket: int | None = None) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        self._finished_since_learned += 1
        with self._running_lock:
            running = self._running.pop(ticket, None)
        if running is not None and running[1] > 0:
            # Its wall seconds per expected step, queueing and the server's own overheads included:
            # how fast the requests running beside a new one progress.
            samples = self._seconds_per_step
            samples.append((self.clock() - running[0]) / running[1])
            self._step_period = sorted(samples)[len(samples) // 2]

    def body_not_forecast(self, reason: str) -> None:
        """Count a request passed to vLLM without a forecast (``body_too_large``, ``unreadable``)."""
        self.metrics.unforecast.labels(model_name=self.model_name, reason=reason).inc()

    def admission_failed(self, error: BaseException) -> bool:
        """Count and log a failure inside admission control; True when the request must be refused (fail-closed)."""
        self._count_error(error)
        fail_closed = self.settings.admission_fail_closed
        self.metrics.decision(REJECTED if fail_closed else ADMITTED, "error")
        return fail_closed

    async def record_forecast(
        self, response_id: str, shape: RequestShape, forecast: RequestForecast, decision: AdmissionDecision
    ) -> None:
        """Keep a request's forecast and decision for its results, under the response id the client sees."""
        payload = forecast.to_json()
        payload["prompt_tokens_estimated"] = shape.prompt_tokens_estimated
        payload["admission"] = decision.to_json()
        # A rejected request keeps its forecast for the client but reserves nothing from the budget.
        reserved = forecast.grams_co2e if decision.decision == ADMITTED else 0.0
        await self._run(self.store.record_forecast, response_id, payload, reserved, shape.parts)

    async def result(self, request_id: str) -> dict[str, Any] | None:
        """Forecast and actual of a request, by its response id or its bare X-Request-Id; None when unknown."""
        for candidate in lookup_ids(request_id):
            found = await self._run(self.store.get, candidate)
            if found is not None:
                return found
        return None

    async def refresh_gauges_forever(self) -> None:
        """Keep the gauges current while no request arrives."""
        while True:
            await asyncio.sleep(_GAUGE_REFRESH_SECONDS)
            await self.refresh_gauges()

    async def refresh_gauges(self) -> None:
        """The budget spent and the forecast quality (``_learner`` sets it) from the store."""
        try:
            if self.limits.budget_grams > 0:
                self._spent = (-math.inf, 0.0)
                await self._run(self._budget_view)
            await self._run(self._learner)  # requests that finished after the last one arrived count too
        except Exception as error:
            self._count_error(error)

    # -- on the worker thread ----------------------------------------------------------------------
    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _engine(self) -> dict[str, Any]:
        read_at, state = self._engine_state
        now = self.clock()
        if now - read_at > _ENGINE_STATE_MAX_AGE_SECONDS:
            engines = self.store.engine_states()
            state = {
                # Engines share the load: a request lands in one of them (data parallel), so per engine.
                "running_requests": sum(int(e.get("running_requests", 0)) for e in engines) / len(engines) if engines else 0,
                "mean_running_requests": (
                    sum(float(e.get("mean_running_requests", e.get("running_requests", 0))) for e in engines) / len(engines)
                    if engines else None
                ),
                "step_token_budget": max((e.get("step_token_budget") or 0 for e in engines), default=0) or None,
                "prefill_scale": engines[0].get("prefill_scale", 1.0) if engines else 1.0,
                "decode_scale": engines[0].get("decode_scale", 1.0) if engines else 1.0,
                "calibrated_error": engines[0].get("calibrated_error") if engines else None,
            }
            self._engine_state = (now, state)
        return state

    def _learner(self) -> ForecastLearner:
        """What finished requests taught: re-read from the store every ``_LEARNER_MAX_AGE_SECONDS``, sooner
        after a burst of finished requests."""
        read_at, learner = self._learned
        now = self.clock()
        age = now - read_at
        if age > _LEARNER_MAX_AGE_SECONDS or (
            age > _LEARNER_MIN_AGE_SECONDS and self._finished_since_learned >= _LEARNER_REFRESH_FINISHED
        ):
            self._finished_since_learned = 0
            # Only requests that arrived before the oldest one still running here: among the later
            # ones the short have finished and the long not yet, and learning from them alone would
            # price lengths short after every rise in load.
            with self._running_lock:
                oldest = min((since for since, _, _ in self._running.values()), default=None)
            cutoff = None if oldest is None else max(oldest, now - _LEARNER_COHORT_MAX_SECONDS)
            learner = ForecastLearner(self.store.recent_outcomes(_OUTCOMES_READ, arrived_before=cutoff))
            self._learned = (now, learner)
            self.metrics.set_forecast_quality(learner.error_ratio, learner.interval_coverage, learner.scored_requests)
        return learner

    def _forecast_shape(
        self, shape: RequestShape, arrived: bool = True, running: tuple[tuple[float, int, int], ...] = ()
    ) -> RequestForecast:
        """``arrived``: the request is one of this server's requests in flight (an estimate is not);
        ``running``: this server's requests forecast and not finished (``shape_and_forecast`` with a ticket)."""
        engine = self._engine()
        error = engine.get("calibrated_error")
        period, now = self._step_period, self.clock()
        # Steps each running request has left: its expected steps less those the wall seconds per step
        # of recent requests say it has run (before any finished: as if it had just started).
        left = [(steps - (now - since) / period if period else float(steps), parts) for since, steps, parts in running]
        # Requests that arrived with it and are still being forecast: their length is not known yet, they stay.
        left += [(math.inf, 1)] * max(0, self._in_flight - arrived - len(running))
        mean, engine_now = engine["mean_running_requests"], float(engine["running_requests"])
        if self.sees_every_request:
            # The engine's count is a publish old (seconds when the host is busy); this server's is exact.
            engine_now = min(engine_now, float(max(0, self._in_flight - arrived)))
        return self.forecaster.forecast(
            prompt_tokens=shape.prompt_tokens,
            max_tokens=shape.max_tokens,
            grams_co2e_per_kwh=self.intensity.current().grams_co2e_per_kwh,
            parts=shape.parts,
            # This server's requests in flight are exact; the engine's count (published every half
            # second, all servers' requests) may still hold requests that finished since, and a
            # request arriving as another finishes takes its place (closed-loop clients): a lower
            # bound on the batch, like its recent mean, not more requests besides this one.
            running_requests=max(0, self._in_flight - arrived),
            scales=(engine["prefill_scale"], engine["decode_scale"]),
            relative_error=error if isinstance(error, (int, float)) and math.isfinite(error) else None,
            mean_running_requests=self._recent_batch(mean, engine_now, shape.parts),
            learner=self._learner(),
            step_token_budget=engine.get("step_token_budget"),
            runs_to_max_tokens=shape.runs_to_max_tokens,
            busy_batch=float(mean) if mean is not None else None,
            running=left,
        )

    @staticmethod
    def _recent_batch(mean: float | None, now: float, parts: int) -> float | None:
        """The engine's recent mean running batch, but at most what runs now plus this request (the
        mean remembers load that has gone: after a busier phase, or idle time it does not sample),
        and at least what runs now (load that is rising)."""
        if mean is None:
            return now or None
        return max(now, min(float(mean), now + parts)) or None

    def _shape_and_forecast(
        self, body: Any, chat: bool, arrived: bool = True, ticket: int | None = None
    ) -> tuple[RequestShape, RequestForecast]:
        shape = request_shape(body, chat, self.tokenizer, self.max_model_len)
        # Here, on the one worker thread, so that requests arriving together see each other's lengths.
        with self._running_lock:
            running = tuple(self._running.values())
        forecast = self._forecast_shape(shape, arrived, running)
        if ticket is not None:
            with self._running_lock:
                self._running[ticket] = (self.clock(), forecast.output_tokens.expected, forecast.parts)
        return shape, forecast

    def _budget_view(self) -> tuple[float, float | None]:
        """(grams spent in the window, age of its oldest spend) — store read at most once a second."""
        now = self.clock()
        since = now - self.limits.budget_window_seconds
        read_at, spent = self._spent
        if now - read_at > _SPENT_MAX_AGE_SECONDS:
            spent = self.store.spent_grams(since)
            self._spent, self._spent_since_read = (now, spent), 0.0
        total = spent + self._spent_since_read
        self.metrics.set_spent(total)
        oldest = self.store.oldest_spend_after(since)
        return total, None if oldest is None else now - oldest

    def _decide(self, grams: float, may_wait: bool) -> AdmissionDecision:
        spent, oldest_age = self._budget_view() if self.limits.budget_grams > 0 else (0.0, None)
        intensity = self.intensity.current().grams_co2e_per_kwh
        return decide(self.limits, grams, intensity, spent, oldest_age, may_wait)

    def _count_error(self, error: BaseException) -> None:
        self.metrics.errors.inc()
        if not self._logged_error:
            self._logged_error = True
            logger.error(
                "llmco2: admission failed (%s; counted in llmco2_admission_errors_total; logged once): %r",
                "rejecting: fail-closed" if self.settings.admission_fail_closed else "admitting: fail-open",
                error,
            )


__all__ = ["CarbonService"]
