#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vault_policy
short_description: Ensure a Vault ACL policy
version_added: 0.1.0
description:
  - Creates, updates or deletes the ACL policy O(name). The policy is given as HCL text (O(rules)) or as a
    mapping of paths to capabilities (O(paths)) that the module renders to HCL in a stable order, so that
    re-runs are idempotent.
  - The token needs C(read), C(create), C(update) and C(delete) on C(sys/policies/acl/<name>).
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - starling.mesh.vault
  - starling.mesh.vault.kv_unused
  - starling.mesh.vault.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff shows the policy text before and after.
options:
  name:
    description:
      - Name of the policy, lower case (Vault lower-cases policy names). V(root) cannot be managed and
        V(default) cannot be deleted.
    type: str
    required: true
  rules:
    description: The policy in HCL. Compared with the stored text ignoring trailing whitespace.
    type: str
  paths:
    description:
      - The policy as a mapping of path (globs such as V(starling/data/mesh/*) allowed) to a list of
        capabilities (V(create), V(read), V(update), V(patch), V(delete), V(list), V(sudo), V(deny),
        V(subscribe)). Rendered to HCL with paths sorted and capabilities in that order.
    type: dict
  state:
    description: V(present) ensures the policy, V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: starling.mesh.vault_approle
"""

EXAMPLES = r"""
- name: Peer web1 may read its own WireGuard key only
  starling.mesh.vault_policy:
    name: starling-mesh-peer-web1
    paths:
      starling/data/mesh/peers/web1/wireguard: [read]

- name: A hand-written policy
  starling.mesh.vault_policy:
    name: ops-read
    rules: |
      path "starling/metadata/mesh/*" {
        capabilities = ["read", "list"]
      }
"""

RETURN = r"""
policy:
  description: The policy text after the run (empty when absent).
  returned: always
  type: str
  sample: |
    path "starling/data/mesh/peers/web1/wireguard" {
      capabilities = ["read"]
    }
"""

import json
import re

from ansible_collections.starling.mesh.plugins.module_utils._vault import VaultModule

CAPABILITIES = ("create", "read", "update", "patch", "delete", "list", "sudo", "deny", "subscribe")
NAME_RE = re.compile(r"^[a-z0-9_][a-z0-9_.@-]*$")
HEADER = "# Managed by starling.mesh.vault_policy\n"


def render(paths):
    """HCL for ``{path: [capabilities]}``; ValueError on bad input."""
    blocks = []
    for path in sorted(paths):
        caps = paths[path]
        if isinstance(caps, str):
            caps = [c.strip() for c in caps.split(",")]
        if not isinstance(caps, list) or not caps:
            raise ValueError("paths[%r] must be a non-empty list of capabilities" % path)
        unknown = sorted(set(caps) - set(CAPABILITIES))
        if unknown:
            raise ValueError("paths[%r]: unknown capabilities %s (known: %s)" % (path, ", ".join(unknown), ", ".join(CAPABILITIES)))
        if not path or '"' in path or "\n" in path:
            raise ValueError("invalid policy path %r" % path)
        ordered = [c for c in CAPABILITIES if c in caps]
        blocks.append('path %s {\n  capabilities = [%s]\n}\n' % (json.dumps(path), ", ".join(json.dumps(c) for c in ordered)))
    return HEADER + "\n".join(blocks)


def normalize(text):
    return "\n".join(line.rstrip() for line in (text or "").strip().splitlines())


def run(module):
    p = module.params
    vault = module.vault
    name = p["name"]
    if not NAME_RE.match(name or ""):
        module.fail_json(msg="policy name %r is invalid: use lower-case letters, digits, '_', '.', '@' and '-'" % name)
    if name == "root":
        module.fail_json(msg="the root policy cannot be managed")
    api = "sys/policies/acl/%s" % name
    resp = vault.call("reading", api, lambda c: c.sys.read_acl_policy(name), missing_ok=True)
    current = ((resp or {}).get("data") or {}).get("policy") if resp else None
    before_text = current or ""

    if p["state"] == "absent":
        if current is None:
            return dict(changed=False, policy="", diff=dict(before="", after=""))
        if name == "default":
            module.fail_json(msg="the default policy cannot be deleted")
        if not module.check_mode:
            vault.call("deleting", api, lambda c: c.sys.delete_acl_policy(name), write="deleted policy %s" % name)
        return dict(changed=True, policy="", diff=dict(before=before_text, after="", before_header=api, after_header=api))

    if p["rules"] is not None:
        text = p["rules"]
        if not text.strip():
            module.fail_json(msg="rules must not be empty")
    else:
        try:
            text = render(p["paths"] or {})
        except ValueError as exc:
            module.fail_json(msg="policy %s: %s" % (name, exc))
        if not p["paths"]:
            module.fail_json(msg="paths must not be empty")
    if current is not None and normalize(current) == normalize(text):
        return dict(changed=False, policy=current, diff=dict(before=before_text, after=before_text))
    if not module.check_mode:
        vault.call("writing", api, lambda c: c.sys.create_or_update_acl_policy(name, text),
                   write="wrote policy %s" % name)
    return dict(changed=True, policy=text, diff=dict(before=before_text, after=text, before_header=api, after_header=api))


def main():
    module = VaultModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            rules=dict(type="str"),
            paths=dict(type="dict"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        mutually_exclusive=[("rules", "paths")],
        required_if=[("state", "present", ("rules", "paths"), True)],
    )
    module.run(run)


if __name__ == "__main__":
    main()
