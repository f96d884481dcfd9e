#!/usr/bin/env bash
# The FP8 measurements on one H200, by section, in one device call. Logs and JSON go to $OUT.
#   bash benchmarks/fp8_h200.sh tests experts release velocity quality
set -u
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/benchmarks PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/epdiff-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null || true
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
  tests)  # FP8 kernels and path vs fallback, no host sync; the kernels and steps the FP8 work touched
    timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu_kernels.py \
      tests/test_gpu_step.py > $OUT/gpu_tests.log 2>&1
    tail -15 $OUT/gpu_tests.log ;;
  experts)  # bf16 vs FP8 expert path side by side, dense FP8, dispatch pack cost, EP buffers
    timeout 150 python3 benchmarks/fp8_experts.py --out $OUT > $OUT/fp8_experts.log 2>&1
    grep -v "^{" $OUT/fp8_experts.log | tail -40 ;;
  release)  # the whole model, 32 layers, FP8, one GPU, through the engine
    timeout 150 python3 benchmarks/step_scaling.py --layers 32 --steps 6 --layouts "1 GPU" --quantization fp8 \
      --out $OUT 2>&1 | tail -6 ;;
  velocity)  # one step's velocity FP8 vs bf16 at release size (bf16 experts redrawn layer by layer)
    timeout 120 python3 benchmarks/fp8_release.py --layers 32 --out $OUT 2>&1 | tail -30 ;;
  quality)  # built-in model: held-out score and PSNR, bf16 vs FP8
    timeout 60 python3 benchmarks/fp8_quality.py --out $OUT 2>&1 | tail -25 ;;
  *) echo "unknown section $section" ;;
  esac
done
echo "=== done $(date +%T)"
