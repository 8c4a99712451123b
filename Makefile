# Starling developer entry points. CI runs `make test` (through .ci/run) on a clean clone.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
BIN    := $(VENV)/bin
PYTHON := $(BIN)/python
STATE  := .state
PG_ENV := $(STATE)/pg.env
# Only the directories that exist: git keeps no empty directories, so a clean clone may lack some.
LINT_PATHS := $(wildcard coordinator agent starling_proto tests bench)
PYTEST_ARGS ?=

# Export the test database DSN (written by scripts/setup-postgres.sh) when it exists.
load_pg_env = if [[ -f $(PG_ENV) ]]; then set -a; source $(PG_ENV); set +a; fi

.PHONY: help system venv postgres lint ansible-checks test pytest test-fast galaxy-build demo demo-down openapi clean distclean \
	image wheelhouse molecule

help:
	@echo "make test          full CI run: system packages, .venv, PostgreSQL, lint, pytest, galaxy build"
	@echo "make test-fast     pytest -m 'not slow' only, no setup"
	@echo "make lint          ruff check + mypy"
	@echo "make ansible-checks  ansible-lint (production) + ansible-test sanity of the collection"
	@echo "make demo          the whole mesh in podman containers, deployed by site.yml (make demo-down removes it)"
	@echo "make galaxy-build  build the starling.mesh collection tarball into build/"
	@echo "make openapi       regenerate docs/openapi.json"
	@echo "make molecule      role scenarios and the whole-mesh scenario (mesh) in podman containers (SCENARIOS=...)"
	@echo "make image         build the local podman image localhost/starling-debian:12 (only when missing/changed)"
	@echo "make wheelhouse    wheels of this project and its dependencies for the roles (.state/wheelhouse.tar)"
	@echo "make system|venv|postgres   the individual setup steps (idempotent)"
	@echo "make clean         remove build outputs and caches (distclean: also .venv and .state)"

system:
	bash scripts/setup-system.sh

venv:
	bash scripts/setup-venv.sh

# PostgreSQL must be installed first (make -j would otherwise race the two).
postgres: system
	bash scripts/setup-postgres.sh

# Both linters run even when the first one fails.
lint:
	@rc=0; \
	echo "$(BIN)/ruff check $(LINT_PATHS)"; $(BIN)/ruff check $(LINT_PATHS) || rc=1; \
	echo "$(BIN)/mypy"; $(BIN)/mypy || rc=1; \
	exit $$rc

# Every step runs even when an earlier one fails, so that one CI run reports all problems;
# any failure (pytest's exit 5, "no tests collected", included) fails the target.
test: system venv postgres
	@failed=(); \
	$(MAKE) --no-print-directory lint || failed+=(lint); \
	$(MAKE) --no-print-directory ansible-checks || failed+=(ansible-checks); \
	$(MAKE) --no-print-directory pytest || failed+=(pytest); \
	$(MAKE) --no-print-directory galaxy-build || failed+=(galaxy-build); \
	if (( $${#failed[@]} )); then echo "make test: FAILED: $${failed[*]}" >&2; exit 1; fi; \
	echo "make test: lint, pytest and galaxy-build passed"

ansible-checks:
	bash scripts/ansible-checks.sh

# pytest with the PostgreSQL DSN exported; the exit code is pytest's own.
pytest:
	@$(load_pg_env); \
	rc=0; $(PYTHON) -m pytest -q -ra $(PYTEST_ARGS) || rc=$$?; \
	if (( rc == 5 )); then echo "pytest: no tests were collected (exit 5): treated as a failure" >&2; fi; \
	exit $$rc

test-fast:
	@$(MAKE) --no-print-directory pytest PYTEST_ARGS="-m 'not slow' $(PYTEST_ARGS)"

# The tarball name comes from galaxy.yml: <namespace>-<name>-<version>.tar.gz.
galaxy_tarball = build/$$(awk '/^(namespace|name|version):/ { k = $$1; sub(/:$$/, "", k); v = $$2; gsub(/["\047]/, "", v); m[k] = v } \
	END { print m["namespace"] "-" m["name"] "-" m["version"] ".tar.gz" }' galaxy.yml)

galaxy-build:
	@tarball=$(galaxy_tarball); \
	mkdir -p build; rm -f "$$tarball"; \
	$(BIN)/ansible-galaxy collection build --force --output-path build/; \
	if [[ ! -s $$tarball ]]; then echo "galaxy-build: $$tarball was not produced" >&2; exit 1; fi; \
	echo "galaxy-build: OK, $$tarball"

# Molecule scenarios (`make test` runs them all through tests/integration/test_molecule.py). Each step skips what
# is up to date.
image: system
	bash scripts/build-image.sh

wheelhouse: venv
	bash scripts/build-wheelhouse.sh

SCENARIOS ?=
molecule: system venv
	bash scripts/molecule.sh $(SCENARIOS)

# The demo makes .venv itself, while the image builds.
demo: system
	bash scripts/demo.sh

demo-down:
	bash scripts/demo.sh down

openapi:
	@mkdir -p docs
	$(BIN)/starling-coordinator openapi > docs/openapi.json.tmp || { rm -f docs/openapi.json.tmp; exit 1; }
	mv -f docs/openapi.json.tmp docs/openapi.json

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache tests/output docs/openapi.json.tmp
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -print0 | xargs -0 rm -rf

# Also stops the demo and removes the venv and local state (the PostgreSQL role stays; a new
# password is set on the next `make postgres`).
distclean: clean
	-bash scripts/demo.sh down
	rm -rf $(VENV) $(STATE)
