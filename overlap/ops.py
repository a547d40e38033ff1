"""`all_gather_matmul` and `matmul_reduce_scatter` as differentiable `torch.library` ops.

# W ranks, m rows per rank shard, M = W*m; with a LocalWorld every tensor below carries a
# leading [W] rank dim, with a DistWorld it is this rank's tensor.

    all_gather_matmul(a_shard [m, K], b [K, n])      -> c [M, n]       = AllGather(a_shard) @ b
    matmul_reduce_scatter(a [M, k], b [k, N])        -> c_shard [m, N] = ReduceScatter_rows(a @ b)

Registration design. A world (process group, streams, buffers) cannot be an argument of a
torch.library op, so every world registers itself under an integer handle when it is built
(`world.handle`, overlap.handles) and the ops take that int:

    overlap::all_gather_matmul(Tensor a_shard, Tensor b, int world_handle) -> (Tensor c, Tensor gathered)
    overlap::matmul_reduce_scatter(Tensor a, Tensor b, int world_handle) -> Tensor c_shard

They are opaque to torch.compile (the fake implementations give the shapes; the int is a graph
constant), and their autograd is registered with `register_autograd`, each backward calling the
other op:

    AG-GEMM backward   da_shard = matmul_reduce_scatter(dc, b^T)        (GEMM-RS)
                       db       = gathered^T @ dc   (gathered: AllGather(a_shard), kept from
                                                     forward, so backward gathers nothing)
    GEMM-RS backward   da, dP   = all_gather_matmul(dc_shard, b^T)     (dP = AllGather(dc_shard))
                       db       = a^T @ dP

With a LocalWorld the W gather buffers hold the same matrix, so the op returns (and backward
keeps) one of them, rank 0's: `gathered` is [M, K] in both worlds.

The region helpers for layers without sequence parallelism (`copy_to_tensor_parallel_region`,
`reduce_from_tensor_parallel_region`) are plain autograd Functions over `world.all_reduce`.
"""

import torch

from kernelbase.checks import KERNEL_DTYPES
from kernelbase.profiling import profile_range
from overlap.handles import world_from_handle
from overlap.world import World

# ---------------------------------------------------------------------------------------------
# Input checks


def _check_world(world: World) -> None:
    if not isinstance(world, World):
        raise TypeError(
            f"world must be an overlap world (LocalWorld or DistWorld), got {type(world).__name__}"
        )


