"""Routing plan tests: the invariants of every field, the Triton kernels (interpreter) against
the torch path buffer for buffer, edge cases and bad input.

# T tokens, k top-k, E experts, S = T*k slots (slot s = t*k + j), p sorted position
"""

import math
import os

import pytest
import torch

from moeblaze import build_routing_plan
from moeblaze.routing_plan import max_tiles, plan_numel

# (T, E, k, routing, block_m): the interpreter is slow, so S stays at a few thousand at most.
CASES = {
    "T0": (0, 4, 2, "random", 16),
    "T1": (1, 4, 2, "random", 16),
    "E1": (50, 1, 1, "random", 16),
    "E256": (40, 256, 8, "random", 16),
    "k=E": (30, 6, 6, "random", 16),
    "one_expert_k1": (100, 8, 1, "one_expert", 16),
    "one_expert_k3": (50, 8, 3, "one_expert", 64),
    "empty_experts": (64, 10, 2, "skip_experts", 16),
    "S_odd": (37, 5, 3, "random", 16),
    "S_odd_bm64": (37, 5, 3, "random", 64),
    "S_odd_bm128": (300, 7, 2, "random", 128),
    "chunks": (600, 16, 4, "random", 64),  # S = 2400: 5 chunks of 512 under the interpreter
}


def _ids(T, E, k, routing, seed=0, dtype=torch.int64):
    """Distinct ids per token, like a router's top-k."""
    g = torch.Generator().manual_seed(seed)
    if routing == "one_expert":
        ids = torch.tensor([E - 1, *range(k - 1)]).expand(T, k)
    else:
        allowed = torch.arange(0, E, 2) if routing == "skip_experts" else torch.arange(E)
        ids = allowed[torch.randn(T, len(allowed), generator=g).topk(k, dim=-1).indices]
    return ids.to(dtype).contiguous()


def check_plan(plan, topk_ids, num_experts, block_m):
    """Every documented invariant of a RoutingPlan built from `topk_ids`."""
    T, k = topk_ids.shape
    S = T * k
    E = num_experts
    ids = topk_ids.reshape(-1).long()  # [S]
    assert plan.num_experts == E and plan.top_k == k and plan.block_m == block_m
    assert plan.buffer.dtype == torch.int32 and plan.buffer.numel() == plan_numel(S, E, block_m)
    for field in ("expert_counts", "expert_offsets", "sorted_slots", "slot_positions",
                  "tile_expert", "tile_row_start", "num_tiles"):  # fmt: skip
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


def _build_both(topk_ids, num_experts, block_m, monkeypatch):
    """The plan from the Triton kernels (interpreter) and from the torch path."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    triton_plan = build_routing_plan(topk_ids, num_experts, block_m=block_m)
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")
        torch_plan = build_routing_plan(topk_ids, num_experts, block_m=block_m)
    return triton_plan, torch_plan


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan_invariants_triton_equals_torch(case, dtype, monkeypatch):
    T, E, k, routing, block_m = case
    topk_ids = _ids(T, E, k, routing, dtype=dtype)
    triton_plan, torch_plan = _build_both(topk_ids, E, block_m, monkeypatch)
    check_plan(triton_plan, topk_ids, E, block_m)
    check_plan(torch_plan, topk_ids, E, block_m)
    assert torch.equal(triton_plan.buffer, torch_plan.buffer)


@pytest.mark.parametrize("seed", range(3))
def test_random_plans(seed, monkeypatch):
    g = torch.Generator().manual_seed(100 + seed)
    E = int(torch.randint(1, 40, (), generator=g))
    k = int(torch.randint(1, min(E, 8) + 1, (), generator=g))
    T = int(torch.randint(0, 300, (), generator=g))
    topk_ids = _ids(T, E, k, "random", seed=seed)
    triton_plan, torch_plan = _build_both(topk_ids, E, 16, monkeypatch)
    check_plan(triton_plan, topk_ids, E, 16)
    assert torch.equal(triton_plan.buffer, torch_plan.buffer)


@pytest.mark.parametrize(
    "dtype, E",
    [(torch.int16, 40), (torch.uint8, 100), (torch.uint8, 200)],
    ids=["int16", "uint8_E100", "uint8_E200"],
)
def test_narrow_integer_ids(dtype, E, monkeypatch):
    # Any integer dtype is accepted. The kernels pad partial blocks with id E_PAD (the next
    # power of two >= E); with uint8 ids and E > 128 that is 256, which must not wrap to 0.
    topk_ids = _ids(37, E, 1, "random", dtype=dtype)
    triton_plan, torch_plan = _build_both(topk_ids, E, 16, monkeypatch)
    check_plan(torch_plan, topk_ids, E, 16)
    check_plan(triton_plan, topk_ids, E, 16)
    assert torch.equal(triton_plan.buffer, torch_plan.buffer)


def test_non_contiguous_ids(monkeypatch):
    topk_ids = _ids(40, 8, 6, "random")[:, ::2]  # [40, 3], stride 6
    assert not topk_ids.is_contiguous()
    triton_plan, torch_plan = _build_both(topk_ids, 8, 16, monkeypatch)
    check_plan(triton_plan, topk_ids, 8, 16)
    assert torch.equal(triton_plan.buffer, torch_plan.buffer)


def test_plan_is_reproducible():
    topk_ids = _ids(200, 12, 3, "random", seed=7)
    first = build_routing_plan(topk_ids, 12, block_m=16).buffer
    assert torch.equal(first, build_routing_plan(topk_ids, 12, block_m=16).buffer)


@pytest.mark.parametrize(
    "topk_ids, num_experts, block_m, error, match",
    [
        (torch.zeros(4, 2), 4, 16, TypeError, "topk_ids must have an integer dtype"),
        (torch.zeros(4, 2, dtype=torch.bool), 4, 16, TypeError, "topk_ids must have an integer"),
        (torch.zeros(8, dtype=torch.int64), 4, 16, ValueError, r"topk_ids must be 2-D"),
        (torch.zeros(2, 4, 1, dtype=torch.int64), 4, 16, ValueError, r"topk_ids must be 2-D"),
        (torch.zeros(4, 5, dtype=torch.int64), 4, 16, ValueError, r"topk_ids has k=5"),
        (torch.tensor([[0, 4]]), 4, 16, ValueError, r"topk_ids contains expert id 4"),
        (torch.tensor([[-1, 2]]), 4, 16, ValueError, r"topk_ids contains expert id -1"),
        (torch.tensor([[0, 1]], dtype=torch.int32), 0, 16, ValueError, "num_experts"),
        (torch.tensor([[0, 1]]), 4, 48, ValueError, "block_m must be a power of two"),
        (torch.tensor([[0, 1]]), 4, 8, ValueError, "block_m must be a power of two >= 16"),
    ],
    ids=["float", "bool", "1-D", "3-D", "k>E", "id=E", "id=-1", "E=0", "bm48", "bm8"],
)
def test_bad_input(topk_ids, num_experts, block_m, error, match):
    with pytest.raises(error, match=match):
        build_routing_plan(topk_ids, num_experts, block_m=block_m)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="topk_ids must be a torch.Tensor"):
        build_routing_plan([[0, 1]], 4)


def test_check_ids_false_skips_the_range_check():
    # The documented escape hatch (no device-to-host sync): valid ids still give a valid plan.
    topk_ids = _ids(20, 6, 2, "random")
    check_plan(build_routing_plan(topk_ids, 6, block_m=16, check_ids=False), topk_ids, 6, 16)
