"""Signal end to end: a real coordinator issues tokens, a real `starling-signal` process brokers, and
real agent `SignalClient`s (and raw WebSockets, for misbehaviour) talk through it on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agent.signal_client import SignalClient
from agent.signal_crypto import SignalCrypto
from coordinator.signing import TokenSigner
from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.enroll import sealed_enroll
from tests.fixtures.openbao import _die_with_parent, free_port

MARKER = "PLAINTEXT-MARKER-7f3a9c"


# ----- the signal process -------------------------------------------------------------------------
@dataclass
class SignalProcess:
    workdir: Path
    config: dict[str, Any]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def log_path(self) -> Path:
        return self.workdir / "signal.log"

    def start(self, *, healthy: bool = True, timeout: float = 20.0) -> None:
        if not self.port:
            self.port = free_port()
        self.config.setdefault("listen", {}).update({"host": "127.0.0.1", "port": self.port})
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "signal.yaml").write_text(yaml.safe_dump(self.config))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "coordinator.signal.cli",
                    "--config",
                    str(self.workdir / "signal.yaml"),
                    "serve",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"signal exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(self.url + "/healthz", timeout=1).status_code
                if status == 200 or not healthy:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"signal did not become healthy:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        text = http_get(self.url + "/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        raise KeyError(name)


@contextlib.contextmanager
def running_signal(workdir: Path, config: dict[str, Any], **start: Any) -> Iterator[SignalProcess]:
    proc = SignalProcess(workdir, dict(config))
    try:
        proc.start(**start)
        yield proc
    finally:
        proc.stop()


def http_get(url: str) -> httpx.Response:
    """A quick loopback GET to another process (signal, coordinator): it never depends on the test's
    event loop, so the async tests call it directly."""
    return httpx.get(url, timeout=5)


def signing_key(coord: CoordinatorProcess) -> str:
    return (coord.workdir / "state" / "secrets" / "signing_key").read_text().strip()


@pytest.fixture(scope="module")
def signal(coordinator: CoordinatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignalProcess]:
    """Fetches the signing key from the coordinator; frames logged at debug level; no expiry leeway."""
    config = {"coordinator_url": coordinator.url, "token_leeway": 0, "log": {"level": "debug"}}
    with running_signal(tmp_path_factory.mktemp("signal"), config) as proc:
        yield proc


# ----- peers ---------------------------------------------------------------------------------------
@dataclass
class Peer:
    name: str
    private: bytes
    public: str
    credential: str
    coord_url: str

    def crypto(self) -> SignalCrypto:
        return SignalCrypto(self.private)

    async def token(self) -> str:
        async with httpx.AsyncClient(base_url=self.coord_url, timeout=10) as http:
            r = await http.post("/api/v1/peer/signal-token", headers={"Authorization": f"Bearer {self.credential}"})
            r.raise_for_status()
            return str(r.json()["token"])


@pytest.fixture(scope="module")
def enroll(coordinator: CoordinatorProcess) -> Callable[[], Peer]:
    with coordinator.client() as api:
        r = api.post("/api/v1/setup-keys", json={"name": f"sig-{uuid.uuid4().hex[:6]}", "reusable": True})
        assert r.status_code == 201, r.text
        setup_key = r.json()["key"]

    def make() -> Peer:
        key = X25519PrivateKey.generate()
        private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
        name = f"sig-{uuid.uuid4().hex[:8]}"
        r = sealed_enroll(coordinator.url, {"setup_key": setup_key, "hostname": name}, private_key=key)
        assert r.status_code == 200, r.text
        return Peer(name, private, public, r.json()["credential"], coordinator.url)

    return make


@dataclass
class Agent:
    """A SignalClient running in the background, with its callbacks collected in queues."""

    peer: Peer
    url: str
    token: Callable[[], Awaitable[str]] | None = None
    inbox: asyncio.Queue[tuple[str, str, dict[str, Any]]] = field(default_factory=asyncio.Queue)
    offline: asyncio.Queue[tuple[str, str]] = field(default_factory=asyncio.Queue)
    client: SignalClient = field(init=False)
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        async def on_message(sender: str, kind: str, body: dict[str, Any]) -> None:
            await self.inbox.put((sender, kind, body))

        async def on_offline(to: str, msg_id: str) -> None:
            await self.offline.put((to, msg_id))

        self.client = SignalClient(self.url, self.token or self.peer.token, self.peer.crypto(), on_message, on_offline)

    async def __aenter__(self) -> Agent:
        self.task = asyncio.create_task(self.client.run())
        await wait_until(lambda: self.client.connected, 5, lambda: f"not connected: {self.client.last_error}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.wait_for(self.client.close(), 5)
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)

    async def recv(self, within: float = 5.0) -> tuple[str, str, dict[str, Any]]:
        return await asyncio.wait_for(self.inbox.get(), within)


async def wait_until(predicate: Callable[[], bool], within: float, why: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s {why()}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def agents(url: str, *peers: Peer) -> AsyncIterator[list[Agent]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Agent(p, url)) for p in peers]


async def raw(url: str, token: str) -> ClientConnection:
    return await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None, max_size=None)


async def frame(ws: ClientConnection, within: float = 5.0) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), within)
    assert isinstance(data, str)
    doc: dict[str, Any] = json.loads(data)
    return doc


async def closed(ws: ClientConnection, within: float = 5.0) -> tuple[int | None, str | None]:
    """Read until the server closes; returns (code, reason)."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(within):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


