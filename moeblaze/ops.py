"""`moe_mlp`: the expert MLP of an MoE layer as `torch.library` ops with autograd.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots

    topk_ids ──► moeblaze::routing_plan ──► plan_buffer (int32, O(S + E): a RoutingPlan)
    x, topk_weights, w13, w2, (b13, b2), plan_buffer ──► moeblaze::moe_mlp_forward ──► out [T, d]
                                                         (+ what backward keeps)
    dout, saved ──► moeblaze::moe_mlp_grad_act   ──► dh [S, 2F], dtopk_weights (+ a [S, F], db2)
    dout, a     ──► moeblaze::moe_mlp_grad_w2    ──► dw2
    dh, x       ──► moeblaze::moe_mlp_grad_input ──► dx, dw13 (+ db13)

What forward keeps for backward (`Saved`), by `recompute` policy, besides x, the weights,
topk_weights and the plan:

    "activation"  h [S, 2F], the pre-activation; SwiGLU is recomputed in backward
    "up_proj"     nothing of size S*F; the gate/up GEMM is recomputed in backward, and dh
                  is written over the recomputed h
    "none"        h [S, 2F] and a [S, F]

where a = w * SwiGLU(h) is the activation already scaled by each slot's routing weight w (what
the down projection and dw2 multiply; moeblaze.kernels.expert_mlp). SwiGLU is silu(gate) * up
or a clamped / quick-GELU / soft-capped form of it (or a `moeblaze.Gated` unit: another gate
function), with gate and up concatenated or interleaved (moeblaze.activation), passed to the ops
as its seven constants. The optional expert biases b13 [E, 2F] and b2 [E, d] are added in the
epilogues of gate_up and of the down combine (weighted by the routing weight, as the expert's
output is); their gradients are per-expert sums of dh and of w * dout (`grad_b13`, `grad_b2`).
Experts without a gate (`moeblaze.Ungated`) have w13 [E, F, d], b13 [E, F], and h and dh
[S, F]: read F where 2F is written here.

Never a [S, d] tensor. The ops run the stages of the backend `moe_mlp` picked once per call
(`kernelbase.backend_for`): `TritonStages` (moeblaze.kernels.expert_mlp) or `TorchStages`
(moeblaze.reference), which both follow `Stages`. The ops are opaque to torch.compile (fake
implementations give shapes); their data-dependent checks run when they execute.
"""

import dataclasses
import functools
from typing import Protocol

import torch
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

from kernelbase.backend import Backend, autocast_on, backend_for
from kernelbase.checks import KERNEL_DTYPES
from kernelbase.profiling import profile_range
from moeblaze.activation import SWIGLU, Activation, activation_of, check_activation
from moeblaze.kernels.expert_mlp import TRITON_STAGES
from moeblaze.reference import TORCH_STAGES
from moeblaze.routing_plan import (
    RoutingPlan,
    check_routing_args,
    make_plan,
    plan_numel,
)

RECOMPUTE_POLICIES = ("activation", "up_proj", "none")
_DIFFERENTIATING = (TransformType.Grad, TransformType.Jvp)  # torch.func transforms


class Stages(Protocol):
    """The stages of the expert MLP. Per-position tensors are in sorted order (routing_plan).

    Stage               reads                         returns
    gate_up             x, w13, topk_weights (, b13)  h [S, 2F] if store_h, a [S, F] if store_a
    down_combine        a, w2 (, b2, topk_weights)    out [T, d]
    grad_act            dout, w2, h, topk_weights     dh [S, 2F], dweights [T, k] fp32, a if store_a
                                                      (dh written over h if overwrite_h)
    grad_input          dh, w13                       dx [T, d]
    grad_w2 / grad_w13  dout, a / dh, x               dw2 [E, d, F] / dw13 [E, 2F, d]
    grad_b13            dh                            db13 [E, 2F]: each expert's sum of dh
    grad_b2             dout, topk_weights, b2        db2 [E, d], dtopk_weights' b2 part [T, k]

    a = w[slot] * SwiGLU(h_gate, h_up), the activation scaled by the routing weight (rounded to
    the dtype of x once, after the scaling), the same bits whichever stage computes it. gate_up
    and grad_act take the SwiGLU as `activation` (moeblaze.activation; default plain SwiGLU).
    """

    def block_m(self, num_slots: int, num_experts: int) -> int: ...
    def gate_up(
        self,
        x,
        w13,
        topk_weights,
        plan: RoutingPlan,
        *,
        store_h: bool,
        store_a: bool,
        activation,
        bias=None,
    ): ...
    def down_combine(
        self, a, w2, plan: RoutingPlan, *, deterministic: bool, bias=None, topk_weights=None
    ): ...
    def grad_act(
        self, dout, w2, h, topk_weights, plan, *, store_a: bool, overwrite_h=False, activation
    ): ...
    def grad_input(self, dh, w13, plan: RoutingPlan, *, deterministic: bool): ...
    def grad_w2(self, dout, a, plan: RoutingPlan): ...
    def grad_w13(self, dh, x, plan: RoutingPlan): ...
    def grad_b13(self, dh, plan: RoutingPlan, dtype): ...
    def grad_b2(self, dout, topk_weights, b2, plan: RoutingPlan): ...


