"""The agent is its own installation: `starling-mesh` without extras carries no web framework or database.

Every module of agent/ and starling_proto/ is imported in a fresh interpreter in which the server
dependencies cannot be imported at all; the distribution's metadata must not pull them in either; and
the servers' console scripts say which extra is missing instead of a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "pydantic", "jinja2", "hvac", "psycopg")

BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not in the agent's installation)")
        return None
sys.meta_path.insert(0, Blocker())
"""

IMPORT_ALL = """
import importlib, pkgutil
names = []
for package in ("agent", "starling_proto"):
    root = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(len(names), loaded)
"""


def run_blocked(code: str, blocked: tuple[str, ...] = SERVER_ONLY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, ",".join(blocked)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_agent_module_imports_without_the_server_dependencies() -> None:
    result = run_blocked(IMPORT_ALL)
    assert result.returncode == 0, result.stderr[-2000:]
    count, loaded = result.stdout.split(maxsplit=1)
    assert int(count) > 30 and loaded.strip() == "[]"


def test_the_blocker_would_notice_a_server_import() -> None:
    result = run_blocked("import coordinator.config")  # the coordinator needs pydantic: must fail here
    assert result.returncode != 0 and "blocked: not in the agent's installation" in result.stderr


def test_the_agent_cli_runs_without_the_server_dependencies() -> None:
    result = run_blocked("import sys; from agent.cli import main; sys.argv = ['starling', '--help']; main()")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: starling" in result.stdout


def test_the_distribution_without_extras_is_the_agent() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert not [name for name in SERVER_ONLY if name in base]
    extras = project["optional-dependencies"]
    assert {"coordinator", "signal", "postgres"} <= set(extras)
    assert "sqlalchemy" not in " ".join(extras["signal"]).lower()  # signal stores nothing


def test_server_commands_name_the_missing_extra() -> None:
    for entry, extra in (("coordinator_main", "coordinator"), ("signal_main", "signal")):
        result = run_blocked(f"from coordinator.entry import {entry}; {entry}()")
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"install 'starling-mesh[{extra}]'" in result.stderr and "Traceback" not in result.stderr


def test_signal_runs_with_only_its_extra() -> None:
    """starling-signal's host gets `starling-mesh[signal]`: no database, no Vault client, no templates."""
    coordinator_only = ("sqlalchemy", "alembic", "hvac", "jinja2", "psycopg")
    code = (
        "import sys; import coordinator.signal.app, coordinator.signal.cli\n"
        "from coordinator.entry import signal_main; sys.argv = ['starling-signal', '--version']; signal_main()"
    )
    result = run_blocked(code, coordinator_only)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()  # the version


def test_the_coordinator_needs_no_hvac() -> None:
    """The services speak to Vault through starling_proto.vault (httpx); hvac is only the collection's."""
    code = (
        "import sys; import coordinator.secrets, coordinator.api.app, coordinator.cli\n"
        "from coordinator.entry import coordinator_main; sys.argv = ['starling-coordinator', '--version']\n"
        "coordinator_main()"
    )
    result = run_blocked(code, ("hvac",))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
