"""Wire schemas of the REST API (pydantic). They are the contract published in docs/openapi.json."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from starling_proto.keys import KeyFormatError, decode_public_key
from starling_proto.routes import EXIT_PREFIX, MAX_ROUTERS, METRIC_DEFAULT, METRIC_MAX, METRIC_MIN, check_route_prefix

PEER_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
LABEL = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
WG_KEY = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
DNS_DOMAIN = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
RELAY_URL = r"^(turn|turns|stun):[A-Za-z0-9.\-\[\]:]+(\?transport=(udp|tcp))?$"

# Control characters (C0, C1, DEL), format characters (bidi overrides and isolates, zero-width marks) and
# line/paragraph separators: text a peer reports about itself is shown to operators, so none of these.
UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")


def _public_key(value: str) -> str:
    try:
        decode_public_key(value)
    except KeyFormatError as exc:
        raise ValueError(f"WireGuard public key {exc}") from exc
    return value


def _safe_text(value: str) -> str:
    bad = UNSAFE_TEXT.search(value)
    if bad:
        raise ValueError(f"contains a control or formatting character (U+{ord(bad.group()):04X}) at {bad.start()}")
    return value


PeerName = Annotated[str, StringConstraints(pattern=PEER_NAME)]
Label = Annotated[str, StringConstraints(pattern=LABEL)]
WgKey = Annotated[str, StringConstraints(pattern=WG_KEY), AfterValidator(_public_key)]
SafeText = AfterValidator(_safe_text)
Text = Annotated[str, StringConstraints(max_length=1024)]
Short = Annotated[str, StringConstraints(max_length=255)]
Protocol = Literal["any", "tcp", "udp", "icmp"]
PathType = Literal["idle", "connecting", "direct", "relayed", "lost"]

T = TypeVar("T")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictModel(Model):
    """Request bodies that take JSON types as they are: `"5"` is not an integer, `0` or `"true"` not a
    boolean (422). Forms that carry text (the dashboard) validate with `strict=False` explicitly."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next page; null on the last page")


class ErrorBody(BaseModel):
    """The body of every error response (docs/api.md, coordinator/api/contract.py)."""

    error: str = Field(description="machine-readable code, e.g. `validation_error`")
    message: str
    field: str | None = Field(description="the offending field or parameter, e.g. `destinations.groups[0]`")


# ----- peers --------------------------------------------------------------------------------
class ConnectionState(Model):
    peer_id: Annotated[str, StringConstraints(max_length=64)]
    path: PathType
    endpoint: Annotated[str, StringConstraints(max_length=128)] | None = None
    latency_ms: float | None = Field(None, ge=0, le=600_000)
    last_handshake: dt.datetime | None = None
    rx_bytes: int = Field(0, ge=0)
    tx_bytes: int = Field(0, ge=0)


class PeerEvent(Model):
    """Something the agent saw that operators must be able to audit (e.g. its firewall was tampered with)."""

    kind: Literal["firewall.drift", "firewall.error", "firewall.disabled", "key.reloaded", "key.verified", "key.failed"]
    message: Annotated[str, StringConstraints(max_length=1024), SafeText]


class KeyChangePayload(StrictModel):
    """Inside a sealed key rotation (`public_key` = the key the coordinator holds, `new_public_key` = the
    new one; the seal proves possession of both). `prepare` only validates and records the intent;
    `commit` makes the coordinator use the new key and pushes it to every peer that may reach this one."""

    phase: Literal["prepare", "commit"] = "commit"
    version: int | None = Field(None, ge=1, description="the key's version in the key source (Vault), if any")
    source: Annotated[str, StringConstraints(max_length=32), SafeText] = ""


class StateReport(Model):
    connections: list[ConnectionState] = Field(default_factory=list, max_length=10_000)


