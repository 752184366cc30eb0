#!/usr/bin/env bash
# Outrider benchmark harness: outrider and its peers (squid, tinyproxy, nginx,
# haproxy) side by side on loopback in one run, reported as ratios.
#
#   bench/run.sh            full run (~17 minutes): bench/results/<timestamp>.json,
#                           latest.json, latest.md, latest.svg
#   bench/run.sh --smoke    every available path for about a second with tiny loads;
#                           exits non-zero if a step fails (what CI runs)
#
# Environment: OUTRIDER_BIN (skip the cargo build and use this binary; the report
# records the commit its `--version` names, or OUTRIDER_COMMIT), OPENLOOP_BIN (the same for the
# fixed-rate load generator, bench/tools/openloop.rs),
# BENCH_DURATION (seconds per load in a full run, default 8), BENCH_ONLY (regex
# of path names to run; the report then goes to bench/results/tmp/partial-<timestamp>.*),
# BENCH_IDLE (idle-connection levels, default "1000 10000"),
# BENCH_H2H_ROUNDS (rounds of the head-to-head comparisons, default 3;
# BENCH_H2H_RATE_ROUNDS for their fixed-rate rounds, default 6 of half the duration),
# BENCH_KEEP=1 (keep the scratch directory with logs), BENCH_PERF=1 (profile
# outrider with perf during its 1 KiB keep-alive loads: report and flame graph),
# BENCH_REQUIRE_OUTRIDER=1 (fail instead of skipping outrider's paths when the
# binary is missing or does not come up). See bench/README.md.
set -euo pipefail

MODE=full
case "${1:-}" in
    --smoke) MODE=smoke ;;
    "") ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
TOOLS=$BENCH_DIR/tools
PEERS=$BENCH_DIR/peers
LUA=$BENCH_DIR/lua/bench.lua
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
ONLY=${BENCH_ONLY:-.}

if [[ $MODE == smoke ]]; then
    DUR=1 WARMUP=0 THREADS=1 CONNS=4 CLOSE_CONNS=2 BIG_CONNS=2
    RATE=100 RATE_DUR=1 RATE_CONNS=4 IDLE_NS=(20) H2_CONNS=2 H2_STREAMS=2
else
    DUR=${BENCH_DURATION:-8} WARMUP=2 THREADS=2 CONNS=64 CLOSE_CONNS=64 BIG_CONNS=16
    RATE=2000 RATE_DUR=${BENCH_DURATION:-8} RATE_CONNS=64 IDLE_NS=(1000 10000)
    H2_CONNS=16 H2_STREAMS=10
fi
if [[ -n ${BENCH_IDLE:-} ]]; then
    read -r -a IDLE_NS <<<"$BENCH_IDLE"
fi

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- dependencies -----------------------------------------------------------------
install_deps() {
    local missing=() cmd pkg
    for pair in nginx:nginx haproxy:haproxy squid:squid tinyproxy:tinyproxy wrk:wrk \
        h2load:nghttp2-client openssl:openssl curl:curl python3:python3 valgrind:valgrind; do
        cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null 2>&1 ||
            missing+=("$pkg")
    done
    export PATH=$PATH:/usr/sbin
    if ((${#missing[@]})); then
        log "installing from Debian: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
    fi
}
install_deps

# More descriptors for 10,000 idle connections (client, proxy and origin each hold
# one or two per connection); children inherit the limit.
if ! ulimit -n 200000 2>/dev/null; then
    ulimit -n "$(ulimit -Hn)"
fi
NOFILE=$(ulimit -n)
# HAProxy refuses to start when 2 x maxconn does not fit the descriptor limit.
HAPROXY_MAXCONN=$(((NOFILE - 500) / 2))
if [[ $MODE == full ]] && ((NOFILE < 25000)); then
    log "ulimit -n is $NOFILE (hard limit): a proxy holding two descriptors per connection tops out near $((NOFILE / 2)) idle connections"
fi

# --- scratch space, process bookkeeping --------------------------------------------
RUN=$(mktemp -d /tmp/outrider-bench.XXXXXX)
chmod 755 "$RUN"
mkdir -p "$RUN"/{conf,logs,out,tmp,www/c,pki,cwd}
chmod 777 "$RUN/logs"
OUT=$RUN/out
PIDS=()
FAILED=0
# Prepended to the load generators (the transparent paths run them in a netns).
CLIENT_PREFIX=()
NETNS=""

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 0.3
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ -n $NETNS ]]; then
        ip netns del "$NETNS" 2>/dev/null || true
        rm -rf "/etc/netns/$NETNS"
    fi
    if [[ ${BENCH_KEEP:-0} == 1 || $FAILED == 1 ]]; then
        log "scratch directory kept: $RUN"
    else
        rm -rf "$RUN"
    fi
}
trap cleanup EXIT

# free_ports N: N distinct ports that were free a moment ago, below the ephemeral
# range, so the load generators' own connections cannot take one first.
free_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
socks = []
while len(socks) < int(sys.argv[1]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(max(1024, lo - 12000), lo)))
    except OSError:
        s.close()
        continue
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r P_ORIGIN P_SQUID P_TINY P_NGINX P_HAPROXY P_NM1 P_NM2 P_HM1 P_HM2 P_SQC P_NGC \
    P_OF_ADM P_OF_OUT P_ON_ADM P_ON_OUT P_OI_ADM P_OI_OUT P_OI_IN P_T_ADM P_T_OUT P_T_SQ P_T_SQF \
    P_CA P_MA_ADM P_MA_OUT P_MB_ADM P_MB_OUT P_MB_IN \
    P_H2O P_H2_ADM P_H2_OUT P_H2_IN P_H2_HAP P_H2_NGX P_N_ADM P_N_OUT P_HAPH <<<"$(free_ports 37)"

# render TEMPLATE DEST KEY=VALUE...: replace @KEY@ (and @RUN@, @ORIGIN_PORT@).
render() {
    local src=$1 dst=$2 expr=(-e "s|@RUN@|$RUN|g" -e "s|@ORIGIN_PORT@|$P_ORIGIN|g") kv
    shift 2
    for kv in "$@"; do expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${expr[@]}" "$src" >"$dst"
}

