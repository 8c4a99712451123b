"""Shared fixtures: a real coordinator server per test module, keys, and the PostgreSQL DSN."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.fixtures.coordinator import CoordinatorProcess, running_coordinator

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def wg_public_key() -> str:
    """A real WireGuard (X25519) public key, base64."""
    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    workdir = tmp_path_factory.mktemp("coordinator")
    config = {
        "mesh": {"turn_servers": ["turn:198.19.0.10:3478?transport=udp"], "credential_ttl": 600},
        "limits": {"max_body_bytes": 65536, "state_report_interval": 0.2},
    }
    with running_coordinator(workdir, config) as proc:
        yield proc


@pytest.fixture
def pg_dsn() -> str:
    """DSN of the PostgreSQL test database (scripts/setup-postgres.sh writes .state/pg.env)."""
    dsn = os.environ.get("STARLING_TEST_PG_DSN")
    if not dsn:
        env_file = Path(__file__).resolve().parent.parent / ".state" / "pg.env"
        if env_file.exists():
            for line in env_file.read_text().splitlines():
                if line.startswith("STARLING_TEST_PG_DSN="):
                    dsn = line.split("=", 1)[1].strip()
    if not dsn:
        if IN_CI:
            pytest.fail("STARLING_TEST_PG_DSN is not set: `make test` runs scripts/setup-postgres.sh first")
        pytest.skip("no PostgreSQL test database (run scripts/setup-postgres.sh)")
    return dsn


# ----- The molecule scenarios in the background (tests/fixtures/molecule_run.py) -------------------------------
MOLECULE_TESTS = "tests/integration/test_molecule.py::"
MOLECULE_RUN: pytest.StashKey[Any] = pytest.StashKey()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The molecule tests go last: they wait for the run that works while the other tests run."""
    molecule = [item for item in items if item.nodeid.startswith(MOLECULE_TESTS)]
    if molecule:
        items[:] = [item for item in items if not item.nodeid.startswith(MOLECULE_TESTS)] + molecule


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.option.collectonly or os.environ.get("STARLING_MOLECULE_FOREGROUND", "") not in ("", "0"):
        return
    if not any(item.nodeid.startswith(MOLECULE_TESTS) for item in session.items):
        return
    if shutil.which("podman") is None or shutil.which("nft") is None:
        return  # the tests skip themselves
    from tests.fixtures.molecule_run import start

    config.stash[MOLECULE_RUN] = start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(MOLECULE_RUN, None)
    if run is not None and run.result is None:  # the session ended before the molecule tests waited for it
        run.stop()
