"""The fused kernels on a GPU with real concurrency (producer on a side stream): `pytest -m gpu`.

# W ranks, m rows per rank shard, M = W*m, K / k inner, n / N columns; BLOCK_M = 128 on CUDA

Tolerance: bf16 results may be at most about 2x as far from the float64 reference as plain
PyTorch in bf16; float32 results within the float32 tolerance.
"""

import time

import pytest
import torch
from overlap_testing import (
    RTOL,
    assert_tiles_once,
    check_back_to_back_calls,
    drop_one_flag,
    randn,
)
from tolerance import assert_bf16_close, assert_close

import overlap
from overlap.protocol import raise_flags
from overlap.reference import all_gather_matmul_ref, matmul_reduce_scatter_ref

pytestmark = pytest.mark.gpu

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


def _world(W, **config):
    config.setdefault("chunk_m", 96)  # not a multiple of BLOCK_M: tiles wait on two chunks
    return overlap.LocalWorld(
        W, "cuda", mode="fused", config=overlap.OverlapConfig(count_tiles=True, **config)
    )


def _check(actual, expected64, torch_result, name):
    """float32: the float32 tolerance; bf16: at most 2x plain PyTorch's bf16 error."""
    if actual.dtype == torch.float32:
        assert_close(actual, expected64, rtol=RTOL[torch.float32], name=name)
    else:
        assert_bf16_close(actual, expected64, torch_result, factor=2.0, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W", [2, 4, 8])
def test_fused_all_gather_matmul(W, dtype):
    m, K, n = 200, 512, 320
    world = _world(W)
    a = randn(W, m, K, dtype=dtype, device="cuda", seed=1).requires_grad_()
    b = randn(W, K, n, dtype=dtype, device="cuda", seed=2).requires_grad_()
    c = overlap.all_gather_matmul(a, b, world)
    assert_tiles_once(world)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    c64 = all_gather_matmul_ref(a64, b64)
    a_t, b_t = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    c_t = all_gather_matmul_ref(a_t, b_t)  # plain PyTorch in the same dtype
    _check(c, c64, c_t, "c")
    dc = randn(*c.shape, dtype=dtype, device="cuda", seed=3)
    c.backward(dc)
    assert_tiles_once(world)
    c64.backward(dc.double())
    c_t.backward(dc)
    _check(a.grad, a64.grad, a_t.grad, "grad a_shard")
    _check(b.grad, b64.grad, b_t.grad, "grad b")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W", [2, 4, 8])
def test_fused_matmul_reduce_scatter(W, dtype):
    m, k, N = 136, 384, 520
    world = _world(W)
    a = randn(W, W * m, k, dtype=dtype, device="cuda", seed=4)
    b = randn(W, k, N, dtype=dtype, device="cuda", seed=5)
    c = overlap.matmul_reduce_scatter(a, b, world)
    assert_tiles_once(world)
    c64 = matmul_reduce_scatter_ref(a.double(), b.double())
    _check(c, c64, matmul_reduce_scatter_ref(a, b), "c_shard")


def test_consumer_waits_for_a_slow_producer():
    """The side stream sleeps before copying: every rank's result is still right (on one GPU a
    rank's consumer is ordered after its copy; rank r+1's slow copy runs beside rank r's GEMM)."""
    W, m, K, n = 4, 512, 256, 256
    world = _world(W, chunk_m=128)
    produce = world.fused.gather

    def slow_producer(*args):
        torch.cuda._sleep(5_000_000)  # ~ a few ms on the side stream, before the copy
        produce(*args)

    world.fused.gather = slow_producer
    a = randn(W, m, K, device="cuda", seed=6)
    b = randn(W, K, n, device="cuda", seed=7)
    c = overlap.all_gather_matmul(a, b, world)
    assert_tiles_once(world)
    assert_close(
        c, all_gather_matmul_ref(a.double(), b.double()), rtol=RTOL[torch.float32], name="c"
    )


def test_timeout_on_gpu_raises_instead_of_hanging():
    W, m = 2, 256
    world = _world(W, chunk_m=128, timeout_s=0.5)

    drop_one_flag(world, rank=0, index=1 * 2 + 1)  # rank 0 never gets chunk 1 of rank 1
    a = randn(W, m, 128, device="cuda", seed=8)
    b = randn(W, 128, 128, device="cuda", seed=9)
    start = time.perf_counter()
    with pytest.raises(overlap.OverlapTimeoutError, match="rank 0 .* chunk 1 .* from rank 1"):
        overlap.all_gather_matmul(a, b, world)
    assert time.perf_counter() - start < 60
    world.fused.raise_flags = raise_flags
    assert_close(
        overlap.all_gather_matmul(a, b, world),
        all_gather_matmul_ref(a.double(), b.double()),
        rtol=RTOL[torch.float32],
        name="result",
    )


def test_deferred_status_check():
    world = _world(2, sync_status=False)
    a = randn(2, 128, 128, device="cuda", seed=10)
    b = randn(2, 128, 128, device="cuda", seed=11)
    for _ in range(3):
        c = overlap.all_gather_matmul(a, b, world)
    world.check_status()  # nothing timed out
    assert_close(
        c, all_gather_matmul_ref(a.double(), b.double()), rtol=RTOL[torch.float32], name="result"
    )


@pytest.mark.parametrize("W", [2, 4])
def test_back_to_back_calls_with_random_shapes(W):
    """1000 fused calls with no host synchronisation until the end, new random shapes on every
    call, and every 50th call the shapes that timed out back to back on an H100 (W = 2: m = 2048,
    K = 8192, n = 7168; W = 4: m = 1024, K = 8192, n = 3584)."""
    world = _world(W, chunk_m=128, sync_status=False)
    large = {2: (2048, 8192, 7168), 4: (1024, 8192, 3584)}[W]
    check_back_to_back_calls(world, calls=1000, small=(512, 1024, 1024), large=large, seed=13)


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_emulated_link_takes_its_time_and_fused_hides_the_gemm(op):
    """LocalWorld(link_gbps=...): every schedule pays at least the link's time, results stay
    exact, and the fused schedule (transfers overlapping the GEMM inside the kernel) beats the
    serial one, which pays link plus GEMM. At 20 GB/s each rank's transfers (16 MiB for AG,
    32 MiB for RS) take 0.8-1.7 ms, several times its 0.14 TFLOP GEMM."""
    W, m, K, n, gbps = 2, 4096, 2048, 4096, 20.0
    is_ag = op == "all_gather_matmul"
    a = randn(W, m if is_ag else W * m, K, device="cuda", seed=30).bfloat16()
    b = randn(W, K, n, device="cuda", seed=31).bfloat16()
    ref = all_gather_matmul_ref if is_ag else matmul_reduce_scatter_ref
    expected, torch_result = ref(a.double(), b.double()), ref(a, b)
    row_bytes = (K if is_ag else n) * a.element_size()
    link_ms = W * (W - 1) * m * row_bytes / gbps / 1e6  # the W ranks one after another
    elapsed = {}
    for mode in ("serial", "pipelined", "fused"):
        world = overlap.LocalWorld(
            W, "cuda", mode=mode, config=overlap.OverlapConfig(chunk_m=512), link_gbps=gbps
        )
        c = getattr(overlap, op)(a, b, world)  # warm-up (compiles)
        _check(c, expected, torch_result, f"{mode} with a link")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            getattr(overlap, op)(a, b, world)
        end.record()
        torch.cuda.synchronize()
        elapsed[mode] = start.elapsed_time(end) / 3
    assert min(elapsed.values()) >= 0.95 * link_ms, (elapsed, link_ms)
    assert elapsed["fused"] < elapsed["serial"], (elapsed, link_ms)
