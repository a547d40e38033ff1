"""GPU tests of moeblaze (`pytest -m gpu`; skipped without CUDA by tests/conftest.py): compiled
Triton kernels in bf16 / fp16 / fp32 against the float64 reference, the CUDA routing plan, bitwise
determinism, peak memory against the dense-dispatch baseline and of recompute="up_proj", device
checks, torch.compile with inductor and CUDA-graph capture.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots
"""

import functools

import pytest
import torch
from moeblaze_testing import (
    NAMES,
    assert_dropped_slots_add_nothing,
    assert_empty_experts_get_zero_grads,
    assert_h_lines_are_the_epilogues,
    assert_kernel_tanh_is_tanh,
    check_plan,
    output_names,
)
from tolerance import assert_bf16_close, assert_close

import moeblaze
from bench.baselines import dense_dispatch_moe_mlp
from kernelbase.backend import backend_for
from moeblaze.ops import STAGES
from moeblaze.routing_plan import plan_numel

pytestmark = pytest.mark.gpu

# The kernel may be at most 2x as far from the float64 oracle as plain PyTorch in the same
# low precision (design brief; flash-attention's rule). On the GPU both round to nearest.
LOW_PRECISION_FACTOR = 2
# fp32 on the GPU: tl.dot with input_precision="ieee" (TF32 is off by default for matmuls);
# sums of up to a few hundred products, so errors stay ~1e-6, as on the CPU.
RTOL_FP32 = 1e-5

# (T, d, F, E, k, routing)
SHAPES = {
    "medium": (4096, 1024, 512, 64, 6, "random"),
    "odd": (777, 200, 120, 10, 3, "random"),  # no size a multiple of any block
    "k1": (513, 256, 96, 8, 1, "random"),
    "empty_experts": (300, 128, 64, 16, 2, "skip_experts"),
    "one_expert": (1000, 128, 64, 8, 1, "one_expert"),
    "E256": (256, 128, 64, 256, 8, "random"),
    # 392-byte rows of x and w13 (pointer loads of w13) beside 240-byte rows of w2 (TMA).
    "unaligned": (300, 196, 120, 8, 2, "random"),
    # S >= 512 E: the plan's block_m is 128 (the other shapes' is 64).
    "tall": (4096, 256, 192, 8, 2, "random"),
    # A third of the slots dropped (id -1), all of token 0's.
    "dropped": (777, 200, 120, 10, 3, "dropped"),
}


def _low_precision_baseline(problem, dtype, **kwargs):
    """Plain PyTorch in `dtype` (float32 routing weights, as the Router returns them)."""
    return problem.run(
        moeblaze.moe_mlp_reference, dtype=dtype, weights_dtype=torch.float32, **kwargs
    )


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_bf16_matches_reference(shape, make_problem):
    T, d, F, E, k, routing = shape
    problem = make_problem(
        T, d, F, E, k, dtype=torch.bfloat16, seed=1, routing=routing, device="cuda"
    )
    expected = problem.reference()
    baseline = _low_precision_baseline(problem, torch.bfloat16)
    for policy in moeblaze.RECOMPUTE_POLICIES:
        actual = problem.run(recompute=policy)
        for name, a, e, b in zip(NAMES, actual, expected, baseline, strict=True):
            assert_bf16_close(a, e, b, factor=LOW_PRECISION_FACTOR, name=f"{policy} {name}")
    assert_empty_experts_get_zero_grads(problem, actual[3], actual[4])
    if routing == "dropped":
        assert_dropped_slots_add_nothing(problem, actual)


# DeepSeek-V4's and GPT-OSS's forms, with limits that clamp part of the pre-activations (their
# std is about 1 at these shapes); GPT-OSS's as its experts are stored: gate and up
# interleaved, with biases. Gemma 4's GeGLU (moeblaze.Gated); experts without a gate
# (moeblaze.Ungated: gate_up's one product, the F-wide h and dh): NemotronH's ReLU², and
# Megatron's default GELU MLP with biases; Inkling 2's soft-capped SwiGLU, with caps that bend
# part of the pre-activations (its own are 4 and 25). (activation, biases)
ACTIVATIONS = {
    "deepseek-v4": (moeblaze.SwiGLU(limit=0.5), False),
    "gpt-oss": (moeblaze.SwiGLU(alpha=1.702, limit=0.7, up_offset=1.0, interleaved=True), True),
    "gemma4-geglu": (moeblaze.Gated("gelu_tanh"), False),
    "nemotron-relu2": (moeblaze.Ungated("relu2"), False),
    "megatron-gelu": (moeblaze.Ungated("gelu"), True),
    "inkling2-softcapped": (moeblaze.SwiGLU(gate_softcap=0.5, up_softcap=0.5), False),
}


