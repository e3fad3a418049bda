"""What the plugin costs vLLM: scheduler-thread recording, worker throughput, forecast latency.

Run: ``.venv/bin/python benchmarks/step_recording.py`` (about 1-2 minutes; ``--quick`` for a smoke
run). Prints a markdown report and writes ``benchmarks/results/step_recording.md`` and ``.json``.

1. Scheduler-thread cost per step. A stub scheduler (``schedule()`` returns a prebuilt, real vLLM
   ``SchedulerOutput``; ``update_from_output()`` returns a prebuilt ``{0: EngineCoreOutputs}``) is
   wrapped with the plugin's ``capturing_scheduler``, exactly as vLLM's scheduler is in production,
   and given a real (not started) ``EnginePipeline``. ``perf_counter_ns`` is read around
   ``schedule() + update_from_output()`` of every step, for the wrapped and the bare stub, in
   interleaved blocks (order alternating) with the garbage collector off. The plugin's cost is the
   difference. The recorder is emptied between blocks, outside the timed region.
2. Worker throughput (off the scheduler thread; in the worker process by default): steady-state decode-heavy steps (running requests
   with 500-2000 tokens of context, a few whole-prompt prefills, requests finishing and replaced)
   are recorded into a real ``EnginePipeline`` and ``process_pending()`` is timed.
3. Forecast latency: ``AnalyticPredictor.predict_step`` on single-request prefill/decode steps, and a
   whole request forecast (``forecast_static_batch``, closed form) for random prompt/output lengths.

Everything is seeded, so each run builds the same steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
GPU = "H100"
SEED = 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Real vLLM scheduler outputs from a small steady-state simulation
# --------------------------------------------------------------------------------------------
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


def make_pipeline(engine: str = "0"):
    """A real EnginePipeline (analytic predictor, Llama-3.1-8B, one H100), worker thread not started."""
    from llmco2_vllm.carbon import lookup_region
    from llmco2_vllm.hardware import Hardware, find_gpu
    from llmco2_vllm.model_description import load_model
    from llmco2_vllm.pipeline import EnginePipeline
    from llmco2_vllm.predictor import AnalyticPredictor
    from llmco2_vllm.settings import Settings

    settings = Settings()
    hardware = Hardware(find_gpu(GPU), 1, 1, "configured")
    predictor = AnalyticPredictor(load_model(MODEL_ID), hardware)
    return EnginePipeline(settings, predictor, hardware, lookup_region("WORLD"), MODEL_ID, engine)


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# --------------------------------------------------------------------------------------------
# 1. Scheduler-thread recording cost
# --------------------------------------------------------------------------------------------
class StubScheduler:
    """Stands in for vLLM's Scheduler: hands out prebuilt outputs, cycling through them."""

    def __init__(self, vllm_config=None, outputs=(), engine_outputs=()) -> None:
        self.vllm_config = vllm_config
        self._outputs = list(outputs)
        self._engine_outputs = list(engine_outputs)
        self._n = len(self._outputs)
        self._i = 0

    def schedule(self):
        self._i += 1
        if self._i == self._n:
            self._i = 0
        return self._outputs[self._i]

    def update_from_output(self, scheduler_output, model_runner_output):
        return self._engine_outputs[self._i]

    def shutdown(self) -> None:
        pass


def timed_block(scheduler, steps: int, sink: list) -> None:
    clock = time.perf_counter_ns
    append = sink.append
    for _ in range(steps):
        t0 = clock()
        output = scheduler.schedule()
        scheduler.update_from_output(output, None)
        append(clock() - t0)


def timer_floor(steps: int) -> list[int]:
    clock = time.perf_counter_ns
    sink = []
    append = sink.append
    for _ in range(steps):
        t0 = clock()
        append(clock() - t0)
    return sink


