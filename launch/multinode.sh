#!/usr/bin/env bash
# Several nodes: run this once on every node, with the same settings, e.g.
#   NNODES=2 MASTER_ADDR=node0 launch/multinode.sh model=resnet18 data=cifar10
# Under SLURM (one task per node: `srun --ntasks-per-node=1 launch/multinode.sh ...`) the node count,
# the first node's address and the job id come from SLURM's variables.
#   NNODES          number of nodes                          (SLURM_NNODES)
#   MASTER_ADDR     host of the rendezvous (any one node)    (first host of SLURM_JOB_NODELIST)
#   MASTER_PORT     its port                                 (29500)
#   NPROC_PER_NODE  processes per node                       (GPUs on this node, else 2)
#   RUN_ID          rendezvous id; also names the run folder  (SLURM_JOB_ID, else "dtrain")
set -euo pipefail
nnodes=${NNODES:-${SLURM_NNODES:?set NNODES (the number of nodes)}}
if [[ -z ${MASTER_ADDR:-} && -n ${SLURM_JOB_NODELIST:-} ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
fi
: "${MASTER_ADDR:?set MASTER_ADDR (the host of one node every node can reach)}"
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c ^GPU || true)
  (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=2
fi
# The c10d rendezvous assigns node ranks itself; every node must use the same id, endpoint and counts.
# torchrun's shared rendezvous store breaks --max-restarts across nodes (pytorch#135712): give each
# attempt its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="$nnodes" --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RUN_ID:-${SLURM_JOB_ID:-dtrain}}" \
  -m dtrain "$@"
