"""The scheduler hook: records every vLLM step on the scheduler thread in O(1).

``capturing_scheduler`` subclasses whatever scheduler vLLM picked; its ``update_from_output``
hands the step's objects to ``StepRecorder.record``, which only appends references to a bounded
deque (no iteration, no locks, no allocation beyond one tuple). The forwarding thread later turns
each record into the step contract with ``StepCompactor`` (over ``compact_step``) — the only reader
of vLLM's step objects (vLLM-version-specific field names). vLLM builds those objects anew every
step and does not change them after the step's ``update_from_output``.

Async scheduling and pipeline parallel keep steps in flight: when ``update_from_output`` of step N
finishes a request, step N+1 was already scheduled with it, and the GPU computes its positions
(vLLM discards the result). ``StepCompactor`` holds such a finish back until the records of the
steps in flight have passed, so those positions count for the request and it finishes once.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from typing import Any, Callable, NamedTuple

from llmco2_vllm.accounting.step_contract import CompactStep

logger = logging.getLogger(__name__)


class StepRecord(NamedTuple):
    """Raw references of one step, as the scheduler thread hands them over (a tuple: cheapest to build)."""

    scheduler_output: Any  # vllm.v1.core.sched.output.SchedulerOutput
    engine_outputs: Any  # dict[int, EngineCoreOutputs] returned by update_from_output
    started: float  # time.perf_counter() at schedule() entry
    finished: float  # time.perf_counter() when update_from_output returned
    wall_seconds: float  # step time not overlapped by the previous step (async scheduling overlaps)
    in_flight: int = 0  # steps scheduled but not yet updated when this one was updated (async, PP)


class StepRecorder:
    """Bounded hand-over from the scheduler thread to the forwarder; counts what it must drop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: deque[StepRecord] = deque()
        self._last_finished = 0.0
        self.dropped = 0  # only the scheduler thread writes it

    def record(self, scheduler_output: Any, engine_outputs: Any, started: float, in_flight: int = 0) -> None:
        finished = time.perf_counter()
        last = self._last_finished
        self._last_finished = finished
        if len(self._records) >= self.capacity:
            self.dropped += 1
            return
        wall = finished - (started if started > last else last)
        self._records.append(StepRecord(scheduler_output, engine_outputs, started, finished, wall, in_flight))

    def drain(self, limit: int = 4096) -> list[StepRecord]:
        """Take up to ``limit`` records (forwarding thread); deque.popleft is atomic against append."""
        records = []
        while self._records and len(records) < limit:
            records.append(self._records.popleft())
        return records

    def __len__(self) -> int:
        return len(self._records)


def compact_step(record: StepRecord) -> CompactStep:
    """Copy what the plugin needs out of vLLM's step objects (finishes as vLLM reported them)."""
    return _compact(record, list(record.scheduler_output.finished_req_ids or ()) + engine_finished_ids(record))


def engine_finished_ids(record: StepRecord) -> list[str]:
    """Requests this step's ``update_from_output`` finished (stop, length, abort)."""
    finished: list[str] = []
    for outputs in (record.engine_outputs or {}).values():
        # FinishReason.STOP == 0: "is not None", not truthiness.
        finished += [item.request_id for item in getattr(outputs, "outputs", ()) if item.finish_reason is not None]
    return finished


class StepCompactor:
    """``compact_step`` over consecutive records (forwarding thread), holding back finishes that
    steps still in flight would otherwise follow (see the module docstring)."""

    def __init__(self) -> None:
        self._held: list[list[Any]] = []  # [records still to pass, request ids], oldest first

    def compact(self, record: StepRecord) -> CompactStep:
        finished = list(record.scheduler_output.finished_req_ids or ())
        if self._held:
            for held in self._held:
                held[0] -= 1
            while self._held and self._held[0][0] <= 0:
                finished += self._held.pop(0)[1]
        engine_finished = engine_finished_ids(record)
        if engine_finished and record.in_flight > 0:
            self._held.append([record.in_flight, engine_finished])
        else:
            finished += engine_finished
        return _compact(record, finished)

    def release(self) -> list[str]:
        """Every held finish (the engine stops, or a caller wants the totals now)."""
        released = [request_id for _, ids in self._held for request_id in ids]
        self._held.clear()
        return released

    def __len__(self) -> int:
        return sum(len(ids) for _, ids in self._held)


def _compact(record: StepRecord, finished: list[str]) -> CompactStep:
    output = record.scheduler_output
    running = output.scheduled_cached_reqs
    spec = output.scheduled_spec_decode_tokens
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


def _prompt_length(new_request: Any) -> int:
    if new_request.prompt_token_ids is not None:
        return len(new_request.prompt_token_ids)
    embeds = getattr(new_request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


@functools.cache
def capturing_scheduler(base: type, start_accounting: Callable[[Any], Any]) -> type:
    """A subclass of vLLM's chosen scheduler that records every step for the plugin.

    ``start_accounting(vllm_config)`` returns the engine's ``StepForwarder`` (whose ``recorder``
    the hook fills) or raises, in which case vLLM runs without the plugin.
    """

    class CapturingScheduler(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._llmco2_started: dict[int, float] = {}
            self._llmco2 = self._llmco2_recorder = None
            try:
                self._llmco2 = start_accounting(self.vllm_config)
                self._llmco2_recorder = self._llmco2.recorder
            except Exception:
                logger.exception("llmco2: could not start; vLLM runs without the plugin")

        def schedule(self, *args: Any, **kwargs: Any):
            started = time.perf_counter()
            output = super().schedule(*args, **kwargs)
            if self._llmco2 is not None:
                self._llmco2_started[id(output)] = started
            return output

        def update_from_output(self, scheduler_output, model_runner_output):
            result = super().update_from_output(scheduler_output, model_runner_output)
            recorder = self._llmco2_recorder
            if recorder is not None:
                try:
                    started = self._llmco2_started.pop(id(scheduler_output), None)
                    if started is not None:
                        recorder.record(scheduler_output, result, started, len(self._llmco2_started))
                    if len(self._llmco2_started) > 64:  # outputs vLLM never updated (aborted steps)
                        self._llmco2_started.clear()
                except Exception:
                    pass  # never raise into vLLM's loop; the worker counts what is missing
            return result

        def shutdown(self) -> None:
            if self._llmco2 is not None:
                try:
                    self._llmco2.stop()
                except Exception:
                    logger.exception("llmco2: error while stopping")
            super().shutdown()

    CapturingScheduler.__name__ = CapturingScheduler.__qualname__ = f"Llmco2{base.__name__}"
    return CapturingScheduler


__all__ = ["StepRecord", "StepRecorder", "StepCompactor", "compact_step", "engine_finished_ids", "capturing_scheduler"]
