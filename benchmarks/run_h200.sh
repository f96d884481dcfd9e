#!/usr/bin/env bash
# Every GPU measurement of issues 2-4 in one device call (nvidia-h200-x2). Logs and JSON go to $OUT.
#   bash benchmarks/run_h200.sh
set -u
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/epdiff-out}; mkdir -p "$OUT"
EP="python3 -m epdiff.cli"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

# 1. Tiny model: one GPU against two (EP on), bf16, PSNR.
T="--prompt 'a small red circle on the left' --num-inference-steps 10 --seed 1234 --dtype bfloat16 --no-progress"
eval timeout 100 $EP generate $T --output $OUT/tiny_1gpu.png
for L in "-tp 2" "--cfg-parallel-size 2" "-sp 2"; do
  n=$(echo "$L" | tr -d ' -' ); eval timeout 100 $EP generate $T $L --enable-expert-parallel --output $OUT/tiny_$n.png
done
python3 benchmarks/compare_images.py $OUT/tiny_1gpu.png $OUT/tiny_tp2.png $OUT/tiny_cfgparallelsize2.png $OUT/tiny_sp2.png | tee $OUT/tiny_psnr.txt

# 2. Release size, dummy weights, 1024x1024, EP=2 over the CFG pair: memory and seconds per step.
rm -rf /tmp/release && $EP make-tiny /tmp/release --hidden-size 4096 --num-hidden-layers 32 --num-attention-heads 32 \
  --num-key-value-heads 8 --num-experts 64 --moe-topk 8 --moe-intermediate-size 3072 --image-base-size 1024 \
  --patch-embed-hidden-dim 1024 --vocab-size 133120 --release-vae --config-only >/dev/null
timeout 240 $EP generate --model /tmp/release --load-format dummy --prompt "a cup of coffee on the table" \
  --height 1024 --width 1024 --num-inference-steps ${FULL_STEPS:-4} --cfg-parallel-size 2 --enable-expert-parallel \
  --latents-only --metrics-json $OUT/release_cfg2_ep2.json --routing-stats --no-progress 2>&1 | grep -v "^ *[0-9]* .*\[" | tail -8

# 3. The MoE layer at release shapes: EP=1 vs EP=2, both backends, both routings.
[ -n "${SKIP_MOE:-}" ] || for R in balanced random; do timeout 120 python3 benchmarks/moe_layer.py --routing $R --iters 10 --out $OUT > $OUT/moe_$R.log 2>&1; tail -5 $OUT/moe_$R.log | cut -c1-400; done
