# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment(object):
    # Connection and authentication options merged into every Vault module (plugins/module_utils/_vault.py).
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Address of the Vault or OpenBao server, for example V(https://vault.example.org:8200).
      - If not set, the E(VAULT_ADDR) environment variable is used, then E(BAO_ADDR).
    type: str
    required: true
  auth_method:
    description:
      - How to log in. V(token) uses O(token); V(approle) logs in with O(role_id) and O(secret_id)
        at C(auth/<approle_mount>).
    type: str
    choices: [approle, token]
    default: token
  token:
    description:
      - Vault token for O(auth_method=token).
      - If not set, the E(VAULT_TOKEN) environment variable is used, then E(BAO_TOKEN).
    type: str
  role_id:
    description: AppRole role ID for O(auth_method=approle).
    type: str
  secret_id:
    description: AppRole secret ID for O(auth_method=approle).
    type: str
  approle_mount:
    description:
      - Path of the AppRole auth method (without C(auth/)), used to log in with O(auth_method=approle).
      - M(starling.mesh.vault_approle) also manages its roles there.
    type: str
    default: approle
  namespace:
    description:
      - Vault Enterprise / OpenBao namespace. If not set, E(VAULT_NAMESPACE) or E(BAO_NAMESPACE) is used.
    type: str
  validate_certs:
    description:
      - Verify the server's TLS certificate. Set to V(false) only for a self-signed test setup.
    type: bool
    default: true
  ca_cert:
    description:
      - CA bundle to verify the server's certificate with. If not set, E(VAULT_CACERT) or E(BAO_CACERT) is used.
    type: path
  timeout:
    description: Seconds to wait for each request.
    type: float
    default: 30.0
requirements:
  - hvac >= 1.0 (Python library, on the host that runs the module, normally the controller)
notes:
  - Errors are one line, for example C(Vault at URL is sealed ...), C(Vault at URL is unreachable ...),
    C(permission denied on PATH), C(... changed concurrently - expected version N ...). They say whether the
    run changed anything before the failure. Secret values never appear in messages.
  - All Vault modules of this collection are in the C(group/starling.mesh.vault) action group,
    so the connection options can be set once with C(module_defaults).
"""

    # Where the mesh lives in the KV v2 engine (wireguard_key, vault_secret).
    KV = r"""
options:
  mount:
    description: Path of the KV version 2 secrets engine.
    type: str
    default: starling
  prefix:
    description:
      - Path segment under which all secrets of this mesh live, so that one Vault can hold several meshes.
      - One segment of letters, digits, V(_), V(.) and V(-).
    type: str
    default: mesh
"""

    # For the Vault modules that do not use the KV location: accepted so that group module_defaults can set it.
    KV_UNUSED = r"""
options:
  mount:
    description:
      - Not used by this module. Accepted so that C(module_defaults) for C(group/starling.mesh.vault) can set the
        KV mount for all Vault modules.
    type: str
    default: starling
  prefix:
    description:
      - Not used by this module. Accepted so that C(module_defaults) for C(group/starling.mesh.vault) can set the
        prefix for all Vault modules.
    type: str
    default: mesh
"""

    ATTRIBUTES = r"""
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying Vault.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
  action_group:
    description: Use C(group/starling.mesh.vault) in C(module_defaults) to set defaults for this module.
    support: full
    membership:
      - starling.mesh.vault
"""
