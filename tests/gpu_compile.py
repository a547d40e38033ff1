"""Compile every Triton kernel the launchers start, for Hopper (sm_90) or Ampere (sm_80), on a
machine without a GPU.

Run as `python tests/gpu_compile.py moeblaze|overlap [90|80]` in a process without
TRITON_INTERPRET (the interpreter replaces `@triton.jit` functions). No kernel signature is
written here: the script runs the launchers themselves (moeblaze's plan launcher and
`TritonStages`, overlap's `launch_*`) on meta tensors of model shapes with Triton's launch
replaced by a recorder, and compiles each distinct recorded launch with the argument types,
specialisations (16-byte divisibility, integers equal to 1) and constexprs that Triton's JIT
derives from those arguments. Triton's bundled ptxas assembles the code, so a kernel that would
fail to compile on an H100 fails here, and the report shows whether the GEMMs got wgmma
instructions and asynchronous (pipelined) global-to-shared copies. Prints one JSON line per
kernel variant; its `ptx_sha256` (of the PTX without line information) tells whether a change
that should not alter the generated code (a refactor) left every variant as it was.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCH = int(sys.argv[2]) if len(sys.argv) > 2 else 90
TARGET = GPUTarget("cuda", ARCH, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
# The constexpr that says whether a kernel variant reads through tensor descriptors.
TMA_CONSTEXPRS = ("TMA", "B_TMA", "SORTED_TMA")
META = torch.device("meta")


@contextlib.contextmanager
def recorded_launches():
    """Within the block, `kernel[grid](*args, **kwargs)` records (kernel, args, kwargs) in the
    yielded list instead of launching."""
    launches = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = real_run


def jit_signature(fn: JITFunction, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of a launch, as Triton's JIT derives them."""
    values = dict(zip(fn.arg_names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            kind, attr = "constexpr", None
        else:
            specialize = not param.do_not_specialize
            kind, attr = native_specialize_impl(BaseBackend, value, False, specialize, specialize)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return signature, constexprs, attrs, options


ACTIVATION_CONSTEXPRS = (
    "ACT",
    "GATED",
    "ALPHA",
    "LIMIT",
    "UP_OFFSET",
    "GATE_SOFTCAP",
    "UP_SOFTCAP",
    "INTERLEAVED",
)


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    signature, constexprs, attrs, options = jit_signature(fn, args, kwargs)
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs=attrs), target=TARGET, options=options
    )
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return dict(
        kernel=fn.__name__,
        constexprs={k: v for k, v in constexprs.items() if k.startswith("BLOCK")},
        num_warps=options.get("num_warps", 4),
        # Whether the launch asked for FMA contraction itself (kernelbase.backend.COMPILE_OPTIONS);
        # None: left to Triton's default, which changes in Triton 3.10.
        fp_fusion=options.get("enable_fp_fusion"),
        # The element type of the first pointer argument ("*bf16", "*fp32", ...).
        operand_type=next((k for k in signature.values() if k.startswith("*")), None),
        shared_bytes=kernel.metadata.shared,
        wgmma=ttgir.count("warp_group_dot "),
        async_copies=ttgir.count("async_copy_global_to_local"),
        tma_copies=ttgir.count("async_tma_copy_global_to_local"),
        **mainloop_pipelining(ttgir),
        access_vector_bytes=access_vector_bytes(ttgir),
        # Global loads and stores of 1 or 2 bytes in the PTX: a tile's layout may hold 8
        # elements per thread and still be accessed one element per instruction where the
        # compiler cannot prove the addresses aligned (e.g. a pointer read from a table).
        narrow_global_accesses=len(
            re.findall(r"(?:ld|st)\.global(?:\.\w+)*?\.(?:b16|u16|s16|b8|u8|s8)\b", ptx)
        ),
        scope=constexprs.get("SCOPE"),
        link=constexprs.get("LINK"),
        tma=next((constexprs[k] for k in TMA_CONSTEXPRS if k in constexprs), None),
        # grad_act: whether its epilogue reads h through a tensor descriptor, in how many slices,
        # and how many exponentials the kernel computes (each slice's activation needs one per
        # element: more means Triton computed it again in another register layout).
        h_tma=constexprs.get("H_TMA"),
        epilogue_split=constexprs.get("EPILOGUE_SPLIT"),
        exp_ops=len(re.findall(r"= math\.exp2? ", ttgir)),
        # Hints that bring lines into L2 ahead of their loads (grad_act's h, kernelbase.gemm.
        # prefetch_l2), per thread.
        l2_prefetches=ptx.count("prefetch.global.L2"),
        # The activation's constants (moeblaze.activation) of the kernels that take them.
        activation={k: constexprs[k] for k in ACTIVATION_CONSTEXPRS}
        if "ACT" in constexprs
        else None,
        bias=constexprs.get("HAS_BIAS"),
        # Flag protocol: Triton lowers a scalar atomic_add(ptr, 0, sem="acquire") to an acquire
        # load, a masked vector of them (wait_flags) to acquire atomic adds of 0.
        acquire_polls=len(
            re.findall(
                r"ld\.global\.(?:gpu|sys)\.acquire|atom\.global\.(?:gpu|sys)\.acquire\.add", ptx
            )
        ),
        release_atomics=len(re.findall(r"(?:gpu|sys)\.(?:release|acq_rel)\.", ptx)),
        sys_scope_atomics=len(re.findall(r"\.sys\.(?:acquire|release|acq_rel)", ptx)),
        # Flag waits bounded by the GPU's nanosecond clock (real time, not a count of polls).
        clock_reads=ptx.count("%globaltimer"),
        # Acquired flags ordered before TMA loads of the rows they publish.
        proxy_fences=ptx.count("fence.proxy.async"),
        **resource_usage(kernel.asm["cubin"]),
        ptx_sha256=hashlib.sha256(without_line_info(ptx).encode()).hexdigest()[:16],
    )


