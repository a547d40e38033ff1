"""Triton kernels of the expert MLP: grouped GEMMs that read and write rows through the plan.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots, p sorted position (routing_plan)
# token(p) = sorted_slots[p] // k, slot(p) = sorted_slots[p], w = topk_weights viewed as [S]

A tile is up to BLOCK_M consecutive sorted positions of one expert (the plan's tile metadata).
Per-token tensors (x, dout, out, dx) are read or written through token(p); per-position tensors
(h = pre-activation [S, 2F], a = activation [S, F], dh [S, 2F]) live in sorted order. No
[S, d] tensor is ever formed.

forward   gate_up_kernel       h[p] = x[token(p)] @ w13[e]^T;  a[p] = silu(h_gate) * h_up
          scatter_rows_kernel  out[token(p)] += w[slot(p)] * (a[p] @ w2[e]^T)         (fp32)
backward  grad_act_kernel      g = dout[token(p)] @ w2[e];  dw[slot(p)] = rowsum(g * a[p]);
                               dh[p] = SwiGLU backward of w[slot(p)] * g at h[p]
          scatter_rows_kernel  dx[token(p)] += dh[p] @ w13[e]
          expert_wgrad_kernel  dw2[e] = sum_p (w * dout[token(p)])^T a[p]
                               dw13[e] = sum_p dh[p]^T x[token(p)]
The GEMM main loop and tile order are shared with overlap (moeblaze.kernels.tiles).
"""

import triton
import triton.language as tl

from moeblaze.kernels.tiles import rows_matmul, swizzle_tile


