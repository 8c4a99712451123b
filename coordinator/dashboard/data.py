"""Read models of the dashboard: lean store queries, formatting, mesh matrix and reachability.

The peers page reads the store with one column query plus one membership query instead of
building `PeerOut` models (the API's `peers.find`): pydantic validation of every reported
connection costs 0.2-0.4 s for 1,000 peers on a small VM, more than the page budget. Ordering and
paging follow the API (by name, keyset on name); the name filter matches a substring.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String, case, func, select, type_coerce

from coordinator.service.core import Coordinator
from coordinator.store.models import Group, Peer, PeerGroup

PATHS = ("direct", "relayed", "connecting", "idle", "lost")
PATH_RANK = {"direct": 0, "relayed": 1, "connecting": 2, "idle": 3, "lost": 4}
LIST_CONNECTIONS = 20  # connections shown per peer in the peers list (all of them on the peer page)
MATRIX_MAX = 40
PAIRS_MAX = 1000
PAGE_MAX = 1000
NONE = "\u2014"  # em dash: "no value"


# ----- formatting (one implementation: the live feed sends pre-formatted text too) --------------
def parse_time(value: dt.datetime | str | None) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _utc_text(value: dt.datetime | str | None) -> str | None:
    """'YYYY-MM-DDTHH:MM:SS' in UTC, taking the fast path for what the store and pydantic produce."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if len(value) >= 20 and value[10] == "T" and (value[-1] == "Z" or value.endswith("+00:00")):
            return value[:19]  # pydantic's JSON form of a UTC time
        if len(value) >= 19 and value[10] == " " and "+" not in value[19:] and "-" not in value[19:]:
            return f"{value[:10]}T{value[11:19]}"  # SQLite's storage form of a UTCDateTime (always UTC)
        value = parse_time(value)
        if value is None:
            return None
    if value.tzinfo is not dt.UTC:
        value = value.astimezone(dt.UTC) if value.tzinfo else value
    return value.isoformat(timespec="seconds")[:19]


def fmt_time(value: dt.datetime | str | None) -> str:
    text = _utc_text(value)
    return f"{text[:10]} {text[11:]} UTC" if text else NONE


def iso(value: dt.datetime | str | None) -> str:
    text = _utc_text(value)
    return text + "Z" if text else ""


def fmt_bytes(value: int | float | None) -> str:
    if value is None:
        return NONE
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return NONE  # pragma: no cover - loop always returns