def bench_scheduler(blocks: int, block_steps: int) -> list[dict]:
    from llmco2_vllm.vllm_plugin import capturing_scheduler

    wrapped_cls = capturing_scheduler(StubScheduler)
    results = []
    for batch in BATCH_SIZES:
        rng = random.Random(SEED + batch)
        sim = StepSimulator(batch, rng, f"s{batch}")
        outputs = [sim.step() for _ in range(32)]
        engine_outputs = [engine_outputs_for(o) for o in outputs]

        bare = StubScheduler(None, outputs, engine_outputs)
        plugin_logger = logging.getLogger("llmco2_vllm")
        level = plugin_logger.level
        plugin_logger.setLevel(logging.CRITICAL)  # the stub has no vllm_config: build_engine_pipeline fails, as expected
        try:
            wrapped = wrapped_cls(None, outputs, engine_outputs)
        finally:
            plugin_logger.setLevel(level)
        assert wrapped._llmco2 is None
        pipeline = make_pipeline(f"sched-{batch}")
        wrapped._llmco2 = pipeline
        wrapped._llmco2_recorder = pipeline.recorder

        # Warm-up (also checks that the wrapped scheduler really records).
        timed_block(bare, block_steps, [])
        timed_block(wrapped, block_steps, [])
        warm = pipeline.recorder.drain(limit=10**9)
        assert len(warm) == block_steps, len(warm)

        bare_ns: list[int] = []
        wrapped_ns: list[int] = []
        gc.collect()
        gc.disable()
        try:
            for block in range(blocks):
                order = (bare, wrapped) if block % 2 == 0 else (wrapped, bare)
                for scheduler in order:
                    timed_block(scheduler, block_steps, bare_ns if scheduler is bare else wrapped_ns)
                pipeline.recorder.drain(limit=10**9)  # the worker's job, outside the timed region
        finally:
            gc.enable()
        assert pipeline.recorder.dropped == 0
        pass  # every block was drained above
        assert not wrapped._llmco2_started

        row = {
            "batch": batch,
            "new_requests": len(outputs[0].scheduled_new_reqs),
            "running_requests": len(outputs[0].scheduled_cached_reqs.req_ids),
            "steps_each": len(bare_ns),
            "bare_p50_us": percentile(bare_ns, 50) / 1e3,
            "bare_p99_us": percentile(bare_ns, 99) / 1e3,
            "wrapped_p50_us": percentile(wrapped_ns, 50) / 1e3,
            "wrapped_p99_us": percentile(wrapped_ns, 99) / 1e3,
        }
        row["added_p50_us"] = row["wrapped_p50_us"] - row["bare_p50_us"]
        row["added_p99_us"] = row["wrapped_p99_us"] - row["bare_p99_us"]
        row["added_mean_us"] = (statistics.fmean(wrapped_ns) - statistics.fmean(bare_ns)) / 1e3
        results.append(row)
        log(
            f"  scheduler batch {batch:>3}: bare p50 {row['bare_p50_us']:.2f} us, wrapped p50 "
            f"{row['wrapped_p50_us']:.2f} us, added p50 {row['added_p50_us']:.2f} us / p99 {row['added_p99_us']:.2f} us"
        )
    return results


