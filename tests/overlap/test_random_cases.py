"""Random cases: all_gather_matmul and matmul_reduce_scatter on a LocalWorld (the fused kernels
under the interpreter, and the pipelined and serial schedules) against the float64 reference,
forward and both gradients, over world sizes, shapes (inner and output sizes no multiple of any
block, single rows and columns, empty shards), chunk sizes and emulated links drawn from a seeded
generator; and back-to-back fused calls of random shapes without a host synchronisation. The same
cases on every run, each its own test.

# W ranks, m rows per rank shard, M = W*m, K inner, n columns
"""

import random

import pytest
from overlap_testing import (
    RTOL,
    assert_matches_float64,
    assert_tiles_once,
    check_back_to_back_calls,
    randn,
)

import overlap
from overlap.reference import all_gather_matmul_ref, matmul_reduce_scatter_ref

OPS = {
    "ag": (overlap.all_gather_matmul, all_gather_matmul_ref),
    "rs": (overlap.matmul_reduce_scatter, matmul_reduce_scatter_ref),
}
CASES = 60


def _case(seed: int) -> dict:
    rng = random.Random(seed)
    return dict(
        op=rng.choice(sorted(OPS)),
        mode=rng.choice(["fused", "fused", "pipelined", "serial"]),
        W=rng.randint(1, 4),
        m=0 if rng.random() < 0.1 else rng.randint(1, 24),
        K=rng.randint(1, 48),
        n=rng.randint(1, 40),
        chunk_m=rng.randint(1, 32),
        link_gbps=0.5 if rng.random() < 0.25 else None,  # an emulated slow link, or none
    )


@pytest.mark.parametrize("seed", range(CASES))
def test_ops_match_reference(seed):
    case = _case(seed)
    W, m, K, n = (case[name] for name in ("W", "m", "K", "n"))
    config = overlap.OverlapConfig(chunk_m=case["chunk_m"], count_tiles=case["mode"] == "fused")
    world = overlap.LocalWorld(
        W, "cpu", mode=case["mode"], config=config, link_gbps=case["link_gbps"]
    )
    op, reference = OPS[case["op"]]
    rows = m if case["op"] == "ag" else W * m  # a: [W, m, K] shards, or [W, M, K] partials
    a = randn(W, rows, K, seed=seed).requires_grad_()
    b = randn(W, K, n, seed=seed + 1).requires_grad_()
    c = op(a, b, world)
    if case["mode"] == "fused" and m > 0:  # (no rows: the serial path)
        assert_tiles_once(world)
    dc = randn(*c.shape, seed=seed + 2)
    assert_matches_float64(c, a, b, reference, dc, rtol=RTOL[a.dtype], what=f"{case} ")


@pytest.mark.parametrize("seed", range(8))
def test_back_to_back_calls(seed):
    """Fused calls of both ops, forward and backward, with a random shape each and no host
    synchronisation until the end, on a world of random size and chunking."""
    rng = random.Random(seed)
    config = overlap.OverlapConfig(chunk_m=rng.choice([3, 8, 16]), sync_status=False)
    world = overlap.LocalWorld(rng.randint(1, 4), "cpu", mode="fused", config=config)
    check_back_to_back_calls(world, calls=4, small=(16, 64, 16), seed=seed)