# start NAME CMD...: start a server in the background; its pid goes to LAST_PID.
start() {
    local name=$1
    shift
    "$@" >"$RUN/logs/$name.out" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_http URL [SECONDS]: until URL answers (any status for a plain port check).
wait_http() {
    local url=$1 secs=${2:-10} i
    for ((i = 0; i < secs * 10; i++)); do
        if curl -s -o /dev/null --max-time 1 "$url"; then return 0; fi
        sleep 0.1
    done
    return 1
}

wait_ready() { # admin URL: until /ready says 200
    local url=$1 secs=${2:-15} i
    for ((i = 0; i < secs * 10; i++)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url/ready" || true) == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

stop() { # PID: TERM, then KILL after 3 s
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# manifest PATH key=value...: one JSON line describing a path, for the report.
manifest() {
    python3 - "$@" >>"$OUT/manifest.jsonl" <<'EOF'
import json, sys
rec = {"path": sys.argv[1]}
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    rec[k] = v
print(json.dumps(rec))
EOF
}

fail() { # PATH MESSAGE
    FAILED=1
    log "FAILED $1: $2"
    manifest "$1" event=failure reason="$2"
}

skip() { # PATH GROUP LABEL REASON
    log "skipped $1: $4"
    manifest "$1" group="$2" label="$3" status=skipped reason="$4"
}

want() { [[ $1 =~ $ONLY ]]; }

# --- loads ------------------------------------------------------------------------
# Each load runs under proctree.py, which records the servers' CPU and peak RSS.
# MODE forward: wrk connects to the proxy and sends absolute-form requests for
# FWD_TARGET (default: the origin).

# wrk_load PATH LOAD MODE ADDR URLPATH CONNS PIDS [wrk args...]
wrk_load() {
    local path=$1 load=$2 mode=$3 addr=$4 upath=$5 conns=$6 pids=$7 abs="" host="" pidargs=()
    shift 7
    if [[ $mode == forward ]]; then
        abs="http://${FWD_TARGET:-127.0.0.1:$P_ORIGIN}$upath" host="${FWD_TARGET:-127.0.0.1:$P_ORIGIN}"
    fi
    for p in $pids; do pidargs+=(--pid "$p"); done
    WRK_ABS_URL=$abs WRK_HOST=$host WRK_JSON=$OUT/$path.$load.wrk.json \
        python3 "$TOOLS/proctree.py" measure "${pidargs[@]}" --out "$OUT/$path.$load.proc.json" -- \
        "${CLIENT_PREFIX[@]}" wrk -t"$THREADS" -c"$conns" -d"${DUR}s" --timeout 5s --latency -s "$LUA" "$@" \
        "http://$addr$upath" >"$OUT/$path.$load.wrk.txt" 2>&1 || return 1
    READ_ERRORS_OK=${READ_ERRORS_OK:-0} python3 - "$OUT/$path.$load.wrk.json" <<'EOF' || return 1
import json, os, sys
r = json.load(open(sys.argv[1]))
# A proxy that closes the connection after each response without saying so makes
# wrk count a read error per response; those requests still completed.
if os.environ["READ_ERRORS_OK"] == "1":
    r["errors"]["read"] = 0
bad = sum(r["errors"].values())
if r["requests"] == 0 or bad > 0.01 * r["requests"]:
    sys.exit(f"{r['requests']} requests, errors {r['errors']}")
EOF
}

rate_load() { # PATH LOAD MODE ADDR URLPATH PIDS
    local path=$1 load=$2 mode=$3 addr=$4 upath=$5 pids=$6 target=$5 host=$4 pidargs=()
    if [[ $mode == forward ]]; then
        target="http://${FWD_TARGET:-127.0.0.1:$P_ORIGIN}$upath" host="${FWD_TARGET:-127.0.0.1:$P_ORIGIN}"
    fi
    for p in $pids; do pidargs+=(--pid "$p"); done
    python3 "$TOOLS/proctree.py" measure "${pidargs[@]}" --out "$OUT/$path.$load.proc.json" -- \
        "${CLIENT_PREFIX[@]}" "$OPENLOOP" --connect "$addr" --path "$target" --host "$host" \
        --rate "$RATE" --duration "$RATE_DUR" --connections "$RATE_CONNS" \
        --out "$OUT/$path.$load.rate.json" >"$OUT/$path.$load.txt" 2>&1
}

# cache_hit MODE ADDR: fill the cache with /c/1k, hide the origin's file, and
# check that the proxy still answers 200 (a hit), then put the file back.
cache_hit() {
    local mode=$1 addr=$2 args=() code
    if [[ $mode == forward ]]; then
        args=(-x "http://$addr" "http://127.0.0.1:$P_ORIGIN/c/1k")
    else
        args=("http://$addr/c/1k")
    fi
    curl -s -o /dev/null --max-time 2 "${args[@]}" || true
    curl -s -o /dev/null --max-time 2 "${args[@]}" || true
    mv "$RUN/www/c/1k" "$RUN/www/c/1k.away"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "${args[@]}" || true)
    mv "$RUN/www/c/1k.away" "$RUN/www/c/1k"
    [[ $code == 200 ]]
}

# run_loads PATH MODE ADDR PIDS LOADS...: LOADS from ka_1k close_1k ka_1m rate_1k;
# the cache paths use ka_c1k / rate_c1k (cacheable /c/1k).
run_loads() {
    local path=$1 mode=$2 addr=$3 pids=$4 load
    shift 4
    if [[ " $* " == *_c1k* ]] && ! cache_hit "$mode" "$addr"; then
        fail "$path" "not a cache hit: /c/1k was not served with the origin's copy removed"
        return 0
    fi
    if ((WARMUP > 0)); then
        local udir=/1k
        [[ " $* " == *_c1k* ]] && udir=/c/1k
        DUR=$WARMUP wrk_load "$path" warmup "$mode" "$addr" "$udir" "$CONNS" "$pids" || true
        rm -f "$OUT/$path.warmup."*
    fi
    for load in "$@"; do
        log "  $path $load"
        local perf_pid=""
        if [[ ${BENCH_PERF:-0} == 1 && $path == *outrider* && $load == ka_1k ]] && command -v perf >/dev/null; then
            # shellcheck disable=SC2086 # pids is a list
            # DWARF unwinding: the release build keeps no frame pointers, and async stacks
            # are deep; 8 KiB of stack per sample reaches through hyper to the proxy.
            perf record -q -F 299 --call-graph dwarf,8192 -p "$(echo $pids | tr ' ' ',')" \
                -o "$RUN/out/$path.perf.data" -- sleep "$DUR" >/dev/null 2>&1 &
            perf_pid=$!
        fi
        case $load in
            ka_1k) wrk_load "$path" "$load" "$mode" "$addr" /1k "$CONNS" "$pids" ;;
            close_1k) wrk_load "$path" "$load" "$mode" "$addr" /1k "$CLOSE_CONNS" "$pids" -H "Connection: close" ;;
            ka_1m) wrk_load "$path" "$load" "$mode" "$addr" /1m "$BIG_CONNS" "$pids" ;;
            rate_1k) rate_load "$path" "$load" "$mode" "$addr" /1k "$pids" ;;
            ka_c1k) wrk_load "$path" "$load" "$mode" "$addr" /c/1k "$CONNS" "$pids" ;;
            rate_c1k) rate_load "$path" "$load" "$mode" "$addr" /c/1k "$pids" ;;
        esac || fail "$path" "load $load failed (see $OUT/$path.$load.*)"
        if [[ -n $perf_pid ]]; then
            wait "$perf_pid" || true
            mkdir -p "$BENCH_DIR/results/tmp"
            perf report -i "$RUN/out/$path.perf.data" --stdio --no-children --percent-limit 0.5 \
                -g none --sort dso,sym >"$BENCH_DIR/results/tmp/perf-$STAMP-$path.txt" 2>/dev/null || true
            perf script -i "$RUN/out/$path.perf.data" 2>/dev/null |
                python3 "$TOOLS/flamegraph.py" --title "$path, 1 KiB keep-alive ($STAMP)" \
                    --folded "$BENCH_DIR/results/tmp/flame-$STAMP-$path.folded" \
                    >"$BENCH_DIR/results/tmp/flame-$STAMP-$path.svg" || true
            log "  profile: bench/results/tmp/perf-$STAMP-$path.txt, flame-$STAMP-$path.svg"
        fi
    done
}

# idle_mem PATH MODE ADDR PID: RSS at rest, then holding N idle keep-alive connections.
idle_mem() {
    local path=$1 mode=$2 addr=$3 pid=$4 n target=/1k host=$3
    if [[ $mode == forward ]]; then
        target="http://127.0.0.1:$P_ORIGIN/1k" host="127.0.0.1:$P_ORIGIN"
    fi
    sleep 1
    echo "{\"idle_kb\": $(python3 "$TOOLS/proctree.py" rss --pid "$pid")}" >"$OUT/$path.idle.json"
    for n in "${IDLE_NS[@]}"; do
        if ((n + 500 > NOFILE)); then
            log "  $path: $n idle connections left out (ulimit -n $NOFILE)"
            continue
        fi
        log "  $path idle connections: $n"
        if ! python3 "$TOOLS/idleconns.py" --connect "$addr" --path "$target" --host "$host" \
            --n "$n" --pid "$pid" --out "$OUT/$path.conns$n.json" >"$OUT/$path.conns$n.txt" 2>&1; then
            if ((n * 2 + 500 > NOFILE)); then
                # A proxy holds a client and an upstream descriptor per connection.
                manifest "$path" event=note reason="$n idle connections: not all held, the descriptor limit is $NOFILE (hard limit here)"
            else
                fail "$path" "$n idle connections failed (see $OUT/$path.conns$n.txt)"
            fi
        fi
        sleep 1
    done
}

# --- origin -----------------------------------------------------------------------
head -c 1024 /dev/urandom >"$RUN/www/1k"
head -c 1048576 /dev/urandom >"$RUN/www/1m"
cp "$RUN/www/1k" "$RUN/www/1m" "$RUN/www/c/"
chmod -R a+rX "$RUN/www"
render "$PEERS/origin-nginx.conf" "$RUN/conf/origin.conf" NAME=origin LISTEN="127.0.0.1:$P_ORIGIN" \
    LISTEN_H2="127.0.0.1:$P_H2O"
start origin nginx -p "$RUN" -e "$RUN/logs/origin-error.log" -c "$RUN/conf/origin.conf"
ORIGIN_PID=$LAST_PID
wait_http "http://127.0.0.1:$P_ORIGIN/1k" || { FAILED=1; log "origin nginx did not start"; cat "$RUN/logs/origin.out" >&2; exit 1; }
log "mode $MODE; origin nginx on 127.0.0.1:$P_ORIGIN; scratch $RUN"

# --- fixed-rate load generator ----------------------------------------------------
# bench/tools/openloop.rs, a cargo example (OPENLOOP_BIN: use this binary instead).
OPENLOOP=${OPENLOOP_BIN:-}
if [[ -z $OPENLOOP ]]; then
    log "building the fixed-rate load generator (cargo build --release --example openloop)"
    if (cd "$ROOT" && cargo build --release --example openloop) >"$RUN/logs/cargo-openloop.out" 2>&1; then
        OPENLOOP=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/openloop
    else
        FAILED=1
        log "building bench/tools/openloop.rs failed:"
        tail -n 20 "$RUN/logs/cargo-openloop.out" >&2
        exit 1
    fi
fi
[[ -x $OPENLOOP ]] || { FAILED=1; log "no fixed-rate load generator at $OPENLOOP"; exit 1; }

# --- outrider binary --------------------------------------------------------------
OUTRIDER=""
OUTRIDER_WHY=""
# Which source the binary was built from, for the record (OUTRIDER_COMMIT overrides what
# the binary says).
OUTRIDER_COMMIT=${OUTRIDER_COMMIT:-unknown}
if [[ -n ${OUTRIDER_BIN:-} ]]; then
    if [[ -x $OUTRIDER_BIN ]]; then OUTRIDER=$OUTRIDER_BIN; else OUTRIDER_WHY="binary not found: OUTRIDER_BIN=$OUTRIDER_BIN"; fi
elif want outrider; then
    log "building outrider (cargo build --release)"
    if (cd "$ROOT" && cargo build --release) >"$RUN/logs/cargo.out" 2>&1; then
        target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
        OUTRIDER=$target_dir/release/outrider
        [[ -x $OUTRIDER ]] || { OUTRIDER=""; OUTRIDER_WHY="binary not found after build"; }
    else
        OUTRIDER_WHY="binary not found: cargo build --release failed (tail: $(tail -n 3 "$RUN/logs/cargo.out" | tr '\n' ' '))"
    fi
