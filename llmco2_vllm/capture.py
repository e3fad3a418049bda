"""Capture: what each scheduler step scheduled, recorded on the scheduler thread in O(1).

``StepRecorder.record`` only appends references to a bounded deque (no iteration, no locks, no
allocation beyond one tuple). ``compact_step`` copies what the plugin needs out of vLLM's objects
into plain lists (``CompactStep``: cheap to pickle to the worker process), and
``StepShapeBuilder`` turns that into ``StepShape``. The objects referenced are vLLM's per-step
``SchedulerOutput`` and engine outputs, which vLLM builds anew every step and does not change
after the step's ``update_from_output``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import numpy as np

from .step_shape import StepShape


class StepRecord(NamedTuple):
    """Raw references of one step, as the scheduler thread hands them over (a tuple: cheapest to build)."""

    scheduler_output: Any  # vllm.v1.core.sched.output.SchedulerOutput
    engine_outputs: Any  # dict[int, EngineCoreOutputs] returned by update_from_output
    started: float  # time.perf_counter() at schedule() entry
    finished: float  # time.perf_counter() when update_from_output returned
    wall_seconds: float  # step time not overlapped by the previous step (async scheduling overlaps)


class CompactStep(NamedTuple):
    """One step in plain Python data: what ``StepShapeBuilder`` reads, with no vLLM object inside."""

    new_requests: list[tuple[str, int, int]]  # (request id, prompt tokens, tokens already computed)
    running_ids: list[str]  # requests scheduled again (vLLM's "cached" requests)
    running_computed: list[int]  # their tokens already computed
    running_output_tokens: list[int] | None  # their output tokens so far (None: vLLM did not say)
    scheduled: dict[str, int]  # tokens scheduled per request in this step
    spec_tokens: dict[str, int]  # speculative draft tokens verified per request
    finished_ids: list[str]  # requests that finished or were aborted by this step
    finished: float  # time.perf_counter() when update_from_output returned
    wall_seconds: float


def compact_step(record: StepRecord) -> CompactStep:
    """Copy what the plugin needs out of vLLM's step objects (vLLM-version-specific field names)."""
    output = record.scheduler_output
    running = output.scheduled_cached_reqs
    spec = output.scheduled_spec_decode_tokens
    finished = list(output.finished_req_ids or ())
    for outputs in (record.engine_outputs or {}).values():
        finished += [item.request_id for item in getattr(outputs, "outputs", ()) if item.finish_reason is not None]
    return CompactStep(
        [(new.req_id, _prompt_length(new), int(new.num_computed_tokens)) for new in output.scheduled_new_reqs],
        list(running.req_ids),
        list(running.num_computed_tokens),
        list(running.num_output_tokens) if running.num_output_tokens else None,
        dict(output.num_scheduled_tokens),
        {request_id: len(tokens) for request_id, tokens in spec.items()} if spec else {},
        finished,
        record.finished,
        record.wall_seconds,
    )


class StepRecorder:
    """Bounded hand-over from the scheduler thread to the worker; counts what it must drop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: deque[StepRecord] = deque()
        self._last_finished = 0.0
        self.dropped = 0  # only the scheduler thread writes it

    def record(self, scheduler_output: Any, engine_outputs: Any, started: float) -> None:
        finished = time.perf_counter()
        last = self._last_finished
        self._last_finished = finished
        if len(self._records) >= self.capacity:
            self.dropped += 1
            return
        wall = finished - (started if started > last else last)
        self._records.append(StepRecord(scheduler_output, engine_outputs, started, finished, wall))

    def put(self, step: CompactStep) -> None:
        """Queue an already compacted step (the worker process, fed by the engine's forwarder)."""
        if len(self._records) >= self.capacity:
            self.dropped += 1
            return
        self._records.append(step)  # type: ignore[arg-type]

    def drain(self, limit: int = 4096) -> list[StepRecord]:
        """Take up to ``limit`` records (worker thread); deque.popleft is atomic against append."""
        records = []
        while self._records and len(records) < limit:
            records.append(self._records.popleft())
        return records

    def __len__(self) -> int:
        return len(self._records)


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
        scheduled = step.scheduled
        spec_tokens = step.spec_tokens
        ids: list[str] = []
        rows: list[tuple[int, int, int, int]] = []
        cached: dict[str, int] = {}

        def add(request_id: str, context: int, prompt: int | None, has_output: bool) -> None:
            count = int(scheduled.get(request_id, 0))
            if count <= 0:
                return
            if prompt is None:
                # Prompt length unknown (its first step was dropped): vLLM tells whether outputs exist.
                prefill = 0 if has_output else count
            else:
                prefill = min(count, max(0, prompt - context))
            ids.append(request_id)
            rows.append((prefill, count - prefill, context, spec_tokens.get(request_id, 0)))

        for request_id, prompt, computed in step.new_requests:
            self._prompt_tokens[request_id] = prompt
            if computed:
                cached[request_id] = computed
            add(request_id, computed, prompt, False)

        output_tokens = step.running_output_tokens
        for i, request_id in enumerate(step.running_ids):
            has_output = bool(output_tokens[i]) if output_tokens else False
            add(request_id, int(step.running_computed[i]), self._prompt_tokens.get(request_id), has_output)

        finished = step.finished_ids
        for request_id in finished:
            self._prompt_tokens.pop(request_id, None)

        table = np.array(rows, dtype=np.int64).reshape(len(rows), 4)
        shape = StepShape(
            tuple(ids), table[:, 0], table[:, 1], table[:, 2], table[:, 3], wall_seconds=step.wall_seconds
        )
        return CapturedStep(shape, cached, finished)

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._prompt_tokens.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._prompt_tokens)


def _prompt_length(new_request: Any) -> int:
    if new_request.prompt_token_ids is not None:
        return len(new_request.prompt_token_ids)
    embeds = getattr(new_request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0
