#!/usr/bin/env bash
# outrider-iptables.sh: install, remove or print the nat rules that send a pod's TCP traffic
# through the Outrider sidecar, and with --block-uncaptured the filter rules that reject the
# rest of its outbound traffic. See iptables/README.md for every flag and example.
#
#   outrider-iptables.sh apply  [flags]   install (or refresh) the rules; safe to run again
#   outrider-iptables.sh remove [flags]   delete exactly the rules and chains that apply added
#   outrider-iptables.sh print  [flags]   print what apply would install; changes nothing
#
# Each family (IPv4, IPv6) is changed in one iptables-restore --noflush transaction, so a
# re-apply never leaves a window in which traffic bypasses the proxy, and a failed apply
# leaves the previous rules in place.
set -euo pipefail

readonly OUT_CHAIN=OUTRIDER_OUTPUT
readonly IN_CHAIN=OUTRIDER_INBOUND
readonly EGRESS_CHAIN=OUTRIDER_EGRESS
readonly TAG=(-m comment --comment outrider)

usage() {
    cat <<'EOF'
usage: outrider-iptables.sh apply|remove|print [flags]

flags (each has an environment variable; the flag wins):
  --proxy-uid UID                  OUTRIDER_PROXY_UID              default 1337
  --outbound-port PORT             OUTRIDER_OUTBOUND_PORT          default 15001
  --inbound-port PORT              OUTRIDER_INBOUND_PORT           default 15006
  --admin-port PORT                OUTRIDER_ADMIN_PORT             default 15000
  --exclude-outbound-ports LIST    OUTRIDER_EXCLUDE_OUTBOUND_PORTS e.g. 22,5432,8000:8100
  --exclude-inbound-ports LIST     OUTRIDER_EXCLUDE_INBOUND_PORTS  e.g. 22
  --exclude-outbound-cidrs LIST    OUTRIDER_EXCLUDE_OUTBOUND_CIDRS e.g. 169.254.169.254/32,fd00::/8
  --exclude-inbound-cidrs LIST     OUTRIDER_EXCLUDE_INBOUND_CIDRS  source CIDRs, e.g. 10.0.0.5/32
  --block-uncaptured               OUTRIDER_BLOCK_UNCAPTURED=1     reject outbound traffic not captured
                                                                   (UDP, ICMP, ...) but DNS
  --dns-servers auto|any|LIST      OUTRIDER_DNS_SERVERS            where DNS (UDP 53) may go with
                                                                   --block-uncaptured; default auto:
                                                                   resolv.conf's nameservers
  --allow-udp-ports LIST           OUTRIDER_ALLOW_UDP_PORTS        UDP ports open to any address with
                                                                   --block-uncaptured; default none
  --iptables-cmd CMD               OUTRIDER_IPTABLES               default iptables
  --ip6tables-cmd CMD              OUTRIDER_IP6TABLES              default derived from --iptables-cmd
  --no-ipv6                        OUTRIDER_NO_IPV6=1              leave IPv6 alone
  -h, --help
EOF
}

die() {
    echo "outrider-iptables: $*" >&2
    exit 2
}

# ---- configuration: environment first, then flags -------------------------------------------

PROXY_UID=${OUTRIDER_PROXY_UID:-1337}
OUTBOUND_PORT=${OUTRIDER_OUTBOUND_PORT:-15001}
INBOUND_PORT=${OUTRIDER_INBOUND_PORT:-15006}
ADMIN_PORT=${OUTRIDER_ADMIN_PORT:-15000}
EXCLUDE_OUTBOUND_PORTS=${OUTRIDER_EXCLUDE_OUTBOUND_PORTS:-}
EXCLUDE_INBOUND_PORTS=${OUTRIDER_EXCLUDE_INBOUND_PORTS:-}
EXCLUDE_OUTBOUND_CIDRS=${OUTRIDER_EXCLUDE_OUTBOUND_CIDRS:-}
EXCLUDE_INBOUND_CIDRS=${OUTRIDER_EXCLUDE_INBOUND_CIDRS:-}
IPTABLES=${OUTRIDER_IPTABLES:-iptables}
IP6TABLES=${OUTRIDER_IP6TABLES:-}
NO_IPV6=${OUTRIDER_NO_IPV6:-0}
BLOCK_UNCAPTURED=${OUTRIDER_BLOCK_UNCAPTURED:-0}
ALLOW_UDP_PORTS=${OUTRIDER_ALLOW_UDP_PORTS-}
DNS_SERVERS=${OUTRIDER_DNS_SERVERS-auto}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
ACTION=$1
shift
case $ACTION in
    apply | remove | print) ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown action '$ACTION' (expected apply, remove or print)" ;;