STAGES: dict[Backend, Stages] = {
    Backend.TRITON: TRITON_STAGES,
    Backend.INTERPRETER: TRITON_STAGES,
    Backend.TORCH: TORCH_STAGES,
}


@dataclasses.dataclass(frozen=True)
class Saved:
    """What forward keeps for backward, besides x, the weights, topk_weights and the plan."""

    h: bool  # the pre-activation [S, 2F]
    a: bool  # the activation [S, F]

    @classmethod
    def of(cls, recompute: str, backward: bool) -> "Saved":
        """The policy `recompute` names; nothing at all when no backward will run."""
        if not backward:
            return cls(h=False, a=False)
        return {
            "activation": cls(h=True, a=False),
            "up_proj": cls(h=False, a=False),
            "none": cls(h=True, a=True),
        }[recompute]


# ---------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("moeblaze::routing_plan", mutates_args=())
def _routing_plan_op(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, backend: str, check_ids: bool | None
) -> torch.Tensor:
    return make_plan(topk_ids, num_experts, block_m, Backend(backend), check_ids).buffer


@_routing_plan_op.register_fake
def _(topk_ids, num_experts, block_m, backend, check_ids):
    return topk_ids.new_empty(plan_numel(topk_ids.numel(), num_experts, block_m), dtype=torch.int32)


def _plan(plan_buffer: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, block_m: int):
    """The RoutingPlan inside `plan_buffer`; topk_weights is [T, k], so it gives S = T*k and k."""
    return RoutingPlan.from_buffer(
        plan_buffer, topk_weights.numel(), num_experts, topk_weights.shape[1], block_m
    )


