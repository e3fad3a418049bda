"""Capture: real vLLM ``SchedulerOutput`` objects through ``StepShapeBuilder``, and ``StepRecorder``.

The scheduler outputs are vLLM's own dataclasses (``NewRequestData``, ``CachedRequestData``,
``SchedulerOutput``) filled the way vLLM's v1 scheduler fills them, step after step, for the same
requests; the expected prefill/decode/context numbers are worked out by hand in each step.
"""

from __future__ import annotations

import pickle
import types
from typing import Iterable

import numpy as np
import pytest

from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

from llmco2_vllm import capture
from llmco2_vllm.capture import StepRecord, StepRecorder, StepShapeBuilder


# ---- builders of real vLLM objects -------------------------------------------------------------

def new_req(req_id: str, prompt_len: int, num_computed_tokens: int = 0) -> NewRequestData:
    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=list(range(prompt_len)),
        mm_features=[],
        sampling_params=None,
        pooling_params=None,
        block_ids=([0],),
        num_computed_tokens=num_computed_tokens,
        lora_request=None,
    )


def cached(rows: Iterable[tuple[str, int, int]]) -> CachedRequestData:
    """``rows``: (req_id, num_computed_tokens, num_output_tokens)."""
    rows = list(rows)
    return CachedRequestData(
        req_ids=[r[0] for r in rows],
        resumed_req_ids=set(),
        new_token_ids=[],
        all_token_ids={},
        new_block_ids=[None for _ in rows],
        num_computed_tokens=[r[1] for r in rows],
        num_output_tokens=[r[2] for r in rows],
    )


def sched_out(
    new: list[NewRequestData],
    running: CachedRequestData,
    scheduled: dict[str, int],
    spec: dict[str, list[int]] | None = None,
    finished: set[str] | None = None,
) -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=new,
        scheduled_cached_reqs=running,
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens=spec or {},
        scheduled_encoder_inputs={},
        finished_req_ids=finished or set(),
        free_encoder_mm_hashes=[],
    )


def record(output: SchedulerOutput, engine_outputs=None, wall: float = 0.01) -> capture.CompactStep:
    """A step as the worker receives it: compacted from vLLM's real objects, through a pickle round trip."""
    raw = StepRecord(output, engine_outputs or {}, started=0.0, finished=wall, wall_seconds=wall)
    return pickle.loads(pickle.dumps(capture.compact_step(raw)))


def rows(step) -> dict[str, tuple[int, int, int, int]]:
    """request -> (prefill, decode, context, spec) of a built StepShape."""
    s = step.shape
    return {
        rid: (int(s.prefill_tokens[i]), int(s.decode_tokens[i]), int(s.context_tokens[i]), int(s.spec_tokens[i]))
        for i, rid in enumerate(s.request_ids)
    }


# ---- StepShapeBuilder over several steps -------------------------------------------------------

