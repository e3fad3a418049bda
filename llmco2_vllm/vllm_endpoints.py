"""The plugin's HTTP surface in vLLM's API server: forecasts, per-request results, admission control.

vLLM loads route-adding plugins only when they are named in ``VLLM_PLUGINS`` (its security
posture for endpoint plugins), so this part is on with ``VLLM_PLUGINS=llmco2``:

- every ``POST /v1/completions`` and ``/v1/chat/completions`` gets a forecast when it arrives and
  passes the admission policies (``admission.py``); admitted requests run untouched, with
  ``X-Llmco2-*`` response headers; rejected ones get HTTP 429, ``Retry-After`` and a JSON reason;
- ``GET /v1/carbon/requests/{id}``: forecast and actual of a request, by its response ``id``;
- ``POST /v1/carbon/estimate``: a forecast (and what admission would decide now) without running.

Heavy or blocking work (tokenising, SQLite) runs on one worker thread, never on the event loop.
"""


import asyncio
import concurrent.futures
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .admission import ADMITTED, DEFERRED, REJECTED, AdmissionDecision, AdmissionLimits, decide, parse_deferrable
from .forecast import RequestForecast, RequestForecaster
from .settings import Settings

logger = logging.getLogger("llmco2_vllm")

COMPLETION_PATHS = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}
DEFERRABLE_HEADER = b"x-llmco2-deferrable"
MAX_BODY_BYTES = 64 * 1024 * 1024  # larger bodies pass unforecast (vLLM decides what to do with them)
MAX_TOKEN_COUNT = 10_000_000
_DEFER_POLL_SECONDS = 1.0


class RequestShapeError(ValueError):
    """A request body the forecast cannot read; the message says which field and why."""


@dataclass(frozen=True)
class RequestShape:
    prompt_tokens: int  # per engine request (mean over prompts)
    max_tokens: int
    parts: int  # prompts x n
    prompt_tokens_estimated: bool  # counted from characters: no tokenizer on this server


def _count_text_tokens(text: str, tokenizer: Any) -> tuple[int, bool]:
    if tokenizer is None:
        return max(1, math.ceil(len(text) / 4)), True  # ~4 characters per token in English BPE vocabularies
    return max(1, len(tokenizer.encode(text))), False


def _whole_number(body: dict[str, Any], name: str, default: int | None, minimum: int = 1) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestShapeError(f"{name} must be a whole number, got {value!r}")
    if not minimum <= value <= MAX_TOKEN_COUNT:
        raise RequestShapeError(f"{name} must be between {minimum} and {MAX_TOKEN_COUNT}, got {value}")
    return value


def request_shape(body: Any, chat: bool, tokenizer: Any, max_model_len: int) -> RequestShape:
    """Prompt tokens, output limit and fan-out of an OpenAI completions/chat body, or of an estimate body.

    Accepts ``prompt`` (text, token ids, or a list of either), ``messages`` (chat), or
    ``prompt_tokens`` (a count); ``max_tokens`` (or ``max_completion_tokens``) and ``n``.
    """
    if not isinstance(body, dict):
        raise RequestShapeError("the body must be a JSON object")
    estimated = False
    counts: list[int] = []
    if "prompt_tokens" in body:
        counts = [_whole_number(body, "prompt_tokens", None) or 0]
    elif chat or "messages" in body:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestShapeError("messages must be a non-empty list of {role, content} objects")
        total = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            parts = content if isinstance(content, list) else [content]
            for part in parts:
                text = part.get("text", "") if isinstance(part, dict) else part
                if isinstance(text, str) and text:
                    tokens, guessed = _count_text_tokens(text, tokenizer)
                    total += tokens
                    estimated |= guessed
            total += 4  # role and template markers per message (typical chat templates)
        counts = [total]
    elif "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = prompt
        else:
            raise RequestShapeError("prompt must be text, a list of token ids, or a non-empty list of either")
        for item in prompts:
            if isinstance(item, str):
                tokens, guessed = _count_text_tokens(item, tokenizer)
                counts.append(tokens)
                estimated |= guessed
            elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                counts.append(len(item))
            else:
                raise RequestShapeError("each prompt must be text or a non-empty list of token ids")
    else:
        raise RequestShapeError("give prompt (text or token ids), messages, or prompt_tokens")
    prompt_tokens = max(1, round(sum(counts) / len(counts)))
    n = _whole_number(body, "n", 1) or 1
    if n > 1024:
        raise RequestShapeError(f"n must be at most 1024, got {n}")
    max_tokens = _whole_number(body, "max_completion_tokens", None) or _whole_number(body, "max_tokens", None)
    if max_tokens is None:
        # vLLM's defaults: 16 for completions, the rest of the context for chat.
        max_tokens = max(1, max_model_len - prompt_tokens) if chat or "messages" in body else 16
    if prompt_tokens + max_tokens > max_model_len and not estimated:
        raise RequestShapeError(
            f"prompt_tokens + max_tokens = {prompt_tokens + max_tokens} exceeds the model's context of {max_model_len} tokens"
        )
    return RequestShape(prompt_tokens, max_tokens, n * len(counts), estimated)


