#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: token
short_description: Manage API tokens of a Starling coordinator
version_added: 0.1.0
description:
  - Create, revoke and delete API tokens (C(sat_...)) of the Starling coordinator.
  - The coordinator stores only a hash of each token. The clear token is returned B(once), when the module creates it;
    store it right away (for example in Vault) and run the task with C(no_log=true).
  - The O(scope) of an existing token cannot change, so the module then fails; delete the token or use a new name.
  - Managing tokens needs a token of scope C(write) (or the admin token).
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
    details: The clear token never appears in the diff.
options:
  name:
    description: Name of the API token.
    type: str
    required: true
  scope:
    description: V(read) allows GET requests only; V(write) allows every admin API call. Required to create a token.
    type: str
    choices: [read, write]
  expires_in:
    description:
      - Lifetime in seconds (at least 60), counted from creation. Omit for a token that never expires.
      - Only used when the token is created.
    type: int
  state:
    description:
      - V(present) creates the token, V(revoked) revokes it (for good), V(absent) deletes it.
      - O(state=present) on a revoked token fails, since it cannot be reinstated.
    type: str
    choices: [present, revoked, absent]
    default: present
seealso:
  - module: starling.mesh.setup_key
"""

EXAMPLES = r"""
- name: A read-only token for the dynamic inventory
  starling.mesh.token:
    name: inventory
    scope: read
  register: inventory_token
  no_log: true

- name: Revoke the old CI token
  starling.mesh.token:
    name: ci-2024
    state: revoked
"""

RETURN = r"""
api_token:
  description: The token's metadata (never the clear token). Empty when absent.
  returned: always
  type: dict
  sample:
    id: 01J9ZK3V7Q2W
    name: inventory
    prefix: sat_AbCd
    scope: read
    revoked: false
    expires_at: null
secret:
  description: The clear API token. Only returned when the module created it (not in check mode).
  returned: when created
  type: str
  sample: sat_AbCdEfGh...
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import StarlingModule, ensure_absent, public_view

KEYS = ("name", "scope", "revoked")


def run(module):
    p = module.params
    client = module.client
    tok = client.find_by_name("/tokens", p["name"])
    before = public_view(tok, KEYS)
    if p["state"] == "absent":
        return ensure_absent(module, "/tokens", tok, before, "api_token")

    if tok is None:
        if not p["scope"]:
            module.fail_json(msg="token %r does not exist: scope (read or write) is required to create it" % p["name"])
        if p["expires_in"] is not None and p["expires_in"] < 60:
            module.fail_json(msg="token %r: expires_in must be at least 60 seconds" % p["name"])
        body = {"name": p["name"], "scope": p["scope"], "expires_in": p["expires_in"]}
        if module.check_mode:
            created = {"name": p["name"], "scope": p["scope"], "revoked": p["state"] == "revoked"}
            return dict(changed=True, api_token=created, diff=dict(before={}, after=public_view(created, KEYS)))
        created = client.post("/tokens", body)
        clear = created.pop("token", None)
        if p["state"] == "revoked":
            created = client.patch(client.item_path("/tokens", created["id"]), {"revoked": True})
            clear = None
        result = dict(changed=True, api_token=created, diff=dict(before={}, after=public_view(created, KEYS)))
        if clear:
            # A task under no_log is already where the warning tells it to be.
            if not module.no_log:
                module.warn(
                    "API token %r was created: its clear value is in the 'secret' result only this once; "
                    "store it now and keep this task under no_log" % p["name"]
                )
            result["secret"] = clear
        return result

    if p["scope"] and p["scope"] != tok["scope"]:
        module.fail_json(
            msg="token %r exists with scope %r; the scope cannot change: delete the token (state=absent) "
            "or use a new name" % (p["name"], tok["scope"]),
            api_token=tok,
        )
    if p["state"] == "present" and tok["revoked"]:
        module.fail_json(
            msg="token %r is revoked and cannot be reinstated: delete it (state=absent) or use a new name" % p["name"],
            api_token=tok,
        )
    if p["state"] == "revoked" and not tok["revoked"]:
        result = dict(tok, revoked=True) if module.check_mode else client.patch(client.item_path("/tokens", tok["id"]), {"revoked": True})
        return dict(changed=True, api_token=result, diff=dict(before=before, after=public_view(result, KEYS)))
    return dict(changed=False, api_token=tok, diff=dict(before=before, after=before))


def main():
    module = StarlingModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            scope=dict(type="str", choices=["read", "write"]),
            expires_in=dict(type="int"),
            state=dict(type="str", default="present", choices=["present", "revoked", "absent"]),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
