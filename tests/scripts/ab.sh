#!/bin/bash
# A/B of gsb builds (and HAProxy) in one sitting (issue 11): the bench's upstream, every
# contender started side by side with WORKERS workers; per round and contender (rounds
# interleave them, so drift hits all alike) `wrk -t1 -c64 -d$SECS` on $PATHQ after a 1 s
# warm-up, CPU = user+sys of the proxy from /proc/<pid>/stat per request, req/s, p99; then
# idle memory: $IDLE keep-alive connections (batches of 500 at once, as the bench), one GET
# each, VmRSS growth per connection 0.5 s after (NOBYTE=1: connections that send nothing).
#
#   cargo build --release -p gsb -p gsb-tests --bin gsb --bin bench
#   flock /tmp/gsb-bench.lock sh -c 'bash tests/scripts/ab.sh 5 \
#       "before|/path/to/old/gsb|X=1" "new|target/release/gsb|X=1" \
#       "jemalloc-bg|target/release/gsb|_RJEM_MALLOC_CONF=background_thread:true" "haproxy||"'
#
# A contender is "name|binary|ENV=V ..." (at least one ENV, e.g. X=1); the name `haproxy`
# starts HAProxy. Env: WORKERS (1), SECS (3), IDLE (4000; 0 skips), PATHQ (/small), NOBYTE.
# Needs wrk, haproxy, curl, python3.
set -u
ROUNDS=$1; shift
WORKERS=${WORKERS:-1}; SECS=${SECS:-3}; IDLE=${IDLE:-4000}; PATHQ=${PATHQ:-/small}
BENCH=${BENCH:-target/release/bench}
HERE=$(dirname "$0")
DIR=$(mktemp -d)
cleanup() { for f in "$DIR"/*.pid; do kill $(cat $f) 2>/dev/null; done; rm -rf "$DIR"; }
trap cleanup EXIT
"$BENCH" upstream primary >"$DIR/up.out" & echo $! >"$DIR/up.pid"
"$BENCH" upstream backup >"$DIR/up2.out" & echo $! >"$DIR/up2.pid"
for f in up up2; do for _ in $(seq 50); do grep -q LISTEN "$DIR/$f.out" && break; sleep 0.1; done; done
UP=$(awk '/LISTEN/{print $2}' "$DIR/up.out"); UP2=$(awk '/LISTEN/{print $2}' "$DIR/up2.out")
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
names=(); ports=(); pids=()
for spec in "$@"; do
  IFS='|' read -r name bin envs <<<"$spec"
  port=$(free)
  if [ "$name" = haproxy ]; then
    cat >"$DIR/haproxy.cfg" <<T
global
    nbthread $WORKERS
    maxconn 9990
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:$port
    default_backend be
backend be
    http-reuse always
    server primary 127.0.0.1:$UP
T
    haproxy -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 & pid=$!
  else
    cat >"$DIR/$name.toml" <<T
[proxy]
listen = "127.0.0.1:$port"
workers = $WORKERS
[admin]
listen = "127.0.0.1:$(free)"
[sites.primary]
url = "http://127.0.0.1:$UP"
[sites.backup]
url = "http://127.0.0.1:$UP2"
[failover]
state_file = "$DIR/$name.state"
T
    env $envs TOKIO_WORKER_THREADS=$WORKERS RUST_LOG=warn "$bin" proxy --config "$DIR/$name.toml" >"$DIR/$name.log" 2>&1 & pid=$!
  fi
  echo $pid >"$DIR/$name.pid"
  names+=("$name"); ports+=("$port"); pids+=("$pid")
done
for p in "${ports[@]}"; do for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/small" >/dev/null && break; sleep 0.1; done; done
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
echo "# $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) workers=$WORKERS secs=$SECS path=$PATHQ"
for r in $(seq $ROUNDS); do
  for i in "${!names[@]}"; do
    n=${names[$i]}; p=${ports[$i]}; pid=${pids[$i]}
    wrk -t1 -c64 -d1s "http://127.0.0.1:$p$PATHQ" >/dev/null
    c0=$(cpu $pid)
    wrk -t1 -c64 -d${SECS}s --latency "http://127.0.0.1:$p$PATHQ" >"$DIR/w"
    c1=$(cpu $pid)
    req=$(awk '/requests in/{print $1}' "$DIR/w")
    p99=$(awk '/ 99%/{print $2}' "$DIR/w")
    err=$(grep -E "Non-2xx|Socket errors" "$DIR/w" | tr '\n' ' ')
    awk -v n=$n -v r=$r -v c=$((c1-c0)) -v q=$req -v s=$SECS -v p99=$p99 -v e="$err" -v l="$(cut -d' ' -f1 /proc/loadavg)" \
      'BEGIN{printf "round %d %-14s %7.2f us/req  %8.0f req/s  p99 %s  load %s %s\n", r, n, c*10000/q, q/s, p99, l, e}'
  done
done
if [ "$IDLE" -gt 0 ]; then
  for i in "${!names[@]}"; do
    n=${names[$i]}; p=${ports[$i]}; pid=${pids[$i]}
    printf "%-14s " $n; python3 "$HERE/idle.py" 127.0.0.1 $p $IDLE $pid ${NOBYTE:-}
    sleep 1
  done
fi
echo "# end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
