"""GEMM building blocks shared by the kernels of moeblaze and overlap.

    GemmConfig     tile sizes and launch options of one GEMM kernel
    launch_meta    launcher side: the constexprs and launch options of a config for a dtype
    swizzle_tile   grouped tile order: GROUP_M row tiles share each sweep over column tiles
    prefetch_l2    a hint to bring the 128-byte lines at some pointers into L2 (compiled only)
    tile_matmul    fp32 product of one output tile: BLOCK_M rows of A (picked by index, or
                   consecutive rows through a tensor descriptor: TMA on Hopper) with a tile
                   of one matrix B of a stack (strided pointers, or a descriptor)
    tma_supported  launcher side: whether a device's kernels may use descriptors
    tma_descriptor launcher side: a descriptor of a tensor, or None where TMA cannot read it
    b_descriptor   launcher side: the descriptor of B or of a stack of B for `tile_matmul`
    matmul_descriptors  launcher side: the descriptors of A and B

DOT_FP32 upcasts the operands of tl.dot: the Triton 3.9 CPU interpreter multiplies bfloat16
operands as their raw 16-bit storage, so launchers set it when interpreting.
"""

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernelbase.backend import COMPILE_OPTIONS, interpreting
from kernelbase.checks import check_bool, check_int


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of a GEMM kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # Persistent kernels: upper bound on the grid (None: one program per SM, or per tile).
    max_programs: int | None = None
    # Read the contiguous operands through tensor descriptors (the copy engine, TMA) where the
    # device (Hopper and later, or the interpreter) and the tensors allow it; False: pointer
    # loads (software-pipelined async copies). A per-kernel choice: tuning measures both.
    tma: bool = True
    # Output columns an epilogue works on at a time, for kernels that split theirs to keep
    # fewer temporaries live (moeblaze's grad_act); None: the kernel's default.
    epilogue_n: int | None = None
    # Read the per-position tensor an epilogue reads (moeblaze's grad_act: h) through a tensor
    # descriptor too, where `tma` allows; False: pointer loads. From shared memory Triton may
    # compute what it feeds twice, in two register layouts (bench/NOTES.md, session 44).
    epilogue_tma: bool = False
    # Before the main loop, ask L2 for the lines of that per-position tensor the epilogue will
    # read through pointers, so they arrive while the tile is computed (moeblaze's grad_act).
    epilogue_prefetch: bool = True

    def __post_init__(self):
        powers_of_two = {"block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 1}
        if self.epilogue_n is not None:
            powers_of_two["epilogue_n"] = 1
        for name, minimum in powers_of_two.items():
            value = getattr(self, name)
            check_int(name, value, minimum)
            if value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        for name in ("group_m", "num_stages"):
            check_int(name, getattr(self, name))
        if self.max_programs is not None:
            check_int("max_programs", self.max_programs)
        for name in ("tma", "epilogue_tma", "epilogue_prefetch"):
            check_bool(name, getattr(self, name))


def dot_options(dtype: torch.dtype) -> dict:
    """tl.dot constexprs: float32 operands use TF32 exactly when torch's matmul would."""
    full_fp32 = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(DOT_FP32=interpreting(), INPUT_PRECISION="ieee" if full_fp32 else "tf32")


def launch_meta(config: GemmConfig, dtype: torch.dtype) -> dict:
    """Keyword arguments of a launch: BLOCK_M/N/K, GROUP_M, the dot options, warps and stages
    (and COMPILE_OPTIONS)."""
    return dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **dot_options(dtype),
        **COMPILE_OPTIONS,
    )


