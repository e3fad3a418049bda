"""The plugin's GNN predictor: a table distilled in a child process, no torch in vLLM's processes."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from llmco2_vllm.fast_gnn import CorrectionTable, DistilledGnnPredictor
from llmco2_vllm.hardware import Hardware, find_gpu
from llmco2_vllm.model_description import load_model
from llmco2_vllm.predictor import AnalyticPredictor, load_predictor
from llmco2_vllm.step_shape import StepShape

HARDWARE = Hardware(find_gpu("H100"), 1, 1, "configured")


def test_distilled_in_a_child_process_without_torch_here():
    # A fresh interpreter, as in vLLM's engine process: building the predictor must not import torch.
    code = (
        "import sys, json\n"
        "from llmco2_vllm.model_description import load_model\n"
        "from llmco2_vllm.hardware import Hardware, find_gpu\n"
        "from llmco2_vllm.predictor import load_predictor\n"
        "p = load_predictor('gnn', load_model('meta-llama/Llama-3.1-8B-Instruct'), "
        "Hardware(find_gpu('H100'), 1, 1, 'configured'), in_server=True)\n"
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
    from llmco2_vllm.gnn import GnnPredictor

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
        predictor = load_predictor("gnn", unsupported, hardware, in_server=True)
    assert predictor.name == "analytic-fallback" and predictor.is_fallback and predictor.ratio_range is None
    step = StepShape.static_batch_decode(4, 100)
    assert predictor.predict_step(step).energy_j == AnalyticPredictor(unsupported, hardware).predict_step(step).energy_j
