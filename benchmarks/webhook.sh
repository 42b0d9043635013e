#!/usr/bin/env bash
# Webhook requests/s under wrk (4 connections, 127.0.0.1) on SQLite and, when
# PARITYBENCH_TEST_PG_URL is set, PostgreSQL: new deliveries (verify, record, enqueue),
# redeliveries (verify, found, nothing queued) and bad signatures (refused before any
# database work). Usage: bash benchmarks/webhook.sh [SECONDS]
# PB_PROFILE=debug measures the debug build (dependencies at opt-level 2, this crate not
# optimised) when a release build is not at hand.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
if [[ ${PB_PROFILE:-release} == debug ]]; then
  cargo build --example webhook_server >&2; bin=target/debug/examples/webhook_server
else
  cargo build --release --example webhook_server >&2; bin=target/release/examples/webhook_server
fi
tmp=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
export PARITYBENCH_GITHUB_SECRET=bench-secret
export PB_BODY=tests/data/github/pull_request_closed_merged.json
good=$(python3 -c 'import hmac,hashlib,sys;print("sha256="+hmac.new(b"bench-secret",open(sys.argv[1],"rb").read(),hashlib.sha256).hexdigest())' "$PB_BODY")
bad="sha256=$(printf '0%.0s' $(seq 64))"

run() { # backend url
  "$bin" "$2" 127.0.0.1:0 > "$tmp/server.out" &
  local pid=$!
  for _ in $(seq 100); do grep -q listening "$tmp/server.out" 2>/dev/null && break; sleep 0.05; done
  local url; url=$(sed -n 's/^listening on //p' "$tmp/server.out")/webhooks/github
  for case in new redelivery bad-signature; do
    case $case in
      new) export PB_SIG=$good PB_DELIVERY=unique ;;
      redelivery) export PB_SIG=$good PB_DELIVERY=fixed-delivery-id ;;
      bad-signature) export PB_SIG=$bad PB_DELIVERY=unique ;;
    esac
    local out; out=$(wrk -t2 -c4 -d"${secs}s" --latency -s benchmarks/webhook.lua "$url")
    printf '%-10s %-14s %10s req/s  p50 %8s  p99 %8s\n' "$1" "$case" \
      "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
      "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")"
    grep -q "Non-2xx" <<<"$out" && [[ $case != bad-signature ]] && { echo "$out" >&2; exit 1; }
  done
  kill $pid; wait $pid 2>/dev/null || true
}

run sqlite "sqlite://$tmp/bench.sqlite"
if [[ -n "${PARITYBENCH_TEST_PG_URL:-}" ]]; then
  base=${PARITYBENCH_TEST_PG_URL%/*}
  psql "$PARITYBENCH_TEST_PG_URL" -qc 'DROP DATABASE IF EXISTS pb_webhook_bench WITH (FORCE)' -c 'CREATE DATABASE pb_webhook_bench' >/dev/null
  run postgres "$base/pb_webhook_bench"
fi
