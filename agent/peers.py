"""Per-peer connection state machine: idle -> connecting -> direct | relayed -> (lost) -> connecting.

One `PeerConnection` per remote peer in the map. It holds the remote's candidates (learned through
signal), the endpoint WireGuard uses now, and the path state; `observe()` feeds it WireGuard's
handshake times and it decides when to try the next candidate or re-offer (exponential backoff
with jitter). NAT traversal (the next issue) adds server-reflexive and relay candidates here.
"""

from __future__ import annotations

import enum
import ipaddress
import random
import time
from dataclasses import dataclass, field
from typing import Any

from agent.nat.state import PeerNat
from agent.status import CandidateWire, PeerStatus

HANDSHAKE_FRESH = 180.0  # WireGuard rekeys every 120 s; no handshake for 180 s means the path is dead
CANDIDATE_TIMEOUT = 3.0
# After a change that may have broken a direct path under us (we roamed, the peer moved), an old
# handshake proves nothing: the path must show a new handshake (or data from the peer) within
# PATH_VERIFY, else it is lost, so that candidates, offers and ICE take over at once instead of
# after HANDSHAKE_FRESH. Without proof, handshakes are forced every VERIFY_KICK from VERIFY_KICK on
# (the controlled side half a period later: two initiations crossing each other stall both ends
# for 5 s). Not sooner: re-creating the WireGuard peer drops packets of its old session in flight,
# and traffic that resumes by itself is proof enough.
PATH_VERIFY = 6.0
VERIFY_KICK = 2.0
# WireGuard's endpoint (where the peer's packets come from) replaces ours only this long after we
# pointed WireGuard somewhere ourselves: a reading taken around our change may predate it, and
# taking it would point WireGuard back at an address the peer has left.
ENDPOINT_SETTLE = 2.0


