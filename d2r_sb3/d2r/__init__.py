"""D2R: Dynamic Depth Routing (He et al., AAAI 2024)."""

from d2r_sb3.d2r.d2r import D2RSAC
from d2r_sb3.d2r.network import RoutedNetwork, RouteRequest
from d2r_sb3.d2r.policies import D2RActor, D2RCritic, D2RPolicy
from d2r_sb3.d2r.routing import RoutingGraph, RoutingPath, build_candidates

__all__ = [
    "D2RSAC",
    "D2RActor",
    "D2RCritic",
    "D2RPolicy",
    "RouteRequest",
    "RoutedNetwork",
    "RoutingGraph",
    "RoutingPath",
    "build_candidates",
]
