#!/usr/bin/env python3
"""Open-loop fixed-rate load: sends requests on a fixed schedule (RATE per second)
over a pool of keep-alive connections and measures each latency from the time the
request was *due* when it had to wait for a free connection, so a stalled server is
charged for the requests queued behind the stall (no coordinated omission); a
request sent on time is timed from its send. Chosen because wrk2 is not in Debian and
h2load cannot send the absolute-form requests an explicit proxy needs.

    openloop.py --connect 127.0.0.1:PORT --path /1k --host 127.0.0.1:ORIGIN \
        --rate 2000 --duration 10 --out result.json

Latencies include this client's own event-loop delay (tens to hundreds of us):
compare paths with each other, not with a C load generator.
"""
import argparse
import asyncio
import collections
import json
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from httpc import read_response, request_bytes  # noqa: E402


def pct(sorted_vals, p):
    if not sorted_vals:
        return 0
    i = min(len(sorted_vals) - 1, int(round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def ensure(self):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def drop(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run(args):
    host, port = args.connect.rsplit(":", 1)
    port = int(port)
    req = request_bytes(args.path, args.host)
    conns = [Conn(host, port) for _ in range(args.connections)]
    await asyncio.gather(*(c.ensure() for c in conns))
    idle = collections.deque(conns)
    backlog = collections.deque()
    lat, errors, statuses = [], 0, collections.Counter()
    inflight = set()
    loop = asyncio.get_running_loop()

    async def one(conn, due):
        nonlocal errors
        while True:
            # A reused connection the server closed while idle fails at once; retry
            # such a request once on a fresh connection, as HTTP clients do.
            for attempt in (1, 2):
                reused = conn.writer is not None
                try:
                    await conn.ensure()
                    conn.writer.write(req)
                    status, keep = await read_response(conn.reader)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    conn.drop()
                    if reused and attempt == 1:
                        continue
                    errors += 1
                    break
                lat.append(time.perf_counter() - due)
                statuses[status] += 1
                if status != 200:
                    errors += 1
                if not keep:
                    conn.drop()
                break
            if backlog:
                due = backlog.popleft()
                continue
            idle.append(conn)
            return

    total = int(args.rate * args.duration)
    start = time.perf_counter() + 0.05
    max_lag = 0.0
    for k in range(total):
        due = start + k / args.rate
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.perf_counter() - due)
        if idle:
            # Charge the server from the moment this client could send: the event
            # loop's own wake-up lateness (client_max_lag_us) is not the server's.
            t = loop.create_task(one(idle.popleft(), max(due, time.perf_counter())))
            inflight.add(t)
            t.add_done_callback(inflight.discard)
        else:
            backlog.append(due)
    if inflight:
        await asyncio.wait(inflight, timeout=10)
    errors += len(backlog)
    elapsed = time.perf_counter() - start
    for c in conns:
        c.drop()
    lat.sort()
    us = [round(x * 1e6) for x in (pct(lat, 50), pct(lat, 90), pct(lat, 99), pct(lat, 99.9),
                                   lat[-1] if lat else 0)]
    return {
        "target_rps": args.rate, "achieved_rps": round(len(lat) / elapsed, 1),
        "requests": len(lat), "errors": errors,
        "statuses": {str(k): v for k, v in statuses.items()},
        "client_max_lag_us": round(max_lag * 1e6),
        "latency_us": {"p50": us[0], "p90": us[1], "p99": us[2], "p99_9": us[3], "max": us[4]},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True, help="host:port to connect to")
    ap.add_argument("--path", required=True, help="request-target (absolute-form for a proxy)")
    ap.add_argument("--host", required=True, help="Host header")
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = asyncio.run(run(args))
    with open(args.out, "w") as f:
        json.dump(res, f)
    print(json.dumps(res))
    if res["requests"] == 0 or res["errors"] > 0.01 * max(1, res["requests"]):
        sys.exit("openloop: too many errors")


if __name__ == "__main__":
    main()
