"""Compile the overlap kernels for Hopper (sm_90) on a machine without a GPU.

Run as a script in a process without TRITON_INTERPRET (the interpreter replaces `@triton.jit`
functions). Triton's bundled ptxas assembles the code, so a kernel that would not compile for an
H100 (the flag atomics, the address-table casts, the persistent loops) fails here. Prints one
JSON line per kernel: wgmma and async-copy counts from the TTGIR, and the acquire loads and
release atomics of the flag protocol in the PTX.
"""

import json
import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from overlap.flags import raise_flag_kernel  # noqa: E402
from overlap.kernels import ag_gemm, gemm_rs  # noqa: E402
from overlap.kernels.common import GPU_TILE_CONFIG as TILE  # noqa: E402
from overlap.worlds import GPU_REDUCE_BLOCK  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile `fn` as the JIT would for 16-byte aligned pointers and strides."""
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(signature.items())
        if ty.startswith("*") or name.startswith("stride") or name in ("m", "n", "N", "K")
    }
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs=attrs),
        target=HOPPER,
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return dict(
        kernel=fn.__name__,
        shared_bytes=kernel.metadata.shared,
        wgmma=ttgir.count("warp_group_dot "),
        async_copies=ttgir.count("async_copy_global_to_local"),
        # Triton lowers atomic_add(ptr, 0, sem="acquire") to an acquire load.
        acquire_loads=ptx.count("ld.global.gpu.acquire"),
        release_atomics=ptx.count("gpu.release.") + ptx.count("gpu.acq_rel."),
    )


def variants():
    bf16, i32 = "*bf16", "i32"
    gemm = dict(BLOCK_M=TILE.block_m, BLOCK_N=TILE.block_n, BLOCK_K=TILE.block_k,
                GROUP_M=TILE.group_m, COUNT_TILES=False, DOT_FP32=False,
                INPUT_PRECISION="ieee", WORLD_SIZE=8)  # fmt: skip
    yield (ag_gemm.ag_gemm_kernel,
           dict(a_local_ptr=bf16, gathered_ptr=bf16, b_ptr=bf16, c_ptr=bf16, flags_ptr="*i32",
                status_ptr="*i32", tile_count_ptr="*i32", m=i32, n=i32, K=i32, rank=i32,
                epoch=i32, max_spins=i32, chunk_m=i32, stride_al=i32, stride_g=i32,
                stride_bk=i32, stride_bn=i32, stride_c=i32),
           gemm, TILE.num_warps, TILE.num_stages)  # fmt: skip
    yield (gemm_rs.gemm_rs_kernel,
           dict(a_ptr=bf16, b_ptr=bf16, partial_ptr=bf16, counters_ptr="*i32", flags_ptr="*i32",
                tile_count_ptr="*i32", m=i32, N=i32, K=i32, rank=i32, epoch=i32, chunk_m=i32,
                stride_a=i32, stride_bk=i32, stride_bn=i32, stride_p=i32),
           gemm, TILE.num_warps, TILE.num_stages)  # fmt: skip
    yield (gemm_rs.rs_reduce_kernel,
           dict(partial_table_ptr="*i64", flag_table_ptr="*i64", out_ptr=bf16, status_ptr="*i32",
                m=i32, N=i32, dest=i32, epoch=i32, max_spins=i32, chunk_m=i32, stride_p=i32,
                stride_out=i32),
           dict(WORLD_SIZE=8, BLOCK_R=GPU_REDUCE_BLOCK[0], BLOCK_N=GPU_REDUCE_BLOCK[1]), 4, 1)  # fmt: skip
    yield (raise_flag_kernel, dict(flags_ptr="*i32", index=i32, epoch=i32), {}, 1, 1)


if __name__ == "__main__":
    for fn, signature, constexprs, num_warps, num_stages in variants():
        report = compile_sm90(fn, signature, constexprs, num_warps, num_stages)
        print(json.dumps(report), flush=True)