@triton.jit
def swizzle_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear tile index to (pid_m, pid_n) so that GROUP_M row tiles share column sweeps."""
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_size
    pid_n = (tile % width) // group_size
    return pid_m, pid_n


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines holding `ptrs` to be brought into L2, without waiting for them
    or holding registers for them (PTX `prefetch.global.L2`, a hint). Only for compiled kernels:
    the interpreter has no inline assembly, so launchers leave it out there."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def tile_matmul(
    a,
    a_row0,
    a_rows,  # [BLOCK_M] row indices into A
    row_mask,  # [BLOCK_M]
    stride_am,
    b,
    stride_bk,
    stride_bn,
    col0,
    cols,  # [BLOCK_N] = col0 + arange
    col_mask,  # [BLOCK_N]
    K,
    BLOCK_K: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_KN: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    b_index=0,
    stride_bi=0,
    second_n=0,
    DUAL: tl.constexpr = False,
):
    """acc[i, j] = sum_kk A[row i, kk] * B[kk, cols[j]] in fp32, B = matrix `b_index` of a stack;
    the tile is BLOCK_M x BLOCK_N, the lengths of `row_mask` and `col_mask`.

    A: with A_TMA, `a` is a tensor descriptor of A [rows, K] (`tma_descriptor`) read at rows
    a_row0 ..; else `a` points at A with unit K stride and the rows are `a_rows` (by index: a
    gather), masked by `row_mask`. B: with B_TMA, `b` is a descriptor of the stack (`b_descriptor`:
    [I, K, N] if B_KN, else [I, N, K], a stack of transposed weights) read at columns col0 ..;
    else `b` points at the stack (strides stride_bi, stride_bk, stride_bn) read at `cols`,
    masked by `col_mask`. On Hopper the copy engine (TMA) fills the pipeline's shared-memory
    stages of a descriptor's operand; what lies outside a descriptor's shape reads as zero, so a
    weight tile never reads the next matrix of the stack.

    With DUAL, also the product with the columns `second_n` further on (the up-projection rows of
    w13), reusing each loaded A block for both; else the second accumulator is zeros. Callers
    name every argument: B is matrix 0 of a stack of one unless they give `b_index`.
    """
    BLOCK_M: tl.constexpr = row_mask.shape[0]
    BLOCK_N: tl.constexpr = col_mask.shape[0]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not A_TMA:
        a_row_ptrs = a + a_rows.to(tl.int64)[:, None] * stride_am
    if not B_TMA:
        b_base = b + tl.cast(b_index, tl.int64) * stride_bi
        b_col_ptrs = b_base + cols.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        if A_TMA:
            a_tile = a.load([a_row0, k0])
        else:
            a_mask = row_mask[:, None] & k_mask[None, :]
            a_tile = tl.load(a_row_ptrs + kk[None, :], mask=a_mask, other=0.0)
        if B_TMA:
            b_tile = _stacked_tile(b, b_index, k0, col0, BLOCK_K, BLOCK_N, B_KN)
        else:
            b_ptrs = b_col_ptrs + kk.to(tl.int64)[:, None] * stride_bk
            b_mask = k_mask[:, None] & col_mask[None, :]
            b_tile = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if DOT_FP32:
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION)
        if DUAL:
            if B_TMA:
                b2 = _stacked_tile(b, b_index, k0, col0 + second_n, BLOCK_K, BLOCK_N, B_KN)
            else:
                b2 = tl.load(b_ptrs + second_n * stride_bn, mask=b_mask, other=0.0)
            if DOT_FP32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a_tile, b2, acc2, input_precision=INPUT_PRECISION)
    return acc, acc2


@triton.jit
def _stacked_tile(
    desc, index, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, B_KN: tl.constexpr
):
    """The [BLOCK_K, BLOCK_N] tile at (k0, n0) of matrix `index` of a `b_descriptor` stack."""
    if B_KN:
        return desc.load([index, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    return desc.load([index, n0, k0]).reshape(BLOCK_N, BLOCK_K).T


def device_arch(device: torch.device) -> int:
    """The compute capability of `device` as 10 * major + minor (90: Hopper); 90 for the CPU
    interpreter, which runs the Hopper code paths."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def tma_supported(device: torch.device) -> bool:
    """Whether kernels on `device` may read through tensor descriptors: Hopper and later GPUs,
    and the CPU interpreter."""
    return device_arch(device) >= 90


def tma_descriptor(
    tensor: torch.Tensor, block: tuple[int, ...], offsets: tuple[int, ...] = ()
) -> TensorDescriptor | None:
    """A tensor descriptor of `tensor` read in `block`s, or None where the copy engine cannot
    read it: unit stride along its last dimension, 16-byte aligned start and other strides, no
    broadcast (zero-stride) dimension.

    Blocks start at 16-byte aligned columns of the last dimension (the Triton interpreter checks
    it): multiples of the block do; `offsets` are the other column offsets a kernel adds (e.g.
    F, to the up half of [S, 2F] rows), and one that is not aligned also gives None."""
    size = tensor.element_size()
    if (
        tensor.numel() == 0
        or tensor.stride(-1) != 1
        or any(stride * size % 16 or stride == 0 for stride in tensor.stride()[:-1])
        or tensor.data_ptr() % 16
        or block[-1] * size < 16
        or any(offset * size % 16 for offset in offsets)
    ):
        return None
    return TensorDescriptor.from_tensor(tensor, list(block))


def b_descriptor(b: torch.Tensor, block_k: int, block_n: int, second_n: int = 0):
    """(desc, B_KN) of B [K, N], or of a stack of them [I, K, N], for `tile_matmul`'s B_TMA; or
    None where the copy engine cannot read it. Described as is when B's rows are contiguous
    (B_KN), else as B^T [I, N, K] (a transposed weight). A matrix is a stack of one.

    `second_n`: DUAL's column offset, along the last dimension of a B_KN descriptor (see
    `tma_descriptor`'s offsets)."""
    stack = b if b.dim() == 3 else b.unsqueeze(0)
    if stack.stride(2) == 1:
        desc = tma_descriptor(stack, (1, block_k, block_n), offsets=(second_n,))
        return None if desc is None else (desc, True)
    desc = tma_descriptor(stack.mT, (1, block_n, block_k))
    return None if desc is None else (desc, False)


def matmul_descriptors(a: torch.Tensor, b: torch.Tensor, config: GemmConfig):
    """(a_desc, b_desc, B_KN) for `tile_matmul` with `config`'s tiles reading both operands
    through descriptors, or None unless `config.tma`, the device (`tma_supported`) and both
    matrices allow it (see `b_descriptor`)."""
    if not (config.tma and tma_supported(a.device)):
        return None
    a_desc = tma_descriptor(a, (config.block_m, config.block_k))
    b_desc = b_descriptor(b, config.block_k, config.block_n)
    if a_desc is None or b_desc is None:
        return None
    return a_desc, *b_desc
