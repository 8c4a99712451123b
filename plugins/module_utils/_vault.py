# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Vault / OpenBao access shared by the starling.mesh Vault modules (hvac).

One common argument spec is merged into every Vault module (documented in the ``starling.mesh.vault``
doc fragment); the KV modules add ``mount`` and ``prefix`` (``starling.mesh.vault.kv``). Authentication
methods are small strategy classes (``AUTH_METHODS``). Every hvac or transport error becomes a
``VaultError`` with a one-line operator message ("Vault at URL is sealed", "permission denied on PATH",
"... changed concurrently: expected version N ..."); messages never carry secret values. KV v2 writes always
use check-and-set.
"""

from __future__ import annotations

import re
import traceback

from ansible.module_utils.basic import AnsibleModule, env_fallback, missing_required_lib
from ansible.module_utils.common.text.converters import to_native

try:
    import hvac
    import hvac.exceptions

    HVAC_IMPORT_ERROR = None
except ImportError:  # pragma: no cover - checked by the module at start
    hvac = None
    HVAC_IMPORT_ERROR = traceback.format_exc()

SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
SEGMENT_RE = re.compile(r"^%s$" % SEGMENT)
PATH_RE = re.compile(r"^%s(?:/%s)*$" % (SEGMENT, SEGMENT))
DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")
CAS_TEXT = "check-and-set"


# ----- argument specs ------------------------------------------------------------------------------
def vault_argument_spec():
    """Connection and authentication options shared by every Vault module."""
    return dict(
        url=dict(type="str", required=True, fallback=(env_fallback, ["VAULT_ADDR", "BAO_ADDR"])),
        auth_method=dict(type="str", default="token", choices=sorted(AUTH_METHODS)),
        token=dict(type="str", no_log=True, fallback=(env_fallback, ["VAULT_TOKEN", "BAO_TOKEN"])),
        role_id=dict(type="str"),
        secret_id=dict(type="str", no_log=True),
        approle_mount=dict(type="str", default="approle"),
        namespace=dict(type="str", fallback=(env_fallback, ["VAULT_NAMESPACE", "BAO_NAMESPACE"])),
        validate_certs=dict(type="bool", default=True),
        ca_cert=dict(type="path", fallback=(env_fallback, ["VAULT_CACERT", "BAO_CACERT"])),
        timeout=dict(type="float", default=30.0),
    )


def kv_argument_spec():
    """Where the mesh lives in a KV v2 engine (the ``starling.mesh.vault.kv`` doc fragment)."""
    return dict(
        mount=dict(type="str", default="starling"),
        prefix=dict(type="str", default="mesh"),
    )


# ----- errors --------------------------------------------------------------------------------------
class VaultError(Exception):
    """A failed Vault operation; ``msg`` is one line meant for the operator (never a secret)."""

    def __init__(self, msg, kind="error"):
        super(VaultError, self).__init__(msg)
        self.msg = msg
        self.kind = kind


class VaultCasMismatch(VaultError):
    """A check-and-set write lost the race: someone else wrote a version in between."""

    def __init__(self, msg, expected, current):
        super(VaultCasMismatch, self).__init__(msg, kind="cas")
        self.expected = expected
        self.current = current


def _errors(exc):
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(to_native(e).strip() for e in errors)
    return "no details"


# ----- authentication strategies -----------------------------------------------------------------
class TokenAuth(object):
    """auth_method=token: the token option (or VAULT_TOKEN / BAO_TOKEN)."""

    NAME = "token"

    def __init__(self, params):
        self.params = params

    def validate(self):
        if not self.params.get("token"):
            raise VaultError("auth_method=token needs a token: set the token option, VAULT_TOKEN or BAO_TOKEN")

    def authenticate(self, vault, client):
        client.token = self.params["token"]


class AppRoleAuth(object):
    """auth_method=approle: log in with role_id and secret_id at auth/<approle_mount>."""

    NAME = "approle"

    def __init__(self, params):
        self.params = params

    def validate(self):
        missing = [k for k in ("role_id", "secret_id") if not self.params.get(k)]
        if missing:
            raise VaultError("auth_method=approle needs %s" % " and ".join(missing))

    def authenticate(self, vault, client):
        mount = self.params["approle_mount"].strip("/")
        try:
            client.auth.approle.login(
                role_id=self.params["role_id"], secret_id=self.params["secret_id"], mount_point=mount
            )
        except hvac.exceptions.InvalidRequest as exc:
            raise VaultError("Vault at %s: AppRole login at auth/%s failed (%s)" % (vault.url, mount, _errors(exc)), "auth")
        except hvac.exceptions.Forbidden:
            raise VaultError("Vault at %s: AppRole login denied (is AppRole enabled at auth/%s/?)" % (vault.url, mount), "auth")
        except Exception as exc:  # pylint: disable=broad-except
            raise vault.translate(exc, "logging in at", "auth/%s/login" % mount)


AUTH_METHODS = {"token": TokenAuth, "approle": AppRoleAuth}


# ----- the client ----------------------------------------------------------------------------------
class Vault(object):
    """hvac with operator-friendly errors. ``writes`` lists what this run changed (for honest failures)."""

    def __init__(self, params):
        url = (params.get("url") or "").strip().rstrip("/")
        if not url:
            raise VaultError("the Vault address is not set: give the url option or set VAULT_ADDR (or BAO_ADDR)")
        if not url.startswith(("http://", "https://")):
            raise VaultError("url must start with http:// or https://, got %r" % url)
        self.url = url
        self.params = params
        self.auth = AUTH_METHODS[params.get("auth_method") or "token"](params)
        self.auth.validate()
        self.writes = []
        self._client = None

    @property
    def client(self):
        if self._client is None:
            verify = self.params.get("ca_cert") or self.params.get("validate_certs", True)
            client = hvac.Client(
                url=self.url, namespace=self.params.get("namespace") or None, verify=verify,
                timeout=self.params.get("timeout") or 30,
            )
            self.auth.authenticate(self, client)
            self._client = client
        return self._client

    # -- error translation --
    def translate(self, exc, verb, path):
        where = "Vault at %s" % self.url
        if isinstance(exc, VaultError):
            return exc
        if hvac is not None and isinstance(exc, hvac.exceptions.VaultError):
            if isinstance(exc, hvac.exceptions.VaultDown):
                if "sealed" in _errors(exc).lower() or "sealed" in to_native(exc).lower():
                    return VaultError("%s is sealed (while %s %s): unseal it and re-run" % (where, verb, path), "sealed")
                return VaultError("%s is unavailable (while %s %s): %s" % (where, verb, path, _errors(exc)), "down")
            if isinstance(exc, hvac.exceptions.VaultNotInitialized):
                return VaultError("%s is not initialized" % where, "down")
            if isinstance(exc, hvac.exceptions.Forbidden):
                if isinstance(self.auth, TokenAuth) and not self._token_valid():
                    return VaultError("%s rejected the token (invalid, expired or revoked) while %s %s" % (where, verb, path), "auth")
                return VaultError("%s: permission denied on %s (%s)" % (where, path, verb), "denied")
            if isinstance(exc, hvac.exceptions.InvalidPath):
                return VaultError("%s: invalid path %s (%s): %s" % (where, path, verb, _errors(exc)), "path")
            if isinstance(exc, hvac.exceptions.InvalidRequest):
                return VaultError("%s: %s %s was refused: %s" % (where, verb, path, _errors(exc)), "request")
            return VaultError("%s: %s %s failed: %s: %s" % (where, verb, path, type(exc).__name__, _errors(exc)))
        if isinstance(exc, OSError):  # requests' ConnectionError, SSLError and Timeout are OSErrors
            name = type(exc).__name__.lower()
            if "ssl" in name:
                return VaultError("%s: TLS failed while %s %s (check validate_certs and ca_cert): %s"
                                  % (where, verb, path, type(exc).__name__), "tls")
            why = "timed out" if "timeout" in name else "connection failed"
            return VaultError("%s is unreachable (%s while %s %s)" % (where, why, verb, path), "unreachable")
        return VaultError("%s: %s %s failed: %s" % (where, verb, path, type(exc).__name__))

    def _token_valid(self):
        try:
            self._client.auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            return False
        except Exception:  # pylint: disable=broad-except
            pass
        return True

    def call(self, verb, path, fn, missing_ok=False, write=None):
        """Run ``fn(client)``; translate errors. ``missing_ok``: return None for a plain 404.
        ``write``: a description recorded in ``writes`` when the call succeeds."""
        try:
            result = fn(self.client)
        except VaultError:
            raise
        except Exception as exc:  # pylint: disable=broad-except
            if missing_ok and hvac is not None and isinstance(exc, hvac.exceptions.InvalidPath) and not getattr(exc, "errors", None):
                return None
            raise self.translate(exc, verb, path)
        if write:
            self.writes.append(write)
        return result

    # -- sys/mounts, sys/auth --
    def mount_info(self, path):
        """The secrets engine at ``path`` (type, options) or None."""
        return self._sys_info("mounts", path, "No secret engine mount")

    def auth_info(self, path):
        """The auth method at ``path`` (type) or None."""
        return self._sys_info("auth", path, "No auth engine")

    def _sys_info(self, kind, path, missing_text):
        api = "sys/%s/%s" % (kind, path.strip("/"))
        try:
            resp = self.client.adapter.get("/v1/" + api)
        except Exception as exc:  # pylint: disable=broad-except
            if hvac is not None and isinstance(exc, (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath)):
                if missing_text.lower() in _errors(exc).lower() or not getattr(exc, "errors", None):
                    return None
            raise self.translate(exc, "reading", api)
        return (resp or {}).get("data") or resp

    # -- KV v2 --
    def kv_read(self, mount, path, missing_mount_ok=False):
        """The current state of ``path``: a ``KvEntry`` (version 0 and no data when missing)."""
        meta_path = "%s/metadata/%s" % (mount, path)
        try:
            meta = self.call(
                "reading", meta_path,
                lambda c: c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount), missing_ok=True,
            )
        except VaultError as exc:
            if exc.kind == "path" and "no handler for route" in exc.msg:
                if missing_mount_ok:
                    return KvEntry(mount, path, 0, None, {}, mount_missing=True)
                raise VaultError(
                    "Vault at %s: no KV v2 secrets engine is mounted at %s/ (create it with "
                    "starling.mesh.vault_kv_mount)" % (self.url, mount), "path")
            raise
        if not meta:
            self._require_kv2(mount)
            return KvEntry(mount, path, 0, None, {})
        info = meta.get("data") or {}
        version = int(info.get("current_version") or 0)
        versions = info.get("versions") or {}
        data = None
        current = versions.get(str(version)) or {}
        if version and not current.get("deletion_time") and not current.get("destroyed"):
            data = self.kv_version(mount, path, version)
        return KvEntry(mount, path, version, data, versions)

    def _require_kv2(self, mount):
        """Before creating a secret: refuse a KV version 1 (or other) engine, where a KV v2 write would silently
        land as a plain secret under ``data/``. Best effort: sys/internal/ui/mounts is readable by any token
        that may use the mount; when it cannot be read the write itself decides."""
        try:
            resp = self.client.adapter.get("/v1/sys/internal/ui/mounts/%s" % mount)
        except Exception:  # pylint: disable=broad-except
            return
        info = (resp or {}).get("data") or {}
        kind, version = info.get("type"), str((info.get("options") or {}).get("version") or "1")
        if kind and (kind != "kv" or version != "2"):
            what = "KV version %s" % version if kind == "kv" else "a %r engine" % kind
            raise VaultError("Vault at %s: the secrets engine at %s/ is %s, not KV version 2" % (self.url, mount, what), "path")

    def kv_version(self, mount, path, version):
        """The data of one version; None when it is deleted or destroyed."""
        api = "%s/data/%s" % (mount, path)
        resp = self.call(
            "reading version %d of" % version, api,
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=path, version=version, mount_point=mount, raise_on_deleted_version=False),
            missing_ok=True,
        )
        if not resp:
            return None
        return (resp.get("data") or {}).get("data")

    def kv_write(self, mount, path, data, cas, what="secret"):
        """Write a new version with check-and-set ``cas``; return the new version number."""
        api = "%s/data/%s" % (mount, path)
        try:
            resp = self.call(
                "writing", api,
                lambda c: c.secrets.kv.v2.create_or_update_secret(path=path, secret=data, cas=cas, mount_point=mount),
            )
        except VaultError as exc:
            if exc.kind == "request" and CAS_TEXT in exc.msg:
                try:
                    current = self.kv_read(mount, path).version
                except VaultError:
                    current = None
                raise VaultCasMismatch(
                    "%s at %s changed concurrently: expected version %d%s but Vault has %s; nothing was written, "
                    "re-run to act on the current version"
                    % (what, api, cas, " (no secret yet)" if cas == 0 else "",
                       "version %d" % current if current is not None else "another version"),
                    cas, current,
                )
            raise
        self.writes.append("wrote %s" % api)
        return int(((resp or {}).get("data") or {}).get("version") or 0)

    def kv_delete_latest(self, mount, path):
        api = "%s/data/%s" % (mount, path)
        self.call(
            "deleting the latest version of", api,
            lambda c: c.secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point=mount),
            write="deleted the latest version of %s" % api,
        )


class KvEntry(object):
    """What a KV v2 path holds now. ``version`` is the current version (0: never written);
    ``data`` is None when there is no readable current version (missing, deleted or destroyed)."""

    def __init__(self, mount, path, version, data, versions, mount_missing=False):
        self.mount = mount
        self.path = path
        self.version = version
        self.data = data
        self.versions = versions
        self.mount_missing = mount_missing

    @property
    def api_path(self):
        return "%s/data/%s" % (self.mount, self.path)

    @property
    def exists(self):
        return self.data is not None

    def version_state(self, version):
        """'missing', 'destroyed', 'deleted' or 'ok' for one version number."""
        info = self.versions.get(str(version))
        if info is None:
            return "missing"
        if info.get("destroyed"):
            return "destroyed"
        if info.get("deletion_time"):
            return "deleted"
        return "ok"


# ----- module base ---------------------------------------------------------------------------------
class VaultModule(AnsibleModule):
    """AnsibleModule with the common Vault options merged in. ``mount`` and ``prefix`` are accepted by every
    Vault module, so that ``module_defaults`` for the whole group work; ``kv=True`` validates and uses them."""

    def __init__(self, argument_spec=None, kv=False, **kwargs):
        spec = vault_argument_spec()
        spec.update(kv_argument_spec())  # every Vault module accepts them (group/starling.mesh.vault defaults)
        spec.update(argument_spec or {})
        kwargs.setdefault("supports_check_mode", True)
        super(VaultModule, self).__init__(argument_spec=spec, **kwargs)
        if HVAC_IMPORT_ERROR:
            self.fail_json(msg=missing_required_lib("hvac"), exception=HVAC_IMPORT_ERROR)
        self.vault = None
        try:
            self.vault = Vault(self.params)
        except VaultError as exc:
            self.fail_json(msg=exc.msg)
        if kv:
            self.mount = self.params["mount"].strip("/")
            self.prefix = self.params["prefix"].strip("/")
            if not PATH_RE.match(self.mount):
                self.fail_json(msg="mount %r is not a valid mount path" % self.params["mount"])
            if not SEGMENT_RE.match(self.prefix):
                self.fail_json(
                    msg="prefix %r is invalid: use one path segment of letters, digits, '_', '.' and '-'" % self.params["prefix"])

    def kv_path(self, *parts):
        return "/".join([self.prefix] + [p.strip("/") for p in parts])

    def fail_vault(self, exc, **result):
        """Fail with the error's message; say whether this run wrote anything before the failure."""
        writes = list(self.vault.writes) if self.vault else []
        msg = exc.msg
        if writes:
            msg += " (this run had already: %s)" % "; ".join(writes)
        elif exc.kind != "cas":
            msg += "; nothing was changed"
        result.setdefault("changed", bool(writes))
        self.fail_json(msg=msg, error=exc.kind, **result)

    def require_no_log(self, option, what):
        """Secrets are only returned to tasks that run with no_log: true (checked before any change)."""
        if not self.no_log:
            self.fail_json(
                msg="%s=true returns %s: run the task with no_log: true (otherwise it would be shown in the "
                "output and logs); nothing was changed" % (option, what))

    def run(self, fn):
        try:
            result = fn(self)
        except VaultError as exc:
            self.fail_vault(exc)
        self.exit_json(**result)


# ----- helpers -------------------------------------------------------------------------------------
def duration_seconds(value, option):
    """Vault duration (int seconds, '90', '30m', '1h', '1h30m', '2d') in seconds; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("%s must be a duration such as 3600, '1h' or '30m', not %r" % (option, value))
    if isinstance(value, int):
        if value < 0:
            raise ValueError("%s must not be negative" % option)
        return value
    text = to_native(value).strip().lower()
    match = DURATION_RE.match(text) if text else None
    if not match:
        raise ValueError("%s must be a duration such as 3600, '1h' or '30m', not %r" % (option, value))
    d, h, m, s = (int(x or 0) for x in match.groups())
    return ((d * 24 + h) * 60 + m) * 60 + s


def same_data(a, b):
    return (a or None) == (b or None)
