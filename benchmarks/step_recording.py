"""What the plugin costs vLLM: scheduler-thread recording, the accounting worker's CPU per step,
forwarding, step-prediction latency.

Run: ``.venv/bin/python benchmarks/step_recording.py`` (a few minutes; ``--quick`` for a smoke run).
Prints a markdown report and writes ``benchmarks/results/step_recording.md`` and ``.json``.

1. Scheduler-thread cost per step. A stub scheduler (``schedule()`` returns a prebuilt, real vLLM
   ``SchedulerOutput``; ``update_from_output()`` returns a prebuilt ``{0: EngineCoreOutputs}``) is
   wrapped with the plugin's ``capturing_scheduler``, exactly as vLLM's scheduler is in production,
   and given the engine's ``StepRecorder``. ``perf_counter_ns`` is read around ``schedule() +
   update_from_output()`` of every step, for the wrapped and the bare stub, in interleaved blocks
   (order alternating) with the garbage collector off. The plugin's cost is the difference. The
   recorder is emptied between blocks, outside the timed region.
2. Accounting worker, CPU per step: steady-state decode-heavy steps (``StepSimulator``: running
   requests with 500-2000 tokens of context, a few whole-prompt prefills, requests finishing and
   replaced) are compacted as the engine's forwarder does (``scheduler_hook.compact_step``) and
   pickled into the worker's messages (``FORWARD_BATCH`` steps each). A child process without
   vLLM, like the plugin's worker process, unpickles them and times ``EnginePipeline.process_steps``:
   thread CPU time and wall time (gc on), for the analytic predictor and the plugin's default
   (``fitted``; the "before" tree's default was ``gnn``, the distilled table over the analytic model). Unpickling, also the worker's work, is
   timed apart. ``--before-tree DIR`` also measures the code before the array-based worker (a
   checkout of commit ``BEFORE_COMMIT``: ``git worktree add DIR BEFORE_COMMIT``) on the same
   messages, in rounds alternating with this code's; each cell is the median over rounds. Without
   it, the "before" numbers of the previous results JSON are kept in the report.
2b. Forwarding cost in the engine process: ``compact_step`` + one framed pickle per batch.
3. Step-prediction latency: ``predict_step`` (with per-request attribution weights) of both
   predictors on fixed and simulated steps (before/after as in 2), and a whole request forecast
   (``forecast_static_batch``, closed form).

Everything is seeded, so each run builds the same steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Only the standard library and numpy at the top: the child process measuring the code before
# (``--before-tree``) loads this file beside that older package.
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"  # as llmco2_vllm.dev.step_simulator
GPU = "H100"
SEED = 0
BEFORE_COMMIT = "8722a70"  # the last commit with the per-request worker (flat package layout)
FORWARD_BATCH = 512  # llmco2_vllm.plugin.step_forwarder.FORWARD_BATCH (checked in main)
PREDICTION_CASES = ("prefill 1 x 1024", "decode 1 x 1024", "decode 64 x 1024", "simulated batch 64", "simulated batch 256")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


class Code:
    """What the worker and prediction measurements need from one version of the package."""

    def __init__(
        self,
        pipeline: Callable[[Any, str], Any],
        feed: Callable[[Any, list], None],
        predictors: dict[str, Any],
        step_shape: type,
        shape_builder: Callable[[], Any],
    ) -> None:
        self.pipeline = pipeline  # (predictor, engine) -> EnginePipeline
        self.feed = feed  # account a batch of CompactSteps
        self.predictors = predictors  # "analytic" / "default" -> StepPredictor
        self.step_shape = step_shape
        self.shape_builder = shape_builder


# A measuring child process, without vLLM (as the plugin's worker process): it builds ``Code`` for
# this checkout or for BEFORE_COMMIT's (flat layout, the recorder inside the pipeline), loads this
# file and runs ``measure_round`` on the steps the parent compacted from real vLLM objects.
MEASURING_CHILD = r"""
import json, pickle, sys
config = json.load(sys.stdin)
if config["version"] == "before":
    import types
    from llmco2_vllm.capture import CompactStep, StepShapeBuilder
    from llmco2_vllm.carbon import lookup_region
    from llmco2_vllm.fast_gnn import CorrectionTable, DistilledGnnPredictor
    from llmco2_vllm.hardware import Hardware, find_gpu
    from llmco2_vllm.model_description import load_model
    from llmco2_vllm.pipeline import EnginePipeline
    from llmco2_vllm.predictor import AnalyticPredictor
    from llmco2_vllm.settings import Settings
    from llmco2_vllm.step_shape import StepShape

    # The parent pickled this checkout's CompactStep: the same fields, in the same order.
    contract = types.ModuleType("llmco2_vllm.accounting.step_contract")
    contract.CompactStep = CompactStep
    sys.modules["llmco2_vllm.accounting"] = types.ModuleType("llmco2_vllm.accounting")
    sys.modules["llmco2_vllm.accounting.step_contract"] = contract

    def feed(pipeline, steps):
        for step in steps:
            pipeline.recorder.put(step)
        while pipeline.process_pending():
            pass