@torch.library.custom_op("moeblaze::moe_mlp_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    plan_buffer: torch.Tensor,
    block_m: int,
    keep_h: bool,
    keep_a: bool,
    deterministic: bool,
    backend: str,
    kind: str,
    alpha: float,
    limit: float | None,
    up_offset: float,
    interleaved: bool,
    gate_softcap: float | None,
    up_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [T, d], h [S, 2F] or empty, a [S, F] or empty); h and a are kept for backward.
    kind, alpha, limit, up_offset, interleaved, gate_softcap, up_softcap: the activation's
    constants (moeblaze.activation; h is [S, F] for an ungated one)."""
    routing_plan = _plan(plan_buffer, topk_weights, w13.shape[0], block_m)
    stages = STAGES[Backend(backend)]
    activation = activation_of(kind, alpha, limit, up_offset, interleaved, gate_softcap, up_softcap)
    b13, b2 = _contiguous(b13), _contiguous(b2)
    x, topk_weights = x.contiguous(), topk_weights.contiguous()
    with profile_range("moeblaze.moe_mlp.forward"):
        with profile_range("moeblaze.gate_up"):
            h, a = stages.gate_up(
                x,
                w13,
                topk_weights,
                routing_plan,
                store_h=keep_h,
                store_a=True,
                activation=activation,
                bias=b13,
            )
        with profile_range("moeblaze.down_combine"):
            out = stages.down_combine(
                a,
                w2,
                routing_plan,
                deterministic=deterministic,
                bias=b2,
                topk_weights=topk_weights,
            )
    empty = x.new_empty(0)
    return out, h if keep_h else empty, a if keep_a else empty.clone()


@_forward_op.register_fake
def _(x, topk_weights, w13, w2, b13, b2, plan_buffer, block_m, keep_h, keep_a, *_):
    num_slots, width, ffn = topk_weights.numel(), w13.shape[1], w2.shape[2]
    h = x.new_empty(num_slots, width) if keep_h else x.new_empty(0)
    a = x.new_empty(num_slots, ffn) if keep_a else x.new_empty(0)
    return x.new_empty(x.shape), h, a


# Backward is three ops, so that each large tensor dies as soon as its last reader has run: an
# op's arguments stay alive until the op returns. h (recompute="activation") is freed after
# grad_act, a (computed there, or kept by "none") after grad_w2, dh with the last op.


@torch.library.custom_op("moeblaze::moe_mlp_grad_act", mutates_args=())
def _grad_act_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    plan_buffer: torch.Tensor,
    h: torch.Tensor,
    block_m: int,
    keep_h: bool,
    keep_a: bool,
    backend: str,
    kind: str,
    alpha: float,
    limit: float | None,
    up_offset: float,
    interleaved: bool,
    gate_softcap: float | None,
    up_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dh [S, 2F], dtopk_weights [T, k], a [S, F] or empty if keep_a, db2 [E, d] or
    empty without b2); h is recomputed from x, w13 and b13 unless keep_h, and then dh is written
    over it."""
    routing_plan = _plan(plan_buffer, topk_weights, w13.shape[0], block_m)
    stages = STAGES[Backend(backend)]
    activation = activation_of(kind, alpha, limit, up_offset, interleaved, gate_softcap, up_softcap)
    b13, b2 = _contiguous(b13), _contiguous(b2)
    if not keep_h:  # h alone: the activation is not needed
        with profile_range("moeblaze.gate_up"):
            h, _ = stages.gate_up(
                x,
                w13,
                topk_weights,
                routing_plan,
                store_h=True,
                store_a=False,
                activation=activation,
                bias=b13,
            )
    with profile_range("moeblaze.grad_act"):
        # A recomputed h is this op's own: dh takes its memory, one [S, 2F] tensor, not two.
        dh, dweights, a = stages.grad_act(
            dout,
            w2,
            h,
            topk_weights,
            routing_plan,
            store_a=not keep_a,
            overwrite_h=not keep_h,
            activation=activation,
        )
    db2 = x.new_empty(0)
    if b2 is not None:
        with profile_range("moeblaze.grad_b2"):
            db2, dweights_b2 = stages.grad_b2(dout, topk_weights, b2, routing_plan)
        dweights += dweights_b2
    return dh, dweights.to(topk_weights.dtype), a if not keep_a else x.new_empty(0), db2


@_grad_act_op.register_fake
def _(dout, x, topk_weights, w13, w2, b13, b2, plan_buffer, h, block_m, keep_h, keep_a, *_):
    num_slots, width, ffn = topk_weights.numel(), w13.shape[1], w2.shape[2]
    a = x.new_empty(0) if keep_a else x.new_empty(num_slots, ffn)
    db2 = x.new_empty(0) if b2 is None else b2.new_empty(b2.shape)
    return x.new_empty(num_slots, width), topk_weights.new_empty(topk_weights.shape), a, db2


@torch.library.custom_op("moeblaze::moe_mlp_grad_w2", mutates_args=())
def _grad_w2_op(
    dout: torch.Tensor,
    a: torch.Tensor,
    topk_weights: torch.Tensor,
    w2: torch.Tensor,
    plan_buffer: torch.Tensor,
    block_m: int,
    backend: str,
) -> torch.Tensor:
    """Returns dw2 [E, d, F]."""
    routing_plan = _plan(plan_buffer, topk_weights, w2.shape[0], block_m)
    with profile_range("moeblaze.grad_w2"):
        dw2 = STAGES[Backend(backend)].grad_w2(dout, a, routing_plan)
    return dw2.to(w2.dtype)


@_grad_w2_op.register_fake
def _(dout, a, topk_weights, w2, plan_buffer, block_m, backend):
    return w2.new_empty(w2.shape)


