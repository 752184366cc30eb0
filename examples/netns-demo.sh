#!/usr/bin/env bash
# Transparent capture, end to end, in two network namespaces (needs root; touches nothing on
# the host: every address and rule lives in the namespaces, which are deleted on exit).
#
#   "outside" 10.77.250.1                      "pod" 10.77.250.2
#   ┌────────────────────────────┐  veth      ┌──────────────────────────────────────────────┐
#   │ http.server :8000 (allowed) │◄─────────►│ app: python3 -m http.server 8080 (uid 1000)    │
#   │ http.server :9000 (denied)  │           │ outrider run --config examples/demo.yaml      │
#   │ curl → 10.77.250.2:8080     │           │   (uid 1337) + iptables/outrider-iptables.sh  │
#   └────────────────────────────┘           └──────────────────────────────────────────────┘
#
# Run:  sudo examples/netns-demo.sh        (OUTRIDER_BIN=path/to/outrider to pick the binary)
#
# It shows, with plain curl and no proxy settings:
#   1. the app calling 10.77.250.1:8000 (allowed by a CIDR rule): 200, the server's page;
#   2. the app calling 10.77.250.1:9000 (no rule allows port 9000): 403 with x-outrider-error;
#   3. the outside calling the app on 10.77.250.2:8080: captured to 15006, reaches the app;
#   4. the app sending a UDP datagram out (which no proxy could check): refused on the spot;
# then the sidecar's access log. Exits non-zero if any of the four is not what it should be.
set -euo pipefail
cd "$(dirname "$0")/.."

OUTRIDER_BIN=${OUTRIDER_BIN:-target/release/outrider}
CONFIG=examples/demo.yaml
OUTSIDE_IP=10.77.250.1
POD_IP=10.77.250.2
APP_UID=1000  # any uid but the proxy's 1337: its traffic is captured
POD=outrider-demo-pod-$$
OUTSIDE=outrider-demo-outside-$$
PYTHON=/usr/bin/python3 # not a pyenv shim: uid 1000 and 1337 must be able to run it

[[ $(id -u) == 0 ]] || { echo "netns-demo: needs root (network namespaces, iptables)" >&2; exit 1; }
if [[ ! -x $OUTRIDER_BIN ]]; then
    echo "netns-demo: $OUTRIDER_BIN not found; building it" >&2
    cargo build --release --bin outrider
fi
OUTRIDER_BIN=$(realpath "$OUTRIDER_BIN")
# The sidecar runs as uid 1337: a checkout under a private home directory would be invisible to it.
setpriv --reuid 1337 --regid 1337 --clear-groups -- test -x "$OUTRIDER_BIN" -a -r "$CONFIG" ||
    { echo "netns-demo: uid 1337 cannot run $OUTRIDER_BIN or read $CONFIG" >&2; exit 1; }

