"""Device side of the flag protocol: bounded waits, the peers' ready wait, the fallback flag raise.

Flag protocol (all flags are int32, one per chunk, owned by the rank that waits on them):

    producer: write the chunk's bytes, then raise its flag to the call's epoch (release)
    consumer: poll the flag with acquire loads until it is >= epoch, for at most `wait_budget`
              (nanoseconds on the GPU's clock; polls under the interpreter)

Epochs grow by one per call, so flags are never reset between calls: a flag left at an older
epoch simply reads as "not yet". A consumer that runs out of polls records
`(flag index + 1, peer rank)` in its rank's status word (first one wins, by compare-and-swap) and
stops computing; the other programs see the status word in their own polls and stop too, so the
whole launch ends within about one timeout. The host reads the status word after the launch and
raises `OverlapTimeoutError` (overlap.protocol).

Rank agreement: before its flags, a rank publishes a header [epoch, signature of the call: op,
shapes, dtype, chunking] (SLOT_WORDS int32) in slot epoch % 2 of its header (HEADER_WORDS int32,
two slots). A consumer reads a peer's memory only after `wait_header` found the peer's header
at this epoch describing the same call; otherwise it records (MISMATCH, peer) and the host
raises `OverlapMismatchError`. Two slots keep a call's header intact while a peer that has
already failed (or finished) this call publishes its next one: a rank gets two calls ahead only
after its peers published the call in between, or after a timeout. Tiles or blocks a program
could not compute (any failed wait) are written as NaN: never a plausible wrong result.

Every atomic takes the memory scope `SCOPE` (a constexpr): "gpu" when all ranks share one device
(LocalWorld), "sys" when flags and rows live in peer GPUs' memory (DistWorld's symmetric memory).
The polls are `atomic_add(ptr, 0, sem="acquire")`: an acquire read that every Triton version
from 3.0 and the CPU interpreter support (`tl.atomic_load` is newer).

    wait_flag, wait_chunks   device functions the consumer kernels call (ag_gemm, gemm_rs)
    wait_flags               wait_flag on a vector of flags (the RS reduction: one per source)
    async_proxy_fence        after a wait, before TMA loads of what the flag published
    wait_header              a peer published this call, and the same call (rank agreement)
    wait_peers_kernel        one program: every peer published this call (DistWorld's AG)
    raise_flag_kernel        one program: a release store of a flag, where no stream write exists
and the launchers of the two kernels.
"""

import torch
import triton
import triton.language as tl

from kernelbase.backend import COMPILE_OPTIONS, interpreting

# Where a rank publishes a call: [epoch, the call's signature (protocol.signature)], in slot
# epoch % 2 of its header.
SLOT_WORDS = tl.constexpr(8)
HEADER_WORDS = tl.constexpr(2 * SLOT_WORDS.value)
# status[0] when a peer made a different call (status[1]: that peer); timeouts record 1 + flag.
MISMATCH = tl.constexpr(-1)

# Compiled kernels bound a wait by the GPU's nanosecond clock; the interpreter (no inline
# assembly) by a count of polls. Either way the budget is `wait_budget` (protocol.wait_budget_for).
REAL_TIME = tl.constexpr(not interpreting())