# --------------------------------------------------------------------------------------------
# 2. Worker throughput
# --------------------------------------------------------------------------------------------
def bench_worker(steps: int, warmup: int) -> list[dict]:
    from llmco2_vllm.step_shape import StepShape

    results = []
    for batch in BATCH_SIZES:
        rng = random.Random(SEED + 1000 + batch)
        sim = StepSimulator(batch, rng, f"w{batch}")
        warm_outputs = [sim.step() for _ in range(warmup)]
        outputs = [sim.step() for _ in range(steps)]
        pipeline = make_pipeline(f"worker-{batch}")

        for output in warm_outputs:
            pipeline.recorder.record(output, {}, time.perf_counter())
        while pipeline.process_pending():
            pass
        processed_before = pipeline.steps_processed

        for output in outputs:
            pipeline.recorder.record(output, {}, time.perf_counter())
        assert pipeline.recorder.dropped == 0
        t0 = time.perf_counter()
        while pipeline.process_pending():
            pass
        elapsed = time.perf_counter() - t0
        assert pipeline.steps_processed - processed_before == steps
        errors = sum(
            pipeline.registry.get_sample_value("llmco2_plugin_errors_total", {"model_name": MODEL_ID, "engine": f"worker-{batch}", "stage": s}) or 0.0
            for s in ("capture", "predict", "attribute", "carbon", "export")
        )
        assert errors == 0, f"pipeline reported {errors} errors"

        labels = {"model_name": MODEL_ID, "engine": f"worker-{batch}"}
        tokens = {
            phase: pipeline.registry.get_sample_value("llmco2_tokens_total", {**labels, "phase": phase}) or 0.0
            for phase in ("prefill", "decode")
        }
        # Predicted H100 time of a pure decode step of this batch at 1250 tokens of context (mid-range).
        decode_step = pipeline.predictor.predict_step(StepShape.static_batch_decode(batch, 1250))
        row = {
            "batch": batch,
            "steps": steps,
            "prefills_per_step": sim.new_per_step,
            "prefill_tokens_per_step": tokens["prefill"] / (steps + warmup),
            "decode_tokens_per_step": tokens["decode"] / (steps + warmup),
            "seconds": elapsed,
            "steps_per_s": steps / elapsed,
            "us_per_step": elapsed / steps * 1e6,
            "predicted_h100_decode_step_ms": decode_step.seconds * 1e3,
            "finished_requests": int(
                pipeline.registry.get_sample_value("llmco2_requests_total", labels) or 0
            ),
            "ledger_size": len(pipeline.ledger),
        }
        row["share_of_5ms_step"] = row["us_per_step"] / 5000.0
        results.append(row)
        log(
            f"  worker batch {batch:>3}: {row['steps_per_s']:.0f} steps/s, {row['us_per_step']:.0f} us/step "
            f"({row['share_of_5ms_step']:.1%} of a 5 ms step)"
        )
    return results


# --------------------------------------------------------------------------------------------
# 2b. Forwarding (what stays in the engine process with the default worker process)
# --------------------------------------------------------------------------------------------
def bench_forwarder(steps: int) -> list[dict]:
    """Engine-process cost per step of ``WorkerProcess.forward_pending``: compact + pickle, in batches."""
    import pickle

    from llmco2_vllm.capture import StepRecord, compact_step
    from llmco2_vllm.worker_process import FORWARD_BATCH

    results = []
    for batch in BATCH_SIZES:
        rng = random.Random(SEED + 2000 + batch)
        sim = StepSimulator(batch, rng, f"f{batch}")
        records = [StepRecord(sim.step(), {}, 0.0, 0.0, 0.0) for _ in range(steps)]
        sizes = []
        t0 = time.perf_counter()
        for start in range(0, steps, FORWARD_BATCH):
            message = ("steps", [compact_step(r) for r in records[start:start + FORWARD_BATCH]], 0, [])
            sizes.append(len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))
        elapsed = time.perf_counter() - t0
        row = {"batch": batch, "steps": steps, "us_per_step": elapsed / steps * 1e6, "bytes_per_step": sum(sizes) / steps}
        results.append(row)
        log(f"  forwarder batch {batch:>3}: {row['us_per_step']:.1f} us/step, {row['bytes_per_step']:.0f} bytes/step")
    return results


