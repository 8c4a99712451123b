"""The policy engine: an in-memory graph of the mesh that computes each peer's network map incrementally."""

from coordinator.engine.graph import MeshGraph, PeerMapState, PeerNode, PolicyNode, RouteNode, Rule, SettingsNode

__all__ = ["MeshGraph", "PeerMapState", "PeerNode", "PolicyNode", "RouteNode", "Rule", "SettingsNode"]