def test_chunked_prefill_prefix_hit_decode_spec_and_finish_across_steps() -> None:
    builder = StepShapeBuilder()

    # Step 1: A is new with a 40-token prompt, budget 32 -> first chunk 32 tokens at context 0.
    #         B is new with a 48-token prompt of which 32 are in the prefix cache -> 48-32 = 16.
    step1 = builder.build(
        record(sched_out([new_req("A", 40), new_req("B", 48, num_computed_tokens=32)], cached([]),
                         {"A": 32, "B": 16}), wall=0.02)
    )
    assert rows(step1) == {"A": (32, 0, 0, 0), "B": (16, 0, 32, 0)}
    assert step1.cached_tokens == {"B": 32}
    assert step1.finished_request_ids == []
    assert step1.shape.wall_seconds == 0.02
    assert len(builder) == 2

    # Step 2: A runs its last chunk: 40 - 32 = 8 prompt tokens at context 32 (no output yet).
    #         B produced its first token in step 1 -> decode 1 at context 48.
    step2 = builder.build(record(sched_out([], cached([("A", 32, 0), ("B", 48, 1)]), {"A": 8, "B": 1})))
    assert rows(step2) == {"A": (8, 0, 32, 0), "B": (0, 1, 48, 0)}
    assert step2.cached_tokens == {}  # only counted on the first schedule

    # Step 3: A decodes at context 40, B at 49; C is new (10-token prompt, all computed now).
    step3 = builder.build(
        record(sched_out([new_req("C", 10)], cached([("A", 40, 1), ("B", 49, 2)]), {"A": 1, "B": 1, "C": 10}))
    )
    assert rows(step3) == {"C": (10, 0, 0, 0), "A": (0, 1, 40, 0), "B": (0, 1, 49, 0)}

    # Step 4: A decodes at 41; C verifies 3 draft tokens: 1 + 3 = 4 decode positions, 3 speculative.
    #         B finishes (stop) in this step's engine outputs (a real EngineCoreOutputs);
    #         FinishReason.STOP == 0, so "is not None" matters, not truthiness.
    outputs = {
        0: EngineCoreOutputs(
            outputs=[
                EngineCoreOutput(request_id="A", new_token_ids=[5]),
                EngineCoreOutput(request_id="B", new_token_ids=[6], finish_reason=FinishReason.STOP),
            ]
        )
    }
    step4 = builder.build(
        record(sched_out([], cached([("A", 41, 2), ("B", 50, 3), ("C", 10, 1)]), {"A": 1, "B": 1, "C": 4},
                         spec={"C": [11, 12, 13]}), outputs)
    )
    assert rows(step4) == {"A": (0, 1, 41, 0), "B": (0, 1, 50, 0), "C": (0, 4, 10, 3)}
    assert step4.shape.total_decode_tokens == 6 and step4.shape.total_prefill_tokens == 0
    assert step4.finished_request_ids == ["B"]
    assert len(builder) == 2  # B's prompt length forgotten

    # Step 5: A was aborted between steps (finished_req_ids); C continues at context 10 + 4 = 14.
    step5 = builder.build(record(sched_out([], cached([("C", 14, 4)]), {"C": 1}, finished={"A"})))
    assert rows(step5) == {"C": (0, 1, 14, 0)}
    assert step5.finished_request_ids == ["A"]
    assert len(builder) == 1


def test_finish_via_fake_engine_outputs_object() -> None:
    builder = StepShapeBuilder()
    builder.build(record(sched_out([new_req("X", 5), new_req("Y", 7)], cached([]), {"X": 5, "Y": 7})))
    item = types.SimpleNamespace
    fake = {3: types.SimpleNamespace(outputs=[item(request_id="X", finish_reason="length"),
                                               item(request_id="Y", finish_reason=None)])}
    step = builder.build(record(sched_out([], cached([("X", 5, 1), ("Y", 7, 1)]), {"X": 1, "Y": 1}), fake))
    assert step.finished_request_ids == ["X"]
    assert len(builder) == 1
    # An empty step (nothing scheduled) still builds, with zero rows.
    empty = builder.build(record(sched_out([], cached([]), {}), None))
    assert empty.shape.num_requests == 0 and empty.finished_request_ids == []


def test_request_whose_first_step_was_never_seen() -> None:
    builder = StepShapeBuilder()
    # D: prompt unknown and no output yet -> every scheduled token is prompt (prefill 16 at ctx 64).
    # E: prompt unknown but 3 outputs already -> its scheduled token is a decode.
    step = builder.build(record(sched_out([], cached([("D", 64, 0), ("E", 200, 3)]), {"D": 16, "E": 1})))
    assert rows(step) == {"D": (16, 0, 64, 0), "E": (0, 1, 200, 0)}
    assert len(builder) == 0  # nothing learnt about prompts


def test_resumed_request_recomputes_prompt_and_outputs() -> None:
    builder = StepShapeBuilder()
    builder.build(record(sched_out([new_req("A", 40)], cached([]), {"A": 40})))
    # Preempted after 5 outputs, resumed with nothing cached: recompute 40 prompt + 4 generated
    # tokens (the 5th output is the next input) -> prefill 40, decode 4, context 0.
    step = builder.build(record(sched_out([], cached([("A", 0, 5)]), {"A": 44})))
    assert rows(step) == {"A": (40, 4, 0, 0)}


def test_unscheduled_cached_request_is_skipped() -> None:
    builder = StepShapeBuilder()
    builder.build(record(sched_out([new_req("A", 4), new_req("B", 4)], cached([]), {"A": 4, "B": 4})))
    step = builder.build(record(sched_out([], cached([("A", 4, 1), ("B", 4, 1)]), {"A": 1})))
    assert step.shape.request_ids == ("A",)


