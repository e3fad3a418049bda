"""``llmco2_vllm.measure.collect``: CPU dry run, KV-cache correctness of the reference transformer, layer scaling."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmco2_vllm.measure import collect as collect_module  # noqa: E402
from llmco2_vllm.measure.collect import (  # noqa: E402
    CSV_COLUMNS,
    CollectConfig,
    SweepShape,
    build_reference_model,
    collect,
    dry_run_shapes,
    main,
    plan_num_layers,
    quick_shapes,
    scale_to_full_model,
)
from llmco2_vllm.predict.model_description import ModelDescription  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 32, "intermediate_size": 128, "vocab_size": 512, "num_hidden_layers": 2,
    "tie_word_embeddings": False,
}
TINY_MOE = {
    "model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 256, "num_hidden_layers": 2, "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def tiny_llama() -> ModelDescription:
    return ModelDescription.from_hf_config(TINY_LLAMA, name="tiny-llama")


@pytest.fixture(scope="module")
def tiny_moe() -> ModelDescription:
    return ModelDescription.from_hf_config(TINY_MOE, name="tiny-moe")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


# --- CPU dry run ------------------------------------------------------------------------------


def test_cpu_dry_run_writes_one_row_per_shape(tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "smoke.csv"
    stderr = io.StringIO()
    args = collect_module.build_parser().parse_args(
        ["--device", "cpu", "--dry-run", "--model", str(config_path), "--out", str(out), "--predict-gpu", "H100"])
    assert collect_module.run(args, stream=stderr) == 0

    columns, rows = _read_csv(out)
    assert columns == list(CSV_COLUMNS)
    shapes = dry_run_shapes()
    assert len(rows) == len(shapes)
    for row, shape in zip(rows, shapes):
        assert (row["phase"], int(row["batch_size"]), int(row["prompt_tokens"]), int(row["context_tokens"])) == (
            shape.phase, shape.batch_size, shape.prompt_tokens, shape.context_tokens)
        assert row["layers_measured"] == row["layers_total"] == "2"
        assert row["num_gpus"] == row["tensor_parallel"] == "1"
        assert float(row["seconds_per_step"]) > 0 and int(row["steps"]) >= 2
        assert row["energy_j_per_step"] == "" and row["idle_watts"] == ""  # nothing measures energy on CPU
        assert row["complete"] == "False"
        assert float(row["predicted_seconds_per_step"]) > 0 and float(row["predicted_energy_j_per_step"]) > 0
        assert row["source"] == "llmco2 collect reference-transformer"
        assert row["torch_version"] == torch.__version__ and row["dtype"] == "float32"
        assert row["measured_at"].endswith("+00:00")
    assert "wrote 4 rows" in stderr.getvalue()


def test_dry_run_defaults_to_the_tiny_model_and_vllm_engine_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["--device", "cpu", "--dry-run", "--out", str(tmp_path / "a.csv")]) == 0
    _, rows = _read_csv(tmp_path / "a.csv")
    assert len(rows) == len(dry_run_shapes()) and rows[0]["predicted_energy_j_per_step"] == ""
    assert main(["--engine", "vllm", "--device", "cpu", "--dry-run", "--out", str(tmp_path / "b.csv")]) == 2
    assert main(["--device", "cpu", "--out", str(tmp_path / "c.csv")]) == 2  # --model needed without --dry-run
    assert "not implemented" in capsys.readouterr().err


def test_module_entry_point_runs_the_dry_run(tmp_path: Path) -> None:
    # benchmarks/gpu_collect.sh starts collections as `python -m llmco2_vllm.measure.collect`
    out = tmp_path / "module.csv"
    done = subprocess.run([sys.executable, "-m", "llmco2_vllm.measure.collect", "--device", "cpu", "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    columns, rows = _read_csv(out)
    assert columns == list(CSV_COLUMNS) and len(rows) == len(dry_run_shapes())
    assert f"wrote {len(rows)} rows to {out}" in done.stderr


def test_cli_parser_and_collect_package_import_neither_torch_nor_pynvml() -> None:
    # `llmco2 --help` builds the collect subparser: it must work where torch and pynvml are absent
    probe = ("import sys; import llmco2_vllm.cli as cli; cli.build_parser(); import llmco2_vllm.measure.collect; "
             "print(sorted(m for m in ('torch', 'pynvml') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- reference transformer: the KV cache is real --------------------------------------------


def _logits(model, ids, chunks: list[int]):
    """Run ``ids`` through a fresh cache in consecutive chunks; return each chunk's last logits."""
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1])
    outputs, start = [], 0
    for size in chunks:
        outputs.append(model(ids[:, start:start + size], cache, start))
        start += size
    return outputs, cache


