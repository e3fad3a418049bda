"""The distilled GNN correction: a small table of log factors over (batch size, tokens), torch-free.

Built by ``distill.py`` from the full GNN (``model.py``) for one deployment and applied over the
analytic prediction by ``distilled.DistilledGnnPredictor`` and the forecast fast path.
"""

from __future__ import annotations

import bisect
import math
from typing import Any


class CorrectionTable:
    """Log corrections of the analytic prefill (phase 0) and decode (phase 1) energy on a grid of
    (ln batch size, ln tokens), interpolated bilinearly and clamped to the grid's edges."""

    def __init__(
        self,
        log_batch: list[float],
        log_tokens: tuple[list[float], list[float]],
        tables: tuple[list[list[float]], list[list[float]]],
        ratio_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.log_batch = log_batch
        self.log_tokens = log_tokens
        self.tables = tables
        self.ratio_range = ratio_range  # measured/predicted range from the checkpoint's residuals

    @staticmethod
    def _locate(grid: list[float], value: float) -> tuple[int, float]:
        """(cell index, position 0..1 inside the cell) of ``value`` clamped to the grid."""
        if value <= grid[0]:
            return 0, 0.0
        if value >= grid[-1]:
            return len(grid) - 2, 1.0
        i = bisect.bisect_right(grid, value) - 1
        return i, (value - grid[i]) / (grid[i + 1] - grid[i])

    def log_factor(self, phase: int, batch_size: float, tokens: float) -> float:
        """Log correction of the prefill (phase 0; tokens = prompt tokens) or decode (1; tokens = context)."""
        i, a = self._locate(self.log_batch, math.log(max(batch_size, 1.0)))
        j, b = self._locate(self.log_tokens[phase], math.log(max(tokens, 1.0)))
        t = self.tables[phase]
        return (1 - a) * ((1 - b) * t[i][j] + b * t[i][j + 1]) + a * ((1 - b) * t[i + 1][j] + b * t[i + 1][j + 1])

    def to_json(self) -> dict[str, Any]:
        return {
            "log_batch": self.log_batch,
            "log_tokens": list(self.log_tokens),
            "tables": list(self.tables),
            "ratio_range": list(self.ratio_range),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CorrectionTable":
        prefill_tokens, decode_tokens = data["log_tokens"]
        prefill, decode = data["tables"]
        low, high = data.get("ratio_range", (1.0, 1.0))
        return cls(list(data["log_batch"]), (list(prefill_tokens), list(decode_tokens)), (prefill, decode), (low, high))


def corrected_static_batch(
    roofline: Any, table: CorrectionTable | None, batch_size: int, prompt_tokens: int, output_tokens: int
) -> tuple[float, float, float, float]:
    """(prefill_seconds, prefill_j, decode_seconds, decode_j) of a static batch: the analytic closed
    form (``Roofline.static_batch``) times the table's correction of each phase; decode at the mean
    context of its O-1 steps. Without a table, the analytic value."""
    prefill_s, prefill_j, decode_s, decode_j = roofline.static_batch(batch_size, prompt_tokens, output_tokens)
    if table is None:
        return prefill_s, prefill_j, decode_s, decode_j
    fp = math.exp(table.log_factor(0, batch_size, prompt_tokens))
    fd = math.exp(table.log_factor(1, batch_size, prompt_tokens + (output_tokens - 2) / 2))
    return prefill_s * fp, prefill_j * fp, decode_s * fd, decode_j * fd
