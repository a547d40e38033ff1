"""Helpers shared by the moeblaze tests (fixtures live in conftest.py).

# T tokens, k top-k, E experts, S = T*k slots (slot s = t*k + j), p sorted position
"""

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from tolerance import assert_close

from kernelbase.backend import COMPILE_OPTIONS
from moeblaze.activation import Gated, SwiGLU
from moeblaze.kernels.activation import tanh as kernel_tanh
from moeblaze.kernels.expert_mlp import _h_lines
from moeblaze.routing_plan import DROPPED, max_tiles, plan_numel

NAMES = ("out", "dx", "dtopk_weights", "dw13", "dw2")
BIAS_NAMES = ("db13", "db2")  # after NAMES, for a problem with biases

# float32 against the float64 oracle. Measured errors are 1e-7..7e-7 (fp32 eps is 1.2e-7; the
# worst is dtopk_weights at T=1, a single short dot product). 1e-5 leaves >10x margin for
# longer reductions and other summation orders, while one wrong or missing row of a [37, 48]
# output already gives a relative error above 1e-2.
RTOL_FP32 = 1e-5

# bfloat16, measured against plain PyTorch in bf16. The Triton 3.9 CPU interpreter rounds
# float32 -> bfloat16 by truncation (round toward zero), not to nearest: every rounding shrinks
# magnitudes by 2**-9 on average, the biases of the roundings on a path add up, and the kernels'
# bf16 results carry 2-3.5x the error of PyTorch's round-to-nearest (measured: up to 3.4x, on
# dw2). Hence factor 4 under the interpreter. The torch stages round to nearest, like the GPU
# (tests/moeblaze/test_gpu.py): factor 2, the bound of the design brief.
BF16_FACTOR_INTERPRETER = 4
BF16_FACTOR = 2

# (T, d, F, E, k): a small problem whose sizes are no multiple of any block.
SMALL = (21, 40, 24, 5, 2)


# Limits far below the real models' (DeepSeek-V4 10, GPT-OSS 7), so that a good part of the
# N(0, 1) pre-activations of the test problems is clamped.
ACTIVATIONS = {
    "deepseek-v4": SwiGLU(limit=0.5),
    "gpt-oss": SwiGLU(alpha=1.702, limit=0.7, up_offset=1.0, interleaved=True),
    "quick-gelu": SwiGLU(alpha=1.702),
    "interleaved": SwiGLU(interleaved=True),
    "geglu": Gated("gelu_tanh"),  # Gemma 4
    "gated-gelu-clamped": Gated("gelu", limit=0.5, up_offset=1.0, interleaved=True),
    # Soft caps that bend much of N(0, 1) (Inkling 2's are 4 and 25)
    "inkling2": SwiGLU(gate_softcap=0.5, up_softcap=0.3),
    "softcapped-everything": SwiGLU(1.702, 0.7, 1.0, True, gate_softcap=0.4, up_softcap=0.5),
    "gated-up-softcap": Gated("relu2", up_softcap=0.5),
}


def output_names(outputs) -> tuple[str, ...]:
    """The names of MoEProblem.run's outputs: NAMES, and BIAS_NAMES for a problem with biases."""
    return NAMES if len(outputs) == len(NAMES) else NAMES + BIAS_NAMES


def assert_matches_reference(actual, expected, *, rtol=RTOL_FP32, what=""):
    for name, a, e in zip(output_names(expected), actual, expected, strict=True):
        assert a.shape == e.shape, f"{what}{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert_close(a, e, rtol=rtol, name=f"{what}{name}")


