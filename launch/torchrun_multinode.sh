#!/usr/bin/env bash
# Train on several machines: run this once on every node, with the same settings; the torchrun
# agents meet at MASTER_ADDR:MASTER_PORT and start NPROC processes each.
#
#   node 0:  NNODES=2 MASTER_ADDR=10.0.0.1 launch/torchrun_multinode.sh --epochs 30
#   node 1:  NNODES=2 MASTER_ADDR=10.0.0.1 launch/torchrun_multinode.sh --epochs 30
#
# Elastic by default (rendezvous backend c10d): the agents number the nodes themselves, and after a
# failure (a worker dies, a node restarts its agent) all agents restart their workers, up to
# MAX_RESTARTS times; the workers resume from latest.pt (see --save-every-steps). With NODE_RANK
# set, the rendezvous is static instead: each node gets that fixed rank and nothing restarts.
#
# What torchrun and gloo would guess from the hostname (wrong where /etc/hosts maps it to 127.0.1.1,
# as Debian does), this script works out from the route to MASTER_ADDR (`ip route get`):
#   - whether this node hosts the rendezvous store (MASTER_ADDR is one of its addresses): is_host;
#   - the address the other nodes reach this one at (the route's source): torchrun --local-addr;
#   - the interface gloo uses (the route's): GLOO_SOCKET_IFNAME, unless set.
# Where it cannot (no route, MASTER_ADDR a name for this node's loopback), it stops at once and says
# what to set.
#
# Environment, with defaults (the rest as in launch/torchrun.sh: NPROC, PYTHON, OMP_NUM_THREADS,
# TORCHRUN_ARGS):
#   NNODES=2                  nodes; MIN:MAX (e.g. 2:4) lets the elastic job run with fewer
#   MASTER_ADDR (required)    address (or name) of the node that hosts the rendezvous (any one of them)
#   MASTER_PORT=29500         its port, free on that node
#   RDZV_ID=ddp-cifar         job id of the rendezvous: the same on all nodes, new for each job
#   MAX_RESTARTS=3            elastic restarts of all workers before the job fails
#   NODE_RANK=                0..NNODES-1 for a static rendezvous instead of c10d (MAX_RESTARTS=0)
#   RDZV_CONF=                more of torchrun's --rdzv-conf, e.g. last_call_timeout=5,join_timeout=120
#   LOCAL_ADDR=<route src>    this node's address as the other nodes reach it
#   GLOO_SOCKET_IFNAME=<route dev>  the network interface of the ranks' gloo connections
#
# SIGTERM or SIGUSR1 to this script (on every node) saves latest.pt and stops, as in launch/torchrun.sh.
set -euo pipefail

NNODES=${NNODES:-2}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the node that hosts the rendezvous}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-ddp-cifar}
LOCAL_ADDR=${LOCAL_ADDR:-}

fail() {
  echo "launch/torchrun_multinode.sh: error: $*" >&2
  exit 2
}

# MASTER_ADDR as an IP address, and the route to it from here.
if [[ $MASTER_ADDR =~ ^[0-9.]+$ || $MASTER_ADDR == *:* ]]; then
  master_ip=$MASTER_ADDR
else
  master_ip=$(getent ahostsv4 "$MASTER_ADDR" | awk 'NR == 1 { print $1 }') || true
  [[ -n $master_ip ]] || fail "MASTER_ADDR=$MASTER_ADDR does not resolve on $(hostname): set MASTER_ADDR to the rendezvous node's IP address"
fi
command -v ip >/dev/null || fail "\`ip\` (iproute2) is missing: install it, or set LOCAL_ADDR and GLOO_SOCKET_IFNAME"
route=$(ip -o route get "$master_ip" 2>&1) ||
  fail "no route from $(hostname) to MASTER_ADDR=$MASTER_ADDR ($master_ip): ${route%%$'\n'*}; set MASTER_ADDR to an address this node reaches"
read -r -a words <<<"$route"
src="" dev=""
for ((i = 0; i + 1 < ${#words[@]}; i++)); do
  case ${words[i]} in
  src) src=${words[i + 1]} ;;
  dev) dev=${words[i + 1]} ;;
  esac
done
is_host=0
[[ ${words[0]} == local ]] && is_host=1 # MASTER_ADDR is an address of this node
if ((is_host)); then
  src=$master_ip # the others reach this node at MASTER_ADDR itself, on the interface that holds it
  dev=$(ip -o addr show to "$master_ip" | awk 'NR == 1 { print $2 }')
fi
max_nodes=${NNODES#*:}
if [[ $src == 127.* || $src == ::1 ]] && ((max_nodes > 1)) && [[ $MASTER_ADDR != "$master_ip" && $MASTER_ADDR != localhost ]]; then
  fail "MASTER_ADDR=$MASTER_ADDR resolves to $master_ip, a loopback address, on $(hostname) (see /etc/hosts), which the other nodes cannot reach: set MASTER_ADDR to this node's network address ($(ip -o -4 addr show scope global | awk '{ sub("/.*", "", $4); print $4 }' | paste -sd' '))"
fi
LOCAL_ADDR=${LOCAL_ADDR:-$src}
[[ -n $LOCAL_ADDR && -n ${GLOO_SOCKET_IFNAME:-$dev} ]] ||
  fail "cannot tell this node's address or interface toward $MASTER_ADDR from \`ip route get\` ($route): set LOCAL_ADDR and GLOO_SOCKET_IFNAME"
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$dev}

if [[ -n ${NODE_RANK:-} ]]; then
  export MAX_RESTARTS=${MAX_RESTARTS:-0}
  export RDZV_ARGS="--nnodes=$NNODES --node-rank=$NODE_RANK --master-addr=$master_ip --master-port=$MASTER_PORT --local-addr=$LOCAL_ADDR"
  mode="static rendezvous, node rank $NODE_RANK"
else
  export MAX_RESTARTS=${MAX_RESTARTS:-3}
  # A node that joins a running job (a lost node back, NNODES=MIN:MAX) waits forever for the workers'
  # store address when the agents share the rendezvous store (torch 2.14): each round gets its own.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  rdzv_conf="is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}"
  if [[ $master_ip == 127.* || $master_ip == ::1 ]]; then
    # Every agent on this one machine: torchrun's own guess lets the first host the store, the others join.
    rdzv_conf=${RDZV_CONF:-}
  fi
  export RDZV_ARGS="--nnodes=$NNODES --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$RDZV_ID${rdzv_conf:+ --rdzv-conf=$rdzv_conf} --local-addr=$LOCAL_ADDR"
  mode="c10d rendezvous $RDZV_ID, up to $MAX_RESTARTS restarts"
fi
store=$( ((is_host)) && echo "hosts the rendezvous" || echo "joins the rendezvous")
[[ $master_ip == 127.* || $master_ip == ::1 ]] && store="meets the other agents on this machine"
echo "launch/torchrun_multinode.sh: $NNODES nodes via $MASTER_ADDR:$MASTER_PORT ($mode); $(hostname) $store, at $LOCAL_ADDR, gloo on $GLOO_SOCKET_IFNAME" >&2
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$@"