def _check_common(x: torch.Tensor, x_name: str, b: torch.Tensor, world: World) -> None:
    _check_world(world)
    for name, t in ((x_name, x), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{x_name} must be float16, bfloat16 or float32, got {x.dtype}")
    if b.dtype != x.dtype:
        raise TypeError(f"b has dtype {b.dtype}; expected {x_name}'s dtype {x.dtype}")
    for name, t in ((x_name, x), ("b", b)):
        if t.device != world.device:
            raise ValueError(
                f"{name} is on {t.device}, but the world's ranks are on {world.device}"
            )
    lead = 1 if world.stacked_ranks else 0
    what = "[W, rows, cols] (LocalWorld: a leading rank dim)" if lead else "[rows, cols]"
    for name, t in ((x_name, x), ("b", b)):
        if t.dim() != 2 + lead:
            raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")
        if lead and t.shape[0] != world.world_size:
            raise ValueError(
                f"{name} has {t.shape[0]} ranks in its leading dim; the world has "
                f"{world.world_size}: shape {tuple(t.shape)}"
            )
    if b.shape[-2] != x.shape[-1]:
        raise ValueError(
            f"b must have {x.shape[-1]} rows ({x_name}'s last dim) to multiply {x_name} of "
            f"shape {tuple(x.shape)}, got b of shape {tuple(b.shape)}"
        )


def check_all_gather_matmul_args(a_shard: torch.Tensor, b: torch.Tensor, world: World) -> None:
    _check_common(a_shard, "a_shard", b, world)


def check_matmul_reduce_scatter_args(a: torch.Tensor, b: torch.Tensor, world: World) -> None:
    _check_common(a, "a", b, world)
    if a.shape[-2] % world.world_size:
        raise ValueError(
            f"a has {a.shape[-2]} rows, not divisible by the world size {world.world_size}: "
            f"the reduce-scatter gives every rank the same number of rows (a: {tuple(a.shape)})"
        )


# ---------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("overlap::all_gather_matmul", mutates_args=())
def _all_gather_matmul_op(
    a_shard: torch.Tensor, b: torch.Tensor, world_handle: int
) -> tuple[torch.Tensor, torch.Tensor]:
    with profile_range("overlap.all_gather_matmul"):
        return world_from_handle(world_handle).all_gather_matmul(a_shard, b)


@_all_gather_matmul_op.register_fake
def _(a_shard, b, world_handle):
    rows = world_from_handle(world_handle).world_size * a_shard.shape[-2]
    c = a_shard.new_empty(*a_shard.shape[:-2], rows, b.shape[-1])
    return c, a_shard.new_empty(rows, a_shard.shape[-1])


@torch.library.custom_op("overlap::matmul_reduce_scatter", mutates_args=())
def _matmul_reduce_scatter_op(a: torch.Tensor, b: torch.Tensor, world_handle: int) -> torch.Tensor:
    with profile_range("overlap.matmul_reduce_scatter"):
        return world_from_handle(world_handle).matmul_reduce_scatter(a, b)


@_matmul_reduce_scatter_op.register_fake
def _(a, b, world_handle):
    rows = a.shape[-2] // world_from_handle(world_handle).world_size
    return a.new_empty(*a.shape[:-2], rows, b.shape[-1])


def _ag_setup_context(ctx, inputs, output):
    _, b, world_handle = inputs
    _, gathered = output
    ctx.save_for_backward(gathered, b)
    ctx.world_handle = world_handle


def _ag_backward(ctx, dc, _dgathered):
    gathered, b = ctx.saved_tensors
    da_shard = db = None
    with profile_range("overlap.all_gather_matmul.backward"):
        if ctx.needs_input_grad[0]:
            da_shard = torch.ops.overlap.matmul_reduce_scatter(dc, b.mT, ctx.world_handle)
        if ctx.needs_input_grad[1]:
            db = torch.matmul(gathered.mT, dc)  # [K, M] @ [(W,) M, n] -> [(W,) K, n]
    return da_shard, db, None


def _rs_setup_context(ctx, inputs, output):
    a, b, world_handle = inputs
    ctx.save_for_backward(a, b)
    ctx.world_handle = world_handle


def _rs_backward(ctx, dc_shard):
    a, b = ctx.saved_tensors
    da = db = None
    with profile_range("overlap.matmul_reduce_scatter.backward"):
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            da, dc = torch.ops.overlap.all_gather_matmul(dc_shard, b.mT, ctx.world_handle)
            if ctx.needs_input_grad[1]:
                db = torch.matmul(a.mT, dc)  # [(W,) k, M] @ [M, N] -> [(W,) k, N]
    return da if ctx.needs_input_grad[0] else None, db, None


_all_gather_matmul_op.register_autograd(_ag_backward, setup_context=_ag_setup_context)
_matmul_reduce_scatter_op.register_autograd(_rs_backward, setup_context=_rs_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions


def all_gather_matmul(a_shard: torch.Tensor, b: torch.Tensor, world: World) -> torch.Tensor:
    """c = AllGather_rows(a_shard) @ b, overlapping the gather with the GEMM.

    Args:
        a_shard: this rank's rows [m, K] (LocalWorld: [W, m, K]), float16/bfloat16/float32.
        b: [K, n] (LocalWorld: [W, K, n]), a_shard's dtype, any strides.
        world: a LocalWorld or DistWorld.

    Returns:
        c: [W*m, n] (LocalWorld: [W, W*m, n]); rows p*m..(p+1)*m come from rank p's shard.
        Differentiable in a_shard and b.
    """
    check_all_gather_matmul_args(a_shard, b, world)
    c, _ = torch.ops.overlap.all_gather_matmul(a_shard, b, world.handle)
    return c


def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, world: World) -> torch.Tensor:
    """c_shard = this rank's rows of sum_over_ranks(a @ b), overlapping the GEMM and reduction.

    Args:
        a: [M, k] (LocalWorld: [W, M, k]) with M divisible by W, float16/bfloat16/float32.
        b: [k, N] (LocalWorld: [W, k, N]), a's dtype, any strides.
        world: a LocalWorld or DistWorld.

    Returns:
        c_shard: [M/W, N] (LocalWorld: [W, M/W, N]), rows r*M/W..(r+1)*M/W of the sum on rank r,
        accumulated in fp32 by the fused path. Differentiable in a and b.
    """
    check_matmul_reduce_scatter_args(a, b, world)
    return torch.ops.overlap.matmul_reduce_scatter(a, b, world.handle)


# ---------------------------------------------------------------------------------------------
# Regions of layers without sequence parallelism (Megatron's mappings)


class _AllReduceBackward(torch.autograd.Function):
    """Identity forward, all-reduce backward (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        with profile_range("overlap.all_reduce"):
            return ctx.world.all_reduce(dx), None


class _AllReduceForward(torch.autograd.Function):
    """All-reduce forward; backward identity (per-rank graphs) or all-reduce (stacked ranks)."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        with profile_range("overlap.all_reduce"):
            return world.all_reduce(x)

    @staticmethod
    def backward(ctx, dy):
        if ctx.world.stacked_ranks:
            with profile_range("overlap.all_reduce"):
                return ctx.world.all_reduce(dy), None
        return dy, None


def copy_to_tensor_parallel_region(x: torch.Tensor, world: World) -> torch.Tensor:
    """The replicated input of a column-parallel layer (no sequence parallelism).

    DistWorld (one autograd graph per rank): identity forward, all-reduce of the gradient
    backward, as in Megatron. LocalWorld (the W ranks' replicas are W slices of one graph):
    identity both ways, the exact adjoint; the replicas' gradients add up where the caller
    formed the replicas (e.g. `x.expand(W, ...)`).
    """
    _check_region_input(x, world)
    if world.stacked_ranks:
        return x
    return _AllReduceBackward.apply(x, world)


def reduce_from_tensor_parallel_region(x: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of the ranks' partial outputs of a row-parallel layer (no sequence parallelism).

    DistWorld: all-reduce forward, identity backward (Megatron). LocalWorld: all-reduce both
    ways, the exact adjoint when the W replicated outputs are slices of one graph (take the mean
    over the rank dim to get a loss equal to the single-device one).
    """
    _check_region_input(x, world)
    return _AllReduceForward.apply(x, world)


def _check_region_input(x: torch.Tensor, world: World) -> None:
    _check_world(world)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device != world.device:
        raise ValueError(f"x is on {x.device}, but the world's ranks are on {world.device}")
    if world.stacked_ranks and (x.dim() < 2 or x.shape[0] != world.world_size):
        raise ValueError(
            f"x must have a leading rank dim of the world size {world.world_size} (LocalWorld: "
            f"[W, ...], at least 2-D), got shape {tuple(x.shape)}"
        )