def fmt_latency(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


# ----- peers --------------------------------------------------------------------------------
@dataclass(slots=True)
class Conn:
    peer_id: str
    peer_name: str
    path: str
    endpoint: str
    latency: str
    handshake: str
    handshake_iso: str
    rx: str
    tx: str

    def as_json(self) -> dict[str, str]:
        return {
            "peer_id": self.peer_id,
            "peer_name": self.peer_name,
            "path": self.path,
            "endpoint": self.endpoint,
            "latency": self.latency,
            "handshake": self.handshake,
            "handshake_iso": self.handshake_iso,
            "rx": self.rx,
            "tx": self.tx,
        }


def conn_from(raw: dict[str, Any], names: dict[str, str]) -> Conn:
    pid = str(raw.get("peer_id", ""))
    return Conn(
        peer_id=pid,
        peer_name=names.get(pid, pid[:8] + "\u2026"),
        path=str(raw.get("path", "idle")),
        endpoint=str(raw.get("endpoint") or ""),
        latency=fmt_latency(raw.get("latency_ms")),
        handshake=fmt_time(raw.get("last_handshake")),
        handshake_iso=iso(raw.get("last_handshake")),
        rx=fmt_bytes(raw.get("rx_bytes", 0)),
        tx=fmt_bytes(raw.get("tx_bytes", 0)),
    )


def path_summary(raw: Sequence[dict[str, Any]]) -> str:
    if not raw:
        return "none reported"
    counts: dict[str, int] = {}
    for c in raw:
        p = str(c.get("path", "idle"))
        counts[p] = counts.get(p, 0) + 1
    parts = ", ".join(f"{counts[p]} {p}" for p in PATHS if p in counts)
    return f"{len(raw)} ({parts})"


@dataclass(slots=True)
class PeerRow:
    id: str
    name: str
    hostname: str
    mesh_ip: str
    os: str
    agent_version: str
    approved: bool
    ephemeral: bool
    connected: bool
    last_seen: str
    last_seen_iso: str
    reported_at: str
    groups: list[str]
    raw_connections: list[dict[str, Any]]
    connections: list[Conn] = field(default_factory=list)
    more: int = 0
    summary: str = ""


def peer_names(coord: Coordinator) -> dict[str, str]:
    """id -> name of every peer, from the in-memory graph (no store access)."""
    return coord.view.peer_names()


def _row(r: Any, groups: list[str], names: dict[str, str], conn_limit: int | None) -> PeerRow:
    raw = _json(r.connections)
    shown: list[dict[str, Any]] = []
    if conn_limit != 0:
        raw.sort(key=lambda c: (PATH_RANK.get(str(c.get("path")), 9), names.get(str(c.get("peer_id")), "")))
        shown = raw if conn_limit is None else raw[:conn_limit]
    seen = r.last_seen
    return PeerRow(
        id=r.id,
        name=r.name,
        hostname=r.hostname,
        mesh_ip=r.mesh_ip,
        os=r.os,
        agent_version=r.agent_version,
        approved=bool(r.approved),
        ephemeral=bool(r.ephemeral),
        connected=bool(r.connected),
        last_seen=fmt_time(seen),
        last_seen_iso=iso(seen),
        reported_at=fmt_time(r.connections_reported_at),
        groups=groups,
        raw_connections=raw,
        connections=[conn_from(c, names) for c in shown],
        more=len(raw) - len(shown) if conn_limit != 0 else 0,
        summary=path_summary(raw),
    )


# Timestamps and the connections JSON are fetched without SQLAlchemy's per-row result processing
# (on SQLite that is a regex parse per timestamp and a json.loads per row inside the ORM: ~40 ms
# per 1,000 peers); `_json` and the formatters accept both the raw and the processed forms, so
# the same code serves PostgreSQL, whose driver returns datetimes and decoded JSON itself.
_LAST_SEEN = type_coerce(Peer.last_seen, String).label("last_seen")
_CONNECTIONS = type_coerce(Peer.connections, String).label("connections")
_REPORTED = type_coerce(Peer.connections_reported_at, String).label("connections_reported_at")
_COLUMNS = (
    Peer.id,
    Peer.name,
    Peer.hostname,
    Peer.mesh_ip,
    Peer.os,
    Peer.agent_version,
    Peer.approved,
    Peer.ephemeral,
    Peer.connected,
    _LAST_SEEN,
    _CONNECTIONS,
    _REPORTED,
)


def _json(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []


def list_peers(
    coord: Coordinator,
    *,
    name: str | None = None,
    group: str | None = None,
    connected: bool | None = None,
    cursor: str | None = None,
    limit: int = PAGE_MAX,
    conn_limit: int | None = 0,
) -> tuple[list[PeerRow], str | None]:
    """Peers ordered by name; `name` matches a substring. Returns (rows, next cursor)."""
    limit = max(1, min(limit, PAGE_MAX))
    stmt = select(*_COLUMNS)
    if name:
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(Peer.name.like(f"%{escaped}%", escape="\\"))
    if group:
        stmt = stmt.join(PeerGroup, PeerGroup.peer_id == Peer.id).join(Group, Group.id == PeerGroup.group_id)
        stmt = stmt.where(Group.name == group)
    if connected is not None:
        stmt = stmt.where(Peer.connected.is_(connected))
    if cursor:
        stmt = stmt.where(Peer.name > cursor)
    names = peer_names(coord)
    with coord.store.read() as s:
        rows = list(s.connection().execute(stmt.order_by(Peer.name).limit(limit + 1)))
        nxt = None
        if len(rows) > limit:
            rows = rows[:limit]
            nxt = str(rows[-1].name)
        memberships: dict[str, list[str]] = {}
        ids = [r.id for r in rows]
        if ids:
            q = select(PeerGroup.peer_id, Group.name).join(Group, Group.id == PeerGroup.group_id)
            q = q.where(PeerGroup.peer_id.in_(ids)) if len(ids) < len(names) else q
            for pid, gname in s.execute(q.order_by(Group.name)):
                memberships.setdefault(pid, []).append(gname)
    return [_row(r, memberships.get(r.id, []), names, conn_limit) for r in rows], nxt


def counts(coord: Coordinator) -> tuple[int, int]:
    """(peers, online peers) from the store."""
    with coord.store.read() as s:
        total, online = s.execute(
            select(func.count(Peer.id), func.coalesce(func.sum(case((Peer.connected.is_(True), 1), else_=0)), 0))
        ).one()
    return int(total), int(online)


def group_names(coord: Coordinator) -> list[str]:
    return sorted(coord.view.group_names().values())


# ----- the live feed's rows ------------------------------------------------------------------
SNAPSHOT_MARGIN = dt.timedelta(seconds=2)  # re-read rows this much older than the last watermark


@dataclass(frozen=True, slots=True)
class Version:
    """Cheap summary of the peers table: when it differs, something the dashboard shows changed."""

    revision: int
    peers: int
    online: int
    last_seen: dt.datetime | None
    reported: dt.datetime | None

    def watermark(self) -> dt.datetime | None:
        stamps = [t for t in (self.last_seen, self.reported) if t is not None]
        return max(stamps) if stamps else None


def version(coord: Coordinator) -> Version:
    with coord.store.read() as s:
        count, online, last_seen, reported = s.execute(
            select(
                func.count(Peer.id),
                func.coalesce(func.sum(case((Peer.connected.is_(True), 1), else_=0)), 0),
                func.max(Peer.last_seen),
                func.max(Peer.connections_reported_at),
            )
        ).one()
    return Version(coord.view.revision, int(count), int(online), parse_time(last_seen), parse_time(reported))


RawRow = tuple[str, bool, Any, Any, Any]  # name, connected, last_seen, connections, reported (as fetched)


def live_rows(
    coord: Coordinator, changed_since: dt.datetime | None = None, ids: Iterable[str] = ()
) -> dict[str, RawRow]:
    """Peer rows as fetched (unformatted; cheap to compare): every peer, or those whose `last_seen`
    or report time is at or after `changed_since` (every status change and state report moves
    `last_seen`) plus the peers in `ids`."""
    stmt = select(Peer.id, Peer.name, Peer.connected, _LAST_SEEN, _CONNECTIONS, _REPORTED)
    if changed_since is not None:
        cond = (Peer.last_seen >= changed_since) | (Peer.connections_reported_at >= changed_since)
        wanted = list(ids)
        stmt = stmt.where(cond | Peer.id.in_(wanted) if wanted else cond)
    with coord.store.read() as s:
        return {r[0]: (r[1], bool(r[2]), r[3], r[4], r[5]) for r in s.connection().execute(stmt)}


def live_entry(pid: str, row: RawRow, names: dict[str, str]) -> dict[str, Any]:
    """The display-ready JSON the live feed pushes for one peer."""
    name, connected, last_seen, connections, reported = row
    raw = _json(connections)
    raw.sort(key=lambda c: (PATH_RANK.get(str(c.get("path")), 9), names.get(str(c.get("peer_id")), "")))
    return {
        "id": pid,
        "name": name,
        "connected": connected,
        "last_seen": fmt_time(last_seen),
        "last_seen_iso": iso(last_seen),
        "reported_at": fmt_time(reported),
        "summary": path_summary(raw),
        # every pair's path (mesh view), and the first connections in full (open rows, peer page)
        "paths": {str(c.get("peer_id")): str(c.get("path")) for c in raw},
        "connections": [conn_from(c, names).as_json() for c in raw[:LIST_CONNECTIONS]],
        "more": max(0, len(raw) - LIST_CONNECTIONS),
    }


# ----- mesh view ------------------------------------------------------------------------------
@dataclass(slots=True)
class Cell:
    state: str  # direct|relayed|connecting|idle|lost|none (allowed, nothing reported)|blocked|self
    allowed: bool


@dataclass(slots=True)
class MeshView:
    peers: list[PeerRow]  # the matrix peers (online first, then by name)
    matrix: list[list[Cell]]
    truncated: int  # peers left out of the matrix
    pairs: list[tuple[PeerRow, Conn]]
    pairs_total: int  # connections reported by the matrix peers
    path_counts: dict[str, int]  # over every reported connection
    all_pairs: int
    edges: list[tuple[int, int, str]]  # (i, j, best path) for the SVG graph, allowed pairs only
    positions: list[tuple[float, float]]
    total: int
    online: int


def best_path(a: str | None, b: str | None) -> str:
    found = [p for p in (a, b) if p]
    return min(found, key=lambda p: PATH_RANK.get(p, 9)) if found else "none"


def mesh_view(coord: Coordinator, matrix_max: int = MATRIX_MAX) -> MeshView:
    rows, _ = list_peers(coord, limit=PAGE_MAX, conn_limit=0)
    rows.sort(key=lambda r: (not r.connected, r.name))
    chosen = rows[:matrix_max]
    names = peer_names(coord)
    paths: dict[str, dict[str, str]] = {
        r.id: {str(c.get("peer_id")): str(c.get("path")) for c in r.raw_connections} for r in chosen
    }
    reach = coord.view.reach_matrix([r.id for r in chosen])
    matrix: list[list[Cell]] = []
    edges: list[tuple[int, int, str]] = []
    for i, a in enumerate(chosen):
        line: list[Cell] = []
        for j, b in enumerate(chosen):
            if i == j:
                line.append(Cell("self", False))
                continue
            allowed = reach[i][j]
            reported = paths[a.id].get(b.id)
            line.append(Cell(reported or ("none" if allowed else "blocked"), allowed))
            back = paths[b.id].get(a.id)
            if j > i and (allowed or reported or back):
                edges.append((i, j, best_path(reported, back)))
        matrix.append(line)
    path_counts = {p: 0 for p in PATHS}
    total_pairs = 0
    for r in rows:
        for c in r.raw_connections:
            total_pairs += 1
            p = str(c.get("path"))
            path_counts[p] = path_counts.get(p, 0) + 1
    pair_list: list[tuple[PeerRow, Conn]] = []
    for r in chosen:
        ordered = sorted(r.raw_connections, key=lambda c: names.get(str(c.get("peer_id")), ""))
        pair_list.extend((r, conn_from(c, names)) for c in ordered[: PAIRS_MAX - len(pair_list)])
    n = max(1, len(chosen))
    angles = [2 * math.pi * k / n - math.pi / 2 for k in range(len(chosen))]
    positions = [(200 + 160 * math.cos(a), 200 + 160 * math.sin(a)) for a in angles]
    return MeshView(
        peers=chosen,
        matrix=matrix,
        truncated=len(rows) - len(chosen),
        pairs=pair_list,
        pairs_total=sum(len(r.raw_connections) for r in chosen),
        path_counts=path_counts,
        all_pairs=total_pairs,
        edges=edges,
        positions=positions,
        total=len(rows),
        online=sum(1 for r in rows if r.connected),
    )


# ----- access: who can reach whom ---------------------------------------------------------------
@dataclass(slots=True)
class Reach:
    name: str
    peer_id: str
    mesh_ip: str
    outbound: list[str]  # "tcp 5432 (policy)" the chosen peer may open to this one
    inbound: list[str]  # ... this one may open to the chosen peer


def _rule_text(rule: dict[str, Any], policy_names: dict[str, str]) -> str:
    ports = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in rule.get("ports") or [])
    proto = str(rule.get("protocol", "any"))
    what = f"{proto} {ports}" if ports else ("all traffic" if proto == "any" else f"{proto} (all ports)")
    pid = str(rule.get("policy_id", ""))
    return f"{what} ({policy_names.get(pid, pid)})"


@dataclass(slots=True)
class RouteReach:
    name: str
    prefix: str
    routers: list[str]  # "gw1 (metric 10)", best first
    allowed: list[str]  # "tcp 443 (policy)"


def reachability(
    coord: Coordinator, peer_id: str, policy_names: dict[str, str]
) -> tuple[list[Reach], list[RouteReach], list[RouteReach]]:
    """Who the peer may reach and be reached by, the routes it may use, and the routes it forwards
    (with who may use them), from its rendered map (relay secrets are dropped)."""
    doc = json.loads(coord.render_full(peer_id))
    by_ip: dict[str, Reach] = {}
    names: dict[str, str] = {}
    for p in doc.get("peers", []):
        by_ip[p["mesh_ip"]] = Reach(p["name"], p["id"], p["mesh_ip"], [], [])
        names[p["id"]] = p["name"]
    firewall = doc.get("firewall", {})
    sets: dict[str, list[str]] = firewall.get("sets", {})
    uses = {
        r["id"]: RouteReach(
            r["name"],
            r["prefix"],
            [
                f"{names.get(x['peer_id'], x['peer_id'])} (metric {x['metric']})"
                for x in sorted(r["routers"], key=lambda x: x["metric"])
            ],
            [],
        )
        for r in doc.get("routes", [])
    }
    forwards = {f["route_id"]: RouteReach(f["name"], f["prefix"], [], []) for f in doc.get("forward", [])}
    for rule in firewall.get("rules", []):
        text = _rule_text(rule, policy_names)
        direction = rule.get("direction")
        if direction == "route" and rule.get("route_id") in uses:
            uses[rule["route_id"]].allowed.append(text)
            continue
        for ip in sets.get(rule.get("peer_set", ""), []):
            if direction == "forward" and rule.get("route_id") in forwards:
                who = by_ip[ip].name if ip in by_ip else ip
                forwards[rule["route_id"]].allowed.append(f"{who}: {text}")
                continue
            entry = by_ip.get(ip)
            if entry is None:
                continue
            (entry.outbound if direction == "out" else entry.inbound).append(text)
    return (
        sorted(by_ip.values(), key=lambda r: r.name),
        sorted(uses.values(), key=lambda r: r.prefix),
        sorted(forwards.values(), key=lambda r: r.prefix),
    )


def peer_choices(coord: Coordinator) -> list[tuple[str, str, str]]:
    """(id, name, mesh ip) of every peer, by name, from the graph."""
    return sorted(((n.id, n.name, n.mesh_ip) for n in coord.view.peers()), key=lambda t: t[1])
