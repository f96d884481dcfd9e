#!/usr/bin/env bash
# Train shapes-model variants side by side, one per GPU, score each on 40 held-out prompts, and
# keep the best under $OUT (the model as a tar in 15 MB pieces, since a device run returns files
# of at most 16 MiB). Usage (device machine, repo root): scripts/train_tiny_h200.sh MINUTES
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
minutes=${1:-7}
out=${OUT:-/tmp/out}
work=/tmp/train_tiny
mkdir -p "$out" "$work"
variants=(
  "default|"
  "layers6|--num-hidden-layers 6"
  "lr6e-4|--lr 6e-4"
  "hidden384|--hidden-size 384 --num-attention-heads 12 --moe-intermediate-size 192"
)
gpus=$(nvidia-smi -L | wc -l)
pids=()
for i in "${!variants[@]}"; do
  [ "$i" -lt "$gpus" ] || break
  name=${variants[$i]%%|*}; flags=${variants[$i]#*|}
  (CUDA_VISIBLE_DEVICES=$i python3 -m epdiff.cli train-tiny "$work/$name" --device cuda --max-minutes "$minutes" \
       --transformer-steps 20000 $flags > "$work/$name.log" 2>&1 &&
   CUDA_VISIBLE_DEVICES=$i python3 -m epdiff.cli score --model "$work/$name" --num-prompts 40 >> "$work/$name.log" 2>&1) &
  pids+=($!)
done
wait "${pids[@]}"
best=""; best_acc=-1
for log in "$work"/*.log; do
  name=$(basename "$log" .log)
  echo "== $name"; grep -E "rendered|vae step .*/|ms per step|trained in|images:|routing" "$log" | tail -8
  acc=$(grep -oE "images: [0-9.]+%" "$log" | grep -oE "[0-9.]+" | tail -1)
  if [ -n "$acc" ] && awk "BEGIN{exit !($acc > $best_acc)}"; then best=$name; best_acc=$acc; fi
done
cat "$work"/*.log > "$out/train_logs.txt"
echo "best: $best ($best_acc %)"
[ -n "$best" ] && tar -C "$work" -cf - "$best" | split -b 15M - "$out/$best.tar."
ls -la "$out"
