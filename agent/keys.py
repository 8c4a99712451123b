"""Key sources: where the agent's WireGuard private key comes from.

`KeySource` is the interface; `FileKeySource` keeps the key in a 0600 file (generated on first use);
`agent.vault_keys.VaultKeySource` reads it from Vault/OpenBao KV v2 with AppRole (`make_key_source` picks
one from agent.yaml's `key_source`; the Vault module is imported only for a Vault source). `load()` gives the
key at start-up (a source may fall back to a cached copy); `reload()` asks the source again for key
rotation and never falls back.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.config import write_private


class KeyError_(Exception):
    pass


def public_key_of(private_b64: str) -> str:
    raw = decode_key(private_b64)
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return base64.b64encode(pub).decode()


def decode_key(value: str) -> bytes:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyError_("WireGuard key is not valid base64") from exc
    if len(raw) != 32:
        raise KeyError_("WireGuard key must be 32 bytes")
    return raw


def private_key_object(private_b64: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(decode_key(private_b64))


def generate_private_key() -> str:
    raw = X25519PrivateKey.generate().private_bytes_raw()
    clamped = bytearray(raw)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return base64.b64encode(bytes(clamped)).decode()


class KeySource(Protocol):
    name: str
    version: int | None

    def load(self) -> str:
        """The private key (base64) to start with."""
        ...

    def reload(self) -> str:
        """The source's current private key, asked again (key rotation)."""
        ...

    def maintain(self) -> None:
        """Periodic upkeep (token renewal); cheap when there is nothing to do."""
        ...

    def find(self, public_key: str) -> str | None:
        """An earlier private key of this source whose public key is `public_key`, if the source keeps
        history (Vault versions); None otherwise. Used to prove the key the coordinator still holds."""
        ...


class FileKeySource:
    name = "file"
    version: int | None = None

    def __init__(self, path: Path) -> None:
        self.path = path

    def reload(self) -> str:
        return self.load()

    def maintain(self) -> None:
        pass

    def find(self, public_key: str) -> str | None:
        return None  # a key file keeps no history

    def load(self) -> str:
        if not self.path.exists():
            write_private(self.path, generate_private_key() + "\n")
        try:
            text = self.path.read_text().strip()
        except OSError as exc:
            raise KeyError_(f"cannot read private key {self.path}: {exc.strerror}") from exc
        try:
            decode_key(text)
        except KeyError_ as exc:
            raise KeyError_(f"private key file {self.path} is corrupt: {exc}") from exc
        if self.path.stat().st_mode & 0o077:
            raise KeyError_(f"private key file {self.path} is readable by others: chmod 600 it")
        return text


def make_key_source(spec: dict[str, Any], state_dir: Path) -> KeySource:
    """The key source agent.yaml's `key_source` names: `file` (default) or `vault`."""
    kind = spec.get("type", "file")
    if kind == "file":
        return FileKeySource(Path(spec.get("path", state_dir / "private.key")))
    if kind == "vault":
        from agent.vault_keys import VaultKeySource

        return VaultKeySource(spec, state_dir)
    raise KeyError_(f"key_source.type {kind!r} is not supported (file, vault)")
