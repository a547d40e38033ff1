"""moe_mlp tests: forward and every gradient against the float64 reference, on the Triton kernels
(CPU interpreter) and on the torch stages; recompute policies, determinism, bytes kept for
backward, allocations, torch.compile, profiler ranges, bad input.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots
"""

import dataclasses
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moeblaze_testing import (
    BF16_FACTOR,
    BF16_FACTOR_INTERPRETER,
    NAMES,
    RTOL_FP32,
    SMALL,
    assert_dropped_slots_add_nothing,
    assert_empty_experts_get_zero_grads,
    assert_h_lines_are_the_epilogues,
    assert_matches_reference,
)
from overlap_testing import gloo_rank
from tolerance import assert_bf16_close, assert_close

import moeblaze
from kernelbase import alloc
from kernelbase.backend import backend_for
from kernelbase.gemm import GemmConfig
from moeblaze.activation import SWIGLU, SwiGLU, Ungated
from moeblaze.kernels.expert_mlp import _INTERPRETER, TRITON_STAGES, TritonStages
from moeblaze.ops import STAGES, Saved
from moeblaze.reference import TORCH_STAGES
from moeblaze.routing_plan import build_routing_plan, plan_numel

POLICIES = moeblaze.RECOMPUTE_POLICIES
# grad_act reading h through a tensor descriptor (GemmConfig.epilogue_tma), a tuning candidate.
TRITON_STAGES_H_TMA = TritonStages(
    {("grad_act", _INTERPRETER.block_m): dataclasses.replace(_INTERPRETER, epilogue_tma=True)}
)
# (T, d, F, E, k, routing). d, F and T are not multiples of any block (16 / 32 under the
# interpreter) where it matters.
SHAPES = {
    "odd": (37, 48, 40, 6, 2, "random"),
    "k1": (29, 40, 24, 5, 1, "random"),
    "T0": (0, 16, 8, 4, 2, "random"),
    "T1": (1, 16, 8, 4, 2, "random"),
    "k=E": (12, 16, 24, 4, 4, "random"),
    "E1": (20, 16, 24, 1, 1, "random"),
    "E256": (8, 8, 8, 256, 2, "random"),  # 16 slots: at least 240 experts get no token
    "one_expert_k1": (40, 24, 16, 5, 1, "one_expert"),
    "one_expert_k3": (20, 24, 16, 5, 3, "one_expert"),
    "empty_experts": (33, 24, 16, 8, 2, "skip_experts"),
    # Rows of w2, a and dh that the copy engine cannot read (84 and 168 bytes): pointer loads
    # of those beside tensor descriptors of w13.
    "unaligned": (19, 36, 21, 4, 2, "random"),
    # h's rows can be described (48 bytes) but its up half starts 24 bytes in: h by pointers
    # even where grad_act's config asks for a descriptor (GemmConfig.epilogue_tma).
    "F6": (13, 16, 6, 3, 2, "random"),
    # A third of the slots dropped (id -1), all of token 0's: no expert, no output, no gradient.
    "dropped": (37, 48, 40, 6, 2, "dropped"),
    "dropped_k1": (29, 40, 24, 5, 1, "dropped"),
}
# GPT-OSS's SwiGLU with a limit that clamps a good part of the N(0, 1) pre-activations.
GPT_OSS_SMALL = SwiGLU(alpha=1.702, limit=0.7, up_offset=1.0)
SMALL_K1 = (21, 40, 24, 5, 1)


def test_outputs_are_poisoned():
    # The autouse `poison` fixture: a fresh launcher output is NaN until a kernel writes it.
    assert alloc.poison
    assert torch.isnan(alloc.empty(3, 5, dtype=torch.float32, device="cpu")).all()
    assert (alloc.empty(4, dtype=torch.int32, device="cpu") == -(2**30)).all()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, path, make_problem):
    T, d, F, E, k, routing = shape
    problem = make_problem(T, d, F, E, k, seed=1, routing=routing)
    actual = problem.run()
    expected = problem.reference()
    assert actual[0].dtype == torch.float32 and actual[0].shape == (T, d)
    assert_matches_reference(actual, expected)
    empty = assert_empty_experts_get_zero_grads(problem, actual[3], actual[4])
    if routing in ("one_expert", "skip_experts") or E == 256:
        assert empty > 0, "the case is meant to leave experts without tokens"
    if routing == "dropped":
        assert_dropped_slots_add_nothing(problem, actual)