@torch.library.custom_op("moeblaze::moe_mlp_grad_input", mutates_args=())
def _grad_input_op(
    dh: torch.Tensor,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    plan_buffer: torch.Tensor,
    block_m: int,
    deterministic: bool,
    backend: str,
    has_b13: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx [T, d], dw13 [E, 2F, d], db13 [E, 2F] if has_b13 else empty)."""
    routing_plan = _plan(plan_buffer, topk_weights, w13.shape[0], block_m)
    stages = STAGES[Backend(backend)]
    with profile_range("moeblaze.grad_input"):
        dx = stages.grad_input(dh, w13, routing_plan, deterministic=deterministic)
    with profile_range("moeblaze.grad_w13"):
        dw13 = stages.grad_w13(dh, x, routing_plan)
    db13 = x.new_empty(0)
    if has_b13:
        with profile_range("moeblaze.grad_b13"):
            db13 = stages.grad_b13(dh, routing_plan, w13.dtype)
    return dx, dw13.to(w13.dtype), db13


@_grad_input_op.register_fake
def _(dh, x, topk_weights, w13, plan_buffer, block_m, deterministic, backend, has_b13):
    db13 = w13.new_empty(w13.shape[:2]) if has_b13 else x.new_empty(0)
    return x.new_empty(x.shape), w13.new_empty(w13.shape), db13


def _contiguous(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias with the unit column stride the kernels read (a copy only if it lacks it)."""
    return None if bias is None else bias.contiguous()


# The forward op's inputs: x, topk_weights, w13, w2, b13, b2 (differentiable), then the rest.
_NUM_INPUTS = 19


def _setup_context(ctx, inputs, output):
    x, topk_weights, w13, w2, b13, b2, plan_buffer, *options = inputs
    _, h, a = output
    ctx.save_for_backward(x, topk_weights, w13, w2, b13, b2, plan_buffer, h, a)
    ctx.options = options  # block_m, keep_h, keep_a, deterministic, backend, *constants
    # h and a are outputs only so that backward can keep them: no gradient flows into them, and
    # autograd must not allocate zero gradients of their size.
    ctx.mark_non_differentiable(h, a)
    ctx.set_materialize_grads(False)


_TWICE = (
    "moe_mlp is differentiable once: its backward is not itself differentiable, so a second "
    "derivative through it (torch.autograd.grad(..., create_graph=True) followed by a "
    "backward through that gradient, or torch.func.grad of torch.func.grad) is not supported"
)


