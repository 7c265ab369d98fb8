#!/usr/bin/env bash
# One device call after the five staging calls (see BENCHMARKS.md): install onnxruntime-gpu and
# onnxruntime-genai-cuda into /tmp/ortgpu, then, each step with its own time limit and its output
# in $OUT:
#   1. the gpu-marked tests of the ORT CUDA paths (bf16 build checked on the CUDA EP) -> pytest_ort.log
#   2. bench/ort_cuda.py with ORT_ARGS (default: Gemma 4 E2B real size, full-cache layouts grow and
#      buffer, 4K / 32K, batch 1 / 8, ORT profile at 32K B=1) -> ort_cuda.{json,md,log}
#   3. bench/ort_cuda_graph_probe.py over the artifacts step 2 built -> ort_cuda_graph.json
# Usage (device call 6): bash bench/run_ort_session.sh   (OUT, ORT_ARGS, T_TESTS, T_BENCH, T_PROBE)
set -u
source bench/_ortgpu_env.sh
timeout "${T_TESTS:-150}" python3 -m pytest -q -m gpu -n 0 -p no:cacheprovider tests/test_half_precision.py \
    > "$OUT/pytest_ort.log" 2>&1
tail -n 5 "$OUT/pytest_ort.log"
ORT_ARGS=${ORT_ARGS:-"--presets gemma4-e2b --contexts 4096,32768 --batches 1,8 --kv-cache grow,buffer --no-stock --profile-at 32768,1"}
timeout "${T_BENCH:-330}" python3 bench/ort_cuda.py --out "$OUT" $ORT_ARGS 2>&1 \
    | grep -v "CleanUnusedInitializers" > "$OUT/ort_cuda.log"
tail -n 12 "$OUT/ort_cuda.log"
artifacts=$(ls -d /tmp/ort_cuda/*/effexport-* 2>/dev/null)
[ -n "$artifacts" ] && timeout "${T_PROBE:-90}" python3 bench/ort_cuda_graph_probe.py $artifacts --out "$OUT" \
    --placement-log > "$OUT/ort_cuda_graph.log" 2>&1
tail -n 4 "$OUT/ort_cuda_graph.log" 2>/dev/null
exit 0
