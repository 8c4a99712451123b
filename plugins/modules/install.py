#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: install
short_description: Install Starling into a virtualenv on the host, from a wheelhouse archive or a package index
version_added: 0.1.0
description:
  - Runs on the managed host. Makes sure the virtualenv O(venv) exists and holds O(requirement) (the
    C(starling-mesh) distribution, with extras if asked) and its dependencies.
  - With O(source=wheelhouse), the wheels come from O(archive), a tar of wheels already on the host (the roles copy
    the one C(scripts/build-wheelhouse.sh) builds on the controller). It is unpacked into O(wheel_dir) when it
    differs from the one unpacked there, and pip installs with C(--no-index). The host needs no package index.
  - A record of what was installed (the project wheel's checksum and the requirements) is kept in the virtualenv,
    so that a re-run with the same wheelhouse does not start pip at all, and a rebuilt wheel with an unchanged
    version number is still installed over the old one. Several roles on one host (coordinator, signal, agent)
    share the virtualenv, the unpacked wheelhouse and the record, and install once; their install step is this
    module.
  - With O(source=index), pip installs O(requirement) (at O(version) when given) from the package index pip is
    configured with, on every run (pip reports whether it installed anything).
  - Check mode changes nothing and predicts the change (pip C(--dry-run) where a virtualenv exists).
author:
  - Starling developers (@starling)
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying the host.
    support: full
  diff_mode:
    description: Returns the installed version before and after.
    support: full
options:
  venv:
    description: Path of the virtualenv; created with O(python) C(-m venv) when it has no C(bin/python).
    type: path
    required: true
  python:
    description: The interpreter the virtualenv is created with.
    type: path
    default: /usr/bin/python3
  requirement:
    description: What pip installs, for example V(starling-mesh) (the agent) or V(starling-mesh[coordinator,postgres]).
    type: str
    default: starling-mesh
  source:
    description: Where the wheels come from.
    type: str
    choices: [wheelhouse, index]
    default: wheelhouse
  archive:
    description: The wheelhouse tar on the host (required with O(source=wheelhouse)).
    type: path
  wheel_dir:
    description:
      - Where the archive is unpacked (a directory of this module's own; replaced whole by a new archive).
      - Defaults to C(wheelhouse) next to O(archive).
    type: path
  version:
    description: With O(source=index), the version to install (V(==) pinned); latest when left out.
    type: str
  extra_args:
    description: With O(source=index), more pip arguments (for example an index URL).
    type: list
    elements: str
    default: []
notes:
  - The archive must hold wheels only (files at its top level or in directories); members with absolute paths,
    C(..) components or links are refused.
"""

EXAMPLES = r"""
- name: Copy the wheelhouse built on the controller
  ansible.builtin.copy:
    src: .state/wheelhouse.tar
    dest: /opt/starling/wheelhouse.tar
    mode: "0644"

- name: Starling from it, into /opt/starling/venv
  starling.mesh.install:
    venv: /opt/starling/venv
    requirement: starling-mesh[coordinator,postgres]
    archive: /opt/starling/wheelhouse.tar

- name: Starling 0.1.0 from the package index
  starling.mesh.install:
    venv: /opt/starling/venv
    source: index
    version: 0.1.0
"""

RETURN = r"""
version:
  description:
    - The installed version of starling-mesh after the task (predicted in check mode when a new wheel would be
      installed), an empty string when it is not installed.
  returned: always
  type: str
  sample: 0.1.0
previous_version:
  description: The installed version before the task, an empty string when there was none.
  returned: always
  type: str
actions:
  description: What was done (or would be, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["create the virtualenv", "unpack the wheelhouse", "pip install starling-mesh[coordinator,postgres]"]
"""

import glob
import hashlib
import json
import os
import re
import shutil
import tarfile

from ansible.module_utils.basic import AnsibleModule

PROJECT = "starling_mesh"
ARCHIVE_RECORD = ".archive.sha1"
RECORD = ".starling-install.json"
LEGACY_MARKER = ".starling-wheel.sha1"


def sha1_of(path):
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_text(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def installed_version(venv):
    """The version of the installed distribution, from its dist-info directory name (no interpreter start)."""
    found = glob.glob(os.path.join(venv, "lib", "python*", "site-packages", PROJECT + "-*.dist-info"))
    if not found:
        return ""
    return os.path.basename(sorted(found)[-1])[len(PROJECT) + 1:-len(".dist-info")]


def wheel_version(name):
    match = re.match(PROJECT + r"-([^-]+)-", os.path.basename(name))
    return match.group(1) if match else ""


def checked_members(module, tar):
    """The archive's members, refused as a whole when one could land outside the directory."""
    members = tar.getmembers()
    for member in members:
        name = member.name
        if name.startswith("/") or ".." in name.split("/") or not (member.isfile() or member.isdir()):
            module.fail_json(msg="the wheelhouse archive %s has a member that is not a plain file or directory "
                                 "inside it: %r; nothing was changed" % (module.params["archive"], name))
    return members


class Installer(object):
    def __init__(self, module):
        self.module = module
        params = module.params
        self.venv = params["venv"]
        self.venv_python = os.path.join(self.venv, "bin", "python")
        self.pip = os.path.join(self.venv, "bin", "pip")
        self.archive = params["archive"]
        self.wheel_dir = params["wheel_dir"] or (
            os.path.join(os.path.dirname(self.archive), "wheelhouse") if self.archive else None)
        self.record_path = os.path.join(self.venv, RECORD)
        self.actions = []
        self.predicted_version = None

    # ----- state on the host --------------------------------------------------------------------------------
    def record(self):
        try:
            data = json.loads(read_text(self.record_path) or "{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def project_wheels(self, names):
        return sorted(n for n in names if re.match(PROJECT + r"-[^/]+\.whl$", os.path.basename(n)))

    # ----- steps ------------------------------------------------------------------------------------------------
    def run_pip(self, args, check_mode):
        argv = [self.pip, "install", "--disable-pip-version-check"] + args
        if check_mode:
            argv.append("--dry-run")
        rc, out, err = self.module.run_command(argv)
        if rc != 0:
            self.module.fail_json(msg="pip install failed (exit %d): %s" % (rc, (err or out).strip()[-2000:]),
                                  actions=self.actions, cmd=argv)
        return out

    def wheelhouse(self):
        module = self.module
        check = module.check_mode
        if not self.archive:
            module.fail_json(msg="source=wheelhouse needs archive (the wheelhouse tar on the host)")
        have_archive = os.path.isfile(self.archive)
        if not have_archive and not check:
            module.fail_json(msg="the wheelhouse archive %s is not on the host (copy it first); nothing was changed"
                                 % self.archive)
        new_venv = not os.path.exists(self.venv_python)
        archive_sha = sha1_of(self.archive) if have_archive else "missing"
        unpacked = (os.path.isdir(self.wheel_dir)
                    and read_text(os.path.join(self.wheel_dir, ARCHIVE_RECORD)) == archive_sha)

        # The project wheel: from the unpacked directory, or (about to be unpacked) from the archive's listing.
        if unpacked:
            wheels = self.project_wheels(os.listdir(self.wheel_dir))
            wheel_sha = sha1_of(os.path.join(self.wheel_dir, wheels[-1])) if wheels else ""
        elif have_archive:
            try:
                with tarfile.open(self.archive) as tar:
                    members = checked_members(module, tar)
                    wheels = self.project_wheels(m.name for m in members if m.isfile())
                    wheel_sha = ""
                    if wheels:
                        extracted = tar.extractfile(wheels[-1])
                        wheel_sha = hashlib.sha1(extracted.read()).hexdigest() if extracted else ""
            except tarfile.TarError as exc:
                module.fail_json(msg="the wheelhouse archive %s is not a readable tar: %s; nothing was changed"
                                     % (self.archive, exc))
        else:  # check mode, archive not copied yet
            wheels, wheel_sha = [], ""
        if have_archive and not wheels:
            module.fail_json(msg="the wheelhouse archive %s has no %s wheel; nothing was changed"
                                 % (self.archive, PROJECT))
        if wheels:
            self.predicted_version = wheel_version(wheels[-1])

        record = self.record()
        # The record of the roles before this module: the project wheel's checksum only.
        recorded_wheel = record.get("wheel") or read_text(os.path.join(self.venv, LEGACY_MARKER))
        requirement = self.module.params["requirement"]
        if (not new_venv and unpacked and recorded_wheel == wheel_sha and installed_version(self.venv)
                and requirement in record.get("requirements", [])):
            return  # up to date: pip is not started

        if new_venv:
            self.actions.append("create the virtualenv")
            if not check:
                self.create_venv()
        if not unpacked:
            self.actions.append("unpack the wheelhouse")
            if not check:
                self.unpack(archive_sha)
        if check and (new_venv or not unpacked):
            # pip cannot be asked without the virtualenv or the wheels: either means an install.
            self.actions.append("pip install %s" % requirement)
            return
        # Pinned to the wheelhouse's version: pip would keep an older installed one otherwise (or a newer one).
        pinned = "%s==%s" % (requirement, wheel_version(wheels[-1]))
        out = self.run_pip(["--no-index", "--find-links", self.wheel_dir, pinned], check)
        if re.search(r"^(Successfully installed|Would install) ", out, re.M):
            self.actions.append("pip install %s" % requirement)
        # Same version number, rebuilt wheel: pip keeps the installed one; install the new one over it.
        project_installed = re.search(r"^(Successfully installed|Would install) .*\bstarling[-_]mesh-", out, re.M)
        if recorded_wheel and recorded_wheel != wheel_sha and not project_installed:
            self.actions.append("reinstall the rebuilt %s wheel" % PROJECT)
            self.run_pip(["--no-index", "--force-reinstall", "--no-deps",
                          os.path.join(self.wheel_dir, wheels[-1])], check)
        if not check:
            requirements = record.get("requirements", []) if record.get("wheel") == wheel_sha else []
            self.write_record({"wheel": wheel_sha, "requirements": sorted(set(requirements) | {requirement})})

    def index(self):
        params = self.module.params
        check = self.module.check_mode
        if not os.path.exists(self.venv_python):
            self.actions.append("create the virtualenv")
            if check:
                self.actions.append("pip install %s" % params["requirement"])
                return
            self.create_venv()
        requirement = params["requirement"] + ("==" + params["version"] if params["version"] else "")
        out = self.run_pip(list(params["extra_args"]) + [requirement], check)
        if "Successfully installed" in out or "Would install" in out:
            self.actions.append("pip install %s" % requirement)

    def create_venv(self):
        rc, out, err = self.module.run_command([self.module.params["python"], "-m", "venv", self.venv])
        if rc != 0:
            self.module.fail_json(msg="creating the virtualenv %s failed: %s" % (self.venv, (err or out).strip()))

    def unpack(self, archive_sha):
        staging = self.wheel_dir + ".new"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging, mode=0o755)
        try:
            with tarfile.open(self.archive) as tar:
                members = checked_members(self.module, tar)
                for member in members:
                    member.uid = member.gid = 0
                    member.uname = member.gname = "root"
                if hasattr(tarfile, "data_filter"):  # Python with PEP 706 (3.11.4+, and Debian's backport)
                    tar.extractall(staging, members=members, filter="data")
                else:
                    tar.extractall(staging, members=members)
            with open(os.path.join(staging, ARCHIVE_RECORD), "w") as handle:
                handle.write(archive_sha + "\n")
            shutil.rmtree(self.wheel_dir, ignore_errors=True)
            os.rename(staging, self.wheel_dir)
        except (OSError, tarfile.TarError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self.module.fail_json(msg="unpacking %s failed: %s" % (self.archive, exc), actions=self.actions)

    def write_record(self, data):
        tmp = self.record_path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(data, handle, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.rename(tmp, self.record_path)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            venv=dict(type="path", required=True),
            python=dict(type="path", default="/usr/bin/python3"),
            requirement=dict(type="str", default="starling-mesh"),
            source=dict(type="str", choices=["wheelhouse", "index"], default="wheelhouse"),
            archive=dict(type="path"),
            wheel_dir=dict(type="path"),
            version=dict(type="str"),
            extra_args=dict(type="list", elements="str", default=[]),
        ),
        required_if=[("source", "wheelhouse", ["archive"])],
        supports_check_mode=True,
    )
    if not re.match(r"^starling-mesh(\[[a-z0-9,_-]+\])?$", module.params["requirement"]):
        module.fail_json(msg="requirement must be starling-mesh, optionally with extras "
                             "(starling-mesh[coordinator,postgres]), not %r" % module.params["requirement"])
    installer = Installer(module)
    before = installed_version(installer.venv)
    if module.params["source"] == "wheelhouse":
        installer.wheelhouse()
    else:
        installer.index()
    changed = bool(installer.actions)
    after = installed_version(installer.venv)
    if module.check_mode and changed and installer.predicted_version:
        after = installer.predicted_version
    result = dict(changed=changed, actions=installer.actions, version=after, previous_version=before)
    if module._diff:
        result["diff"] = dict(before={"version": before, "actions": []},
                              after={"version": after, "actions": installer.actions})
    module.exit_json(**result)


if __name__ == "__main__":
    main()
