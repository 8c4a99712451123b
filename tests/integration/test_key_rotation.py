"""Key rotation end to end: real agents (wireguard-go) in namespaces whose keys live in a real
OpenBao (AppRole per host), a real coordinator and signal. Every pair pings at 10 packets/s while
the keys rotate; the test counts lost packets.

Topology: bridge 198.18.N.0/24 (coordinator, signal and OpenBao on .1), agents a, b, c in group
`ring` with a ring<->ring policy (every pair may talk).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.mesh import Mesh, control_plane, wait_for
from tests.fixtures.netns import netlab
from tests.fixtures.openbao import dev_server
from tests.fixtures.vault_mesh import VaultPeers

pytestmark = pytest.mark.slow

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def rmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, VaultPeers]]:
    workdir = tmp_path_factory.mktemp("rotation")
    with (
        netlab() as lab,
        dev_server(workdir / "bao", host=lab.gateway) as bao,
        control_plane(workdir, lab.gateway, groups=("ring",), policies=(("ring", "ring"),)) as (coord, signal),
    ):
        vault = VaultPeers(bao, workdir)
        mesh = Mesh(lab, coord, signal, workdir)
        try:
            for name in NAMES:
                mesh.start_agent(name, ["ring"], config=vault.add(name))
            for src in NAMES:
                for dst in NAMES:
                    if src != dst:
                        mesh.wait_ping(src, dst, 20)
            yield mesh, vault
        finally:
            for agent in mesh.agents.values():
                print(f"--- agent {agent.host.name} log ---\n{agent.log_tail(120)}")


class Pings:
    """Every ordered pair pings at 10 packets/s for `count` packets; `lost()` when done."""

    def __init__(self, mesh: Mesh, workdir: Path, count: int) -> None:
        self.procs: dict[tuple[str, str], tuple[subprocess.Popen[bytes], Path]] = {}
        for src in NAMES:
            for dst in NAMES:
                if src == dst:
                    continue
                log = workdir / f"ping-{src}-{dst}.log"
                log.unlink(missing_ok=True)
                # -D -O: a timestamp per reply and a line per missing one, to place a loss in the agents' logs.
                proc = mesh.agents[src].host.popen(
                    ["ping", "-n", "-D", "-O", "-i", "0.1", "-c", str(count), "-W", "5", mesh.agents[dst].mesh_ip], log
                )
                self.procs[(src, dst)] = (proc, log)

    def lost(self) -> dict[str, int]:
        out = {}
        self.missing: dict[str, list[str]] = {}
        for (src, dst), (proc, log) in self.procs.items():
            proc.wait(120)
            text = log.read_text()
            m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
            assert m, text
            out[f"{src}->{dst}"] = int(m.group(1)) - int(m.group(2))
            self.missing[f"{src}->{dst}"] = [line for line in text.splitlines() if "no answer yet" in line]
        return out


def rotation_log(mesh: Mesh, missing: dict[str, list[str]] | None = None) -> str:
    """The agents' log lines around key changes and path changes (for a failed loss assertion); with
    `missing` (ping's "no answer yet" lines, -D timestamps), only the lines within 3 s of a loss, so that
    the CI log, which keeps only the end of the output, still shows them."""
    words = ("rotat", "presented", "WireGuard", "endpoint", "lost", "offer", "answer", "ERROR", "WARNING", "key")
    times = [
        float(m.group(1))
        for lines in (missing or {}).values()
        for line in lines
        if (m := re.match(r"\[(\d+\.\d+)\]", line))
    ]
    out = []
    for name, agent in mesh.agents.items():
        lines = [line for line in agent.log_tail(2000).splitlines() if any(w in line for w in words)]
        if times:
            lines = [line for line in lines if _near(line, times, 3.0)]
        out.append(f"--- {name}\n" + "\n".join(lines[-60:]))
    return "\n".join(out)


def _near(line: str, times: list[float], window: float) -> bool:
    """The agent log line (starting "YYYY-mm-dd HH:MM:SS,mmm", UTC) is within `window` s of one of `times`."""
    try:
        stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return False
    return any(abs(stamp - t) <= window for t in times)


def reload(mesh: Mesh, name: str, expect: str | None = None) -> dict[str, Any]:
    args = ["key", "reload", "--json", "--verify-timeout", "20"]
    if expect:
        args += ["--expect-public-key", expect]
    result = mesh.agents[name].cli(*args, timeout=60)
    data: dict[str, Any] = json.loads(result.stdout)
    data["returncode"] = result.returncode
    return data


def coordinator_key(mesh: Mesh, name: str) -> str:
    with mesh.api() as api:
        return str(api.get(f"/api/v1/peers/{mesh.agents[name].peer_id}").json()["public_key"])


def test_rotating_every_key_loses_no_packet(rmesh: tuple[Mesh, VaultPeers], tmp_path: Path) -> None:
    mesh, vault = rmesh
    pings = Pings(mesh, tmp_path, count=250)  # 25 s at 10 packets/s, 6 directions
    results = {}
    for name in NAMES:
        version, public = vault.write_key(name)
        result = reload(mesh, name, expect=public)
        assert result["ok"], result
        assert result["changed"] and result["public_key"] == public and result["version"] == version
        assert sorted(result["handshakes"]) == sorted(n for n in NAMES if n != name), result
        assert coordinator_key(mesh, name) == public
        assert mesh.agents[name].status()["public_key"] == public
        results[name] = result
    lost = pings.lost()
    print("rotation results:", json.dumps(results, indent=1), "lost:", lost)
    assert sum(lost.values()) == 0, (lost, pings.missing, rotation_log(mesh))
    with mesh.api() as api:
        actions = [e["action"] for e in api.get("/api/v1/audit", params={"limit": 200}).json()["items"]]
    for action in ("peer.key.prepare", "peer.key.rotate", "peer.key.verified"):
        assert actions.count(action) >= 3, (action, actions)


def test_reload_without_a_new_version_changes_nothing(rmesh: tuple[Mesh, VaultPeers]) -> None:
    mesh, _ = rmesh
    before = coordinator_key(mesh, "a")
    result = reload(mesh, "a")
    assert result["ok"] and not result["changed"] and result["public_key"] == before


def test_denied_vault_read_fails_cleanly_and_keeps_the_old_key(rmesh: tuple[Mesh, VaultPeers]) -> None:
    mesh, vault = rmesh
    before = coordinator_key(mesh, "b")
    vault.write_key("b")
    wrong = 'path "starling/data/mesh/peers/a/wireguard" { capabilities = ["read"] }'
    vault.client.sys.create_or_update_policy("peer-b", wrong)  # a misconfigured policy
    try:
        result = reload(mesh, "b")
        assert not result["ok"] and result["stage"] == "source" and not result["switched"], result
        assert "denied" in result["error"], result
        assert coordinator_key(mesh, "b") == before and mesh.agents["b"].status()["public_key"] == before
        mesh.wait_ping("a", "b", 5)
    finally:
        vault.client.sys.create_or_update_policy(
            "peer-b", 'path "starling/data/mesh/peers/b/wireguard" { capabilities = ["read"] }'
        )


def test_key_rotated_while_the_agent_was_down_is_presented_at_start(rmesh: tuple[Mesh, VaultPeers]) -> None:
    mesh, vault = rmesh
    agent = mesh.agents["c"]
    assert agent.process is not None
    agent.process.terminate()  # SIGTERM: the daemon stops and leaves the interface for the next start
    agent.process.wait(20)
    sock = agent.workdir / "state" / "agent.sock"
    wait_for(lambda: not sock.exists(), 10, what="c stopped")
    _, public = vault.write_key("c")  # rotated in Vault while the agent is down
    agent.process = agent.host.popen(
        [sys.executable, "-m", "agent.cli", "--config", str(agent.config), "daemon"], agent.workdir / "agent.log"
    )
    wait_for(lambda: sock.exists(), 20, what="c control socket")
    wait_for(lambda: coordinator_key(mesh, "c") == public, 15, what="c presents its new key")
    mesh.wait_ping("a", "c", 15)
    mesh.wait_ping("c", "b", 15)
    with mesh.api() as api:
        events = api.get("/api/v1/audit", params={"action": "peer.key.*", "target_id": agent.peer_id}).json()["items"]
    rotate = next(e for e in events if e["action"] == "peer.key.rotate")
    assert rotate["after"]["public_key"] == public and rotate["actor"] == "peer:c", events[:3]


# ----- the playbook ------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run_rotate_keys(
    mesh: Mesh, vault: VaultPeers, workdir: Path, *extra: str, vault_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    collections = workdir / "collections"
    if not collections.exists():
        (collections / "ansible_collections" / "starling").mkdir(parents=True)
        (collections / "ansible_collections" / "starling" / "mesh").symlink_to(REPO)
    hosts = {
        name: {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "starling_agent_cli": str(BIN / "starling"),
            "starling_agent_config": str(agent.config),
        }
        for name, agent in mesh.agents.items()
    }
    inventory = workdir / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"starling_agents": {"hosts": hosts}}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "VAULT_", "BAO_"))}
    env |= {
        "ANSIBLE_HOME": str(workdir / "ansible-home"),
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "VAULT_ADDR": vault_url or vault.bao.url,
        "VAULT_TOKEN": vault.bao.root_token,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    options = ["-e", "starling_rotate_become=false", "-e", "starling_rotate_verify_timeout=20", *extra]
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / "rotate_keys.yml"), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_rotate_keys_playbook_loses_no_packet(rmesh: tuple[Mesh, VaultPeers], tmp_path: Path) -> None:
    mesh, vault = rmesh
    before = {name: (coordinator_key(mesh, name), vault.current(name)[0]) for name in NAMES}
    pings = Pings(mesh, tmp_path, count=300)
    run = run_rotate_keys(mesh, vault, tmp_path)
    lost = pings.lost()
    assert run.returncode == 0, run.stdout + run.stderr
    for name in NAMES:
        version, data = vault.current(name)
        assert version == before[name][1] + 1
        assert coordinator_key(mesh, name) == data["public_key"] != before[name][0]
        assert mesh.agents[name].status()["public_key"] == data["public_key"]
    print("playbook rotation, lost packets per direction:", lost)
    assert sum(lost.values()) == 0, (lost, pings.missing, rotation_log(mesh, pings.missing))
    assert "changed=2" in run.stdout  # per host: the Vault write and the agent's reload


def test_rotate_keys_playbook_rolls_back_when_an_agent_cannot_apply(
    rmesh: tuple[Mesh, VaultPeers], tmp_path: Path
) -> None:
    mesh, vault = rmesh
    key_before, version_before = coordinator_key(mesh, "c"), vault.current("c")[0]
    wrong = 'path "starling/data/mesh/peers/a/wireguard" { capabilities = ["read"] }'
    vault.client.sys.create_or_update_policy("peer-c", wrong)  # c can no longer read its key
    try:
        run = run_rotate_keys(mesh, vault, tmp_path, "-e", "starling_rotate_hosts=c")
    finally:
        vault.client.sys.create_or_update_policy(
            "peer-c", 'path "starling/data/mesh/peers/c/wireguard" { capabilities = ["read"] }'
        )
    out = " ".join(run.stdout.split())
    assert run.returncode != 0, out
    assert "Key rotation failed on c" in out and "denied" in out, out
    assert "the restored key: the mesh is as before" in out, out
    version, data = vault.current("c")
    assert version == version_before + 2  # the new key, then the old one written back
    assert data["public_key"] == key_before == coordinator_key(mesh, "c")
    mesh.wait_ping("a", "c", 5)
    assert reload(mesh, "c")["changed"] is False  # Vault and the agent agree again


def test_rotate_keys_playbook_with_vault_down_changes_nothing(rmesh: tuple[Mesh, VaultPeers], tmp_path: Path) -> None:
    mesh, vault = rmesh
    before = {name: coordinator_key(mesh, name) for name in NAMES}
    run = run_rotate_keys(mesh, vault, tmp_path, vault_url="http://127.0.0.1:9")
    out = " ".join(run.stdout.split())
    assert run.returncode != 0 and "writing the new key to Vault failed" in out and "unreachable" in out, out
    assert "nothing was changed" in out
    assert {name: coordinator_key(mesh, name) for name in NAMES} == before
