#!/usr/bin/env bash
# The GPU checks of issue 17 in one call, sized for a short lease (about 9 minutes on an H200):
#   1. `python -m trainer train` on the demo preset on CUDA in bfloat16 (eager: compile AUTO is off):
#      start-up to the first step, the loss, the output;
#   2. compiled against eager: sd15-512 (SD 1.5 LoRA, 512 px, batch 4), atelier runner;
#   3. memory: SDXL LoRA at 1024 px batch 1 with the memory levers (sdxl-1024-lowmem) and the
#      same with half the UNet's frozen weights streamed (sdxl-1024-offload), atelier runner.
# Each part has its own time limit, so one that hangs leaves the others their time. Results
# (bench JSON rows, logs) go to $OUT (default bench/.cache/gpu-check).
#
#   bash bench/gpu_check.sh
#
# On a machine whose Python lacks the project's packages, unpack them first and put them on
# PYTHONPATH (see bench/README.md, "On a GPU machine").
set -u
OUT=${OUT:-bench/.cache/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, diffusers, transformers, peft, accelerate, bitsandbytes; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__)"

say "1. the demo preset on CUDA, bfloat16"
$PY -m trainer make-tiny-model sd15 workspace/tiny-sd15 >/dev/null 2>&1
timeout "${DEMO_S:-100}" $PY -m trainer train --config presets/demo.json \
    --set train_dtype=BFLOAT_16 --set epochs=20 --set sample_after=10 2>&1 \
    | $PY -c "import sys, time; t = time.time(); [print(f'{time.time() - t:6.1f}s {line}', end='', flush=True) for line in sys.stdin]" \
    > "$OUT/demo.log"
say "demo exit $?"
grep -E "Compiling|Training|Finished|Saving|Loading|Error|error" "$OUT/demo.log" | head -20
tail -3 "$OUT/demo.log"

say "2. compiled against eager, SD 1.5 LoRA 512 px batch 4"
timeout "${COMPILE_S:-230}" $PY -m bench --device cuda --cases sd15-512,sd15-512-compile \
    --runners atelier --json "$OUT/bench-compile.json" > "$OUT/bench-compile.log" 2>&1
say "bench exit $?"
tail -25 "$OUT/bench-compile.log"

say "3. memory, SDXL LoRA 1024 px batch 1"
timeout "${MEMORY_S:-220}" $PY -m bench --device cuda --cases sdxl-1024-lowmem,sdxl-1024-offload \
    --runners atelier --json "$OUT/bench-memory.json" > "$OUT/bench-memory.log" 2>&1
say "bench exit $?"
tail -25 "$OUT/bench-memory.log"
say "done"
