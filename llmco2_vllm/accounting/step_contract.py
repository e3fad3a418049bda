"""The step contract: what crosses from vLLM's engine process to the accounting worker.

One scheduler step as plain Python data (no vLLM object inside), built on the engine's forwarding
thread by ``llmco2_vllm.plugin.scheduler_hook.compact_step`` and consumed by
``EnginePipeline.process_steps``. The same messages travel in both worker modes: pickled down a
pipe to the worker process, or through a queue to a worker thread.

Messages, engine to worker: ``("start", deployment_json)`` first, then
``("steps", [CompactStep, ...], engine_dropped_total, [capture error, ...])``, ``("sync", token,
timeout_seconds)`` and ``("stop",)``. Worker to engine: ``("ready", predictor_name)`` or
``("failed", reason)`` after the start, ``("synced", token, report)`` once everything sent
before the sync is accounted.
"""

from __future__ import annotations

from typing import NamedTuple


class CompactStep(NamedTuple):
    """One step in plain Python data: what the worker's ``StepShapeBuilder`` reads."""

    new_requests: list[tuple[str, int, int]]  # (request id, prompt tokens, tokens already computed)
    running_ids: list[str]  # requests scheduled again (vLLM's "cached" requests)
    running_computed: list[int]  # their tokens already computed
    running_output_tokens: list[int] | None  # their output tokens so far (None: vLLM did not say)
    scheduled: dict[str, int]  # tokens scheduled per request in this step
    spec_tokens: dict[str, int]  # speculative draft tokens verified per request
    finished_ids: list[str]  # requests that finished or were aborted by this step
    finished: float  # time.perf_counter() when update_from_output returned
    wall_seconds: float  # step time not overlapped by the previous step (async scheduling overlaps)


__all__ = ["CompactStep"]
