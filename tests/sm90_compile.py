"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Run as a script in a process without TRITON_INTERPRET (the interpreter replaces `@triton.jit`
functions). Triton's bundled ptxas assembles the code, so a kernel that would fail to compile on
an H100 fails here, and the report shows whether the GEMMs got wgmma instructions and
asynchronous (pipelined) global-to-shared copies. Prints one JSON line per kernel variant.
"""

import json
import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moeblaze.kernels import expert_mlp, routing_plan  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_DIVISIBLE = ("D", "F", "N", "K", "M")  # sizes the launchers pass; Triton specialises %16 == 0


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps=4, num_stages=3) -> dict:
    """Compile `fn` as the JIT would for 16-byte aligned pointers and strides."""
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(signature.items())
        if ty.startswith("*") or name.startswith("stride") or name in _DIVISIBLE
    }
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs=attrs),
        target=HOPPER,
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    ttgir = kernel.asm["ttgir"]
    return dict(
        kernel=fn.__name__,
        shared_bytes=kernel.metadata.shared,
        wgmma=ttgir.count("warp_group_dot "),
        async_copies=ttgir.count("async_copy_global_to_local"),
    )


def expert_mlp_variants():
    """(kernel, signature, constexprs, num_warps) for the bf16 configurations moeblaze launches."""
    bf16, i32, plan = "*bf16", "i32", "*i32"
    plan_args = dict(sorted_slots_ptr=plan, expert_offsets_ptr=plan, tile_expert_ptr=plan,
                     tile_row_start_ptr=plan, num_tiles_ptr=plan)  # fmt: skip
    meta = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, DOT_FP32=False,
                INPUT_PRECISION="tf32")  # fmt: skip
    sizes = dict(max_tiles=i32)
    yield (expert_mlp.gate_up_kernel,
           dict(x_ptr=bf16, w13_ptr=bf16, h_ptr=bf16, a_ptr=bf16, **plan_args, **sizes, D=i32,
                F=i32, stride_x=i32, stride_we=i32, stride_wn=i32, stride_wk=i32, stride_h=i32,
                stride_a=i32),
           dict(meta, BLOCK_N=64, TOP_K=8, STORE_H=True, STORE_A=True), 4)  # fmt: skip
    yield (expert_mlp.grad_act_kernel,
           dict(dout_ptr=bf16, w2_ptr=bf16, h_ptr=bf16, weights_ptr="*fp32", dh_ptr=bf16,
                a_ptr=bf16, dw_partial_ptr="*fp32", **plan_args, **sizes, D=i32, F=i32,
                stride_dout=i32, stride_we=i32, stride_wd=i32, stride_wf=i32, stride_h=i32,
                stride_dh=i32, stride_a=i32),
           dict(meta, TOP_K=8, STORE_A=True), 4)  # fmt: skip
    scatter = dict(in_ptr=bf16, w_ptr=bf16, weights_ptr="*fp32", out_ptr="*fp32", **plan_args,
                   **sizes, N=i32, K=i32, stride_in=i32, stride_we=i32, stride_wk=i32,
                   stride_wn=i32, stride_out=i32)  # fmt: skip
    yield (
        expert_mlp.scatter_rows_kernel,
        scatter,
        dict(meta, TOP_K=8, HAS_WEIGHTS=True, PER_SLOT=False),
        4,
    )
    yield (
        expert_mlp.scatter_rows_kernel,
        scatter,
        dict(meta, TOP_K=8, HAS_WEIGHTS=False, PER_SLOT=True),
        4,
    )
    wgrad = dict(left_ptr=bf16, right_ptr=bf16, weights_ptr="*fp32", out_ptr=bf16,
                 sorted_slots_ptr=plan, expert_offsets_ptr=plan, M=i32, N=i32, stride_left=i32,
                 stride_right=i32, stride_oe=i32, stride_om=i32, stride_on=i32)  # fmt: skip
    wmeta = dict(meta, BLOCK_M=128, BLOCK_K=32, TOP_K=8)
    yield (
        expert_mlp.expert_wgrad_kernel,
        wgrad,
        dict(wmeta, GATHER_LEFT=True, GATHER_RIGHT=False, HAS_WEIGHTS=True),
        8,
    )
    yield (
        expert_mlp.expert_wgrad_kernel,
        wgrad,
        dict(wmeta, GATHER_LEFT=False, GATHER_RIGHT=True, HAS_WEIGHTS=False),
        8,
    )


def routing_plan_variants():
    i32 = "*i32"
    yield (routing_plan.count_chunks_kernel,
           dict(topk_ids_ptr="*i64", chunk_counts_ptr=i32, num_slots="i32"),
           dict(CHUNK=1024, SUB=32, E_PAD=128), 4)  # fmt: skip
    yield (routing_plan.place_slots_kernel,
           dict(topk_ids_ptr="*i64", chunk_counts_ptr=i32, expert_counts_ptr=i32,
                expert_offsets_ptr=i32, sorted_slots_ptr=i32, slot_positions_ptr=i32,
                tile_expert_ptr=i32, tile_row_start_ptr=i32, num_tiles_ptr=i32, num_slots="i32",
                num_chunks="i32", num_experts="i32", max_tiles="i32", tiles_per_program="i32"),
           dict(CHUNK=1024, SUB=32, E_PAD=128, BLOCK_M=64), 4)  # fmt: skip


if __name__ == "__main__":
    for fn, signature, constexprs, num_warps in [*expert_mlp_variants(), *routing_plan_variants()]:
        print(json.dumps(compile_sm90(fn, signature, constexprs, num_warps=num_warps)), flush=True)
