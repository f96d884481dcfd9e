#!/usr/bin/env bash
# The GPU measurements, by section, in one device call each. Logs and JSON go to $OUT.
#   bash benchmarks/run_h200.sh tests profile moe scaling     # any of: tests profile moe scaling release tiny
# Sections use every GPU of the machine they find (1, 2 or 4).
set -u
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/benchmarks PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/epdiff-out}; mkdir -p "$OUT"
EP="python3 -m epdiff.cli"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
for section in "$@"; do
  echo "=== $section"
  case $section in
  tests)  # every GPU test: Triton kernels, FP8, no host sync in a step or the engine loop, NCCL MoE
    EPDIFF_RESULTS=$OUT timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_*.py 2>&1 | tail -15 ;;
  profile)  # where one GPU's step time goes
    timeout 200 python3 benchmarks/profile_step.py --layers 8 --out $OUT 2>&1 | tail -45 ;;
  moe)  # the MoE layer at release shapes, EP=1 against EP over all GPUs, both backends
    timeout 200 python3 benchmarks/moe_layer.py --routing balanced --iters 10 --out $OUT > $OUT/moe_balanced.log 2>&1
    tail -6 $OUT/moe_balanced.log | cut -c1-600 ;;
  scaling)  # seconds per step by layout, 8 layers (fits one GPU)
    timeout 420 python3 benchmarks/step_scaling.py --layers 8 --steps 6 --out $OUT 2>&1 | grep -v "^{" | tail -20 ;;
  release)  # the whole release size (does not fit one GPU): EP over 2 and 4 GPUs
    timeout 400 python3 benchmarks/step_scaling.py --layers 32 --steps 5 --out $OUT \
      --layouts "${RELEASE_LAYOUTS:-CFG2+EP agrs,CFG2×TP2+EP agrs}" 2>&1 | grep -v "^{" | tail -8 ;;
  tiny)  # the shipped model: a second 1-GPU run (the noise floor) and each 2-GPU layout (EP on)
          # against one GPU, PSNR, in bf16 and fp32 (images stay on the machine)
    for dtype in bfloat16 float32; do
      I=/tmp/tiny/$dtype; mkdir -p $I
      T="--prompt 'a small red circle on the left' --num-inference-steps 10 --seed 1234 --dtype $dtype --no-progress"
      eval timeout 100 $EP generate $T --output $I/1gpu.png >/dev/null
      eval timeout 100 $EP generate $T --output $I/1gpu-again.png >/dev/null
      for L in "-tp 2" "--cfg-parallel-size 2" "-sp 2"; do
        n=$(echo "$L" | tr -d ' -' ); eval timeout 100 $EP generate $T $L --enable-expert-parallel --output $I/$n.png >/dev/null
      done
      echo "dtype $dtype:"
      python3 benchmarks/compare_images.py $I/1gpu.png $I/1gpu-again.png $I/tp2.png $I/cfgparallelsize2.png $I/sp2.png
    done 2>&1 | tee $OUT/tiny_psnr.txt ;;
  *) echo "unknown section $section" ;;
  esac
done
