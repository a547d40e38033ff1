"""Routing plan tests: the invariants of every field, the Triton kernels (interpreter) against
the torch path buffer for buffer, edge cases and bad input.

# T tokens, k top-k, E experts, S = T*k slots (slot s = t*k + j), p sorted position
"""

import pytest
import torch
from moeblaze_testing import check_plan

import moeblaze
from kernelbase.backend import Backend, backend_for
from moeblaze import build_routing_plan
from moeblaze.kernels.routing_plan import launch_plan
from moeblaze.reference import fill_plan_torch

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


def _build_both(topk_ids, num_experts, block_m):
    """The plan from the Triton kernels (interpreter) and from the torch path."""
    assert backend_for(topk_ids.device) is Backend.INTERPRETER
    triton_plan = build_routing_plan(topk_ids, num_experts, block_m=block_m)
    with moeblaze.use_backend("torch"):
        torch_plan = build_routing_plan(topk_ids, num_experts, block_m=block_m)
    return triton_plan, torch_plan


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan_invariants_triton_equals_torch(case, dtype):
    T, E, k, routing, block_m = case
    topk_ids = _ids(T, E, k, routing, dtype=dtype)
    triton_plan, torch_plan = _build_both(topk_ids, E, block_m)
    check_plan(triton_plan, topk_ids, E, block_m)
    check_plan(torch_plan, topk_ids, E, block_m)
    assert torch.equal(triton_plan.buffer, torch_plan.buffer)


@pytest.mark.parametrize("seed", range(3))
def test_random_plans(seed):
    g = torch.Generator().manual_seed(100 + seed)
    E = int(torch.randint(1, 40, (), generator=g))
    k = int(torch.randint(1, min(E, 8) + 1, (), generator=g))
    T = int(torch.randint(0, 300, (), generator=g))
    topk_ids = _ids(T, E, k, "random", seed=seed)
    triton_plan, torch_plan = _build_both(topk_ids, E, 16)
    check_plan(triton_plan, topk_ids, E, 16)
    assert torch.equal(triton_plan.buffer, torch_plan.buffer)


@pytest.mark.parametrize(
    "dtype, E",
    [(torch.int16, 40), (torch.uint8, 100), (torch.uint8, 200)],
    ids=["int16", "uint8_E100", "uint8_E200"],
)
def test_narrow_integer_ids(dtype, E):
    # Any integer dtype is accepted. The kernels pad partial blocks with id E_PAD (the next
    # power of two >= E); with uint8 ids and E > 128 that is 256, which must not wrap to 0.
    topk_ids = _ids(37, E, 1, "random", dtype=dtype)
    triton_plan, torch_plan = _build_both(topk_ids, E, 16)
    check_plan(torch_plan, topk_ids, E, 16)
    check_plan(triton_plan, topk_ids, E, 16)
    assert torch.equal(triton_plan.buffer, torch_plan.buffer)


def test_non_contiguous_ids():
    topk_ids = _ids(40, 8, 6, "random")[:, ::2]  # [40, 3], stride 6
    assert not topk_ids.is_contiguous()
    triton_plan, torch_plan = _build_both(topk_ids, 8, 16)
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
        (torch.tensor([[-2, 2]]), 4, 16, ValueError, r"topk_ids contains expert id -2"),
        (torch.tensor([[0, 1]], dtype=torch.int32), 0, 16, ValueError, "num_experts"),
        (torch.tensor([[0, 1]]), 4, 48, ValueError, "block_m must be a power of two"),
        (torch.tensor([[0, 1]]), 4, 8, ValueError, "block_m must be a power of two >= 16"),
        (torch.tensor([[0, 1]]), 4.0, 16, TypeError, "num_experts must be an int, got float"),
        (torch.tensor([[0, 1]]), 4, 64.0, TypeError, "block_m must be an int, got float 64.0"),
    ],
    ids=[
        "float",
        "bool",
        "1-D",
        "3-D",
        "k>E",
        "id=E",
        "id=-2",
        "E=0",
        "bm48",
        "bm8",
        "E-float",
        "bm-float",
    ],
)
def test_bad_input(topk_ids, num_experts, block_m, error, match):
    with pytest.raises(error, match=match):
        build_routing_plan(topk_ids, num_experts, block_m=block_m)


