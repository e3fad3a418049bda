"""``llmco2 collect``: measure time and energy per engine step of a reference transformer.

What it measures
    A PyTorch transformer built from a ``ModelDescription`` with the real architecture's shapes
    (dense Llama-style GQA layers, or top-k routed MoE layers) and random weights: bf16 on CUDA,
    float32 on CPU. Each layer is RMSNorm -> fused QKV linear -> rotary -> attention over a KV
    cache through ``torch.nn.functional.scaled_dot_product_attention`` -> output projection ->
    RMSNorm -> SwiGLU MLP (or routed experts). On CUDA, attention is restricted to the fused
    kernels serving uses (flash / memory-efficient / cuDNN); a shape no fused kernel accepts is
    skipped and reported rather than timed on the slow math kernel. Logits are computed for the
    last position of each request only, as vLLM does.

    For every shape of a sweep (prefill: batch x prompt chunk x prior context; decode: batch x
    context) the same step is repeated, with ``torch.cuda.synchronize()`` after each step (vLLM
    also waits for every step's sampled tokens), until a window of at least
    ``--min-window-seconds`` (default 1 s on CUDA) has passed, so NVML's energy counter, which
    updates in coarse increments, resolves it. Energy comes from ``EnergyMeter`` windows
    (``llmco2_vllm.measure.energy_meter``); idle power is measured for a few seconds before the sweep,
    with weights loaded and the CUDA context open.

Layer scaling (``--num-layers`` below the model's layer count, to fit GPU memory)
    A step of the measured model = non-layer part (embedding, final norm, LM head) + L_m layers.
    When L_m < L_total, a second window measures the non-layer part alone ("head") and

        per_layer = (measured_per_step - head_per_step) / L_m          (clamped at >= 0)
        full_per_step = head_per_step + per_layer * L_total

    for both seconds and joules; ``complete`` becomes False if the clamp was needed. When
    L_m == L_total the measured step is the answer and no head window is run. The rule assumes
    the measured layers are representative: MoE models keep their dense/MoE layer mix in
    proportion. Raw values are kept in the ``measured_*`` and ``head_*`` columns.

Not measured, deliberately (known gaps to vLLM, documented rather than faked)
    PyTorch kernels, not vLLM's (steps of <= 512 tokens are replayed from a CUDA graph, as
    vLLM does, so they pay no launch gaps; ``--no-cuda-graphs`` runs everything eagerly; the
    ``cuda_graph`` column says which); uniform padded batches instead of vLLM's packed
    variable-length batches and paged KV cache; one GPU (``num_gpus = tensor_parallel = 1``);
    all layers use full attention (sliding windows ignored); MLA models (DeepSeek-V2/V3) are
    rejected; MoE experts run as two grouped matrix products per layer (``torch._grouped_mm``),
    not vLLM's fused MoE kernel, or as a loop where grouped products are missing
    (``experts_kernel`` column); no sampling.

Engines
    ``--engine vllm`` (measuring vLLM's own engine steps, when vLLM is importable and a CUDA GPU
    is present) is the intended future path. It is NOT implemented: only ``--engine reference``
    (this package's transformer) runs; asking for ``vllm`` exits with status 2.

Output: one CSV row per measured shape (``CSV_COLUMNS``), written as each shape finishes so an
interrupted run keeps what it measured, with the analytic prediction for the same shape beside
the measurement. ``--device cpu --dry-run`` runs tiny shapes without NVML (energy empty,
``complete`` False) so CI can smoke-test the code path. Progress goes to stderr.

    python -m llmco2_vllm.measure.collect --quick --model meta-llama/Llama-3.1-8B-Instruct --out llama8b.csv
    python -m llmco2_vllm.measure.collect --device cpu --dry-run --out smoke.csv

Modules, in the order data flows through them
    ``sweep``            which shapes to run (presets), the run's settings, the CSV it writes
    ``memory_plan``      how many layers and which shapes fit in GPU memory
    ``reference_model``  the PyTorch transformer whose steps are measured
    ``harness``          timing windows, CUDA graphs, energy meters, NVML provenance, layer scaling
    ``collection``       one run: model, idle power, every shape, predictions beside measurements
    ``command_line``     ``llmco2 collect`` options and entry point
Importing this package needs neither torch nor pynvml (``llmco2 --help`` must work without them).
"""

from __future__ import annotations

from llmco2_vllm.measure.collect.collection import collect
from llmco2_vllm.measure.collect.command_line import add_arguments, build_parser, config_from_args, main, run
from llmco2_vllm.measure.collect.harness import (
    CUDA_GRAPH_MAX_TOKENS,
    Meter,
    NoEnergyMeter,
    NvmlProbe,
    WindowResult,
    make_meter,
    measure_window,
    scale_step,
    scale_to_full_model,
)
from llmco2_vllm.measure.collect.memory_plan import plan_num_layers, shape_bytes
from llmco2_vllm.measure.collect.reference_model import attention_call, build_reference_model, check_supported
from llmco2_vllm.measure.collect.sweep import (
    CSV_COLUMNS,
    CollectConfig,
    CsvRowWriter,
    SweepShape,
    dry_run_shapes,
    full_shapes,
    quick_shapes,
)

__all__ = [
    "CSV_COLUMNS",
    "CUDA_GRAPH_MAX_TOKENS",
    "CollectConfig",
    "CsvRowWriter",
    "Meter",
    "NoEnergyMeter",
    "NvmlProbe",
    "SweepShape",
    "WindowResult",
    "add_arguments",
    "attention_call",
    "build_parser",
    "build_reference_model",
    "check_supported",
    "collect",
    "config_from_args",
    "dry_run_shapes",
    "full_shapes",
    "main",
    "make_meter",
    "measure_window",
    "plan_num_layers",
    "quick_shapes",
    "run",
    "scale_step",
    "scale_to_full_model",
    "shape_bytes",
]
