#!/bin/bash
# The replicator's own CPU per replicated row (issue 10): two scratch PostgreSQL 15 servers
# (wal_level=logical, fsync off, synchronous_commit on, as the bench's) with the reference
# site's tables, `gsb replicator` of each given build in turn (rounds interleaved), and pgbench
# writing single-row INSERTs into users at RATE per second on each site at once for SECS
# seconds. Prints per run the replicator's CPU ticks (utime+stime, 1/100 s), its voluntary
# context switches (all threads) and CPU microseconds per replicated row.
#
#   cargo build --release -p gsb --bin gsb
#   bash tests/scripts/replcpu.sh RATE SECS gsb-binary [gsb-binary ...]
#
# ROUNDS (default 2) rounds. As root, the servers run as the postgres user. Needs pgbench
# (postgresql-contrib, in Debian's postgresql-15) and curl.
set -eu
RATE=$1 SECS=$2
shift 2
ROUNDS=${ROUNDS:-2}
BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DIR=$(mktemp -d)
AS=()
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; AS=(runuser -u postgres --); fi
stop() {
    for s in a b; do [ -d "$DIR/$s" ] && "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/$s" -m immediate stop >/dev/null 2>&1 || true; done
    rm -rf "$DIR"
}
trap stop EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PA=$(port) PB=$(port) PM=$(port)
for s in a b; do
    p=$PA; [ $s = b ] && p=$PB
    "${AS[@]}" "$BIN/initdb" -D "$DIR/$s" -A trust -U postgres >/dev/null
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/$s" -l "$DIR/$s.log" -w -o "-p $p -k $DIR -c listen_addresses=127.0.0.1 \
        -c wal_level=logical -c track_commit_timestamp=on -c max_replication_slots=10 \
        -c max_wal_senders=10 -c fsync=off -c full_page_writes=off" start >/dev/null
    psql -qX -h 127.0.0.1 -p $p -U postgres -c "CREATE DATABASE site" >/dev/null
    psql -qX -h 127.0.0.1 -p $p -U postgres -d site >/dev/null <<'SQL'
CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, created_at timestamptz,
  updated_at timestamptz);
CREATE TABLE meetings (id uuid PRIMARY KEY, host_id uuid, topic text, start_time timestamptz,
  duration_minutes int, status text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid, kind text,
  minutes int, site text, recorded_at timestamptz);
SQL
done
cat >"$DIR/gsb.toml" <<EOF
[replicator]
primary_dsn = "host=127.0.0.1 port=$PA user=postgres dbname=site"
backup_dsn = "host=127.0.0.1 port=$PB user=postgres dbname=site"
metrics_listen = "127.0.0.1:$PM"
EOF
echo "INSERT INTO users VALUES (gen_random_uuid(), 'a@b.c', 'name', now(), now());" >"$DIR/ins.sql"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}'; }
for round in $(seq "$ROUNDS"); do
    for gsb in "$@"; do
        "$gsb" replicator --config "$DIR/gsb.toml" >"$DIR/repl.log" 2>&1 &
        rp=$!
        for _ in $(seq 300); do
            curl -s "127.0.0.1:$PM/status" | grep -q '"active":true' && break
            sleep 0.1
        done
        sleep 1
        t0=$(ticks $rp) c0=$(switches $rp)
        for p in $PA $PB; do
            pgbench -h 127.0.0.1 -p $p -U postgres -n -f "$DIR/ins.sql" -R "$RATE" -T "$SECS" -c4 -j1 site \
                >"$DIR/pgbench.$p" 2>&1 &
        done
        wait %2 %3
        sleep 1
        t1=$(ticks $rp) c1=$(switches $rp)
        kill $rp
        wait $rp 2>/dev/null || true
        rows=$((2 * RATE * SECS))
        echo "round $round $gsb @$RATE/s each way: cpu $((t1 - t0)) ticks, $((c1 - c0)) context switches, \
$(((t1 - t0) * 10000 / rows)) us/row (load $(cut -d' ' -f1 /proc/loadavg))"
    done
done
