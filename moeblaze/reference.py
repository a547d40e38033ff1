"""Plain-torch implementations of moeblaze: the test oracle and the torch backend.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots, p sorted position (routing_plan)

    moe_mlp_reference   a loop over experts (Hugging Face "eager" semantics): the oracle of the
                        tests (run it in float64) and a readable statement of what the kernels
                        compute. It gathers each expert's tokens into a copy: neither fast nor lean.
    fill_plan_torch     the routing plan with torch ops (what moeblaze.kernels.routing_plan fills)
    TorchStages         the stages of the expert MLP with torch ops, expert by expert (what
                        moeblaze.kernels.expert_mlp.TritonStages launches): the torch backend,
                        keeping the same bytes for backward as the kernels
    router_topk_reference  the router's scores and top-k selection (what the compiled
                        moeblaze.kernels.compiled.router_topk computes in one launch)
    gather_sum_torch    sums of rows picked by an index, as moeblaze.kernels.gather_sum sums
                        them (the combine of expert parallelism)
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernelbase import alloc
from kernelbase.checks import check_int
from moeblaze.activation import SWIGLU, Activation

if TYPE_CHECKING:
    from moeblaze.routing_plan import RoutingPlan


def moe_mlp_reference(
    x: torch.Tensor,  # [T, d]
    topk_ids: torch.Tensor,  # [T, k]
    topk_weights: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2F, d] ([E, F, d] ungated)
    w2: torch.Tensor,  # [E, d, F]
    activation: Activation = SWIGLU,
    b13: torch.Tensor | None = None,  # [E, 2F] ([E, F] ungated)
    b2: torch.Tensor | None = None,  # [E, d]
) -> torch.Tensor:  # [T, d]
    """out[t] = sum_j topk_weights[t, j] * (w2[e] @ act(w13[e] @ x[t] + b13[e]) + b2[e]),
    e = topk_ids[t, j], with act the `activation` of the pre-activation (a SwiGLU of its gate
    and up halves or another Gated unit of them, or an Ungated function of it; differentiated
    by autograd: an oracle independent of their `grad`); a dropped slot (e = -1) adds
    nothing."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, choice = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        bias13 = None if b13 is None else b13[e]
        act = activation.apply(F.linear(x[token], w13[e], bias13))
        y = F.linear(act, w2[e], None if b2 is None else b2[e])
        out = out.index_add(0, token, y * topk_weights[token, choice, None].to(y.dtype))
    return out


