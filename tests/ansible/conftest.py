"""Fixtures for the starling.mesh collection tests: the collection on an ANSIBLE_COLLECTIONS_PATH, and a
runner for real `ansible-playbook` / `ansible-inventory` processes (results recorded as JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.enroll import sealed_enroll

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collections path where ansible_collections/starling/mesh is this repository."""
    root = tmp_path_factory.mktemp("collections")
    ns = root / "ansible_collections" / "starling"
    ns.mkdir(parents=True)
    (ns / "mesh").symlink_to(REPO)
    return root


def ansible_env(collections_path: Path, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "STARLING_"))}
    env.update(
        ANSIBLE_HOME=str(home),
        ANSIBLE_COLLECTIONS_PATH=str(collections_path),
        ANSIBLE_CALLBACK_PLUGINS=str(HERE / "callback_plugins"),
        ANSIBLE_CALLBACKS_ENABLED="record",
        ANSIBLE_LOCALHOST_WARNING="False",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
    )
    env.update(extra)
    return env


@dataclass
class PlayRun:
    rc: int
    stdout: str
    stderr: str
    results: list[dict[str, Any]] = field(default_factory=list)

    def task(self, name: str) -> dict[str, Any]:
        for item in self.results:
            if item["task"] == name:
                return item
        raise KeyError(f"no result for task {name!r}; tasks: {[r['task'] for r in self.results]}\n{self.stdout}")

    def result(self, name: str) -> dict[str, Any]:
        return self.task(name)["result"]


@dataclass
class Ansible:
    collections_path: Path
    workdir: Path
    coordinator: CoordinatorProcess

    def env(self, **extra: str) -> dict[str, str]:
        return ansible_env(self.collections_path, self.workdir / "home", **extra)

    def playbook(
        self,
        tasks: list[dict[str, Any]],
        *,
        args: tuple[str, ...] = (),
        token: str | None = None,
        url: str | None = None,
        module_defaults: bool = True,
        env: dict[str, str] | None = None,
    ) -> PlayRun:
        play: dict[str, Any] = {
            "name": "test",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "tasks": tasks,
        }
        if module_defaults:
            play["module_defaults"] = {
                "group/starling.mesh.api": {
                    "url": url or self.coordinator.url,
                    "token": token or self.coordinator.admin_token,
                }
            }
        name = uuid.uuid4().hex[:8]
        path = self.workdir / f"play-{name}.yml"
        record = self.workdir / f"record-{name}.json"
        path.write_text(yaml.safe_dump([play], sort_keys=False))
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "localhost,", str(path), *args],
            capture_output=True,
            text=True,
            env=self.env(STARLING_RECORD_FILE=str(record), **(env or {})),
            timeout=300,
        )
        results = json.loads(record.read_text()) if record.exists() else []
        return PlayRun(proc.returncode, proc.stdout, proc.stderr, results)

    def run_playbook(
        self, path: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> PlayRun:
        record = self.workdir / f"record-{uuid.uuid4().hex[:8]}.json"
        base = {"STARLING_URL": self.coordinator.url, "STARLING_TOKEN": self.coordinator.admin_token}
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "localhost,", str(path), *args],
            capture_output=True,
            text=True,
            env=self.env(STARLING_RECORD_FILE=str(record), **{**base, **(env or {})}),
            timeout=300,
            cwd=cwd,
        )
        results = json.loads(record.read_text()) if record.exists() else []
        return PlayRun(proc.returncode, proc.stdout, proc.stderr, results)


@pytest.fixture
def ansible(collections_path: Path, coordinator: CoordinatorProcess, tmp_path: Path) -> Ansible:
    return Ansible(collections_path, tmp_path, coordinator)


@pytest.fixture
def api(coordinator: CoordinatorProcess) -> Iterator[httpx.Client]:
    with coordinator.client() as client:
        yield client


def enroll_peer(
    coordinator: CoordinatorProcess,
    api: httpx.Client,
    hostname: str,
    os_name: str = "linux",
    version: str = "0.1.0",
    **extra: Any,
) -> dict[str, Any]:
    """Enroll a peer with a fresh one-off setup key (helper: sets up state without the modules)."""
    key = api.post("/api/v1/setup-keys", json={"name": uniq("enroll"), **extra}).json()["key"]
    r = sealed_enroll(
        coordinator.url, {"setup_key": key, "hostname": hostname, "os": os_name, "agent_version": version}, timeout=10
    )
    assert r.status_code == 200, r.text
    return {**r.json()["peer"], "credential": r.json()["credential"]}
