"""Signal configuration: a YAML file (`--config`), overridden by STARLING_SIGNAL_* environment variables.

Either `signing_public_key` (the coordinator's Ed25519 public key, base64) or `coordinator_url`
(signal then fetches the key from `<coordinator_url>/api/v1/signing-key` at start-up) is required.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coordinator.configfile import ConfigError as ConfigError  # re-exported for callers
from coordinator.configfile import load_yaml_config
from starling_proto.signal import MAX_FRAME_LIMIT


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=1, le=65535)


class TlsConfig(_Strict):
    certfile: Path
    keyfile: Path


class LimitsConfig(_Strict):
    max_frame_bytes: int = Field(64 * 1024, ge=1024, le=MAX_FRAME_LIMIT)
    rate: float = Field(50.0, gt=0)
    burst: int = Field(100, ge=1)
    abuse_drops: int = Field(1000, ge=1, description="rate-limited frames within 10 s that close the connection")
    max_connections: int = Field(10000, ge=1)
    send_queue: int = Field(256, ge=1, description="frames queued for a slow recipient before it is closed")


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class SignalConfig(_Strict):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    tls: TlsConfig | None = None
    coordinator_url: str | None = None
    coordinator_ca: Path | None = None
    signing_public_key: str | None = None
    token_leeway: int = Field(5, ge=0, le=300)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @field_validator("signing_public_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("must be base64") from exc
        if len(raw) != 32:
            raise ValueError("must be the base64 encoding of a 32-byte Ed25519 public key")
        return value

    @field_validator("coordinator_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _key_source(self) -> SignalConfig:
        if self.signing_public_key is None and self.coordinator_url is None:
            raise ValueError("set signing_public_key or coordinator_url (to fetch the key from)")
        return self


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "STARLING_SIGNAL_LISTEN_HOST": ("listen", "host"),
    "STARLING_SIGNAL_LISTEN_PORT": ("listen", "port"),
    "STARLING_SIGNAL_COORDINATOR_URL": ("coordinator_url",),
    "STARLING_SIGNAL_SIGNING_PUBLIC_KEY": ("signing_public_key",),
    "STARLING_SIGNAL_MAX_FRAME_BYTES": ("limits", "max_frame_bytes"),
    "STARLING_SIGNAL_RATE": ("limits", "rate"),
    "STARLING_SIGNAL_BURST": ("limits", "burst"),
    "STARLING_SIGNAL_LOG_FORMAT": ("log", "format"),
    "STARLING_SIGNAL_LOG_LEVEL": ("log", "level"),
}


def load_config(path: Path | None, env: dict[str, str] | None = None) -> SignalConfig:
    """Read the YAML file (optional), apply environment overrides, validate; ConfigError names the field."""
    return load_yaml_config(SignalConfig, path, dict(os.environ) if env is None else env, ENV_OVERRIDES)