def test_check_ids_must_be_none_or_a_bool():
    with pytest.raises(TypeError, match="check_ids must be a bool, got str 'x'"):
        build_routing_plan(torch.tensor([[0, 1]]), 4, check_ids="x")


def test_a_plan_of_ids_without_values_has_the_shapes_only():
    # meta ids (a model built on the meta device): the plan's fields with no values to fill
    plan = build_routing_plan(torch.zeros(5, 2, dtype=torch.int64, device="meta"), 4)
    assert plan.buffer.is_meta and plan.sorted_slots.shape == (10,)
    assert plan.tile_expert.shape == (plan.max_tiles,)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="topk_ids must be a torch.Tensor"):
        build_routing_plan([[0, 1]], 4)


def test_check_ids_false_skips_the_range_check():
    # The documented escape hatch: valid ids still give a valid plan.
    topk_ids = _ids(20, 6, 2, "random")
    check_plan(build_routing_plan(topk_ids, 6, block_m=16, check_ids=False), topk_ids, 6, 16)


@pytest.mark.parametrize("backend", [None, "torch"], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_invalid_ids_are_placed_nowhere_and_counted(backend, dtype):
    """What keeps a kernel in bounds whatever the ids: the slots of ids outside [0, E) (negative,
    E, or an int64 that would wrap into range as int32) and the dropped slots (-1) get no
    position, expert_offsets[E] is S less their number, `invalid_ids` = (the number of invalid
    ones, S - the lowest such slot; dropped slots are no error), and the valid slots are placed
    exactly as without them; the slot_positions of the slots placed nowhere are -1."""
    T, E, k = 300, 6, 2
    topk_ids = _ids(T, E, k, "random").to(dtype)
    flat = topk_ids.view(-1)
    big = 2**32 + 1 if dtype == torch.int64 else 2**31 - 1  # int64: wraps to id 1 as int32
    bad = {37: -2, 38: E, 251: big, 599: -(2**20)}
    dropped = {0: -1, 36: -1, 40: -1, 598: -1}
    for slot, value in {**bad, **dropped}.items():
        flat[slot] = value
    S, valid = T * k, T * k - len(bad) - len(dropped)
    guard = 64
    with moeblaze.use_backend(backend):
        plan = build_routing_plan(topk_ids, E, block_m=16, check_ids=False)
        backing = torch.full((plan.buffer.numel() + 2 * guard,), 12345, dtype=torch.int32)
        guarded = moeblaze.RoutingPlan.from_buffer(backing[guard:-guard], S, E, k, 16)
        fill = fill_plan_torch if backend == "torch" else launch_plan
        fill(topk_ids, guarded)
    assert (backing[:guard] == 12345).all() and (backing[-guard:] == 12345).all()
    assert plan.invalid_ids.tolist() == [len(bad), S - 37]
    assert int(plan.expert_offsets[E]) == valid
    keep = torch.ones(S, dtype=torch.bool)
    keep[list(bad) + list(dropped)] = False
    ids = flat.long()
    assert torch.equal(plan.expert_counts.long(), torch.bincount(ids[keep], minlength=E))
    expected = torch.arange(S)[keep][torch.sort(ids[keep], stable=True).indices]
    assert torch.equal(plan.sorted_slots[:valid].long(), expected)
    positions = torch.full((S,), -1)  # the slots placed nowhere have position -1
    positions[expected] = torch.arange(valid)
    assert torch.equal(plan.slot_positions.long(), positions)
    for field in (
        "expert_counts",
        "expert_offsets",
        "slot_positions",
        "tile_expert",
        "tile_row_start",
    ):
        assert torch.equal(getattr(plan, field), getattr(guarded, field)), field


@pytest.mark.parametrize("backend", [None, "torch"], ids=["triton", "torch"])
def test_invalid_ids_raise_at_once_on_the_cpu(backend):
    topk_ids = _ids(50, 6, 2, "random")
    topk_ids[7, 1] = 9
    with (
        moeblaze.use_backend(backend),
        pytest.raises(
            ValueError,
            match=r"topk_ids contains expert id 9 \(topk_ids\[7, 1\], the first of 1 ids out of "
            r"range\); expected ids in \[0, num_experts=6\) or -1 for a dropped slot",
        ),
    ):
        build_routing_plan(topk_ids, 6, block_m=16)
