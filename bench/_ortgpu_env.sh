# Sourced by the ONNX Runtime CUDA device scripts (after the five staging calls, BENCHMARKS.md):
# $OUT created, onnxruntime-gpu + onnxruntime-genai-cuda installed into /tmp/ortgpu and put on
# PYTHONPATH, the checkout mapped as `effexport` (bench/_ns.sh), the GPU named in $OUT/gpu.txt.
OUT=${OUT:-out/bench}; mkdir -p "$OUT"
bash .ortgpu6/install.sh || exit 3
export PYTHONPATH=/tmp/ortgpu
source bench/_ns.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
