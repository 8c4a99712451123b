"""The agent's one reconnect policy (agent.backoff): its schedule, and that the map stream and the signal
client both follow it, so the control plane is picked up within the cap of its return."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.backoff import RECONNECT_BASE, RECONNECT_CAP, RESTART_CAP, Backoff
from agent.client import CoordinatorError
from agent.keys import decode_key, generate_private_key
from agent.signal_client import SignalClient
from agent.signal_crypto import SignalCrypto
from starling_proto.signal import CLOSE_REPLACED, CLOSE_SERVICE_RESTART
from tests.unit.test_agent_map_follow import golden_map, make_agent


class RecordingBackoff(Backoff):
    """The policy with the largest jitter draw (the worst case), recording every wait it hands out."""

    def __init__(self) -> None:
        super().__init__(rng=lambda: 1.0)
        self.waits: list[float] = []
        self.resets = 0

    def next(self, cap: float | None = None) -> float:
        wait = super().next(cap)
        self.waits.append(wait)
        return wait

    def reset(self) -> None:
        super().reset()
        self.resets += 1


def test_the_schedule_doubles_from_the_base_to_the_cap_and_stays_there() -> None:
    b = Backoff(rng=lambda: 1.0)
    waits = [round(b.next(), 6) for _ in range(10)]
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert (RECONNECT_BASE, RECONNECT_CAP) == (0.2, 4.0)
    assert max(Backoff().next() for _ in range(200)) <= RECONNECT_CAP  # the real jitter never exceeds it
    b.reset()
    assert b.next() == pytest.approx(0.2)


def test_full_jitter_draws_between_zero_and_the_limit() -> None:
    draws = iter([0.0, 0.5, 0.25])
    b = Backoff(rng=lambda: next(draws))
    assert [b.next(), b.next(), b.next()] == pytest.approx([0.0, 0.2, 0.2])  # 0 * 0.2, 0.5 * 0.4, 0.25 * 0.8


def test_a_lower_cap_for_one_wait_and_exhaustion() -> None:
    b = Backoff(rng=lambda: 1.0)
    for _ in range(8):
        b.next()
    assert b.next(RESTART_CAP) == pytest.approx(1.0)  # signal restarting: the 1 s cap
    assert b.next() == pytest.approx(4.0)
    b.reset()
    b.exhaust()
    assert b.next() == pytest.approx(RECONNECT_CAP)  # replaced: wait the full cap, never longer
    with pytest.raises(ValueError, match="base"):
        Backoff(base=0.0)
    with pytest.raises(ValueError, match="base"):
        Backoff(base=5.0, cap=4.0)


class FailingApi:
    """A coordinator that is down for `failures` attempts, then serves the map and stays connected."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0

    async def stream(self) -> AsyncIterator[tuple[str, Any]]:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise CoordinatorError("map stream lost: ConnectError")
        yield "map", golden_map()
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


async def test_the_map_stream_retries_on_the_policy_and_resets_once_a_map_arrived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _ = make_agent(tmp_path, [])
    api = FailingApi(failures=12)
    agent.api = api  # type: ignore[assignment]
    backoff = agent.map_backoff = RecordingBackoff()
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        slept.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr("agent.daemon.asyncio.sleep", fake_sleep)
    task = asyncio.create_task(agent._follow_map())
    try:
        async with asyncio.timeout(5):
            while not agent.management.connected:
                await real_sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert api.attempts == 13
    assert backoff.waits[:12] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2] + [4.0] * 7)
    assert slept[:12] == backoff.waits[:12]  # the follower sleeps exactly what the policy says
    assert max(slept) <= RECONNECT_CAP
    assert backoff.resets == 1 and backoff.attempt == 0  # connected: the next outage starts from the base


