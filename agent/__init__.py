"""Starling agent: per-host daemon and `starling` CLI (enrollment, WireGuard, paths, firewall).

Built in the agent issue; it shares no code with the coordinator (the HTTP API is the contract).
"""

import sys

__version__ = "0.1.0"

# Start-up: httpx imports its command-line client whenever rich, click and pygments happen to be installed
# (~50 ms of imports); the agent never uses it, and without it httpx falls back to a stub `httpx.main`.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
