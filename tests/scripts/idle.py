# Opens N keep-alive connections to host:port (batches of 500 at once, as the bench), one GET
# of /small each, read whole (with a 5th argument: no request at all); prints the VmRSS growth
# of PID per connection 0.5 s after the last one, then closes them. Used by ab.sh.
#   python3 idle.py HOST PORT N PID [nobyte]
import asyncio, sys, time
host, port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
nobyte = len(sys.argv) > 5
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1])
async def one():
    r, w = await asyncio.open_connection(host, port)
    if nobyte: return (r, w)
    w.write(b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n")
    buf = b""
    while True:
        d = await r.read(4096)
        if not d: raise RuntimeError("closed")
        buf += d
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            head = buf[:i].decode().lower()
            cl = 0
            for l in head.split("\r\n"):
                if l.startswith("content-length:"): cl = int(l.split(":")[1])
            if len(buf) >= i + 4 + cl: return (r, w)
async def main():
    before = rss()
    conns = []
    for s in range(0, n, 500):
        conns += await asyncio.gather(*[one() for _ in range(min(500, n - s))])
    await asyncio.sleep(0.5)
    after = rss()
    print(f"idle {len(conns)} conns: before {before} KiB after {after} KiB: {(after-before)/len(conns):.2f} KiB each")
    for r, w in conns: w.close()
asyncio.run(main())