def test_kernel_tanh_on_cuda():
    # The soft caps' tanh with the GPU's exp (an ex2 approximation): within a few float32 ulp.
    assert_kernel_tanh_is_tanh("cuda", rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_grad_act_prefetch_lines_on_cuda(dtype):
    # As in test_ops, compiled: the lines grad_act asks L2 for are those its epilogue reads.
    assert_h_lines_are_the_epilogues("cuda", dtype)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("shape", ["medium", "odd", "tall"])
def test_bf16_activations_match_reference(shape, name, make_problem):
    T, d, F, E, k, routing = SHAPES[shape]
    activation, biases = ACTIVATIONS[name]
    problem = make_problem(
        *(T, d, F, E, k),
        dtype=torch.bfloat16,
        seed=2,
        routing=routing,
        device="cuda",
        biases=biases,
        gated=activation.gated,
    )
    expected = problem.reference(activation=activation)
    baseline = _low_precision_baseline(problem, torch.bfloat16, activation=activation)
    for policy in moeblaze.RECOMPUTE_POLICIES:
        actual = problem.run(recompute=policy, activation=activation)
        names = output_names(actual)
        for what, a, e, b in zip(names, actual, expected, baseline, strict=True):
            assert_bf16_close(a, e, b, factor=LOW_PRECISION_FACTOR, name=f"{policy} {what}")


@pytest.mark.parametrize("shape", ["medium", "odd"])
def test_bf16_pointer_loads_match_reference(shape, make_problem, monkeypatch):
    # TritonStages(tma=False): the same kernels with no operand through a tensor descriptor.
    T, d, F, E, k, routing = SHAPES[shape]
    problem = make_problem(
        T, d, F, E, k, dtype=torch.bfloat16, seed=4, routing=routing, device="cuda"
    )
    monkeypatch.setattr(STAGES[backend_for(torch.device("cuda"))], "tma", False)
    expected = problem.reference()
    baseline = _low_precision_baseline(problem, torch.bfloat16)
    for policy in moeblaze.RECOMPUTE_POLICIES:  # up_proj: dh over h, read by pointers
        actual = problem.run(recompute=policy)
        for name, a, e, b in zip(NAMES, actual, expected, baseline, strict=True):
            assert_bf16_close(a, e, b, factor=LOW_PRECISION_FACTOR, name=f"{policy} {name}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape", ["odd", "k1", "dropped"])
def test_fp16_matches_reference(shape, deterministic, make_problem):
    T, d, F, E, k, routing = SHAPES[shape]
    problem = make_problem(
        T, d, F, E, k, dtype=torch.float16, seed=2, routing=routing, device="cuda"
    )
    expected = problem.reference()
    baseline = _low_precision_baseline(problem, torch.float16)
    actual = problem.run(deterministic=deterministic)
    for name, a, e, b in zip(NAMES, actual, expected, baseline, strict=True):
        assert_bf16_close(a, e, b, factor=LOW_PRECISION_FACTOR, name=name)


@pytest.mark.parametrize("policy", moeblaze.RECOMPUTE_POLICIES)
@pytest.mark.parametrize("shape", ["odd", "k1", "empty_experts", "dropped"])
def test_fp32_matches_reference(shape, policy, make_problem):
    assert not torch.backends.cuda.matmul.allow_tf32
    T, d, F, E, k, routing = SHAPES[shape]
    problem = make_problem(T, d, F, E, k, seed=3, routing=routing, device="cuda")
    actual = problem.run(recompute=policy)
    for name, a, e in zip(NAMES, actual, problem.reference(), strict=True):
        assert_close(a, e, rtol=RTOL_FP32, name=name)


def test_T0_and_T1(make_problem):
    for T in (0, 1):
        problem = make_problem(T, 64, 32, 4, 2, dtype=torch.bfloat16, seed=4, device="cuda")
        out, dx, dweights, dw13, dw2 = problem.run()
        assert out.shape == (T, 64) and dx.shape == (T, 64) and dweights.shape == (T, 2)
        if T == 0:
            assert not dw13.any() and not dw2.any()
        else:
            expected = problem.reference()
            baseline = _low_precision_baseline(problem, torch.bfloat16)
            for name, a, e, b in zip(
                NAMES, (out, dx, dweights, dw13, dw2), expected, baseline, strict=True
            ):
                assert_bf16_close(a, e, b, factor=LOW_PRECISION_FACTOR, name=name)


# (T, E, k, routing, block_m)
PLAN_CASES = {
    "large": (16384, 128, 8, "random", 128),
    "large_bm64": (16384, 128, 8, "random", 64),
    "odd": (4097, 37, 3, "random", 64),
    "one_expert": (5000, 64, 1, "one_expert", 128),
    "E1": (3000, 1, 1, "random", 64),
    "E300": (2000, 300, 4, "random", 64),
    "T0": (0, 8, 2, "random", 64),
}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_cuda_plan_equals_torch_path(case, dtype):
    T, E, k, routing, block_m = case
    g = torch.Generator().manual_seed(5)
    if routing == "one_expert":
        ids = torch.full((T, k), E - 1)
    else:
        ids = torch.randn(T, E, generator=g).topk(k, dim=-1).indices
    ids = ids.to(dtype)
    cuda_plan = moeblaze.build_routing_plan(ids.cuda(), E, block_m=block_m)
    torch_plan = moeblaze.build_routing_plan(ids, E, block_m=block_m)
    assert torch.equal(cuda_plan.buffer.cpu(), torch_plan.buffer)
    check_plan(torch_plan, ids, E, block_m)
    # The same buffer again: no atomics, no comparison sort.
    assert torch.equal(
        moeblaze.build_routing_plan(ids.cuda(), E, block_m=block_m).buffer, cuda_plan.buffer
    )


@pytest.mark.parametrize("k", [1, 6])
def test_deterministic_is_bitwise(k, make_problem):
    problem = make_problem(4096, 1024, 512, 64, k, dtype=torch.bfloat16, seed=6, device="cuda")
    first = problem.run(deterministic=True)
    second = problem.run(deterministic=True)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


def test_bytes_kept_for_backward_on_cuda(make_problem):
    # 2F != d and 3F != d: a [S, d] tensor has a size no policy's tensors have.
    T, d, F, E, k = 2048, 512, 320, 16, 4
    S = T * k
    problem = make_problem(T, d, F, E, k, dtype=torch.bfloat16, seed=7, device="cuda")
    block_m = STAGES[backend_for(problem.x.device)].block_m(S, E)
    kept_by_policy = {"activation": S * 2 * F * 2, "none": S * 3 * F * 2, "up_proj": 0}
    for policy, policy_bytes in kept_by_policy.items():
        x, weights, w13, w2 = problem.leaves()
        packed = []

        def pack(t, packed=packed):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            moeblaze.moe_mlp(x, problem.topk_ids, weights, w13, w2, recompute=policy)
        skip = {t.untyped_storage().data_ptr() for t in (x, w13, w2)}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed}
        nbytes = sum(n for ptr, n in storages.items() if ptr not in skip)
        assert nbytes == plan_numel(S, E, block_m) * 4 + weights.nbytes + policy_bytes, policy
        assert all(t.numel() != S * d for t in packed), policy


