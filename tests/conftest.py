"""Shared fixtures: a real coordinator server per test module, keys, and the PostgreSQL DSN."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

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
