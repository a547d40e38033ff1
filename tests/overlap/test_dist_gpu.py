"""DistWorld's fused CUDA path (symmetric memory, system-scope flags): `pytest -m gpu`.

Two processes, one GPU each, over a gloo group: the symmetric-memory mapping, the copy-engine
pulls from a peer's buffer, the stream-written ready flags and the cross-process flag polls all
run for real (nothing here is timed). PyTorch's symmetric memory refuses two ranks on one GPU,
so this needs two GPUs and skips, saying so, on one.

# W ranks, m rows per rank shard, M = W*m, K / k inner, n / N columns
"""

import time

import pytest
import torch
import torch.multiprocessing as mp
from overlap_testing import RTOL, gloo_rank, randn
from tolerance import assert_bf16_close, assert_close

import overlap
from overlap.reference import all_gather_matmul_ref, matmul_reduce_scatter_ref

pytestmark = pytest.mark.gpu

W = 2


def _check(actual, inputs, ref, name):
    """float32: the float32 tolerance; bf16: at most 2x plain PyTorch's bf16 error."""
    expected64 = ref(*(t.double() for t in inputs))
    if actual.dtype == torch.float32:
        assert_close(actual, expected64, rtol=RTOL[torch.float32], name=name)
    else:
        assert_bf16_close(actual, expected64, ref(*inputs), factor=2.0, name=name)


def _check_ops(world, dtype, m, K, n, seed, late_rank=None):
    """AG-GEMM and GEMM-RS forward on this rank against the whole computation's reference."""
    r = world.rank
    if r == late_rank:
        time.sleep(0.2)  # the peer's kernels wait on this rank's flags meanwhile
    a_all = randn(W, m, K, dtype=dtype, device="cuda", seed=seed)
    b_all = randn(W, K, n, dtype=dtype, device="cuda", seed=seed + 1)
    c, gathered = world.all_gather_matmul(a_all[r], b_all[r])
    _check(c, (a_all, b_all), lambda a, b: all_gather_matmul_ref(a, b)[r], f"rank {r}: AG {m}")
    assert torch.equal(gathered, a_all.reshape(W * m, K))
    a_all = randn(W, W * m, K, dtype=dtype, device="cuda", seed=seed + 2)
    c = world.matmul_reduce_scatter(a_all[r], b_all[r])
    _check(c, (a_all, b_all), lambda a, b: matmul_reduce_scatter_ref(a, b)[r], f"rank {r}: RS {m}")


def _check_grads(world, dtype):
    """Both ops through autograd: each one's backward runs the other fused."""
    r = world.rank
    m, K, n = 320, 256, 384
    a_all = randn(W, m, K, dtype=dtype, device="cuda", seed=70)
    b_all = randn(W, K, n, dtype=dtype, device="cuda", seed=71)
    dc_all = randn(W, W * m, n, dtype=dtype, device="cuda", seed=72)
    a, b = a_all[r].clone().requires_grad_(), b_all[r].clone().requires_grad_()
    overlap.all_gather_matmul(a, b, world).backward(dc_all[r])
    a64, b64 = a_all.double().requires_grad_(), b_all.double().requires_grad_()
    all_gather_matmul_ref(a64, b64).backward(dc_all.double())
    a_t, b_t = a_all.clone().requires_grad_(), b_all.clone().requires_grad_()
    all_gather_matmul_ref(a_t, b_t).backward(dc_all)
    for name, got, want, torch_grad in [
        ("a", a.grad, a64.grad, a_t.grad),
        ("b", b.grad, b64.grad, b_t.grad),
    ]:
        if dtype == torch.float32:
            assert_close(got, want[r], rtol=RTOL[dtype], name=f"rank {r}: grad {name}")
        else:
            assert_bf16_close(
                got, want[r], torch_grad[r], factor=2.0, name=f"rank {r}: grad {name}"
            )


def _worker(rank: int, init_method: str) -> None:
    torch.cuda.set_device(rank)
    with gloo_rank(rank, W, init_method, timeout_s=300):
        config = overlap.OverlapConfig(chunk_m=96, timeout_s=60.0)
        world = overlap.DistWorld(mode="fused", device=f"cuda:{rank}", config=config)
        for dtype in (torch.bfloat16, torch.float32):
            # m not a multiple of the chunk or of BLOCK_M; the shapes shrink and grow again.
            for call, m in enumerate([200, 1000, 64, 1000]):
                _check_ops(world, dtype, m, 512, 320, seed=10 * call, late_rank=call % W)
            _check_grads(world, dtype)
        torch.cuda.synchronize()


@pytest.mark.skipif(
    torch.cuda.device_count() < W,
    reason=f"needs {W} GPUs: PyTorch's symmetric memory refuses two ranks on one GPU "
    '("detected allocations from overlapping devices from different ranks", seen on an H100)',
)
def test_dist_world_fused_one_process_per_gpu(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}",), nprocs=W, join=True)
