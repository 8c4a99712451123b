"""The coordinator as operators run it: secrets from OpenBao, restarts, CLI errors, ephemeral expiry."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.coordinator import CoordinatorProcess, running_coordinator
from tests.fixtures.enroll import sealed_enroll
from tests.fixtures.openbao import OpenBao, dev_server, free_port
from tests.fixtures.pki import self_signed


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBao]:
    with dev_server(tmp_path / "openbao") as server:
        yield server


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.vault
def test_secrets_from_vault_survive_restart(bao: OpenBao, tmp_path: Path) -> None:
    """Secrets are created in KV v2 on first start and read back unchanged on restart: the signing key
    (and so every token signal verifies) and the admin token stay stable; nothing lands on disk."""
    secrets_cfg = {"source": "vault", "vault": {"url": bao.url, "token": bao.root_token, "path": "starling/coord"}}
    config = {"secrets": secrets_cfg}
    with running_coordinator(tmp_path / "c", config) as coord:
        key1 = httpx.get(coord.url + "/api/v1/signing-key").json()["public_key"]
        token1 = coord.admin_token
        with coord.client() as api:
            assert api.get("/api/v1/peers").status_code == 200
        coord.stop()
        coord.start()
        assert httpx.get(coord.url + "/api/v1/signing-key").json()["public_key"] == key1
        assert coord.cli("show-admin-token").stdout.strip() == token1
    stored = bao.client().secrets.kv.v2.read_secret_version(
        path="starling/coord/admin_token", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["value"] == token1 and stored["data"]["metadata"]["version"] == 1
    assert not (tmp_path / "c" / "state" / "secrets").exists()


@pytest.mark.vault
def test_unreachable_vault_fails_start_with_a_clear_error(bao: OpenBao, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "s"),
                "secrets": {"source": "vault", "vault": {"url": bao.url, "token": "wrong-token"}},
            }
        )
    )
    result = cli(cfg, "show-admin-token")
    assert result.returncode == 2
    assert "vault at" in result.stderr and "wrong-token" not in result.stderr and "Traceback" not in result.stderr


def test_cli_bad_config_exits_2_with_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: {port: not-a-port}\n")
    result = cli(cfg, "migrate")
    assert result.returncode == 2 and "listen.port" in result.stderr and "Traceback" not in result.stderr
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "s"), "database": {"url": "sqlite:///:memory:"}}))
    result = cli(cfg, "migrate")
    assert result.returncode == 2 and "in-memory" in result.stderr


def test_restart_keeps_state_and_serials_move_forward(tmp_path: Path) -> None:
    with running_coordinator(tmp_path / "c") as coord:
        with coord.client() as api:
            api.post("/api/v1/groups", json={"name": "g"})
            key = api.post("/api/v1/setup-keys", json={"name": "k", "reusable": True, "auto_groups": ["g"]}).json()
            api.post(
                "/api/v1/policies", json={"name": "p", "sources": {"groups": ["g"]}, "destinations": {"groups": ["g"]}}
            )
        creds = [
            sealed_enroll(coord.url, {"setup_key": key["key"], "hostname": f"h{i}"}).json()["credential"]
            for i in range(2)
        ]
        auth = {"Authorization": f"Bearer {creds[0]}"}
        before = httpx.get(coord.url + "/api/v1/peer/map", headers=auth).json()
        coord.stop()
        coord.start()
        after = httpx.get(coord.url + "/api/v1/peer/map", headers=auth).json()
        assert after["peers"] == before["peers"] and after["serial"] >= before["serial"]
        with coord.client() as api:
            api.patch("/api/v1/settings", json={"dns_domain": "after.restart"})
        assert httpx.get(coord.url + "/api/v1/peer/map", headers=auth).json()["serial"] > after["serial"]


@pytest.mark.slow
def test_ephemeral_peers_are_removed_after_the_offline_timeout(tmp_path: Path) -> None:
    with running_coordinator(tmp_path / "c", {"maintenance_interval": 0.5}) as coord, coord.client() as api:
        api.patch("/api/v1/settings", json={"ephemeral_offline_timeout": 10})
        eph = api.post("/api/v1/setup-keys", json={"name": "eph", "reusable": True, "ephemeral": True}).json()
        normal = api.post("/api/v1/setup-keys", json={"name": "normal", "reusable": True}).json()
        peer_e = enroll(coord, eph["key"], "ci-runner")
        peer_n = enroll(coord, normal["key"], "server")
        assert api.get(f"/api/v1/peers/{peer_e}").json()["ephemeral"] is True
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and api.get(f"/api/v1/peers/{peer_e}").status_code == 200:
            time.sleep(0.5)
        assert api.get(f"/api/v1/peers/{peer_e}").status_code == 404
        assert api.get(f"/api/v1/peers/{peer_n}").status_code == 200
        events = api.get("/api/v1/audit", params={"action": "peer.expire"}).json()["items"]
        assert [e["target_id"] for e in events] == [peer_e] and events[0]["actor"] == "system"


def enroll(coord: CoordinatorProcess, key: str, host: str) -> str:
    r = sealed_enroll(coord.url, {"setup_key": key, "hostname": host})
    assert r.status_code == 200, r.text
    return str(r.json()["peer"]["id"])


def test_https_listener(tmp_path: Path) -> None:
    """`tls:` serves the API over HTTPS with the given certificate; plain HTTP gets no answer."""
    certfile, keyfile = self_signed(tmp_path / "pki")
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port}, "state_dir": str(tmp_path / "state"),
        "tls": {"certfile": str(certfile), "keyfile": str(keyfile)},
    }))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "--config", str(cfg), "serve"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    import ssl

    trust = ssl.create_default_context(cafile=str(certfile))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"coordinator exited with {proc.returncode}"
            try:
                response = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trust, timeout=2)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the HTTPS listener did not come up"
                time.sleep(0.1)
        assert response.status_code == 200
        agent_trusts_the_ca_file(f"https://127.0.0.1:{port}", cfg, certfile, tmp_path)
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        with pytest.raises(httpx.ConnectError):  # the certificate is checked (the system CAs do not know it)
            httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        proc.terminate()
        proc.wait(10)


def agent_trusts_the_ca_file(url: str, cfg: Path, certfile: Path, tmp_path: Path) -> None:
    """The agent's `ca_file`: enrollment and its peer API calls over HTTPS with the private CA; without it the
    certificate is refused."""
    import asyncio

    from agent.client import CoordinatorError, PeerApi, enroll
    from agent.config import AgentConfig, AgentConfigError
    from agent.keys import generate_private_key

    admin = cli(cfg, "show-admin-token").stdout.strip()
    trust = AgentConfig(management_url=url, ca_file=str(certfile)).tls_context()
    assert trust is not None
    with httpx.Client(base_url=url, verify=trust, headers={"Authorization": f"Bearer {admin}"}) as api:
        key = api.post("/api/v1/setup-keys", json={"name": "tls", "reusable": True}).json()["key"]
    body = {"setup_key": key, "hostname": "tls-peer", "os": "test", "agent_version": "test"}
    private = generate_private_key()
    with pytest.raises(CoordinatorError, match=r"(?i)certificate"):
        enroll(url, private, body)
    result = enroll(url, private, body, verify=trust)

    async def token() -> str:
        peer_api = PeerApi(url, result["credential"], verify=trust)
        try:
            return await peer_api.signal_token()
        finally:
            await peer_api.close()

    assert asyncio.run(token())
    for bad, message in ((tmp_path / "none.pem", "does not exist"), (cfg, "not a readable PEM CA bundle")):
        with pytest.raises(AgentConfigError, match=message):
            AgentConfig(management_url=url, ca_file=str(bad)).validate()


def test_unusable_tls_files_fail_start_with_a_clear_error(tmp_path: Path) -> None:
    certfile, keyfile = self_signed(tmp_path / "pki")
    other_cert, _ = self_signed(tmp_path / "other")
    cases = {
        "missing": ({"certfile": str(tmp_path / "nope.crt"), "keyfile": str(keyfile)}, "nope.crt: no such file"),
        "mismatch": ({"certfile": str(other_cert), "keyfile": str(keyfile)}, "cannot use certfile"),
        "half": ({"certfile": str(certfile)}, "tls.keyfile"),
    }
    for name, (tls, expected) in cases.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "listen": {"port": free_port()},
                                       "tls": tls}))  # fmt: skip
        res = cli(cfg, "serve")
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        assert expected in res.stderr and "Traceback" not in res.stderr, (name, res.stderr)
    assert not (tmp_path / "state").exists()
