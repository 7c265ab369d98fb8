#!/usr/bin/env bash
# Issue #21: where the compiled torch engine's Gemma 4 E2B decode step goes, and Inductor's levers, in
# one device call of at most T_TOTAL seconds (default 510: under the 10-minute command limit):
#   bench/torch_engine.py --real CASE --contexts 32768 --batches 1 (the HF-comparison row, timed as
#   usual) --profile PROFILE (torch.profiler of the compiled and uncompiled CUDA-graph steps: kernel
#   time per name and category, kernels per step, wall vs kernel time, GEMMs by shape) and then
#   --compile-variants VARIANTS (torch.compile option sets timed at VARIANT_POINTS, logits against the
#   default variant's and against the same step in fp32 on the same inputs, computed first: VARIANT_FP32_REF=0
#   leaves it out) -> torch_engine.json, engine_profile.md, torch_engine.log in $OUT.
# What the budget cuts is recorded as skipped (a variant: "skipped: budget"; one past VARIANT_LIMIT
# seconds: "skipped: variant limit"); the JSON and markdown are rewritten after every stage, and the
# engine is stopped at T_TOTAL - 10 whatever it is doing.
# Usage (GPU):  OUT=... bash bench/run_engine_profile.sh
#   a second call for the variants the first did not reach, no profile:
#               PROFILE= VARIANTS=default,combo,autotune-gemm,max-autotune OUT=... bash bench/run_engine_profile.sh
#   a call spent on the variants alone (CASE_TIMING=0: --contexts= --no-errors, no usual timing row of a
#   real-size case and no errors stage; the default variant then compiles its first shape itself):
#               CASE_TIMING=0 PROFILE= VARIANTS=default,gptfast OUT=... bash bench/run_engine_profile.sh
#   (CPU check of the script, what tests/test_bench_scripts.py runs):  SMOKE=1 OUT=... bash bench/run_engine_profile.sh
#   PYTHON (default python3), NS=0 (effexport installed: no /tmp namespace), CASE, PROFILE, VARIANTS,
#   INDUCTOR (one extra --inductor spec, e.g. "mine:coordinate_descent_tuning=True,combo_kernels=True"),
#   VARIANT_POINTS, VARIANT_LIMIT, VARIANT_FP32_REF (1), CASE_TIMING (1), ENGINE_ARGS override the defaults below.
set -u
OUT=${OUT:-out/engine_profile}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ "${NS:-1}" = 1 ] && source bench/_ns.sh  # NS=0: effexport is installed (a venv's PYTHON)
T_TOTAL=${T_TOTAL:-510}
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu; SIZE="--tiny --presets ${CASE:-gemma4-e2b:tiny} --dtypes fp32 --tiny-context 48"
    PROFILE=${PROFILE-48:1}; VARIANTS=${VARIANTS-default,static}; VARIANT_POINTS=${VARIANT_POINTS:-48:1,48:2}
    VARIANT_LIMIT=${VARIANT_LIMIT:-60}
    ENGINE_ARGS=${ENGINE_ARGS:---decode 1 --reps 1 --profile-steps 1 --variant-backend eager --variant-min-s 0}
else
    DEVICE=cuda; SIZE="--real ${CASE:-gemma4-e2b} --contexts 32768 --batches 1 --fp32-ref never"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    PROFILE=${PROFILE-4096:1,32768:8}
    # by expected value per compile: freezing (weights constant: concatenated GEMMs), combo kernels
    # (fewer launches), static shapes at B=8, gpt-fast's settings, then the autotuning ones (slowest)
    VARIANTS=${VARIANTS-default,freezing,combo,static,gptfast,autotune-gemm,max-autotune}
    VARIANT_POINTS=${VARIANT_POINTS:-4096:1,32768:8}; VARIANT_LIMIT=${VARIANT_LIMIT:-150}
    ENGINE_ARGS=${ENGINE_ARGS:---decode 2 --reps 10 --profile-steps 10 --case-min-s 0 --variant-min-s 40}
fi
CASE_TIMING=${CASE_TIMING:-1}; VARIANT_FP32_REF=${VARIANT_FP32_REF:-1}
[ "$CASE_TIMING" = 0 ] && SIZE="$SIZE --contexts= --no-errors"
[ "$VARIANT_FP32_REF" = 0 ] && FP32_REF=--no-variant-fp32-ref || FP32_REF=--variant-fp32-ref
"$PYTHON" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
echo "{\"device\": \"$DEVICE\", \"size\": \"$SIZE\", \"profile\": \"$PROFILE\", \"variants\": \"$VARIANTS\", \"inductor\": \"${INDUCTOR:-}\", \"variant_points\": \"$VARIANT_POINTS\", \"variant_limit\": $VARIANT_LIMIT, \"variant_fp32_ref\": $VARIANT_FP32_REF, \"case_timing\": $CASE_TIMING, \"t_total\": $T_TOTAL}" > "$OUT/run_engine_profile.json"
left=$(( T_TOTAL - SECONDS ))
log "torch engine: profile '$PROFILE', variants '$VARIANTS' ${INDUCTOR:++ '$INDUCTOR'}, budget $(( left - 30 )) s"
# the log goes to torch_engine.log; its progress lines (cases, profile points, variants) also here, timestamped
timeout $(( left - 10 )) "$PYTHON" bench/torch_engine.py --out "$OUT" --device "$DEVICE" $SIZE \
    ${PROFILE:+--profile "$PROFILE"} ${VARIANTS:+--compile-variants "$VARIANTS"} ${INDUCTOR:+--inductor "$INDUCTOR"} \
    --variant-points "$VARIANT_POINTS" --variant-limit-s "$VARIANT_LIMIT" $FP32_REF --budget-s $(( left - 30 )) \
    $ENGINE_ARGS 2>&1 | tee "$OUT/torch_engine.log" | grep --line-buffered -E '^(== |-- |\{"(profile|variant)")' \
    | while IFS= read -r line; do log "${line:0:400}"; done
rc=${PIPESTATUS[0]}
log "torch engine rc=$rc"
[ -f "$OUT/engine_profile.md" ] && cat "$OUT/engine_profile.md" | head -n 150
grep -A 4 -E '^\| preset \| dtype \| L' "$OUT/torch_engine.log"  # the usual timing table
log "done"
exit 0