def _peak_bytes(fn, problem):
    """(peak bytes above the inputs during forward, during forward + backward) of fn.

    Inputs (x, weights, routing, dout) are allocated before the measurement. Gradients come
    from torch.autograd.grad, so no .grad accumulation copies blur the number.
    """
    x, weights, w13, w2 = leaves = problem.leaves()
    dout = problem.dout
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(x, problem.topk_ids, weights, w13, w2)
    torch.cuda.synchronize()
    forward = torch.cuda.max_memory_allocated() - base
    grads = torch.autograd.grad(out, leaves, dout)
    torch.cuda.synchronize()
    step = torch.cuda.max_memory_allocated() - base
    del out, grads
    return forward, step


def test_peak_memory(make_problem):
    T, d, F, E, k = 8192, 2048, 768, 64, 8
    S = T * k
    problem = make_problem(T, d, F, E, k, dtype=torch.bfloat16, seed=8, device="cuda")
    bf16, fp32 = 2, 4
    block_m = STAGES[backend_for(problem.x.device)].block_m(S, E)
    plan = plan_numel(S, E, block_m) * 4
    grads = sum(t.nbytes for t in (problem.x, problem.topk_weights, problem.w13, problem.w2))
    slots_by_hidden = S * d * bf16  # one [T*k, d] bf16 buffer: 256 MiB here

    forward, step = _peak_bytes(moeblaze.moe_mlp, problem)  # recompute="activation", atomics
    dense_forward, dense_step = _peak_bytes(dense_dispatch_moe_mlp, problem)

    # Floors of this design, from what must be alive at the worst moment:
    # - forward, at the combine: out [T, d] bf16 and its fp32 accumulator, h [S, 2F] (kept),
    #   a [S, F] (the down GEMM's input) and the plan;
    # - forward + backward, the larger of: at grad_act, out, the plan, h (kept), dh [S, 2F] and
    #   a [S, F]; at the end of backward, out, the plan, dh (dw13 needs it) and the four
    #   gradients, which are as large as the inputs x, topk_weights, w13 and w2. h is freed
    #   after grad_act: a backward that kept it to the end (1024 MiB here) fails. The brief's
    #   "a [T*k, d] buffer plus the inputs" is the end floor plus the buffer.
    # Allowed on top of each floor: half of one [T*k, d] bf16 buffer (128 MiB) for small
    # temporaries (dw_partial [S, F/BLOCK_N] fp32 is 1.5 MiB) and allocator rounding. So any
    # single [T*k, d] bf16 tensor alive at a peak fails the test; the dense-dispatch path
    # keeps several of them.
    forward_floor = T * d * (bf16 + fp32) + S * 2 * F * bf16 + S * F * bf16 + plan
    at_grad_act = 2 * (S * 2 * F * bf16) + S * F * bf16
    step_floor = T * d * bf16 + plan + max(at_grad_act, S * 2 * F * bf16 + grads)
    mib = 2**20
    report = (
        f"moeblaze forward {forward / mib:.0f} MiB (floor {forward_floor / mib:.0f}), "
        f"forward+backward {step / mib:.0f} MiB (floor {step_floor / mib:.0f}); dense dispatch "
        f"{dense_forward / mib:.0f} / {dense_step / mib:.0f} MiB; [S, d] bf16 = "
        f"{slots_by_hidden / mib:.0f} MiB"
    )
    assert forward < forward_floor + slots_by_hidden // 2, report
    assert step < step_floor + slots_by_hidden // 2, report
    assert step < dense_step and forward < dense_forward, report


