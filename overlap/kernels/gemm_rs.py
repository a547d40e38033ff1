"""GEMM+ReduceScatter kernels: out_d = sum_s (A_s @ B_s)[rows of rank d], on each rank d.

# W ranks, M = W*m rows, k inner (local), N columns, CH chunk rows, cpr = ceil(m / CH)

Producer, on every rank s (`gemm_rs_kernel`):

    a        [M, k]       this rank's input (unit stride along k)
    b        [k, N]       any strides
    partial  [M, N]       this rank's partial products (in a's dtype), read by every rank
    counters [W*cpr]      int32, zeroed before the launch: finished tiles per (dest, chunk)
    flags    [W*cpr]      int32; flags[d*cpr + c] >= epoch once chunk c of dest d is complete

The persistent programs produce the rows destined for rank (s + 1) % W first, then (s + 2) % W,
..., and the local rank's own rows last, so the chunk the next peer needs is finished first.
After storing a tile, a program bumps (release) the counter of every chunk the tile overlaps; the
program that completes a chunk's count raises the chunk's flag (release).

Consumer, on every rank d (`rs_reduce_kernel`): first every source's header (its call published,
the same call: overlap.kernels.flags.wait_header); then for each block of its m output rows, wait
(acquire, bounded) on the flags of the chunks holding those rows in every source's partial
buffer, all W sources' flags of a chunk in one poll (`wait_flags`; a program waits on a chunk
once, not again for each column block of its rows), load the W partial blocks [BLOCK_R,
BLOCK_N] (16-byte vectors, all W loads issued before the first add), sum them in fp32 and
store out_d (NaN where a wait failed). The partial buffers and headers + flags of the sources
are separate allocations, reached through tables of their addresses, as peer buffers are.

With LINK (a LocalWorld's emulated link, overlap.link): the producer queues each chunk it
completes for another rank on its rank's link (`link_enqueue`, `link_ns_per_row` each row) and
records the chunk's arrival in `link_clock` before raising its flag; the reduction, once a
peer's flag is up, also waits for that arrival.
"""

import triton
import triton.language as tl

from kernelbase.backend import COMPILE_OPTIONS
from kernelbase.gemm import (
    GemmConfig,
    dot_options,
    matmul_descriptors,
    swizzle_tile,
    tile_matmul,
)
from kernelbase.intmath import cdiv, next_power_of_2
from overlap.kernels.flags import HEADER_WORDS, wait_flags, wait_header
from overlap.kernels.link import link_enqueue, wait_until


