"""Prometheus exposition text as ``{(sample name, sorted labels): value}``, for tests and benchmarks."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Exposition text -> samples, via prometheus_client's parser (raises on malformed text)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of all samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()):
            total += value
    return total
