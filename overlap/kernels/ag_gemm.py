"""Persistent AllGather+GEMM consumer kernel: C = AllGather(A_shard) @ B on one rank.

# W ranks, m rows per rank shard, K inner, n local columns, CH chunk rows (any size, not tied to
# BLOCK_M), cpr = ceil(m / CH) chunks per rank

    a_local   [m, K]      this rank's shard (read directly, never waited on)
    gathered  [W*m, K]    this rank's gather buffer; rows of rank p arrive chunk by chunk
    flags     [W*cpr]     int32; flags[p*cpr + c] >= epoch once chunk c of rank p has arrived
    b         [K, n]      any strides
    c         [W*m, n]

Tiles are BLOCK_M x BLOCK_N and never straddle two ranks' rows (the last row tile of a rank may
be partial). The persistent programs walk the tiles of the local rank first, then those of rank
(rank + 1) % W, (rank + 2) % W, ...: the order in which the producer brings the chunks in.
Inside one rank's rows the tiles are swizzled (GROUP_M row tiles share a sweep over columns).
Before a tile of a peer's rows, a program waits (acquire, bounded) on the flags of all the chunks
holding that tile's rows: one chunk when BLOCK_M <= CH, several when CH < BLOCK_M. Once a wait
of the launch has failed (a timeout, or a peer's different call found by wait_peers_kernel),
the remaining tiles are written as NaN.

With TMA the operands are read through tensor descriptors (the copy engine on Hopper; the
launcher uses them where the gather buffer and b allow, `tma=True`), else by pointer loads. A
TMA kernel reads the local rows from the gather buffer too (one main loop, one descriptor: two
would need two sets of shared-memory stages), so it waits on the local chunks' flags as well; the
producers copy the local rows first (overlap.dist_world.PeerFused.pull_chunks) or with the rest
(overlap.local_world.LocalFused.gather).

With LINK (a LocalWorld's emulated link, overlap.link) the rank's link begins when the first
program starts (`link_origin` on `link_clock`), and a tile of a peer's rows also waits until
the bytes through its last chunk, in arrival order, have crossed it (`link_ns_per_row` each row).
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
from kernelbase.intmath import cdiv
from overlap.kernels.flags import async_proxy_fence, wait_chunks
from overlap.kernels.link import link_origin, wait_until


# The row strides stay specialised: without their 16-divisibility Triton cannot prove the A rows
# 16-byte aligned, loads A synchronously and waits for every MMA (0.23 of cuBLAS on an H100).
@triton.jit(do_not_specialize=["rank", "epoch", "wait_budget"])
def ag_gemm_kernel(
    a_local_ptr,
    gathered_ptr,
    b_ptr,
    c_ptr,
    flags_ptr,
    status_ptr,
    tile_count_ptr,
    link_clock_ptr,
    gathered_desc,
    b_desc,
    m,
    n,
    K,
    rank,
    epoch,
    wait_budget,
    chunk_m,
    link_ns_per_row,
    stride_al,
    stride_g,
    stride_bk,
    stride_bn,
    stride_c,
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
    tiles_n = tl.cdiv(n, BLOCK_N)
    tiles_per_rank = tiles_m * tiles_n
    chunks_per_rank = tl.cdiv(m, chunk_m)
    ok = 1
    if LINK:
        link_start = link_origin(link_clock_ptr)
    for tile in range(tl.program_id(0), WORLD_SIZE * tiles_per_rank, tl.num_programs(0)):
        step = tile // tiles_per_rank
        src = (rank + step) % WORLD_SIZE
        pid_m, pid_n = swizzle_tile(tile % tiles_per_rank, tiles_m, tiles_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        if (step > 0) | TMA:  # TMA reads the local rows from the gather buffer too
            rows_end = tl.minimum(row0 + BLOCK_M, m)
            ok = wait_chunks(
                flags_ptr,
                src * chunks_per_rank,
                row0,
                rows_end,
                chunk_m,
                epoch,
                status_ptr,
                wait_budget,
                src,
                ok,
                SCOPE,
            )
            if TMA:  # the rows are read through the async proxy
                async_proxy_fence()
            # A peer's rows: those through the tile's last chunk, in arrival order, cross the link.
            if LINK:  # noqa: SIM102  (LINK is a constexpr: the branch compiles away)
                if step > 0:
                    rows_through = (step - 1) * m + tl.minimum(
                        ((rows_end - 1) // chunk_m + 1) * chunk_m, m
                    )
                    wait_until(link_start + (rows_through * link_ns_per_row).to(tl.int64))
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < m
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        # Pointer loads: local rows come straight from the shard, a peer's rows from the gather
        # buffer. TMA: every rank's rows from the gather buffer; a tile of rank src's rows may
        # read the next rank's first rows, masked at the store.
        a_ptr = gathered_ptr + (src * m).to(tl.int64) * stride_g
        stride_a = stride_g
        if step == 0:
            a_ptr = a_local_ptr
            stride_a = stride_al
        acc, _ = tile_matmul(
            a=gathered_desc if TMA else a_ptr,
            a_row0=src * m + row0,
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
        # After a failed wait (a timeout, or a peer's different call) the rows read may be
        # stale: the tile is NaN, never a plausible result. (Selecting here rather than
        # branching around the matmul keeps one live accumulator: no register spill.)
        acc = tl.where(ok != 0, acc, float("nan"))
        c_ptrs = (
            c_ptr + (src * m + rows).to(tl.int64)[:, None] * stride_c + cols.to(tl.int64)[None, :]
        )
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
        if COUNT_TILES:
            out_tile = src * tiles_per_rank + pid_m * tiles_n + pid_n
            tl.atomic_add(tile_count_ptr + out_tile, 1)
            tl.store(tile_count_ptr + WORLD_SIZE * tiles_per_rank + out_tile, tile)


def launch_ag_gemm(
    a_local,
    gathered,
    b,
    out,
    flags,
    status,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    wait_budget: int,
    chunk_m: int,
    config: GemmConfig,
    num_programs: int,
    tile_counts=None,
    scope: str = "gpu",
    link_clock=None,
    link_ns_per_row: float = 0.0,
) -> None:
    """Run `ag_gemm_kernel` for one rank. Shapes as in the module docstring; no checks here.

    `config.tma`: read the gather buffer and b through tensor descriptors where both allow it
    (kernelbase.gemm.matmul_descriptors), else (or with False) by pointer loads. The TMA kernel
    waits on the local rows' flags too.

    `scope`: memory scope of the flag polls ("gpu", or "sys" for flags raised from another GPU).
    `link_clock` (int64 [1], zero; optional): the rank's emulated link (overlap.link), whose
    rows take `link_ns_per_row` each.

    `tile_counts` (int32 [2, W * tiles per rank], zeros, optional; for tests): row 0 counts how
    often each output tile was computed, row 1 gets the position in the walk that computed it.
    """
    m, K = a_local.shape
    n = b.shape[1]
    descs = matmul_descriptors(gathered, b, config)
    ag_gemm_kernel[(num_programs,)](
        a_local,
        gathered,
        b,
        out,
        flags,
        status,
        tile_counts if tile_counts is not None else flags,
        link_clock if link_clock is not None else flags,
        *(descs[:2] if descs else (gathered, b)),
        m,
        n,
        K,
        rank,
        epoch,
        wait_budget,
        chunk_m,
        float(link_ns_per_row),
        a_local.stride(0),
        gathered.stride(0),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        WORLD_SIZE=world_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        COUNT_TILES=tile_counts is not None,
        **dot_options(a_local.dtype),
        SCOPE=scope,
        LINK=link_clock is not None,
        TMA=descs is not None,
        B_KN=descs[2] if descs else True,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **COMPILE_OPTIONS,
    )


def ag_gemm_tiles(m: int, n: int, world_size: int, config: GemmConfig) -> int:
    """Number of output tiles of one rank's AG-GEMM (tiles never straddle two ranks' rows)."""
    return world_size * cdiv(m, config.block_m) * cdiv(n, config.block_n)
