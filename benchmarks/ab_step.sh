#!/usr/bin/env bash
# One GPU's denoising step for two trees of epdiff in one run, interleaved, so that both see the
# same GPU, clocks and neighbours: the release-width model cut to 8 layers in bf16 (twice each,
# A B A B) and FP8 (once each): the whole release size on an H200; on a GPU of less than 100 GiB,
# where the FP8 release size (80 GiB) does not fit, its first 24 layers.
#   bash benchmarks/ab_step.sh BASELINE_TREE [NEW_TREE]    # src/ and benchmarks/ of two commits
#                                                        # (git archive; NEW_TREE defaults to .)
# Prints one JSON line per run (step_scaling.py's), labelled; JSON files go to $OUT/<label>/.
set -u
base=$1
new=${2:-$PWD}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/epdiff-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() {  # tree label step_scaling-args...
  local tree=$1 label=$2; shift 2
  echo "=== $label $(date +%T)"
  PYTHONPATH=$tree/src:$tree/benchmarks timeout 300 python3 "$tree/benchmarks/step_scaling.py" --layouts "1 GPU" \
    --out "$OUT/$label" "$@" 2>&1 | grep -E '^\{|Error|error' | sed "s/^/$label /"
}
for rep in $(seq "${REPS:-2}"); do
  run "$base" "base-bf16-$rep" --layers 8 --steps 8
  run "$new" "new-bf16-$rep" --layers 8 --steps 8
done
[ "${FP8:-1}" = 0 ] && { echo "=== done $(date +%T)"; exit 0; }  # FP8=0: the bf16 runs only
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
fp8_layers=$([ "${mib%.*}" -gt 100000 ] && echo 32 || echo 24)
run "$base" "base-fp8-$fp8_layers" --layers "$fp8_layers" --steps 6 --quantization fp8
run "$new" "new-fp8-$fp8_layers" --layers "$fp8_layers" --steps 6 --quantization fp8
echo "=== done $(date +%T)"