esac

while [[ $# -gt 0 ]]; do
    flag=$1
    value=
    # Accept both "--flag value" and "--flag=value".
    if [[ $flag == --*=* ]]; then
        value=${flag#*=}
        flag=${flag%%=*}
    elif [[ $flag != --no-ipv6 && $flag != --block-uncaptured && $flag != -h && $flag != --help ]]; then
        [[ $# -ge 2 ]] || die "$flag needs a value"
        value=$2
        shift
    fi
    case $flag in
        --proxy-uid) PROXY_UID=$value ;;
        --outbound-port) OUTBOUND_PORT=$value ;;
        --inbound-port) INBOUND_PORT=$value ;;
        --admin-port) ADMIN_PORT=$value ;;
        --exclude-outbound-ports) EXCLUDE_OUTBOUND_PORTS=$value ;;
        --exclude-inbound-ports) EXCLUDE_INBOUND_PORTS=$value ;;
        --exclude-outbound-cidrs) EXCLUDE_OUTBOUND_CIDRS=$value ;;
        --exclude-inbound-cidrs) EXCLUDE_INBOUND_CIDRS=$value ;;
        --iptables-cmd) IPTABLES=$value ;;
        --ip6tables-cmd) IP6TABLES=$value ;;
        --no-ipv6) NO_IPV6=1 ;;
        --block-uncaptured) BLOCK_UNCAPTURED=1 ;;
        --allow-udp-ports) ALLOW_UDP_PORTS=$value ;;
        --dns-servers) DNS_SERVERS=$value ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown flag '$flag' (see --help)" ;;
    esac
    shift
done

# ---- validation: a typo must fail here, not half-way through a ruleset ------------------------

