"""Per-peer latency: the round trip of WireGuard's own handshakes, timed by the kernel, no probe packets.

Why this method. A probe over the tunnel (ICMP echo, a UDP echo to the peer's mesh IP) is dropped by
both peers' firewalls unless a policy allows it (`mesh_out`/`mesh_in` drop everything else,
docs/firewall.md), and a probe on the underlay cannot follow the data path through the NATs (only
WireGuard's own port has the mapping and the hole). WireGuard itself answers one thing: a handshake
initiation, and it handshakes every ~2 minutes on a live tunnel (REKEY_AFTER_TIME 120 s; the agent's
persistent keepalive keeps even an idle tunnel live). So the agent times those handshakes, on the path
the data takes (direct, or through the relay proxy and coturn), at zero extra packets:

* **initiator**: our handshake initiation (type 1, sender index I) leaves the WireGuard port; the
  response (type 2, receiver index I) comes back: RTT = response time - initiation time.
* **responder**: our response (type 2, sender index R) leaves; the initiator answers it at once with
  the first packet of the new session (type 4, receiver index R, counter 0: its keepalive or queued
  data): RTT = that packet's time - response time.

Both peers therefore get a sample from every handshake, whichever side starts it. Packets are read
from an AF_PACKET socket (all interfaces of the namespace, loopback too for relayed paths) whose
classic BPF filter passes only those three WireGuard message kinds (for type 4 only counter 0), so
data packets never reach Python; timestamps are the kernel's (SO_TIMESTAMPNS). A sample is
attributed to the peer whose WireGuard endpoint (configured, or where WireGuard last heard it) is
the packet's remote address.

Limits: the value includes the other side's handshake processing (a few Curve25519 operations:
visible on a LAN, noise on the internet); it is refreshed only when WireGuard
handshakes (every ~2 min, at tunnel start, and after path changes that force a new handshake; a
relayed pair moved to a new allocation keeps its session, so it shows the last handshake's value
until the next one: `latency_at` says when it was measured); it needs CAP_NET_RAW (the agent runs
as root; without it `latency_ms` stays null and `starling status` says why); IPv4 underlays only,
like the rest of the agent's NAT traversal.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.status import LatencyStatus

if TYPE_CHECKING:
    from agent.peers import PeerConnection

log = logging.getLogger("starling.agent.latency")

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: struct timespec of native longs
PENDING_MAX_AGE = 10.0  # s: WireGuard retransmits an initiation (with a new index) after 5 s
PENDING_MAX = 4096
# A responder learns the peer's address from the handshake itself (WireGuard roams to it); the agent's
# view of WireGuard's endpoint follows within a watchdog pass or two, longer on a loaded host: retry
# the attribution every 0.5 s for up to 10 s.
ATTRIBUTE_RETRIES = 20
INITIATION, RESPONSE, TRANSPORT = 1, 2, 4
INITIATION_LEN, RESPONSE_LEN, TRANSPORT_MIN = 148, 92, 32


@dataclass(frozen=True, slots=True)
class Sample:
    remote: str  # "ip:port" of the peer's WireGuard (or our relay proxy) as WireGuard talks to it
    rtt_ms: float
    role: str  # "initiator" | "responder"
    at: float  # wall time of the answer


# ----- the BPF filter -------------------------------------------------------------------------------
_LD, _LDX, _JMP, _RET = 0x00, 0x01, 0x05, 0x06
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND, _MSH = 0x20, 0x40, 0xA0
_JEQ, _JSET = 0x10, 0x40
_AD_PROTOCOL = 0xFFFFF000  # SKF_AD_OFF + SKF_AD_PROTOCOL (as an unsigned 32-bit constant)
SNAPLEN = 128


def bpf_program() -> list[tuple[int, int, int, int]]:
    """Classic BPF for a SOCK_DGRAM packet socket (data starts at the IP header): accept IPv4 UDP,
    unfragmented, whose payload starts with WireGuard type 1 or 2, or type 4 with counter 0."""
    # (code, jump-if-true label, jump-if-false label, k); labels are resolved below.
    accept, reject = "accept", "reject"
    prog: list[tuple[int, str | int, str | int, int]] = [
        (_LD | _W | _ABS, 0, 0, _AD_PROTOCOL),  # A = skb->protocol
        (_JMP | _JEQ, 0, reject, ETH_P_IP),
        (_LD | _B | _ABS, 0, 0, 9),  # IP protocol
        (_JMP | _JEQ, 0, reject, socket.IPPROTO_UDP),
        (_LD | _H | _ABS, 0, 0, 6),  # flags + fragment offset
        (_JMP | _JSET, reject, 0, 0x1FFF),
        (_LDX | _B | _MSH, 0, 0, 0),  # X = IP header length
        (_LD | _W | _IND, 0, 0, 8),  # the first 4 payload bytes (type + reserved), big-endian
        (_JMP | _JEQ, accept, 0, INITIATION << 24),
        (_JMP | _JEQ, accept, 0, RESPONSE << 24),
        (_JMP | _JEQ, 0, reject, TRANSPORT << 24),
        (_LD | _W | _IND, 0, 0, 8 + 8),  # counter, first half
        (_JMP | _JEQ, 0, reject, 0),
        (_LD | _W | _IND, 0, 0, 8 + 12),  # counter, second half
        (_JMP | _JEQ, accept, reject, 0),
    ]
    labels = {accept: len(prog), reject: len(prog) + 1}
    out: list[tuple[int, int, int, int]] = []
    for index, (code, jt, jf, k) in enumerate(prog):

        def rel(target: str | int, i: int = index) -> int:
            return labels[target] - i - 1 if isinstance(target, str) else target

        out.append((code, rel(jt), rel(jf), k))
    out += [(_RET, 0, 0, SNAPLEN), (_RET, 0, 0, 0)]
    return out


def _attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    import ctypes  # only here: the agent's start-up imports stay lean

    raw = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# ----- matching ------------------------------------------------------------------------------------
class HandshakeTimer:
    """Pairs WireGuard handshake packets by index; `packet()` returns a sample when one completes."""

    def __init__(self, port: Callable[[], int]) -> None:
        self.port = port
        self._initiations: dict[bytes, tuple[float, str]] = {}  # our sender index -> (sent at, remote)
        self._responses: dict[bytes, tuple[float, str]] = {}

    def packet(self, ip: bytes, outgoing: bool, at: float) -> Sample | None:
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_UDP:
            return None
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl : ihl + 8]
        payload = ip[ihl + 8 :]
        if len(udp) < 8 or len(payload) < 16:
            return None
        sport, dport, length = struct.unpack("!HHH", udp[:6])
        size = length - 8
        kind = payload[0]
        if payload[1:4] != b"\0\0\0":
            return None
        port = self.port()
        dst = f"{socket.inet_ntoa(ip[16:20])}:{dport}"
        if outgoing and sport == port:
            if kind == INITIATION and size == INITIATION_LEN:
                self._remember(self._initiations, payload[4:8], at, dst)
            elif kind == RESPONSE and size == RESPONSE_LEN:
                self._remember(self._responses, payload[4:8], at, dst)
            return None
        if outgoing or dport != port:
            return None
        if kind == RESPONSE and size == RESPONSE_LEN:
            sent = self._initiations.pop(payload[8:12], None)
            role = "initiator"
        elif kind == TRANSPORT and size >= TRANSPORT_MIN and payload[8:16] == b"\0" * 8:
            sent = self._responses.pop(payload[4:8], None)
            role = "responder"
        else:
            return None
        if sent is None or not 0 <= at - sent[0] < PENDING_MAX_AGE:
            return None
        return Sample(sent[1], round((at - sent[0]) * 1000, 3), role, at)

    @staticmethod
    def _remember(table: dict[bytes, tuple[float, str]], index: bytes, at: float, remote: str) -> None:
        if len(table) >= PENDING_MAX:
            for key in [k for k, (t, _) in table.items() if at - t > PENDING_MAX_AGE] or list(table)[:1]:
                del table[key]
        table[index] = (at, remote)


def attribute(sample: Sample, conns: Iterable[PeerConnection]) -> PeerConnection | None:
    """The connection whose WireGuard endpoint is the sample's remote address."""
    for conn in conns:
        if sample.remote in (conn.endpoint, conn.wg_endpoint):
            return conn
    return None