class CarbonService:
    """The API server's side of the plugin: forecasts, admission, results (one per API server process)."""

    def __init__(
        self,
        settings: Settings,
        forecaster: RequestForecaster,
        store: Any,
        intensity: Any,
        model_name: str,
        max_model_len: int,
        tokenizer: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from .metrics import AdmissionMetrics

        self.settings = settings
        self.forecaster = forecaster
        self.store = store
        self.intensity = intensity
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.clock = clock
        self.limits = AdmissionLimits.from_settings(settings)
        self.metrics = AdmissionMetrics.for_model(model_name, self.limits.budget_grams)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmco2-api")
        self._engine_state: tuple[float, dict[str, Any]] = (-math.inf, {})
        self._recent: tuple[float, list[tuple[int, int | None]]] = (-math.inf, [])
        self._spent: tuple[float, float] = (-math.inf, 0.0)  # (read at, grams) from the store
        self._spent_since_read = 0.0  # admitted here after that read
        self._logged_error = False

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- forecasts ----------------------------------------------------------------------------
    def _engine(self) -> dict[str, Any]:
        read_at, state = self._engine_state
        now = self.clock()
        if now - read_at > 1.0:
            engines = self.store.engine_states()
            state = {
                "running_requests": sum(int(e.get("running_requests", 0)) for e in engines),
                "prefill_scale": engines[0].get("prefill_scale", 1.0) if engines else 1.0,
                "decode_scale": engines[0].get("decode_scale", 1.0) if engines else 1.0,
                "calibrated_error": engines[0].get("calibrated_error") if engines else None,
            }
            self._engine_state = (now, state)
        return state

    def _recent_outputs(self) -> list[tuple[int, int | None]]:
        read_at, recent = self._recent
        now = self.clock()
        if now - read_at > 10.0:
            recent = self.store.recent_output_tokens()
            self._recent = (now, recent)
        return recent

    def forecast_shape(self, shape: RequestShape) -> RequestForecast:
        """Forecast on the worker thread (reads the store)."""
        engine = self._engine()
        error = engine.get("calibrated_error")
        return self.forecaster.forecast(
            prompt_tokens=shape.prompt_tokens,
            max_tokens=shape.max_tokens,
            grams_co2e_per_kwh=self.intensity.current().grams_co2e_per_kwh,
            parts=shape.parts,
            running_requests=engine["running_requests"],
            recent_outputs=self._recent_outputs(),
            scales=(engine["prefill_scale"], engine["decode_scale"]),
            relative_error=error if isinstance(error, (int, float)) and math.isfinite(error) else None,
        )

    def _shape_and_forecast(self, body: Any, chat: bool) -> tuple[RequestShape, RequestForecast]:
        shape = request_shape(body, chat, self.tokenizer, self.max_model_len)
        return shape, self.forecast_shape(shape)

    async def estimate(self, body: Any) -> tuple[RequestShape, RequestForecast]:
        return await self._run(self._shape_and_forecast, body, False)

    # -- admission ----------------------------------------------------------------------------
    def _budget_view(self) -> tuple[float, float | None]:
        """(grams spent in the window, age of its oldest spend) — store read at most once a second."""
        now = self.clock()
        since = now - self.limits.budget_window_seconds
        read_at, spent = self._spent
        if now - read_at > 1.0:
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

    async def admit(self, forecast: RequestForecast, wait_seconds: float) -> tuple[AdmissionDecision, float]:
        """Decide, waiting while a deferrable request is deferred; returns the decision and the wait."""
        if not self.limits.active:
            self.metrics.decision(ADMITTED, "none")
            return AdmissionDecision(ADMITTED, "none"), 0.0
        started = self.clock()
        deadline = started + wait_seconds
        deferred_by: str | None = None
        try:
            while True:
                may_wait = self.clock() < deadline
                decision = await self._run(self._decide, forecast.grams_co2e, may_wait)
                if decision.decision != DEFERRED:
                    break
                if deferred_by is None:
                    deferred_by = decision.policy
                    self.metrics.decision(DEFERRED, decision.policy)
                    self.metrics.waiting.inc()
                await asyncio.sleep(max(0.01, min(_DEFER_POLL_SECONDS, deadline - self.clock())))
        finally:
            if deferred_by is not None:
                self.metrics.waiting.dec()
        waited = self.clock() - started
        if decision.decision == ADMITTED and deferred_by is not None:
            reason = "deadline reached" if self.clock() >= deadline else "condition cleared"
            decision = AdmissionDecision(ADMITTED, deferred_by, reason, numbers={"waited_seconds": waited})
        self.metrics.decision(decision.decision, decision.policy)
        if decision.decision == ADMITTED:
            self._spent_since_read += forecast.grams_co2e
        logger.log(
            logging.INFO if decision.decision == REJECTED or deferred_by else logging.DEBUG,
            "llmco2: %s by %s policy (%s); forecast %.6g gCO2e, waited %.1f s",
            decision.decision,
            decision.policy,
            decision.reason,
            forecast.grams_co2e,
            waited,
        )
        return decision, waited

    def failed(self, error: BaseException) -> None:
        self.metrics.errors.inc()
        if not self._logged_error:
            self._logged_error = True
            logger.error(
                "llmco2: admission failed (%s; counted in llmco2_admission_errors_total; logged once): %r",
                "rejecting: fail-closed" if self.settings.admission_fail_closed else "admitting: fail-open",
                error,
            )

    async def record_forecast(self, request_id: str, shape: RequestShape, forecast: RequestForecast, decision: AdmissionDecision) -> None:
        payload = forecast.to_json()
        payload["prompt_tokens_estimated"] = shape.prompt_tokens_estimated
        payload["admission"] = decision.to_json()
        # A rejected request keeps its forecast for the client but reserves nothing from the budget.
        reserved = forecast.grams_co2e if decision.decision == ADMITTED else 0.0
        await self._run(self.store.record_forecast, request_id, payload, reserved, shape.parts)

    async def result(self, request_id: str) -> dict[str, Any] | None:
        for candidate in (request_id, f"cmpl-{request_id}", f"chatcmpl-{request_id}"):
            found = await self._run(self.store.get, candidate)
            if found is not None:
                return found
        return None

    async def refresh_gauges_forever(self) -> None:
        """Keep the budget gauge current while no request arrives."""
        while True:
            await asyncio.sleep(5.0)
            try:
                if self.limits.budget_grams > 0:
                    self._spent = (-math.inf, 0.0)
                    await self._run(self._budget_view)
            except Exception as error:
                self.failed(error)


# -- ASGI -------------------------------------------------------------------------------------
def _json_response(status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None):
    body = json.dumps(payload).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or []),
    }
    return start, {"type": "http.response.body", "body": body}


