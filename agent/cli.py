"""`starling`: enroll and start (`up`), run the daemon, stop and remove (`down`), show `status`.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage/config/state, 3 enrollment refused,
4 coordinator unreachable, 5 the agent is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.client import CoordinatorError, enroll
from agent.config import AgentConfig, AgentConfigError, AgentState, ensure_state_dir, load_config, save_config
from agent.control import ControlError, call
from agent.keys import FileKeySource, KeyError_, KeySource, generate_private_key, make_key_source
from agent.wg import WireGuardBackend, WireGuardError

if TYPE_CHECKING:
    from agent.wg.userspace import UserspaceBackend

EXIT_RUNTIME, EXIT_USAGE, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_NOT_RUNNING = 1, 2, 3, 4, 5
SYSTEMD_UNIT = "starling-agent.service"


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="starling", description="Starling mesh agent")
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("--config", type=Path, default=None, help="agent config (default /etc/starling/agent.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="enroll (or re-login) and start the agent")
    up.add_argument("--management-url", required=False, help="coordinator URL, e.g. https://mesh.example.org")
    up.add_argument("--setup-key", required=False, help="setup key (or STARLING_SETUP_KEY)")
    up.add_argument("--hostname")
    up.add_argument("--interface")
    up.add_argument("--port", type=int)
    up.add_argument("--state-dir", type=Path)
    up.add_argument("--backend", choices=["auto", "kernel", "userspace"])
    up.add_argument("--signal-url")
    up.add_argument(
        "--disable-firewall",
        action="store_true",
        default=None,
        help="do not install the nftables table (the operator filters mesh traffic)",
    )
    up.add_argument(
        "--exit-node",
        metavar="PEER",
        help="send all traffic through this peer (name or id; 'none': no exit node; '': the coordinator's choice)",
    )
    up.add_argument("--foreground", action="store_true", help="run the daemon here instead of through systemd")
    daemon = sub.add_parser("daemon", help="run the agent daemon in the foreground")
    daemon.add_argument("--state-dir", type=Path)
    down = sub.add_parser("down", help="stop the agent and remove its interface")
    down.add_argument("--state-dir", type=Path)
    status = sub.add_parser("status", help="show the agent's status")
    status.add_argument("-d", "--detail", action="store_true", help="per-peer detail")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--state-dir", type=Path)
    explain = sub.add_parser(
        "explain", help="why a peer is on its current path (direct or relayed), or how an address is routed"
    )
    explain.add_argument("peer", help="peer name, id or public key; or an IPv4 address outside the mesh")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--state-dir", type=Path)
    netcheck = sub.add_parser(
        "netcheck",
        help="measure UDP reachability, the NAT's mapping behaviour and each relay's latency (no agent needed)",
    )
    netcheck.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="URL",
        help="a STUN/TURN server to probe (stun:|turn:|turns:HOST:PORT[?transport=tcp]); repeatable; "
        "added to the relays of the agent's cached map",
    )
    netcheck.add_argument("--no-map", action="store_true", help="probe only the --server URLs, not the cached map's")
    netcheck.add_argument("--json", action="store_true", help="machine-readable output")
    netcheck.add_argument("--state-dir", type=Path)
    key = sub.add_parser("key", help="the WireGuard key: show it, or reload it from the key source (rotation)")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    reload_ = key_sub.add_parser(
        "reload", help="load the key source's current key, present it to the coordinator, verify handshakes"
    )
    reload_.add_argument("--expect-public-key", help="fail unless the source's key has this public key")
    reload_.add_argument("--verify-timeout", type=float, default=30.0, help="seconds to wait for handshakes (30)")
    reload_.add_argument("--json", action="store_true", help="machine-readable output")
    reload_.add_argument("--state-dir", type=Path)
    show = key_sub.add_parser("show", help="the public key in use, its source and version")
    show.add_argument("--json", action="store_true")
    show.add_argument("--state-dir", type=Path)
    return p


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("STARLING_AGENT_CONFIG", "/etc/starling/agent.yaml"))


def load(args: argparse.Namespace) -> AgentConfig:
    config = load_config(config_path(args))
    if getattr(args, "state_dir", None):
        config.state_dir = args.state_dir
    return config


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (log_format: json) for log shippers; never carries secrets."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(config: AgentConfig) -> None:
    if config.log_format not in ("text", "json"):
        raise AgentConfigError(f"log_format: {config.log_format!r} must be text or json")
    logging.basicConfig(
        level=logging.INFO if config.log_level == "debug" else config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("starling", "agent"):
        logging.getLogger(name).setLevel(config.log_level.upper())


# ----- up -------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    config = load(args)
    for flag, attr in (
        ("management_url", "management_url"),
        ("interface", "interface"),
        ("port", "port"),
        ("hostname", "hostname"),
        ("backend", "backend"),
        ("signal_url", "signal_url"),
        ("disable_firewall", "disable_firewall"),
    ):
        value = getattr(args, flag)
        if value is not None:
            setattr(config, attr, value)
    if args.exit_node is not None:
        config.exit_node = args.exit_node
    config.validate()
    setup_key = args.setup_key or os.environ.get("STARLING_SETUP_KEY", "")
    try:
        running = call(config.control_socket, {"cmd": "status"}, timeout=2)
    except ControlError:
        running = None
    if running is not None:
        status = running.get("status", {})
        if args.exit_node is not None:
            return _set_exit_node(config, args)
        print(f"starling is already up as {status.get('name')} ({status.get('mesh_ip')}); `starling down` first")
        return 0
    state_file = config.state_file
    existing = AgentState.load(state_file) if state_file.exists() else None
    if not config.management_url:
        if existing is None:
            raise CliError("--management-url is required for the first `starling up`", EXIT_USAGE)
        config.management_url = existing.management_url
    keys = make_key_source(config.key_source, config.state_dir)
    fresh_key: str | None = None
    if isinstance(keys, FileKeySource) and not keys.path.exists():
        fresh_key = generate_private_key()  # persisted only once enrollment succeeded
        private = fresh_key
    else:
        private = keys.load()
    here = args.foreground or not _systemd_available()  # the daemon runs in this process
    early: UserspaceBackend | None = None
    if existing is None or setup_key:
        if not setup_key and fresh_key is not None:
            raise CliError("--setup-key is required to enroll this host", EXIT_USAGE)
        fresh_dir = not config.state_dir.exists()
        if here:
            early = _start_early(config)
        try:
            _enroll(config, state_file, keys, private, fresh_key, setup_key)
        except BaseException:
            if early is not None:
                _abort_early(early, config.state_dir if fresh_dir else None)  # nothing is left behind
            raise
    save_config(config, config_path(args))
    if not here:
        _start_systemd(config_path(args))
        print(f"started {SYSTEMD_UNIT}")
        return 0
    return run_daemon(config, early)


def _start_early(config: AgentConfig) -> UserspaceBackend | None:
    """What the daemon needs next, started while we enroll: its modules are imported in a thread (they
    are not needed to enroll; the thread runs while we wait for the coordinator), and wireguard-go (the
    userspace backend) is started, for the key is known before enrollment. The caller aborts it if
    enrollment fails."""
    threading.Thread(target=_import_daemon, name="prefetch", daemon=True).start()
    if config.backend != "userspace":
        return None  # auto probes the kernel first: the daemon decides
    from agent.wg.userspace import UserspaceBackend

    backend = UserspaceBackend(config.interface, log_dir=config.state_dir / "logs")
    try:
        return backend if backend.start() else None
    except WireGuardError:
        return None  # the daemon starts it (and reports why it cannot)


def _abort_early(backend: UserspaceBackend, created: Path | None) -> None:
    """Enrollment failed: stop the early wireguard-go (its link and socket go) and remove its log, and the
    state directory if it was made for it."""
    backend.abort()
    if backend.log_dir is not None:
        (backend.log_dir / f"wireguard-go-{backend.interface}.log").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            backend.log_dir.rmdir()
    if created is not None:
        with contextlib.suppress(OSError):
            created.rmdir()  # only if empty


def _import_daemon() -> None:
    # The daemon first (the next thing the main thread needs), then what the device set-up needs.
    for module in ("agent.daemon", "pyroute2"):
        with contextlib.suppress(Exception):  # the real import reports any problem
            importlib.import_module(module)


def _enroll(
    config: AgentConfig,
    state_file: Path,
    keys: KeySource,
    private: str,
    fresh_key: str | None,
    setup_key: str,
) -> None:
    """Enroll (setup key) or log in with our key; writes the key, state and nothing else on success."""
    # Sealed with our private key: a known key logs in on that proof alone, a new one needs the setup key.
    body: dict[str, Any] = {
        "hostname": config.hostname or socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "agent_version": __version__,
    }
    if setup_key:
        body["setup_key"] = setup_key
    try:
        result = enroll(config.management_url, private, body, verify=config.tls_context())
    except CoordinatorError as exc:
        if exc.status == 403 and not setup_key:
            raise CliError(f"--setup-key is required to enroll this host ({exc})", EXIT_USAGE) from exc
        code = EXIT_UNREACHABLE if exc.status == 0 else EXIT_REFUSED if exc.status in (401, 403) else EXIT_RUNTIME
        raise CliError(f"enrollment failed: {exc}", code) from exc
    ensure_state_dir(config.state_dir)
    if fresh_key is not None and isinstance(keys, FileKeySource):
        from agent.config import write_private

        write_private(keys.path, fresh_key + "\n")
    peer = result["peer"]
    state = AgentState(config.management_url, peer["id"], peer["name"], peer["mesh_ip"], result["credential"])
    state.save(state_file)
    verb = "logged in" if result.get("login") else "enrolled"
    print(f"{verb} as {peer['name']} ({peer['mesh_ip']}) in {config.management_url}")


def _set_exit_node(config: AgentConfig, args: argparse.Namespace) -> int:
    """`starling up --exit-node PEER` on a running agent: switch now and keep it in agent.yaml."""
    reply = call(config.control_socket, {"cmd": "exit-node", "peer": config.exit_node}, timeout=10)
    if not reply.get("ok"):
        raise CliError(str(reply.get("error")), EXIT_USAGE)
    save_config(config, config_path(args))
    routing = reply["routing"]
    if routing["exit_node"]:
        print(f"exit node: {routing['exit_node']} (all traffic leaves the mesh there)")
    elif config.exit_node not in ("", "none"):
        print(f"exit node {config.exit_node} not used: {routing['exit_reason']}")
        return EXIT_RUNTIME
    else:
        print("no exit node")
    return 0


def _systemd_available() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _start_systemd(config: Path) -> None:
    unit = Path("/etc/systemd/system") / SYSTEMD_UNIT
    exe = shutil.which("starling") or f"{sys.executable} -m agent.cli"
    if not unit.exists():
        unit.write_text(
            "[Unit]\nDescription=Starling mesh agent\nAfter=network-online.target\nWants=network-online.target\n\n"
            f"[Service]\nExecStart={exe} --config {config} daemon\nRestart=always\nRestartSec=2\n"
            "KillMode=process\n\n[Install]\nWantedBy=multi-user.target\n"
        )
        subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", "--now", SYSTEMD_UNIT], check=True)


# ----- daemon ---------------------------------------------------------------------------------
def run_daemon(config: AgentConfig, backend: WireGuardBackend | None = None) -> int:
    """The daemon in this process; `backend`: one `up` started already (wireguard-go during enrollment)."""
    from agent.daemon import Agent
    from agent.wg.detect import make_backend

    setup_logging(config)
    state = AgentState.load(config.state_file)
    if state is None:
        raise CliError(f"not enrolled (no {config.state_file}): run `starling up` first", EXIT_USAGE)
    keys = make_key_source(config.key_source, config.state_dir)
    keys.load()  # fail before touching the network if the key is unusable
    if backend is None:
        backend = make_backend(config.backend, config.interface, config.state_dir)
    agent = Agent(config, state, keys, backend)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        await agent.run()

    asyncio.run(main())
    return 0


# ----- down / status --------------------------------------------------------------------------
def cmd_down(args: argparse.Namespace) -> int:
    config = load(args)
    if _systemd_available() and Path("/etc/systemd/system", SYSTEMD_UNIT).exists():
        subprocess.run(["systemctl", "disable", "--now", SYSTEMD_UNIT], check=False)
    try:
        call(config.control_socket, {"cmd": "down", "remove": True})
        deadline = time.monotonic() + 10
        while config.control_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    except ControlError:
        pass
    from agent.wg.detect import make_backend

    backend = make_backend(
        config.backend if config.backend != "auto" else "userspace", config.interface, config.state_dir
    )
    backend.down()
    from agent.firewall import Firewall, FirewallError

    with contextlib.suppress(FirewallError):
        Firewall(config.interface, monitor=False).remove()
    print(f"starling is down ({config.interface} removed)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        reply = call(config.control_socket, {"cmd": "status"})
    except ControlError as exc:
        raise CliError(str(exc), EXIT_NOT_RUNNING) from exc
    status: dict[str, Any] = reply["status"]
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status, detail=args.detail))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        reply = call(config.control_socket, {"cmd": "explain", "peer": args.peer})
    except ControlError as exc:
        raise CliError(str(exc), EXIT_NOT_RUNNING) from exc
    if not reply.get("ok"):
        raise CliError(str(reply.get("error", "explain failed")), EXIT_USAGE)
    data: dict[str, Any] = reply["explain"]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(format_explain(data))
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    """`starling key show|reload`. Reload exits 0 when the key is in use and verified (or unchanged),
    1 when it failed; the JSON output says at which stage and whether the key was switched."""
    config = load(args)
    try:
        if args.key_command == "show":
            status = call(config.control_socket, {"cmd": "status"})["status"]
            info = {"public_key": status["public_key"], **status.get("key", {})}
            print(
                json.dumps(info)
                if args.json
                else f"{info['public_key']} ({info.get('source')}, version {info.get('version') or '-'})"
            )
            return 0
        request = {
            "cmd": "key-reload",
            "expect_public_key": args.expect_public_key,
            "verify_timeout": args.verify_timeout,
        }
        reply = call(config.control_socket, request, timeout=args.verify_timeout + 30)
    except ControlError as exc:
        raise CliError(str(exc), EXIT_NOT_RUNNING) from exc
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("ok"):
        if not reply.get("changed"):
            print(f"key unchanged: {reply['public_key']} (version {reply.get('version') or '-'})")
        else:
            slowest = max(reply.get("handshakes", {}).values(), default=0.0)
            print(
                f"key rotated to {reply['public_key']} (version {reply.get('version') or '-'}); "
                f"{len(reply.get('handshakes', {}))} neighbour(s) handshook again, slowest {slowest:.2f}s"
            )
    else:
        state = "the new key is in use" if reply.get("switched") else "the old key is still in use"
        print(
            f"starling: key reload failed ({reply.get('stage', '?')}): {reply.get('error')}; {state}", file=sys.stderr
        )
    return 0 if reply.get("ok") else EXIT_RUNTIME


def cmd_netcheck(args: argparse.Namespace) -> int:
    """`starling netcheck`: exit 0 when the check ran (whatever it found), 2 when there is nothing to probe."""
    from agent.netcheck import Netcheck, format_report, parse_url

    config = load(args)
    for url in args.server:
        try:
            parse_url(url)
        except ValueError as exc:
            raise CliError(f"--server {exc}", EXIT_USAGE) from exc
    urls: list[str] = list(args.server)
    sources = [f"--server ({len(args.server)})"] if args.server else []
    cache = config.state_dir / "map.json"
    if not args.no_map:
        map_urls = _cached_map_urls(cache)
        if map_urls is not None:
            urls += [u for u in map_urls if u not in urls]
            sources.append(f"{cache} ({len(map_urls)} URL(s))")
    if not urls:
        raise CliError(
            f"no STUN/TURN server to probe: no relays in {cache} (is this host enrolled?); pass --server URL",
            EXIT_USAGE,
        )
    wireguard_mapping = None
    with contextlib.suppress(ControlError, KeyError, TypeError):
        status = call(config.control_socket, {"cmd": "status"}, timeout=2)["status"]
        wireguard_mapping = status["nat"]["reflexive"]["address"]
    check = Netcheck(urls, sources, tls=config.tls_context(), wireguard_mapping=wireguard_mapping)
    report = asyncio.run(check.run())
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cached_map_urls(path: Path) -> list[str] | None:
    """The relay URLs of the agent's cached map (None: no readable map there)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    urls: list[str] = []
    relays = data.get("relays") if isinstance(data, dict) else None
    for relay in relays if isinstance(relays, list) else []:
        for url in relay.get("urls", []) if isinstance(relay, dict) else []:
            if isinstance(url, str) and url not in urls:
                urls.append(url)
    return urls


