# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment(object):
    # Connection options merged into every API module (plugins/module_utils/_module.py).
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Base URL of the Starling coordinator, for example V(https://coordinator.example.org:8443).
      - A trailing C(/api/v1) is accepted and ignored.
      - If not set, the E(STARLING_URL) environment variable is used.
    type: str
    required: true
  token:
    description:
      - Bearer token for the coordinator API, the admin bootstrap token or an API token C(sat_...).
      - Read-only modules work with a token of scope C(read); the others need scope C(write).
      - If not set, the E(STARLING_TOKEN) environment variable is used.
    type: str
    required: true
  validate_certs:
    description:
      - Verify the coordinator's TLS certificate. Set to V(false) only for a self-signed test setup.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for each HTTP request.
    type: float
    default: 30.0
notes:
  - Connection errors and 502/503/504 answers (and 500 for reads) are retried 3 times with exponential backoff.
  - Redirects are never followed, so that the token is not sent to another address.
  - All modules of this collection are in the C(group/starling.mesh.api) action group,
    so O(url) and O(token) can be set once with C(module_defaults).
"""
