#!/usr/bin/env bash
# One GPU run: the decode-attention benchmark (BENCH_ARGS), the end-to-end decode step (STEP_ARGS;
# STEP=0 skips it), then the gpu-marked kernel tests (results in $OUT).
# Works from a plain checkout (no install): maps the top-level folders under `effexport` in /tmp.
set -u
OUT=${OUT:-out/bench}; mkdir -p "$OUT"
source bench/_ns.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout "${BENCH_TIMEOUT:-240}" python3 bench/decode_attention.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
if [ "${STEP:-1}" != 0 ]; then
    timeout "${STEP_TIMEOUT:-240}" python3 bench/decode_step.py --out "$OUT" ${STEP_ARGS:-} 2>&1 | tee "$OUT/step.log"
fi
rm -f "$OUT/kernel_errors.jsonl"
EFFEXPORT_KERNEL_ERRORS="$OUT/kernel_errors.jsonl" timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q --tb=line -p no:cacheprovider tests/test_gpu_kernels.py \
    "$@" >"$OUT/tests.log" 2>&1; echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(E |FAILED|/)" "$OUT/tests.log" | sort | uniq -c | sort -rn | head -15
python3 - "$OUT/kernel_errors.jsonl" <<'PY'
import collections, json, sys
worst = collections.defaultdict(float)
for line in open(sys.argv[1]):
    r = json.loads(line)
    op = r["test"].split("::")[-1].split("[")[0].replace("test_", "")
    worst[op, r["dtype"]] = max(worst[op, r["dtype"]], r["rel_err"])
for (op, dtype), err in sorted(worst.items()):
    print(f"max rel err {op:24s} {dtype:15s} {err:.2e}")
PY
