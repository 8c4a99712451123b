"""Starling's shared contract: wire formats both the coordinator and the agent speak.

No server dependencies (only `cryptography`): the agent imports it without FastAPI or SQLAlchemy.
`keys` validates WireGuard public keys; `seal` is the proof-of-possession envelope for enrollment,
login and key rotation (docs/security.md).
"""