class PeerOut(BaseModel):
    id: str
    name: str
    hostname: str
    public_key: str
    mesh_ip: str
    dns_name: str
    groups: list[str]
    os: str
    agent_version: str
    approved: bool
    ephemeral: bool
    connected: bool
    last_seen: dt.datetime | None
    created_at: dt.datetime
    connections: list[ConnectionState]
    connections_reported_at: dt.datetime | None
    exit_node: str | None = Field(None, description="the exit node chosen for this peer (a peer name), or null")


class PeerUpdate(StrictModel):
    name: PeerName | None = None
    groups: list[Label] | None = Field(None, max_length=1000)
    approved: bool | None = None
    exit_node: PeerName | None = Field(
        None,
        description="a routing peer of a 0.0.0.0/0 route to send this peer's internet traffic through; "
        "null clears it, an absent key keeps it",
    )


class Challenge(BaseModel):
    """A single-use challenge for one sealed request, and the key to seal it to (docs/security.md)."""

    challenge: str
    expires_at: int = Field(description="unix seconds; the challenge is refused after this")
    coordinator_public_key: str = Field(description="the coordinator's static X25519 key (base64)")
    algorithm: Literal["starling-seal-v1"] = "starling-seal-v1"


class SealedRequest(Model):
    """A request sealed with the sender's WireGuard private key(s) to the coordinator's identity key,
    over a fresh challenge: proof of possession of `public_key` (and of `new_public_key` for a rotation).
    `box` holds the JSON payload (EnrollPayload or KeyChangePayload); see docs/security.md."""

    v: Literal[1]
    challenge: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    public_key: WgKey
    new_public_key: WgKey | None = None
    nonce: Annotated[str, StringConstraints(min_length=16, max_length=16)]
    box: Annotated[str, StringConstraints(min_length=24, max_length=65536)]


class SealedReply(BaseModel):
    """The reply to a sealed request, readable only with the request's keys (EnrollResponse inside)."""

    v: Literal[1] = 1
    nonce: str
    box: str


Hostname = Annotated[str, StringConstraints(min_length=1, max_length=253), SafeText]
OsName = Annotated[str, StringConstraints(max_length=128), SafeText]
AgentVersion = Annotated[str, StringConstraints(max_length=64), SafeText]


class EnrollPayload(StrictModel):
    """Inside a sealed enrollment. A known public key logs in on its proof alone (`setup_key` is then
    ignored: it never grants power over an existing peer); an unknown one needs a valid setup key."""

    setup_key: Annotated[str, StringConstraints(min_length=8, max_length=128)] | None = None
    hostname: Hostname
    name: PeerName | None = None
    os: OsName = ""
    agent_version: AgentVersion = ""


class EnrollResponse(BaseModel):
    peer: PeerOut
    credential: str = Field(description="Peer credential: send as `Authorization: Bearer` on /api/v1/peer/*")
    signing_public_key: str
    login: bool = Field(False, description="true when a known peer logged in again (nothing was enrolled)")


class SignalToken(BaseModel):
    token: str
    expires_at: int
    signing_public_key: str


class SigningKey(BaseModel):
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str


# ----- groups -------------------------------------------------------------------------------
class GroupIn(StrictModel):
    name: Label
    description: Text = ""
    peers: list[PeerName] | None = Field(None, description="Exact member list (peer names); omit to keep")


class GroupUpdate(StrictModel):
    name: Label | None = None
    description: Text | None = None
    peers: list[PeerName] | None = None


class GroupOut(BaseModel):
    id: str
    name: str
    description: str
    peers: list[str]
    created_at: dt.datetime


# ----- policies -----------------------------------------------------------------------------
PortSpec = int | Annotated[str, StringConstraints(pattern=r"^\d{1,5}(-\d{1,5})?$")]


def parse_port(spec: int | str) -> tuple[int, int]:
    if isinstance(spec, int):
        start = end = spec
    else:
        first, _, last = spec.partition("-")
        start, end = int(first), int(last or first)
    if not (1 <= start <= 65535 and 1 <= end <= 65535):
        raise ValueError(f"port {spec!r} is outside 1-65535")
    if start > end:
        raise ValueError(f"port range {spec!r} starts after it ends")
    return start, end


