#!/usr/bin/env bash
# Issues 22, 23, 25 on one H200 at release size (32 FP8 layers), by section, in one device call.
# Logs and JSON go to $OUT. The server's packages travel as wheels in .whl (device README).
#   bash benchmarks/h200_instruct.sh text image serve edit base tests
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/epdiff-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null | cut -c1-60 || true
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
  text)   # issue 23: decode tokens/s at batch 1 and 8
    timeout 170 python3 benchmarks/text_decode.py --layers 32 --quantization fp8 --batch 1 8 --tokens 256 \
      --out $OUT/text_decode_h200.json > $OUT/text.log 2>&1; tail -12 $OUT/text.log ;;
  image)  # issues 22/25: an 8-step Instruct-Distil image in-process, part by part
    timeout 170 python3 benchmarks/image_breakdown.py --layers 32 --variant instruct-distil --quantization fp8 \
      --images 3 --out $OUT/image_breakdown_h200.json > $OUT/image.log 2>&1; tail -12 $OUT/image.log ;;
  edit)   # issue 22: an edit beside it
    timeout 170 python3 benchmarks/image_breakdown.py --layers 32 --variant instruct-distil --quantization fp8 \
      --images 3 --edit --out $OUT/image_breakdown_edit_h200.json > $OUT/edit.log 2>&1; tail -12 $OUT/edit.log ;;
  serve)  # issue 22: request in, PNG out, through a running epdiff serve
    mkdir -p $OUT/serve
    timeout 240 python3 benchmarks/serve_latency.py --release-width 32 --variant instruct-distil --images 5 \
      --steps 8 --size 1024 --concurrency 1 --skip-cli --out $OUT/serve -- --quantization fp8 \
      > $OUT/serve.log 2>&1; tail -15 $OUT/serve.log ;;
  base)   # issue 25: the base model's FP8 step, guidance on
    timeout 200 python3 benchmarks/step_scaling.py --layers 32 --steps 6 --layouts "1 GPU" --quantization fp8 \
      --out $OUT 2>&1 | tail -6 ;;
  tests)
    timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_text.py tests/test_gpu_fp8.py \
      tests/test_gpu_step.py > $OUT/gpu_tests.log 2>&1; tail -15 $OUT/gpu_tests.log ;;
  *) echo "unknown section $section" ;;
  esac
done