def format_route_explain(data: dict[str, Any]) -> str:
    lines = [data["verdict"]]
    route = data.get("route")
    if route:
        routers = ", ".join(
            f"{r['name']}(metric {r['metric']}, {'up' if r['up'] else 'down'})" for r in route["routers"]
        )
        lines.append(f"  route:    {route['name']} {route['prefix']} ({route['id']})")
        lines.append(f"  routers:  {routers or '-'}; active: {route['active_router'] or '-'} ({route['reason']})")
    for p in data.get("policies", []):
        ports = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in p["ports"]) or "all ports"
        lines.append(f"  allowed by policy {p['policy_id']}: {p['protocol']} {ports}")
    return "\n".join(lines)


def format_explain(data: dict[str, Any]) -> str:
    if "address" in data:
        return format_route_explain(data)
    peer, refl = data["peer"], data["reflexive"]
    ours = ", ".join(f"{c['kind']} {c['address']}" for c in data["our_candidates"]) or "none"
    theirs = ", ".join(f"{c['kind']} {c['address']}" for c in peer["candidates"]) or "none received"
    lines = [
        f"{peer['name']} is {peer['path'].upper()} since {_ago(peer['since'])} ({peer['path_changes']} path changes)",
        f"  WireGuard endpoint: {peer['endpoint'] or '-'}" + (" (local relay proxy)" if peer["proxied"] else ""),
        f"  our public mapping: {refl['address'] or 'unknown'}"
        + (f" via STUN {refl['server']}" if refl["server"] else "")
        + (f" (error: {refl['error']})" if refl["error"] else ""),
        f"  our candidates:     {ours}",
        f"  their candidates:   {theirs}",
        f"  ICE role:           {'controlling' if data['controlling'] else 'controlled'}",
    ]
    if peer["proxied"]:
        lines.append(f"  selected pair:      {peer['local_candidate']} -> {peer['remote_candidate']}")
        lines.append(f"  relay server:       {_relay_text(peer) or '- (direct pair through the proxy)'}")
    if peer.get("last_error"):
        lines.append(f"  last error:         {peer['last_error']}")
    lines.append("  history:" if data["history"] else "  history: no fallback needed (direct candidates worked)")
    lines += [f"    {h}" for h in data["history"]]
    return "\n".join(lines)


