"""Command line of ``llmco2 collect`` (also ``python -m llmco2_vllm.measure.collect``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, TextIO

from llmco2_vllm.measure.collect.collection import collect
from llmco2_vllm.measure.collect.harness import CUDA_GRAPH_MAX_TOKENS, Meter, make_meter
from llmco2_vllm.measure.collect.progress import progress
from llmco2_vllm.measure.collect.reference_model import check_supported
from llmco2_vllm.measure.collect.sweep import (
    CollectConfig,
    CsvRowWriter,
    dry_run_shapes,
    full_shapes,
    quick_shapes,
)
from llmco2_vllm.predict.model_description import ModelDescription, load_model

ENGINE_HELP = (
    "reference: this module's PyTorch transformer (the only engine implemented). "
    "vllm: measuring vLLM's own engine steps, the intended future path when vLLM is importable "
    "and a CUDA GPU is present; NOT implemented yet (exits with status 2)."
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``llmco2 collect`` (for the CLI's subparser and this module's own parser)."""
    parser.add_argument("--model", default=None,
                        help="catalog model id or config.json path (default with --dry-run: a tiny 2-layer Llama)")
    parser.add_argument("--out", type=Path, default=Path("collect.csv"), help="CSV to write (default collect.csv)")
    parser.add_argument("--engine", choices=("reference", "vllm"), default="reference", help=ENGINE_HELP)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda if available)")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true",
                       help="~5 min GPU preset: prefill 1/8 x 128/1024/4096, decode 1/8/32/128 x 512/2048")
    sweep.add_argument("--dry-run", action="store_true",
                       help="tiny shapes, no NVML, energy empty and complete=False: a smoke test (CPU is fine)")
    parser.add_argument("--num-layers", type=_positive_int, default=None,
                        help="layers to build (default: all that fit in GPU memory; 2 with --dry-run); "
                             "results are scaled to the full model per layer")
    parser.add_argument("--min-window-seconds", type=_non_negative_float, default=None,
                        help="repeat each step for at least this long (default 1.0 on CUDA, 0 otherwise)")
    parser.add_argument("--min-steps", type=_positive_int, default=2, help="steps per window at least (default 2)")
    parser.add_argument("--idle-seconds", type=_non_negative_float, default=None,
                        help="idle-power window before the sweep (default 5 on CUDA, 0 on CPU or --dry-run)")
    parser.add_argument("--predict-gpu", default=None,
                        help="catalog GPU for the analytic prediction columns (default: the measured GPU)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and tokens")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help=f"run every step eagerly (default: steps of <= {CUDA_GRAPH_MAX_TOKENS} tokens replay "
                             "from a CUDA graph, as vLLM runs them)")


def _resolve_device(text: str) -> str:
    import torch  # lazy: `--help` and the CLI must not need torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(text).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: no CUDA GPU is available (use --device cpu --dry-run)")
    return text


def config_from_args(args: argparse.Namespace) -> CollectConfig:
    """Resolve defaults that depend on the device and the mode."""
    device = _resolve_device(args.device)
    on_cuda = device.startswith("cuda")
    if args.model is None and not args.dry_run:
        raise ValueError("--model is required (except with --dry-run)")
    if args.model is None:
        from llmco2_vllm.dev.tiny_model import TINY_LLAMA_CONFIG

        model = ModelDescription.from_hf_config(TINY_LLAMA_CONFIG, name="tiny-llama (llmco2 test model)")
    else:
        model = load_model(args.model)
    check_supported(model)
    num_layers = args.num_layers
    if num_layers is None and args.dry_run:
        num_layers = min(2, model.num_layers)
    if num_layers is not None and num_layers > model.num_layers:
        raise ValueError(f"--num-layers {num_layers} exceeds the model's {model.num_layers} layers")
    shapes = dry_run_shapes() if args.dry_run else quick_shapes() if args.quick else full_shapes()
    measured = on_cuda and not args.dry_run
    return CollectConfig(
        model=model,
        shapes=tuple(shapes),
        device=device,
        num_layers=num_layers,
        min_window_seconds=args.min_window_seconds if args.min_window_seconds is not None else 1.0 if on_cuda else 0.0,
        min_steps=args.min_steps,
        warmup_seconds=0.25 if on_cuda else 0.0,
        idle_seconds=args.idle_seconds if args.idle_seconds is not None else 5.0 if measured else 0.0,
        predict_gpu=args.predict_gpu,
        seed=args.seed,
        cuda_graphs=not args.no_cuda_graphs,
    )


def run(args: argparse.Namespace, meter: Meter | None = None, stream: TextIO | None = None) -> int:
    """Run a collection from parsed arguments: 0 on success, 2 on bad input."""
    if args.engine == "vllm":
        print("llmco2 collect: error: --engine vllm is not implemented yet; use --engine reference",
              file=stream or sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"llmco2 collect: error: {error}", file=stream or sys.stderr)
        return 2
    own_meter = meter is None
    active_meter = make_meter(config, args.dry_run, stream) if meter is None else meter
    writer = CsvRowWriter(args.out)
    try:
        rows = collect(config, active_meter, writer.write, stream)
    finally:
        writer.close()
        close = getattr(active_meter, "close", None)
        if own_meter and callable(close):
            close()  # stops the EnergyMeter's sampler thread and releases NVML
    progress(stream, f"wrote {len(rows)} rows to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmco2_vllm.measure.collect",
        description="Measure time and energy per engine step of a reference transformer with a real "
                    "model's shapes, next to the analytic prediction. --engine vllm (vLLM's own engine, "
                    "when vLLM and a CUDA GPU are present) is the intended future path and is not "
                    "implemented yet.",
    )
    add_arguments(parser)
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    return run(build_parser().parse_args(list(argv) if argv is not None else None))
