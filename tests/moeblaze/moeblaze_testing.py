"""Helpers shared by the moeblaze tests (fixtures live in conftest.py).

# T tokens, k top-k, E experts, S = T*k slots (slot s = t*k + j), p sorted position
"""

import math

import torch

from moeblaze.routing_plan import max_tiles, plan_numel


def check_plan(plan, topk_ids, num_experts, block_m):
    """Every documented invariant of a RoutingPlan built from `topk_ids`."""
    T, k = topk_ids.shape
    S = T * k
    E = num_experts
    ids = topk_ids.reshape(-1).long()  # [S]
    assert plan.num_experts == E and plan.top_k == k and plan.block_m == block_m
    assert plan.buffer.dtype == torch.int32 and plan.buffer.numel() == plan_numel(S, E, block_m)
    for field in (
        "expert_counts",
        "expert_offsets",
        "sorted_slots",
        "slot_positions",
        "tile_expert",
        "tile_row_start",
        "num_tiles",
        "invalid_ids",
    ):
        t = getattr(plan, field)
        assert t.dtype == torch.int32, field
        assert t.untyped_storage().data_ptr() == plan.buffer.untyped_storage().data_ptr(), field

    sorted_slots = plan.sorted_slots.long()  # [S]
    positions = plan.slot_positions.long()  # [S]
    counts = plan.expert_counts.long()  # [E]
    offsets = plan.expert_offsets.long()  # [E+1]

    # sorted_slots is a permutation of range(S) and slot_positions its inverse.
    assert torch.equal(sorted_slots.sort().values, torch.arange(S))
    assert torch.equal(positions[sorted_slots], torch.arange(S))
    assert torch.equal(sorted_slots[positions], torch.arange(S))

    # Counts and offsets.
    assert torch.equal(counts, torch.bincount(ids, minlength=E))
    assert offsets.shape == (E + 1,) and offsets[0] == 0 and offsets[-1] == S
    assert plan.invalid_ids.tolist() == [0, 0]  # every id valid
    assert torch.equal(offsets.diff(), counts)  # also: nondecreasing, since counts >= 0
    assert bool((counts >= 0).all())

    # Expert e owns positions [offsets[e], offsets[e+1]), slots in ascending order (stable).
    for e in range(E):
        slots = sorted_slots[offsets[e] : offsets[e + 1]]
        assert bool((ids[slots] == e).all()), f"position of expert {e} holds another expert"
        assert bool((slots.diff() > 0).all()), f"slots of expert {e} not in token order"

    # Tile metadata: tiles cover each expert's positions exactly once, in order.
    assert plan.max_tiles == max_tiles(S, E, block_m) == math.ceil(S / block_m) + E
    num_tiles = int(plan.num_tiles)
    expected_tiles = sum(math.ceil(c / block_m) for c in counts.tolist())
    assert num_tiles == expected_tiles <= plan.max_tiles
    tile_expert = plan.tile_expert.long()
    tile_row_start = plan.tile_row_start.long()
    expected_expert, expected_start = [], []
    for e in range(E):
        for start in range(int(offsets[e]), int(offsets[e + 1]), block_m):
            expected_expert.append(e)
            expected_start.append(start)
    assert tile_expert[:num_tiles].tolist() == expected_expert
    assert tile_row_start[:num_tiles].tolist() == expected_start
    # Padding tiles: expert E and row start S, so a stray read is out of range.
    assert bool((tile_expert[num_tiles:] == E).all())
    assert bool((tile_row_start[num_tiles:] == S).all())
