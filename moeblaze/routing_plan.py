"""The routing plan: where every (token, choice) slot goes, as a handful of int32 tensors.

# T tokens, k top-k, E experts, S = T*k slots (slot s = t*k + j routes token t to topk_ids[t, j])

A slot whose id is `DROPPED` (-1) goes to no expert: a token dropped for capacity, or padding.
The plan places it nowhere, as it does ids outside [0, E), but it is no error.

The expert GEMMs never copy tokens into an expert-sorted buffer. They walk *sorted positions*
p = 0..S-1 (slots grouped by expert, token order kept inside an expert) and read the row of `x`
of token `sorted_slots[p] // k` through the plan. The grouped GEMMs cut each expert's positions
into tiles of `block_m` rows; the number of tiles is data dependent but bounded by
`ceil(S / block_m) + E`, so kernels launch a static grid and skip the tiles past `num_tiles`
(a layer built on the plan can be captured in a CUDA graph).

All fields are views into one int32 buffer, so the plan is one allocation, one argument of a
`torch.library` op, and something a CUDA builder can fill field for field.
"""

import dataclasses

import torch

from kernelbase import alloc, compiled, deferred
from kernelbase.backend import Backend, backend_for, has_values
from kernelbase.checks import check_bool, check_int
from kernelbase.intmath import cdiv
from kernelbase.profiling import profile_range
from moeblaze.kernels.compiled import fill_routing_plan
from moeblaze.kernels.routing_plan import launch_plan
from moeblaze.reference import fill_plan_torch

DROPPED = -1  # the expert id of a slot that goes to no expert


def max_tiles(num_slots: int, num_experts: int, block_m: int) -> int:
    """Static bound on the number of grouped-GEMM tiles: ceil(S / block_m) + E."""
    return cdiv(num_slots, block_m) + num_experts


def plan_numel(num_slots: int, num_experts: int, block_m: int) -> int:
    """Length of the int32 buffer that holds every field of a plan."""
    return 2 * num_experts + 1 + 2 * num_slots + 2 * max_tiles(num_slots, num_experts, block_m) + 3


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    """Index-based routing of S = T*k slots to E experts (all tensors int32, views of `buffer`)."""

    num_experts: int
    top_k: int
    block_m: int
    buffer: torch.Tensor  # [plan_numel] int32: owns the memory of every field below
    expert_counts: torch.Tensor  # [E]     slots routed to each expert
    expert_offsets: torch.Tensor  # [E+1]  first sorted position of each expert; last = S
    sorted_slots: torch.Tensor  # [S]      slot ids ordered by expert, token order kept (stable)
    slot_positions: torch.Tensor  # [S]    inverse: sorted position of each slot (-1: none)
    tile_expert: torch.Tensor  # [max_tiles] expert of each GEMM tile (E past num_tiles)
    tile_row_start: torch.Tensor  # [max_tiles] sorted position of the tile's first row (S past)
    num_tiles: torch.Tensor  # [1]         number of valid tiles
    # [2] (number of ids outside [0, E) other than DROPPED, S - the lowest slot holding one);
    # (0, 0) when all are valid. Invalid and dropped slots are placed nowhere: expert_offsets[E]
    # = S - their number, their slot_positions are -1 and sorted_slots past expert_offsets[E]
    # is undefined.
    invalid_ids: torch.Tensor

    @classmethod
    def from_buffer(
        cls, buffer: torch.Tensor, num_slots: int, num_experts: int, top_k: int, block_m: int
    ) -> "RoutingPlan":
        """View the fields of a plan inside its int32 `buffer`."""
        tiles = max_tiles(num_slots, num_experts, block_m)
        sizes = [num_experts, num_experts + 1, num_slots, num_slots, tiles, tiles, 1, 2]
        return cls(num_experts, top_k, block_m, buffer, *buffer.split_with_sizes(sizes))

    @property
    def num_slots(self) -> int:
        return self.sorted_slots.numel()

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.numel()


