"""`llmco2 calibrate` on the fitted model's terms: the CSV contract, shape (not only scale) correction, the file."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from llmco2_vllm.cli import main
from llmco2_vllm.predict import term_calibration
from llmco2_vllm.predict.batch_predict import BatchPredictor, BatchRow
from llmco2_vllm.predict.calibration import CalibrationFileError, OnlineCalibrator
from llmco2_vllm.predict.fitted import FittedModel, FittedPredictor, shipped_model
from llmco2_vllm.predict.hardware import find_gpu
from llmco2_vllm.predict.step_shape import StepShape
from llmco2_vllm.predict.step_terms import StepTerms

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SHAPES = [(1, 200, 300), (4, 800, 200), (16, 300, 300), (64, 1500, 100), (128, 200, 400), (256, 100, 200),
          (8, 3000, 50), (32, 500, 600)]  # fmt: skip
CALIBRATION_SHAPES, HELD_OUT = SHAPES[:4] + SHAPES[5:6], SHAPES[4:5] + SHAPES[6:]


def truth() -> FittedModel:
    """A deployment unlike the shipped model in shape: slower per sequence, a different power mix."""
    model = shipped_model()
    changed = dict(model.parameters)
    changed["sequence_seconds@vllm-0.11.1"] *= 4.0
    changed["step_seconds@vllm-0.11.1"] *= 0.6
    changed["memory_activity@vllm-0.11.1"] *= 0.8
    return FittedModel(changed, model.software, model.energy_log_quantiles)


def measured(shape: tuple[int, int, int], model: str = MODEL, time_factor: float = 1.0) -> tuple[float, float]:
    """(seconds, J) of a static batch under the truth (``time_factor``: this model alone that much slower)."""
    row = BatchRow(model, "H100", 1, 1, 1, *shape)
    deployment = row.deployment()
    parameters = truth().for_model("", (time_factor, 1.0))
    predictor = FittedPredictor(deployment.model, deployment.hardware, parameters=parameters)
    prefill_s, prefill_j, decode_s, decode_j = predictor.static_batch(*shape)
    # The truth's median: the shipped model's median correction does not apply to a "measurement".
    return prefill_s + decode_s, (prefill_j + decode_j) / predictor.median_factor


def write_rows(path, shapes, columns=("measured_seconds", "measured_energy_j")) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "gpu", "num_gpus", "tensor_parallel", "batch_size", "prompt_tokens", "output_tokens",
                         *columns])  # fmt: skip
        for shape in shapes:
            seconds, energy = measured(shape)
            values = {"measured_seconds": seconds, "measured_energy_j": energy}
            writer.writerow([MODEL, "H100", 1, 1, *shape, *(values[c] for c in columns)])


def held_out_error(calibration_path: str | None, scale: float = 1.0) -> float:
    predictor = BatchPredictor(calibration_path=calibration_path)
    errors = []
    for shape in HELD_OUT:
        _, energy = measured(shape)
        row = dict(zip(("batch_size", "prompt_tokens", "output_tokens"), shape), model=MODEL, gpu="H100")
        errors.append(abs(predictor.predict(row)["energy_j"] * scale / energy - 1))
    return sum(errors) / len(errors)


@pytest.mark.parametrize("columns", [("measured_seconds", "measured_energy_j"), ("measured_energy_j",)])
def test_calibration_corrects_the_shape_on_held_out_batches(tmp_path, capsys, columns) -> None:
    rows, out = tmp_path / "m.csv", tmp_path / "cal.json"
    write_rows(rows, CALIBRATION_SHAPES, columns)
    assert main(["calibrate", "--measurements", str(rows), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == len(CALIBRATION_SHAPES) and summary["in_sample_mape_after"] < summary["in_sample_mape_before"]
    assert summary["rows_with_time"] == (len(CALIBRATION_SHAPES) if "measured_seconds" in columns else 0)
    changes = summary["changes"]
    assert changes["sequence_seconds@vllm-0.11.1"]["ratio"] > 1.3  # it found the per-sequence cost
    assert set(summary["residuals_after"]) == {"seconds", "energy"}
    before, after = held_out_error(None), held_out_error(str(out))
    assert after < before / 2 and after < 0.05, (before, after)
    # A single scale fitted on the same rows cannot do as well: the error is in the shape.
    log_residuals = summary["residuals_before"]["energy"]  # log(predicted / measured)
    scale = math.exp(-sum(log_residuals) / len(log_residuals))
    assert after < held_out_error(None, scale), (after, held_out_error(None, scale))


def test_rows_of_several_models_keep_what_one_model_alone_needs_with_that_model(tmp_path, capsys) -> None:
    """A fleet file: one model runs 1.2x slower than the others in every term. Its own factor takes
    most of that, so both models are priced closely and the shared terms still improve a model the
    file never saw (without model factors: 2.2 / 1.3 % for the two, 2.5 % for the unseen one)."""
    slow, other, unseen = MODEL, "Qwen/Qwen3-30B-A3B-Instruct-2507", "mistralai/Mixtral-8x7B-Instruct-v0.1"
    rows, out = tmp_path / "m.csv", tmp_path / "cal.json"
    with open(rows, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "gpu", "batch_size", "prompt_tokens", "output_tokens", "measured_seconds", "measured_energy_j"])
        for model, factor in ((slow, 1.2), (other, 1.0)):
            for shape in CALIBRATION_SHAPES:
                writer.writerow([model, "H100", *shape, *measured(shape, model, factor)])
    assert main(["calibrate", "--measurements", str(rows), "--out", str(out), "--json"]) == 0
    factors = json.loads(capsys.readouterr().out)["model_factors"]
    assert set(factors) == {slow, other}
    assert factors[slow]["time"] / factors[other]["time"] > 1.12, factors  # truth 1.2

    def error(model: str, factor: float, calibration: str | None) -> float:
        predictor = BatchPredictor(calibration_path=calibration)
        errors = []
        for shape in HELD_OUT:
            row = dict(zip(("batch_size", "prompt_tokens", "output_tokens"), shape), model=model, gpu="H100")
            errors.append(abs(predictor.predict(row)["energy_j"] / measured(shape, model, factor)[1] - 1))
        return sum(errors) / len(errors)

    for model, factor in ((slow, 1.2), (other, 1.0)):
        assert error(model, factor, str(out)) < 0.012, model
    # The model the file never saw: the shared terms, not the slow model's excess.
    assert error(unseen, 1.0, str(out)) < error(unseen, 1.0, None)
    data = json.loads(out.read_text())
    data["terms"]["model_factors"][slow]["time"] = 100.0
    out.write_text(json.dumps(data))
    with pytest.raises(CalibrationFileError, match="model_factors"):
        term_calibration.terms_from_file(str(out))


def test_time_alone_calibrates_time(tmp_path, capsys) -> None:
    rows, out = tmp_path / "m.csv", tmp_path / "cal.json"
    write_rows(rows, CALIBRATION_SHAPES, ("measured_seconds",))
    assert main(["calibrate", "--measurements", str(rows), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_with_energy"] == 0 and summary["time_mape_after"] < summary["time_mape_before"] / 2
    terms = term_calibration.terms_from_file(str(out))
    deployment = BatchRow(MODEL, "H100", 1, 1, 1, *HELD_OUT[0]).deployment()
    calibrated = FittedPredictor(deployment.model, deployment.hardware, terms=terms)
    prefill_s, _, decode_s, _ = calibrated.static_batch(*HELD_OUT[0])
    assert prefill_s + decode_s == pytest.approx(measured(HELD_OUT[0])[0], rel=0.05)


def test_rows_without_a_measurement_are_skipped_with_a_reason(tmp_path, capsys) -> None:
    rows = tmp_path / "m.csv"
    write_rows(rows, CALIBRATION_SHAPES)
    with open(rows, "a") as handle:
        handle.write(f"{MODEL},H100,1,1,8,100,100,,\n")
        handle.write(f"{MODEL},H100,1,1,8,100,100,-1,\n")
    assert main(["calibrate", "--measurements", str(rows), "--out", str(tmp_path / "c.json"), "--json"]) == 0
    skipped = json.loads(capsys.readouterr().out)["skipped"]
    assert [s["row"] for s in skipped] == [len(CALIBRATION_SHAPES) + 1, len(CALIBRATION_SHAPES) + 2]
    assert "measured_energy_j and measured_seconds is missing" in skipped[0]["reason"]
    assert "measured_seconds='-1'" in skipped[1]["reason"]
    no_columns = tmp_path / "n.csv"
    no_columns.write_text("model,gpu,batch_size,prompt_tokens,output_tokens\nx,H100,1,1,1\n")
    assert main(["calibrate", "--measurements", str(no_columns), "--out", str(tmp_path / "d.json")]) == 2


def test_the_file_keeps_its_terms_through_the_online_calibrator_and_bad_terms_are_refused(tmp_path) -> None:
    rows, out = tmp_path / "m.csv", tmp_path / "cal.json"
    write_rows(rows, CALIBRATION_SHAPES)
    assert main(["calibrate", "--measurements", str(rows), "--out", str(out)]) == 0
    terms = term_calibration.terms_from_file(str(out))
    calibrator = OnlineCalibrator.load(str(out))
    calibrator.update(1000.0, 2000.0, 0.0, 3100.0)  # the plugin learns a window and saves
    calibrator.save(str(out))
    assert term_calibration.terms_from_file(str(out)) == terms
    data = json.loads(out.read_text())
    data["terms"]["parameters"]["no_such_parameter"] = 1.0
    out.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not in the fitted model"):
        BatchPredictor(calibration_path=str(out)).predict({"model": MODEL, "gpu": "H100", "batch_size": 1,
                                                           "prompt_tokens": 10, "output_tokens": 10})  # fmt: skip
    data["terms"]["parameters"] = {"kv_factor": -1}
    out.write_text(json.dumps(data))
    with pytest.raises(CalibrationFileError, match="positive numbers"):
        term_calibration.terms_from_file(str(out))


def test_online_learner_converges_and_resets_on_drift() -> None:
    """Windows of a deployment whose truth differs in shape: the one-step-ahead error falls below 5 %;
    a sudden change is taken as a new regime (history dropped) and learned again."""
    deployment = BatchRow(MODEL, "H100", 1, 1, 1, 1, 1, 1).deployment()
    terms = StepTerms(deployment.model, deployment.hardware.gpu)
    real = term_calibration.CalibratedModel(truth())
    learner = term_calibration.OnlineTermCalibrator(shipped_model(), max_evaluations=60)

    def window(batch: int, context: int, factor: float = 1.0) -> tuple:
        steps = [StepShape.static_batch_decode(batch, context + i) for i in range(0, 200, 10)]
        sums = np.array([terms.step_sums(s) for s in steps]).T
        seconds, energy = real.predict(term_calibration.Observation(terms, 1, sums, np.ones(len(steps))))
        return sums, energy * factor, seconds

    for index in range(8):  # the load changes from window to window
        sums, energy, seconds = window((4, 64, 16, 128)[index % 4], 500 + 100 * index)
        learner.observe(terms, 1, sums, energy, seconds)
    prior_error, calibrated_error = learner.rolling_error(3)
    assert calibrated_error < 0.05 < prior_error, (prior_error, calibrated_error)
    for index in range(6):  # the meter now reads 40 % more (a new regime)
        sums, energy, seconds = window((4, 64, 16, 128)[index % 4], 500, factor=1.4)
        learner.observe(terms, 1, sums, energy, None)
    assert learner.resets == 1


def test_step_times_by_batch_tell_a_per_sequence_cost_from_a_per_step_one() -> None:
    """The truth costs 4x more per sequence and 0.6x per step: a window's total time cannot tell the
    two apart, the times of its small- and large-batch steps can; predicted for an unseen batch."""
    deployment = BatchRow(MODEL, "H100", 1, 1, 1, 1, 1, 1).deployment()
    terms = StepTerms(deployment.model, deployment.hardware.gpu)
    real = term_calibration.CalibratedModel(truth())

    def steps_of(batches: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        sums = np.array([terms.step_sums(StepShape.static_batch_decode(b, 800)) for b in batches]).T
        seconds = np.array([real.predict(term_calibration.Observation(terms, 1, sums[:, [i]], np.ones(1)))[0]
                            for i in range(len(batches))])  # fmt: skip
        energy = real.predict(term_calibration.Observation(terms, 1, sums, np.ones(len(batches))))[1]
        return sums, seconds, energy

    window_sums, seconds, energy = steps_of([2, 160] * 12)  # a load that alternates
    totals_only = term_calibration.OnlineTermCalibrator(shipped_model(), max_evaluations=60)
    with_steps = term_calibration.OnlineTermCalibrator(shipped_model(), max_evaluations=60)
    for _ in range(3):
        totals_only.observe(terms, 1, window_sums, energy, float(seconds.sum()))
        with_steps.observe(terms, 1, window_sums, energy, float(seconds.sum()), step_seconds=seconds)
    unseen_sums, unseen_seconds, _ = steps_of([24] * 10)
    unseen = term_calibration.Observation(terms, 1, unseen_sums, np.ones(10))

    def time_error(learner: term_calibration.OnlineTermCalibrator) -> float:
        return abs(learner.model.predict(unseen)[0] / unseen_seconds.sum() - 1)

    assert time_error(with_steps) < 0.02 and time_error(totals_only) > 0.1, (time_error(with_steps), time_error(totals_only))


def test_stacked_observations_predict_as_each_alone() -> None:
    """The solver evaluates each deployment's observations in one pass: the same numbers as one by one."""
    def terms_of(model: str, gpu: str) -> StepTerms:
        return StepTerms(BatchRow(model, gpu, 1, 1, 1, 1, 1, 1).deployment().model, find_gpu(gpu))

    llama, qwen = terms_of(MODEL, "H100"), terms_of("Qwen/Qwen3-30B-A3B-Instruct-2507", "A100")
    observations = [
        term_calibration.static_batch_observation(llama, 1, 8, 300, 200, idle_seconds=2.0),
        term_calibration.static_batch_observation(qwen, 2, 64, 1000, 50),
        term_calibration.static_batch_observation(llama, 1, 128, 100, 400),
        term_calibration.Observation(llama, 1, np.zeros((len(llama.step_sums(StepShape.static_batch_decode(1, 1))), 0)),
                                     np.zeros(0), idle_seconds=1.0),  # no steps: idle only
    ]
    deployment = term_calibration.CalibratedModel(truth(), idle_scale=1.2)
    stacked = term_calibration._StackedObservations(observations).predict(deployment)
    for observation in observations:
        assert stacked[id(observation)] == pytest.approx(deployment.predict(observation), rel=1e-12)
    idle_watts = deployment.with_idle(llama.gpu).idle_watts
    assert stacked[id(observations[3])] == pytest.approx((0.0, idle_watts * 1.0))