is_port() { [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }

[[ $PROXY_UID =~ ^[0-9]+$ ]] || die "--proxy-uid: '$PROXY_UID' is not a numeric uid"
for pair in "outbound-port:$OUTBOUND_PORT" "inbound-port:$INBOUND_PORT" "admin-port:$ADMIN_PORT"; do
    is_port "${pair#*:}" || die "--${pair%%:*}: '${pair#*:}' is not a port (1-65535)"
done

# split_list NAME VALUE: print the comma list one item a line, without blanks.
split_list() {
    local item
    local -a items
    IFS=',' read -r -a items <<<"$2"
    for item in "${items[@]}"; do
        item=${item//[[:space:]]/}
        [[ -n $item ]] && printf '%s\n' "$item"
    done
    return 0
}

# Ports are single ports or iptables ranges "low:high".
check_ports() {
    local name=$1 port
    while read -r port; do
        if [[ $port == *:* ]]; then
            is_port "${port%%:*}" && is_port "${port#*:}" && ((10#${port%%:*} <= 10#${port#*:})) ||
                die "--$name: '$port' is not a port range (low:high)"
        else
            is_port "$port" || die "--$name: '$port' is not a port (1-65535)"
        fi
    done < <(split_list "$name" "$2")
}

check_cidrs() {
    local name=$1 cidr
    while read -r cidr; do
        [[ $cidr =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?$ || $cidr =~ ^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(/[0-9]{1,3})?$ ]] ||
            die "--$name: '$cidr' is not an IPv4 or IPv6 address or CIDR"
    done < <(split_list "$name" "$2")
}

check_ports exclude-outbound-ports "$EXCLUDE_OUTBOUND_PORTS"
check_ports exclude-inbound-ports "$EXCLUDE_INBOUND_PORTS"
check_cidrs exclude-outbound-cidrs "$EXCLUDE_OUTBOUND_CIDRS"
check_cidrs exclude-inbound-cidrs "$EXCLUDE_INBOUND_CIDRS"
check_ports allow-udp-ports "$ALLOW_UDP_PORTS"
# nameservers FILE: the resolv.conf file's nameservers, comma-separated (none if unreadable). A
# zone index (fe80::1%eth0) is dropped; iptables matches the address.
nameservers() {
    awk '$1 == "nameserver" { sub(/%.*/, "", $2); print $2 }' "$1" 2>/dev/null | paste -sd, - || true
}

# auto: the nameservers resolv.conf names (the pod's, in Kubernetes: every container of a pod
# sees the same file), read now, so that DNS can reach the resolver and nothing else: UDP 53 to
# any address is a way out that the allowlist cannot see (a tunnel over DNS to any server).
if [[ $DNS_SERVERS == auto ]]; then
    DNS_SERVERS=$(nameservers /etc/resolv.conf)
    # systemd-resolved's stub (a VM's usual resolv.conf) is on loopback, which is let through
    # anyway; the servers it forwards to are in its own file, and its queries to them must go
    # out too.
    if [[ ,$DNS_SERVERS, == *,127.0.0.53,* ]]; then
        upstream=$(nameservers /run/systemd/resolve/resolv.conf)
        DNS_SERVERS=$DNS_SERVERS${upstream:+,$upstream}
    fi
    if [[ $BLOCK_UNCAPTURED == 1 && -n $DNS_SERVERS ]] &&
        ! tr ',' '\n' <<<"$DNS_SERVERS" | grep -qvE '^(127\.|::1$)'; then
        echo "outrider-iptables: note: resolv.conf names only a local resolver ($DNS_SERVERS);" \
            "the queries it forwards to other servers are refused unless --dns-servers names them" >&2
    fi
fi
[[ $DNS_SERVERS == any ]] || check_cidrs dns-servers "$DNS_SERVERS"
[[ $BLOCK_UNCAPTURED == [01] ]] || die "OUTRIDER_BLOCK_UNCAPTURED: '$BLOCK_UNCAPTURED' is not 0 or 1"

# iptables-nft -> ip6tables-nft, /usr/sbin/iptables-legacy -> /usr/sbin/ip6tables-legacy.
if [[ -z $IP6TABLES ]]; then
    base=${IPTABLES##*/}
    dir=
    [[ $IPTABLES == */* ]] && dir=${IPTABLES%/*}/
    IP6TABLES=${dir}${base/#iptables/ip6tables}
fi

# ---- the ruleset --------------------------------------------------------------------------------

# ruleset FAMILY: print the chains and rules for "4" or "6" in iptables-restore syntax (without the
# table header, COMMIT, or the jumps from the built-in chains, which apply handles separately).
ruleset() {
    local family=$1

    # Outbound: every TCP connection a local process opens, unless it is the proxy's own.
    not_captured "$OUT_CHAIN" "$family"
    echo "-A $OUT_CHAIN -p tcp ${TAG[*]} -j REDIRECT --to-ports $OUTBOUND_PORT"

    # Inbound: every TCP connection arriving from another host.
    echo "-A $IN_CHAIN -i lo ${TAG[*]} -j RETURN"
    exclusions "$IN_CHAIN" "$family" "$EXCLUDE_INBOUND_PORTS" -s "$EXCLUDE_INBOUND_CIDRS"
    echo "-A $IN_CHAIN -p tcp ${TAG[*]} -j REDIRECT --to-ports $INBOUND_PORT"
}

# not_captured CHAIN FAMILY: RETURN rules for the outbound traffic left out of the capture: the
# proxy's own, loopback, the admin port, and the exclusions. The nat chain lets it go out
# uncaptured and the filter chain lets it go out at all, so both use the same list.
not_captured() {
    local chain=$1 family=$2 loopback
    if [[ $family == 4 ]]; then loopback=127.0.0.0/8; else loopback=::1/128; fi
    echo "-A $chain -m owner --uid-owner $PROXY_UID ${TAG[*]} -j RETURN"
    echo "-A $chain -o lo ${TAG[*]} -j RETURN"
    # In the filter chain this also covers the redirected connections: there the packet still
    # shows its first route's interface (the hook's output device is not updated by the nat
    # reroute), but its new destination, the proxy's listener.
    echo "-A $chain -d $loopback ${TAG[*]} -j RETURN"
    exclusions "$chain" "$family" "$EXCLUDE_OUTBOUND_PORTS" -d "$EXCLUDE_OUTBOUND_CIDRS"
}

# exclusions CHAIN FAMILY PORTS -s|-d CIDRS: RETURN rules for the admin port, the TCP ports in
# PORTS, and the CIDRs of FAMILY in CIDRS as sources (-s, inbound) or destinations (-d).
exclusions() {
    local chain=$1 family=$2 ports=$3 side=$4 cidrs=$5 item
    echo "-A $chain -p tcp -m tcp --dport $ADMIN_PORT ${TAG[*]} -j RETURN"
    while read -r item; do
        echo "-A $chain -p tcp -m tcp --dport $item ${TAG[*]} -j RETURN"
    done < <(split_list ports "$ports")
    while read -r item; do
        family_of "$item" "$family" && echo "-A $chain $side $item ${TAG[*]} -j RETURN"
    done < <(split_list cidrs "$cidrs")
    # The last CIDR may be of the other family: its failed test is not this function's status.
    return 0
}

# The jumps are inserted first so that no earlier rule can let traffic skip the proxy.
jump_rules() {
    echo "-I OUTPUT 1 -p tcp ${TAG[*]} -j $OUT_CHAIN"
    echo "-I PREROUTING 1 -p tcp ${TAG[*]} -j $IN_CHAIN"
}

# egress_ruleset FAMILY: the filter rules of --block-uncaptured. The nat rules send the workload's
# TCP through the proxy; everything else it sends (UDP such as QUIC, ICMP, other protocols) would
# reach any address the allowlist denies, so it is rejected here, at once rather than dropped, so
# that a QUIC client falls back to TCP, which is captured. What goes through: what the capture
# leaves out on purpose (not_captured, which includes every redirected connection), replies and
# ICMP errors of accepted connections (callers of an excluded inbound port), DNS, and for IPv6
# the ICMPv6 that neighbour discovery needs to work at all.
egress_ruleset() {
    local family=$1 item
    not_captured "$EGRESS_CHAIN" "$family"
    echo "-A $EGRESS_CHAIN -m conntrack --ctstate RELATED,ESTABLISHED ${TAG[*]} -j RETURN"
    if [[ $DNS_SERVERS == any ]]; then
        echo "-A $EGRESS_CHAIN -p udp -m udp --dport 53 ${TAG[*]} -j RETURN"
    else
        while read -r item; do
            family_of "$item" "$family" &&
                echo "-A $EGRESS_CHAIN -d $item -p udp -m udp --dport 53 ${TAG[*]} -j RETURN"
        done < <(split_list cidrs "$DNS_SERVERS")
    fi
    while read -r item; do
        echo "-A $EGRESS_CHAIN -p udp -m udp --dport $item ${TAG[*]} -j RETURN"
    done < <(split_list ports "$ALLOW_UDP_PORTS")
    if [[ $family == 6 ]]; then
        # Router and neighbour solicitation/advertisement, redirects, multicast listener reports:
        # without them no IPv6 packet, the proxy's included, finds its next hop.
        for item in 133 134 135 136 137 143; do
            echo "-A $EGRESS_CHAIN -p ipv6-icmp -m icmp6 --icmpv6-type $item ${TAG[*]} -j RETURN"
        done
    fi
    echo "-A $EGRESS_CHAIN -p tcp ${TAG[*]} -j REJECT --reject-with tcp-reset"
    echo "-A $EGRESS_CHAIN ${TAG[*]} -j REJECT"
}

egress_jump() {
    echo "-I OUTPUT 1 ${TAG[*]} -j $EGRESS_CHAIN"
}

# family_of ADDR FAMILY: true when ADDR belongs to the family ("6" when it has a colon).
family_of() {
    if [[ $1 == *:* ]]; then [[ $2 == 6 ]]; else [[ $2 == 4 ]]; fi
}

# ---- talking to iptables -----------------------------------------------------------------------

# existing_jumps CMD TABLE CHAIN TARGET: the rules in CHAIN that jump to TARGET, as "-A ..."
# lines. Listing a built-in chain only fails when iptables itself cannot work (not root, no such
# table), and then nothing may be changed, so that is fatal.
existing_jumps() {
    local rules
    rules=$("$1" -w -t "$2" -S "$3") || die "cannot list the $2 $3 chain with $1"
    grep -E -- "-j $4( |\$)" <<<"$rules" || true
}

# delete_jumps CMD: restore lines deleting every jump to our chains from OUTPUT and PREROUTING.
delete_jumps() {
    local jumps jump
    jumps=$(existing_jumps "$1" nat OUTPUT "$OUT_CHAIN")
    jumps+=$'\n'$(existing_jumps "$1" nat PREROUTING "$IN_CHAIN")
    print_deletes "$jumps"
}

print_deletes() {
    local jump
    while read -r jump; do
        [[ -n $jump ]] && echo "-D ${jump#-A }"
    done <<<"$1"
    return 0
}

# chain_exists CMD TABLE CHAIN
chain_exists() {
    "$1" -w -t "$2" -S "$3" >/dev/null 2>&1
}

# filter_part CMD FAMILY: the *filter transaction that makes OUTRIDER_EGRESS what the flags say:
# installed and filled with --block-uncaptured, gone without it (an apply that drops the flag
# must not leave the previous apply's rejections behind). Prints nothing when nothing is to do.
filter_part() {
    local cmd=$1 family=$2 deletes exists=0
    chain_exists "$cmd" filter "$EGRESS_CHAIN" && exists=1
    [[ $BLOCK_UNCAPTURED == 1 || $exists == 1 ]] || return 0
    deletes=$(print_deletes "$(existing_jumps "$cmd" filter OUTPUT "$EGRESS_CHAIN")")
    echo "*filter"
    [[ -n $deletes ]] && echo "$deletes"
    if [[ $BLOCK_UNCAPTURED == 1 ]]; then
        echo ":$EGRESS_CHAIN - [0:0]"
        egress_ruleset "$family"
        egress_jump
    else
        echo "-F $EGRESS_CHAIN"
        echo "-X $EGRESS_CHAIN"
    fi
    echo "COMMIT"
}

# restore CMD: feed stdin to CMD-restore in one transaction that leaves other rules alone.
restore() {
    "$1-restore" -w --noflush
}

apply_family() {
    local cmd=$1 family=$2 deletes
    deletes=$(delete_jumps "$cmd")
    {
        echo "*nat"
        # With --noflush, declaring a chain creates it, or empties it if it exists.
        echo ":$OUT_CHAIN - [0:0]"
        echo ":$IN_CHAIN - [0:0]"
        # Drop whatever jumps exist (one from a previous apply, or stale ones), then add one each.
        [[ -n $deletes ]] && echo "$deletes"
        ruleset "$family"
        jump_rules
        echo "COMMIT"
        filter_part "$cmd" "$family"
    } | restore "$cmd"
    if [[ $BLOCK_UNCAPTURED == 1 ]]; then
        echo "outrider-iptables: applied IPv$family rules with $cmd (uncaptured traffic rejected)" >&2
    else
        echo "outrider-iptables: applied IPv$family rules with $cmd" >&2
    fi
}

remove_family() {
    local cmd=$1 family=$2 chain body filter
    body=$(delete_jumps "$cmd")
    [[ -n $body ]] && body+=$'\n'
    for chain in "$OUT_CHAIN" "$IN_CHAIN"; do
        chain_exists "$cmd" nat "$chain" && body+="-F $chain"$'\n'"-X $chain"$'\n'
    done
    # Without the flag, filter_part removes the chain if an earlier apply installed it.
    filter=$(BLOCK_UNCAPTURED=0 filter_part "$cmd" "$family")
    if [[ -z $body && -z $filter ]]; then
        echo "outrider-iptables: no IPv$family rules to remove with $cmd" >&2
        return 0
    fi
    {
        [[ -n $body ]] && printf '*nat\n%sCOMMIT\n' "$body"
        [[ -n $filter ]] && echo "$filter"
        return 0
    } | restore "$cmd"
    echo "outrider-iptables: removed IPv$family rules with $cmd" >&2
}

print_family() {
    local cmd=$1 family=$2
    echo "# IPv$family ($cmd-restore --noflush)"
    echo "*nat"
    echo ":$OUT_CHAIN - [0:0]"
    echo ":$IN_CHAIN - [0:0]"
    ruleset "$family"
    jump_rules
    echo "COMMIT"
    if [[ $BLOCK_UNCAPTURED == 1 ]]; then
        echo "*filter"
        echo ":$EGRESS_CHAIN - [0:0]"
        egress_ruleset "$family"
        egress_jump
        echo "COMMIT"
    fi
}

# IPv6 is handled when its tools exist and the kernel has an IPv6 nat table; otherwise it is
# skipped with a note (IPV6_SKIPPED says why), because a host without IPv6 has no IPv6 traffic
# to capture.
IPV6_SKIPPED=
ipv6_usable() {
    [[ $NO_IPV6 == 1 ]] && return 1
    if ! command -v "$IP6TABLES" >/dev/null 2>&1 || ! command -v "$IP6TABLES-restore" >/dev/null 2>&1; then
        IPV6_SKIPPED="$IP6TABLES not found"
        return 1
    fi
    if [[ $ACTION != print ]] && ! "$IP6TABLES" -w -t nat -S OUTPUT >/dev/null 2>&1; then
        IPV6_SKIPPED="$IP6TABLES has no usable nat table"
        return 1
    fi
}

main() {
    local v6=1
    if [[ $ACTION != print ]]; then
        command -v "$IPTABLES" >/dev/null 2>&1 || die "$IPTABLES not found (set --iptables-cmd or OUTRIDER_IPTABLES)"
        command -v "$IPTABLES-restore" >/dev/null 2>&1 || die "$IPTABLES-restore not found next to $IPTABLES"
    fi
    ipv6_usable || v6=0
    if [[ -n $IPV6_SKIPPED ]]; then
        # Skipping IPv6 on a kernel that has it would let the workload's IPv6 traffic past both
        # the capture and the blocking: with --block-uncaptured that is refused before any change.
        if [[ $ACTION == apply && $BLOCK_UNCAPTURED == 1 && -e /proc/net/if_inet6 ]]; then
            die "--block-uncaptured: $IPV6_SKIPPED, so IPv6 traffic would go out unchecked; pass --no-ipv6 to leave IPv6 alone anyway"
        fi
        echo "outrider-iptables: $IPV6_SKIPPED; skipping IPv6 (use --no-ipv6 to silence)" >&2
    fi
    "${ACTION}_family" "$IPTABLES" 4
    if [[ $v6 == 1 ]]; then
        "${ACTION}_family" "$IP6TABLES" 6
    fi
}

main
