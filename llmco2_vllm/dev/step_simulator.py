"""Real vLLM scheduler outputs from a small steady-state serving simulation (tests and benchmarks).

``StepSimulator`` builds the ``SchedulerOutput`` objects vLLM's v1 scheduler would hand the plugin,
step after step, for a continuous batch; ``engine_outputs_for`` the matching engine outputs;
``analytic_engine_pipeline`` a real ``EnginePipeline`` to feed them to, without an engine.
vLLM is imported only when steps are built (its import takes seconds).
"""

from __future__ import annotations

import random

from llmco2_vllm.accounting.pipeline import EnginePipeline
from llmco2_vllm.carbon.intensity import lookup_region
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.predictor import AnalyticPredictor
from llmco2_vllm.settings import Settings

MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
GPU = "H100"


class StepSimulator:
    """A continuous batch of ``batch`` requests, mostly decoding.

    Each step: every running request decodes one token; ``new_per_step`` requests finish (reported
    in the next step's ``finished_req_ids``, as vLLM does) and as many new ones are scheduled with
    their whole prompt (256-2048 tokens, some with a prefix-cache hit). Requests already running
    when the simulation starts have 500-2000 tokens of context and unknown prompts (their first
    step happened "before"), the same as steps the plugin saw only from the middle.
    """

    def __init__(self, batch: int, rng: random.Random, prefix: str) -> None:
        from vllm import SamplingParams

        self.rng = rng
        self.prefix = prefix
        self.batch = batch
        self.new_per_step = 0 if batch == 1 else max(1, batch // 16)
        self.sampling = SamplingParams(max_tokens=1024)
        self.counter = 0
        self.next_block = 0
        # request id -> [num_computed_tokens, num_output_tokens]
        self.running: dict[str, list[int]] = {}
        for _ in range(batch - self.new_per_step):
            self.running[self._new_id()] = [rng.randint(500, 2000), rng.randint(1, 400)]
        self.pending_finished: set[str] = set()
        self.token_pool = [rng.randrange(128_000) for _ in range(4096)]  # prompts are slices of it

    def _new_id(self) -> str:
        self.counter += 1
        return f"{self.prefix}-{self.counter:07d}-{self.rng.getrandbits(32):08x}"

    def _blocks(self, n: int) -> list[int]:
        start = self.next_block
        self.next_block += n
        return list(range(start, start + n))

    def step(self):
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

        rng = self.rng
        num_scheduled: dict[str, int] = {}
        # Running requests: one decode token each; a new KV block every 16 tokens.
        req_ids, computed, outputs, new_blocks = [], [], [], []
        for request_id, (context, produced) in self.running.items():
            req_ids.append(request_id)
            computed.append(context)
            outputs.append(produced)
            new_blocks.append(([self._blocks(1)[0]],) if context % 16 == 0 else None)
            num_scheduled[request_id] = 1
        cached = CachedRequestData(
            req_ids=req_ids,
            resumed_req_ids=set(),
            new_token_ids=[],
            all_token_ids={},
            new_block_ids=new_blocks,
            num_computed_tokens=computed,
            num_output_tokens=outputs,
        )
        # New requests: the whole prompt in this step, minus a prefix-cache hit for some.
        new_requests = []
        for _ in range(self.new_per_step):
            request_id = self._new_id()
            prompt = rng.randint(256, 2048)
            hit = 16 * rng.randint(1, prompt // 32) if rng.random() < 0.3 else 0
            new_requests.append(
                NewRequestData(
                    req_id=request_id,
                    prompt_token_ids=self.token_pool[(start := rng.randrange(2048)) : start + prompt],
                    mm_features=[],
                    sampling_params=self.sampling,
                    pooling_params=None,
                    block_ids=(self._blocks((prompt + 15) // 16),),
                    num_computed_tokens=hit,
                    lora_request=None,
                )
            )
            num_scheduled[request_id] = prompt - hit
        output = SchedulerOutput(
            scheduled_new_reqs=new_requests,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.pending_finished,
            free_encoder_mm_hashes=[],
        )
        # Advance: decoders grew by one token; the new requests join; some finish.
        for state in self.running.values():
            state[0] += 1
            state[1] += 1
        for new in new_requests:
            self.running[new.req_id] = [len(new.prompt_token_ids), 1]
        finishing = rng.sample(sorted(self.running), self.new_per_step) if self.new_per_step else []
        for request_id in finishing:
            del self.running[request_id]
        self.pending_finished = set(finishing)
        return output


def engine_outputs_for(output) -> dict:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    ids = [new.req_id for new in output.scheduled_new_reqs] + list(output.scheduled_cached_reqs.req_ids)
    return {0: EngineCoreOutputs(engine_index=0, outputs=[EngineCoreOutput(request_id=i, new_token_ids=[7]) for i in ids])}


def analytic_engine_pipeline(engine: str = "0") -> EnginePipeline:
    """A real ``EnginePipeline`` (analytic predictor, ``MODEL_ID`` on one ``GPU``), fed steps directly."""
    settings = Settings()
    hardware = Hardware(find_gpu(GPU), 1, 1, "configured")
    predictor = AnalyticPredictor(load_model(MODEL_ID), hardware)
    return EnginePipeline(settings, predictor, hardware, lookup_region("WORLD"), MODEL_ID, engine)
