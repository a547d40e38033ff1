"""DistWorld over gloo: 2 and 3 CPU processes, every schedule, ops and layers.

The fused schedule runs the Triton kernels under the interpreter over shared-memory peer buffers
(overlap.peer_memory), so the ranks' kernels poll each other's flags concurrently, process
against process.

# W ranks, m rows per rank shard, M = W*m, K / k inner, n / N columns

Every rank builds the same full inputs from a fixed seed, runs its part, and checks it against the
float64 reference of the whole computation. A failure in a worker fails the spawn.
"""

import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from overlap_testing import RTOL, gloo_rank, randn
from tolerance import assert_close

import overlap
from overlap.protocol import EPOCH_LIMIT
from overlap.reference import all_gather_matmul_ref, matmul_reduce_scatter_ref

TOL = RTOL[torch.float32]


def _check_ops(world, mode: str) -> None:
    W, r = world.world_size, world.rank
    m, K, n = 5, 12, 7  # m not a multiple of the chunk (2 rows)
    # AG-GEMM: the stacked reference holds every rank's shard and weight.
    a_all, b_all = randn(W, m, K, seed=1), randn(W, K, n, seed=2)
    dc_all = randn(W, W * m, n, seed=3)
    a = a_all[r].clone().requires_grad_()
    b = b_all[r].clone().requires_grad_()
    c = overlap.all_gather_matmul(a, b, world)
    a64, b64 = a_all.double().requires_grad_(), b_all.double().requires_grad_()
    c64 = all_gather_matmul_ref(a64, b64)
    assert_close(c, c64[r], rtol=TOL, name=f"{mode} rank {r}: all_gather_matmul")
    c.backward(dc_all[r])
    c64.backward(dc_all.double())
    assert_close(a.grad, a64.grad[r], rtol=TOL, name=f"{mode} rank {r}: grad a_shard")
    assert_close(b.grad, b64.grad[r], rtol=TOL, name=f"{mode} rank {r}: grad b")
    # GEMM-RS.
    a_all, b_all = randn(W, W * m, K, seed=4), randn(W, K, n, seed=5)
    dc_all = randn(W, m, n, seed=6)
    a = a_all[r].clone().requires_grad_()
    b = b_all[r].clone().requires_grad_()
    c = overlap.matmul_reduce_scatter(a, b, world)
    a64, b64 = a_all.double().requires_grad_(), b_all.double().requires_grad_()
    c64 = matmul_reduce_scatter_ref(a64, b64)
    assert_close(c, c64[r], rtol=TOL, name=f"{mode} rank {r}: matmul_reduce_scatter")
    c.backward(dc_all[r])
    c64.backward(dc_all.double())
    assert_close(a.grad, a64.grad[r], rtol=TOL, name=f"{mode} rank {r}: grad a")
    assert_close(b.grad, b64.grad[r], rtol=TOL, name=f"{mode} rank {r}: grad b")


def _check_mlp(world, sequence_parallel: bool, compiled: bool = False) -> None:
    """ParallelMLP on every rank against the dense MLP built from the same seeded weights;
    `compiled`: under torch.compile (aot_eager, fullgraph: the ops and the world's collectives
    in one graph)."""
    W, r = world.world_size, world.rank
    s, b, h, f = 2 * W, 2, 8, 4 * W
    mlp = overlap.parallel_mlp(
        h, f, world, sequence_parallel=sequence_parallel, generator=torch.Generator().manual_seed(7)
    )
    generator = torch.Generator().manual_seed(7)  # the layers draw from it in this order
    w1 = torch.empty(f, h).uniform_(-(h**-0.5), h**-0.5, generator=generator)
    w2 = torch.empty(h, f).uniform_(-(f**-0.5), f**-0.5, generator=generator)
    x_full = randn(s, b, h, seed=8)
    x = (x_full.chunk(W)[r] if sequence_parallel else x_full).clone().requires_grad_()
    y = (torch.compile(mlp, backend="aot_eager", fullgraph=True) if compiled else mlp)(x)
    w1, w2, x64 = (t.double().requires_grad_() for t in (w1, w2, x_full))
    y64 = torch.nn.functional.gelu(x64 @ w1.T) @ w2.T  # biases start at zero
    expected = y64.chunk(W)[r] if sequence_parallel else y64
    assert_close(y, expected, rtol=TOL, name=f"mlp rank {r}")
    (y * y).sum().backward()  # each rank's loss is the part of the dense loss it holds
    if sequence_parallel:
        (y64 * y64).sum().backward()
        assert_close(x.grad, x64.grad.chunk(W)[r], rtol=TOL, name=f"mlp rank {r}: grad x")
    else:
        (y64 * y64).sum().backward()
        assert_close(x.grad, x64.grad, rtol=TOL, name=f"mlp rank {r}: grad x")
    assert_close(mlp.up.weight.grad, w1.grad.chunk(W, dim=0)[r], rtol=TOL, name="grad up.weight")
    assert_close(
        mlp.down.weight.grad, w2.grad.chunk(W, dim=1)[r], rtol=TOL, name="grad down.weight"
    )
    if sequence_parallel:
        assert mlp.down.bias.sequence_parallel  # the caller all-reduces this gradient