def fill_plan_torch(topk_ids: torch.Tensor, plan: "RoutingPlan") -> None:
    """The routing plan's fields from `topk_ids [T, k]`, with torch ops. Dropped slots (id -1)
    and ids outside [0, E) are placed nowhere, as the kernels do (their slots sort after every
    expert's, their slot_positions are -1); the latter are counted in `invalid_ids`."""
    num_slots, num_experts, block_m = plan.num_slots, plan.num_experts, plan.block_m
    device = topk_ids.device
    ids = topk_ids.reshape(-1)  # [S]
    slots = torch.arange(num_slots, device=device)
    unplaced = (ids < 0) | (ids >= num_experts)  # [S]
    invalid = unplaced & (ids != -1)
    keys = torch.where(unplaced, num_experts, ids.long())  # placed nowhere: past the last expert
    order = torch.sort(keys, stable=True).indices  # [S]
    counts = torch.bincount(keys, minlength=num_experts + 1)[:num_experts]  # [E]
    plan.sorted_slots.copy_(order)
    plan.slot_positions[order] = slots.to(torch.int32)
    plan.slot_positions.masked_fill_(unplaced, -1)
    plan.invalid_ids.zero_()
    if num_slots > 0:  # (count, S - the lowest invalid slot): (0, 0) when every id is valid
        plan.invalid_ids[0] = invalid.sum()
        plan.invalid_ids[1] = (torch.where(invalid, num_slots - slots, 0)).amax()
    plan.expert_counts.copy_(counts)
    plan.expert_offsets[0] = 0
    plan.expert_offsets[1:].copy_(torch.cumsum(counts, 0))
    tiles = (counts + block_m - 1) // block_m  # [E]
    num_tiles = int(tiles.sum())
    owner = torch.repeat_interleave(torch.arange(num_experts, device=device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    within = torch.arange(num_tiles, device=device) - first_tile[owner]
    plan.num_tiles.fill_(num_tiles)
    plan.tile_expert.fill_(num_experts)
    plan.tile_row_start.fill_(num_slots)
    plan.tile_expert[:num_tiles] = owner
    plan.tile_row_start[:num_tiles] = plan.expert_offsets[owner] + within * block_m


class TorchStages:
    """The expert-MLP stages with torch ops, one expert at a time (see moeblaze.ops.Stages).

    Computes in fp32 and rounds where the kernels round, so both paths agree to fp32 accuracy.
    """

    def block_m(self, num_slots: int, num_experts: int) -> int:
        return 64

    def gate_up(
        self,
        x,
        w13,
        topk_weights,
        plan: "RoutingPlan",
        *,
        store_h: bool,
        store_a: bool,
        activation: Activation = SWIGLU,
        bias=None,
    ):
        width = w13.shape[1]
        ffn = activation.ffn(width)
        h = alloc.empty(plan.num_slots, width, dtype=x.dtype, device=x.device) if store_h else None
        a = alloc.empty(plan.num_slots, ffn, dtype=x.dtype, device=x.device) if store_a else None
        weights = topk_weights.reshape(-1).float()
        for e, pos, slots in _expert_rows(plan):
            pre = x[slots // plan.top_k].float() @ w13[e].float().t()
            if bias is not None:
                pre += bias[e].float()
            pre = pre.to(x.dtype)
            if store_h:
                h[pos] = pre
            if store_a:
                act = activation.apply(pre.float())
                a[pos] = (act * weights[slots, None]).to(x.dtype)
        return h, a

    def down_combine(
        self, a, w2, plan: "RoutingPlan", *, deterministic: bool, bias=None, topk_weights=None
    ):
        weights = None if bias is None else topk_weights.reshape(-1).float()

        def rows(e, pos, slots):
            y = a[pos].float() @ w2[e].float().t()
            if bias is not None:  # weighted as the rows of a are
                y = y + weights[slots, None] * bias[e].float()
            return y

        return self._combine(rows, plan, w2.shape[1], a)

    def grad_input(self, dh, w13, plan: "RoutingPlan", *, deterministic: bool):
        def rows(e, pos, slots):
            return dh[pos].float() @ w13[e].float()

        return self._combine(rows, plan, w13.shape[2], dh)

    def grad_act(
        self,
        dout,
        w2,
        h,
        topk_weights,
        plan: "RoutingPlan",
        *,
        store_a: bool,
        overwrite_h=False,
        activation: Activation = SWIGLU,
    ):
        ffn = w2.shape[2]
        weights = topk_weights.reshape(-1).float()
        if overwrite_h:
            dh = h
        else:
            width = activation.pre_width(ffn)
            dh = alloc.empty(plan.num_slots, width, dtype=dout.dtype, device=dout.device)
        a = (
            alloc.empty(plan.num_slots, ffn, dtype=dout.dtype, device=dout.device)
            if store_a
            else None
        )
        dweights = torch.zeros(plan.num_slots, dtype=torch.float32, device=dout.device)
        for e, pos, slots in _expert_rows(plan):
            g = dout[slots // plan.top_k].float() @ w2[e].float()
            pre = h[pos].to(torch.float32, copy=True)  # dh may overwrite h
            act = activation.apply(pre)
            dweights[slots] = (g * act.to(dout.dtype).float()).sum(dim=1)
            dh[pos] = activation.grad(pre, g * weights[slots, None]).to(dh.dtype)
            if store_a:
                a[pos] = (act * weights[slots, None]).to(dout.dtype)
        return dh, dweights.view(topk_weights.shape), a

    def grad_w2(self, dout, a, plan: "RoutingPlan"):
        def rows(pos, slots):
            return dout[slots // plan.top_k].float().t() @ a[pos].float()

        return self._per_expert(rows, (plan.num_experts, dout.shape[1], a.shape[1]), dout, plan)

    def grad_w13(self, dh, x, plan: "RoutingPlan"):
        def rows(pos, slots):
            return dh[pos].float().t() @ x[slots // plan.top_k].float()

        return self._per_expert(rows, (plan.num_experts, dh.shape[1], x.shape[1]), dh, plan)

    def grad_b13(self, dh, plan: "RoutingPlan", dtype):
        out = torch.zeros(plan.num_experts, dh.shape[1], dtype=dtype, device=dh.device)
        for e, pos, _ in _expert_rows(plan):
            out[e] = dh[pos].float().sum(dim=0).to(dtype)
        return out

    def grad_b2(self, dout, topk_weights, b2, plan: "RoutingPlan"):
        db2 = torch.zeros(b2.shape, dtype=b2.dtype, device=dout.device)
        dweights = torch.zeros(plan.num_slots, dtype=torch.float32, device=dout.device)
        weights = topk_weights.reshape(-1).float()
        for e, _, slots in _expert_rows(plan):
            rows = dout[slots // plan.top_k].float()
            db2[e] = (weights[slots, None] * rows).sum(dim=0).to(b2.dtype)
            dweights[slots] = rows @ b2[e].float()
        return db2, dweights.view(topk_weights.shape)

    @staticmethod
    def _combine(rows, plan: "RoutingPlan", n, like):
        """sum over the k slots of each token of rows(e, pos, slots) [n_e, n], in like's dtype."""
        out = torch.zeros(plan.num_slots // plan.top_k, n, dtype=torch.float32, device=like.device)
        for e, pos, slots in _expert_rows(plan):
            # sequential on the CPU: deterministic
            out.index_add_(0, slots // plan.top_k, rows(e, pos, slots))
        return out.to(like.dtype)

    @staticmethod
    def _per_expert(rows, shape, like, plan: "RoutingPlan"):
        out = torch.zeros(shape, dtype=like.dtype, device=like.device)
        for e, pos, slots in _expert_rows(plan):
            out[e] = rows(pos, slots).to(like.dtype)
        return out


def _expert_rows(plan: "RoutingPlan"):
    """(expert, slice of its sorted positions, its slots as int64) for experts with tokens."""
    offsets = plan.expert_offsets.tolist()
    for e in range(plan.num_experts):
        if offsets[e + 1] > offsets[e]:
            pos = slice(offsets[e], offsets[e + 1])
            yield e, pos, plan.sorted_slots[pos].long()


TORCH_STAGES = TorchStages()


# ---------------------------------------------------------------------------------------------
# Router selection

# softmax: one distribution over the experts; sigmoid and sqrtsoftplus (sqrt(softplus(logit)):
# DeepSeek-V4) score each expert on its own.
SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORE_FROM = ("scores", "logits")  # what a router ranks experts and groups by


def gather_sum_torch(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out [T, c] in rows' dtype: out[t] = sum_j rows[index[t, j]], an index of -1 adding
    nothing; float32 sums in the order j = 0..k-1 (`launch_gather_sum`'s bits)."""
    zero_row = rows.new_zeros(1, rows.shape[1])
    padded = torch.cat([rows, zero_row])  # row P: what an index of -1 reads
    index = torch.where(index < 0, rows.shape[0], index).long()
    out = rows.new_zeros(index.shape[0], rows.shape[1], dtype=torch.float32)
    for j in range(index.shape[1]):
        out += padded.index_select(0, index[:, j])
    return out.to(rows.dtype)


def router_topk_reference(
    logits: torch.Tensor,
    top_k: int,
    score_func: str,
    expert_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    norm_topk_prob: bool = True,
    group_score_topk: int | None = None,
    group_score_from: str = "scores",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's selection in plain torch (any device, differentiable in `logits [N, E]`):
    what `Router.forward` runs off CUDA, and the oracle of the compiled `router_topk`.

    Returns (topk_ids [N, k] int64 best first, topk_weights [N, k], scores [N, E]): scores =
    `router_scores` of the logits; experts ranked by scores + `expert_bias` (selection only)
    within the best `topk_groups` of `num_groups` groups (a group scores the sum of its best
    `group_score_topk` values; see `select_experts`); weights the unbiased scores of the chosen
    experts, renormalised if `norm_topk_prob`. Ties go to the lower index (stable sort).
    `group_score_from="logits"` ranks by the logits instead (the same experts within a group,
    other group scores: Megatron's softmax without pre-softmax).
    """
    check_selection_options(
        logits.shape[-1],
        top_k,
        score_func,
        num_groups,
        topk_groups,
        group_score_topk,
        group_score_from,
    )
    scores = router_scores(logits, score_func)  # [N, E]
    ranked = logits if group_score_from == "logits" else scores
    topk_ids = select_experts(
        ranked.detach(), top_k, score_func, expert_bias, num_groups, topk_groups, group_score_topk
    )
    return topk_ids, routing_weights(scores, topk_ids, norm_topk_prob), scores


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """The scores [N, E] of `logits [N, E]`: their softmax, sigmoid or sqrt(softplus(logit))
    (`F.softplus`, whose threshold 20 makes it the identity beyond)."""
    if score_func == "softmax":
        return logits.softmax(-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    return torch.nn.functional.softplus(logits).sqrt()


def routing_weights(scores: torch.Tensor, topk_ids: torch.Tensor, norm_topk_prob: bool):
    """`topk_weights [N, k]`: the `scores [N, E]` of the experts `topk_ids [N, k]` (int64 in
    [0, E), or -1: a dropped slot, weight 0), divided by their sum if `norm_topk_prob`."""
    topk_weights = scores.gather(1, topk_ids.clamp_min(0))  # [N, k]
    topk_weights = topk_weights.masked_fill(topk_ids < 0, 0.0)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
    return topk_weights


def select_experts(
    scores: torch.Tensor,
    top_k: int,
    score_func: str,
    expert_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score_topk: int | None = None,
) -> torch.Tensor:
    """`topk_ids [N, k]` int64 chosen from `scores [N, E]` as `router_topk_reference` does.

    A group scores the sum of its `group_score_topk` best selection values; by default
    (`default_group_score_topk`) the top 2 for sigmoid (DeepSeek-V3) and sqrtsoftplus, the max
    for softmax (DeepSeek-V2 in Hugging Face); Megatron sums the top `top_k // topk_groups`."""
    choice = scores if expert_bias is None else scores + expert_bias.float()  # [N, E]
    if num_groups is not None:
        n, num_experts = choice.shape
        grouped = choice.view(n, num_groups, num_experts // num_groups)  # [N, G, E/G]
        per_group = group_score_topk or default_group_score_topk(score_func, grouped.shape[-1])
        if per_group == 1:
            group_scores = grouped.amax(-1)  # [N, G]
        else:
            group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)
        best = _stable_topk(group_scores, topk_groups)  # [N, topk_groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, num_experts)
    return _stable_topk(choice, top_k)


def quantile_balancing_choice(
    logits: torch.Tensor, top_k: int, beta: torch.Tensor, quantile: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantile balancing (megatron-core's "quantile_balancing", a dual coordinate-descent
    step): `topk_ids [M, k]`, the experts of the k largest `logits [M, E] - beta [E]` of each
    token (float32; torch.topk, as megatron-core's: ties in any order); with `quantile`, also
    each expert's column quantile [E]: the (M·k/E + 1)-th largest of `logits - alpha` over the
    tokens, alpha a token's (k + 1)-th largest biased logit, the bias that would give every
    expert M·k/E tokens (needs M·k divisible by E and k < E). No gradient."""
    with torch.no_grad():
        values, order = (logits - beta).topk(top_k + 1, dim=-1)  # best first
        topk_ids = order[:, :top_k]
        if not quantile:
            return topk_ids, None
        num_tokens, num_experts = logits.shape
        target = num_tokens * top_k // num_experts
        alpha = values[:, top_k : top_k + 1]  # [M, 1]
        column = (logits - alpha).topk(target + 1, dim=0).values[-1]  # [E]
        return topk_ids, column


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, best first, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def default_group_score_topk(score_func: str, group_size: int) -> int:
    """How many of a group's best values make its score unless told: 2 for the scores of one
    expert each, sigmoid (DeepSeek-V3) and sqrtsoftplus (1 in groups of one), 1 (the max) for
    softmax. The compiled router top-k computes these only."""
    return 1 if score_func == "softmax" else min(2, group_size)


def check_selection_options(
    num_experts,
    top_k,
    score_func,
    num_groups,
    topk_groups,
    group_score_topk=None,
    group_score_from="scores",
) -> None:
    """The options of an expert selection that fit `num_experts` experts (ValueError if not)."""
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func={score_func!r} must be one of {SCORE_FUNCS}")
    if group_score_from not in GROUP_SCORE_FROM:
        raise ValueError(f"group_score_from={group_score_from!r} must be one of {GROUP_SCORE_FROM}")
    check_int("top_k", top_k)
    for name, value in (
        ("num_groups", num_groups),
        ("topk_groups", topk_groups),
        ("group_score_topk", group_score_topk),
    ):
        if value is not None:
            check_int(name, value)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
    if (num_groups is None) != (topk_groups is None):
        raise ValueError(
            f"num_groups={num_groups} and topk_groups={topk_groups} must be set together"
        )
    if num_groups is None and group_score_topk is not None:
        raise ValueError(f"group_score_topk={group_score_topk} needs num_groups and topk_groups")
    if num_groups is not None:
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts}")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups={topk_groups} must be in [1, num_groups={num_groups}]")
        size = num_experts // num_groups
        if group_score_topk is not None and not 1 <= group_score_topk <= size:
            raise ValueError(
                f"group_score_topk={group_score_topk} must be in [1, num_experts / num_groups = "
                f"{size}]"
            )
        capacity = topk_groups * size
        if top_k > capacity:
            raise ValueError(
                f"top_k={top_k} must be <= topk_groups * num_experts / num_groups = {capacity}"
            )
