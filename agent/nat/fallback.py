"""When WireGuard cannot reach a peer by itself: ICE fallback, relay proxy, and the way back to direct.

The agent first points WireGuard straight at the peer's best candidate (host or server-reflexive).
If no handshake follows within `DIRECT_TIMEOUT`, this module runs ICE (aioice, with STUN and
TURN from the network map) between the two agents over signal:

    controlling side (smaller public key)          controlled side
    gather -> "ice-offer" {ufrag,pwd,candidates} ->  gather, add remote
           <- "ice-answer" {...}                  <-
    connect (bounded)                              connect (bounded)

The controlled side asks with "ice-request" when it notices first. The nominated pair carries
WireGuard through a `PairProxy` (WireGuard endpoint = 127.0.0.1:proxy port). While on the proxy,
the controlling side re-probes every `UPGRADE_INTERVAL` with a direct-only ICE session
("probe-offer"/"probe-answer", after refreshing the public mapping); when that succeeds both sides
point WireGuard at the direct candidate again, keeping the proxy for `SWITCH_GRACE` so nothing
is lost, and close it once WireGuard receives directly. Every attempt lands in a short history
that `starling explain` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from agent.nat.state import PeerNat
from agent.nat.transport import KEEP_STREAM, RANK, Pick, RelayPicker, TurnEndpoint, turn_endpoints, udp_stun_server
from agent.peers import Candidate, PathState, PeerConnection

if TYPE_CHECKING:  # aioice is imported on first use: it costs ~0.1 s of every agent start
    from agent.nat.ice import IceParams, IceSession, SelectedPair
    from agent.nat.relay import PairProxy
    from agent.netmap import NetworkMap
    from starling_proto.netmap import RelayCredential

log = logging.getLogger("starling.agent.nat")
DIRECT_TIMEOUT = 1.2  # s without a handshake on the direct candidates before ICE starts
ICE_LIMIT = 8.0  # s for one ICE connect()
GATHER_LIMIT = 4.0  # s aioice waits for STUN/TURN answers while gathering
DIAGNOSIS_LIMIT = 2.0  # s to find out why TURN gave no relay candidate (after gathering)
PROBE_GATHER_LIMIT = 1.5  # s of gathering for a direct re-probe while UDP to the relay is blocked
ANSWER_WAIT = 9.0  # s the controlling side waits for the ice-answer (the peer picks and gathers first)
UPGRADE_INTERVAL = 5.0  # s between direct re-probes while on the relay
PROBE_LIMIT = 3.0
PROXY_SILENCE = 12.0  # s without a datagram from the peer (ICE consent checks come every ~5 s): path lost
RETRY_CAP = 10.0  # s between ICE attempts at most (so a returning relay is used within ~10 s)
SWITCH_GRACE = 3.0  # s the proxy stays after switching to direct, until WireGuard receives directly
RENEW_BEFORE = 120.0  # s before our TURN credential expires: move to a new allocation
HEAD_START = 0.8  # s head start of direct pairs over relay pairs
HEAD_START_RELAY_ONLY = 0.2  # ... when one side has no UDP beyond its LAN (only a LAN pair could win)
RETIRE_GRACE = 5.0  # s a replaced proxy keeps carrying what still arrives over the old pair
PROXY_FOLLOW = 0.6  # s the controlled side waits for the controlling side's handshake over a new pair
KINDS = ("ice-request", "ice-offer", "ice-answer", "probe-offer", "probe-answer")


class SignalLink(Protocol):
    """Where ICE messages go (agent.signal_client.SignalClient)."""

    @property
    def connected(self) -> bool: ...

    async def send(self, to_pub: str, kind: str, body: dict[str, Any], *, msg_id: str | None = None) -> bool: ...


class FallbackHost(Protocol):
    """What the fallback needs from the agent that owns it (agent.daemon.Agent): our identity and
    WireGuard port, the map's relays, the signal link, and the agent's ways to move a path."""

    @property
    def public_key(self) -> str: ...  # ours, now (it changes with key rotation)

    @property
    def port(self) -> int: ...  # WireGuard's listen port (relay proxies send to it)

    @property
    def map(self) -> NetworkMap: ...

    @property
    def signal(self) -> SignalLink | None: ...

    @property
    def tls(self) -> ssl.SSLContext | None: ...  # trust for TURN over TLS (the agent's ca_file), None: system CAs

    async def fresh_candidates(self) -> list[Candidate]: ...

    def ice_address_ok(self, address: str) -> bool: ...

    async def refresh_reflexive(self) -> None: ...

    async def send_offer(self, conn: PeerConnection) -> None: ...

    async def point_wireguard(self, conn: PeerConnection, endpoint: str, *, fresh: bool) -> None: ...

    async def nudge(self, conn: PeerConnection, endpoint: str | None = None) -> None: ...


class Fallback:
    """ICE fallback, relay proxies and direct re-probes for every peer of one agent."""

    def __init__(self, agent: FallbackHost) -> None:
        self.agent = agent
        self._closing: set[asyncio.Task[None]] = set()
        self.picker = RelayPicker(lambda: self.agent.tls)  # UDP, else TCP, else TLS to the relay

    # ----- helpers ----------------------------------------------------------------------------
    def state(self, conn: PeerConnection) -> PeerNat:
        return conn.nat

    def controlling(self, conn: PeerConnection) -> bool:
        return self.agent.public_key < conn.public_key

    def turn_options(self) -> list[tuple[TurnEndpoint, RelayCredential]]:
        """Every TURN endpoint of the map with its credential, in preference order (UDP, TCP, TLS)."""
        options: list[tuple[TurnEndpoint, RelayCredential]] = []
        for relay in self.agent.map.relays:
            options += [(e, relay) for e in turn_endpoints(relay.urls) if all(e != o for o, _ in options)]
        return sorted(options, key=lambda o: RANK[o[0].transport])  # stable: relay and URL order within one

    def _servers(
        self, with_turn: bool = True, endpoint: TurnEndpoint | None = None, udp_ok: bool = True
    ) -> dict[str, Any]:
        """IceSession's server arguments: STUN over UDP (unless UDP to the relay is known blocked: the
        server-reflexive query would only time out), TURN on `endpoint` (default: the map's first UDP one)."""
        stun = None
        if udp_ok:
            for relay in self.agent.map.relays:
                stun = stun or udp_stun_server(relay.urls)
        servers: dict[str, Any] = {
            "stun_server": stun,
            "turn_server": None,
            "turn_username": None,
            "turn_password": None,
            "turn_endpoint": None,
        }
        if not with_turn:
            return servers
        options = self.turn_options()
        if endpoint is None:
            options = [o for o in options if o[0].transport == "udp"][:1]
        for candidate, relay in options:
            if endpoint is None or candidate == endpoint:
                servers.update(
                    turn_server=candidate.address,
                    turn_username=relay.username,
                    turn_password=relay.password,
                    turn_endpoint=candidate,
                )
                break
        return servers

    def warm(self) -> None:
        """Probe the relay's transports ahead of need (cached; no-op while a fresh answer exists)."""
        endpoints = [e for e, _ in self.turn_options()]
        if endpoints:
            self.picker.warm(endpoints)

    async def _pick(self, conn: PeerConnection, st: PeerNat) -> Pick | None:
        """Which TURN endpoint this ICE attempt allocates on; notes in the history when UDP failed."""
        endpoints = [e for e, _ in self.turn_options()]
        if not endpoints:
            return None
        pick = await self.picker.pick(endpoints)
        summary = f"{pick.endpoint}: {[p.error for p in pick.probes]}"  # without round trip times
        if pick.endpoint is None:
            st.turn_unreachable = pick.error()
            if st.last_pick != summary:
                st.note(f"{conn.name}: no relay: {st.turn_unreachable}")
        else:
            st.turn_unreachable = None
            first = pick.probes[0] if pick.probes else None
            if first is not None and not first.ok and st.last_pick != summary:
                chosen = pick.endpoint
                st.note(f"{conn.name}: TURN via {chosen.label()}: {pick.describe()}")
        st.last_pick = summary
        return pick

    def credential_expiry(self) -> float:
        """Expiry (unix time) of the TURN credential the map offers now; 0 if none."""
        for relay in self.agent.map.relays:
            if relay.expires_at:
                return float(relay.expires_at)
        return 0.0

    async def _session(self, conn: PeerConnection, controlling: bool, with_turn: bool = True) -> IceSession:
        await self.agent.fresh_candidates()  # the host-candidate filter reads this cache on the loop
        st = self.state(conn)
        if with_turn:
            pick = await self._pick(conn, st)
            if pick is None or pick.endpoint is None:
                # No probe answered: try the first UDP endpoint anyway (aioice's own, longer time limit;
                # the TURN diagnosis says why if it fails); explain shows the probes (turn_unreachable).
                servers = self._servers(with_turn=True)
            else:
                servers = self._servers(with_turn=True, endpoint=pick.endpoint, udp_ok=pick.udp_ok)
            endpoint: TurnEndpoint | None = servers["turn_endpoint"]
            st.relay_server = f"{endpoint.host}:{endpoint.port}" if endpoint else None
            st.relay_transport = endpoint.transport if endpoint else None
        else:
            servers = self._servers(with_turn=False)
        from agent.nat.ice import IceSession

        session = IceSession(
            controlling=controlling,
            address_filter=self.agent.ice_address_ok,
            head_start=HEAD_START,
            turn_tls=self.agent.tls,
            **servers,
        )
        session.credential_expires = self.credential_expiry() if with_turn else 0.0
        session.relay_only = with_turn and servers["turn_endpoint"] is not None and not servers["stun_server"]
        return session

    def _gather_limit(self, with_turn: bool) -> float:
        last = self.picker.last
        if not with_turn and last is not None and not last.udp_ok:
            return PROBE_GATHER_LIMIT  # a re-probe while UDP is blocked: STUN answers now or not at all
        return GATHER_LIMIT

    async def _send(self, conn: PeerConnection, kind: str, body: dict[str, Any]) -> bool:
        signal = self.agent.signal
        if signal is None or not signal.connected:
            return False
        return bool(await signal.send(conn.public_key, kind, body))

    # ----- called by the watchdog -------------------------------------------------------------
    def due(self, conn: PeerConnection, mono: float) -> bool:
        """Direct candidates had their chance and failed: time to run ICE?"""
        st = self.state(conn)
        if st.proxy is not None or (st.task is not None and not st.task.done()) or mono < st.next_attempt:
            return False
        if conn.state not in (PathState.CONNECTING, PathState.LOST) or not conn.candidates:
            return False
        if mono < conn.offline_until:
            return False  # signal says the peer is not there: it offers to us when it comes back
        if conn.endpoint_set_at > 0 and self.udp_blocked():
            return True  # our UDP reaches no relay, so no direct attempt across networks can work: ICE now
        return conn.endpoint_set_at > 0 and mono - conn.first_endpoint_at >= DIRECT_TIMEOUT

    def udp_blocked(self) -> bool:
        """The relay answers over TCP/TLS but not over UDP (fresh probes): this network lets no UDP out."""
        endpoints = [e for e, _ in self.turn_options()]
        pick = self.picker.cached(endpoints) if endpoints else None
        return pick is not None and pick.endpoint is not None and not pick.udp_ok

    async def tick(self, conn: PeerConnection, mono: float) -> None:
        st = self.state(conn)
        if st.retiring:
            self._reap(st, mono)
        if conn.state in (PathState.IDLE, PathState.CONNECTING, PathState.LOST) and st.proxy is None:
            self.warm()  # from the first map on: the relay's transports are known by the time ICE needs them
        if self.due(conn, mono):
            st.next_attempt = mono + min(2.0 * 2 ** min(st.failures, 4), RETRY_CAP)
            if self.controlling(conn):
                st.task = asyncio.create_task(self._negotiate(conn))
            else:
                await self._send(conn, "ice-request", {})
        if st.proxy is not None:
            await self._maintain(conn, st, mono)

    async def _maintain(self, conn: PeerConnection, st: PeerNat, mono: float) -> None:
        assert st.proxy is not None
        if st.proxy.broken and not st.switching_since:
            conn.last_error = (
                f"TURN {conn.relay_server} ({st.proxy.transport}): the connection to the relay closed"
                " (relay down or restarted, or the network cut it)"
            )
            await self.path_lost(conn)
            return
        if mono - st.proxy.last_heard > PROXY_SILENCE and not st.switching_since:
            conn.last_error = f"nothing from the peer over {st.proxy.pair.describe()} for {PROXY_SILENCE:g} s"
            await self.path_lost(conn)
            return
        if not st.switching_since and self._peer_came_direct(conn, st):
            # The peer switched first (its re-probe or its own confirmation won the race): WireGuard
            # roamed to where the peer's packets come from now. Follow instead of waiting for the
            # proxy to fall silent (PROXY_SILENCE) and losing the path on the way.
            st.note(f"{conn.name}: the peer reaches WireGuard directly from {conn.wg_endpoint}: relay closed")
            await self._drop_proxy(conn, st)
            conn.set_state(PathState.DIRECT)
            await self.agent.nudge(conn)
            return
        st.rx_seen = conn.rx_bytes
        if st.switching_since:
            # Confirmed when WireGuard received something since the switch and still points direct:
            # a packet that came through the proxy would have moved its endpoint back to 127.0.0.1.
            current = conn.wg_endpoint or ""
            if conn.rx_bytes > st.rx_at_switch and current and not current.startswith("127.0.0.1:"):
                st.note(f"{conn.name}: WireGuard receives directly from {current}: relay closed")
                await self._drop_proxy(conn, st)
                conn.set_state(PathState.DIRECT)
                await self.agent.nudge(conn)  # so that the other side sees us directly too
            elif mono - st.switching_since > SWITCH_GRACE:
                st.note(f"{conn.name}: direct switch not confirmed, staying on the proxy")
                st.switching_since = 0.0
                await self.agent.point_wireguard(conn, f"127.0.0.1:{st.proxy.port}", fresh=False)
            else:
                # Keep a packet going each way while the NATs open: the first one may meet a closed hole.
                await self.agent.nudge(conn)
            return
        busy = st.task is not None and not st.task.done()
        if not busy and self._credential_ageing(st) and mono >= st.next_renewal:
            # coturn refuses to refresh an allocation once its REST credential expired: move to a
            # new allocation with the map's newer credential first (make before break). The side
            # that holds the allocation notices; the controlling side negotiates.
            st.next_renewal = mono + 5.0
            st.renewals += 1
            if self.controlling(conn):
                st.note(f"{conn.name}: TURN credential expires soon: renegotiating with the new one")
                st.task = asyncio.create_task(self._negotiate(conn))
            else:
                st.note(f"{conn.name}: TURN credential expires soon: asking the peer to renegotiate")
                await self._send(conn, "ice-request", {})
            return
        if not busy and self._udp_relay_back(st, mono):
            # Our relay is reached over TCP/TLS, and UDP to it answers again (the block was lifted):
            # move to a UDP allocation, make before break as for a credential renewal.
            if self.controlling(conn):
                st.note(f"{conn.name}: UDP reaches the relay again: renegotiating off TURN over {st.proxy.transport}")
                st.task = asyncio.create_task(self._negotiate(conn))
            else:
                st.note(f"{conn.name}: UDP reaches the relay again: asking the peer to renegotiate")
                await self._send(conn, "ice-request", {})
            return
        if self.controlling(conn) and mono >= st.next_probe:
            st.next_probe = mono + UPGRADE_INTERVAL
            probing = st.probe_task is not None and not st.probe_task.done()
            if not busy and not probing:
                st.probe_task = asyncio.create_task(self._probe(conn))

    @staticmethod
    def _peer_came_direct(conn: PeerConnection, st: PeerNat) -> bool:
        """WireGuard received more since the last pass, and its endpoint (the source of the latest
        authenticated packet) is no longer our proxy: the peer sends to us directly now."""
        current = conn.wg_endpoint or ""
        return bool(current) and not current.startswith("127.0.0.1:") and conn.rx_bytes > st.rx_seen > 0

    def _udp_relay_back(self, st: PeerNat, mono: float) -> bool:
        """While our side of the relayed pair uses TURN over TCP/TLS: has UDP to the relay come back?
        Asks at most every KEEP_STREAM s (a background STUN probe; the answer is read next time)."""
        if st.proxy is None or st.proxy.pair.local_type != "relay" or st.proxy.transport == "udp":
            return False
        if mono < st.next_transport_check:
            return False
        endpoints = [e for e, _ in self.turn_options()]
        pick = self.picker.cached(endpoints)
        if pick is None:
            self.picker.warm(endpoints)
            return False
        st.next_transport_check = mono + KEEP_STREAM
        return pick.endpoint is not None and pick.endpoint.transport == "udp"

    def _credential_ageing(self, st: PeerNat) -> bool:
        if st.session is None or st.proxy is None or st.proxy.pair.local_type != "relay":
            return False
        expires = st.session.credential_expires
        return bool(expires) and expires - time.time() < RENEW_BEFORE and self.credential_expiry() > expires

    # ----- negotiation ------------------------------------------------------------------------
    async def _negotiate(self, conn: PeerConnection) -> None:
        """Controlling side. A working proxy stays in use until the new pair replaces it."""
        st = self.state(conn)
        if st.proxy is None:
            await self._close_session(st)
        session = st.pending = await self._session(conn, controlling=True)
        try:
            async with asyncio.timeout(GATHER_LIMIT + DIAGNOSIS_LIMIT + 1):
                params = await session.gather(GATHER_LIMIT, DIAGNOSIS_LIMIT)
            st.answer = asyncio.get_running_loop().create_future()
            if not await self._send(conn, "ice-offer", params.to_wire()):
                raise ConnectionError("signal is not connected")
            try:
                async with asyncio.timeout(ANSWER_WAIT):
                    remote = await st.answer
            except TimeoutError:
                raise ConnectionError(f"no ice-answer from the peer within {ANSWER_WAIT:g} s") from None
            await self._connect(conn, st, session, remote)
        except (ConnectionError, TimeoutError, OSError, ValueError) as exc:
            self._failed(conn, st, str(exc) or type(exc).__name__, session)
        finally:
            self._settle(st, session)

    async def _answer(self, conn: PeerConnection, remote: IceParams) -> None:
        """Controlled side: same make-before-break as `_negotiate`."""
        st = self.state(conn)
        if st.proxy is None:
            await self._close_session(st)
        session = st.pending = await self._session(conn, controlling=False)
        try:
            async with asyncio.timeout(GATHER_LIMIT + DIAGNOSIS_LIMIT + 1):
                params = await session.gather(GATHER_LIMIT, DIAGNOSIS_LIMIT)
            if not await self._send(conn, "ice-answer", params.to_wire()):
                raise ConnectionError("signal is not connected")
            await self._connect(conn, st, session, remote)
        except (ConnectionError, TimeoutError, OSError, ValueError) as exc:
            self._failed(conn, st, str(exc) or type(exc).__name__, session)
        finally:
            self._settle(st, session)

    def _settle(self, st: PeerNat, session: IceSession) -> None:
        """A negotiation ended: its session is either in use now or closed."""
        if st.pending is session:
            st.pending = None
        if st.session is not session:
            self._close_later(session)

    async def _connect(self, conn: PeerConnection, st: PeerNat, session: IceSession, remote: IceParams) -> None:
        if remote.relay_only or session.relay_only:
            session.shorten_head_start(HEAD_START_RELAY_ONLY)
        used = await session.set_remote(remote)
        st.note(f"{conn.name}: ICE with {used} remote candidates, local {session.local_types}")
        if session.turn_error:
            st.note(f"{conn.name}: no relay candidate: {session.turn_error}")
            self.picker.forget()  # no allocation on the picked endpoint: probe afresh next time
        # The probes name every transport tried; the TURN diagnosis only the endpoint aioice used.
        reason = st.turn_unreachable or session.turn_error
        if reason:
            conn.last_error = reason
        pair = await session.connect(ICE_LIMIT)
        for desc, result in session.pairs_tried:
            st.history.append(f"    pair {desc}: {result}")
        await self._use_pair(conn, st, pair, session)

    async def _use_pair(self, conn: PeerConnection, st: PeerNat, pair: SelectedPair, session: IceSession) -> None:
        if conn.state == PathState.DIRECT and not conn.proxied:
            st.note(f"{conn.name}: ICE selected {pair.describe()}, but WireGuard already works directly: kept")
            return
        from agent.nat.relay import PairProxy

        replacing = st.proxy is not None  # WireGuard's session stays; only its endpoint moves
        if replacing:
            self._retire(st)
        else:
            await self._drop_proxy(conn, st)
        st.session = session
        proxy = PairProxy(pair, self.agent.port)
        port = await proxy.start()
        st.proxy, st.failures, st.switching_since, st.rx_seen = proxy, 0, 0.0, 0
        st.next_probe = time.monotonic() + UPGRADE_INTERVAL
        conn.proxied, conn.relayed = True, pair.relayed
        conn.local_candidate, conn.remote_candidate = (
            f"{pair.local_type} {pair.local_address[0]}:{pair.local_address[1]}",
            f"{pair.remote_type} {pair.remote_address[0]}:{pair.remote_address[1]}",
        )
        if pair.local_type == "relay":  # our own allocation
            conn.relay_server, conn.relay_transport = st.relay_server, pair.turn_transport
        elif pair.relayed:  # the peer's allocation, which we reach over UDP
            conn.relay_server = f"{pair.remote_address[0]}:{pair.remote_address[1]} (the peer's allocation)"
            conn.relay_transport = "udp"
        else:
            conn.relay_server = conn.relay_transport = None
        how = f"relayed via {conn.relay_server} ({conn.relay_transport})" if pair.relayed else "direct"
        st.note(f"{conn.name}: ICE selected {pair.describe()} ({how} via proxy)")
        if replacing or self.controlling(conn):
            await self.agent.point_wireguard(conn, f"127.0.0.1:{port}", fresh=not replacing)
        else:
            # Both ends take the pair at the same moment: two fresh WireGuard peers would send crossing
            # initiations (each end then drops the response to its own, and the next try is 5 s away).
            # As on the direct path, the controlling side initiates; we only move the endpoint, and
            # initiate ourselves PROXY_FOLLOW later if no handshake came through by then.
            await self.agent.point_wireguard(conn, f"127.0.0.1:{port}", fresh=False)
            task = asyncio.create_task(self._follow_proxy(conn, proxy, conn.last_handshake))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if not pair.relayed:
            # A direct pair works between the ICE sockets: WireGuard can most likely go direct by
            # itself too. Try it with the proxy as the safety net (Python stays off the data path).
            await self.agent.refresh_reflexive()
            await self.agent.send_offer(conn)
            st.next_probe = time.monotonic() + 1.0

    async def _follow_proxy(self, conn: PeerConnection, proxy: PairProxy, handshake_before: float) -> None:
        await asyncio.sleep(PROXY_FOLLOW)
        if conn.nat.proxy is proxy and conn.last_handshake <= handshake_before:
            await self.agent.point_wireguard(conn, f"127.0.0.1:{proxy.port}", fresh=True)

    def _failed(self, conn: PeerConnection, st: PeerNat, why: str, session: IceSession | None = None) -> None:
        st.failures += 1
        turn_error = st.turn_unreachable or (session.turn_error if session is not None else None)
        conn.last_error = f"ICE failed: {why}" + (f" ({turn_error})" if turn_error else "")
        st.note(f"{conn.name}: ICE attempt {st.failures} failed: {why}")

    # ----- direct re-probe while relayed ------------------------------------------------------
    async def _probe(self, conn: PeerConnection) -> None:
        st = self.state(conn)
        await self.agent.refresh_reflexive()
        if st.probe is not None:
            self._close_later(st.probe)
        probe = st.probe = await self._session(conn, controlling=True, with_turn=False)
        limit = self._gather_limit(with_turn=False)
        try:
            async with asyncio.timeout(limit + 1):
                params = await probe.gather(limit)
            st.probe_answer = asyncio.get_running_loop().create_future()
            await self.agent.send_offer(conn)
            if not await self._send(conn, "probe-offer", params.to_wire()):
                return
            async with asyncio.timeout(3):
                remote = await st.probe_answer
            await probe.set_remote(remote)
            await probe.connect(PROBE_LIMIT)
            await self._switch_direct(conn, st)
            # The controlled side completes its own checks a moment later: closing now would fail them.
            await asyncio.sleep(PROBE_LIMIT)
        except (ConnectionError, TimeoutError, OSError, ValueError) as exc:
            log.debug("%s: direct probe failed: %s", conn.name, exc)
        finally:
            self._close_later(probe)
            st.probe = None

    async def _probe_answer(self, conn: PeerConnection, remote: IceParams) -> None:
        st = self.state(conn)
        await self.agent.refresh_reflexive()
        probe = await self._session(conn, controlling=False, with_turn=False)
        limit = self._gather_limit(with_turn=False)
        try:
            async with asyncio.timeout(limit + 1):
                params = await probe.gather(limit)
            await self.agent.send_offer(conn)
            if not await self._send(conn, "probe-answer", params.to_wire()):
                return
            await probe.set_remote(remote)
            await probe.connect(PROBE_LIMIT)
            await self._switch_direct(conn, st)
        except (ConnectionError, TimeoutError, OSError, ValueError) as exc:
            log.debug("%s: direct probe (answer) failed: %s", conn.name, exc)
        finally:
            self._close_later(probe)

    async def _switch_direct(self, conn: PeerConnection, st: PeerNat) -> None:
        target = conn.best_direct()
        if st.proxy is None or target is None:
            return
        st.note(f"{conn.name}: direct path works again: WireGuard -> {target}, relay kept for {SWITCH_GRACE:g} s")
        st.switching_since, st.rx_at_switch = time.monotonic(), conn.rx_bytes
        await self.agent.point_wireguard(conn, target, fresh=False)
        await self.agent.nudge(conn)

    # ----- signal messages --------------------------------------------------------------------
    async def on_message(self, conn: PeerConnection, kind: str, body: Any) -> None:
        st = self.state(conn)
        if kind == "ice-request":
            if self.controlling(conn) and (st.task is None or st.task.done()) and st.switching_since == 0:
                st.next_attempt = time.monotonic() + 2.0
                st.task = asyncio.create_task(self._negotiate(conn))
            return
        from agent.nat.ice import IceParams

        try:
            params = IceParams.from_wire(body)
        except ValueError as exc:
            st.note(f"{conn.name}: refused {kind}: {exc}")
            return
        if kind == "ice-offer" and not self.controlling(conn):
            st.next_attempt = time.monotonic() + 2.0
            if st.task is not None and not st.task.done():
                st.task.cancel()
            st.task = asyncio.create_task(self._answer(conn, params))
        elif kind == "ice-answer" and st.answer is not None and not st.answer.done():
            st.answer.set_result(params)
        elif kind == "probe-offer" and not self.controlling(conn):
            asyncio.create_task(self._probe_answer(conn, params))  # noqa: RUF006 - bounded by its own timeouts
        elif kind == "probe-answer" and st.probe_answer is not None and not st.probe_answer.done():
            st.probe_answer.set_result(params)

    # ----- teardown ---------------------------------------------------------------------------
    async def _drop_proxy(self, conn: PeerConnection, st: PeerNat, close_session: bool = True) -> None:
        if st.proxy is not None:
            if st.proxy.pair.relayed:
                st.relayed_sent += st.proxy.to_peer_bytes
                st.relayed_received += st.proxy.from_peer_bytes
            st.proxy.close()
            st.proxy = None
        st.switching_since = 0.0
        conn.proxied = conn.relayed = False
        conn.relay_server = conn.relay_transport = None
        if close_session:
            await self._close_session(st)

    def _retire(self, st: PeerNat) -> None:
        """Replace without a gap: the peer moves to the new pair a moment after us (its own checks
        complete later), and until then its packets still come over the old pair. The old proxy keeps
        handing them to WireGuard (which follows them to the old proxy's port and back, by roaming)
        for RETIRE_GRACE s, then it closes with its session."""
        if st.proxy is not None:
            st.retiring.append((st.proxy, st.session, time.monotonic() + RETIRE_GRACE))
        elif st.session is not None:
            self._close_later(st.session)
        st.proxy = st.session = None

    def _reap(self, st: PeerNat, mono: float, everything: bool = False) -> None:
        """Close the retiring proxies whose grace is over (all of them with `everything`)."""
        keep: list[tuple[PairProxy, IceSession | None, float]] = []
        for proxy, session, until in st.retiring:
            if not everything and mono < until:
                keep.append((proxy, session, until))
                continue
            if proxy.pair.relayed:
                st.relayed_sent += proxy.to_peer_bytes
                st.relayed_received += proxy.from_peer_bytes
            proxy.close()
            if session is not None:
                self._close_later(session)
        st.retiring = keep

    async def _close_session(self, st: PeerNat) -> None:
        if st.session is not None:
            session, st.session = st.session, None
            self._close_later(session)

    def _close_later(self, session: IceSession) -> None:
        """Close in the background: deleting a TURN allocation waits for the server, which may be the
        very thing that just died (~40 s of retries). The watchdog must never wait for that."""

        async def close() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await session.close()

        task = asyncio.create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def path_lost(self, conn: PeerConnection) -> None:
        """The proxied path stopped carrying handshakes: back to direct attempts, then ICE again."""
        st = self.state(conn)
        if st.proxy is not None:
            st.note(f"{conn.name}: {'relayed' if conn.relayed else 'proxied'} path lost")
            if st.proxy.pair.local_type == "relay":
                self.picker.forget()  # the relay (or the way to it) may be gone: probe its transports again
            await self._drop_proxy(conn, st)
            st.next_attempt = 0.0
            conn.stale_before = conn.last_handshake  # the old path's handshake proves nothing now
            conn.set_state(PathState.CONNECTING)
            conn.first_endpoint_at = time.monotonic()
            target = conn.best_direct()
            if target is not None:
                await self.agent.point_wireguard(conn, target, fresh=True)

    async def forget(self, conn: PeerConnection) -> None:
        """Close the peer's ICE sessions and proxy (it left the map, or the agent stops)."""
        st, conn.nat = conn.nat, PeerNat()
        for task in (st.task, st.probe_task):
            if task is not None:
                task.cancel()
        if st.proxy is not None:
            st.proxy.close()
        self._reap(st, 0.0, everything=True)
        if st.pending is not None:
            self._close_later(st.pending)
        await self._close_session(st)

    async def close(self, conns: Iterable[PeerConnection]) -> None:
        for conn in list(conns):
            await self.forget(conn)
        if self._closing:  # give TURN allocations a moment to be deleted on the way out
            await asyncio.wait(list(self._closing), timeout=2)