def _relay_text(peer: dict[str, Any]) -> str:
    """ "relayed via 198.19.0.1:443 (tls)": the relay of a relayed path and how we reach it."""
    server = peer.get("relay_server")
    if not server:
        return ""
    transport = peer.get("relay_transport")
    return f"relayed via {server}" + (f" ({transport})" if transport else "")


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    secs = max(0, time.time() - ts)
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}m ago"


def _firewall_line(fw: dict[str, Any]) -> str:
    state = fw.get("state", "unknown")
    if fw.get("mode") == "disabled":
        return "DISABLED by the operator (mesh traffic is not filtered by starling)"
    if state == "enforcing":
        return f"enforcing {fw.get('rules', 0)} rules, {fw.get('elements', 0)} set elements"
    if state == "guard":
        return "guard only: all mesh traffic dropped until the first map applies"
    if state == "absent":
        return "not installed yet"
    kept = {"guard": "guard kept: mesh traffic dropped", "ruleset": "previous rules kept"}.get(
        str(fw.get("installed")), "nothing installed: mesh traffic not filtered"
    )
    return f"{state.upper()}: {fw.get('message') or fw.get('last_error') or 'unknown error'} ({kept})"


def _nat_line(nat: dict[str, Any]) -> str:
    refl = nat.get("reflexive") or {}
    if refl.get("address"):
        how = "" if refl.get("mapped_to_wireguard_port") else " (port guessed: no nftables SNAT)"
        return f"public mapping {refl['address']} (STUN {refl.get('server')}){how}"
    if not nat.get("stun_servers"):
        return "no STUN/TURN server in the network map (direct host candidates only)"
    return f"public mapping unknown: {refl.get('error') or 'not probed yet'}"


