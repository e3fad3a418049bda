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
#   - Llama-3.1-8B-Instruct, --quick, 14 shapes  ~1-2 min (all 32 layers fit; hard cap 240 s)
#   - Qwen3-30B-A3B (MoE), --quick, only if at most 240 s have passed so far: ~2-3 min
#     (on an H100 only ~35 of 48 layers fit, so it also exercises the per-layer scaling and the
#     separate head window; hard cap 200 s)
# Each CSV is written row by row, so a run cut by its timeout keeps the shapes it finished.
set -uo pipefail

OUT="${OUT:-$PWD/collect_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

echo "== environment"
"$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
"$PYTHON" -c 'import pynvml; print("pynvml ok")' || echo "pynvml missing: energy columns will be empty"
[ -f llmco2_vllm/energy_meter.py ] || echo "llmco2_vllm/energy_meter.py missing: energy columns will be empty"

echo "== Llama-3.1-8B-Instruct (quick)"
timeout 240 "$PYTHON" -m llmco2_vllm.collect --quick \
    --model meta-llama/Llama-3.1-8B-Instruct --out "$OUT/collect_llama8b.csv" 2>&1 | tee "$OUT/collect_llama8b.log"
echo "exit status ${PIPESTATUS[0]} after ${SECONDS} s"

if [ "$SECONDS" -le 240 ]; then
    echo "== Qwen3-30B-A3B-Instruct-2507 (MoE, quick)"
    timeout 200 "$PYTHON" -m llmco2_vllm.collect --quick \
        --model Qwen/Qwen3-30B-A3B-Instruct-2507 --out "$OUT/collect_qwen3_30b_a3b.csv" 2>&1 \
        | tee "$OUT/collect_qwen3_30b_a3b.log"
    echo "exit status ${PIPESTATUS[0]} after ${SECONDS} s"
else
    echo "== skipping the second model: ${SECONDS} s already used"
fi

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
          f"(pred {r['predicted_energy_j_per_step'] or '-':>10}) complete={r['complete']}")
PY
done
