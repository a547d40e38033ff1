"""Device side of the emulated link of a LocalWorld: transfers that cost time on the GPU's clock.

# W ranks, cpr chunks per rank

`LocalWorld(W, link_gbps=B)` charges every transfer between its virtual ranks the time it would
take on a link of B GB/s per direction (B bytes per nanosecond). The bytes themselves are copied
(or read in place) as without the option; the time is spent waiting for the GPU's nanosecond
clock (`%globaltimer`). No SM is occupied that the GEMMs need: the fused consumers wait inside
their own programs, the serial and pipelined schedules in a one-warp kernel. The clock words
live in one int64 tensor, zeroed by the host before each call (overlap.link):

    clock[r]        rank r's link. AG: the time its transfers began (the origin, t0); a chunk
                    arrives at t0 + (bytes before it and its own) / B. RS: when its outgoing
                    link is next free (a queue: a transfer starts when both it and the link are
                    ready, and arrives its bytes / B later).
    clock[W + (s*W + d)*cpr + c]    fused RS: when chunk c of rank s's partial rows for rank d
                    arrives at d (written by the producer before it raises the chunk's flag)

Under the interpreter there is no clock: the words are still computed, nothing waits.

    link_origin, link_enqueue, wait_until   device functions (ag_gemm, gemm_rs kernels)
    link_wait_kernel                        one program: the serial and pipelined schedules
and its launcher.
"""

import torch
import triton
import triton.language as tl

from kernelbase.backend import COMPILE_OPTIONS
from overlap.kernels.flags import REAL_TIME, _clock_ns


@triton.jit
def _now():
    """The GPU clock in nanoseconds (0 under the interpreter)."""
    return _clock_ns() if REAL_TIME else tl.zeros((), dtype=tl.int64)


@triton.jit
def wait_until(deadline):
    """Return once the GPU clock reads `deadline` (ns); at once under the interpreter. The wait
    is bounded by the deadline itself, a time the link model computed for this call."""
    if REAL_TIME:
        now = _clock_ns()
        while now < deadline:
            now = _clock_ns()


@triton.jit
def link_origin(clock_ptr):
    """The origin of the link at `clock_ptr` (zeroed before the call): the first caller stamps
    the clock there, later callers read that stamp."""
    now = tl.maximum(_now(), 1)  # 0 means "not stamped yet"
    stamped = tl.atomic_cas(clock_ptr, tl.zeros((), dtype=tl.int64), now, sem="relaxed")
    return tl.where(stamped == 0, now, stamped)


@triton.jit
def link_enqueue(clock_ptr, transfer_ns):
    """Queue a transfer of `transfer_ns` that is ready now on the link whose next free time is
    at `clock_ptr`; return its arrival time. Concurrent callers are ordered by compare-and-swap:
    each retry follows another caller's success, so there are fewer retries than transfers."""
    now = _now()
    free = tl.atomic_add(clock_ptr, tl.zeros((), dtype=tl.int64), sem="relaxed")
    arrival = tl.maximum(now, free) + transfer_ns
    seen = tl.atomic_cas(clock_ptr, free, arrival, sem="relaxed")
    while seen != free:
        free = seen
        arrival = tl.maximum(now, free) + transfer_ns
        seen = tl.atomic_cas(clock_ptr, free, arrival, sem="relaxed")
    return arrival


@triton.jit(do_not_specialize=["slot", "transfer_ns"])
def link_wait_kernel(clock_ptr, slot, transfer_ns, QUEUE: tl.constexpr):
    """One program. QUEUE: queue a transfer of `transfer_ns` on link `slot` and wait until it
    arrives. Otherwise: wait until `transfer_ns` after the link's origin (the first wait of a
    call, with transfer_ns 0, sets the origin)."""
    clock = clock_ptr + slot
    if QUEUE:
        arrival = link_enqueue(clock, transfer_ns.to(tl.int64))
    else:
        arrival = link_origin(clock) + transfer_ns
    wait_until(arrival)


def launch_link_wait(clock: torch.Tensor, slot: int, transfer_ns: int, *, queue: bool) -> None:
    """Run `link_wait_kernel` (one program, one warp) on the current stream."""
    link_wait_kernel[(1,)](clock, slot, transfer_ns, QUEUE=queue, num_warps=1, **COMPILE_OPTIONS)
