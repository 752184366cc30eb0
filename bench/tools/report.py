#!/usr/bin/env python3
"""Turns one run's raw files (written by bench/run.sh into its scratch directory)
into the results: <base>.json (+ latest.json), latest.md and latest.svg in --dest.

Raw files: manifest.jsonl (one line per path, plus failure events);
<path>.<load>.wrk.json / .rate.json (client side); <path>.<load>.proc.json (server
CPU and peak RSS); <path>.idle.json and <path>.conns<N>.json (memory).

    report.py --render bench/results/latest.json   # redraw latest.md and latest.svg
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

THROUGHPUT = [("ka_1k", "1 KiB keep-alive"), ("close_1k", "1 KiB new conn/req"), ("ka_1m", "1 MiB keep-alive")]
# Outrider paths and the peers each is compared with.
COMPARE = {
    "fwd-outrider": ["fwd-squid", "fwd-tinyproxy"],
    "fwd-outrider-nolog": ["fwd-squid", "fwd-tinyproxy"],
    "in-outrider": ["in-nginx", "in-haproxy"],
    "transparent-outrider": ["transparent-squid"],
    "mtls-outrider": ["mtls-nginx", "mtls-haproxy"],
    "cache-outrider": ["cache-squid", "cache-nginx"],
    "h2-outrider": ["h2-haproxy", "h2-nginx"],
}
MB = 1024  # KiB per MiB


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(raw):
    paths, order = {}, []
    with open(os.path.join(raw, "manifest.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            name = rec.pop("path")
            if name not in paths:
                paths[name] = {"path": name, "failures": []}
                order.append(name)
            p = paths[name]
            if rec.get("event") == "failure":
                p["failures"].append(rec["reason"])
            elif rec.get("event") == "note":
                p.setdefault("limits", []).append(rec["reason"])
            else:
                p.update(rec)
    for name in order:
        p = paths[name]
        p.setdefault("status", "failed")
        if p["failures"] and p["status"] == "ok":
            p["status"] = "partial"
        p["loads"] = loads_of(raw, name)
        p["memory"] = memory_of(raw, name)
        if name in ("h2h", "h2hc", "h2hm"):
            p["h2h"] = head_to_head(raw, name)
        if name == "instr":
            p["instr"] = instructions(raw)
    return [paths[n] for n in order]


def instructions(raw):
    """Per proxy: user-space instructions per request under callgrind (instr.<name>.json)."""
    out = {}
    for fn in sorted(os.listdir(raw)):
        parts = fn.split(".")
        if len(parts) == 3 and parts[0] == "instr" and parts[2] == "json":
            r = load_json(os.path.join(raw, fn))
            if r and r.get("per_request"):
                out[parts[1]] = r
    return out


def head_to_head(raw, prefix):
    """Per proxy: req/s and p99 of each interleaved round of the keep-alive load, and their
    medians; with fixed-rate rounds (PREFIX.<name>.<round>.rate.json), their latency
    percentiles and medians under "rate"."""
    rounds, rates = {}, {}
    for fn in sorted(os.listdir(raw)):
        parts = fn.split(".")
        if len(parts) != 5 or parts[0] != prefix:
            continue
        if fn.endswith(".wrk.json"):
            w = load_json(os.path.join(raw, fn))
            if w and w["requests"]:
                rounds.setdefault(parts[1], []).append(
                    (w["requests"] / (w["duration_us"] / 1e6), w["latency_us"]["p99"]))
        elif fn.endswith(".rate.json"):
            r = load_json(os.path.join(raw, fn))
            if r and r["requests"]:
                rates.setdefault(parts[1], []).append(r["latency_us"])
    out = {}
    for name, rs in rounds.items():
        out[name] = {"rounds": [{"rps": round(r, 1), "p99_us": q} for r, q in rs],
                     "rps_median": round(statistics.median(r for r, _ in rs), 1),
                     "p99_median_us": statistics.median(q for _, q in rs)}
    for name, ls in rates.items():
        out.setdefault(name, {})["rate"] = {
            "rounds": [{k: lat[k] for k in ("p50", "p99", "p99_9")} for lat in ls],
            **{f"{k}_median_us": statistics.median(lat[k] for lat in ls) for k in ("p50", "p99", "p99_9")}}
    return out


def loads_of(raw, name):
    out = {}
    for load in ("ka_1k", "close_1k", "ka_1m", "ka_c1k", "rate_1k", "rate_c1k", "h2_1k"):
        proc = load_json(os.path.join(raw, f"{name}.{load}.proc.json"))
        wrk = load_json(os.path.join(raw, f"{name}.{load}.wrk.json"))
        rate = load_json(os.path.join(raw, f"{name}.{load}.rate.json"))
        if wrk:
            secs = wrk["duration_us"] / 1e6
            r = {"rps": round(wrk["requests"] / secs, 1), "requests": wrk["requests"],
                 "mib_s": round(wrk["bytes"] / secs / 2**20, 1),
                 "errors": sum(wrk["errors"].values()), "error_kinds": wrk["errors"],
                 "latency_us": wrk["latency_us"]}
        elif rate:
            r = {"rps": rate["achieved_rps"], "target_rps": rate["target_rps"],
                 "requests": rate["requests"], "errors": rate["errors"],
                 "client_max_lag_us": rate["client_max_lag_us"], "latency_us": rate["latency_us"]}
        else:
            continue
        if proc:
            r["cpu_s"] = proc["cpu_s"]
            r["cpu_s_per_1k"] = round(proc["cpu_s"] / r["requests"] * 1000, 4) if r["requests"] else None
            r["peak_rss_kb"] = proc["peak_rss_kb"]
        out[load] = r
    return out


def memory_of(raw, name):
    idle = load_json(os.path.join(raw, f"{name}.idle.json"))
    if not idle:
        return {}
    mem = {"idle_kb": idle["idle_kb"], "conns": {}}
    for fn in sorted(os.listdir(raw)):
        if fn.startswith(f"{name}.conns") and fn.endswith(".json"):
            c = load_json(os.path.join(raw, fn))
            if c:
                mem["conns"][str(c["n"])] = {"rss_kb": c["rss_kb"], "open": c["open"], "ok": c["ok"]}
    return mem


def ratios(paths):
    by = {p["path"]: p for p in paths}
    for p in paths:
        # The transparent paths run over a veth pair: their baseline does too.
        base = p.get("base") or ("transparent-direct" if p["path"].startswith("transparent-") else "direct")
        direct = by.get(base, {}).get("loads", {})
        p["vs_direct"] = {}
        for load, _ in THROUGHPUT:
            a, d = p["loads"].get(load), direct.get(load)
            if a and d and d["rps"]:
                p["vs_direct"][load] = round(a["rps"] / d["rps"], 3)
    comps = []
    for ours, peers in COMPARE.items():
        o = by.get(ours)
        if not o or not o["loads"]:
            continue
        for peer in peers:
            q = by.get(peer)
            if not q or not q["loads"]:
                continue
            for load in o["loads"]:
                a, b = o["loads"][load], q["loads"].get(load)
                if not b:
                    continue
                comps.append({
                    "outrider": ours, "peer": peer, "load": load,
                    # At a fixed rate both deliver the same req/s: only latency compares.
                    "rps_ratio": round(a["rps"] / b["rps"], 3)
                    if b["rps"] and not load.startswith("rate") else None,
                    "p99_ratio": round(a["latency_us"]["p99"] / b["latency_us"]["p99"], 3)
                    if b["latency_us"]["p99"] else None,
                })
    return comps


def targets(paths):
    by = {p["path"]: p for p in paths}

    def get(path, *keys):
        cur = by.get(path)
        for k in keys:
            if not isinstance(cur, dict) or k not in cur:
                return None
            cur = cur[k]
        return cur

    out = []

    def add(name, value, goal, met):
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    fo, sq = get("fwd-outrider", "loads", "ka_1k", "rps"), get("fwd-squid", "loads", "ka_1k", "rps")
    v = round(fo / sq, 2) if fo and sq else None
    add("explicit forward (allowlist + log), 1 KiB keep-alive req/s vs squid", v and f"{v}×", "≥ 3×",
        None if v is None else v >= 3)
    fr, hr = get("fwd-outrider", "vs_direct", "ka_1k"), get("in-haproxy", "vs_direct", "ka_1k")
    add("explicit forward (allowlist + log) ratio to direct vs haproxy's ratio",
        fr is not None and hr is not None and f"{fr} vs {hr}" or None, "≥ haproxy's",
        None if fr is None or hr is None else fr >= hr)
    for peer in ("in-nginx", "in-haproxy"):
        a, b = get("in-outrider", "loads", "ka_1k", "rps"), get(peer, "loads", "ka_1k", "rps")
        add(f"inbound 1 KiB keep-alive req/s vs {peer[3:]}", a and b and f"{a:.0f} vs {b:.0f}" or None,
            "ahead", None if not (a and b) else a > b)
        a = get("in-outrider", "loads", "rate_1k", "latency_us", "p99")
        b = get(peer, "loads", "rate_1k", "latency_us", "p99")
        add(f"inbound p99 at the fixed rate vs {peer[3:]}", a and b and f"{a} µs vs {b} µs" or None,
            "lower", None if not (a and b) else a < b)
    h2h = get("h2h", "h2h") or {}
    for peer in ("nginx", "haproxy"):
        a, b = h2h.get("outrider-inbound"), h2h.get(peer)
        add(f"inbound head to head (interleaved rounds, medians) vs {peer}: req/s, p99",
            a and b and f"{a['rps_median']:.0f} vs {b['rps_median']:.0f} req/s; "
                        f"{a['p99_median_us']} µs vs {b['p99_median_us']} µs" or None,
            "ahead in both", None if not (a and b and "rps_median" in a and "rps_median" in b) else
            a["rps_median"] > b["rps_median"] and a["p99_median_us"] < b["p99_median_us"])
    for peer in ("nginx", "haproxy"):
        a, b = (h2h.get("outrider-inbound") or {}).get("rate"), (h2h.get(peer) or {}).get("rate")
        add(f"inbound head to head at the fixed rate (medians) vs {peer}: p99",
            a and b and f"{a['p99_median_us']} µs vs {b['p99_median_us']} µs" or None,
            "lower", None if not (a and b) else a["p99_median_us"] < b["p99_median_us"])
    d, e, hp = h2h.get("direct"), h2h.get("outrider-explicit"), h2h.get("haproxy")
    if d and e and hp and d.get("rps_median"):
        fr, hr = e["rps_median"] / d["rps_median"], hp["rps_median"] / d["rps_median"]
        add("explicit forward (allowlist + log) ratio to direct vs haproxy's, head to head",
            f"{fr:.2f} vs {hr:.2f}", "≥ haproxy's", fr >= hr)
    hm = get("h2hm", "h2h") or {}
    a, b = hm.get("outrider"), hm.get("nginx")
    v = round(a["rps_median"] / b["rps_median"], 2) if a and b and b["rps_median"] else None
    add("two-hop mTLS req/s vs the nginx chain's, head to head (medians)", v and f"{v}×", "≥ 1.2×",
        None if v is None else v >= 1.2)
    hc = get("h2hc", "h2h") or {}
    a, b = hc.get("outrider"), hc.get("squid")
    v = round(a["rps_median"] / b["rps_median"], 2) if a and b and b["rps_median"] else None
    add("cache hits vs squid's, head to head (medians)", v and f"{v}×", "≥ 2×", None if v is None else v >= 2)
    idles = [get(p, "memory", "idle_kb") for p in ("fwd-outrider", "in-outrider")]
    idles = [x for x in idles if x]
    add("outrider idle RSS", idles and f"{max(idles) / MB:.1f} MB" or None, "≤ 10 MB",
        None if not idles else max(idles) <= 10 * MB)
    k = [get(p, "memory", "conns", "1000", "rss_kb") for p in ("fwd-outrider", "in-outrider")]
    k = [x for x in k if x]
    add("outrider RSS with 1,000 idle keep-alive connections", k and f"{max(k) / MB:.1f} MB" or None,
        "≤ 30 MB", None if not k else max(k) <= 30 * MB)
    return out


def host_info():
    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None
    return {
        "cpus": os.cpu_count(), "kernel": platform.release(),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "versions": {
            "nginx": ver(["nginx", "-v"]), "haproxy": ver(["haproxy", "-v"]),
            "squid": ver(["squid", "-v"]), "tinyproxy": ver(["tinyproxy", "-v"]),
            "wrk": ver(["wrk", "-v"]),
        },
    }


# --- Markdown ------------------------------------------------------------------------

def fnum(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def fus(us):
    if us is None:
        return "–"
    return f"{us / 1000:.2f}" if us >= 1000 else f"{us / 1000:.3f}"


def fmb(kb):
    return "–" if kb is None else f"{kb / MB:.1f}"


def markdown(res):
    p_ = res["params"]
    lines = [f"# Outrider benchmark, {res['timestamp']} ({res['mode']} run)", ""]
    h = res["host"]
    lines += [f"{h['cpus']} CPUs, Linux {h['kernel']}, load average at the end {' '.join(h['loadavg'])}; "
              f"loopback only. wrk {p_.get('threads')} threads, {p_.get('duration_s')} s per load: "
              f"{p_.get('conns')} keep-alive connections for 1 KiB, {p_.get('close_conns')} for a new "
              f"connection per request, {p_.get('big_conns')} for 1 MiB; the fixed rate is "
              f"{p_.get('rate')} req/s open-loop over {p_.get('rate_conns')} connections (bench/tools/openloop.rs). "
              "Latencies in ms; CPU is the proxy's (all processes) in seconds per 1,000 requests of the "
              "1 KiB keep-alive load; RSS in MB, summed over the proxy's processes. "
              f"Outrider: {p_.get('outrider_bin', 'none')} (source {p_.get('outrider_commit', 'unknown')}).", ""]
    if res["mode"] == "smoke":
        lines += ["**Smoke run: tiny loads for about a second; the numbers mean nothing.**", ""]
    lines += ["## Throughput and latency", "",
              "| path | 1 KiB k-a req/s | × direct | p99 | 1 KiB new-conn req/s | × direct | "
              f"1 MiB req/s | × direct | at {p_.get('rate')} req/s: p50 / p99 / p99.9 | CPU s / 1k req | peak RSS |",
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for p in res["paths"]:
        if p["status"] not in ("ok", "partial") or not p["loads"] or p.get("group") == "h2":
            continue
        L = p["loads"]
        row = [p["label"]]
        ka = L.get("ka_1k") or L.get("ka_c1k")
        for load, src in (("ka_1k", ka), ("close_1k", L.get("close_1k")), ("ka_1m", L.get("ka_1m"))):
            row.append(fnum(src and src["rps"]))
            row.append(fnum(p["vs_direct"].get(load), 2) if load in p["vs_direct"] else "–")
            if load == "ka_1k":
                row.append(fus(src and src["latency_us"]["p99"]))
        rt = L.get("rate_1k") or L.get("rate_c1k")
        row.append(" / ".join(fus(rt["latency_us"][k]) for k in ("p50", "p99", "p99_9")) if rt else "–")
        row.append(fnum(ka and ka.get("cpu_s_per_1k"), 3))
        peaks = [x.get("peak_rss_kb") for x in L.values() if x.get("peak_rss_kb")]
        row.append(fmb(max(peaks)) if peaks else "–")
        lines.append("| " + " | ".join(row) + " |")
    h2 = [p for p in res["paths"] if p.get("group") == "h2" and p["status"] in ("ok", "partial")
          and p["loads"].get("h2_1k")]
    if h2:
        direct = next((p["loads"]["h2_1k"] for p in h2 if p["path"] == "h2-direct"), None)
        lines += ["", "## HTTP/2 end to end", "",
                  f"h2load with prior knowledge (h2c), {p_.get('h2_conns')} connections × "
                  f"{p_.get('h2_streams')} streams, 1 KiB; each proxy speaks HTTP/2 to the origin's "
                  "h2c port (gRPC's path). Latencies in ms, from h2load's per-request log.", "",
                  "| path | req/s | × direct | p50 / p99 / p99.9 | CPU s / 1k req | peak RSS |",
                  "|---|--:|--:|--:|--:|--:|"]
        for p in h2:
            x = p["loads"]["h2_1k"]
            vs = fnum(x["rps"] / direct["rps"], 2) if direct and direct["rps"] else "–"
            lat = " / ".join(fus(x["latency_us"][k]) for k in ("p50", "p99", "p99_9"))
            lines.append(f"| {p['label']} | {fnum(x['rps'])} | {vs} | {lat} | "
                         f"{fnum(x.get('cpu_s_per_1k'), 3)} | {fmb(x.get('peak_rss_kb'))} |")
    levels = res["params"].get("idle_levels", "").split()
    mem_rows = [p for p in res["paths"] if p.get("memory")]
    if mem_rows:
        lines += ["", "## Memory (RSS, MB)", "",
                  "| proxy | idle | " + " | ".join(f"{int(n):,} idle k-a conns (still open)" for n in levels) + " |",
                  "|---|--:|" + "--:|" * len(levels)]
        for p in mem_rows:
            m = p["memory"]
            cells = [p["label"], fmb(m.get("idle_kb"))]
            for n in levels:
                c = m["conns"].get(n)
                cells.append(f"{fmb(c['rss_kb'])} ({c['open']:,})" if c else "–")
            lines.append("| " + " | ".join(cells) + " |")
    if res["comparisons"]:
        labels = {p["path"]: p["label"] for p in res["paths"]}
        lines += ["", "## Outrider relative to each peer", "",
                  "req/s × above 1 means outrider is faster; p99 × below 1 means outrider's p99 is lower.", "",
                  "| outrider | peer | load | req/s × | p99 × |", "|---|---|---|--:|--:|"]
        for c in res["comparisons"]:
            lines.append(f"| {labels[c['outrider']]} | {labels[c['peer']]} | {c['load']} | "
                         f"{fnum(c['rps_ratio'], 2)} | {fnum(c['p99_ratio'], 2)} |")
    h2h = next((p.get("h2h") for p in res["paths"] if p["path"] == "h2h" and p.get("h2h")), None)
    order = ["direct", "outrider-explicit", "outrider-inbound", "nginx", "haproxy", "haproxy-headers"]
    # The inbound path's peers; haproxy-headers adds the headers outrider's inbound path adds.
    peers = ("nginx", "haproxy", "haproxy-headers")
    ka = {k: v for k, v in (h2h or {}).items() if "rps_median" in v}
    if ka:
        n = max(len(v["rounds"]) for v in ka.values())
        direct = ka.get("direct")
        lines += ["", "## Head to head (interleaved)", "",
                  f"The origin alone, outrider (explicit forward with allowlist and access log; inbound), "
                  f"nginx and HAProxy running at once and taking turns with the 1 KiB keep-alive load, {n} "
                  "rounds in rotating order; medians. Less exposed than the tables above to the machine's "
                  "background load shifting between paths run minutes apart. `haproxy-headers` is HAProxy "
                  "adding what outrider's inbound path adds to each request and response (X-Forwarded-For, "
                  "Forwarded, X-Request-Id, Via): the like-for-like comparison.", "",
                  "| path | req/s (median) | rounds | × direct | p99 (median) | outrider inbound req/s × | outrider inbound p99 × |",
                  "|---|--:|---|--:|--:|--:|--:|"]
        base = ka.get("outrider-inbound")
        for name, v in sorted(ka.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            rr = ", ".join(fnum(r["rps"]) for r in v["rounds"])
            xd = direct and direct["rps_median"] and fnum(v["rps_median"] / direct["rps_median"], 2) or "–"
            peer = name in peers
            x = base and peer and v["rps_median"] and fnum(base["rps_median"] / v["rps_median"], 2) or "–"
            y = base and peer and v["p99_median_us"] and fnum(base["p99_median_us"] / v["p99_median_us"], 2) or "–"
            lines.append(f"| {name} | {fnum(v['rps_median'])} | {rr} | {xd} | {fus(v['p99_median_us'])} | {x} | {y} |")
    fixed = {k: v["rate"] for k, v in (h2h or {}).items() if "rate" in v}
    if fixed:
        n = max(len(v["rounds"]) for v in fixed.values())
        p_ = res["params"]
        lines += ["", "## Head to head at the fixed rate (interleaved)", "",
                  f"The same proxies, taking turns with {p_.get('rate')} req/s open-loop over "
                  f"{p_.get('rate_conns')} keep-alive connections (bench/tools/openloop.rs), {n} rounds; "
                  "medians of each round's percentiles.", "",
                  "| path | p50 | p99 | p99.9 | p99 by round | outrider inbound p99 × |", "|---|--:|--:|--:|---|--:|"]
        base = fixed.get("outrider-inbound")
        for name, v in sorted(fixed.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            rr = ", ".join(fus(r["p99"]) for r in v["rounds"])
            y = base and name in peers and v["p99_median_us"] and \
                fnum(base["p99_median_us"] / v["p99_median_us"], 2) or "–"
            lines.append(f"| {name} | {fus(v['p50_median_us'])} | {fus(v['p99_median_us'])} | "
                         f"{fus(v['p99_9_median_us'])} | {rr} | {y} |")
    hm = next((p.get("h2h") for p in res["paths"] if p["path"] == "h2hm" and p.get("h2h")), None)
    if hm:
        n = max(len(v["rounds"]) for v in hm.values())
        lines += ["", "## Two-hop mTLS head to head (interleaved)", "",
                  f"The outrider mesh (A explicit → mTLS → B inbound), the nginx chain and the HAProxy chain "
                  f"running at once and taking turns with the 1 KiB keep-alive load, {n} rounds in rotating "
                  f"order; medians.", "",
                  "| chain | req/s (median) | rounds | p99 (median) | outrider req/s × | outrider p99 × |",
                  "|---|--:|---|--:|--:|--:|"]
        base = hm.get("outrider")
        for name, v in sorted(hm.items(), key=lambda kv: kv[0] != "outrider"):
            rr = ", ".join(fnum(r["rps"]) for r in v["rounds"])
            peer = name != "outrider"
            x = base and peer and v["rps_median"] and fnum(base["rps_median"] / v["rps_median"], 2) or "–"
            y = base and peer and v["p99_median_us"] and fnum(base["p99_median_us"] / v["p99_median_us"], 2) or "–"
            lines.append(f"| {name} | {fnum(v['rps_median'])} | {rr} | {fus(v['p99_median_us'])} | {x} | {y} |")
    hc = next((p.get("h2h") for p in res["paths"] if p["path"] == "h2hc" and p.get("h2h")), None)
    if hc:
        n = max(len(v["rounds"]) for v in hc.values())
        lines += ["", "## Cache hits head to head (interleaved)", "",
                  f"outrider, squid and nginx `proxy_cache` running at once and taking turns with /c/1k hits "
                  f"over 64 keep-alive connections, {n} rounds in rotating order; medians.", "",
                  "| cache | req/s (median) | rounds | p99 (median) | outrider req/s × |", "|---|--:|---|--:|--:|"]
        base = hc.get("outrider")
        for name, v in sorted(hc.items(), key=lambda kv: kv[0] != "outrider"):
            rr = ", ".join(fnum(r["rps"]) for r in v["rounds"])
            x = base and name != "outrider" and v["rps_median"] and fnum(base["rps_median"] / v["rps_median"], 2) or "–"
            lines.append(f"| {name} | {fnum(v['rps_median'])} | {rr} | {fus(v['p99_median_us'])} | {x} |")
    ins = next((p.get("instr") for p in res["paths"] if p["path"] == "instr" and p.get("instr")), None)
    if ins:
        lines += ["", "## Instructions per request (callgrind)", "",
                  "User-space instructions each proxy executes per 1 KiB keep-alive request, counted by "
                  "valgrind's callgrind over 16 connections (nginx with one worker, HAProxy with one thread); "
                  "`-cache` rows are cache hits of /c/1k; `-newconn` rows send `Connection: close`, a new "
                  "connection per request; `outrider-explicit-named` asks for a name that the proxy resolves "
                  "through DNS (a stub server in a network namespace, TTL 300 s), `outrider-explicit-veth` for "
                  "the IP literal through the same proxy and veth. "
                  "Unlike req/s, this does not move with the machine's background load; it leaves out the "
                  "kernel's share (loopback TCP, about 70 % of each proxy's CPU here and much the same for all).", "",
                  "| proxy | instructions / request | requests counted | outrider’s count × this |", "|---|--:|--:|--:|"]
        order = ["outrider-inbound", "nginx", "haproxy", "outrider-inbound-newconn", "nginx-newconn",
                 "haproxy-newconn", "outrider-explicit", "outrider-explicit-veth", "outrider-explicit-named",
                 "outrider-cache", "nginx-cache"]
        bases = {"nginx-cache": "outrider-cache", "nginx-newconn": "outrider-inbound-newconn",
                 "haproxy-newconn": "outrider-inbound-newconn"}
        for name, v in sorted(ins.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            base = ins.get(bases.get(name, "outrider-inbound"))
            x = base and not name.startswith("outrider") and fnum(base["per_request"] / v["per_request"], 2) or "–"
            lines.append(f"| {name} | {fnum(v['per_request'])} | {fnum(v['requests'])} | {x} |")
    lines += ["", "## Targets", "", "| target | goal | value | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {t['value'] or '–'} | {met} |")
    lines += ["", "## Paths not measured, notes", ""]
    for p in res["paths"]:
        if p["status"] != "ok" or p.get("notes") or p["failures"] or p.get("limits"):
            bits = [p.get("reason") or "", p.get("notes") or ""] + p["failures"] + p.get("limits", [])
            lines.append(f"- **{p['label']}** ({p['status']}): " + "; ".join(b for b in bits if b))
    return "\n".join(lines) + "\n"


# --- SVG -------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def panel(y0, title, rows, series, fmt, width=920, label_w=310, bar_h=11, ref=None):
    """Grouped horizontal bars: rows = [(label, [value or None per series])]."""
    out = [f'<text x="10" y="{y0 + 16}" font-size="14" font-weight="bold">{esc(title)}</text>']
    lx = label_w + 10
    for i, s in enumerate(series):
        x = lx + i * 190
        out.append(f'<rect x="{x}" y="{y0 + 26}" width="10" height="10" fill="{COLORS[i]}"/>')
        out.append(f'<text x="{x + 14}" y="{y0 + 35}" font-size="11">{esc(s)}</text>')
    vals = [v for _, vs in rows for v in vs if v is not None]
    vmax = max(vals + ([ref] if ref else [])) if vals else 1
    vmax = vmax * 1.15 or 1
    plot_w = width - label_w - 70
    y = y0 + 46
    group_h = bar_h * len(series) + 8
    for label, vs in rows:
        weight = ' font-weight="bold"' if "outrider" in label else ""
        out.append(f'<text x="{label_w}" y="{y + group_h / 2}" font-size="11" text-anchor="end"{weight}>'
                   f'{esc(label)}</text>')
        for i, v in enumerate(vs):
            by = y + i * bar_h
            if v is None:
                out.append(f'<text x="{lx}" y="{by + bar_h - 2}" font-size="9" fill="#888">n/a</text>')
                continue
            w = max(1, v / vmax * plot_w)
            out.append(f'<rect x="{lx}" y="{by}" width="{w:.1f}" height="{bar_h - 1}" fill="{COLORS[i]}"/>')
            out.append(f'<text x="{lx + w + 4:.1f}" y="{by + bar_h - 2}" font-size="9">{esc(fmt(v))}</text>')
        y += group_h
    if ref:
        rx = lx + ref / vmax * plot_w
        out.append(f'<line x1="{rx:.1f}" y1="{y0 + 44}" x2="{rx:.1f}" y2="{y}" stroke="#444" stroke-dasharray="4,3"/>')
    return out, y + 14


def svg(res):
    ok = [p for p in res["paths"] if p["status"] in ("ok", "partial") and p["loads"]]
    width = 920
    parts = []
    y = 10
    rows = [(p["label"], [p["vs_direct"].get(l) for l, _ in THROUGHPUT]) for p in ok if p["vs_direct"]]
    if rows:
        el, y = panel(y, "req/s relative to direct (1.0 = wrk straight to the origin; higher is better)",
                      rows, [t for _, t in THROUGHPUT], lambda v: f"{v:.2f}×", ref=1.0)
        parts += el
    rows = []
    for p in ok:
        rt = p["loads"].get("rate_1k") or p["loads"].get("rate_c1k")
        if rt:
            rows.append((p["label"], [rt["latency_us"][k] / 1000 for k in ("p50", "p99", "p99_9")]))
    if rows:
        el, y = panel(y, f"latency at a fixed {res['params'].get('rate')} req/s, ms (lower is better)",
                      rows, ["p50", "p99", "p99.9"], lambda v: f"{v:.2f} ms")
        parts += el
    mem = [p for p in res["paths"] if p.get("memory")]
    levels = res["params"].get("idle_levels", "").split()
    if mem:
        rows = [(p["label"], [p["memory"].get("idle_kb", 0) / MB] +
                 [(p["memory"]["conns"].get(n) or {}).get("rss_kb", 0) / MB or None for n in levels])
                for p in mem]
        el, y = panel(y, "RSS, MB (lower is better)", rows,
                      ["idle"] + [f"{int(n):,} idle connections" for n in levels], lambda v: f"{v:.1f} MB")
        parts += el
    foot = (f"Outrider bench {res['timestamp']} ({res['mode']}), {res['host']['cpus']} CPUs, loopback; "
            "see bench/results/latest.md")
    parts.append(f'<text x="10" y="{y + 4}" font-size="10" fill="#555">{esc(foot)}</text>')
    h = y + 14
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
            f'viewBox="0 0 {width} {h}" font-family="sans-serif">\n'
            f'<rect width="{width}" height="{h}" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw")
    ap.add_argument("--mode")
    ap.add_argument("--stamp")
    ap.add_argument("--dest")
    ap.add_argument("--base")
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--render", metavar="RESULT_JSON",
                    help="only re-render RESULT_JSON's Markdown and SVG next to it (stdout: Markdown)")
    args = ap.parse_args()
    if args.render:
        res = load_json(args.render)
        if res is None:
            sys.exit(f"report: cannot read {args.render}")
        stem = os.path.splitext(args.render)[0]
        with open(stem + ".md", "w") as f:
            f.write(markdown(res))
        with open(stem + ".svg", "w") as f:
            f.write(svg(res))
        print(markdown(res))
        return
    if not (args.raw and args.mode and args.stamp and args.dest and args.base):
        ap.error("--raw, --mode, --stamp, --dest and --base are required")
    paths = collect(args.raw)
    comps = ratios(paths)
    res = {"schema": 1, "timestamp": args.stamp, "mode": args.mode, "host": host_info(),
           "params": dict(kv.split("=", 1) for kv in args.param), "paths": paths,
           "comparisons": comps, "targets": targets(paths)}
    js = os.path.join(args.dest, args.base + ".json")
    with open(js, "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    prefix = "latest" if args.mode == "full" else args.base
    if args.mode == "full":
        shutil.copy(js, os.path.join(args.dest, "latest.json"))
    with open(os.path.join(args.dest, prefix + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.dest, prefix + ".svg"), "w") as f:
        f.write(svg(res))
    print(md)
    print(f"results: {js}, {os.path.join(args.dest, prefix + '.md')}, "
          f"{os.path.join(args.dest, prefix + '.svg')}", file=sys.stderr)


if __name__ == "__main__":
    main()
