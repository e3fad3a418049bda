"""Per-request attribution of step energy: exact splits, work weighting, fallbacks and the ledger."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from llmco2_vllm.accounting.attribution import RequestEnergy, RequestLedger, split_step_energy
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.predictor import AnalyticPredictor, StepPrediction
from llmco2_vllm.predict.step_shape import StepShape

LLAMA_31_8B: dict[str, Any] = {
    "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def predictor() -> AnalyticPredictor:
    model = ModelDescription.from_hf_config(LLAMA_31_8B)
    return AnalyticPredictor(model, Hardware(find_gpu("H100"), 1, 1, "configured"))


def random_step(rng: np.random.Generator) -> StepShape:
    n = int(rng.integers(1, 40))
    requests = []
    for i in range(n):
        kind = rng.integers(0, 3)
        context = int(rng.integers(0, 20_000))
        if kind == 0:  # prefill chunk
            requests.append((f"r{i}", int(rng.integers(1, 2048)), 0, context))
        elif kind == 1:  # decode (possibly speculative)
            requests.append((f"r{i}", 0, int(rng.integers(1, 5)), context))
        else:  # last prefill chunk plus the first decode positions (e.g. resumed request)
            requests.append((f"r{i}", int(rng.integers(1, 300)), int(rng.integers(1, 3)), context))
    return StepShape.from_requests(requests)


def test_split_sums_to_phase_totals_for_random_steps(predictor: AnalyticPredictor) -> None:
    rng = np.random.default_rng(20240601)
    for _ in range(60):
        step = random_step(rng)
        prediction = predictor.predict_step(step)
        prefill_j, decode_j = split_step_energy(prediction, step)
        assert prefill_j.shape == decode_j.shape == (step.num_requests,)
        assert (prefill_j >= 0).all() and (decode_j >= 0).all()
        assert prefill_j.sum() == pytest.approx(prediction.prefill_energy_j, rel=1e-9, abs=1e-15)
        assert decode_j.sum() == pytest.approx(prediction.decode_energy_j, rel=1e-9, abs=1e-15)
        # A request that did no prefill gets no prefill energy, same for decode.
        assert np.all(prefill_j[step.prefill_tokens == 0] == 0)
        assert np.all(decode_j[step.decode_tokens == 0] == 0)


def test_long_context_decode_gets_more_energy_than_short(predictor: AnalyticPredictor) -> None:
    # Same one token each; only the context differs: 100 vs 30_000 tokens of K/V to read.
    step = StepShape.from_requests([("short", 0, 1, 100), ("long", 0, 1, 30_000)])
    prediction = predictor.predict_step(step)
    _, decode_j = split_step_energy(prediction, step)
    assert decode_j[1] > decode_j[0]
    # Token shares would give 50/50; work shares must not. The long request reads 30_001 + 1 vs
    # 101 + 1 tokens x 32 layers x 4096 B of KV: ~3.9 GB vs ~13 MB on top of a shared 15 GB of
    # weights split evenly (7.5 GB each) -> at least (7.5 + 3.9) / (7.5 + 0.013) ~ 1.5x.
    assert decode_j[1] / decode_j[0] > 1.4
    assert decode_j.sum() == pytest.approx(prediction.decode_energy_j, rel=1e-9)


def test_prefill_share_follows_work_not_only_tokens(predictor: AnalyticPredictor) -> None:
    # Two 512-token chunks; the second is deep into a long prompt. Attention keys per layer:
    # fresh 512*513/2 = 131_328; deep 512*8192 + 131_328 = 4_325_632 (33x) -> more prefill energy,
    # although both computed the same number of tokens.
    step = StepShape.from_requests([("fresh", 512, 0, 0), ("deep", 512, 0, 8192)])
    prediction = predictor.predict_step(step)
    prefill_j, _ = split_step_energy(prediction, step)
    assert prefill_j[1] > prefill_j[0]


def make_prediction(prefill_j: float, decode_j: float, pw: list[float], dw: list[float]) -> StepPrediction:
    return StepPrediction(
        prefill_seconds=0.01, decode_seconds=0.01, prefill_energy_j=prefill_j, decode_energy_j=decode_j,
        request_prefill_weights=np.asarray(pw, dtype=np.float64),
        request_decode_weights=np.asarray(dw, dtype=np.float64),
    )


def test_split_uses_given_weights_exactly() -> None:
    step = StepShape.from_requests([("a", 10, 0, 0), ("b", 30, 0, 0), ("c", 0, 1, 5)])
    prediction = make_prediction(8.0, 3.0, [0.25, 0.75, 0.0], [0.0, 0.0, 1.0])
    prefill_j, decode_j = split_step_energy(prediction, step)
    # 8 J * 0.25 = 2 J, 8 J * 0.75 = 6 J; all 3 J of decode to c.
    np.testing.assert_allclose(prefill_j, [2.0, 6.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(decode_j, [0.0, 0.0, 3.0], rtol=1e-12)


def test_fallback_to_token_shares_when_weights_are_zero() -> None:
    step = StepShape.from_requests([("a", 10, 0, 0), ("b", 30, 2, 0), ("c", 0, 6, 5)])
    prediction = make_prediction(8.0, 4.0, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    prefill_j, decode_j = split_step_energy(prediction, step)
    # Prefill tokens 10 : 30 : 0 -> 8 J * 10/40 = 2 J, 8 J * 30/40 = 6 J, 0 J.
    np.testing.assert_allclose(prefill_j, [2.0, 6.0, 0.0], rtol=1e-12)
    # Decode tokens 0 : 2 : 6 -> 4 J * 2/8 = 1 J and 4 J * 6/8 = 3 J.
    np.testing.assert_allclose(decode_j, [0.0, 1.0, 3.0], rtol=1e-12)


def test_fallback_to_equal_shares_without_tokens_and_zero_energy() -> None:
    step = StepShape.from_requests([("a", 0, 0, 0), ("b", 0, 0, 7)])
    # Energy in a phase with neither weights nor tokens: split equally, 5 J -> 2.5 J each.
    prediction = make_prediction(5.0, 0.0, [0.0, 0.0], [0.0, 0.0])
    prefill_j, decode_j = split_step_energy(prediction, step)
    np.testing.assert_allclose(prefill_j, [2.5, 2.5], rtol=1e-12)
    np.testing.assert_array_equal(decode_j, [0.0, 0.0])


def test_ledger_accumulates_and_finish_returns_then_forgets() -> None:
    ledger = RequestLedger(max_requests=10)
    step1 = StepShape.from_requests([("a", 32, 0, 0), ("b", 0, 1, 40)])
    step2 = StepShape.from_requests([("a", 8, 0, 32)])
    step3 = StepShape.from_requests([("a", 0, 1, 40), ("b", 0, 1, 41)])
    ledger.add_cached_tokens("a", 16)
    ledger.add_step(step1, np.array([1.5, 0.0]), np.array([0.0, 0.25]))
    ledger.add_step(step2, np.array([0.5]), np.array([0.0]))
    ledger.add_step(step3, np.array([0.0, 0.0]), np.array([0.125, 0.25]))
    assert len(ledger) == 2
    a = ledger.finish("a")
    assert isinstance(a, RequestEnergy)
    # a: prefill 1.5 + 0.5 = 2.0 J, decode 0.125 J, 32 + 8 = 40 prompt tokens, 1 decode, 3 steps.
    assert (a.prefill_energy_j, a.decode_energy_j, a.energy_j) == (2.0, 0.125, 2.125)
    assert (a.prefill_tokens, a.cached_tokens, a.decode_tokens, a.steps) == (40, 16, 1, 3)
    assert ledger.finish("a") is None  # forgotten
    assert len(ledger) == 1
    b = ledger.finish("b")
    assert b is not None and b.decode_energy_j == 0.5 and b.decode_tokens == 2 and b.steps == 2
    assert len(ledger) == 0 and ledger.evicted == 0
    assert ledger.finish("never-seen") is None


def test_ledger_bounded_evicts_oldest_and_counts() -> None:
    ledger = RequestLedger(max_requests=3)
    for i in range(5):  # r0..r4: r0 and r1 must be evicted, oldest first
        ledger.add_step(StepShape.from_requests([(f"r{i}", 1, 0, 0)]), np.array([float(i)]), np.array([0.0]))
    assert len(ledger) == 3
    assert ledger.evicted == 2
    assert ledger.finish("r0") is None and ledger.finish("r1") is None
    assert ledger.finish("r2").prefill_energy_j == 2.0  # type: ignore[union-attr]
    # Updating a tracked request does not evict anything.
    ledger.add_step(StepShape.from_requests([("r3", 0, 1, 1)]), np.array([0.0]), np.array([1.0]))
    assert ledger.evicted == 2 and len(ledger) == 2
    # A new one fits in the freed slot; the next one evicts r3 (older than r4? no: r3 was inserted
    # before r4 and updating does not move it).
    ledger.add_cached_tokens("r5", 8)
    assert ledger.evicted == 2
    ledger.add_cached_tokens("r6", 8)
    assert ledger.evicted == 3
    assert ledger.finish("r3") is None
    assert ledger.finish("r4") is not None


class ReferenceLedger:
    """The ledger's rules one request at a time (a dict of running totals)."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests, self.running, self.evicted = max_requests, {}, 0

    def entry(self, request_id: str) -> RequestEnergy:
        if request_id not in self.running:
            if len(self.running) >= self.max_requests:
                self.running.pop(next(iter(self.running)))
                self.evicted += 1
            self.running[request_id] = RequestEnergy(request_id)
        return self.running[request_id]

    def add_step(self, step: StepShape, prefill_j, decode_j, prefill_scale, decode_scale, grams_per_joule, embodied_g) -> None:
        step_j = float(prefill_j.sum() + decode_j.sum())
        embodied_per_joule = embodied_g / step_j if step_j > 0 else 0.0
        for i, request_id in enumerate(step.request_ids):
            entry = self.entry(request_id)
            p, d = float(prefill_j[i]), float(decode_j[i])
            entry.prefill_energy_j += p
            entry.decode_energy_j += d
            entry.calibrated_prefill_energy_j += p * prefill_scale
            entry.calibrated_decode_energy_j += d * decode_scale
            entry.operational_grams += (p * prefill_scale + d * decode_scale) * grams_per_joule
            entry.embodied_grams += (p + d) * embodied_per_joule
            entry.prefill_tokens += int(step.prefill_tokens[i])
            entry.decode_tokens += int(step.decode_tokens[i])
            entry.steps += 1


