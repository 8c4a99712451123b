#!/usr/bin/env bash
# Static checks of the starling.mesh collection: ansible-lint (production profile) and ansible-test sanity.
#
# The repository root is also a Python project (coordinator/, agent/, bench/, tests/), so the checks run on a
# copy of only the collection's parts, laid out as .../ansible_collections/starling/mesh/ (ansible-test needs
# that path). ansible-test bootstraps pip in each test venv with get-pip.py from a host that is not reachable
# here: ~/.ansible/test/cache/get_pip_<version>.py is pre-seeded with a small stand-in that uses ensurepip and
# then pip from the package index (see the shared ENVIRONMENT.md, "Containers and molecule").
#
# Usage: scripts/ansible-checks.sh [lint|sanity|all]   (default: all). Exits non-zero on any finding.
# Env: ANSIBLE_CHECKS_KEEP=1 keeps the temporary tree; SANITY_ARGS adds ansible-test arguments (e.g. --test pep8).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
BIN=$ROOT/.venv/bin
WHAT=${1:-all}
PY_VERSION=${ANSIBLE_CHECKS_PYTHON:-3.11}
PIP_VERSION=24.2   # ansible-test 2.19's bootstrap pip (ansible_test/_internal/python_requirements.py)

log() { printf 'ansible-checks: %s\n' "$*"; }

for tool in ansible-test ansible-lint; do
    if [[ ! -x $BIN/$tool ]]; then
        log "$BIN/$tool is missing: run 'make venv' (the dev extras install ansible-core and ansible-lint)"
        exit 2
    fi
done

TMP=$(mktemp -d -t starling-ansible-checks.XXXXXX)
cleanup() { if [[ -z ${ANSIBLE_CHECKS_KEEP:-} ]]; then rm -rf "$TMP"; else log "kept $TMP"; fi; }
trap cleanup EXIT
TREE=$TMP/ansible_collections/starling/mesh
mkdir -p "$TREE"

# The collection's parts only (what `ansible-galaxy collection build` ships, less the Python project).
for part in galaxy.yml README.md CHANGELOG.md LICENSE COPYING meta plugins roles playbooks policies .ansible-lint; do
    if [[ -e $part ]]; then
        cp -a "$part" "$TREE/"
    fi
done
mkdir -p "$TREE/docs"
[[ -f docs/collection.md ]] && cp docs/collection.md "$TREE/docs/"
find "$TREE" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$TREE" -name '*.pyc' -delete
# tests/: only what sanity reads (the ignore file, if any; every line in it carries a justification).
if [[ -d tests/ansible/sanity ]]; then
    mkdir -p "$TREE/tests/sanity"
    cp tests/ansible/sanity/ignore-*.txt "$TREE/tests/sanity/" 2>/dev/null || true
fi
# ansible-test sanity only looks at files known to git when the tree is a git repository; make it one.
printf "/tests/output/\n" >"$TREE/.gitignore"
git -C "$TREE" init -q
git -C "$TREE" add -A >/dev/null

seed_get_pip() {
    local cache=$HOME/.ansible/test/cache/get_pip_${PIP_VERSION//./_}.py
    if [[ -f $cache ]]; then
        return
    fi
    mkdir -p "$(dirname "$cache")"
    cat >"$cache" <<'EOF'
# Stand-in for get-pip.py (offline): bootstrap pip with ensurepip, then install the requested packages.
import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"])
if args:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--upgrade"] + args)
EOF
    log "pre-seeded $cache"
}

rc=0
if [[ $WHAT == all || $WHAT == lint ]]; then
    log "ansible-lint --profile production"
    (
        cd "$TREE"
        export ANSIBLE_COLLECTIONS_PATH=$TMP
        export ANSIBLE_HOME=$TMP/.ansible-home
        lint_paths=(plugins playbooks policies meta galaxy.yml)
        [[ -d roles ]] && lint_paths+=(roles)
        PATH=$BIN:$PATH "$BIN/ansible-lint" --offline --profile production --strict -q "${lint_paths[@]}"
    ) || { log "ansible-lint: FAILED"; rc=1; }
fi

if [[ $WHAT == all || $WHAT == sanity ]]; then
    seed_get_pip
    log "ansible-test sanity --venv --python $PY_VERSION"
    # shellcheck disable=SC2086
    (
        cd "$TREE"
        PATH=$BIN:$PATH "$BIN/ansible-test" sanity --venv --python "$PY_VERSION" --color no \
            ${SANITY_ARGS:-}
    ) || { log "ansible-test sanity: FAILED"; rc=1; }
fi

if (( rc == 0 )); then
    log "OK"
fi
exit "$rc"
