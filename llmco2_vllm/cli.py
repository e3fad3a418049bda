"""``llmco2``: predictions and catalogs from the command line (no vLLM needed).

    llmco2 predict --model meta-llama/Llama-3.1-8B-Instruct --gpu H100 --batch-size 8 \\
        --prompt-tokens 512 --output-tokens 256 [--region FR] [--json]
    llmco2 gpus | regions | models [--json]
    llmco2 eval [--out DIR] [--quick] [--json] | llmco2 train [--out CKPT] | llmco2 eval-gnn [--out DIR]

Exit status: 0 on success, 2 on bad input (with the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from dataclasses import asdict
from typing import Sequence

from llmco2_vllm.predict.batch_predict import BATCH_COLUMNS, OPTIONAL_BATCH_COLUMNS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > 10_000_000:
        raise argparse.ArgumentTypeError(f"{value} is too large (at most 10,000,000)")
    return value


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llmco2 train` (defaults reproduce the shipped checkpoint)."""
    parser.add_argument("--out", default="llmco2_vllm/data/gnn_default.safetensors", help="checkpoint to write")
    parser.add_argument("--members", type=int, default=5, help="ensemble members (default 5)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per member (default 40)")
    parser.add_argument("--samples", type=int, default=4, help="decode contexts sampled per row (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llmco2 eval-gnn`."""
    parser.add_argument("--out", default="benchmarks/results", help="folder for gnn_eval.md and the PNGs")
    parser.add_argument("--members", type=_positive_int, default=2, help="ensemble members per CV fold (default 2)")
    parser.add_argument("--epochs", type=_positive_int, default=25, help="epochs per member per fold (default 25)")
    parser.add_argument("--samples", type=_positive_int, default=4, help="decode contexts sampled per row (default 4)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (1 member x 3 epochs): checks the pipeline, measures nothing")
    parser.add_argument("--json", action="store_true", help="print the headline numbers as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmco2", description="Energy and carbon of LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="predict energy and carbon of a static batch of requests (or of every row of a CSV)",
        description="One static batch (--model --gpu --batch-size --prompt-tokens --output-tokens), or batch mode: "
        "--batch-file IN.csv --out OUT.csv with columns " + ", ".join(BATCH_COLUMNS) + " (optional: "
        + ", ".join(OPTIONAL_BATCH_COLUMNS) + "). In batch mode rows that cannot be predicted (unknown model or "
        "GPU, missing or out-of-range numbers) are skipped with their reason (stderr, the `error` column, and "
        "`skipped` in --json); the exit status is 2 only when no row could be predicted.",
    )
    predict.add_argument("--model", help="catalog model id (see `llmco2 models`) or a config.json path")
    predict.add_argument("--gpu", help="GPU name or alias (see `llmco2 gpus`)")
    predict.add_argument("--num-gpus", type=_positive_int, default=None, help="GPUs in the engine (default: TP size)")
    predict.add_argument("--tensor-parallel", type=_positive_int, default=1, help="tensor-parallel size (default 1)")
    predict.add_argument("--batch-size", type=_positive_int, help="requests in the batch")
    predict.add_argument("--prompt-tokens", type=_positive_int, help="prompt tokens per request")
    predict.add_argument("--output-tokens", type=_positive_int, help="generated tokens per request")
    predict.add_argument("--region", default=None, help="grid region code for carbon (see `llmco2 regions`)")
    predict.add_argument("--pue", type=float, default=1.0, help="power usage effectiveness (default 1.0)")
    predict.add_argument("--calibration", default=None, help="calibration file from `llmco2 calibrate` to apply")
    predict.add_argument(
        "--predictor",
        default="fitted",
        help="fitted (default: the time and power model fitted on measured vLLM serving), analytic, gnn (the shipped "
        "LLMCO2 checkpoint; needs torch-geometric) or package.module:Class",
    )
    predict.add_argument("--batch-file", default=None, help="CSV of static batches to predict (batch mode)")
    predict.add_argument("--out", default=None, help="output CSV for batch mode")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")

    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate the fitted model's terms on measured batches of your deployment",
        description="Re-fits the fitted time and power model's own parameters (weight streaming, GEMM, K/V and "
        "memory efficiencies, collectives, per-sequence and per-step overheads, power activities, idle power) to "
        "a measurement CSV: the columns of `predict --batch-file` plus measured_seconds (the batch's wall time) "
        "and/or measured_energy_j (its energy over all GPUs), optionally idle_seconds (idle time inside the "
        "energy measurement). Both signals are used where present; each parameter is pulled toward the shipped "
        "value, so a few rows move only what they identify. Rows that cannot be used (unknown model or GPU, "
        "missing or negative numbers) are skipped with their reason; it fails only when no row is usable. "
        "--json prints the calibrated parameters, their change from the prior and the residuals. Apply the "
        "result with `llmco2 predict ... --calibration CAL.json` or LLMCO2_CALIBRATION_FILE in the plugin "
        "(which also keeps its online calibration there).",
    )
    calibrate.add_argument("--measurements", required=True, help="CSV of measured batches")
    calibrate.add_argument("--out", required=True, help="calibration file to write (JSON)")
    calibrate.add_argument("--json", action="store_true", help="print the result as JSON")

    train = commands.add_parser(
        "train", help="train the GNN predictor on the packaged real measurements (reproduces the shipped checkpoint)"
    )
    add_train_arguments(train)

    evaluate = commands.add_parser(
        "eval",
        help="cross-validate the fitted time and power model against the baselines on measured vLLM serving",
        description="Leave-one-model-out (ML.ENERGY v3, H100), leave-one-GPU-out (v2, A100 <-> H100) and "
        "software-version transfer of the fitted model (the plugin's default predictor), the per-kernel GNN, a plain "
        "non-negative linear fit, the analytic roofline, the shipped GNN checkpoint and EcoLogits on the same rows; "
        "writes model_eval.md/.json, the PNGs and fitted_model.json (the model fitted on every row) into --out "
        "(about 10 CPU minutes; --quick: a smoke run in seconds).",
    )
    from llmco2_vllm.predict.serving_evaluation import add_arguments as add_serving_eval_arguments

    add_serving_eval_arguments(evaluate)

    evaluate_gnn = commands.add_parser(
        "eval-gnn",
        help="cross-validate the LLMCO2 GNN checkpoint's training on the static-batch rows (markdown + PNG report)",
        description="Leave-one-GPU-type-out and leave-one-model-family-out cross-validation of the GNN on the "
        "packaged static-batch measurements, beside the analytic, LLMCarbon-style and EcoLogits baselines on the same "
        "rows; writes gnn_eval.md, gnn_eval_scatter.png and gnn_eval_cdf.png into --out (a few CPU minutes).",
    )
    add_eval_arguments(evaluate_gnn)

    collect = commands.add_parser(
        "collect",
        help="measure per-step time and energy on this machine's NVIDIA GPU (training/calibration data)",
    )
    from llmco2_vllm.measure.collect import add_arguments as add_collect_arguments

    add_collect_arguments(collect)

    for name, text in (("gpus", "list the GPU catalog"), ("regions", "list grid regions"), ("models", "list catalog models")):
        listing = commands.add_parser(name, help=text)
        listing.add_argument("--json", action="store_true", help="print JSON")
    return parser


