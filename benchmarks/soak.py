"""Soak: 10,000 requests through a real ``vllm serve`` with the plugin; memory over time and exact counters.

Run: ``.venv/bin/python benchmarks/soak.py`` (``--requests 500`` for a smoke run). Writes
``benchmarks/results/soak.md``, ``soak.json`` and ``soak.png``.

A real ``vllm serve`` (``LocalVllmServer``: tiny random-weight Llama, CPU, 127.0.0.1) with the plugin as
installed. A client pool with bounded concurrency sends seeded completions of mixed lengths (short prompts
and outputs: the soak is about memory and counters, not speed; a fifth of the prompts repeat one of a few
long prefixes so the prefix cache hits). A sampler records, every ``--sample-seconds``, the resident memory
(RSS) of the API server and of each of its descendants (the EngineCore, where the plugin's step hook and
forwarding thread live, and the plugin's worker process, where its ledger and registry live), the requests
completed, and the size of the plugin's part of ``/metrics``.

At the end it waits for the plugin's last publish and checks, exactly, the identities of
``tests/test_vllm_serve.py`` against vLLM's own counters, plus: every request sent succeeded, vLLM counted
each once, the plugin finished each once, and no step was dropped, no request evicted, no error counted.
Memory is judged flat from the slope of a straight-line fit to RSS over the second half of the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
SERVER_ARGS = ["--max-num-batched-tokens", "256", "--max-num-seqs", "32", "--enable-prefix-caching", "--block-size", "32"]


def jobs(requests: int) -> list[tuple[list[int], int]]:
    rng = random.Random(SEED)
    prefixes = [[rng.randrange(3, 500) for _ in range(96)] for _ in range(4)]
    out = []
    for _ in range(requests):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(2, 48))]
        if rng.random() < 0.2:
            prompt = rng.choice(prefixes) + prompt[:8]
        out.append((prompt, rng.randint(1, 16)))
    return out


def process_tree_rss(pid: int) -> dict[str, float]:
    """RSS in MiB of the server process and each descendant, keyed by a stable name."""
    import psutil

    root = psutil.Process(pid)
    sizes = {"api_server": root.memory_info().rss / 2**20}
    for child in root.children(recursive=True):
        try:
            name = "llmco2-worker" if "llmco2_vllm.accounting.worker" in " ".join(child.cmdline()) else child.name()
            sizes[f"{name}[{child.pid}]"] = child.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return sizes


def plugin_exposition(text: str) -> tuple[int, int]:
    lines = [line for line in text.splitlines() if "llmco2_" in line and not line.startswith("#")]
    return len(lines), sum(len(line) + 1 for line in lines)


def slope_per_1000_requests(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (requests done, MiB) in MiB per 1000 requests."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(xs) < 3 or max(xs) == min(xs):
        return float("nan")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--render", type=Path, default=None, help="re-render the markdown and plot from a result JSON")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        plot(report, RESULTS / "soak.png")
        (RESULTS / "soak.md").write_text(render(report), encoding="utf-8")
        return 0

    from llmco2_vllm.dev.local_server import LocalVllmServer
    from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics
    from llmco2_vllm.dev.tiny_model import make_tiny_llama

    model_dir = make_tiny_llama(Path(tempfile.gettempdir()) / "llmco2-bench-tiny-llama")
    work = jobs(args.requests)
    log_path = Path(tempfile.mkdtemp(prefix="llmco2-soak-")) / "serve.log"
    samples: list[dict] = []
    done = {"ok": 0, "failed": 0, "completion_tokens": 0, "errors": []}
    lock = threading.Lock()
    stop = threading.Event()
    load = [os.getloadavg()[0]]

    started_all = time.perf_counter()
    with LocalVllmServer(model_dir, SERVER_ARGS, log_path=log_path, startup_timeout_seconds=300) as server:
        ready_seconds = time.perf_counter() - started_all
        assert server.process is not None
        pid = server.process.pid

        def sample() -> None:
            while True:
                try:
                    rss = process_tree_rss(pid)
                    series, size = plugin_exposition(server.metrics_text())
                    with lock:
                        completed = done["ok"] + done["failed"]
                    samples.append({
                        "t": time.perf_counter() - t0, "requests_done": completed, "rss_mib": rss,
                        "plugin_series": series, "plugin_bytes": size, "load_1min": os.getloadavg()[0],
                    })  # fmt: skip
                except Exception as error:  # the soak goes on; a missing sample shows in the plot
                    print(f"sample failed: {error!r}", file=sys.stderr)
                if stop.wait(args.sample_seconds):
                    return

        def send(job: tuple[list[int], int]) -> None:
            prompt, max_tokens = job
            try:
                result = server.complete(prompt, max_tokens)
                ok = result["usage"]["completion_tokens"] == max_tokens
                with lock:
                    done["ok" if ok else "failed"] += 1
                    done["completion_tokens"] += result["usage"]["completion_tokens"]
            except Exception as error:
                with lock:
                    done["failed"] += 1
                    if len(done["errors"]) < 5:
                        done["errors"].append(repr(error))

        t0 = time.perf_counter()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            for i, _ in enumerate(pool.map(send, work)):
                if (i + 1) % 1000 == 0:
                    print(f"{i + 1} requests, {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                    load.append(os.getloadavg()[0])
        traffic_seconds = time.perf_counter() - t0
        # The engine publishes every flush interval: wait for the plugin to have finished every request.
        deadline = time.monotonic() + 60
        while True:
            final = parse_metrics(server.metrics_text())
            if metric_sum(final, "llmco2_requests_total") >= done["ok"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.5)  # one more flush, so idle-time windows and gauges settle
        final = parse_metrics(server.metrics_text())
        stop.set()
        sampler.join()
        samples.append({"t": time.perf_counter() - t0, "requests_done": done["ok"] + done["failed"],
                        "rss_mib": process_tree_rss(pid), **dict(zip(("plugin_series", "plugin_bytes"),
                        plugin_exposition(server.metrics_text()))), "load_1min": os.getloadavg()[0]})  # fmt: skip
    log_text = log_path.read_text(errors="replace")

    def m(name: str, **labels: str) -> float:
        return metric_sum(final, name, **labels)

    prefill, decode, cached = (m("llmco2_tokens_total", phase=p) for p in ("prefill", "decode", "cached"))
    checks = [
        ("requests sent", args.requests, done["ok"] + done["failed"]),
        ("requests succeeded with all their tokens", args.requests, done["ok"]),
        ("vllm:request_success_total", args.requests, m("vllm:request_success_total")),
        ("llmco2_requests_total", args.requests, m("llmco2_requests_total")),
        ("llmco2_request_energy_joules_count", args.requests, m("llmco2_request_energy_joules_count")),
        ("llmco2 prefill tokens = vllm local_compute prompt tokens", m("vllm:prompt_tokens_by_source_total", source="local_compute"), prefill),
        ("llmco2 cached tokens = vllm local_cache_hit prompt tokens", m("vllm:prompt_tokens_by_source_total", source="local_cache_hit"), cached),
        ("llmco2 prefill + cached = vllm:prompt_tokens_total", m("vllm:prompt_tokens_total"), prefill + cached),
        ("llmco2 decode + requests = vllm:generation_tokens_total", m("vllm:generation_tokens_total"), decode + m("llmco2_requests_total")),
        ("completion tokens the client received = vllm:generation_tokens_total", done["completion_tokens"], m("vllm:generation_tokens_total")),
        ("llmco2_plugin_errors_total", 0, m("llmco2_plugin_errors_total")),
        ("llmco2_dropped_steps_total", 0, m("llmco2_dropped_steps_total")),
        ("llmco2_evicted_requests_total", 0, m("llmco2_evicted_requests_total")),
        ("vllm:num_preemptions_total (identities assume none)", 0, m("vllm:num_preemptions_total")),
    ]
    energy = sum(m("llmco2_energy_joules_total", source="predicted", phase=p) for p in ("prefill", "decode"))
    energy_match = abs(m("llmco2_request_energy_joules_sum") - energy) <= 1e-6 * energy
    all_exact = all(expected == got for _, expected, got in checks) and energy_match

    # Memory: per process, first sample after 10 % of the requests vs the last, and the slope over the second half.
    memory = {}
    names = sorted({name for s in samples for name in s["rss_mib"]})
    for name in names:
        points = [(s["requests_done"], s["rss_mib"][name]) for s in samples if name in s["rss_mib"]]
        warm = [p for p in points if p[0] >= 0.1 * args.requests] or points
        half = [p for p in points if p[0] >= 0.5 * args.requests]
        memory[name] = {
            "start_mib": points[0][1], "after_10pct_mib": warm[0][1], "end_mib": points[-1][1],
            "max_mib": max(p[1] for p in points),
            "slope_second_half_mib_per_1000_requests": slope_per_1000_requests(half),
        }  # fmt: skip
    report = {
        "command": " ".join(["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "system": f"{platform.system()} {platform.release()}",
                    "load_1min": {"min": min(load + [s["load_1min"] for s in samples]), "max": max(load + [s["load_1min"] for s in samples])}},
        "requests": args.requests, "concurrency": args.concurrency, "server_args": SERVER_ARGS,
        "server_ready_seconds": ready_seconds, "traffic_seconds": traffic_seconds,
        "client_errors": done["errors"], "checks": checks, "energy_sum_matches": energy_match, "all_exact": all_exact,
        "memory": memory, "samples": samples,
        "plugin_log_errors": [line for line in log_text.splitlines() if "llmco2" in line and ("ERROR" in line or "Traceback" in line)],
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(report, RESULTS / "soak.png")
    text = render(report)
    (RESULTS / "soak.md").write_text(text, encoding="utf-8")
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0 if all_exact else 1


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, mem in report["memory"].items():
        points = [(s["requests_done"], s["rss_mib"][name] - mem["start_mib"]) for s in samples if name in s["rss_mib"]]
        axes[0].plot([p[0] for p in points], [p[1] for p in points], label=f"{name} (start {mem['start_mib']:.0f} MiB)")
    axes[0].axvline(10_000, color="grey", lw=0.8, ls="--", label="10,000 finished: plugin's bounded deque full")
    axes[0].set_xlabel("requests done")
    axes[0].set_ylabel("RSS change since start (MiB)")
    axes[0].set_title("Resident memory of the vllm serve processes")
    axes[0].legend(fontsize=7)
    axes[1].plot([s["requests_done"] for s in samples], [s["plugin_bytes"] / 1024 for s in samples], color="tab:orange")
    axes[1].set_ylim(0, max(s["plugin_bytes"] for s in samples) / 1024 * 1.2)
    axes[1].set_xlabel("requests done")
    axes[1].set_ylabel("KiB")
    axes[1].set_title("Size of the plugin's part of /metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(report: dict) -> str:
    mc = report["machine"]
    lines = [
        "# llmco2-vllm: soak through a real vllm serve",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {mc['cores']} CPU cores, Python {mc['python']}, {mc['system']}; shared with other developers, "
        f"1-min load average {mc['load_1min']['min']:.2f}-{mc['load_1min']['max']:.2f} during the run.",
        "",
        f"{report['requests']} completions (seed {SEED}; prompts 2-48 random tokens, a fifth behind one of 4 shared "
        f"96-token prefixes; 1-16 output tokens, `ignore_eos`) at concurrency {report['concurrency']} through "
        f"`vllm serve` (tiny 2-layer Llama, CPU, `{' '.join(report['server_args'])}`), plugin on with its defaults. "
        f"Server ready in {report['server_ready_seconds']:.0f} s; traffic took {report['traffic_seconds']:.0f} s "
        f"({report['requests'] / report['traffic_seconds']:.1f} requests/s).",
        "",
        "## Counters at the end (exact equality required)",
        "",
        "| check | expected | got | |",
        "|---|---:|---:|---|",
    ]
    for name, expected, got in report["checks"]:
        lines.append(f"| {name} | {expected:.0f} | {got:.0f} | {'ok' if expected == got else '**MISMATCH**'} |")
    lines += [
        f"| sum of per-request energy = predicted prefill + decode energy (rel. 1e-6) | | | {'ok' if report['energy_sum_matches'] else '**MISMATCH**'} |",
        "",
        f"All exact: **{'yes' if report['all_exact'] else 'no'}**. Client errors: {report['client_errors'] or 'none'}. "
        f"Plugin error lines in the server log: {len(report['plugin_log_errors'])}.",
        "",
        "## Memory (RSS, MiB)",
        "",
        "The plugin's step hook and forwarding thread live in the EngineCore process; everything else (ledger, "
        "registry, calibration) in `llmco2-worker`, the plugin's worker process; the API server holds the /metrics "
        "bridge and the stat logger; `VLLM::Worker` is vLLM's model runner (no plugin code). By design the plugin "
        "keeps the last 10,000 finished requests (`EnginePipeline.finished`, a bounded deque, a few MiB), so the "
        "worker's memory may grow until 10,000 requests have finished and must be flat after.",
        "",
        "| process | at start | after 10 % of requests | end | max | slope over 2nd half (MiB / 1000 requests) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, mem in report["memory"].items():
        lines.append(
            f"| {name} | {mem['start_mib']:.1f} | {mem['after_10pct_mib']:.1f} | {mem['end_mib']:.1f} | {mem['max_mib']:.1f} "
            f"| {mem['slope_second_half_mib_per_1000_requests']:+.3f} |"
        )
    sizes = [s["plugin_series"] for s in report["samples"]]
    byte_sizes = [s["plugin_bytes"] for s in report["samples"]]
    lines += [
        "",
        f"Plugin series on /metrics: {min(sizes)}-{max(sizes)} lines, {min(byte_sizes)}-{max(byte_sizes)} bytes over "
        f"{len(report['samples'])} samples (no per-request series).",
        "",
        "![RSS over time, progress and /metrics size](soak.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
