"""Agent configuration (/etc/starling/agent.yaml) and persisted state (/var/lib/starling/state.json).

Config is what the operator sets; state is what enrollment produced (peer id, credential). Both are
validated on load, and a corrupt file is a clear `AgentConfigError`, never a traceback.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path("/etc/starling/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/starling")


class AgentConfigError(Exception):
    pass


@dataclass
class AgentConfig:
    management_url: str = ""
    interface: str = "wt0"
    port: int = 51820
    hostname: str = ""
    backend: str = "auto"  # auto | kernel | userspace
    state_dir: Path = DEFAULT_STATE_DIR
    signal_url: str = ""  # overrides the URL the coordinator publishes
    # CA bundle (PEM) trusted for the coordinator's https:// and the signal service's wss:// instead of the
    # default bundle: for a private CA.
    ca_file: str = ""
    key_source: dict[str, Any] = field(default_factory=lambda: {"type": "file"})
    report_interval: float = 5.0
    keepalive: int = 25
    disable_firewall: bool = False  # the operator filters mesh traffic themselves
    exit_node: str = ""  # peer name or id to send all traffic through (an exit node); "" = the coordinator's choice
    metrics_listen: str = ""  # e.g. "127.0.0.1:9586": Prometheus metrics on a local port; empty = off
    log_format: str = "text"
    log_level: str = "info"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def validate(self) -> None:
        if not (1 <= len(self.interface) <= 15) or not self.interface.replace("-", "").replace("_", "").isalnum():
            raise AgentConfigError(f"interface: {self.interface!r} is not a valid interface name (1-15 chars)")
        if not 1 <= int(self.port) <= 65535:
            raise AgentConfigError(f"port: {self.port} is outside 1-65535")
        if self.backend not in ("auto", "kernel", "userspace"):
            raise AgentConfigError(f"backend: {self.backend!r} must be auto, kernel or userspace")
        if self.management_url and not self.management_url.startswith(("http://", "https://")):
            raise AgentConfigError(f"management_url: {self.management_url!r} must start with http:// or https://")
        if self.metrics_listen:
            _, _, port = self.metrics_listen.rpartition(":")
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise AgentConfigError(f"metrics_listen: {self.metrics_listen!r} must be host:port")
        if self.signal_url and not self.signal_url.startswith(("ws://", "wss://")):
            raise AgentConfigError(f"signal_url: {self.signal_url!r} must start with ws:// or wss://")
        if self.ca_file:
            self.tls_context()

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS trust for the coordinator and signal: ca_file when set, else None (the clients' defaults)."""
        if not self.ca_file:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except FileNotFoundError as exc:
            raise AgentConfigError(f"ca_file: {self.ca_file} does not exist") from exc
        except (ssl.SSLError, OSError) as exc:
            raise AgentConfigError(f"ca_file: {self.ca_file} is not a readable PEM CA bundle ({exc})") from exc


def load_config(path: Path | None) -> AgentConfig:
    """Read the YAML config (a missing default file means defaults); unknown keys are errors."""
    path = path or Path(os.environ.get("STARLING_AGENT_CONFIG", DEFAULT_CONFIG))
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise AgentConfigError(f"config {path} cannot be read: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise AgentConfigError(f"config {path} must be a mapping")
        data = loaded or {}
    known = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AgentConfigError(f"config {path}: unknown keys {', '.join(unknown)}")
    if "state_dir" in data:
        data["state_dir"] = Path(data["state_dir"])
    try:
        config = AgentConfig(**data)
        config.port = int(config.port)
    except (TypeError, ValueError) as exc:
        raise AgentConfigError(f"config {path}: {exc}") from exc
    config.validate()
    return config


def save_config(config: AgentConfig, path: Path) -> None:
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    write_private(path, yaml.safe_dump(data, sort_keys=True), mode=0o644)


@dataclass
class AgentState:
    management_url: str
    peer_id: str
    name: str
    mesh_ip: str
    credential: str

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> AgentState | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: str(data[f.name]) for f in fields(cls)})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AgentConfigError(
                f"state file {path} is corrupt ({exc.__class__.__name__}): remove it and run `starling up` again"
            ) from exc


def ensure_state_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Atomic write with `mode` from the first byte (no window where a secret is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
