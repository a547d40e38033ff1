"""moeblaze: Mixture-of-Experts layers with index-based token routing.

Tokens are never copied into an expert-sorted [T*k, d] buffer and expert outputs are never kept
as [T*k, d] for backward: a small int32 routing plan drives grouped GEMMs that gather rows of x
by index and write the weighted top-k combine straight into the [T, d] output.

    kernels/         Triton kernels, each file with its launcher (routing plan, expert MLP)
    reference.py     the same computations in plain torch: the test oracle and the torch backend
    activation.py    SwiGLU: the experts' gated activation (plain, clamped, quick-GELU);
                     Gated: a GLU with another gate function (GeGLU, ...);
                     Ungated: experts without a gate (ReLU², GELU, ...)
    routing_plan.py  the plan (RoutingPlan) and its builder
    ops.py           moe_mlp: torch.library ops with autograd
    router.py        Router (nn.Module): scores, top-k, aux losses
    layers.py        MoELayer, SwiGLUMLP (nn.Modules); MoEBlock, what the MoE layers share
    expert_parallel.py  ExpertParallelMoELayer: experts sharded over a process group, all-to-all
    integrations/    Hugging Face experts implementation, Megatron-style MoELayer (imported
                     explicitly: moeblaze.integrations.huggingface / .megatron)

Which implementation runs where (compiled Triton, the Triton interpreter, torch) is decided by
`kernelbase.backend_for`; `moeblaze.set_backend` / `use_backend` force one, `moeblaze.info()`
says what runs and why.
"""

from kernelbase import __version__, info, set_backend, use_backend
from kernelbase.deferred import check as check_errors
from moeblaze.activation import Gated, SwiGLU, Ungated
from moeblaze.expert_parallel import ExpertParallelMoELayer, expert_parallel_mlp
from moeblaze.layers import MoELayer, SwiGLUMLP
from moeblaze.ops import RECOMPUTE_POLICIES, moe_mlp
from moeblaze.reference import moe_mlp_reference
from moeblaze.router import Router, RouterOutput
from moeblaze.routing_plan import DROPPED, RoutingPlan, build_routing_plan

__all__ = [
    "DROPPED",
    "RECOMPUTE_POLICIES",
    "__version__",
    "ExpertParallelMoELayer",
    "Gated",
    "MoELayer",
    "Router",
    "RouterOutput",
    "RoutingPlan",
    "SwiGLU",
    "SwiGLUMLP",
    "Ungated",
    "build_routing_plan",
    "check_errors",
    "expert_parallel_mlp",
    "info",
    "moe_mlp",
    "moe_mlp_reference",
    "set_backend",
    "use_backend",
]