@triton.jit(do_not_specialize=["rank", "epoch"])
def gemm_rs_kernel(
    a_ptr,
    b_ptr,
    partial_ptr,
    counters_ptr,
    flags_ptr,
    tile_count_ptr,
    link_clock_ptr,
    a_desc,
    b_desc,
    m,
    N,
    K,
    rank,
    epoch,
    chunk_m,
    link_ns_per_row,
    stride_a,
    stride_bk,
    stride_bn,
    stride_p,
    WORLD_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SCOPE: tl.constexpr,
    LINK: tl.constexpr,
    TMA: tl.constexpr,
    B_KN: tl.constexpr,
):
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_rank = tiles_m * tiles_n
    chunks_per_rank = tl.cdiv(m, chunk_m)
    for tile in range(tl.program_id(0), WORLD_SIZE * tiles_per_rank, tl.num_programs(0)):
        dest = (rank + 1 + tile // tiles_per_rank) % WORLD_SIZE
        pid_m, pid_n = swizzle_tile(tile % tiles_per_rank, tiles_m, tiles_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        rows = dest * m + row0 + tl.arange(0, BLOCK_M)
        row_mask = row0 + tl.arange(0, BLOCK_M) < m
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        # TMA: the last row tile of dest may read the next dest's first rows, masked below.
        acc, _ = tile_matmul(
            a=a_desc if TMA else a_ptr,
            a_row0=dest * m + row0,
            a_rows=rows,
            row_mask=row_mask,
            stride_am=stride_a,
            b=b_desc if TMA else b_ptr,
            stride_bk=stride_bk,
            stride_bn=stride_bn,
            col0=pid_n * BLOCK_N,
            cols=cols,
            col_mask=col_mask,
            K=K,
            BLOCK_K=BLOCK_K,
            A_TMA=TMA,
            B_TMA=TMA,
            B_KN=B_KN,
            DOT_FP32=DOT_FP32,
            INPUT_PRECISION=INPUT_PRECISION,
        )
        p_ptrs = partial_ptr + rows.to(tl.int64)[:, None] * stride_p + cols.to(tl.int64)[None, :]
        tl.store(
            p_ptrs, acc.to(partial_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :]
        )
        if COUNT_TILES:
            out_tile = dest * tiles_per_rank + pid_m * tiles_n + pid_n
            tl.atomic_add(tile_count_ptr + out_tile, 1)
            tl.store(tile_count_ptr + WORLD_SIZE * tiles_per_rank + out_tile, tile)
        # Every thread's stores are issued before the release below publishes them.
        tl.debug_barrier()
        rows_end = tl.minimum(row0 + BLOCK_M, m)
        for chunk in range(row0 // chunk_m, (rows_end - 1) // chunk_m + 1):
            chunk_row0 = chunk * chunk_m
            chunk_rows_end = tl.minimum(chunk_row0 + chunk_m, m)
            expected = ((chunk_rows_end - 1) // BLOCK_M - chunk_row0 // BLOCK_M + 1) * tiles_n
            index = dest * chunks_per_rank + chunk
            done = tl.atomic_add(counters_ptr + index, 1, sem="acq_rel", scope=SCOPE) + 1
            if done == expected:
                if LINK:  # when the chunk arrives at dest (at once for the local rows)
                    arrival = tl.zeros((), dtype=tl.int64)
                    if dest != rank:
                        transfer = (chunk_rows_end - chunk_row0) * link_ns_per_row
                        arrival = link_enqueue(link_clock_ptr + rank, transfer.to(tl.int64))
                    chunk_word = WORLD_SIZE + (rank * WORLD_SIZE) * chunks_per_rank + index
                    tl.store(link_clock_ptr + chunk_word, arrival)
                    tl.debug_barrier()  # the arrival is stored before the flag publishes it
                tl.atomic_xchg(flags_ptr + index, epoch, sem="release", scope=SCOPE)


@triton.jit(do_not_specialize=["dest", "epoch", "wait_budget"])
def rs_reduce_kernel(
    partial_table_ptr,  # [W] int64 addresses of the ranks' partial buffers
    header_table_ptr,  # [W] int64 addresses of the ranks' headers; their flags follow them
    out_ptr,
    status_ptr,
    link_clock_ptr,
    m,
    N,
    dest,
    epoch,
    wait_budget,
    chunk_m,
    stride_p,
    stride_out,
    WORLD_SIZE: tl.constexpr,
    SOURCES: tl.constexpr,  # WORLD_SIZE rounded up to a power of two: one lane per source
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCOPE: tl.constexpr,
    LINK: tl.constexpr,
):
    row_blocks = tl.cdiv(m, BLOCK_R)
    col_blocks = tl.cdiv(N, BLOCK_N)
    chunks_per_rank = tl.cdiv(m, chunk_m)
    # Every source published this call, and the same call, before its partial rows are read.
    own = tl.load(header_table_ptr + dest).to(tl.pointer_type(tl.int32))
    ok = 1
    for j in tl.static_range(WORLD_SIZE):
        src = (dest + WORLD_SIZE - 1 - j) % WORLD_SIZE
        if ok != 0:
            header = tl.load(header_table_ptr + src).to(tl.pointer_type(tl.int32))
            ok = wait_header(
                header, own, epoch, status_ptr, wait_budget, dest * chunks_per_rank, src, SCOPE
            )
    # One lane per source, in the order their chunks for dest are produced (dest - 1, dest - 2,
    # ..., dest: a timeout names the first of them still missing).
    lanes = tl.arange(0, SOURCES)
    is_source = lanes < WORLD_SIZE
    srcs = (dest + WORLD_SIZE - 1 - lanes) % WORLD_SIZE
    dest_flags = tl.load(header_table_ptr + srcs, mask=is_source, other=0).to(
        tl.pointer_type(tl.int32)
    ) + (HEADER_WORDS + dest * chunks_per_rank)
    ready_first = 0  # chunks [ready_first, ready_last] are known complete in every source
    ready_last = -1
    for item in range(tl.program_id(0), row_blocks * col_blocks, tl.num_programs(0)):
        row0 = (item // col_blocks) * BLOCK_R
        rows_end = tl.minimum(row0 + BLOCK_R, m)
        first, last = row0 // chunk_m, (rows_end - 1) // chunk_m
        if (ok != 0) & ((first < ready_first) | (last > ready_last)):
            # All W sources' flags of each chunk in one poll; then, with a link, the chunks'
            # arrivals over the sources' links (any order: the wait ends at the latest).
            for chunk in range(first, last + 1):
                if ok != 0:
                    ok = wait_flags(
                        dest_flags + chunk,
                        is_source,
                        epoch,
                        status_ptr,
                        wait_budget,
                        dest * chunks_per_rank + chunk,
                        srcs,
                        SCOPE,
                    )
            if LINK:  # noqa: SIM102  (LINK is a constexpr: the branch compiles away)
                if ok != 0:
                    arrival = tl.zeros((), dtype=tl.int64)
                    for j in tl.static_range(1, WORLD_SIZE):  # the peers: j = 0 is dest itself
                        src = (dest + j) % WORLD_SIZE
                        arrivals = (
                            link_clock_ptr
                            + WORLD_SIZE
                            + (src * WORLD_SIZE + dest) * chunks_per_rank
                        )
                        for chunk in range(first, last + 1):
                            arrival = tl.maximum(arrival, tl.load(arrivals + chunk, volatile=True))
                    wait_until(arrival)
            ready_first, ready_last = first, last
        local_rows = row0 + tl.arange(0, BLOCK_R)
        cols = (item % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (local_rows < m)[:, None] & (cols < N)[None, :]
        offsets = (dest * m + local_rows).to(tl.int64)[:, None] * stride_p + cols[None, :]
        # After a failed wait nothing is read: NaN, never a plausible wrong result. Else the W
        # partial blocks, summed in fp32: independent loads, all in flight before the adds need
        # them (each thread sums its own elements of every source: no exchange between warps).
        acc = tl.full((BLOCK_R, BLOCK_N), float("nan"), dtype=tl.float32)
        if ok != 0:
            acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(WORLD_SIZE):
                src = (dest + WORLD_SIZE - 1 - j) % WORLD_SIZE
                partial = tl.load(partial_table_ptr + src).to(
                    tl.pointer_type(out_ptr.dtype.element_ty)
                )
                # 16-byte aligned (torch and symmetric-memory allocations are): said here, the
                # loads move 16-byte vectors, else one element per instruction.
                partial = tl.multiple_of(partial, 16)
                acc += tl.load(partial + offsets, mask=mask, other=0.0).to(tl.float32)
        out_ptrs = out_ptr + local_rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch_gemm_rs(
    a,
    b,
    partial,
    counters,
    flags,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    chunk_m: int,
    config: GemmConfig,
    num_programs: int,
    tile_counts=None,
    scope: str = "gpu",
    link_clock=None,
    link_ns_per_row: float = 0.0,
) -> None:
    """Run `gemm_rs_kernel` for one rank; `counters` must be zero. No checks here.

    `config.tma`: read a and b through tensor descriptors where both allow it, as
    `launch_ag_gemm`.

    `tile_counts`: as for `launch_ag_gemm` (output tiles indexed by destination rank).
    `scope`: memory scope of the counters and flags ("sys" when other GPUs read the flags).
    `link_clock` (int64 [W + W*W*cpr], zero; optional): the world's emulated link
    (overlap.kernels.link), whose rows take `link_ns_per_row` each.
    """
    M, K = a.shape
    N = b.shape[1]
    descs = matmul_descriptors(a, b, config)
    gemm_rs_kernel[(num_programs,)](
        a,
        b,
        partial,
        counters,
        flags,
        tile_counts if tile_counts is not None else counters,
        link_clock if link_clock is not None else counters,
        *(descs[:2] if descs else (a, b)),
        M // world_size,
        N,
        K,
        rank,
        epoch,
        chunk_m,
        float(link_ns_per_row),
        a.stride(0),
        b.stride(0),
        b.stride(1),
        partial.stride(0),
        WORLD_SIZE=world_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        COUNT_TILES=tile_counts is not None,
        **dot_options(a.dtype),
        SCOPE=scope,
        LINK=link_clock is not None,
        TMA=descs is not None,
        B_KN=descs[2] if descs else True,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **COMPILE_OPTIONS,
    )


def launch_rs_reduce(
    partial_table,
    header_table,
    out,
    status,
    *,
    dest: int,
    world_size: int,
    row_stride: int,
    epoch: int,
    wait_budget: int,
    chunk_m: int,
    num_programs: int,
    block_r: int,
    block_n: int,
    scope: str = "gpu",
    link_clock=None,
) -> None:
    """Run `rs_reduce_kernel` for rank `dest`: out [m, N] from the W partial buffers.

    `partial_table` / `header_table` are int64 tensors holding the addresses of the W sources'
    partial buffers ([M, N], row stride `row_stride`, out's dtype) and headers (each
    [HEADER_WORDS] int32 followed by the source's [W*cpr] chunk flags).
    `scope`: memory scope of the flag polls ("sys" when the sources are other GPUs).
    `link_clock`: the producers' emulated link (see `launch_gemm_rs`), optional.
    """
    m, N = out.shape
    rs_reduce_kernel[(num_programs,)](
        partial_table,
        header_table,
        out,
        status,
        link_clock if link_clock is not None else status,
        m,
        N,
        dest,
        epoch,
        wait_budget,
        chunk_m,
        row_stride,
        out.stride(0),
        WORLD_SIZE=world_size,
        SOURCES=next_power_of_2(world_size),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        SCOPE=scope,
        LINK=link_clock is not None,
        num_warps=8,
        **COMPILE_OPTIONS,
    )


def gemm_rs_tiles(m: int, N: int, world_size: int, config: GemmConfig) -> int:
    """Number of tiles of one rank's GEMM-RS producer."""
    return world_size * cdiv(m, config.block_m) * cdiv(N, config.block_n)
