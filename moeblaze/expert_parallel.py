"""Expert parallelism: the experts of an MoE layer sharded over a torch.distributed group.

# W ranks, T tokens of this rank, d hidden, F ffn, E experts, E_l = E / W experts per rank,
# k top-k, S = T*k slots this rank routes, R rows this rank's experts receive from all ranks

Rank r holds experts [r*E_l, (r+1)*E_l). The router is replicated (the same weights on every
rank, like data-parallel parameters) and each rank routes its own tokens. Per layer call:

    topk_ids [T, k] --build_routing_plan(E)--> sorted_slots [S] (slots ordered by expert, so the
        slots bound for one rank are contiguous), slot_positions [S], expert_counts [E]
    counts:   expert_counts [W, E_l] --all-to-all--> rows each rank sends to each local expert
              [W, E_l] --one host sync--> the row splits of the all-to-alls below
    dispatch: x[sorted_slots // k] [S, d], topk_weights[sorted_slots] [S]
              --all-to-all--> rows [R, d], weights [R] (grouped by source rank, then expert)
    experts:  moe_mlp(rows, local expert [R, 1], weights [R, 1], w13 [E_l, 2F, d],
              w2 [E_l, d, F]) -> [R, d], already weighted (k = 1 per row: the routing-weight
              gradient comes from moeblaze's epilogue and no expert output is kept)
    combine:  [R, d] --all-to-all back--> [S, d] in sorted order --the k rows of each token summed
              in fp32, in a fixed order--> out [T, d]

A dropped slot (id `DROPPED`, -1) is placed nowhere by the plan: it is sent nowhere, the [S, d]
buffers hold the P < S placed slots only, and the combine adds nothing for it. The combine's sum
is one Triton kernel (moeblaze.kernels.gather_sum: each received row read once, nothing of size
[S, d] written; on the torch backend, k index_selects in the same order and with the same bits).

With expert tensor parallelism (`expert_tensor_group`, ETP ranks each holding F/ETP columns of
the same experts), the rows received are all-gathered over the ETP ranks, each rank's padded to
the largest count R_max (the padding rows get id DROPPED: no GEMM row), every ETP rank runs the
[ETP * R_max, d] rows through its shards, and the partial outputs are reduce-scattered back to
[R, d] before the combine. The counts ride on the same host sync (the ETP ranks gather what
they received before it).

Backward mirrors forward: the gradient of a dispatch is a combine and that of a combine is a
dispatch, with the splits of forward (no host sync in backward). The `[S, d]` buffers are what
the all-to-alls send and receive; none outlives the call. Backward keeps: x (as `moe_mlp`
does), this rank's int32 routing plan (O(S + E)) and `sorted_slots // k` [S], the host splits,
and what `moe_mlp` keeps of the local experts: the received routing weights [R, 1], its int32
plan (O(R + E_l)) and what its `recompute` policy names. The received rows [R, d] (R is T*k on
average) are not kept by default: backward runs the dispatch all-to-all of x again;
`recompute_dispatch=False` keeps them instead and saves that all-to-all.

Host syncs per forward: sizing the receive buffers of an all-to-all with variable splits needs
the counts on the host, so one sync per layer is inherent (the id range check rides on it);
besides it, the router's finite-logits check and `moe_mlp`'s id check sync as in
`moeblaze.MoELayer`. Every rank must run the same layers forward and backward: each of them
runs collectives of the group.
"""

import contextlib
import copy
import dataclasses
import weakref

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from kernelbase.backend import Backend, backend_for
from kernelbase.profiling import profile_range
from moeblaze.activation import SWIGLU, Activation, check_activation
from moeblaze.kernels.gather_sum import launch_gather_sum
from moeblaze.layers import MoEBlock, MoELayer, check_router_options
from moeblaze.ops import check_expert_weights, moe_mlp
from moeblaze.reference import gather_sum_torch
from moeblaze.router import RouterOutput
from moeblaze.routing_plan import DROPPED, build_routing_plan