else:
    from llmco2_vllm.accounting.pipeline import EnginePipeline
    from llmco2_vllm.accounting.step_shapes import StepShapeBuilder
    from llmco2_vllm.carbon.intensity import lookup_region
    from llmco2_vllm.predict.fitted import FittedPredictor
    from llmco2_vllm.predict.hardware import Hardware, find_gpu
    from llmco2_vllm.predict.model_description import load_model
    from llmco2_vllm.predict.predictor import AnalyticPredictor
    from llmco2_vllm.predict.step_shape import StepShape
    from llmco2_vllm.settings import Settings

    def feed(pipeline, steps):
        pipeline.process_steps(steps)

import importlib.util
spec = importlib.util.spec_from_file_location("step_recording_benchmark", config["benchmark"])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
assert "vllm" not in sys.modules, "the measuring child must not import vLLM (the worker does not)"
hardware = Hardware(find_gpu(bench.GPU), 1, 1, "configured")
model = load_model(bench.MODEL_ID)
table = config["table"]
if config["version"] == "before":  # that commit's default: the distilled GNN table
    default = DistilledGnnPredictor(model, hardware, table=CorrectionTable.from_json(table)) if table else AnalyticPredictor(model, hardware)
else:  # this code's default: the fitted model
    default = FittedPredictor(model, hardware)
code = bench.Code(
    lambda predictor, engine: EnginePipeline(Settings(), predictor, hardware, lookup_region("WORLD"), bench.MODEL_ID, engine),
    feed,
    {"analytic": AnalyticPredictor(model, hardware), "default": default},
    StepShape,
    StepShapeBuilder,
)
with open(config["inputs"], "rb") as handle:
    inputs = pickle.load(handle)
