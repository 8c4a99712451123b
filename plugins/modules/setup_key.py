#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: setup_key
short_description: Manage setup keys (enrollment keys) of a Starling mesh
version_added: 0.1.0
description:
  - Create, update, revoke and delete setup keys on the Starling coordinator. Agents enroll with a setup key.
  - The coordinator stores only a hash of the key. The clear key is returned B(once), when the module creates the key;
    store it right away (for example in Vault) and run the task with C(no_log=true).
  - Of an existing key only O(auto_groups) and the revocation can change. If O(reusable), O(usage_limit) or
    O(ephemeral) differ from the existing key the module fails, because the coordinator cannot change them;
    delete the key or use a new name.
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - starling.mesh.api
  - starling.mesh.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The clear key never appears in the diff.
options:
  name:
    description: Name of the setup key.
    type: str
    required: true
  reusable:
    description: Whether the key may enroll more than one peer. Used when the key is created.
    type: bool
    default: false
  usage_limit:
    description: How many peers a reusable key may enroll, V(0) for unlimited. Used when the key is created.
    type: int
    default: 0
  expires_in:
    description:
      - Lifetime in seconds (at least 60), counted from creation. Omit for a key that never expires.
      - Only used when the key is created; it is not compared with an existing key.
    type: int
  auto_groups:
    description:
      - Groups that peers enrolled with this key join. When omitted, an existing key keeps its auto-groups.
    type: list
    elements: str
  ephemeral:
    description: Peers enrolled with this key are removed after being offline for a while. Used when the key is created.
    type: bool
    default: false
  state:
    description:
      - V(present) creates the key (or updates its auto-groups), V(revoked) revokes it (for good),
        V(absent) deletes it.
      - A revoked key cannot become valid again; O(state=present) on a revoked key fails.
    type: str
    choices: [present, revoked, absent]
    default: present
seealso:
  - module: starling.mesh.token
"""

EXAMPLES = r"""
- name: A reusable key for the web servers, valid for a day
  starling.mesh.setup_key:
    name: web-enroll
    reusable: true
    usage_limit: 20
    expires_in: 86400
    auto_groups: [web]
  register: web_key
  no_log: true

- name: Keep the clear key (only set when the key was just created)
  ansible.builtin.copy:
    content: "{{ web_key.key }}"
    dest: /root/web-enroll.key
    mode: "0600"
  when: web_key.key is defined
  no_log: true

- name: Revoke it
  starling.mesh.setup_key:
    name: web-enroll
    state: revoked
"""

RETURN = r"""
setup_key:
  description: The setup key's metadata (never the clear key). Empty when absent.
  returned: always
  type: dict
  sample:
    id: 01J9ZK3V7Q2W
    name: web-enroll
    prefix: ssk_AbCd
    reusable: true
    usage_limit: 20
    used_count: 0
    auto_groups: [web]
    ephemeral: false
    revoked: false
    state: valid
    expires_at: "2025-01-02T00:00:00Z"
key:
  description: The clear setup key. Only returned when the module created the key (not in check mode).
  returned: when created
  type: str
  sample: ssk_AbCdEfGh...
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import StarlingModule, ensure_absent, public_view

KEYS = ("name", "reusable", "usage_limit", "auto_groups", "ephemeral", "revoked", "state")
IMMUTABLE = ("reusable", "usage_limit", "ephemeral")


def expected_limit(params):
    return params["usage_limit"] if params["reusable"] else 1


def run(module):
    p = module.params
    client = module.client
    key = client.find_by_name("/setup-keys", p["name"])
    before = public_view(key, KEYS)
    if p["state"] == "absent":
        return ensure_absent(module, "/setup-keys", key, before, "setup_key")

    if p["auto_groups"]:
        missing = client.missing_groups(p["auto_groups"])
        if missing:
            module.fail_json(msg="setup key %r: unknown auto_groups: %s" % (p["name"], ", ".join(missing)))

    if key is None:
        body = {
            "name": p["name"],
            "reusable": p["reusable"],
            "usage_limit": p["usage_limit"],
            "expires_in": p["expires_in"],
            "auto_groups": p["auto_groups"] or [],
            "ephemeral": p["ephemeral"],
        }
        if p["expires_in"] is not None and p["expires_in"] < 60:
            module.fail_json(msg="setup key %r: expires_in must be at least 60 seconds" % p["name"])
        if module.check_mode:
            revoked = p["state"] == "revoked"
            created = dict(body, usage_limit=expected_limit(p), revoked=revoked, state="revoked" if revoked else "valid")
            created.pop("expires_in")
            return dict(changed=True, setup_key=created, diff=dict(before={}, after=public_view(created, KEYS)))
        created = client.post("/setup-keys", body)
        clear = created.pop("key", None)
        if p["state"] == "revoked":
            created = client.patch(client.item_path("/setup-keys", created["id"]), {"revoked": True})
            clear = None
        result = dict(changed=True, setup_key=created, diff=dict(before={}, after=public_view(created, KEYS)))
        if clear:
            # A task under no_log is already where the warning tells it to be.
            if not module.no_log:
                module.warn(
                    "setup key %r was created: its clear value is in the 'key' result only this once; "
                    "store it now and keep this task under no_log" % p["name"]
                )
            result["key"] = clear
        return result

    different = [k for k in IMMUTABLE if key.get(k) != (expected_limit(p) if k == "usage_limit" else p[k])]
    if different:
        module.fail_json(
            msg="setup key %r exists with other %s; the coordinator cannot change them: "
            "delete the key (state=absent) or use a new name" % (p["name"], ", ".join(different)),
            setup_key=key,
        )
    patch = {}
    if p["auto_groups"] is not None and sorted(set(p["auto_groups"])) != sorted(key["auto_groups"]):
        patch["auto_groups"] = sorted(set(p["auto_groups"]))
    if p["state"] == "revoked" and not key["revoked"]:
        patch["revoked"] = True
    if p["state"] == "present" and key["revoked"]:
        module.fail_json(
            msg="setup key %r is revoked and cannot be reinstated: delete it (state=absent) or use a new name" % p["name"],
            setup_key=key,
        )
    if not patch:
        return dict(changed=False, setup_key=key, diff=dict(before=before, after=before))
    if module.check_mode:
        result = dict(key, **patch)
        if patch.get("revoked"):
            result["state"] = "revoked"
    else:
        result = client.patch(client.item_path("/setup-keys", key["id"]), patch)
    return dict(changed=True, setup_key=result, diff=dict(before=before, after=public_view(result, KEYS)))


def main():
    module = StarlingModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            reusable=dict(type="bool", default=False),
            usage_limit=dict(type="int", default=0),
            expires_in=dict(type="int"),
            auto_groups=dict(type="list", elements="str"),
            ephemeral=dict(type="bool", default=False),
            state=dict(type="str", default="present", choices=["present", "revoked", "absent"]),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
