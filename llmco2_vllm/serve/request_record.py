"""The ids of a client request, and the one record of a finished engine request.

vLLM gives one client request several ids. The API server answers with a response ``id`` built from
the ``X-Request-Id`` header (the plugin's middleware sets one when the client did not):
``cmpl-<X>`` for completions, ``chatcmpl-<X>`` for chat. The engine runs one request per prompt and
per sample, each under its own engine id, which vLLM makes unique with ``-<8 hex>``:

- completions: ``cmpl-<X>-<prompt index>-<8 hex>``, with n > 1 ``<sample index>_cmpl-<X>-<prompt index>-<8 hex>``;
- chat: ``chatcmpl-<X>-<8 hex>``, with n > 1 ``<sample index>_chatcmpl-<X>-<8 hex>``.

Everything a client can look up is keyed by the response id: the ``X-Llmco2-Request-Id`` header
(``response_id``), the results store and the request log (``client_request_id``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The OpenAI endpoints the plugin forecasts, and the prefix vLLM puts before X-Request-Id in their response id.
RESPONSE_ID_PREFIXES = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}

_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # vLLM appends "-<8 hex>" to the API server's id
_CHILD_PREFIX = re.compile(r"^\d+_")  # parallel sampling (n > 1): "<index>_<id>"
_PROMPT_INDEX = re.compile(r"-\d+$")  # completions: "cmpl-<id>-<prompt index>"


def response_id(path: str, x_request_id: str) -> str:
    """The response ``id`` vLLM answers a request to ``path`` with, given its ``X-Request-Id``."""
    return RESPONSE_ID_PREFIXES[path] + x_request_id


def lookup_ids(given: str) -> tuple[str, ...]:
    """Response ids a client may mean by ``given``: itself, or a bare X-Request-Id under each prefix."""
    return (given, *(prefix + given for prefix in RESPONSE_ID_PREFIXES.values()))


def client_request_id(engine_request_id: str) -> str:
    """The response ``id`` a client sees for one of vLLM's engine request ids.

    ``cmpl-X-0-1a2b3c4d`` and ``2_cmpl-X-1-1a2b3c4d`` -> ``cmpl-X``; ``chatcmpl-X-1a2b3c4d`` ->
    ``chatcmpl-X``. Ids of other shapes (offline ``LLM.generate``) are returned without the engine suffix.
    """
    request_id = _CHILD_PREFIX.sub("", _ENGINE_SUFFIX.sub("", engine_request_id), count=1)
    if request_id.startswith("cmpl-"):
        request_id = _PROMPT_INDEX.sub("", request_id)
    return request_id


@dataclass(frozen=True)
class FinishedRequest:
    """What one finished engine request cost (attributed, summed over its steps).

    The pipeline makes one when the engine reports the request finished; the request log, the
    results store and the pipeline's recent-requests list all read this same record.
    """

    engine_request_id: str
    prefill_tokens: int  # prompt tokens computed (not found in the prefix cache)
    cached_tokens: int
    decode_tokens: int  # output tokens after the first (which the last prefill step makes)
    steps: int
    prefill_energy_j: float
    decode_energy_j: float
    calibrated_prefill_energy_j: float
    calibrated_decode_energy_j: float
    operational_grams: float  # calibrated energy x PUE x grid intensity at each step
    embodied_grams: float
    finished_at: float  # unix seconds
    client_request_id: str = field(init=False)  # from engine_request_id, so the two cannot disagree

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_request_id", client_request_id(self.engine_request_id))

    @property
    def prompt_tokens(self) -> int:
        return self.prefill_tokens + self.cached_tokens

    @property
    def energy_j(self) -> float:
        return self.prefill_energy_j + self.decode_energy_j

    @property
    def calibrated_energy_j(self) -> float:
        return self.calibrated_prefill_energy_j + self.calibrated_decode_energy_j

    @property
    def grams_co2e(self) -> float:
        """Software Carbon Intensity numerator for this request: operational + embodied."""
        return self.operational_grams + self.embodied_grams

    def to_json(self) -> dict[str, Any]:
        """The request log's line (``request_id`` is the engine's id) and the pipeline's report entry."""
        return {
            "request_id": self.engine_request_id,
            "client_request_id": self.client_request_id,
            "finished_at": self.finished_at,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "steps": self.steps,
            "prefill_energy_j": self.prefill_energy_j,
            "decode_energy_j": self.decode_energy_j,
            "energy_j": self.energy_j,
            "calibrated_prefill_energy_j": self.calibrated_prefill_energy_j,
            "calibrated_decode_energy_j": self.calibrated_decode_energy_j,
            "calibrated_energy_j": self.calibrated_energy_j,
            "operational_grams_co2e": self.operational_grams,
            "embodied_grams_co2e": self.embodied_grams,
            "carbon_grams": self.grams_co2e,
        }


__all__ = ["FinishedRequest", "RESPONSE_ID_PREFIXES", "client_request_id", "lookup_ids", "response_id"]
