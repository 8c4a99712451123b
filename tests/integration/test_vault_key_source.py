"""The agent's Vault key source against a real OpenBao: AppRole login, least privilege, token
renewal, the cache that carries a restart through a Vault outage, and clear errors. The server
has real on-disk storage (init/unseal), so sealing it is the real thing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.keys import KeyError_, public_key_of
from agent.vault_keys import VaultKeySource
from tests.fixtures.openbao import OpenBao, file_server
from tests.fixtures.vault_mesh import MOUNT, VaultPeers, key_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenBao, VaultPeers]]:
    workdir = tmp_path_factory.mktemp("vks")
    with file_server(workdir / "bao") as bao:  # real storage: init, unseal, seal
        yield bao, VaultPeers(bao, workdir)


def source(spec: dict[str, object], state: Path, **over: object) -> VaultKeySource:
    return VaultKeySource({**spec, **over}, state)


def test_reads_the_latest_version_with_approle(vault: tuple[OpenBao, VaultPeers], tmp_path: Path) -> None:
    _, peers = vault
    spec = peers.add("h1")["key_source"]
    src = source(spec, tmp_path)
    version, data = peers.current("h1")
    assert src.load() == data["private_key"] and src.version == version
    new_version, public = peers.write_key("h1")
    assert public_key_of(src.reload()) == public and src.version == new_version
    cache = tmp_path / "private.key.cache"
    assert cache.stat().st_mode & 0o077 == 0


def test_a_host_cannot_read_another_hosts_key(vault: tuple[OpenBao, VaultPeers], tmp_path: Path) -> None:
    _, peers = vault
    peers.add("h2")
    spec = peers.add("h3")["key_source"]
    with pytest.raises(KeyError_, match="denied reading starling/mesh/peers/h2/wireguard"):
        source(spec, tmp_path, path="mesh/peers/h2/wireguard").reload()


def test_wrong_approle_credentials_are_a_clear_error(vault: tuple[OpenBao, VaultPeers], tmp_path: Path) -> None:
    _, peers = vault
    spec = peers.add("h4")["key_source"]
    bad = tmp_path / "bad-secret-id"
    bad.write_text("00000000-0000-0000-0000-000000000000\n")
    with pytest.raises(KeyError_, match="refused the AppRole login"):
        source(spec, tmp_path, secret_id_file=str(bad)).load()
    assert not (tmp_path / "private.key.cache").exists()


def test_agent_refuses_to_start_with_wrong_credentials(vault: tuple[OpenBao, VaultPeers], tmp_path: Path) -> None:
    _, peers = vault
    spec = peers.add("h5")["key_source"]
    bad = tmp_path / "bad-secret-id"
    bad.write_text("nope\n")
    config = tmp_path / "agent.yaml"
    state = tmp_path / "state"
    config.write_text(yaml.safe_dump({"state_dir": str(state), "key_source": {**spec, "secret_id_file": str(bad)}}))
    up = ["up", "--foreground", "--management-url", "http://127.0.0.1:9", "--setup-key", "never-used-key"]
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), *up],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert "refused the AppRole login" in result.stderr and "Traceback" not in result.stderr
    assert not (state / "state.json").exists()


def test_sealed_or_unreachable_vault_falls_back_to_the_cache_at_start_only(
    vault: tuple[OpenBao, VaultPeers], tmp_path: Path
) -> None:
    bao, peers = vault
    spec = peers.add("h6")["key_source"]
    key = source(spec, tmp_path).load()  # fills the cache
    bao.seal()
    try:
        restarted = source(spec, tmp_path)
        assert restarted.load() == key  # an agent restart while Vault is sealed keeps the mesh up
        with pytest.raises(KeyError_, match="sealed"):
            restarted.reload()  # but a rotation must see Vault itself
        with pytest.raises(KeyError_, match=r"sealed.*no cached key"):
            source(spec, tmp_path / "fresh").load()
    finally:
        bao.unseal()
    unreachable = source(spec, tmp_path, url="http://127.0.0.1:9")
    assert unreachable.load() == key
    with pytest.raises(KeyError_, match="unreachable"):
        unreachable.reload()


def test_token_is_renewed_at_half_its_lease(vault: tuple[OpenBao, VaultPeers], tmp_path: Path) -> None:
    bao, peers = vault
    spec = peers.add("h7")["key_source"]
    peers.client.auth.approle.create_or_update_approle(
        "peer-h7", token_policies=["peer-h7"], token_ttl="60s", token_max_ttl="1h"
    )
    src = source(spec, tmp_path)
    src.load()
    token = src.client.token
    assert token is not None and src.client.renewable
    first_expiry = src.client.token_expires
    src.client.renew_at = 0.0  # pretend half the lease has passed
    src.maintain()
    assert src.client.token == token and src.client.token_expires > first_expiry
    ttl = bao.client(token).auth.token.lookup_self()["data"]["ttl"]
    assert 50 <= ttl <= 60
    src.reload()  # the renewed token still reads


def test_earlier_versions_prove_an_older_key(vault: tuple[OpenBao, VaultPeers], tmp_path: Path) -> None:
    _, peers = vault
    spec = peers.add("h8")["key_source"]
    _, first = peers.current("h8")
    peers.write_key("h8")
    version, _ = peers.write_key("h8")
    src = source(spec, tmp_path)
    src.load()
    assert src.version == version
    assert src.find(public_key_of(first["private_key"])) == first["private_key"]  # version 1, read by number
    assert src.find(public_key_of(src.load())) is None  # only earlier versions are searched


def test_token_file(vault: tuple[OpenBao, VaultPeers], tmp_path: Path) -> None:
    bao, peers = vault
    peers.add("h9")
    token_file = tmp_path / "token"
    token_file.write_text(bao.root_token + "\n")
    spec = {"type": "vault", "url": bao.url, "mount": MOUNT, "path": key_path("h9"), "token_file": str(token_file)}
    _, data = peers.current("h9")
    assert VaultKeySource(spec, tmp_path / "a").load() == data["private_key"]
    bad = "s.revoked-or-never-issued"
    token_file.write_text(bad + "\n")
    with pytest.raises(KeyError_, match=r"rejected the token in .*token \(invalid, expired or revoked\)") as exc:
        VaultKeySource(spec, tmp_path / "a").load()  # refused, not unavailable: the cached key is not used
    assert bad not in str(exc.value)
    token_file.write_text("")
    with pytest.raises(KeyError_, match=r"key_source.token_file .*token is empty"):
        VaultKeySource(spec, tmp_path / "c").reload()


def test_bad_key_source_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyError_, match="url"):
        VaultKeySource({"type": "vault", "path": "mesh/peers/x/wireguard"}, tmp_path)
    with pytest.raises(KeyError_, match="AppRole credentials"):
        VaultKeySource({"type": "vault", "url": "http://127.0.0.1:1", "path": "p"}, tmp_path)
    with pytest.raises(KeyError_, match="unknown option"):
        VaultKeySource({"type": "vault", "url": "http://127.0.0.1:1", "path": "p", "tokn_file": "x"}, tmp_path)