fi
# The binary names the commit it was built from (src/build.rs), `-dirty` when its sources
# differed from it.
if [[ -n $OUTRIDER && $OUTRIDER_COMMIT == unknown ]]; then
    OUTRIDER_COMMIT=$("$OUTRIDER" --version 2>/dev/null | sed -n 's/^outrider [^ ]* (\(.*\))$/\1/p' || true)
    OUTRIDER_COMMIT=${OUTRIDER_COMMIT:-unknown}
fi
if [[ -z $OUTRIDER && ${BENCH_REQUIRE_OUTRIDER:-0} == 1 ]]; then
    FAILED=1
    log "$OUTRIDER_WHY"
    exit 1
fi

# outrider_conf NAME ADMIN OUT IN LOG [cache]: LOG is a path or off; IN empty leaves
# the inbound section out (the forward paths do not need it); "cache" turns on the
# outbound cache (off by default), sized like squid's in the cache peer.
outrider_conf() {
    {
        echo "admin: { listen: 127.0.0.1:$2 }"
        echo "outbound:"
        echo "  listen: 127.0.0.1:$3"
        echo "  egress: { mode: enforce, allow: [ { cidr: 127.0.0.1/32, ports: [$P_ORIGIN] } ] }"
        if [[ ${6:-} == cache ]]; then
            echo "  cache: { enabled: true, max_bytes: 268435456, max_object_bytes: 2097152 }"
        fi
        if [[ -n $4 ]]; then
            echo "inbound: { listen: 127.0.0.1:$4, mtls: disabled, routes: [ { match: { path_prefix: / }, to: 127.0.0.1:$P_ORIGIN } ] }"
        fi
        echo "access_log: { output: \"$5\" }"  # quoted: a bare off is a YAML boolean
    } >"$RUN/conf/$1.yaml"
}

LOG_OFF=off
LOG_OFF_NOTE="access_log output: off"
outrider_conf fwd-log "$P_OF_ADM" "$P_OF_OUT" "" "$RUN/logs/outrider-access.log"
if [[ -n $OUTRIDER ]]; then
    outrider_conf probe-off "$P_ON_ADM" "$P_ON_OUT" "" off
    if ! "$OUTRIDER" check --config "$RUN/conf/probe-off.yaml" >"$RUN/logs/probe-off.out" 2>&1; then
        LOG_OFF=/dev/null
        LOG_OFF_NOTE="access_log output: /dev/null (the proxy does not accept \"off\")"
    fi
fi
outrider_conf fwd-nolog "$P_ON_ADM" "$P_ON_OUT" "" "$LOG_OFF"
outrider_conf inbound "$P_OI_ADM" "$P_OI_OUT" "$P_OI_IN" "$LOG_OFF"
outrider_conf cache "$P_ON_ADM" "$P_ON_OUT" "" "$LOG_OFF" cache

# start_outrider CONF ADMIN: start and wait for /ready; LAST_PID, or returns 1.
start_outrider() {
    local conf=$1 admin=$2
    # Run from a scratch cwd, so a relative file the proxy writes shows up there.
    # shellcheck disable=SC2016 # expanded by the inner shell
    start "outrider-$conf" bash -c 'cd "$1" && exec "$2" run --config "$3"' _ "$RUN/cwd" "$OUTRIDER" "$RUN/conf/$conf.yaml"
    if ! wait_ready "http://127.0.0.1:$admin"; then
        stop "$LAST_PID"
        return 1
    fi
}

# outrider_path PATH GROUP LABEL CONF ADMIN MODE ADDR NOTES: idle memory, then loads,
# each on a fresh process.
outrider_path() {
    local path=$1 group=$2 label=$3 conf=$4 admin=$5 mode=$6 addr=$7 notes=$8 mem=$9
    want "$path" || return 0
    if [[ -z $OUTRIDER ]]; then skip "$path" "$group" "$label" "$OUTRIDER_WHY"; return 0; fi
    log "path $path"
    if [[ $mem == mem ]]; then
        if ! start_outrider "$conf" "$admin"; then
            skip "$path" "$group" "$label" "outrider did not become ready with $conf.yaml (log: $(tail -n 2 "$RUN/logs/outrider-$conf.out" | tr '\n' ' '))"
            [[ ${BENCH_REQUIRE_OUTRIDER:-0} == 1 ]] && FAILED=1
            return 0
        fi
        idle_mem "$path" "$mode" "$addr" "$LAST_PID"
        stop "$LAST_PID"
    fi
    if ! start_outrider "$conf" "$admin"; then
        skip "$path" "$group" "$label" "outrider did not become ready with $conf.yaml (log: $(tail -n 2 "$RUN/logs/outrider-$conf.out" | tr '\n' ' '))"
        [[ ${BENCH_REQUIRE_OUTRIDER:-0} == 1 ]] && FAILED=1
        return 0
    fi
    local pid=$LAST_PID
    # The allowlist must really be enforced: a port it does not list is refused.
    if [[ $mode == forward ]]; then
        local code
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -x "http://$addr" "http://127.0.0.1:$P_SQUID/" || true)
        [[ $code == 403 ]] || notes="$notes; WARNING: request to a port off the allowlist got $code, not 403"
    fi
    run_loads "$path" "$mode" "$addr" "$pid" ka_1k close_1k ka_1m rate_1k
    stop "$pid"
    if [[ $conf == fwd-nolog && -e $RUN/cwd/off ]]; then
        notes="$notes; WARNING: output \"off\" was taken as a file name"
    fi
    manifest "$path" group="$group" label="$label" proxy=outrider status=ok notes="$notes"
}

# peer_path PATH GROUP LABEL PROXY MODE ADDR WAITURL NOTES LOADS -- CMD...
peer_path() {
    local path=$1 group=$2 label=$3 proxy=$4 mode=$5 addr=$6 waiturl=$7 notes=$8 loads=$9 mem=${10}
    shift 10
    [[ ${1:-} == -- ]] && shift
    want "$path" || return 0
    log "path $path"
    local round
    for round in mem load; do
        [[ $round == mem && $mem != mem ]] && continue
        start "$path-$round" "$@"
        local pid=$LAST_PID
        if ! wait_http "$waiturl" 15; then
            fail "$path" "$proxy did not start (log: $(tail -n 3 "$RUN/logs/$path-$round.out" | tr '\n' ' '))"
            stop "$pid"
            manifest "$path" group="$group" label="$label" proxy="$proxy" status=failed reason="did not start"
            return 0
        fi
        if [[ $round == mem ]]; then
            idle_mem "$path" "$mode" "$addr" "$pid"
        else
            # shellcheck disable=SC2086 # loads is a list
            run_loads "$path" "$mode" "$addr" "$pid" $loads
        fi
        stop "$pid"
    done
    manifest "$path" group="$group" label="$label" proxy="$proxy" status=ok notes="$notes"
}

# The loads every main path runs.
ALL_LOADS=(ka_1k close_1k ka_1m rate_1k)

# --- direct -----------------------------------------------------------------------
if want direct; then
    log "path direct"
    run_loads direct reverse "127.0.0.1:$P_ORIGIN" "$ORIGIN_PID" "${ALL_LOADS[@]}"
    manifest direct group=direct label="direct (wrk → nginx origin)" proxy=none status=ok \
        notes="CPU and RSS columns are the origin's own"
fi

# --- explicit forward proxy -------------------------------------------------------
outrider_path fwd-outrider forward "outrider (allowlist + access log)" fwd-log "$P_OF_ADM" forward \
    "127.0.0.1:$P_OF_OUT" "egress enforce; access log to a file" mem
outrider_path fwd-outrider-nolog forward "outrider (allowlist, log off)" fwd-nolog "$P_ON_ADM" forward \
    "127.0.0.1:$P_ON_OUT" "egress enforce; $LOG_OFF_NOTE" nomem

render "$PEERS/squid-forward.conf" "$RUN/conf/squid-forward.conf" PORT="$P_SQUID"
peer_path fwd-squid forward "squid" squid forward "127.0.0.1:$P_SQUID" "http://127.0.0.1:$P_SQUID/" \
    "no cache, access_log none, workers 1, dst+port allowlist" "${ALL_LOADS[*]}" mem -- \
    squid -N -f "$RUN/conf/squid-forward.conf"

render "$PEERS/tinyproxy.conf" "$RUN/conf/tinyproxy.conf" PORT="$P_TINY"
READ_ERRORS_OK=1 peer_path fwd-tinyproxy forward "tinyproxy" tinyproxy forward "127.0.0.1:$P_TINY" "http://127.0.0.1:$P_TINY/" \
    "LogLevel Critical; closes the client connection after each response, so its keep-alive loads reconnect every request" \
    "${ALL_LOADS[*]}" mem -- \
    tinyproxy -d -c "$RUN/conf/tinyproxy.conf"

# --- inbound reverse proxy --------------------------------------------------------
outrider_path in-outrider inbound "outrider inbound" inbound "$P_OI_ADM" reverse \
    "127.0.0.1:$P_OI_IN" "mtls disabled, one path_prefix route; $LOG_OFF_NOTE" mem

render "$PEERS/nginx-reverse.conf" "$RUN/conf/nginx-reverse.conf" PORT="$P_NGINX"
peer_path in-nginx inbound "nginx proxy_pass" nginx reverse "127.0.0.1:$P_NGINX" "http://127.0.0.1:$P_NGINX/1k" \
    "workers auto, upstream keepalive, access_log off" "${ALL_LOADS[*]}" mem -- \
    nginx -p "$RUN" -e "$RUN/logs/nginx-reverse-error.log" -c "$RUN/conf/nginx-reverse.conf"

