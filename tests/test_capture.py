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

from llmco2_vllm.accounting.step_contract import CompactStep
from llmco2_vllm.accounting.step_shapes import StepShapeBuilder
from llmco2_vllm.plugin import scheduler_hook
from llmco2_vllm.plugin.scheduler_hook import StepRecord, StepRecorder, compact_step
from llmco2_vllm.predict.step_shape import StepShape

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


def record(output: SchedulerOutput, engine_outputs=None, wall: float = 0.01) -> CompactStep:
    """A step as the worker receives it: compacted from vLLM's real objects, through a pickle round trip."""
    raw = StepRecord(output, engine_outputs or {}, started=0.0, finished=wall, wall_seconds=wall)
    return pickle.loads(pickle.dumps(compact_step(raw)))


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
    # Replace only the module reference scheduler_hook.py uses, not the global time module.
    monkeypatch.setattr(scheduler_hook, "time", fake)
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
    # The builder skips StepShape's checks (StepShape.unchecked): the checked constructor accepts it.
    shape = step.shape
    checked = StepShape(shape.request_ids, shape.prefill_tokens, shape.decode_tokens, shape.context_tokens,
                        shape.spec_tokens, shape.wall_seconds)
    assert (checked.request_ids, checked.wall_seconds) == (shape.request_ids, shape.wall_seconds)
    for name in ("prefill_tokens", "decode_tokens", "context_tokens", "spec_tokens"):
        np.testing.assert_array_equal(getattr(checked, name), getattr(shape, name))


# ---- the array builder against the per-request rules it implements ---------------------------------

class ReferenceBuilder:
    """The classification rules one request at a time, as ``StepShapeBuilder`` documents them."""

    def __init__(self) -> None:
        self.prompts: dict[str, int] = {}

    def build(self, step: CompactStep) -> tuple[list[tuple[str, int, int, int, int]], dict[str, int], list[str]]:
        rows, cached = [], {}

        def add(request_id: str, context: int, prompt: int | None, has_output: bool) -> None:
            count = step.scheduled.get(request_id, 0)
            if count <= 0:
                return
            if prompt is None:
                prefill = 0 if has_output else count
            else:
                prefill = min(count, max(0, prompt - context))
            rows.append((request_id, prefill, count - prefill, context, step.spec_tokens.get(request_id, 0)))

        for request_id, prompt, computed in step.new_requests:
            self.prompts[request_id] = prompt
            if computed:
                cached[request_id] = computed
            add(request_id, computed, prompt, False)
        outputs = step.running_output_tokens
        for i, request_id in enumerate(step.running_ids):
            add(request_id, step.running_computed[i], self.prompts.get(request_id), bool(outputs[i]) if outputs else False)
        for request_id in step.finished_ids:
            self.prompts.pop(request_id, None)
        return rows, cached, list(step.finished_ids)


def random_steps(rng: np.random.Generator, count: int):
    """A stream of steps: prefix-cache hits, chunked prefill, decode with speculative tokens,
    requests listed but not scheduled, requests whose first step was never seen, finishes."""
    running: dict[str, list[int]] = {}  # id -> [prompt, computed, outputs]
    serial = 0
    for _ in range(count):
        new, scheduled, spec = [], {}, {}
        for _ in range(int(rng.integers(0, 4))):
            serial += 1
            request_id, prompt = f"n{serial}", int(rng.integers(1, 3000))
            computed = int(rng.integers(0, prompt)) if rng.random() < 0.3 else 0
            new.append((request_id, prompt, computed))
            scheduled[request_id] = int(rng.integers(1, prompt - computed + 1))
            running[request_id] = [prompt, computed, 0]
        if rng.random() < 0.2:  # joined before the plugin saw it: prompt unknown, maybe with outputs
            serial += 1
            running[f"u{serial}"] = [-1, int(rng.integers(0, 5000)), int(rng.integers(0, 3))]
        new_ids = {request[0] for request in new}
        running_ids = [request_id for request_id in running if request_id not in new_ids]
        for request_id in running_ids:
            prompt, computed, outputs = running[request_id]
            if rng.random() < 0.05:
                continue  # listed, nothing scheduled
            remaining = prompt - computed
            if remaining > 0:
                scheduled[request_id] = int(rng.integers(1, remaining + 1)) + (int(rng.integers(0, 3)) if rng.random() < 0.2 else 0)
            else:
                scheduled[request_id] = 1 + (int(rng.integers(0, 4)) if rng.random() < 0.2 else 0)
                if scheduled[request_id] > 1:
                    spec[request_id] = scheduled[request_id] - 1
        step = CompactStep(
            new,
            running_ids,
            [running[i][1] for i in running_ids],
            None if rng.random() < 0.1 else [running[i][2] for i in running_ids],
            scheduled,
            spec,
            [],
            0.0,
            float(rng.random()),
        )
        for request_id, tokens in scheduled.items():
            running[request_id][1] += tokens
            running[request_id][2] += 1 if running[request_id][1] >= running[request_id][0] else 0
        finished = [i for i in running if rng.random() < 0.08]
        for request_id in finished:
            del running[request_id]
        yield step._replace(finished_ids=finished)


def test_array_builder_equals_the_per_request_rules_on_random_steps() -> None:
    rng = np.random.default_rng(99)
    builder, reference = StepShapeBuilder(), ReferenceBuilder()
    kinds = {"prefill": 0, "decode": 0, "both": 0, "unknown": 0, "skipped": 0, "spec": 0}
    for step in random_steps(rng, 400):
        built = builder.build(step)
        rows, cached, finished = reference.build(step)
        shape = built.shape
        assert shape.request_ids == tuple(row[0] for row in rows)
        for column, name in enumerate(("prefill_tokens", "decode_tokens", "context_tokens", "spec_tokens"), start=1):
            array = getattr(shape, name)
            assert array.dtype == np.int64 and array.shape == (len(rows),)
            assert array.tolist() == [row[column] for row in rows], name
        assert built.cached_tokens == cached and built.finished_request_ids == finished
        assert shape.wall_seconds == step.wall_seconds
        assert len(builder) == len(reference.prompts)
        kinds["prefill"] += sum(1 for row in rows if row[1] and not row[2])
        kinds["decode"] += sum(1 for row in rows if row[2] and not row[1])
        kinds["both"] += sum(1 for row in rows if row[1] and row[2])
        kinds["spec"] += sum(1 for row in rows if row[4])
        kinds["unknown"] += sum(1 for i in step.running_ids if i not in reference.prompts and i.startswith("u"))
        kinds["skipped"] += sum(1 for i in step.running_ids if i not in step.scheduled)
    assert all(count > 10 for count in kinds.values()), kinds
