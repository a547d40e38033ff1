"""Triton kernel that sums rows picked by an index: a combine of the top-k slots of tokens.

# T outputs (tokens), k picks per output, P rows, c columns

    out[t] = rows[index[t, 0]] + ... + rows[index[t, k - 1]]      (an index of -1 adds nothing)

accumulated in float32 in the order j = 0..k-1 and stored in rows' dtype or another: the same
bits every run, and the bits of the torch reference (`moeblaze.reference.gather_sum_torch`),
which adds in the same order. One program sums BLOCK_T outputs over BLOCK_N columns; every
picked row is read once and nothing but `out` is written (the torch version writes k [T, c]
temporaries). Used by expert parallelism's combine, and by `moe_mlp(deterministic=True)` to sum
each token's k expert outputs (fp32 rows, stored in the activations' dtype).

`launch_gather_sum` at the end is the launcher.
"""

import torch
import triton
import triton.language as tl

from kernelbase import alloc
from kernelbase.backend import COMPILE_OPTIONS
from kernelbase.intmath import cdiv, next_power_of_2

ELEMENTS_PER_PROGRAM = 4096  # BLOCK_T * BLOCK_N: 16 KB of fp32 accumulator over 4 warps
MAX_BLOCK_N = 512


@triton.jit
def gather_sum_kernel(
    rows_ptr,  # [P, c], unit column stride
    index_ptr,  # [T, k] int32 or int64, contiguous; -1: no row
    out_ptr,  # [T, c], unit column stride
    num_out,
    num_cols,
    stride_rows,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_in, cols_in = t < num_out, cols < num_cols
    t = t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(index_ptr + t * TOP_K + j, mask=t_in, other=-1).to(tl.int64)
        picked = rows_ptr + row[:, None] * stride_rows + cols[None, :]
        acc += tl.load(picked, mask=(row >= 0)[:, None] & cols_in[None, :], other=0.0).to(
            tl.float32
        )
    out = out_ptr + t[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_in[:, None] & cols_in[None, :])


def launch_gather_sum(
    rows: torch.Tensor, index: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """out [T, c] in `dtype` (default rows' dtype): the sum of rows [P, c] at each row of
    index [T, k] (-1: none).

    Checks nothing: rows has a unit column stride, index is contiguous and every entry is -1
    or a row of `rows` (the caller's contract)."""
    num_out, top_k = index.shape
    num_cols = rows.shape[1]
    out = alloc.empty(num_out, num_cols, dtype=dtype or rows.dtype, device=rows.device)
    if out.numel() == 0:
        return out
    block_n = min(next_power_of_2(num_cols), MAX_BLOCK_N)
    block_t = max(ELEMENTS_PER_PROGRAM // block_n, 1)
    grid = (cdiv(num_out, block_t), cdiv(num_cols, block_n))
    gather_sum_kernel[grid](
        rows,
        index,
        out,
        num_out,
        num_cols,
        rows.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        num_warps=4,
        **COMPILE_OPTIONS,
    )
    return out