def console_main() -> int:
    """The ``llmco2`` command: like other CLIs, ``llmco2 gpus | head`` ends quietly."""
    if hasattr(signal, "SIGPIPE"):
        # Only in the command's own process: main() also runs inside other programs (tests, notebooks).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "train":
            from llmco2_vllm.predict.gnn.training import run as run_train

            return run_train(args)
        if args.command == "eval":
            from llmco2_vllm.predict.serving_evaluation import run as run_serving_eval

            return run_serving_eval(args)
        if args.command == "eval-gnn":
            from llmco2_vllm.predict.gnn.evaluation import run as run_eval

            return run_eval(args)
        if args.command == "collect":
            from llmco2_vllm.measure.collect import run as run_collect

            return run_collect(args)
        return _listing(args)
    except ValueError as error:  # every catalog/validation error of the package is a ValueError
        print(f"llmco2: error: {error}", file=sys.stderr)
        return 2


def _predict(args: argparse.Namespace) -> int:
    from llmco2_vllm.predict.batch_predict import BatchPredictor, predict_file

    predictor = BatchPredictor(calibration_path=args.calibration, pue=args.pue, predictor=args.predictor)
    if args.batch_file:
        if not args.out:
            raise ValueError("batch mode needs --out OUT.csv")
        run = predict_file(predictor, args.batch_file, args.out)
        if args.json:
            print(json.dumps({"rows": run.rows, "predicted": run.predicted, "skipped": run.skipped, "out": args.out},
                             indent=2))
        if not run.predicted:
            print(f"llmco2: error: {args.batch_file}: no row could be predicted", file=sys.stderr)
            return 2
        return 0
    missing = [f"--{name.replace('_', '-')}" for name in ("model", "gpu", "batch_size", "prompt_tokens", "output_tokens")
               if getattr(args, name) is None]  # fmt: skip
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or use --batch-file IN.csv --out OUT.csv)")
    result = predictor.predict(
        {
            "model": args.model,
            "gpu": args.gpu,
            "num_gpus": args.num_gpus or args.tensor_parallel,
            "tensor_parallel": args.tensor_parallel,
            "batch_size": args.batch_size,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "region": args.region or "",
        }
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(key) for key in result)
        for key, value in result.items():
            shown = f"{value:.6g}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import csv

    from llmco2_vllm.predict import term_calibration
    from llmco2_vllm.predict.batch_predict import BatchRow, skip_row
    from llmco2_vllm.predict.calibration import OnlineCalibrator
    from llmco2_vllm.predict.fitted import shipped_model
    from llmco2_vllm.predict.step_terms import StepTerms

    observations: list[term_calibration.Observation] = []
    skipped: list[dict] = []
    first = None
    with open(args.measurements, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        measured_columns = {"measured_seconds", "measured_energy_j"} & set(reader.fieldnames or [])
        if not measured_columns:
            raise ValueError(f"{args.measurements}: needs a measured_seconds and/or a measured_energy_j column "
                             "(the batch's wall time in seconds, its energy over all GPUs in joules)")  # fmt: skip
        for number, row in enumerate(reader, start=1):
            try:
                seconds = _measured_number(row, "measured_seconds", required=False) or None
                energy = _measured_number(row, "measured_energy_j", required=False) or None
                if seconds is None and energy is None:
                    missing = " and ".join(sorted(measured_columns))
                    raise ValueError(f"{missing} is missing (a row needs measured_seconds or measured_energy_j)")
                idle_seconds = _measured_number(row, "idle_seconds", required=False)
                batch = BatchRow.parse(row)
                deployment = batch.deployment()
                terms = StepTerms(deployment.model, deployment.hardware.gpu, batch.tensor_parallel)
                # Replicas run their share at once: the batch takes one replica's time and draws all GPUs.
                gpus = deployment.hardware.num_gpus * batch.batch_size / batch.per_replica
                observation = term_calibration.static_batch_observation(
                    terms, gpus, batch.per_replica, batch.prompt_tokens, batch.output_tokens,
                    measured_seconds=seconds, measured_energy_j=energy, idle_seconds=idle_seconds, label=f"row {number}",
                )  # fmt: skip
            except Exception as error:  # one bad row must not stop the fit
                skip_row(skipped, number, error, args.measurements)
                continue
            observations.append(observation)
            first = first or observation
    if not observations:
        raise ValueError(f"{args.measurements}: no usable rows ({len(skipped)} skipped)")
    result = term_calibration.calibrate(shipped_model(), observations)
    # The online calibration starts from these terms; its idle prior is the calibrated deployment's.
    calibrator = OnlineCalibrator(prior_idle_watts=first.num_gpus * term_calibration.CalibratedModel(
        result.model, idle_scale=result.idle_scale).with_idle(first.terms.gpu).idle_watts)  # fmt: skip
    calibrator.terms = result.terms.to_dict()
    calibrator.save(args.out)

    def mape(residuals: list[float]) -> float | None:
        return sum(abs(math.exp(r) - 1) for r in residuals) / len(residuals) if residuals else None

    signal = "energy" if result.residuals_before["energy"] else "seconds"
    summary = {
        "rows": len(observations),
        "rows_with_time": len(result.residuals_before["seconds"]),
        "rows_with_energy": len(result.residuals_before["energy"]),
        "in_sample_mape_before": mape(result.residuals_before[signal]),
        "in_sample_mape_after": mape(result.residuals_after[signal]),
        "time_mape_before": mape(result.residuals_before["seconds"]),
        "time_mape_after": mape(result.residuals_after["seconds"]),
        **result.report(),
        "out": args.out,
        "skipped": skipped,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key in ("rows", "rows_with_time", "rows_with_energy", "in_sample_mape_before", "in_sample_mape_after", "out"):
            value = summary[key]
            print(f"{key:<22}  {value:.4g}" if isinstance(value, float) else f"{key:<22}  {value}")
        print(f"{'skipped':<22}  {len(skipped)}")
        selection = summary.get("selection")
        if selection:  # measured times are fitted only where leaving each row out shows they help
            errors = ", ".join(f"{k} {v:.3g}" for k, v in selection["leave_one_out_energy_error"].items() if v is not None)
            print(f"{'measured times used':<22}  {'yes' if selection['time_used'] else 'no'} (leave-one-out energy error: {errors})")
        for name, change in summary["changes"].items():
            if abs(change["ratio"] - 1) > 0.005:
                print(f"  {name:<40} {change['prior']:.4g} -> {change['calibrated']:.4g} (x{change['ratio']:.3f})")
        for name, factors in summary["model_factors"].items():  # rows of several models: each one's own
            print(f"  model {name}: time x{factors['time']:.3f}, power x{factors['power']:.3f}")
    return 0


def _measured_number(row: dict, name: str, required: bool) -> float:
    """A finite measured quantity of a calibration row: energy must be > 0, idle seconds >= 0."""
    raw = (row.get(name) or "").strip()
    if not raw:
        if required:
            raise ValueError(f"{name} is missing")
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (required and value == 0):
        raise ValueError(f"{name}={raw!r} must be {'positive' if required else 'zero or positive'}")
    return value


def _listing(args: argparse.Namespace) -> int:
    rows: list[dict]
    if args.command == "gpus":
        from llmco2_vllm.predict.hardware import gpu_catalog

        rows = [
            {
                "name": gpu.name,
                "aliases": list(gpu.aliases),
                "memory_gb": gpu.memory_bytes / 1e9,
                "memory_bandwidth_gb_per_s": gpu.memory_bandwidth_bytes_per_second / 1e9,
                "bf16_dense_tflops": gpu.peak_flops_per_second.get("bf16", 0) / 1e12,
                "tdp_watts": gpu.tdp_watts,
                "source_urls": gpu.source_urls,
            }
            for gpu in gpu_catalog().values()
        ]
        columns = ("name", "memory_gb", "memory_bandwidth_gb_per_s", "bf16_dense_tflops", "tdp_watts")
    elif args.command == "regions":
        from llmco2_vllm.carbon.intensity import region_table

        rows = [asdict(intensity) for intensity in region_table().values()]
        columns = ("region", "grams_co2e_per_kwh", "year", "kind")
    else:
        from llmco2_vllm.predict.model_description import model_catalog

        rows = [
            {"model_id": model_id, "total_params_b": entry.get("total_params_b"), "status": entry.get("status")}
            for model_id, entry in model_catalog().items()
        ]
        columns = ("model_id", "total_params_b", "status")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns))
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(console_main())
