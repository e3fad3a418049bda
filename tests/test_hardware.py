"""Tests for the GPU catalog, GPU-name matching and NVML detection (no GPU needed)."""

from __future__ import annotations

import csv
from importlib import resources

import pytest

from llmco2_vllm.measure.gpu_detection import detect_gpus
from llmco2_vllm.predict.hardware import (
    DEFAULT_IDLE_FRACTION_OF_TDP,
    GpuSpec,
    Hardware,
    UnknownGpuError,
    find_gpu,
    gpu_catalog,
)
from tests.support.fake_nvml import FakeGpu, FakeNvml, FakeNVMLError

EXPECTED_COLUMNS = [
    "name", "aliases", "memory_gb", "memory_bandwidth_gb_per_s", "bf16_dense_tflops", "fp8_dense_tflops",
    "fp32_tflops", "tdp_watts", "idle_watts", "interconnect_gb_per_s", "source_urls", "notes",
]


def test_catalog_csv_has_documented_columns_and_sources() -> None:
    text = resources.files("llmco2_vllm").joinpath("data/gpus.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == EXPECTED_COLUMNS
    for row in rows:
        assert row["source_urls"].startswith("https://"), row["name"]
        assert row["notes"], row["name"]
        # Idle power only where this project measured it (NVML, CUDA context open), never invented.
        if row["idle_watts"]:
            assert "measured with NVML" in row["notes"] and "benchmarks/results/" in row["notes"], row["name"]
    measured = {row["name"]: float(row["idle_watts"]) for row in rows if row["idle_watts"]}
    assert measured == {"H100-SXM5-80GB": 121.0, "H200-SXM-141GB": 120.0}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("H100", "H100-SXM5-80GB"),
        ("h100-sxm-80gb", "H100-SXM5-80GB"),
        ("H100 80GB HBM3", "H100-SXM5-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100-SXM5-80GB"),
        ("NVIDIA H100 PCIe", "H100-PCIe-80GB"),
        ("B200", "B200"),
        ("NVIDIA B200", "B200"),
        ("A100-SXM4-40GB", "A100-SXM4-40GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
        ("A100", "A100-SXM4-80GB"),
        ("a100_40gb", "A100-SXM4-40GB"),
        ("NVIDIA H200", "H200-SXM-141GB"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-32GB", "V100-SXM2-32GB"),
        ("NVIDIA GH200 480GB", "GH200-144GB"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "A100-SXM4-40GB"),
    ],
)
def test_find_gpu_matches_names_and_aliases(query: str, expected: str) -> None:
    assert find_gpu(query).name == expected


def test_every_canonical_name_resolves_to_itself() -> None:
    for name in gpu_catalog():
        assert find_gpu(name).name == name


def test_unknown_gpu_lists_close_matches() -> None:
    with pytest.raises(UnknownGpuError) as excinfo:
        find_gpu("H300 SXM")
    message = str(excinfo.value)
    assert "H100-SXM5-80GB" in message
    assert "`llmco2 gpus`" in message
    assert isinstance(excinfo.value, ValueError)


def test_units_are_si() -> None:
    h100 = find_gpu("H100")
    assert h100.memory_bytes == pytest.approx(80e9)
    assert h100.memory_bandwidth_bytes_per_second == pytest.approx(3.35e12)
    assert h100.peak_flops("bf16") == pytest.approx(989.4e12)
    assert h100.tdp_watts == 700
    assert h100.interconnect_bytes_per_second == pytest.approx(450e9)  # per direction


def test_peak_flops_fallbacks() -> None:
    h100, a100 = find_gpu("H100"), find_gpu("A100")
    assert h100.peak_flops("fp16") == h100.peak_flops("bf16") == h100.peak_flops("bfloat16")
    assert h100.peak_flops("fp8") == pytest.approx(2 * h100.peak_flops("bf16"), rel=1e-3)
    assert h100.peak_flops("int8") == h100.peak_flops("fp8")
    assert h100.peak_flops("fp4") == h100.peak_flops("fp8")
    assert a100.peak_flops("fp8") == a100.peak_flops("bf16")  # Ampere has no FP8
    assert a100.peak_flops("int4") == a100.peak_flops("bf16")
    assert a100.peak_flops("fp32") == pytest.approx(19.5e12)
    b200 = find_gpu("B200")  # no FP32 figure in the catalog
    assert b200.peak_flops("fp32") == pytest.approx(b200.peak_flops("bf16") / 8)
    with pytest.raises(ValueError):
        h100.peak_flops("fp6")


def test_idle_watts_default_is_fraction_of_tdp() -> None:
    a100 = find_gpu("A100-SXM4-40GB")
    assert a100.idle_watts is None
    assert a100.idle_watts_or_default() == pytest.approx(DEFAULT_IDLE_FRACTION_OF_TDP * 400)
    assert find_gpu("H100").idle_watts_or_default() == 121.0  # measured
    measured = GpuSpec(
        name="x", aliases=(), memory_bytes=1.0, memory_bandwidth_bytes_per_second=1.0,
        peak_flops_per_second={"bf16": 1.0}, tdp_watts=100.0, idle_watts=42.0,
        interconnect_bytes_per_second=1.0, source_urls="",
    )
    assert measured.idle_watts_or_default() == 42.0


def test_hardware_validation() -> None:
    gpu = find_gpu("H100")
    assert Hardware(gpu, num_gpus=8, tensor_parallel=4, source="configured").tensor_parallel == 4
    with pytest.raises(ValueError, match="num_gpus"):
        Hardware(gpu, num_gpus=0, tensor_parallel=1, source="configured")
    with pytest.raises(ValueError, match="tensor_parallel"):
        Hardware(gpu, num_gpus=2, tensor_parallel=4, source="nvml")
    with pytest.raises(ValueError, match="tensor_parallel"):
        Hardware(gpu, num_gpus=2, tensor_parallel=0, source="nvml")


def fake_nvml(names: list[str], fail_init: bool = False) -> FakeNvml:
    """``names`` as physical GPUs (UUIDs GPU-<index>aaaa-1111), every other name as bytes like old pynvml."""
    gpus = [FakeGpu(name, uuid=f"GPU-{i}aaaa-1111", name_as_bytes=i % 2 == 1) for i, name in enumerate(names)]
    return FakeNvml(gpus, init_error=FakeNVMLError(9) if fail_init else None)  # 9: NVML_ERROR_DRIVER_NOT_LOADED


def test_detect_gpus_lists_all_when_unrestricted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = fake_nvml(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
    assert detect_gpus(nvml) == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("1", ["B"]),
        ("2,0", ["C", "A"]),
        ("", []),
        ("0,7,1", ["A"]),  # CUDA stops at the first invalid entry
        ("GPU-2aaaa", ["C"]),  # UUID prefix
        ("GPU-1aaaa-1111,0", ["B", "A"]),
    ],
)
def test_detect_gpus_honours_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert detect_gpus(fake_nvml(["A", "B", "C"])) == expected


def test_detect_gpus_returns_none_when_init_fails() -> None:
    nvml = fake_nvml(["A"], fail_init=True)
    assert detect_gpus(nvml) is None


def test_detect_gpus_returns_none_when_a_query_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = fake_nvml(["A"])
    nvml.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(FakeNVMLError(FakeNvml.NVML_ERROR_GPU_IS_LOST))
    assert detect_gpus(nvml) is None
    assert nvml.calls == ["init", "shutdown"]


def test_detect_gpus_on_this_machine_without_gpu() -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    except Exception:
        pass
    assert detect_gpus() is None
