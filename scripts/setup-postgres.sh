#!/usr/bin/env bash
# Make sure a local PostgreSQL cluster runs and holds the test role and database.
#
#  - starts the Debian cluster (pg_ctlcluster; works with or without systemd), or creates it;
#  - checks that it listens on loopback only and answers on 127.0.0.1;
#  - creates role `starling` (password generated once into .state/pg-password, 0600) and
#    database `starling_test` owned by it;
#  - writes .state/pg.env: STARLING_TEST_PG_DSN=postgresql://starling:<pw>@127.0.0.1:<port>/starling_test
#
# Idempotent: a second run changes nothing. Overrides: PG_VERSION, PG_CLUSTER (default: the
# existing "main" cluster, else the newest installed server), STARLING_PG_ALLOW_NONLOCAL=1 to
# accept a cluster that listens beyond loopback. As non-root it can only reuse an existing
# .state/pg.env (or STARLING_TEST_PG_DSN from the environment).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
STATE=$REPO/.state
PWFILE=$STATE/pg-password
ENVFILE=$STATE/pg.env
ROLE=starling
DB=starling_test

log() { printf 'setup-postgres: %s\n' "$*"; }
die() { printf 'setup-postgres: ERROR: %s\n' "$*" >&2; exit 1; }

umask 077
mkdir -p "$STATE"

write_env() {  # write_env DSN -- rewrite .state/pg.env only when its content changes
    local content="STARLING_TEST_PG_DSN=$1"
    if [[ ! -f $ENVFILE || "$(<"$ENVFILE")" != "$content" ]]; then
        local tmp
        tmp=$(mktemp "$STATE/.pg.env.XXXXXX")
        printf '%s\n' "$content" >"$tmp"
        chmod 600 "$tmp"
        mv -f "$tmp" "$ENVFILE"
        log "wrote ${ENVFILE#"$REPO"/}"
    fi
}
redact() { sed -E 's#(://[^:/@]+:)[^@]*@#\1****@#' <<<"$1"; }

if [[ $(id -u) -ne 0 ]]; then
    if [[ -n ${STARLING_TEST_PG_DSN:-} ]]; then
        write_env "$STARLING_TEST_PG_DSN"
        log "not root: using STARLING_TEST_PG_DSN from the environment: $(redact "$STARLING_TEST_PG_DSN")"
        exit 0
    fi
    if [[ -f $ENVFILE ]]; then
        log "not root: reusing ${ENVFILE#"$REPO"/} as is (cannot check the cluster)"
        exit 0
    fi
    die "must run as root (it starts the cluster and runs psql as postgres), or set STARLING_TEST_PG_DSN"
fi

command -v pg_lsclusters >/dev/null 2>&1 ||
    die "PostgreSQL is not installed (pg_lsclusters missing): run scripts/setup-system.sh first"

# One run at a time (two `make test` in parallel would race on role/database creation).
exec 9>"$STATE/.setup-postgres.lock"
flock 9

PG_CLUSTER=${PG_CLUSTER:-main}
if [[ -z ${PG_VERSION:-} ]]; then
    PG_VERSION=$(pg_lsclusters -h | awk -v c="$PG_CLUSTER" '$2 == c { print $1 }' | sort -n | tail -n 1)
fi
if [[ -z $PG_VERSION ]]; then
    PG_VERSION=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null |
        awk -F/ '{ print $(NF - 2) }' | sort -n | tail -n 1)
fi
[[ -n $PG_VERSION ]] || die "no PostgreSQL server found under /usr/lib/postgresql: run scripts/setup-system.sh"

# Run a command with only fds 0-2 open: the server it starts must not inherit our lock (fd 9)
# or a caller's pipe (it would hold `make test | tee` open forever).
without_extra_fds() {
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-"; fi
        done
        exec "$@"
    )
}

cluster_field() {  # cluster_field N -- column N of this cluster's pg_lsclusters line
    pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" -v n="$1" '$1 == v && $2 == c { print $n }'
}

if [[ -z $(cluster_field 2) ]]; then
    log "no cluster $PG_VERSION/$PG_CLUSTER: creating it"
    without_extra_fds pg_createcluster "$PG_VERSION" "$PG_CLUSTER" --start >/dev/null
fi

