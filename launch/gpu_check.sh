#!/usr/bin/env bash
# The device check of the Triton backend, on one CUDA machine, in under 5 minutes:
#   1. the codec tests on CUDA for every backend: triton (compiled kernels, not the
#      interpreter) and torch, each on CUDA tensors against the pure-PyTorch codec on
#      the CPU (tests/triton_suite.py), and the native CPU codec (tests/test_native.py);
#   2. bench_codec --device cuda: GB/s of the least bytes each operation moves, against
#      the card's memory bandwidth (the figure and its source are printed);
#   3. a 1-rank NCCL DDP run of the hook, 2+ buckets, checked against the reference.
# Usage: bash launch/gpu_check.sh   (from any directory; results in launch/results/gpu_check/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=launch/results/gpu_check
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels
python3 -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA device"; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)'
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
start=$(date +%s)

suite() {  # backend, hypothesis examples per property
  THREELC_BACKEND=$1 THREELC_TEST_DEVICE=cuda THREELC_TRITON_EXAMPLES=$2 PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" \
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/triton_suite.py
}
echo "== codec tests: triton on cuda"; suite triton 30
echo "== codec tests: torch on cuda"; suite torch 8
echo "== codec tests: native (cpu)"; timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_native.py
echo "gpu_check: tests took $(( $(date +%s) - start )) s"

echo "== bench_codec --device cuda"
timeout 150 python3 launch/bench_codec.py --device cuda --repeats 5 --no-bits --out "$out/codec.json"

echo "== 1-rank NCCL DDP"
timeout 90 python3 launch/tools/gpu_ddp_check.py cuda
echo "gpu_check: passed in $(( $(date +%s) - start )) s"