def _error(message: str, kind: str, status: int, **extra: Any) -> dict[str, Any]:
    """vLLM's (OpenAI's) error shape, plus the plugin's details."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status, **extra}}


class AdmissionMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        prefix = COMPLETION_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        service: CarbonService | None = None
        if prefix is not None and scope.get("method") == "POST":
            app = scope.get("app")
            service = getattr(getattr(app, "state", None), "llmco2", None)
        if service is None:
            await self.app(scope, receive, send)
            return

        chunks, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                await self.app(scope, _replay(b"", receive, first=message), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        body_bytes = b"".join(chunks)
        replay = _replay(body_bytes, receive)

        headers = list(scope.get("headers", []))
        header_map = {name.lower(): value for name, value in headers}
        request_id = header_map.get(b"x-request-id", b"").decode("latin-1")
        if not request_id:
            request_id = uuid.uuid4().hex
            headers.append((b"x-request-id", request_id.encode()))
            scope = {**scope, "headers": headers}
        response_id = prefix + request_id

        try:
            wait_seconds = parse_deferrable(
                header_map[DEFERRABLE_HEADER].decode("latin-1") if DEFERRABLE_HEADER in header_map else None,
                service.limits.max_defer_seconds,
            )
        except ValueError as error:
            start, end = _json_response(400, _error(str(error), "BadRequestError", 400))
            await send(start)
            await send(end)
            return

        extra_headers: list[tuple[bytes, bytes]] = [(b"x-llmco2-request-id", response_id.encode())]
        try:
            body = json.loads(body_bytes) if size <= MAX_BODY_BYTES else None
            if body is None:
                raise RequestShapeError("body too large to forecast")
            shape, forecast = await service._run(service._shape_and_forecast, body, prefix == "chatcmpl-")
        except (RequestShapeError, ValueError):
            # Not a request the forecast can read: vLLM validates it and answers (usually 400).
            await self.app(scope, replay, send)
            return
        except Exception as error:
            service.failed(error)
            await self._fail(service, scope, replay, send, extra_headers)
            return

        try:
            decision, _ = await service.admit(forecast, wait_seconds)
            await service.record_forecast(response_id, shape, forecast, decision)
        except Exception as error:
            service.failed(error)
            await self._fail(service, scope, replay, send, extra_headers)
            return

        if decision.decision == REJECTED:
            retry_after = math.ceil(decision.retry_after_seconds or 60)
            start, end = _json_response(
                429,
                _error(
                    f"llmco2 admission control: {decision.reason}",
                    "CarbonAdmissionRejected",
                    429,
                    llmco2={"request_id": response_id, "admission": decision.to_json(), "forecast": forecast.to_json()},
                ),
                [(b"retry-after", str(retry_after).encode())] + extra_headers,
            )
            await send(start)
            await send(end)
            return

        extra_headers += [
            (b"x-llmco2-forecast-energy-j", f"{forecast.energy_j:.6g}".encode()),
            (b"x-llmco2-forecast-grams-co2e", f"{forecast.grams_co2e:.6g}".encode()),
            (b"x-llmco2-admission", f"{decision.decision}; policy={decision.policy}".encode()),
        ]
        await self.app(scope, replay, _with_headers(send, extra_headers))

    async def _fail(self, service: CarbonService, scope, replay, send, extra_headers) -> None:
        service.metrics.decision(REJECTED if service.settings.admission_fail_closed else ADMITTED, "error")
        if service.settings.admission_fail_closed:
            start, end = _json_response(
                503,
                _error("llmco2 admission control failed and is configured fail-closed", "ServiceUnavailable", 503),
                [(b"retry-after", b"5")] + extra_headers,
            )
            await send(start)
            await send(end)
            return
        await self.app(scope, replay, send)


def _replay(body: bytes, receive: Callable, first: dict[str, Any] | None = None) -> Callable:
    """An ASGI receive that yields the already-read body once, then the client's own messages (disconnect)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return first or {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_headers(send: Callable, extra: list[tuple[bytes, bytes]]) -> Callable:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)

    return wrapped