def _check_fused_reuse(world) -> None:
    """Fused calls whose shapes grow and shrink (buffers replaced, slots alternating), one rank
    arriving late to each call, and the epochs wrapping around: every result exact."""
    W, r = world.world_size, world.rank
    world.fused.epoch = EPOCH_LIMIT - 3  # every rank alike: the wrap happens inside the loop
    for call, (m, K, n) in enumerate([(3, 8, 5), (9, 12, 17), (4, 8, 5), (9, 12, 17)]):
        if r == call % W:
            time.sleep(0.2)  # the peers' kernels wait on this rank's flags meanwhile
        a_all, b_all = randn(W, m, K, seed=10 + call), randn(W, K, n, seed=20 + call)
        c, gathered = world.all_gather_matmul(a_all[r], b_all[r])
        expected = all_gather_matmul_ref(a_all.double(), b_all.double())[r]
        assert_close(c, expected, rtol=TOL, name=f"call {call} rank {r}: all_gather_matmul")
        assert torch.equal(gathered, a_all.reshape(W * m, K))
        a_all, b_all = randn(W, W * m, K, seed=30 + call), randn(W, K, n, seed=40 + call)
        c = world.matmul_reduce_scatter(a_all[r], b_all[r])
        expected = matmul_reduce_scatter_ref(a_all.double(), b_all.double())[r]
        assert_close(c, expected, rtol=TOL, name=f"call {call} rank {r}: matmul_reduce_scatter")
    assert world.fused.epoch < 10  # wrapped


def _check_fused_timeout(world) -> None:
    """Rank 1 never makes the call: every other rank times out waiting for it, naming it."""
    r = world.rank
    a, b = randn(4, 8, seed=50 + r), randn(8, 5, seed=60 + r)
    world.all_gather_matmul(a, b)  # every rank: the (collective) buffer allocation is done
    if r == 1:
        return
    start = time.perf_counter()
    with pytest.raises(overlap.OverlapTimeoutError, match=f"rank {r} timed out") as error:
        world.all_gather_matmul(a, b)
    assert (error.value.peer, error.value.chunk) == (1, 0)
    assert time.perf_counter() - start < 30 * world.config.timeout_s


def _worker(rank: int, world_size: int, init_method: str) -> None:
    with gloo_rank(rank, world_size, init_method, timeout_s=120):
        torch.set_num_threads(1)
        config = overlap.OverlapConfig(chunk_m=2)
        for mode in ("fused", "pipelined", "serial"):
            _check_ops(overlap.DistWorld(mode=mode, config=config), mode)
        auto = overlap.DistWorld(config=config)
        assert auto.mode_for(1e6) is overlap.Mode.SERIAL
        # Fused is opt-in on a DistWorld until it has run on two GPUs.
        assert auto.mode_for(1e12) is overlap.Mode.PIPELINED
        _check_fused_reuse(overlap.DistWorld(mode="fused", config=config))
        _check_mlp(overlap.DistWorld(mode="fused", config=config), sequence_parallel=True)
        _check_mlp(
            overlap.DistWorld(mode="fused", config=config), sequence_parallel=True, compiled=True
        )
        _check_mlp(overlap.DistWorld(mode="pipelined", config=config), sequence_parallel=True)
        _check_mlp(overlap.DistWorld(mode="serial", config=config), sequence_parallel=False)
        dist.barrier()
        _check_fused_timeout(
            overlap.DistWorld(mode="fused", config=overlap.OverlapConfig(chunk_m=2, timeout_s=0.5))
        )


