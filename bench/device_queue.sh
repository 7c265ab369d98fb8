#!/usr/bin/env bash
# One lease's device work as a queue that outlives a single 10-minute call: the queue runs detached
# (its own process session, so it survives the call that started it, as long as the machine stays
# warm) and later calls wait on it. The staging calls of ONNX Runtime CUDA then overlap a build
# instead of holding the machine idle, and a step may run longer than one call.
#
#   bash bench/device_queue.sh start STEPS   # run STEPS' lines in order, detached; returns at once
#   bash bench/device_queue.sh wait SECONDS  # until the queue ends or SECONDS pass, then its status,
#                                            # logs and results into $OUT/queue.tgz (+ status.txt)
#   bash bench/device_queue.sh stop          # end the queue and what it runs
#
# STEPS: one shell command per line (blank lines and `#` lines skipped), each run with bash from the
# checkout with the checkout mapped as `effexport` (bench/_ns.sh) and OUT set to a folder of its own
# (results/NN). Prefixes, in this order: `ort:` waits until onnxruntime-gpu is installed (the sixth
# staging call: `bash .ortgpu6/install.sh && touch /tmp/ortgpu/.ready`) and puts /tmp/ortgpu first on
# PYTHONPATH; `T=SECONDS` is the step's time limit (default 600). A failing step is recorded and the
# next one runs.
set -u
Q=${QUEUE_DIR:-/dev/shm/effexport_queue}
OUT=${OUT:-out/bench}
cmd=${1:-}; shift || true

run_steps() {  # the detached runner
    local n=0 line ort limit rc
    while IFS= read -r line || [ -n "$line" ]; do
        [[ -z "${line// }" || "$line" =~ ^[[:space:]]*# ]] && continue
        n=$((n + 1)); ort=0; limit=600
        [[ "$line" =~ ^ort:[[:space:]]*(.*)$ ]] && { ort=1; line=${BASH_REMATCH[1]}; }
        [[ "$line" =~ ^T=([0-9]+)[[:space:]]+(.*)$ ]] && { limit=${BASH_REMATCH[1]}; line=${BASH_REMATCH[2]}; }
        local id; id=$(printf %02d "$n")
        if [ "$ort" = 1 ]; then
            echo "$id waiting for /tmp/ortgpu/.ready $(date +%T)" >> "$Q/status"
            while [ ! -e /tmp/ortgpu/.ready ]; do sleep 2; done
        fi
        mkdir -p "$Q/results/$id"
        echo "$id start $(date +%T) T=$limit ort=$ort $line" >> "$Q/status"
        local started=$SECONDS
        ( [ "$ort" = 1 ] && export PYTHONPATH=/tmp/ortgpu; source bench/_ns.sh; export OUT="$Q/results/$id"
          timeout -k 10 "$limit" bash -c "$line" ) > "$Q/$id.log" 2>&1 < /dev/null
        rc=$?
        echo "$id end rc=$rc $((SECONDS - started))s $(date +%T)" >> "$Q/status"
    done < "$Q/steps"
    echo "done $(date +%T)" >> "$Q/status"
}

case "$cmd" in
    start)
        [ -f "${1:-}" ] || { echo "usage: $0 start STEPS_FILE" >&2; exit 2; }
        if [ -f "$Q/pid" ] && kill -0 "$(cat "$Q/pid")" 2>/dev/null; then
            echo "a queue is running ($Q/pid); stop it first" >&2; exit 2
        fi
        rm -rf "$Q"; mkdir -p "$Q/results"; cp "$1" "$Q/steps"
        setsid nohup bash "$0" _run > "$Q/runner.log" 2>&1 < /dev/null &
        echo $! > "$Q/pid"
        echo "queue started: $(grep -cv '^[[:space:]]*\(#\|$\)' "$Q/steps") steps, pid $(cat "$Q/pid"), in $Q"
        ;;
    _run) run_steps ;;
    wait)
        limit=${1:-540}; started=$SECONDS
        while [ $((SECONDS - started)) -lt "$limit" ] && ! grep -q '^done' "$Q/status" 2>/dev/null; do sleep 3; done
        mkdir -p "$OUT" "$Q/pack"
        cp "$Q/status" "$OUT/status.txt" 2>/dev/null
        rm -rf "$Q/pack"/*; cp -r "$Q/results" "$Q/pack/" 2>/dev/null
        for log in "$Q"/*.log; do tail -c 1000000 "$log" > "$Q/pack/$(basename "$log")"; done
        tar czf "$OUT/queue.tgz" -C "$Q/pack" .
        cat "$Q/status" 2>/dev/null
        last=$(ls "$Q"/[0-9]*.log 2>/dev/null | tail -n 1)
        [ -n "$last" ] && { echo "--- tail of $(basename "$last")"; tail -n 15 "$last"; }
        ;;
    stop)
        [ -f "$Q/pid" ] && kill -- -"$(cat "$Q/pid")" 2>/dev/null
        echo "stopped"
        ;;
    *) echo "usage: $0 start STEPS | wait SECONDS | stop" >&2; exit 2 ;;
esac