def without_line_info(ptx: str) -> str:
    """The PTX without what moves when source lines move: `.loc` / `.file` directives, comments
    and the debug sections."""
    code = ptx.split(".section\t.debug")[0].split(".section .debug")[0]
    return "\n".join(
        line for line in code.splitlines() if not re.match(r"\s*(?:\.loc|\.file|//)", line)
    )


def mainloop_pipelining(ttgir: str) -> dict:
    """How well the software pipeliner overlapped the GEMM main loops (the scf.for loops that
    issue a wgmma), from the TTGIR:

    register_operands   dot operands the main loops store into shared memory from registers
                        (`ttg.local_alloc %t`): loaded synchronously, not by async copies
    copies_in_flight    min over the main loops of the async-copy groups left in flight when an
                        iteration waits for its operands (0: every load is waited for at once)
    wgmma_in_flight     min over the main loops of the wgmmas left in flight by their waits
                        (0: every step waits for its own MMA)
    Both minima are None when no loop issues a wgmma (e.g. sm_80).
    """
    loops, stack = [], []  # per scf.for region: its async-wait and wgmma-wait counts
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            stack.pop()
        if text.endswith("{"):
            region = (
                {"copies": [], "mma": [], "dots": 0, "allocs": 0} if "scf.for " in text else None
            )
            stack.append(region)
            if stack[-1] is not None:
                loops.append(stack[-1])
            continue
        loop = next((region for region in reversed(stack) if region is not None), None)
        if loop is None:
            continue
        if "ttg.async_wait " in text and (match := re.search(r"\{num = (\d+)", text)):
            loop["copies"].append(int(match[1]))
        if "warp_group_dot_wait " in text and (match := re.search(r"pendings = (\d+)", text)):
            loop["mma"].append(int(match[1]))
        loop["dots"] += "ttng.warp_group_dot " in text
        loop["allocs"] += bool(re.search(r"ttg\.local_alloc %", text))
    main = [loop for loop in loops if loop["dots"]]
    return dict(
        register_operands=sum(loop["allocs"] for loop in main),
        copies_in_flight=min((min(lp["copies"], default=0) for lp in main), default=None),
        wgmma_in_flight=min((min(lp["mma"], default=0) for lp in main), default=None),
    )


