#!/usr/bin/env bash
# Train with the recipe's defaults: NPROC GPUs per node (default 8; 1, 2 and 4 give the same math via gradient
# accumulation). Any --name=value flags are passed through to train_gpt.py.
#   ./run.sh                                   one node, 8 GPUs
#   NPROC=4 ./run.sh --run_name=mine           one node, 4 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./run.sh    on the first node; NODE_RANK=1 on the second
# Several nodes use torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT; NNODES * NPROC must divide
# --micro_batches (8 by default), which train_gpt.py checks with the valid sizes in its message.
set -euo pipefail
cd "$(dirname "$0")"
NPROC="${NPROC:-8}"
NNODES="${NNODES:-1}"

# Fail before starting NPROC processes: on a machine without enough GPUs each would build the model on the CPU.
if ! python -c 'import torch' 2>/dev/null; then
  echo "error: $(command -v python || echo python) cannot import torch; install the requirements first (README: Set up)" >&2
  exit 1
fi
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$gpus" -lt "$NPROC" ]; then
  echo "error: NPROC=$NPROC processes per node but $gpus GPU(s) visible here." >&2
  if [ "$gpus" -gt 0 ]; then
    echo "  use NPROC=$gpus ./run.sh (the global batch stays the same via gradient accumulation)" >&2
  else
    echo "  no GPU: for a CPU smoke run see the README (python train_gpt.py --preset=smoke ...)" >&2
  fi
  exit 1
fi

if [ "$NNODES" = 1 ]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py "$@"
fi
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on each node}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-speedrun}" \
  train_gpt.py "$@"
