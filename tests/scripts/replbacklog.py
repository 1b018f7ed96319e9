#!/usr/bin/env python3
"""The replicator on a backlog (issue 10): the bench's two-way backlog and one-way catch-up
on two scratch PostgreSQL 15 servers (wal_level=logical, fsync off, as the bench's), each given
`gsb` build in turn, rounds interleaved (A, B, A, B). Per run: rows/s per direction, and the CPU
(1/100 s ticks) of the replicator, of each server's walsender and backends (the apply's).

    python3 tests/scripts/replbacklog.py [--rounds 2] [--each 100000] [--big 500000] gsb-a gsb-b

Between runs `users` is emptied on both sites with the replicator stopped and drained (TRUNCATE
is not replicated), so every run starts from the same tables. As root, the servers run as the
postgres user. Hold `flock /tmp/gsb-bench.lock` around it.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
SCHEMA = """
CREATE TABLE users (id uuid PRIMARY KEY, email text, name text, created_at timestamptz,
  updated_at timestamptz);
CREATE TABLE meetings (id uuid PRIMARY KEY, host_id uuid, topic text, start_time timestamptz,
  duration_minutes int, status text, created_at timestamptz, updated_at timestamptz);
CREATE TABLE site_config (key text PRIMARY KEY, value text);
CREATE TABLE custom_pages (path text PRIMARY KEY, title text, body text);
CREATE TABLE client_versions (platform text PRIMARY KEY, version text, download_url text);
CREATE TABLE usage_records (id uuid PRIMARY KEY, meeting_id uuid, user_id uuid, kind text,
  minutes int, site text, recorded_at timestamptz);
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def as_pg(cmd):
    return (["runuser", "-u", "postgres", "--"] + cmd) if os.getuid() == 0 else cmd


def psql(port, sql, db="site"):
    out = subprocess.run(
        ["psql", "-qAtX", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", db, "-c", sql],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])
    except OSError:
        return 0


def children(ppid):
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            if int(st[1]) != ppid:
                continue
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            out[int(p)] = cmd
        except OSError:
            pass
    return out


def backend_kind(cmd):
    if "walsender" in cmd or "START_REPLICATION" in cmd:
        return "walsender"
    if " site " in cmd:
        return "backend"
    return "other"


class Pair:
    def __init__(self):
        self.dir = tempfile.mkdtemp()
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres")
        self.ports = {"a": free_port(), "b": free_port()}
        self.metrics = free_port()
        for s, p in self.ports.items():
            subprocess.run(as_pg([f"{BIN}/initdb", "-D", f"{self.dir}/{s}", "-A", "trust", "-U", "postgres"]),
                           check=True, capture_output=True)
            opts = (f"-p {p} -k {self.dir} -c listen_addresses=127.0.0.1 -c wal_level=logical "
                    "-c track_commit_timestamp=on -c max_replication_slots=10 -c max_wal_senders=10 "
                    "-c fsync=off -c full_page_writes=off -c shared_buffers=32MB -c max_connections=100")
            subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", f"{self.dir}/{s}", "-l", f"{self.dir}/{s}.log", "-w",
                                  "-o", opts, "start"]), check=True, capture_output=True)
            psql(p, "CREATE DATABASE site", db="postgres")
            psql(p, SCHEMA)
        with open(f"{self.dir}/gsb.toml", "w") as f:
            f.write(f"""[replicator]
primary_dsn = "host=127.0.0.1 port={self.ports['a']} user=postgres dbname=site"
backup_dsn = "host=127.0.0.1 port={self.ports['b']} user=postgres dbname=site"
metrics_listen = "127.0.0.1:{self.metrics}"
""")

    def postmaster(self, s):
        with open(f"{self.dir}/{s}/postmaster.pid") as f:
            return int(f.readline())

    def stop(self):
        for s in self.ports:
            subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", f"{self.dir}/{s}", "-m", "immediate", "stop"]),
                           capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def status(pair):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pair.metrics}/status", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


