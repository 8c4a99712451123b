"""Bearer secrets (API tokens, setup keys, peer credentials): generation and hashing.

Secrets are 256-bit random strings with a type prefix; only their SHA-256 is stored, so a
leaked database does not leak credentials. (SHA-256 is right here: the inputs are random, not
passwords, and lookups must be O(1) by hash.)
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

API_TOKEN_PREFIX = "sat_"  # noqa: S105 - a type prefix, not a secret
SETUP_KEY_PREFIX = "ssk_"
PEER_CREDENTIAL_PREFIX = "spc_"


@dataclass(frozen=True, slots=True)
class NewSecret:
    clear: str
    hash: str
    display_prefix: str


def hash_secret(clear: str) -> str:
    return hashlib.sha256(clear.encode()).hexdigest()


def new_secret(prefix: str) -> NewSecret:
    clear = prefix + secrets.token_urlsafe(32)
    return NewSecret(clear=clear, hash=hash_secret(clear), display_prefix=clear[: len(prefix) + 4])


def new_id() -> str:
    return secrets.token_hex(12)