class PathState(enum.StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    DIRECT = "direct"
    RELAYED = "relayed"
    LOST = "lost"


@dataclass
class Candidate:
    address: str  # ip:port
    kind: str = "host"  # host | srflx | relay

    @property
    def ip(self) -> str:
        return self.address.rpartition(":")[0]

    def to_wire(self) -> CandidateWire:
        return {"address": self.address, "kind": self.kind}


def parse_candidates(raw: Any) -> list[Candidate]:
    """Validate candidates from a remote peer: a list of {address: "ipv4:port", kind}. Bad ones are dropped."""
    out: list[Candidate] = []
    if not isinstance(raw, list):
        return out
    for item in raw[:16]:
        if not isinstance(item, dict) or not isinstance(item.get("address"), str):
            continue
        host, _, port = item["address"].rpartition(":")
        try:
            ip = ipaddress.IPv4Address(host)
            port_n = int(port)
        except ValueError:
            continue
        if not 1 <= port_n <= 65535 or ip.is_loopback or ip.is_multicast or ip.is_unspecified:
            continue
        if ip in ipaddress.IPv4Network("100.64.0.0/10"):
            continue  # never tunnel the mesh over itself
        kind = item.get("kind", "host")
        out.append(Candidate(f"{ip}:{port_n}", kind if kind in ("host", "srflx", "relay") else "host"))
    return out


def rank(candidates: list[Candidate], local_nets: list[ipaddress.IPv4Network]) -> list[Candidate]:
    """Same-subnet host candidates first, then server-reflexive, then other host, then relay.

    A remote host address outside our subnets is usually a private LAN behind its NAT: its public
    mapping (srflx) is the better bet; a peer with a public address sends it as a host candidate.
    """
    order = {"srflx": 1, "host": 2, "relay": 3}

    def score(c: Candidate) -> int:
        ip = ipaddress.IPv4Address(c.ip)
        if c.kind == "host" and any(ip in net for net in local_nets):
            return 0
        return order.get(c.kind, 3)

    return sorted(candidates, key=score)


@dataclass
class PeerConnection:
    peer_id: str
    public_key: str
    name: str
    mesh_ip: str
    state: PathState = PathState.IDLE
    endpoint: str | None = None
    candidates: list[Candidate] = field(default_factory=list)
    candidate_index: int = 0
    since: float = field(default_factory=time.time)
    endpoint_set_at: float = 0.0
    path_changes: int = 0
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    latency_ms: float | None = None  # the last WireGuard handshake round trip (agent.latency)
    latency_at: float = 0.0  # unix time of that measurement (0: none yet)
    next_offer_at: float = 0.0
    offer_backoff: float = 1.0
    last_error: str | None = None
    offline_until: float = 0.0  # monotonic: signal said the peer is not connected (no ICE until then)
    stale_before: float = 0.0  # handshakes at or before this time belong to a path that was lost
    hold_until: float = 0.0  # monotonic: the peer just rotated its key; its first handshake is on the way
    verify_since: float = 0.0  # wall time of a change the direct path must prove itself after (0: none)
    verify_started: float = 0.0  # monotonic time of that change
    verify_until: float = 0.0  # monotonic deadline of that proof
    verify_rx: int = -1  # WireGuard's rx bytes in the first reading after the change (-1: none yet); more: proof
    next_kick: float = 0.0  # monotonic: force a handshake then, while the proof is missing
    first_endpoint_at: float = 0.0  # monotonic time of the first direct attempt of this round
    wg_endpoint: str | None = None  # where WireGuard last heard from the peer
    proxied: bool = False  # WireGuard talks to a local proxy over an ICE pair (agent.nat.fallback)
    relayed: bool = False  # ... and that pair goes through a TURN relay
    relay_server: str | None = None
    relay_transport: str | None = None  # how we reach the relay of a relayed path: udp, tcp or tls
    local_candidate: str | None = None
    remote_candidate: str | None = None
    nat: PeerNat = field(default_factory=PeerNat)  # ICE sessions, relay proxy (driven by agent.nat.fallback)

    def set_state(self, state: PathState) -> bool:
        if state == self.state:
            return False
        self.state = state
        self.since = time.time()
        self.path_changes += 1
        if state in (PathState.DIRECT, PathState.RELAYED):
            self.last_error = None  # the path works (again): what went wrong before is history
        return True

    def remote_candidates(self, candidates: list[Candidate], local_nets: list[ipaddress.IPv4Network]) -> str | None:
        """Take the remote's candidates; returns the endpoint to configure now (None: keep)."""
        ranked = rank(candidates, local_nets)
        if not ranked:
            return None
        if [c.address for c in ranked] == [c.address for c in self.candidates] and self.endpoint:
            return None
        self.candidates = ranked
        self.candidate_index = 0
        if self.proxied:
            return None  # the fallback owns the path; it uses these when it re-probes direct
        if self.state in (PathState.DIRECT, PathState.RELAYED) and self.endpoint in {c.address for c in ranked}:
            return None  # working path is still offered: do not disturb it
        return self._use(0)

    def best_direct(self) -> str | None:
        direct = [c.address for c in self.candidates if c.kind in ("host", "srflx")]
        return direct[0] if direct else None

    def _use(self, index: int) -> str:
        self.candidate_index = index
        self.endpoint = self.candidates[index].address
        self.endpoint_set_at = time.monotonic()
        if not self.first_endpoint_at or self.state == PathState.LOST:
            self.first_endpoint_at = self.endpoint_set_at
        if self.state not in (PathState.DIRECT, PathState.RELAYED):
            self.set_state(PathState.CONNECTING)
        return self.endpoint

    def reverify(self, now: float, mono: float, controlling: bool) -> None:
        """Something changed under a working direct path (our addresses, the peer's): it must prove
        itself again with a new handshake or data within PATH_VERIFY (see `observe`, `kick_due`)."""
        if self.state != PathState.DIRECT or self.proxied or not self.endpoint:
            return  # a proxied path is watched by the fallback (PROXY_SILENCE)
        self.verify_since, self.verify_started, self.verify_until = now, mono, mono + PATH_VERIFY
        self.verify_rx = -1
        self.next_kick = mono + (VERIFY_KICK if controlling else 1.5 * VERIFY_KICK)

    def kick_due(self, mono: float) -> bool:
        """Time to force a handshake (re-create the WireGuard peer) to prove the path?"""
        if not self.verify_since or mono < self.next_kick or not self.endpoint:
            return False
        self.next_kick = mono + VERIFY_KICK
        return True

    def observe(
        self, last_handshake: float, rx: int, tx: int, endpoint: str | None, now: float, taken: float | None = None
    ) -> str | None:
        """Update from WireGuard stats (read at monotonic time `taken`); returns a new endpoint to try, or None."""
        mono = time.monotonic()
        verifying = self._verify(last_handshake, rx, mono, mono if taken is None else taken)
        self.last_handshake, self.rx_bytes, self.tx_bytes = last_handshake, rx, tx
        self.wg_endpoint = endpoint
        fresh = last_handshake > self.stale_before and now - last_handshake < HANDSHAKE_FRESH
        if fresh:
            if endpoint and (mono if taken is None else taken) - self.endpoint_set_at >= ENDPOINT_SETTLE:
                self.endpoint = endpoint  # WireGuard roams to where the peer really is
            if self.set_state(PathState.RELAYED if self.proxied and self.relayed else PathState.DIRECT):
                self.offer_backoff = 1.0
            return None
        if mono < self.hold_until:
            return None  # a key swap leaves WireGuard without a handshake for a round trip: not a loss
        if verifying:
            return None  # a forced handshake is on its way (the re-created peer has none yet)
        if self.state in (PathState.DIRECT, PathState.RELAYED):
            self.set_state(PathState.LOST)
            self.next_offer_at = 0.0
            self.first_endpoint_at = 0.0
        if self.proxied:
            return None  # the fallback decides what happens to a proxied path
        if self.candidates and time.monotonic() - self.endpoint_set_at > CANDIDATE_TIMEOUT:
            nxt = (self.candidate_index + 1) % len(self.candidates)
            if len(self.candidates) > 1 or self.state == PathState.LOST:
                if self.state == PathState.LOST:
                    self.set_state(PathState.CONNECTING)
                return self._use(nxt)
        return None

    def _verify(self, last_handshake: float, rx: int, mono: float, taken: float) -> bool:
        """Advance a pending path proof; True while it is still pending. A missed deadline makes the
        path's handshakes stale, so that `observe` treats the path as lost."""
        if not self.verify_since:
            return False
        after = taken >= self.verify_started  # this reading was taken after the change
        if self.proxied or self.state != PathState.DIRECT:
            self.verify_since = 0.0  # the path changed meanwhile: whoever changed it watches it
        elif last_handshake > self.verify_since or (after and 0 <= self.verify_rx < rx):
            self.verify_since = 0.0  # proven
        elif mono >= self.verify_until:
            self.verify_since = 0.0
            self.stale_before = max(self.stale_before, last_handshake)
            self.last_error = f"no handshake or data from the peer within {PATH_VERIFY:g} s after the path changed"
        elif after and (self.verify_rx < 0 or rx < self.verify_rx):
            self.verify_rx = rx  # the baseline (again after a forced handshake restarted WireGuard's counters)
        return bool(self.verify_since)

    def offer_due(self, mono_now: float) -> bool:
        """Time to (re)send our candidates? Backs off exponentially (with jitter) while not connected."""
        if self.state in (PathState.DIRECT, PathState.RELAYED):
            return False
        if mono_now < self.next_offer_at:
            return False
        self.next_offer_at = mono_now + self.offer_backoff * random.uniform(0.8, 1.2)  # noqa: S311
        self.offer_backoff = min(self.offer_backoff * 2, 30.0)
        return True

    def peer_offline(self, mono_now: float) -> None:
        """Signal says the peer is not connected: wait for its own offer (it sends one on connect)."""
        self.next_offer_at = mono_now + 30.0
        self.offer_backoff = 30.0
        self.offline_until = mono_now + 30.0

    def status(self) -> PeerStatus:
        sent, received = self.nat.relayed_bytes()
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "public_key": self.public_key,
            "mesh_ip": self.mesh_ip,
            "path": self.state.value,
            "endpoint": self.endpoint,
            "proxied": self.proxied,
            "relay_server": self.relay_server,
            "relay_transport": self.relay_transport,
            "local_candidate": self.local_candidate,
            "remote_candidate": self.remote_candidate,
            "candidates": [c.to_wire() for c in self.candidates],
            "last_handshake": self.last_handshake or None,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "latency_ms": self.latency_ms,
            "latency_at": self.latency_at or None,
            "since": self.since,
            "path_changes": self.path_changes,
            "last_error": self.last_error,
            "proxy": self.nat.status(),
            "relayed_sent_bytes": sent,
            "relayed_received_bytes": received,
        }