def _differentiable_once(backward):
    """`torch.autograd.function.once_differentiable`, also where the incoming gradient is a
    constant (out.sum()) and in nested torch.func transforms, which it misses: the gradients
    still depend on the saved inputs, so differentiating them again must raise, not give zero.

    Under create_graph=True the returned gradients require grad through a node that raises
    `_TWICE` when a backward reaches it; nested grad/jvp transforms raise at once."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if sum(i.key() in _DIFFERENTIATING for i in retrieve_all_functorch_interpreters()) > 1:
            raise RuntimeError(_TWICE)
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not create_graph:
            return outputs
        raise_on_backward = torch._C._functions.DelayedError(_TWICE.encode(), len(outputs))
        return raise_on_backward(*(_requiring_grad(g) for g in outputs))

    return wrapper


def _requiring_grad(grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is not None:
        grad = grad.detach()
        grad.requires_grad = True  # requires_grad_() is refused inside torch.func transforms
    return grad


@_differentiable_once
def _backward(ctx, dout, _dh, _da):
    if dout is None:
        return (None,) * _NUM_INPUTS
    x, topk_weights, w13, w2, b13, b2, plan_buffer, h, a = ctx.saved_tensors
    # Autograd would hold h and a until this function returns; drop its references now (unless
    # the graph is retained), so that each dies after the op that reads it last.
    ctx.maybe_clear_saved_tensors()
    block_m, keep_h, keep_a, deterministic, backend, *constants = ctx.options
    dout, x, topk_weights = dout.contiguous(), x.contiguous(), topk_weights.contiguous()
    ops = torch.ops.moeblaze
    with profile_range("moeblaze.moe_mlp.backward"):
        dh, dweights, a_computed, db2 = ops.moe_mlp_grad_act(
            dout,
            x,
            topk_weights,
            w13,
            w2,
            b13,
            b2,
            plan_buffer,
            h,
            block_m,
            keep_h,
            keep_a,
            backend,
            *constants,
        )
        del h
        if not keep_a:
            a = a_computed
        del a_computed
        dw2 = ops.moe_mlp_grad_w2(dout, a, topk_weights, w2, plan_buffer, block_m, backend)
        del a
        dx, dw13, db13 = ops.moe_mlp_grad_input(
            dh, x, topk_weights, w13, plan_buffer, block_m, deterministic, backend, b13 is not None
        )
    if b13 is None:
        db13 = None
    if b2 is None:
        db2 = None
    return dx, dweights, dw13, dw2, db13, db2, *(None,) * (_NUM_INPUTS - 6)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _MoeMLP(torch.autograd.Function):
    """The forward op as an autograd.Function with a separate `setup_context`: what torch.func
    transforms (torch.func.grad, jacrev) need; the op's own autograd (register_autograd) does
    not provide one. Forward and backward are the op's own; higher derivatives raise
    (`_differentiable_once`)."""

    @staticmethod
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():  # this Function is the autograd
            return torch.ops.moeblaze.moe_mlp_forward(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


# ---------------------------------------------------------------------------------------------
# Public function


def moe_mlp(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    recompute: str = "activation",
    deterministic: bool = False,
    check_ids: bool | None = None,
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """SwiGLU (or ungated) experts applied to routed tokens, combined with the routing weights.

    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :F] @ x[t]) * (w13[e, F:] @ x[t]))
    with e = topk_ids[t, j] (with the default `activation` and no biases; with them, each
    expert computes w2[e] @ act(w13[e] @ x[t] + b13[e]) + b2[e]). A slot with e = -1
    (`moeblaze.DROPPED`: a token dropped for capacity, or padding) goes to no expert: it adds
    nothing to out, costs no expert GEMM rows, and its routing weight gets gradient 0.

    Args:
        x: [T, d] float16, bfloat16 or float32.
        topk_ids: [T, k] integer expert ids in [0, E), or -1 for a dropped slot.
        topk_weights: [T, k] floating routing weights (any float dtype; the gradient keeps it).
        w13: [E, 2F, d] gate rows then up rows (Hugging Face layout), x's dtype; [E, F, d] for
            an ungated `activation`.
        w2: [E, d, F], x's dtype.
        b13: optional [E, 2F] ([E, F] ungated) bias of the gate/up projection (laid out as w13's
            rows), x's dtype.
        b2: optional [E, d] bias of the down projection, x's dtype; like the rest of the
            expert's output it is scaled by the routing weight.
        recompute: what forward keeps for backward: "activation" (default; the pre-activation
            [T*k, 2F]), "up_proj" (nothing of size T*k*F; the gate/up GEMM runs again in
            backward) or "none" (pre-activation and activation). When no input requires grad
            or grad mode is off, nothing is kept whatever the policy.
        deterministic: make every output bitwise reproducible run to run. The top-k combines
            of forward and of dx then go through a transient fp32 buffer of [T*k, d]
            (4*T*k*d bytes, freed before the op returns; never kept for backward) and are summed
            in a fixed order, instead of fp32 atomics into [T, d]. All other results are
            reproducible in either mode. With k = 1 both modes are the same.
        check_ids: when an id outside [0, E), -1 aside, raises ValueError
            (`build_routing_plan`): None
            (default) without a host synchronisation (on CUDA at the latest at the next
            moeblaze call, or at `moeblaze.check_errors()`), True at once (debugging; one
            synchronisation on CUDA), False never. Invalid ids are placed nowhere either way.
        activation: the gated activation of the gate and up halves, `moeblaze.SwiGLU()`
            (default, silu(gate) * up) or its clamped / quick-GELU / soft-capped forms, e.g.
            `SwiGLU(limit=10.0)` (DeepSeek-V4),
            `SwiGLU(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True)` (GPT-OSS: gate
            and up rows of w13, and entries of b13, alternate),
            `SwiGLU(gate_softcap=4.0, up_softcap=25.0)` (Inkling 2); `moeblaze.Gated(fn)` for
            another gate function, act = fn(gate) * up (fn "gelu_tanh": Gemma 4's GeGLU,
            "gelu", "relu", "relu2"; with SwiGLU's limit, up_offset, interleaved and
            up_softcap); or `moeblaze.Ungated(fn)` for experts without a gate,
            act = fn(w13[e] @ x[t]) with fn "relu2", "gelu", "gelu_tanh", "relu" or "silu";
            see moeblaze.activation.

    Returns:
        out: [T, d] in x's dtype, differentiable in x, topk_weights, w13, w2, b13 and b2.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if autocast_on(device_type):
        # As nn.Linear under autocast: x and the weights are cast to the autocast dtype and the
        # output comes in it; topk_weights keep their dtype. Inside, autocast is off, so every
        # backend computes exactly what it computes for inputs of that dtype.
        x, w13, w2, b13, b2 = _autocast_cast(device_type, x, w13, w2, b13, b2)
        options = dict(
            b13=b13,
            b2=b2,
            recompute=recompute,
            deterministic=deterministic,
            check_ids=check_ids,
            activation=activation,
        )
        with torch.autocast(device_type, enabled=False):
            return moe_mlp(x, topk_ids, topk_weights, w13, w2, **options)
    check_activation(activation)
    _check_moe_args(
        x, topk_ids, topk_weights, w13, w2, recompute, deterministic, check_ids, activation
    )
    _check_biases(x, w13, b13, b2)
    inputs = (x, topk_weights, w13, w2, b13, b2)
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    saved = Saved.of(recompute, backward)
    backend = backend_for(x.device)
    num_experts = w13.shape[0]
    block_m = STAGES[backend].block_m(topk_ids.numel(), num_experts)
    plan_buffer = torch.ops.moeblaze.routing_plan(
        topk_ids, num_experts, block_m, backend.value, check_ids
    )
    # Eager: through _MoeMLP, so torch.func transforms work. Under torch.compile: the op itself,
    # with its registered autograd (dynamo cannot trace _MoeMLP's dispatch guard).
    forward = torch.ops.moeblaze.moe_mlp_forward if torch.compiler.is_compiling() else _MoeMLP.apply
    options = (block_m, saved.h, saved.a, deterministic, backend.value, *activation.constants)
    out, _, _ = forward(x, topk_weights, w13, w2, b13, b2, plan_buffer, *options)
    return out


