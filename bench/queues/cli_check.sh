#!/usr/bin/env bash
# Tiny Hugging Face models through the CLI in bf16 (--kv-cache buffer), whose own parity check runs the
# bf16 artifact on ONNX Runtime's CUDA EP when onnxruntime-gpu and a GPU are present; once per variant,
# a variant being NAME:ENV=VALUE[,ENV=VALUE] (the build's and check's environment). Logs and report.json
# copies in OUT_DIR as FAMILY-NAME.{log,json}; a line per run with its exit code and the logits rows.
#   bash bench/queues/cli_check.sh OUT_DIR "llama gemma3" pack1:EFFEXPORT_ORT_PACK_QKV=1 pack0:EFFEXPORT_ORT_PACK_QKV=0
out=${1:?usage: cli_check.sh OUT_DIR FAMILIES VARIANT...}; families=${2:?families}; shift 2
mkdir -p "$out" /tmp/cli_check
python3 -c "import sys; sys.path.insert(0, 'tests'); from models import hf_tiny
for f in sys.argv[1:]: hf_tiny.build(f).save_pretrained('/tmp/hf_' + f)" $families > /dev/null 2>&1
for f in $families; do
    for variant in "$@"; do
        name=${variant%%:*}; envs=${variant#*:}
        env ${envs//,/ } python3 -c "import sys; from effexport.exporter.cli import main; sys.exit(main(sys.argv[1:]))" \
            /tmp/hf_$f --target onnx --dtype bf16 --kv-cache buffer -o /tmp/cli_check/$f-$name --force > "$out/$f-$name.log" 2>&1
        echo "$f $name rc=$?"; cp /tmp/cli_check/$f-$name/report.json "$out/$f-$name.json" 2>/dev/null
        grep -E "checked|PARITY|logits|rror" "$out/$f-$name.log" | head -4
    done
done