json.dump(bench.measure_round(code, inputs, config["calls"]), sys.stdout)
"""


def measuring_child(version: str, tree: Path, table: dict | None, inputs: Path, calls: int) -> dict:
    """One round of ``measure_round`` on the package in ``tree``, in a child process without vLLM."""
    config = {
        "version": version, "benchmark": str(Path(__file__).resolve()), "table": table, "inputs": str(inputs), "calls": calls,
    }  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", MEASURING_CHILD], input=json.dumps(config), capture_output=True, text=True,
        cwd=tree, env=environment, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"measuring {version} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# --------------------------------------------------------------------------------------------
# 2 and 3. Accounting worker CPU per step, step-prediction latency (any version of the package)
# --------------------------------------------------------------------------------------------
def worker_inputs(batches: list[int], steps: int, warmup: int) -> dict[int, dict]:
    """Per batch size: real vLLM steps compacted by the engine's reader, as pickled worker messages
    (``("steps", [CompactStep, ...], dropped, queued, errors)``, ``FORWARD_BATCH`` steps each)."""
    from llmco2_vllm.dev.step_simulator import StepSimulator
    from llmco2_vllm.plugin.scheduler_hook import StepRecord, compact_step

    inputs = {}
    for batch in batches:
        simulator = StepSimulator(batch, random.Random(SEED + 1000 + batch), f"w{batch}")
        compact = [compact_step(StepRecord(simulator.step(), {}, 0.0, time.perf_counter(), 0.004)) for _ in range(warmup + steps)]
        inputs[batch] = {
            "warm": pickle.dumps(compact[:warmup], protocol=pickle.HIGHEST_PROTOCOL),
            "messages": [
                pickle.dumps(("steps", compact[start : start + FORWARD_BATCH], 0, 0, []), protocol=pickle.HIGHEST_PROTOCOL)
                for start in range(warmup, warmup + steps, FORWARD_BATCH)
            ],
            "steps": steps,
            "prefills_per_step": simulator.new_per_step,
        }
    return inputs


def measure_worker(code: Code, predictor_name: str, batch: int, warm: list, messages: list[bytes], steps: int) -> dict:
    """Thread CPU and wall time of the pipeline's accounting per step; unpickling apart."""
    engine = f"worker-{predictor_name}-{batch}"
    pipeline = code.pipeline(code.predictors[predictor_name], engine)
    code.feed(pipeline, warm)
    processed_before = pipeline.steps_processed
    cpu = wall = unpickle = 0.0
    thread_time, clock = time.thread_time, time.perf_counter
    for message in messages:
        c0 = thread_time()
        batch_steps = pickle.loads(message)[1]
        c1, w1 = thread_time(), clock()
        code.feed(pipeline, batch_steps)
        wall += clock() - w1
        cpu += thread_time() - c1
        unpickle += c1 - c0
    assert pipeline.steps_processed - processed_before == steps, (pipeline.steps_processed, processed_before, steps)
    labels = {"model_name": MODEL_ID, "engine": engine}
    errors = sum(
        pipeline.registry.get_sample_value("llmco2_plugin_errors_total", {**labels, "stage": stage}) or 0.0
        for stage in ("capture", "predict", "attribute", "carbon", "export")
    )
    assert errors == 0, f"the pipeline counted {errors} errors"
    tokens = {
        phase: pipeline.registry.get_sample_value("llmco2_tokens_total", {**labels, "phase": phase}) or 0.0
        for phase in ("prefill", "decode")
    }
    accounted = steps + len(warm)
    return {
        "predictor": predictor_name,
        "predictor_name": code.predictors[predictor_name].name,
        "batch": batch,
        "steps": steps,
        "prefill_tokens_per_step": tokens["prefill"] / accounted,
        "decode_tokens_per_step": tokens["decode"] / accounted,
        "finished_requests": int(pipeline.registry.get_sample_value("llmco2_requests_total", labels) or 0),
        "cpu_us_per_step": cpu / steps * 1e6,
        "wall_us_per_step": wall / steps * 1e6,
        "unpickle_us_per_step": unpickle / steps * 1e6,
    }


def prediction_shapes(code: Code, inputs: dict[int, dict]) -> dict[str, Any]:
    shape = code.step_shape
    shapes = {
        "prefill 1 x 1024": shape.static_batch_prefill(1, 1024),
        "decode 1 x 1024": shape.static_batch_decode(1, 1024),
        "decode 64 x 1024": shape.static_batch_decode(64, 1024),
    }
    for batch in (64, 256):
        builder = code.shape_builder()
        for step in pickle.loads(inputs[batch]["warm"])[:5]:
            simulated = builder.build(step).shape
        shapes[f"simulated batch {batch}"] = simulated
    assert tuple(shapes) == PREDICTION_CASES
    return shapes