def _check_biases(x, w13, b13, b2) -> None:
    num_experts, width, d = w13.shape[0], w13.shape[1], x.shape[1]
    for name, bias, shape in (("b13", b13, (num_experts, width)), ("b2", b2, (num_experts, d))):
        if bias is None:
            continue
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != shape:
            raise ValueError(
                f"{name} must be {list(shape)} to match w13 and x, got shape {tuple(bias.shape)}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {bias.dtype}; expected x's dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{name} is on {bias.device}; expected x's device {x.device}")


def _autocast_cast(device_type: str, *tensors):
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors]


def check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")


def check_expert_weights(x, w13, w2, activation: Activation, experts: str = "E") -> None:
    """A ValueError naming w13 or w2 unless they are [E, 2F, d] ([E, F, d] without a gate) and
    [E, d, F] for x [T, d]; `experts` is what the messages call E ("E_l": a rank's experts)."""
    gated = activation.gated
    if w13.dim() != 3 or (gated and w13.shape[1] % 2) or w13.shape[2] != x.shape[1]:
        rows, rule = ("2F", " and an even 2F") if gated else ("F", f" for {activation!r}")
        raise ValueError(
            f"w13 must be [{experts}, {rows}, d] with d={x.shape[1]} (x's last dim){rule}, "
            f"got shape {tuple(w13.shape)}"
        )
    expected = (w13.shape[0], x.shape[1], activation.ffn(w13.shape[1]))
    if tuple(w2.shape) != expected:
        raise ValueError(
            f"w2 must be [{experts}, d, F] = {expected} to match w13 and x, "
            f"got shape {tuple(w2.shape)}"
        )


def _check_moe_args(
    x, topk_ids, topk_weights, w13, w2, recompute, deterministic, check_ids, activation
) -> None:
    for name, t in (("x", x), ("topk_weights", topk_weights), ("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; expected x's dtype {x.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d], got shape {tuple(x.shape)}")
    check_expert_weights(x, w13, w2, activation)
    check_routing_args(topk_ids, w13.shape[0])
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids has {topk_ids.shape[0]} rows; expected one per token of x ({x.shape[0]})"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}"
        )
    for name, t in (
        ("topk_ids", topk_ids),
        ("topk_weights", topk_weights),
        ("w13", w13),
        ("w2", w2),
    ):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}; expected x's device {x.device}")
    check_recompute(recompute)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if check_ids is not None and not isinstance(check_ids, bool):
        raise TypeError(f"check_ids must be None or a bool, got {type(check_ids).__name__}")