@pytest.mark.parametrize("biases", [False, True], ids=["plain", "biases"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("k", [2, 1])
def test_dropped_slots(k, policy, deterministic, biases, path, make_problem):
    problem = make_problem(23, 40, 24, 5, k, seed=4, routing="dropped", biases=biases)
    actual = problem.run(recompute=policy, deterministic=deterministic)
    assert_matches_reference(actual, problem.reference())
    assert_dropped_slots_add_nothing(problem, actual)


@pytest.mark.parametrize("name", ["odd", "k1", "empty_experts"])
@pytest.mark.parametrize("where", ["everywhere", "per-kernel"])
def test_pointer_loads(name, where, make_problem, monkeypatch):
    # TritonStages(tma=False): no operand through a tensor descriptor. Per kernel
    # (GemmConfig(tma=False)): grad_act and the weight gradients by pointers, the others not.
    T, d, F, E, k, routing = SHAPES[name]
    problem = make_problem(T, d, F, E, k, seed=1, routing=routing)
    if where == "everywhere":
        monkeypatch.setattr(TRITON_STAGES, "tma", False)
    else:
        pointers = dataclasses.replace(_INTERPRETER, tma=False)
        configs = {("grad_act", pointers.block_m): pointers, ("expert_wgrad", None): pointers}
        monkeypatch.setattr(TRITON_STAGES, "configs", configs)
    assert_matches_reference(problem.run(), problem.reference())


def test_which_operands_are_read_through_tensor_descriptors():
    config = GemmConfig(16, 32, 32)
    w13 = torch.randn(4, 42, 36)  # 144-byte rows: described
    w2 = torch.randn(4, 36, 21)  # 84-byte rows: pointer loads
    assert TRITON_STAGES._weights(w13.mT, config)[2] == dict(B_TMA=True, B_KN=False)
    assert TRITON_STAGES._weights(w13, config)[2] == dict(B_TMA=True, B_KN=True)
    assert TRITON_STAGES._weights(w2, config)[2] == dict(B_TMA=False, B_KN=True)
    assert TritonStages(tma=False)._weights(w13, config)[2]["B_TMA"] is False
    pointers = dataclasses.replace(config, tma=False)  # one kernel's choice
    assert TRITON_STAGES._weights(w13, pointers)[2]["B_TMA"] is False
    assert TRITON_STAGES._descriptor(w13[0], config, (16, 32)) is not None
    assert TRITON_STAGES._descriptor(w13[0], pointers, (16, 32)) is None


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_weight_gradients_read_no_other_experts_rows(tma, monkeypatch):
    # Expert 0 holds 44 sorted positions (one whole step of the interpreter's 32, then 12),
    # expert 1 the 6 after them, filled with NaN in dh and a: expert 0's weight gradients must
    # not see them, whether the sorted rows come through descriptors (tma) or pointers.
    monkeypatch.setattr(TRITON_STAGES, "tma", tma)
    T, d, F = 50, 24, 16
    topk_ids = torch.cat([torch.zeros(44, 1), torch.ones(6, 1)]).long()[torch.randperm(T)]
    plan = build_routing_plan(topk_ids, 2, block_m=TRITON_STAGES.block_m(T, 2))
    x, dout = torch.randn(T, d), torch.randn(T, d)
    dh, a = torch.randn(T, 2 * F), torch.randn(T, F)
    dh[44:], a[44:] = float("nan"), float("nan")
    tokens = plan.sorted_slots[:44].long()  # k = 1: slot = token
    dw13 = TRITON_STAGES.grad_w13(dh, x, plan)
    dw2 = TRITON_STAGES.grad_w2(dout, a, plan)
    assert_close(dw13[0], dh[:44].double().T @ x[tokens].double(), rtol=RTOL_FP32, name="dw13")
    assert_close(dw2[0], dout[tokens].double().T @ a[:44].double(), rtol=RTOL_FP32, name="dw2")


# Writing dh over h, the lanes a program masks may read another tile's dh (larger than h here)
# as a pre-activation: the interpreter's numpy warns when their sigmoid overflows.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", [SWIGLU, GPT_OSS_SMALL], ids=["swiglu", "gpt-oss"])
@pytest.mark.parametrize("overwrite_h", [False, True], ids=["dh-new", "dh-over-h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "stages",
    [TRITON_STAGES, TRITON_STAGES_H_TMA, TORCH_STAGES],
    ids=["kernels", "kernels-h-tma", "torch"],
)
def test_weighted_activation_is_the_same_in_forward_and_backward(
    stages, dtype, overwrite_h, activation
):
    # a = w * SwiGLU(h), rounded once: gate_up (forward) and grad_act (backward, recomputing it
    # from h, read by pointers or through a tensor descriptor) give the same bits, and it is
    # what the reference computes; also when grad_act writes dh over h (recompute="up_proj"),
    # and then dh is the same as in a new tensor.
    T, d, F, E, k = 21, 40, 24, 5, 2
    x, dout = torch.randn(T, d, dtype=dtype), torch.randn(T, d, dtype=dtype)
    w13, w2 = torch.randn(E, 2 * F, d, dtype=dtype), torch.randn(E, d, F, dtype=dtype)
    topk_ids = torch.randint(0, E, (T, k))
    topk_weights = torch.rand(T, k)
    plan = build_routing_plan(topk_ids, E, block_m=stages.block_m(T * k, E))
    swiglu = dict(activation=activation)
    h, a = stages.gate_up(x, w13, topk_weights, plan, store_h=True, store_a=True, **swiglu)
    h_read = h.clone()
    dh, _, a_again = stages.grad_act(
        dout, w2, h, topk_weights, plan, store_a=True, overwrite_h=overwrite_h, **swiglu
    )
    assert torch.equal(a_again, a)
    assert (dh.data_ptr() == h.data_ptr()) == overwrite_h
    if overwrite_h:
        dh_new, _, _ = stages.grad_act(
            dout, w2, h_read, topk_weights, plan, store_a=False, **swiglu
        )
        assert torch.equal(dh, dh_new)
    slots = plan.sorted_slots.long()
    gate, up = h_read.double().chunk(2, dim=1)
    expected = activation.forward(gate, up) * topk_weights.reshape(-1)[slots, None]
    # bf16: one rounding (by truncation under the interpreter: up to 2**-8 relative).
    assert_close(a, expected, rtol=RTOL_FP32 if dtype == torch.float32 else 2**-7, name="a")


@pytest.mark.parametrize(
    "block_n, epilogue_n, tma",
    [
        (16, None, True),
        (32, None, False),
        (64, None, True),
        (128, None, True),
        (128, None, False),
        (64, 32, True),
        (64, 64, False),
    ],
    ids=[
        "split1-tma",
        "split2-ptr",
        "split4-tma",
        "split8-tma",
        "split8-ptr",
        "epilogue32-split2-tma",
        "epilogue64-split1-ptr",
    ],
)
@pytest.mark.parametrize("policy", POLICIES)
def test_grad_act_epilogue_splits(block_n, epilogue_n, tma, policy, make_problem, monkeypatch):
    # grad_act's epilogue runs on 1, 2, 4 or 8 column slices of its tile (EPILOGUE_SPLIT: 16
    # columns each, or GemmConfig.epilogue_n), with h (and w2) read through a tensor descriptor
    # (tma: GemmConfig.epilogue_tma) or by pointers; F = 40 leaves the last tile's
    # slices partly or wholly past F. "none" keeps a: no a is stored. "up_proj" writes dh over
    # h: descriptor blocks past F or past an expert read elements other programs may have
    # overwritten already, in lanes the epilogue masks.
    problem = make_problem(21, 24, 40, 5, 2, seed=16)
    block_m = TRITON_STAGES.block_m(42, 5)
    config = GemmConfig(block_m, block_n, 32, group_m=4, epilogue_n=epilogue_n, epilogue_tma=tma)
    monkeypatch.setattr(TRITON_STAGES, "configs", {("grad_act", block_m): config})
    monkeypatch.setattr(TRITON_STAGES, "tma", tma)
    assert_matches_reference(problem.run(recompute=policy), problem.reference())


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_grad_act_prefetches_the_lines_its_epilogue_reads(dtype):
    # Compiled, grad_act asks L2 for these lines before its main loop (GemmConfig.
    # epilogue_prefetch); the interpreter has no prefetch, so the pointers are checked here.
    assert_h_lines_are_the_epilogues("cpu", dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("shape", [SMALL, SMALL_K1], ids=["k2", "k1"])
def test_policies_and_modes(shape, policy, deterministic, path, make_problem):
    problem = make_problem(*shape, seed=2)
    actual = problem.run(recompute=policy, deterministic=deterministic)
    assert_matches_reference(actual, problem.reference())


def test_T0_output_and_grads(path, make_problem):
    # The reference cannot backprop through its empty loop: compare with zeros directly.
    problem = make_problem(0, 16, 8, 4, 2)
    out, dx, dweights, dw13, dw2 = problem.run()
    assert out.shape == (0, 16) and dx.shape == (0, 16) and dweights.shape == (0, 2)
    assert torch.equal(dw13, torch.zeros(4, 16, 16)) and torch.equal(dw2, torch.zeros(4, 16, 8))


@pytest.mark.parametrize("shape", [(21, 40, 24, 5, 2), (16, 32, 48, 4, 1)], ids=["k2", "k1"])
def test_bfloat16(shape, path, make_problem):
    problem = make_problem(*shape, dtype=torch.bfloat16, seed=3)
    actual = problem.run()
    expected = problem.reference()
    baseline = problem.torch_bf16()
    factor = BF16_FACTOR_INTERPRETER if path == "kernels" else BF16_FACTOR
    for name, a, e, b in zip(NAMES, actual, expected, baseline, strict=True):
        assert a.dtype == b.dtype, name  # bf16 tensors, float32 dtopk_weights
        assert_bf16_close(a, e, b, factor=factor, name=name)


def test_float16(path, make_problem):
    # fp16 has 3 more mantissa bits than bf16 and these values stay far from its range limits.
    problem = make_problem(*SMALL, dtype=torch.float16, seed=4)
    assert_matches_reference(problem.run(), problem.reference(), rtol=5e-3)


def test_topk_weights_dtype_is_kept(path, make_problem):
    # Routing weights may have any float dtype; their gradient comes back in that dtype.
    problem = make_problem(*SMALL, seed=5)
    actual = problem.run(weights_dtype=torch.float64)
    assert actual[2].dtype == torch.float64
    assert_matches_reference(actual, problem.reference())


def test_non_contiguous_inputs(path, make_problem):
    problem = make_problem(*SMALL, seed=6)
    x, weights, w13, w2 = problem.leaves()
    leaves = [
        x.detach().t().contiguous().t().requires_grad_(),  # [T, d], strides (1, T)
        weights.detach().t().contiguous().t().requires_grad_(),
        w13.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(),
        w2.detach().permute(2, 0, 1).contiguous().permute(1, 2, 0).requires_grad_(),
    ]
    assert not any(t.is_contiguous() for t in leaves)
    out = moeblaze.moe_mlp(leaves[0], problem.topk_ids, *leaves[1:])
    out.backward(problem.dout)
    actual = [out.detach(), *(t.grad for t in leaves)]
    assert_matches_reference(actual, problem.reference())


def test_non_contiguous_topk_ids(path, make_problem):
    # topk_ids[:, ::2] can be flattened to a *strided* view (stride 2) without a copy.
    problem = make_problem(21, 40, 24, 6, 4, seed=7)
    wide = problem.topk_ids
    ids = wide[:, ::2]  # [T, 2], distinct per token, strides (4, 2)
    assert not ids.is_contiguous()
    weights = problem.topk_weights[:, ::2].contiguous()
    sliced = dataclasses.replace(problem, topk_ids=ids, topk_weights=weights)
    contiguous = dataclasses.replace(sliced, topk_ids=ids.contiguous())
    assert_matches_reference(sliced.run(), contiguous.reference())


@pytest.mark.parametrize("k", [1, 3])
def test_deterministic_is_bitwise_reproducible(k, path, make_problem):
    problem = make_problem(23, 40, 24, 5, k, seed=8)
    first = problem.run(deterministic=True)
    second = problem.run(deterministic=True)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


def test_policies_agree(path, make_problem):
    problem = make_problem(*SMALL, seed=9)
    results = {policy: problem.run(recompute=policy) for policy in POLICIES}
    base = results["activation"]
    for policy in ("up_proj", "none"):
        # The forward is the same computation whatever backward keeps: bitwise equal.
        assert torch.equal(results[policy][0], base[0]), policy
        # Backward recomputes from the same rounded values: equal within fp32 rounding.
        assert_matches_reference(results[policy], base, rtol=1e-6, what=f"{policy} vs activation: ")


# --- what backward keeps, and what forward/backward allocate -----------------------------------


def _saved(fn, args, recompute, exclude):
    """fn(*args, recompute=recompute) -> (bytes of the distinct storages saved for backward,
    minus those of `exclude`; the saved tensors)."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, recompute=recompute)
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}
    for t in packed:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bytes_kept_for_backward(dtype, make_problem):
    T, d, F, E, k = 20, 24, 8, 4, 3  # S*d = 1440 matches no other tensor's size
    S = T * k
    problem = make_problem(T, d, F, E, k, dtype=dtype, seed=10)
    elsize = problem.x.element_size()
    policy_bytes = {"activation": S * 2 * F * elsize, "none": S * 3 * F * elsize, "up_proj": 0}
    kept = {}
    for path in ("kernels", "torch"):
        with moeblaze.use_backend("torch" if path == "torch" else None):
            block_m = STAGES[backend_for(problem.x.device)].block_m(S, E)
            plan_bytes = plan_numel(S, E, block_m) * 4
            for policy in POLICIES:
                x, weights, w13, w2 = problem.leaves()
                args = (x, problem.topk_ids, weights, w13, w2)
                nbytes, packed = _saved(moeblaze.moe_mlp, args, policy, exclude=(x, w13, w2))
                expected = plan_bytes + weights.nbytes + policy_bytes[policy]
                assert nbytes == expected, f"{path} {policy}: kept {nbytes}, expected {expected}"
                for t in packed:
                    assert t.numel() != S * d, f"{path} {policy}: saved a [S, d] tensor {t.shape}"
                kept[path, policy] = nbytes - plan_bytes
    # The plans differ in size (block_m is 16 under the interpreter, 64 on the torch path);
    # everything else kept must be the same whichever stages run.
    for policy in POLICIES:
        assert kept["kernels", policy] == kept["torch", policy], policy


@pytest.mark.parametrize("policy", ["activation", "none"])
def test_backward_frees_h_and_a_after_their_last_reader(policy, path, make_problem, monkeypatch):
    # Autograd holds what forward kept until the whole backward has run, unless the backward
    # drops it: h [S, 2F] must be gone before grad_w2 and a [S, F] before grad_input, which
    # lowers peak memory by their size (mixtral shape on an H100: 1792 MiB of h at the peak).
    T, d, F, E, k = 20, 24, 8, 4, 2
    S = T * k
    problem = make_problem(T, d, F, E, k, seed=12)
    stages = STAGES[backend_for(problem.x.device)]
    alive = {}  # name -> weakref of a storage; a storage dies with its last tensor

    def pack(t):
        name = {(S, 2 * F): "h", (S, F): "a"}.get(tuple(t.shape))
        if name:
            alive[name] = weakref.ref(t.untyped_storage())
        return t

    def spy(stage, check):
        real = getattr(stages, stage)

        def run(*args, **kwargs):
            gc.collect()
            check()
            result = real(*args, **kwargs)
            if stage == "grad_act" and result[2] is not None:
                alive["a"] = weakref.ref(result[2].untyped_storage())
            return result

        monkeypatch.setattr(stages, stage, run)

    live = []
    for stage in ("grad_act", "grad_w2", "grad_input"):
        spy(stage, lambda stage=stage: live.append((stage, {n for n, r in alive.items() if r()})))
    x, weights, w13, w2 = problem.leaves()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = moeblaze.moe_mlp(x, problem.topk_ids, weights, w13, w2, recompute=policy)
    kept = {"h", "a"} if policy == "none" else {"h"}
    out.backward(problem.dout, retain_graph=True)  # the graph keeps what forward kept
    assert live == [("grad_act", kept), ("grad_w2", kept | {"a"}), ("grad_input", kept)], live
    first = [t.grad.clone() for t in (x, weights, w13, w2)]
    for t in (x, weights, w13, w2):
        t.grad = None
    live.clear()
    out.backward(problem.dout)  # the last backward: each dies after its last reader
    assert live == [("grad_act", kept), ("grad_w2", {"a"}), ("grad_input", set())], live
    grads = (x.grad, weights.grad, w13.grad, w2.grad)
    for name, a, b in zip(NAMES[1:], first, grads, strict=True):
        assert torch.equal(a, b), name


def _largest_allocation(fn):
    """Largest single CPU allocation (bytes) made while `fn` runs, from the memory profiler."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


def test_no_slots_by_hidden_allocation_in_default_mode(make_problem):
    # "Forward and backward should not even allocate a [T*k, d] tensor in the default mode."
    T, d, F, E, k = 24, 64, 8, 4, 4  # S*d*4 = 24576 B, more than any legitimate buffer here
    S = T * k
    problem = make_problem(T, d, F, E, k, seed=11)
    largest = _largest_allocation(lambda: problem.run())
    assert 0 < largest < S * d * 4, f"largest allocation {largest} B, [S, d] fp32 = {S * d * 4} B"
    # The check sees such a buffer: deterministic mode documents a transient fp32 [S, d].
    largest = _largest_allocation(lambda: problem.run(deterministic=True))
    assert largest >= S * d * 4


@pytest.mark.parametrize("policy", POLICIES)
def test_what_backward_allocates(policy, path, make_problem, monkeypatch):
    # h and a are outputs of the forward op only so that backward gets them back. Nothing flows
    # into them, so backward must not allocate zero "gradients" of [S, 2F] / [S, F] for them.
    # And backward allocates one [S, 2F] tensor: dh ("activation" and "none" read the h forward
    # kept), or the recomputed h that dh is then written over ("up_proj"), so up_proj's
    # backward peak is h's size below that of a separate dh (1792 MiB for the mixtral shape at
    # T=16384).
    T, d, F, E, k = 20, 24, 8, 4, 2
    S = T * k
    problem = make_problem(T, d, F, E, k, seed=12)
    x, weights, w13, w2 = problem.leaves()
    out = moeblaze.moe_mlp(x, problem.topk_ids, weights, w13, w2, recompute=policy)
    zeros, allocated = [], []
    real_empty = alloc.empty

    def empty(*shape, **kwargs):
        allocated.append(shape)
        return real_empty(*shape, **kwargs)

    zero_ops = (torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros)

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func.overloadpacket in zero_ops:
                zeros.append(tuple(result.shape))
            return result

    monkeypatch.setattr(alloc, "empty", empty)
    with Record():
        out.backward(problem.dout)
    wasted = [shape for shape in zeros if shape in ((S, 2 * F), (S, F))]
    assert not wasted, f"backward allocated zero gradients of shapes {wasted} for h / a"
    assert allocated.count((S, 2 * F)) == 1, allocated


# --- torch.library, torch.compile, profiler --------------------------------------------------


def test_opcheck(make_problem):
    problem = make_problem(12, 16, 8, 4, 2, seed=13, biases=True)
    ungated = make_problem(12, 16, 8, 4, 2, seed=13, biases=True, gated=False)
    backend = backend_for(problem.x.device).value
    plan_args = (problem.topk_ids, 4, 16, backend, None)
    torch.library.opcheck(torch.ops.moeblaze.routing_plan.default, plan_args)
    plan = torch.ops.moeblaze.routing_plan(*plan_args)
    # Each policy with another activation (the limit is a float or None in the ops' schemas;
    # an ungated one makes h F wide) and other biases (each optional).
    cases = (
        (SwiGLU(), problem),
        (SwiGLU(limit=0.5), problem),
        (SwiGLU(alpha=1.702, limit=0.7, up_offset=1.0, interleaved=True), problem),
        (Ungated("relu2"), ungated),
    )
    for i, (policy, (activation, problem)) in enumerate(
        zip((*POLICIES, "up_proj"), cases, strict=True)
    ):
        x, weights, w13, w2, b13, b2 = problem.leaves()
        b13, b2 = (b13, None, b13, b13)[i], (None, b2, b2, None)[i]
        saved = Saved.of(policy, backward=True)
        swiglu = activation.constants
        options = (16, saved.h, saved.a, False, backend, *swiglu)
        args = (x, weights, w13, w2, b13, b2, plan, *options)
        torch.library.opcheck(torch.ops.moeblaze.moe_mlp_forward.default, args)
        _, h, a = torch.ops.moeblaze.moe_mlp_forward(*args)
        # The backward ops have no derivatives of their own (once_differentiable).
        x, weights, w13, w2 = (t.detach() for t in (x, weights, w13, w2))
        b13, b2 = (None if t is None else t.detach() for t in (b13, b2))
        dout = problem.dout
        options = (16, saved.h, saved.a, backend, *swiglu)
        args = (dout, x, weights, w13, w2, b13, b2, plan, h, *options)
        torch.library.opcheck(torch.ops.moeblaze.moe_mlp_grad_act.default, args)
        dh, _, a_computed, _ = torch.ops.moeblaze.moe_mlp_grad_act(*args)
        a = a if saved.a else a_computed
        args = (dout, a, weights, w2, plan, 16, backend)
        torch.library.opcheck(torch.ops.moeblaze.moe_mlp_grad_w2.default, args)
        args = (dh, x, weights, w13, plan, 16, False, backend, b13 is not None)
        torch.library.opcheck(torch.ops.moeblaze.moe_mlp_grad_input.default, args)


def _layer_step(layer, x, **forward_options):
    """Forward + backward of `layer`; returns [out, x.grad, *parameter grads] and clears them."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x, **forward_options)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    results = [out.detach(), x.grad, *(p.grad for p in layer.parameters())]
    layer.zero_grad(set_to_none=True)
    return results


# GPT-OSS's layer: biases everywhere (router, experts, shared expert), gate/up interleaved.
GPT_OSS_LAYER = dict(
    bias=True, activation=SwiGLU(alpha=1.702, limit=0.7, up_offset=1.0, interleaved=True)
)


def _compiled_matches_eager(backend, recompute="activation", options=None, forward_options=None):
    torch.manual_seed(14)
    layer = moeblaze.MoELayer(
        24, 16, 6, 2, recompute=recompute, shared_expert_size=8, **(options or {})
    ).train()
    x = torch.randn(2, 9, 24)
    forward_options = forward_options or {}
    before = {name: b.clone() for name, b in layer.named_buffers()}
    eager = _layer_step(layer, x, **forward_options)
    after_eager = {name: b.clone() for name, b in layer.named_buffers()}
    with torch.no_grad():  # the compiled step starts from the same router counts and trackers
        for name, b in layer.named_buffers():
            b.copy_(before[name])
    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, fullgraph=True, backend=backend)
    compiled = _layer_step(compiled_layer, x, **forward_options)
    names = ["out", "dx", *(n for n, _ in layer.named_parameters())]
    for name, a, e in zip(names, compiled, eager, strict=True):
        assert_close(a, e, rtol=1e-6, name=f"{backend}: {name}")
    # and adds to them what the eager step adds, once.
    for name, b in layer.named_buffers():
        torch.testing.assert_close(b, after_eager[name], msg=f"{backend}: {name}")


# Every router loss, over the real tokens of a padded batch.
LOSSES = dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.2, z_loss_coeff=0.01)
PADDED = dict(token_mask=torch.arange(18).view(2, 9) % 9 < torch.tensor([[7], [4]]))
# Token dropping: each expert keeps 3 of the 18 tokens' 36 slots (6 on average).
CAPACITY = dict(capacity_factor=0.5, aux_loss_coeff=0.1)
# DeepSeek-V3's routing, and the global-batch loss: buffers a training forward adds to.
DEEPSEEK_V3 = dict(
    score_func="sigmoid",
    expert_bias=True,
    num_groups=3,
    topk_groups=2,
    aux_counts="scores",
    global_aux_loss_coeff=0.1,
)
QUANTILE = dict(quantile_balancing=True)


@pytest.mark.parametrize(
    ("recompute", "options", "forward_options"),
    [
        ("activation", None, None),
        ("up_proj", None, None),
        ("activation", GPT_OSS_LAYER, None),
        ("activation", LOSSES, PADDED),
        ("up_proj", CAPACITY, PADDED),
        ("activation", DEEPSEEK_V3, PADDED),
        ("up_proj", QUANTILE, None),
    ],
    ids=[
        "activation",
        "up_proj",
        "activation-gpt_oss",
        "activation-losses-padded",
        "up_proj-capacity-padded",
        "activation-deepseek_v3-padded",
        "up_proj-quantile",
    ],
)
def test_compile_aot_eager(recompute, options, forward_options):
    _compiled_matches_eager("aot_eager", recompute, options, forward_options)


def _compile_with_loss_group_worker(rank, init_method):
    with gloo_rank(rank, 2, init_method, timeout_s=60):
        torch.set_num_threads(1)
        torch._dynamo.reset()
        options = dict(LOSSES, **CAPACITY, loss_group=dist.group.WORLD)
        _compiled_matches_eager("aot_eager", "activation", options, PADDED)


def test_compile_with_a_loss_group_over_gloo(tmp_path):
    """The router's losses all-reduce their counts over `loss_group` inside the compiled graph
    (fullgraph: no break at the collective), with token dropping; compiled matches eager on
    each of 2 gloo ranks."""
    init_method = f"file://{tmp_path / 'store'}"
    mp.start_processes(
        _compile_with_loss_group_worker, args=(init_method,), nprocs=2, start_method="fork"
    )


def test_compile_dynamic_shapes_one_graph():
    """Batches of other lengths reuse the graph: with dynamic=True the compiled layer (fullgraph)
    serves several batch and sequence sizes, below and above the first, from one graph, and
    matches eager at each. (A size of 1 would compile another: torch specialises 0 and 1.)"""
    torch.manual_seed(16)
    layer = moeblaze.MoELayer(24, 16, 6, 2, shared_expert_size=8).eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((2, 9), (3, 5), (2, 13), (4, 3)):
        x = torch.randn(*shape, 24)
        names = ["out", "dx", *(n for n, _ in layer.named_parameters())]
        for name, a, e in zip(names, _layer_step(compiled, x), _layer_step(layer, x), strict=True):
            assert_close(a, e, rtol=1e-6, name=f"{shape}: {name}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_compile_inductor():
    _compiled_matches_eager("inductor")


def test_profiler_ranges():
    torch.manual_seed(15)
    layer = moeblaze.MoELayer(24, 16, 4, 2)
    x = torch.randn(10, 24, requires_grad=True)
    with torch.profiler.profile() as prof:
        layer(x).sum().backward()
    names = {e.name for e in prof.events()}
    expected = {
        "moeblaze.router",
        "moeblaze.routing_plan",
        "moeblaze.moe_mlp.forward",
        "moeblaze.gate_up",
        "moeblaze.down_combine",
        "moeblaze.moe_mlp.backward",
        "moeblaze.grad_act",
        "moeblaze.grad_w2",
        "moeblaze.grad_input",
        "moeblaze.grad_w13",
    }
    assert expected <= names, f"missing ranges: {sorted(expected - names)}"


def test_profiler_ranges_up_proj_recompute():
    layer = moeblaze.MoELayer(16, 8, 4, 2, recompute="up_proj")
    x = torch.randn(6, 16)
    with torch.profiler.profile() as prof:
        layer(x).sum().backward()
    backward = [e for e in prof.events() if e.name == "moeblaze.moe_mlp.backward"]
    gate_up = [e for e in prof.events() if e.name == "moeblaze.gate_up"]
    assert len(backward) == 1 and len(gate_up) == 2  # forward, and the recompute in backward
    assert any(
        backward[0].time_range.start <= g.time_range.start <= backward[0].time_range.end
        for g in gate_up
    )


# --- bad input --------------------------------------------------------------------------------


def _bad_cases():
    """(id, mutate(dict of moe_mlp arguments), error, match)."""

    def with_(**changes):
        return lambda a: {**a, **{k: v(a) for k, v in changes.items()}}

    return [
        ("x_1d", with_(x=lambda a: a["x"][0]), ValueError, r"x must be 2-D \[T, d\]"),
        ("x_3d", with_(x=lambda a: a["x"][None]), ValueError, r"x must be 2-D \[T, d\]"),
        (
            "x_int",
            with_(x=lambda a: a["x"].int()),
            TypeError,
            "x must be float16, bfloat16 or float32",
        ),
        (
            "x_fp64",
            lambda a: {**a, **{n: a[n].double() for n in ("x", "w13", "w2")}},
            TypeError,
            "x must be float16, bfloat16 or float32, got torch.float64",
        ),
        ("x_list", with_(x=lambda a: a["x"].tolist()), TypeError, "x must be a torch.Tensor"),
        (
            "w13_dtype",
            with_(w13=lambda a: a["w13"].half()),
            TypeError,
            "w13 has dtype torch.float16",
        ),
        (
            "w2_dtype",
            with_(w2=lambda a: a["w2"].bfloat16()),
            TypeError,
            "w2 has dtype torch.bfloat16",
        ),
        (
            "weights_int",
            with_(topk_weights=lambda a: a["topk_weights"].long()),
            TypeError,
            "topk_weights must be floating point",
        ),
        (
            "ids_float",
            with_(topk_ids=lambda a: a["topk_ids"].float()),
            TypeError,
            "topk_ids must have an integer dtype",
        ),
        ("w13_rank", with_(w13=lambda a: a["w13"][0]), ValueError, r"w13 must be \[E, 2F, d\]"),
        (
            "w13_odd_2F",
            with_(w13=lambda a: a["w13"][:, :-1]),
            ValueError,
            r"w13 must be \[E, 2F, d\]",
        ),
        (
            "w13_d",
            with_(w13=lambda a: a["w13"][..., :-1]),
            ValueError,
            r"w13 must be \[E, 2F, d\] with d=16",
        ),
        ("w2_F", with_(w2=lambda a: a["w2"][..., :-1]), ValueError, r"w2 must be \[E, d, F\]"),
        ("w2_E", with_(w2=lambda a: a["w2"][:-1]), ValueError, r"w2 must be \[E, d, F\]"),
        (
            "ids_rows",
            with_(topk_ids=lambda a: a["topk_ids"][:-1]),
            ValueError,
            r"topk_ids has 9 rows; expected one per token of x \(10\)",
        ),
        (
            "ids_1d",
            with_(topk_ids=lambda a: a["topk_ids"][:, 0]),
            ValueError,
            r"topk_ids must be 2-D",
        ),
        (
            "weights_shape",
            with_(topk_weights=lambda a: a["topk_weights"][:, :1]),
            ValueError,
            r"topk_weights must have topk_ids' shape \(10, 2\)",
        ),
        (
            "id=E",
            with_(topk_ids=lambda a: a["topk_ids"].clone().fill_(4)),
            ValueError,
            r"topk_ids contains expert id 4 \(topk_ids\[0, 0\], the first of \d+ ids out of "
            r"range\); expected ids in \[0, num_experts=4\)",
        ),
        (
            "id=-2",
            with_(topk_ids=lambda a: torch.where(a["topk_ids"] == 0, -2, a["topk_ids"])),
            ValueError,
            r"topk_ids contains expert id -2",
        ),
        (
            "k>E",
            lambda a: {
                **a,
                "topk_ids": torch.arange(5).repeat(10, 1),
                "topk_weights": torch.rand(10, 5),
            },
            ValueError,
            r"topk_ids has k=5 columns; expected 1 <= k <= num_experts=4",
        ),
        (
            "recompute",
            lambda a: {**a, "recompute": "bogus"},
            ValueError,
            r"recompute must be one of \('activation', 'up_proj', 'none'\), got 'bogus'",
        ),
        (
            "deterministic",
            lambda a: {**a, "deterministic": "yes"},
            TypeError,
            "deterministic must be a bool, got str",
        ),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize(
    "mutate, error, match", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_input(mutate, error, match, make_problem):
    problem = make_problem(10, 16, 8, 4, 2)
    args = dict(
        x=problem.x,
        topk_ids=problem.topk_ids,
        topk_weights=problem.topk_weights,
        w13=problem.w13,
        w2=problem.w2,
    )
    args = mutate(args)
    with pytest.raises(error, match=match):
        moeblaze.moe_mlp(
            args.pop("x"),
            args.pop("topk_ids"),
            args.pop("topk_weights"),
            args.pop("w13"),
            args.pop("w2"),
            **args,
        )


@pytest.mark.parametrize("policy", moeblaze.RECOMPUTE_POLICIES)
def test_inference_allocates_no_pre_activation(policy, make_problem, monkeypatch):
    """Without autograd, forward writes only the activation: no [S, 2F] pre-activation."""
    T, d, F, E, k = 24, 32, 20, 4, 2
    problem = make_problem(T, d, F, E, k, seed=31)
    shapes = []
    real_empty = alloc.empty

    def recording_empty(*shape, dtype, device):
        shapes.append(shape)
        return real_empty(*shape, dtype=dtype, device=device)

    monkeypatch.setattr(alloc, "empty", recording_empty)
    with torch.no_grad():
        out = moeblaze.moe_mlp(
            problem.x,
            problem.topk_ids,
            problem.topk_weights,
            problem.w13,
            problem.w2,
            recompute=policy,
        )
    assert (T * k, 2 * F) not in shapes and (T * k, F) in shapes, shapes
    if policy != "up_proj":  # positive control: with autograd the policy keeps h [S, 2F]
        shapes.clear()
        leaves = problem.leaves()
        moeblaze.moe_mlp(problem.x, problem.topk_ids, *leaves[1:], recompute=policy)
        assert (T * k, 2 * F) in shapes, shapes
    expected = moeblaze.moe_mlp_reference(
        problem.x.double(),
        problem.topk_ids,
        problem.topk_weights.double(),
        problem.w13.double(),
        problem.w2.double(),
    )
    assert_close(out, expected, rtol=RTOL_FP32, name="out")


def test_torch_func_grad_matches_autograd(path, make_problem):
    problem = make_problem(13, 16, 8, 4, 2, seed=41)
    x, weights, w13, w2 = problem.leaves()

    def loss(x, weights, w13, w2):
        out = moeblaze.moe_mlp(x, problem.topk_ids, weights, w13, w2)
        return (out * problem.dout).sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2, 3))(x, weights, w13, w2)
    loss(x, weights, w13, w2).backward()
    for name, g, leaf in zip(NAMES[1:], grads, (x, weights, w13, w2), strict=True):
        assert_close(g, leaf.grad, rtol=RTOL_FP32, name=name)


def test_a_second_derivative_raises_instead_of_being_zero(path, make_problem):
    # The gradients depend on the saved inputs even where the incoming gradient is a constant
    # (out.sum()), which torch's once_differentiable alone lets through as zero second
    # derivatives; create_graph=True itself and first derivatives stay as they were.
    problem = make_problem(7, 16, 8, 4, 2, seed=43)
    x, weights, w13, w2 = problem.leaves()

    def out_of(x):
        return moeblaze.moe_mlp(x, problem.topk_ids, weights, w13, w2)

    for loss in (lambda x: out_of(x).sum(), lambda x: out_of(x).square().sum()):
        (dx,) = torch.autograd.grad(loss(x), x, create_graph=True)
        assert dx.requires_grad
        with pytest.raises(RuntimeError, match="moe_mlp is differentiable once"):
            dx.square().sum().backward()
        assert x.grad is None and w13.grad is None

    def grad_norm(x):
        return torch.func.grad(lambda x: out_of(x).sum())(x).square().sum()

    with pytest.raises(RuntimeError, match="moe_mlp is differentiable once"):
        torch.func.grad(grad_norm)(x.detach())
    (dx,) = torch.autograd.grad(out_of(x).sum(), x, create_graph=True)
    assert_close(
        dx.detach(),
        torch.func.grad(lambda x: out_of(x).sum())(x.detach()),
        rtol=RTOL_FP32,
        name="dx",
    )