def measure_predictions(code: Code, inputs: dict[int, dict], calls: int) -> list[dict]:
    rows = []
    clock, thread_time = time.perf_counter_ns, time.thread_time
    for case, step in prediction_shapes(code, inputs).items():
        for predictor_name, predictor in code.predictors.items():
            predict = predictor.predict_step
            for _ in range(max(10, calls // 10)):
                predict(step)
            samples = []
            gc.collect()
            gc.disable()
            try:
                c0 = thread_time()
                for _ in range(calls):
                    t0 = clock()
                    predict(step)
                    samples.append(clock() - t0)
                cpu = thread_time() - c0
            finally:
                gc.enable()
            rows.append({
                "case": case,
                "requests": len(step.request_ids),
                "predictor": predictor_name,
                "calls": calls,
                "p50_us": percentile(samples, 50) / 1e3,
                "p99_us": percentile(samples, 99) / 1e3,
                "cpu_us_per_call": cpu / calls * 1e6,
            })  # fmt: skip
    return rows


def measure_round(code: Code, inputs: dict[int, dict], calls: int) -> dict:
    """One round of sections 2 and 3 on ``code`` (in a measuring child process)."""
    worker = []
    for batch, given in inputs.items():
        warm = pickle.loads(given["warm"])
        for predictor_name in code.predictors:
            row = measure_worker(code, predictor_name, batch, warm, given["messages"], given["steps"])
            row["prefills_per_step"] = given["prefills_per_step"]
            worker.append(row)
    return {"worker": worker, "prediction": measure_predictions(code, inputs, calls)}


def median_rounds(rounds: list[dict]) -> dict:
    """Cell by cell median over rounds (the rows of every round come in the same order)."""
    merged: dict[str, Any] = {}
    for section in ("worker", "prediction"):
        rows = []
        for cells in zip(*(r[section] for r in rounds)):
            row = dict(cells[0])
            for key in cells[0]:
                if key.endswith(("_us", "_us_per_step", "_us_per_call")):
                    row[key] = statistics.median(cell[key] for cell in cells)
                    row[key + "_rounds"] = [cell[key] for cell in cells]
            rows.append(row)
        merged[section] = rows
    merged["rounds"] = len(rounds)
    return merged


# --------------------------------------------------------------------------------------------
# Timing helpers
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




# --------------------------------------------------------------------------------------------
# 1. Scheduler-thread recording cost
# --------------------------------------------------------------------------------------------
class RecorderOnly:
    """What the scheduler hook touches of the engine's ``StepForwarder``: its recorder (no thread)."""

    def __init__(self, capacity: int) -> None:
        from llmco2_vllm.plugin.scheduler_hook import StepRecorder

        self.recorder = StepRecorder(capacity)

    def stop(self) -> None:
        pass


def bench_scheduler(blocks: int, block_steps: int) -> list[dict]:
    from llmco2_vllm.dev.step_simulator import StepSimulator, engine_outputs_for
    from llmco2_vllm.plugin.scheduler_hook import capturing_scheduler
    from llmco2_vllm.settings import Settings

    capacity = Settings().queue_capacity
    results = []
    for batch in BATCH_SIZES:
        rng = random.Random(SEED + batch)
        sim = StepSimulator(batch, rng, f"s{batch}")
        outputs = [sim.step() for _ in range(32)]
        engine_outputs = [engine_outputs_for(o) for o in outputs]

        bare = StubScheduler(None, outputs, engine_outputs)
        forwarder = RecorderOnly(capacity)
        wrapped = capturing_scheduler(StubScheduler, lambda vllm_config, forwarder=forwarder: forwarder)(None, outputs, engine_outputs)
        recorder = wrapped._llmco2_recorder
        assert recorder is forwarder.recorder

        # Warm-up (also checks that the wrapped scheduler really records).
        timed_block(bare, block_steps, [])
        timed_block(wrapped, block_steps, [])
        warm = recorder.drain(limit=10**9)
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
                recorder.drain(limit=10**9)  # the forwarder's job, outside the timed region
        finally:
            gc.enable()
        assert recorder.dropped == 0
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
# 2b. Forwarding (what stays in the engine process with the default worker process)
# --------------------------------------------------------------------------------------------
FORWARDER_PASSES = 5


def bench_forwarder(steps: int) -> list[dict]:
    """Engine-process cost per step of ``StepForwarder.forward_pending``: compact + a framed pickle per batch."""
    import io

    from llmco2_vllm.accounting.worker import write_message
    from llmco2_vllm.dev.step_simulator import StepSimulator
    from llmco2_vllm.plugin.scheduler_hook import StepRecord, compact_step

    results = []
    for batch in BATCH_SIZES:
        rng = random.Random(SEED + 2000 + batch)
        sim = StepSimulator(batch, rng, f"f{batch}")
        records = [StepRecord(sim.step(), {}, 0.0, 0.0, 0.0) for _ in range(steps)]
        # The median of a few passes, each after a collection: one pass can land on a full garbage
        # collection of this (vLLM-importing) process, which the engine process also has but spread out.
        passes = []
        for _ in range(FORWARDER_PASSES):
            gc.collect()
            pipe = io.BytesIO()
            t0 = time.perf_counter()
            for start in range(0, steps, FORWARD_BATCH):
                batch_steps = [compact_step(r) for r in records[start : start + FORWARD_BATCH]]
                write_message(pipe, ("steps", batch_steps, 0, 0, []))
            passes.append(time.perf_counter() - t0)
        elapsed = float(np.median(passes))
        row = {"batch": batch, "steps": steps, "us_per_step": elapsed / steps * 1e6, "bytes_per_step": pipe.tell() / steps}
        results.append(row)
        log(f"  forwarder batch {batch:>3}: {row['us_per_step']:.1f} us/step, {row['bytes_per_step']:.0f} bytes/step")
    return results


def bench_request_forecast(predictors: dict[str, Any], calls: int) -> list[dict]:
    from llmco2_vllm.predict.forecast import forecast_static_batch

    rng = random.Random(0)
    requests = [(rng.randint(1, 2048), rng.randint(1, 1024)) for _ in range(64)]  # (prompt, max output) per request
    results = []
    clock = time.perf_counter_ns
    for predictor_name, predictor in predictors.items():
        for i in range(calls // 10):
            forecast_static_batch(predictor, 1, *requests[i % len(requests)])
        samples = []
        gc.collect()
        gc.disable()
        try:
            for i in range(calls):
                t0 = clock()
                forecast_static_batch(predictor, 1, *requests[i % len(requests)])
                samples.append(clock() - t0)
        finally:
            gc.enable()
        results.append({
            "predictor": predictor_name, "calls": calls,
            "p50_us": percentile(samples, 50) / 1e3, "p99_us": percentile(samples, 99) / 1e3,
        })  # fmt: skip
    return results


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




# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def render(report: dict) -> str:
    m = report["machine"]
    before = report.get("before")
    after = report["after"]
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
        "`capturing_scheduler` with the engine's `StepRecorder`; `perf_counter_ns` around `schedule()` + "
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
    rounds = after.get("rounds", 1)
    lines += [
        "",
        "## 2. Accounting worker: CPU per step (`EnginePipeline.process_steps`, in the worker process by default)",
        "",
        f"Real `EnginePipeline` ({MODEL_ID}, 1 x {GPU}) fed steady-state decode-heavy steps (running requests with "
        "500-2000 tokens of context, batch/16 whole-prompt prefills of 256-2048 tokens per step, as many requests "
        "finishing): real vLLM `SchedulerOutput`s compacted with `scheduler_hook.compact_step` and pickled into the "
        f"worker's messages of {FORWARD_BATCH} steps. A child process without vLLM (as the worker process) unpickles "
        "them and runs `process_steps`; the table gives its thread CPU time (`time.thread_time`) and wall time per "
        "step (gc on), for the analytic predictor and the plugin's default (`fitted`, the time and power model fitted "
        "on measured serving; in the 'before' columns the default of that commit, `gnn`: the distilled GNN table), "
        "and the unpickling, also the worker's work, apart. Each cell is the median of "
        f"{rounds} round(s).",
    ]
    if before:
        lines += [
            "",
            f"Before: the code of commit {before['commit']} (per-request Python in the shape builder, the ledger and "
            "the roofline's per-operator arrays), measured on the same messages in the same run "
            f"({before.get('rounds', 1)} round(s), alternating with the rounds of this code; its pipeline took the "
            "steps through `recorder.put` + `process_pending()`). That commit's own results (wall time, analytic, "
            "`compact_step` inside the timed worker thread, in vLLM's process, another day on this shared machine): "
            + ", ".join(f"batch {b} {us} µs" for b, us in before["committed_wall_us_per_step"].items())
            + ".",
        ]
    lines += [
        "",
        "| predictor | batch | prefills/step | prefill tok/step | decode tok/step | steps "
        + ("| before CPU µs/step | before wall µs/step " if before else "")
        + "| CPU µs/step | wall µs/step | unpickle µs/step "
        + ("| CPU speed-up " if before else "")
        + "| share of a 5 ms step |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if before else "") + "---:|---:|---:|" + ("---:|" if before else "") + "---:|",
    ]
    before_rows = {(r["predictor"], r["batch"]): r for r in before["worker"]} if before else {}
    for r in after["worker"]:
        b = before_rows.get((r["predictor"], r["batch"]))
        cells = [
            f"{r['predictor']} (`{r['predictor_name']}`)", str(r["batch"]), str(r["prefills_per_step"]),
            f"{r['prefill_tokens_per_step']:.0f}", f"{r['decode_tokens_per_step']:.0f}", str(r["steps"]),
        ]  # fmt: skip
        if before:
            cells += [f"{b['cpu_us_per_step']:.0f}", f"{b['wall_us_per_step']:.0f}"] if b else ["", ""]
        cells += [f"{r['cpu_us_per_step']:.0f}", f"{r['wall_us_per_step']:.0f}", f"{r['unpickle_us_per_step']:.1f}"]
        if before:
            cells.append(f"{b['cpu_us_per_step'] / r['cpu_us_per_step']:.1f}x" if b else "")
        cells.append(f"{(r['cpu_us_per_step'] + r['unpickle_us_per_step']) / 5000:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## 2b. Forwarding cost in the engine process (the default, `LLMCO2_WORKER=process`)",
        "",
        "With the default worker process, the engine process does only the scheduler hook (section 1) and, on its "
        "forwarding thread, `scheduler_hook.compact_step` + one framed pickle per batch of up to "
        f"{FORWARD_BATCH} steps (`StepForwarder.forward_pending`); the work of section 2 runs in the worker process. "
        "Same kind of steps as section 2, timed end to end (gc on).",
        "",
        "| batch | steps | µs/step in the engine process | bytes/step on the pipe |",
        "|---:|---:|---:|---:|",
    ]
    for r in report.get("forwarder", []):
        lines.append(f"| {r['batch']} | {r['steps']} | {r['us_per_step']:.1f} | {r['bytes_per_step']:.0f} |")
    lines += [
        "",
        "## 3. Step-prediction latency (after warm-up, gc off)",
        "",
        "`predict_step` with per-request attribution weights, the call the worker makes per step: fixed static "
        "batches and steps of the section-2 simulation (the fifth step; batch/16 prefills). p50/p99 of "
        "`perf_counter_ns` per call; CPU = thread CPU time per call."
        + (f" Before: commit {before['commit']}, as in section 2." if before else ""),
        "",
        "| step | requests | predictor " + ("| before p50 (µs) " if before else "") + "| p50 (µs) | p99 (µs) | CPU (µs) |",
        "|---|---:|---|" + ("---:|" if before else "") + "---:|---:|---:|",
    ]
    before_predictions = {(r["case"], r["predictor"]): r for r in before["prediction"]} if before else {}
    for r in after["prediction"]:
        b = before_predictions.get((r["case"], r["predictor"]))
        cells = [r["case"], str(r["requests"]), r["predictor"]]
        if before:
            cells.append(f"{b['p50_us']:.1f}" if b else "")
        cells += [f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['cpu_us_per_call']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "A request forecast (`forecast_static_batch`: the prefill step plus every decode step, in closed form), "
        "random prompt 1-2048 / output 1-1024 tokens:",
        "",
        "| predictor | calls | p50 (µs) | p99 (µs) |",
        "|---|---:|---:|---:|",
    ]
    for r in report["request_forecast"]:
        lines.append(f"| {r['predictor']} | {r['calls']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} |")
    return "\n".join(lines) + "\n"


# That commit's benchmarks/results/step_recording.md, section 2 (µs/step, wall, analytic).
COMMITTED_BEFORE_WALL_US = {1: 445, 8: 520, 32: 622, 64: 788, 128: 1085, 256: 1803}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test); numbers are noisier")
    parser.add_argument(
        "--before-tree", type=Path, default=None,
        help=f"a checkout of commit {BEFORE_COMMIT} (git worktree add DIR {BEFORE_COMMIT}): measure it too",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None, help="rounds of sections 2-3 (default 3, quick 1)")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

    if args.quick:
        blocks, block_steps, worker_steps, calls, rounds = 6, 500, 100, 300, 1
    else:
        blocks, block_steps, worker_steps, calls, rounds = 60, 1000, 1000, 5000, 3
    rounds = args.rounds or rounds
    started = time.perf_counter()
    load_before = os.getloadavg()
    log(f"step_recording benchmark ({'quick' if args.quick else 'full'}); importing vLLM ...")
    random.seed(SEED)
    np.random.seed(SEED)
    import vllm.v1.core.sched.output  # noqa: F401  (slow import, outside every timed region)

    from llmco2_vllm.plugin.step_forwarder import FORWARD_BATCH as forward_batch
    from llmco2_vllm.predict.gnn.distilled import DistilledGnnPredictor
    from llmco2_vllm.predict.hardware import Hardware, find_gpu
    from llmco2_vllm.predict.model_description import load_model
    from llmco2_vllm.predict.predictor import AnalyticPredictor

    assert forward_batch == FORWARD_BATCH, (forward_batch, FORWARD_BATCH)
    info = machine()
    log(f"machine: {info['cores']} cores, {info['cpu']}, Python {info['python']}")
    floor = timer_floor(200_000 if not args.quick else 20_000)
    log("1/3 scheduler-thread recording cost")
    scheduler = bench_scheduler(blocks, block_steps)

    log("2/3 accounting worker and step prediction ...")
    hardware = Hardware(find_gpu(GPU), 1, 1, "configured")
    table = None
    if args.before_tree is not None:  # the before tree's default predictor needs the GNN table
        distilled = DistilledGnnPredictor(load_model(MODEL_ID), hardware)
        table = None if distilled.table is None else distilled.table.to_json()
    log("  compacting the simulated vLLM steps ...")
    inputs = worker_inputs(list(BATCH_SIZES), worker_steps, 20 if args.quick else 100)
    after_rounds, before_rounds = [], []
    with tempfile.TemporaryDirectory(prefix="llmco2-step-recording-") as directory:
        inputs_path = Path(directory) / "inputs.pickle"
        inputs_path.write_bytes(pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL))
        for round_index in range(rounds):
            order = ("before", "current") if round_index % 2 == 0 else ("current", "before")
            for version in order:
                if version == "before" and args.before_tree is None:
                    continue
                tree = REPO if version == "current" else args.before_tree.resolve()
                log(f"  round {round_index + 1}/{rounds}: {version} ({tree})")
                result = measuring_child(version, tree, table, inputs_path, calls)
                (after_rounds if version == "current" else before_rounds).append(result)
    after = median_rounds(after_rounds)
    for r in after["worker"]:
        log(f"  worker {r['predictor']:>8} batch {r['batch']:>3}: {r['cpu_us_per_step']:.0f} us CPU/step, {r['wall_us_per_step']:.0f} us wall")
    if before_rounds:
        before = {**median_rounds(before_rounds), "commit": BEFORE_COMMIT}
    else:  # keep the before numbers of the previous results
        previous = RESULTS / "step_recording.json"
        before = json.loads(previous.read_text()).get("before") if previous.exists() else None
    if before is not None:
        before["committed_wall_us_per_step"] = COMMITTED_BEFORE_WALL_US
    log("2b forwarding cost (engine side of the worker process)")
    forwarder = bench_forwarder(worker_steps)
    log("3/3 request forecast latency")
    from llmco2_vllm.predict.fitted import FittedPredictor

    request_forecast = bench_request_forecast(
        {"analytic": AnalyticPredictor(load_model(MODEL_ID), hardware), "default": FittedPredictor(load_model(MODEL_ID), hardware)},
        calls,
    )

    report = {
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "seed": SEED,
        "model": MODEL_ID,
        "gpu": GPU,
        "timer_floor_ns": {"p50": percentile(floor, 50), "p99": percentile(floor, 99)},
        "scheduler": scheduler,
        "after": after,
        "before": before,
        "forwarder": forwarder,
        "forward_batch": FORWARD_BATCH,
        "request_forecast": request_forecast,
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
