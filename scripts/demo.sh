#!/usr/bin/env bash
# `make demo`: a local coordinator with an embedded SQLite store in .state/demo/, plus a demo
# group and setup key, and a short "how to use it" block. `scripts/demo.sh down` stops it.
#
# Idempotent: a demo coordinator that already runs (pid file + live process) is reused.
# It binds 127.0.0.1 only (port 8080, or a free port when 8080 is taken).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
DEMO=$REPO/.state/demo
CONFIG=$DEMO/coordinator.yaml
PIDFILE=$DEMO/coordinator.pid
LOG=$DEMO/coordinator.log
KEYFILE=$DEMO/setup-key
HEADER=$DEMO/auth.header
BIN=$REPO/.venv/bin
PY=$BIN/python
HOST=127.0.0.1
PREFERRED_PORT=8080
GROUP=demo

log() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

# STARLING_* variables in the caller's environment would override the demo's config file.
COORDINATOR=(env -u STARLING_CONFIG -u STARLING_DATABASE_URL -u STARLING_LISTEN_HOST -u STARLING_LISTEN_PORT
    -u STARLING_STATE_DIR -u STARLING_LOG_FORMAT -u STARLING_LOG_LEVEL
    "$BIN/starling-coordinator" --config "$CONFIG")
coordinator() { "${COORDINATOR[@]}" "$@"; }

# The PID of the running demo coordinator, or failure. Checks the command line too, so that a
# recycled PID from a stale pid file is never taken for ours (nor killed).
demo_pid() {
    local pid cmdline
    [[ -f $PIDFILE ]] || return 1
    pid=$(<"$PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *starling-coordinator* && $cmdline == *"$CONFIG"* && $cmdline == *serve* ]] || return 1
    printf '%s\n' "$pid"
}

down() {
    local pid
    if pid=$(demo_pid); then
        log "stopping the demo coordinator (PID $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "PID $pid did not stop within 10 s: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    elif [[ -f $PIDFILE ]]; then
        log "no demo coordinator runs (stale pid file)"
    else
        log "no demo coordinator runs"
    fi
    rm -rf "$DEMO"
    log "removed ${DEMO#"$REPO"/}"
}

port_free() {
    "$PY" - "$HOST" "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

free_port() {
    "$PY" - "$HOST" <<'EOF'
import socket, sys
with socket.socket() as s:
    s.bind((sys.argv[1], 0))
    print(s.getsockname()[1])
EOF
}

config_port() {
    "$PY" - "$CONFIG" <<'EOF'
import sys, yaml
with open(sys.argv[1]) as f:
    print(int(yaml.safe_load(f)["listen"]["port"]))
EOF
}

healthy() { curl -fsS -m 2 -o /dev/null "http://$HOST:$1/healthz" 2>/dev/null; }

wait_healthy() {  # wait_healthy PORT PID
    for _ in $(seq 1 150); do
        healthy "$1" && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}

# Start a command detached (own session, no terminal, only fds 0-2): it outlives `make demo`
# and holds none of our fds (the lock, a caller's pipe). Keeps the PID: setsid does not fork
# here, since a background subshell of a script is not a process-group leader.
start_detached() {
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-"; fi
        done
        exec setsid "$@"
    ) </dev/null >>"$LOG" 2>&1 &
    echo $!
}

# api METHOD PATH [JSON]: sets API_STATUS (HTTP code, 000 when unreachable) and API_BODY.
# The admin token is read by curl from a 0600 header file, never passed on a command line.
api() {
    local out args=(-sS -m 10 -X "$1" -H "@$HEADER" -w '\n%{http_code}')
    if [[ $# -ge 3 ]]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$3")
    fi
    out=$(curl "${args[@]}" "$URL$2" 2>&1) || true
    API_STATUS=${out##*$'\n'}
    API_BODY=${out%$'\n'*}
    [[ $API_STATUS =~ ^[0-9]{3}$ ]] || API_STATUS=000
}
json() {  # json EXPR: evaluate EXPR on the JSON document `d` read from stdin
    "$PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"
}

# --------------------------------------------------------------------------------------------
case ${1:-up} in
    up) ;;
    down)
        mkdir -p "$REPO/.state"
        exec 9>"$REPO/.state/.demo.lock"
        flock 9
        down
        exit 0
        ;;
    *) die "usage: $0 [up|down]" ;;
esac

[[ -x $BIN/starling-coordinator ]] || die "$BIN/starling-coordinator missing: run 'make venv' first"
command -v curl >/dev/null 2>&1 || die "curl is required (apt-get install curl)"

mkdir -p "$REPO/.state"
exec 9>"$REPO/.state/.demo.lock"
flock 9

umask 077
if pid=$(demo_pid); then
    PORT=$(config_port)
    log "reusing the running demo coordinator (PID $pid, port $PORT)"
    wait_healthy "$PORT" "$pid" || die "demo coordinator PID $pid is not healthy; see $LOG (or 'make demo-down')"
else
    if [[ -f $PIDFILE ]]; then
        log "removing a stale pid file"
        rm -f "$PIDFILE"
    fi
    mkdir -p "$DEMO"
    chmod 700 "$DEMO"
    if port_free "$PREFERRED_PORT"; then
        PORT=$PREFERRED_PORT
    else
        PORT=$(free_port)
        log "port $PREFERRED_PORT is busy: using $PORT"
    fi
    cat >"$CONFIG" <<EOF
# Written by scripts/demo.sh; 'make demo-down' stops the coordinator and deletes this directory.
listen:
  host: $HOST
  port: $PORT
database:
  url: "sqlite:///$DEMO/coordinator.db"
state_dir: "$DEMO"
secrets:
  source: config
EOF
    log "migrating the demo database"
    coordinator migrate >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; die "migrate failed (log: $LOG)"; }
    log "starting the coordinator on $HOST:$PORT"
    pid=$(start_detached "${COORDINATOR[@]}" serve)
    echo "$pid" >"$PIDFILE"
    if ! wait_healthy "$PORT" "$pid"; then
        tail -n 30 "$LOG" >&2
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$PIDFILE"
        die "the coordinator did not become healthy on port $PORT (log: $LOG)"
    fi
