"""Every molecule scenario (molecule/<scenario>/) in podman containers, in one scripts/molecule.sh run.

The run (tests/fixtures/molecule_run.py: started in the background, at lower CPU priority, as soon as pytest has
collected; these tests come last and wait for it) builds the local image and the wheelhouse when they are missing
or out of date, then runs `molecule test` for all scenarios, three at a time, each with container and network
names of its own, on 198.18.0.0/15 networks only:

  mesh         playbooks/site.yml on the container lab of scripts/lab.sh (coordinator + signal, coturn, OpenBao,
               an endpoint-independent and a symmetric NAT router, three agents): converge, idempotence, and
               verify (paths agent1 <-> agent3 direct, agent1 <-> agent2 relayed, pings, the pair the policy
               denies, the peers the starling.mesh.coordinator inventory plugin lists)
  agent        site.yml without Vault and relays on a control host and two agents: converge, idempotence,
               verify (ping, hardening, metrics, a daemon restart keeps wireguard-go), then removal with
               starling_agent_state: absent (and the role in check mode there) and playbooks/teardown.yml
  coordinator, signal, relay: each role alone: check mode on a fresh host, converge, idempotence, verify
  vault        the vault role on the controller against OpenBao in a container, credentials on two peers:
               check, converge, idempotence, verify (AppRole login; own key readable, the other refused)

Each test below reports one scenario, with the end of its log on failure. About 12-14 minutes on 2 cores when
the image exists (building it adds about 1.5 minutes), mostly while the rest of the suite runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MOLECULE_RUN
from tests.fixtures.molecule_run import LOGS, SCENARIOS, start

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (make system installs it)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nftables is not installed (make system installs it)"),
]


@pytest.fixture(scope="module")
def molecule_run(request: pytest.FixtureRequest) -> dict[str, object]:
    """The run tests/conftest.py started in the background when the session collected (else one started now)."""
    run = request.config.stash.get(MOLECULE_RUN, None)
    if run is None:
        run = start(niceness=0)
        request.config.stash[MOLECULE_RUN] = run
    return run.wait(timeout=3600)


def scenario_log(prefix: str, scenario: str) -> str:
    try:
        return (LOGS / f"{prefix}-{scenario}.log").read_text(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(molecule_run: dict[str, object], scenario: str) -> None:
    results = molecule_run["results"]
    assert isinstance(results, dict)
    prefix = str(molecule_run["prefix"])
    outcome = results.get(scenario)
    if outcome is None:  # the run stopped before the scenarios (image, wheelhouse, tools)
        output = str(molecule_run["output"])
        pytest.fail(f"scripts/molecule.sh exited {molecule_run['rc']} without running {scenario}:\n{output[-4000:]}")
    log = scenario_log(prefix, scenario)
    tail = "\n".join(log.splitlines()[-80:]) or f"(no log in {LOGS})"
    assert "FAILED" not in outcome, f"molecule test -s {scenario}: {outcome}\n{tail}"
    # Every step of the scenario's sequence ran and succeeded (a sequence cut short would not fail the run).
    steps = {
        "mesh": ("create", "converge", "idempotence", "verify", "destroy"),
        "agent": ("create", "converge", "idempotence", "verify", "side_effect", "destroy"),
    }.get(scenario, ("create", "check", "converge", "idempotence", "verify", "destroy"))
    for step in steps:
        assert re.search(rf"\[{scenario} > {step}\] Executed: Successful", log), f"step {step} missing:\n{tail}"
    if scenario == "mesh":
        # verify.yml asserted the paths and the blocked pair (its success messages name them).
        for expected in ("agent1 -> agent3: direct, ping ok", "agent1 -> agent2: relayed, ping ok",
                         "agent2 -> agent3: blocked, ping blocked", "all checks passed"):  # fmt: skip
            assert expected in log, f"{expected!r} not in the mesh scenario's log:\n{tail}"
        # ... and the routed clinic host (issue 16): reached through agent3 by agent1 only.
        for pattern in (r"agent1 -> clinic \S+: routed via agent3, ping and tcp/8080 ok, tcp/22\s+blocked",
                        r"agent2 -> clinic \S+: blocked"):  # fmt: skip
            assert re.search(pattern, log), f"{pattern!r} not in the mesh scenario's log:\n{tail}"


def test_nothing_left(molecule_run: dict[str, object]) -> None:
    """The run removed what it created (by its prefix), also after failures: containers, networks, and the
    mesh lab's host nftables table and state directory."""
    prefix = str(molecule_run["prefix"])
    env = dict(os.environ, CONTAINERS_CONF=str(ROOT / ".state" / "podman" / "containers.conf"))

    def podman(*args: str) -> list[str]:
        return subprocess.run(["podman", *args], capture_output=True, text=True, env=env, check=True).stdout.split()

    left = [n for n in podman("ps", "-a", "--format", "{{.Names}}") + podman("network", "ls", "--format", "{{.Name}}")
            if n.startswith(f"{prefix}-")]  # fmt: skip
    assert left == []
    lab = f"{prefix}-mesh"
    tables = json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True,
                                       check=True).stdout)["nftables"]  # fmt: skip
    names = [t["table"]["name"] for t in tables if "table" in t]
    assert "starling_lab_" + lab.replace("-", "_") not in names
    assert not (ROOT / ".state" / "lab" / lab).exists()
