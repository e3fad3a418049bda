"""The plugin's HTTP transport in vLLM's API server: middleware and routes around ``CarbonService``.

vLLM loads route-adding plugins only when they are named in ``VLLM_PLUGINS`` (its security
posture for endpoint plugins), so this part is on with ``VLLM_PLUGINS=llmco2``:

- every ``POST /v1/completions`` and ``/v1/chat/completions`` gets a forecast when it arrives and
  passes the admission policies (``serve/admission.py``); admitted requests run untouched, with
  ``X-Llmco2-*`` response headers; rejected ones get HTTP 429, ``Retry-After`` and a JSON reason;
- ``GET /v1/carbon/requests/{id}``: forecast and actual of a request, by its response ``id``;
- ``POST /v1/carbon/estimate``: a forecast (and what admission would decide now) without running.

What is decided lives in ``serve/carbon_service.py`` (no vLLM); this module reads and writes ASGI
messages and builds the service from vLLM's engine client.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations at runtime, and
# ``Request`` is imported inside ``build_router`` (fastapi is loaded only in vLLM's API server).
import asyncio
import json
import logging
import math
import uuid
from typing import Any, Callable

from llmco2_vllm.predict.forecast import RequestForecaster
from llmco2_vllm.serve.admission import REJECTED
from llmco2_vllm.serve.carbon_service import CarbonService
from llmco2_vllm.serve.request_parsing import RequestShapeError
from llmco2_vllm.serve.request_record import RESPONSE_ID_PREFIXES, response_id
from llmco2_vllm.settings import Settings

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
DEFERRABLE_HEADER = b"x-llmco2-deferrable"


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
        path = scope.get("path", "") if scope["type"] == "http" else ""
        service: CarbonService | None = None
        if path in RESPONSE_ID_PREFIXES and scope.get("method") == "POST":
            app = scope.get("app")
            service = getattr(getattr(app, "state", None), "llmco2", None)
        if service is None:
            await self.app(scope, receive, send)
            return

        # Buffer the body to forecast it, up to a bound: beyond it the request passes unforecast and the
        # rest streams to vLLM as it arrives (vLLM itself sets no limit on a body).
        limit = service.settings.admission_max_body_bytes
        chunks, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                await self.app(scope, _replay(b"", receive, first=message), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                service.body_not_forecast("body_too_large")
                await self.app(scope, _replay(b"".join(chunks), receive, more_body=more), send)
                return
        body_bytes = b"".join(chunks)
        replay = _replay(body_bytes, receive)

        # vLLM builds the response id (and the engine ids) from X-Request-Id: set one so the id is known here.
        headers = list(scope.get("headers", []))
        header_map = {name.lower(): value for name, value in headers}
        x_request_id = header_map.get(b"x-request-id", b"").decode("latin-1")
        if not x_request_id:
            x_request_id = uuid.uuid4().hex
            headers.append((b"x-request-id", x_request_id.encode()))
            scope = {**scope, "headers": headers}
        request_id = response_id(path, x_request_id)

        try:
            wait_seconds = service.deferral_seconds(
                header_map[DEFERRABLE_HEADER].decode("latin-1") if DEFERRABLE_HEADER in header_map else None
            )
        except ValueError as error:
            start, end = _json_response(400, _error(str(error), "BadRequestError", 400))
            await send(start)
            await send(end)
            return

        # The request counts in the batch others are forecast in from now until its response ends
        # (requests arriving together see each other), except while it waits deferred.
        ticket = service.request_arrived()
        try:
            await self._forecast_admit_and_run(
                service, scope, replay, send, body_bytes, path, request_id, wait_seconds, ticket
            )
        finally:
            service.request_finished(ticket)

    async def _forecast_admit_and_run(
        self, service: CarbonService, scope, replay, send, body_bytes: bytes, path: str, request_id: str,
        wait_seconds: float, ticket: int,
    ) -> None:
        extra_headers: list[tuple[bytes, bytes]] = [(b"x-llmco2-request-id", request_id.encode())]
        try:
            shape, forecast = await service.shape_and_forecast(json.loads(body_bytes), path == CHAT_PATH, ticket)
        except (RequestShapeError, ValueError):
            # Not a request the forecast can read: vLLM validates it and answers (usually 400).
            service.body_not_forecast("unreadable")
            await self.app(scope, replay, send)
            return
        except Exception as error:
            await self._fail(service.admission_failed(error), scope, replay, send, extra_headers)
            return

        try:
            decision, _ = await service.admit(forecast, wait_seconds, ticket)
            await service.record_forecast(request_id, shape, forecast, decision)
        except Exception as error:
            await self._fail(service.admission_failed(error), scope, replay, send, extra_headers)
            return

        if decision.decision == REJECTED:
            retry_after = math.ceil(decision.retry_after_seconds or 60)
            start, end = _json_response(
                429,
                _error(
                    f"llmco2 admission control: {decision.reason}",
                    "CarbonAdmissionRejected",
                    429,
                    llmco2={"request_id": request_id, "admission": decision.to_json(), "forecast": forecast.to_json()},
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

    async def _fail(self, fail_closed: bool, scope, replay, send, extra_headers) -> None:
        if fail_closed:
            start, end = _json_response(
                503,
                _error("llmco2 admission control failed and is configured fail-closed", "ServiceUnavailable", 503),
                [(b"retry-after", b"5")] + extra_headers,
            )
            await send(start)
            await send(end)
            return
        await self.app(scope, replay, send)


def _replay(body: bytes, receive: Callable, first: dict[str, Any] | None = None, more_body: bool = False) -> Callable:
    """An ASGI receive that yields the already-read body once, then the client's own messages (the rest
    of the body when ``more_body``, else a disconnect)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return first or {"type": "http.request", "body": body, "more_body": more_body}
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
            estimate = await service.estimate(json.loads(await raw_request.body()))
        except (RequestShapeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            message = str(error) if isinstance(error, RequestShapeError) else f"the body is not valid JSON: {error}"
            return JSONResponse(_error(message, "BadRequestError", 400), 400)
        return JSONResponse(estimate)

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

    from llmco2_vllm.carbon.providers import build_intensity_provider
    from llmco2_vllm.plugin.entry_points import RUN_DIR_VARIABLE, describe_deployment
    from llmco2_vllm.predict.predictor import load_predictor
    from llmco2_vllm.serve.results_store import RequestResultStore

    settings = Settings.from_env()
    run_dir = os.environ.get(RUN_DIR_VARIABLE)
    if not settings.enabled or not run_dir:
        return None
    vllm_config = engine_client.vllm_config
    deployment = describe_deployment(vllm_config, settings)
    predictor = load_predictor(settings.predictor, deployment, in_server=True, calibration_file=settings.calibration_file)
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
        sees_every_request=_api_servers(vllm_config) == 1 and vllm_config.parallel_config.data_parallel_size == 1,
    )


def _api_servers(vllm_config: Any) -> int | None:
    """vLLM's ``--api-server-count`` (None: this vLLM does not say)."""
    count = getattr(vllm_config.parallel_config, "_api_process_count", None)
    return count if isinstance(count, int) else None


def _tokenizer(engine_client: Any) -> Any:
    try:
        return engine_client.tokenizer  # None with --skip-tokenizer-init: prompts are then counted from characters
    except Exception:
        return None