def _routing_lines(routing: dict[str, Any]) -> list[str]:
    """Routes this peer may use (active routing peer, or why not installed), exit node, forwarding."""
    lines: list[str] = []
    for r in routing.get("routes", []):
        if r["prefix"] == "0.0.0.0/0" and not r["active_router"]:
            continue  # exit routes not chosen: listed by the exit node line
        routers = ", ".join(f"{x['name']}({x['metric']}{'' if x['up'] else ', down'})" for x in r["routers"]) or "-"
        where = f"via {r['active_router']}" if r["installed"] else f"NOT INSTALLED: {r['reason']}"
        lines.append(f"Route:       {r['prefix']} ({r['name']}) {where}; routers {routers}")
    if routing.get("exit_node"):
        lines.append(f"Exit node:   {routing['exit_node']} (all other traffic leaves the mesh there)")
    elif routing.get("exit_reason") not in (None, "", "no exit node chosen"):
        lines.append(f"Exit node:   none: {routing['exit_reason']}")
    if routing.get("forwarding"):
        lines.append("Forwarding:  on (this peer routes for others; the firewall's forward rules decide who)")
    if routing.get("last_error"):
        lines.append(f"Routing:     ERROR {routing['last_error']}")
    return lines


def _latency_text(peer: dict[str, Any]) -> str:
    if peer.get("latency_ms") is None:
        return "- (no handshake measured yet)"
    return f"{peer['latency_ms']:.1f} ms (WireGuard handshake round trip, {_ago(peer.get('latency_at'))})"


