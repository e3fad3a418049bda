"""vLLM's real schedulers driven without a model: the plugin's hook around them, a simulated model runner.

``build_scheduler`` builds vLLM's own ``Scheduler`` or ``AsyncScheduler`` (real KV-cache manager,
real block pool) from vLLM's config classes, the way vLLM's own scheduler tests do
(``tests/v1/core/utils.py`` ``create_scheduler``, not shipped in the wheel), and wraps it with
``capturing_scheduler`` exactly as the plugin's ``register`` does for ``vllm serve``.
``drive`` then runs EngineCore's loop (``step`` or, with async scheduling or pipeline parallel,
``step_with_batch_queue``) with ``SimulatedModelRunner`` in place of the GPU: it samples tokens,
EOS and accepted/rejected draft tokens. Along the way the driver reads vLLM's own state changes
(tokens lost to preemption, drafts rejected by ``update_from_output``), which the tests compare
with the plugin's accounting.

Runs against whichever vLLM is importable: the installed one, or vLLM 0.33's Python sources on
``PYTHONPATH`` (``tests/test_vllm_schedulers.py`` runs itself that way in a subprocess).
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from llmco2_vllm.plugin.scheduler_hook import StepRecorder, capturing_scheduler

EOS_TOKEN_ID = 2  # the tiny Llama's (llmco2_vllm.dev.tiny_model)
BLOCK_SIZE = 16


@dataclass(frozen=True)
class SchedulerCase:
    """One scheduler configuration; the defaults are a small synchronous engine."""

    async_scheduling: bool = False
    pipeline_parallel: int = 1
    num_blocks: int = 1024  # KV-cache blocks of BLOCK_SIZE tokens: small values force preemption
    max_num_batched_tokens: int = 256  # a prompt longer than this is chunked
    max_num_seqs: int = 16
    prefix_caching: bool = False
    spec_tokens: int = 0  # draft tokens per step (speculative decoding)
    max_model_len: int = 1024


class RecordingAccounting:
    """What ``start_accounting`` returns to the hook (a ``StepForwarder`` in vLLM): the recorder only."""

    started: list["RecordingAccounting"] = []

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        self.recorder = StepRecorder(capacity=1_000_000)
        self.stopped = False
        RecordingAccounting.started.append(self)

    def stop(self) -> None:
        self.stopped = True


def start_recording(vllm_config: Any) -> RecordingAccounting:
    return RecordingAccounting(vllm_config)


def vllm_base_scheduler(scheduler_config: Any) -> type:
    """vLLM's own choice of scheduler class, even when the plugin's ``register`` already wrapped it."""
    from vllm.config.scheduler import SchedulerConfig

    select = SchedulerConfig.get_scheduler_cls
    return getattr(select, "__wrapped__", select)(scheduler_config)


def build_scheduler(model_dir: str, case: SchedulerCase) -> Any:
    import torch
    from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(
        model=str(model_dir), dtype="float32", seed=0, skip_tokenizer_init=True, max_model_len=case.max_model_len
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=case.max_num_seqs,
        max_num_batched_tokens=case.max_num_batched_tokens,
        max_model_len=case.max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
    )
    cache_config = CacheConfig(block_size=BLOCK_SIZE, cache_dtype="auto", enable_prefix_caching=case.prefix_caching)
    speculative_config = (
        SpeculativeConfig(method="ngram", num_speculative_tokens=case.spec_tokens, prompt_lookup_min=2, prompt_lookup_max=4)
        if case.spec_tokens
        else None
    )
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        parallel_config=ParallelConfig(pipeline_parallel_size=case.pipeline_parallel),
        speculative_config=speculative_config,
    )
    # vLLM's CPU platform turns async scheduling off while the config is checked; a GPU leaves it on
    # (its default). Set afterwards, as the GPU platform leaves it (the n-gram proposer is only a
    # stand-in for a GPU drafter here: the scheduler sees draft token ids, not how they were made).
    scheduler_config.async_scheduling = case.async_scheduling
    cache_config.num_gpu_blocks = case.num_blocks
    kv_cache_config = KVCacheConfig(
        num_blocks=case.num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=32, dtype=torch.float32))
        ],
    )
    base = vllm_base_scheduler(scheduler_config)
    scheduler_cls = capturing_scheduler(base, start_recording)
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
        log_stats=True,
    )


def make_requests(
    count: int, rng: random.Random, prompt_tokens: tuple[int, int], max_tokens: tuple[int, int], shared_prefix: int = 0
) -> list[Any]:
    """Real vLLM ``Request`` objects with block hashes (prefix caching); ``shared_prefix`` tokens in common."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
    prefix = [rng.randrange(3, 500) for _ in range(shared_prefix)]
    requests = []
    for index in range(count):
        length = rng.randint(*prompt_tokens)
        prompt = (prefix + [rng.randrange(3, 500) for _ in range(length)])[: max(length, 1)]
        sampling = SamplingParams(max_tokens=rng.randint(*max_tokens), ignore_eos=False)
        sampling.update_from_generation_config({}, EOS_TOKEN_ID)
        requests.append(
            Request(
                request_id=f"req-{index}-{rng.getrandbits(32):08x}",
                prompt_token_ids=prompt,
                sampling_params=sampling,
                pooling_params=None,
                block_hasher=hasher,
            )
        )
    return requests


