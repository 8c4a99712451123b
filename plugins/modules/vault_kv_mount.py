#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vault_kv_mount
short_description: Ensure a KV version 2 secrets engine for the mesh in Vault
version_added: 0.1.0
description:
  - Enables a KV version 2 secrets engine at O(mount) when nothing is mounted there, and sets how many versions
    of each secret it keeps (O(max_versions)) and, optionally, whether every write must use check-and-set.
  - When another engine (or KV version 1) already sits at O(mount), the module fails and changes nothing;
    it never disables, upgrades or re-mounts an engine.
  - The token needs C(read), C(create) and C(update) on C(sys/mounts/<mount>) and C(read), C(update) on
    C(<mount>/config).
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - starling.mesh.vault
  - starling.mesh.vault.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
options:
  mount:
    description: Path of the secrets engine.
    type: str
    default: starling
  max_versions:
    description:
      - Versions kept per secret; older ones are removed when a new version is written. Rollback
        (O(starling.mesh.wireguard_key#module:restore_version)) can only go back this far.
    type: int
    default: 10
  cas_required:
    description:
      - Make Vault refuse every write without check-and-set. The modules of this collection always use it.
        When omitted the current setting is kept.
    type: bool
  description:
    description: Description of the mount. When omitted the current description is kept.
    type: str
  prefix:
    description:
      - Not used by this module. Accepted so that C(module_defaults) for C(group/starling.mesh.vault) can set the
        prefix for all Vault modules.
    type: str
    default: mesh
seealso:
  - module: starling.mesh.wireguard_key
  - module: starling.mesh.vault_secret
"""

EXAMPLES = r"""
- name: The mesh's KV v2 engine keeps 20 versions of each secret
  starling.mesh.vault_kv_mount:
    mount: starling
    max_versions: 20
    cas_required: true
"""

RETURN = r"""
mount:
  description: The mount path.
  returned: always
  type: str
  sample: starling
created:
  description: Whether the engine was enabled by this run.
  returned: always
  type: bool
config:
  description: The engine's settings after the run.
  returned: always
  type: dict
  sample: {type: kv, version: 2, max_versions: 10, cas_required: false, description: Starling mesh secrets}
"""

import time

from ansible_collections.starling.mesh.plugins.module_utils._vault import PATH_RE, VaultError, VaultModule


def read_config(vault, mount):
    resp = vault.call("reading", "%s/config" % mount, lambda c: c.adapter.get("/v1/%s/config" % mount))
    data = (resp or {}).get("data") or {}
    return {"max_versions": int(data.get("max_versions") or 0), "cas_required": bool(data.get("cas_required"))}


def write_config(vault, mount, body, fresh):
    """POST <mount>/config; a freshly enabled engine may need a moment before it serves requests."""
    deadline = time.time() + (15 if fresh else 0)
    while True:
        try:
            return vault.call("writing", "%s/config" % mount, lambda c: c.adapter.post("/v1/%s/config" % mount, json=body),
                              write="configured %s/" % mount)
        except VaultError as exc:
            if exc.kind not in ("path", "request", "down") or time.time() > deadline:
                raise
            time.sleep(0.2)


def run(module):
    p = module.params
    vault = module.vault
    mount = (p["mount"] or "").strip("/")
    if not PATH_RE.match(mount):
        module.fail_json(msg="mount %r is not a valid mount path" % p["mount"])
    if p["max_versions"] < 1:
        module.fail_json(msg="max_versions must be 1 or more, got %d" % p["max_versions"])

    info = vault.mount_info(mount)
    before = {}
    if info is not None:
        kind = info.get("type")
        version = str((info.get("options") or {}).get("version") or "1")
        if kind != "kv" or version != "2":
            what = "a KV version %s engine" % version if kind == "kv" else "a %r secrets engine" % kind
            module.fail_json(msg="%s is mounted at %s/, not KV version 2: refusing to change it (choose another mount); "
                             "nothing was changed" % (what, mount), changed=False)
        before = dict(read_config(vault, mount), type="kv", version=2, description=info.get("description") or "")

    desired = dict(before) if before else {"type": "kv", "version": 2, "max_versions": 0, "cas_required": False,
                                           "description": ""}
    desired["max_versions"] = p["max_versions"]
    if p["cas_required"] is not None:
        desired["cas_required"] = p["cas_required"]
    if p["description"] is not None:
        desired["description"] = p["description"]
    result = dict(mount=mount, created=info is None, config=desired)
    if desired == before:
        return dict(result, changed=False, diff=dict(before=before, after=before))

    if not module.check_mode:
        if info is None:
            vault.call("enabling KV v2 at", "sys/mounts/%s" % mount,
                       lambda c: c.sys.enable_secrets_engine("kv", path=mount, description=desired["description"] or None,
                                                             options={"version": "2"}),
                       write="enabled KV v2 at %s/" % mount)
        elif desired["description"] != before["description"]:
            vault.call("tuning", "sys/mounts/%s/tune" % mount,
                       lambda c: c.sys.tune_mount_configuration(path=mount, description=desired["description"]),
                       write="set the description of %s/" % mount)
        body = {}
        for key in ("max_versions", "cas_required"):
            if info is None or desired[key] != before[key]:
                body[key] = desired[key]
        if body:
            write_config(vault, mount, body, fresh=info is None)
        result["config"] = dict(desired, **read_config(vault, mount))
    return dict(result, changed=True, diff=dict(before=before, after=result["config"]))


def main():
    module = VaultModule(
        argument_spec=dict(
            mount=dict(type="str", default="starling"),
            max_versions=dict(type="int", default=10),
            cas_required=dict(type="bool"),
            description=dict(type="str"),
        ),
    )
    module.run(run)


if __name__ == "__main__":
    main()