@pytest.mark.parametrize("description", ["tiny_llama", "tiny_moe"])
def test_cached_decode_and_chunked_prefill_match_full_recompute(description: str, request) -> None:
    model = build_reference_model(request.getfixturevalue(description), 2, "cpu", seed=1)
    ids = torch.randint(0, model.description.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (full,), _ = _logits(model, ids, [12])
        (_, decoded), cache = _logits(model, ids, [11, 1])  # prefill 11, decode 1 from the cache
        (_, _, chunked), _ = _logits(model, ids, [5, 4, 3])  # chunked prefill after context
        torch.testing.assert_close(decoded, full, atol=1e-4, rtol=0)
        torch.testing.assert_close(chunked, full, atol=1e-4, rtol=0)
        # the decode step reads the cache: other cached keys give other logits
        cache[0].keys[:, :, :11] += 1.0
        perturbed = model(ids[:, 11:12], cache, 11)
    assert not torch.allclose(perturbed, full, atol=1e-3)
    assert full.shape == (3, model.description.vocab_size)


def test_masked_fold_equals_fused_causal_prefill(tiny_llama: ModelDescription) -> None:
    model = build_reference_model(tiny_llama, 2, "cpu", seed=4)
    ids = torch.randint(0, tiny_llama.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        (fused,), _ = _logits(model, ids, [9])
        model.fused_causal_gqa = False
        (folded,), _ = _logits(model, ids, [9])
    torch.testing.assert_close(folded, fused, atol=1e-4, rtol=0)


def test_no_kernel_for_causal_gqa_falls_back_to_the_masked_fold(tiny_llama, monkeypatch) -> None:
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def no_causal_kernel(*args, **kwargs):
        if kwargs.get("is_causal"):
            raise RuntimeError("No available kernel. Aborting execution.")
        return sdpa(*args, **kwargs)

    class FailsInsideTheWindow(ScriptedMeter):
        def begin_window(self, name: str) -> None:
            super().begin_window(name)
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_causal_kernel)

    stderr = io.StringIO()
    config = CollectConfig(model=tiny_llama, shapes=(SweepShape("prefill", 1, 8, 0), SweepShape("decode", 1, 0, 8)),
                           device="cpu", min_window_seconds=0.0, warmup_seconds=0.0, idle_seconds=0.0)
    meter = FailsInsideTheWindow()  # the first failure comes after the window opened: it must be closed
    rows = collect(config, meter, stream=stderr)
    assert not meter.open and meter.closed.count("prefill-b1-p8-c0") == 2
    assert [row["attention_call"] for row in rows] == [
        "sdpa grouped-query fold + lower-right mask", "sdpa grouped-query fold"]
    assert "from now on" in stderr.getvalue()


@pytest.mark.parametrize("experts_kernel", ["grouped_mm", "loop"])
def test_moe_layer_matches_per_token_routing(tiny_moe: ModelDescription, experts_kernel: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_reference_model(tiny_moe, 2, "cpu", seed=2)
    moe = model.layers[-1].mlp
    monkeypatch.setattr(type(moe), "experts_kernel", experts_kernel)
    x = torch.randn(2, 5, tiny_moe.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = moe(x)
        flat = x.reshape(-1, tiny_moe.hidden_size)
        expected = torch.zeros_like(flat)
        probs = torch.softmax(moe.router(flat), dim=-1)
        for t in range(flat.shape[0]):
            weights, experts = probs[t].topk(tiny_moe.experts_per_token)
            for w, e in zip(weights / weights.sum(), experts.tolist()):
                expected[t] += w * moe.expert(e, flat[t:t + 1])[0]
    torch.testing.assert_close(got.reshape(-1, tiny_moe.hidden_size), expected, atol=1e-5, rtol=1e-5)
    assert [layer.moe for layer in model.layers] == [True, True]
    assert type(moe).experts_kernel == experts_kernel  # the chosen path ran without falling back


# --- energy windows and layer scaling ---------------------------------------------------------


@dataclass(frozen=True)
class FakeReading:
    index: int = 0
    name: str = "NVIDIA H100 80GB HBM3"
    energy_j: float = 0.0
    method: str = "counter"


@dataclass(frozen=True)
class FakeMeasurement:
    seconds: float
    energy_j: float
    gpus: tuple[FakeReading, ...] = (FakeReading(),)
    complete: bool = True


class ScriptedMeter:
    """Returns fixed energy per window kind: idle 100 J over 2 s, full steps 10 J, head-only 2 J."""

    available = True
    ENERGY_J = {"idle": 100.0, "head": 2.0, "step": 10.0}

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.closed: list[str] = []

    def begin_window(self, name: str) -> None:
        assert name not in self.open
        self.open.add(name)

    def end_window(self, name: str) -> FakeMeasurement:
        self.open.remove(name)
        self.closed.append(name)
        kind = "idle" if name == "idle" else "head" if name.endswith("-head") else "step"
        return FakeMeasurement(seconds=2.0 if kind == "idle" else 0.5, energy_j=self.ENERGY_J[kind])


def _scripted_rows(model: ModelDescription, num_layers: int) -> tuple[list[dict], ScriptedMeter]:
    meter = ScriptedMeter()
    config = CollectConfig(model=model, shapes=(SweepShape("prefill", 1, 8, 0), SweepShape("decode", 2, 0, 16)),
                           device="cpu", num_layers=num_layers, min_window_seconds=0.0, min_steps=3,
                           warmup_seconds=0.0, idle_seconds=0.01)
    rows = collect(config, meter, stream=io.StringIO())
    return rows, meter


def test_scripted_energy_is_scaled_per_layer_with_the_head_measured_apart(tiny_llama: ModelDescription) -> None:
    rows, meter = _scripted_rows(tiny_llama, num_layers=1)
    assert not meter.open and meter.closed[0] == "idle"
    assert len(meter.closed) == 1 + 2 * len(rows)  # idle, then a step and a head window per shape
    for row in rows:
        assert row["idle_watts"] == pytest.approx(50.0)
        assert (row["layers_measured"], row["layers_total"]) == (1, 2)
        head = 2.0 / row["head_steps"]
        measured = 10.0 / row["steps"]
        assert row["measured_energy_j_per_step"] == pytest.approx(measured)
        assert row["head_energy_j_per_step"] == pytest.approx(head)
        # full = head + (measured - head) / layers_measured * layers_total
        assert row["energy_j_per_step"] == pytest.approx(head + (measured - head) * 2 / 1)
        expected_seconds = row["head_seconds_per_step"] + (
            row["measured_seconds_per_step"] - row["head_seconds_per_step"]) * 2
        if row["measured_seconds_per_step"] >= row["head_seconds_per_step"]:
            assert row["seconds_per_step"] == pytest.approx(expected_seconds)
        assert row["window_seconds"] == 0.5  # the meter's window length
        assert row["energy_method"] == "counter"
        seconds_clamped = row["measured_seconds_per_step"] < row["head_seconds_per_step"]
        assert row["complete"] is (head <= measured and not seconds_clamped)


def test_all_layers_measured_needs_no_head_window(tiny_llama: ModelDescription) -> None:
    rows, meter = _scripted_rows(tiny_llama, num_layers=2)
    assert len(meter.closed) == 1 + len(rows)
    for row in rows:
        assert row["energy_j_per_step"] == pytest.approx(10.0 / row["steps"])
        assert row["seconds_per_step"] == row["measured_seconds_per_step"]
        assert row["head_steps"] is None and row["complete"] is True


def test_unavailable_meter_reports_no_energy_rather_than_zero(tiny_llama: ModelDescription) -> None:
    class UnavailableMeter(ScriptedMeter):  # like EnergyMeter without NVML: 0 J, complete=False
        available = False

        def end_window(self, name: str) -> FakeMeasurement:
            super().end_window(name)
            return FakeMeasurement(seconds=0.5, energy_j=0.0, gpus=(), complete=False)

    config = CollectConfig(model=tiny_llama, shapes=(SweepShape("decode", 1, 0, 8),), device="cpu",
                           min_window_seconds=0.0, warmup_seconds=0.0, idle_seconds=0.01)
    (row,) = collect(config, UnavailableMeter(), stream=io.StringIO())
    assert math.isnan(row["energy_j_per_step"]) and math.isnan(row["idle_watts"])
    assert row["complete"] is False and row["energy_method"] == ""


def test_scale_to_full_model_rule() -> None:
    assert scale_to_full_model(5.0, 1.0, 2, 8) == (1.0 + 4.0 / 2 * 8, False)
    assert scale_to_full_model(5.0, None, 2, 8) == (5.0, False)
    assert scale_to_full_model(5.0, 1.0, 8, 8) == (5.0, False)
    assert scale_to_full_model(1.0, 2.0, 2, 8) == (2.0, True)  # noisy head larger than the step: clamped
    value, _ = scale_to_full_model(math.nan, math.nan, 1, 2)
    assert math.isnan(value)


# --- sweeps and memory planning ---------------------------------------------------------------


def test_quick_preset_and_memory_plan() -> None:
    shapes = quick_shapes()
    assert sum(s.phase == "prefill" for s in shapes) == 6 and sum(s.phase == "decode" for s in shapes) == 8
    from llmco2_vllm.predict.model_description import load_model

    llama8b = load_model("meta-llama/Llama-3.1-8B-Instruct")
    assert plan_num_layers(llama8b, shapes, free_bytes=79e9) == 32  # fits an H100 whole
    llama70b = load_model("meta-llama/Llama-3.1-70B-Instruct")
    assert 1 <= plan_num_layers(llama70b, shapes, free_bytes=79e9) < 80
