#!/usr/bin/env bash
# Build the wheelhouse the coordinator, signal and agent roles install from (hosts need no package index).
#
# `pip wheel` of this project (with the `coordinator`, `signal` and `postgres` extras) and all its
# dependencies into
# .state/wheelhouse/, plus .state/wheelhouse.tar, a reproducible tar of those wheels (sorted
# names, fixed times and owners: same wheels, same bytes) that the roles copy to the hosts in one
# transfer (variable starling_coordinator_wheelhouse / starling_signal_wheelhouse).
#
# Reused when up to date: nothing is rebuilt when pyproject.toml, the sources of coordinator/,
# agent/ and starling_proto/ and the Python version are those of the last build (.state/wheelhouse/.fingerprint). When
# only the sources changed, only the project's wheel is rebuilt, offline; dependencies are
# fetched from the package index only when they are missing from the wheelhouse.
#
# The wheels are built by .venv's Python (3.11), which matches Debian 12's python3.
# Usage: scripts/build-wheelhouse.sh [--force]      Env: PYTHON (default .venv/bin/python)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/.state/wheelhouse
TAR=$ROOT/.state/wheelhouse.tar
# The build backend (from pyproject's [build-system]), kept apart: hosts do not need it, but it lets
# the project's wheel be rebuilt offline.
BUILD_DEPS=$ROOT/.state/wheelhouse-build
FINGERPRINT=$OUT/.fingerprint
PROJECT_REQ=".[coordinator,signal,postgres]"  # every host role installs from this one wheelhouse
# Reproducible wheels (zip entry times) and archive.
export SOURCE_DATE_EPOCH=315532800

START=$(date +%s)
log() { printf 'build-wheelhouse: [%3ds] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { printf 'build-wheelhouse: ERROR: %s\n' "$*" >&2; exit 1; }

"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip: run 'make venv' or set PYTHON"
[[ -f pyproject.toml ]] || die "pyproject.toml not found in $ROOT"

# Everything the built wheels depend on: the project metadata, its sources, the interpreter.
fingerprint() {
    {
        "$PYTHON" -c 'import sys, sysconfig; print(sys.version_info[:2], sysconfig.get_platform())'
        sha256sum pyproject.toml
        [[ -f README.md ]] && sha256sum README.md
        find coordinator agent starling_proto -type f \
            -not -path '*/__pycache__/*' -not -name '*.pyc' -not -name '*.egg-info' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}
deps_fingerprint() {
    { "$PYTHON" -c 'import sys; print(sys.version_info[:2])'; sha256sum pyproject.toml; } | sha256sum | cut -d' ' -f1
}

FORCE=false
[[ ${1:-} == --force ]] && FORCE=true
want=$(fingerprint)
want_deps=$(deps_fingerprint)
have=""
have_deps=""
if [[ -f $FINGERPRINT ]]; then
    have=$(sed -n 1p "$FINGERPRINT")
    have_deps=$(sed -n 2p "$FINGERPRINT")
fi
if ! $FORCE && [[ $have == "$want" && -s $TAR ]] && compgen -G "$OUT/starling_mesh-*.whl" >/dev/null; then
    log "$OUT is up to date ($(find "$OUT" -name '*.whl' | wc -l) wheels)"
    exit 0
fi

mkdir -p "$OUT"
pip_opts=(--disable-pip-version-check --quiet --wheel-dir "$OUT")
# pip wheel, without the noise of configured find-links/index directories that do not exist.
pip_wheel() {
    "$PYTHON" -m pip wheel "${pip_opts[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# The project's own wheel: always rebuilt (same version number, new contents).
rm -f "$OUT"/starling_mesh-*.whl
if $FORCE || [[ $have_deps != "$want_deps" ]]; then
    log "dependencies changed (or --force): pip wheel $PROJECT_REQ with its dependencies"
    $FORCE && find "$OUT" -name '*.whl' -delete
    mapfile -t build_requires < <("$PYTHON" -c \
        'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
    "$PYTHON" -m pip wheel --disable-pip-version-check --quiet --wheel-dir "$BUILD_DEPS" "${build_requires[@]}" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    pip_wheel --find-links "$OUT" --find-links "$BUILD_DEPS" "$PROJECT_REQ"
    # Wheels of dependency versions no longer wanted: keep only what a resolution picks now.
    "$PYTHON" - "$OUT" <<'EOF'
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
latest = {}
for wheel in sorted(out.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    key = re.sub(r"[-_.]+", "_", name).lower()
    latest.setdefault(key, []).append((version, wheel))
for key, wheels in latest.items():
    if len(wheels) > 1:
        from packaging.version import Version  # pip vendors it; the venv has it through ansible/pydantic deps

        wheels.sort(key=lambda item: Version(item[0]))
        for _version, old in wheels[:-1]:
            print(f"build-wheelhouse: removing superseded {old.name}")
            old.unlink()
EOF
else
    log "sources changed: rebuilding the project wheel only (offline, dependencies from $OUT)"
    if ! pip_wheel --no-index --find-links "$OUT" --find-links "$BUILD_DEPS" "$PROJECT_REQ"; then
        log "offline build failed (a dependency is missing): with the package index"
        pip_wheel --find-links "$OUT" --find-links "$BUILD_DEPS" "$PROJECT_REQ"
    fi
fi
compgen -G "$OUT/starling_mesh-*.whl" >/dev/null || die "pip wheel produced no starling_mesh wheel"

# Reproducible archive: same wheels, same bytes (the roles copy it only when it changed).
(cd "$OUT" && LC_ALL=C find . -maxdepth 1 -name '*.whl' -printf '%P\n' | LC_ALL=C sort |
    tar --create --file "$TAR.tmp" --no-recursion --owner=0 --group=0 --numeric-owner \
        --mtime=@0 --mode=0644 --files-from=-)
mv -f "$TAR.tmp" "$TAR"
printf '%s\n%s\n' "$want" "$want_deps" >"$FINGERPRINT"
log "wheelhouse: $(find "$OUT" -name '*.whl' | wc -l) wheels, $TAR ($(du -h "$TAR" | cut -f1))"
