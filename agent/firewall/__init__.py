"""The agent's firewall: one nftables table (`inet starling`) that admits on the mesh interface
exactly what the network map's firewall rules allow, fail closed, updated atomically and repaired
when changed from outside. See docs/firewall.md.
"""

from agent.firewall.firewall import DISABLED_MESSAGE, ApplyResult, Firewall
from agent.firewall.model import (
    CompiledRuleset,
    FirewallError,
    FirewallMapError,
    RuleSpec,
    compile_firewall,
    nft_set_name,
)
from agent.firewall.nftjson import Plan, diff, full_build

__all__ = [
    "DISABLED_MESSAGE",
    "ApplyResult",
    "CompiledRuleset",
    "Firewall",
    "FirewallError",
    "FirewallMapError",
    "Plan",
    "RuleSpec",
    "compile_firewall",
    "diff",
    "full_build",
    "nft_set_name",
]