fi
URL=http://$HOST:$PORT

TOKEN=$(coordinator show-admin-token 2>>"$LOG" | tail -n 1 | tr -d '[:space:]')
[[ -n $TOKEN ]] || die "show-admin-token printed nothing (log: $LOG)"
printf 'Authorization: Bearer %s\n' "$TOKEN" >"$HEADER"
chmod 600 "$HEADER"
unset TOKEN

# The demo group (reused when it exists).
api GET "/api/v1/groups?name=$GROUP"
[[ $API_STATUS == 200 ]] || die "GET /api/v1/groups answered $API_STATUS: $API_BODY"
if [[ $(json "sum(1 for g in d['items'] if g['name'] == '$GROUP')" <<<"$API_BODY") == 0 ]]; then
    api POST /api/v1/groups "{\"name\": \"$GROUP\", \"description\": \"created by make demo\"}"
    [[ $API_STATUS == 201 || $API_STATUS == 409 ]] || die "POST /api/v1/groups answered $API_STATUS: $API_BODY"
    log "created group '$GROUP'"
fi

# A reusable setup key that puts enrolled peers into the demo group. The coordinator shows a
# key only once, so it is kept in $KEYFILE (0600) and reused while that file exists.
if [[ ! -s $KEYFILE ]]; then
    name=demo
    for attempt in 1 2; do
        api POST /api/v1/setup-keys "{\"name\": \"$name\", \"reusable\": true, \"auto_groups\": [\"$GROUP\"]}"
        if [[ $API_STATUS == 409 && $attempt == 1 ]]; then
            name=demo-$(date +%s)  # 'demo' exists but its key file is gone: make another one
            continue
        fi
        break
    done
    [[ $API_STATUS == 201 ]] || die "POST /api/v1/setup-keys answered $API_STATUS: $API_BODY"
    json "d['key']" <<<"$API_BODY" >"$KEYFILE"
    chmod 600 "$KEYFILE"
    log "created setup key '$name'"
fi

pid=$(demo_pid) || die "the demo coordinator is gone (log: $LOG)"
rel=${DEMO#"$REPO"/}
cat <<EOF

Starling demo coordinator running (PID $pid), SQLite store in $rel/
  API:        $URL/api/v1/          docs: $URL/docs
  log:        $rel/coordinator.log
  setup key:  reusable, auto-group '$GROUP': cat $rel/setup-key

Use it:
  export STARLING_URL=$URL STARLING_TOKEN="\$($BIN/starling-coordinator --config $CONFIG show-admin-token)"
  curl -s -H "Authorization: Bearer \$STARLING_TOKEN" \$STARLING_URL/api/v1/peers
  curl -s -H "Authorization: Bearer \$STARLING_TOKEN" \$STARLING_URL/api/v1/groups
  curl -s -H "Authorization: Bearer \$STARLING_TOKEN" \$STARLING_URL/api/v1/policies

Stop it (and delete $rel/): make demo-down
EOF
