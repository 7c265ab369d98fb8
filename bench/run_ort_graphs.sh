#!/usr/bin/env bash
# One device call after the five staging calls (BENCHMARKS.md): install onnxruntime-gpu and
# onnxruntime-genai-cuda into /tmp/ortgpu, then in parallel
#   1. the gpu-marked CUDA-graph runtime test (tests/test_graph_runtime.py)   -> pytest_graph.log
#   2. bench/ort_graphs.py with GRAPH_ARGS (CUDA graphs vs uncaptured vs onnxruntime-genai's builder)
#      -> ort_graphs.{json,md,log}
#   3. with PROBES=1, the two diagnostic probes of issue #20's failing gpu tests, side by side with
#      the builds (each a few tiny artifacts; done before the timed decode steps start):
#      bench/ds_bf16_probe.py, bench/gqa_inplace_probe.py -> probes/ (returned in rest.tgz, with the build logs)
# Usage (device call 6): OUT=... GRAPH_ARGS="..." bash bench/run_ort_graphs.sh   (T_TESTS, T_BENCH, PROBES)
set -u
source bench/_ortgpu_env.sh
if [ "${PROBES:-0}" = 1 ]; then
    mkdir -p "$OUT/probes"
    (timeout 170 python3 bench/ds_bf16_probe.py --out "$OUT/probes" > "$OUT/probes/ds_bf16_probe.log" 2>&1;
     OUT="$OUT/probes" timeout 80 python3 bench/gqa_inplace_probe.py > "$OUT/probes/gqa_inplace_probe.log" 2>&1) &
fi
(timeout "${T_TESTS:-200}" python3 -m pytest -q -m gpu -n 0 -p no:cacheprovider tests/test_graph_runtime.py tests/test_kv_buffer.py \
    > "$OUT/pytest_graph.log" 2>&1) &
timeout "${T_BENCH:-480}" python3 bench/ort_graphs.py --out "$OUT" ${GRAPH_ARGS:-} 2>&1 \
    | grep -v "CleanUnusedInitializers" > "$OUT/ort_graphs.log"
wait
grep -i "memcpy\|placed on\|CPUExecutionProvider" "$OUT/ort_graphs.log" | head -n 60 > "$OUT/memcpy.txt"
grep -E "^E |Error|passed|failed" "$OUT/pytest_graph.log" | head -n 30
tail -n 14 "$OUT/ort_graphs.log"
cp /tmp/ort_graphs/*.log "$OUT/" 2>/dev/null
# a device call returns at most 8 files: everything but the main results goes back in one archive
(cd "$OUT" && rest=$(ls -A | grep -vxE 'ort_graphs\.(json|md|log)|pytest_graph\.log|memcpy\.txt|gpu\.txt') \
    && [ -n "$rest" ] && tar czf rest.tgz $rest && rm -rf $rest && ls -la rest.tgz)
exit 0