def assert_same_energy(got: RequestEnergy | None, want: RequestEnergy | None) -> None:
    assert (got is None) == (want is None)
    if got is None or want is None:
        return
    assert (got.request_id, got.prefill_tokens, got.cached_tokens, got.decode_tokens, got.steps) == (
        want.request_id, want.prefill_tokens, want.cached_tokens, want.decode_tokens, want.steps,
    )
    for name in ("prefill_energy_j", "decode_energy_j", "calibrated_prefill_energy_j", "calibrated_decode_energy_j",
                 "operational_grams", "embodied_grams"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-12, abs=1e-300), name
        assert type(getattr(got, name)) is float
    assert all(type(getattr(got, name)) is int for name in ("prefill_tokens", "cached_tokens", "decode_tokens", "steps"))


@pytest.mark.parametrize("max_requests", [5, 40, 100_000])
def test_array_ledger_equals_the_per_request_rules(max_requests: int) -> None:
    """Random steps, cached tokens and finishes, with and without eviction, requests listed twice."""
    rng = np.random.default_rng(max_requests)
    ledger, reference = RequestLedger(max_requests), ReferenceLedger(max_requests)
    pool = [f"req-{i}" for i in range(60)]
    for _ in range(300):
        n = int(rng.integers(0, 30))
        ids = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
        if n and rng.random() < 0.7:
            ids = list(dict.fromkeys(ids))  # mostly unique, as vLLM's steps are
        step = StepShape.from_requests([(i, int(rng.integers(0, 500)), int(rng.integers(0, 3)), 0) for i in ids])
        prefill_j, decode_j = rng.random(len(ids)) * (rng.random(len(ids)) < 0.7), rng.random(len(ids))
        factors = (float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2)), float(rng.uniform(0, 1e-3)), float(rng.uniform(0, 0.1)))
        if rng.random() < 0.2:
            request_id = pool[int(rng.integers(0, len(pool)))]
            tokens = int(rng.integers(1, 100))
            ledger.add_cached_tokens(request_id, tokens)
            reference.entry(request_id).cached_tokens += tokens
        ledger.add_step(step, prefill_j, decode_j, *factors)
        reference.add_step(step, prefill_j, decode_j, *factors)
        for request_id in [pool[int(i)] for i in rng.integers(0, len(pool), int(rng.integers(0, 4)))]:
            assert_same_energy(ledger.finish(request_id), reference.running.pop(request_id, None))
        assert len(ledger) == len(reference.running) and ledger.evicted == reference.evicted
    if max_requests < len(pool):
        assert ledger.evicted > 0
    for request_id in pool:
        assert_same_energy(ledger.finish(request_id), reference.running.pop(request_id, None))
    assert len(ledger) == 0


