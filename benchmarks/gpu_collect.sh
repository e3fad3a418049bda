#!/usr/bin/env bash
# One short measurement run on a lent H100/H200: `llmco2 collect --quick` on real model shapes.
#
# Run from the repository root (the device tool runs commands there):
#     bash benchmarks/gpu_collect.sh            # CSVs and logs land in $OUT (or ./collect_out)
#
# Installs nothing: it uses the device image's python3 (torch, nvidia-ml-py, numpy are there) and
# this checkout on PYTHONPATH.
#
# Time budget, < 8 minutes of wall time in all (a device session has 15 minutes including the
# machine's start, so this leaves room for one rerun):
#   - checks                                     ~10 s
#   - benchmarks/nvml_probe.py                   ~15 s (hard cap 60 s)
#   - Llama-3.1-8B-Instruct, --quick, 14 shapes  ~1 min (all 32 layers fit; hard cap 240 s)
#   - Qwen3-30B-A3B (MoE), --quick: ~1-2 min (on an H100 only ~35 of 48 layers fit, so it also
#     exercises the per-layer scaling and the separate head window; hard cap 200 s)
#   - EXTRA_MODELS: more "name model-id cap-seconds" lines
# A model starts only while fewer than START_BEFORE (300) seconds have passed.
# Environment: SKIP_PROBE=1 skips the NVML probe; COLLECT_ARGS adds flags to every collect run
# (e.g. --no-cuda-graphs); SUFFIX is appended to output names.
#
# Runs committed so far (benchmarks/results/h200_2026-11-27/):
#   1. eager steps, MoE experts as a Python loop (before CUDA graphs and grouped experts):
#      bash benchmarks/gpu_collect.sh                              -> collect_{llama8b,qwen3_30b_a3b}.csv
#   2. SKIP_PROBE=1 SUFFIX=_graphs EXTRA_MODELS="qwen3_32b Qwen/Qwen3-32B 150" bash benchmarks/gpu_collect.sh
# and on a lent H100 (benchmarks/results/h100_2026-11-27/):
#   3. SUFFIX=_graphs EXTRA_MODELS="qwen3_32b Qwen/Qwen3-32B 150" bash benchmarks/gpu_collect.sh
# Each results folder keeps a run.json beside the results (device, driver, torch, the commands above,
# date; null where nothing recorded a value): copy one for a new folder and fill it from the CSVs'
# provenance columns, nvml_probe.json and this script's "== environment" lines.
# Reports: python benchmarks/gpu_report.py -> each folder's README.md and results/gpu_measurements.md
# (it reads every results folder that has a run.json and stops where run.json contradicts the files).
# Each CSV is written row by row, so a run cut by its timeout keeps the shapes it finished.
set -uo pipefail

OUT="${OUT:-$PWD/collect_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

echo "== environment"
"$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'
"$PYTHON" -c 'import platform; print("python", platform.python_version())'
echo "code revision: $(git describe --always --dirty 2>/dev/null || echo unknown)"
echo "settings: SKIP_PROBE=${SKIP_PROBE:-} SUFFIX=${SUFFIX:-} EXTRA_MODELS=\"${EXTRA_MODELS:-}\" COLLECT_ARGS=\"${COLLECT_ARGS:-}\""
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
"$PYTHON" -c 'import pynvml; print("pynvml ok")' || echo "pynvml missing: energy columns will be empty"
[ -f llmco2_vllm/measure/energy_meter.py ] || echo "llmco2_vllm/measure/energy_meter.py missing: energy columns will be empty"

if [ "${SKIP_PROBE:-0}" != 1 ]; then
    echo "== NVML probe (read cost, counter cadence, counter vs power; ~15 s)"
    timeout 60 "$PYTHON" benchmarks/nvml_probe.py --out "$OUT" > "$OUT/nvml_probe.log" 2>&1
    echo "exit status $? after ${SECONDS} s"; tail -n 60 "$OUT/nvml_probe.log"
fi

# name  catalog model id  hard cap (s); a model starts only while under START_BEFORE s have passed
START_BEFORE="${START_BEFORE:-300}"
while read -r name model cap; do
    [ -n "$name" ] || continue
    if [ "$SECONDS" -gt "$START_BEFORE" ]; then
        echo "== skipping $model: ${SECONDS} s already used"; continue
    fi
    echo "== $model (quick)"
    timeout "$cap" "$PYTHON" -m llmco2_vllm.measure.collect --quick ${COLLECT_ARGS:-} \
        --model "$model" --out "$OUT/collect_${name}${SUFFIX:-}.csv" 2>&1 | tee "$OUT/collect_${name}${SUFFIX:-}.log"
    echo "exit status ${PIPESTATUS[0]} after ${SECONDS} s"
done <<MODELS
llama8b meta-llama/Llama-3.1-8B-Instruct 240
qwen3_30b_a3b Qwen/Qwen3-30B-A3B-Instruct-2507 200
${EXTRA_MODELS:-}
MODELS

echo "== results (seconds_per_step, energy_j_per_step vs predicted)"
for csv_file in "$OUT"/collect_*.csv; do
    [ -f "$csv_file" ] || continue
    echo "-- $csv_file"
    "$PYTHON" - "$csv_file" <<'PY'
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    print(f"{r['phase']:7} b{r['batch_size']:>4} p{r['prompt_tokens']:>5} c{r['context_tokens']:>5} "
          f"L{r['layers_measured']}/{r['layers_total']} {r['seconds_per_step'] or '-':>10} s "
          f"(pred {r['predicted_seconds_per_step'] or '-':>10}) {r['energy_j_per_step'] or '-':>10} J "
          f"(pred {r['predicted_energy_j_per_step'] or '-':>10}) complete={r['complete']} "
          f"graph={r.get('cuda_graph', '')} experts={r.get('experts_kernel', '')}")
PY
done