def check_plan(plan, topk_ids, num_experts, block_m):
    """Every documented invariant of a RoutingPlan built from `topk_ids` (on any device)."""
    topk_ids = topk_ids.to(plan.buffer.device)
    T, k = topk_ids.shape
    S = T * k
    E = num_experts
    ids = topk_ids.reshape(-1).long()  # [S]
    assert plan.num_experts == E and plan.top_k == k and plan.block_m == block_m
    assert plan.buffer.dtype == torch.int32 and plan.buffer.numel() == plan_numel(S, E, block_m)
    for field in (
        "expert_counts",
        "expert_offsets",
        "sorted_slots",
        "slot_positions",
        "tile_expert",
        "tile_row_start",
        "num_tiles",
        "invalid_ids",
    ):
        t = getattr(plan, field)
        assert t.dtype == torch.int32, field
        assert t.untyped_storage().data_ptr() == plan.buffer.untyped_storage().data_ptr(), field

    sorted_slots = plan.sorted_slots.long()  # [S]
    positions = plan.slot_positions.long()  # [S]
    counts = plan.expert_counts.long()  # [E]
    offsets = plan.expert_offsets.long()  # [E+1]

    # sorted_slots is a permutation of range(S) and slot_positions its inverse.
    every_slot = torch.arange(S, device=plan.buffer.device)
    assert torch.equal(sorted_slots.sort().values, every_slot)
    assert torch.equal(positions[sorted_slots], every_slot)
    assert torch.equal(sorted_slots[positions], every_slot)

    # Counts and offsets.
    assert torch.equal(counts, torch.bincount(ids, minlength=E))
    assert offsets.shape == (E + 1,) and offsets[0] == 0 and offsets[-1] == S
    assert plan.invalid_ids.tolist() == [0, 0]  # every id valid
    assert torch.equal(offsets.diff(), counts)  # also: nondecreasing, since counts >= 0
    assert bool((counts >= 0).all())

    # Expert e owns positions [offsets[e], offsets[e+1]), slots in ascending order (stable).
    for e in range(E):
        slots = sorted_slots[offsets[e] : offsets[e + 1]]
        assert bool((ids[slots] == e).all()), f"position of expert {e} holds another expert"
        assert bool((slots.diff() > 0).all()), f"slots of expert {e} not in token order"

    # Tile metadata: tiles cover each expert's positions exactly once, in order.
    assert plan.max_tiles == max_tiles(S, E, block_m) == math.ceil(S / block_m) + E
    num_tiles = int(plan.num_tiles)
    expected_tiles = sum(math.ceil(c / block_m) for c in counts.tolist())
    assert num_tiles == expected_tiles <= plan.max_tiles
    tile_expert = plan.tile_expert.long()
    tile_row_start = plan.tile_row_start.long()
    expected_expert, expected_start = [], []
    for e in range(E):
        for start in range(int(offsets[e]), int(offsets[e + 1]), block_m):
            expected_expert.append(e)
            expected_start.append(start)
    assert tile_expert[:num_tiles].tolist() == expected_expert
    assert tile_row_start[:num_tiles].tolist() == expected_start
    # Padding tiles: expert E and row start S, so a stray read is out of range.
    assert bool((tile_expert[num_tiles:] == E).all())
    assert bool((tile_row_start[num_tiles:] == S).all())


def assert_empty_experts_get_zero_grads(problem, dw13, dw2) -> int:
    """Exact zeros in the weight gradients of the experts no slot reaches; returns how many."""
    ids = problem.topk_ids[problem.topk_ids != DROPPED]
    counts = torch.bincount(ids, minlength=problem.w13.shape[0])
    empty = counts == 0
    assert torch.equal(dw13[empty], torch.zeros_like(dw13[empty]))
    assert torch.equal(dw2[empty], torch.zeros_like(dw2[empty]))
    return int(empty.sum())


def assert_dropped_slots_add_nothing(problem, actual, *, dropped_routing: bool = True):
    """Exact zeros where only dropped slots reach: the output and input gradient of the tokens
    all of whose slots are dropped (with biases too: a dropped slot adds no bias), and the
    routing weights of dropped slots. `dropped_routing`: the problem has the "dropped" routing,
    which drops all of token 0's slots and some, not all, of the others (checked)."""
    dropped = problem.topk_ids == DROPPED
    if dropped_routing:
        assert dropped[0].all() and 0 < dropped.sum() < dropped.numel()
    out, dx, dweights = actual[:3]
    gone = dropped.all(dim=1)  # [T]
    assert torch.equal(out[gone], torch.zeros_like(out[gone]))
    assert torch.equal(dx[gone], torch.zeros_like(dx[gone]))
    assert torch.equal(dweights[dropped], torch.zeros_like(dweights[dropped]))


def shard_of(name: str, whole: torch.Tensor, group, gated: bool = True) -> torch.Tensor:
    """This rank's shard of a tensor split over `group`: `name` "fc1" ([2F, ...]: gate rows r,
    then up rows r; without a gate [F, ...]: rows r) or "fc2" ([h, F]: columns r)."""
    rank, count = dist.get_rank(group), dist.get_world_size(group)
    if name == "fc1":
        halves = whole.chunk(2) if gated else (whole,)
        return torch.cat([half.chunk(count)[rank] for half in halves])
    return whole.chunk(count, dim=1)[rank]


