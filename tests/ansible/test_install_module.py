"""starling.mesh.install on this machine: a real virtualenv, a real pip, wheelhouse archives made here.

The wheelhouse holds a small wheel named like the project (starling_mesh-<version>), so that pip has nothing else
to fetch: the module's logic (record, unpack, reinstall of a rebuilt wheel, check mode, refusals) is what is
under test, with the real tools underneath.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.ansible.conftest import BIN, ansible_env

pytestmark = pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")


def wheel_bytes(version: str, marker: str) -> bytes:
    """A minimal valid wheel of starling_mesh with one module whose content says which build it is."""
    dist = f"starling_mesh-{version}.dist-info"
    files = {
        "starling_fake_build.py": f"BUILD = {marker!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: starling-mesh\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def make_archive(path: Path, version: str, marker: str, extra: tuple[tarfile.TarInfo, bytes] | None = None) -> Path:
    data = wheel_bytes(version, marker)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(f"starling_mesh-{version}-py3-none-any.whl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            tar.addfile(extra[0], io.BytesIO(extra[1]))
    return path


class Runner:
    def __init__(self, collections_path: Path, workdir: Path) -> None:
        self.collections_path = collections_path
        self.workdir = workdir

    def __call__(self, *flags: str, **args: Any) -> dict[str, Any]:
        env = ansible_env(
            self.collections_path, self.workdir / "home", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
            ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_CALLBACKS_ENABLED="json",
        )  # fmt: skip
        proc = subprocess.run(
            [str(BIN / "ansible"), "localhost", "-i", "localhost,", "-c", "local", "-m", "starling.mesh.install",
             "-a", json.dumps(args), *flags],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
        try:
            out = json.loads(proc.stdout)
        except ValueError as exc:
            detail = f"rc {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            raise AssertionError(f"ansible output is not JSON ({detail})") from exc
        result: dict[str, Any] = out["plays"][0]["tasks"][0]["hosts"]["localhost"]
        return result


@pytest.fixture
def run(collections_path: Path, tmp_path: Path) -> Runner:
    return Runner(collections_path, tmp_path)


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


def test_wheelhouse_install_lifecycle(run: Runner, tmp_path: Path) -> None:
    venv, wheels = tmp_path / "opt" / "venv", tmp_path / "opt" / "wheelhouse"
    archive = make_archive(tmp_path / "wheelhouse.tar", "1.2.3", "first")
    args = {"venv": str(venv), "archive": str(archive), "wheel_dir": str(wheels)}

    # Check mode on a fresh host: the prediction, and nothing on disk.
    predicted = run("--check", "--diff", **args)
    assert predicted["changed"] is True, predicted
    assert predicted["actions"] == ["create the virtualenv", "unpack the wheelhouse", "pip install starling-mesh"]
    assert predicted["version"] == "1.2.3" and predicted["previous_version"] == ""
    assert not venv.exists() and not wheels.exists()

    first = run("--diff", **args)
    assert first["changed"] is True, first
    assert first["actions"] == ["create the virtualenv", "unpack the wheelhouse", "pip install starling-mesh"]
    assert first["version"] == "1.2.3"
    assert first["diff"]["before"]["version"] == "" and first["diff"]["after"]["version"] == "1.2.3"
    assert (site_packages(venv) / "starling_fake_build.py").read_text() == "BUILD = 'first'\n"
    archive_sha1 = hashlib.sha1(archive.read_bytes(), usedforsecurity=False).hexdigest()
    assert (wheels / ".archive.sha1").read_text().strip() == archive_sha1

    # Same archive: nothing to do, and pip is not started (the record says so); check mode agrees.
    again = run(**args)
    assert again["changed"] is False and again["actions"] == [], again
    assert run("--check", **args)["changed"] is False

    # Rebuilt wheel, same version number: pip alone would keep the installed one.
    make_archive(archive, "1.2.3", "rebuilt")
    check = run("--check", **args)
    assert check["changed"] is True and "unpack the wheelhouse" in check["actions"], check
    assert (site_packages(venv) / "starling_fake_build.py").read_text() == "BUILD = 'first'\n"
    rebuilt = run(**args)
    assert rebuilt["changed"] is True, rebuilt
    assert rebuilt["actions"] == ["unpack the wheelhouse", "reinstall the rebuilt starling_mesh wheel"], rebuilt
    assert (site_packages(venv) / "starling_fake_build.py").read_text() == "BUILD = 'rebuilt'\n"
    assert run(**args)["changed"] is False

    # A new version: pip installs it (and the check-mode prediction names it).
    make_archive(archive, "1.2.4", "next")
    assert run("--check", **args)["version"] == "1.2.4"
    upgraded = run(**args)
    assert upgraded["changed"] is True and upgraded["previous_version"] == "1.2.3" and upgraded["version"] == "1.2.4"
    assert "pip install starling-mesh" in upgraded["actions"]

    # Someone removed the package from the virtualenv: noticed, installed again.
    subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-y", "-q", "starling-mesh"], check=True)
    repaired = run(**args)
    assert repaired["changed"] is True and repaired["version"] == "1.2.4", repaired


def test_bad_input_changes_nothing(run: Runner, tmp_path: Path) -> None:
    venv, wheels = tmp_path / "venv", tmp_path / "wheelhouse"
    missing = run(venv=str(venv), archive=str(tmp_path / "nope.tar"), wheel_dir=str(wheels))
    assert missing.get("failed") and "is not on the host" in missing["msg"], missing

    evil = tarfile.TarInfo("../escaped.txt")
    evil.size = 3
    archive = make_archive(tmp_path / "evil.tar", "1.0.0", "x", extra=(evil, b"bad"))
    refused = run(venv=str(venv), archive=str(archive), wheel_dir=str(wheels))
    assert refused.get("failed") and "not a plain file or directory inside it" in refused["msg"], refused

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    no_wheel = run(venv=str(venv), archive=str(empty), wheel_dir=str(wheels))
    assert no_wheel.get("failed") and "has no starling_mesh wheel" in no_wheel["msg"], no_wheel

    wrong = run(venv=str(venv), archive=str(archive), requirement="requests")
    assert wrong.get("failed") and "requirement must be starling-mesh" in wrong["msg"], wrong

    assert not venv.exists() and not wheels.exists() and not (tmp_path / "escaped.txt").exists()