def test_prompt_from_embeddings() -> None:
    builder = StepShapeBuilder()
    req = new_req("P", 0)
    req.prompt_token_ids = None
    req.prompt_embeds = types.SimpleNamespace(shape=(24, 4096))
    step = builder.build(record(sched_out([req], cached([]), {"P": 16})))
    assert rows(step) == {"P": (16, 0, 0, 0)}
    step = builder.build(record(sched_out([], cached([("P", 16, 0)]), {"P": 8})))
    assert rows(step) == {"P": (8, 0, 16, 0)}


def test_forget() -> None:
    builder = StepShapeBuilder()
    builder.build(record(sched_out([new_req("A", 4), new_req("B", 4)], cached([]), {"A": 4, "B": 4})))
    builder.forget(["A", "nope"])
    assert len(builder) == 1


# ---- StepRecorder -----------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # Replace only the module reference capture.py uses, not the global time module.
    monkeypatch.setattr(capture, "time", fake)
    return fake


def test_recorder_capacity_overflow_drops_and_counts(clock: FakeClock) -> None:
    recorder = StepRecorder(capacity=3)
    for i in range(5):
        clock.now = float(i + 1)
        recorder.record(f"out{i}", None, started=float(i))
    assert len(recorder) == 3
    assert recorder.dropped == 2
    drained = recorder.drain()
    assert [r.scheduler_output for r in drained] == ["out0", "out1", "out2"]
    assert len(recorder) == 0
    # Room again: the next one is kept.
    clock.now = 7.0
    recorder.record("out5", None, started=6.5)
    assert recorder.dropped == 2 and len(recorder) == 1


def test_recorder_drain_limit(clock: FakeClock) -> None:
    recorder = StepRecorder(capacity=100)
    for i in range(10):
        clock.now = float(i)
        recorder.record(i, None, started=float(i))
    assert [r.scheduler_output for r in recorder.drain(limit=4)] == [0, 1, 2, 3]
    assert len(recorder) == 6


def test_recorder_wall_seconds_do_not_double_count_overlap(clock: FakeClock) -> None:
    recorder = StepRecorder(capacity=10)
    # Step 1: 10.0 -> 11.0 : 1.0 s.
    clock.now = 11.0
    recorder.record("s1", None, started=10.0)
    # Step 2 was scheduled at 10.5 (async scheduling) and ends at 12.0: only 11.0 -> 12.0 is new: 1.0 s.
    clock.now = 12.0
    recorder.record("s2", None, started=10.5)
    # Step 3 starts after an idle gap, 13.0 -> 13.5 : 0.5 s (the gap is not counted).
    clock.now = 13.5
    recorder.record("s3", None, started=13.0)
    records = recorder.drain()
    walls = [r.wall_seconds for r in records]
    assert walls == pytest.approx([1.0, 1.0, 0.5])
    # Busy time = union of [10, 12] and [13, 13.5] = 2.5 s; naive finished - started would give 3.0.
    assert sum(walls) == pytest.approx(2.5)
    assert [(r.started, r.finished) for r in records] == [(10.0, 11.0), (10.5, 12.0), (13.0, 13.5)]


def test_recorder_dropped_steps_still_advance_the_overlap_clock(clock: FakeClock) -> None:
    recorder = StepRecorder(capacity=1)
    clock.now = 1.0
    recorder.record("kept", None, started=0.0)
    clock.now = 2.0
    recorder.record("dropped", None, started=0.5)  # overlaps, dropped
    recorder.drain()
    clock.now = 3.0
    recorder.record("next", None, started=1.5)  # overlaps the dropped step: only 2.0 -> 3.0 is new
    (last,) = recorder.drain()
    assert last.wall_seconds == pytest.approx(1.0)
    assert recorder.dropped == 1


def test_builder_output_is_a_valid_step_shape() -> None:
    builder = StepShapeBuilder()
    step = builder.build(record(sched_out([new_req("A", 3)], cached([]), {"A": 3})))
    for name in ("prefill_tokens", "decode_tokens", "context_tokens", "spec_tokens"):
        assert getattr(step.shape, name).dtype == np.int64
