"""Tensor-parallel linears with Megatron semantics, built on the overlap ops.

# W ranks, s sequence, b batch, h in_features, f out_features; LocalWorld tensors carry a
# leading [W] rank dim, DistWorld tensors are this rank's

Sequence parallel (default), sequence-first activations as in Megatron ([s, b, h]):

    ColumnParallelLinear   x [s/W, b, h] -> all_gather_matmul(x, w^T) -> y [s, b, f/W]
                           weight [f/W, h], bias [f/W]     (rows of the full weight, split)
    RowParallelLinear      x [s, b, h/W] -> matmul_reduce_scatter(x, w^T) -> y [s/W, b, f]
                           weight [f, h/W], bias [f]       (columns of the full weight, split)

Without sequence parallelism the column layer takes the replicated input [s, b, h] and the row
layer all-reduces its partial output into a replicated [s, b, f] (`ops.*_region`).

Both return `(output, output_bias)` like Megatron: `output_bias` is None and the bias is added,
unless `skip_bias_add=True` (then the bias is returned for the caller to fuse).

The row layer's bias is replicated. With a DistWorld and sequence parallelism each rank's bias
gradient covers only its own rows: as in Megatron, the parameter carries
`sequence_parallel = True`, and the training loop must all-reduce the gradients of parameters so
marked (Megatron's `finalize_model_grads` does). A LocalWorld keeps one [f] bias for all ranks,
whose gradient is already that sum.

Weights are initialised as one full [f, h] matrix (like nn.Linear's default, or `init_method`)
drawn from `generator` and then split, so a layer equals the dense nn.Linear it shards; DistWorld
ranks must therefore use identically seeded generators.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from kernelbase.checks import check_bool, check_dtype, check_int
from overlap.dist_world import DistWorld
from overlap.ops import (
    all_gather_matmul,
    copy_to_tensor_parallel_region,
    matmul_reduce_scatter,
    reduce_from_tensor_parallel_region,
)
from overlap.world import World


def _default_init(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(h), 1/sqrt(h))."""
    bound = 1 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)