@dataclasses.dataclass(frozen=True)
class _Exchange:
    """Row splits of the dispatch all-to-all of one layer call (combine uses them swapped)."""

    group: dist.ProcessGroup
    send_splits: tuple[int, ...]  # [W] rows this rank sends to each rank
    recv_splits: tuple[int, ...]  # [W] rows this rank receives from each rank
    tensor_group: dist.ProcessGroup | None  # the expert-tensor-parallel group, or None
    padded_rows: int  # R_max: rows of each tensor-parallel rank in the gathered buffer


def _all_to_all(rows: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    """rows [sum(in_splits), c] -> [sum(out_splits), c]; the collective writes every output row."""
    out = rows.new_empty(sum(out_splits), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


def _dispatch(src: torch.Tensor, source_of_row: torch.Tensor, exchange: _Exchange):
    """src [n, c] -> [R, c]: row p of the sorted order is src[source_of_row[p]]."""
    with profile_range("moeblaze.ep.dispatch"):
        rows = src.index_select(0, source_of_row)  # [S, c]: the send buffer
        return _all_to_all(rows, exchange.recv_splits, exchange.send_splits, exchange.group)


def _combine(rows: torch.Tensor, row_of_slot: torch.Tensor, exchange: _Exchange):
    """rows [R, c] -> [n, c]: out[i] = sum_j (row row_of_slot[i, j] of the sorted order; -1,
    a dropped slot: nothing)."""
    with profile_range("moeblaze.ep.combine"):
        back = _all_to_all(rows, exchange.send_splits, exchange.recv_splits, exchange.group)
        # back [P, c] in sorted order, P placed slots; summed in fp32, j = 0..k-1: bitwise
        # reproducible.
        if backend_for(back.device) is Backend.TORCH:
            return gather_sum_torch(back, row_of_slot)
        return launch_gather_sum(back, row_of_slot.contiguous())


def _gather_shards(rows: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
    """rows [R, c] -> [ETP * R_max, c]: the received rows of every rank of the
    expert-tensor-parallel group, in rank order, each rank's padded to R_max (moe_mlp gets id
    DROPPED there); the gradient is summed over the group. Without that group, rows as they
    are."""
    if exchange.tensor_group is None:
        return rows
    padded = F.pad(rows, (0, 0, 0, exchange.padded_rows - rows.shape[0]))
    return gather_rows(padded, exchange.tensor_group)


def _sum_shards(rows: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
    """[ETP * R_max, c] -> [R, c]: this rank's rows of the sum of the group's partial results
    (`_gather_shards` backward)."""
    if exchange.tensor_group is None:
        return rows
    return summed_shard(rows, exchange.tensor_group)[: sum(exchange.recv_splits)]


class _Dispatch(torch.autograd.Function):
    """`_dispatch` forward; backward combines the rows' gradients back into src's."""

    @staticmethod
    def forward(ctx, src, source_of_row, row_of_slot, exchange):
        ctx.save_for_backward(row_of_slot)
        ctx.exchange = exchange
        return _dispatch(src, source_of_row, exchange)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_of_slot,) = ctx.saved_tensors
        return _combine(grad_rows, row_of_slot, ctx.exchange), None, None, None


class _Combine(torch.autograd.Function):
    """`_combine` forward; backward dispatches the output gradient to the rows' ranks."""

    @staticmethod
    def forward(ctx, rows, source_of_row, row_of_slot, exchange):
        ctx.save_for_backward(source_of_row)
        ctx.exchange = exchange
        return _combine(rows, row_of_slot, exchange)

    @staticmethod
    def backward(ctx, grad_out):
        (source_of_row,) = ctx.saved_tensors
        return _dispatch(grad_out, source_of_row, ctx.exchange), None, None, None


def _exchange_counts(
    topk_ids: torch.Tensor, num_experts: int, group, world_size: int, tensor_group
):
    """Routing plan, exchange and the local expert [ETP * R_max, 1] of every row this rank's
    experts compute (with an expert-tensor-parallel group, the rows its ranks received, each
    rank's padded with DROPPED to R_max).

    The all-to-all of counts also carries each rank's number of ids outside [0, E) (DROPPED
    aside) and its global rank, and the expert-tensor-parallel ranks gather what they received,
    so that bad ids raise on every rank instead of leaving the others waiting in the next
    collective.
    """
    num_local = num_experts // world_size
    # Invalid ids are placed nowhere and counted by the plan; they raise below, after the
    # exchange.
    plan = build_routing_plan(topk_ids, num_experts, check_ids=False)
    counts = plan.expert_counts.view(world_size, num_local)  # [W, E_l] rows for each expert
    invalid = plan.invalid_ids[:1]  # [1] this rank's number of invalid ids
    me = torch.full_like(counts[:, :1], dist.get_rank())  # a fill: no copy from the host
    send = torch.cat([counts, invalid.expand(world_size, 1), me], 1)
    recv = torch.empty_like(send)  # recv[src]: src's rows for each local expert, bad ids, rank
    dist.all_to_all_single(recv, send, group=group)
    tensor_size, tensor_rank = 1, 0
    table = recv  # [ETP * W, E_l + 2]: what each expert-tensor-parallel rank received
    if tensor_group is not None:
        tensor_size, tensor_rank = dist.get_world_size(tensor_group), dist.get_rank(tensor_group)
        table = recv.new_empty(tensor_size * world_size, num_local + 2)
        dist.all_gather_into_tensor(table, recv, group=tensor_group)
    host = torch.cat([counts.sum(1), table.flatten()]).tolist()  # the host sync
    send_splits, host = host[:world_size], host[world_size:]
    received = [host[i : i + num_local + 2] for i in range(0, len(host), num_local + 2)]
    blocks = [received[j * world_size : (j + 1) * world_size] for j in range(tensor_size)]
    recv_splits = [sum(row[:num_local]) for row in blocks[tensor_rank]]
    bad_ranks = sorted({row[num_local + 1] for row in received if row[num_local]})
    if bad_ranks:
        message = (
            f"topk_ids on global rank(s) {bad_ranks} contain expert ids outside "
            f"[0, num_experts={num_experts})"
        )
        count, from_end = plan.invalid_ids.tolist()  # (count, S - the lowest invalid slot)
        if count:
            first = topk_ids.reshape(-1)[topk_ids.numel() - from_end].item()
            message += f"; this rank's first one is {first}"
        raise ValueError(message)
    padded_rows = max(sum(sum(row[:num_local]) for row in block) for block in blocks)
    # Local expert of each gathered row: rank j's rows by source rank, then expert, then
    # padded_rows - R_j rows of DROPPED.
    counts_of = table.view(tensor_size, world_size, -1)[..., :num_local].flatten(1)
    repeats = torch.cat([counts_of, padded_rows - counts_of.sum(1, keepdim=True)], 1)
    local_expert = torch.arange(num_local, device=topk_ids.device).repeat(world_size)  # [W*E_l]
    values = torch.cat([local_expert, local_expert.new_full((1,), DROPPED)]).repeat(tensor_size)
    local_ids = torch.repeat_interleave(
        values, repeats.flatten(), output_size=tensor_size * padded_rows
    )  # [ETP * R_max]
    exchange = _Exchange(group, tuple(send_splits), tuple(recv_splits), tensor_group, padded_rows)
    return plan, exchange, local_ids.view(-1, 1)


_RECEIVED_ROWS = object()  # kept for backward in place of the received rows


@contextlib.contextmanager
def _dispatch_again_in_backward(rows, x, source_of_row, exchange):
    """While active, autograd keeps a marker instead of `rows` [R, d] (or [ETP * R_max, d]);
    unpacking the marker in backward runs the dispatch of x again (the same collectives on
    every rank)."""
    rows_ref = weakref.ref(rows)  # a strong reference here would keep the rows alive
    version = x._version

    def pack(t):
        return _RECEIVED_ROWS if t is rows_ref() else t

    def unpack(saved):
        if saved is not _RECEIVED_ROWS:
            return saved
        if x._version != version:
            raise RuntimeError(
                "the input x of an expert-parallel MoE layer was modified in place after forward; "
                "backward dispatches it again (recompute_dispatch=True) and needs it unchanged"
            )
        with torch.no_grad(), profile_range("moeblaze.ep.recompute_dispatch"):
            return _gather_shards(_dispatch(x, source_of_row, exchange), exchange)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# The all-to-alls need their splits on the host (the one sync per call of the module docstring):
# no graph can hold them. Under torch.compile this function runs eagerly, as one graph break; the
# router and the shared expert around it compile (tests/moeblaze/test_expert_parallel.py).
@torch.compiler.disable
def expert_parallel_mlp(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    recompute: str = "activation",
    deterministic: bool = False,
    recompute_dispatch: bool = True,
    activation: Activation = SWIGLU,
    expert_tensor_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """`moeblaze.moe_mlp` with the E = W * E_l experts sharded over the W ranks of `group`.

    A collective: every rank of `group` calls it, with its own tokens (T may differ between
    ranks, and be 0) and its own experts. See the module docstring for the data flow.

    Args:
        x: [T, d] this rank's tokens, float16, bfloat16 or float32.
        topk_ids: [T, k] integer global expert ids in [0, E), or -1 (`moeblaze.DROPPED`) for a
            slot that goes to no expert: it sends no row and adds nothing.
        topk_weights: [T, k] floating routing weights.
        w13: [E_l, 2F, d] this rank's experts (global ids rank*E_l ... rank*E_l + E_l - 1);
            [E_l, F, d] for an ungated `activation`.
        w2: [E_l, d, F].
        b13, b2: optional biases of this rank's experts, [E_l, 2F] and [E_l, d] (moe_mlp's).
        group: the expert-parallel process group (default: the default group).
        recompute, deterministic, activation: passed to `moeblaze.moe_mlp` for the local
            experts. With k = 1 there, `deterministic` changes nothing; the sums of this
            function (the k rows of a token, in out and in dx) run in a fixed order, without
            atomics.
        recompute_dispatch: True (default): backward runs the dispatch all-to-all of x again
            instead of keeping the received rows [R, d]; False keeps them.
        expert_tensor_group: expert tensor parallelism: the ETP ranks that hold the other
            shards of the F columns of this rank's experts (each holding `w13 [E_l, 2F/ETP, d]`,
            gate rows r then up rows r, `w2 [E_l, d, F/ETP]`, `b13` with w13's rows, `b2` whole,
            added once). `group` then holds the ranks with the same shard of the other experts.
            The rows received from `group` are all-gathered over this group (after the
            all-to-all, as Megatron's dispatchers do, so the all-to-all carries each token once
            per expert), each rank runs all of them through its shards, and the partial outputs
            are reduce-scattered back before the combine.

    Returns:
        out: [T, d] in x's dtype, differentiable in x, topk_weights, w13, w2, b13 and b2.
    """
    _check_args(x, topk_ids, topk_weights, w13, w2, activation)
    group, world_size, _ = _resolve_group(group, "expert_parallel_mlp")
    num_experts = w13.shape[0] * world_size
    num_tokens, top_k = topk_ids.shape
    if expert_tensor_group is not None:
        _resolve_group(expert_tensor_group, "expert_parallel_mlp (expert_tensor_group)")
        if b2 is not None:  # each rank's partial output adds b2 / ETP; its gradient is whole
            b2 = added_once(b2, expert_tensor_group)
    with profile_range("moeblaze.ep.exchange_counts"):
        plan, exchange, local_ids = _exchange_counts(
            topk_ids, num_experts, group, world_size, expert_tensor_group
        )
    placed = sum(exchange.send_splits)  # P: the slots not dropped, first in sorted order
    slot_of_row = plan.sorted_slots[:placed]  # [P] slot of each sent row
    token_of_row = slot_of_row // top_k  # [P] its token
    # [T, k] sorted row of each slot; -1 for a dropped slot: the combine adds nothing for it.
    row_of_slot = plan.slot_positions.view(num_tokens, top_k)
    rows = _Dispatch.apply(x, token_of_row, row_of_slot, exchange)  # [R, d]
    weights = _Dispatch.apply(
        topk_weights.reshape(-1, 1), slot_of_row, row_of_slot.view(-1, 1), exchange
    )  # [R, 1]
    rows, weights = _gather_shards(rows, exchange), _gather_shards(weights, exchange)
    keep = (
        _dispatch_again_in_backward(rows, x, token_of_row, exchange)
        if recompute_dispatch
        else contextlib.nullcontext()
    )
    with keep, profile_range("moeblaze.ep.experts"):
        expert_out = moe_mlp(
            rows,
            local_ids,
            weights,
            w13,
            w2,
            b13=b13,
            b2=b2,
            recompute=recompute,
            deterministic=deterministic,
            activation=activation,
        )  # [R, d], weighted
    del rows  # freed before the combine's receive buffer is allocated (unless kept for backward)
    expert_out = _sum_shards(expert_out, exchange)  # [R, d]
    return _Combine.apply(expert_out, token_of_row, row_of_slot, exchange)  # [T, d]


class ExpertParallelMoELayer(MoEBlock):
    """`moeblaze.MoELayer` with its experts sharded over the ranks of a process group.

    Takes `MoELayer`'s arguments plus `group` (default: the default group),
    `recompute_dispatch` and `expert_tensor_group` (see `expert_parallel_mlp`). Rank r of
    `group` holds experts [r*E_l, (r+1)*E_l), E_l = num_experts / W: `w13 [E_l, 2F, d]`, `w2
    [E_l, d, F]` (and with `bias=True` `b13 [E_l, 2F]`, `b2 [E_l, d]`), gradients complete for
    the global batch. With an `expert_tensor_group` of ETP ranks, rank j of it holds shard j of
    each expert's F columns (`ffn_shard`, see `MoEBlock`; F/ETP columns), its gradient complete
    there. The router and the shared expert are replicated: seed every rank alike before
    building (see `reset_parameters` for the experts), and all-reduce their gradients over all
    the ranks like data-parallel parameters. The router's aux losses and token counts are those
    of this rank's tokens. `from_moe_layer` builds one from a full `MoELayer`.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        group: dist.ProcessGroup | None = None,
        recompute: str = "activation",
        deterministic: bool = False,
        recompute_dispatch: bool = True,
        expert_tensor_group: dist.ProcessGroup | None = None,
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
        activation: Activation = SWIGLU,
        bias: bool = False,
        device=None,
        dtype=None,
        **router_options,
    ):
        check_router_options(router_options, type(self))
        group, world_size, rank = _resolve_group(group, type(self).__name__)
        if num_experts % world_size:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the size of the expert-parallel "
                f"group ({world_size} ranks): each rank holds num_experts / world_size experts"
            )
        num_local = num_experts // world_size
        ffn_shard = (0, 1)
        if expert_tensor_group is not None:
            _, tensor_size, tensor_rank = _resolve_group(
                expert_tensor_group, f"{type(self).__name__} (expert_tensor_group)"
            )
            if ffn_hidden_size % tensor_size:
                raise ValueError(
                    f"ffn_hidden_size={ffn_hidden_size} must be divisible by the size of "
                    f"expert_tensor_group ({tensor_size} ranks): each rank holds F / ETP columns "
                    f"of its experts"
                )
            ffn_shard = (tensor_rank, tensor_size)
        super().__init__(
            hidden_size,
            ffn_hidden_size,
            num_experts,
            top_k,
            num_local,
            recompute=recompute,
            deterministic=deterministic,
            shared_expert_size=shared_expert_size,
            shared_expert_gate=shared_expert_gate,
            device=device,
            dtype=dtype,
            router_options=router_options,
            activation=activation,
            bias=bias,
            first_expert=rank * num_local,
            ffn_shard=ffn_shard,
        )
        self.group, self.world_size, self.rank = group, world_size, rank
        self.expert_tensor_group = expert_tensor_group
        self.recompute_dispatch = recompute_dispatch
        self.reset_parameters()

    @classmethod
    def from_moe_layer(
        cls,
        layer: MoELayer,
        group: dist.ProcessGroup | None = None,
        *,
        recompute_dispatch: bool = True,
        expert_tensor_group: dist.ProcessGroup | None = None,
    ) -> "ExpertParallelMoELayer":
        """This rank's share of `layer`: its experts' weights (their shards of the F columns
        with an `expert_tensor_group`), copies of the router and shared expert (every option
        and buffer), on `layer`'s device and dtype."""
        ep = cls(
            layer.hidden_size,
            layer.w2.shape[2],
            layer.router.num_experts,
            layer.router.top_k,
            group=group,
            recompute=layer.recompute,
            deterministic=layer.deterministic,
            recompute_dispatch=recompute_dispatch,
            expert_tensor_group=expert_tensor_group,
            activation=layer.activation,
            bias=layer.b13 is not None,
            device="meta",
            dtype=layer.w13.dtype,
        )
        ep.to_empty(device=layer.w13.device)  # the experts, filled below
        ep.router = copy.deepcopy(layer.router)
        ep.shared_expert = copy.deepcopy(layer.shared_expert)
        with torch.no_grad():
            for name in ("w13", "w2", "b13", "b2"):
                whole = getattr(layer, name)
                if whole is not None:
                    for local, expert in enumerate(range(ep.experts.start, ep.experts.stop)):
                        ep.set_expert(name, local, whole[expert])
        return ep

    def routed_mlp(self, tokens: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        return expert_parallel_mlp(
            tokens,
            routing.topk_ids,
            routing.topk_weights,
            self.w13,
            self.w2,
            self.group,
            recompute_dispatch=self.recompute_dispatch,
            expert_tensor_group=self.expert_tensor_group,
            **self.expert_options(),
        )

    def extra_repr(self) -> str:
        shard, shards = self.ffn_shard
        split = f"F columns shard {shard} of {shards}, " if shards > 1 else ""
        return (
            f"experts={self.experts.start}..{self.experts.stop - 1} of "
            f"{self.router.num_experts}, rank {self.rank} of {self.world_size}, {split}"
            f"recompute={self.recompute!r}, recompute_dispatch={self.recompute_dispatch}"
        )


# torch >= 2.13's names where present.
_ALL_GATHER = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)
_REDUCE_SCATTER = getattr(funcol, "reduce_scatter_single_autograd", None) or (
    funcol.reduce_scatter_tensor_autograd
)


def gather_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """The rows of every rank of `group`, in rank order; the gradient is summed over the ranks
    and scattered back (Megatron's gather_from_sequence_parallel_region)."""
    return funcol.wait_tensor(_ALL_GATHER(rows.contiguous(), 0, group))


def summed_shard(rows: torch.Tensor, group) -> torch.Tensor:
    """This rank's block of rows of the sum of `rows` over `group`; the gradient is gathered
    (Megatron's reduce_scatter_to_sequence_parallel_region)."""
    return funcol.wait_tensor(_REDUCE_SCATTER(rows.contiguous(), "sum", 0, group))


def added_once(bias: torch.Tensor, group) -> torch.Tensor:
    """`bias` for partial results that `group` sums (`summed_shard`): its value divided by the
    group's size, its gradient whole (each rank's backward sees every row's gradient)."""
    return bias - bias.detach() * (1 - 1 / dist.get_world_size(group))


def _resolve_group(group, caller: str):
    """(group, its size, this process's rank in it), with clear errors before any collective."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{caller} runs collectives over a torch.distributed process group, but none is "
            f"initialised: call torch.distributed.init_process_group() first (torchrun sets up "
            f"its environment)"
        )
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"{caller}: this process (global rank {dist.get_rank()}) is not a member of the "
            f"group it was given"
        )
    return group, dist.get_world_size(group), rank


def _check_args(x, topk_ids, topk_weights, w13, w2, activation) -> None:
    """Rank-local checks, before any collective; moe_mlp checks dtypes and the rest."""
    check_activation(activation)
    for name, t in (
        ("x", x),
        ("topk_ids", topk_ids),
        ("topk_weights", topk_weights),
        ("w13", w13),
        ("w2", w2),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}; expected x's device {x.device}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d], got shape {tuple(x.shape)}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; expected x's dtype {x.dtype}")
    check_expert_weights(x, w13, w2, activation, experts="E_l")
    if (
        topk_ids.dtype.is_floating_point
        or topk_ids.dtype.is_complex
        or topk_ids.dtype == torch.bool
    ):
        raise TypeError(f"topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids must be [T, k] with T={x.shape[0]} (x's rows), got {tuple(topk_ids.shape)}"
        )
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}"
        )
