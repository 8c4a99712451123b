"""Admin API against a real coordinator process: CRUD, auth scopes, bad input, audit, paging."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.enroll import SealedResponse, sealed_enroll


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def enroll(coord: CoordinatorProcess, key: str, hostname: str, **extra: object) -> SealedResponse:
    return sealed_enroll(coord.url, {"setup_key": key, "hostname": hostname, **extra}, timeout=10)


def new_key(api: httpx.Client, **fields: object) -> str:
    r = api.post("/api/v1/setup-keys", json={"name": uniq("key"), **fields})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def audit_count(api: httpx.Client) -> int:
    return len(api.get("/api/v1/audit", params={"limit": 1000}).json()["items"])


def assert_error(r: httpx.Response, status: int, field: str | None = None, contains: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "message", "field"}
    assert "Traceback" not in r.text
    if field is not None:
        assert body["field"] == field, body
        assert field.split("[")[0].split(".")[-1] in body["message"] or body["field"] == field
    assert contains in body["message"], body


def test_health_metrics_and_openapi(coordinator: CoordinatorProcess) -> None:
    assert httpx.get(coordinator.url + "/healthz").json()["status"] == "ok"
    metrics = httpx.get(coordinator.url + "/metrics").text
    for series in (
        "starling_peers_total",
        "starling_stream_clients",
        "starling_map_computation_seconds",
        "starling_http_requests_total",
    ):
        assert series in metrics
    assert "/api/v1/peers" in httpx.get(coordinator.url + "/openapi.json").json()["paths"]


def test_authentication_and_scopes(coordinator: CoordinatorProcess) -> None:
    assert_error(httpx.get(coordinator.url + "/api/v1/peers"), 401)
    with coordinator.client("sat_not-a-real-token") as bad:
        assert_error(bad.get("/api/v1/peers"), 401)
    with coordinator.client() as api:
        ro = api.post("/api/v1/tokens", json={"name": uniq("ro"), "scope": "read"}).json()
        rw = api.post("/api/v1/tokens", json={"name": uniq("rw"), "scope": "write"}).json()
        assert ro["token"].startswith("sat_") and "token" not in api.get(f"/api/v1/tokens/{ro['id']}").json()
    with coordinator.client(ro["token"]) as reader:
        assert reader.get("/api/v1/groups").status_code == 200
        assert_error(reader.post("/api/v1/groups", json={"name": uniq("g")}), 403, contains="read-only")
        assert_error(reader.get("/api/v1/tokens"), 403)
    with coordinator.client(rw["token"]) as writer:
        assert writer.post("/api/v1/groups", json={"name": uniq("g")}).status_code == 201
    with coordinator.client() as api:
        assert api.patch(f"/api/v1/tokens/{rw['id']}", json={"revoked": True}).json()["revoked"] is True
        assert_error(api.patch(f"/api/v1/tokens/{rw['id']}", json={"revoked": False}), 409)
    with coordinator.client(rw["token"]) as writer:
        assert_error(writer.get("/api/v1/groups"), 401)


def test_groups_crud_and_conflicts(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        name = uniq("grp")
        g = api.post("/api/v1/groups", json={"name": name, "description": "d"}).json()
        assert_error(api.post("/api/v1/groups", json={"name": name}), 409, field="name")
        assert_error(api.post("/api/v1/groups", json={"name": "bad name!"}), 422, field="name")
        assert_error(
            api.post("/api/v1/groups", json={"name": uniq("g"), "peers": ["nobody-here"]}),
            422,
            field="peers[0]",
            contains="nobody-here",
        )
        assert api.get(f"/api/v1/groups/{g['id']}").json()["name"] == name
        renamed = api.patch(f"/api/v1/groups/{g['id']}", json={"name": name + "-x"}).json()
        assert renamed["name"] == name + "-x"
        assert_error(api.get("/api/v1/groups/does-not-exist"), 404)
        assert api.delete(f"/api/v1/groups/{g['id']}").status_code == 204
        assert_error(api.delete(f"/api/v1/groups/{g['id']}"), 404)


def test_policy_validation_names_the_field_and_changes_nothing(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        src, dst = uniq("src"), uniq("dst")
        for n in (src, dst):
            api.post("/api/v1/groups", json={"name": n})
        before_policies = len(api.get("/api/v1/policies", params={"limit": 1000}).json()["items"])
        before_audit = audit_count(api)
        base = {"name": uniq("pol"), "protocol": "tcp", "sources": {"groups": [src]}, "destinations": {"groups": [dst]}}
        assert_error(
            api.post("/api/v1/policies", json={**base, "destinations": {"groups": ["nope"]}}),
            422,
            field="destinations.groups[0]",
            contains="unknown group 'nope'",
        )
        assert_error(api.post("/api/v1/policies", json={**base, "ports": [70000]}), 422, field="ports")
        assert_error(api.post("/api/v1/policies", json={**base, "ports": ["90-80"]}), 422, field="ports")
        assert_error(api.post("/api/v1/policies", json={**base, "protocol": "icmp", "ports": [22]}), 422)
        assert_error(api.post("/api/v1/policies", json={**base, "protocol": "sctp"}), 422, field="protocol")
        assert_error(api.post("/api/v1/policies", json={**base, "sources": {}}), 422, field="sources")
        assert_error(api.post("/api/v1/policies", json={**base, "extra": 1}), 422, field="extra")
        assert len(api.get("/api/v1/policies", params={"limit": 1000}).json()["items"]) == before_policies
        assert audit_count(api) == before_audit
        created = api.post("/api/v1/policies", json={**base, "ports": [5432, "8000-8100", 5432]})
        assert created.status_code == 201, created.text
        pol = created.json()
        assert pol["ports"] == ["5432", "8000-8100"]
        assert_error(api.post("/api/v1/policies", json=base), 409, field="name")
        assert_error(api.patch(f"/api/v1/policies/{pol['id']}", json={"protocol": "any"}), 422, field="ports")
        assert api.get(f"/api/v1/policies/{pol['id']}").json()["protocol"] == "tcp"
        assert_error(
            api.delete(f"/api/v1/groups/{api.get('/api/v1/groups', params={'name': src}).json()['items'][0]['id']}"),
            409,
            contains=pol["name"],
        )
        assert api.delete(f"/api/v1/policies/{pol['id']}").status_code == 204


def test_oversized_and_malformed_bodies(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        r = api.post("/api/v1/groups", json={"name": uniq("g"), "description": "x" * 70000})
        assert_error(r, 413)
        r = api.post("/api/v1/groups", content=b'{"name": ', headers={"content-type": "application/json"})
        assert_error(r, 400)
        r = api.get("/api/v1/peers", params={"limit": 0})
        assert_error(r, 422, field="limit")


def test_setup_keys_shown_once_and_enrollment_rules(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        grp = uniq("auto")
        api.post("/api/v1/groups", json={"name": grp})
        created = api.post("/api/v1/setup-keys", json={"name": uniq("once"), "auto_groups": [grp]}).json()
        assert created["key"].startswith("ssk_") and created["state"] == "valid"
        listed = api.get(f"/api/v1/setup-keys/{created['id']}").json()
        assert "key" not in listed and listed["prefix"] == created["key"][:8]
        assert_error(
            api.post("/api/v1/setup-keys", json={"name": uniq("k"), "auto_groups": ["ghost"]}),
            422,
            field="auto_groups[0]",
        )
        peers_before = len(api.get("/api/v1/peers", params={"limit": 1000}).json()["items"])
        audit_before = audit_count(api)
        assert_error(enroll(coordinator, "ssk_unknownkey000000", "h1"), 403, contains="not valid")
        bad_key = {"v": 1, "challenge": "c", "public_key": "not-a-key", "nonce": "A" * 16, "box": "A" * 24}
        assert_error(httpx.post(coordinator.url + "/api/v1/enroll", json=bad_key), 422, field="public_key")
        assert len(api.get("/api/v1/peers", params={"limit": 1000}).json()["items"]) == peers_before
        assert audit_count(api) == audit_before

        host = uniq("host")
        body = {"setup_key": created["key"], "hostname": host + ".example.org"}
        enrolled = sealed_enroll(coordinator.url, body)
        first = enrolled.json()
        assert first["peer"]["name"] == host and first["peer"]["groups"] == [grp]
        assert first["peer"]["mesh_ip"].startswith("100.64.")
        assert api.get(f"/api/v1/setup-keys/{created['id']}").json()["state"] == "exhausted"
        assert_error(enroll(coordinator, created["key"], "other"), 403, contains="exhausted")
        # the same key logs in again on its proof (the exhausted one-off key plays no part)
        again = sealed_enroll(coordinator.url, body, private_key=enrolled.private_key).json()
        assert again["login"] is True and first["login"] is False
        assert (again["peer"]["id"], again["peer"]["mesh_ip"]) == (first["peer"]["id"], first["peer"]["mesh_ip"])
        old = httpx.get(
            coordinator.url + "/api/v1/peer/map", headers={"Authorization": f"Bearer {first['credential']}"}
        )
        assert_error(old, 401)  # the re-login replaced the credential
        new = httpx.get(
            coordinator.url + "/api/v1/peer/map", headers={"Authorization": f"Bearer {again['credential']}"}
        )
        assert new.status_code == 200

        revoked = api.post("/api/v1/setup-keys", json={"name": uniq("rev"), "reusable": True}).json()
        api.patch(f"/api/v1/setup-keys/{revoked['id']}", json={"revoked": True})
        assert_error(enroll(coordinator, revoked["key"], "h2"), 403, contains="revoked")
        limited = new_key(api, reusable=True, usage_limit=2)
        assert enroll(coordinator, limited, "l1").status_code == 200
        assert enroll(coordinator, limited, "l1").status_code == 200  # same hostname: name gets a suffix
        assert_error(enroll(coordinator, limited, "l3"), 403, contains="exhausted")


def test_expired_setup_key_is_refused(coordinator: CoordinatorProcess) -> None:
    import sqlite3

    with coordinator.client() as api:
        key = api.post("/api/v1/setup-keys", json={"name": uniq("exp"), "reusable": True, "expires_in": 60}).json()
    db = sqlite3.connect(str(coordinator.workdir / "state" / "coordinator.db"))
    with db:
        db.execute("UPDATE setup_keys SET expires_at = '2020-01-01 00:00:00.000000' WHERE id = ?", (key["id"],))
    db.close()
    assert_error(enroll(coordinator, key["key"], "late"), 403, contains="expired")


def test_peer_update_rename_groups_delete_and_ip_uniqueness(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        key = new_key(api, reusable=True)
        peers = [enroll(coordinator, key, uniq("n")).json()["peer"] for _ in range(5)]
        ips = {p["mesh_ip"] for p in peers}
        assert len(ips) == 5
        grp = uniq("grp")
        api.post("/api/v1/groups", json={"name": grp})
        target = peers[0]
        newname = uniq("renamed")
        r = api.patch(f"/api/v1/peers/{target['id']}", json={"name": newname, "groups": [grp], "approved": False})
        assert r.status_code == 200, r.text
        assert (r.json()["name"], r.json()["groups"], r.json()["approved"]) == (newname, [grp], False)
        assert_error(api.patch(f"/api/v1/peers/{target['id']}", json={"name": peers[1]["name"]}), 409, field="name")
        assert_error(api.patch(f"/api/v1/peers/{target['id']}", json={"name": "Bad_Name"}), 422, field="name")
        assert_error(api.patch(f"/api/v1/peers/{target['id']}", json={"groups": ["ghost"]}), 422, field="groups[0]")
        assert api.get(f"/api/v1/peers/{target['id']}").json()["groups"] == [grp]
        assert api.delete(f"/api/v1/peers/{peers[1]['id']}").status_code == 204
        more = [enroll(coordinator, key, uniq("m")).json()["peer"]["mesh_ip"] for _ in range(3)]
        live = {p["mesh_ip"] for p in api.get("/api/v1/peers", params={"limit": 1000}).json()["items"]}
        assert len(live) == len(api.get("/api/v1/peers", params={"limit": 1000}).json()["items"])
        assert set(more) <= live


def test_paging_follows_cursor(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        prefix = uniq("page")
        for i in range(5):
            api.post("/api/v1/groups", json={"name": f"{prefix}-{i}"})
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = api.get("/api/v1/groups", params=params).json()
            seen += [g["name"] for g in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [n for n in seen if n.startswith(prefix)] == [f"{prefix}-{i}" for i in range(5)]
        assert len(seen) == len(set(seen))


def test_audit_records_every_change_with_filters(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        name = uniq("audited")
        g = api.post("/api/v1/groups", json={"name": name}).json()
        api.patch(f"/api/v1/groups/{g['id']}", json={"description": "changed"})
        api.delete(f"/api/v1/groups/{g['id']}")
        events = api.get("/api/v1/audit", params={"target_id": g["id"]}).json()["items"]
        assert [e["action"] for e in events] == ["group.delete", "group.update", "group.create"]
        assert all(e["actor"] == "admin" for e in events)
        assert events[1]["before"]["description"] == "" and events[1]["after"]["description"] == "changed"
        groups_only = api.get("/api/v1/audit", params={"action": "group.*", "limit": 2}).json()
        assert len(groups_only["items"]) == 2 and groups_only["next_cursor"]
        assert all(e["action"].startswith("group.") for e in groups_only["items"])
        clear = new_key(api)
        key_events = api.get("/api/v1/audit", params={"action": "setup_key.create"}).json()["items"]
        assert key_events and all(clear not in str(e) and clear[8:] not in str(e) for e in key_events)
        assert clear not in api.get("/api/v1/audit", params={"limit": 1000}).text  # secrets never in the log


def test_settings_validation(coordinator: CoordinatorProcess) -> None:
    with coordinator.client() as api:
        current = api.get("/api/v1/settings").json()
        assert_error(api.patch("/api/v1/settings", json={"mesh_prefix": "198.18.0.0/16"}), 422, field="mesh_prefix")
        assert_error(api.patch("/api/v1/settings", json={"turn_servers": ["http://x"]}), 422, field="turn_servers[0]")
        assert_error(api.patch("/api/v1/settings", json={"credential_ttl": 5}), 422, field="credential_ttl")
        if api.get("/api/v1/peers").json()["items"]:
            assert_error(
                api.patch("/api/v1/settings", json={"mesh_prefix": "100.127.0.0/24"}), 409, field="mesh_prefix"
            )
        assert api.get("/api/v1/settings").json() == current
        updated = api.patch("/api/v1/settings", json={"dns_domain": "corp.mesh"}).json()
        assert updated["dns_domain"] == "corp.mesh" and updated["revision"] > current["revision"]
        api.patch("/api/v1/settings", json={"dns_domain": current["dns_domain"]})


@pytest.mark.parametrize("path", ["/api/v1/peers/x", "/api/v1/policies/x", "/api/v1/setup-keys/x", "/api/v1/tokens/x"])
def test_unknown_ids_are_404(coordinator: CoordinatorProcess, path: str) -> None:
    with coordinator.client() as api:
        assert_error(api.get(path), 404)
