"""The whole-mesh scenario (molecule/mesh/): playbooks/site.yml on the container lab of scripts/lab.sh.

One `scripts/molecule.sh mesh` run: the lab (coordinator + signal, coturn, OpenBao, an endpoint-independent and a
symmetric NAT router, three agents on --internal podman networks in 198.18.0.0/15) is created and checked
(routes, isolation, NAT behaviour), site.yml converges, a second run changes nothing, and verify.yml checks the
paths (agent1 <-> agent3 direct, agent1 <-> agent2 relayed), pings over the mesh, the pair the policy denies,
and the peers that the starling.mesh.coordinator inventory plugin lists. The lab is removed at the end, also
after a failure. Takes about 6-9 minutes on 2 cores when the image exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (make system installs it)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nftables is not installed (make system installs it)"),
]


@pytest.fixture(scope="module")
def mesh_run() -> dict[str, object]:
    prefix = f"stm{int(time.time())}{os.getpid()}"
    env = dict(os.environ, STARLING_MOLECULE_PREFIX=prefix, MOLECULE_JOBS="1")
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/molecule.sh", "mesh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    return {
        "rc": proc.returncode,
        "output": proc.stdout + proc.stderr,
        "prefix": prefix,
        "seconds": time.monotonic() - started,
    }


def test_mesh_scenario(mesh_run: dict[str, object]) -> None:
    output = str(mesh_run["output"])
    assert mesh_run["rc"] == 0, f"scripts/molecule.sh mesh exited {mesh_run['rc']}:\n{output[-8000:]}"
    # The steps ran, and verify asserted the paths and the blocked pair.
    assert re.search(r"mesh \d+ s", output), output[-4000:]
    for expected in ("agent1 -> agent3: direct, ping ok", "agent1 -> agent2: relayed, ping ok",
                     "agent2 -> agent3: blocked, ping blocked", "all checks passed"):  # fmt: skip
        assert expected in output, f"{expected!r} not in the output:\n{output[-4000:]}"


def test_nothing_left(mesh_run: dict[str, object]) -> None:
    """The lab is gone: containers, networks, the host's nftables table, the state directory."""
    lab = f"{mesh_run['prefix']}-mesh"
    env = dict(os.environ, CONTAINERS_CONF=str(ROOT / ".state" / "podman" / "containers.conf"))

    def podman(*args: str) -> list[str]:
        return subprocess.run(["podman", *args], capture_output=True, text=True, env=env, check=True).stdout.split()

    left = [n for n in podman("ps", "-a", "--format", "{{.Names}}") + podman("network", "ls", "--format", "{{.Name}}")
            if n.startswith(f"{lab}-")]  # fmt: skip
    assert left == []
    tables = json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True,
                                       check=True).stdout)["nftables"]  # fmt: skip
    names = [t["table"]["name"] for t in tables if "table" in t]
    assert "starling_lab_" + lab.replace("-", "_") not in names
    assert not (ROOT / ".state" / "lab" / lab).exists()
