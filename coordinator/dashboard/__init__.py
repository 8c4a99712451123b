"""The coordinator's web dashboard: server-rendered pages under /dashboard, behind an API-token login.

`install(app)` adds the pages, the live-update stream and the static files to a coordinator app
created by `coordinator.api.app.create_app`; calling it again on the same app does nothing.
See docs/dashboard.md.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

__all__ = ["install"]

STATE_ATTR = "starling_dashboard"


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
    if getattr(app.state, STATE_ATTR, None) is not None:
        return
    from coordinator.dashboard.routes import PREFIX, STATIC_DIR, Dashboard, build_router

    dash = Dashboard(
        poll_interval=poll_interval, session_ttl=session_ttl, cookie_secure=cookie_secure, heartbeat=heartbeat
    )
    setattr(app.state, STATE_ATTR, dash)
    app.include_router(build_router(dash))
    app.mount(PREFIX + "/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
