#!/usr/bin/env bash
# A single-node Ray head on this machine, for `ray job submit` and `serve deploy` the way a
# cluster takes them. Uses the checkout's .venv (make venv) unless RAY_BIN says otherwise.
#   cluster/local.sh start     # head at 127.0.0.1:6379, job server / dashboard at 127.0.0.1:8265
#   cluster/local.sh join ADDR # a worker node joining the head at ADDR (host:port), e.g. on a second machine
#   cluster/local.sh status
#   cluster/local.sh stop      # stops every Ray process of this user on this machine
# Then:
#   RAY_ADDRESS=http://127.0.0.1:8265 .venv/bin/ray job submit --working-dir . \
#     --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config jobs/configs/dense_mnrl.yaml
# Settings (environment): RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS, RAY_NUM_GPUS,
# RAY_BLOCK=1 (stay in the foreground), RAY_EXTRA_ARGS (more `ray start` flags).
# Ray 2.60 turns on token authentication; clients then need RAY_AUTH_MODE=token and the token,
# or start and use the head with RAY_AUTH_MODE=disabled on a single-user machine.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ray_bin="${RAY_BIN:-$here/../.venv/bin/ray}"
[ -x "$ray_bin" ] || ray_bin="$(command -v ray || true)"
if [ -z "$ray_bin" ]; then
  echo "cluster/local.sh: no ray executable; run 'make venv' first or set RAY_BIN" >&2
  exit 2
fi
# Job entrypoints run `python ...` from the head's PATH: make it the Python that has raytrieve's
# dependencies (the one next to this ray), as a cluster image would.
export PATH="$(dirname "$ray_bin"):$PATH"
port="${RAY_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"

case "${1:-}" in
  start)
    args=(start --head --node-ip-address=127.0.0.1 "--port=$port" --dashboard-host=127.0.0.1
          "--dashboard-port=$dashboard_port" --include-dashboard=true --disable-usage-stats)
    [ -n "${RAY_NUM_CPUS:-}" ] && args+=("--num-cpus=$RAY_NUM_CPUS")
    [ -n "${RAY_NUM_GPUS:-}" ] && args+=("--num-gpus=$RAY_NUM_GPUS")
    # Keep idle task workers 5 minutes, not Ray's 1 s: each new one re-imports torch
    # (raytrieve/ray_cluster.py says why and what it measured); the nodes that join get it from here.
    [ -z "${RAY_idle_worker_killing_time_threshold_ms:-}" ] && \
      args+=('--system-config={"idle_worker_killing_time_threshold_ms": 300000}')
    # shellcheck disable=SC2206  # extra flags are meant to split on spaces
    [ -n "${RAY_EXTRA_ARGS:-}" ] && args+=($RAY_EXTRA_ARGS)
    export TOKENIZERS_PARALLELISM=false
    if [ "${RAY_BLOCK:-0}" = "1" ]; then
      exec "$ray_bin" "${args[@]}" --block
    fi
    "$ray_bin" "${args[@]}"
    echo "Ray head up. Submit jobs with: RAY_ADDRESS=http://127.0.0.1:$dashboard_port ray job submit ..."
    ;;
  join)
    # A worker node: it needs the same Python environment as the head (raytrieve's dependencies),
    # read access to the corpus and write access to the output (shared storage or an object
    # store URI), and nothing else: the driver never sends it data.
    address="${2:?usage: cluster/local.sh join HEAD_HOST:PORT}"
    args=(start "--address=$address" --disable-usage-stats)
    [ -n "${RAY_NUM_CPUS:-}" ] && args+=("--num-cpus=$RAY_NUM_CPUS")
    [ -n "${RAY_NUM_GPUS:-}" ] && args+=("--num-gpus=$RAY_NUM_GPUS")
    [ -n "${RAY_RESOURCES:-}" ] && args+=("--resources=$RAY_RESOURCES")
    # shellcheck disable=SC2206
    [ -n "${RAY_EXTRA_ARGS:-}" ] && args+=($RAY_EXTRA_ARGS)
    export TOKENIZERS_PARALLELISM=false
    if [ "${RAY_BLOCK:-0}" = "1" ]; then
      exec "$ray_bin" "${args[@]}" --block
    fi
    exec "$ray_bin" "${args[@]}"
    ;;
  status)
    exec "$ray_bin" status --address "127.0.0.1:$port"
    ;;
  stop)
    exec "$ray_bin" stop
    ;;
  *)
    echo "usage: cluster/local.sh start|join HEAD_HOST:PORT|status|stop" >&2
    exit 2
    ;;
esac