def expert_shard(name: str, experts: torch.Tensor, group, gated: bool = True) -> torch.Tensor:
    """This rank's shard of the experts' `name` ("w13", "b13", "w2" or "b2"; `experts [E_l, ...]`
    whole) when their F columns are split over `group` (b2 is whole on every rank)."""
    if name == "b2":
        return experts
    fc = "fc2" if name == "w2" else "fc1"
    return torch.stack([shard_of(fc, e, group, gated) for e in experts])


@triton.jit
def _tanh_kernel(y_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, kernel_tanh(tl.load(y_ptr + offsets)))


def assert_kernel_tanh_is_tanh(device, rtol: float) -> None:
    """The expert kernels' tanh (moeblaze.kernels.activation.tanh) on `device` within `rtol` of
    float64 tanh at every float32 from 1e-37 to 30 (and around 1/4, where its two forms meet),
    exact at 0, +-inf and NaN."""
    steps = torch.logspace(-37, 1.5, 1000, dtype=torch.float64)  # normal floats only
    near = torch.linspace(0.2, 0.3, 24, dtype=torch.float64)
    y = torch.cat([steps, -steps, near, -near]).float().to(device)  # 2048 values
    out = torch.full_like(y, math.nan)
    _tanh_kernel[(1,)](y, out, N=y.numel(), **COMPILE_OPTIONS)  # as the kernels build
    expected = torch.tanh(y.double())
    error = ((out.double() - expected).abs() / expected.abs()).max().item()
    assert error <= rtol, f"the kernels' tanh is {error:.3g} off (relative), more than {rtol}"
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, 1.0, 1.0], device=device)
    out = torch.full_like(special, math.nan)
    _tanh_kernel[(1,)](special, out, N=8, **COMPILE_OPTIONS)
    assert out[:4].tolist() == [0.0, 0.0, 1.0, -1.0] and out[4].isnan()


@triton.jit
def _h_lines_kernel(
    h,
    out_ptr,
    row0,
    rows_end,
    col0,
    F,
    stride_h,
    BLOCK_M: tl.constexpr,
    WIDTH: tl.constexpr,
    GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    LINES: tl.constexpr,
):
    rows = row0 + tl.arange(0, BLOCK_M)
    lines = _h_lines(h, rows, rows < rows_end, row0, col0, F, stride_h, WIDTH, GATED, INTERLEAVED)
    tl.static_assert(lines.shape[1] == LINES)
    out = out_ptr + tl.arange(0, BLOCK_M)[:, None] * LINES + tl.arange(0, LINES)[None, :]
    tl.store(out, tl.load(lines))


def assert_h_lines_are_the_epilogues(device, dtype: torch.dtype) -> None:
    """grad_act's prefetch of h (`_h_lines`) asks, for each kind of activation, for exactly the
    128-byte lines of h that the epilogue of a tile reads: a tile whose rows run past its expert
    and whose columns run past F, h of integer `dtype` (int16: lines of 64 elements as bf16's,
    int32: 32 as fp32's) holding each element's own index, read back through the pointers."""
    # F and the rows of h are whole lines (as at the bench shapes): the up half starts on one.
    S, F, width, block_m, row0, rows_end = 40, 192, 128, 16, 8, 20
    line = 128 // torch.empty((), dtype=dtype).element_size()
    for gated, interleaved in ((True, False), (True, True), (False, False)):
        h_cols = 2 * F if gated else F
        h = torch.arange(S * h_cols, dtype=dtype, device=device).view(S, h_cols)
        for col0 in (0, width):  # the second tile: columns 128 .. 255, 64 of them past F
            if gated and not interleaved:
                read = list(range(col0, min(col0 + width, F)))
                read += [F + c for c in read]
            elif gated:
                read = list(range(2 * col0, min(2 * col0 + 2 * width, 2 * F)))
            else:
                read = list(range(col0, min(col0 + width, F)))
            wanted = {(r * h_cols + c) // line for r in range(row0, rows_end) for c in read}
            halves = 2 if gated and not interleaved else 1  # gate and up apart
            lines = halves * math.ceil((2 if interleaved else 1) * width / line)
            out = torch.full((block_m, lines), -1, dtype=dtype, device=device)
            _h_lines_kernel[(1,)](
                h, out, row0, rows_end, col0, F, h.stride(0),
                BLOCK_M=block_m, WIDTH=width, GATED=gated, INTERLEAVED=interleaved, LINES=lines,
            )  # fmt: skip
            asked = {int(i) // line for i in out.flatten().tolist()}
            where = f"gated={gated}, interleaved={interleaved}, col0={col0}, {dtype}"
            assert asked == wanted, f"{where}: asked for {sorted(asked)}, read {sorted(wanted)}"
