"""Triton kernels that build the routing plan: a stable counting sort of slots by expert.

# T tokens, k top-k, E experts (padded to E_PAD), S = T*k slots (slot s = t*k + j),
# C chunks of CHUNK slots

Two launches over `topk_ids` viewed as `[S]`, C programs each, one chunk per program:
1. `count_chunks_kernel`: histogram of the chunk's expert ids -> `chunk_counts[0] [C, E_PAD]`.
2. `place_slots_kernel`: from all chunk counts, the expert offsets and this chunk's first
   position inside each expert; then the chunk's slots sorted in registers by (expert, slot),
   which keeps token order within an expert (stable), each written to its sorted position:
   `sorted_slots [S]` and the inverse `slot_positions [S]` (-1 for a slot placed nowhere).
   The programs also share the tile metadata of the grouped GEMMs; program 0 writes counts,
   offsets and the tile count.

Dropped slots (id -1) and ids outside [0, E) are placed nowhere (expert_offsets[E] is then
less than S), so no id can make a kernel read or write out of bounds; the latter are counted in
`invalid_ids` with the kernels' only atomics, which touch nothing else: the plan is the same on
every run. Every chunk is loaded once per launch in a single vector load. `chunk_counts[1]` is
per-program scratch: each program stores the base position of each expert there and reads it
back by expert id (a gather registers cannot do).

`launch_plan` at the end is the launcher: it sizes the chunks and launches both kernels.
"""

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kernelbase.backend import COMPILE_OPTIONS, interpreting
from kernelbase.intmath import cdiv, next_power_of_2

if TYPE_CHECKING:
    from moeblaze.routing_plan import RoutingPlan


@triton.jit
def _load_ids(
    topk_ids_ptr, chunk, num_slots, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr
):
    """The chunk's slots [CHUNK], their expert ids as int32 and which ids are invalid.

    Slots past the end, dropped slots (id -1) and ids outside [0, num_experts) (compared before
    the int32 cast, so that no id wraps into range) read as E_PAD, no expert: they are placed
    nowhere. Only the last are invalid.
    """
    slots = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = slots < num_slots
    raw = tl.load(topk_ids_ptr + slots, mask=in_range, other=0)
    placed = in_range & (raw >= 0) & (raw < num_experts)
    invalid = in_range & ~placed & (raw.to(tl.int64) != -1)  # (cast: ids may be unsigned)
    return slots, tl.where(placed, raw.to(tl.int32), E_PAD), invalid


