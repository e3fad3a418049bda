"""Step shapes: the worker turns each ``CompactStep`` into a ``StepShape`` (prefill vs decode tokens per request).

``StepShapeBuilder`` remembers each running request's prompt length (vLLM sends it only in the
request's first step) to classify every scheduled token as prefill or decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Iterable

import numpy as np

from llmco2_vllm.accounting.step_contract import CompactStep
from llmco2_vllm.predict.step_shape import StepShape


@dataclass(frozen=True)
class CapturedStep:
    """A step as the pipeline consumes it."""

    shape: StepShape
    cached_tokens: dict[str, int]  # prefix-cache hits of requests first scheduled in this step
    finished_request_ids: list[str]  # requests that finished or were aborted by this step


class StepShapeBuilder:
    """Classifies each scheduled token as prefill or decode and tracks prompt lengths (worker thread)."""

    def __init__(self) -> None:
        self._prompt_tokens: dict[str, int] = {}

    def build(self, step: CompactStep) -> CapturedStep:
        """One step's shape. Per request only dict look-ups run (``map`` of ``dict.get``, in C); the
        classification is array arithmetic: this runs for every engine step."""
        prompts = self._prompt_tokens
        new = step.new_requests
        running_ids = step.running_ids
        cached: dict[str, int] = {}
        for request_id, prompt, computed in new:
            prompts[request_id] = prompt
            if computed:
                cached[request_id] = computed
        n_new, n = len(new), len(new) + len(running_ids)
        # Lists first (``in`` on them is a C loop), one array each.
        prompt_list = list(map(prompts.get, running_ids, repeat(-1)))
        if new:
            ids = [request[0] for request in new] + running_ids
            prompt_list = [request[1] for request in new] + prompt_list
            context_list = [request[2] for request in new] + list(step.running_computed)
        else:
            ids, context_list = running_ids, step.running_computed
        count_list = list(map(step.scheduled.get, ids, repeat(0)))
        count = np.fromiter(count_list, dtype=np.int64, count=n)
        prompt = np.fromiter(prompt_list, dtype=np.int64, count=n)
        context = np.fromiter(context_list, dtype=np.int64, count=n)
        # A known prompt: the scheduled tokens up to its end are prefill (chunked prefill, a
        # prefix-cache hit, a resumed request recomputing its outputs too).
        prefill = np.minimum(count, np.maximum(prompt - context, 0))
        if -1 in prompt_list:
            # Prompt length unknown (its first step was never seen): vLLM tells whether outputs exist.
            output_tokens = step.running_output_tokens
            has_output = np.zeros(n, dtype=bool)
            if output_tokens:
                has_output[n_new:] = np.array(output_tokens) > 0
            prefill = np.where(prompt < 0, np.where(has_output, 0, count), prefill)
        if step.spec_tokens:
            spec = np.array(list(map(step.spec_tokens.get, ids, repeat(0))), dtype=np.int64)
        else:
            spec = np.zeros(n, dtype=np.int64)
        if count_list and min(count_list) <= 0:  # vLLM listed a request but scheduled nothing for it
            scheduled_now = count > 0
            ids = [request_id for request_id, scheduled in zip(ids, count_list) if scheduled > 0]
            count, prefill, context, spec = count[scheduled_now], prefill[scheduled_now], context[scheduled_now], spec[scheduled_now]

        finished = step.finished_ids
        for request_id in finished:
            prompts.pop(request_id, None)

        shape = StepShape.unchecked(tuple(ids), prefill, count - prefill, context, spec, step.wall_seconds)
        return CapturedStep(shape, cached, finished)

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._prompt_tokens.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._prompt_tokens)
