"""`ansible-galaxy collection build` + install into a temp path, then a playbook with starling.mesh.* FQCNs
(modules, module_defaults group, and the policy playbook by its FQCN) against a real coordinator."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.fixtures.coordinator import CoordinatorProcess

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_build_install_and_use(tmp_path: Path, coordinator: CoordinatorProcess) -> None:
    run(str(BIN / "ansible-galaxy"), "collection", "build", "--force", "--output-path", str(tmp_path), str(REPO))
    tarball = next(tmp_path.glob("starling-mesh-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    for expected in (
        "plugins/modules/policy_set.py",
        "plugins/inventory/coordinator.py",
        "meta/runtime.yml",
        "plugins/module_utils/_api.py",
        "playbooks/policy.yml",
        "policies/policies.yml",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("coordinator/", "agent/", "starling_proto/", "bench/", ".venv/")) for n in names)

    dest = tmp_path / "collections"
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_COLLECTIONS_PATH": str(dest),
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_NOCOLOR": "1",
    }
    run(str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "-p", str(dest), str(tarball), env=env)
    assert (dest / "ansible_collections" / "starling" / "mesh" / "MANIFEST.json").exists()
    doc = json.loads(run(str(BIN / "ansible-doc"), "--json", "starling.mesh.policy_set", env=env).stdout)
    assert "expect" in doc["starling.mesh.policy_set"]["doc"]["options"]

    play = tmp_path / "play.yml"
    play.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "use the installed collection",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "module_defaults": {
                        "group/starling.mesh.api": {"url": coordinator.url, "token": coordinator.admin_token}
                    },
                    "tasks": [
                        {"name": "group", "starling.mesh.group": {"name": "installed-check"}},
                        {
                            "name": "info",
                            "starling.mesh.mesh_info": {"gather": ["groups"], "name": "installed-check"},
                            "register": "info",
                        },
                        {"name": "assert", "ansible.builtin.assert": {"that": ["info.groups | length == 1"]}},
                    ],
                }
            ]
        )
    )
    out = run(str(BIN / "ansible-playbook"), "-i", "localhost,", str(play), env=env).stdout
    assert "failed=0" in out and "changed=1" in out

    # the policy playbook by its FQCN, in check mode, on the example data shipped with the collection
    data = dest / "ansible_collections" / "starling" / "mesh" / "policies"
    out = run(
        str(BIN / "ansible-playbook"),
        "-i",
        "localhost,",
        "starling.mesh.policy",
        "--check",
        "--diff",
        "-e",
        f"starling_policy_dir={data}",
        env={**env, "STARLING_URL": coordinator.url, "STARLING_TOKEN": coordinator.admin_token},
    ).stdout
    assert "+ dev -> db tcp/5432" in out and "failed=0" in out
