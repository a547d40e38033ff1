"""Triton kernels of the expert MLP: grouped GEMMs that read and write rows through the plan.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots, p sorted position (routing_plan)
# token(p) = sorted_slots[p] // k, slot(p) = sorted_slots[p], w = topk_weights viewed as [S]

A tile is up to BLOCK_M consecutive sorted positions of one expert (the plan's tile metadata).
Per-token tensors (x, dout, out, dx) are read or written through token(p); per-position tensors
(h = pre-activation [S, 2F], a = activation [S, F], dh [S, 2F]) live in sorted order. No
[S, d] tensor is ever formed.

forward   gate_up_kernel       h[p] = x[token(p)] @ w13[e]^T;
                               a[p] = w[slot(p)] * SwiGLU(h_gate, h_up)
          scatter_rows_kernel  out[token(p)] += a[p] @ w2[e]^T                        (fp32)
backward  grad_act_kernel      g = dout[token(p)] @ w2[e];  dw[slot(p)] = rowsum(g * act[p]);
                               dh[p] = SwiGLU backward of w[slot(p)] * g at h[p];  a[p] again
                               (dh may overwrite h: recompute="up_proj")
          scatter_rows_kernel  dx[token(p)] += dh[p] @ w13[e]
          expert_wgrad_kernel  dw2[e] = sum_p dout[token(p)]^T a[p]
                               dw13[e]^T = sum_p x[token(p)]^T dh[p]  (stored transposed)

SwiGLU is silu(h_gate) * h_up, or its clamped / quick-GELU / soft-capped form (moeblaze.activation;
in Triton: moeblaze.kernels.activation), whose numbers the kernels take as constexprs ALPHA, LIMIT,
UP_OFFSET, GATE_SOFTCAP, UP_SOFTCAP; a moeblaze.Gated unit (GeGLU, ...) has another gate function,
which the constexpr ACT names ("swiglu" for SwiGLU's).
Experts without a gate (moeblaze.Ungated, constexpr GATED false) have h [S, F] and
a = w * ACT(h); every stage after gate_up reads it as it reads the gated h, F columns wide
instead of 2F. a is the activation act = SwiGLU(h_gate, h_up) already scaled by the routing
weight, so that the down projection's combine and dw2 are plain products: no GEMM operand is
scaled in registers (a scaled operand cannot go from shared memory straight to the tensor
cores).

The GEMM main loop and tile order are shared with overlap (kernelbase.gemm). The weights
(`w13`, `w2`) and the per-position tensors read in sorted order (scatter_rows' rows, the sorted
side of expert_wgrad, and h in grad_act's epilogue where its config says so: GemmConfig.
epilogue_tma) are passed as pointers or, where the launcher can describe them (Hopper,
contiguous 16-byte aligned rows), as tensor descriptors that the copy engine (TMA) reads: the
constexprs A_TMA / B_TMA / B_KN / H_TMA / SORTED_TMA say which. Gathered rows (x, dout by
token) are always loaded by index. A descriptor block that reaches past a tile's expert reads
rows of the next one only where they meet zeros of the other operand and masked stores (see
each kernel); expert_wgrad reads none.

`TritonStages` at the end is the launcher: it allocates the outputs and launches these kernels on
CUDA (or on the CPU under the Triton interpreter), with the tile configurations chosen per GPU.
It checks nothing: the op (moeblaze.ops) did. `moeblaze.reference.TorchStages` computes the same
stages with torch ops.
"""

import dataclasses

import torch
import triton
import triton.language as tl

import moeblaze.activation
from kernelbase import alloc
from kernelbase.backend import COMPILE_OPTIONS, interpreting
from kernelbase.gemm import (
    GemmConfig,
    b_descriptor,
    device_arch,
    launch_meta,
    prefetch_l2,
    swizzle_tile,
    tile_matmul,
    tma_descriptor,
    tma_supported,
)
from kernelbase.intmath import cdiv
from moeblaze.activation import SWIGLU, Activation
from moeblaze.kernels.activation import gated, ungated
from moeblaze.kernels.gather_sum import launch_gather_sum
from moeblaze.routing_plan import RoutingPlan


