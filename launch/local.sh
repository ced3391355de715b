#!/usr/bin/env bash
# One node, N processes:  launch/local.sh [N] [key=value ...]
# N defaults to the number of GPUs (NCCL, one per process), or 2 processes on a CPU-only machine (gloo).
set -euo pipefail
if [[ ${1:-} =~ ^[0-9]+$ ]]; then nproc=$1; shift
elif command -v nvidia-smi >/dev/null && n=$(nvidia-smi -L 2>/dev/null | grep -c ^GPU) && (( n > 0 )); then nproc=$n
else nproc=2; fi
exec torchrun --standalone --nproc_per_node="$nproc" -m dtrain "$@"
