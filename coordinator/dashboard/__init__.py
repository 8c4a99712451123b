"""The coordinator's web dashboard: server-rendered pages under /dashboard, behind an API-token login.

`install(app)` adds the pages (one module per page group: pages_login, pages_peers, pages_access,
pages_keys, pages_audit, pages_live; `web` holds the plumbing and the `Auth` dependency), the
live-update stream and the static files to a coordinator app created by
`coordinator.api.app.create_app`; calling it again on the same app does nothing.
See docs/dashboard.md.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

__all__ = ["install"]


def install(
    app: FastAPI,
    *,
    poll_interval: float = 1.0,
    session_ttl: int = 8 * 3600,
    cookie_secure: bool | None = None,
    heartbeat: float = 15.0,
) -> None:
    """Mount the dashboard on `app` (idempotent).

    poll_interval: seconds between the live feed's checks for peer changes (one query per round,
    shared by all open dashboards). session_ttl: lifetime of a login (also capped by the API token's
    own expiry). cookie_secure: force the cookie's Secure flag (default: set it when the request
    came over https; set True behind a TLS-terminating proxy). heartbeat: SSE keep-alive period, also
    how often an open live stream re-checks that its session is still valid.
    """
    from coordinator.dashboard import pages_access, pages_audit, pages_keys, pages_live, pages_login, pages_peers
    from coordinator.dashboard.web import PREFIX, STATE_ATTR, STATIC_DIR, Dashboard, LoginRequired, login_required

    if getattr(app.state, STATE_ATTR, None) is not None:
        return
    dash = Dashboard(
        poll_interval=poll_interval, session_ttl=session_ttl, cookie_secure=cookie_secure, heartbeat=heartbeat
    )
    setattr(app.state, STATE_ATTR, dash)
    app.add_exception_handler(LoginRequired, login_required)  # the `Auth` dependency's "log in first"
    for pages in (pages_login, pages_peers, pages_access, pages_keys, pages_audit, pages_live):
        app.include_router(pages.router)
    app.mount(PREFIX + "/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
