"""Forecast accuracy and admission under abuse on a real ``vllm serve`` (tiny model, CPU).

One server with the plugin (default predictor, prefix caching, chunked prefill at 128 tokens per
step, deferral above 500 gCO2e/kWh from a grid-intensity file that starts at 600). In order:

1. ``make demo``'s workload on the fresh server (no history: the prior forecast), 4 clients;
2. a mixed workload: prompts 8-400 tokens, outputs 8-160 (``ignore_eos``), 8 concurrent clients;
3. the same shapes with the output length unknown: sampled at temperature 1 with eight stop
   tokens, so requests stop early (as at EOS) at a length the forecast cannot know;
4. ``make demo``'s workload again, now that the server has learned;
5. 1,000 deferrable requests parked at once (``LLMCO2_ADMISSION_MAX_WAITING=800``): the API
   server's memory while they wait, then the grid turns clean and they are released, paced.

Each request's forecast (at arrival, ``GET /v1/carbon/requests/{id}``) is compared with its actual
(``calibrated_energy_j``, what the engine attributed to it). Then the forecast's latency is timed in
process on the same predictor, with what the server learned. Writes
``benchmarks/results/forecast_accuracy.{json,md}``.

    .venv/bin/python benchmarks/forecast_accuracy.py [--requests 96]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmco2_vllm.carbon.intensity import GridIntensity  # noqa: E402
from llmco2_vllm.carbon.static import StaticIntensity  # noqa: E402
from llmco2_vllm.dev.demo import WORKLOAD as DEMO_WORKLOAD  # noqa: E402
from llmco2_vllm.dev.local_server import LocalVllmServer  # noqa: E402
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics  # noqa: E402
from llmco2_vllm.dev.tiny_model import make_tiny_llama  # noqa: E402
from llmco2_vllm.predict.deployment import Deployment  # noqa: E402
from llmco2_vllm.predict.forecast import ForecastLearner, ForecastOutcome, RequestForecaster  # noqa: E402
from llmco2_vllm.predict.hardware import Hardware, find_gpu  # noqa: E402
from llmco2_vllm.predict.model_description import ModelDescription  # noqa: E402
from llmco2_vllm.predict.predictor import load_predictor  # noqa: E402
from llmco2_vllm.serve.carbon_service import CarbonService  # noqa: E402
from llmco2_vllm.serve.request_parsing import RequestShape  # noqa: E402
from llmco2_vllm.serve.results_store import RequestResultStore  # noqa: E402
from llmco2_vllm.settings import Settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HIGH, LOW = 600.0, 100.0
MAX_WAITING, PARKED, RELEASE_PER_SECOND = 800, 1000, 50.0


def prompt(length: int, salt: int) -> list[int]:
    return [(13 * i + 7 * salt) % 500 + 3 for i in range(length)]


def post(server: LocalVllmServer, body: dict, headers: dict | None = None, timeout: float = 300) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        server.base_url + "/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


def run_workload(server: LocalVllmServer, jobs: list[dict], clients: int) -> list[dict]:
    """Send the jobs from ``clients`` threads; then each one's forecast beside its actual."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(lambda body: post(server, {"model": "tiny-llama", **body})[2], jobs))
    rows = []
    for body, response in zip(jobs, responses):
        result = None
        for _ in range(200):  # actuals arrive with the engine's next publish
            result = server.get(f"/v1/carbon/requests/{response['id']}")
            if result["status"] == "finished":
                break
            time.sleep(0.05)
        forecast, actual = result["forecast"], result["actual"]
        rows.append({
            "prompt_tokens": len(body["prompt"]), "max_tokens": body["max_tokens"],
            "output_tokens": response["usage"]["completion_tokens"], "cached_tokens": actual["cached_tokens"],
            "forecast_energy_j": forecast["energy_j"], "low_j": forecast["energy_j_low"], "high_j": forecast["energy_j_high"],
            "actual_energy_j": actual["calibrated_energy_j"], "raw_energy_j": forecast["raw_energy_j"],
            "correction_samples": forecast["correction_samples"],
            "forecast_output_tokens": forecast["output_tokens"], "output_tokens_source": forecast["output_tokens_source"],
            "concurrent_requests": forecast["concurrent_requests"],
        })  # fmt: skip
    return rows


