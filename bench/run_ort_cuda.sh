#!/usr/bin/env bash
# Device call 6 of the ORT CUDA run (calls 1-5 copy the staged wheel pieces, see BENCHMARKS.md):
# install onnxruntime-gpu into /tmp/ortgpu, then bench/ort_cuda.py with ORT_ARGS; results in $OUT.
set -u
OUT=${OUT:-out/bench}; mkdir -p "$OUT"
bash .ortgpu6/install.sh || exit 3
export PYTHONPATH=/tmp/ortgpu
source bench/_ns.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${ORT_TIMEOUT:-540}" python3 bench/ort_cuda.py --out "$OUT" ${ORT_ARGS:-} 2>&1 | grep -v "CleanUnusedInitializers" | tee "$OUT/ort_cuda.log" | tail -60
