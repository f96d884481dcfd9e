#!/usr/bin/env bash
# Issues 22, 23 and 25's GPU measurements, by section, in one device call; logs and JSON go to $OUT.
# Release width; 32 FP8 layers (the release) where the GPU has over 100 GiB (an H200), else 20
# (an H100: 32 do not fit beside the activations). The server's packages travel as wheels in .whl
# (the device README says how).
#   bash benchmarks/gpu_session.sh tests profile experts text image graphs edit prefill serve vae base nucleus nucleus-ab
#   BASELINE=.baseline bash benchmarks/gpu_session.sh ab    # src/ of another commit: git archive C src | tar -x -C .baseline
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
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
L=$([ "${mib%.*}" -gt 100000 ] && echo 32 || echo 20)
echo "layers: $L"
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
  tests)    # the one-GPU tests: kernels, FP8, the step, the text pass's graph, the replayed prefill
    timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_text.py tests/test_gpu_fp8.py \
      tests/test_gpu_step.py tests/test_gpu_kernels.py tests/test_gpu_engine.py tests/test_gpu_nucleus.py \
      > $OUT/gpu_tests.log 2>&1
    tail -15 $OUT/gpu_tests.log ;;
  profile)  # issue 25: Instruct-Distil's single-branch FP8 step, kernel by kernel
    timeout 200 python3 benchmarks/profile_step.py --layers $L --variant instruct-distil --quantization fp8 \
      --steps 3 --out $OUT 2>&1 | tail -45 ;;
  experts)  # issue 25: the routed-expert path at the single-branch shapes, bf16 against FP8, every kernel
    timeout 150 python3 benchmarks/fp8_experts.py --sections experts,kernels --tokens 4097 --out $OUT 2>&1 \
      | grep -v '^{' | tail -60 ;;
  ab)       # issue 25: the Instruct-Distil step, $BASELINE's src/ against this one's, interleaved
    for tree in ${BASELINE:?} . ${BASELINE} .; do
      PYTHONPATH=$tree/src:$PWD/tests:$PWD/benchmarks:/tmp/site timeout 120 python3 benchmarks/image_breakdown.py \
        --layers $L --variant instruct-distil --quantization fp8 --images 2 --out $OUT/ab-$(basename $tree) \
        2>&1 | grep -E "^\\||Error" | sed "s|^|$tree |"
    done ;;
  text)     # issue 23: decode tokens/s at batch 1 and 8
    timeout 170 python3 benchmarks/text_decode.py --layers $L --quantization fp8 --batch 1 8 --tokens 256 \
      --out $OUT/text_decode.json > $OUT/text.log 2>&1; tail -12 $OUT/text.log ;;
  image)    # issues 22/25: an 8-step Instruct-Distil image in-process, part by part
    timeout 170 python3 benchmarks/image_breakdown.py --layers $L --variant instruct-distil --quantization fp8 \
      --images 3 --out $OUT/image > $OUT/image.log 2>&1; tail -12 $OUT/image.log ;;
  graphs)   # issue 25: the image with its prefill replayed (the 2nd image captures it) against --enforce-eager
    for eager in "" --enforce-eager "" --enforce-eager; do
      timeout 120 python3 benchmarks/image_breakdown.py --layers $L --variant instruct-distil --quantization fp8 \
        --images 4 $eager --out $OUT/graphs${eager} 2>&1 | grep -E '^\||^\{|^warm|Error' | cut -c1-150
    done ;;
  edit)     # issue 22: an edit beside it
    timeout 170 python3 benchmarks/image_breakdown.py --layers $L --variant instruct-distil --quantization fp8 \
      --images 3 --edit --out $OUT/edit > $OUT/edit.log 2>&1; tail -12 $OUT/edit.log ;;
  prefill)  # issue 25: where an image's start goes (a new prompt's prefill; an edit's encoders), host and GPU
    for edit in "" --edit; do
      timeout 150 python3 benchmarks/image_breakdown.py --layers $L --variant instruct-distil --quantization fp8 \
        --images 1 --profile $edit 2>&1 | grep -v '^warm-up\|^{'
    done ;;
  serve)    # issue 22: request in, PNG out, through a running epdiff serve
    mkdir -p $OUT/serve
    timeout 240 python3 benchmarks/serve_latency.py --release-width $L --variant instruct-distil --images 5 \
      --steps 8 --size 1024 --concurrency 1 --skip-cli --out $OUT/serve -- --quantization fp8 \
      > $OUT/serve.log 2>&1; tail -15 $OUT/serve.log ;;
  vae)      # issue 25: the 1024² decode, its kernels, and its convolutions as 2-D ones
    timeout 200 python3 benchmarks/vae_decode.py --size 1024 --profile --runs 3 --out $OUT 2>&1 | grep -v '^{' | tail -30 ;;
  nucleus)  # issue 25: Nucleus-Image's step against diffusers', eager and as a CUDA graph (24 layers: both fit)
    timeout 300 python3 benchmarks/nucleus_step.py --layers 24 --iters 5 --graphs --out $OUT 2>&1 | grep '^{' ;;
  nucleus-ab)  # issue 25: Nucleus's equal expert groups by batched against grouped GEMMs, then a profile
    timeout 100 python3 benchmarks/expert_choice_gemms.py --out $OUT 2>&1 | grep '^{'
    for flag in --grouped-gemms ""; do
      timeout 200 python3 benchmarks/nucleus_step.py --layers 24 --iters 5 --graphs --skip-fp8 $flag 2>&1 | grep '^{' \
        | sed "s|^|$flag |"
    done
    timeout 200 python3 benchmarks/nucleus_step.py --layers 24 --iters 5 --graphs --profile --out $OUT \
      > $OUT/nucleus_profile.log 2>&1; grep '^{' $OUT/nucleus_profile.log ;;
  base)     # issue 25: the base model's FP8 step, guidance on (both branches)
    timeout 200 python3 benchmarks/step_scaling.py --layers $L --steps 6 --layouts "1 GPU" --quantization fp8 \
      --out $OUT 2>&1 | tail -6 ;;
  *) echo "unknown section $section" ;;
  esac
done
echo "=== done $(date +%T)"
