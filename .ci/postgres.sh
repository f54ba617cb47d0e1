# Sourced by .ci/run (bash): a throwaway PostgreSQL on 127.0.0.1 for tests/test_postgres.py.
#
#   source .ci/postgres.sh && postgres_start   # exports SOUPSEARCH_TEST_POSTGRES; stops on exit
#
# SOUPSEARCH_TEST_POSTGRES=postgresql://soupsearch:PASSWORD@127.0.0.1:PORT/postgres names a
# superuser, so that each test creates (and drops) databases of its own. The server runs from a
# temporary data folder with password (scram) authentication on a free port, as an unprivileged
# user: `soupci` (created if missing) when this runs as root, since PostgreSQL refuses root;
# otherwise as the calling user. It is stopped, and its folder removed, when the shell exits.
# Where the binaries are missing and apt-get exists (as root), Debian's `postgresql` is installed.
# A failure to start is reported and leaves the variable unset: under CI the tests then fail.

_pg_bin() {
    local found
    found=$(command -v initdb 2>/dev/null || true)
    if [ -n "$found" ] && [ -x "$(dirname "$found")/pg_ctl" ]; then
        dirname "$found"
        return
    fi
    # Debian keeps them out of PATH, one folder per major version: take the newest
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$found" ] && [ -x "$found/initdb" ] && echo "$found"
}

_pg_as() {  # run as the server's user
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$_PG_USER" -- "$@"
    else
        "$@"
    fi
}

postgres_stop() {
    if [ -n "${_PG_DIR:-}" ] && [ -d "$_PG_DIR" ]; then
        local pid
        pid=$(head -n 1 "$_PG_DIR/data/postmaster.pid" 2>/dev/null || true)
        _pg_as "$_PG_BIN/pg_ctl" -D "$_PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
        for _ in $(seq 50); do  # pg_ctl returns once the pid file is gone, a moment before the process
            [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        rm -rf "$_PG_DIR"
    fi
    _PG_DIR=
}

postgres_start() {
    _PG_BIN=$(_pg_bin || true)
    if [ -z "$_PG_BIN" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "postgres.sh: installing Debian's postgresql" >&2
        timeout 600 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null' \
            || echo "postgres.sh: postgresql could not be installed" >&2
        _PG_BIN=$(_pg_bin || true)
    fi
    if [ -z "$_PG_BIN" ]; then
        echo "postgres.sh: no PostgreSQL binaries (initdb, pg_ctl); SOUPSEARCH_TEST_POSTGRES is not set" >&2
        return 1
    fi
    _PG_USER=$(id -un)
    if [ "$(id -u)" = 0 ]; then
        _PG_USER=soupci
        id -u "$_PG_USER" >/dev/null 2>&1 \
            || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$_PG_USER"
    fi
    _PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/soupsearch-pg.XXXXXX")
    trap 'status=$?; postgres_stop; exit $status' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local password port
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    printf '%s\n' "$password" >"$_PG_DIR/password"
    [ "$(id -u)" = 0 ] && chown -R "$_PG_USER" "$_PG_DIR"
    chmod 700 "$_PG_DIR"
    if ! _pg_as "$_PG_BIN/initdb" -D "$_PG_DIR/data" -U soupsearch --pwfile="$_PG_DIR/password" \
            --auth=scram-sha-256 -E UTF8 --locale=C --no-sync >"$_PG_DIR/initdb.log" 2>&1; then
        echo "postgres.sh: initdb failed:" >&2
        tail -n 20 "$_PG_DIR/initdb.log" >&2
        postgres_stop
        return 1
    fi
    # fsync off: a throwaway server; max_connections: each process opens pools for Optuna and MLflow
    if ! _pg_as "$_PG_BIN/pg_ctl" -D "$_PG_DIR/data" -l "$_PG_DIR/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $_PG_DIR -c fsync=off -c max_connections=300" \
            start >/dev/null; then
        echo "postgres.sh: the server did not start:" >&2
        tail -n 20 "$_PG_DIR/server.log" >&2
        postgres_stop
        return 1
    fi
    export SOUPSEARCH_TEST_POSTGRES="postgresql://soupsearch:$password@127.0.0.1:$port/postgres"
    echo "postgres.sh: PostgreSQL $("$_PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" \
         "(user soupsearch, data in $_PG_DIR) for tests/test_postgres.py" >&2
}
