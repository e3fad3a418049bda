"""The ``llmco2`` command as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmco2_vllm.carbon import lookup_region


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