ELEMENT_BYTES = {"i8": 1, "bf16": 2, "f16": 2, "i16": 2, "f32": 4, "i32": 4, "f64": 8, "i64": 8}


def access_vector_bytes(ttgir: str) -> int | None:
    """The narrowest vector of a global load, async copy, store or atomic of a 2-D tile (both
    sides longer than 1) in the kernel: the layout's elements per thread along its fastest
    dimension (the one the compiler found contiguous in memory) times the element size. 2 for
    bf16 means one instruction per element (and, where a warp's lanes run down a column of a
    row-major tile, a sector per 2 bytes). 0: a layout other than blocked (not read here).
    None: no such access (tensor-descriptor copies are not counted)."""
    layouts = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, re.M))
    access = (
        r"(?:tt\.load|ttg\.async_copy_global_to_local|tt\.store|tt\.atomic_rmw) "
        r".*?tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>, (#\w+)>"
    )
    widths = []
    for rows, columns, element, name in re.findall(access, ttgir):
        if min(int(rows), int(columns)) == 1:
            continue
        layout = layouts[name]
        size = re.search(r"sizePerThread = \[(\d+), (\d+)\]", layout)
        order = re.search(r"order = \[(\d), \d\]", layout)
        if not layout.startswith("#ttg.blocked") or not size or not order:
            widths.append(0)
            continue
        widths.append(int(size[1 + int(order[1])]) * ELEMENT_BYTES[element])
    return min(widths, default=None)


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread (stack > 0 means register spills), via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(registers=int(match[1]), stack_bytes=int(match[2]))