WORK=$(mktemp -d)
chmod 755 "$WORK"
cleanup() {
    # Processes first: a namespace with processes in it outlives `ip netns del`. Everything
    # running in these two namespaces was started by this script.
    local ns pids
    for ns in "$POD" "$OUTSIDE"; do
        mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
        if ((${#pids[@]})); then kill "${pids[@]}" 2>/dev/null || true; fi
    done
    wait 2>/dev/null || true
    ip netns del "$POD" 2>/dev/null || true
    ip netns del "$OUTSIDE" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

in_pod() { ip netns exec "$POD" "$@"; }
in_outside() { ip netns exec "$OUTSIDE" "$@"; }
# in_pod_as UID CMD...: run CMD in the pod as UID (and the same gid, no supplementary groups).
in_pod_as() {
    local uid=$1
    shift
    ip netns exec "$POD" setpriv --reuid "$uid" --regid "$uid" --clear-groups -- "$@"
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Waits until `curl URL` succeeds inside a namespace (max 10 s).
wait_http() {
    local ns=$1 url=$2
    for _ in $(seq 100); do
        ip netns exec "$ns" curl -fs -o /dev/null "$url" && return 0
        sleep 0.1
    done
    echo "netns-demo: $url did not come up in $ns" >&2
    return 1
}

# ---- the two namespaces and the wire between them --------------------------------------------
step "namespaces $POD ($POD_IP) and $OUTSIDE ($OUTSIDE_IP)"
ip netns add "$POD"
ip netns add "$OUTSIDE"
ip link add name eth0 netns "$POD" type veth peer name eth0 netns "$OUTSIDE"
for ns_ip in "$POD $POD_IP" "$OUTSIDE $OUTSIDE_IP"; do
    read -r ns ip <<<"$ns_ip"
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
done

# ---- outside: two HTTP servers ------------------------------------------------------------------
for port in 8000 9000; do
    mkdir -p "$WORK/outside-$port"
    echo "hello from the outside server on port $port" >"$WORK/outside-$port/index.html"
    in_outside "$PYTHON" -m http.server "$port" --bind "$OUTSIDE_IP" \
        --directory "$WORK/outside-$port" >/dev/null 2>&1 &
done

# ---- pod: the app, the capture rules, the sidecar -----------------------------------------------
mkdir -p "$WORK/app"
echo "hello from the app in the pod" >"$WORK/app/index.html"
in_pod_as "$APP_UID" "$PYTHON" -m http.server 8080 --directory "$WORK/app" >/dev/null 2>&1 &

step "iptables/outrider-iptables.sh apply --block-uncaptured (in the pod)"
in_pod iptables/outrider-iptables.sh apply --block-uncaptured
in_pod iptables -t nat -S | grep outrider
in_pod iptables -t filter -S | grep outrider

step "outrider run --config $CONFIG (as uid 1337, in the pod)"
in_pod_as 1337 "$OUTRIDER_BIN" run --config "$CONFIG" >"$WORK/outrider.log" 2>&1 &
# The admin port is never captured, so root can poll it from inside the pod.
wait_http "$POD" http://127.0.0.1:15000/ready || { cat "$WORK/outrider.log"; exit 1; }
wait_http "$OUTSIDE" "http://$OUTSIDE_IP:8000/"
wait_http "$OUTSIDE" "http://$OUTSIDE_IP:9000/"
echo "ready"

FAILED=0
# check WHAT RESPONSE PATTERN...: print RESPONSE and check that it matches every PATTERN.
check() {
    local what=$1 response=$2 pattern
    shift 2
    echo "$response"
    for pattern in "$@"; do
        if ! grep -qiE "$pattern" <<<"$response"; then
            echo "-> UNEXPECTED: $what (no line matches /$pattern/)"
            FAILED=1
            return 0
        fi
    done
    echo "-> OK: $what"
}

step "1. the app calls http://$OUTSIDE_IP:8000/ (allowed: cidr 10.77.250.0/24, port 8000)"
response=$(in_pod_as "$APP_UID" curl -sS -i --max-time 10 "http://$OUTSIDE_IP:8000/" 2>&1 || true)
check "allowed request passes" "$response" "^HTTP/[0-9.]+ 200" "hello from the outside server on port 8000"

step "2. the app calls http://$OUTSIDE_IP:9000/ (no rule allows port 9000)"
response=$(in_pod_as "$APP_UID" curl -sS -i --max-time 10 "http://$OUTSIDE_IP:9000/" 2>&1 || true)
check "denied request refused" "$response" "^HTTP/[0-9.]+ 403" "^x-outrider-error:"

step "3. the outside calls the app at http://$POD_IP:8080/ (captured to 15006)"
response=$(in_outside curl -sS -i --max-time 10 "http://$POD_IP:8080/" 2>&1 || true)
check "inbound request reaches the app" "$response" "^HTTP/[0-9.]+ 200" "hello from the app in the pod"

step "4. the app sends a UDP datagram to $OUTSIDE_IP:8000 (not TCP: the proxy never sees it)"
response=$(in_pod_as "$APP_UID" "$PYTHON" -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b'hello', ('$OUTSIDE_IP', 8000))
print('sent')" 2>&1 || true)
check "uncaptured traffic refused" "$response" "Operation not permitted"

step "the sidecar's log"
cat "$WORK/outrider.log"

if [[ $FAILED != 0 ]]; then
    step "some steps did not do what they should (see UNEXPECTED above)"
    exit 1
fi
step "all four behave as expected; cleaning up"