@triton.jit
def _plan_tile(sorted_slots_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
               num_tiles_ptr, max_tiles, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               GROUP_M: tl.constexpr):  # fmt: skip
    """This program's plan tile and column block of an N-wide output.

    Returns (valid, expert, rows [BLOCK_M] sorted positions, row_mask, slots, pid_n,
    cols [BLOCK_N], col_mask). Programs past the plan's `num_tiles` get valid == False.
    """
    tile, pid_n = swizzle_tile(tl.program_id(0), max_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    valid = tile < tl.load(num_tiles_ptr)
    expert = tl.where(valid, tl.load(tile_expert_ptr + tile), 0)  # padding tiles hold E
    rows = tl.load(tile_row_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.where(valid, tl.load(expert_offsets_ptr + expert + 1), 0)
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return valid, expert, rows, row_mask, slots, pid_n, cols, cols < N


@triton.jit
def gate_up_kernel(
    x_ptr, w13_ptr, h_ptr, a_ptr,
    sorted_slots_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr,
    max_tiles, D, F,
    stride_x, stride_we, stride_wn, stride_wk, stride_h, stride_a,
    TOP_K: tl.constexpr, STORE_H: tl.constexpr, STORE_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """h[p] = x[token(p)] @ w13[e]^T  [S, 2F] and/or a[p] = silu(h_gate) * h_up  [S, F]."""
    valid, expert, rows, row_mask, slots, pid_n, cols, col_mask = _plan_tile(
        sorted_slots_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr,
        max_tiles, F, BLOCK_M, BLOCK_N, GROUP_M,
    )  # fmt: skip
    if valid:
        gate, up = rows_matmul(
            x_ptr, slots // TOP_K, row_mask, stride_x,
            w13_ptr + expert.to(tl.int64) * stride_we, stride_wk, stride_wn, cols, col_mask,
            F * stride_wn, D, BLOCK_M, BLOCK_N, BLOCK_K, True, DOT_FP32, INPUT_PRECISION,
        )  # fmt: skip
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
            gate = gate.to(tl.float32)
            act = gate * tl.sigmoid(gate) * up.to(tl.float32)
            a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_a + cols[None, :]
            tl.store(a_ptrs, act.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_act_kernel(
    dout_ptr, w2_ptr, h_ptr, weights_ptr, dh_ptr, a_ptr, dw_partial_ptr,
    sorted_slots_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr,
    max_tiles, D, F,
    stride_dout, stride_we, stride_wd, stride_wf, stride_h, stride_dh, stride_a,
    TOP_K: tl.constexpr, STORE_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward through the down projection, the routing weight and SwiGLU, in one epilogue.

    g = dout[token(p)] @ w2[e] [S, F]; dw_partial[slot, pid_n] = rowsum(g * a) over this
    program's columns; dh = SwiGLU backward of w[slot] * g; a recomputed from h if STORE_A.
    """
    num_pid_n = tl.cdiv(F, BLOCK_N)
    valid, expert, rows, row_mask, slots, pid_n, cols, col_mask = _plan_tile(
        sorted_slots_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr,
        max_tiles, F, BLOCK_M, BLOCK_N, GROUP_M,
    )  # fmt: skip
    if valid:
        g, _ = rows_matmul(
            dout_ptr, slots // TOP_K, row_mask, stride_dout,
            w2_ptr + expert.to(tl.int64) * stride_we, stride_wd, stride_wf, cols, col_mask,
            0, D, BLOCK_M, BLOCK_N, BLOCK_K, False, DOT_FP32, INPUT_PRECISION,
        )  # fmt: skip
        mask = row_mask[:, None] & col_mask[None, :]
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        # The forward's down GEMM consumed a rounded to its storage dtype; so does dw.
        act = (silu * up).to(a_ptr.dtype.element_ty)
        tl.store(dw_partial_ptr + slots * num_pid_n + pid_n,
                 tl.sum(g * act.to(tl.float32), axis=1), mask=row_mask)  # fmt: skip
        d_act = g * tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = d_act * silu
        dh_ptrs = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + cols[None, :]
        tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptrs + F, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
        if STORE_A:
            tl.store(a_ptr + rows.to(tl.int64)[:, None] * stride_a + cols[None, :], act, mask=mask)


@triton.jit
def scatter_rows_kernel(
    in_ptr, w_ptr, weights_ptr, out_ptr,
    sorted_slots_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr,
    max_tiles, N, K,
    stride_in, stride_we, stride_wk, stride_wn, stride_out,
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, PER_SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """y[p] = in[p] @ W[e] (times w[slot(p)] if HAS_WEIGHTS), combined into rows of `out`.

    PER_SLOT=False: atomically added into out[token(p)] (fp32, [T, N]).
    PER_SLOT=True:  stored into out[slot(p)] ([S, N]; the caller sums the k slots in order).
    """
    valid, expert, rows, row_mask, slots, pid_n, cols, col_mask = _plan_tile(
        sorted_slots_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr,
        max_tiles, N, BLOCK_M, BLOCK_N, GROUP_M,
    )  # fmt: skip
    if valid:
        y, _ = rows_matmul(
            in_ptr, rows, row_mask, stride_in,
            w_ptr + expert.to(tl.int64) * stride_we, stride_wk, stride_wn, cols, col_mask,
            0, K, BLOCK_M, BLOCK_N, BLOCK_K, False, DOT_FP32, INPUT_PRECISION,
        )  # fmt: skip
        if HAS_WEIGHTS:
            y *= tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        mask = row_mask[:, None] & col_mask[None, :]
        if PER_SLOT:
            out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_out + cols[None, :]
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            out_ptrs = out_ptr + (slots // TOP_K).to(tl.int64)[:, None] * stride_out + cols[None, :]
            tl.atomic_add(out_ptrs, y, mask=mask, sem="relaxed")  # a sum: no ordering needed


@triton.jit
def expert_wgrad_kernel(
    left_ptr, right_ptr, weights_ptr, out_ptr, sorted_slots_ptr, expert_offsets_ptr,
    M, N, stride_left, stride_right, stride_oe, stride_om, stride_on,
    TOP_K: tl.constexpr, GATHER_LEFT: tl.constexpr, GATHER_RIGHT: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out[e] [M, N] = sum over the positions p of expert e of left[row]^T right[row].

    A row is token(p) for a GATHER_ side, p otherwise; HAS_WEIGHTS scales left rows by
    w[slot(p)]. Each program owns one output tile: no atomics, the same sum order every run,
    and experts without tokens get zeros.
    """
    expert = tl.program_id(1)
    pid_m, pid_n = swizzle_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    ii = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    jj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = ii < M
    j_mask = jj < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        pos = p0 + tl.arange(0, BLOCK_K)
        p_mask = pos < end
        slots = tl.load(sorted_slots_ptr + pos, mask=p_mask, other=0)
        left_rows = slots // TOP_K if GATHER_LEFT else pos
        right_rows = slots // TOP_K if GATHER_RIGHT else pos
        left = tl.load(
            left_ptr + left_rows.to(tl.int64)[None, :] * stride_left + ii[:, None],
            mask=i_mask[:, None] & p_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        right = tl.load(
            right_ptr + right_rows.to(tl.int64)[:, None] * stride_right + jj[None, :],
            mask=p_mask[:, None] & j_mask[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + slots, mask=p_mask, other=0.0).to(tl.float32)
            left = (left.to(tl.float32) * w[None, :]).to(left_ptr.dtype.element_ty)
        if DOT_FP32:
            left = left.to(tl.float32)
            right = right.to(tl.float32)
        acc = tl.dot(left, right, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ii[:, None] * stride_om
    tl.store(out_ptrs + jj[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=i_mask[:, None] & j_mask[None, :])  # fmt: skip
