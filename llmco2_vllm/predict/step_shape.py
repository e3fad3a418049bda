"""What one engine step did, per request: the input of every predictor.

Context and token counts are what the scheduler decided for the step, so chunked prefill
(several steps per prompt) and prefix-cache hits (context already present, no prefill compute)
are represented exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class StepShape:
    """One scheduler step. Arrays are aligned with ``request_ids`` (int64)."""

    request_ids: tuple[str, ...]
    prefill_tokens: np.ndarray  # prompt tokens computed in this step
    decode_tokens: np.ndarray  # generated-token positions computed in this step (incl. speculative)
    context_tokens: np.ndarray  # tokens already in the KV cache before this step
    spec_tokens: np.ndarray = field(default=None)  # type: ignore[assignment]  # speculative draft tokens verified
    wall_seconds: float = 0.0  # measured host wall time of the step (0 when unknown)

    def __post_init__(self) -> None:
        n = len(self.request_ids)
        if self.spec_tokens is None:
            object.__setattr__(self, "spec_tokens", np.zeros(n, dtype=np.int64))
        for name in ("prefill_tokens", "decode_tokens", "context_tokens", "spec_tokens"):
            array = np.asarray(getattr(self, name), dtype=np.int64)
            if array.shape != (n,):
                raise ValueError(f"StepShape.{name} must have one entry per request ({n}), got shape {array.shape}")
            if (array < 0).any():
                raise ValueError(f"StepShape.{name} must not be negative: {array.tolist()}")
            object.__setattr__(self, name, array)

    @classmethod
    def unchecked(
        cls,
        request_ids: tuple[str, ...],
        prefill_tokens: np.ndarray,
        decode_tokens: np.ndarray,
        context_tokens: np.ndarray,
        spec_tokens: np.ndarray,
        wall_seconds: float = 0.0,
    ) -> "StepShape":
        """Wrap int64 arrays that are already valid (one non-negative entry per request), skipping
        the checks: the worker's ``StepShapeBuilder`` builds one shape per engine step and its
        arrays are valid by construction. Use the constructor for anything else."""
        shape = object.__new__(cls)
        fields = shape.__dict__
        fields["request_ids"] = request_ids
        fields["prefill_tokens"] = prefill_tokens
        fields["decode_tokens"] = decode_tokens
        fields["context_tokens"] = context_tokens
        fields["spec_tokens"] = spec_tokens
        fields["wall_seconds"] = wall_seconds
        return shape

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[tuple[str, int, int, int]],
        wall_seconds: float = 0.0,
    ) -> "StepShape":
        """Build from ``(request_id, prefill_tokens, decode_tokens, context_tokens)`` tuples."""
        ids = tuple(r[0] for r in requests)
        columns = np.array([r[1:4] for r in requests], dtype=np.int64).reshape(len(requests), 3)
        return cls(ids, columns[:, 0], columns[:, 1], columns[:, 2], wall_seconds=wall_seconds)

    @classmethod
    def static_batch_prefill(cls, batch_size: int, prompt_tokens: int) -> "StepShape":
        """The prefill step of a static batch (LLMCO2's input form)."""
        ids = tuple(f"r{i}" for i in range(batch_size))
        full = np.full(batch_size, prompt_tokens, dtype=np.int64)
        zero = np.zeros(batch_size, dtype=np.int64)
        return cls(ids, full, zero, zero)

    @classmethod
    def static_batch_decode(cls, batch_size: int, context_tokens: int) -> "StepShape":
        """One decode step of a static batch whose requests each hold ``context_tokens`` in the KV cache."""
        ids = tuple(f"r{i}" for i in range(batch_size))
        zero = np.zeros(batch_size, dtype=np.int64)
        return cls(ids, zero, np.ones(batch_size, dtype=np.int64), np.full(batch_size, context_tokens, dtype=np.int64))

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @property
    def total_prefill_tokens(self) -> int:
        return int(self.prefill_tokens.sum())

    @property
    def total_decode_tokens(self) -> int:
        return int(self.decode_tokens.sum())
