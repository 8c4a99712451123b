"""Dashboard pieces without a browser: install idempotency, session cookies, formatting, redirects."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from coordinator.api.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.dashboard import install
from coordinator.dashboard.data import fmt_bytes, fmt_latency, fmt_time, iso, path_summary
from coordinator.dashboard.session import SessionCodec, derive_key
from coordinator.dashboard.web import safe_next


def test_install_is_idempotent_and_stays_out_of_the_openapi_document(tmp_path: Path) -> None:
    app = create_app(CoordinatorConfig(state_dir=tmp_path))
    before = app.openapi()
    app.openapi_schema = None
    install(app)
    routes = len(app.routes)
    install(app)
    assert len(app.routes) == routes
    assert [getattr(r, "path", "") for r in app.routes].count("/dashboard/static") == 1
    assert app.openapi() == before


def test_session_cookie_is_signed_and_expires() -> None:
    codec = SessionCodec(derive_key("ab" * 32), ttl=60)
    value, sess = codec.issue("token:ops", "read", "tok1", now=1000.0)
    assert codec.decode(value, now=1001.0) == sess
    assert codec.decode(value, now=1060.0) is None  # expired
    payload, sig = value.split(".")
    assert codec.decode(payload + "." + sig[:-2] + "AA", now=1001.0) is None  # bad signature
    assert codec.decode(payload[:-2] + "xx." + sig, now=1001.0) is None  # tampered payload
    other = SessionCodec(derive_key("cd" * 32), ttl=60)  # another admin token: another key
    assert other.decode(value, now=1001.0) is None
    assert codec.decode(None, now=0) is None and codec.decode("garbage", now=0) is None
    capped, sess2 = codec.issue("token:ops", "write", "tok1", now=1000.0, not_after=1010.0)
    assert sess2.expires_at == 1010 and codec.decode(capped, now=1011.0) is None


def test_formatting() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 999, tzinfo=dt.UTC)
    assert fmt_time(when) == "2026-01-02 03:04:05 UTC" and iso(when) == "2026-01-02T03:04:05Z"
    assert fmt_time("2026-01-02T05:04:05+02:00") == "2026-01-02 03:04:05 UTC"
    assert fmt_time("2026-01-02 03:04:05.000001") == "2026-01-02 03:04:05 UTC"  # SQLite storage form
    assert fmt_time(None) == "\u2014" and iso(None) == ""
    assert fmt_bytes(0) == "0 B" and fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(3 << 30) == "3.0 GiB"
    assert fmt_latency(3.25) == "3.2 ms" and fmt_latency(250.4) == "250 ms" and fmt_latency(None) == "\u2014"
    assert path_summary([]) == "none reported"
    assert path_summary([{"path": "relayed"}, {"path": "direct"}, {"path": "direct"}]) == "3 (2 direct, 1 relayed)"


def test_login_redirect_targets_stay_on_the_dashboard() -> None:
    assert safe_next("/dashboard/audit?action=peer.*") == "/dashboard/audit?action=peer.*"
    for bad in (
        None,
        "",
        "https://evil.example/",
        "//evil.example/x",
        "/dashboardx",
        "/api/v1/peers",
        "/dashboard/login",
        "/dashboard/\\evil",
    ):
        assert safe_next(bad) == "/dashboard/peers"