def test_up_proj_backward_writes_dh_over_the_recomputed_pre_activation(make_problem):
    # Small weights, many slots: the peak of forward + backward is at grad_act, where
    # "activation" holds h [S, 2F] (kept) beside out, dh [S, 2F] and a [S, F] (672 MiB here).
    # "up_proj" recomputes h and writes dh over it: its peak is lower by about h's size
    # (256 MiB). With a separate dh it would peak as high as "activation".
    T, d, F, E, k = 16384, 1024, 512, 8, 8
    S = T * k
    problem = make_problem(T, d, F, E, k, dtype=torch.bfloat16, seed=8, device="cuda")
    h_bytes = S * 2 * F * 2
    peaks = {
        policy: _peak_bytes(functools.partial(moeblaze.moe_mlp, recompute=policy), problem)[1]
        for policy in ("activation", "up_proj")
    }
    assert peaks["up_proj"] < peaks["activation"] - h_bytes * 3 // 4, peaks


@pytest.mark.parametrize("name", ["topk_ids", "topk_weights", "w13", "w2"])
def test_devices_must_agree(name, make_problem):
    problem = make_problem(16, 32, 16, 4, 2, seed=9, device="cuda")
    args = dict(
        x=problem.x,
        topk_ids=problem.topk_ids,
        topk_weights=problem.topk_weights,
        w13=problem.w13,
        w2=problem.w2,
    )
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=rf"{name} is on cpu; expected x's device cuda"):
        moeblaze.moe_mlp(*args.values())


@pytest.mark.parametrize("bias", [False, True], ids=["swiglu", "gpt_oss"])
def test_compile_inductor_on_cuda(bias):
    torch.manual_seed(10)
    # GPT-OSS's layer: biases everywhere (router, experts, shared expert), its SwiGLU.
    options = dict(bias=True, activation=ACTIVATIONS["gpt-oss"][0]) if bias else {}
    layer = moeblaze.MoELayer(256, 128, 8, 2, shared_expert_size=64, device="cuda", **options)
    x = torch.randn(4, 128, 256, device="cuda")
    dout = torch.randn_like(x)

    def step(module):
        inp = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = module(inp)
        out.backward(dout)
        return [out.detach(), inp.grad, *(p.grad.clone() for p in layer.parameters())]

    eager = step(layer)
    torch._dynamo.reset()
    compiled = step(torch.compile(layer, fullgraph=True))
    names = ["out", "dx", *(n for n, _ in layer.named_parameters())]
    for name, a, e in zip(names, compiled, eager, strict=True):
        assert_close(a, e, rtol=1e-5, name=name)


