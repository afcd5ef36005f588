#!/usr/bin/env bash
# Stage 1 of nano-DeepSeek-OCR (d20) on 8-GPU nodes (A100 40/80 GB): everything trains, seq_len 4096, vision only.
#   DATA=/data/ocr HOSTFILE=launch/hostfile bash launch/stage1.sh [--key=value ...]   (NODES=1 for one node)
# Arguments given here come after the recipe's and so override it: --steps=100 --output_dir=runs/try.
# Pretrained starting points (converted once, see README): DeepSeek-OCR's encoder and a nanochat d20 base model.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA to the directory holding train/ and val/ shards}
WEIGHTS=${WEIGHTS:-/weights}
RANKS_PER_NODE=8
ARGS=(
    --preset=d20 --stage=1
    --tokenizer="$WEIGHTS/nanochat-d20/tokenizer.json"
    --init="deepseek_ocr=$WEIGHTS/DeepSeek-OCR,nanochat=$WEIGHTS/nanochat-d20"
    --data.shards="$DATA/train" --val_shards="$DATA/val" --data.num_workers=8
    --data.max_images=24   # python -m ocr_vlm.plan: 31.4 GiB per GPU under ZeRO-2, so 40 GB A100s fit
    --micro_batch=4 --global_batch=512 --steps=20000 --warmup_steps=500
    --save_every=1000 --val_every=1000 --output_dir=runs/d20-stage1 --resume=auto --wandb=true
)
if [ "${NODES:-0}" = 1 ]; then exec bash launch/single_node.sh "$RANKS_PER_NODE" "${ARGS[@]}" "$@"; fi
exec bash launch/multi_node.sh "${ARGS[@]}" "$@"
