"""Per-request attribution: split each step's energy among its requests and keep running totals.

A request's share of a phase is its share of the step's work in that phase (roofline energy of its
FLOPs and bytes, so a long-context decode costs more than a short one), and the shares of a phase
sum to one, so per-request energies add up to the step totals exactly (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .predictor import StepPrediction
from .step_shape import StepShape


def split_step_energy(prediction: StepPrediction, step: StepShape) -> tuple[np.ndarray, np.ndarray]:
    """Per-request (prefill, decode) energy in joules of one step; each sums to the phase total."""

    def split(total_j: float, weights: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        if total_j == 0.0:
            return np.zeros(step.num_requests)
        if weights.sum() <= 0:
            # A predictor without work shares: fall back to token shares, then to equal shares.
            weights = tokens.astype(np.float64) if tokens.sum() > 0 else np.ones(step.num_requests)
        return total_j * (weights / weights.sum())

    return (
        split(prediction.prefill_energy_j, prediction.request_prefill_weights, step.prefill_tokens),
        split(prediction.decode_energy_j, prediction.request_decode_weights, step.decode_tokens),
    )


@dataclass
class RequestEnergy:
    """Running totals of one request while it runs; the final record once it finished."""

    request_id: str
    prefill_energy_j: float = 0.0
    decode_energy_j: float = 0.0
    prefill_tokens: int = 0  # computed prompt tokens
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (no prefill compute)
    decode_tokens: int = 0
    steps: int = 0
    # The same energy corrected by the online calibration in force at each step (equal to the
    # predicted values until a calibration has been learned or loaded).
    calibrated_prefill_energy_j: float = 0.0
    calibrated_decode_energy_j: float = 0.0
    # Carbon: calibrated energy x PUE x the grid intensity at each step, and the step's embodied
    # carbon shared like its energy.
    operational_grams: float = 0.0
    embodied_grams: float = 0.0

    @property
    def energy_j(self) -> float:
        return self.prefill_energy_j + self.decode_energy_j

    @property
    def calibrated_energy_j(self) -> float:
        return self.calibrated_prefill_energy_j + self.calibrated_decode_energy_j

    @property
    def grams_co2e(self) -> float:
        """Software Carbon Intensity numerator for this request: operational + embodied."""
        return self.operational_grams + self.embodied_grams


class RequestLedger:
    """Running per-request totals, dropped when the request finishes (bounded memory)."""

    def __init__(self, max_requests: int = 100_000) -> None:
        self.max_requests = max_requests
        self._running: dict[str, RequestEnergy] = {}
        self.evicted = 0  # requests dropped because the ledger was full (never saw a finish)

    def __len__(self) -> int:
        return len(self._running)

    def _entry(self, request_id: str) -> RequestEnergy:
        entry = self._running.get(request_id)
        if entry is None:
            if len(self._running) >= self.max_requests:
                # Oldest first: dicts keep insertion order.
                self._running.pop(next(iter(self._running)))
                self.evicted += 1
            entry = self._running[request_id] = RequestEnergy(request_id)
        return entry

    def add_cached_tokens(self, request_id: str, tokens: int) -> None:
        self._entry(request_id).cached_tokens += tokens

    def add_step(
        self,
        step: StepShape,
        prefill_j: np.ndarray,
        decode_j: np.ndarray,
        prefill_scale: float = 1.0,
        decode_scale: float = 1.0,
        grams_per_joule: float = 0.0,
        embodied_grams: float = 0.0,
    ) -> None:
        """Add one step's attributed energy; the scales are the calibration's per-phase factors.

        ``grams_per_joule`` converts calibrated energy to operational carbon; ``embodied_grams``, the
        step's embodied carbon, is shared in proportion to each request's energy in the step.
        """
        step_energy_j = float(prefill_j.sum() + decode_j.sum())
        embodied_per_joule = embodied_grams / step_energy_j if step_energy_j > 0 else 0.0
        rows = zip(
            step.request_ids,
            prefill_j.tolist(),
            decode_j.tolist(),
            step.prefill_tokens.tolist(),
            step.decode_tokens.tolist(),
        )
        for request_id, prefill, decode, prefill_tokens, decode_tokens in rows:
            entry = self._entry(request_id)
            entry.prefill_energy_j += prefill
            entry.decode_energy_j += decode
            calibrated_prefill = prefill * prefill_scale
            calibrated_decode = decode * decode_scale
            entry.calibrated_prefill_energy_j += calibrated_prefill
            entry.calibrated_decode_energy_j += calibrated_decode
            entry.operational_grams += (calibrated_prefill + calibrated_decode) * grams_per_joule
            entry.embodied_grams += (prefill + decode) * embodied_per_joule
            entry.prefill_tokens += prefill_tokens
            entry.decode_tokens += decode_tokens
            entry.steps += 1

    def finish(self, request_id: str) -> RequestEnergy | None:
        """Remove and return a request's totals (None if it never ran a step or was already finished)."""
        return self._running.pop(request_id, None)
