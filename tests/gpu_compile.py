"""Compile Triton kernels for Hopper (sm_90) or Ampere (sm_80) on a machine without a GPU.

Run as `python tests/gpu_compile.py moeblaze|overlap [90|80]` in a process without
TRITON_INTERPRET (the interpreter replaces `@triton.jit` functions). Triton's bundled ptxas assembles the code, so a kernel that would fail to compile on
an H100 fails here, and the report shows whether the GEMMs got wgmma instructions and
asynchronous (pipelined) global-to-shared copies. Prints one JSON line per kernel variant.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moeblaze.expert_stages import GPU_CONFIGS  # noqa: E402
from moeblaze.kernels import expert_mlp, routing_plan  # noqa: E402
from overlap.flags import raise_flag_kernel  # noqa: E402
from overlap.kernels import ag_gemm, gemm_rs  # noqa: E402
from overlap.kernels.common import GPU_TILE_CONFIG as TILE  # noqa: E402
from overlap.kernels.common import wait_peers_kernel  # noqa: E402
from overlap.worlds import GPU_REDUCE_BLOCK  # noqa: E402

ARCH = int(sys.argv[2]) if len(sys.argv) > 2 else 90
TARGET = GPUTarget("cuda", ARCH, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Sizes the launchers pass that Triton specialises as multiples of 16 in the usual shapes.
_DIVISIBLE = ("D", "F", "M", "N", "K", "m", "n")


def compile_for_target(fn, signature: dict, constexprs: dict, num_warps=4, num_stages=3) -> dict:
    """Compile `fn` as the JIT would for 16-byte aligned pointers and strides."""
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(signature.items())
        if ty.startswith("*") or name.startswith("stride") or name in _DIVISIBLE
    }
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs=attrs),
        target=TARGET,
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    ttgir = kernel.asm["ttgir"]
    return dict(
        kernel=fn.__name__,
        constexprs={k: v for k, v in constexprs.items() if k.startswith("BLOCK")},
        num_warps=num_warps,
        shared_bytes=kernel.metadata.shared,
        wgmma=ttgir.count("warp_group_dot "),
        async_copies=ttgir.count("async_copy_global_to_local"),
        scope=constexprs.get("SCOPE"),
        # Flag protocol: Triton lowers atomic_add(ptr, 0, sem="acquire") to an acquire load.
        acquire_loads=len(re.findall(r"ld\.global\.(?:gpu|sys)\.acquire", kernel.asm["ptx"])),
        release_atomics=len(re.findall(r"(?:gpu|sys)\.(?:release|acq_rel)\.", kernel.asm["ptx"])),
        sys_scope_atomics=len(re.findall(r"\.sys\.(?:acquire|release|acq_rel)", kernel.asm["ptx"])),
        **resource_usage(kernel.asm["cubin"]),
    )


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread (stack > 0 means register spills), via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(registers=int(match[1]), stack_bytes=int(match[2]))


def expert_mlp_variants():
    """(kernel, signature, constexprs, num_warps, num_stages) for each GPU config moeblaze uses."""
    bf16, i32, plan = "*bf16", "i32", "*i32"
    plan_args = dict(sorted_slots_ptr=plan, expert_offsets_ptr=plan, tile_expert_ptr=plan,
                     tile_row_start_ptr=plan, num_tiles_ptr=plan, max_tiles=i32)  # fmt: skip
    signatures = {
        "gate_up": dict(x_ptr=bf16, w13_ptr=bf16, h_ptr=bf16, a_ptr=bf16, **plan_args, D=i32,
                        F=i32, stride_x=i32, stride_we=i32, stride_wn=i32, stride_wk=i32,
                        stride_h=i32, stride_a=i32),
        "grad_act": dict(dout_ptr=bf16, w2_ptr=bf16, h_ptr=bf16, weights_ptr="*fp32",
                         dh_ptr=bf16, a_ptr=bf16, dw_partial_ptr="*fp32", **plan_args, D=i32,
                         F=i32, stride_dout=i32, stride_we=i32, stride_wd=i32, stride_wf=i32,
                         stride_h=i32, stride_dh=i32, stride_a=i32),
        "scatter_rows": dict(in_ptr=bf16, w_ptr=bf16, weights_ptr="*fp32", out_ptr="*fp32",
                             **plan_args, N=i32, K=i32, stride_in=i32, stride_we=i32,
                             stride_wk=i32, stride_wn=i32, stride_out=i32),
        "expert_wgrad": dict(left_ptr=bf16, right_ptr=bf16, weights_ptr="*fp32", out_ptr=bf16,
                             sorted_slots_ptr=plan, expert_offsets_ptr=plan, M=i32, N=i32,
                             stride_left=i32, stride_right=i32, stride_oe=i32, stride_om=i32,
                             stride_on=i32),
    }  # fmt: skip
    flags = {
        "gate_up": [dict(STORE_H=True, STORE_A=True)],
        "grad_act": [dict(STORE_A=True)],
        "scatter_rows": [dict(HAS_WEIGHTS=True, PER_SLOT=False),
                         dict(HAS_WEIGHTS=False, PER_SLOT=True)],
        "expert_wgrad": [dict(GATHER_LEFT=True, GATHER_RIGHT=False, HAS_WEIGHTS=True),
                         dict(GATHER_LEFT=False, GATHER_RIGHT=True, HAS_WEIGHTS=False)],
    }  # fmt: skip
    for (name, _), cfg in GPU_CONFIGS.items():
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    GROUP_M=cfg.group_m, TOP_K=8, DOT_FP32=False, INPUT_PRECISION="tf32")  # fmt: skip
        for variant in flags[name]:
            fn = getattr(expert_mlp, f"{name}_kernel")
            yield fn, signatures[name], dict(meta, **variant), cfg.num_warps, cfg.num_stages


def routing_plan_variants():
    i32 = "*i32"
    yield (routing_plan.count_chunks_kernel,
           dict(topk_ids_ptr="*i64", chunk_counts_ptr=i32, num_slots="i32"),
           dict(CHUNK=1024, E_PAD=128), 4, 3)  # fmt: skip
    yield (routing_plan.place_slots_kernel,
           dict(topk_ids_ptr="*i64", chunk_counts_ptr=i32, expert_counts_ptr=i32,
                expert_offsets_ptr=i32, sorted_slots_ptr=i32, slot_positions_ptr=i32,
                tile_expert_ptr=i32, tile_row_start_ptr=i32, num_tiles_ptr=i32, num_slots="i32",
                num_chunks="i32", num_experts="i32", max_tiles="i32", tiles_per_program="i32"),
           dict(CHUNK=1024, E_PAD=128, CHUNK_ROWS=16, TILE_BLOCK=32, BLOCK_M=64), 4, 3)  # fmt: skip


def overlap_variants():
    """The overlap kernels: persistent AG-GEMM and GEMM-RS, the RS reduction, the flag and peer
    wait kernels; the RS pair also at system scope (DistWorld, flags read by other GPUs)."""
    bf16, i32 = "*bf16", "i32"
    gemm = dict(BLOCK_M=TILE.block_m, BLOCK_N=TILE.block_n, BLOCK_K=TILE.block_k,
                GROUP_M=TILE.group_m, COUNT_TILES=False, DOT_FP32=False,
                INPUT_PRECISION="ieee", WORLD_SIZE=8, SCOPE="gpu")  # fmt: skip
    yield (ag_gemm.ag_gemm_kernel,
           dict(a_local_ptr=bf16, gathered_ptr=bf16, b_ptr=bf16, c_ptr=bf16, flags_ptr="*i32",
                status_ptr="*i32", tile_count_ptr="*i32", m=i32, n=i32, K=i32, rank=i32,
                epoch=i32, max_spins=i32, chunk_m=i32, stride_al=i32, stride_g=i32,
                stride_bk=i32, stride_bn=i32, stride_c=i32),
           gemm, TILE.num_warps, TILE.num_stages)  # fmt: skip
    for scope in ("gpu", "sys"):
        yield (gemm_rs.gemm_rs_kernel,
               dict(a_ptr=bf16, b_ptr=bf16, partial_ptr=bf16, counters_ptr="*i32",
                    flags_ptr="*i32", tile_count_ptr="*i32", m=i32, N=i32, K=i32, rank=i32,
                    epoch=i32, chunk_m=i32, stride_a=i32, stride_bk=i32, stride_bn=i32,
                    stride_p=i32),
               {**gemm, "SCOPE": scope}, TILE.num_warps, TILE.num_stages)  # fmt: skip
        yield (gemm_rs.rs_reduce_kernel,
               dict(partial_table_ptr="*i64", flag_table_ptr="*i64", out_ptr=bf16,
                    status_ptr="*i32", m=i32, N=i32, dest=i32, epoch=i32, max_spins=i32,
                    chunk_m=i32, stride_p=i32, stride_out=i32),
               dict(WORLD_SIZE=8, BLOCK_R=GPU_REDUCE_BLOCK[0], BLOCK_N=GPU_REDUCE_BLOCK[1],
                    SCOPE=scope), 4, 1)  # fmt: skip
    yield (wait_peers_kernel,
           dict(flag_table_ptr="*i64", status_ptr="*i32", rank=i32, epoch=i32, max_spins=i32,
                flags_per_rank=i32),
           dict(WORLD_SIZE=8, SCOPE="sys"), 1, 1)  # fmt: skip
    yield (raise_flag_kernel, dict(flags_ptr="*i32", index=i32, epoch=i32), {}, 1, 1)


PACKAGES = {
    "moeblaze": lambda: [*expert_mlp_variants(), *routing_plan_variants()],
    "overlap": overlap_variants,
}

if __name__ == "__main__":
    for fn, signature, constexprs, warps, stages in PACKAGES[sys.argv[1]]():
        report = compile_for_target(fn, signature, constexprs, num_warps=warps, num_stages=stages)
        print(json.dumps(report), flush=True)