def test_ledger_keeps_a_nan_energy_out_of_the_token_counts() -> None:
    ledger = RequestLedger()
    step = StepShape.from_requests([("a", 10, 0, 0), ("b", 0, 1, 5)])
    ledger.add_step(step, np.array([np.nan, 0.0]), np.array([0.0, 2.0]), 1.5, 2.0, 0.1, 1.0)
    a, b = ledger.finish("a"), ledger.finish("b")
    assert a is not None and b is not None
    assert np.isnan(a.prefill_energy_j) and a.decode_energy_j == 0.0 and (a.prefill_tokens, a.steps) == (10, 1)
    assert b.decode_energy_j == 2.0 and b.calibrated_decode_energy_j == 4.0 and (b.decode_tokens, b.steps) == (1, 1)


# --- the fitted predictor: fixed step costs shared per scheduled sequence ----------------------------


def _fitted(config: dict[str, Any]) -> Any:
    from llmco2_vllm.predict.fitted import FittedPredictor

    return FittedPredictor(ModelDescription.from_hf_config(config), Hardware(find_gpu("H100"), 1, 1, "configured"))


TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128, "vocab_size": 512,
              "tie_word_embeddings": False, "torch_dtype": "float32"}  # fmt: skip


@pytest.mark.parametrize("config", [LLAMA_31_8B, TINY_LLAMA])
def test_fitted_split_sums_to_the_step_for_random_steps(config: dict[str, Any]) -> None:
    predictor = _fitted(config)
    rng = np.random.default_rng(7)
    for _ in range(100):
        step = random_step(rng)
        prediction = predictor.predict_step(step)
        prefill_j, decode_j = split_step_energy(prediction, step)
        assert prefill_j.sum() == pytest.approx(prediction.prefill_energy_j, rel=1e-12)
        assert decode_j.sum() == pytest.approx(prediction.decode_energy_j, rel=1e-12)
        seconds, energy = predictor.step_seconds_and_energy(predictor.last_step_sums)  # the fitted step's totals
        assert prediction.energy_j == pytest.approx(float(energy), rel=1e-12)
        assert prediction.seconds == pytest.approx(float(seconds), rel=1e-12)
        assert (prefill_j >= 0).all() and (decode_j >= 0).all()


