"""Plain-torch implementations of moeblaze: the test oracle and the torch backend.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots, p sorted position (routing_plan)

    moe_mlp_reference   a loop over experts (Hugging Face "eager" semantics): the oracle of the
                        tests (run it in float64) and a readable statement of what the kernels
                        compute. It gathers each expert's tokens into a copy: neither fast nor lean.
    fill_plan_torch     the routing plan with torch ops (what moeblaze.kernels.routing_plan fills)
    TorchStages         the stages of the expert MLP with torch ops, expert by expert (what
                        moeblaze.kernels.expert_mlp.TritonStages launches): the torch backend,
                        keeping the same bytes for backward as the kernels
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernelbase import alloc

if TYPE_CHECKING:
    from moeblaze.routing_plan import RoutingPlan


def moe_mlp_reference(
    x: torch.Tensor,  # [T, d]
    topk_ids: torch.Tensor,  # [T, k]
    topk_weights: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2F, d]
    w2: torch.Tensor,  # [E, d, F]
) -> torch.Tensor:  # [T, d]
    """out[t] = sum_j topk_weights[t, j] * w2[e] @ swiglu(w13[e] @ x[t]), e = topk_ids[t, j]."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, choice = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])  # [n_e, d]
        out = out.index_add(0, token, y * topk_weights[token, choice, None].to(y.dtype))
    return out


def fill_plan_torch(topk_ids: torch.Tensor, plan: "RoutingPlan") -> None:
    """The routing plan's fields from `topk_ids [T, k]` (ids already checked), with torch ops."""
    num_slots, num_experts, block_m = plan.num_slots, plan.num_experts, plan.block_m
    device = topk_ids.device
    ids = topk_ids.reshape(-1).long()
    order = torch.sort(ids, stable=True).indices  # [S]
    counts = torch.bincount(ids, minlength=num_experts)  # [E]
    plan.sorted_slots.copy_(order)
    plan.slot_positions[order] = torch.arange(num_slots, dtype=torch.int32, device=device)
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

    def gate_up(self, x, w13, plan: "RoutingPlan", *, store_h: bool, store_a: bool):
        ffn = w13.shape[1] // 2
        h = (
            alloc.empty(plan.num_slots, 2 * ffn, dtype=x.dtype, device=x.device)
            if store_h
            else None
        )
        a = alloc.empty(plan.num_slots, ffn, dtype=x.dtype, device=x.device) if store_a else None
        for e, pos, slots in _expert_rows(plan):
            pre = (x[slots // plan.top_k].float() @ w13[e].float().t()).to(x.dtype)
            if store_h:
                h[pos] = pre
            if store_a:
                a[pos] = _swiglu(pre).to(x.dtype)
        return h, a

    def down_combine(self, a, w2, topk_weights, plan: "RoutingPlan", *, deterministic: bool):
        weights = topk_weights.reshape(-1).float()
        return self._combine(a, lambda e: w2[e].float().t(), weights, plan, w2.shape[1])

    def grad_input(self, dh, w13, plan: "RoutingPlan", *, deterministic: bool):
        return self._combine(dh, lambda e: w13[e].float(), None, plan, w13.shape[2])

    def grad_act(self, dout, w2, h, topk_weights, plan: "RoutingPlan", *, store_a: bool):
        ffn = w2.shape[2]
        weights = topk_weights.reshape(-1).float()
        dh = alloc.empty(plan.num_slots, 2 * ffn, dtype=dout.dtype, device=dout.device)
        a = (
            alloc.empty(plan.num_slots, ffn, dtype=dout.dtype, device=dout.device)
            if store_a
            else None
        )
        dweights = torch.zeros(plan.num_slots, dtype=torch.float32, device=dout.device)
        for e, pos, slots in _expert_rows(plan):
            g = dout[slots // plan.top_k].float() @ w2[e].float()
            gate, up = h[pos].float().chunk(2, dim=1)
            sig = torch.sigmoid(gate)
            silu = gate * sig
            act = (silu * up).to(dout.dtype)
            dweights[slots] = (g * act.float()).sum(dim=1)
            d_act = g * weights[slots, None]
            dh[pos] = torch.cat([d_act * up * sig * (1 + gate * (1 - sig)), d_act * silu], 1).to(
                dh.dtype
            )
            if store_a:
                a[pos] = act
        return dh, dweights.view(topk_weights.shape), a

    def grad_w2(self, dout, a, topk_weights, plan: "RoutingPlan"):
        weights = topk_weights.reshape(-1).float()

        def rows(pos, slots):
            return (dout[slots // plan.top_k].float() * weights[slots, None]).t() @ a[pos].float()

        return self._per_expert(rows, (plan.num_experts, dout.shape[1], a.shape[1]), dout, plan)

    def grad_w13(self, dh, x, plan: "RoutingPlan"):
        def rows(pos, slots):
            return dh[pos].float().t() @ x[slots // plan.top_k].float()

        return self._per_expert(rows, (plan.num_experts, dh.shape[1], x.shape[1]), dh, plan)

    @staticmethod
    def _combine(rows_in, weight_of, weights, plan: "RoutingPlan", n):
        out = torch.zeros(
            plan.num_slots // plan.top_k, n, dtype=torch.float32, device=rows_in.device
        )
        for e, pos, slots in _expert_rows(plan):
            y = rows_in[pos].float() @ weight_of(e)
            if weights is not None:
                y = y * weights[slots, None]
            out.index_add_(0, slots // plan.top_k, y)  # sequential on the CPU: deterministic
        return out.to(rows_in.dtype)

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


def _swiglu(pre: torch.Tensor) -> torch.Tensor:
    gate, up = pre.float().chunk(2, dim=-1)
    return F.silu(gate) * up


TORCH_STAGES = TorchStages()
