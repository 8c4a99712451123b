#!/usr/bin/env bash
# Does coturn take TURN REST API secrets from its SQLite database on the fly, several at once?
#
# Starts the machine's real turnserver on 127.0.0.1 (random ports, everything in a temporary directory,
# use-auth-secret without static-auth-secret), changes the turn_secret table with turnadmin while it runs,
# and allocates a TURN relay with credentials made from each secret (files/turn_probe.py). Loopback only.
# The result is recorded in roles/relay/README.md. Usage: molecule/relay/secret_rotation_experiment.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROBE=$HERE/files/turn_probe.py
DIR=$(mktemp -d -t starling-coturn-experiment.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
MINP=$((50000 + RANDOM % 10000))
DB=$DIR/turndb
REALM=starling
A=experiment-secret-A-$RANDOM$RANDOM
B=experiment-secret-B-$RANDOM$RANDOM
SERVER=""

cleanup() {
    if [[ -n $SERVER ]]; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT

# turnadmin always writes a small log file /var/log/turn_<its pid>_<date>.log: remove exactly that one.
turnadmin_() {
    turnadmin "$@" -r "$REALM" -b "$DB" >"$DIR/turnadmin.out" 2>&1 &
    local pid=$!
    wait "$pid" || { cat "$DIR/turnadmin.out" >&2; return 1; }
    rm -f /var/log/turn_"${pid}"_*.log
    grep -v '^[0-9]*: ' "$DIR/turnadmin.out" || true
}

cat >"$DIR/turnserver.conf" <<EOF
listening-ip=127.0.0.1
relay-ip=127.0.0.1
listening-port=$PORT
min-port=$MINP
max-port=$((MINP + 20))
use-auth-secret
realm=$REALM
userdb=$DB
fingerprint
no-tls
no-dtls
no-cli
no-multicast-peers
denied-peer-ip=100.64.0.0-100.127.255.255
log-file=$DIR/turnserver.log
simple-log
no-stdout-log
pidfile=$DIR/turnserver.pid
EOF

T0=$(date +%s.%N)
say() { printf '%6.2f s  %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*"; }
alloc() { echo "$1" | python3 "$PROBE" allocate "127.0.0.1:$PORT" --permit 198.19.0.9 --permit 100.64.0.9 || true; }

turnadmin_ -s "$A"
say "secret A in the database; starting turnserver $(turnserver --version 2>/dev/null | head -n1)"
turnserver -c "$DIR/turnserver.conf" >"$DIR/turnserver.out" 2>&1 &
SERVER=$!
for _ in $(seq 50); do
    python3 "$PROBE" stun "127.0.0.1:$PORT" >/dev/null 2>&1 && break
    sleep 0.1
done
say "STUN: $(python3 "$PROBE" stun "127.0.0.1:$PORT")"
say "allocate with A: $(alloc "$A")"
say "allocate with B (not in the database): $(alloc "$B")"
turnadmin_ -s "$B"
say "added B; turnadmin -S: $(turnadmin_ -S | tr '\n' ' ')"
say "allocate with B, right after: $(alloc "$B")"
say "allocate with A, still there: $(alloc "$A")"
turnadmin_ -X "$A"
say "removed A; turnadmin -S: $(turnadmin_ -S | tr '\n' ' ')"
say "allocate with A after its removal: $(alloc "$A")"
say "allocate with B: $(alloc "$B")"
turnadmin_ --delete-all-secrets
say "no secret left: allocate with B: $(alloc "$B")"
if kill -0 "$SERVER" 2>/dev/null; then
    say "turnserver (pid $SERVER) ran throughout, never restarted"
else
    say "turnserver died"
    exit 1
fi
