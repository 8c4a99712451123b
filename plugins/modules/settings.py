#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: settings
short_description: Manage the mesh-wide settings of a Starling coordinator
version_added: 0.1.0
description:
  - Sets the settings of the coordinator's mesh (one mesh per coordinator). These are the TURN/STUN servers and the
    signal URL that every peer's network map carries, the TURN credential lifetime, the DNS domain, peer approval,
    the offline timeout of ephemeral peers and the mesh prefix.
  - Options left out keep their current value. Only the settings that differ are sent, so a re-run changes
    nothing; every change is an audit event (C(settings.update)) and reaches the connected agents in their maps.
  - The coordinator's configuration file only seeds these settings on its first start; after that this module
    (the C(/api/v1/settings) API) owns them.
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
options:
  turn_servers:
    description:
      - TURN and STUN server URLs handed to the agents, in order of preference, for example
        V(turn:relay1.example.org:3478?transport=udp) or V(stun:relay1.example.org:3478). The order matters.
      - An empty list removes them all (agents then use direct paths only).
    type: list
    elements: str
  signal_url:
    description: The signal service's WebSocket URL (V(ws://) or V(wss://)) published to the agents; V("") for none.
    type: str
  credential_ttl:
    description: Lifetime in seconds of the TURN credentials the coordinator mints (60 to 604800).
    type: int
  dns_domain:
    description: DNS domain of the peers' names (for example V(starling.internal)).
    type: str
  peer_approval_required:
    description: Whether newly enrolled peers wait for an approval (M(starling.mesh.peer) O(starling.mesh.peer#module:approved)).
    type: bool
  ephemeral_offline_timeout:
    description: Seconds after which an offline peer enrolled with an ephemeral setup key is removed (10 to 2592000).
    type: int
  mesh_prefix:
    description:
      - The IPv4 prefix mesh addresses come from, inside V(100.64.0.0/10). The coordinator refuses a prefix that
        does not hold the addresses already assigned.
    type: str
seealso:
  - module: starling.mesh.mesh_info
"""

EXAMPLES = r"""
- name: Publish the relays and the signal service to every peer
  starling.mesh.settings:
    turn_servers:
      - turn:relay1.example.org:3478?transport=udp
      - turn:relay2.example.org:3478?transport=udp
    signal_url: wss://signal.example.org/ws

- name: Shorter TURN credentials
  starling.mesh.settings:
    credential_ttl: 1800
"""

RETURN = r"""
settings:
  description: The settings after the change (the predicted ones in check mode).
  returned: always
  type: dict
  sample:
    mesh_prefix: 100.64.0.0/16
    dns_domain: starling.internal
    turn_servers: ["turn:relay1.example.org:3478?transport=udp"]
    signal_url: wss://signal.example.org/ws
    credential_ttl: 3600
    ephemeral_offline_timeout: 600
    peer_approval_required: false
    revision: 4
diff:
  description: Before and after values of the managed settings.
  returned: always
  type: dict
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import StarlingModule

KEYS = (
    "turn_servers",
    "signal_url",
    "credential_ttl",
    "dns_domain",
    "peer_approval_required",
    "ephemeral_offline_timeout",
    "mesh_prefix",
)


def run(module):
    p = module.params
    client = module.client
    current = client.get("/settings")
    before = dict((k, current.get(k)) for k in KEYS)
    patch = {}
    for key in KEYS:
        if p[key] is not None and p[key] != current.get(key):
            patch[key] = p[key]
    if not patch:
        return dict(changed=False, settings=current, diff=dict(before=before, after=before))
    if module.check_mode:
        result = dict(current, **patch)
    else:
        result = client.patch("/settings", patch)
    after = dict((k, result.get(k)) for k in KEYS)
    return dict(changed=True, settings=result, diff=dict(before=before, after=after))


def main():
    module = StarlingModule(
        argument_spec=dict(
            turn_servers=dict(type="list", elements="str"),
            signal_url=dict(type="str"),
            credential_ttl=dict(type="int"),
            dns_domain=dict(type="str"),
            peer_approval_required=dict(type="bool"),
            ephemeral_offline_timeout=dict(type="int"),
            mesh_prefix=dict(type="str"),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
