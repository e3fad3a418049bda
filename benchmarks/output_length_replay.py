"""Output-length learning replayed on the measured early-stop requests of ``forecast_accuracy.py``.

Run: ``.venv/bin/python benchmarks/output_length_replay.py`` -> ``benchmarks/results/output_length_replay.md``

The early-stop phase of ``benchmarks/results/forecast_accuracy.json`` (a real ``vllm serve``:
requests sampled at temperature 1 with eight stop tokens, ``max_tokens`` 8-160) is replayed in
arrival order: each request from the 31st on is predicted from the requests 8 or more places before
it (those that would have finished), and its predicted median length is compared with its real one.
Tokens only, so the energy model and the batching play no part. Two estimators on the same rows:

* ``OutputLengths`` (the plugin's): where requests stop on their own, Kaplan-Meier with a request
  that reached its ``max_tokens`` censored there, per ``max_tokens`` band, capped at the request's
  ``max_tokens``;
* the share of ``max_tokens`` (the plugin's previous estimator): the 10/50/90 % quantiles of
  output / max_tokens of recent requests of the band (else of all), times this request's ``max_tokens``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmco2_vllm.predict.forecast import OutputLengths, length_band  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIRST, LAG, MIN_SAMPLES = 30, 8, 20


def share_of_max_tokens(history: list[tuple[int, int]], max_tokens: int) -> tuple[int, int, int]:
    """The previous estimator: quantiles of output / max_tokens, applied to this request's max_tokens."""
    band = sorted(min(o / m, 1.0) for o, m in history if length_band(m) == length_band(max_tokens))
    ratios = band if len(band) >= MIN_SAMPLES else sorted(min(o / m, 1.0) for o, m in history)

    def quantile(q: float) -> int:
        return max(1, min(max_tokens, round(ratios[min(int(q * len(ratios)), len(ratios) - 1)] * max_tokens)))

    return quantile(0.1), quantile(0.5), quantile(0.9)


def kaplan_meier(history: list[tuple[int, int]], max_tokens: int) -> tuple[int, int, int]:
    estimate = OutputLengths(history).estimate(max_tokens)
    return estimate.low, estimate.expected, estimate.high


def main() -> int:
    rows = json.loads((RESULTS / "forecast_accuracy.json").read_text())["rows"]["mixed_early_stop"]
    lines = [
        "# Output-length learning replayed on measured early-stop requests",
        "",
        f"Written by `benchmarks/output_length_replay.py` from the {len(rows)} early-stop requests in "
        "`forecast_accuracy.json` (method: the script's docstring). Ratio = predicted median / real output tokens.",
        "",
        "| estimator | requests | median ratio | within x0.8-1.25 | real inside 10-90 % range | mean abs log ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, estimator in (("stop positions, Kaplan-Meier (shipped)", kaplan_meier), ("share of max_tokens (previous)", share_of_max_tokens)):
        ratios, inside = [], []
        for index in range(FIRST, len(rows)):
            history = [(r["output_tokens"], r["max_tokens"]) for r in rows[: index - LAG]]
            real = rows[index]["output_tokens"]
            low, median, high = estimator(history, rows[index]["max_tokens"])
            ratios.append(median / real)
            inside.append(low <= real <= high)
        r = np.array(ratios)
        lines.append(f"| {name} | {len(r)} | {np.median(r):.2f} | {np.mean((r >= 0.8) & (r <= 1.25)):.0%} | "
                     f"{np.mean(inside):.0%} | {np.mean(np.abs(np.log(r))):.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (RESULTS / "output_length_replay.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
