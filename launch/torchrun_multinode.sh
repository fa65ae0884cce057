#!/usr/bin/env bash
# Train on several machines: run this once on every node, with the same settings; the torchrun
# agents meet at MASTER_ADDR:MASTER_PORT and start NPROC processes each.
#
#   node 0:  NNODES=2 MASTER_ADDR=node0 launch/torchrun_multinode.sh --epochs 30
#   node 1:  NNODES=2 MASTER_ADDR=node0 launch/torchrun_multinode.sh --epochs 30
#
# Elastic by default (rendezvous backend c10d): the agents number the nodes themselves, and after a
# failure (a worker dies, a node restarts its agent) all agents restart their workers, up to
# MAX_RESTARTS times; the workers resume from latest.pt (see --save-every-steps). With NODE_RANK
# set, the rendezvous is static instead: each node gets that fixed rank and nothing restarts.
#
# Environment, with defaults (the rest as in launch/torchrun.sh: NPROC, PYTHON, OMP_NUM_THREADS,
# TORCHRUN_ARGS):
#   NNODES=2                  nodes; MIN:MAX (e.g. 2:4) lets the elastic job run with fewer
#   MASTER_ADDR (required)    address of the node that hosts the rendezvous (any one of them)
#   MASTER_PORT=29500         its port, free on that node
#   RDZV_ID=ddp-cifar         job id of the rendezvous: the same on all nodes, new for each job
#   MAX_RESTARTS=3            elastic restarts of all workers before the job fails
#   NODE_RANK=                0..NNODES-1 for a static rendezvous instead of c10d (MAX_RESTARTS=0)
#
# SIGTERM or SIGUSR1 to this script (on every node) saves latest.pt and stops, as in launch/torchrun.sh.
set -euo pipefail

NNODES=${NNODES:-2}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the node that hosts the rendezvous}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-ddp-cifar}

if [[ -n ${NODE_RANK:-} ]]; then
  export MAX_RESTARTS=${MAX_RESTARTS:-0}
  export RDZV_ARGS="--nnodes=$NNODES --node-rank=$NODE_RANK --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT"
  mode="static rendezvous, node rank $NODE_RANK"
else
  export MAX_RESTARTS=${MAX_RESTARTS:-3}
  export RDZV_ARGS="--nnodes=$NNODES --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$RDZV_ID"
  mode="c10d rendezvous $RDZV_ID, up to $MAX_RESTARTS restarts"
fi
echo "launch/torchrun_multinode.sh: $NNODES nodes via $MASTER_ADDR:$MASTER_PORT ($mode)" >&2
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$@"
