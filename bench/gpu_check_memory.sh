#!/usr/bin/env bash
# The GPU figures of issue 26 (big models on small GPUs) in one call, sized for a short lease
# (about 9 minutes on an H100 or H200), most wanted first, each part with its own time limit:
#   1. a random full-size Flux.1-dev (trainer/models/random_full.py: 11.9 B transformer, T5-XXL,
#      written in bfloat16 into the bench cache; the largest part of the time);
#   2. Flux.1-dev LoRA at 512 px with the transformer and T5 in NF4 (flux-512-nf4, <= 16 GB),
#      with the 8 GB preset's levers (flux-512-8gb: FLOAT_8 + 85 % streamed, <= 10 GB), at
#      1024 px with the 24 GB preset's (flux-1024-fp8: FLOAT_8, <= 24 GB);
#   3. SDXL LoRA at 1024 px (sdxl-1024-lowmem, <= 8 GB) and with half the UNet streamed
#      (sdxl-1024-offload, <= 6 GB).
# Atelier runner, --quick (2 warm-up + 3 measured steps: the peaks come in the first steps).
# Each row has peak_mem_mb (max_memory_allocated), images_per_s and estimate_gb (the engine's
# own estimate, to compare with the peak: within 15 % is the aim). Results go to $OUT
# (default bench/.cache/gpu-memory).
#
#   bash bench/gpu_check_memory.sh
set -u
OUT=${OUT:-bench/.cache/gpu-memory}
mkdir -p "$OUT"
# each case trains in a throw-away workspace: no quantized cache written there
export ATELIER_QUANTIZED_CACHE=off
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
PY=${PYTHON:-python3}
CACHE=${CACHE:-bench/.cache}
T0=$(date +%s)
say() { echo "[gpu-memory +$(( $(date +%s) - T0 ))s] $*"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h . | tail -1

say "1. random full-size Flux.1-dev"
MODEL=$($PY -c "from bench.cases import CASES; print(CASES['flux-512-nf4'].model_key())")
timeout "${BUILD_S:-200}" $PY -m trainer.models.random_full flux "$CACHE/models/$MODEL" \
    --dtype bfloat16 > "$OUT/build.log" 2>&1
say "build exit $?"; tail -2 "$OUT/build.log"

say "2. Flux.1-dev LoRA: NF4 at 512 px, the 8 GB levers at 512 px, FLOAT_8 at 1024 px"
timeout "${FLUX_S:-250}" $PY -m bench --device cuda --quick --runners atelier \
    --cases flux-512-nf4,flux-512-8gb,flux-1024-fp8 --cache-dir "$CACHE" \
    --json "$OUT/bench-flux.json" > "$OUT/bench-flux.log" 2>&1
say "bench exit $?"; tail -12 "$OUT/bench-flux.log"

say "3. SDXL LoRA 1024 px, and with half the UNet streamed"
timeout "${SDXL_S:-100}" $PY -m bench --device cuda --quick --runners atelier \
    --cases sdxl-1024-lowmem,sdxl-1024-offload --cache-dir "$CACHE" \
    --json "$OUT/bench-sdxl.json" > "$OUT/bench-sdxl.log" 2>&1
say "bench exit $?"; tail -8 "$OUT/bench-sdxl.log"
$PY - "$OUT" <<'PY'
import json, pathlib, sys
for name in ("bench-flux.json", "bench-sdxl.json"):
    path = pathlib.Path(sys.argv[1]) / name
    for row in json.loads(path.read_text()) if path.is_file() else []:
        peak, est = row.get("peak_mem_mb"), row.get("estimate_gb")
        ratio = f"{est * 1024 / peak:.2f}" if peak and est else "-"
        print(row["case"], "peak GB", peak and round(peak / 1024, 2), "estimate GB", est,
              "estimate/peak", ratio, "img/s", row.get("images_per_s"), row.get("skipped", ""))
PY
say "done"
