"""The stages of the expert MLP: Triton launchers, and torch code computing the same stages.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots, p sorted position (routing_plan)

`TritonStages` validates nothing (the op did) and launches the kernels of
`moeblaze.kernels.expert_mlp` on CUDA, or on the CPU under the Triton interpreter.
`TorchStages` computes the same stages expert by expert with torch ops, for CPUs without the
interpreter. Both take and return the same tensors, so the autograd op built on them keeps the
same bytes for backward whichever runs. `stages_for(device)` picks one.

Stage              reads                         returns
gate_up            x, w13                        h [S, 2F] and/or a [S, F]   (sorted order)
down_combine       a, w2, topk_weights           out [T, d]
grad_act           dout, w2, h, topk_weights     dh [S, 2F], dweights [T, k] fp32, a [S, F]
grad_input         dh, w13                       dx [T, d]
grad_w2 / grad_w13 dout, a, topk_weights / dh, x dw2 [E, d, F] / dw13 [E, 2F, d]
"""

import dataclasses

import torch
import torch.nn.functional as F
import triton

from moeblaze import _alloc
from moeblaze._device import interpreting, triton_runs_on
from moeblaze.kernels.expert_mlp import (
    expert_wgrad_kernel,
    gate_up_kernel,
    grad_act_kernel,
    scatter_rows_kernel,
)
from moeblaze.kernels.tiles import dot_options
from moeblaze.routing_plan import RoutingPlan


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# GPU tile configurations, by kernel and the plan's block_m (the kernels' BLOCK_M). Not yet
# timed on a GPU. Every one compiles for sm_90 without register spills; the register counts are
# from Triton 3.9's sm_90 build (tests/gpu_compile.py checks them). The rejected neighbours
# spill: gate_up and scatter_rows at BLOCK_M=128 with 4 warps (255 registers), grad_act with
# BLOCK_N=128 (1.5-4.9 KB of stack), or BLOCK_N=64 at BLOCK_M=128.
GPU_CONFIGS = {
    ("gate_up", 64): GemmConfig(64, 64, 64, num_warps=4, num_stages=4),  # 208 registers
    ("gate_up", 128): GemmConfig(128, 64, 64, num_warps=8, num_stages=4),  # 164
    ("grad_act", 64): GemmConfig(64, 64, 64, num_warps=8, num_stages=4),  # 137
    ("grad_act", 128): GemmConfig(128, 32, 64, num_warps=8, num_stages=4),  # 140
    ("scatter_rows", 64): GemmConfig(64, 128, 64, num_warps=4, num_stages=4),  # 186
    ("scatter_rows", 128): GemmConfig(128, 128, 64, num_warps=8, num_stages=4),  # 183
    # BLOCK_M x BLOCK_N of the [M, N] weight gradient, BLOCK_K sorted positions per step.
    ("expert_wgrad", None): GemmConfig(128, 128, 32, num_warps=8, num_stages=4),  # 102-128
}
# The interpreter runs programs one after another: small blocks keep odd test shapes covering
# several tiles per dimension without making each program slow.
_INTERPRETER = GemmConfig(block_m=16, block_n=32, block_k=32, group_m=4)


