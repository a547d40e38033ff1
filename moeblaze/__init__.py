"""moeblaze: Mixture-of-Experts layers with index-based token routing.

Tokens are never copied into an expert-sorted [T*k, d] buffer and expert outputs are never kept
as [T*k, d] for backward: a small int32 routing plan drives grouped GEMMs that gather rows of x
by index and write the weighted top-k combine straight into the [T, d] output.
"""

from kernelbase import __version__
from moeblaze.layer import MoELayer, SwiGLUMLP
from moeblaze.moe_mlp import RECOMPUTE_POLICIES, moe_mlp
from moeblaze.reference import moe_mlp_reference
from moeblaze.router import Router, RouterOutput
from moeblaze.routing_plan import RoutingPlan, build_routing_plan

__all__ = [
    "RECOMPUTE_POLICIES",
    "__version__",
    "MoELayer",
    "Router",
    "RouterOutput",
    "RoutingPlan",
    "SwiGLUMLP",
    "build_routing_plan",
    "moe_mlp",
    "moe_mlp_reference",
]
