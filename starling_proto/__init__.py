"""Starling's shared contract: wire formats both the coordinator and the agent speak.

No server dependencies (only `cryptography` and, for `vault`, `httpx`): the agent imports it without
FastAPI or SQLAlchemy. `keys` validates WireGuard public keys; `seal` is the proof-of-possession envelope
for enrollment, login and key rotation (docs/security.md); `netmap`, `firewall` and `signal` are the typed,
versioned map and signal messages; `vault` is the one Vault/OpenBao client both services use.
"""