class Repl:
    def __init__(self, pair, gsb):
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.log = open(f"{pair.dir}/repl.log", "a")
        self.proc = subprocess.Popen([gsb, "replicator", "--config", f"{pair.dir}/gsb.toml"],
                                     stdout=self.log, stderr=self.log, env=env)
        self.pair = pair
        for _ in range(600):
            st = status(pair)
            if st and st.get("active"):
                return
            time.sleep(0.05)
        raise RuntimeError("replicator not active")

    def drained(self, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            st = status(self.pair)
            dirs = (st or {}).get("directions", {})
            vals = dirs.values() if isinstance(dirs, dict) else dirs
            if vals and all(d.get("pending_rows") == 0 for d in vals):
                return
            time.sleep(0.2)
        raise RuntimeError(f"not drained: {status(self.pair)}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def backlog(port, tag, n):
    done = 0
    while done < n:
        k = min(10_000, n - done)
        psql(port, f"INSERT INTO users SELECT md5('{tag}-' || g)::uuid, '{tag}-' || g, 'backlog', now(), now() "
                   f"FROM generate_series({done + 1}, {done + k}) g")
        done += k


def has_last(port, tag, n):
    return psql(port, f"SELECT count(*) FROM users WHERE id = md5('{tag}-{n}')::uuid") == "1"


def cpu_snapshot(pair, repl):
    snap = {"replicator": ticks(repl.proc.pid)}
    for s in pair.ports:
        for pid, cmd in children(pair.postmaster(s)).items():
            k = f"{s}:{backend_kind(cmd)}"
            snap[k] = snap.get(k, 0) + ticks(pid)
    return snap


def timed(pair, repl, waits):
    """Waits for each (port, tag, n) and returns the seconds until each was complete."""
    t0 = time.time()
    left = dict(enumerate(waits))
    out = {}
    while left:
        for i, (port, tag, n) in list(left.items()):
            if has_last(port, tag, n):
                out[i] = time.time() - t0
                del left[i]
        time.sleep(0.02)
        if time.time() - t0 > 600:
            raise RuntimeError("timeout")
    return [out[i] for i in range(len(waits))]


def reset(pair, gsb):
    r = Repl(pair, gsb)
    r.drained()
    r.stop()
    for p in pair.ports.values():
        psql(p, "TRUNCATE users")


def run(pair, gsb, each, big, tag):
    a, b = pair.ports["a"], pair.ports["b"]
    res = {}
    if each:
        reset(pair, gsb)
        backlog(a, f"{tag}p", each)
        backlog(b, f"{tag}b", each)
        r = Repl(pair, gsb)
        c0 = cpu_snapshot(pair, r)
        t = timed(pair, r, [(b, f"{tag}p", each), (a, f"{tag}b", each)])
        c1 = cpu_snapshot(pair, r)
        res["two-way rows/s"] = [round(each / x) for x in t]
        res["two-way cpu"] = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        r.drained()
        r.stop()
    if big:
        reset(pair, gsb)
        backlog(a, f"{tag}c", big)
        r = Repl(pair, gsb)
        c0 = cpu_snapshot(pair, r)
        t = timed(pair, r, [(b, f"{tag}c", big)])
        c1 = cpu_snapshot(pair, r)
        res["catch-up rows/s"] = round(big / t[0])
        res["catch-up cpu"] = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        r.drained()
        r.stop()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--each", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=500_000)
    ap.add_argument("gsb", nargs="+")
    a = ap.parse_args()
    pair = Pair()
    try:
        # The slots and origins, created once.
        reset(pair, a.gsb[0])
        for rnd in range(a.rounds):
            for i, g in enumerate(a.gsb):
                res = run(pair, g, a.each, a.big, f"r{rnd}g{i}")
                load = open("/proc/loadavg").read().split()[0]
                print(f"round {rnd} {g}: {json.dumps(res)} load {load}", flush=True)
    finally:
        pair.stop()


if __name__ == "__main__":
    sys.exit(main())
