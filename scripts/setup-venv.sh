#!/usr/bin/env bash
# Create .venv (if missing or broken) and install the project with its dev extras.
#
# The (slow) pip install runs only when pyproject.toml is newer than .venv/.installed-stamp,
# which is written after a successful install. Set PYTHON to pick another interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-stamp

log() { printf 'setup-venv: %s\n' "$*"; }

if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    if [[ -e $VENV ]]; then
        log "$VENV is broken (its python does not run); recreating it"
        rm -rf "$VENV"
    fi
    log "creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$PYTHON" -m venv "$VENV"
fi

if [[ ! -f $STAMP || pyproject.toml -nt $STAMP ]]; then
    log "installing the project, its server extras and dev dependencies (pip install -e '.[coordinator,signal,postgres,dev]')"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[coordinator,signal,postgres,dev]'
    touch "$STAMP"
    log "done"
else
    log "$VENV is up to date"
fi