class _ParallelLinear(nn.Module):
    split_dim: int  # dim of the full [f, h] weight that is split across ranks

    def __init__(
        self,
        in_features: int,
        out_features: int,
        world: World,
        *,
        sequence_parallel: bool = True,
        bias: bool = True,
        skip_bias_add: bool = False,
        init_method: Callable | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(world, World):
            raise TypeError(f"world must be a LocalWorld or DistWorld, got {type(world).__name__}")
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        for name, value in (
            ("sequence_parallel", sequence_parallel),
            ("bias", bias),
            ("skip_bias_add", skip_bias_add),
        ):
            check_bool(name, value)
        check_dtype("dtype", dtype)  # what the overlap ops compute in
        split = (out_features, in_features)[self.split_dim]
        if split % world.world_size:
            name = ("out_features", "in_features")[self.split_dim]
            raise ValueError(
                f"{name}={split} must be divisible by the world size {world.world_size}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.world, self.sequence_parallel, self.skip_bias_add = (
            world,
            sequence_parallel,
            skip_bias_add,
        )
        self._lead = (world.world_size,) if world.stacked_ranks else ()
        full = torch.empty(out_features, in_features, dtype=dtype or torch.float32)
        (init_method or _default_init)(full, generator)
        shards = full.chunk(world.world_size, dim=self.split_dim)
        # LocalWorld: all ranks' shards [W, f/W, h] or [W, f, h/W]; DistWorld: this rank's.
        local = torch.stack(shards) if world.stacked_ranks else shards[world.rank].clone()
        self.weight = nn.Parameter(local.to(world.device))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(self._make_bias(dtype or torch.float32))

    def _make_bias(self, dtype) -> torch.Tensor:
        raise NotImplementedError

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [(W,) s, b..., h] -> [(W,) s*b..., h] (the ops work on rows), after checking x
        against this layer, so an error names the layer's input, not the op's arguments."""
        layer, W, lead = type(self).__name__, self.world.world_size, len(self._lead)
        features = "in_features" if self.split_dim == 0 else "in_features/W"
        expected = self.in_features if self.split_dim == 0 else self.in_features // W
        layout = f"[{'W, ' if lead else ''}s, b, ..., {features}={expected}]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{layer} takes a torch.Tensor x, got {type(x).__name__}")
        if x.dim() < lead + 2 or (lead and x.shape[0] != W):
            rank_dim = f" (a LocalWorld of {W} ranks: a leading rank dim)" if lead else ""
            raise ValueError(f"{layer} takes x of shape {layout}{rank_dim}, got {tuple(x.shape)}")
        if x.shape[-1] != expected:
            raise ValueError(
                f"{layer}(in_features={self.in_features}) on {W} ranks takes x whose last dim is "
                f"{features}={expected}, got x of shape {tuple(x.shape)}"
            )
        if x.dtype != self.weight.dtype:
            raise TypeError(
                f"{layer} has {self.weight.dtype} weights and takes x of that dtype, got x of "
                f"dtype {x.dtype} (cast x, or build the layer with dtype={x.dtype})"
            )
        if x.device != self.weight.device:
            raise ValueError(f"{layer}'s weights are on {self.weight.device}, got x on {x.device}")
        return x.reshape(*x.shape[:lead], -1, x.shape[-1])

    def _finish(self, y: torch.Tensor):
        if self.bias is None:
            return y, None
        if self.skip_bias_add:
            return y, self.bias
        return y + self._bias_for_add(y), None

    def _bias_for_add(self, y: torch.Tensor) -> torch.Tensor:
        return self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"world={self.world}, sequence_parallel={self.sequence_parallel}, "
            f"bias={self.bias is not None}"
        )


def _unview(y: torch.Tensor, shape) -> torch.Tensor:
    """y, which nothing else holds, reshaped to `shape` as a tensor of its own rather than a
    view (as nn.Linear's output on 3-D input): FSDP2 warns about a module returning a view, since
    an in-place op on it would drop its pre-backward hook."""
    return torch.ops.aten._unsafe_view(y.contiguous(), shape)


class ColumnParallelLinear(_ParallelLinear):
    """y = x @ A^T + bias with A's rows (the output features) split across ranks.

    Args:
        in_features, out_features: of the full layer; out_features divisible by W.
        world: a LocalWorld or DistWorld.
        sequence_parallel: the input is this rank's sequence shard [s/W, b, h] and is gathered
            inside the fused AG-GEMM (True, default); else it is the replicated [s, b, h].
        bias: add a learnable bias (split like the output features).
        skip_bias_add: return the bias instead of adding it (Megatron's option).
        init_method: called on the full [f, h] weight with `generator` (default: nn.Linear's).
        generator, dtype: for the initial weights.

    Forward: x -> (y [(W,) s, b, f/W], output_bias).
    """

    split_dim = 0

    def _make_bias(self, dtype) -> torch.Tensor:
        return torch.zeros(
            *self._lead,
            self.out_features // self.world.world_size,
            dtype=dtype,
            device=self.world.device,
        )

    def _bias_for_add(self, y):
        return self.bias.unsqueeze(-2) if self._lead else self.bias  # [W, 1, f/W] over rows

    def forward(self, x: torch.Tensor):
        rows_shape = x.shape[len(self._lead) : -1]  # (s/W, b, ...) or (s, b, ...)
        x2 = self._rows(x)
        w_t = self.weight.mT  # [(W,) h, f/W]
        if self.sequence_parallel:
            y = all_gather_matmul(x2, w_t, self.world)  # [(W,) W*rows, f/W]
            rows_shape = (rows_shape[0] * self.world.world_size, *rows_shape[1:])
        else:
            y = torch.matmul(copy_to_tensor_parallel_region(x2, self.world), w_t)
        y, out_bias = self._finish(y)
        return _unview(y, (*self._lead, *rows_shape, y.shape[-1])), out_bias


class RowParallelLinear(_ParallelLinear):
    """y = x @ A^T + bias with A's columns (the input features) split across ranks.

    Args:
        in_features, out_features: of the full layer; in_features divisible by W.
        world: a LocalWorld or DistWorld.
        sequence_parallel: reduce-scatter the output over the sequence inside the fused
            GEMM-RS, giving [s/W, b, f] (True, default; s must be divisible by W); else
            all-reduce it into the replicated [s, b, f].
        bias: add a learnable, replicated bias [f] (see the module docstring).
        skip_bias_add, init_method, generator, dtype: as for ColumnParallelLinear.

    Forward: x [(W,) s, b, h/W] (the column layer's output) -> (y, output_bias).
    """

    split_dim = 1

    def __init__(self, *args, **kwargs):  # the arguments of _ParallelLinear
        super().__init__(*args, **kwargs)
        if self.bias is not None and isinstance(self.world, DistWorld) and self.sequence_parallel:
            self.bias.sequence_parallel = True  # Megatron: all-reduce this gradient over TP

    def _make_bias(self, dtype) -> torch.Tensor:
        return torch.zeros(self.out_features, dtype=dtype, device=self.world.device)

    def forward(self, x: torch.Tensor):
        rows_shape = x.shape[len(self._lead) : -1]  # (s, b, ...)
        x2 = self._rows(x)
        w_t = self.weight.mT  # [(W,) h/W, f]
        if self.sequence_parallel:
            W = self.world.world_size
            if rows_shape[0] % W:
                raise ValueError(
                    f"x's sequence length {rows_shape[0]} (dim {len(self._lead)} of "
                    f"{tuple(x.shape)}) must be divisible by the world size {W} to be scattered"
                )
            y = matmul_reduce_scatter(x2, w_t, self.world)  # [(W,) rows/W, f]
            rows_shape = (rows_shape[0] // W, *rows_shape[1:])
        else:
            y = reduce_from_tensor_parallel_region(torch.matmul(x2, w_t), self.world)
        y, out_bias = self._finish(y)
        return _unview(y, (*self._lead, *rows_shape, y.shape[-1])), out_bias


class ParallelMLP(nn.Module):
    """Column-parallel up projection, activation, row-parallel down projection: the whole
    tensor/sequence-parallel pattern in one forward.

        x [s/W, b, h] --AG-GEMM--> [s, b, f/W] --act--> --GEMM-RS--> [s/W, b, h]
    """

    def __init__(
        self,
        hidden: int,
        ffn: int,
        world: World,
        *,
        activation: Callable | None = None,
        sequence_parallel: bool = True,
        bias: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.up = ColumnParallelLinear(
            hidden,
            ffn,
            world,
            sequence_parallel=sequence_parallel,
            bias=bias,
            generator=generator,
            dtype=dtype,
        )
        self.down = RowParallelLinear(
            ffn,
            hidden,
            world,
            sequence_parallel=sequence_parallel,
            bias=bias,
            generator=generator,
            dtype=dtype,
        )
        if activation is not None and not callable(activation):
            raise TypeError(
                f"activation must be None (GELU) or a callable such as torch.nn.functional.silu, "
                f"got {type(activation).__name__} {activation!r}"
            )
        self.activation = activation or nn.functional.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.up(x)  # [s, b, f/W]: every rank sees the whole sequence, 1/W of the ffn
        y, _ = self.down(self.activation(h))  # [s/W, b, h]: partial sums reduce-scattered
        return y


def parallel_mlp(hidden: int, ffn: int, world: World, **kwargs) -> ParallelMLP:
    """A two-layer tensor/sequence-parallel MLP (column then row), e.g.

        world = overlap.LocalWorld(4, "cuda")  # or overlap.DistWorld(tp_group)
        mlp = overlap.parallel_mlp(4096, 14336, world, dtype=torch.bfloat16)
        x = torch.randn(4, 2048 // 4, 1, 4096, device="cuda", dtype=torch.bfloat16)  # [W, s/W, b, h]
        y = mlp(x)  # [W, s/W, b, h]
        y.float().square().mean().backward()

    Keyword arguments go to `ParallelMLP`.
    """
    return ParallelMLP(hidden, ffn, world, **kwargs)
