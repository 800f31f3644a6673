# shellcheck shell=bash
# Throwaway AWS KMS emulator (moto_server) for the AWS KMS provider tests. Source this file:
#
#   moto_start           # installs moto[server] with pip if absent, starts it on 127.0.0.1
#   trap moto_stop EXIT
#   ... STRONGROOM_TEST_KMS_ENDPOINT and dummy AWS_* credentials are exported ...
#   moto_stop            # stops exactly the process moto_start started; safe to call twice
#
# The server runs on a free port under a fresh temp dir, its output in "$MOTO_TMP/moto.log"
# (never on the caller's stdout; other descriptors closed). Keys are created by the tests.
#
# Exports: STRONGROOM_TEST_KMS_ENDPOINT, AWS_REGION, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_EC2_METADATA_DISABLED=true, MOTO_TMP, MOTO_PORT, MOTO_PID.

_moto_log() { echo "moto.sh: $*" >&2; }

_moto_port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts "$@" in the background with stdin from /dev/null, stdout and stderr to $1, and every
# other inherited descriptor closed; $! is the command's own PID.
_moto_spawn() {
    local log=$1; shift
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] 2>/dev/null && { eval "exec $fd>&-" 2>/dev/null || true; }
        done
        exec "$@"
    ) </dev/null >"$log" 2>&1 &
}

# moto answers 200 on /moto-api/ once it serves requests (plain bash: no curl needed).
_moto_ready() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        IFS= read -r -t 2 line <&3 || exit 1
        [[ $line == HTTP/*" 200"* ]]
    ) 2>/dev/null
}

moto_start() {
    if [ -n "${MOTO_PID:-}" ] && kill -0 "$MOTO_PID" 2>/dev/null; then
        _moto_log "already running (pid $MOTO_PID)"; return 0
    fi
    if ! command -v moto_server >/dev/null 2>&1; then
        _moto_log "installing moto[server] with pip"
        python3 -m pip install -q --disable-pip-version-check 'moto[server]' >/dev/null 2>&1 ||
            { _moto_log "pip install 'moto[server]' failed"; return 1; }
        hash -r
    fi
    MOTO_TMP=$(mktemp -d "${TMPDIR:-/tmp}/strongroom-moto.XXXXXX") || return 1
    local attempt port i
    for attempt in 1 2 3 4 5; do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        _moto_port_free "$port" || continue
        _moto_spawn "$MOTO_TMP/moto.log" moto_server -H 127.0.0.1 -p "$port"
        MOTO_PID=$!
        for i in $(seq 1 150); do
            kill -0 "$MOTO_PID" 2>/dev/null || break
            if _moto_ready "$port"; then
                MOTO_PORT=$port
                export MOTO_TMP MOTO_PORT MOTO_PID
                export STRONGROOM_TEST_KMS_ENDPOINT="http://127.0.0.1:$port"
                export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
                export AWS_ACCESS_KEY_ID=strongroom-test AWS_SECRET_ACCESS_KEY=strongroom-test
                export AWS_EC2_METADATA_DISABLED=true
                _moto_log "moto up on 127.0.0.1:$port (pid $MOTO_PID, dir $MOTO_TMP)"
                return 0
            fi
            sleep 0.1
        done
        kill -TERM "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true
        _moto_log "start on port $port failed (attempt $attempt), retrying"
    done
    _moto_log "could not start moto_server:"; tail -n 20 "$MOTO_TMP/moto.log" >&2
    rm -rf "$MOTO_TMP"; unset MOTO_TMP MOTO_PID
    return 1
}

moto_stop() {
    if [ -n "${MOTO_PID:-}" ] && kill -0 "$MOTO_PID" 2>/dev/null; then
        kill -TERM "$MOTO_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 50); do
            kill -0 "$MOTO_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$MOTO_PID" 2>/dev/null && kill -KILL "$MOTO_PID" 2>/dev/null || true
        wait "$MOTO_PID" 2>/dev/null || true
    fi
    if [ -n "${MOTO_TMP:-}" ] && [ -d "$MOTO_TMP" ]; then
        rm -rf "$MOTO_TMP"
    fi
    unset MOTO_PID MOTO_TMP MOTO_PORT STRONGROOM_TEST_KMS_ENDPOINT
    return 0
}
