#!/usr/bin/env bash
# Dashboard latency under load (BENCHMARKS.md): `runner serve` on a seeded
# database, wrk with 4 connections on 127.0.0.1 against the overview, a trend and a run page.
#
#   scripts/bench-dashboard.sh RUNNER DB_URL [SECONDS]
#
# Seed the database first: `runner dev-seed --db DB_URL` (200 series × 500 commits).
set -euo pipefail
runner=${1:?runner binary}; db=${2:?database URL}; secs=${3:-15}
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 2; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$runner" serve --listen "127.0.0.1:$port" --db "$db" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
base="http://127.0.0.1:$port"
# a red series (its trend has failing points) and its latest run
read -r series run < <(curl -sf "$base/api/overview" | python3 -c '
import json, sys
o = json.load(sys.stdin)
s = next((x for x in o["series"] if x["state"] == "red"), o["series"][0])
print(s["series_id"], s["run_id"])')
echo "database: $db; series $series, run $run; wrk -t2 -c4 -d${secs}s"
for page in "/" "/series/$series" "/series/$series?metric=decode_tok_s&statistic=median" "/runs/$run" "/api/overview"; do
  curl -sf -o /dev/null "$base$page"   # warm: the run page builds its detail record once
  out=$(wrk -t2 -c4 -d"${secs}s" --latency "$base$page")
  p50=$(awk '/^ +50%/ {print $2}' <<<"$out"); p99=$(awk '/^ +99%/ {print $2}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out"); errs=$(grep -c "Non-2xx" <<<"$out" || true)
  printf '%-55s p50 %-9s p99 %-9s %8s req/s  non-2xx: %s\n' "$page" "$p50" "$p99" "$rps" "$errs"
done