class TritonStages:
    """Expert-MLP stages as Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""

    def block_m(self, num_slots: int, num_experts: int) -> int:
        """Rows per grouped-GEMM tile, the routing plan's `block_m`."""
        if interpreting():
            return _INTERPRETER.block_m
        # Many rows per expert amortise a taller tile; few rows waste less padding in a short one.
        return 128 if num_slots >= 512 * num_experts else 64

    def gate_up(self, x, w13, plan: RoutingPlan, *, store_h: bool, store_a: bool):
        num_slots, d = plan.num_slots, x.shape[1]
        ffn = w13.shape[1] // 2
        h = _alloc.empty(num_slots, 2 * ffn, dtype=x.dtype, device=x.device) if store_h else None
        a = _alloc.empty(num_slots, ffn, dtype=x.dtype, device=x.device) if store_a else None
        if num_slots == 0:
            return h, a
        cfg = self._config("gate_up", plan)
        h_arg = h if store_h else a  # an output not written still needs a valid pointer
        a_arg = a if store_a else h
        grid = (plan.max_tiles * triton.cdiv(ffn, cfg.block_n),)
        gate_up_kernel[grid](
            x, w13, h_arg, a_arg, *self._plan_args(plan), plan.max_tiles, d, ffn,
            x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h_arg.stride(0),
            a_arg.stride(0),
            TOP_K=plan.top_k, STORE_H=store_h, STORE_A=store_a, **self._meta(cfg, x.dtype),
        )  # fmt: skip
        return h, a

    def down_combine(self, a, w2, topk_weights, plan: RoutingPlan, *, deterministic: bool):
        return self._scatter_rows(a, w2, (w2.stride(2), w2.stride(1)), topk_weights, plan,
                                  w2.shape[1], deterministic)  # fmt: skip

    def grad_input(self, dh, w13, plan: RoutingPlan, *, deterministic: bool):
        return self._scatter_rows(dh, w13, (w13.stride(1), w13.stride(2)), None, plan,
                                  w13.shape[2], deterministic)  # fmt: skip

    def grad_act(self, dout, w2, h, topk_weights, plan: RoutingPlan, *, store_a: bool):
        num_slots, d, ffn = plan.num_slots, dout.shape[1], w2.shape[2]
        dh = _alloc.empty(num_slots, 2 * ffn, dtype=dout.dtype, device=dout.device)
        a = _alloc.empty(num_slots if store_a else 0, ffn, dtype=dout.dtype, device=dout.device)
        if num_slots == 0:
            dweights = torch.zeros(topk_weights.shape, dtype=torch.float32, device=dout.device)
            return dh, dweights, a if store_a else None
        cfg = self._config("grad_act", plan)
        num_pid_n = triton.cdiv(ffn, cfg.block_n)
        dw_partial = _alloc.empty(num_slots, num_pid_n, dtype=torch.float32, device=dout.device)
        grad_act_kernel[(plan.max_tiles * num_pid_n,)](
            dout, w2, h, topk_weights, dh, a, dw_partial, *self._plan_args(plan),
            plan.max_tiles, d, ffn,
            dout.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), h.stride(0), dh.stride(0),
            a.stride(0),
            TOP_K=plan.top_k, STORE_A=store_a, **self._meta(cfg, dout.dtype),
        )  # fmt: skip
        dweights = dw_partial.sum(dim=1).view(topk_weights.shape)  # fixed order: deterministic
        return dh, dweights, a if store_a else None

    def grad_w2(self, dout, a, topk_weights, plan: RoutingPlan):
        return self._expert_wgrad(dout, a, topk_weights, plan, gather_left=True)

    def grad_w13(self, dh, x, plan: RoutingPlan):
        return self._expert_wgrad(dh, x, None, plan, gather_left=False)

    def _scatter_rows(self, rows_in, w, w_strides, topk_weights, plan, n, deterministic):
        """Combine rows_in[p] @ W[e] (times the routing weight) into a [T, n] output."""
        num_slots, top_k = plan.num_slots, plan.top_k
        num_tokens = num_slots // top_k
        # One slot per token needs no reduction: store straight into the output.
        per_slot = deterministic or top_k == 1
        if per_slot:
            rows = num_slots if top_k > 1 else num_tokens
            dtype = torch.float32 if top_k > 1 else rows_in.dtype
            out = _alloc.empty(rows, n, dtype=dtype, device=rows_in.device)
        else:
            out = torch.zeros(num_tokens, n, dtype=torch.float32, device=rows_in.device)
        if num_slots > 0:
            cfg = self._config("scatter_rows", plan)
            scatter_rows_kernel[(plan.max_tiles * triton.cdiv(n, cfg.block_n),)](
                rows_in, w, topk_weights if topk_weights is not None else rows_in, out,
                *self._plan_args(plan), plan.max_tiles, n, rows_in.shape[1],
                rows_in.stride(0), w.stride(0), *w_strides, out.stride(0),
                TOP_K=top_k, HAS_WEIGHTS=topk_weights is not None, PER_SLOT=per_slot,
                **self._meta(cfg, rows_in.dtype),
            )  # fmt: skip
        if per_slot and top_k > 1:
            out = out.view(num_tokens, top_k, n).sum(dim=1)  # the k slots in a fixed order
        return out.to(rows_in.dtype)

    def _expert_wgrad(self, left, right, topk_weights, plan, *, gather_left):
        """out[e] = sum over expert e's positions of left[row]^T right[row], [E, M, N]."""
        m, n = left.shape[1], right.shape[1]
        out = _alloc.empty(plan.num_experts, m, n, dtype=left.dtype, device=left.device)
        cfg = _INTERPRETER if interpreting() else GPU_CONFIGS["expert_wgrad", None]
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), plan.num_experts)
        expert_wgrad_kernel[grid](
            left, right, topk_weights if topk_weights is not None else left, out,
            plan.sorted_slots, plan.expert_offsets, m, n,
            left.stride(0), right.stride(0), out.stride(0), out.stride(1), out.stride(2),
            TOP_K=plan.top_k, GATHER_LEFT=gather_left, GATHER_RIGHT=not gather_left,
            HAS_WEIGHTS=topk_weights is not None, **self._meta(cfg, left.dtype),
        )  # fmt: skip
        return out

    @staticmethod
    def _config(kernel: str, plan: RoutingPlan) -> GemmConfig:
        if interpreting():
            return dataclasses.replace(_INTERPRETER, block_m=plan.block_m)
        return GPU_CONFIGS[kernel, plan.block_m]

    @staticmethod
    def _plan_args(plan: RoutingPlan):
        return (plan.sorted_slots, plan.expert_offsets, plan.tile_expert, plan.tile_row_start,
                plan.num_tiles)  # fmt: skip

    @staticmethod
    def _meta(cfg: GemmConfig, dtype: torch.dtype) -> dict:
        return dict(
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(dtype),
        )  # fmt: skip


