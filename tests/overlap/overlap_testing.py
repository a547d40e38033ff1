"""Helpers shared by the overlap tests: tolerances, random inputs (never zeros), and the checks
of an op's result and gradients and of the fused kernel's tiles.

Comparisons go through the suite's one tolerance helper, tests/tolerance.py.
"""

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
from tolerance import assert_close

import overlap
from overlap.protocol import raise_flags
from overlap.reference import all_gather_matmul_ref, matmul_reduce_scatter_ref

# Relative norm error allowed against a float64 reference, per kernel dtype (bf16 results are
# held to tolerance.assert_bf16_close instead).
RTOL = {torch.float32: 1e-5}


def randn(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


def drop_one_flag(world, rank: int, index: int) -> None:
    """From now on, the AG producer of `world` (a LocalWorld) raises every flag of rank `rank`'s
    calls but flags[index]; `world.fused.raise_flags = raise_flags` undoes it."""

    def producer(flags, epoch):
        if flags.data_ptr() != world.fused.ag_flags[rank].data_ptr():
            raise_flags(flags, epoch)
        else:
            raise_flags(flags[:index], epoch)
            raise_flags(flags[index + 1 :], epoch)

    world.fused.raise_flags = producer


def assert_tiles_once(world) -> None:
    """Every output tile of the fused kernel's last launches was computed exactly once (a world
    made with OverlapConfig(count_tiles=True))."""
    for log in world.fused.last_tile_counts:
        assert log[0].tolist() == [1] * log.shape[1], "every output tile exactly once"


def assert_matches_float64(c, a, b, reference, dc, *, rtol: float, what: str = "") -> None:
    """`c`, an op's result from the leaves `a` and `b`, and after `c.backward(dc)` their
    gradients, against `reference` (all_gather_matmul_ref, ...) on float64 copies."""
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    c64 = reference(a64, b64)
    assert_close(c, c64, rtol=rtol, name=f"{what}c")
    c.backward(dc)
    c64.backward(dc.double())
    assert_close(a.grad, a64.grad, rtol=rtol, name=f"{what}grad a")
    assert_close(b.grad, b64.grad, rtol=rtol, name=f"{what}grad b")


@contextlib.contextmanager
def gloo_rank(rank: int, world_size: int, init_method: str, timeout_s: float):
    """Run the body as one rank of a gloo group in a spawned test worker, then end the process.

    A failure in the body propagates (the spawn reports the traceback). After success every
    rank meets at a barrier, so none tears down its connections while a peer still finishes its
    last collective, and the worker leaves with os._exit(0), skipping interpreter finalisation:
    once in a full CI run (3 ranks, 2 busy cores) a worker whose checks had all passed aborted
    at exit ("terminate called without an active exception", a C++ thread torn down while
    joinable). Nothing is left to flush or check by then.
    """
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_back_to_back_calls(world, *, calls: int, small, large=None, seed: int) -> None:
    """Fused calls of a LocalWorld made back to back, as a training loop makes them: no host
    synchronisation until the end. all_gather_matmul forward and backward (its input gradient is
    a matmul_reduce_scatter) and plain matmul_reduce_scatter, mixed, a random shape up to
    `small` = (m, K, n) on every call and `large` on every 50th. Results are checked in batches
    of 20 against float64 references, errors kept on the device; one synchronisation at the end
    reads the worst."""
    W, device = world.world_size, world.device
    choice = torch.Generator().manual_seed(seed)

    def draw(high, step):
        return step * int(torch.randint(1, max(1, high // step) + 1, (1,), generator=choice))

    def error(actual, expected64):  # a device scalar: no synchronisation
        return (actual.double() - expected64).norm() / expected64.norm()

    errors, pending, made, i = [], [], 0, 0
    while made < calls:
        m, K, n = (
            large
            if large and i % 50 == 49
            else (draw(small[0], 8), draw(small[1], 64), draw(small[2], 8))
        )
        i += 1
        if int(torch.randint(0, 2, (1,), generator=choice)):  # AG forward + backward
            a = torch.randn(W, m, K, device=device).requires_grad_()
            b = torch.randn(W, K, n, device=device)
            c = overlap.all_gather_matmul(a, b, world)
            dc = torch.randn_like(c)
            c.backward(dc)
            pending.append(("ag", a.detach(), b, c.detach(), dc, a.grad))
            made += 2
        else:
            a = torch.randn(W, W * m, K, device=device)
            b = torch.randn(W, K, n, device=device)
            pending.append(("rs", a, b, overlap.matmul_reduce_scatter(a, b, world)))
            made += 1
        if len(pending) < 20 and made < calls:
            continue
        for op, a, b, *results in pending:
            a64, b64 = a.double(), b.double()
            if op == "ag":
                c, dc, grad_a = results
                a64.requires_grad_()
                c64 = all_gather_matmul_ref(a64, b64)
                c64.backward(dc.double())
                errors += [error(c, c64), error(grad_a, a64.grad)]
            else:
                errors.append(error(results[0], matmul_reduce_scatter_ref(a64, b64)))
        pending = []
    world.check_status()  # no timeout or mismatch recorded by any call
    worst = torch.stack(errors).max().item()  # the one synchronisation
    assert worst <= RTOL[torch.float32], f"worst relative error {worst:.3g} over {made} calls"