def format_port(rng: list[int] | tuple[int, int]) -> str:
    return str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}-{rng[1]}"


class Endpoints(StrictModel):
    groups: list[Label] = Field(default_factory=list, max_length=1000)
    peers: list[PeerName] = Field(default_factory=list, max_length=1000)
    routes: list[Label] = Field(
        default_factory=list, max_length=1000, description="route names (destinations only: a route is never a source)"
    )

    @model_validator(mode="after")
    def _not_empty(self) -> Endpoints:
        if not self.groups and not self.peers and not self.routes:
            raise ValueError("name at least one group, peer or route")
        return self


class _PolicyFields(StrictModel):
    @field_validator("ports", check_fields=False)
    @classmethod
    def _ports(cls, value: list[PortSpec] | None) -> list[PortSpec] | None:
        if value is not None:
            for spec in value:
                parse_port(spec)
        return value


class PolicyIn(_PolicyFields):
    name: Label
    description: Text = ""
    enabled: bool = True
    protocol: Protocol = "any"
    ports: list[PortSpec] = Field(default_factory=list, max_length=256)
    bidirectional: bool = False
    sources: Endpoints
    destinations: Endpoints

    @model_validator(mode="after")
    def _ports_need_protocol(self) -> PolicyIn:
        check_ports_protocol(self.protocol, self.ports)
        return self


def check_ports_protocol(protocol: str, ports: list[Any]) -> None:
    if ports and protocol not in ("tcp", "udp"):
        raise ValueError(f"ports need protocol tcp or udp, not {protocol!r}")


class PolicyUpdate(_PolicyFields):
    name: Label | None = None
    description: Text | None = None
    enabled: bool | None = None
    protocol: Protocol | None = None
    ports: list[PortSpec] | None = Field(None, max_length=256)
    bidirectional: bool | None = None
    sources: Endpoints | None = None
    destinations: Endpoints | None = None


class PolicyOut(BaseModel):
    id: str
    name: str
    description: str
    enabled: bool
    protocol: Protocol
    ports: list[str]
    bidirectional: bool
    sources: Endpoints
    destinations: Endpoints
    created_at: dt.datetime


# ----- routes -------------------------------------------------------------------------------
def _route_prefix(value: str) -> str:
    check_route_prefix(value)  # ValueError says why (host bits set, mesh range, loopback, ...)
    return value


RoutePrefix = Annotated[str, StringConstraints(max_length=18), AfterValidator(_route_prefix)]
Metric = Annotated[int, Field(ge=METRIC_MIN, le=METRIC_MAX)]


class RouterIn(StrictModel):
    """A routing peer of a route: one peer, or every member of a group (exactly one of the two)."""

    peer: PeerName | None = None
    group: Label | None = None
    metric: Metric = Field(METRIC_DEFAULT, description=f"{METRIC_MIN}-{METRIC_MAX}; lower is preferred")

    @model_validator(mode="after")
    def _one_target(self) -> RouterIn:
        if (self.peer is None) == (self.group is None):
            raise ValueError("a router names exactly one of peer or group")
        return self


def _routers(value: list[RouterIn] | None) -> list[RouterIn] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("a route needs at least one routing peer (a peer or a group)")
    seen: set[tuple[str, str]] = set()
    for i, router in enumerate(value):
        key = ("peer", router.peer) if router.peer is not None else ("group", router.group or "")
        if key in seen:
            raise ValueError(f"[{i}]: {key[0]} {key[1]!r} is named twice")
        seen.add(key)
    return value


Routers = Annotated[list[RouterIn], Field(max_length=MAX_ROUTERS), AfterValidator(_routers)]


