# shellcheck shell=bash
# Throwaway PostgreSQL 15 cluster for tests and benchmarks. Source this file, then:
#
#   pg_start [off|on]   # fsync off (default: conformance tests) or on (benchmarks, crash tests)
#   trap pg_stop EXIT
#   ... STRONGROOM_TEST_POSTGRES_URL is exported ...
#   pg_stop             # stops exactly the server pg_start started; safe to call twice
#   pg_crash_restart    # (crash tests) SIGKILL that server and its children, start it again
#
# pg_start installs PostgreSQL with apt-get only if /usr/lib/postgresql/15/bin is absent,
# runs initdb (as the postgres user, -A trust) in a fresh temp dir (mode 711), and starts the
# server with `pg_ctl -w` on 127.0.0.1 on a free port, with its socket dir in the temp dir and
# its output in "$PG_TMP/postgres.log" (never on the caller's stdout). Extra server settings
# can be passed as `-c name=value ...` in PG_EXTRA_OPTS.
#
# The server also speaks TLS (ssl=on) with a throwaway certificate for 127.0.0.1 and
# localhost, signed by a throwaway CA (STRONGROOM_TEST_POSTGRES_CA).
#
# Exports: STRONGROOM_TEST_POSTGRES_URL, STRONGROOM_TEST_POSTGRES_CA, PG_TMP, PG_PORT, PG_PID,
# PG_BIN.

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

_pg_log() { echo "postgres.sh: $*" >&2; }

_pg_port_free() {
    # Nothing accepts connections on 127.0.0.1:$1.
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pg_start() {
    local fsync=${1:-off}
    case "$fsync" in on|off) ;; *) _pg_log "usage: pg_start [on|off]"; return 2 ;; esac
    if [ -n "${PG_PID:-}" ] && kill -0 "$PG_PID" 2>/dev/null; then
        _pg_log "already running (pid $PG_PID)"; return 0
    fi
    if [ ! -x "$PG_BIN/pg_ctl" ]; then
        _pg_log "installing PostgreSQL 15 with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null ||
            { _pg_log "apt-get install postgresql-15 failed"; return 1; }
    fi
    if ! id postgres >/dev/null 2>&1; then _pg_log "no postgres user"; return 1; fi

    PG_TMP=$(mktemp -d "${TMPDIR:-/tmp}/strongroom-pg.XXXXXX") || return 1
    chmod 711 "$PG_TMP"
    mkdir "$PG_TMP/data" "$PG_TMP/sock"
    chown postgres:postgres "$PG_TMP/data" "$PG_TMP/sock"
    chmod 700 "$PG_TMP/data"
    if ! runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_TMP/data" -A trust -U postgres \
            -E UTF8 --no-sync >"$PG_TMP/initdb.log" 2>&1 </dev/null; then
        _pg_log "initdb failed:"; cat "$PG_TMP/initdb.log" >&2; rm -rf "$PG_TMP"; return 1
    fi
    touch "$PG_TMP/postgres.log" && chown postgres:postgres "$PG_TMP/postgres.log"
    # TLS for tests that ask for it (sslmode=require): a throwaway CA and a server
    # certificate for 127.0.0.1 and localhost.
    if ! command -v openssl >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null ||
            { _pg_log "apt-get install openssl failed"; rm -rf "$PG_TMP"; return 1; }
    fi
    mkdir "$PG_TMP/tls"
    if ! (
        cd "$PG_TMP/tls" &&
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key &&
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=strongroom-test-pg CA" -out ca.pem &&
        openssl ecparam -name prime256v1 -genkey -noout -out server.key &&
        openssl req -new -key server.key -subj "/CN=localhost" -out server.csr &&
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >ext.cnf &&
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -sha256 -extfile ext.cnf -out server.crt
    ) >"$PG_TMP/openssl.log" 2>&1; then
        _pg_log "making the test certificate failed:"; cat "$PG_TMP/openssl.log" >&2
        rm -rf "$PG_TMP"; return 1
    fi
    chown postgres:postgres "$PG_TMP/tls/server.key" "$PG_TMP/tls/server.crt"
    chmod 600 "$PG_TMP/tls/server.key"

    local attempt port opts
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        _pg_port_free "$port" || continue
        opts="-c listen_addresses=127.0.0.1 -p $port -k $PG_TMP/sock -c fsync=$fsync -c max_connections=200 -c ssl=on -c ssl_cert_file=$PG_TMP/tls/server.crt -c ssl_key_file=$PG_TMP/tls/server.key ${PG_EXTRA_OPTS:-}"
        echo "$opts" >"$PG_TMP/options"
        if runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -w -t 60 \
                -l "$PG_TMP/postgres.log" -o "$opts" \
                start >"$PG_TMP/pg_ctl.log" 2>&1 </dev/null; then
            PG_PORT=$port
            PG_PID=$(head -n 1 "$PG_TMP/data/postmaster.pid")
            export PG_TMP PG_PORT PG_PID PG_BIN
            export STRONGROOM_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
            export STRONGROOM_TEST_POSTGRES_CA="$PG_TMP/tls/ca.pem"
            _pg_log "PostgreSQL up on 127.0.0.1:$port (pid $PG_PID, fsync=$fsync, dir $PG_TMP)"
            return 0
        fi
        _pg_log "start on port $port failed (attempt $attempt), retrying"
    done
    _pg_log "could not start PostgreSQL:"; tail -n 20 "$PG_TMP/postgres.log" >&2
    rm -rf "$PG_TMP"; unset PG_TMP
    return 1
}

# Crash-test helper: SIGKILLs the server pg_start started (the postmaster and its children,
# found by parent PID), waits until they are gone, and starts it again on the same port and
# data dir, which runs PostgreSQL's crash recovery. Updates and exports PG_PID.
pg_crash_restart() {
    [ -n "${PG_PID:-}" ] && [ -d "${PG_TMP:-}" ] || { _pg_log "not started"; return 1; }
    local pids p i
    pids="$PG_PID $(pgrep -P "$PG_PID" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for p in $pids; do
        for i in $(seq 1 200); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.05
        done
    done
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -w -t 120 \
        -l "$PG_TMP/postgres.log" -o "$(cat "$PG_TMP/options")" \
        start >"$PG_TMP/pg_ctl.log" 2>&1 </dev/null || {
        _pg_log "restart failed:"; tail -n 20 "$PG_TMP/postgres.log" >&2; return 1; }
    PG_PID=$(head -n 1 "$PG_TMP/data/postmaster.pid")
    export PG_PID
}

pg_stop() {
    if [ -n "${PG_PID:-}" ] && kill -0 "$PG_PID" 2>/dev/null; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m fast -w -t 30 stop \
            >/dev/null 2>&1 </dev/null || kill -TERM "$PG_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 100); do
            kill -0 "$PG_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$PG_PID" 2>/dev/null && kill -KILL "$PG_PID" 2>/dev/null
    fi
    if [ -n "${PG_TMP:-}" ] && [ -d "$PG_TMP" ]; then
        rm -rf "$PG_TMP"
    fi
    unset PG_PID PG_TMP PG_PORT STRONGROOM_TEST_POSTGRES_URL
    return 0
}
