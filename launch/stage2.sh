#!/usr/bin/env bash
# Stage 2 (d20) on 8-GPU nodes (A100 40 or 80 GB): SAM + compressor frozen, seq_len 8192, 10% text-only conversations.
# Arguments given to this script come after the recipe's and so override it, as in stage1.sh.
# Starts from stage 1's export; DeepSeek restarted the language model from its base weights here, which
# `nanochat=...` after `ocr_vlm=...` does (later --init items overwrite earlier ones).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA to the directory holding train/, text/ and val/ shards}
WEIGHTS=${WEIGHTS:-/weights}
RANKS_PER_NODE=8
ARGS=(
    --preset=d20 --stage=2
    --tokenizer="$WEIGHTS/nanochat-d20/tokenizer.json"
    --init="ocr_vlm=runs/d20-stage1/export,nanochat=$WEIGHTS/nanochat-d20"
    --data.shards="$DATA/train" --data.text_shards="$DATA/text"
    --val_shards="$DATA/val" --data.num_workers=8
    --data.max_images=32   # plan: 20.2 GiB a GPU under ZeRO-2; ~31 GiB at the activations measured on an H200
                           # (README #gpu: 1.7x the plan's), so 40 GB A100s fit; 48 would not
    --micro_batch=2 --global_batch=640 --steps=20000
    --save_every=1000 --val_every=1000 --output_dir=runs/d20-stage2 --resume=auto --wandb=true
)
if [ "${NODES:-0}" = 1 ]; then exec bash launch/single_node.sh "$RANKS_PER_NODE" "${ARGS[@]}" "$@"; fi
exec bash launch/multi_node.sh "${ARGS[@]}" "$@"
