#!/usr/bin/env bash
# One sitting on a lent GPU machine (issue 20), run from the repository root:
#   1. installs the wheels carried in .whl/ into /tmp/site (no index, no dependencies),
#   2. prints the versions that decide the result (and whether flash-attn, liger, unsloth are there),
#   3. runs the 1B LoRA contender table (every contender of benchmarks/gpu_sft.py), then
#   4. the memory plan check (1B LoRA, 1B full, 8B QLoRA: predicted vs measured peak).
# Logs, tables and JSON go to $OUT (default ./gpu-out). Sized for ~7 minutes on an H100: 25 steps
# measured from step 6, each contender killed after $TIMEOUT s (a "timed out" row), the model and
# data written once and shared by the table and the plan check. Knobs (environment): STEPS,
# MEASURE_FROM, TIMEOUT, PLAN_TIMEOUT, CONTENDERS, PLAN_CONFIGS, PYTHON, and GPU_SFT_ARGS (added to
# both runs; GPU_SFT_ARGS=--dry-run checks this script on a machine without a GPU).
set -u -o pipefail

OUT=${OUT:-./gpu-out}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-25}
MEASURE_FROM=${MEASURE_FROM:-6}
TIMEOUT=${TIMEOUT:-90}
PLAN_TIMEOUT=${PLAN_TIMEOUT:-150}
CONTENDERS=${CONTENDERS:-}
PLAN_CONFIGS=${PLAN_CONFIGS:-1b-lora,1b-full,8b-qlora}
WORK=${WORK:-/tmp/gpu_sft-work}
EXTRA=${GPU_SFT_ARGS:-}
mkdir -p "$OUT/logs" "$WORK"
started=$(date +%s)
phase() { echo "== $1 (at $(($(date +%s) - started)) s)" | tee -a "$OUT/session.log"; }

phase "wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tail -20 | tee "$OUT/pip.log"
else
    echo "no .whl/*.whl carried: using what $PYTHON has" | tee "$OUT/pip.log"
fi
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

phase "versions"
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as md
import importlib.util
import platform

print("python", platform.python_version())
dists = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "pyarrow", "bitsandbytes",
         "liger-kernel", "flash-attn", "unsloth", "unsloth_zoo", "triton"]
for dist in dists:
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} not installed")
print("flash_attn importable:", importlib.util.find_spec("flash_attn") is not None)
import torch  # after the metadata: a broken torch still leaves the list above

print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    | tee -a "$OUT/versions.txt"

phase "contender table: 1B LoRA, $STEPS steps from $MEASURE_FROM, ${TIMEOUT}s a contender"
"$PYTHON" benchmarks/gpu_sft.py --steps "$STEPS" --measure-from "$MEASURE_FROM" --timeout "$TIMEOUT" \
    ${CONTENDERS:+--contenders "$CONTENDERS"} --workdir "$WORK" \
    --json "$OUT/contenders.json" --log-dir "$OUT/logs" $EXTRA 2>&1 | tee "$OUT/contenders.txt"

phase "plan check: $PLAN_CONFIGS, ${PLAN_TIMEOUT}s each"
"$PYTHON" benchmarks/gpu_sft.py --plan-check --plan-configs "$PLAN_CONFIGS" --timeout "$PLAN_TIMEOUT" \
    --workdir "$WORK" --json "$OUT/plan_check.json" --log-dir "$OUT/logs" $EXTRA 2>&1 | tee "$OUT/plan_check.txt"

phase "done"