class TorchStages:
    """The same stages with torch ops, one expert at a time (CPUs without the interpreter).

    Computes in fp32 and rounds where the kernels round, so both paths agree to fp32 accuracy.
    """

    def block_m(self, num_slots: int, num_experts: int) -> int:
        return 64

    def gate_up(self, x, w13, plan: RoutingPlan, *, store_h: bool, store_a: bool):
        ffn = w13.shape[1] // 2
        h = (
            _alloc.empty(plan.num_slots, 2 * ffn, dtype=x.dtype, device=x.device)
            if store_h
            else None
        )
        a = _alloc.empty(plan.num_slots, ffn, dtype=x.dtype, device=x.device) if store_a else None
        for e, pos, slots in _expert_rows(plan):
            pre = (x[slots // plan.top_k].float() @ w13[e].float().t()).to(x.dtype)
            if store_h:
                h[pos] = pre
            if store_a:
                a[pos] = _swiglu(pre).to(x.dtype)
        return h, a

    def down_combine(self, a, w2, topk_weights, plan: RoutingPlan, *, deterministic: bool):
        weights = topk_weights.reshape(-1).float()
        return self._combine(a, lambda e: w2[e].float().t(), weights, plan, w2.shape[1])

    def grad_input(self, dh, w13, plan: RoutingPlan, *, deterministic: bool):
        return self._combine(dh, lambda e: w13[e].float(), None, plan, w13.shape[2])

    def grad_act(self, dout, w2, h, topk_weights, plan: RoutingPlan, *, store_a: bool):
        ffn = w2.shape[2]
        weights = topk_weights.reshape(-1).float()
        dh = _alloc.empty(plan.num_slots, 2 * ffn, dtype=dout.dtype, device=dout.device)
        a = (
            _alloc.empty(plan.num_slots, ffn, dtype=dout.dtype, device=dout.device)
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

    def grad_w2(self, dout, a, topk_weights, plan: RoutingPlan):
        weights = topk_weights.reshape(-1).float()

        def rows(pos, slots):
            return (dout[slots // plan.top_k].float() * weights[slots, None]).t() @ a[pos].float()

        return self._per_expert(rows, (plan.num_experts, dout.shape[1], a.shape[1]), dout, plan)

    def grad_w13(self, dh, x, plan: RoutingPlan):
        def rows(pos, slots):
            return dh[pos].float().t() @ x[slots // plan.top_k].float()

        return self._per_expert(rows, (plan.num_experts, dh.shape[1], x.shape[1]), dh, plan)

    @staticmethod
    def _combine(rows_in, weight_of, weights, plan: RoutingPlan, n):
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
    def _per_expert(rows, shape, like, plan: RoutingPlan):
        out = torch.zeros(shape, dtype=like.dtype, device=like.device)
        for e, pos, slots in _expert_rows(plan):
            out[e] = rows(pos, slots).to(like.dtype)
        return out


def _expert_rows(plan: RoutingPlan):
    """(expert, slice of its sorted positions, its slots as int64) for experts with tokens."""
    offsets = plan.expert_offsets.tolist()
    for e in range(plan.num_experts):
        if offsets[e + 1] > offsets[e]:
            pos = slice(offsets[e], offsets[e + 1])
            yield e, pos, plan.sorted_slots[pos].long()


def _swiglu(pre: torch.Tensor) -> torch.Tensor:
    gate, up = pre.float().chunk(2, dim=-1)
    return F.silu(gate) * up


TRITON_STAGES = TritonStages()
TORCH_STAGES = TorchStages()


def stages_for(device: torch.device):
    """The stage implementation that runs on `device`."""
    return TRITON_STAGES if triton_runs_on(device) else TORCH_STAGES