@triton.jit
def count_chunks_kernel(
    topk_ids_ptr,  # [S] any integer dtype
    chunk_counts_ptr,  # [2, C, E_PAD] int32; this kernel fills [0]
    invalid_ptr,  # [2] int32, zeros before: (invalid ids, S - lowest slot holding one)
    num_slots,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    chunk = tl.program_id(0)
    slots, ids, invalid = _load_ids(topk_ids_ptr, chunk, num_slots, num_experts, CHUNK, E_PAD)
    bins = tl.arange(0, 2 * E_PAD)  # bin E_PAD collects the slots past the end and invalid ids
    counts = tl.histogram(ids, 2 * E_PAD)
    tl.store(chunk_counts_ptr + chunk * E_PAD + bins, counts, mask=bins < E_PAD)
    bad = tl.sum(invalid.to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_add(invalid_ptr, bad, sem="relaxed")
        tl.atomic_max(
            invalid_ptr + 1, num_slots - tl.min(tl.where(invalid, slots, num_slots), axis=0)
        )


@triton.jit
def place_slots_kernel(
    topk_ids_ptr,  # [S]
    chunk_counts_ptr,  # [2, C, E_PAD] int32: [0] counts, [1] scratch
    expert_counts_ptr,  # [E] int32
    expert_offsets_ptr,  # [E+1] int32
    sorted_slots_ptr,  # [S] int32
    slot_positions_ptr,  # [S] int32
    tile_expert_ptr,  # [max_tiles] int32
    tile_row_start_ptr,  # [max_tiles] int32
    num_tiles_ptr,  # [1] int32
    num_slots,
    num_chunks,
    num_experts,
    max_tiles,
    tiles_per_program,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK_ROWS: tl.constexpr,
    TILE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_PAD)

    # Totals over all chunks, and the counts of the chunks before this one.
    totals = tl.zeros((E_PAD,), dtype=tl.int32)
    before = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_ROWS):
        rows = c0 + tl.arange(0, CHUNK_ROWS)
        block = tl.load(
            chunk_counts_ptr + rows[:, None] * E_PAD + experts[None, :],
            mask=(rows < num_chunks)[:, None],
            other=0,
        )
        totals += tl.sum(block, axis=0)
        before += tl.sum(tl.where((rows < chunk)[:, None], block, 0), axis=0)
    ends = tl.cumsum(totals, axis=0)
    offsets = ends - totals  # exclusive prefix sum: first sorted position of each expert

    if chunk == 0:
        valid = experts < num_experts
        tl.store(expert_counts_ptr + experts, totals, mask=valid)
        tl.store(expert_offsets_ptr + experts, offsets, mask=valid)
        # S, less the slots of invalid ids, which are placed nowhere.
        tl.store(expert_offsets_ptr + num_experts, tl.sum(totals, axis=0))

    # Sort the chunk by (expert, slot). The j-th slot of the sorted chunk, of expert e, goes to
    # offsets[e] + before[e] + (j - first index of expert e in the sorted chunk).
    slots, ids, _ = _load_ids(topk_ids_ptr, chunk, num_slots, num_experts, CHUNK, E_PAD)
    keys = tl.sort(ids * CHUNK + (slots - chunk * CHUNK))
    sorted_ids = keys // CHUNK
    sorted_slots = chunk * CHUNK + keys % CHUNK
    mine = tl.load(chunk_counts_ptr + chunk * E_PAD + experts)
    base = offsets + before - (tl.cumsum(mine, axis=0) - mine)  # [E_PAD]
    scratch = chunk_counts_ptr + (num_chunks + chunk) * E_PAD
    tl.store(scratch + experts, base)
    tl.debug_barrier()  # the stores above are visible to every thread of the program
    real = sorted_ids < E_PAD
    in_plan = sorted_slots < num_slots  # the slots placed nowhere get position -1
    positions = tl.load(scratch + sorted_ids, mask=real, other=0) + tl.arange(0, CHUNK)
    tl.store(sorted_slots_ptr + positions, sorted_slots, mask=real)
    tl.store(slot_positions_ptr + sorted_slots, tl.where(real, positions, -1), mask=in_plan)

    # Tile metadata: expert e owns tiles [tile_end[e] - tiles[e], tile_end[e]).
    tiles = (totals + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    num_tiles = tl.sum(tiles, axis=0)
    if chunk == 0:
        tl.store(num_tiles_ptr, num_tiles)
    # Row start of the tile's first row minus BLOCK_M * its tile index, per expert.
    row_base = offsets - (tile_end - tiles) * BLOCK_M
    for t0 in range(0, tiles_per_program, TILE_BLOCK):
        local = t0 + tl.arange(0, TILE_BLOCK)
        tile = chunk * tiles_per_program + local
        owner = tl.sum((tile_end[None, :] <= tile[:, None]).to(tl.int32), axis=1)
        owner_hot = (owner[:, None] == experts[None, :]).to(tl.int32)  # [TILE_BLOCK, E_PAD]
        row_start = tile * BLOCK_M + tl.sum(owner_hot * row_base[None, :], axis=1)
        is_tile = tile < num_tiles
        # Past the last tile: expert E and row start S, so a stray read is out of range.
        owner = tl.where(is_tile, owner, num_experts)
        row_start = tl.where(is_tile, row_start, num_slots)
        store = (tile < max_tiles) & (local < tiles_per_program)
        tl.store(tile_expert_ptr + tile, owner, mask=store)
        tl.store(tile_row_start_ptr + tile, row_start, mask=store)


# ---------------------------------------------------------------------------------------------
# Launcher


def launch_plan(topk_ids: torch.Tensor, plan: "RoutingPlan") -> None:
    """Fill every field of `plan` from `topk_ids [T, k]` (ids already checked) with two launches."""
    num_slots, num_experts = plan.num_slots, plan.num_experts
    e_pad = max(16, next_power_of_2(num_experts))
    # CHUNK: about 128 programs on large inputs (one per SM on H100), 8 under the interpreter
    # (which runs programs one after another); at least 64 slots each.
    programs = 8 if interpreting() else 128
    chunk = min(4096, max(64, next_power_of_2(cdiv(num_slots, programs))))
    num_chunks = max(1, cdiv(num_slots, chunk))
    chunk_counts = torch.empty(2, num_chunks, e_pad, dtype=torch.int32, device=topk_ids.device)
    ids = topk_ids.reshape(-1).contiguous()  # the kernels read ids with unit stride
    plan.invalid_ids.zero_()
    count_chunks_kernel[(num_chunks,)](
        ids,
        chunk_counts,
        plan.invalid_ids,
        num_slots,
        num_experts,
        CHUNK=chunk,
        E_PAD=e_pad,
        **COMPILE_OPTIONS,
    )
    place_slots_kernel[(num_chunks,)](
        ids,
        chunk_counts,
        plan.expert_counts,
        plan.expert_offsets,
        plan.sorted_slots,
        plan.slot_positions,
        plan.tile_expert,
        plan.tile_row_start,
        plan.num_tiles,
        num_slots,
        num_chunks,
        num_experts,
        plan.max_tiles,
        cdiv(plan.max_tiles, num_chunks),
        CHUNK=chunk,
        E_PAD=e_pad,
        CHUNK_ROWS=max(1, 2048 // e_pad),  # [CHUNK_ROWS, E_PAD] blocks of chunk counts
        TILE_BLOCK=max(16, 4096 // e_pad),  # [TILE_BLOCK, E_PAD] blocks of tile metadata
        BLOCK_M=plan.block_m,
        **COMPILE_OPTIONS,
    )