class SimulatedModelRunner:
    """Stands in for the GPU model runner: samples tokens for each scheduled request.

    A request in the middle of its prompt (a prefill chunk) samples nothing, as in vLLM's runner.
    Otherwise it samples ``1 + accepted`` tokens, ``accepted`` of the step's draft tokens drawn at
    random; a request emits EOS with probability ``eos_probability`` per token (else it runs to
    ``max_tokens``). Draft tokens for the next step are proposed in ``propose_drafts``.
    """

    def __init__(self, rng: random.Random, spec_tokens: int, eos_probability: float = 0.05) -> None:
        self.rng = rng
        self.spec_tokens = spec_tokens
        self.eos_probability = eos_probability
        self.executed: dict[str, int] = defaultdict(int)  # token positions computed per request
        self.chunked: set[str] = set()  # requests whose prompt ran in several steps
        self.draft_tokens_verified = 0
        self.draft_tokens_accepted = 0

    def _token(self) -> int:
        return EOS_TOKEN_ID if self.rng.random() < self.eos_probability else self.rng.randrange(3, 500)

    def execute(self, scheduler: Any, output: Any) -> Any:
        """Right after ``schedule()``, as the GPU starts the step (the request objects say what is a chunk)."""
        from vllm.v1.outputs import ModelRunnerOutput

        req_ids = list(output.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            self.executed[req_id] += output.num_scheduled_tokens[req_id]
            if scheduler.requests[req_id].is_prefill_chunk:
                self.chunked.add(req_id)
                sampled.append([])
                continue
            drafts = output.scheduled_spec_decode_tokens.get(req_id, ())
            accepted = self.rng.randint(0, len(drafts)) if drafts else 0
            self.draft_tokens_verified += len(drafts)
            self.draft_tokens_accepted += accepted
            sampled.append([self._token() for _ in range(accepted + 1)])
        return ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={req_id: i for i, req_id in enumerate(req_ids)}, sampled_token_ids=sampled
        )

    def propose_drafts(self, scheduler: Any, output: Any) -> None:
        """Synchronous scheduling only (EngineCore.post_step): draft tokens for the next step."""
        from vllm.v1.outputs import DraftTokenIds

        if not self.spec_tokens:
            return
        req_ids = [req_id for req_id in output.num_scheduled_tokens if req_id in scheduler.requests]
        drafts = [[self.rng.randrange(3, 500) for _ in range(self.spec_tokens)] for _ in req_ids]
        scheduler.update_draft_token_ids(DraftTokenIds(req_ids, drafts))