async def refused(url: str, headers: dict[str, str]) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as exc:
        await connect(url, additional_headers=headers, open_timeout=5)
    response = exc.value.response
    return response.status_code, json.loads(response.body or b"{}").get("error", "")


# ----- a TCP tap between clients and signal: records exactly what signal receives and sends ---------
class Tap:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.streams: list[dict[str, bytearray]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Tap:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        record = {"to_signal": bytearray(), "from_signal": bytearray()}
        self.streams.append(record)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, buf: bytearray) -> None:
            try:
                while data := await src.read(65536):
                    buf += data
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, record["to_signal"]),
            pipe(up_reader, writer, record["from_signal"]),
            return_exceptions=True,
        )


def ws_payloads(stream: bytes) -> list[bytes]:
    """The (unmasked) payloads of the WebSocket frames after the HTTP handshake in a byte stream."""
    data = stream[stream.index(b"\r\n\r\n") + 4 :]
    out, i = [], 0
    while i + 2 <= len(data):
        masked, length = data[i + 1] & 0x80, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        mask = data[i : i + 4] if masked else b""
        i += 4 if masked else 0
        payload = data[i : i + length]
        i += length
        out.append(bytes(b ^ mask[j % 4] for j, b in enumerate(payload)) if mask else bytes(payload))
    return out


