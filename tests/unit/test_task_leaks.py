"""No task left pending for ever around outages: a STUN transaction whose socket closed under it (a relay
or peer gone, an ICE session closed) ends, instead of leaving the task that awaits it pending until the
garbage collector destroys it ("Task was destroyed but it is pending")."""

from __future__ import annotations

import asyncio

import pytest
from aioice import stun

from agent.daemon import _loop_exception


class ClosingSender:
    """A STUN sender whose socket closes after the first send (asyncio's closed UDP transport raises)."""

    def __init__(self) -> None:
        self.sent = 0

    def send_stun(self, message: stun.Message, addr: tuple[str, int]) -> None:
        self.sent += 1
        if self.sent > 1:
            raise AttributeError("'NoneType' object has no attribute 'sendto'")  # what a closed transport does


async def run_transaction(monkeypatch: pytest.MonkeyPatch, handler: bool) -> asyncio.Task[object]:
    monkeypatch.setattr(stun, "RETRY_RTO", 0.01)
    loop = asyncio.get_running_loop()
    if handler:
        loop.set_exception_handler(_loop_exception)
    else:
        loop.set_exception_handler(lambda _loop, _context: None)  # the old behaviour: the error only logged
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    sender = ClosingSender()
    task: asyncio.Task[object] = asyncio.create_task(stun.Transaction(request, ("198.18.0.1", 3478), sender).run())
    await asyncio.wait({task}, timeout=1.0)
    assert sender.sent == 2  # the first send, then the retransmission that met the closed socket
    return task


async def test_a_retransmission_on_a_closed_socket_ends_the_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    task = await run_transaction(monkeypatch, handler=True)
    assert task.done()
    with pytest.raises(stun.TransactionTimeout):
        task.result()  # what aioice's callers already handle for an unanswered request


async def test_without_the_handler_the_awaiting_task_stays_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leak itself, shown on stock asyncio handling (so the test above can fail)."""
    task = await run_transaction(monkeypatch, handler=False)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