status=$(cluster_field 4)
if [[ $status != online* ]]; then
    log "starting cluster $PG_VERSION/$PG_CLUSTER (was: $status)"
    if ! without_extra_fds pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start; then
        logfile=$(cluster_field 7)
        [[ -n $logfile && -r $logfile ]] && tail -n 20 "$logfile" >&2
        die "could not start cluster $PG_VERSION/$PG_CLUSTER"
    fi
fi
PORT=$(cluster_field 3)
[[ $PORT =~ ^[0-9]+$ ]] || die "cannot tell the port of cluster $PG_VERSION/$PG_CLUSTER"

# Client tools (pg_wrapper) find this cluster's socket and port through PGCLUSTER.
export PGCLUSTER=$PG_VERSION/$PG_CLUSTER
for _ in $(seq 1 60); do
    pg_isready -q && break
    sleep 0.5
done
pg_isready -q || die "cluster $PGCLUSTER does not accept connections on its Unix socket"

as_postgres_psql() {  # SQL on stdin (keeps secrets out of argv), as the postgres superuser
    (cd / && runuser -u postgres -- psql -X -q -A -t -v ON_ERROR_STOP=1 -d postgres "$@")
}

listen=$(as_postgres_psql -c 'SHOW listen_addresses' </dev/null | tr -d ' ')
nonlocal=$(tr ',' '\n' <<<"$listen" | grep -Evx 'localhost|127\.0\.0\.1|::1|' || true)
if [[ -n $nonlocal ]]; then
    if [[ ${STARLING_PG_ALLOW_NONLOCAL:-0} == 1 ]]; then
        log "WARNING: cluster $PGCLUSTER listens on '$listen' (not only loopback); allowed by STARLING_PG_ALLOW_NONLOCAL"
    else
        die "cluster $PGCLUSTER listens on '$listen', not only on loopback; set listen_addresses = 'localhost'" \
            "in /etc/postgresql/$PG_VERSION/$PG_CLUSTER/postgresql.conf (or STARLING_PG_ALLOW_NONLOCAL=1)"
    fi
fi
(env -u PGCLUSTER pg_isready -q -h 127.0.0.1 -p "$PORT") ||
    die "cluster $PGCLUSTER does not answer on 127.0.0.1:$PORT (listen_addresses = '$listen')"

# The password: generated once, URL-safe so that the DSN needs no escaping.
if [[ ! -s $PWFILE ]]; then
    tmp=$(mktemp "$STATE/.pg-password.XXXXXX")
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$tmp"
    chmod 600 "$tmp"
    mv -f "$tmp" "$PWFILE"
    log "generated a new password in ${PWFILE#"$REPO"/}"
fi
chmod 600 "$PWFILE"
PW=$(<"$PWFILE")
[[ $PW =~ ^[A-Za-z0-9._~-]{16,}$ ]] ||
    die "${PWFILE#"$REPO"/} must hold one line of at least 16 characters from [A-Za-z0-9._~-]; delete it to regenerate"

# Role and database. The password only travels on stdin; the session never logs statements.
as_postgres_psql <<SQL
SET log_statement = 'none';
SET log_min_error_statement = 'panic';
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEROLE CREATEDB PASSWORD %L', '$ROLE', '$PW')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$ROLE') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', '$DB', '$ROLE')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', '$DB', '$ROLE')
 WHERE (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '$DB') <> '$ROLE' \gexec
SQL

can_login() {
    env -u PGCLUSTER PGPASSWORD="$PW" PGCONNECT_TIMEOUT=5 \
        psql -X -q -w -A -t -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d "$DB" -c 'SELECT 1' </dev/null >/dev/null 2>&1
}
if ! can_login; then
    # The role predates this password file (e.g. .state/ was wiped): set it to the file's.
    log "setting the password of role $ROLE from ${PWFILE#"$REPO"/}"
    as_postgres_psql <<SQL
SET log_statement = 'none';
SET log_min_error_statement = 'panic';
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', '$ROLE', '$PW') \gexec
SQL
    can_login || die "role $ROLE cannot log in over TCP on 127.0.0.1:$PORT (check pg_hba.conf of $PGCLUSTER)"
fi

DSN="postgresql://$ROLE:$PW@127.0.0.1:$PORT/$DB"
write_env "$DSN"
log "cluster $PGCLUSTER online; STARLING_TEST_PG_DSN=$(redact "$DSN") (in ${ENVFILE#"$REPO"/})"
