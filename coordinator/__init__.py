"""Starling coordinator: the control plane (peers, groups, policies, network maps) and signal service."""

__version__ = "0.1.0"
