"""A real two-node engine on one machine: ``vllm serve --nnodes 2`` (TP 2, one CPU worker per "node")
on 127.0.0.1, each node with its own scripted NVML. The engine meters its node's GPU; the worker on
the other node meters its own and reports it; /metrics shows both, at their scripted power."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmco2_vllm.dev.local_server import CPU_ENVIRONMENT, LocalVllmServer, free_port
from llmco2_vllm.dev.prometheus_text import metric_sum, parse_metrics
from tests.support import REPO_ROOT

pytestmark = pytest.mark.server

NODE_GPUS = {
    0: [{"uuid": "GPU-node0-a", "watts": 100.0}, {"uuid": "GPU-node0-b", "watts": 900.0}],
    1: [{"uuid": "GPU-node1-a", "watts": 150.0}, {"uuid": "GPU-node1-b", "watts": 900.0}],
}


def _node_env(tmp_path, node: int, rank_port: int) -> dict[str, str]:
    script = tmp_path / f"node{node}-nvml.json"
    script.write_text(json.dumps({"gpus": NODE_GPUS[node]}))
    return {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests/support/scripted_nvml"), os.environ.get("PYTHONPATH", "")]),
        "SCRIPTED_NVML_FILE": str(script),
        "LLMCO2_CALIBRATION_WINDOW_SECONDS": "1",
        "LLMCO2_RANK_ENERGY_PORT": str(rank_port),
    }


def test_gpus_on_both_nodes_are_metered(tiny_model_dir, tmp_path):
    master_port, rank_port = free_port(), free_port()
    common = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    headless = subprocess.Popen(
        [sys.executable, "-m", "llmco2_vllm.dev.local_server", "serve", str(tiny_model_dir), "--skip-tokenizer-init",
         "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", *common, "--node-rank", "1", "--headless"],
        env={**os.environ, **CPU_ENVIRONMENT, **_node_env(tmp_path, 1, rank_port)},
        stdout=open(tmp_path / "node1.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        server = LocalVllmServer(tiny_model_dir, [*common, "--node-rank", "0"], env=_node_env(tmp_path, 0, rank_port),
                                 log_path=tmp_path / "node0.log")  # fmt: skip
        with server:
            for _ in range(3):
                server.complete([1, 2, 3, 4, 5, 6, 7, 8], 8, ignore_eos=True)
            deadline = time.monotonic() + 60
            while True:
                samples = parse_metrics(server.metrics_text())
                power = {
                    dict(labels)["gpu_uuid"]: value
                    for (name, labels), value in samples.items()
                    if name == "llmco2_gpu_power_watts"
                }
                finished = metric_sum(samples, "llmco2_requests_total") == 3
                if (len(power) >= 2 and finished) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            # Each node's own GPU of the engine, at its scripted power; never the other GPU of a node.
            assert set(power) == {"GPU-node0-a", "GPU-node1-a"}, (tmp_path / "node0.log").read_text()[-3000:]
            assert power["GPU-node0-a"] == pytest.approx(100.0, rel=0.15)
            assert power["GPU-node1-a"] == pytest.approx(150.0, rel=0.15)
            measured = metric_sum(samples, "llmco2_energy_joules_total", source="measured")
            per_gpu = metric_sum(samples, "llmco2_gpu_energy_joules_total")
            assert measured == pytest.approx(per_gpu, rel=1e-6)
            assert metric_sum(samples, "llmco2_requests_total") == 3
    finally:
        try:
            os.killpg(headless.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        headless.wait()
