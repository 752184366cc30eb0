#!/usr/bin/env bash
# Runs Outrider on its embedded default config next to a demo origin, and shows one request
# allowed and one denied through it. Needs only the Rust toolchain (curl is installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v curl >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq curl >/dev/null
fi
cargo build --release --quiet --bin outrider --example origin
target/release/examples/origin 127.0.0.1:8080 2>/dev/null & origin=$!
target/release/outrider run 2>/dev/null & proxy=$!
trap 'kill $origin $proxy 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -fs http://127.0.0.1:15000/ready >/dev/null && break; sleep 0.1; done

echo "== allowed: demo.local:8080 is in the allowlist (and its 127.0.0.1 address by a CIDR rule)"
curl -sS -i -x http://127.0.0.1:15001 http://demo.local:8080/hello
echo
echo "== denied: example.com is not in the allowlist"
curl -sS -i -x http://127.0.0.1:15001 http://example.com/
