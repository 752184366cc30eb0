#!/usr/bin/env python3
"""Process-tree accounting for the benchmark: CPU seconds and resident memory of a
server and all of its descendants (nginx/squid workers, haproxy threads count in
their process), read from /proc.

    proctree.py measure --pid PID [--pid PID2] --out FILE -- CMD...
        run CMD (the load); record the servers' CPU delta and peak RSS
    proctree.py rss --pid PID
        print the current tree RSS in KiB
"""
import argparse
import json
import os
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat(pid):
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode()
    return data[data.rindex(")") + 2:].split()


def tree(root):
    """The root pid and all of its live descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat(entry)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root):
    """utime+stime (and reaped children's) summed over the tree."""
    ticks = 0
    for pid in tree(root):
        try:
            f = _stat(pid)
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat: indices 11-14 here.
        ticks += sum(int(x) for x in f[11:15])
    return ticks / CLK_TCK


def rss_kb(root):
    """Resident set summed over the tree (shared pages of forked workers count twice)."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except (OSError, ValueError, IndexError):
            continue
    return total


def measure(args):
    pids = args.pid
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"proctree: pid {pid} is not running")
    cpu0 = sum(cpu_seconds(p) for p in pids)
    peak = sum(rss_kb(p) for p in pids)
    t0 = time.monotonic()
    proc = subprocess.Popen(args.cmd)
    while proc.poll() is None:
        peak = max(peak, sum(rss_kb(p) for p in pids))
        time.sleep(args.interval)
    wall = time.monotonic() - t0
    cpu1 = sum(cpu_seconds(p) for p in pids)
    alive = all(os.path.exists(f"/proc/{p}") for p in pids)
    res = {"cpu_s": round(cpu1 - cpu0, 3), "peak_rss_kb": peak, "wall_s": round(wall, 3),
           "rc": proc.returncode, "server_alive": alive}
    with open(args.out, "w") as f:
        json.dump(res, f)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    if not alive:
        sys.exit(f"proctree: a server pid of {pids} died during the run")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd_name", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--pid", type=int, action="append", required=True,
                   help="server pid; repeat to sum several servers (a two-hop chain)")
    m.add_argument("--out", required=True)
    m.add_argument("--interval", type=float, default=0.1)
    m.add_argument("cmd", nargs=argparse.REMAINDER)
    r = sub.add_parser("rss")
    r.add_argument("--pid", type=int, action="append", required=True)
    args = ap.parse_args()
    if args.cmd_name == "measure":
        if args.cmd and args.cmd[0] == "--":
            args.cmd = args.cmd[1:]
        measure(args)
    else:
        print(sum(rss_kb(p) for p in args.pid))


if __name__ == "__main__":
    main()
