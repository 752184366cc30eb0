#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: installs what the tests need
# (curl, iptables, iproute2, python3, tcpdump, python3-grpcio), builds once, smoke-runs the
# benchmark harness, then runs every test.
# Network-namespace and iptables tests need root; as non-root they fail loudly, never pass.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for bin in curl:curl iptables:iptables ip:iproute2 python3:python3 setpriv:util-linux tcpdump:tcpdump; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || need+=("${bin##*:}")
done
# tests/grpc.rs: a real gRPC app and caller (gRPC's C core), for the system python3.
/usr/bin/python3 -c 'import grpc' >/dev/null 2>&1 || need+=(python3-grpcio)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# ip_tables/nat modules and the iptables-legacy/nft alternatives are used by the namespace tests.
modprobe iptable_nat 2>/dev/null || true

echo "== fmt and clippy"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== build"
cargo build --all-targets --quiet

# Before the tests, so that the test runner's summary is the last thing printed.
echo "== bench smoke: every benchmark path for about a second, on the debug build"
OUTRIDER_BIN="$PWD/target/debug/outrider" BENCH_REQUIRE_OUTRIDER=1 bench/run.sh --smoke

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast --test-threads 4
else
  cargo test --no-fail-fast -- --test-threads 4
fi

