"""vault_secret version=N: reading an older version (the previous TURN secret that relays keep during a
rotation overlap, playbooks/site.yml) against a real OpenBao server. State is set up with hvac."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.openbao import OpenBao

# Play and uniq, plus the fixtures of the Vault collection tests (OpenBao server, collection path, KV mount).
from tests.integration.test_vault_collection import Play, bao, collections_path, kv, play, uniq  # noqa: F401

pytestmark = pytest.mark.vault


def test_read_an_older_version(play: Play, bao: OpenBao, kv: str, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "value"
    path = f"mesh/{uniq('t')}/turn_secret"
    client = bao.client()
    for value in ("first-secret-0123456789", "second-secret-0123456789", "third-secret-0123456789"):
        client.secrets.kv.v2.create_or_update_secret(path=path, secret={"value": value, "n": value[:5]}, mount_point=kv)
    client.secrets.kv.v2.delete_secret_versions(path=path, versions=[1], mount_point=kv)
    rel = path.removeprefix("mesh/")
    sec = {"path": rel, "mount": kv}
    run = play.run(
        [
            {
                "name": "previous",
                "starling.mesh.vault_secret": {**sec, "version": 2, "return_value": True},
                "no_log": True,
                "register": "prev",
            },
            {"name": "keep", "ansible.builtin.copy": {"content": "{{ prev.value }}", "dest": str(out)}, "no_log": True},
            {
                "name": "numbers",
                "ansible.builtin.set_fact": {
                    "numbers": "{{ [prev.version, prev.latest_version] }}",
                    "fields": "{{ prev.fields }}",
                },
            },
            {"name": "previous-check", "starling.mesh.vault_secret": {**sec, "version": 2}, "check_mode": True},
            {"name": "deleted", "starling.mesh.vault_secret": {**sec, "version": 1}, "ignore_errors": True},
            {"name": "unknown", "starling.mesh.vault_secret": {**sec, "version": 9}, "ignore_errors": True},
            {
                "name": "logged",
                "starling.mesh.vault_secret": {**sec, "version": 2, "return_value": True},
                "ignore_errors": True,
            },
            {
                "name": "combined",
                "starling.mesh.vault_secret": {**sec, "version": 2, "rotate": True},
                "ignore_errors": True,
            },
        ]
    )
    assert run.task("previous")["status"] == "ok", run.stdout
    numbers = run.result("numbers")["ansible_facts"]
    assert numbers["numbers"] == [2, 3] and numbers["fields"] == {"n": "secon"}
    assert out.read_text() == "second-secret-0123456789"
    assert run.result("previous-check")["changed"] is False and "value" not in run.result("previous-check")
    deleted = run.result("deleted")["msg"]
    assert "version 1 of" in deleted and "is deleted (the latest is 3)" in deleted
    assert "is unknown" in run.result("unknown")["msg"]
    assert "no_log" in run.result("logged")["msg"]
    assert "mutually exclusive" in run.result("combined")["msg"]
    assert "second-secret" not in run.stdout
    # Nothing was written by any of these.
    meta = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=kv)["data"]
    assert int(meta["current_version"]) == 3
