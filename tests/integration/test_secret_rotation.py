"""TURN secret, API token, setup key and admin token rotation with playbooks/rotate_keys.yml against a
real OpenBao, a real coordinator reading its secrets from it, and a real coturn keeping its REST
secrets in its user database (several at once, read on the fly: no restart, no dropped allocation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.coturn import CoturnProcess, turn_allocate
from tests.fixtures.enroll import sealed_enroll
from tests.fixtures.openbao import OpenBao, dev_server
from tests.fixtures.vault_mesh import MOUNT, PREFIX, VaultPeers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Stack:
    bao: OpenBao
    coord: CoordinatorProcess
    coturn: CoturnProcess
    workdir: Path
    peer_credential: str = ""

    def vault_value(self, path: str) -> tuple[int, str]:
        resp = self.bao.client().secrets.kv.v2.read_secret_version(
            path=f"{PREFIX}/{path}", mount_point=MOUNT, raise_on_deleted_version=True
        )
        return int(resp["data"]["metadata"]["version"]), str(resp["data"]["data"]["value"])

    def relay_credential(self) -> tuple[str, str]:
        doc = httpx.get(
            self.coord.url + "/api/v1/peer/map", headers={"Authorization": f"Bearer {self.peer_credential}"}
        ).json()
        relay = doc["relays"][0]
        return relay["username"], relay["password"]

    def allocate(self, credential: tuple[str, str]) -> dict[str, Any]:
        return turn_allocate(self.coturn.address, *credential)

    def playbook(self, *extra: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        collections = self.workdir / "collections"
        if not collections.exists():
            (collections / "ansible_collections" / "starling").mkdir(parents=True)
            (collections / "ansible_collections" / "starling" / "mesh").symlink_to(REPO)
        inventory = self.workdir / "inventory.yml"
        relay = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "starling_relay_userdb": str(self.coturn.userdb),
            "starling_relay_realm": self.coturn.realm,
            "starling_relay_secrets_helper": str(self.workdir / "turn-secrets"),
        }
        inventory.write_text(yaml.safe_dump({"all": {"children": {"starling_relays": {"hosts": {"relay1": relay}}}}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "VAULT_", "BAO_", "STARLING_"))}
        env |= {
            "ANSIBLE_HOME": str(self.workdir / "ansible-home"),
            "ANSIBLE_COLLECTIONS_PATH": str(collections),
            "ANSIBLE_NOCOLOR": "1",
            "VAULT_ADDR": self.bao.url,
            "VAULT_TOKEN": self.bao.root_token,
            "STARLING_URL": self.coord.url,
            "STARLING_TOKEN": token or self.coord.admin_token,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
        cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / "rotate_keys.yml")]
        return subprocess.run(
            [*cmd, "-e", "starling_rotate_become=false", *extra], capture_output=True, text=True, env=env, timeout=300
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("secrets")
    with dev_server(workdir / "bao") as bao:
        VaultPeers(bao, workdir)  # the KV v2 mount of docs/vault.md
        vault = {"url": bao.url, "token": bao.root_token, "mount": MOUNT, "path": f"{PREFIX}/coordinator"}
        coord = CoordinatorProcess(
            workdir=workdir / "coordinator", config={"secrets": {"source": "vault", "vault": vault}}
        )
        coord.start()
        try:
            stack = Stack(bao, coord, CoturnProcess(workdir / "coturn", "127.0.0.1", dynamic_secrets=True), workdir)
            stack.coturn.secret = stack.vault_value("coordinator/turn_secret")[1]
            stack.coturn.start()
            with coord.client() as api:
                r = api.patch("/api/v1/settings", json={"turn_servers": [stack.coturn.turn_url], "credential_ttl": 60})
                assert r.status_code == 200, r.text
                key = api.post("/api/v1/setup-keys", json={"name": "rot"}).json()["key"]
            enrolled = sealed_enroll(coord.url, {"setup_key": key, "hostname": "p1"}).json()
            stack.peer_credential = enrolled["credential"]
            yield stack
        finally:
            stack.coturn.stop()
            coord.stop()


def test_turn_secret_rotates_with_an_overlap(stack: Stack) -> None:
    v1, secret1 = stack.vault_value("coordinator/turn_secret")
    old_credential = stack.relay_credential()
    assert "relayed" in stack.allocate(old_credential)

    run = stack.playbook()
    assert run.returncode == 0, run.stdout + run.stderr
    v2, secret2 = stack.vault_value("coordinator/turn_secret")
    assert v2 == v1 + 1 and secret2 != secret1
    assert sorted(stack.coturn.secrets()) == sorted([secret1, secret2])  # both accepted during the overlap
    new_credential = stack.relay_credential()
    assert new_credential[1] != old_credential[1]  # minted with the new secret now
    assert "relayed" in stack.allocate(new_credential)
    assert "relayed" in stack.allocate(old_credential)  # credentials already handed out keep working
    assert secret1 not in run.stdout + run.stderr and secret2 not in run.stdout + run.stderr

    # A second rotation within credential_ttl would strand the first secret's credentials: refused.
    again = stack.playbook()
    assert again.returncode != 0 and "Wait, or set starling_rotate_turn_force=true" in " ".join(again.stdout.split())
    assert stack.vault_value("coordinator/turn_secret")[0] == v2 and len(stack.coturn.secrets()) == 2

    forced = stack.playbook("-e", "starling_rotate_turn_force=true")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    _, secret3 = stack.vault_value("coordinator/turn_secret")
    assert sorted(stack.coturn.secrets()) == sorted([secret2, secret3])
    assert "401" in stack.allocate(old_credential).get("error", "")  # the first secret is gone
    assert "relayed" in stack.allocate(stack.relay_credential())
    with stack.coord.client() as api:
        events = api.get("/api/v1/audit", params={"action": "secrets.reload"}).json()["items"]
    assert [e["after"]["changed"] for e in events[:2]] == [["turn_secret"], ["turn_secret"]]


def test_tokens_setup_keys_and_admin_token_rotate(stack: Stack) -> None:
    name = "ci-" + uuid.uuid4().hex[:6]
    extra = {
        "starling_rotate_tokens": [{"name": name, "scope": "read"}],
        "starling_rotate_setup_keys": [{"name": name, "reusable": True}],
    }
    tokens = []
    for _ in range(3):
        run = stack.playbook("-e", json.dumps(extra), "--tags", "tokens")
        assert run.returncode == 0, run.stdout + run.stderr
        tokens.append(stack.vault_value(f"tokens/{name}")[1])
        assert tokens[-1] not in run.stdout
    keys = stack.vault_value(f"setup-keys/{name}")
    assert keys[0] == 3

    # The newest and the previous generation work; the one before was revoked.
    def status(token: str) -> int:
        return httpx.get(stack.coord.url + "/api/v1/peers", headers={"Authorization": f"Bearer {token}"}).status_code

    assert [status(t) for t in tokens] == [401, 200, 200]
    with stack.coord.client() as api:
        live = [
            k["name"]
            for k in api.get("/api/v1/setup-keys", params={"limit": 1000}).json()["items"]
            if k["name"].startswith(name) and not k["revoked"]
        ]
    assert len(live) == 2

    old_admin = stack.coord.admin_token
    run = stack.playbook("-e", "starling_rotate_admin_token=true", "--tags", "tokens")
    assert run.returncode == 0, run.stdout + run.stderr
    _, new_admin = stack.vault_value("coordinator/admin_token")
    assert new_admin != old_admin and new_admin not in run.stdout
    assert status(old_admin) == 401 and status(new_admin) == 200
    stack.coord.admin_token = new_admin
