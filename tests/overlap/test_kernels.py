"""The fused kernels, launched directly for one rank: tile order, coverage, flags and timeouts.

# W ranks, m rows per rank, K inner, n columns, CH chunk rows; BLOCK_M = 16 on the interpreter

Outputs are NaN-poisoned before each launch, and a debug buffer counts how often every output
tile was computed (and at which position of the walk), so a skipped or doubled tile fails.
"""

import dataclasses
import time

import pytest
import torch
import triton
from overlap_testing import RTOL, randn
from tolerance import assert_close

from overlap.fused import INTERPRETER_TILE_CONFIG
from overlap.kernels.ag_gemm import ag_gemm_tiles, launch_ag_gemm
from overlap.kernels.flags import launch_wait_peers
from overlap.kernels.gemm_rs import gemm_rs_tiles, launch_gemm_rs, launch_rs_reduce
from overlap.protocol import HEADER_WORDS, SLOT_WORDS, header_slot

# The interpreter on CPU-only machines (tests/conftest.py), the compiled kernels on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Pointer loads: the AG-GEMM reads the local rows from the shard without waiting on their flags
# (with tensor descriptors it reads them from the gather buffer: tests/overlap/test_local_world).
TILE = dataclasses.replace(INTERPRETER_TILE_CONFIG, tma=False)

# (W, m, K, n, chunk_m): odd W, m not a multiple of the chunk or of BLOCK_M, chunks smaller and
# larger than BLOCK_M.
CASES = [
    pytest.param(1, 20, 16, 20, 7, id="W1-m20-ch7"),
    pytest.param(2, 21, 24, 18, 5, id="W2-m21-ch5<BM"),
    pytest.param(3, 19, 16, 33, 24, id="W3-m19-ch24>BM"),
    pytest.param(4, 16, 16, 16, 16, id="W4-m16-ch16=BM"),
    pytest.param(3, 40, 20, 17, 13, id="W3-m40-ch13"),
]