def build_routing_plan(
    topk_ids: torch.Tensor, num_experts: int, *, block_m: int = 64, check_ids: bool | None = None
) -> RoutingPlan:
    """Build the routing plan of `topk_ids [T, k]` for `num_experts` experts.

    One stable counting sort: the compiled CUDA kernel (moeblaze._C) or Triton kernels on CUDA,
    Triton under the interpreter, torch ops elsewhere (`kernelbase.backend_for`); all fill the
    same fields. Slots of id `DROPPED` (-1) are placed nowhere. So are ids outside
    `[0, num_experts)`, which are also counted in `plan.invalid_ids`; whether that raises
    ValueError is `check_ids`:

        None (default)  at once where that costs no host synchronisation (CPU tensors, the torch
                        backend); on CUDA the count is read back without one and raised at the
                        latest by the next moeblaze call (`moeblaze.check_errors()` waits for it)
        True            at once, also on CUDA (one synchronisation): the debugging mode
        False           never; `plan.invalid_ids` tells
    """
    check_routing_args(topk_ids, num_experts)
    check_int("block_m", block_m)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if check_ids is not None:
        check_bool("check_ids", check_ids)
    return make_plan(topk_ids, num_experts, block_m, backend_for(topk_ids.device), check_ids)


def make_plan(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    backend: Backend,
    check_ids: bool | None = None,
) -> RoutingPlan:
    """`build_routing_plan` after its argument checks, on the given backend."""
    deferred.poll()  # errors of earlier calls that the device has reported meanwhile
    num_slots = topk_ids.numel()
    buffer = alloc.empty(
        plan_numel(num_slots, num_experts, block_m), dtype=torch.int32, device=topk_ids.device
    )
    plan = RoutingPlan.from_buffer(buffer, num_slots, num_experts, topk_ids.shape[1], block_m)
    with profile_range("moeblaze.routing_plan"):
        if not has_values(topk_ids):  # meta or fake: the plan's shapes, no values to fill
            pass
        elif backend is Backend.TORCH:
            fill_plan_torch(topk_ids, plan)
        elif _compiled_plan_fits(topk_ids, num_experts):
            fill_routing_plan(topk_ids.contiguous(), plan)
        else:
            launch_plan(topk_ids, plan)
    _report_invalid_ids(plan, topk_ids, check_ids, immediately=backend is Backend.TORCH)
    return plan


def _compiled_plan_fits(topk_ids: torch.Tensor, num_experts: int) -> bool:
    if not topk_ids.is_cuda or topk_ids.dtype not in (torch.int32, torch.int64):
        return False
    module = compiled.load("moeblaze")
    return module is not None and num_experts <= module.MAX_PLAN_EXPERTS


def _report_invalid_ids(plan: RoutingPlan, topk_ids, check_ids: bool | None, immediately: bool):
    if check_ids is False or not has_values(plan.buffer):  # meta or fake: no values to check
        return

    def describe(invalid_ids: list[int]) -> str | None:
        count, past_first = invalid_ids
        if count == 0:
            return None
        slot = plan.num_slots - past_first
        token, choice = divmod(slot, plan.top_k)
        bad = int(topk_ids.reshape(-1)[slot])
        return (
            f"topk_ids contains expert id {bad} (topk_ids[{token}, {choice}], the first of "
            f"{count} ids out of range); expected ids in [0, num_experts={plan.num_experts}) "
            f"or {DROPPED} for a dropped slot"
        )

    if check_ids or immediately:
        if not (plan.buffer.is_cuda and torch.cuda.is_current_stream_capturing()):
            message = describe(plan.invalid_ids.tolist())
            if message is not None:
                raise ValueError(message)
    else:
        deferred.defer(plan.invalid_ids, describe)


def check_routing_args(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Shape and type checks that need no look at the values (safe under torch.compile)."""
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if (
        topk_ids.dtype.is_floating_point
        or topk_ids.dtype.is_complex
        or topk_ids.dtype == torch.bool
    ):
        raise TypeError(f"topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    check_int("num_experts", num_experts)
    top_k = topk_ids.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"topk_ids has k={top_k} columns; expected 1 <= k <= num_experts={num_experts}"
        )
