"""Running `nft`: JSON batches in, JSON listings out, and `nft monitor` as a change detector.

The `nft` command may be a prefix (`["ip", "netns", "exec", "ns1", "nft"]`), which is how tests
and benchmarks drive a namespace. Every process started here is tracked by PID: a monitor line
`# new generation N by process PID` caused by one of our own batches is not drift; any other
generation that touched `inet starling` marks the table dirty so that the next drift check lists
it. The monitor costs nothing while the ruleset is quiet, where polling a big table every second
would cost a full element dump each time.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from agent.firewall.model import FAMILY, TABLE, FirewallError

log = logging.getLogger("starling.agent.firewall")
_GENERATION = re.compile(r"^# new generation \d+ by process (\d+)")
_MISSING = ("No such file or directory", "does not exist")


def _first_lines(text: str, limit: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:limit])[:500] or "no error output"


class Nft:
    """Synchronous nft invocations (callers run them via `asyncio.to_thread`)."""

    def __init__(self, command: str | Sequence[str] = "nft", *, timeout: float = 10.0) -> None:
        self.command = [command] if isinstance(command, str) else list(command)
        self.timeout = timeout
        self.own_pids: collections.deque[int] = collections.deque(maxlen=256)

    def _run(self, args: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        try:
            proc = subprocess.Popen(
                [*self.command, *args],
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            raise FirewallError(f"cannot run {self.command[0]!r}: {exc} (is nftables installed?)") from exc
        self.own_pids.append(proc.pid)
        try:
            out, err = proc.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.communicate()
            raise FirewallError(f"nft did not answer within {self.timeout:g} s") from exc
        return proc.returncode, out, err

    def apply(self, commands: list[dict[str, Any]]) -> None:
        """Run one JSON batch (one kernel transaction); raises `FirewallError` with nft's reason."""
        code, _, err = self._run(["-j", "-f", "-"], json.dumps({"nftables": commands}))
        if code != 0:
            raise FirewallError(f"nft rejected the update (exit {code}): {_first_lines(err)}")

    def list_table(self) -> Any | None:
        """The parsed JSON listing of our table, or None when the table does not exist."""
        args = ["-j", "list", "table", FAMILY, TABLE]
        code, out, err = self._run(args)
        if code != 0:
            if any(m in err for m in _MISSING):
                return None
            raise FirewallError(f"nft list table {FAMILY} {TABLE} failed (exit {code}): {_first_lines(err)}")
        try:
            return json.loads(out)
        except ValueError as exc:
            raise FirewallError(f"nft printed a listing that is not JSON: {exc}") from exc


class Monitor:
    """`nft monitor` in a subprocess; `take_dirty()` says whether someone else touched our table."""

    WARMUP = 2.0  # seconds after (re)start during which changes may have been missed

    def __init__(self, nft: Nft) -> None:
        self.nft = nft
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        self.started_at = 0.0
        self._dirty = True
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def trusted(self) -> bool:
        """Running long enough that a quiet monitor really means a quiet ruleset."""
        return self.alive and time.monotonic() - self.started_at >= self.WARMUP

    def start(self) -> bool:
        if self.alive:
            return True
        self.stop()
        try:
            self.proc = subprocess.Popen(
                [*self.nft.command, "monitor"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
        except OSError as exc:
            log.warning("nft monitor unavailable (%s): drift checks list the table every time", exc)
            self.proc = None
            return False
        self.started_at = time.monotonic()
        self.mark_dirty()
        self.thread = threading.Thread(target=self._read, args=(self.proc,), name="nft-monitor", daemon=True)
        self.thread.start()
        return True

    def _read(self, proc: subprocess.Popen[str]) -> None:
        touched = False
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _GENERATION.match(line)
            if match:
                if touched and int(match.group(1)) not in self.nft.own_pids:
                    self.mark_dirty()
                touched = False
            elif f" {FAMILY} {TABLE}" in line or "rror" in line:
                touched = True
        self.mark_dirty()  # the monitor ended: we know nothing any more

    def mark_dirty(self) -> None:
        with self._lock:
            self._dirty = True

    def take_dirty(self) -> bool:
        with self._lock:
            dirty, self._dirty = self._dirty, False
        return dirty

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(2)
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.join(2)
