"""GPU catalog, GPU-name matching and NVML detection.

The catalog (``data/gpus.csv``) holds datasheet figures with their sources; every
prediction downstream is only as good as these numbers, so each row keeps its
``source_urls`` and ``notes``. Names reported by NVML differ from marketing names
(``NVIDIA H100 80GB HBM3`` vs ``H100-SXM5-80GB``), hence the alias matching here.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import re
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Mapping

#: Fraction of TDP assumed for an idle GPU when the catalog has no measured figure.
#: An ASSUMPTION, not a measurement: datacenter GPUs idle at roughly 10-20 % of TDP
#: (e.g. ~60-100 W on a 700 W H100 with a CUDA context open); 0.15 sits mid-range.
#: Replace it with measured idle power wherever possible.
DEFAULT_IDLE_FRACTION_OF_TDP = 0.15

#: FP32 (non-tensor) throughput assumed as BF16 tensor peak / this when the catalog has
#: no FP32 figure. Datasheets give ratios from ~4x (L4) to ~16x (A100); 8 is a rough middle.
FP32_FALLBACK_DIVISOR_FROM_BF16 = 8.0

_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "fp32": "fp32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "half": "fp16", "fp16": "fp16",
    "fp8": "fp8", "float8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "e4m3": "fp8", "e5m2": "fp8",
    "int8": "int8", "int4": "int4", "fp4": "fp4", "mxfp4": "mxfp4", "nvfp4": "fp4",
}

#: Which catalog figure stands in for a compute dtype, in order of preference. Hardware
#: without native support for a narrow dtype runs it (dequantized) at a wider rate;
#: int8/int4/fp4 peaks are not in the catalog, so they fall back to FP8 then BF16
#: (conservative: real int8/fp4 tensor rates are usually >= the FP8 rate). MXFP4 weights
#: (gpt-oss experts) are dequantised to bf16 by vLLM's kernels on GPUs without FP4 units
#: (H100, A100: Marlin / Triton MoE), so they fall back to BF16, not FP8.
_PEAK_FALLBACKS: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "bf16": ("bf16", "fp16"),
    "fp16": ("fp16", "bf16"),
    "fp8": ("fp8", "bf16", "fp16"),
    "int8": ("int8", "fp8", "bf16", "fp16"),
    "int4": ("int4", "fp8", "bf16", "fp16"),
    "fp4": ("fp4", "fp8", "bf16", "fp16"),
    "mxfp4": ("mxfp4", "fp4", "bf16", "fp16"),
}


def normalize_dtype(dtype: str) -> str:
    """Map torch/vLLM dtype spellings (``bfloat16``, ``float16``...) to catalog keys."""
    key = dtype.strip().lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPE_ALIASES.values()))}")
    return _DTYPE_ALIASES[key]


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet facts about one GPU model (one catalog row), in SI units."""

    name: str
    aliases: tuple[str, ...]
    memory_bytes: float
    memory_bandwidth_bytes_per_second: float
    peak_flops_per_second: Mapping[str, float] = field(hash=False)
    tdp_watts: float
    idle_watts: float | None
    interconnect_bytes_per_second: float
    source_urls: str

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for compute in ``dtype``, falling back along ``_PEAK_FALLBACKS``.

        fp16 and bf16 share one tensor-core rate on every catalog GPU; a GPU without FP8
        runs FP8 models dequantized at the BF16 rate; int8/int4/fp4 use FP8 then BF16;
        FP32 without a catalog figure is BF16 / ``FP32_FALLBACK_DIVISOR_FROM_BF16``.
        """
        key = normalize_dtype(dtype)
        for candidate in _PEAK_FALLBACKS[key]:
            if candidate in self.peak_flops_per_second:
                return self.peak_flops_per_second[candidate]
        if key == "fp32":
            return self.peak_flops("bf16") / FP32_FALLBACK_DIVISOR_FROM_BF16
        raise ValueError(f"GPU {self.name} has no peak FLOP/s figure usable for {dtype!r}")

    def idle_watts_or_default(self) -> float:
        """Catalog idle power, else ``DEFAULT_IDLE_FRACTION_OF_TDP`` x TDP (an assumption)."""
        if self.idle_watts is not None:
            return self.idle_watts
        return DEFAULT_IDLE_FRACTION_OF_TDP * self.tdp_watts


@dataclass(frozen=True)
class Hardware:
    """The GPUs one vLLM engine runs on: ``num_gpus`` of one kind, sharded ``tensor_parallel`` ways."""

    gpu: GpuSpec
    num_gpus: int
    tensor_parallel: int
    source: str  # "nvml" (detected here) or "configured" (a target GPU was named)

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if not 1 <= self.tensor_parallel <= self.num_gpus:
            raise ValueError(
                f"tensor_parallel must be between 1 and num_gpus={self.num_gpus}, got {self.tensor_parallel}"
            )


class UnknownGpuError(ValueError):
    """A GPU name matched no catalog name or alias."""


def _normalize_name(name: str) -> str:
    """Canonical matching key: lower case, no vendor prefix, no MIG suffix, no separators."""
    key = name.strip().lower()
    key = re.sub(r"\s+mig\s+\S+$", "", key)  # "NVIDIA A100-SXM4-40GB MIG 1g.5gb" -> parent GPU
    for prefix in ("nvidia ", "tesla "):
        key = key.removeprefix(prefix)
    return re.sub(r"[\s_\-]+", "", key)


def _optional_float(text: str) -> float | None:
    text = text.strip()
    return float(text) if text else None


def _spec_from_row(row: Mapping[str, str]) -> GpuSpec:
    tflops_columns = {"bf16": "bf16_dense_tflops", "fp8": "fp8_dense_tflops", "fp32": "fp32_tflops"}
    peaks: dict[str, float] = {}
    for dtype, column in tflops_columns.items():
        tflops = _optional_float(row[column])
        if tflops is not None:
            peaks[dtype] = tflops * 1e12
    if "bf16" not in peaks:
        raise ValueError(f"gpus.csv row {row['name']} lacks bf16_dense_tflops")
    peaks["fp16"] = peaks["bf16"]  # one 16-bit tensor rate (see peak_flops)
    return GpuSpec(
        name=row["name"],
        aliases=tuple(a.strip() for a in row["aliases"].split(";") if a.strip()),
        memory_bytes=float(row["memory_gb"]) * 1e9,  # datasheet GB are decimal
        memory_bandwidth_bytes_per_second=float(row["memory_bandwidth_gb_per_s"]) * 1e9,
        peak_flops_per_second=MappingProxyType(peaks),
        tdp_watts=float(row["tdp_watts"]),
        idle_watts=_optional_float(row["idle_watts"]),
        interconnect_bytes_per_second=float(row["interconnect_gb_per_s"]) * 1e9,
        source_urls=row["source_urls"],
    )


@functools.cache
def gpu_catalog() -> dict[str, GpuSpec]:
    """All catalog GPUs by canonical name, read once from the packaged ``data/gpus.csv``."""
    text = resources.files("llmco2_vllm").joinpath("data/gpus.csv").read_text(encoding="utf-8")
    specs = [_spec_from_row(row) for row in csv.DictReader(io.StringIO(text))]
    return {spec.name: spec for spec in specs}


@functools.cache
def _name_index() -> dict[str, str]:
    """Normalized name/alias -> canonical name; refuses ambiguous aliases so matches are exact."""
    index: dict[str, str] = {}
    for spec in gpu_catalog().values():
        for candidate in (spec.name, *spec.aliases):
            key = _normalize_name(candidate)
            if index.setdefault(key, spec.name) != spec.name:
                raise ValueError(f"gpus.csv alias {candidate!r} is ambiguous ({index[key]} and {spec.name})")
    return index


def find_gpu(name: str) -> GpuSpec:
    """Look up a GPU by canonical name, alias or NVML name, ignoring case and separators."""
    index = _name_index()
    key = _normalize_name(name)
    if key in index:
        return gpu_catalog()[index[key]]
    scores: dict[str, float] = {}
    for alias_key, canonical in index.items():
        score = difflib.SequenceMatcher(None, key, alias_key).ratio()
        scores[canonical] = max(scores.get(canonical, 0.0), score)
    closest = sorted(scores, key=lambda n: -scores[n])[:3]
    raise UnknownGpuError(
        f"Unknown GPU {name!r}. Closest catalog names: {', '.join(closest)}. "
        "`llmco2 gpus` lists them all."
    )
