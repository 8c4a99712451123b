"""Key rotation on the rotating peer: `starling key reload` (`KeyRotator`, owned by the agent, which it
reaches through the `RotationHost` protocol).

The order is what keeps traffic flowing (docs/vault.md, "Why no packet is lost"):

1. Read the new key from the key source (Vault: the latest version). Nothing has changed if this
   fails, or if the coordinator refuses the `prepare` step (wrong previous key, key taken).
2. Switch WireGuard's private key. wireguard-go stops *sending* on the old sessions but still
   *decrypts* what neighbours send on them, so their traffic keeps arriving; ours waits in
   WireGuard's per-peer queue (it cannot complete a handshake until neighbours know the new key).
3. `commit`: the coordinator pushes the new key to every peer that may reach us. Each neighbour
   replaces our old key by the new one in one device update, with a keepalive, which starts a
   handshake at once; the queued packets then flow both ways. If the commit fails, WireGuard goes
   back to the old key and the neighbours never noticed.
4. Verify: every neighbour that had a live tunnel before the switch must complete a handshake with
   the new key within the timeout; the agent reports the outcome to the coordinator's audit log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from agent.client import CoordinatorError, PeerApi
from agent.keys import KeyError_, KeySource, public_key_of
from agent.netmap import NetworkMap
from agent.wg.backend import PeerStats, WireGuardBackend, WireGuardError

log = logging.getLogger(__name__)

LIVE_TUNNEL = 180.0  # a neighbour with a handshake this recent (s) must handshake again after a switch


class RekeyError(Exception):
    """A key reload failed; `stage` says how far it got and `switched` whether the key changed."""

    def __init__(self, message: str, stage: str, *, switched: bool = False, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.stage = stage
        self.switched = switched
        self.detail = detail or {}


class RotationHost(Protocol):
    """What key rotation needs from the agent (agent.daemon.Agent): the key source, WireGuard, the
    coordinator's peer API, the map, the key it runs with, and a way to run with another one."""

    @property
    def keys(self) -> KeySource: ...

    @property
    def backend(self) -> WireGuardBackend: ...

    @property
    def api(self) -> PeerApi: ...

    @property
    def map(self) -> NetworkMap: ...

    @property
    def private_key(self) -> str: ...

    @property
    def public_key(self) -> str: ...

    def adopt_key(self, private_key: str, public_key: str) -> None:
        """Run with this key from now on (WireGuard already does): our identity everywhere else."""

    def renew_signal_identity(self) -> None:
        """Signal admits us by our public key and seals with our private key: reconnect with the new one."""

    def wireguard_peers(self) -> dict[str, PeerStats]: ...

    def peer_name(self, public_key: str) -> str | None:
        """The name of the neighbour with this key; None if it is no (longer a) neighbour."""

    async def event(self, kind: str, message: str) -> None: ...


