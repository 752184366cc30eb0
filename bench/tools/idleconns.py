#!/usr/bin/env python3
"""Memory held per idle keep-alive connection: opens N connections to a proxy, sends
one request on each (absolute-form when --path is a URL), reads the response, keeps
the connection open, then reports the proxy's process-tree RSS.

    idleconns.py --connect 127.0.0.1:PORT --path /1k --host 127.0.0.1:ORIGIN \
        --n 1000 --pid PROXY_PID --out result.json

`open` counts connections the proxy still held when RSS was read (a proxy that
closes after each response, like tinyproxy, holds none).
"""
import argparse
import asyncio
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(__file__))
from httpc import read_response, request_bytes  # noqa: E402
from proctree import rss_kb  # noqa: E402


async def run(args):
    host, port = args.connect.rsplit(":", 1)
    req = request_bytes(args.path, args.host)
    sem = asyncio.Semaphore(args.parallel)
    held, failed = [], 0

    async def one():
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
                w.write(req)
                status, _ = await asyncio.wait_for(read_response(r), 10)
                if status != 200:
                    failed += 1
                held.append((r, w))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                failed += 1

    # Bounded: a proxy that accepts but never answers must not stall the run.
    tasks = [asyncio.ensure_future(one()) for _ in range(args.n)]
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    for t in pending:
        t.cancel()
    failed += len(pending)
    await asyncio.sleep(args.settle)
    still_open = sum(1 for r, _ in held if not r.at_eof())
    rss = rss_kb(args.pid)
    for _, w in held:
        w.close()
    return {"n": args.n, "ok": len(held), "failed": failed, "open": still_open, "rss_kb": rss}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds to open them all")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.n + 100
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    res = asyncio.run(run(args))
    with open(args.out, "w") as f:
        json.dump(res, f)
    print(json.dumps(res))
    if res["ok"] < 0.99 * args.n:
        sys.exit("idleconns: fewer than 99% of the connections got a response")


if __name__ == "__main__":
    main()