render "$PEERS/haproxy-reverse.cfg" "$RUN/conf/haproxy-reverse.cfg" PORT="$P_HAPROXY" MAXCONN="$HAPROXY_MAXCONN"
peer_path in-haproxy inbound "haproxy" haproxy reverse "127.0.0.1:$P_HAPROXY" "http://127.0.0.1:$P_HAPROXY/1k" \
    "mode http, http-reuse always, threads = cores, no log" "${ALL_LOADS[*]}" mem -- \
    haproxy -db -f "$RUN/conf/haproxy-reverse.cfg"

# --- head to head: the proxies at once, taking turns ---------------------------------
# The paths above run one after another, and on a shared machine the background load
# moves between them (10-20 %). Here the origin alone (direct), outrider's explicit
# forward path (allowlist + access log), outrider inbound, nginx, HAProxy, and HAProxy
# adding the headers that outrider's inbound path adds (like for like) run side by
# side and take turns with the 1 KiB keep-alive load, round after round (the order
# rotating); the report takes each one's median. Output: h2h.<name>.<round>.wrk.json.
H2H_ROUNDS=${BENCH_H2H_ROUNDS:-3}
# h2h_rounds LOAD PREFIX URLPATH NAME:MODE:ADDR...: H2H_ROUNDS rounds of LOAD against each
# entry in turn, the order rotating. LOAD ka: the 1 KiB keep-alive load (wrk),
# PREFIX.<name>.<round>.wrk.json; LOAD rate: the fixed-rate load, PREFIX.<name>.<round>.rate.json.
h2h_rounds() {
    local load=$1 prefix=$2 upath=$3 round i entry name rest mode addr abs host target rounds=$H2H_ROUNDS
    shift 3
    local entries=("$@")
    [[ $load == rate ]] && rounds=$H2H_RATE_ROUNDS
    for ((round = 0; round < rounds; round++)); do
        for ((i = 0; i < ${#entries[@]}; i++)); do
            entry=${entries[$(((i + round) % ${#entries[@]}))]}
            name=${entry%%:*} rest=${entry#*:}
            mode=${rest%%:*} addr=${rest#*:} abs="" host=""
            if [[ $mode == forward ]]; then
                target=${H2H_FWD_TARGET:-127.0.0.1:$P_ORIGIN}
                abs="http://$target$upath" host="$target"
            fi
            if [[ $load == rate ]]; then
                "${CLIENT_PREFIX[@]}" "$OPENLOOP" --connect "$addr" --path "${abs:-$upath}" --host "${host:-$addr}" \
                    --rate "$RATE" --duration "$H2H_RATE_DUR" --connections "$RATE_CONNS" \
                    --out "$OUT/$prefix.$name.$round.rate.json" >"$OUT/$prefix.$name.$round.rate.txt" 2>&1 ||
                    fail "$prefix" "the fixed-rate load against $name failed in round $round (see $OUT/$prefix.$name.$round.rate.txt)"
                continue
            fi
            WRK_ABS_URL=$abs WRK_HOST=$host WRK_JSON=$OUT/$prefix.$name.$round.wrk.json \
                "${CLIENT_PREFIX[@]}" wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --timeout 5s --latency \
                -s "$LUA" "http://$addr$upath" >"$OUT/$prefix.$name.$round.wrk.txt" 2>&1 ||
                fail "$prefix" "wrk against $name failed in round $round (see $OUT/$prefix.$name.$round.wrk.txt)"
        done
    done
}
# The fixed-rate rounds are shorter and more: a round's p99 moves with the machine's
# background load by more than the proxies differ, and a median of six holds better
# than one of three (6 x 4 s, the same time as 3 x 8 s).
H2H_RATE_ROUNDS=${BENCH_H2H_RATE_ROUNDS:-6} H2H_RATE_DUR=$(((RATE_DUR + 1) / 2))
[[ $MODE == smoke ]] && H2H_ROUNDS=1 H2H_RATE_ROUNDS=1 H2H_RATE_DUR=$RATE_DUR
if want h2h && [[ -n $OUTRIDER ]]; then
    log "path h2h ($H2H_ROUNDS interleaved rounds)"
    h2h_pids=() h2h_ok=1
    start_outrider inbound "$P_OI_ADM" && h2h_pids+=("$LAST_PID") || h2h_ok=0
    start_outrider fwd-log "$P_OF_ADM" && h2h_pids+=("$LAST_PID") || h2h_ok=0
    start h2h-nginx nginx -p "$RUN" -e "$RUN/logs/nginx-reverse-error.log" -c "$RUN/conf/nginx-reverse.conf"
    h2h_pids+=("$LAST_PID")
    start h2h-haproxy haproxy -db -f "$RUN/conf/haproxy-reverse.cfg"
    h2h_pids+=("$LAST_PID")
    # Like for like: HAProxy adding the headers that Outrider's inbound path adds.
    render "$PEERS/haproxy-reverse-headers.cfg" "$RUN/conf/haproxy-headers.cfg" PORT="$P_HAPH" MAXCONN="$HAPROXY_MAXCONN"
    start h2h-haproxy-headers haproxy -db -f "$RUN/conf/haproxy-headers.cfg"
    h2h_pids+=("$LAST_PID")
    # name:mode:address (mode forward: absolute-form requests for the origin)
    h2h=("direct:reverse:127.0.0.1:$P_ORIGIN" "outrider-explicit:forward:127.0.0.1:$P_OF_OUT"
        "outrider-inbound:reverse:127.0.0.1:$P_OI_IN" "nginx:reverse:127.0.0.1:$P_NGINX"
        "haproxy:reverse:127.0.0.1:$P_HAPROXY" "haproxy-headers:reverse:127.0.0.1:$P_HAPH")
    if ((h2h_ok)) && wait_http "http://127.0.0.1:$P_NGINX/1k" 15 && wait_http "http://127.0.0.1:$P_HAPROXY/1k" 15 &&
        wait_http "http://127.0.0.1:$P_HAPH/1k" 15; then
        h2h_rounds ka h2h /1k "${h2h[@]}"
        # The same, at the fixed rate: the p99 comparison without the saturated queues.
        h2h_rounds rate h2h /1k "${h2h[@]}"
        manifest h2h group=h2h label="head to head" proxy=all status=ok rounds="$H2H_ROUNDS" \
            notes="direct, outrider explicit (allowlist + access log), outrider inbound, nginx proxy_pass, haproxy, and haproxy adding the headers outrider inbound adds (X-Forwarded-For, Forwarded, X-Request-Id, Via) running at once, taking turns, first with the 1 KiB keep-alive load ($H2H_ROUNDS rounds), then at $RATE req/s ($H2H_RATE_ROUNDS rounds of ${H2H_RATE_DUR}s); medians"
    else
        fail h2h "a proxy did not come up for the head-to-head rounds"
    fi
    for p in "${h2h_pids[@]}"; do stop "$p"; done
fi

# --- transparent outbound capture: netns + iptables REDIRECT -------------------------
# The client and the proxy live in a network namespace joined to this one by a
# veth pair; a second origin listens on the host end. In the namespace, iptables
# REDIRECTs the client's connections to the origin to the proxy's port, except
# the proxy's own (matched by uid), as outrider's sidecar install does.
setup_netns() {
    local sub=$((RANDOM % 250 + 1))
    NETNS=obench$$
    T_HOST=10.213.$sub.1 T_NS=10.213.$sub.2
    local vh=obh$$ vn=obn$$
    ip netns add "$NETNS" &&
        ip link add "$vh" type veth peer name "$vn" &&
        ip link set "$vn" netns "$NETNS" &&
        ip addr add "$T_HOST/30" dev "$vh" && ip link set "$vh" up &&
        ip netns exec "$NETNS" ip addr add "$T_NS/30" dev "$vn" &&
        ip netns exec "$NETNS" ip link set "$vn" up &&
        ip netns exec "$NETNS" ip link set lo up || return 1
    render "$PEERS/origin-nginx.conf" "$RUN/conf/origin-t.conf" NAME=origin-t LISTEN="$T_HOST:$P_ORIGIN" \
        LISTEN_H2="$T_HOST:$P_H2O"
    start origin-t nginx -p "$RUN" -e "$RUN/logs/origin-t-error.log" -c "$RUN/conf/origin-t.conf"
    ORIGIN_T_PID=$LAST_PID
    wait_http "http://$T_HOST:$P_ORIGIN/1k" || return 1
}

# redirect PORT UID: the namespace's only nat rule sends the origin's traffic,
# other than UID's, to PORT.
redirect() {
    ip netns exec "$NETNS" iptables -t nat -F OUTPUT
    ip netns exec "$NETNS" iptables -t nat -A OUTPUT -p tcp -d "$T_HOST" --dport "$P_ORIGIN" \
        -m owner ! --uid-owner "$2" -j REDIRECT --to-ports "$1"
}

transparent_paths() {
    if ! command -v iptables >/dev/null || [[ $(id -u) != 0 ]]; then
        skip transparent-outrider transparent "outrider transparent (netns + iptables REDIRECT)" \
            "needs root and iptables"
        return 0
    fi
    if ! setup_netns 2>"$RUN/logs/netns.out"; then
        fail transparent-direct "network namespace setup failed: $(tr '\n' ' ' <"$RUN/logs/netns.out")"
        return 0
    fi
    local addr=$T_HOST:$P_ORIGIN
    CLIENT_PREFIX=(ip netns exec "$NETNS")
    if want transparent-direct; then
        log "path transparent-direct"
        ip netns exec "$NETNS" iptables -t nat -F OUTPUT
        run_loads transparent-direct reverse "$addr" "$ORIGIN_T_PID" "${ALL_LOADS[@]}"
        manifest transparent-direct group=transparent label="direct over veth (wrk in netns → origin)" \
            proxy=none status=ok notes="baseline of the transparent paths; CPU and RSS are the origin's"
    fi
    if want transparent-outrider; then
        if [[ -z $OUTRIDER ]]; then
            skip transparent-outrider transparent "outrider transparent (netns + iptables REDIRECT)" "$OUTRIDER_WHY"
        else
            log "path transparent-outrider"
            cat >"$RUN/conf/transparent.yaml" <<EOF
admin: { listen: $T_NS:$P_T_ADM }
outbound:
  listen: 127.0.0.1:$P_T_OUT
  egress: { mode: enforce, allow: [ { cidr: $T_HOST/32, ports: [$P_ORIGIN] } ] }
access_log: { output: $RUN/logs/outrider-transparent-access.log }
EOF
            redirect "$P_T_OUT" 1337
            start outrider-transparent ip netns exec "$NETNS" setpriv --reuid 1337 --regid 1337 --clear-groups \
                "$OUTRIDER" run --config "$RUN/conf/transparent.yaml"
            local pid=$LAST_PID
            if wait_ready "http://$T_NS:$P_T_ADM" &&
                [[ $(ip netns exec "$NETNS" curl -s -o /dev/null -w '%{http_code}' "http://$addr/1k") == 200 ]]; then
                run_loads transparent-outrider reverse "$addr" "$pid" "${ALL_LOADS[@]}"
                manifest transparent-outrider group=transparent label="outrider transparent (netns + iptables REDIRECT)" \
                    proxy=outrider status=ok base=transparent-direct notes="uid 1337, egress enforce, access log to a file"
            else
                skip transparent-outrider transparent "outrider transparent (netns + iptables REDIRECT)" \
                    "outrider did not proxy a redirected connection (log: $(tail -n 2 "$RUN/logs/outrider-transparent.out" | tr '\n' ' '))"
            fi
            stop "$pid"
        fi
    fi
    if want transparent-squid; then
        log "path transparent-squid"
        render "$PEERS/squid-intercept.conf" "$RUN/conf/squid-intercept.conf" PORT="$P_T_SQ" FWD_PORT="$P_T_SQF" ORIGIN_IP="$T_HOST"
        redirect "$P_T_SQ" "$(id -u proxy)"
        start transparent-squid ip netns exec "$NETNS" squid -N -f "$RUN/conf/squid-intercept.conf"
        local pid=$LAST_PID ok=0 i
        # Until squid listens the redirected connection is refused: a 200 means it serves.
        for ((i = 0; i < 100; i++)); do
            if [[ $(ip netns exec "$NETNS" curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://$addr/1k") == 200 ]]; then
                ok=1
                break
            fi
            sleep 0.1
        done
        if ((ok)) && kill -0 "$pid" 2>/dev/null; then
            run_loads transparent-squid reverse "$addr" "$pid" "${ALL_LOADS[@]}"
            manifest transparent-squid group=transparent label="squid intercept (netns + iptables REDIRECT)" \
                proxy=squid status=ok base=transparent-direct notes="http_port intercept, no cache, access_log none"
        else
            fail transparent-squid "squid intercept did not come up (log: $RUN/logs/transparent-squid.out)"
        fi
        stop "$pid"
    fi
    ip netns exec "$NETNS" iptables -t nat -F OUTPUT
    CLIENT_PREFIX=()
}
if want transparent-direct || want transparent-outrider || want transparent-squid; then
    transparent_paths
fi

# --- two-hop mTLS: peers run now, outrider when its mesh mTLS lands ---------------
make_pki() {
    local d=$RUN/pki
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj "/CN=bench CA" -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
    local who
    for who in server client; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who.bench.local" \
            -keyout "$d/$who.key" -out "$d/$who.csr" 2>/dev/null
        printf 'subjectAltName=DNS:%s.bench.local,URI:spiffe://bench.local/ns/bench/sa/%s\n' "$who" "$who" >"$d/$who.ext"
        openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 1 -extfile "$d/$who.ext" -out "$d/$who.pem" 2>/dev/null
        cat "$d/$who.pem" "$d/$who.key" >"$d/$who.bundle"
    done
    chmod -R a+r "$d"
}

# chain_path PATH LABEL PROXY HOP1PORT NOTES HOP2CMD -- HOP1CMD: two servers, measured together.
chain_path() {
    local path=$1 label=$2 proxy=$3 port=$4 notes=$5 hop2cmd=$6
    shift 6
    [[ ${1:-} == -- ]] && shift
    want "$path" || return 0
    log "path $path"
    start "$path-hop2" bash -c "exec $hop2cmd"
    local pid2=$LAST_PID
    start "$path-hop1" "$@"
    local pid1=$LAST_PID
    if ! wait_http "http://127.0.0.1:$port/1k" 15 ||
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/1k") != 200 ]]; then
        fail "$path" "chain did not answer 200 (logs: $RUN/logs/$path-hop*.out)"
        manifest "$path" group=mtls label="$label" proxy="$proxy" status=failed reason="chain did not answer 200"
        stop "$pid1"; stop "$pid2"
        return 0
    fi
    run_loads "$path" reverse "127.0.0.1:$port" "$pid1 $pid2" ka_1k rate_1k
    stop "$pid1"; stop "$pid2"
    manifest "$path" group=mtls label="$label" proxy="$proxy" status=ok notes="$notes"
}

# identity_yaml WHO: the identity section of sidecar WHO, with its bootstrap token.
identity_yaml() {
    "$OUTRIDER" ca token --dir "$RUN/ca" --identity "ns/bench/sa/$1" --ttl 1h >"$RUN/conf/token-$1" || return 1
    printf 'identity:\n  id: spiffe://bench.local/ns/bench/sa/%s\n  ca_url: https://127.0.0.1:%s\n  ca_bundle: %s\n  token_file: %s\n' \
        "$1" "$P_CA" "$RUN/ca/root.pem" "$RUN/conf/token-$1"
}

# Two sidecars and their CA: wrk → A (explicit proxy) → mesh mTLS → B (inbound,
# strict) → origin. B refuses plaintext, so a 200 through A proves the mTLS hop.
# mesh_up starts them (MESH_PIDS: CA, B, A), or says why not in MESH_WHY; mesh_down
# stops them.
MESH_PIDS=() MESH_WHY=""
mesh_up() {
    MESH_PIDS=() MESH_WHY=""
    if [[ ! -f $RUN/ca/root.pem ]] &&
        ! "$OUTRIDER" ca init --trust-domain bench.local --out "$RUN/ca" >"$RUN/logs/ca-init.out" 2>&1; then
        MESH_WHY="outrider ca init failed: $(tail -n 2 "$RUN/logs/ca-init.out" | tr '\n' ' ')"
        return 1
    fi
    start ca-serve "$OUTRIDER" ca serve --dir "$RUN/ca" --listen "127.0.0.1:$P_CA"
    MESH_PIDS+=("$LAST_PID")
    local id_a id_b
    if ! id_a=$(identity_yaml a 2>"$RUN/logs/ca-token.out") || ! id_b=$(identity_yaml b 2>>"$RUN/logs/ca-token.out"); then
        MESH_WHY="outrider ca token failed: $(tail -n 2 "$RUN/logs/ca-token.out" | tr '\n' ' ')"
        return 1
    fi
    cat >"$RUN/conf/mesh-b.yaml" <<EOF
admin: { listen: 127.0.0.1:$P_MB_ADM }
outbound: { listen: 127.0.0.1:$P_MB_OUT }
inbound: { listen: 127.0.0.1:$P_MB_IN, mtls: strict, routes: [ { match: { path_prefix: / }, to: 127.0.0.1:$P_ORIGIN } ] }
$id_b
access_log: { output: "$LOG_OFF" }
EOF
    cat >"$RUN/conf/mesh-a.yaml" <<EOF
admin: { listen: 127.0.0.1:$P_MA_ADM }
outbound:
  listen: 127.0.0.1:$P_MA_OUT
  egress: { mode: enforce, allow: [ { cidr: 127.0.0.1/32, ports: [$P_MB_IN] } ] }
mesh: { networks: [127.0.0.1/32] }
$id_a
access_log: { output: "$LOG_OFF" }
EOF
    if ! start_outrider mesh-b "$P_MB_ADM"; then
        MESH_WHY="sidecar B did not become ready (log: $(tail -n 2 "$RUN/logs/outrider-mesh-b.out" | tr '\n' ' '))"
        return 1
    fi
    MESH_PIDS+=("$LAST_PID")
    if ! start_outrider mesh-a "$P_MA_ADM"; then
        MESH_WHY="sidecar A did not become ready (log: $(tail -n 2 "$RUN/logs/outrider-mesh-a.out" | tr '\n' ' '))"
        return 1
    fi
    MESH_PIDS+=("$LAST_PID")
    local via plain
    via=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -x "http://127.0.0.1:$P_MA_OUT" "http://127.0.0.1:$P_MB_IN/1k" || true)
    plain=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$P_MB_IN/1k" || true)
    if [[ $via != 200 ]]; then
        MESH_WHY="a request through A to B got $via, not 200"
        return 1
    elif [[ $plain == 200 ]]; then
        MESH_WHY="B (mtls: strict) answered plaintext with 200, so the hop is not proven to be mTLS"
        return 1
    fi
}
mesh_down() {
    local p
    for p in "${MESH_PIDS[@]}"; do stop "$p"; done
    MESH_PIDS=()
}

mtls_outrider() {
    local label="outrider → outrider (mesh mTLS)"
    if [[ -z $OUTRIDER ]]; then skip mtls-outrider mtls "$label" "$OUTRIDER_WHY"; return 0; fi
    log "path mtls-outrider"
    if mesh_up; then
        FWD_TARGET=127.0.0.1:$P_MB_IN run_loads mtls-outrider forward "127.0.0.1:$P_MA_OUT" "${MESH_PIDS[*]:1}" ka_1k rate_1k
        manifest mtls-outrider group=mtls label="$label" proxy=outrider status=ok \
            notes="A explicit proxy with mesh.networks, B inbound mtls strict; identities from outrider ca; CPU/RSS of both sidecars; $LOG_OFF_NOTE"
    else
        skip mtls-outrider mtls "$label" "$MESH_WHY"
    fi
    mesh_down
}

if want mtls-outrider || want mtls-nginx || want mtls-haproxy; then
    make_pki
    want mtls-outrider && mtls_outrider
    render "$PEERS/nginx-mtls-hop1.conf" "$RUN/conf/nginx-mtls-hop1.conf" PORT="$P_NM1" HOP2_PORT="$P_NM2"
    render "$PEERS/nginx-mtls-hop2.conf" "$RUN/conf/nginx-mtls-hop2.conf" PORT="$P_NM2"
    chain_path mtls-nginx "nginx → nginx (mTLS)" nginx "$P_NM1" "TLS 1.3, client certs, upstream keepalive; CPU/RSS of both hops" \
        "nginx -p $RUN -e $RUN/logs/nm2-error.log -c $RUN/conf/nginx-mtls-hop2.conf" -- \
        nginx -p "$RUN" -e "$RUN/logs/nm1-error.log" -c "$RUN/conf/nginx-mtls-hop1.conf"
    render "$PEERS/haproxy-mtls-hop1.cfg" "$RUN/conf/haproxy-mtls-hop1.cfg" PORT="$P_HM1" HOP2_PORT="$P_HM2" MAXCONN="$HAPROXY_MAXCONN"
    render "$PEERS/haproxy-mtls-hop2.cfg" "$RUN/conf/haproxy-mtls-hop2.cfg" PORT="$P_HM2" MAXCONN="$HAPROXY_MAXCONN"
    chain_path mtls-haproxy "haproxy → haproxy (mTLS)" haproxy "$P_HM1" "TLS 1.3, client certs, http-reuse always; CPU/RSS of both hops" \
        "haproxy -db -f $RUN/conf/haproxy-mtls-hop2.cfg" -- \
        haproxy -db -f "$RUN/conf/haproxy-mtls-hop1.cfg"
fi

# --- mesh head to head: the three mTLS chains at once, taking turns -----------------
# Measured one after another (above), the chains moved by up to 30 % between runs on this
# machine; as in h2h, they also run side by side here, taking turns; medians reported.
if want h2hm && [[ -n $OUTRIDER ]]; then
    log "path h2hm (mesh chains, $H2H_ROUNDS interleaved rounds)"
    [[ -f $RUN/pki/ca.pem ]] || make_pki
    render "$PEERS/nginx-mtls-hop1.conf" "$RUN/conf/nginx-mtls-hop1.conf" PORT="$P_NM1" HOP2_PORT="$P_NM2"
    render "$PEERS/nginx-mtls-hop2.conf" "$RUN/conf/nginx-mtls-hop2.conf" PORT="$P_NM2"
    render "$PEERS/haproxy-mtls-hop1.cfg" "$RUN/conf/haproxy-mtls-hop1.cfg" PORT="$P_HM1" HOP2_PORT="$P_HM2" MAXCONN="$HAPROXY_MAXCONN"
    render "$PEERS/haproxy-mtls-hop2.cfg" "$RUN/conf/haproxy-mtls-hop2.cfg" PORT="$P_HM2" MAXCONN="$HAPROXY_MAXCONN"
    h2h_pids=()
    for hop in 2 1; do
        start "h2hm-nginx-hop$hop" nginx -p "$RUN" -e "$RUN/logs/h2hm-nm$hop-error.log" -c "$RUN/conf/nginx-mtls-hop$hop.conf"
        h2h_pids+=("$LAST_PID")
        start "h2hm-haproxy-hop$hop" haproxy -db -f "$RUN/conf/haproxy-mtls-hop$hop.cfg"
        h2h_pids+=("$LAST_PID")
    done
    if ! mesh_up; then
        fail h2hm "the outrider mesh did not come up: $MESH_WHY"
    elif ! wait_http "http://127.0.0.1:$P_NM1/1k" 15 || ! wait_http "http://127.0.0.1:$P_HM1/1k" 15; then
        fail h2hm "an nginx or haproxy chain did not come up for the head-to-head rounds"
    else
        H2H_FWD_TARGET=127.0.0.1:$P_MB_IN h2h_rounds ka h2hm /1k "outrider:forward:127.0.0.1:$P_MA_OUT" \
            "nginx:reverse:127.0.0.1:$P_NM1" "haproxy:reverse:127.0.0.1:$P_HM1"
        manifest h2hm group=h2h label="mesh mTLS head to head" proxy=all status=ok rounds="$H2H_ROUNDS" \
            notes="the outrider, nginx and haproxy two-hop mTLS chains running at once, taking turns; medians of $H2H_ROUNDS rounds"
    fi
    mesh_down
    for p in "${h2h_pids[@]}"; do stop "$p"; done
fi

# --- cache hits: each proxy must serve /c/1k with the origin's copy removed -------
if want cache-outrider || want cache-squid || want cache-nginx; then
    if want cache-outrider; then
        if [[ -z $OUTRIDER ]]; then
            skip cache-outrider cache "outrider cache hits" "$OUTRIDER_WHY"
        elif ! start_outrider cache "$P_ON_ADM"; then
            skip cache-outrider cache "outrider cache hits" \
                "outrider did not become ready with cache.yaml (log: $(tail -n 2 "$RUN/logs/outrider-cache.out" | tr '\n' ' '))"
        else
            log "path cache-outrider"
            pid=$LAST_PID
            if cache_hit forward "127.0.0.1:$P_ON_OUT"; then
                run_loads cache-outrider forward "127.0.0.1:$P_ON_OUT" "$pid" ka_c1k rate_c1k
                manifest cache-outrider group=cache label="outrider cache hits" proxy=outrider status=ok \
                    notes="forward path, cache enabled (256 MiB), /c/1k with max-age=3600; $LOG_OFF_NOTE"
            else
                skip cache-outrider cache "outrider cache hits" \
                    "not measured yet: outrider did not serve /c/1k (max-age=3600) from cache with the origin's copy removed"
            fi
            stop "$pid"
        fi
    fi
    render "$PEERS/squid-cache.conf" "$RUN/conf/squid-cache.conf" PORT="$P_SQC"
    peer_path cache-squid cache "squid cache hits" squid forward "127.0.0.1:$P_SQC" "http://127.0.0.1:$P_SQC/" \
        "memory cache, /c/1k with max-age=3600" "ka_c1k rate_c1k" nomem -- \
        squid -N -f "$RUN/conf/squid-cache.conf"
    render "$PEERS/nginx-cache.conf" "$RUN/conf/nginx-cache.conf" PORT="$P_NGC"
    peer_path cache-nginx cache "nginx proxy_cache hits" nginx reverse "127.0.0.1:$P_NGC" "http://127.0.0.1:$P_NGC/c/1k" \
        "proxy_cache, /c/1k with max-age=3600" "ka_c1k rate_c1k" nomem -- \
        nginx -p "$RUN" -e "$RUN/logs/nginx-cache-error.log" -c "$RUN/conf/nginx-cache.conf"
fi

# --- cache hits head to head: the three caches at once, taking turns -------------------
# As h2h above, for cache hits of /c/1k; each cache must first pass the same check as its
# own path (fill it, hide the origin's copy, still get a 200), or it is left out.
if want h2hc && [[ -n $OUTRIDER ]]; then
    log "path h2hc (cache hits, $H2H_ROUNDS interleaved rounds)"
    h2h_pids=() h2hc=()
    render "$PEERS/squid-cache.conf" "$RUN/conf/squid-cache.conf" PORT="$P_SQC"
    render "$PEERS/nginx-cache.conf" "$RUN/conf/nginx-cache.conf" PORT="$P_NGC"
    if start_outrider cache "$P_ON_ADM"; then
        h2h_pids+=("$LAST_PID")
        cache_hit forward "127.0.0.1:$P_ON_OUT" && h2hc+=("outrider:forward:127.0.0.1:$P_ON_OUT")
    fi
    start h2hc-squid squid -N -f "$RUN/conf/squid-cache.conf"
    h2h_pids+=("$LAST_PID")
    start h2hc-nginx nginx -p "$RUN" -e "$RUN/logs/nginx-cache-error.log" -c "$RUN/conf/nginx-cache.conf"
    h2h_pids+=("$LAST_PID")
    wait_http "http://127.0.0.1:$P_SQC/" 15 && cache_hit forward "127.0.0.1:$P_SQC" &&
        h2hc+=("squid:forward:127.0.0.1:$P_SQC")
    wait_http "http://127.0.0.1:$P_NGC/c/1k" 15 && cache_hit reverse "127.0.0.1:$P_NGC" &&
        h2hc+=("nginx:reverse:127.0.0.1:$P_NGC")
    if ((${#h2hc[@]} == 3)); then
        h2h_rounds ka h2hc /c/1k "${h2hc[@]}"
        manifest h2hc group=h2h label="cache hits head to head" proxy=all status=ok rounds="$H2H_ROUNDS" \
            notes="outrider, squid and nginx caches running at once, taking turns on /c/1k hits; medians of $H2H_ROUNDS rounds"
    else
        fail h2hc "not every cache passed the hit check: ${h2hc[*]:-none}"
    fi
    for p in "${h2h_pids[@]}"; do stop "$p"; done
fi

# --- HTTP/2 end to end (gRPC's path): h2load → proxy → the origin's h2c port ------------
# The client speaks HTTP/2 with prior knowledge, H2_CONNS connections × H2_STREAMS streams,
# and each proxy speaks HTTP/2 to the origin: Outrider's inbound listener, HAProxy with
# `proto h2` on both sides, nginx with `grpc_pass` (its only HTTP/2 upstream). h2load's
# per-request log gives the latency percentiles. Output: <path>.h2_1k.wrk.json, in wrk's
# shape.

# h2_load PATH ADDR PIDS
h2_load() {
    local path=$1 addr=$2 pids=$3 pidargs=() p
    for p in $pids; do pidargs+=(--pid "$p"); done
    if ((WARMUP > 0)); then
        h2load -t "$THREADS" -c "$H2_CONNS" -m "$H2_STREAMS" -D "$WARMUP" "http://$addr/1k" >/dev/null 2>&1 || true
    fi
    python3 "$TOOLS/proctree.py" measure "${pidargs[@]}" --out "$OUT/$path.h2_1k.proc.json" -- \
        h2load -t "$THREADS" -c "$H2_CONNS" -m "$H2_STREAMS" -D "$DUR" --log-file="$OUT/$path.h2_1k.log" \
        "http://$addr/1k" >"$OUT/$path.h2_1k.txt" 2>&1 || return 1
    python3 - "$OUT/$path.h2_1k.txt" "$OUT/$path.h2_1k.log" >"$OUT/$path.h2_1k.wrk.json" <<'EOF' || return 1
import json, re, sys
text = open(sys.argv[1]).read()
secs = float(re.search(r"finished in ([0-9.]+)s", text).group(1))
m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
done, ok, failed, errored, timeout = (int(x) for x in m.groups())
# Not 2xx (the 2xx count also has the responses that came after the measured time).
m = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
status = sum(int(x) for x in m.groups())
nbytes = int(re.search(r"traffic: .*?\((\d+)\) total", text).group(1))
lat = sorted(int(l.split("\t")[2]) for l in open(sys.argv[2]) if l.count("\t") >= 2)
if not ok or not lat or failed + errored + status > 0.01 * done:
    sys.exit(f"h2load: {ok} of {done} succeeded, {failed} failed, {errored} errored, {status} not 2xx")
pct = lambda q: lat[min(len(lat) - 1, int(q / 100 * len(lat)))]
print(json.dumps({"requests": ok, "duration_us": int(secs * 1e6), "bytes": nbytes,
                  "errors": {"connect": 0, "read": errored, "write": failed, "status": status, "timeout": timeout},
                  "latency_us": {"mean": round(sum(lat) / len(lat), 1), "p50": pct(50), "p90": pct(90),
                                 "p99": pct(99), "p99_9": pct(99.9), "max": lat[-1]}}))
EOF
}

# wait_h2 URL [SECONDS]: until URL answers HTTP/2 with prior knowledge.
wait_h2() {
    local url=$1 secs=${2:-10} i
    for ((i = 0; i < secs * 10; i++)); do
        [[ $(curl -s --http2-prior-knowledge -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

# h2_peer PATH LABEL PROXY ADDR NOTES -- CMD...
h2_peer() {
    local path=$1 label=$2 proxy=$3 addr=$4 notes=$5
    shift 5
    [[ ${1:-} == -- ]] && shift
    want "$path" || return 0
    log "path $path"
    start "$path" "$@"
    local pid=$LAST_PID
    if ! wait_h2 "http://$addr/1k" 15; then
        fail "$path" "$proxy did not answer HTTP/2 (log: $(tail -n 3 "$RUN/logs/$path.out" | tr '\n' ' '))"
        stop "$pid"
        manifest "$path" group=h2 label="$label" proxy="$proxy" status=failed reason="did not start"
        return 0
    fi
    log "  $path h2_1k"
    h2_load "$path" "$addr" "$pid" || fail "$path" "load h2_1k failed (see $OUT/$path.h2_1k.*)"
    stop "$pid"
    manifest "$path" group=h2 label="$label" proxy="$proxy" status=ok notes="$notes"
}

H2_NOTES="h2c prior knowledge, $H2_CONNS connections × $H2_STREAMS streams, HTTP/2 to the origin's h2c port"
if want h2-direct; then
    log "path h2-direct"
    log "  h2-direct h2_1k"
    if h2_load h2-direct "127.0.0.1:$P_H2O" "$ORIGIN_PID"; then
        manifest h2-direct group=h2 label="direct (h2load → nginx h2c)" proxy=none status=ok \
            notes="CPU and RSS columns are the origin's own"
    else
        fail h2-direct "load h2_1k failed (see $OUT/h2-direct.h2_1k.*)"
        manifest h2-direct group=h2 label="direct (h2load → nginx h2c)" proxy=none status=failed
    fi
fi
if want h2-outrider; then
    if [[ -z $OUTRIDER ]]; then
        skip h2-outrider h2 "outrider inbound, HTTP/2" "$OUTRIDER_WHY"
    else
        cat >"$RUN/conf/h2in.yaml" <<EOF
admin: { listen: 127.0.0.1:$P_H2_ADM }
outbound: { listen: 127.0.0.1:$P_H2_OUT }
inbound: { listen: 127.0.0.1:$P_H2_IN, mtls: disabled, routes: [ { match: { path_prefix: / }, to: 127.0.0.1:$P_H2O } ] }
access_log: { output: "$LOG_OFF" }
EOF
        h2_peer h2-outrider "outrider inbound, HTTP/2" outrider "127.0.0.1:$P_H2_IN" "$H2_NOTES; $LOG_OFF_NOTE" -- \
            "$OUTRIDER" run --config "$RUN/conf/h2in.yaml"
    fi
fi
render "$PEERS/haproxy-h2.cfg" "$RUN/conf/haproxy-h2.cfg" PORT="$P_H2_HAP" H2_ORIGIN="127.0.0.1:$P_H2O"
h2_peer h2-haproxy "haproxy, proto h2" haproxy "127.0.0.1:$P_H2_HAP" "$H2_NOTES" -- \
    haproxy -db -f "$RUN/conf/haproxy-h2.cfg"
render "$PEERS/nginx-h2.conf" "$RUN/conf/nginx-h2.conf" PORT="$P_H2_NGX" H2_ORIGIN="127.0.0.1:$P_H2O"
h2_peer h2-nginx "nginx grpc_pass" nginx "127.0.0.1:$P_H2_NGX" "$H2_NOTES" -- \
    nginx -p "$RUN" -e "$RUN/logs/nginx-h2-error.log" -c "$RUN/conf/nginx-h2.conf"

# --- instructions per request: callgrind, untouched by the machine's background load ----
# Requests per second on this shared machine move 5-10 % with whatever else it runs; the
# user-space instructions a proxy executes per request do not. (Kernel work, about 70 %
# of every proxy's CPU here and much the same for all of them, is not counted.) Each
# proxy runs under valgrind's callgrind, nginx with one worker and no master and HAProxy
# with one thread, so that one process does all the work; after a warm-up the counters
# are zeroed, the 1 KiB keep-alive load runs over 16 connections, and the instruction
# total is divided by the requests wrk completed. Output: instr.<name>.json. The
# `-newconn` runs send `Connection: close`: a new connection per request, whose extra
# count over the keep-alive one is each proxy's cost of a connection (accept, set-up,
# close).
if [[ $MODE == smoke ]]; then INSTR_WARM=1 INSTR_DUR=1; else INSTR_WARM=2 INSTR_DUR=6; fi
# instr_one NAME MODE ADDR WAITURL URLPATH -- CMD...; INSTR_HEADER: a header wrk adds;
# INSTR_ORIGIN: the forward target's host:port (default the origin on loopback);
# INSTR_PREFIX (an array): what valgrind runs under (`ip netns exec NS`).
INSTR_PREFIX=()
instr_one() {
    local name=$1 mode=$2 addr=$3 waiturl=$4 upath=$5 abs="" host="" pid cg
    local origin=${INSTR_ORIGIN:-127.0.0.1:$P_ORIGIN}
    local -a extra=()
    [[ -n ${INSTR_HEADER:-} ]] && extra=(-H "$INSTR_HEADER")
    cg=$RUN/out/instr.$name.cg
    shift 5
    [[ ${1:-} == -- ]] && shift
    log "  instr $name"
    start "instr-$name" "${INSTR_PREFIX[@]}" valgrind --tool=callgrind --callgrind-out-file="$cg" "$@"
    pid=$LAST_PID
    if ! wait_http "$waiturl" 90; then
        fail instr "$name did not come up under valgrind (log: $(tail -n 2 "$RUN/logs/instr-$name.out" | tr '\n' ' '))"
        stop "$pid"
        return 0
    fi
    if [[ $mode == forward ]]; then
        abs="http://$origin$upath" host="$origin"
    fi
    WRK_ABS_URL=$abs WRK_HOST=$host wrk -t1 -c16 -d"${INSTR_WARM}s" --timeout 5s -s "$LUA" "${extra[@]}" \
        "http://$addr$upath" >/dev/null 2>&1 || true
    # (squid is not measured: it drops root for its own user, and valgrind's vgdb could
    # not reach it to zero the counters.)
    if ! timeout 60 callgrind_control -z "$pid" >/dev/null 2>&1; then
        fail instr "$name: callgrind_control could not zero the counters"
        stop "$pid"
        return 0
    fi
    WRK_ABS_URL=$abs WRK_HOST=$host WRK_JSON=$OUT/instr.$name.wrk.json \
        wrk -t1 -c16 -d"${INSTR_DUR}s" --timeout 5s -s "$LUA" "${extra[@]}" "http://$addr$upath" >"$OUT/instr.$name.wrk.txt" 2>&1 ||
        fail instr "wrk against $name under valgrind failed (see $OUT/instr.$name.wrk.txt)"
    timeout 60 callgrind_control -d "$pid" >/dev/null 2>&1 || fail instr "$name: callgrind_control could not dump"
    stop "$pid"
    if ! python3 - "$cg.1" "$OUT/instr.$name.wrk.json" "$name" >"$OUT/instr.$name.json" <<'EOF'; then
import json, sys
total = None
for line in open(sys.argv[1]):
    if line.startswith(("summary:", "totals:")):
        total = int(line.split()[1])
        break
w = json.load(open(sys.argv[2]))
if not total or not w["requests"] or sum(w["errors"].values()) > 0.01 * w["requests"]:
    sys.exit(f"{sys.argv[3]}: no instruction total or too few good requests ({w['requests']}, errors {w['errors']})")
print(json.dumps({"instructions": total, "requests": w["requests"], "per_request": round(total / w["requests"])}))
EOF
        rm -f "$OUT/instr.$name.json"
        fail instr "$name: no instruction count (callgrind dump $cg.1)"
    fi
}
# instr_named: the explicit path to a name that the proxy resolves through DNS, as users'
# requests are, against the same proxy asked for the IP literal, both from the host to
# the proxy in the network namespace (whose resolv.conf names a stub DNS server there)
# and on to the origin on the host's end of the veth. Every other path asks for IP
# literals, which skip resolution.
instr_named() {
    if [[ $(id -u) != 0 ]] || ! command -v ip >/dev/null; then
        fail instr "outrider-explicit-named: needs root and ip (a network namespace with its own resolv.conf)"
        return 0
    fi
    if [[ -z $NETNS ]] && ! setup_netns 2>"$RUN/logs/netns.out"; then
        fail instr "outrider-explicit-named: network namespace setup failed: $(tr '\n' ' ' <"$RUN/logs/netns.out")"
        return 0
    fi
    mkdir -p "/etc/netns/$NETNS"
    echo "nameserver 127.0.0.1" >"/etc/netns/$NETNS/resolv.conf"
    printf '127.0.0.1 localhost\n::1 localhost\n' >"/etc/netns/$NETNS/hosts"
    start stubdns ip netns exec "$NETNS" python3 -u "$BENCH_DIR/tools/stubdns.py" "origin.bench=$T_HOST"
    local dns=$LAST_PID i
    for ((i = 0; i < 50; i++)); do
        grep -q ready "$RUN/logs/stubdns.out" 2>/dev/null && break
        sleep 0.1
    done
    cat >"$RUN/conf/named.yaml" <<EOF
admin: { listen: $T_NS:$P_N_ADM }
outbound:
  listen: $T_NS:$P_N_OUT
  egress:
    mode: enforce
    allow: [ { host: origin.bench, ports: [$P_ORIGIN] }, { cidr: $T_HOST/32, ports: [$P_ORIGIN] } ]
access_log: { output: $RUN/logs/outrider-named-access.log }
EOF
    INSTR_PREFIX=(ip netns exec "$NETNS")
    INSTR_ORIGIN="$T_HOST:$P_ORIGIN" instr_one outrider-explicit-veth forward "$T_NS:$P_N_OUT" \
        "http://$T_NS:$P_N_OUT/" /1k -- "$OUTRIDER" run --config "$RUN/conf/named.yaml"
    INSTR_ORIGIN="origin.bench:$P_ORIGIN" instr_one outrider-explicit-named forward "$T_NS:$P_N_OUT" \
        "http://$T_NS:$P_N_OUT/" /1k -- "$OUTRIDER" run --config "$RUN/conf/named.yaml"
    INSTR_PREFIX=()
    stop "$dns"
}
if want instr; then
    log "path instr (callgrind)"
    sed -e 's/^worker_processes auto;/worker_processes 1;\nmaster_process off;/' \
        "$RUN/conf/nginx-reverse.conf" >"$RUN/conf/nginx-instr.conf"
    sed -e 's/^global$/global\n    nbthread 1/' "$RUN/conf/haproxy-reverse.cfg" >"$RUN/conf/haproxy-instr.cfg"
    if [[ -n $OUTRIDER ]]; then
        instr_one outrider-inbound reverse "127.0.0.1:$P_OI_IN" "http://127.0.0.1:$P_OI_IN/1k" /1k -- \
            "$OUTRIDER" run --config "$RUN/conf/inbound.yaml"
    fi
    instr_one nginx reverse "127.0.0.1:$P_NGINX" "http://127.0.0.1:$P_NGINX/1k" /1k -- \
        nginx -p "$RUN" -e "$RUN/logs/nginx-instr-error.log" -c "$RUN/conf/nginx-instr.conf"
    if [[ $MODE == full ]]; then
        instr_one haproxy reverse "127.0.0.1:$P_HAPROXY" "http://127.0.0.1:$P_HAPROXY/1k" /1k -- \
            haproxy -db -f "$RUN/conf/haproxy-instr.cfg"
        if [[ -n $OUTRIDER ]]; then
            INSTR_HEADER="Connection: close" instr_one outrider-inbound-newconn reverse "127.0.0.1:$P_OI_IN" \
                "http://127.0.0.1:$P_OI_IN/1k" /1k -- "$OUTRIDER" run --config "$RUN/conf/inbound.yaml"
        fi
        INSTR_HEADER="Connection: close" instr_one nginx-newconn reverse "127.0.0.1:$P_NGINX" \
            "http://127.0.0.1:$P_NGINX/1k" /1k -- \
            nginx -p "$RUN" -e "$RUN/logs/nginx-instr-error.log" -c "$RUN/conf/nginx-instr.conf"
        INSTR_HEADER="Connection: close" instr_one haproxy-newconn reverse "127.0.0.1:$P_HAPROXY" \
            "http://127.0.0.1:$P_HAPROXY/1k" /1k -- haproxy -db -f "$RUN/conf/haproxy-instr.cfg"
        if [[ -n $OUTRIDER ]]; then
            instr_one outrider-explicit forward "127.0.0.1:$P_OF_OUT" "http://127.0.0.1:$P_OF_OUT/" /1k -- \
                "$OUTRIDER" run --config "$RUN/conf/fwd-log.yaml"
            # Cache hits: the warm-up fills the cache, so the counted requests are hits.
            instr_one outrider-cache forward "127.0.0.1:$P_ON_OUT" "http://127.0.0.1:$P_ON_OUT/" /c/1k -- \
                "$OUTRIDER" run --config "$RUN/conf/cache.yaml"
            instr_named
        fi
        render "$PEERS/nginx-cache.conf" "$RUN/conf/nginx-cache-instr.conf" PORT="$P_NGC"
        sed -i -e 's/^worker_processes auto;/worker_processes 1;\nmaster_process off;/' "$RUN/conf/nginx-cache-instr.conf"
        instr_one nginx-cache reverse "127.0.0.1:$P_NGC" "http://127.0.0.1:$P_NGC/c/1k" /c/1k -- \
            nginx -p "$RUN" -e "$RUN/logs/nginx-cache-instr-error.log" -c "$RUN/conf/nginx-cache-instr.conf"
    fi
    manifest instr group=instr label="user-space instructions per request (callgrind)" proxy=all status=ok \
        notes="1 KiB keep-alive, 16 connections, ${INSTR_DUR}s after a ${INSTR_WARM}s warm-up (-newconn: Connection: close); kernel work not counted"
fi

# --- report -----------------------------------------------------------------------
REPORT_MODE=$MODE
if [[ $MODE == smoke ]]; then
    DEST=$BENCH_DIR/results/tmp
    BASE=smoke-$STAMP
elif [[ $ONLY != . ]]; then
    # A partial run (BENCH_ONLY) is not the whole picture: its report goes beside the
    # committed results, never over latest.*.
    DEST=$BENCH_DIR/results/tmp
    BASE=partial-$STAMP
    REPORT_MODE=partial
else
    DEST=$BENCH_DIR/results
    BASE=$STAMP
fi
mkdir -p "$DEST"
python3 "$TOOLS/report.py" --raw "$OUT" --mode "$REPORT_MODE" --stamp "$STAMP" --dest "$DEST" --base "$BASE" \
    --param duration_s="$DUR" --param threads="$THREADS" --param conns="$CONNS" \
    --param close_conns="$CLOSE_CONNS" --param big_conns="$BIG_CONNS" --param rate="$RATE" \
    --param rate_duration_s="$RATE_DUR" --param rate_conns="$RATE_CONNS" \
    --param idle_levels="${IDLE_NS[*]}" --param nofile="$NOFILE" \
    --param h2_conns="$H2_CONNS" --param h2_streams="$H2_STREAMS" \
    --param outrider_bin="${OUTRIDER:-none}" --param outrider_commit="$OUTRIDER_COMMIT" || { FAILED=1; log "report failed"; }
if [[ $FAILED == 1 ]]; then
    log "some steps failed (see above)"
    exit 1
fi
log "done"
