"""Triton kernels that build the routing plan: a stable counting sort of slots by expert.

# T tokens, k top-k, E experts, S = T*k slots (slot s = t*k + j), C chunks of CHUNK slots

Two launches over `topk_ids` viewed as `[S]`:
1. `count_chunks_kernel`: each program histograms its chunk of slots into `chunk_counts [C, E]`.
2. `place_slots_kernel`: each program derives, from all chunk counts, the expert offsets and the
   first free position of every expert for its chunk, then places its slots in token order
   (stable), writing `sorted_slots [S]` and the inverse `slot_positions [S]`. The programs also
   share the tile metadata of the grouped GEMMs; program 0 writes counts, offsets and the tile
   count. No comparison sort, no atomics: the result is the same on every run.
"""

import triton
import triton.language as tl


@triton.jit
def _load_ids(topk_ids_ptr, slots, in_range, E_PAD: tl.constexpr):
    """Expert ids of `slots` as int32; E_PAD (no expert) past the end, whatever the id dtype."""
    ids = tl.load(topk_ids_ptr + slots, mask=in_range, other=0).to(tl.int32)
    return tl.where(in_range, ids, E_PAD)


@triton.jit
def count_chunks_kernel(
    topk_ids_ptr,  # [S] any integer dtype
    chunk_counts_ptr,  # [C, E_PAD] int32
    num_slots,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    E_PAD: tl.constexpr,
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for sub in range(0, CHUNK, SUB):
        slots = chunk * CHUNK + sub + tl.arange(0, SUB)
        ids = _load_ids(topk_ids_ptr, slots, slots < num_slots, E_PAD)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [SUB, E_PAD]
        counts += tl.sum(one_hot, axis=0)
    tl.store(chunk_counts_ptr + chunk * E_PAD + experts, counts)


@triton.jit
def place_slots_kernel(
    topk_ids_ptr,  # [S]
    chunk_counts_ptr,  # [C, E_PAD] int32
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
    SUB: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_PAD)

    # Totals over all chunks, and the counts of the chunks before this one.
    totals = tl.zeros((E_PAD,), dtype=tl.int32)
    before = tl.zeros((E_PAD,), dtype=tl.int32)
    for c in range(0, num_chunks):
        row = tl.load(chunk_counts_ptr + c * E_PAD + experts)
        totals += row
        before += tl.where(c < chunk, row, 0)
    ends = tl.cumsum(totals, axis=0)
    offsets = ends - totals  # exclusive prefix sum: first sorted position of each expert

    if chunk == 0:
        valid = experts < num_experts
        tl.store(expert_counts_ptr + experts, totals, mask=valid)
        tl.store(expert_offsets_ptr + experts, offsets, mask=valid)
        tl.store(expert_offsets_ptr + num_experts, num_slots)

    # Place this chunk's slots: position = offset + earlier chunks + earlier slots of this chunk.
    running = offsets + before
    for sub in range(0, CHUNK, SUB):
        slots = chunk * CHUNK + sub + tl.arange(0, SUB)
        in_range = slots < num_slots
        ids = _load_ids(topk_ids_ptr, slots, in_range, E_PAD)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [SUB, E_PAD]
        rank = tl.cumsum(one_hot, axis=0) - one_hot  # same-expert slots before, in this block
        positions = tl.sum(one_hot * (running[None, :] + rank), axis=1)
        tl.store(sorted_slots_ptr + positions, slots, mask=in_range)
        tl.store(slot_positions_ptr + slots, positions, mask=in_range)
        running += tl.sum(one_hot, axis=0)

    # Tile metadata: expert e owns tiles [tile_end[e] - tiles[e], tile_end[e]).
    tiles = (totals + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    num_tiles = tl.sum(tiles, axis=0)
    if chunk == 0:
        tl.store(num_tiles_ptr, num_tiles)
    # Row start of the tile's first row minus BLOCK_M * its tile index, per expert.
    row_base = offsets - (tile_end - tiles) * BLOCK_M
    for t0 in range(0, tiles_per_program, SUB):
        tile = chunk * tiles_per_program + t0 + tl.arange(0, SUB)
        owner = tl.sum((tile_end[None, :] <= tile[:, None]).to(tl.int32), axis=1)
        owner_hot = (owner[:, None] == experts[None, :]).to(tl.int32)
        row_start = tile * BLOCK_M + tl.sum(owner_hot * row_base[None, :], axis=1)
        is_tile = tile < num_tiles
        # Past the last tile: expert E and row start S, so a stray read is out of range.
        owner = tl.where(is_tile, owner, num_experts)
        row_start = tl.where(is_tile, row_start, num_slots)
        store = (tile < max_tiles) & (t0 + tl.arange(0, SUB) < tiles_per_program)
        tl.store(tile_expert_ptr + tile, owner, mask=store)
        tl.store(tile_row_start_ptr + tile, row_start, mask=store)
