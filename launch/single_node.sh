#!/usr/bin/env bash
# One node, all its GPUs (or N CPU ranks): bash launch/single_node.sh [NUM_RANKS] [--key=value ...]
# Example: bash launch/single_node.sh 8 --preset=d20 --stage=1 --data.shards='/data/ocr/{000000..004095}.tar'
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_RANKS=${1:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
shift || true
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
exec deepspeed --num_gpus "$NUM_RANKS" --master_port "${MASTER_PORT:-29500}" \
    launch/train.py --ds_config "$DS_CONFIG" "$@"