async def test_the_signal_client_uses_the_same_policy() -> None:
    crypto = SignalCrypto(decode_key(generate_private_key()))

    async def token() -> str:
        raise CoordinatorError("coordinator unreachable: ConnectError")

    async def on_message(sender: str, kind: str, body: dict[str, Any]) -> None:
        pass

    client = SignalClient("ws://198.18.0.1:9/ws", token, crypto, on_message)
    policy = client._backoff
    assert isinstance(policy, Backoff)
    assert (policy.base, policy.cap) == (RECONNECT_BASE, RECONNECT_CAP)
    client._backoff = RecordingBackoff()
    waits = [client._next_delay() for _ in range(10)]
    assert max(waits) == pytest.approx(RECONNECT_CAP)
    client._closed(CLOSE_SERVICE_RESTART, "")  # signal restarting: 1 s cap for a while
    assert client._next_delay() == pytest.approx(RESTART_CAP)
    client._fast_until = 0.0
    client._closed(CLOSE_REPLACED, "replaced")
    assert client._next_delay() == pytest.approx(RECONNECT_CAP)


async def test_the_signal_client_waits_on_the_policy_while_the_token_cannot_be_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connect loop itself: every failed attempt (no token: the coordinator is down) is followed by
    one wait of the policy, and no wait exceeds the cap."""
    crypto = SignalCrypto(decode_key(generate_private_key()))
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        raise CoordinatorError("coordinator unreachable: ConnectError")

    async def on_message(sender: str, kind: str, body: dict[str, Any]) -> None:
        pass

    client = SignalClient("ws://198.18.0.1:9/ws", token, crypto, on_message)
    backoff = client._backoff = RecordingBackoff()
    waited: list[float] = []
    real_wait_for = asyncio.wait_for

    async def fast_wait_for(aw: Any, timeout: float | None) -> Any:  # noqa: ASYNC109 - wait_for's signature
        if timeout == client._token_timeout:  # the token request: as it is
            return await real_wait_for(aw, timeout)
        waited.append(float(timeout or 0.0))  # the wait between attempts: recorded, not waited
        return await real_wait_for(aw, 0)

    monkeypatch.setattr("agent.signal_client.asyncio.wait_for", fast_wait_for)
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(5):
            while len(backoff.waits) < 9:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.01)
    finally:
        await client.close()
        await task
    assert calls >= 9
    assert backoff.waits[:9] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 4.0, 4.0, 4.0, 4.0])
    assert waited[:9] == backoff.waits[:9]
    assert client.last_error is not None and "cannot get a signal token" in client.last_error


class FakeSignalClient:
    """Stands in for agent.signal_client.SignalClient: 'connects' at once, records its URL and its close."""

    made: list[FakeSignalClient] = []

    def __init__(self, url: str, *args: Any, **kwargs: Any) -> None:
        self.url = url
        self.connected = False
        self.last_error: str | None = None
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.finished = asyncio.Event()
        FakeSignalClient.made.append(self)

    async def run(self) -> None:
        self.connected = True
        self.changed.set()
        try:
            await self.closed.wait()
        finally:
            self.connected = False
            self.finished.set()

    async def close(self) -> None:  # as the real one: returns once run() ended
        self.closed.set()
        await self.finished.wait()


async def test_signalling_dials_the_new_url_when_the_map_changes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.signalling import Signalling
    from agent.status import ServiceStatus

    class NoLinks:
        def link_for_key(self, public_key: str) -> None:
            return None

        def all_links(self) -> list[Any]:
            return []

    class NoCandidates:
        async def fresh_candidates(self, max_age: float = 2.0) -> list[Any]:
            return []

    async def token() -> str:
        return "t"

    FakeSignalClient.made = []
    monkeypatch.setattr("agent.signal_client.SignalClient", FakeSignalClient)
    urls = ["ws://198.18.0.1:1/ws"]
    key = generate_private_key()
    status = ServiceStatus()
    signalling = Signalling(
        url=lambda: urls[-1],
        token=token,
        private_key=lambda: key,
        candidates=NoCandidates(),
        links=NoLinks(),
        status=status,
        tls=None,
    )
    task = asyncio.create_task(signalling.run())
    try:
        async with asyncio.timeout(5):
            while not status.connected:  # noqa: ASYNC110 - ServiceStatus has no event
                await asyncio.sleep(0.01)
            urls.append("ws://198.18.0.2:1/ws")  # the coordinator publishes another signal URL
            while len(FakeSignalClient.made) < 2 or not status.connected:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    first, second = FakeSignalClient.made
    assert (first.url, second.url) == tuple(urls)
    assert first.closed.is_set() and not first.connected  # the old connection was closed, not leaked
    assert second.closed.is_set()  # and the current one on cancellation (agent stopping)
