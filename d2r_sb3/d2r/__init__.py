"""D2R: Dynamic Depth Routing (He et al., AAAI 2024).

:mod:`d2r_sb3.d2r.reference` states the algorithm plainly, equation by equation; the rest of the package is the
fast implementation, tested against it.
"""

from d2r_sb3.d2r.d2r import D2RSAC
from d2r_sb3.d2r.network import RoutedNetwork, RoutedNetworkConfig, RouteRequest
from d2r_sb3.d2r.policies import D2RActor, D2RCritic, D2RPolicy
from d2r_sb3.d2r.routing import RoutingGraph, RoutingPath, build_candidates

__all__ = [
    "D2RSAC",
    "D2RActor",
    "D2RCritic",
    "D2RPolicy",
    "RouteRequest",
    "RoutedNetwork",
    "RoutedNetworkConfig",
    "RoutingGraph",
    "RoutingPath",
    "build_candidates",
]
