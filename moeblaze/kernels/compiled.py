"""Launchers of the compiled moeblaze kernels (`moeblaze._C`, csrc/moeblaze/), their autograd
op (the plain-torch router reference is moeblaze.reference.router_topk_reference).

# T tokens (N router rows), k top-k, E experts, S = T*k slots

    fill_routing_plan(topk_ids, plan)            every field of a RoutingPlan, one launch, no sync
    router_topk(logits, top_k, score_func, ...)  -> (topk_ids, topk_weights, scores), no grad
    RouterTopK.apply(...)                        the same, differentiable in logits

The launchers check every tensor (device, dtype, contiguity, shape; errors name the argument)
and pass `data_ptr()` and the current stream to the module; nothing here synchronises with the
host. When `moeblaze._C` is not available they raise RuntimeError with the reason
(`kernelbase.compiled.status()`); callers choose the Triton / torch path before that.

Router ties: experts with equal selection values (score + bias) are ranked by expert index, the
lower first; groups with equal group scores likewise by group index (the order of a stable
descending sort). `Router.forward` uses `torch.topk`, which leaves the order of ties unspecified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernelbase import alloc
from kernelbase.compiled import check_cuda_tensor, require, stream_handle
from moeblaze.reference import SCORE_FUNCS, check_selection_options

if TYPE_CHECKING:
    from moeblaze.routing_plan import RoutingPlan

_ID_DTYPES = (torch.int32, torch.int64)


def fill_routing_plan(topk_ids: torch.Tensor, plan: RoutingPlan) -> None:
    """Fill every field of `plan` from `topk_ids [T, k]` in one launch on the current stream.

    `plan` is a RoutingPlan for S = T*k slots and E <= 1024 experts (any block_m), its fields
    views into `plan.buffer` (RoutingPlan.from_buffer); afterwards they hold exactly what the
    Triton / torch plan holds, tiles past `num_tiles` included (expert E, row start S).

    `plan.invalid_ids` receives (number of ids outside [0, E) other than -1, S - the lowest slot
    holding one; (0, 0) when all ids are valid); invalid ids and dropped slots (-1) are never
    used as an index and are placed nowhere (RoutingPlan). Nothing here synchronises with the
    host.
    """
    check_cuda_tensor("topk_ids", topk_ids, _ID_DTYPES, dim=2)
    device = topk_ids.device
    check_cuda_tensor("plan.buffer", plan.buffer, (torch.int32,), dim=1, device=device)
    num_tokens, top_k = topk_ids.shape
    num_slots, num_experts = num_tokens * top_k, plan.num_experts
    if plan.num_slots != num_slots or plan.top_k != top_k:
        raise ValueError(
            f"plan is for {plan.num_slots} slots with k={plan.top_k}, but topk_ids has shape "
            f"{tuple(topk_ids.shape)} ({num_slots} slots)"
        )
    module = require("moeblaze")
    if num_experts > module.MAX_PLAN_EXPERTS:
        raise ValueError(
            f"plan.num_experts={num_experts} > {module.MAX_PLAN_EXPERTS}: the compiled plan "
            "supports at most that many experts (use the Triton plan)"
        )
    workspace = torch.empty(
        module.plan_workspace_numel(num_slots, num_experts), dtype=torch.int32, device=device
    )
    module.fill_routing_plan(
        topk_ids.data_ptr(),
        topk_ids.dtype == torch.int64,
        plan.expert_counts.data_ptr(),
        plan.expert_offsets.data_ptr(),
        plan.sorted_slots.data_ptr(),
        plan.slot_positions.data_ptr(),
        plan.tile_expert.data_ptr(),
        plan.tile_row_start.data_ptr(),
        plan.num_tiles.data_ptr(),
        plan.invalid_ids.data_ptr(),
        workspace.data_ptr(),
        workspace.numel(),
        num_slots,
        num_experts,
        plan.block_m,
        plan.max_tiles,
        stream_handle(device),
        device.index,
    )


def router_topk(
    logits: torch.Tensor,
    top_k: int,
    score_func: str,
    expert_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores and top-k routing of `logits [N, E]` float32 (E <= 512, k <= 16), one launch.

    Returns `topk_ids [N, k]` int64 (best first), `topk_weights [N, k]` float32 and
    `scores [N, E]` float32, with the semantics of `moeblaze.reference.router_topk_reference`:
    scores = softmax, sigmoid or sqrt(softplus) of the logits; experts ranked by scores +
    `expert_bias [E]` (selection only); with `num_groups`, only the experts of the best
    `topk_groups` groups (group score: sum of its top-2 selection values for sigmoid and
    sqrtsoftplus, max for softmax); weights = the unbiased scores of the chosen experts,
    divided by (their sum + 1e-20) if `norm_topk_prob`. Ties go to the lower expert (group)
    index. Non-finite logits are not checked (that would synchronise); the outputs are then
    unspecified, the ids still in [0, E). No autograd: `RouterTopK` is the differentiable op.
    """
    check_cuda_tensor("logits", logits, (torch.float32,), dim=2)
    device = logits.device
    num_rows, num_experts = logits.shape
    check_selection_options(num_experts, top_k, score_func, num_groups, topk_groups)
    if expert_bias is not None:
        check_cuda_tensor("expert_bias", expert_bias, (torch.float32,), dim=1, device=device)
        if expert_bias.shape[0] != num_experts:
            raise ValueError(
                f"expert_bias must have shape ({num_experts},), got {tuple(expert_bias.shape)}"
            )
    module = require("moeblaze")
    if num_experts > module.MAX_ROUTER_EXPERTS or top_k > module.MAX_ROUTER_TOPK:
        raise ValueError(
            f"the compiled router supports num_experts <= {module.MAX_ROUTER_EXPERTS} and "
            f"top_k <= {module.MAX_ROUTER_TOPK}, got num_experts={num_experts}, top_k={top_k}"
        )
    topk_ids = alloc.empty(num_rows, top_k, dtype=torch.int64, device=device)
    topk_weights = alloc.empty(num_rows, top_k, dtype=torch.float32, device=device)
    scores = alloc.empty(num_rows, num_experts, dtype=torch.float32, device=device)
    module.router_topk(
        logits.data_ptr(),
        0 if expert_bias is None else expert_bias.data_ptr(),
        topk_ids.data_ptr(),
        topk_weights.data_ptr(),
        scores.data_ptr(),
        num_rows,
        num_experts,
        top_k,
        SCORE_FUNCS.index(score_func),  # the module's numbering
        num_groups or 0,
        topk_groups or 0,
        bool(norm_topk_prob),
        stream_handle(device),
        device.index,
    )
    return topk_ids, topk_weights, scores


