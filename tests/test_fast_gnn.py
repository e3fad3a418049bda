"""The plugin's GNN predictor: a table distilled in a child process, no torch in vLLM's processes."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from llmco2_vllm.predict.deployment import Deployment
from llmco2_vllm.predict.gnn.distilled import DistilledGnnPredictor
from llmco2_vllm.predict.gnn.table import CorrectionTable
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.predictor import AnalyticPredictor, load_predictor
from llmco2_vllm.predict.step_shape import StepShape

HARDWARE = Hardware(find_gpu("H100"), 1, 1, "configured")


def test_distilled_in_a_child_process_without_torch_here():
    # A fresh interpreter, as in vLLM's engine process: building the predictor must not import torch.
    code = (
        "import sys, json\n"
        "from llmco2_vllm.predict.model_description import load_model\n"
        "from llmco2_vllm.predict.hardware import Hardware, find_gpu\n"
        "from llmco2_vllm.predict.predictor import load_predictor\n"
        "from llmco2_vllm.predict.deployment import Deployment\n"
        "p = load_predictor('gnn', Deployment('llama', load_model('meta-llama/Llama-3.1-8B-Instruct'), "
        "Hardware(find_gpu('H100'), 1, 1, 'configured')), in_server=True)\n"
        "print(json.dumps({'name': p.name, 'torch': 'torch' in sys.modules, 'table': p.table.to_json()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {**result, "name": "gnn", "torch": False}
    table = CorrectionTable.from_json(result["table"])
    model = load_model("meta-llama/Llama-3.1-8B-Instruct")
    fast = DistilledGnnPredictor(model, HARDWARE, table=table)
    analytic = AnalyticPredictor(model, HARDWARE)

    # Same numbers as the full GNN's own fast path (same checkpoint, same table).
    from llmco2_vllm.predict.gnn.model import GnnPredictor

    full = GnnPredictor(model, HARDWARE)
    assert fast.static_batch(8, 500, 200) == pytest.approx(full.static_batch(8, 500, 200), rel=1e-9)
    low, high = fast.ratio_range
    assert low <= 1.0 <= high

    # A step: prefill and decode parts each scaled by the table's factor, weights untouched.
    step = StepShape.static_batch_decode(16, 1000)
    scaled, base = fast.predict_step(step), analytic.predict_step(step)
    factor = math.exp(table.log_factor(1, 16, 1000))
    assert scaled.decode_energy_j == pytest.approx(base.decode_energy_j * factor)
    assert scaled.decode_seconds == pytest.approx(base.decode_seconds * factor)
    assert (scaled.request_decode_weights == base.request_decode_weights).all()
    prefill = StepShape.static_batch_prefill(4, 512)
    assert fast.predict_step(prefill).prefill_energy_j == pytest.approx(
        analytic.predict_step(prefill).prefill_energy_j * math.exp(table.log_factor(0, 4, 512))
    )


def test_architecture_the_graph_cannot_express_falls_back_to_analytic():
    base = load_model("deepseek-ai/DeepSeek-V3.1")
    unsupported = dataclasses.replace(base, sliding_window=4096, num_sliding_window_layers=4)  # MLA + sliding window
    hardware = Hardware(find_gpu("H100"), 8, 8, "configured")
    with pytest.warns(RuntimeWarning, match="falling back to the analytic predictor"):
        predictor = load_predictor("gnn", Deployment("unsupported", unsupported, hardware), in_server=True)
    assert predictor.name == "analytic-fallback" and predictor.is_fallback and predictor.ratio_range is None
    step = StepShape.static_batch_decode(4, 100)
    assert predictor.predict_step(step).energy_j == AnalyticPredictor(unsupported, hardware).predict_step(step).energy_j


def test_table_is_distilled_once_per_run_directory_and_shared(tmp_path, monkeypatch):
    """The engine's worker and every API server ask at start-up; one child process distils, the others read."""
    import threading

    from llmco2_vllm.predict.gnn import distilled

    calls = []
    real_distil = distilled._distil

    def counting_distil(deployment):
        calls.append(deployment.fingerprint)
        return real_distil(deployment)

    monkeypatch.setattr(distilled, "_distil", counting_distil)
    deployment = Deployment("llama", load_model("meta-llama/Llama-3.1-8B-Instruct"), HARDWARE)
    tables: list = []
    starters = [
        threading.Thread(target=lambda: tables.append(distilled.distil_in_child_process(deployment, str(tmp_path))))
        for _ in range(3)
    ]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join(300)
    assert len(calls) == 1 and len(tables) == 3
    assert all(table.to_json() == tables[0].to_json() for table in tables)
    assert (tmp_path / f"gnn-table-{deployment.fingerprint}.json").exists()
    # Another GPU is another deployment: distilled on its own.
    other = Deployment("llama", deployment.model, Hardware(find_gpu("A100"), 1, 1, "configured"))
    distilled.distil_in_child_process(other, str(tmp_path))
    assert len(calls) == 2


def test_a_failed_distillation_is_shared_too(tmp_path, monkeypatch):
    from llmco2_vllm.predict.gnn import distilled

    calls = []

    def failing_distil(deployment):
        calls.append(1)
        raise RuntimeError("distilling the GNN failed: injected")

    monkeypatch.setattr(distilled, "_distil", failing_distil)
    deployment = Deployment("llama", load_model("meta-llama/Llama-3.1-8B-Instruct"), HARDWARE)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="injected"):
            distilled.distil_in_child_process(deployment, str(tmp_path))
    assert calls == [1]