# -- routes and the vLLM endpoint plugin --------------------------------------------------------
def build_router() -> Any:
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse

    router = APIRouter()

    def unavailable() -> JSONResponse:
        return JSONResponse(_error("llmco2 is not running in this server (see its start-up log)", "ServiceUnavailable", 503), 503)

    @router.get("/v1/carbon/requests/{request_id}")
    async def carbon_request(request_id: str, raw_request: Request) -> JSONResponse:
        service: CarbonService | None = getattr(raw_request.app.state, "llmco2", None)
        if service is None:
            return unavailable()
        found = await service.result(request_id)
        if found is None:
            message = (
                f"no carbon result for request {request_id!r}: unknown id, not started yet, or older than "
                f"LLMCO2_REQUEST_RESULTS_RETENTION_SECONDS ({service.settings.request_results_retention_seconds:g} s)"
            )
            return JSONResponse(_error(message, "NotFoundError", 404), 404)
        return JSONResponse(found)

    @router.post("/v1/carbon/estimate")
    async def carbon_estimate(raw_request: Request) -> JSONResponse:
        service: CarbonService | None = getattr(raw_request.app.state, "llmco2", None)
        if service is None:
            return unavailable()
        try:
            body = json.loads(await raw_request.body())
            shape, forecast = await service.estimate(body)
        except (RequestShapeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            message = str(error) if isinstance(error, RequestShapeError) else f"the body is not valid JSON: {error}"
            return JSONResponse(_error(message, "BadRequestError", 400), 400)
        now = await service._run(service._decide, forecast.grams_co2e, False)
        deferrable = await service._run(service._decide, forecast.grams_co2e, True)
        return JSONResponse(
            {
                "object": "carbon.estimate",
                "model": service.model_name,
                "prompt_tokens_estimated": shape.prompt_tokens_estimated,
                "forecast": forecast.to_json(),
                "admission": now.to_json(),
                "admission_if_deferrable": deferrable.to_json(),
            }
        )

    return router


class Llmco2Endpoints:
    """vLLM endpoint plugin (entry point ``vllm.endpoint_plugins``; enable with ``VLLM_PLUGINS=llmco2``)."""

    name = "llmco2"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        if not Settings.from_env().enabled:
            return
        app.include_router(build_router())
        app.add_middleware(AdmissionMiddleware)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:
            return
        try:
            service = build_carbon_service(engine_client)
        except Exception:
            logger.exception("llmco2: carbon endpoints not started; vLLM serves without them")
            return
        if service is not None:
            state.llmco2 = service
            state.llmco2_refresher = asyncio.get_running_loop().create_task(service.refresh_gauges_forever())


def build_carbon_service(engine_client: Any) -> CarbonService | None:
    import os

    from .grid_intensity import build_intensity_provider
    from .predictor import load_predictor
    from .request_results import RequestResultStore
    from .vllm_plugin import RUN_DIR_VARIABLE, describe_deployment

    settings = Settings.from_env()
    run_dir = os.environ.get(RUN_DIR_VARIABLE)
    if not settings.enabled or not run_dir:
        return None
    vllm_config = engine_client.vllm_config
    deployment = describe_deployment(vllm_config, settings)
    predictor = load_predictor(
        settings.predictor, deployment.model, deployment.hardware, deployment.pipeline_parallel, in_server=True
    )
    forecaster = RequestForecaster(
        predictor,
        deployment.hardware.num_gpus,
        settings.embodied().grams_per_gpu_second,
        settings.pue,
    )
    return CarbonService(
        settings,
        forecaster,
        RequestResultStore.in_directory(run_dir),
        build_intensity_provider(settings),
        deployment.model_name,
        int(vllm_config.model_config.max_model_len),
        _tokenizer(engine_client),
    )


def _tokenizer(engine_client: Any) -> Any:
    try:
        return engine_client.tokenizer  # None with --skip-tokenizer-init: prompts are then counted from characters
    except Exception:
        return None
