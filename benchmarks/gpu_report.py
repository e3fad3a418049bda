"""Report of the GPU measurement runs: reference-transformer steps vs the project's step predictors.

Run (no GPU needed): ``.venv/bin/python benchmarks/gpu_report.py [FOLDER ...]``
For each results FOLDER (default: every folder of ``benchmarks/results`` with a ``run.json``, the
first-measured first) it writes ``FOLDER/README.md`` and, when matplotlib is importable,
``FOLDER/measured_vs_predicted.png``. Run without folders it also writes the cross-GPU index
``benchmarks/results/gpu_measurements.md`` (``--index PATH`` writes it for the folders given;
``--no-index`` skips it).

Inputs, all from ``FOLDER``: every ``collect_*.csv`` (rows of ``llmco2 collect``; files added later are
picked up on the next run), the ``run*.log`` consoles of ``benchmarks/gpu_collect.sh`` (to tell which
run wrote which CSV), ``run.json`` (the device, the software and the command lines of the runs, which
the logs do not contain; the report stops if it contradicts the other files), ``nvml_probe.json`` and
``nvml_trace.csv`` (``benchmarks/nvml_probe.py``). Missing NVML files drop the parts that need them
only. The GPU is the CSVs' ``gpu`` column (the NVML name), mapped to its catalog entry by ``find_gpu``
exactly as ``collect`` does.

For each measured shape the script predicts the same uniform batch on the catalog entry of the
measured GPU, with 16-bit weights/KV (exactly what ``collect`` predicts), with
  * the analytic roofline predictor (``AnalyticPredictor``; checked against the CSV's
    ``predicted_*`` columns), and
  * the GNN, the plugin's default predictor: ``GnnPredictor`` (full ensemble) and the distilled
    table the plugin runs inside vLLM (``DistilledGnnPredictor``), which must agree on these shapes.
    Whether its learned correction is applied in full or shrunk is decided by the library
    (``GnnEnsemble.knows``: the catalog GPU's datasheet signature against the checkpoint's training
    GPUs), not here.
Both predicted energies include idle power (``Roofline``: seconds x (idle + dynamic x activity)),
so they are compared with the measured counter energy as is, and as "dynamic" energy (energy minus
idle power x step time: measured idle for the measurement, catalog idle for the prediction).

Accuracy tables use dense models only. MoE rows are listed but kept out of them: the first H200 run's
experts ran as a per-expert Python loop (not representative at all); rows with grouped expert
products (``experts_kernel = grouped_mm``) get a separate, explicitly indicative table.

Code: ``gpu_report_data.py`` reads the folders and computes the numbers, ``gpu_report_prose.py``
writes the markdown, ``gpu_report_plot.py`` the figure; this file only wires them together.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpu_report_data import (
    RESULTS_DIR,
    RUN_METADATA_NAME,
    FolderResult,
    load_datasets,
    read_probe,
    read_run_metadata,
    result_folders,
    run_metadata_conflicts,
)
from gpu_report_plot import plot
from gpu_report_prose import build_index, build_report

INDEX_PATH = RESULTS_DIR / "gpu_measurements.md"


def report_folder(folder: Path) -> FolderResult:
    """Read ``folder``, write its README (and figure); stops when its ``run.json`` contradicts its files."""
    datasets = load_datasets(folder)
    probe = read_probe(folder)
    meta = read_run_metadata(folder)
    if meta is not None:
        conflicts = run_metadata_conflicts(meta, datasets, probe)
        if conflicts:
            raise SystemExit(f"{meta.path}: " + "; ".join(conflicts))
    plot_name = plot(folder, datasets)
    (folder / "README.md").write_text(build_report(folder, datasets, probe, meta, plot_name), encoding="utf-8")
    print(f"wrote {folder / 'README.md'}")
    return FolderResult(folder, datasets, probe, meta)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path,
                        help=f"results folders with collect_*.csv, {RUN_METADATA_NAME} and nvml_probe.* (default: "
                             f"every folder of {RESULTS_DIR.name}/ with a {RUN_METADATA_NAME}, and the index)")
    parser.add_argument("--index", type=Path, default=None,
                        help=f"write the cross-GPU index here (default without folders: {INDEX_PATH.name})")
    parser.add_argument("--no-index", action="store_true", help="do not write the cross-GPU index")
    args = parser.parse_args()
    folders = args.folders or result_folders()
    if not folders:
        raise SystemExit(f"no results folder with a {RUN_METADATA_NAME} in {RESULTS_DIR}")
    index_path = None if args.no_index else (args.index or (None if args.folders else INDEX_PATH))
    results = [report_folder(folder) for folder in folders]
    if index_path is not None:
        index_path.write_text(build_index(results), encoding="utf-8")
        print(f"wrote {index_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
