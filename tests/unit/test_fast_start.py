"""`starling up` starts wireguard-go (userspace backend) while it enrolls; a failed enrollment stops it
again and leaves nothing behind. A stand-in `wireguard-go` (a script that records its PID and waits)
shows what was started and stopped, without root or a TUN device."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent import cli
from agent.config import AgentConfig
from agent.wg.userspace import UserspaceBackend

FAKE = """#!/bin/sh
echo $$ >> {pids}
exec sleep 30
"""


def fake_wireguard_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pids = tmp_path / "pids"
    script = bindir / "wireguard-go"
    script.write_text(FAKE.format(pids=pids))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def started_pids(pids: Path) -> list[int]:
    deadline = time.monotonic() + 5
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return [int(x) for x in pids.read_text().split()]


def test_start_does_not_wait_and_abort_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pids = fake_wireguard_go(tmp_path, monkeypatch)
    backend = UserspaceBackend("stfast0", log_dir=tmp_path / "logs")
    began = time.monotonic()
    assert backend.start() is True
    assert time.monotonic() - began < 2.0  # (the fake never makes a socket: up() would wait 5 s for it)
    assert backend.start() is False  # started already
    [pid] = started_pids(pids)
    assert alive(pid)
    backend.abort()
    assert not alive(pid) and backend.process is None


def test_a_failed_enrollment_stops_the_early_wireguard_go_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_wireguard_go(tmp_path, monkeypatch)
    started: list[int] = []
    real_start = cli._start_early

    def recording_start(config: AgentConfig) -> UserspaceBackend | None:
        backend = real_start(config)
        assert backend is not None and backend.process is not None
        started.append(backend.process.pid)
        return backend

    monkeypatch.setattr(cli, "_start_early", recording_start)
    state = tmp_path / "state"
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {state}\nbackend: userspace\n")
    code = cli.main(
        [
            "--config",
            str(config),
            "up",
            "--foreground",
            "--interface",
            "stfast1",
            "--management-url",
            "http://127.0.0.1:9",  # nothing listens: unreachable
            "--setup-key",
            "ssk_x",
        ]
    )
    assert code == cli.EXIT_UNREACHABLE and "unreachable" in capsys.readouterr().err
    [pid] = started  # it was started before the enrollment failed...
    assert not alive(pid)  # ...and stopped (and reaped) after
    assert not state.exists()  # no state dir, key, log or wireguard-go log left
