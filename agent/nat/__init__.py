"""NAT traversal: the WireGuard port's public mapping (STUN), ICE fallback, and the TURN relay proxy."""
