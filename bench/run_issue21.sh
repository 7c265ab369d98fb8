#!/usr/bin/env bash
# Issue #21 on one GPU in one device call, within T_TOTAL seconds (default 530):
#   1. bench/aoti_cuda_probe.py (in the background, its own budget T_AOTI, default 150 s: compiles
#      are CPU work, loads are separate processes) -> aoti_probe.{json,log}
#   2. bench/torch_engine.py over CASES (real-size presets, cut ones, DeepSeek V4 with and without
#      mHC) at CONTEXTS x BATCHES: decode ms (rewritten uncaptured, rewritten CUDA graph, Inductor +
#      CUDA graph), rooflines (all / active weights), errors vs fp32 eager (or eager bf16 where the fp32
#      copy does not fit), compile times, mHC overhead -> torch_engine.{json,log}
# Each case / variant / attempt is in try/except or its own process, the JSON is written after every
# stage, rows and cases that would overrun are recorded as skipped, and the engine is stopped at
# T_TOTAL - 10 whatever it is doing (what it saved stays).
# T_AOTI=0 skips the probe. It runs next to the engine (AOTI_PARALLEL=1, the default, to fit one call): its compiles
# take CPU cores, which can slow the engine's uncaptured (launch-bound) timings; AOTI_PARALLEL=0 runs
# it after the engine instead, with what is left of T_TOTAL.
# Usage (GPU):  OUT=... bash bench/run_issue21.sh
#        (CPU check of the script, what tests/test_bench_scripts.py runs):  SMOKE=1 OUT=... bash bench/run_issue21.sh
#        PYTHON (default python3), NS=0 (effexport installed: no /tmp namespace), CASES, CONTEXTS, BATCHES,
#        ENGINE_ARGS, AOTI_MODELS, AOTI_VARIANTS override the defaults below. The engines run their buffer
#        caches in place (bench/torch_engine.py --inplace, the default); ENGINE_ARGS="... --no-inplace"
#        measures the functional attention_buffer with every present copied back, as before.
set -u
OUT=${OUT:-out/issue21}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ "${NS:-1}" = 1 ] && source bench/_ns.sh  # NS=0: effexport is installed (a venv's PYTHON)
T_TOTAL=${T_TOTAL:-530}
T_AOTI=${T_AOTI:-150}
AOTI_PARALLEL=${AOTI_PARALLEL:-1}
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu
    CASES=${CASES:-deepseek-v4-flash:tiny@1L,deepseek-v4-flash:tiny@1L/nomhc}
    CONTEXTS=${CONTEXTS:-64}; BATCHES=${BATCHES:-1}
    ENGINE_ARGS=${ENGINE_ARGS:---decode 1 --reps 1 --case-min-s 0}
    AOTI_MODELS=${AOTI_MODELS:-linear}; AOTI_VARIANTS=${AOTI_VARIANTS:-default,cpp_only}
else
    DEVICE=cuda
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    # 4K only by default: compile time decides what fits (32K: CONTEXTS=4096,32768 with a larger budget).
    # The mHC pair first (V4 Flash's first two layers are sliding-window ones: the cheapest attention,
    # so mHC's share of the step is at its largest), then ZAYA1 8B whole, Laguna XS.2 cut to 8 of its
    # layers, V4 Flash cut to 4 (swa, swa, CSA, HCA; 54 GB bf16, no fp32 copy): what the budget cuts is
    # recorded as skipped -- run those in a second call with CASES=...
    CASES=${CASES:-deepseek-v4-flash@2L,deepseek-v4-flash@2L/nomhc,zaya1-8b,laguna-xs2@8L,deepseek-v4-flash@4L}
    CONTEXTS=${CONTEXTS:-4096}; BATCHES=${BATCHES:-1,8}
    ENGINE_ARGS=${ENGINE_ARGS:---decode 4 --reps 10 --case-min-s 90}
    AOTI_MODELS=${AOTI_MODELS:-linear,gemma_step}; AOTI_VARIANTS=${AOTI_VARIANTS:-}
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__)"
echo "{\"device\": \"$DEVICE\", \"cases\": \"$CASES\", \"contexts\": \"$CONTEXTS\", \"batches\": \"$BATCHES\", \"t_total\": $T_TOTAL, \"t_aoti\": $T_AOTI, \"aoti_parallel\": $AOTI_PARALLEL}" > "$OUT/run_issue21.json"

aoti() {  # $1: budget in seconds
    timeout $(( $1 + 30 )) "$PYTHON" bench/aoti_cuda_probe.py --out "$OUT" --device "$DEVICE" --budget-s "$1" \
        --timeout-s "$(( $1 < 150 ? $1 : 150 ))" --models "$AOTI_MODELS" ${AOTI_VARIANTS:+--variants "$AOTI_VARIANTS"} \
        > "$OUT/aoti_probe.log" 2>&1
    echo "aoti probe rc=$?"
}
if [ "$AOTI_PARALLEL" = 1 ] && [ "$T_AOTI" -gt 0 ]; then aoti "$T_AOTI" & fi
left=$(( T_TOTAL - SECONDS ))
[ "$AOTI_PARALLEL" = 1 ] || left=$(( left - T_AOTI ))
timeout $(( left - 10 )) "$PYTHON" bench/torch_engine.py --out "$OUT" --device "$DEVICE" --real "$CASES" \
    --contexts "$CONTEXTS" --batches "$BATCHES" --budget-s $(( left - 40 )) $ENGINE_ARGS > "$OUT/torch_engine.log" 2>&1
echo "torch engine rc=$? after ${SECONDS}s"
if [ "$AOTI_PARALLEL" = 1 ]; then
    wait
else
    left=$(( T_TOTAL - SECONDS - 10 ))
    if [ "$T_AOTI" -le 0 ]; then echo "aoti probe skipped: T_AOTI=0"
    elif [ "$left" -ge 40 ]; then aoti "$left"; else echo "aoti probe skipped: ${left}s left"; fi
fi
grep -E "^\|" "$OUT/torch_engine.log" | tail -n 30
grep "mHC overhead" "$OUT/torch_engine.log"
grep -E '^\{"model"' "$OUT/aoti_probe.log" | cut -c1-220
echo "done after ${SECONDS}s"
exit 0