# ----- the socket -----------------------------------------------------------------------------------
class HandshakeLatency:
    """Reads handshake packets and sets `latency_ms`/`latency_at` on the matching PeerConnection."""

    def __init__(self, port: Callable[[], int], conns: Callable[[], Iterable[PeerConnection]]) -> None:
        self.timer = HandshakeTimer(port)
        self.conns = conns
        self.sock: socket.socket | None = None
        self.error: str | None = None
        self.samples = 0
        self.unattributed = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            _attach(sock, bpf_program())
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
            while True:  # packets queued before the filter was attached
                try:
                    sock.recv(SNAPLEN)
                except BlockingIOError:
                    break
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    async def run(self) -> None:
        """Until cancelled. Without CAP_NET_RAW (or AF_PACKET) it records why and returns."""
        try:
            if self.sock is None:
                self.open()
        except OSError as exc:
            self.error = f"cannot read WireGuard handshakes ({exc.strerror or exc}): latency not measured"
            log.warning("%s", self.error)
            return
        assert self.sock is not None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)
        try:
            await asyncio.Event().wait()
        finally:
            self.close()

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                data, ancillary, _flags, address = self.sock.recvmsg(SNAPLEN, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("handshake socket: %s", exc)
                return
            now = time.time()
            at = now
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("ll", value[:16])
                    kernel = sec + nsec / 1e9
                    if abs(kernel - now) < 1.0:  # sanity: a real-time stamp of this packet
                        at = kernel
            sample = self.timer.packet(data, address[2] == PACKET_OUTGOING, at)
            if sample is not None:
                self._record(sample, ATTRIBUTE_RETRIES)

    def _record(self, sample: Sample, retries: int) -> None:
        conn = attribute(sample, self.conns())
        if conn is not None:
            if sample.at >= (conn.latency_at or 0.0):
                conn.latency_ms, conn.latency_at = sample.rtt_ms, sample.at
            self.samples += 1
            log.debug("%s: handshake RTT %.3f ms (%s)", conn.name, sample.rtt_ms, sample.role)
        elif retries > 0 and self._loop is not None:
            self._loop.call_later(0.5, self._record, sample, retries - 1)
        else:
            self.unattributed += 1
            log.debug("handshake RTT %.3f ms to %s: no peer has that endpoint", sample.rtt_ms, sample.remote)

    def close(self) -> None:
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def status(self) -> LatencyStatus:
        return {
            "method": "wireguard-handshake",
            "active": self.sock is not None,
            "error": self.error,
            "samples": self.samples,
            "unattributed": self.unattributed,
        }