@pytest.mark.parametrize("config", [LLAMA_31_8B, TINY_LLAMA])
def test_fitted_shares_fixed_step_costs_equally_and_work_by_work(config: dict[str, Any]) -> None:
    """A step's fixed costs (scheduling, launches, per-sequence preparation and sampling) do not depend
    on how many tokens a sequence scheduled: every scheduled sequence pays the same part of them, and
    only what is left (the work) follows the work shares. A prompt chunk no longer pays for the
    decodes' step overhead."""
    predictor = _fitted(config)
    step = StepShape.from_requests([("chunk", 120, 0, 240), ("idle", 0, 0, 50)] + [(f"d{i}", 0, 1, 100 + i) for i in range(8)])
    prediction = predictor.predict_step(step)
    prefill_j, decode_j = split_step_energy(prediction, step)
    energy = prefill_j + decode_j
    fixed_seconds, fixed_j = predictor.fixed_step_cost(predictor.terms.step_sums(step))
    assert 0 < fixed_j < prediction.energy_j and 0 < fixed_seconds < prediction.seconds
    assert energy[1] == 0.0  # scheduled nothing, pays nothing
    work = np.delete(energy, 1) - fixed_j / 9
    assert (work > 0).all() and work.sum() == pytest.approx(prediction.energy_j - fixed_j)
    # The eight decodes did about the same work (contexts 100-107): they pay about the same.
    assert np.allclose(energy[2:], energy[2], rtol=1e-2)
    assert energy[0] > energy[2]  # the chunk's work is more than a decode's


def test_fixed_costs_dominate_a_tiny_models_step_and_are_shared_by_sequences() -> None:
    """On a 2-layer model every step is almost all overhead: a 120-token chunk and eight decodes each pay
    about a ninth (before: the chunk paid ~94 %, its token share of the step's work)."""
    predictor = _fitted(TINY_LLAMA)
    step = StepShape.from_requests([("chunk", 120, 0, 240)] + [(f"d{i}", 0, 1, 100 + i) for i in range(8)])
    prediction = predictor.predict_step(step)
    energy = np.add(*split_step_energy(prediction, step)) / prediction.energy_j
    assert energy == pytest.approx(np.full(9, 1 / 9), rel=0.05)
    # The phases: the chunk's sequence is prefill, the decodes' are decode.
    assert prediction.prefill_energy_j / prediction.energy_j == pytest.approx(energy[0])


def test_a_sequence_with_both_phases_splits_its_fixed_share_by_its_tokens() -> None:
    predictor = _fitted(TINY_LLAMA)
    step = StepShape.from_requests([("both", 3, 1, 10), ("decode", 0, 1, 10)])
    prediction = predictor.predict_step(step)
    prefill_j, decode_j = split_step_energy(prediction, step)
    _, fixed_j = predictor.fixed_step_cost(predictor.terms.step_sums(step))
    assert prefill_j[1] == 0.0 and prefill_j[0] > decode_j[0] > 0
    assert prefill_j[0] + decode_j[0] >= fixed_j / 2 and decode_j[1] >= fixed_j / 2
