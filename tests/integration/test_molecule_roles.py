"""The role scenarios (molecule/<role>/) for the coordinator, signal and relay roles, in podman containers.

One run of scripts/molecule.sh serves the whole module: it builds the local image and the wheelhouse when
they are missing or out of date, then runs `molecule test` (destroy, create, check, converge, idempotence,
verify, destroy) for every scenario side by side, with container and network names of its own, on
198.18.16.0/20 networks only. Each test below reports one scenario (with the end of its log on failure).
Takes about 4 minutes on 2 cores when the image exists (building it adds about 1.5 minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("coordinator", "relay", "signal")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (make system installs it)"),
]


@pytest.fixture(scope="module")
def molecule_run() -> dict[str, object]:
    prefix = f"stm{int(time.time())}{os.getpid()}"
    env = dict(os.environ, STARLING_MOLECULE_PREFIX=prefix, MOLECULE_JOBS=str(len(SCENARIOS)))
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/molecule.sh", *SCENARIOS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    output = proc.stdout + proc.stderr
    match = re.search(r"timings: (.*)", output)
    results: dict[str, str] = {}
    for part in match.group(1).split(",") if match else []:
        name, _, outcome = part.strip().partition(" ")
        results[name] = outcome
    return {
        "rc": proc.returncode,
        "output": output,
        "results": results,
        "prefix": prefix,
        "seconds": time.monotonic() - started,
    }


def _log_tail(prefix: str, scenario: str, lines: int = 80) -> str:
    log = ROOT / ".state" / "molecule-logs" / f"{prefix}-{scenario}.log"
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_role_scenario(molecule_run: dict[str, object], scenario: str) -> None:
    results = molecule_run["results"]
    assert isinstance(results, dict)
    outcome = results.get(scenario)
    if outcome is None:  # the run stopped before the scenarios (image, wheelhouse, tools)
        output = str(molecule_run["output"])
        pytest.fail(f"scripts/molecule.sh exited {molecule_run['rc']} without running {scenario}:\n{output[-4000:]}")
    assert "FAILED" not in outcome, (
        f"molecule test -s {scenario}: {outcome}\n{_log_tail(str(molecule_run['prefix']), scenario)}"
    )


def test_no_containers_left(molecule_run: dict[str, object]) -> None:
    """The run removed every container and network it created (by its prefix), also after failures."""
    prefix = str(molecule_run["prefix"])
    env = dict(os.environ, CONTAINERS_CONF=str(ROOT / ".state" / "podman" / "containers.conf"))
    names = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    networks = subprocess.run(
        ["podman", "network", "ls", "--format", "{{.Name}}"], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert [n for n in names + networks if n.startswith(f"{prefix}-")] == []
