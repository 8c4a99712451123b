# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The common argument spec and module base class merged by every starling.mesh API module."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule, env_fallback

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorClient, CoordinatorError


def api_argument_spec():
    """Connection options shared by every module (documented in the starling.mesh.api doc fragment)."""
    return dict(
        url=dict(type="str", required=True, fallback=(env_fallback, ["STARLING_URL"])),
        token=dict(type="str", required=True, no_log=True, fallback=(env_fallback, ["STARLING_TOKEN"])),
        validate_certs=dict(type="bool", default=True),
        timeout=dict(type="float", default=30.0),
    )


class StarlingModule(AnsibleModule):
    """AnsibleModule with the common connection options merged in and a coordinator client."""

    def __init__(self, argument_spec=None, **kwargs):
        spec = api_argument_spec()
        spec.update(argument_spec or {})
        kwargs.setdefault("supports_check_mode", True)
        super(StarlingModule, self).__init__(argument_spec=spec, **kwargs)
        try:
            self.client = CoordinatorClient(
                self.params["url"],
                self.params["token"],
                validate_certs=self.params["validate_certs"],
                timeout=self.params["timeout"],
            )
        except CoordinatorError as exc:
            self.fail_json(msg=exc.msg)

    def fail_api(self, exc, **result):
        """Fail with the coordinator error's message and structured detail."""
        detail = exc.to_result()
        detail.update(result)
        self.fail_json(msg=exc.msg, **detail)


def public_view(item, keys):
    """The subset of an API object shown in diffs (stable keys, no ids or timestamps)."""
    if item is None:
        return {}
    return dict((k, item.get(k)) for k in keys if k in item)


def over_current(params, keys, current):
    """``{key: value}`` for ``keys``: the module parameter when given, else the current object's value (a key neither
    has is left out, so that normalization fills its default)."""
    data = {}
    for key in keys:
        value = params.get(key)
        if value is None:
            value = current.get(key)
        if value is not None:
            data[key] = value
    return data


def unknown_references(client, groups=(), peers=(), routes=()):
    """Problems (``["unknown groups: a, b", ...]``) for the named groups, peers and routes the coordinator lacks."""
    problems = []
    for kind, names, missing in (
        ("groups", groups, client.missing_groups),
        ("peers", peers, client.missing_peers),
        ("routes", routes, client.missing_routes),
    ):
        unknown = missing(names)
        if unknown:
            problems.append("unknown %s: %s" % (kind, ", ".join(unknown)))
    return problems


def ensure_absent(module, collection, item, before, result_key):
    """state=absent for an object found by name: delete it (not in check mode) and report the diff."""
    if item is None:
        return {"changed": False, result_key: {}, "diff": dict(before={}, after={})}
    if not module.check_mode:
        client = module.client
        client.delete(client.item_path(collection, item["id"]))
    return {"changed": True, result_key: {}, "diff": dict(before=before, after={})}


def names_equal(a, b):
    return sorted(set(a or [])) == sorted(set(b or []))