def summary(rows: list[dict]) -> dict:
    ratios = np.array([r["forecast_energy_j"] / r["actual_energy_j"] for r in rows])
    inside = [r["low_j"] <= r["actual_energy_j"] <= r["high_j"] for r in rows]
    return {
        "requests": len(rows),
        "median_ratio": float(np.median(ratios)),
        "p10_ratio": float(np.quantile(ratios, 0.1)),
        "p90_ratio": float(np.quantile(ratios, 0.9)),
        "within_0.8_1.25": float(np.mean((ratios >= 0.8) & (ratios <= 1.25))),
        "interval_coverage": float(np.mean(inside)),
        "median_interval_width": float(np.median([r["high_j"] / r["low_j"] for r in rows])),
        "point_inside_interval": all(r["low_j"] <= r["forecast_energy_j"] <= r["high_j"] for r in rows),
    }


def mixed_jobs(count: int, rng: random.Random, early_stop: bool) -> list[dict]:
    jobs = []
    for index in range(count):
        body = {"prompt": prompt(rng.randint(8, 400), index), "max_tokens": rng.randint(8, 160)}
        if early_stop:
            body.update(temperature=1.0, stop_token_ids=list(range(3, 11)), ignore_eos=False)
        else:
            body.update(temperature=0.0, ignore_eos=True)
        jobs.append(body)
    return jobs


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def park(server: LocalVllmServer, series: Path) -> dict:
    """1,000 deferrable requests at once; the grid turns clean once the line is full."""
    pid = server.process.pid  # ``vllm serve`` runs its API server in this process
    rss_before = rss_kib(pid)
    body = {"model": "tiny-llama", "prompt": prompt(16, 1), "max_tokens": 4, "ignore_eos": True, "temperature": 0.0}
    outcomes: list[tuple[int, float, str]] = []
    started = time.monotonic()

    def one(_: int) -> None:
        status, headers, reply = post(server, body, {"X-Llmco2-Deferrable": "120"}, timeout=600)
        outcomes.append((status, time.monotonic() - started, headers.get("x-llmco2-admission", headers.get("Retry-After", ""))))

    with concurrent.futures.ThreadPoolExecutor(PARKED) as pool:
        futures = [pool.submit(one, i) for i in range(PARKED)]
        waiting, rss_parked = 0.0, rss_before
        for _ in range(240):
            time.sleep(0.5)
            samples = parse_metrics(server.metrics_text())
            waiting = metric_sum(samples, "llmco2_admission_waiting_requests")
            rss_parked = max(rss_parked, rss_kib(pid))
            if waiting >= MAX_WAITING and len(outcomes) >= PARKED - MAX_WAITING:
                break
        parked_at = time.monotonic() - started
        series.write_text(f"timestamp,grams_co2e_per_kwh\n0,{HIGH}\n{time.time() - 1},{LOW}\n")  # the grid turns clean
        concurrent.futures.wait(futures)
    samples = parse_metrics(server.metrics_text())
    admitted = [at for status, at, _ in outcomes if status == 200]
    health = urllib.request.urlopen(server.base_url + "/health", timeout=10).status
    return {
        "parked": PARKED,
        "max_waiting": MAX_WAITING,
        "waiting_at_peak": waiting,
        "answered": len(outcomes),
        "admitted": len(admitted),
        "rejected_429": sum(1 for status, _, _ in outcomes if status == 429),
        "other_status": sorted({status for status, _, _ in outcomes if status not in (200, 429)}),
        "released_paced": metric_sum(samples, "llmco2_admission_released_requests_total", reason="condition_cleared"),
        "released_at_deadline": metric_sum(samples, "llmco2_admission_released_requests_total", reason="deadline_reached"),
        "release_seconds": (max(admitted) - parked_at) if admitted else None,
        "release_per_second_configured": RELEASE_PER_SECOND,
        "api_server_rss_mib_before": rss_before / 1024,
        "api_server_rss_mib_parked": rss_parked / 1024,
        "health_after": health,
    }


