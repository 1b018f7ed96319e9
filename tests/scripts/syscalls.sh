#!/bin/sh
# Per-request cost of one proxy, gsb vs HAProxy (issue 11, "measure first"): system calls by
# kind (strace -f -c), context switches, page faults and CPU time (perf stat) over a wrk run of
# 100 B keep-alive GETs through the proxy, divided by the number of requests wrk completed.
#
#   cargo build --release -p gsb -p gsb-tests --bin gsb --bin bench
#   sh tests/scripts/syscalls.sh [gsb-binary] [workers]
#
# Needs wrk, haproxy, strace, perf (apt-get install wrk haproxy strace linux-perf). The
# upstream is the bench's own (`bench upstream`). Prints one block per proxy and a table.
set -eu
GSB=${1:-target/release/gsb}
WORKERS=${2:-1}
BENCH=${BENCH:-target/release/bench}
SECS=${SECS:-5}
DIR=$(mktemp -d)
trap 'kill $(cat "$DIR"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$DIR"' EXIT

"$BENCH" upstream primary >"$DIR/up.out" & echo $! >"$DIR/up.pid"
"$BENCH" upstream backup >"$DIR/up2.out" & echo $! >"$DIR/up2.pid"
for f in up up2; do
  for _ in $(seq 50); do grep -q LISTEN "$DIR/$f.out" && break; sleep 0.1; done
done
UP=$(awk '/LISTEN/{print $2}' "$DIR/up.out")
UP2=$(awk '/LISTEN/{print $2}' "$DIR/up2.out")
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
GP=$(free); AP=$(free); HP=$(free)

cat >"$DIR/gsb.toml" <<T
[proxy]
listen = "127.0.0.1:$GP"
workers = $WORKERS
[admin]
listen = "127.0.0.1:$AP"
[sites.primary]
url = "http://127.0.0.1:$UP"
[sites.backup]
url = "http://127.0.0.1:$UP2"
[failover]
state_file = "$DIR/state"
T
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
    bind 127.0.0.1:$HP
    default_backend be
backend be
    http-reuse always
    server primary 127.0.0.1:$UP
T
TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$GSB" proxy --config "$DIR/gsb.toml" >"$DIR/gsb.log" 2>&1 & echo $! >"$DIR/gsb.pid"
haproxy -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 & echo $! >"$DIR/haproxy.pid"
for p in $GP $HP; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/small" >/dev/null && break; sleep 0.1; done
done

reqs() { awk '/requests in/{print $1}'; }
for name in gsb haproxy; do
  pid=$(cat "$DIR/$name.pid"); port=$GP; [ $name = haproxy ] && port=$HP
  wrk -t1 -c64 -d1s "http://127.0.0.1:$port/small" >/dev/null   # warm the upstream pool
  # perf stat: CPU, context switches, page faults of every thread of the proxy.
  perf stat -e task-clock,context-switches,cpu-migrations,page-faults -p "$pid" -o "$DIR/$name.perf" -- sleep "$SECS" & pf=$!
  wrk -t1 -c64 -d${SECS}s "http://127.0.0.1:$port/small" >"$DIR/$name.wrk1"
  wait $pf
  n1=$(reqs <"$DIR/$name.wrk1")
  # strace: system calls by kind (slows the proxy; counts per request stay meaningful).
  strace -f -c -p "$pid" -o "$DIR/$name.strace" & st=$!
  sleep 0.5
  wrk -t1 -c64 -d${SECS}s "http://127.0.0.1:$port/small" >"$DIR/$name.wrk2"
  kill -INT $st; wait $st 2>/dev/null || true
  n2=$(reqs <"$DIR/$name.wrk2")
  echo "== $name: $n1 requests in ${SECS}s under perf stat; $n2 under strace"
  grep -E "requests in|Latency" "$DIR/$name.wrk1"
  awk -v n=$n1 '/task-clock|context-switches|cpu-migrations|page-faults/ {gsub(",","",$1); printf "  %-18s %12.3f per 1k requests\n", $2, $1/n*1000}' "$DIR/$name.perf"
  awk -v n=$n2 '$1 ~ /^[0-9.]+$/ && NF>=5 {calls=$4; sc=$NF; if (calls ~ /^[0-9]+$/) printf "  %-18s %8.3f per request\n", sc, calls/n}' "$DIR/$name.strace" | sort -k2 -nr | head -12
  awk -v n=$n2 '/total/ {printf "  %-18s %8.3f per request\n", "ALL syscalls", $4/n}' "$DIR/$name.strace"
done
uptime
