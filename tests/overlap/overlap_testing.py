"""Helpers shared by the overlap tests: tolerances and random inputs (never zeros).

Comparisons go through the suite's one tolerance helper, tests/tolerance.py.
"""

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

# Relative norm error allowed against a float64 reference, per kernel dtype (bf16 results are
# held to tolerance.assert_bf16_close instead).
RTOL = {torch.float32: 1e-5}


def randn(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


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