def _latency_lines(latency: dict[str, Any] | None) -> list[str]:
    """A line only when latency cannot be measured here (e.g. no CAP_NET_RAW)."""
    if latency and latency.get("error"):
        return [f"Latency:     NOT MEASURED: {latency['error']}"]
    return []


def format_status(status: dict[str, Any], *, detail: bool) -> str:
    mgmt, sig = status["management"], status["signal"]
    peers = status["peers"]
    connected = sum(1 for p in peers if p["path"] in ("direct", "relayed"))
    lines = [
        f"Peer:        {status['name']} {status['mesh_ip']} ({status['interface']}, {status['backend']} backend)",
        f"Management:  {'connected' if mgmt['connected'] else 'DISCONNECTED'} {mgmt['url']}"
        + (f" ({mgmt['last_error']})" if mgmt["last_error"] and not mgmt["connected"] else ""),
        f"Signal:      {'connected' if sig['connected'] else 'DISCONNECTED'}"
        + (f" ({sig['last_error']})" if sig["last_error"] and not sig["connected"] else ""),
        f"Peers:       {connected}/{len(peers)} connected (map serial {status['map_serial']})",
        "Firewall:    " + _firewall_line(status.get("firewall", {})),
        "NAT:         " + _nat_line(status.get("nat", {})),
        *_routing_lines(status.get("routing") or {}),
        *_latency_lines(status.get("latency")),
    ]
    if detail:
        for p in peers:
            lines += [
                "",
                f"  {p['name']}  {p['mesh_ip']}",
                f"    public key:     {p['public_key']}",
                f"    path:           {p['path']} (since {_ago(p['since'])}, {p['path_changes']} changes)",
                f"    endpoint:       {p['endpoint'] or '-'}" + (" (relay proxy)" if p.get("proxied") else ""),
                "    candidates:     "
                + (", ".join(f"{c['kind']} {c['address']}" for c in p.get("candidates", [])) or "-"),
                f"    last handshake: {_ago(p['last_handshake'])}",
                *(
                    [
                        f"    ICE pair:       {p['local_candidate']} -> {p['remote_candidate']}",
                        f"    relay server:   {_relay_text(p) or '-'}",
                    ]
                    if p.get("proxied")
                    else []
                ),
                f"    transfer:       {p['rx_bytes']} B received, {p['tx_bytes']} B sent",
                "    latency:        " + _latency_text(p),
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "up":
            return cmd_up(args)
        if args.command == "daemon":
            return run_daemon(load(args))
        if args.command == "down":
            return cmd_down(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "key":
            return cmd_key(args)
        if args.command == "netcheck":
            return cmd_netcheck(args)
        return cmd_status(args)
    except CliError as exc:
        print(f"starling: {exc}", file=sys.stderr)
        return exc.code
    except (AgentConfigError, KeyError_) as exc:
        print(f"starling: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WireGuardError as exc:
        print(f"starling: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
