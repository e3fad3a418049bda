"""Cross-validated accuracy of the GNN predictor vs the baselines, on the same real rows.

Run: ``.venv/bin/python benchmarks/gnn_eval.py [--members 2] [--epochs 25] [--quick]``
(the same as ``llmco2 eval-gnn --out benchmarks/results``). Writes ``benchmarks/results/gnn_eval.md``,
``gnn_eval_scatter.png`` and ``gnn_eval_cdf.png``. The logic lives in ``llmco2_vllm/predict/gnn/evaluation.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmco2_vllm.cli import main  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    raise SystemExit(main(["eval-gnn", *(args if "--out" in args else ["--out", str(RESULTS), *args])]))
