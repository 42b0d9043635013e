#!/usr/bin/env bash
# The metric kernels of `runner compare` and the same metrics in numpy, on the same data, in
# one run: the criterion bench (which also measures memcpy bandwidth and writes the data,
# 3.7 GB in $PARITYBENCH_BENCH_DIR, default /tmp/paritybench-bench, once), then
# benches/metrics_numpy.py on those files. The load average is printed before, between and
# after: on a shared machine compare only ratios from one run.
#
#   scripts/bench-metrics.sh [--repeats N] [criterion filter ...]
#
# Needs `source /root/.cache/paritybench/setup.env` (PARITYBENCH_PYTHON: numpy). The build
# runs under `nice`, the measuring does not: a niced process measures the machine's other jobs.
set -euo pipefail
: "${PARITYBENCH_PYTHON:?source setup.env first}"
cd "$(dirname "$0")/.."
repeats=2
if [[ ${1:-} == --repeats ]]; then
  repeats=$2
  shift 2
fi
load() { echo "== $1 $(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg)"; }
nice -n 10 cargo bench --bench metrics --no-run # the build is niced, the measuring is not
load "criterion start"
cargo bench --bench metrics -- "$@"
load "numpy start"
"$PARITYBENCH_PYTHON" benches/metrics_numpy.py --repeats "$repeats"
load "end"