def _expect_mismatch(fn, rank: int, peer: int, mine: str, theirs: str) -> None:
    with pytest.raises(overlap.OverlapMismatchError) as error:
        fn()
    assert (error.value.rank, error.value.peer) == (rank, peer)
    message = str(error.value)
    assert f"rank {rank} {mine}" in message and f"rank {peer} {theirs}" in message, message


def _check_disagreeing_ranks(world) -> None:
    """Two ranks that make different calls both raise OverlapMismatchError naming both calls;
    the next matching call is right again. Every mode: fused compares headers on the device,
    serial and pipelined compare the calls before their collectives."""
    r, peer = world.rank, 1 - world.rank
    sig = "chunk_m=2, world_size=2"
    cases = [  # (op, this rank's inputs, description of rank 0's call, of rank 1's)
        ("ag", dict(m=4 + 2 * r, K=8, n=5, dtype=torch.float32),
         f"all_gather_matmul(m=4, K=8, n=5, float32, {sig})",
         f"all_gather_matmul(m=6, K=8, n=5, float32, {sig})"),
        ("ag", dict(m=4, K=8, n=5, dtype=(torch.float32, torch.bfloat16)[r]),
         f"all_gather_matmul(m=4, K=8, n=5, float32, {sig})",
         f"all_gather_matmul(m=4, K=8, n=5, bfloat16, {sig})"),
        ("rs", dict(m=4, K=8, n=5 + r, dtype=torch.float32),
         f"matmul_reduce_scatter(M=8, k=8, N=5, float32, {sig})",
         f"matmul_reduce_scatter(M=8, k=8, N=6, float32, {sig})"),
    ]  # fmt: skip
    for op, shape, call0, call1 in cases:
        m, K, n, dtype = shape["m"], shape["K"], shape["n"], shape["dtype"]
        rows = m if op == "ag" else 2 * m
        a, b = randn(rows, K, seed=70, dtype=dtype), randn(K, n, seed=71, dtype=dtype)
        fn = world.all_gather_matmul if op == "ag" else world.matmul_reduce_scatter
        mine, theirs = (call0, call1) if r == 0 else (call1, call0)
        _expect_mismatch(lambda fn=fn, a=a, b=b: fn(a, b), r, peer, mine, theirs)
    # The ranks agree again: exact results.
    _check_ops(world, f"{world.mode.value} after mismatches")


def _check_growth_is_bounded(world) -> None:
    """A rank that skips a call needing larger peer buffers: the other gives up within about
    timeout_s, naming it, instead of waiting in a collective for the process group's timeout."""
    r = world.rank
    if r == 1:
        return
    a, b = randn(40, 16, seed=80), randn(16, 8, seed=81)
    start = time.perf_counter()
    with pytest.raises(overlap.OverlapMismatchError, match="rank 1 did not grow"):
        world.all_gather_matmul(a, b)
    assert time.perf_counter() - start < 5 + 5 * world.config.timeout_s


def _mismatch_worker(rank: int, init_method: str) -> None:
    with gloo_rank(rank, 2, init_method, timeout_s=120):
        torch.set_num_threads(1)
        config = overlap.OverlapConfig(chunk_m=2)
        for mode in ("fused", "pipelined", "serial"):
            _check_disagreeing_ranks(overlap.DistWorld(mode=mode, config=config))
        dist.barrier()
        config = overlap.OverlapConfig(chunk_m=2, timeout_s=0.5)
        _check_growth_is_bounded(overlap.DistWorld(mode="fused", config=config))


def test_dist_world_ranks_that_disagree_get_a_clear_error(tmp_path):
    mp.spawn(_mismatch_worker, args=(f"file://{tmp_path / 'store'}",), nprocs=2, join=True)


@pytest.mark.parametrize("world_size", [2, 3])
def test_dist_world_over_gloo(world_size, tmp_path):
    for attempt in range(2):
        # A file store: no TCP port to pick, so no race with other processes for it.
        init_method = f"file://{tmp_path / f'store{attempt}'}"
        try:
            mp.spawn(_worker, args=(world_size, init_method), nprocs=world_size, join=True)
            return
        except mp.ProcessExitedException as error:
            # A worker killed by a signal (a crash inside gloo), not a failed check: those
            # raise ProcessRaisedException with the worker's traceback and are not retried.
            if attempt:
                raise
            warnings.warn(
                f"gloo worker died with {error.signal_name}; running the test again", stacklevel=1
            )