class KeyRotator:
    """Key reloads and the start-up key presentation, one at a time; remembers the key before the last
    switch (to repair a commit that never reached the coordinator)."""

    def __init__(self, host: RotationHost) -> None:
        self.host = host
        self._lock = asyncio.Lock()
        self._previous_private: str | None = None

    async def reload(self, expect_public_key: str | None = None, verify_timeout: float = 30.0) -> dict[str, Any]:
        async with self._lock:
            try:
                return await self._reload(expect_public_key, verify_timeout)
            except RekeyError as exc:
                await self.host.event("key.failed", f"key reload failed at {exc.stage}: {exc}")
                raise

    async def _reload(self, expect: str | None, verify_timeout: float) -> dict[str, Any]:
        try:
            new_private = await asyncio.to_thread(self.host.keys.reload)
        except KeyError_ as exc:
            raise RekeyError(f"cannot read the new key: {exc}", "source") from exc
        new_public = public_key_of(new_private)
        version = self.host.keys.version
        if expect and new_public != expect:
            raise RekeyError(
                f"{self.host.keys.name} returned public key {new_public[:8]}..., expected {expect[:8]}... "
                "(stale replica, or rotated again meanwhile?)",
                "source",
            )
        held = self.host.map.me.public_key if self.host.map.me else self.host.public_key
        result: dict[str, Any] = {"public_key": new_public, "version": version, "source": self.host.keys.name}
        if new_public == self.host.public_key:
            if held != new_public:
                # An earlier rotation switched WireGuard but its commit never reached the coordinator.
                await self._change(new_private, held, "commit", version, "commit")
                self.host.map.set_my_key(new_public)
                return {**result, "changed": True, "repaired": True}
            return {**result, "changed": False}

        old_private, old_public = self.host.private_key, self.host.public_key
        await self._change(new_private, held, "prepare", version, "prepare")
        before = await asyncio.to_thread(self.host.wireguard_peers)
        now = time.time()
        expected = {
            key
            for key, st in before.items()
            if self.host.peer_name(key) is not None and st.last_handshake and now - st.last_handshake < LIVE_TUNNEL
        }
        switched_at = time.time()
        try:
            await asyncio.to_thread(self.host.backend.set_private_key, new_private)
        except WireGuardError as exc:
            raise RekeyError(f"WireGuard refused the new key: {exc}", "switch") from exc
        self.host.adopt_key(new_private, new_public)
        self._previous_private = old_private
        try:
            await self._change(new_private, held, "commit", version, "commit")
        except RekeyError:
            await asyncio.to_thread(self.host.backend.set_private_key, old_private)
            self.host.adopt_key(old_private, old_public)
            log.warning("key rotation: commit failed, WireGuard is back on the old key")
            raise
        self.host.map.set_my_key(new_public)  # the coordinator's view now (its map delta confirms it)
        log.info("key rotated: %s... -> %s... (version %s)", old_public[:8], new_public[:8], version)
        self.host.renew_signal_identity()
        handshakes, missing = await self._verify(expected, switched_at, verify_timeout)
        names = {key: self.host.peer_name(key) or key[:8] for key in expected}
        result |= {
            "changed": True,
            "previous_public_key": old_public,
            "switched_at": switched_at,
            "handshakes": {names[k]: round(v, 3) for k, v in handshakes.items()},
            "missing": sorted(names[k] for k in missing),
        }
        if missing:
            raise RekeyError(
                f"no handshake with the new key from {', '.join(result['missing'])} within {verify_timeout:g}s",
                "verify",
                switched=True,
                detail=result,
            )
        slowest = max(handshakes.values(), default=0.0)
        await self.host.event(
            "key.verified",
            f"key {old_public[:8]}... -> {new_public[:8]}... (version {version}): "
            f"{len(handshakes)} neighbour(s) handshook again, slowest {slowest:.2f}s",
        )
        return result

    async def present(self) -> None:
        """The coordinator holds another key than the one we run with: the key was rotated in the
        source while this agent was down (or an earlier commit was lost). Present ours, guarded by the
        key the coordinator holds; neighbours then switch as in a rotation."""
        async with self._lock:
            held = self.host.map.me.public_key if self.host.map.me else self.host.public_key
            if held == self.host.public_key:
                return
            try:
                await self._change(self.host.private_key, held, "commit", self.host.keys.version, "commit")
            except RekeyError as exc:
                log.error("the coordinator holds key %s... for us, not ours: %s", held[:8], exc)
                return
            self.host.map.set_my_key(self.host.public_key)
            log.warning("presented our key %s... (the coordinator held %s...)", self.host.public_key[:8], held[:8])
            await self.host.event(
                "key.reloaded", f"key {held[:8]}... -> {self.host.public_key[:8]}... presented at start-up"
            )

    async def _change(
        self,
        new_private: str,
        held: str,
        phase: str,
        version: int | None,
        stage: str,
    ) -> None:
        """Present `new_private`'s public key, sealed with it and with the private key of `held` (the key the
        coordinator holds): ours now, the previous one kept in memory, or an earlier version in the source."""
        held_private = await self._private_for(held)
        if held_private is None:
            raise RekeyError(
                f"cannot prove possession of the key the coordinator holds ({held[:8]}...): it is neither our "
                f"key nor in {self.host.keys.name}'s history; remove this peer and enroll again",
                stage,
            )
        try:
            await self.host.api.change_key(held_private, new_private, phase, version, self.host.keys.name)
        except CoordinatorError as exc:
            raise RekeyError(f"the coordinator did not take the new key ({phase}): {exc}", stage) from exc

    async def _private_for(self, public: str) -> str | None:
        if public == self.host.public_key:
            return self.host.private_key
        if self._previous_private is not None and public_key_of(self._previous_private) == public:
            return self._previous_private
        try:
            return await asyncio.to_thread(self.host.keys.find, public)
        except KeyError_ as exc:
            log.warning("cannot look up an earlier key in %s: %s", self.host.keys.name, exc)
            return None

    async def _verify(self, expected: set[str], switched_at: float, wait: float) -> tuple[dict[str, float], set[str]]:
        done: dict[str, float] = {}
        deadline = time.monotonic() + wait
        while True:
            stats = await asyncio.to_thread(self.host.wireguard_peers)
            for key in expected - set(done):
                st = stats.get(key)
                if st is not None and st.last_handshake > switched_at:
                    done[key] = st.last_handshake - switched_at
            missing = {
                k for k in expected - set(done) if self.host.peer_name(k) is not None
            }  # a peer removed meanwhile is not owed
            if not missing or time.monotonic() >= deadline:
                return done, missing
            await asyncio.sleep(0.1)
