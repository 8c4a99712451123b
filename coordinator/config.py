"""Coordinator configuration: a YAML file, overridden by STARLING_* environment variables.

Secrets are not configured here directly but through `secrets:` (see coordinator.secrets).
`mesh:` holds the defaults written to the store on first start; afterwards the settings API owns them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coordinator.configfile import ConfigError as ConfigError  # re-exported for callers
from coordinator.configfile import load_yaml_config
from coordinator.ipam import PrefixError, parse_mesh_prefix


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)


class TlsConfig(_Strict):
    """HTTPS on the coordinator's own listener (without it: plain HTTP, for a TLS-terminating proxy in front)."""

    certfile: Path
    keyfile: Path


class DatabaseConfig(_Strict):
    url: str = ""
    migrate_on_start: bool = True


class MeshDefaults(_Strict):
    prefix: str = "100.64.0.0/16"
    dns_domain: str = "starling.internal"
    turn_servers: list[str] = Field(default_factory=list)
    signal_url: str = Field("", max_length=255, pattern=r"^(wss?://\S+)?$")
    credential_ttl: int = Field(3600, ge=60, le=7 * 86400)
    ephemeral_offline_timeout: int = Field(600, ge=10)
    peer_approval_required: bool = False

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        try:
            parse_mesh_prefix(value)
        except PrefixError as exc:
            raise ValueError(str(exc)) from exc
        return value


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(1 << 20, ge=1024)
    state_report_interval: float = Field(1.0, ge=0.0)
    # Failed authentications per source address (coordinator.throttle): a bucket of `burst` failures,
    # refilled at `per_minute`; either at 0 disables the limit.
    auth_failures_burst: int = Field(20, ge=0)
    auth_failures_per_minute: float = Field(10.0, ge=0.0)
    auth_failures_max_sources: int = Field(10_000, ge=1)
    challenge_ttl: int = Field(30, ge=5, le=600, description="seconds a sealed-request challenge stays usable")


class DashboardConfig(_Strict):
    """The web dashboard under /dashboard (docs/dashboard.md); the defaults are what it always did."""

    poll_interval: float = Field(1.0, gt=0, le=60, description="seconds between the live feed's checks for changes")
    session_ttl: int = Field(8 * 3600, ge=60, le=30 * 86400, description="seconds a login lasts")
    cookie_secure: bool | Literal["auto"] = Field(
        "auto", description="the cookies' Secure flag; auto: set when the request came over https"
    )
    heartbeat: float = Field(15.0, gt=0, le=300, description="SSE keep-alive and session re-check period")

    @field_validator("cookie_secure", mode="before")
    @classmethod
    def _cookie_secure(cls, value: Any) -> Any:
        choices = {"true": True, "false": False, "auto": "auto"}
        if isinstance(value, str) and value.lower() in choices:
            return choices[value.lower()]
        if not isinstance(value, bool):
            raise ValueError("must be true, false or auto")
        return value

    @property
    def secure(self) -> bool | None:
        """cookie_secure as the dashboard takes it (None: decide per request)."""
        return None if self.cookie_secure == "auto" else self.cookie_secure


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class CoordinatorConfig(_Strict):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    tls: TlsConfig | None = None
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    state_dir: Path = Path("/var/lib/starling-coordinator")
    mesh: MeshDefaults = Field(default_factory=MeshDefaults)
    secrets: dict[str, Any] = Field(default_factory=lambda: {"source": "config"})
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    # Agents treat 60 s without a byte on the map stream as a dead connection (agent.client.STREAM_SILENCE).
    stream_heartbeat: float = Field(15.0, gt=0, le=45)
    maintenance_interval: float = Field(5.0, gt=0)
    signal_token_ttl: int = Field(600, ge=30, le=86400)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    # The old name of dashboard.poll_interval, still accepted (not together with the new one).
    dashboard_poll_interval: float | None = Field(None, gt=0, le=60)

    @model_validator(mode="after")
    def _old_dashboard_poll_interval(self) -> CoordinatorConfig:
        if self.dashboard_poll_interval is not None:
            if "poll_interval" in self.dashboard.model_fields_set:
                raise ValueError(
                    "dashboard_poll_interval is the old name of dashboard.poll_interval: set only the new one"
                )
            self.dashboard.poll_interval = self.dashboard_poll_interval
        return self

    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.state_dir / 'coordinator.db').resolve()}"


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "STARLING_DATABASE_URL": ("database", "url"),
    "STARLING_LISTEN_HOST": ("listen", "host"),
    "STARLING_LISTEN_PORT": ("listen", "port"),
    "STARLING_STATE_DIR": ("state_dir",),
    "STARLING_LOG_FORMAT": ("log", "format"),
    "STARLING_LOG_LEVEL": ("log", "level"),
}


def load_config(path: Path | None, env: dict[str, str] | None = None) -> CoordinatorConfig:
    """Read the YAML file (optional), apply environment overrides, validate; ConfigError names the field."""
    return load_yaml_config(CoordinatorConfig, path, dict(os.environ) if env is None else env, ENV_OVERRIDES)
