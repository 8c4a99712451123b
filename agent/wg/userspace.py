"""Userspace WireGuard: a supervised `wireguard-go` process configured over its UAPI socket.

wireguard-go runs in its own session so the tunnel survives an agent restart (the new agent adopts
the interface); deleting the link makes wireguard-go exit, which is how `down()` removes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

from agent import netlink
from agent.wg.backend import FWMARK, PeerConfig, PeerStats, WireGuardBackend, WireGuardError
from agent.wg.uapi import SOCKET_DIR, UapiClient, key_to_hex, peer_lines


class UserspaceBackend(WireGuardBackend):
    kind = "userspace"

    def __init__(self, interface: str, *, binary: str | None = None, log_dir: Path | None = None) -> None:
        super().__init__(interface)
        self.binary = binary or shutil.which("wireguard-go") or "/usr/bin/wireguard-go"
        self.log_dir = log_dir
        self.uapi = UapiClient(interface)
        self.process: subprocess.Popen[bytes] | None = None
        self._started = 0.0  # monotonic time wireguard-go was started

    def _socket_ready(self) -> bool:
        return (SOCKET_DIR / f"{self.interface}.sock").exists() and netlink.link_exists(self.interface)

    def start(self) -> bool:
        """Start wireguard-go now without waiting for its socket (`up()` waits), so that its start-up runs
        while the agent enrolls. False when there is nothing to start (a device to adopt, or started).
        `abort()` undoes it."""
        if self.process is not None or self._socket_ready():
            return False
        self._spawn()
        return True

    def up(self, private_key: str, listen_port: int) -> None:
        if self.process is None and not self._socket_ready():
            self._spawn()
        if self.process is not None:
            self._wait_ready()
        self.uapi.set([f"private_key={key_to_hex(private_key)}", f"listen_port={int(listen_port)}", f"fwmark={FWMARK}"])
        netlink.set_up(self.interface, mtu=1280)

    def abort(self) -> None:
        """Stop the wireguard-go that `start()` started and remove what it created (enrollment failed:
        nothing may be left behind)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # wireguard-go closes its TUN device (the link goes) and its socket
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if netlink.link_exists(self.interface):
            netlink.delete_link(self.interface)
        if not netlink.link_exists(self.interface):
            (SOCKET_DIR / f"{self.interface}.sock").unlink(missing_ok=True)

    def _spawn(self) -> None:
        if not os.path.exists(self.binary):
            raise WireGuardError(f"{self.interface}: wireguard-go not found ({self.binary}); install wireguard-go")
        if netlink.link_exists(self.interface):
            raise WireGuardError(f"{self.interface}: a link with this name exists but is not a wireguard-go device")
        log: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            log = open(self.log_dir / f"wireguard-go-{self.interface}.log", "ab")  # noqa: SIM115
        env = {**os.environ, "LOG_LEVEL": os.environ.get("WG_LOG_LEVEL", "error")}
        try:
            self.process = subprocess.Popen(
                [self.binary, "-f", self.interface],
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()
        self._started = time.monotonic()

    def _wait_ready(self) -> None:
        """Until the wireguard-go we started has its link and UAPI socket (5 s from its start)."""
        assert self.process is not None
        deadline = self._started + 5
        while True:
            if self.process.poll() is not None:
                raise WireGuardError(f"{self.interface}: wireguard-go exited with {self.process.returncode}")
            if self._socket_ready():
                return
            if time.monotonic() >= deadline:
                raise WireGuardError(f"{self.interface}: wireguard-go did not create its UAPI socket in 5 s")
            time.sleep(0.005)

    def set_private_key(self, private_key: str) -> None:
        self.uapi.set([f"private_key={key_to_hex(private_key)}"])

    def set_peer(self, peer: PeerConfig) -> None:
        self.uapi.set(peer_lines(peer))

    def remove_peer(self, public_key: str) -> None:
        self.uapi.set([f"public_key={key_to_hex(public_key)}", "remove=true"])

    def swap_key(self, old_public_key: str, peer: PeerConfig) -> None:
        # One UAPI transaction: the new key takes the allowed IPs, the old key keeps its queue.
        old = [f"public_key={key_to_hex(old_public_key)}", "update_only=true", "persistent_keepalive_interval=0"]
        self.uapi.set([*peer_lines(peer), *old, "replace_allowed_ips=true"])

    def peers(self) -> dict[str, PeerStats]:
        return self.uapi.get()[1]

    def listen_port(self) -> int:
        return int(self.uapi.get()[0].get("listen_port", "0"))

    def down(self) -> None:
        netlink.delete_link(self.interface)
        if self.process is not None:
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        sock = SOCKET_DIR / f"{self.interface}.sock"
        if sock.exists() and not netlink.link_exists(self.interface):
            sock.unlink(missing_ok=True)

    def close(self) -> None:
        self.process = None  # keeps running on purpose: the tunnel outlives the agent process
