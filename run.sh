#!/usr/bin/env bash
# Train with the recipe's defaults on one node: NPROC GPUs (default 8; 1, 2 and 4 give the same math via gradient
# accumulation). Any --name=value flags are passed through to train_gpt.py.
set -euo pipefail
cd "$(dirname "$0")"
exec torchrun --standalone --nproc_per_node="${NPROC:-8}" train_gpt.py "$@"
