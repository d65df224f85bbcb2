#!/usr/bin/env bash
# The peers Cascade is compared with, on loopback, with their data in a directory of their own:
#   - redis-server, default durability (RDB snapshots, no AOF)       127.0.0.1:$REDIS_PORT
#   - redis-server, appendonly yes + appendfsync always (durable)    127.0.0.1:$REDIS_ALWAYS_PORT
#   - etcd, a 3-member cluster                                       127.0.0.1:$ETCD_PORT_1..3
#
#   benches/peers.sh start DIR   install (Debian packages) if missing, start all, wait until they answer
#   benches/peers.sh stop DIR    stop what `start DIR` started and remove DIR
#
# `start` prints the endpoints as KEY=VALUE lines (also written to DIR/peers.env).
set -euo pipefail

REDIS_PORT=${REDIS_PORT:-16379}
REDIS_ALWAYS_PORT=${REDIS_ALWAYS_PORT:-16380}
ETCD_PORTS=(${ETCD_PORT_1:-12379} ${ETCD_PORT_2:-22379} ${ETCD_PORT_3:-32379})
# Each etcd member's peer port is its client port + 1.
READY_TRIES=100 # × 0.1 s

die() { echo "peers.sh: $*" >&2; exit 1; }

install_missing() {
  local want=()
  command -v redis-server >/dev/null || want+=(redis-server)
  command -v redis-cli >/dev/null || want+=(redis-tools)
  command -v etcd >/dev/null || want+=(etcd-server)
  command -v etcdctl >/dev/null || want+=(etcd-client)
  [ ${#want[@]} -eq 0 ] && return 0
  echo "peers.sh: installing ${want[*]}" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y --no-install-recommends "${want[@]}" >/dev/null 2>&1 \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${want[@]}" >/dev/null; } \
    || die "could not install ${want[*]} with apt-get"
  # A package may start a system service; ours run on their own ports, but do not leave it behind.
  (pkill -x redis-server || true; pkill -x etcd || true) 2>/dev/null
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq $READY_TRIES); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "$what did not answer within $((READY_TRIES / 10)) s (logs in $DIR)"
}

start() {
  install_missing
  mkdir -p "$DIR"
  for p in "$REDIS_PORT" "$REDIS_ALWAYS_PORT" "${ETCD_PORTS[@]}"; do
    port_free "$p" || die "port $p is in use (set REDIS_PORT, REDIS_ALWAYS_PORT, ETCD_PORT_1..3)"
  done
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR" --dbfilename redis.rdb \
    --appendonly no --daemonize no --save "3600 1 300 100 60 10000" >"$DIR/redis.log" 2>&1 &
  echo $! >"$DIR/redis.pid"
  mkdir -p "$DIR/redis-always"
  redis-server --port "$REDIS_ALWAYS_PORT" --bind 127.0.0.1 --dir "$DIR/redis-always" \
    --appendonly yes --appendfsync always --save "" --daemonize no >"$DIR/redis-always.log" 2>&1 &
  echo $! >"$DIR/redis-always.pid"

  local cluster="" i
  for i in 0 1 2; do
    cluster+="${cluster:+,}e$((i + 1))=http://127.0.0.1:$((ETCD_PORTS[i] + 1))"
  done
  for i in 0 1 2; do
    local name="e$((i + 1))" client="http://127.0.0.1:${ETCD_PORTS[i]}" peer="http://127.0.0.1:$((ETCD_PORTS[i] + 1))"
    ETCD_UNSUPPORTED_ARCH=${ETCD_UNSUPPORTED_ARCH:-} etcd --name "$name" --data-dir "$DIR/$name" \
      --listen-client-urls "$client" --advertise-client-urls "$client" \
      --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
      --initial-cluster "$cluster" --initial-cluster-token cascade-bench --initial-cluster-state new \
      --quota-backend-bytes $((8 * 1024 * 1024 * 1024)) >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
  done

  wait_for "redis on $REDIS_PORT" redis-cli -p "$REDIS_PORT" ping
  wait_for "redis (appendfsync always) on $REDIS_ALWAYS_PORT" redis-cli -p "$REDIS_ALWAYS_PORT" ping
  local endpoints
  endpoints=$(printf '127.0.0.1:%s,' "${ETCD_PORTS[@]}")
  endpoints=${endpoints%,}
  wait_for "etcd ($endpoints)" env ETCDCTL_API=3 etcdctl --endpoints="$endpoints" endpoint health
  {
    echo "REDIS=127.0.0.1:$REDIS_PORT"
    echo "REDIS_ALWAYS=127.0.0.1:$REDIS_ALWAYS_PORT"
    echo "ETCD=$endpoints"
    echo "REDIS_VERSION=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
    echo "ETCD_VERSION=$(etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p')"
  } | tee "$DIR/peers.env"
}

stop() {
  [ -d "$DIR" ] || return 0
  local f pid
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
  done
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$DIR"
}

[ $# -eq 2 ] || die "usage: $0 start|stop DIR"
DIR=$2
case $1 in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
