"""`llmco2 eval-gnn`: the GNN's cross-validation report on the packaged static-batch rows (smoke-sized run)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch_geometric")
pytest.importorskip("matplotlib")

from llmco2_vllm.cli import main  # noqa: E402
from llmco2_vllm.predict import baselines  # noqa: E402
from llmco2_vllm.predict.measurements import load_measurements  # noqa: E402


def test_eval_help_needs_no_torch() -> None:
    code = ("import sys\nfrom llmco2_vllm.cli import main\ntry:\n    main(['eval-gnn', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'eval-gnn --help imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout


def test_eval_quick_writes_report_and_plots(tmp_path, capsys) -> None:
    assert main(["eval-gnn", "--quick", "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = load_measurements()
    assert summary["rows"] == len(rows) and summary["quick"] and summary["epochs"] == 3
    overall = summary["overall"]
    # every row is predicted exactly once in each CV scheme (no fold leaves a row out)
    assert overall["gnn (leave-GPU-out)"]["n"] == overall["gnn (leave-family-out)"]["n"] == len(rows)
    # the baselines are scored on the same rows: recompute the analytic MAPE independently
    meas = np.array([r["energy_j"] for r in rows])
    analytic = np.array([baselines.analytic(r) for r in rows])
    assert overall["analytic"]["mape"] == pytest.approx(100 * np.mean(np.abs(analytic - meas) / meas))
    for name in ("llmcarbon", "ecologits", "ecologits_row_gpus"):
        assert overall[name]["n"] == len(rows)
    report = (tmp_path / "gnn_eval.md").read_text(encoding="utf-8")
    assert "QUICK SMOKE RUN" in report
    for heading in ("## Per held-out GPU", "## Per held-out model family", "## Per model", "## Where the learned"):
        assert heading in report
    for gpu in {r["gpu"] for r in rows}:
        assert f"| {gpu} | gnn (leave-GPU-out) |" in report
    # a fold whose test rows run on a GPU absent from its training rows (every leave-GPU-out fold, and a
    # family whose rows are the only ones on some GPU) chooses the unseen-hardware scale by an inner CV
    from llmco2_vllm.predict.measurements import model_family

    gpus = {r["gpu"] for r in rows}
    families = {model_family(r["model"]) for r in rows}
    family_folds_with_unseen_gpu = sum(
        1 for f in families if {r["gpu"] for r in rows if model_family(r["model"]) == f}
        - {r["gpu"] for r in rows if model_family(r["model"]) != f})
    assert family_folds_with_unseen_gpu >= 1  # qwen is the only family measured on GH200
    assert report.count("unseen-hardware scale chosen on the training rows") == len(gpus) + family_folds_with_unseen_gpu
    for png in ("gnn_eval_scatter.png", "gnn_eval_cdf.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