@triton.jit
def _plan_tile(
    sorted_slots_ptr,
    expert_offsets_ptr,
    tile_expert_ptr,
    tile_row_start_ptr,
    num_tiles_ptr,
    max_tiles,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """This program's plan tile and column block of an N-wide output.

    Returns (valid, expert, row0, rows [BLOCK_M] sorted positions row0 .., row_mask, slots,
    pid_n, cols [BLOCK_N], col_mask). Programs past the plan's `num_tiles` get valid == False.
    """
    tile, pid_n = swizzle_tile(tl.program_id(0), max_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    valid = tile < tl.load(num_tiles_ptr)
    expert = tl.where(valid, tl.load(tile_expert_ptr + tile), 0)  # padding tiles hold E
    row0 = tl.load(tile_row_start_ptr + tile)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.where(valid, tl.load(expert_offsets_ptr + expert + 1), 0)
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return valid, expert, row0, rows, row_mask, slots, pid_n, cols, cols < N


@triton.jit
def gate_up_kernel(
    x_ptr,
    w13,
    bias_ptr,
    weights_ptr,
    h_ptr,
    a_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    tile_expert_ptr,
    tile_row_start_ptr,
    num_tiles_ptr,
    max_tiles,
    D,
    F,
    stride_x,
    stride_we,
    stride_wk,
    stride_wn,
    stride_bias,
    stride_h,
    stride_a,
    TOP_K: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    GATE_SOFTCAP: tl.constexpr,
    UP_SOFTCAP: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    B_TMA: tl.constexpr,
    B_KN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """h[p] = x[token(p)] @ w13[e]^T + b13[e]  [S, 2F] and/or a[p] = w[slot(p)] * SwiGLU(h_gate,
    h_up) [S, F] (the gated unit of the constants ACT, ALPHA, LIMIT, UP_OFFSET, GATE_SOFTCAP,
    UP_SOFTCAP, INTERLEAVED: `gated`), or if not GATED (moeblaze.Ungated), h [S, F] and
    a = w * ACT(h).

    A program computes the activation columns `cols`: with INTERLEAVED the 2 * BLOCK_N
    consecutive columns of h from 2 * cols[0] on (gate, up alternating; one product, split in
    the epilogue), ungated the columns `cols` of h (one product), else the gate columns `cols`
    and the up columns F further on (DUAL). The bias b13 (HAS_BIAS; h's width, unit column
    stride) is added in fp32."""
    valid, expert, row0, rows, row_mask, slots, pid_n, cols, col_mask = _plan_tile(
        sorted_slots_ptr,
        expert_offsets_ptr,
        tile_expert_ptr,
        tile_row_start_ptr,
        num_tiles_ptr,
        max_tiles,
        F,
        BLOCK_M,
        BLOCK_N,
        GROUP_M,
    )
    if valid:
        if STORE_A:  # loaded before the main loop: `slots` need not stay live through it
            w_row = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
        if INTERLEAVED:  # B's columns (h's) of this program's gate and up, alternating
            pre_col0 = 2 * pid_n * BLOCK_N
            pre_cols = pre_col0 + tl.arange(0, 2 * BLOCK_N)
            pre_mask = pre_cols < 2 * F
        else:  # its (gate) columns, and if DUAL the up columns F further on
            pre_col0, pre_cols, pre_mask = pid_n * BLOCK_N, cols, col_mask
        gate, up = tile_matmul(
            a=x_ptr,
            a_row0=row0,
            a_rows=slots // TOP_K,
            row_mask=row_mask,
            stride_am=stride_x,
            b=w13,
            b_index=expert,
            stride_bi=stride_we,
            stride_bk=stride_wk,
            stride_bn=stride_wn,
            col0=pre_col0,
            cols=pre_cols,
            col_mask=pre_mask,
            second_n=F,
            K=D,
            BLOCK_K=BLOCK_K,
            DUAL=GATED and not INTERLEAVED,
            A_TMA=False,
            B_TMA=B_TMA,
            B_KN=B_KN,
            DOT_FP32=DOT_FP32,
            INPUT_PRECISION=INPUT_PRECISION,
        )
        if INTERLEAVED or not GATED:
            pre = gate  # [BLOCK_M, 2 * BLOCK_N]: gate, up, gate, ... (ungated: [BLOCK_M, BLOCK_N])
            if HAS_BIAS:
                bias = tl.load(bias_ptr + expert * stride_bias + pre_cols, mask=pre_mask, other=0.0)
                pre += bias.to(tl.float32)[None, :]
            # Rounded to the storage dtype first, as below.
            pre = pre.to(x_ptr.dtype.element_ty)
            if STORE_H:
                h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + pre_cols[None, :]
                tl.store(h_ptrs, pre, mask=row_mask[:, None] & pre_mask[None, :])
            if INTERLEAVED:
                gate, up = tl.split(tl.reshape(pre, (BLOCK_M, BLOCK_N, 2)))
        else:
            if HAS_BIAS:
                bias_ptrs = bias_ptr + expert * stride_bias + cols
                gate += tl.load(bias_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                up += tl.load(bias_ptrs + F, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            # Round to the storage dtype first: SwiGLU recomputed in backward from the stored h
            # then sees exactly the values the forward used.
            gate = gate.to(x_ptr.dtype.element_ty)
            up = up.to(x_ptr.dtype.element_ty)
            mask = row_mask[:, None] & col_mask[None, :]
            if STORE_H:
                h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
                tl.store(h_ptrs, gate, mask=mask)
                tl.store(h_ptrs + F, up, mask=mask)
        if STORE_A:
            if GATED:
                act, _, _, _ = gated(
                    gate, up, ACT, ALPHA, LIMIT, UP_OFFSET, GATE_SOFTCAP, UP_SOFTCAP
                )
            else:
                act, _ = ungated(pre, ACT)
            act *= w_row[:, None]
            a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_a + cols[None, :]
            mask = row_mask[:, None] & col_mask[None, :]
            tl.store(a_ptrs, act.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _h_lines(
    h,
    rows,
    row_mask,
    row0,
    col0,
    F,
    stride_h,
    WIDTH: tl.constexpr,
    GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Pointers [BLOCK_M, LINES] to the 128-byte lines of h (rows of `stride_h`) that grad_act's
    epilogue reads for `rows` and the tile's columns col0 .. col0 + WIDTH: gate and up (F
    further on), or their interleaved pairs, or the ungated h: one pointer a line where h's
    rows and its up half start on a line (F and the row stride whole lines; elsewhere part of
    a line may be left out, which costs only a slower load). Rows past the expert point at
    row0's and columns past h's last at its last, so every pointer lies inside h."""
    LINE: tl.constexpr = 1024 // h.dtype.element_ty.primitive_bitwidth  # elements a line
    SPAN: tl.constexpr = 2 * WIDTH if INTERLEAVED else WIDTH  # columns a row (one half)
    N: tl.constexpr = (SPAN + LINE - 1) // LINE  # lines a half
    HALVES: tl.constexpr = 2 if GATED and not INTERLEAVED else 1
    line = tl.arange(0, HALVES * N)
    first = 2 * col0 if INTERLEAVED else col0
    width = 2 * F if INTERLEAVED else F
    cols = tl.minimum(first + (line % N) * LINE, width - 1) + (line // N) * F
    safe_rows = tl.where(row_mask, rows, row0)
    return h + safe_rows.to(tl.int64)[:, None] * stride_h + cols[None, :]


@triton.jit
def _grad_act_columns(
    g, tile, col0, out, STORE_A: tl.constexpr, H_TMA: tl.constexpr, ACTIVATION: tl.constexpr
):
    """The epilogue of grad_act on g, the tile's columns col0 .. col0 + WIDTH: stores dh (and
    a, scaled by the routing weights `w_row` as the forward's); returns rowsum(g * act) over
    these columns.

    tile: (rows, row_mask, w_row, row0, F), the tile's sorted positions and routing weights;
    out: (h, dh_ptr, a_ptr, stride_h, stride_dh, stride_a). H_TMA: `h` is a tensor descriptor
    of h (blocks of this slice's columns; gated and not interleaved, of h viewed as [S, 2, F],
    gate and up), else a pointer. ACTIVATION, a tuple of constants: (ACT, GATED, ALPHA, LIMIT,
    GRAD_AT_LIMIT, UP_OFFSET, GATE_SOFTCAP, UP_SOFTCAP, INTERLEAVED). ACT, ALPHA, LIMIT,
    UP_OFFSET, GATE_SOFTCAP, UP_SOFTCAP: the gated unit (`gated`); GRAD_AT_LIMIT: a value
    exactly at the limit passes its gradient (moeblaze.activation.CLAMP_GRAD_AT_LIMIT);
    INTERLEAVED: h and dh hold gate and up alternating (the 2 * WIDTH columns from 2 * col0
    on), else the gate columns col0 .. and the up columns F further on. Not GATED: h and dh are
    F wide and act = ACT(h) (`ungated`)."""
    # Named one by one: Triton 3.6 cannot unpack a tuple of constants in one assignment.
    ACT: tl.constexpr = ACTIVATION[0]
    GATED: tl.constexpr = ACTIVATION[1]
    ALPHA: tl.constexpr = ACTIVATION[2]
    LIMIT: tl.constexpr = ACTIVATION[3]
    GRAD_AT_LIMIT: tl.constexpr = ACTIVATION[4]
    UP_OFFSET: tl.constexpr = ACTIVATION[5]
    GATE_SOFTCAP: tl.constexpr = ACTIVATION[6]
    UP_SOFTCAP: tl.constexpr = ACTIVATION[7]
    INTERLEAVED: tl.constexpr = ACTIVATION[8]
    rows, row_mask, w_row, row0, F = tile
    h, dh_ptr, a_ptr, stride_h, stride_dh, stride_a = out
    BLOCK_M: tl.constexpr = g.shape[0]
    WIDTH: tl.constexpr = g.shape[1]
    # From an arange, not sliced out of the tile's columns: the compiler then knows them
    # contiguous and stores 16 bytes per thread along a row (a sliced index vector reads as
    # unknown contiguity, and every thread stored one element down a column: 2 bytes a sector).
    cols = col0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols < F)[None, :]
    if not GATED:
        if H_TMA:  # rows past the expert and columns past F: masked, as below
            pre = h.load([row0, col0])
        else:
            h_ptrs = h + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
            pre = tl.load(h_ptrs, mask=mask, other=0.0)
        act, slope = ungated(pre, ACT)
    elif INTERLEAVED:
        pre_cols = 2 * col0 + tl.arange(0, 2 * WIDTH)
        pre_mask = row_mask[:, None] & (pre_cols < 2 * F)[None, :]
        if H_TMA:  # other values of h past the expert and past 2F: masked, as below
            pre = h.load([row0, 2 * col0])
        else:
            h_ptrs = h + rows.to(tl.int64)[:, None] * stride_h + pre_cols[None, :]
            pre = tl.load(h_ptrs, mask=pre_mask, other=0.0)
        gate, up = tl.split(tl.reshape(pre, (BLOCK_M, WIDTH, 2)))
    elif H_TMA:
        # h viewed as [S, 2, F]: the gate and up columns of the slice in one copy (one round
        # trip instead of two). Rows past the tile's expert read other values of h: those
        # products are masked below (g is zero there: its A rows read as zero).
        gate, up = tl.split(tl.permute(h.load([row0, 0, col0]), (0, 2, 1)))
    else:
        h_ptrs = h + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
        gate = tl.load(h_ptrs, mask=mask, other=0.0)
        up = tl.load(h_ptrs + F, mask=mask, other=0.0)
    if GATED:
        gate = gate.to(tl.float32)
        up = up.to(tl.float32)
        act, glu, slope, up_c = gated(
            gate, up, ACT, ALPHA, LIMIT, UP_OFFSET, GATE_SOFTCAP, UP_SOFTCAP
        )
    if STORE_A:  # bit for bit the forward's a
        weighted = (act * w_row[:, None]).to(a_ptr.dtype.element_ty)
        tl.store(a_ptr + rows.to(tl.int64)[:, None] * stride_a + cols[None, :], weighted, mask=mask)
    # dw reads the activation rounded to the storage dtype, as the torch stages do.
    act = act.to(a_ptr.dtype.element_ty)
    d_act = g * w_row[:, None]
    dh_ptrs = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + cols[None, :]
    if not GATED:
        tl.store(dh_ptrs, (d_act * slope).to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        d_up = d_act * glu
        if UP_SOFTCAP is not None:  # up_c - UP_OFFSET = UP_SOFTCAP * tanh(up' / UP_SOFTCAP)
            tanh = (up_c - UP_OFFSET) / UP_SOFTCAP
            d_up = d_up * (1.0 - tanh * tanh)
        if LIMIT is not None:  # no gradient through a clamped value, as torch.clamp's
            if GRAD_AT_LIMIT:
                d_up = tl.where((up >= -LIMIT) & (up <= LIMIT), d_up, 0.0)
            else:
                d_up = tl.where((up > -LIMIT) & (up < LIMIT), d_up, 0.0)
        if not INTERLEAVED:  # stored now: fewer registers live
            tl.store(dh_ptrs + F, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
        d_gate = d_act * up_c * slope
        if LIMIT is not None:
            d_gate = tl.where((gate <= LIMIT) if GRAD_AT_LIMIT else (gate < LIMIT), d_gate, 0.0)
        if INTERLEAVED:
            d_pre = tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * WIDTH))
            d_pre_ptrs = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + pre_cols[None, :]
            tl.store(d_pre_ptrs, d_pre.to(dh_ptr.dtype.element_ty), mask=pre_mask)
        else:
            tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
    return tl.sum(tl.where(mask, g * act.to(tl.float32), 0.0), axis=1)


@triton.jit
def _grad_act_slices(
    g,
    tile,
    col0,
    out,
    SPLIT: tl.constexpr,
    STORE_A: tl.constexpr,
    H_TMA: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """`_grad_act_columns` on SPLIT (a power of two) column slices of g [BLOCK_M, WIDTH], one
    after another (halving recursively), so that a wide tile's temporaries need not all be
    live in registers at once. Returns the rowsum over all of them."""
    if SPLIT == 1:
        dw = _grad_act_columns(g, tile, col0, out, STORE_A, H_TMA, ACTIVATION)
    else:
        half: tl.constexpr = g.shape[1] // 2
        left, right = tl.split(tl.permute(tl.reshape(g, (g.shape[0], 2, half)), (0, 2, 1)))
        dw = _grad_act_slices(left, tile, col0, out, SPLIT // 2, STORE_A, H_TMA, ACTIVATION)
        dw += _grad_act_slices(
            right, tile, col0 + half, out, SPLIT // 2, STORE_A, H_TMA, ACTIVATION
        )
    return dw


@triton.jit
def grad_act_kernel(
    dout_ptr,
    w2,
    h,
    weights_ptr,
    dh_ptr,
    a_ptr,
    dw_partial_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    tile_expert_ptr,
    tile_row_start_ptr,
    num_tiles_ptr,
    max_tiles,
    D,
    F,
    stride_dout,
    stride_we,
    stride_wk,
    stride_wn,
    stride_h,
    stride_dh,
    stride_a,
    TOP_K: tl.constexpr,
    STORE_A: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
    H_TMA: tl.constexpr,
    H_PREFETCH: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    GRAD_AT_LIMIT: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    GATE_SOFTCAP: tl.constexpr,
    UP_SOFTCAP: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    B_TMA: tl.constexpr,
    B_KN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Backward through the down projection, the routing weight and the activation (the
    constants ACT, ALPHA, LIMIT, GRAD_AT_LIMIT, UP_OFFSET, GATE_SOFTCAP, UP_SOFTCAP,
    INTERLEAVED: `_grad_act_columns`), in one epilogue.

    g = dout[token(p)] @ w2[e] [S, F]; dw_partial[slot, pid_n] = rowsum(g * a) over this
    program's columns; dh = the activation's backward of w[slot] * g; a recomputed from h if
    STORE_A.
    The epilogue runs on EPILOGUE_SPLIT (1, 2, 4 or 8) column slices of the tile one after
    another (`_grad_act_slices`); with H_TMA it reads h through a tensor descriptor. With
    H_PREFETCH (h a pointer), the program first asks L2 for the lines of h its epilogue will
    read: the slices' loads then find them there instead of each waiting for memory in turn
    (they cannot be issued early themselves, since dh may be h).

    dh may be h itself: a program reads the h elements of its rows and columns (gate and up)
    before it stores theirs of dh, and no other program reads them except in lanes it masks
    (a descriptor block past the tile's expert or past F), so dh overwrites h safely.
    """
    num_pid_n = tl.cdiv(F, BLOCK_N)
    valid, expert, row0, rows, row_mask, slots, pid_n, cols, col_mask = _plan_tile(
        sorted_slots_ptr,
        expert_offsets_ptr,
        tile_expert_ptr,
        tile_row_start_ptr,
        num_tiles_ptr,
        max_tiles,
        F,
        BLOCK_M,
        BLOCK_N,
        GROUP_M,
    )
    if valid:
        col0 = pid_n * BLOCK_N
        if H_PREFETCH:  # while the main loop runs
            lines = _h_lines(
                h, rows, row_mask, row0, col0, F, stride_h, BLOCK_N, GATED, INTERLEAVED
            )
            prefetch_l2(lines)
        # Loaded before the main loop too, so the epilogue does not start with its round trip.
        w_row = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
        g, _ = tile_matmul(
            a=dout_ptr,
            a_row0=row0,
            a_rows=slots // TOP_K,
            row_mask=row_mask,
            stride_am=stride_dout,
            b=w2,
            b_index=expert,
            stride_bi=stride_we,
            stride_bk=stride_wk,
            stride_bn=stride_wn,
            col0=col0,
            cols=cols,
            col_mask=col_mask,
            K=D,
            BLOCK_K=BLOCK_K,
            A_TMA=False,
            B_TMA=B_TMA,
            B_KN=B_KN,
            DOT_FP32=DOT_FP32,
            INPUT_PRECISION=INPUT_PRECISION,
        )
        # The epilogue's arguments in three tuples: the tile, what it reads and writes, and the
        # activation's constants (`_grad_act_columns`).
        tile = (rows, row_mask, w_row, row0, F)
        out = (h, dh_ptr, a_ptr, stride_h, stride_dh, stride_a)
        activation: tl.constexpr = (
            ACT,
            GATED,
            ALPHA,
            LIMIT,
            GRAD_AT_LIMIT,
            UP_OFFSET,
            GATE_SOFTCAP,
            UP_SOFTCAP,
            INTERLEAVED,
        )
        dw = _grad_act_slices(g, tile, col0, out, EPILOGUE_SPLIT, STORE_A, H_TMA, activation)
        tl.store(dw_partial_ptr + slots * num_pid_n + pid_n, dw, mask=row_mask)


@triton.jit
def scatter_rows_kernel(
    rows_in,
    w,
    out_ptr,
    bias_ptr,
    weights_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    tile_expert_ptr,
    tile_row_start_ptr,
    num_tiles_ptr,
    max_tiles,
    N,
    K,
    stride_in,
    stride_we,
    stride_wk,
    stride_wn,
    stride_bias,
    stride_out,
    TOP_K: tl.constexpr,
    COMBINE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_KN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """y[p] = rows_in[p] @ W[e] (+ w[slot(p)] * bias[e] if HAS_BIAS: the down projection's
    bias [E, N], unit column stride, weighted as a's rows are), combined into rows of `out`.

    COMBINE="add":      atomically added into out[token(p)] (fp32, [T, N]).
    COMBINE="token":    stored into out[token(p)] ([T, N]; one slot per token, TOP_K = 1).
    COMBINE="position": stored into out[p] (fp32, [S, N]; the caller sums each token's k rows
                        in order, `launch_gather_sum` over plan.slot_positions).
    """
    valid, expert, row0, rows, row_mask, slots, pid_n, cols, col_mask = _plan_tile(
        sorted_slots_ptr,
        expert_offsets_ptr,
        tile_expert_ptr,
        tile_row_start_ptr,
        num_tiles_ptr,
        max_tiles,
        N,
        BLOCK_M,
        BLOCK_N,
        GROUP_M,
    )
    if valid:
        y, _ = tile_matmul(
            a=rows_in,
            a_row0=row0,
            a_rows=rows,
            row_mask=row_mask,
            stride_am=stride_in,
            b=w,
            b_index=expert,
            stride_bi=stride_we,
            stride_bk=stride_wk,
            stride_bn=stride_wn,
            col0=pid_n * BLOCK_N,
            cols=cols,
            col_mask=col_mask,
            K=K,
            BLOCK_K=BLOCK_K,
            A_TMA=A_TMA,
            B_TMA=B_TMA,
            B_KN=B_KN,
            DOT_FP32=DOT_FP32,
            INPUT_PRECISION=INPUT_PRECISION,
        )
        if HAS_BIAS:
            w_row = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + expert * stride_bias + cols, mask=col_mask, other=0.0)
            y += w_row[:, None] * bias.to(tl.float32)[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        out_rows = rows if COMBINE == "position" else slots // TOP_K
        out_ptrs = out_ptr + out_rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        if COMBINE == "add":
            tl.atomic_add(out_ptrs, y, mask=mask, sem="relaxed")  # a sum: no ordering needed
        else:
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_step(
    acc,
    p0,
    end,
    gathered,
    sorted_rows,
    sorted_slots_ptr,
    j0,
    ii,  # [BLOCK_M] = pid_m * BLOCK_M + arange
    jj,  # [BLOCK_N] = j0 + arange
    i_mask,
    j_mask,
    stride_gathered,
    stride_sorted,
    TOP_K: tl.constexpr,
    SORTED_TMA: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """acc += gathered[token(p)]^T sorted_rows[p] over the BLOCK_K positions p0 .. (those
    below `end`).

    SORTED_TMA: `sorted_rows` is a tensor descriptor read at rows p0 .. without a mask, so
    every position must lie below `end`; else a pointer, masked.
    """
    pos = p0 + tl.arange(0, BLOCK_K)
    p_mask = pos < end
    slots = tl.load(sorted_slots_ptr + pos, mask=p_mask, other=0)
    tokens = slots // TOP_K
    left_tile = tl.load(
        gathered + tokens.to(tl.int64)[None, :] * stride_gathered + ii[:, None],
        mask=i_mask[:, None] & p_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_K]
    if SORTED_TMA:
        right_tile = sorted_rows.load([p0, j0])
    else:
        right_tile = tl.load(
            sorted_rows + pos.to(tl.int64)[:, None] * stride_sorted + jj[None, :],
            mask=p_mask[:, None] & j_mask[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
    if DOT_FP32:
        left_tile = left_tile.to(tl.float32)
        right_tile = right_tile.to(tl.float32)
    return tl.dot(left_tile, right_tile, acc, input_precision=INPUT_PRECISION)


@triton.jit
def expert_wgrad_kernel(
    gathered,
    sorted_rows,
    sorted_ptr,
    out_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    M,
    N,
    stride_gathered,
    stride_sorted,
    stride_oe,
    stride_om,
    stride_on,
    TOP_K: tl.constexpr,
    SORTED_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out[e] [M, N] = sum over the positions p of expert e of gathered[token(p)]^T
    sorted_rows[p] (gathered [T, M], sorted_rows [S, N]; out's strides may be those of a
    transpose, so [N, M] outputs take the same path).

    Each program owns one output tile: no atomics, the same sum order every run, and experts
    without tokens get zeros.
    SORTED_TMA: `sorted_rows` is a tensor descriptor ([S, N], blocks [BLOCK_K, BLOCK_N]); its
    blocks are read only for whole steps of BLOCK_K positions of the expert, and the last,
    partial step by masked pointer loads of `sorted_ptr` (the same tensor), so no block reads
    another expert's rows.
    """
    expert = tl.program_id(1)
    pid_m, pid_n = swizzle_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    j0 = pid_n * BLOCK_N
    ii = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    jj = j0 + tl.arange(0, BLOCK_N)
    i_mask = ii < M
    j_mask = jj < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # SORTED_TMA: descriptor blocks for the whole steps, masked pointers for the rest.
    full_end = start + (end - start) // BLOCK_K * BLOCK_K if SORTED_TMA else end
    for p0 in range(start, full_end, BLOCK_K):
        acc = _wgrad_step(
            acc,
            p0,
            end,
            gathered,
            sorted_rows,
            sorted_slots_ptr,
            j0,
            ii,
            jj,
            i_mask,
            j_mask,
            stride_gathered,
            stride_sorted,
            TOP_K,
            SORTED_TMA,
            BLOCK_K,
            DOT_FP32,
            INPUT_PRECISION,
        )
    if SORTED_TMA:  # noqa: SIM102  (SORTED_TMA is a constexpr: the branch compiles away)
        if full_end < end:
            acc = _wgrad_step(
                acc,
                full_end,
                end,
                gathered,
                sorted_ptr,
                sorted_slots_ptr,
                j0,
                ii,
                jj,
                i_mask,
                j_mask,
                stride_gathered,
                stride_sorted,
                TOP_K,
                False,
                BLOCK_K,
                DOT_FP32,
                INPUT_PRECISION,
            )
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ii[:, None] * stride_om
    tl.store(
        out_ptrs + jj[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=i_mask[:, None] & j_mask[None, :],
    )


@triton.jit
def expert_bias_grad_kernel(
    rows_ptr,
    weights_ptr,
    bias_ptr,
    out_ptr,
    dw_partial_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    N,
    stride_rows,
    stride_bias,
    stride_out,
    TOP_K: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[e] [N] = the sum over the positions p of expert e of a row, in fp32: the gradient of
    a per-expert bias. Program (pid_n, e) owns BLOCK_N columns of out[e] and adds its rows
    BLOCK_P at a time, in order: no atomics, the same sum every run, zeros for an expert
    without tokens. Rows have unit column stride.

    GATHER=False: rows[p]: dh [S, 2F] gives db13.
    GATHER=True:  w[slot(p)] * rows[token(p)]: dout [T, d] gives db2; and dw_partial[slot(p),
                  pid_n] = rows[token(p)] . bias[e] over the program's columns, the bias's part
                  of the routing-weight gradient (summed over pid_n by the launcher).
    """
    pid_n = tl.program_id(0)
    expert = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    if GATHER:
        bias = tl.load(bias_ptr + expert * stride_bias + cols, mask=col_mask, other=0.0)
        bias = bias.to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        pos = p0 + tl.arange(0, BLOCK_P)
        p_mask = pos < end
        if GATHER:
            slots = tl.load(sorted_slots_ptr + pos, mask=p_mask, other=0)
            row = slots // TOP_K
        else:
            row = pos
        row_ptrs = rows_ptr + row.to(tl.int64)[:, None] * stride_rows + cols[None, :]
        mask = p_mask[:, None] & col_mask[None, :]
        tile = tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_N]
        if GATHER:
            w = tl.load(weights_ptr + slots, mask=p_mask, other=0.0).to(tl.float32)
            acc += tl.sum(tile * w[:, None], axis=0)
            dw = tl.sum(tile * bias[None, :], axis=1)
            tl.store(dw_partial_ptr + slots * tl.num_programs(0) + pid_n, dw, mask=p_mask)
        else:
            acc += tl.sum(tile, axis=0)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_out + cols
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launcher

# GPU tile configurations, by kernel and the plan's block_m (the kernels' BLOCK_M). Not yet
# tuned on a GPU. Every one compiles for sm_90 without register spills with Triton 3.9 and 3.6;
# the register counts are from Triton 3.9's sm_90 build of the launches these launchers make,
# with tensor descriptors (tests/gpu_compile.py runs them).
#
# The row-tile kernels re-read their A rows from L2 once per column tile and their B columns
# once per row tile: 2·BM·BN / (2·(BM + BN)) FLOP per byte read. ncu on an H100 found grad_act
# memory bound at 128x32 (26 FLOP/B, 200 TFLOP/s: ≈8 TB/s of L2) and gate_up at 128x64 with
# its two accumulators (64 FLOP/B) at 520 TFLOP/s, so at BLOCK_M=128 (the bench shapes at
# T=16384) the tiles are as wide as registers allow without spilling (bench/NOTES.md).
GPU_CONFIGS = {
    ("gate_up", 64): GemmConfig(64, 64, 64, num_warps=4, num_stages=4),  # 130
    # Two accumulators (gate and up): 128 x 256 outputs per A read, 85 FLOP/B.
    ("gate_up", 128): GemmConfig(128, 128, 64, num_warps=8, num_stages=4),  # 226
    # grad_act's epilogue runs on 16-column slices of its tile (GRAD_ACT_EPILOGUE_COLUMNS),
    # which makes 128x128 spill-free, and reads h by pointer loads (epilogue_tma=False): read
    # from shared memory (a descriptor), h fed the activation in two register layouts and
    # Triton computed it twice, once for dh and once for the store of a (sm_90, Triton 3.6 and
    # 3.9: 16 exponentials for 8 slices, 4256 SASS instructions at 128x128 against 2768 by
    # pointer loads, 258 MUFU against 130; bench/NOTES.md, session 44). tune_expert times both.
    ("grad_act", 64): GemmConfig(64, 128, 64, num_warps=8, num_stages=4),  # 92
    ("grad_act", 128): GemmConfig(128, 128, 64, num_warps=8, num_stages=4),  # 187
    ("scatter_rows", 64): GemmConfig(64, 128, 64, num_warps=4, num_stages=4),  # 121-128
    ("scatter_rows", 128): GemmConfig(128, 256, 64, num_warps=8, num_stages=3),  # 231-233
    # BLOCK_M x BLOCK_N of the [M, N] weight gradient, BLOCK_K sorted positions per step: M
    # along the gathered rows (dout, x: d), N along the sorted ones (a, dh: F, 2F; dw13 is
    # stored transposed). Its rows are indexed by the positions' slots, loaded in the same
    # loop: the pipeliner spends stages on that chain, and below 5 stages the TTGIR waits for
    # every copy before each MMA (sm_90 report field copies_in_flight = 0; ncu on an H100 saw
    # the old 128x128x32 s4 config "barely pipelined"). tune_expert on an H100: 128 gathered x
    # 256 sorted was the fastest tile of both stages (grad_w2 1.14-1.23x 128x128's; grad_w13,
    # then computed untransposed, 1.07-1.08x at 256 sorted x 128 gathered).
    ("expert_wgrad", None): GemmConfig(128, 256, 64, num_warps=8, num_stages=5),  # 166-182
}
# With gate and up interleaved (SwiGLU(interleaved=True), GPT-OSS), grad_act's epilogue joins
# d_gate and d_up into one block of dh: at 128x128 that spilled 8-16 B with Triton 3.6 while the
# epilogue stored one element per thread; since it stores 16-byte vectors 128x128 builds
# spill-free (h by pointer loads: 178 registers with 3.6, 174 with 3.9), so whether 128x64 is
# still the faster waits for `bench.tune_expert --activation gpt-oss` on a GPU. gate_up keeps its
# 128x128 tile there: one accumulator over 256 interleaved columns, 255 registers with both, no
# spills.
GPU_CONFIGS_INTERLEAVED = {
    ("grad_act", 128): GemmConfig(128, 64, 64, num_warps=8, num_stages=4),
}
# With soft caps (SwiGLU(gate_softcap=..., up_softcap=...), Inkling 2), gate_up's epilogue
# computes two tanh per element of both 128x128 accumulators: that spills 40-48 B with Triton 3.9
# and 480-504 B with 3.6 (255 registers); 128x64 builds in 128-161 (3.9) / 134-171 (3.6).
# grad_act's 128x128 (one slice of 16 columns at a time) builds spill-free: 226-248 / 164-245.
GPU_CONFIGS_SOFTCAPPED = {
    ("gate_up", 128): GemmConfig(128, 64, 64, num_warps=8, num_stages=4),
}


def epilogue_configs(activation: Activation) -> tuple[str, dict]:
    """(its name, the table) of the GPU_CONFIGS entries that `activation`'s epilogues replace:
    GPU_CONFIGS_INTERLEAVED for gate and up interleaved, GPU_CONFIGS_SOFTCAPPED for soft caps
    (whose entries win where both apply), none for the rest."""
    _, _, _, _, interleaved, gate_softcap, up_softcap = activation.constants
    capped = (gate_softcap, up_softcap) != (None, None)
    names, table = [], {}
    if interleaved:
        names.append("INTERLEAVED")
        table.update(GPU_CONFIGS_INTERLEAVED)
    if capped:
        names.append("SOFTCAPPED")
        table.update(GPU_CONFIGS_SOFTCAPPED)
    return "+".join(names), table


# Experts without a gate (moeblaze.Ungated) run the configs above: gate_up then has one
# accumulator (half the outputs per A read of the gated pair). Its 128x256 tile (scatter_rows')
# builds spill-free for ReLU² (210-245 registers) but spills 224 B for GELU's erf epilogue on
# sm_90 (Triton 3.9), so it is not used; to be measured on a GPU.
# Before Hopper, Triton's pipeline keeps num_stages - 1 operand buffers in shared memory and a
# block of a consumer GPU (sm_86, sm_89) gets at most 99 KB: there the row-tile kernels run at
# most this many stages (the sm_80 report of tests/gpu_compile.py: <= 96 KB each).
PRE_HOPPER_ROW_TILE_STAGES = 3
# Before Hopper the tensor cores take their operands from registers (mma.sync), so the tiles
# above that fill the registers of a wgmma kernel spill there (sm_80: gate_up 128x128 112-200 B,
# some in its main loop; scatter_rows 128x256 112-920 B in its epilogue; expert_wgrad 128x256
# 40-48 B): these entries replace them. A 128x128 tile's 64 FLOP/B already feed an A100's
# tensor cores from L2. Not measured on such a GPU (bench/NOTES.md).
PRE_HOPPER_CONFIGS = {
    ("gate_up", 128): GemmConfig(128, 64, 64, num_warps=8, num_stages=3),
    ("scatter_rows", 128): GemmConfig(128, 128, 64, num_warps=8, num_stages=3),
    ("expert_wgrad", None): GemmConfig(128, 128, 64, num_warps=8, num_stages=5),
}
# grad_act's epilogue works on up to 8 slices of at least this many columns of its tile
# (EPILOGUE_SPLIT; GemmConfig.epilogue_n in place of this where set): 128x128 SwiGLU with h by
# pointer loads builds in 187 registers with Triton 3.9, 184 with 3.6 (32-column slices: 209
# and 213; 64: 253, and 255 with a 40-byte spill).
GRAD_ACT_EPILOGUE_COLUMNS = 16
GRAD_ACT_MAX_SPLIT = 8
# expert_bias_grad_kernel's (BLOCK_P rows, BLOCK_N columns) per step: a memory-bound read of
# dh or dout once. Not measured on a GPU.
BIAS_GRAD_BLOCKS = (32, 128)
# The interpreter runs programs one after another: small blocks keep odd test shapes covering
# several tiles per dimension without making each program slow.
_INTERPRETER = GemmConfig(block_m=16, block_n=32, block_k=32, group_m=4)
_INTERPRETER_BIAS_GRAD = (8, 32)


def config_key(kernel: str, block_m: int) -> tuple[str, int | None]:
    """The key of `kernel`'s entry in GPU_CONFIGS (and TritonStages' `configs`) for plans of
    `block_m` rows a tile: expert_wgrad does not tile by block_m (None)."""
    return kernel, None if kernel == "expert_wgrad" else block_m


def gpu_config(
    kernel: str, block_m: int, activation: Activation | None = None, arch: int = 90
) -> GemmConfig:
    """The GPU tile configuration of `kernel` for tiles of `block_m` rows (ignored for
    expert_wgrad) on a GPU of compute capability `arch` (10 * major + minor): GPU_CONFIGS, then
    before Hopper PRE_HOPPER_CONFIGS' entry, then the entry `activation`'s epilogues replace
    (`epilogue_configs`); before Hopper the row-tile kernels run at most
    PRE_HOPPER_ROW_TILE_STAGES stages."""
    key = config_key(kernel, block_m)
    config = GPU_CONFIGS[key]
    if arch < 90:
        config = PRE_HOPPER_CONFIGS.get(key, config)
    if activation is not None:
        config = epilogue_configs(activation)[1].get(key, config)
    if arch < 90 and kernel != "expert_wgrad":
        stages = min(config.num_stages, PRE_HOPPER_ROW_TILE_STAGES)
        config = dataclasses.replace(config, num_stages=stages)
    return config


class TritonStages:
    """The expert-MLP stages as launches of the kernels above (see moeblaze.ops.Stages).

    Args:
        configs: (kernel, block_m) -> GemmConfig entries used in place of GPU_CONFIGS (and of
            the interpreter's small tiles), as `bench.tune_expert` sweeps them; a kernel's
            BLOCK_M is always the plan's block_m (None for expert_wgrad).
        tma: read the weights, and the sorted rows of scatter_rows, through tensor descriptors
            where the kernel's config (GemmConfig.tma), the device (Hopper and later, or the
            interpreter) and the tensors allow it (kernelbase.gemm.tma_descriptor); False:
            pointer loads everywhere, whatever the configs say.
        arch: the GPU architecture (e.g. 80 for sm_80) whose configs to use; None: that of
            the device the tensors are on.
    """

    def __init__(
        self,
        configs: dict[tuple[str, int | None], GemmConfig] | None = None,
        *,
        tma: bool = True,
        arch: int | None = None,
    ):
        self.configs = configs or {}
        self.tma = tma
        self.arch = arch

    def block_m(self, num_slots: int, num_experts: int) -> int:
        """Rows per grouped-GEMM tile, the routing plan's `block_m`."""
        if interpreting():
            return _INTERPRETER.block_m
        # Many rows per expert amortise a taller tile; few rows waste less padding in a short one.
        return 128 if num_slots >= 512 * num_experts else 64

    def gate_up(
        self,
        x,
        w13,
        topk_weights,
        plan: RoutingPlan,
        *,
        store_h: bool,
        store_a: bool,
        activation: Activation = SWIGLU,
        bias=None,
    ):
        num_slots, d, width = plan.num_slots, x.shape[1], w13.shape[1]
        ffn = activation.ffn(width)
        h = alloc.empty(num_slots, width, dtype=x.dtype, device=x.device) if store_h else None
        a = alloc.empty(num_slots, ffn, dtype=x.dtype, device=x.device) if store_a else None
        if num_slots == 0:
            return h, a
        cfg = self._config("gate_up", plan, activation)
        h_arg = h if store_h else a  # an output not written still needs a valid pointer
        a_arg = a if store_a else h
        # B = w13[e]^T [d, 2F], read in tiles of the gate and up columns of block_n activation
        # columns: two tiles F apart, or one of 2 * block_n interleaved columns (ungated: one
        # tile of block_n columns of [d, F]).
        if not activation.gated:
            w, w_strides, w_meta = self._weights(w13.mT, cfg)
        elif activation.interleaved:
            w, w_strides, w_meta = self._weights(w13.mT, cfg, block_n=2 * cfg.block_n)
        else:
            w, w_strides, w_meta = self._weights(w13.mT, cfg, second_n=ffn)
        grid = (plan.max_tiles * cdiv(ffn, cfg.block_n),)
        gate_up_kernel[grid](
            x,
            w,
            x if bias is None else bias,
            topk_weights,
            h_arg,
            a_arg,
            *self._plan_args(plan),
            plan.max_tiles,
            d,
            ffn,
            x.stride(0),
            *w_strides,
            0 if bias is None else bias.stride(0),
            h_arg.stride(0),
            a_arg.stride(0),
            TOP_K=plan.top_k,
            STORE_H=store_h,
            STORE_A=store_a,
            HAS_BIAS=bias is not None,
            **_activation_meta(activation),
            **w_meta,
            **launch_meta(cfg, x.dtype),
        )
        return h, a

    def down_combine(
        self, a, w2, plan: RoutingPlan, *, deterministic: bool, bias=None, topk_weights=None
    ):
        return self._scatter_rows(a, w2.mT, plan, deterministic, bias, topk_weights)  # B = w2^T

    def grad_input(self, dh, w13, plan: RoutingPlan, *, deterministic: bool):
        return self._scatter_rows(dh, w13, plan, deterministic)

    def grad_act(
        self,
        dout,
        w2,
        h,
        topk_weights,
        plan: RoutingPlan,
        *,
        store_a: bool,
        overwrite_h=False,
        activation: Activation = SWIGLU,
    ):
        num_slots, d, ffn = plan.num_slots, dout.shape[1], w2.shape[2]
        if overwrite_h:  # each program reads its h elements before it writes theirs of dh
            dh = h
        else:
            width = activation.pre_width(ffn)
            dh = alloc.empty(num_slots, width, dtype=dout.dtype, device=dout.device)
        a = alloc.empty(num_slots if store_a else 0, ffn, dtype=dout.dtype, device=dout.device)
        if num_slots == 0:
            dweights = torch.zeros(topk_weights.shape, dtype=torch.float32, device=dout.device)
            return dh, dweights, a if store_a else None
        cfg = self._config("grad_act", plan, activation)
        num_pid_n = cdiv(ffn, cfg.block_n)
        # Zeros: a dropped slot's routing weight gets no gradient.
        dw_partial = torch.zeros(num_slots, num_pid_n, dtype=torch.float32, device=dout.device)
        w, w_strides, w_meta = self._weights(w2, cfg)  # B = w2[e] [d, F]
        columns = cfg.epilogue_n or GRAD_ACT_EPILOGUE_COLUMNS
        split = max(1, min(GRAD_ACT_MAX_SPLIT, cfg.block_n // columns))
        # One block per epilogue slice: its gate and up columns interleaved, or both halves of
        # h [S, 2, F] (ungated: one block of its columns).
        if not cfg.epilogue_tma:
            h_desc = None
        elif not activation.gated:
            h_desc = self._descriptor(h, cfg, (cfg.block_m, cfg.block_n // split))
        elif activation.interleaved:
            h_desc = self._descriptor(h, cfg, (cfg.block_m, 2 * cfg.block_n // split))
        else:
            halves = h.unflatten(1, (2, ffn))
            h_desc = self._descriptor(halves, cfg, (cfg.block_m, 2, cfg.block_n // split))
        grad_act_kernel[(plan.max_tiles * num_pid_n,)](
            dout,
            w,
            h if h_desc is None else h_desc,
            topk_weights,
            dh,
            a,
            dw_partial,
            *self._plan_args(plan),
            plan.max_tiles,
            d,
            ffn,
            dout.stride(0),
            *w_strides,
            h.stride(0),
            dh.stride(0),
            a.stride(0),
            TOP_K=plan.top_k,
            STORE_A=store_a,
            EPILOGUE_SPLIT=split,
            H_TMA=h_desc is not None,
            # Inline assembly: not under the interpreter.
            H_PREFETCH=h_desc is None and cfg.epilogue_prefetch and not interpreting(),
            **_activation_meta(activation),
            GRAD_AT_LIMIT=moeblaze.activation.CLAMP_GRAD_AT_LIMIT,
            **w_meta,
            **launch_meta(cfg, dout.dtype),
        )
        dweights = dw_partial.sum(dim=1).view(topk_weights.shape)  # fixed order: deterministic
        return dh, dweights, a if store_a else None

    def grad_w2(self, dout, a, plan: RoutingPlan):
        return self._expert_wgrad(dout, a, plan, transposed=False)

    def grad_w13(self, dh, x, plan: RoutingPlan):
        return self._expert_wgrad(x, dh, plan, transposed=True)  # dw13[e]^T = x^T dh

    def grad_b13(self, dh, plan: RoutingPlan, dtype):
        db13, _ = self._expert_bias_grad(dh, plan, dtype)
        return db13

    def grad_b2(self, dout, topk_weights, b2, plan: RoutingPlan):
        return self._expert_bias_grad(dout, plan, b2.dtype, topk_weights, b2)

    def _scatter_rows(self, rows_in, weights, plan, deterministic, bias=None, topk_weights=None):
        """Combine rows_in[p] @ weights[e] (+ w[slot(p)] * bias[e]) into a [T, n] output;
        `weights` is the stack of B [E, K, n]."""
        num_slots, top_k, n = plan.num_slots, plan.top_k, weights.shape[2]
        num_tokens = num_slots // top_k
        # One slot per token needs no reduction: store straight into the output (zeros first: a
        # dropped slot, placed nowhere, adds nothing). Deterministic: each position's row in
        # fp32, then each token's k rows summed in order (a dropped slot's position is -1).
        if top_k == 1:
            combine = "token"
            out = torch.zeros(num_tokens, n, dtype=rows_in.dtype, device=rows_in.device)
        elif deterministic:
            combine = "position"
            out = alloc.empty(num_slots, n, dtype=torch.float32, device=rows_in.device)
        else:
            combine = "add"
            out = torch.zeros(num_tokens, n, dtype=torch.float32, device=rows_in.device)
        if num_slots > 0:
            cfg = self._config("scatter_rows", plan)
            w, w_strides, w_meta = self._weights(weights, cfg)
            # The rows of a tile are consecutive sorted positions: one descriptor block.
            rows_desc = self._descriptor(rows_in, cfg, (cfg.block_m, cfg.block_k))
            scatter_rows_kernel[(plan.max_tiles * cdiv(n, cfg.block_n),)](
                rows_in if rows_desc is None else rows_desc,
                w,
                out,
                out if bias is None else bias,
                out if bias is None else topk_weights,
                *self._plan_args(plan),
                plan.max_tiles,
                n,
                rows_in.shape[1],
                rows_in.stride(0),
                *w_strides,
                0 if bias is None else bias.stride(0),
                out.stride(0),
                TOP_K=top_k,
                COMBINE=combine,
                HAS_BIAS=bias is not None,
                A_TMA=rows_desc is not None,
                **w_meta,
                **launch_meta(cfg, rows_in.dtype),
            )
        if combine == "position":
            index = plan.slot_positions.view(num_tokens, top_k)
            return launch_gather_sum(out, index, dtype=rows_in.dtype)
        return out.to(rows_in.dtype)

    def _expert_bias_grad(self, rows, plan, dtype, topk_weights=None, bias=None):
        """(out [E, n] in `dtype`: each expert's sum of its rows, dweights [T, k] fp32 or None):
        expert_bias_grad_kernel on dh [S, n] (sorted) or, with `bias`, on dout [T, n]."""
        n, gather = rows.shape[1], bias is not None
        out = alloc.empty(plan.num_experts, n, dtype=dtype, device=rows.device)
        block_p, block_n = _INTERPRETER_BIAS_GRAD if interpreting() else BIAS_GRAD_BLOCKS
        num_pid_n = cdiv(n, block_n)
        dw_partial = None
        if gather:  # zeros: a dropped slot's routing weight gets no gradient
            dw_partial = torch.zeros(
                plan.num_slots, num_pid_n, dtype=torch.float32, device=rows.device
            )
        if out.numel() > 0:
            expert_bias_grad_kernel[(num_pid_n, plan.num_experts)](
                rows,
                topk_weights if gather else rows,
                bias if gather else rows,
                out,
                dw_partial if gather else out,
                plan.sorted_slots,
                plan.expert_offsets,
                n,
                rows.stride(0),
                bias.stride(0) if gather else 0,
                out.stride(0),
                TOP_K=plan.top_k,
                GATHER=gather,
                BLOCK_P=block_p,
                BLOCK_N=block_n,
                **COMPILE_OPTIONS,
            )
        if not gather:
            return out, None
        return out, dw_partial.sum(dim=1).view(topk_weights.shape)  # fixed order

    def _expert_wgrad(self, gathered, sorted_rows, plan, *, transposed):
        """out[e] [M, N] = sum over expert e's positions p of gathered[token(p)]^T
        sorted_rows[p]; `transposed`: returns out^T ([E, N, M], contiguous). The config's
        BLOCK_M runs along the gathered side's M columns, BLOCK_N along the sorted side's N, so
        that both weight gradients take one config."""
        m, n = gathered.shape[1], sorted_rows.shape[1]
        shape = (plan.num_experts, n, m) if transposed else (plan.num_experts, m, n)
        result = alloc.empty(*shape, dtype=gathered.dtype, device=gathered.device)
        out = result.mT if transposed else result
        cfg = self._config("expert_wgrad", plan)
        grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), plan.num_experts)
        # The sorted side, read through a descriptor in whole steps of block_k rows.
        desc = self._descriptor(sorted_rows, cfg, (cfg.block_k, cfg.block_n))
        expert_wgrad_kernel[grid](
            gathered,
            sorted_rows if desc is None else desc,
            sorted_rows,
            out,
            plan.sorted_slots,
            plan.expert_offsets,
            m,
            n,
            gathered.stride(0),
            sorted_rows.stride(0),
            *out.stride(),
            TOP_K=plan.top_k,
            SORTED_TMA=desc is not None,
            **launch_meta(cfg, gathered.dtype),
        )
        return result

    def _config(
        self, kernel: str, plan: RoutingPlan, activation: Activation | None = None
    ) -> GemmConfig:
        key = config_key(kernel, plan.block_m)
        if key in self.configs:
            return self.configs[key]
        if not interpreting():
            return gpu_config(
                kernel, plan.block_m, activation, self._arch(plan.sorted_slots.device)
            )
        if kernel == "expert_wgrad":
            return _INTERPRETER
        return dataclasses.replace(_INTERPRETER, block_m=plan.block_m)

    def _arch(self, device: torch.device) -> int:
        return device_arch(device) if self.arch is None else self.arch

    def _tma(self, device: torch.device, cfg: GemmConfig) -> bool:
        return self.tma and cfg.tma and tma_supported(device)

    def _descriptor(self, tensor: torch.Tensor, cfg: GemmConfig, block):
        """kernelbase.gemm.tma_descriptor of `tensor` where `_tma` allows, else None."""
        return tma_descriptor(tensor, block) if self._tma(tensor.device, cfg) else None

    def _weights(self, weights: torch.Tensor, cfg: GemmConfig, second_n: int = 0, block_n: int = 0):
        """The stack of B [E, K, N] as a kernel takes it: (the tensor, or its tensor descriptor
        where `_tma` allows and the copy engine can read it), its strides, and the constexprs
        B_TMA and B_KN (kernelbase.gemm.tile_matmul; `second_n`: its DUAL offset; `block_n`:
        the tile's columns when not cfg.block_n)."""
        desc = None
        if self._tma(weights.device, cfg):
            desc = b_descriptor(weights, cfg.block_k, block_n or cfg.block_n, second_n)
        if desc is None:
            return weights, weights.stride(), dict(B_TMA=False, B_KN=True)
        return desc[0], weights.stride(), dict(B_TMA=True, B_KN=desc[1])

    @staticmethod
    def _plan_args(plan: RoutingPlan):
        return (
            plan.sorted_slots,
            plan.expert_offsets,
            plan.tile_expert,
            plan.tile_row_start,
            plan.num_tiles,
        )


def _activation_meta(activation: Activation) -> dict:
    """The activation's constexprs of gate_up_kernel and grad_act_kernel."""
    _, alpha, limit, up_offset, interleaved, gate_softcap, up_softcap = activation.constants
    return dict(
        ACT=activation.fn,
        GATED=activation.gated,
        ALPHA=alpha,
        LIMIT=limit,
        UP_OFFSET=up_offset,
        GATE_SOFTCAP=gate_softcap,
        UP_SOFTCAP=up_softcap,
        INTERLEAVED=interleaved,
    )


TRITON_STAGES = TritonStages()