def run_moeblaze_launchers() -> None:
    """The plan and every expert-MLP stage at both block_m values (bf16, d=4096, F=1408, E=64),
    with the weights (and scatter_rows' sorted rows) through tensor descriptors (TMA) on sm_90,
    and with pointer loads; grad_act also reading h through a descriptor (epilogue_tma);
    gate_up and grad_act also with a clamped quick-GELU SwiGLU (their largest epilogue); and
    GPT-OSS's experts as Hugging Face stores them (that SwiGLU with gate and up interleaved,
    biases, transposed weights), with the bias gradients; Gemma 4's GeGLU; Inkling 2's
    soft-capped SwiGLU; experts without a gate (ReLU², GELU); and expert parallelism's combine
    (gather_sum)."""
    from moeblaze.activation import Gated, SwiGLU, Ungated
    from moeblaze.kernels.expert_mlp import TritonStages, config_key, gpu_config
    from moeblaze.kernels.gather_sum import launch_gather_sum
    from moeblaze.kernels.routing_plan import launch_plan
    from moeblaze.routing_plan import RoutingPlan, plan_numel

    d, ffn, E, k = 4096, 1408, 64, 8

    def empty(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device=META)

    w13, w2 = empty(E, 2 * ffn, d), empty(E, d, ffn)
    # T = 2048 and 8192 tokens: 16384 and 65536 slots give block_m 64 and 128.
    for tma in (True, False) if ARCH >= 90 else (False,):
        stages = TritonStages(tma=tma, arch=ARCH)
        for T in (2048, 8192):
            S = T * k
            block_m = stages.block_m(S, E)
            buffer = empty(plan_numel(S, E, block_m), dtype=torch.int32)
            plan = RoutingPlan.from_buffer(buffer, S, E, k, block_m)
            topk_ids = empty(T, k, dtype=torch.int64)
            topk_weights = empty(T, k, dtype=torch.float32)
            x, dout = empty(T, d), empty(T, d)
            launch_plan(topk_ids, plan)
            h, a = stages.gate_up(x, w13, topk_weights, plan, store_h=True, store_a=True)
            stages.down_combine(a, w2, plan, deterministic=False)
            dh, _, a = stages.grad_act(dout, w2, h, topk_weights, plan, store_a=True)
            stages.grad_input(dh, w13, plan, deterministic=True)
            stages.grad_w2(dout, a, plan)
            stages.grad_w13(dh, x, plan)
            clamped = SwiGLU(alpha=1.702, limit=7.0, up_offset=1.0)
            stages.gate_up(
                x, w13, topk_weights, plan, store_h=True, store_a=True, activation=clamped
            )
            stages.grad_act(dout, w2, h, topk_weights, plan, store_a=True, activation=clamped)
            geglu = Gated("gelu_tanh")  # Gemma 4
            stages.gate_up(x, w13, topk_weights, plan, store_h=True, store_a=True, activation=geglu)
            stages.grad_act(dout, w2, h, topk_weights, plan, store_a=True, activation=geglu)
            capped = SwiGLU(gate_softcap=4.0, up_softcap=25.0)  # Inkling 2
            stages.gate_up(
                x, w13, topk_weights, plan, store_h=True, store_a=True, activation=capped
            )
            stages.grad_act(dout, w2, h, topk_weights, plan, store_a=True, activation=capped)
            # grad_act reading h through a tensor descriptor too (GemmConfig.epilogue_tma).
            if tma:
                key = config_key("grad_act", block_m)
                h_tma = dataclasses.replace(gpu_config(*key, arch=ARCH), epilogue_tma=True)
                TritonStages({key: h_tma}, arch=ARCH).grad_act(
                    dout, w2, h, topk_weights, plan, store_a=True
                )
            # GPT-OSS: gate_up_proj [E, d, 2F] and down_proj [E, F, d], read transposed.
            gpt_oss = SwiGLU(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True)
            w13_t, w2_t = empty(E, d, 2 * ffn).mT, empty(E, ffn, d).mT
            b13, b2 = empty(E, 2 * ffn), empty(E, d)
            h, a = stages.gate_up(
                x, w13_t, topk_weights, plan, store_h=True, store_a=True, activation=gpt_oss,
                bias=b13,
            )  # fmt: skip
            stages.down_combine(
                a, w2_t, plan, deterministic=False, bias=b2, topk_weights=topk_weights
            )
            stages.grad_act(dout, w2_t, h, topk_weights, plan, store_a=True, activation=gpt_oss)
            stages.grad_b13(dh, plan, torch.bfloat16)
            stages.grad_b2(dout, topk_weights, b2, plan)
            # Experts without a gate (Nemotron's ReLU², Megatron's GELU MLP): w13 [E, F, d].
            w1 = empty(E, ffn, d)
            for ungated in (Ungated("relu2"), Ungated("gelu")):
                h, a = stages.gate_up(
                    x, w1, topk_weights, plan, store_h=True, store_a=True, activation=ungated
                )
                stages.grad_act(dout, w2, h, topk_weights, plan, store_a=True, activation=ungated)
            # Expert parallelism's combine: the k received rows of each token, and weights.
            launch_gather_sum(empty(S, d), empty(T, k, dtype=torch.int32))
            launch_gather_sum(empty(S, 1, dtype=torch.float32), empty(S, 1, dtype=torch.int32))


