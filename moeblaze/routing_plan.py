"""The routing plan: where every (token, choice) slot goes, as a handful of int32 tensors.

# T tokens, k top-k, E experts, S = T*k slots (slot s = t*k + j routes token t to topk_ids[t, j])

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
import triton

from kernelbase import alloc
from kernelbase.backend import Backend, backend_for
from kernelbase.profiling import profile_range
from moeblaze.kernels.routing_plan import launch_plan
from moeblaze.reference import fill_plan_torch


def max_tiles(num_slots: int, num_experts: int, block_m: int) -> int:
    """Static bound on the number of grouped-GEMM tiles: ceil(S / block_m) + E."""
    return triton.cdiv(num_slots, block_m) + num_experts


def plan_numel(num_slots: int, num_experts: int, block_m: int) -> int:
    """Length of the int32 buffer that holds every field of a plan."""
    return 2 * num_experts + 1 + 2 * num_slots + 2 * max_tiles(num_slots, num_experts, block_m) + 1


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
    slot_positions: torch.Tensor  # [S]    inverse: sorted position of each slot
    tile_expert: torch.Tensor  # [max_tiles] expert of each GEMM tile (E past num_tiles)
    tile_row_start: torch.Tensor  # [max_tiles] sorted position of the tile's first row (S past)
    num_tiles: torch.Tensor  # [1]         number of valid tiles

    @classmethod
    def from_buffer(
        cls, buffer: torch.Tensor, num_slots: int, num_experts: int, top_k: int, block_m: int
    ) -> "RoutingPlan":
        """View the fields of a plan inside its int32 `buffer`."""
        tiles = max_tiles(num_slots, num_experts, block_m)
        sizes = [num_experts, num_experts + 1, num_slots, num_slots, tiles, tiles, 1]
        fields = torch.split(buffer, sizes)
        return cls(num_experts, top_k, block_m, buffer, *fields)

    @property
    def num_slots(self) -> int:
        return self.sorted_slots.numel()

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.numel()


def build_routing_plan(
    topk_ids: torch.Tensor, num_experts: int, *, block_m: int = 64, check_ids: bool = True
) -> RoutingPlan:
    """Build the routing plan of `topk_ids [T, k]` for `num_experts` experts.

    One stable counting sort: Triton kernels on CUDA (and under the Triton interpreter), torch
    ops elsewhere (`kernelbase.backend_for`); both fill the same fields. `check_ids=True`
    verifies that every id lies in `[0, num_experts)`, which costs one device-to-host sync
    (skipped during CUDA graph capture).
    """
    check_routing_args(topk_ids, num_experts)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if check_ids:
        check_ids_in_range(topk_ids, num_experts)
    return make_plan(topk_ids, num_experts, block_m, backend_for(topk_ids.device))


def make_plan(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, backend: Backend
) -> RoutingPlan:
    """`build_routing_plan` without its checks, on the given backend (the checks ran already)."""
    num_slots = topk_ids.numel()
    buffer = alloc.empty(
        plan_numel(num_slots, num_experts, block_m), dtype=torch.int32, device=topk_ids.device
    )
    plan = RoutingPlan.from_buffer(buffer, num_slots, num_experts, topk_ids.shape[1], block_m)
    with profile_range("moeblaze.routing_plan"):
        if backend is Backend.TORCH:
            fill_plan_torch(topk_ids, plan)
        else:
            launch_plan(topk_ids, plan)
    return plan


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
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    top_k = topk_ids.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"topk_ids has k={top_k} columns; expected 1 <= k <= num_experts={num_experts}"
        )


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError if an id lies outside [0, num_experts) (one device-to-host sync).

    Skipped while a CUDA graph is being captured, where a sync is not allowed.
    """
    if topk_ids.numel() == 0 or (topk_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low, high = (int(v) for v in torch.aminmax(topk_ids))
    if low < 0 or high >= num_experts:
        bad = low if low < 0 else high
        raise ValueError(
            f"topk_ids contains expert id {bad}; expected ids in [0, num_experts={num_experts})"
        )
