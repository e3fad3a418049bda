"""The ``llmco2`` command as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmco2_vllm.carbon.intensity import lookup_region


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmco2_vllm.cli", *args], capture_output=True, text=True, timeout=60)


def test_predict_json_is_consistent():
    base = ["predict", "--model", "Llama-3.1-8B-Instruct", "--gpu", "NVIDIA H100 80GB HBM3", "--prompt-tokens", "512",
            "--output-tokens", "128", "--json"]  # fmt: skip
    one = json.loads(run(*base, "--batch-size", "1", "--region", "FR").stdout)
    eight = json.loads(run(*base, "--batch-size", "8").stdout)
    assert one["gpu"] == "H100-SXM5-80GB"
    assert one["energy_j"] == pytest.approx(one["prefill_j"] + one["decode_j"])
    # Batching shares the weight reads of decode: per-token energy must fall.
    assert eight["energy_j_per_output_token"] < one["energy_j_per_output_token"]
    assert one["carbon_g"] == pytest.approx(one["energy_j"] / 3.6e6 * lookup_region("FR").grams_co2e_per_kwh)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "H900"], "llmco2 gpus"),
        (["--model", "no-such-model"], "Unknown"),
        (["--batch-size", "0"], "at least 1"),
        (["--region", "Atlantis"], "llmco2 regions"),
    ],
)
def test_predict_bad_input_exits_non_zero_with_reason(args, message):
    defaults = {"--model": "Llama-3.1-8B-Instruct", "--gpu": "H100", "--batch-size": "1", "--prompt-tokens": "10",
                "--output-tokens": "10"}  # fmt: skip
    defaults.update(dict(zip(args[::2], args[1::2])))
    result = run("predict", *[item for pair in defaults.items() for item in pair])
    assert result.returncode == 2
    assert message in result.stderr


def test_catalog_listings():
    gpus = json.loads(run("gpus", "--json").stdout)
    assert any(g["name"] == "B200" or "B200" in g["aliases"] for g in gpus)
    assert all(g["source_urls"] for g in gpus)
    regions = run("regions").stdout
    assert "FR" in regions and "CAMX" in regions
    assert "meta-llama/Llama-3.1-8B-Instruct" in run("models").stdout


def test_calibrate_then_predict_with_calibration(tmp_path):
    """Measurements 1.3x the prediction: the calibration learns it and `predict --calibration` applies it."""
    import csv

    batches = tmp_path / "batches.csv"
    rows = [
        {"model": "Llama-3.1-8B-Instruct", "gpu": "H100", "num_gpus": 1, "tensor_parallel": 1, "batch_size": b,
         "prompt_tokens": p, "output_tokens": o}
        for b, p, o in [(1, 100, 50), (4, 800, 200), (16, 300, 300), (64, 1500, 100), (8, 50, 700), (2, 3000, 20)]
    ]  # fmt: skip
    with open(batches, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    predicted = tmp_path / "predicted.csv"
    assert run("predict", "--batch-file", str(batches), "--out", str(predicted)).returncode == 0
    measurements = tmp_path / "measured.csv"
    with open(predicted, newline="") as handle, open(measurements, "w", newline="") as out:
        reader = csv.DictReader(handle)
        writer = csv.DictWriter(out, fieldnames=[*rows[0], "measured_energy_j"], extrasaction="ignore")
        writer.writeheader()
        for row in reader:
            writer.writerow({**row, "measured_energy_j": 1.3 * float(row["energy_j"])})
    calibration = tmp_path / "cal.json"
    result = run("calibrate", "--measurements", str(measurements), "--out", str(calibration), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["in_sample_mape_after"] < 0.05 < summary["in_sample_mape_before"]
    args = ["predict", "--model", "Llama-3.1-8B-Instruct", "--gpu", "H100", "--batch-size", "4", "--prompt-tokens",
            "800", "--output-tokens", "200", "--json"]  # fmt: skip
    plain = json.loads(run(*args).stdout)
    calibrated = json.loads(run(*args, "--calibration", str(calibration)).stdout)
    assert calibrated["energy_j"] == pytest.approx(1.3 * plain["energy_j"], rel=0.05)
    assert calibrated["predictor"] == "fitted+terms+calibration"
    # With measured times as well, the plain output says whether they were fitted (leave-one-out choice).
    timed = tmp_path / "timed.csv"
    with open(predicted, newline="") as handle, open(timed, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[*rows[0], "measured_energy_j", "measured_seconds"], extrasaction="ignore")
        writer.writeheader()
        for row in csv.DictReader(handle):
            writer.writerow({**row, "measured_energy_j": 1.3 * float(row["energy_j"]), "measured_seconds": 1.1 * float(row["seconds"])})
    text = run("calibrate", "--measurements", str(timed), "--out", str(tmp_path / "timed.json"))
    assert text.returncode == 0, text.stderr
    assert "measured times used" in text.stdout and "leave-one-out energy error" in text.stdout


def test_batch_mode_keeps_going_on_bad_rows(tmp_path):
    batches = tmp_path / "in.csv"
    batches.write_text(
        "model,gpu,num_gpus,tensor_parallel,batch_size,prompt_tokens,output_tokens,region\n"
        "Llama-3.1-8B-Instruct,H100,1,1,8,512,128,FR\n"
        "Llama-3.1-8B-Instruct,H900,1,1,8,512,128,\n"
        "Llama-3.1-8B-Instruct,H100,1,1,-3,512,128,\n"
        "meta-llama/Llama-3.1-70B-Instruct,A100-SXM4-80GB,4,4,8,512,128,\n"
    )
    out = tmp_path / "out.csv"
    result = run("predict", "--batch-file", str(batches), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr  # bad rows are skipped; the usable ones are predicted
    import csv

    rows = list(csv.DictReader(open(out)))
    assert [bool(r["error"]) for r in rows] == [False, True, True, False]
    assert "H900" in rows[1]["error"] and "batch_size" in rows[2]["error"]
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["predicted"]) == (4, 2)
    assert [s["row"] for s in summary["skipped"]] == [2, 3]
    assert "H900" in summary["skipped"][0]["reason"] and "batch_size" in summary["skipped"][1]["reason"]
    assert "row 2 skipped" in result.stderr and "row 3 skipped" in result.stderr
    assert float(rows[0]["carbon_g"]) > 0 and rows[3]["carbon_g"] == ""
    assert float(rows[0]["energy_j"]) == pytest.approx(float(rows[0]["prefill_j"]) + float(rows[0]["decode_j"]), rel=1e-4)


def test_batch_mode_fails_only_when_no_row_is_usable(tmp_path):
    batches = tmp_path / "in.csv"
    batches.write_text(
        "model,gpu,num_gpus,tensor_parallel,batch_size,prompt_tokens,output_tokens\n"
        "No-Such-Model-7B,H100,1,1,8,512,128\n"
        "Llama-3.1-8B-Instruct,H100,1,1,8,,128\n"
    )
    result = run("predict", "--batch-file", str(batches), "--out", str(tmp_path / "out.csv"), "--json")
    assert result.returncode == 2
    skipped = json.loads(result.stdout)["skipped"]
    assert [s["row"] for s in skipped] == [1, 2]
    assert "No-Such-Model-7B" in skipped[0]["reason"] and "prompt_tokens is missing" in skipped[1]["reason"]


def test_calibrate_skips_unusable_rows(tmp_path):
    header = "model,gpu,num_gpus,tensor_parallel,batch_size,prompt_tokens,output_tokens,measured_energy_j,idle_seconds\n"
    good = [f"Llama-3.1-8B-Instruct,H100,1,1,{b},{p},128,{1000 + 37 * b + p},0\n"
            for b, p in ((1, 256), (4, 512), (8, 1024), (16, 300), (32, 128))]
    bad = [
        "No-Such-Model-7B,H100,1,1,8,512,128,5000,0\n",  # unknown model
        "Llama-3.1-8B-Instruct,H900,1,1,8,512,128,5000,0\n",  # unknown GPU
        "Llama-3.1-8B-Instruct,H100,1,1,8,512,128,-5,0\n",  # negative measurement
        "Llama-3.1-8B-Instruct,H100,1,1,8,512,128,,0\n",  # missing measurement
        "Llama-3.1-8B-Instruct,H100,1,1,8,512,128,5000,-1\n",  # negative idle time
    ]
    measurements = tmp_path / "m.csv"
    measurements.write_text(header + good[0] + "".join(bad) + "".join(good[1:]))
    result = run("calibrate", "--measurements", str(measurements), "--out", str(tmp_path / "cal.json"), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["rows"] == 5
    assert [s["row"] for s in out["skipped"]] == [2, 3, 4, 5, 6]
    reasons = [s["reason"] for s in out["skipped"]]
    assert "No-Such-Model-7B" in reasons[0] and "H900" in reasons[1]
    assert "measured_energy_j" in reasons[2] and "measured_energy_j is missing" in reasons[3]
    assert "idle_seconds" in reasons[4]
    assert result.stderr.count("skipped:") == 5

    only_bad = tmp_path / "bad.csv"
    only_bad.write_text(header + "".join(bad))
    failed = run("calibrate", "--measurements", str(only_bad), "--out", str(tmp_path / "cal2.json"))
    assert failed.returncode == 2 and "no usable rows" in failed.stderr
    assert not (tmp_path / "cal2.json").exists()
