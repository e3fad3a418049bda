"""Cross-validated accuracy of the fitted time and power model vs the per-kernel GNN and the baselines.

Run: ``.venv/bin/python benchmarks/model_eval.py`` (the same as ``llmco2 eval --out benchmarks/results``;
about 10 CPU minutes). Writes ``benchmarks/results/model_eval.md`` / ``.json``, ``model_eval_scatter.png``,
``model_eval_cdf.png`` and ``fitted_model.json`` (the shipped parameters: ``make model`` copies it into
``llmco2_vllm/data/``). The logic lives in ``llmco2_vllm/predict/serving_evaluation.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmco2_vllm.cli import main  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    raise SystemExit(main(["eval", *(args if "--out" in args else ["--out", str(RESULTS), *args])]))