def run_overlap_launchers() -> None:
    """Llama-70B shapes at W=8: the persistent AG-GEMM and GEMM-RS at both memory scopes with
    operands through tensor descriptors (TMA; the AG-GEMM with both layouts of b), and with
    pointer loads; the RS reduction, the peers' ready wait and the fallback flag kernel; the GEMMs
    and the reduction with the emulated link of a LocalWorld too, and its one-warp wait."""
    from overlap.fused import default_tile_config, reduce_block
    from overlap.kernels.ag_gemm import launch_ag_gemm
    from overlap.kernels.flags import launch_raise_flag, launch_wait_peers
    from overlap.kernels.gemm_rs import launch_gemm_rs, launch_rs_reduce
    from overlap.kernels.link import launch_link_wait

    W, M, hidden, ffn = 8, 8192, 8192, 28672
    m, n = M // W, ffn // W
    block_r, block_n = reduce_block(torch.device("cuda"), W)

    def empty(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device=META)

    flags, status = empty(W * 2, dtype=torch.int32), empty(2, dtype=torch.int32)
    table = empty(W, dtype=torch.int64)
    common = dict(world_size=W, epoch=3, chunk_m=512, num_programs=132)
    clock = empty(W + W * W * 2, dtype=torch.int64)
    links = [{}, dict(link_clock=clock, link_ns_per_row=36.4)]  # LocalWorld(link_gbps=450)
    weight_t = empty(n, hidden).mT  # [hidden, n], a Linear weight [n, hidden] transposed
    hopper = ARCH >= 90  # TMA kernels fence the async proxy, an sm_90 instruction
    f32 = torch.float32  # float32 operands get their own default tile (overlap.fused)

    def tile(tma, dtype=torch.bfloat16):
        return dataclasses.replace(
            default_tile_config(torch.device("cuda"), dtype), tma=tma and hopper
        )

    for tma, link, b, dtype in [
        (True, links[0], empty(hidden, n), torch.bfloat16),
        (True, links[0], weight_t, torch.bfloat16),
        (False, links[0], empty(hidden, n), torch.bfloat16),
        (True, links[1], empty(hidden, n), torch.bfloat16),
        (True, links[0], empty(hidden, n, dtype=f32), f32),
    ]:
        launch_ag_gemm(
            empty(m, hidden, dtype=dtype),
            empty(M, hidden, dtype=dtype),
            b,
            empty(M, n, dtype=dtype),
            flags,
            status,
            rank=5,
            wait_budget=1000,
            config=tile(tma, dtype),
            **common,
            **link,
        )
    for tma, scope, link, dtype in [
        (True, "gpu", links[0], torch.bfloat16),
        (True, "sys", links[0], torch.bfloat16),
        (False, "gpu", links[0], torch.bfloat16),
        (True, "gpu", links[1], torch.bfloat16),
        (True, "gpu", links[0], f32),
    ]:
        counters = empty(W * 2, dtype=torch.int32)
        launch_gemm_rs(
            empty(M, n, dtype=dtype),
            empty(n, hidden, dtype=dtype),
            empty(M, hidden, dtype=dtype),
            counters,
            flags,
            rank=5,
            scope=scope,
            config=tile(tma, dtype),
            **common,
            **link,
        )
        launch_rs_reduce(
            table,
            table,
            empty(m, hidden),
            status,
            dest=5,
            world_size=W,
            row_stride=hidden,
            epoch=3,
            wait_budget=1000,
            chunk_m=512,
            num_programs=16,
            block_r=block_r,
            block_n=block_n,
            scope=scope,
            link_clock=link.get("link_clock"),
        )
    launch_wait_peers(
        table,
        status,
        rank=5,
        world_size=W,
        epoch=3,
        wait_budget=1000,
        flags_per_rank=2,
        scope="sys",
    )
    launch_raise_flag(flags, 7, 3)
    for queue in (False, True):
        launch_link_wait(clock, 5, 123_456, queue=queue)


PACKAGES = {"moeblaze": run_moeblaze_launchers, "overlap": run_overlap_launchers}

if __name__ == "__main__":
    with recorded_launches() as launches:
        PACKAGES[sys.argv[1]]()
    seen = set()
    for fn, args, kwargs in launches:
        signature, constexprs, attrs, options = jit_signature(fn, args, kwargs)
        key = (fn.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key in seen:
            continue
        seen.add(key)
        print(json.dumps(compile_launch(fn, args, kwargs)), flush=True)
