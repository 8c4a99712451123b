"""Signal service (`starling-signal`): an authenticated WebSocket broker keyed by peer public key.

It forwards end-to-end encrypted boxes (offers, answers, ICE candidates) between connected peers,
stores nothing and runs as a separate process. Modules: `config` (YAML + env), `auth` (tokens,
signing key), `ratelimit` (token bucket), `broker` (connections and routing), `session` (one
connection's lifetime), `metrics`, `app` (ASGI app), `cli`. The wire frames are
`starling_proto.signal`, documented in docs/signal.md.
"""

from coordinator import __version__

__all__ = ["__version__"]