class RouterTopK(torch.autograd.Function):
    """`router_topk` as an autograd op, differentiable in `logits` (through `topk_weights` and
    `scores`); the backward is plain torch on the saved scores and ids.

    `RouterTopK.apply(logits, top_k, score_func, expert_bias, num_groups, topk_groups,
    norm_topk_prob) -> (topk_ids, topk_weights, scores)`
    """

    @staticmethod
    def forward(
        ctx, logits, top_k, score_func, expert_bias, num_groups, topk_groups, norm_topk_prob
    ):
        topk_ids, topk_weights, scores = router_topk(
            logits, top_k, score_func, expert_bias, num_groups, topk_groups, norm_topk_prob
        )
        # sqrt(softplus)'s slope needs the logits (sigmoid's and softmax's, the scores alone).
        ctx.save_for_backward(scores, topk_ids, logits if score_func == "sqrtsoftplus" else None)
        ctx.score_func, ctx.norm_topk_prob = score_func, norm_topk_prob
        ctx.mark_non_differentiable(topk_ids)
        return topk_ids, topk_weights, scores

    @staticmethod
    def backward(ctx, _grad_ids, grad_weights, grad_scores):
        scores, topk_ids, logits = ctx.saved_tensors
        chosen = scores.gather(1, topk_ids)  # [N, k]
        if ctx.norm_topk_prob:
            # w = g / (sum(g) + eps): dg_j = (dw_j - sum_i dw_i w_i) / (sum(g) + eps)
            denom = chosen.sum(-1, keepdim=True) + 1e-20
            weights = chosen / denom
            grad_chosen = (grad_weights - (grad_weights * weights).sum(-1, keepdim=True)) / denom
        else:
            grad_chosen = grad_weights
        grad_scores = grad_scores.scatter_add(1, topk_ids, grad_chosen)  # [N, E]
        if ctx.score_func == "softmax":
            grad_logits = scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
        elif ctx.score_func == "sigmoid":
            grad_logits = grad_scores * scores * (1 - scores)
        else:  # sqrt(softplus(x)): softplus' / (2 sqrt(softplus)), softplus' as torch's
            slope = torch.where(logits > 20, 1.0, torch.sigmoid(logits))
            grad_logits = grad_scores * slope / (2 * scores)
        return grad_logits, None, None, None, None, None, None