def forecast_latency(model_dir: Path, outcomes_from: list[dict], predictor_name: str) -> dict:
    """p50/p99 of one forecast in process, on the server's predictor, with what the server learned."""
    config = json.loads((model_dir / "config.json").read_text())
    model = ModelDescription.from_hf_config(config, name="tiny-llama", weight_dtype="float32", kv_cache_dtype="auto")
    settings = Settings()
    deployment = Deployment("tiny-llama", model, Hardware(find_gpu(settings.target_gpu), 1, 1, "configured"))
    try:
        predictor = load_predictor(predictor_name, deployment, in_server=True)
    except Exception as error:  # the distilled table needs torch-geometric to build
        print(f"predictor {predictor_name!r} not available here ({error}); timing the analytic one", flush=True)
        predictor_name, predictor = "analytic", load_predictor("analytic", deployment)
    forecaster = RequestForecaster(predictor, 1, settings.embodied().grams_per_gpu_second, settings.pue)
    with tempfile.TemporaryDirectory() as directory:
        store = RequestResultStore.in_directory(directory)
        service = CarbonService(settings, forecaster, store, StaticIntensity(GridIntensity(HIGH, "static", "average", None, "b")),
                                "tiny-llama", 1024)  # fmt: skip
        learner = ForecastLearner([
            ForecastOutcome(r["max_tokens"], r["output_tokens"], r["prompt_tokens"], r["cached_tokens"],
                            r["raw_energy_j"], r["forecast_energy_j"], r["low_j"], r["high_j"], r["actual_energy_j"], r["concurrent_requests"],
                            r["output_tokens_source"])
            for r in outcomes_from
        ])  # fmt: skip
        service._learned = (float("inf"), learner)  # what the server had learned; no store read while timing
        service._engine_state = (float("inf"), {"running_requests": 7, "mean_running_requests": 7.6, "step_token_budget": 128,
                                               "step_seconds": 0.02, "prefill_scale": 1.0, "decode_scale": 1.0,
                                               "calibrated_error": None})  # fmt: skip
        rng = random.Random(5)
        shapes = [RequestShape(rng.randint(8, 400), rng.randint(8, 160), 1, False, rng.random() < 0.5) for _ in range(2000)]
        now = time.time()
        running = tuple((now - rng.uniform(0, 2), rng.randint(8, 160), 1) for _ in range(7))  # seven running beside it
        timings = []
        for shape in shapes * 3:
            begin = time.perf_counter()
            service._forecast_shape(shape, True, running)
            timings.append(time.perf_counter() - begin)
        timings = np.array(timings[len(shapes):]) * 1e6  # the first pass warms caches
    return {"predictor": predictor_name, "p50_us": float(np.median(timings)), "p99_us": float(np.quantile(timings, 0.99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="requests per mixed phase")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-time the forecast on the committed run's outcomes (on a quiet host) and rewrite the report")  # fmt: skip
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmco2-forecast-"))
    model_dir = make_tiny_llama(workdir / "tiny-llama")
    if args.latency_only:
        report = json.loads((RESULTS / "forecast_accuracy.json").read_text())
        rows = report["rows"]["mixed"] + report["rows"]["mixed_early_stop"]
        report["latency"] = forecast_latency(model_dir, rows, report["predictor"])
        print("latency", json.dumps(report["latency"]), flush=True)
        (RESULTS / "forecast_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / "forecast_accuracy.md").write_text(markdown(report))
        return 0
    series = workdir / "intensity.csv"
    series.write_text(f"timestamp,grams_co2e_per_kwh\n0,{HIGH}\n")
    env = {
        "VLLM_PLUGINS": "llmco2",
        "LLMCO2_GRID_INTENSITY_FILE": str(series),
        "LLMCO2_ADMISSION_DEFER_ABOVE_INTENSITY": "500",
        "LLMCO2_ADMISSION_MAX_WAITING": str(MAX_WAITING),
        "LLMCO2_ADMISSION_RELEASE_PER_SECOND": str(RELEASE_PER_SECOND),
    }
    server_args = ["--max-num-batched-tokens", "128", "--max-num-seqs", "16", "--enable-prefix-caching", "--block-size", "32"]
    rng = random.Random(11)
    report: dict = {"server_args": server_args, "predictor": Settings().predictor}
    started = time.monotonic()
    with LocalVllmServer(model_dir, server_args, env=env, log_path=workdir / "serve.log", max_model_len=1024) as server:
        print(f"server ready in {time.monotonic() - started:.0f} s (log: {workdir / 'serve.log'})", flush=True)

        def demo_jobs() -> list[dict]:
            return [{"prompt": prompt(p, 0), "max_tokens": o, "ignore_eos": True, "temperature": 0.0} for p, o in DEMO_WORKLOAD]

        phases = {}
        phases["demo_cold"] = run_workload(server, demo_jobs(), 4)
        phases["mixed"] = run_workload(server, mixed_jobs(args.requests, rng, early_stop=False), 8)
        phases["mixed_early_stop"] = run_workload(server, mixed_jobs(args.requests, rng, early_stop=True), 8)
        phases["demo_warm"] = run_workload(server, demo_jobs(), 4)
        for name, rows in phases.items():
            report[name] = summary(rows)
            print(name, json.dumps(report[name]), flush=True)
        report["mixed_after_first_32"] = summary(phases["mixed"][32:])
        learned = [r for r in phases["mixed_early_stop"] if r["output_tokens_source"] == "learned"]
        report["mixed_early_stop_learned"] = summary(learned) if learned else None
        samples = parse_metrics(server.metrics_text())
        report["server_forecast_error_ratio"] = metric_sum(samples, "llmco2_forecast_error_ratio")
        report["server_interval_coverage_ratio"] = metric_sum(samples, "llmco2_forecast_interval_coverage_ratio")
        report["early_stop_share"] = float(np.mean([r["output_tokens"] < r["max_tokens"] for r in phases["mixed_early_stop"]]))
        report["parking"] = park(server, series)
        print("parking", json.dumps(report["parking"]), flush=True)
    report["latency"] = forecast_latency(model_dir, phases["mixed"] + phases["mixed_early_stop"], Settings().predictor)
    print("latency", json.dumps(report["latency"]), flush=True)
    report["rows"] = phases
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "forecast_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "forecast_accuracy.md").write_text(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        "# Forecast accuracy and admission under abuse (real `vllm serve`, tiny model, CPU)",
        "",
        "Written by `benchmarks/forecast_accuracy.py` (raw rows in `forecast_accuracy.json`). Ratio = the",
        "forecast at arrival / the energy the engine attributed to the request (`calibrated_energy_j`).",
        f"Server: `{' '.join(report['server_args'])}`, predictor `{report['predictor']}`.",
        "",
        "| workload | requests | median forecast/actual | p10-p90 | within x0.8-1.25 | actual inside 80 % interval | median high/low | point inside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "demo_cold": "`make demo` workload, fresh server (prior only)",
        "mixed": "mixed 8-400 / 8-160, 8 clients (from the first request)",
        "mixed_after_first_32": "the same, after its first 32 requests",
        "mixed_early_stop": f"mixed, output unknown (stop tokens; {report['early_stop_share']:.0%} stopped early)",
        "mixed_early_stop_learned": "the same, its requests priced with learned output lengths",
        "demo_warm": "`make demo` workload after learning",
    }
    for key, label in names.items():
        s = report.get(key)
        if s is None:
            continue
        lines.append(
            f"| {label} | {s['requests']} | {s['median_ratio']:.2f} | {s['p10_ratio']:.2f}-{s['p90_ratio']:.2f} | "
            f"{s['within_0.8_1.25']:.0%} | {s['interval_coverage']:.0%} | {s['median_interval_width']:.2f} | "
            f"{'yes' if s['point_inside_interval'] else 'NO'} |"
        )
    p, lat = report["parking"], report["latency"]
    lines += [
        "",
        f"Server's own metrics at the end: `llmco2_forecast_error_ratio` {report['server_forecast_error_ratio']:.3f}, "
        f"`llmco2_forecast_interval_coverage_ratio` {report['server_interval_coverage_ratio']:.3f}.",
        "",
        f"**Parking**: {p['parked']} deferrable requests at once, cap {p['max_waiting']}: {p['waiting_at_peak']:.0f} waited, "
        f"{p['rejected_429']} got 429 with Retry-After, {p['admitted']} admitted ({p['released_paced']:.0f} released paced at "
        f"{p['release_per_second_configured']:g}/s, oldest first, {p['released_at_deadline']:.0f} at their deadline), "
        f"{p['answered']}/{p['parked']} answered, other statuses {p['other_status'] or 'none'}; release took "
        f"{p['release_seconds']:.1f} s. API server memory {p['api_server_rss_mib_before']:.0f} MiB before, "
        f"{p['api_server_rss_mib_parked']:.0f} MiB at most while parked; `/health` {p['health_after']} after.",
        "",
        f"**Forecast latency** (in process, predictor `{lat['predictor']}`, with the learned state): "
        f"p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us (target <= 200 us).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