class RouteIn(StrictModel):
    name: Label
    description: Text = ""
    prefix: RoutePrefix = Field(description=f"IPv4 prefix, e.g. 198.18.40.0/24; {EXIT_PREFIX} makes an exit node")
    routers: Routers
    masquerade: bool = True
    enabled: bool = True


class RouteUpdate(StrictModel):
    name: Label | None = None
    description: Text | None = None
    prefix: RoutePrefix | None = None
    routers: Routers | None = None
    masquerade: bool | None = None
    enabled: bool | None = None


class RouterOut(BaseModel):
    peer: str | None
    group: str | None
    metric: int


class RouteOut(BaseModel):
    id: str
    name: str
    description: str
    prefix: str
    exit_node: bool = Field(description=f"the prefix is {EXIT_PREFIX}: its routing peers are exit nodes")
    masquerade: bool
    enabled: bool
    routers: list[RouterOut]
    created_at: dt.datetime


# ----- setup keys and tokens ----------------------------------------------------------------
class SetupKeyIn(StrictModel):
    name: Label
    reusable: bool = False
    usage_limit: int = Field(0, ge=0, le=1_000_000, description="0 = unlimited (reusable keys)")
    expires_in: int | None = Field(None, ge=60, le=10 * 365 * 86400, description="Seconds; null = never")
    auto_groups: list[Label] = Field(default_factory=list, max_length=100)
    ephemeral: bool = False


class SetupKeyUpdate(StrictModel):
    revoked: bool | None = None
    auto_groups: list[Label] | None = Field(None, max_length=100)


class SetupKeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    reusable: bool
    usage_limit: int
    used_count: int
    auto_groups: list[str]
    ephemeral: bool
    revoked: bool
    expires_at: dt.datetime | None
    last_used: dt.datetime | None
    created_at: dt.datetime
    state: Literal["valid", "expired", "revoked", "exhausted"]


class SetupKeyCreated(SetupKeyOut):
    key: str = Field(description="The clear key: shown only in this response")


class TokenIn(StrictModel):
    name: Label
    scope: Literal["read", "write"]
    expires_in: int | None = Field(None, ge=60, le=10 * 365 * 86400)


class TokenUpdate(StrictModel):
    revoked: bool | None = None


class TokenOut(BaseModel):
    id: str
    name: str
    prefix: str
    scope: Literal["read", "write"]
    revoked: bool
    expires_at: dt.datetime | None
    last_used: dt.datetime | None
    created_at: dt.datetime


class TokenCreated(TokenOut):
    token: str = Field(description="The clear token: shown only in this response")


# ----- settings and audit -------------------------------------------------------------------
class SettingsOut(BaseModel):
    mesh_prefix: str
    dns_domain: str
    turn_servers: list[str]
    signal_url: str
    credential_ttl: int
    ephemeral_offline_timeout: int
    peer_approval_required: bool
    revision: int


class SettingsUpdate(StrictModel):
    mesh_prefix: Annotated[str, StringConstraints(max_length=18)] | None = None
    dns_domain: Annotated[str, StringConstraints(pattern=DNS_DOMAIN, max_length=253)] | None = None
    turn_servers: list[Annotated[str, StringConstraints(pattern=RELAY_URL)]] | None = Field(None, max_length=16)
    signal_url: (
        Annotated[str, StringConstraints(pattern=r"^(wss?://[A-Za-z0-9.\-\[\]:/_]+)?$", max_length=255)] | None
    ) = None
    credential_ttl: int | None = Field(None, ge=60, le=7 * 86400)
    ephemeral_offline_timeout: int | None = Field(None, ge=10, le=30 * 86400)
    peer_approval_required: bool | None = None


class AuditOut(BaseModel):
    id: int
    time: dt.datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    target_name: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def sanitize_peer_name(hostname: str) -> str:
    """A DNS-label version of a hostname (first label, lowercased, invalid characters to '-')."""
    label = hostname.split(".", 1)[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")[:63].strip("-")
    return label or "peer"