def _tiles_in_walk_order(log: torch.Tensor, tiles_per_rank: int) -> list[int]:
    """The rank segment (peer) of each output tile, in the order the walk computed them."""
    order = torch.argsort(log[1], stable=True)
    return [int(t) // tiles_per_rank for t in order]


@pytest.mark.parametrize("W, m, K, n, chunk_m", CASES)
def test_ag_gemm_computes_every_tile_once_in_rotated_order(W, m, K, n, chunk_m):
    a = randn(W, m, K, seed=1, device=DEVICE)  # every rank's shard
    b = randn(K, n, seed=2, device=DEVICE)
    gathered_full = a.reshape(W * m, K)
    expected = gathered_full.double() @ b.double()
    cpr = triton.cdiv(m, chunk_m)
    tiles = ag_gemm_tiles(m, n, W, TILE)
    for rank in range(W):
        gathered = gathered_full.clone()
        gathered[rank * m : (rank + 1) * m] = float("nan")  # local rows must come from the shard
        out = torch.full((W * m, n), float("nan"), device=DEVICE)
        flags = torch.full(
            (W * cpr,), 7, dtype=torch.int32, device=DEVICE
        )  # every chunk present (epoch 7)
        status = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        log = torch.zeros(2, tiles, dtype=torch.int32, device=DEVICE)
        launch_ag_gemm(
            a[rank],
            gathered,
            b,
            out,
            flags,
            status,
            rank=rank,
            world_size=W,
            epoch=7,
            wait_budget=10,
            chunk_m=chunk_m,
            config=TILE,
            num_programs=1,
            tile_counts=log,
        )
        assert status.tolist() == [0, 0]
        assert log[0].tolist() == [1] * tiles, "every output tile exactly once"
        assert_close(out, expected, rtol=RTOL[torch.float32], name=f"rank {rank}")
        # One program walks the tiles: the local rank's rows first, then rank+1, rank+2, ...
        peers = _tiles_in_walk_order(log, tiles // W)
        assert peers == sorted(peers, key=lambda p: (p - rank) % W)


@pytest.mark.parametrize("programs", [1, 3, 64])
def test_ag_gemm_persistent_grid_sizes(programs):
    W, m, K, n, chunk_m = 3, 18, 16, 40, 8
    a, b = randn(W, m, K, seed=3, device=DEVICE), randn(K, n, seed=4, device=DEVICE)
    out = torch.full((W * m, n), float("nan"), device=DEVICE)
    tiles = ag_gemm_tiles(m, n, W, TILE)
    log = torch.zeros(2, tiles, dtype=torch.int32, device=DEVICE)
    flags = torch.ones(W * triton.cdiv(m, chunk_m), dtype=torch.int32, device=DEVICE)
    status = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    launch_ag_gemm(
        a[1],
        a.reshape(W * m, K),
        b,
        out,
        flags,
        status,
        rank=1,
        world_size=W,
        epoch=1,
        wait_budget=10,
        chunk_m=chunk_m,
        config=TILE,
        num_programs=min(programs, tiles),
        tile_counts=log,
    )
    assert log[0].tolist() == [1] * tiles
    assert_close(
        out, a.reshape(W * m, K).double() @ b.double(), rtol=RTOL[torch.float32], name="result"
    )


@pytest.mark.parametrize("W, m, K, n, chunk_m", CASES)
def test_gemm_rs_raises_every_flag_once_and_finishes_next_peer_first(W, m, K, n, chunk_m):
    M = W * m
    cpr = triton.cdiv(m, chunk_m)
    tiles = gemm_rs_tiles(m, n, W, TILE)
    for rank in range(W):
        a, b = (
            randn(M, K, seed=10 + rank, device=DEVICE),
            randn(K, n, seed=20 + rank, device=DEVICE),
        )
        partial = torch.full((M, n), float("nan"), device=DEVICE)
        counters = torch.zeros(W * cpr, dtype=torch.int32, device=DEVICE)
        flags = torch.full(
            (W * cpr,), 4, dtype=torch.int32, device=DEVICE
        )  # left from an older epoch
        log = torch.zeros(2, tiles, dtype=torch.int32, device=DEVICE)
        launch_gemm_rs(
            a,
            b,
            partial,
            counters,
            flags,
            rank=rank,
            world_size=W,
            epoch=5,
            chunk_m=chunk_m,
            config=TILE,
            num_programs=1,
            tile_counts=log,
        )
        assert log[0].tolist() == [1] * tiles
        assert flags.tolist() == [5] * (W * cpr), "every chunk completed and flagged"
        tiles_n = triton.cdiv(n, TILE.block_n)
        for chunk in range(cpr):  # counters end at the number of tiles overlapping each chunk
            lo, hi = chunk * chunk_m, min((chunk + 1) * chunk_m, m)
            expected_count = ((hi - 1) // TILE.block_m - lo // TILE.block_m + 1) * tiles_n
            assert counters[chunk::cpr].tolist() == [expected_count] * W
        assert_close(
            partial, a.double() @ b.double(), rtol=RTOL[torch.float32], name=f"rank {rank}"
        )
        dests = _tiles_in_walk_order(log, tiles // W)
        assert dests == sorted(dests, key=lambda d: (d - rank - 1) % W), "next peer first"


def _table(tensors):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=DEVICE)


def _rs_reduce(partials, flags, *, dest, m, n, chunk_m, epoch, wait_budget, programs, fill):
    """Run rs_reduce_kernel for `dest` on an output [m, n] filled with `fill`: (out, status)."""
    out = torch.full((m, n), fill, device=DEVICE)
    status = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    launch_rs_reduce(
        _table(partials),
        _table(flags),
        out,
        status,
        dest=dest,
        world_size=len(partials),
        row_stride=n,
        epoch=epoch,
        wait_budget=wait_budget,
        chunk_m=chunk_m,
        num_programs=programs,
        block_r=16,
        block_n=16,
    )
    return out, status


@pytest.mark.parametrize("W, m, n, chunk_m", [(1, 9, 20, 4), (3, 21, 18, 5), (4, 16, 33, 32)])
def test_rs_reduce_sums_the_partials_of_every_rank(W, m, n, chunk_m):
    M, cpr = W * m, triton.cdiv(m, chunk_m)
    partials = [randn(M, n, seed=30 + s, device=DEVICE) for s in range(W)]
    # Each rank's header (epoch 3, the same call) and flags (all at epoch 3).
    flags = [torch.full((HEADER_WORDS + W * cpr,), 3, dtype=torch.int32, device=DEVICE)] * W
    total = sum(p.double() for p in partials)
    for dest in range(W):
        out, status = _rs_reduce(
            partials,
            flags,
            dest=dest,
            m=m,
            n=n,
            chunk_m=chunk_m,
            epoch=3,
            wait_budget=10,
            programs=2,
            fill=float("nan"),
        )
        assert status.tolist() == [0, 0]
        assert_close(
            out, total[dest * m : (dest + 1) * m], rtol=RTOL[torch.float32], name=f"dest {dest}"
        )


@pytest.mark.parametrize("programs", [1, 3])
def test_ag_gemm_times_out_on_a_missing_chunk_within_the_budget(programs):
    """Chunks of rank+2 and rank+3 never arrive: the launch returns, status names one of them.

    With one program the walk order decides which: chunk 0 of rank+2. With several, the first
    program to time out wins and the others give up at their next poll.
    """
    W, m, K, n, chunk_m, rank = 4, 20, 16, 16, 8, 2
    cpr = triton.cdiv(m, chunk_m)
    a, b = randn(W, m, K, seed=5, device=DEVICE), randn(K, n, seed=6, device=DEVICE)
    flags = torch.zeros(W * cpr, dtype=torch.int32, device=DEVICE)
    flags[((rank + 1) % W) * cpr :][:cpr] = 9  # rank+1's chunks are in
    status = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out = torch.full((W * m, n), float("nan"), device=DEVICE)
    start = time.perf_counter()
    launch_ag_gemm(
        a[rank],
        a.reshape(W * m, K),
        b,
        out,
        flags,
        status,
        rank=rank,
        world_size=W,
        epoch=9,
        wait_budget=300,
        chunk_m=chunk_m,
        config=TILE,
        num_programs=programs,
    )
    elapsed = time.perf_counter() - start
    code, peer = status.tolist()
    missing = [(rank + 2) % W, (rank + 3) % W]
    assert peer in missing and (code - 1) // cpr == peer, status.tolist()
    if programs == 1:
        assert status.tolist() == [missing[0] * cpr + 0 + 1, missing[0]], "flag index + 1, peer"
    # 300 polls at ~3500/s in the interpreter; every other program stops at its first poll.
    assert elapsed < 10, f"the bounded waits took {elapsed:.1f} s"
    # Tiles of the local rows and of the chunks that arrived are computed, the others not.
    assert not out[rank * m : (rank + 1) * m].isnan().any()
    assert out[missing[0] * m : (missing[0] + 1) * m].isnan().any()


@pytest.mark.parametrize(
    "W, m, chunk_m, missing, named, nan_rows",
    [
        # source 2 never finishes chunk 1 of dest's rows
        pytest.param(3, 12, 4, [(2, 1)], (1, 2), (4, 8), id="one-chunk"),
        # The sources' flags of a chunk are polled together: the first source still missing in
        # the order dest's chunks are produced (dest - 1, dest - 2, ...) is named, 3 and not 2.
        pytest.param(4, 8, 8, [(2, 0), (3, 0)], (0, 3), (0, 8), id="first-in-order"),
    ],
)
def test_rs_reduce_times_out_naming_source_and_chunk(W, m, chunk_m, missing, named, nan_rows):
    n, dest = 16, 1
    cpr = triton.cdiv(m, chunk_m)
    partials = [randn(W * m, n, seed=s, device=DEVICE) for s in range(W)]
    flags = [
        torch.full((HEADER_WORDS + W * cpr,), 2, dtype=torch.int32, device=DEVICE) for _ in range(W)
    ]
    for src, chunk in missing:
        flags[src][HEADER_WORDS + dest * cpr + chunk] = 1  # an older epoch
    out, status = _rs_reduce(
        partials,
        flags,
        dest=dest,
        m=m,
        n=n,
        chunk_m=chunk_m,
        epoch=2,
        wait_budget=200,
        programs=1,
        fill=0.0,
    )
    chunk, source = named
    assert status.tolist() == [dest * cpr + chunk + 1, source]
    rows = slice(*nan_rows)
    assert out[rows].isnan().all(), "a block whose wait failed is NaN, never a partial sum"


@pytest.mark.parametrize("word", [1, SLOT_WORDS - 1, 0], ids=["op", "last", "moved_on"])
def test_rs_reduce_refuses_a_source_that_made_another_call(word):
    """A source whose header describes another call (or, "moved_on", already holds a later
    call's epoch in this call's slot): (MISMATCH, source) in the status word, nothing read from
    its partial rows, the whole output NaN."""
    W, m, n, chunk_m, dest = 3, 12, 16, 4, 0
    cpr = triton.cdiv(m, chunk_m)
    partials = [randn(W * m, n, seed=s, device=DEVICE) for s in range(W)]
    flags = [
        torch.full((HEADER_WORDS + W * cpr,), 2, dtype=torch.int32, device=DEVICE) for _ in range(W)
    ]
    header_slot(flags[1], 2)[word] = 4 if word == 0 else 7  # epoch 2: another call, or epoch 4
    out, status = _rs_reduce(
        partials,
        flags,
        dest=dest,
        m=m,
        n=n,
        chunk_m=chunk_m,
        epoch=2,
        wait_budget=200,
        programs=2,
        fill=0.0,
    )
    assert status.tolist() == [-1, 1], "MISMATCH, the source"
    assert out.isnan().all()


def test_wait_peers_records_a_peer_that_made_another_call():
    W, rank = 3, 0
    headers = [torch.full((HEADER_WORDS,), 5, dtype=torch.int32, device=DEVICE) for _ in range(W)]
    header_slot(headers[2], 5)[3] = 6  # rank 2: another shape
    status = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    launch_wait_peers(
        _table(headers),
        status,
        rank=rank,
        world_size=W,
        epoch=5,
        wait_budget=50,
        flags_per_rank=2,
        scope="gpu",
    )
    assert status.tolist() == [-1, 2]