# ----- tests ---------------------------------------------------------------------------------------
async def test_offer_answer_and_candidates_end_to_end(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    alice, bob = enroll(), enroll()
    async with agents(signal.ws_url, alice, bob) as (a, b):
        offer = {"ufrag": "a1", "pwd": "p" * 22, "candidates": [{"addr": "198.18.250.1:51820", "type": "host"}]}
        assert await a.client.send(bob.public, "offer", offer)
        assert await b.recv() == (alice.public, "offer", offer)
        assert await b.client.send(alice.public, "answer", {"ufrag": "b1", "pwd": "q" * 22})
        assert await a.recv() == (bob.public, "answer", {"ufrag": "b1", "pwd": "q" * 22})
        for i in range(3):
            assert await a.client.send(bob.public, "candidate", {"addr": f"198.51.100.{i}:51820", "type": "srflx"})
        got = [await b.recv() for _ in range(3)]
        assert [body["addr"] for _, kind, body in got if kind == "candidate"] == [
            f"198.51.100.{i}:51820" for i in range(3)
        ]
        assert a.client.stats["sent"] == 4 and b.client.stats["received"] == 4
        assert a.client.last_error is None


async def test_signal_sees_only_ciphertext(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    """What crosses signal's socket (recorded by a TCP tap, client frames unmasked) and what signal logs
    at debug level carries the box intact, but never the plaintext."""
    alice, bob = enroll(), enroll()
    async with Tap(signal.port) as tap, agents(f"ws://127.0.0.1:{tap.port}/ws", alice, bob) as (a, b):
        secret = {"marker": MARKER, "candidates": [{"addr": "198.19.250.77:51820", "type": "host"}]}
        assert await a.client.send(bob.public, "offer", secret, msg_id="tap-1")
        assert await b.recv() == (alice.public, "offer", secret)
    frames = [json.loads(p) for s in tap.streams for d in s.values() for p in ws_payloads(bytes(d)) if p[:1] == b"{"]
    sent = [f for f in frames if f["type"] == "send" and f["id"] == "tap-1"]
    forwarded = [f for f in frames if f["type"] == "msg" and f["id"] == "tap-1"]
    assert len(sent) == 1 and len(forwarded) == 1
    assert forwarded[0]["box"] == sent[0]["box"] and forwarded[0]["from"] == alice.public
    wire = b"".join(p for s in tap.streams for d in s.values() for p in ws_payloads(bytes(d)))
    assert sent[0]["box"].encode() in wire  # the tap did see the payload...
    for needle in (MARKER, "198.19.250.77", '"kind"', '"offer"'):
        assert needle.encode() not in wire, needle  # ...but not what is inside it
        assert all(needle.encode() not in bytes(d) for s in tap.streams for d in s.values())
    await wait_until(lambda: sent[0]["box"] in signal.log(), 5, lambda: "frame not in the debug log")
    assert MARKER not in signal.log() and "198.19.250.77" not in signal.log()


async def test_offline_target_gets_a_notice(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    alice, absent = enroll(), enroll()
    before = signal.metric("starling_signal_messages_dropped_total", reason="offline")
    async with agents(signal.ws_url, alice) as (a,):
        assert await a.client.send(absent.public, "offer", {"x": 1}, msg_id="m-42")
        assert await asyncio.wait_for(a.offline.get(), 5) == (absent.public, "m-42")
        assert a.client.stats["offline"] == 1
    assert signal.metric("starling_signal_messages_dropped_total", reason="offline") == before + 1


async def test_bad_tokens_are_refused(
    signal: SignalProcess, coordinator: CoordinatorProcess, enroll: Callable[[], Peer]
) -> None:
    peer = enroll()
    real = TokenSigner(signing_key(coordinator))
    other_key = base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw()).decode()
    forged = TokenSigner(other_key).issue(peer.public, audience="signal", ttl=600, name=peer.name)
    expired = real.issue(peer.public, audience="signal", ttl=60, now=time.time() - 3600, name=peer.name)
    wrong_aud = real.issue(peer.public, audience="coordinator", ttl=600)
    bad_sub = real.issue("not-a-key", audience="signal", ttl=600)
    unauthorized = signal.metric("starling_signal_connections_total", result="unauthorized")
    cases = {
        "missing": ({}, "missing"),
        "garbage": ({"Authorization": "Bearer garbage"}, "malformed token"),
        "scheme": ({"Authorization": f"Basic {await peer.token()}"}, "Bearer"),
        "forged": ({"Authorization": f"Bearer {forged}"}, "bad signature"),
        "expired": ({"Authorization": f"Bearer {expired}"}, "token expired"),
        "audience": ({"Authorization": f"Bearer {wrong_aud}"}, "wrong audience"),
        "subject": ({"Authorization": f"Bearer {bad_sub}"}, "subject"),
    }
    for name, (headers, reason) in cases.items():
        status, error = await refused(signal.ws_url, headers)
        assert status == 401 and reason in error, (name, status, error)
    assert signal.metric("starling_signal_connections_total", result="unauthorized") == unauthorized + 6
    assert signal.metric("starling_signal_connections_total", result="expired") >= 1

    async def garbage() -> str:
        return "v1.garbage.token"

    agent = Agent(peer, signal.ws_url, token=garbage)
    task = asyncio.create_task(agent.client.run())
    try:
        await wait_until(lambda: agent.client.last_error is not None, 5)
        assert not agent.client.connected and "HTTP 401" in (agent.client.last_error or "")
    finally:
        await agent.client.close()
        await asyncio.wait_for(task, 5)


async def test_token_expiry_closes_the_connection_and_the_client_renews(
    signal: SignalProcess, coordinator: CoordinatorProcess, enroll: Callable[[], Peer]
) -> None:
    signer = TokenSigner(signing_key(coordinator))
    short, renewing = enroll(), enroll()
    ws = await raw(signal.ws_url, signer.issue(short.public, audience="signal", ttl=2, name=short.name))
    issued: list[int] = []

    async def tokens() -> str:  # first a token that expires in 2 s, then normal ones
        issued.append(1)
        if len(issued) == 1:
            return signer.issue(renewing.public, audience="signal", ttl=2, name=renewing.name)
        return await renewing.token()

    async with Agent(renewing, signal.ws_url, token=tokens) as agent:
        assert (await frame(ws))["type"] == "welcome"
        assert await closed(ws, 5) == (4401, "token expired")
        await wait_until(lambda: agent.client.stats["connects"] == 2 and agent.client.connected, 5)
        assert len(issued) == 2


async def test_malformed_frames_close_only_that_connection(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    alice, bob, mallory = enroll(), enroll(), enroll()
    box = base64.b64encode(b"x" * 40).decode()
    cases: list[tuple[str | bytes, str]] = [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "hello"}', "unknown frame type"),
        ('{"to": "x"}', "missing field 'type'"),
        (json.dumps({"type": "send", "to": bob.public, "id": "1"}), "missing field 'box'"),
        (json.dumps({"type": "send", "to": bob.public, "id": "1", "box": "%%%"}), "not valid base64"),
        (json.dumps({"type": "send", "to": "bob", "id": "1", "box": box}), "'to' is not a WireGuard public key"),
        (json.dumps({"type": "send", "to": bob.public[:-2] + "a=", "id": "1", "box": box}), "'to' is not"),
        (json.dumps({"type": "send", "to": bob.public, "id": "x" * 65, "box": box}), "'id' must be"),
        (json.dumps({"type": "send", "to": bob.public, "id": 7, "box": box}), "'id' must be"),
        (b"\x00binary", "binary frames are not supported"),
        ("[" * 100_000, "too large"),  # deep nesting, but over the frame limit first
        ("[" * 20_000, "not valid JSON"),
    ]
    before = signal.metric("starling_signal_messages_dropped_total", reason="malformed")
    async with agents(signal.ws_url, alice, bob) as (a, b):
        for data, reason in cases:
            ws = await raw(signal.ws_url, await mallory.token())
            assert (await frame(ws))["type"] == "welcome"
            await ws.send(data)
            error = await frame(ws)
            assert error["type"] == "error" and reason in error["reason"], (data[:40], error)
            code, close_reason = await closed(ws)
            assert code == (1009 if reason == "too large" else 1008) and reason in (close_reason or ""), data[:40]
            # the others are unaffected
            assert await a.client.send(bob.public, "candidate", {"n": len(str(data))})
            assert (await b.recv())[1] == "candidate"
        assert a.client.connected and b.client.connected
    assert signal.metric("starling_signal_messages_dropped_total", reason="malformed") == before + len(cases) - 1


async def test_oversized_frames_are_closed_with_a_reason(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    alice, bob = enroll(), enroll()
    before = signal.metric("starling_signal_messages_dropped_total", reason="too_large")
    big = json.dumps({"type": "send", "to": bob.public, "id": "big", "box": "A" * 70_000})
    ws = await raw(signal.ws_url, await alice.token())
    welcome = await frame(ws)
    assert welcome["max_frame"] == 65536
    await ws.send(big)
    assert (await frame(ws))["reason"].startswith("frame too large")
    assert await closed(ws) == (1009, f"frame too large: {len(big)} > 65536 bytes")
    assert signal.metric("starling_signal_messages_dropped_total", reason="too_large") == before + 1
    huge = await raw(signal.ws_url, await alice.token())  # beyond what the WebSocket layer buffers at all
    await frame(huge)
    await huge.send("A" * 300_000)
    code, _ = await closed(huge)
    assert code == 1009
    async with agents(signal.ws_url, alice) as (a,):  # the client refuses to send what signal would refuse
        with pytest.raises(ValueError, match="too large"):
            await a.client.send(bob.public, "offer", {"blob": "x" * 70_000})


async def test_rate_limit_drops_excess_and_counts_it(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    alice, bob = enroll(), enroll()
    before = signal.metric("starling_signal_messages_dropped_total", reason="rate_limited")
    total = 300
    async with agents(signal.ws_url, alice, bob) as (a, b):
        started = time.monotonic()
        for i in range(total):
            assert await a.client.send(bob.public, "candidate", {"i": i})
        await wait_until(lambda: b.inbox.qsize() + a.client.stats["rate_limited"] == total, 10)
        elapsed = time.monotonic() - started
        delivered, limited = b.inbox.qsize(), a.client.stats["rate_limited"]
        assert 100 <= delivered <= 100 + 50 * elapsed + 1 and limited > 0  # burst 100, then 50/s
        assert a.client.connected  # excess is dropped, the connection stays
        await asyncio.sleep(0.1)
        assert await a.client.send(bob.public, "offer", {"after": True})
        while (msg := await b.recv())[1] != "offer":
            pass
        assert msg[2] == {"after": True}
    assert signal.metric("starling_signal_messages_dropped_total", reason="rate_limited") == before + limited


async def test_persistent_abuse_is_disconnected(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    mallory = enroll()
    ws = await raw(signal.ws_url, await mallory.token())
    await frame(ws)
    for _ in range(1200):  # 100 pass (burst), over 1000 are dropped within the 10 s window
        await ws.send('{"type":"ping"}')
    code, reason = await closed(ws, 10)
    assert (code, reason) == (4429, "rate limit exceeded persistently")


async def test_a_second_connection_replaces_the_first(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    alice, bob = enroll(), enroll()
    first = await raw(signal.ws_url, await alice.token())
    assert (await frame(first)) == {"type": "welcome", "peer": alice.public, "max_frame": 65536, "version": 1}
    second = await raw(signal.ws_url, await alice.token())
    assert (await frame(second))["type"] == "welcome"
    assert await closed(first) == (4409, "replaced")
    async with agents(signal.ws_url, bob) as (b,):
        assert await b.client.send(alice.public, "offer", {"to": "second"}, msg_id="r1")
        msg = await frame(second)
        assert (msg["type"], msg["from"], msg["id"]) == ("msg", bob.public, "r1")
        assert alice.crypto().open(bob.public, msg["box"]) == ("offer", {"to": "second"})
        await second.send('{"type":"ping"}')
        assert await frame(second) == {"type": "pong"}
        await second.close()


async def test_healthz_and_metrics(signal: SignalProcess, enroll: Callable[[], Peer]) -> None:
    assert http_get(signal.url + "/healthz").json() == {"status": "ok"}
    response = http_get(signal.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for reason in ("offline", "rate_limited", "too_large", "malformed"):
        signal.metric("starling_signal_messages_dropped_total", reason=reason)
    alice, bob = enroll(), enroll()
    forwarded = signal.metric("starling_signal_messages_forwarded_total")
    accepted = signal.metric("starling_signal_connections_total", result="accepted")
    peers = signal.metric("starling_signal_connected_peers")
    async with agents(signal.ws_url, alice, bob) as (a, b):
        assert signal.metric("starling_signal_connected_peers") == peers + 2
        assert await a.client.send(bob.public, "offer", {})
        await b.recv()
        assert signal.metric("starling_signal_messages_forwarded_total") == forwarded + 1
    assert signal.metric("starling_signal_connections_total", result="accepted") == accepted + 2
    await wait_until(lambda: signal.metric("starling_signal_connected_peers") == peers, 5)


@pytest.mark.slow
async def test_restart_clients_reconnect_and_exchange_within_5s(
    coordinator: CoordinatorProcess, enroll: Callable[[], Peer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Signal configured with the key itself (no fetch); stopped and started again on the same port."""
    public = http_get(coordinator.url + "/api/v1/signing-key").json()["public_key"]
    alice, bob = enroll(), enroll()
    with running_signal(tmp_path / "restart", {"signing_public_key": public}) as sig:
        async with agents(sig.ws_url, alice, bob) as (a, b):
            assert await a.client.send(bob.public, "offer", {"round": 1})
            assert (await b.recv())[2] == {"round": 1}
            await asyncio.to_thread(sig.stop)
            await wait_until(lambda: not a.client.connected and not b.client.connected, 5)
            assert any("signal restarting (close 1012)" in r.getMessage() for r in caplog.records)
            await asyncio.sleep(1.0)  # signal stays down a moment
            await asyncio.to_thread(sig.start)
            back = time.monotonic()
            await wait_until(lambda: a.client.connected and b.client.connected, 5, lambda: f"{a.client.last_error}")
            assert await a.client.send(bob.public, "offer", {"round": 2})
            assert (await b.recv(within=5 - (time.monotonic() - back)))[2] == {"round": 2}
            assert time.monotonic() - back < 5
            assert a.client.stats["connects"] == 2 and b.client.stats["connects"] == 2


class _KeyServer(BaseHTTPRequestHandler):
    key = ""

    def do_GET(self) -> None:
        body = json.dumps({"algorithm": "Ed25519", "public_key": self.key}).encode()
        self.send_response(200 if self.path == "/api/v1/signing-key" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.slow
async def test_signal_waits_for_the_signing_key(
    coordinator: CoordinatorProcess, enroll: Callable[[], Peer], tmp_path: Path
) -> None:
    """Coordinator unreachable at start: healthz 503, handshakes 503; the key is fetched once it answers."""
    port = free_port()
    config = {"coordinator_url": f"http://127.0.0.1:{port}"}
    peer = enroll()
    with running_signal(tmp_path / "nokey", config, healthy=False) as sig:
        health = http_get(sig.url + "/healthz")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        assert (await refused(sig.ws_url, {"Authorization": f"Bearer {await peer.token()}"}))[0] == 503
        assert sig.metric("starling_signal_connections_total", result="unavailable") == 1
        _KeyServer.key = http_get(coordinator.url + "/api/v1/signing-key").json()["public_key"]
        server = ThreadingHTTPServer(("127.0.0.1", port), _KeyServer)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            await wait_until(lambda: http_get(sig.url + "/healthz").status_code == 200, 15)
        finally:
            server.shutdown()
            server.server_close()
        async with agents(sig.ws_url, peer) as (a,):
            assert a.client.connected
        assert "cannot fetch the signing key" in sig.log()


def test_cli_config_errors_exit_2_and_env_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.signal.cli import main

    key = base64.b64encode(bytes(32)).decode()
    bad = {
        "nothing.yaml": ("listen: {port: 1}\n", "signing_public_key or coordinator_url"),
        "port.yaml": (f"signing_public_key: {key}\nlisten: {{port: 70000}}\n", "listen.port"),
        "key.yaml": ("signing_public_key: abc\n", "signing_public_key"),
        "url.yaml": ("coordinator_url: ftp://x\n", "coordinator_url"),
        "extra.yaml": (f"signing_public_key: {key}\nlimits: {{frame: 1}}\n", "limits.frame"),
        "yaml.yaml": ("listen: [\n", "not valid YAML"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        assert main(["--config", str(tmp_path / name), "serve"]) == 2, name
        assert message in capsys.readouterr().err, name
    assert main(["--config", str(tmp_path / "absent.yaml"), "serve"]) == 2
    assert "cannot read config" in capsys.readouterr().err
    (tmp_path / "ok.yaml").write_text(f"signing_public_key: {key}\n")
    monkeypatch.setenv("STARLING_SIGNAL_LISTEN_PORT", "9443")
    monkeypatch.setenv("STARLING_SIGNAL_RATE", "5")
    assert main(["--config", str(tmp_path / "ok.yaml"), "check-config"]) == 0
    effective = json.loads(capsys.readouterr().out)
    assert effective["listen"]["port"] == 9443 and effective["limits"]["rate"] == 5.0
    monkeypatch.setenv("STARLING_SIGNAL_LISTEN_PORT", "x")
    assert main(["--config", str(tmp_path / "ok.yaml"), "serve"]) == 2
    assert "listen.port" in capsys.readouterr().err
    # the real process: exit status and one clear line, no traceback
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.signal.cli", "--config", str(tmp_path / "port.yaml"), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("STARLING_SIGNAL_")},
    )
    assert result.returncode == 2 and result.stderr.startswith("starling-signal: invalid config at listen.port")
    assert "Traceback" not in result.stderr
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == "0.1.0"