def test_cuda_graph_capture_of_forward(make_problem):
    # The plan has a static size (ceil(S / BLOCK_M) + E tiles), so a forward can be captured;
    # the id range check (a device-to-host sync) is skipped while capturing.
    T, d, F, E, k = 512, 256, 128, 8, 2
    first = make_problem(T, d, F, E, k, dtype=torch.bfloat16, seed=11, device="cuda")
    second = make_problem(T, d, F, E, k, dtype=torch.bfloat16, seed=12, device="cuda")
    x = first.x.clone()
    ids = first.topk_ids.clone()
    weights = first.topk_weights.clone()

    def forward():
        return moeblaze.moe_mlp(x, ids, weights, first.w13, first.w2, deterministic=True)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward()
        x.copy_(second.x)
        ids.copy_(second.topk_ids)
        weights.copy_(second.topk_weights)
        graph.replay()
        expected = moeblaze.moe_mlp(
            second.x, second.topk_ids, second.topk_weights, first.w13, first.w2, deterministic=True
        )
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dropping", [False, True], ids=["", "capacity_padding"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("recompute", moeblaze.RECOMPUTE_POLICIES)
def test_layer_forward_and_backward_never_synchronise(recompute, bias, dropping):
    """Nothing in a MoELayer step waits for the device: router, plan (compiled or Triton), the
    expert kernels and their backward (the bias kernels too), the balancing losses (per
    sequence too), the deferred id and logit checks, and (`dropping`) token dropping for
    capacity, padding kept out of the experts and the router's input jitter."""
    torch.manual_seed(0)
    layer = moeblaze.MoELayer(
        256,
        128,
        16,
        4,
        recompute=recompute,
        bias=bias,
        aux_loss_coeff=1e-2,
        seq_aux_loss_coeff=1e-2,
        capacity_factor=0.5 if dropping else None,
        input_jitter_eps=0.1 if dropping else None,
        device="cuda",
        dtype=torch.bfloat16,
    )
    x = torch.randn(8, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # 28 padding tokens at the end of each sequence
    mask = (torch.arange(128, device="cuda") < 100).expand(8, 128) if dropping else None
    layer(x, mask).float().square().mean().backward()  # warm-up: compiles, allocates, loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            layer(x, mask).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    moeblaze.check_errors()  # and nothing was wrong


def test_replayed_routing_never_synchronises():
    """Router(..., replay_ids=) (routing replay) and the experts on the replayed ids: no wait
    for the device; the weights are the scores of the replayed experts."""
    torch.manual_seed(0)
    router = moeblaze.Router(256, 16, 4, aux_loss_coeff=1e-2, device="cuda")
    w13 = torch.randn(16, 256, 256, device="cuda", dtype=torch.bfloat16) / 16
    w2 = torch.randn(16, 256, 128, device="cuda", dtype=torch.bfloat16) / 12
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    replay = torch.rand(1024, 16, device="cuda").argsort(-1)[:, :4]

    def step():
        routing = router(x, replay_ids=replay)
        out = moeblaze.moe_mlp(x, routing.topk_ids, routing.topk_weights, w13, w2)
        out.float().square().mean().backward()
        return routing

    routing = step()  # warm-up: compiles, allocates, loads
    torch.cuda.synchronize()
    assert torch.equal(routing.topk_ids, replay)
    scores = (x.float() @ router.weight.float().t()).softmax(-1).gather(1, replay)
    assert_close(routing.topk_weights, scores / scores.sum(-1, keepdim=True), rtol=1e-5, name="w")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    moeblaze.check_errors()


def test_invalid_ids_on_cuda_raise_without_a_sync_by_the_next_call(make_problem):
    problem = make_problem(64, 32, 16, 4, 2, seed=3, device="cuda")
    bad = problem.topk_ids.clone()
    bad[5, 1] = 7
    out = moeblaze.moe_mlp(problem.x, bad, problem.topk_weights, problem.w13, problem.w2)
    assert out.shape == problem.x.shape  # no error yet: nothing waited for the device
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"expert id 7 \(topk_ids\[5, 1\], the first of 1 ids"):
        moeblaze.moe_mlp(problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2)
    moeblaze.moe_mlp(problem.x, bad, problem.topk_weights, problem.w13, problem.w2)
    with pytest.raises(ValueError, match="expert id 7"):
        moeblaze.check_errors()
    with pytest.raises(ValueError, match="expert id 7"):  # debugging: at once
        moeblaze.moe_mlp(
            problem.x, bad, problem.topk_weights, problem.w13, problem.w2, check_ids=True
        )