@dataclass
class DriveResult:
    """What vLLM's own objects said while the driver ran the engine loop."""

    steps: int = 0
    lost_to_preemption: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # computed tokens dropped
    preemptions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Positions update_from_output took back from num_computed_tokens: rejected drafts and (vLLM
    # 0.33) accepted tokens after a stop token; the GPU computed them all.
    taken_back: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lost_prompt_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # prompt part of the lost
    finished: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # request id -> finish outputs seen
    vllm_cached_tokens: dict[str, int] = field(default_factory=dict)  # EngineCoreOutput.prefill_stats
    vllm_draft_tokens: int = 0  # SchedulerStats.spec_decoding_stats, summed over steps
    vllm_accepted_tokens: int = 0
    max_in_flight: int = 0


def drive(scheduler: Any, runner: SimulatedModelRunner, requests: list[Any], arrivals_per_step: int = 4) -> DriveResult:
    """EngineCore's loop: ``step`` (one batch) or ``step_with_batch_queue`` (async scheduling, PP).

    Requests arrive ``arrivals_per_step`` at a time. Before each ``schedule()`` the driver notes each
    running request's ``num_computed_tokens`` (already advanced for steps in flight, so it counts
    every position the GPU computed): a request the scheduler preempts in that call lost those.
    Around each ``update_from_output`` it notes how far ``num_computed_tokens`` went back: the
    draft tokens the scheduler rejected (and, on vLLM 0.33, accepted tokens trimmed after a stop).
    """
    result = DriveResult()
    queue_size = scheduler.vllm_config.max_concurrent_batches
    batch_queue: deque[tuple[Any, Any]] = deque()
    pending = deque(requests)
    by_id = {request.request_id: request for request in requests}

    def schedule_one() -> tuple[Any, Any]:
        computed = {r.request_id: r.num_computed_tokens for r in scheduler.running}
        preempted_before = {rid: by_id[rid].num_preemptions for rid in computed}
        output = scheduler.schedule()
        for rid, before in preempted_before.items():
            if by_id[rid].num_preemptions > before:
                result.preemptions[rid] += by_id[rid].num_preemptions - before
                result.lost_to_preemption[rid] += computed[rid]
                result.lost_prompt_tokens[rid] += min(computed[rid], by_id[rid].num_prompt_tokens)
        result.steps += 1
        return output, runner.execute(scheduler, output)

    def update(output: Any, model_output: Any) -> None:
        computed = {rid: by_id[rid].num_computed_tokens for rid in output.num_scheduled_tokens}
        engine_outputs = scheduler.update_from_output(output, model_output)
        for rid, before in computed.items():
            if by_id[rid].num_computed_tokens < before:
                result.taken_back[rid] += before - by_id[rid].num_computed_tokens
        for outputs in engine_outputs.values():
            for item in outputs.outputs:
                if item.finish_reason is not None:
                    result.finished[item.request_id] += 1
                stats = getattr(item, "prefill_stats", None)
                if stats is not None and item.request_id not in result.vllm_cached_tokens:
                    result.vllm_cached_tokens[item.request_id] = stats.num_cached_tokens
            scheduler_stats = outputs.scheduler_stats
            spec = scheduler_stats.spec_decoding_stats if scheduler_stats is not None else None
            if spec is not None:
                result.vllm_draft_tokens += spec.num_draft_tokens
                result.vllm_accepted_tokens += spec.num_accepted_tokens

    for _ in range(100_000):
        for _ in range(min(arrivals_per_step, len(pending))):
            scheduler.add_request(pending.popleft())
        if not pending and not scheduler.has_requests() and not batch_queue:
            break
        if queue_size == 1:
            if scheduler.has_requests():
                output, model_output = schedule_one()
                update(output, model_output)
                runner.propose_drafts(scheduler, output)
            continue
        # step_with_batch_queue: fill the queue first; block on the oldest batch when full or idle.
        if scheduler.has_requests():
            output, model_output = schedule_one()
            batch_queue.appendleft((output, model_output))
            result.max_in_flight = max(result.max_in_flight, len(batch_queue))
            if len(batch_queue) < queue_size and (output.total_num_scheduled_tokens > 0 or scheduler.has_requests()):
                continue
        if batch_queue:
            oldest = batch_queue.pop()
            update(*oldest)
            if not scheduler.scheduler_config.async_scheduling:
                runner.propose_drafts(scheduler, oldest[0])
    else:
        raise AssertionError("the engine loop did not drain")
    return result
