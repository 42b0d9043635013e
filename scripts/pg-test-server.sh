#!/usr/bin/env bash
# A throwaway PostgreSQL 15 server for the storage contract test (tests/store.rs).
#
#   scripts/pg-test-server.sh start [DIR]   start one; prints `export PARITYBENCH_TEST_PG_URL=...`
#   scripts/pg-test-server.sh url [DIR]     print the URL of the running one
#   scripts/pg-test-server.sh stop [DIR]    stop it and delete DIR
#
# DIR defaults to $PARITYBENCH_PG_DIR or /tmp/paritybench-pg-$UID. The server listens on
# 127.0.0.1 on a free port, trusts local connections (it holds nothing but test data) and
# runs with fsync off. PostgreSQL refuses to run as root, so as root it runs as the
# `postgres` user (runuser). Typical use:
#   eval "$(scripts/pg-test-server.sh start)" && cargo test --test store; scripts/pg-test-server.sh stop
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
cmd=${1:-}
dir=${2:-${PARITYBENCH_PG_DIR:-/tmp/paritybench-pg-$(id -u)}}

die() { echo "pg-test-server: $*" >&2; exit 2; }

# Runs a command as the user that owns the cluster (postgres when we are root).
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "running as root and there is no 'postgres' user to run the server as"
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

url() {
    [ -f "$dir/port" ] || die "no server in $dir (run '$0 start' first)"
    echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
}

start() {
    [ -x "$PGBIN/initdb" ] || die "no initdb in $PGBIN (set PGBIN; Debian: apt-get install postgresql-15)"
    if [ -f "$dir/port" ] && as_owner "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        echo "export PARITYBENCH_TEST_PG_URL=$(url)"
        return
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    as_owner "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
        --no-sync >"$dir/initdb.log" 2>&1 || die "initdb failed; see $dir/initdb.log"
    local port
    port=$(free_port)
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || die "the server did not start; see $dir/server.log"
    echo "$port" >"$dir/port"
    echo "export PARITYBENCH_TEST_PG_URL=$(url)"
}

stop() {
    [ -d "$dir/data" ] || { echo "pg-test-server: nothing to stop in $dir" >&2; return; }
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    rm -rf "$dir"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    url) url ;;
    *) die "usage: $0 start|url|stop [DIR]" ;;
esac
