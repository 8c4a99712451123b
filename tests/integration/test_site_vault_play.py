"""playbooks/site.yml's controller plays against a real OpenBao (`--tags vault`): the relays get the current TURN
secret and the previous one (the rotation overlap), a deleted previous version is tolerated, check mode changes
nothing; teardown.yml deletes the mesh's Vault objects only when asked to. No host is contacted: the inventory's
relay is never reached by these plays."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible.conftest import BIN, REPO, PlayRun, ansible_env
from tests.fixtures.openbao import OpenBao

# The OpenBao server and the collection path of the Vault collection tests.
from tests.integration.test_vault_collection import bao, collections_path  # noqa: F401

pytestmark = [pytest.mark.vault, pytest.mark.slow]


def site(
    collections: Path, workdir: Path, inventory: dict[str, Any], *args: str, playbook: str = "site.yml"
) -> PlayRun:
    name = uuid.uuid4().hex[:8]
    inv, record = workdir / f"inventory-{name}.yml", workdir / f"record-{name}.json"
    inv.write_text(yaml.safe_dump(inventory, sort_keys=False))
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), str(REPO / "playbooks" / playbook), "--tags", "vault", *args],
        capture_output=True,
        text=True,
        env=ansible_env(collections, workdir / "home", STARLING_RECORD_FILE=str(record)),
        cwd=workdir,
        timeout=300,
    )
    results = json.loads(record.read_text()) if record.exists() else []
    return PlayRun(proc.returncode, proc.stdout, proc.stderr, results)


def test_relays_keep_the_previous_turn_secret(
    bao: OpenBao,  # noqa: F811
    collections_path: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    mount, prefix = f"kv{uuid.uuid4().hex[:6]}", f"p{uuid.uuid4().hex[:6]}"
    client = bao.client()
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    inventory = {
        "all": {
            "vars": {
                "starling_vault_url": bao.url,
                "starling_vault_token": bao.root_token,
                "starling_vault_mount": mount,
                "starling_vault_prefix": prefix,
                "ansible_python_interpreter": str(BIN / "python"),
                # A coordinator managed elsewhere (never called by these plays).
                "starling_url": "http://127.0.0.1:9",
                "starling_token": "sat_not-used-by-the-vault-play",
            },
            "children": {"starling_relays": {"hosts": {"relay-x": {"ansible_connection": "local"}}}},
        }
    }
    turn = f"{prefix}/coordinator/turn_secret"
    kv2 = client.secrets.kv.v2
    kv2.create_or_update_secret(path=turn, secret={"value": "first-turn-secret-0123"}, mount_point=mount)

    run = site(collections_path, tmp_path, inventory)
    assert run.rc == 0, run.stdout + run.stderr
    assert run.task("Vault | The current TURN secret (for the relays)")["status"] == "ok"
    previous = "Vault | The previous TURN secret (kept on the relays during a rotation's overlap)"
    assert run.task(previous)["status"] == "skipped"  # one version only

    for value in ("second-turn-secret-0123", "third-turn-secret-01234"):
        kv2.create_or_update_secret(path=turn, secret={"value": value}, mount_point=mount)
    run = site(collections_path, tmp_path, inventory)
    assert run.rc == 0, run.stdout + run.stderr
    assert run.task(previous)["status"] == "ok"
    check = site(collections_path, tmp_path, inventory, "--check")
    assert check.rc == 0, check.stdout + check.stderr
    assert all(not r["result"].get("changed") for r in check.results), check.stdout

    # The previous version deleted (not destroyed): tolerated, the relays get the current secret only.
    kv2.delete_secret_versions(path=turn, versions=[2], mount_point=mount)
    run = site(collections_path, tmp_path, inventory)
    assert run.rc == 0, run.stdout + run.stderr
    assert run.task(previous)["status"] == "ok"
    for value in ("first-turn-secret-0123", "second-turn-secret-0123", "third-turn-secret-01234", bao.root_token):
        assert value not in run.stdout + json.dumps(run.results)

    # teardown.yml keeps Vault's data by default; with starling_teardown_vault=true it deletes the mesh's policies
    # and AppRoles and soft-deletes its secrets (the history stays).
    run = site(collections_path, tmp_path, inventory, playbook="teardown.yml")
    assert run.rc == 0, run.stdout + run.stderr
    assert f"starling-{prefix}-controller" in client.sys.list_acl_policies()["data"]["keys"]
    gone = site(collections_path, tmp_path, inventory, "-e", "starling_teardown_vault=true", playbook="teardown.yml")
    assert gone.rc == 0, gone.stdout + gone.stderr
    policies = client.sys.list_acl_policies()["data"]["keys"]
    assert not [p for p in policies if p.startswith(f"starling-{prefix}-")], policies
    roles = client.list("auth/approle/role") or {}
    assert not [r for r in roles.get("data", {}).get("keys", []) if r.startswith(f"starling-{prefix}-")]
    meta = kv2.read_secret_metadata(path=turn, mount_point=mount)["data"]
    assert meta["versions"][str(meta["current_version"])]["deletion_time"]  # soft delete: history kept
    again = site(collections_path, tmp_path, inventory, "-e", "starling_teardown_vault=true", playbook="teardown.yml")
    assert again.rc == 0 and not [r for r in again.results if r["result"].get("changed")], again.stdout
