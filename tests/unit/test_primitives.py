"""Small building blocks: TURN credentials, IP allocation, token secrets, config loading, name sanitizing."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from coordinator.config import ConfigError, load_config
from coordinator.ipam import IpAllocator, PrefixError, parse_mesh_prefix
from coordinator.schemas import parse_port, sanitize_peer_name
from coordinator.security import SETUP_KEY_PREFIX, hash_secret, new_secret
from coordinator.turn import credential_window, relay_credentials, turn_password


def test_turn_password_is_coturn_rest_hmac() -> None:
    expected = base64.b64encode(hmac.new(b"s3cret", b"1700000000:web1", hashlib.sha1).digest()).decode()
    assert turn_password("s3cret", "1700000000:web1") == expected


def test_turn_credentials_are_stable_within_a_window_and_keep_half_the_ttl() -> None:
    servers = ["turn:198.19.0.10:3478"]
    a = relay_credentials("s", "web1", servers, 600, now=999_900)  # a window starts here (multiple of 300)
    b = relay_credentials("s", "web1", servers, 600, now=1_000_199)
    c = relay_credentials("s", "web1", servers, 600, now=1_000_200)
    assert a == b and a != c
    for now in range(1_000_000, 1_001_000, 37):
        expiry, renew_at = credential_window(600, now)
        assert expiry - now >= 300 and now < renew_at <= now + 300
    assert relay_credentials("s", "web1", [], 600) == ()
    assert a[0].urls == tuple(servers) and a[0].username.endswith(":web1") and a[0].expires_at - 999_900 >= 300


def test_ip_allocation_never_hands_out_a_used_address() -> None:
    alloc = IpAllocator(parse_mesh_prefix("100.64.0.0/29"))
    used: set[str] = set()
    for _ in range(6):
        used.add(alloc.allocate(used))
    assert used == {f"100.64.0.{i}" for i in range(1, 7)}
    with pytest.raises(PrefixError, match="full"):
        alloc.allocate(used)
    used.discard("100.64.0.3")
    assert alloc.allocate(used) == "100.64.0.3"


@pytest.mark.parametrize("prefix", ["198.19.0.0/16", "100.128.0.0/16", "100.64.0.1/16", "nonsense", "100.64.0.0/31"])
def test_bad_mesh_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(PrefixError):
        parse_mesh_prefix(prefix)


def test_secrets_are_random_prefixed_and_hashed() -> None:
    a, b = new_secret(SETUP_KEY_PREFIX), new_secret(SETUP_KEY_PREFIX)
    assert a.clear != b.clear and a.clear.startswith("ssk_") and len(a.clear) > 40
    assert a.hash == hash_secret(a.clear) and a.clear not in a.hash
    assert a.display_prefix == a.clear[:8]


def test_ports_and_names() -> None:
    assert parse_port(22) == (22, 22) and parse_port("8000-8100") == (8000, 8100)
    for bad in (0, 65536, "10-5", "0-10"):
        with pytest.raises(ValueError):
            parse_port(bad)
    assert sanitize_peer_name("Web_01.Example.COM") == "web-01"
    assert sanitize_peer_name("---") == "peer"
    assert len(sanitize_peer_name("x" * 200)) == 63


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: {port: 99999}\n")
    with pytest.raises(ConfigError, match=r"listen\.port"):
        load_config(cfg, env={})
    cfg.write_text("mesh: {prefix: 198.18.0.0/24}\n")  # an underlay range, rejected: outside 100.64/10
    with pytest.raises(ConfigError, match=r"mesh\.prefix"):
        load_config(cfg, env={})
    cfg.write_text("unknown_key: 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        load_config(cfg, env={})
    cfg.write_text("listen: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})
    cfg.write_text("listen: {port: 9000}\n")
    loaded = load_config(cfg, env={"STARLING_LISTEN_PORT": "9100", "STARLING_DATABASE_URL": "sqlite:////x/y.db"})
    assert loaded.listen.port == 9100 and loaded.database_url() == "sqlite:////x/y.db"