def test_serving_observation_matches_the_serving_prediction() -> None:
    """A measured serving row as an observation: one mean step, its measured time and energy; the
    calibrated model's prediction of it equals the fitted model's prediction of the row."""
    from llmco2_vllm.predict import fitted
    from llmco2_vllm.predict.model_description import load_model
    from llmco2_vllm.predict.serving_measurements import load_serving_measurements

    row = next(m for m in load_serving_measurements("mlenergy_v3") if m.model == MODEL)
    terms = StepTerms(load_model(MODEL), BatchRow(MODEL, "H100", 1, 1, 1, 1, 1, 1).deployment().hardware.gpu)
    observation = term_calibration.serving_observation(terms, row)
    assert observation.measured_seconds == row.step_seconds and observation.idle_seconds == 0.0
    assert observation.measured_energy_j == pytest.approx(row.power_watts * row.step_seconds)
    seconds, energy = term_calibration.CalibratedModel(shipped_model(), row.software).predict(observation)
    predicted = fitted.predict_serving(shipped_model(), [fitted.fit_row(row, load_model)], [row])
    assert seconds == pytest.approx(predicted["step_seconds"][0])
    assert energy / row.batch_size * row.output_tokens == pytest.approx(predicted["energy_per_request_j"][0])


def _observations(time_noise: list[float]) -> list[term_calibration.Observation]:
    terms = StepTerms(BatchRow(MODEL, "H100", 1, 1, 1, 1, 1, 1).deployment().model, find_gpu("H100"))
    observations = []
    for shape, factor in zip(CALIBRATION_SHAPES, time_noise):
        seconds, energy = measured(shape)
        observations.append(term_calibration.static_batch_observation(
            terms, 1, *shape, measured_seconds=seconds * factor, measured_energy_j=energy))  # fmt: skip
    return observations


def test_measured_times_are_used_only_where_leaving_rows_out_shows_they_help_the_energy() -> None:
    # Times from the same deployment as the energies: they carry its shape, and are kept.
    consistent = term_calibration.calibrate(shipped_model(), _observations([1.0] * len(CALIBRATION_SHAPES)))
    assert consistent.selection["time_used"]
    errors = consistent.selection["leave_one_out_energy_error"]
    assert errors["time + energy"] <= errors["energy only"]
    # Times off by row-specific amounts (e.g. wall clock that includes another process): fitting them
    # would move the time terms to fit noise; the rows left out show it, and the energy alone is fitted.
    scrambled = term_calibration.calibrate(shipped_model(), _observations([3.0, 0.3, 3.0, 0.3, 3.0]))
    assert not scrambled.selection["time_used"]
    assert scrambled.residuals_after["seconds"]  # the times are still reported
    explicit = term_calibration.calibrate(shipped_model(), _observations([3.0, 0.3, 3.0, 0.3, 3.0]), use_time=False)
    assert explicit.changes == scrambled.changes and explicit.selection is None
