"""Cost of the default (fitted) predictor where the plugin runs it: per engine step, per request forecast, at start-up.

Run: ``.venv/bin/python benchmarks/prediction_speed.py`` -> ``benchmarks/results/prediction_speed.md``

* step prediction (the accounting worker, once per engine step): ``FittedPredictor.predict_step`` on
  mixed steps (a few prefill chunks among decodes) of batch 1, 64 and 256;
* request forecast (the API server, once per request): ``RequestForecaster.forecast`` as the
  estimate endpoint and admission control call it, with an output-length history so that the
  forecast prices the expected, low and high lengths (the worst case: three static batches);
* start-up: the accounting worker process from spawn to "ready" with the default settings (what
  the plugin adds before vLLM serves), against the same with ``LLMCO2_PREDICTOR=analytic``.

One thread, ``time.perf_counter_ns``, after warm-up, on this shared 2-core machine: wall-clock
p99 includes preemption by other processes.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmco2_vllm.accounting.worker import WorkerSpec  # noqa: E402
from llmco2_vllm.plugin.step_forwarder import StepForwarder  # noqa: E402
from llmco2_vllm.predict.deployment import Deployment  # noqa: E402
from llmco2_vllm.predict.forecast import RequestForecaster  # noqa: E402
from llmco2_vllm.predict.hardware import Hardware, find_gpu  # noqa: E402
from llmco2_vllm.predict.model_description import load_model  # noqa: E402
from llmco2_vllm.predict.predictor import load_predictor  # noqa: E402
from llmco2_vllm.predict.step_shape import StepShape  # noqa: E402
from llmco2_vllm.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = (  # (model, gpu, tensor parallel)
    ("meta-llama/Llama-3.1-8B-Instruct", "H100-SXM5-80GB", 1),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", "H100-SXM5-80GB", 2),
    ("nvidia/NVIDIA-Nemotron-Nano-12B-v2", "H200", 1),
    ("openai/gpt-oss-120b", "H100-SXM5-80GB", 2),
)
WARMUP, REPEATS, START_REPEATS = 300, 3000, 5


def deployment(model: str, gpu: str, tp: int) -> Deployment:
    return Deployment(model, load_model(model), Hardware(find_gpu(gpu), tp, tp, "configured"))


def mixed_step(batch: int, rng: np.random.Generator) -> StepShape:
    requests = []
    for i in range(batch):
        if i < max(1, batch // 16) and rng.random() < 0.5:
            requests.append((f"r{i}", int(rng.integers(16, 2048)), 0, int(rng.integers(0, 512))))
        else:
            requests.append((f"r{i}", 0, 1, int(rng.integers(16, 8192))))
    return StepShape.from_requests(requests)


def percentiles_us(samples_ns: list[int]) -> tuple[float, float]:
    return float(np.percentile(samples_ns, 50)) / 1e3, float(np.percentile(samples_ns, 99)) / 1e3


def step_timing() -> list[str]:
    lines = ["| model | GPU x TP | batch 1 p50 / p99 µs | batch 64 p50 / p99 µs | batch 256 p50 / p99 µs |",
             "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    rng = np.random.default_rng(0)
    for model, gpu, tp in CONFIGS:
        predictor = load_predictor("fitted", deployment(model, gpu, tp))
        cells = []
        for batch in (1, 64, 256):
            steps = [mixed_step(batch, rng) for _ in range(64)]
            for step in steps * (WARMUP // 64 + 1):
                predictor.predict_step(step)
            samples = []
            for i in range(REPEATS):
                step = steps[i % len(steps)]
                start = time.perf_counter_ns()
                predictor.predict_step(step)
                samples.append(time.perf_counter_ns() - start)
            cells.append("{:.0f} / {:.0f}".format(*percentiles_us(samples)))
        lines.append(f"| {model} | {gpu} x {tp} | " + " | ".join(cells) + " |")
    return lines


def forecast_timing() -> list[str]:
    lines = ["| model | GPU x TP | request forecast p50 / p99 µs | static batch p50 / p99 µs |",
             "| --- | --- | ---: | ---: |"]  # fmt: skip
    rng = np.random.default_rng(1)
    history = [(int(n), None if i % 7 == 0 else int(n * 0.8)) for i, n in enumerate(rng.integers(8, 1024, 64))]
    for model, gpu, tp in CONFIGS:
        predictor = load_predictor("fitted", deployment(model, gpu, tp))
        forecaster = RequestForecaster(predictor, tp, 0.001, 1.2)
        shapes = [(int(p), int(m), float(b)) for p, m, b in zip(rng.integers(8, 4096, 256), rng.integers(16, 2048, 256),
                                                                 rng.uniform(1, 200, 256))]  # fmt: skip
        for prompt, max_tokens, batch in shapes * 2:
            forecaster.forecast(prompt, max_tokens, 400.0, mean_running_requests=batch, recent_outputs=history)
        samples, static = [], []
        for i in range(REPEATS):
            prompt, max_tokens, batch = shapes[i % len(shapes)]
            start = time.perf_counter_ns()
            forecaster.forecast(prompt, max_tokens, 400.0, mean_running_requests=batch, recent_outputs=history)
            samples.append(time.perf_counter_ns() - start)
            start = time.perf_counter_ns()
            predictor.static_batch(int(batch), prompt, max_tokens)
            static.append(time.perf_counter_ns() - start)
        lines.append(f"| {model} | {gpu} x {tp} | " + "{:.0f} / {:.0f}".format(*percentiles_us(samples))
                     + " | {:.0f} / {:.0f} |".format(*percentiles_us(static)))  # fmt: skip
    return lines


def startup_timing() -> list[str]:
    lines = ["| predictor | worker spawn to ready, median s (min - max of 5) |", "| --- | ---: |"]
    model, gpu, tp = CONFIGS[0]
    for name in ("fitted", "analytic"):
        os.environ["LLMCO2_PREDICTOR"] = name
        os.environ["LLMCO2_MEASURE_ENERGY"] = "false"
        seconds = []
        with tempfile.TemporaryDirectory() as folder:
            for index in range(START_REPEATS):
                spec = WorkerSpec(deployment=deployment(model, gpu, tp), engine=str(index), gpu_indices=(0,),
                                  snapshot_path=str(Path(folder) / f"{index}.prom"), results_dir=None)  # fmt: skip
                start = time.perf_counter()
                forwarder = StepForwarder(spec, Settings.from_env())
                seconds.append(time.perf_counter() - start)
                forwarder.stop()
        lines.append(f"| {name} | {np.median(seconds):.2f} ({min(seconds):.2f} - {max(seconds):.2f}) |")
    return lines


def main() -> int:
    started = time.perf_counter()
    load = os.getloadavg()
    steps, forecasts, startup = step_timing(), forecast_timing(), startup_timing()
    text = [
        "# Cost of the fitted predictor in the plugin",
        "",
        f"Generated by `benchmarks/prediction_speed.py` on {platform.machine()}, Python {platform.python_version()}, "
        f"1 thread, on a shared 2-core machine (load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}); "
        f"{REPEATS} timed calls after {WARMUP} warm-up calls per cell; run time {time.perf_counter() - started:.0f} s.",
        "",
        "## Step prediction (accounting worker, once per engine step; target <= 50 µs p50)",
        "",
        *steps,
        "",
        "## Request forecast (API server, once per request; target <= 200 µs p99)",
        "",
        "A forecast prices the request at the expected, low and high output lengths (the expected alone once outcomes "
        "taught a correction), each in its (fractional) batch (the expected one; the engine's recent one; the one left "
        "as running requests end): up to three static batches, evaluated by `FittedPredictor.static_batches` in one "
        "array pass. Timed here without outcomes: the worst case.",
        "",
        *forecasts,
        "",
        "## Start-up (target: the plugin adds <= 5 s over vLLM's own)",
        "",
        "The accounting worker process from spawn to its \"ready\" reply (imports, model description, predictor, "
        "metrics); the plugin's other start-up work (reading vLLM's config) is the same for every predictor.",
        "",
        *startup,
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prediction_speed.md").write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
