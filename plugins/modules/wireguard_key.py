#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: wireguard_key
short_description: Ensure a mesh peer's WireGuard key in Vault (create, rotate, restore)
version_added: 0.1.0
description:
  - Keeps the WireGuard key pair of mesh peer O(peer) in a KV version 2 engine at
    C(<mount>/data/<prefix>/peers/<peer>/wireguard), with the fields C(private_key) (base64 of 32 clamped
    X25519 bytes), C(public_key) (base64) and C(created_at) (ISO 8601, UTC). The agent reads C(private_key)
    of the latest version.
  - A missing key is generated on the controller and written with check-and-set 0 (create only).
    O(rotate=true) writes a new key as a new version, O(restore_version) writes the data of an older version
    as a new version; both use check-and-set with the current version, so a concurrent writer makes the
    module fail ("changed concurrently") and nothing is written. Older versions are kept (see
    M(starling.mesh.vault_kv_mount) O(starling.mesh.vault_kv_mount#module:max_versions)); nothing is ever
    deleted or destroyed.
  - When the latest version was deleted by someone else, a new key is generated (the old versions stay
    available to O(restore_version)).
  - The token needs C(read) on C(<mount>/metadata/<prefix>/peers/*) and C(create), C(read), C(update) on
    C(<mount>/data/<prefix>/peers/*) (the controller policy of the C(starling.mesh.vault) role).
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - starling.mesh.vault
  - starling.mesh.vault.kv
  - starling.mesh.vault.attributes
attributes:
  check_mode:
    support: full
    details: A key that would be generated has no known public key in check mode (RV(public_key) is null).
  diff_mode:
    support: full
    details: The diff holds the public key and the version only, never a private key.
options:
  peer:
    description:
      - Name of the mesh peer, a lower-case DNS name (labels of V(a-z), V(0-9) and V(-)).
    type: str
    required: true
  rotate:
    description: Write a new key as a new version even when one exists.
    type: bool
    default: false
  restore_version:
    description:
      - Roll back to this version. Its data is written as a new version (the history is kept);
        nothing changes when the current data already equals it.
      - The version must still be readable (not deleted or destroyed).
    type: int
  expected_version:
    description:
      - The version that a write must replace (check-and-set); V(0) means "no key yet".
      - By default the version read at the start of the task is used. Set it to the version that an earlier
        task saw, so that the write fails when anybody wrote in between.
    type: int
  return_private_key:
    description:
      - Also return the private key (RV(private_key)). The task must then run with C(no_log=true);
        otherwise the module fails before changing anything.
    type: bool
    default: false
notes:
  - Generating keys needs the Python C(cryptography) library where the module runs.
seealso:
  - module: starling.mesh.vault_secret
  - module: starling.mesh.vault_kv_mount
"""

EXAMPLES = r"""
- name: Every agent has a key in Vault (created once)
  starling.mesh.wireguard_key:
    peer: "{{ inventory_hostname }}"
  delegate_to: localhost

- name: Rotate the key of web1
  starling.mesh.wireguard_key:
    peer: web1
    rotate: true
  register: rotated

- name: Roll back to the previous key
  starling.mesh.wireguard_key:
    peer: web1
    restore_version: "{{ rotated.previous_version }}"

- name: Hand the private key to a host that cannot read Vault
  starling.mesh.wireguard_key:
    peer: legacy1
    return_private_key: true
  register: legacy_key
  no_log: true
"""

RETURN = r"""
public_key:
  description: The current public key (after the change). Null in check mode when a key would be generated.
  returned: always
  type: str
  sample: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
version:
  description: The current KV version (after the change; the predicted one in check mode).
  returned: always
  type: int
  sample: 3
previous_version:
  description: The version that was current before the change (V(0) when there was none).
  returned: changed
  type: int
  sample: 2
previous_public_key:
  description: The public key before a rotation or restore.
  returned: when rotated or restored
  type: str
created:
  description: Whether a key was generated because none was readable.
  returned: always
  type: bool
path:
  description: The KV path of the key, relative to the mount.
  returned: always
  type: str
  sample: mesh/peers/web1/wireguard
mount:
  description: The KV v2 mount.
  returned: always
  type: str
  sample: starling
private_key:
  description: The private key (base64). Only with O(return_private_key=true), never in check mode for a new key.
  returned: when requested
  type: str
"""

import base64
import binascii
import datetime
import re
import secrets
import traceback

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.starling.mesh.plugins.module_utils._vault import VaultCasMismatch, VaultError, VaultModule, same_data

try:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    CRYPTO_IMPORT_ERROR = None
except ImportError:
    CRYPTO_IMPORT_ERROR = traceback.format_exc()

PEER_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
UNKNOWN = "(generated when applied)"


def public_from_raw(raw):
    pub = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


def new_key():
    """A WireGuard key pair like ``wg genkey``: 32 random bytes, clamped for X25519."""
    raw = bytearray(secrets.token_bytes(32))
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    raw = bytes(raw)
    return {
        "private_key": base64.b64encode(raw).decode("ascii"),
        "public_key": public_from_raw(raw),
        "created_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def public_key_of(data, where):
    """The public key of stored key data; VaultError when the data is not a valid key pair."""
    value = data.get("private_key") if isinstance(data, dict) else None
    try:
        raw = base64.b64decode(value or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raw = b""
    if len(raw) != 32:
        raise VaultError("%s holds no valid private_key (base64 of 32 bytes): rotate (rotate=true) or restore an "
                         "older version (restore_version)" % where, "data")
    public = public_from_raw(raw)
    if data.get("public_key") not in (None, public):
        raise VaultError("%s: public_key does not match private_key: rotate (rotate=true) or restore an older "
                         "version (restore_version)" % where, "data")
    return public


def run(module):
    p = module.params
    vault = module.vault
    if not PEER_RE.match(p["peer"] or ""):
        module.fail_json(msg="peer %r is not a valid peer name (a lower-case DNS name: a-z, 0-9, '-' and '.')" % p["peer"])
    if p["restore_version"] is not None and p["restore_version"] < 1:
        module.fail_json(msg="restore_version must be 1 or more, got %d" % p["restore_version"])
    if p["expected_version"] is not None and p["expected_version"] < 0:
        module.fail_json(msg="expected_version must be 0 or more, got %d" % p["expected_version"])
    if p["return_private_key"]:
        module.require_no_log("return_private_key", "the private key")

    path = module.kv_path("peers", p["peer"], "wireguard")
    entry = vault.kv_read(module.mount, path, missing_mount_ok=module.check_mode)
    if entry.mount_missing:
        module.warn("the KV v2 mount %s/ does not exist yet: check mode assumes it will be created" % module.mount)
    what = "the WireGuard key of peer %s" % p["peer"]
    result = dict(changed=False, created=False, path=path, mount=module.mount, version=entry.version)
    current_pub = None
    if entry.exists and not p["rotate"]:
        current_pub = public_key_of(entry.data, "version %d of %s" % (entry.version, entry.api_path))
    elif entry.exists:
        current_pub = entry.data.get("public_key")
    before = {"public_key": current_pub, "version": entry.version} if entry.exists else {}

    new_data = None
    if p["restore_version"] is not None:
        target = p["restore_version"]
        state = entry.version_state(target)
        if state != "ok":
            module.fail_json(msg="cannot restore version %d of %s: that version is %s; nothing was changed"
                             % (target, entry.api_path, "unknown" if state == "missing" else state))
        old = vault.kv_version(module.mount, path, target)
        if old is None:
            module.fail_json(msg="cannot restore version %d of %s: it is no longer readable; nothing was changed"
                             % (target, entry.api_path))
        public_key_of(old, "version %d of %s" % (target, entry.api_path))
        if not same_data(old, entry.data):
            new_data = old
    elif p["rotate"] or not entry.exists:
        new_data = {} if module.check_mode else new_key()  # in check mode: unknown until written
        result["created"] = not entry.exists

    if new_data is None:
        result.update(public_key=current_pub, diff=dict(before=before, after=before))
        if p["return_private_key"] and entry.exists:
            result["private_key"] = entry.data.get("private_key")
        return result

    cas = entry.version if p["expected_version"] is None else p["expected_version"]
    if module.check_mode:
        if cas != entry.version:
            raise VaultCasMismatch(
                "%s at %s changed concurrently: expected version %d but Vault has version %d; nothing was written"
                % (what, entry.api_path, cas, entry.version), cas, entry.version)
        version = entry.version + 1
        public = new_data.get("public_key") or None
        if public is None:
            result["msg"] = "check mode: a new key would be generated; its public key is known only once it is written"
    else:
        version = vault.kv_write(module.mount, path, new_data, cas, what=what)
        public = new_data["public_key"] if "public_key" in new_data else public_key_of(new_data, entry.api_path)
        if p["return_private_key"]:
            result["private_key"] = new_data["private_key"]
    result.update(changed=True, public_key=public, version=version, previous_version=entry.version)
    if entry.exists:
        result["previous_public_key"] = current_pub
    result["diff"] = dict(before=before, after={"public_key": public or UNKNOWN, "version": version})
    return result


def main():
    module = VaultModule(
        kv=True,
        argument_spec=dict(
            peer=dict(type="str", required=True),
            rotate=dict(type="bool", default=False),
            restore_version=dict(type="int"),
            expected_version=dict(type="int"),
            return_private_key=dict(type="bool", default=False),
        ),
        mutually_exclusive=[("rotate", "restore_version")],
    )
    if CRYPTO_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=CRYPTO_IMPORT_ERROR)
    module.run(run)


if __name__ == "__main__":
    main()
