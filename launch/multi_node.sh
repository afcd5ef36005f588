#!/usr/bin/env bash
# Several nodes from one shell with DeepSpeed's launcher over ssh (pdsh, or openmpi with LAUNCHER=openmpi):
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh --preset=d20 --stage=1 ...
# Without ssh between nodes (a scheduler starts one launcher per node), run on every node:
#   NODE_RANK=<i> MASTER_ADDR=<node 0 address> HOSTFILE=launch/hostfile bash launch/multi_node.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-launch/hostfile}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -n "${NODE_RANK:-}" ]; then
    # Each node's launcher starts its own ranks, which inherit this environment: no env file is needed.
    exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
        --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port "$MASTER_PORT" \
        launch/train.py --ds_config "$DS_CONFIG" "$@"
fi
# Over ssh the launcher forwards NCCL_*, PYTHON* and a few others; an env file (DS_ENV_FILE) carries the rest.
# It holds WANDB_API_KEY, so it is private to this user, outside the checkout (never committed), written once by
# this one launching shell, and removed when the launcher exits.
DS_ENV_FILE=$(umask 077 && mktemp "${TMPDIR:-/tmp}/ocr_vlm_deepspeed_env.XXXXXX")
export DS_ENV_FILE
trap 'rm -f "$DS_ENV_FILE"' EXIT
for var in WANDB_API_KEY WANDB_MODE WANDB_PROJECT HF_HOME OMP_NUM_THREADS TORCH_EXTENSIONS_DIR; do
    if [ -n "${!var:-}" ]; then echo "$var=${!var}" >> "$DS_ENV_FILE"; fi
done
deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --master_port "$MASTER_PORT" \
    launch/train.py --ds_config "$DS_CONFIG" "$@"