# --------------------------------------------------------------------------------------------
# 3. Forecast latency
# --------------------------------------------------------------------------------------------
def bench_forecast(calls: int, warmup: int) -> list[dict]:
    from llmco2_vllm.step_shape import StepShape

    from llmco2_vllm.forecast import forecast_static_batch

    predictor = make_pipeline("forecast").predictor
    rng = random.Random(0)
    requests = [(rng.randint(1, 2048), rng.randint(1, 1024)) for _ in range(64)]  # (prompt, max output) per request
    cases = [
        ("step: prefill, 1 request, 1024 prompt tokens", lambda i: predictor.predict_step(StepShape.static_batch_prefill(1, 1024))),
        ("step: decode, 1 request, 1024 context tokens", lambda i: predictor.predict_step(StepShape.static_batch_decode(1, 1024))),
        ("step: decode, 64 requests, 1024 context", lambda i: predictor.predict_step(StepShape.static_batch_decode(64, 1024))),
        (
            "request forecast: prefill + all decode steps, random prompt 1-2048 / output 1-1024",
            lambda i: forecast_static_batch(predictor, 1, *requests[i % len(requests)]),
        ),
    ]
    results = []
    clock = time.perf_counter_ns
    for name, call in cases:
        for i in range(warmup):
            call(i)
        samples = []
        gc.collect()
        gc.disable()
        try:
            for i in range(calls):
                t0 = clock()
                call(i)
                samples.append(clock() - t0)
        finally:
            gc.enable()
        row = {
            "case": name,
            "calls": calls,
            "p50_us": percentile(samples, 50) / 1e3,
            "p99_us": percentile(samples, 99) / 1e3,
        }
        results.append(row)
        log(f"  forecast {name}: p50 {row['p50_us']:.1f} us, p99 {row['p99_us']:.1f} us")
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = f"{cpu} ({line.split(':', 1)[1].strip()})" if cpu else line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import vllm

    return {
        "cpu": cpu or "unknown",
        "platform_processor": platform.processor(),
        "cores": cores,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "system": f"{platform.system()} {platform.release()}",
        "vllm": getattr(vllm, "__version__", "?"),
        "numpy": np.__version__,
    }


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# llmco2-vllm: what step recording costs vLLM",
        "",
        f"Machine: {m['cores']} CPU cores, {m['cpu']} (`platform.processor()` = {m['platform_processor']!r}), "
        f"{m['implementation']} {m['python']}, {m['system']}, vLLM {m['vllm']}, numpy {m['numpy']}. "
        f"Mode: {report['mode']}; seed {SEED}; total run {report['total_seconds']:.0f} s. The machine is shared: "
        f"1/5/15-min load average {'/'.join(f'{v:.2f}' for v in report['load_average']['before'])} before, "
        f"{'/'.join(f'{v:.2f}' for v in report['load_average']['after'])} after (2 cores).",
        "",
        "## 1. Scheduler-thread recording cost per step (the plugin's cost in vLLM's hot loop)",
        "",
        "Stub scheduler returning prebuilt real `SchedulerOutput`s (new + running requests), bare vs. wrapped by "
        "`capturing_scheduler` with a real `EnginePipeline`; `perf_counter_ns` around `schedule()` + "
        "`update_from_output()`, interleaved blocks, gc off. Timer floor (two back-to-back `perf_counter_ns`): "
        f"p50 {report['timer_floor_ns']['p50']:.0f} ns, p99 {report['timer_floor_ns']['p99']:.0f} ns.",
        "",
        "| batch | new + running reqs | steps each | bare p50 (µs) | bare p99 (µs) | wrapped p50 (µs) | wrapped p99 (µs) "
        "| added p50 (µs) | added p99 (µs) | added mean (µs) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["scheduler"]:
        lines.append(
            f"| {r['batch']} | {r['new_requests']} + {r['running_requests']} | {r['steps_each']} | {r['bare_p50_us']:.2f} "
            f"| {r['bare_p99_us']:.2f} | {r['wrapped_p50_us']:.2f} | {r['wrapped_p99_us']:.2f} | {r['added_p50_us']:.2f} "
            f"| {r['added_p99_us']:.2f} | {r['added_mean_us']:.2f} |"
        )
    lines += [
        "",
        "## 2. Worker throughput (`EnginePipeline`: in the worker process by default, else a worker thread)",
        "",
        f"Real `EnginePipeline` ({MODEL_ID}, analytic predictor, 1 x {GPU}): steady-state decode-heavy steps "
        "(running requests with 500-2000 tokens of context, batch/16 whole-prompt prefills of 256-2048 tokens per "
        "step, as many requests finishing), recorded with `recorder.record(output, {}, started)`, then "
        "`process_pending()` timed (gc on). Public measurements put an H100 decode step at 5-35 ms; the last "
        "columns give the analytic model's own H100 decode-step time for the batch and the worker's cost as a "
        "share of a 5 ms step.",
        "",
        "| batch | prefills/step | prefill tok/step | decode tok/step | steps | steps/s | µs/step "
        "| predicted H100 decode step (ms) | share of a 5 ms step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["worker"]:
        lines.append(
            f"| {r['batch']} | {r['prefills_per_step']} | {r['prefill_tokens_per_step']:.0f} | {r['decode_tokens_per_step']:.0f} "
            f"| {r['steps']} | {r['steps_per_s']:.0f} | {r['us_per_step']:.0f} | {r['predicted_h100_decode_step_ms']:.2f} "
            f"| {r['share_of_5ms_step']:.1%} |"
        )
    lines += [
        "",
        "## 2b. Forwarding cost in the engine process (the default, `LLMCO2_WORKER=process`)",
        "",
        "With the default worker process, the engine process does only the scheduler hook (section 1) and, on its "
        "forwarding thread, `capture.compact_step` + one pickle per batch of up to "
        f"{report.get('forward_batch', '?')} steps (`WorkerProcess.forward_pending`); the work of section 2 runs in "
        "the worker process. Same steps as section 2, timed end to end (gc on).",
        "",
        "| batch | steps | µs/step in the engine process | bytes/step on the pipe |",
        "|---:|---:|---:|---:|",
    ]
    for r in report.get("forwarder", []):
        lines.append(f"| {r['batch']} | {r['steps']} | {r['us_per_step']:.1f} | {r['bytes_per_step']:.0f} |")
    lines += [
        "",
        "## 3. Forecast latency (analytic predictor, after warm-up, gc off)",
        "",
        "A step prediction (`predict_step`, with per-request attribution weights) and a request forecast "
        "(`forecast_static_batch`: the prefill step plus every decode step, in closed form).",
        "",
        "| what | calls | p50 (µs) | p99 (µs) |",
        "|---|---:|---:|---:|",
    ]
    for r in report["forecast"]:
        lines.append(f"| {r['case']} | {r['calls']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test); numbers are noisier")
    args = parser.parse_args(argv)

    if args.quick:
        blocks, block_steps, worker_steps, forecast_calls = 6, 500, 100, 300
    else:
        blocks, block_steps, worker_steps, forecast_calls = 60, 1000, 1000, 5000
    started = time.perf_counter()
    load_before = os.getloadavg()
    log(f"step_recording benchmark ({'quick' if args.quick else 'full'}); importing vLLM ...")
    random.seed(SEED)
    np.random.seed(SEED)
    import vllm.v1.core.sched.output  # noqa: F401  (slow import, outside every timed region)

    info = machine()
    log(f"machine: {info['cores']} cores, {info['cpu']}, Python {info['python']}")
    floor = timer_floor(200_000 if not args.quick else 20_000)
    log("1/3 scheduler-thread recording cost")
    scheduler = bench_scheduler(blocks, block_steps)
    log("2/3 worker throughput")
    worker = bench_worker(worker_steps, warmup=20 if args.quick else 100)
    log("2b forwarding cost (engine side of the worker process)")
    forwarder = bench_forwarder(worker_steps)
    log("3/3 forecast latency")
    forecast = bench_forecast(forecast_calls, warmup=forecast_calls // 10)

    report = {
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "seed": SEED,
        "model": MODEL_ID,
        "gpu": GPU,
        "timer_floor_ns": {"p50": percentile(floor, 50), "p99": percentile(floor, 99)},
        "scheduler": scheduler,
        "worker": worker,
        "forwarder": forwarder,
        "forward_batch": __import__("llmco2_vllm.worker_process", fromlist=["FORWARD_BATCH"]).FORWARD_BATCH,
        "forecast": forecast,
    }
    report["total_seconds"] = time.perf_counter() - started
    report["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    text = render(report)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "step_recording"  # a --quick run overwrites them too; its report says "Mode: quick"
    (RESULTS / f"{stem}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {RESULTS / (stem + '.md')} and {RESULTS / (stem + '.json')} in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
