"""The audit log: one JSON line per finished engine request (``LLMCO2_REQUEST_LOG``)."""

from __future__ import annotations

import json

from llmco2_vllm.serve.request_record import FinishedRequest


class RequestLog:
    """Appends each finished request's record, with the deployment's context (model, GPU, predictor, PUE)."""

    def __init__(self, path: str, context: dict[str, object]) -> None:
        self.path = path
        self.context = context

    def write(self, finished: FinishedRequest) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**finished.to_json(), **self.context}) + "\n")


__all__ = ["RequestLog"]