@triton.jit
def _clock_ns():
    """The GPU's global nanosecond timer."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def async_proxy_fence():
    """Order this thread's earlier reads (the acquire of a flag) before its later reads through
    the async proxy (TMA loads), as the PTX memory model asks of the two proxies (sm_90+; a no-op
    under the interpreter)."""
    if REAL_TIME:
        tl.inline_asm_elementwise(
            "fence.proxy.async.global; mov.u32 $0, 0;",
            "=r",
            [],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def wait_flag(flag_ptr, epoch, status_ptr, wait_budget, flag_index, peer, SCOPE: tl.constexpr):
    """Poll `*flag_ptr` (acquire at SCOPE) until it reaches `epoch`, for at most `wait_budget`
    (nanoseconds of the GPU clock when compiled, polls under the interpreter).

    Returns 1 when the flag rose, 0 on a timeout or when another program already timed out.
    The first program to time out writes (flag_index + 1, peer) into status_ptr[0:2].
    """
    value = tl.atomic_add(flag_ptr, 0, sem="acquire", scope=SCOPE)
    spent = tl.zeros((), dtype=tl.int64)
    if REAL_TIME:
        start = _clock_ns()
    aborted = tl.load(status_ptr, volatile=True)  # another wait failed already: stop here
    while (value < epoch) & (spent < wait_budget) & (aborted == 0):
        value = tl.atomic_add(flag_ptr, 0, sem="acquire", scope=SCOPE)
        aborted = tl.load(status_ptr, volatile=True)
        if REAL_TIME:
            spent = _clock_ns() - start
        else:
            spent += 1
    if (value < epoch) & (aborted == 0):
        _record_timeout(status_ptr, flag_index, peer)
    return ((value >= epoch) & (aborted == 0)).to(tl.int32)


@triton.jit
def wait_flags(
    flag_ptrs, mask, epoch, status_ptr, wait_budget, flag_index, peers, SCOPE: tl.constexpr
):
    """`wait_flag` on a vector of flags (the lanes under `mask`) at once: each round polls
    every flag still below `epoch` together, so W sources cost one round trip, not W.

    Returns 1 when every flag rose, 0 on a timeout or when another program already timed out.
    A timeout records (flag_index + 1, the `peers` entry of the first lane still waiting).
    """
    lanes = tl.arange(0, flag_ptrs.shape[0])
    value = tl.atomic_add(flag_ptrs, 0, mask=mask, sem="acquire", scope=SCOPE)
    waiting = mask & (value < epoch)
    left = tl.max(waiting.to(tl.int32), axis=0)
    spent = tl.zeros((), dtype=tl.int64)
    if REAL_TIME:
        start = _clock_ns()
    aborted = tl.load(status_ptr, volatile=True)
    while (left != 0) & (spent < wait_budget) & (aborted == 0):
        value = tl.atomic_add(flag_ptrs, 0, mask=waiting, sem="acquire", scope=SCOPE)
        waiting = waiting & (value < epoch)
        left = tl.max(waiting.to(tl.int32), axis=0)
        aborted = tl.load(status_ptr, volatile=True)
        if REAL_TIME:
            spent = _clock_ns() - start
        else:
            spent += 1
    if (left != 0) & (aborted == 0):
        first = tl.min(tl.where(waiting, lanes, flag_ptrs.shape[0]), axis=0)
        _record_timeout(status_ptr, flag_index, tl.sum(tl.where(lanes == first, peers, 0), axis=0))
    return ((left == 0) & (aborted == 0)).to(tl.int32)


@triton.jit
def _record_timeout(status_ptr, flag_index, peer):
    """The first program to time out writes (flag_index + 1, peer) into status_ptr[0:2]."""
    if tl.atomic_cas(status_ptr, 0, flag_index + 1, sem="relaxed", scope="gpu") == 0:
        tl.store(status_ptr + 1, peer)


@triton.jit
def wait_header(
    header_ptr,
    own_header_ptr,
    epoch,
    status_ptr,
    wait_budget,
    flag_index,
    peer,
    SCOPE: tl.constexpr,
):
    """Wait for `peer`'s header [HEADER_WORDS] to publish `epoch` (as wait_flag), then compare
    the call it describes with this rank's (`own_header_ptr`). On a difference, or when the peer
    has overwritten the slot with a later call, the first program records (MISMATCH, peer) in
    the status word and 0 is returned: no rank reads memory laid out for a call its peer did
    not make."""
    slot = (epoch % 2) * SLOT_WORDS
    ok = wait_flag(header_ptr + slot, epoch, status_ptr, wait_budget, flag_index, peer, SCOPE)
    if ok != 0:
        words = slot + 1 + tl.arange(0, SLOT_WORDS)
        in_signature = words < slot + SLOT_WORDS
        theirs = tl.load(header_ptr + words, mask=in_signature, other=0, volatile=True)
        mine = tl.load(own_header_ptr + words, mask=in_signature, other=0, volatile=True)
        differ = tl.sum((theirs != mine).to(tl.int32), axis=0)
        moved_on = tl.load(header_ptr + slot, volatile=True) != epoch
        if (differ > 0) | moved_on:
            if tl.atomic_cas(status_ptr, 0, MISMATCH, sem="relaxed", scope="gpu") == 0:
                tl.store(status_ptr + 1, peer)
            ok = 0
    return ok


@triton.jit
def wait_chunks(
    flags_ptr,
    first_flag,
    row0,
    rows_end,
    chunk_m,
    epoch,
    status_ptr,
    wait_budget,
    peer,
    ok,
    SCOPE: tl.constexpr,
):
    """Wait on the flags of every chunk holding rows [row0, rows_end) of one rank's segment.

    The chunks of a segment are consecutive flags starting at `first_flag`; `ok` is 0 once any
    wait of this program has failed (then nothing more is polled).
    """
    for chunk in range(row0 // chunk_m, (rows_end - 1) // chunk_m + 1):
        if ok != 0:
            ok = wait_flag(
                flags_ptr + first_flag + chunk,
                epoch,
                status_ptr,
                wait_budget,
                first_flag + chunk,
                peer,
                SCOPE,
            )
    return ok


@triton.jit(do_not_specialize=["rank", "epoch", "wait_budget"])
def wait_peers_kernel(
    header_table_ptr,  # [W] int64 addresses of the ranks' headers (their ready flags)
    status_ptr,
    rank,
    epoch,
    wait_budget,
    flags_per_rank,
    WORLD_SIZE: tl.constexpr,
    SCOPE: tl.constexpr,
):
    """One program: wait until every peer has published this call (`wait_header`: its header
    at `epoch`, describing the same call). A timeout is recorded as a wait on the peer's chunk
    0 (flag peer * flags_per_rank)."""
    own = tl.load(header_table_ptr + rank).to(tl.pointer_type(tl.int32))
    ok = 1
    for step in range(1, WORLD_SIZE):
        peer = (rank + step) % WORLD_SIZE
        if ok != 0:
            header = tl.load(header_table_ptr + peer).to(tl.pointer_type(tl.int32))
            ok = wait_header(
                header, own, epoch, status_ptr, wait_budget, peer * flags_per_rank, peer, SCOPE
            )


@triton.jit
def raise_flag_kernel(flags_ptr, index, epoch):
    tl.atomic_xchg(flags_ptr + index, epoch, sem="release", scope="gpu")


def launch_wait_peers(
    header_table: torch.Tensor,
    status: torch.Tensor,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    wait_budget: int,
    flags_per_rank: int,
    scope: str,
) -> None:
    """Run `wait_peers_kernel` (one program) on the current stream."""
    wait_peers_kernel[(1,)](
        header_table,
        status,
        rank,
        epoch,
        wait_budget,
        flags_per_rank,
        WORLD_SIZE=world_size,
        SCOPE=scope,
        num_warps=1,
        **COMPILE_OPTIONS,
    )


def launch_raise_flag(flags: torch.Tensor, index: int, epoch: int) -> None:
    """Run `raise_flag_kernel` (one program, one SM) on the current stream."""
    raise_flag_kernel[(1,)](flags, index, epoch, num_warps=1, **COMPILE_OPTIONS)
