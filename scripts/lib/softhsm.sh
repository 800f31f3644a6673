# shellcheck shell=bash
# Throwaway SoftHSM2 token for the PKCS#11 provider tests. Source this file, then:
#
#   softhsm_start        # installs softhsm2 if absent, creates and initialises one token
#   trap softhsm_stop EXIT
#   ... STRONGROOM_TEST_SOFTHSM_* and SOFTHSM2_CONF are exported ...
#   softhsm_stop         # removes the token directory; safe to call twice
#
# SoftHSM2 is a library, not a server: nothing runs in the background. The token lives in a
# fresh temp dir with its own softhsm2.conf (objectstore.backend = file), found through
# SOFTHSM2_CONF, and gets random SO and user PINs.
#
# Exports: SOFTHSM2_CONF, STRONGROOM_TEST_SOFTHSM_CONF (same file), STRONGROOM_TEST_SOFTHSM_MODULE,
# STRONGROOM_TEST_SOFTHSM_TOKEN (token label), STRONGROOM_TEST_SOFTHSM_PIN_FILE (mode 0600),
# STRONGROOM_TEST_SOFTHSM_PIN, SOFTHSM_TMP.

_softhsm_log() { echo "softhsm.sh: $*" >&2; }

_softhsm_module() {
    local m
    for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so \
             /usr/local/lib/softhsm/libsofthsm2.so; do
        [ -f "$m" ] && { echo "$m"; return 0; }
    done
    return 1
}

softhsm_start() {
    if [ -n "${SOFTHSM_TMP:-}" ] && [ -d "$SOFTHSM_TMP" ]; then
        _softhsm_log "already set up ($SOFTHSM_TMP)"; return 0
    fi
    if ! command -v softhsm2-util >/dev/null 2>&1 || ! _softhsm_module >/dev/null; then
        _softhsm_log "installing softhsm2 with apt-get"
        if [ -z "${STRONGROOM_APT_UPDATED:-}" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null </dev/null ||
                { _softhsm_log "apt-get update failed"; return 1; }
            export STRONGROOM_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null </dev/null ||
            { _softhsm_log "apt-get install softhsm2 failed"; return 1; }
    fi
    local module
    module=$(_softhsm_module) || { _softhsm_log "libsofthsm2.so not found"; return 1; }

    SOFTHSM_TMP=$(mktemp -d "${TMPDIR:-/tmp}/strongroom-softhsm.XXXXXX") || return 1
    chmod 700 "$SOFTHSM_TMP"
    mkdir "$SOFTHSM_TMP/tokens"
    cat >"$SOFTHSM_TMP/softhsm2.conf" <<CONF
directories.tokendir = $SOFTHSM_TMP/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
    local label=strongroom-test so_pin pin
    so_pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    if ! SOFTHSM2_CONF="$SOFTHSM_TMP/softhsm2.conf" softhsm2-util --init-token --free \
            --label "$label" --so-pin "$so_pin" --pin "$pin" \
            >"$SOFTHSM_TMP/init.log" 2>&1 </dev/null; then
        _softhsm_log "token initialisation failed:"; cat "$SOFTHSM_TMP/init.log" >&2
        rm -rf "$SOFTHSM_TMP"; unset SOFTHSM_TMP
        return 1
    fi
    (umask 077 && printf '%s\n' "$pin" >"$SOFTHSM_TMP/user.pin")

    export SOFTHSM_TMP
    export SOFTHSM2_CONF="$SOFTHSM_TMP/softhsm2.conf"
    export STRONGROOM_TEST_SOFTHSM_CONF="$SOFTHSM2_CONF"
    export STRONGROOM_TEST_SOFTHSM_MODULE="$module"
    export STRONGROOM_TEST_SOFTHSM_TOKEN="$label"
    export STRONGROOM_TEST_SOFTHSM_PIN_FILE="$SOFTHSM_TMP/user.pin"
    export STRONGROOM_TEST_SOFTHSM_PIN="$pin"
    _softhsm_log "token '$label' ready (module $module, dir $SOFTHSM_TMP)"
}

softhsm_stop() {
    if [ -n "${SOFTHSM_TMP:-}" ] && [ -d "$SOFTHSM_TMP" ]; then
        rm -rf "$SOFTHSM_TMP"
    fi
    unset SOFTHSM_TMP SOFTHSM2_CONF STRONGROOM_TEST_SOFTHSM_CONF STRONGROOM_TEST_SOFTHSM_MODULE \
        STRONGROOM_TEST_SOFTHSM_TOKEN STRONGROOM_TEST_SOFTHSM_PIN_FILE STRONGROOM_TEST_SOFTHSM_PIN
    return 0
}
