"""`llmco2 eval`: the fitted model's cross-validation report on measured vLLM serving (smoke-sized run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmco2_vllm.cli import main
from llmco2_vllm.predict.fitted import FittedModel
from llmco2_vllm.predict.serving_evaluation import EvaluationData, schemes

pytest.importorskip("scipy")


def test_eval_quick_scores_every_row_beside_the_baselines(tmp_path, capsys) -> None:
    assert main(["eval", "--quick", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    data = EvaluationData.load()
    by_name = {s.name: s for s in schemes(data)}
    lomo = result["summary"]["leave-one-model-out (v3, H100)"]
    v3_rows = sum(1 for m in data.measurements if m.dataset == "mlenergy_v3")
    # every v3 row is predicted once by every column, and the same rows are scored for each
    for name in ("fitted", "linear (NNLS)", "analytic", "ecologits"):
        assert lomo[name]["n"] == v3_rows == len(by_name["leave-one-model-out (v3, H100)"].test), name
    assert lomo["fitted"]["mape"] < lomo["analytic"]["mape"]
    report = (tmp_path / "model_eval.md").read_text(encoding="utf-8")
    assert "QUICK SMOKE RUN" in report and "## Where the fitted model loses" in report
    for model in {m.model for m in data.measurements if m.dataset == "mlenergy_v3"}:
        assert f"| {model} | fitted |" in report
    written = FittedModel.from_json((tmp_path / "fitted_model.json").read_text(encoding="utf-8"))
    assert np.isfinite(list(written.parameters.values())).all()
    for png in ("model_eval_scatter.png", "model_eval_cdf.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prior_strength_is_chosen_by_inner_cross_validation_on_the_training_rows_alone() -> None:
    from llmco2_vllm.predict import fitted
    from llmco2_vllm.predict.serving_evaluation import fitted_learner, select_prior_strength

    data = EvaluationData.load()
    models = sorted({m.model for m in data.measurements if m.dataset == "mlenergy_v3"})[:5]
    train = [i for i, m in enumerate(data.measurements) if m.model in models[1:]]
    test = [i for i, m in enumerate(data.measurements) if m.model == models[0] and m.dataset == "mlenergy_v3"]
    strength, (low, middle, high), scores = select_prior_strength(data, train, folds=2, dataset="mlenergy_v3")
    assert set(scores) == set(fitted.PRIOR_STRENGTHS) and strength in scores
    assert scores[strength] == min(scores.values())
    assert low <= middle <= high
    # Nothing of the held-out model informs the choice: its rows may change freely.
    changed = EvaluationData(data.measurements, list(data.rows), data.skipped)
    for i in test:
        changed.rows[i] = fitted.FitRow(changed.rows[i].terms, changed.rows[i].software, changed.rows[i].gpu, 1.0, 1.0)
    assert select_prior_strength(changed, train, folds=2, dataset="mlenergy_v3")[0] == strength
    predicted = fitted_learner(data, train, test)
    assert (predicted["low"] <= predicted["energy"]).all() and (predicted["energy"] <= predicted["high"]).all()
    # the learner's own choice (its inner folds: INNER_FOLDS groups of models), one for the fold
    assert len(set(predicted["prior_strength"])) == 1 and predicted["prior_strength"][0] in fitted.PRIOR_STRENGTHS
