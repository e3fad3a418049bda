"""Per-request attribution: split each step's energy among its requests and keep running totals.

A request's share of a phase is its share of the step's work in that phase (roofline energy of its
FLOPs and bytes, so a long-context decode costs more than a short one), and the shares of a phase
sum to one, so per-request energies add up to the step totals exactly (up to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import repeat
from typing import Iterable

import numpy as np

from llmco2_vllm.predict.predictor import StepPrediction
from llmco2_vllm.predict.step_shape import StepShape


def split_step_energy(prediction: StepPrediction, step: StepShape) -> tuple[np.ndarray, np.ndarray]:
    """Per-request (prefill, decode) energy in joules of one step; each sums to the phase total."""

    def split(total_j: float, weights: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        if total_j == 0.0:
            return np.zeros(len(tokens))
        weight_sum = weights.sum()
        if weight_sum <= 0:
            # A predictor without work shares: fall back to token shares, then to equal shares.
            weights = tokens.astype(np.float64) if tokens.sum() > 0 else np.ones(len(tokens))
            weight_sum = weights.sum()
        return total_j * (weights / weight_sum)

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


# Columns of ``RequestLedger``'s table, one row per tracked request; token and step counts are
# float64 too (exact below 2**53).
_PREFILL_J, _DECODE_J, _CALIBRATED_PREFILL_J, _CALIBRATED_DECODE_J, _OPERATIONAL_G, _EMBODIED_G = range(6)
_PREFILL_TOKENS, _DECODE_TOKENS, _STEPS, _CACHED_TOKENS = range(6, 10)
_COLUMNS = 10


class RequestLedger:
    """Running per-request totals, dropped when the request finishes (bounded memory).

    The totals live in one table with a row per running request: a step adds to all of its
    requests in a few array operations; only the row look-up of each request id is per request.
    """

    def __init__(self, max_requests: int = 100_000) -> None:
        self.max_requests = max_requests
        self._rows: dict[str, int] = {}  # request id -> row; insertion order = eviction order
        # Row 0 is never handed out: a look-up that finds nothing returns 0.
        self._table = np.zeros((min(max_requests, 256) + 1, _COLUMNS))
        self._free_rows: list[int] = []
        self._next_row = 1
        self._evicted_rows: list[int] = []  # evicted while a step is added: reused after it
        self._per_request = np.ones((5, 256))  # scratch: what one step adds, per request (see add_step)
        # What a step adds per request, as a linear map of (prefill J, decode J, prefill tokens,
        # decode tokens, 1); the step's scales fill in the energy part (``add_step``).
        self._step_map = np.zeros((5, _COLUMNS))
        self._step_map[0, _PREFILL_J] = self._step_map[1, _DECODE_J] = 1.0
        self._step_map[2, _PREFILL_TOKENS] = self._step_map[3, _DECODE_TOKENS] = self._step_map[4, _STEPS] = 1.0
        self.evicted = 0  # requests dropped because the ledger was full (never saw a finish)

    def __len__(self) -> int:
        return len(self._rows)

    def _admit(self, request_id: str) -> int:
        """A zeroed row for a request not tracked yet, evicting the oldest one when full."""
        rows = self._rows
        if len(rows) >= self.max_requests:
            # Oldest first: dicts keep insertion order. The row is reused only after the current
            # step, whose requests may already hold it.
            self._evicted_rows.append(rows.pop(next(iter(rows))))
            self.evicted += 1
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            row = self._next_row
            self._next_row += 1
            if row >= len(self._table):
                grown = np.zeros((min(2 * len(self._table), self.max_requests + len(self._evicted_rows) + 2), _COLUMNS))
                grown[: len(self._table)] = self._table
                self._table = grown
        rows[request_id] = row
        return row

    def _release_evicted(self) -> None:
        for row in self._evicted_rows:
            self._table[row] = 0.0
            self._free_rows.append(row)
        self._evicted_rows.clear()

    def add_cached_tokens(self, request_id: str, tokens: int) -> None:
        row = self._rows.get(request_id) or self._admit(request_id)
        self._release_evicted()
        self._table[row, _CACHED_TOKENS] += tokens

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
        ids = step.request_ids
        n = len(ids)
        if not n:
            return
        if self._per_request.shape[1] < n:
            self._per_request = np.ones((5, 2 * n))
        per_request = self._per_request[:, :n]  # rows: prefill J, decode J, prefill tokens, decode tokens, 1
        per_request[0] = prefill_j
        per_request[1] = decode_j
        per_request[2] = step.prefill_tokens
        per_request[3] = step.decode_tokens
        step_energy_j = float(per_request[:2].sum())
        embodied_per_joule = embodied_grams / step_energy_j if step_energy_j > 0 else 0.0
        index = np.fromiter(map(self._rows.get, ids, repeat(0)), dtype=np.intp, count=n)
        if not index.all():  # requests seen for the first time (a few per step)
            missing: Iterable[int] = np.flatnonzero(index == 0).tolist()
            if len(self._rows) + len(missing) > self.max_requests:  # type: ignore[arg-type]
                # Admitting evicts, maybe a request of this very step: resolve all in order, as one by one.
                missing = range(n)
            get, admit = self._rows.get, self._admit
            for position in missing:
                request_id = ids[position]
                index[position] = get(request_id) or admit(request_id)
        step_map = self._step_map
        step_map[0, _CALIBRATED_PREFILL_J] = prefill_scale
        step_map[1, _CALIBRATED_DECODE_J] = decode_scale
        step_map[0, _OPERATIONAL_G] = prefill_scale * grams_per_joule
        step_map[1, _OPERATIONAL_G] = decode_scale * grams_per_joule
        step_map[0, _EMBODIED_G] = step_map[1, _EMBODIED_G] = embodied_per_joule
        if math.isfinite(step_energy_j):
            added = per_request.T @ step_map
        else:  # a NaN or infinite energy stays in its own columns (0 x NaN is NaN): one column at a time
            added = np.zeros((n, _COLUMNS))
            calibrated_prefill, calibrated_decode = prefill_j * prefill_scale, decode_j * decode_scale
            added[:, _PREFILL_J], added[:, _DECODE_J] = prefill_j, decode_j
            added[:, _CALIBRATED_PREFILL_J], added[:, _CALIBRATED_DECODE_J] = calibrated_prefill, calibrated_decode
            added[:, _OPERATIONAL_G] = (calibrated_prefill + calibrated_decode) * grams_per_joule
            added[:, _EMBODIED_G] = (prefill_j + decode_j) * embodied_per_joule
            added[:, _PREFILL_TOKENS:_CACHED_TOKENS] = per_request[2:].T
        if len(set(ids)) == n:
            self._table[index] += added
        else:  # a request listed twice in one step adds twice
            np.add.at(self._table, index, added)
        if self._evicted_rows:
            self._release_evicted()

    def finish(self, request_id: str) -> RequestEnergy | None:
        """Remove and return a request's totals (None if it never ran a step or was already finished)."""
        row = self._rows.pop(request_id, None)
        if row is None:
            return None
        table = self._table
        (prefill_j, decode_j, calibrated_prefill_j, calibrated_decode_j, operational_g, embodied_g,
         prefill_tokens, decode_tokens, steps, cached_tokens) = table[row].tolist()  # fmt: skip
        table[row] = 0.0
        self._free_rows.append(row)
        return RequestEnergy(
            request_id, prefill_j, decode_j, int(prefill_tokens), int(cached_tokens), int(decode_tokens), int(steps),
            calibrated_prefill_j, calibrated_decode_j, operational_g, embodied_g,
        )  # fmt: skip
