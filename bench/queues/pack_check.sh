#!/usr/bin/env bash
# Packed Q/K/V into GroupQueryAttention (exporter/backends/onnx/ort_pack.py) on ONNX Runtime's CUDA EP:
# tiny Hugging Face models in bf16 through the CLI, whose own parity check runs the bf16 artifact on the
# CUDA EP when onnxruntime-gpu and a GPU are present; packed (the default) and not. Results in $1.
out=${1:?usage: pack_check.sh OUT_DIR}; mkdir -p "$out" /tmp/pk
python3 -c "import sys; sys.path.insert(0, 'tests'); from models import hf_tiny
for f in ('llama', 'gemma3', 'qwen3', 'laguna'): hf_tiny.build(f).save_pretrained('/tmp/hf_' + f)" > /dev/null 2>&1
for f in llama gemma3 qwen3 laguna; do
    for p in 1 0; do
        EFFEXPORT_ORT_PACK_QKV=$p python3 -c "import sys; from effexport.exporter.cli import main; sys.exit(main(sys.argv[1:]))" \
            /tmp/hf_$f --target onnx --dtype bf16 --kv-cache buffer -o /tmp/pk/$f-$p --force > "$out/$f-pack$p.log" 2>&1
        echo "$f pack=$p rc=$?"; cp /tmp/pk/$f-$p/report.json "$out/$f-pack$p.json" 2>/dev/null
        grep -E "checked|PARITY|logits|rror" "$out/$f-pack$p.log" | head -4
    done
done
