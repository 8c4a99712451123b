"""Starling agent: per-host daemon and `starling` CLI (enrollment, WireGuard, paths, firewall).

Built in the agent issue; it shares no code with the coordinator (the HTTP API is the contract).
"""

__version__ = "0.1.0"
