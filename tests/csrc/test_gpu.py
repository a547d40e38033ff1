"""GPU tests of the compiled kernels (`pytest -m gpu`; skipped without CUDA by tests/conftest.py):
the routing plan bitwise against the torch and Triton plans (random and adversarial routings,
invalid ids, no host sync, CUDA graphs), the router top-k against the torch reference, and the
chunk signals between two streams, including the timeout of the bounded wait.

# T tokens (N router rows), k top-k, E experts, S = T*k slots
"""

import pytest
import torch
from moeblaze_testing import check_plan

from kernelbase import alloc, compiled
from moeblaze.kernels.compiled import RouterTopK, fill_routing_plan, router_topk
from moeblaze.kernels.routing_plan import launch_plan
from moeblaze.reference import fill_plan_torch, router_topk_reference, select_experts
from moeblaze.routing_plan import RoutingPlan, plan_numel
from overlap.kernels.compiled import wait_flag, wait_flag_bounded, write_flag

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def compiled_modules():
    """Fail if the install meant to build the modules and they do not run; skip if not built."""
    for package in ("moeblaze", "overlap"):
        if compiled.load(package) is None:
            why = compiled.reason(package)
            if why.startswith("not built"):
                pytest.skip(f"{package}._C {why}")
            pytest.fail(f"{package}._C is built but not active on this GPU: {why}")


def _empty_plan(num_tokens, top_k, num_experts, block_m, device="cuda"):
    num_slots = num_tokens * top_k
    buffer = torch.full(
        (plan_numel(num_slots, num_experts, block_m),), -(2**30), dtype=torch.int32, device=device
    )
    return RoutingPlan.from_buffer(buffer, num_slots, num_experts, top_k, block_m)


def _compiled_plan(topk_ids, num_experts, block_m):
    plan = _empty_plan(*topk_ids.shape, num_experts, block_m)
    fill_routing_plan(topk_ids, plan)
    return plan, plan.invalid_ids


def _reference_plans(topk_ids, num_experts, block_m):
    torch_plan = _empty_plan(*topk_ids.shape, num_experts, block_m)
    fill_plan_torch(topk_ids, torch_plan)
    triton_plan = _empty_plan(*topk_ids.shape, num_experts, block_m)
    if num_experts <= 1024:
        launch_plan(topk_ids, triton_plan)
    return torch_plan, triton_plan


def _routing(num_tokens, num_experts, top_k, kind, seed, dtype):
    """topk_ids [T, k] (distinct per token unless said otherwise) on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "random":
        scores = torch.rand(num_tokens, num_experts, device="cuda", generator=g)
        ids = scores.topk(top_k, dim=-1).indices
    elif kind == "one_expert":  # every slot on the last expert (k = 1), or the same k experts
        ids = torch.tensor([num_experts - 1, *range(top_k - 1)], device="cuda").expand(
            num_tokens, -1
        )
    elif kind == "empty_experts":  # only experts 0, 3, 6, ... get tokens
        allowed = torch.arange(0, num_experts, 3, device="cuda")
        scores = torch.rand(num_tokens, len(allowed), device="cuda", generator=g)
        ids = allowed[scores.topk(top_k, dim=-1).indices]
    elif kind == "skewed":  # repeats allowed: 90% of slots on expert 1
        ids = torch.randint(0, num_experts, (num_tokens, top_k), device="cuda", generator=g)
        hot = torch.rand(num_tokens, top_k, device="cuda", generator=g) < 0.9
        ids = torch.where(hot, min(1, num_experts - 1), ids)
    else:
        raise ValueError(kind)
    return ids.to(dtype).contiguous()


# (T, E, k, routing, block_m)
PLAN_CASES = {
    "T0": (0, 8, 2, "random", 64),
    "T1": (1, 8, 2, "random", 64),
    "E1": (1000, 1, 1, "random", 64),
    "E8_k2": (4096, 8, 2, "random", 64),
    "E64_k6": (16384, 64, 6, "random", 64),
    "E128_k8": (16384, 128, 8, "random", 64),
    "E128_k8_bm128": (16384, 128, 8, "random", 128),
    "E256_k8_bm16": (1000, 256, 8, "random", 16),
    "E1024_k8": (4099, 1024, 8, "random", 64),
    "T65536_k8": (65536, 128, 8, "random", 64),
    "T100000_k8": (100000, 64, 8, "random", 64),  # more rounds than stay in registers
    "one_expert_k1": (50000, 16, 1, "one_expert", 64),
    "one_expert_k4": (3000, 16, 4, "one_expert", 16),
    "empty_experts": (5000, 30, 4, "empty_experts", 64),
    "skewed": (20000, 128, 8, "skewed", 64),
    "odd_sizes": (777, 13, 3, "random", 32),
    "k=E": (333, 6, 6, "random", 16),
}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_plan_is_bitwise_the_torch_and_triton_plan(case, dtype):
    T, E, k, kind, block_m = case
    topk_ids = _routing(T, E, k, kind, seed=T + E, dtype=dtype)
    plan, invalid = _compiled_plan(topk_ids, E, block_m)
    torch_plan, triton_plan = _reference_plans(topk_ids, E, block_m)
    assert invalid.tolist() == [0, 0]
    assert torch.equal(plan.buffer, torch_plan.buffer)
    assert torch.equal(plan.buffer, triton_plan.buffer)
    if T * k <= 50_000:
        check_plan(plan, topk_ids, E, block_m)


def test_plan_is_reproducible_and_never_syncs():
    topk_ids = _routing(16384, 128, 8, "random", seed=1, dtype=torch.int64)
    first, _ = _compiled_plan(topk_ids, 128, 64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plans = [_compiled_plan(topk_ids, 128, 64)[0] for _ in range(20)]  # queued back to back
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for plan in plans:
        assert torch.equal(plan.buffer, first.buffer)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_invalid_ids_are_counted_and_the_first_reported(dtype):
    # Dropped slots (-1) are placed nowhere too, and not counted.
    T, E, k = 5000, 32, 4
    topk_ids = _routing(T, E, k, "random", seed=5, dtype=dtype)
    flat = topk_ids.view(-1)
    bad_slots = torch.tensor([7, 123, 4096, 19_999], device="cuda")
    bad_values = [E, -2, 2**31 - 1 if dtype == torch.int32 else 2**40, -(2**20)]
    flat[bad_slots] = torch.tensor(bad_values, device="cuda", dtype=dtype)
    flat[torch.tensor([3, 8, 4097, 19_998], device="cuda")] = -1  # dropped: no error
    plan, invalid = _compiled_plan(topk_ids, E, 64)
    assert invalid.tolist() == [4, T * k - 7]  # (count, S - the lowest invalid slot)
    counts = torch.bincount(flat[(flat >= 0) & (flat < E)].long(), minlength=E)
    assert torch.equal(plan.expert_counts.long(), counts)  # valid ids still counted exactly
    assert int(plan.expert_offsets[E]) == T * k - 8  # invalid and dropped slots placed nowhere
    # The Triton plan handles invalid ids the same way, field for field where both are defined.
    triton_plan = _empty_plan(T, k, E, 64)
    launch_plan(topk_ids, triton_plan)
    valid = int(plan.expert_offsets[E])
    for name in (
        "expert_counts",
        "expert_offsets",
        "slot_positions",  # -1 for the slots placed nowhere
        "tile_expert",
        "tile_row_start",
        "num_tiles",
        "invalid_ids",
    ):
        assert torch.equal(getattr(plan, name), getattr(triton_plan, name)), name
    assert torch.equal(plan.sorted_slots[:valid], triton_plan.sorted_slots[:valid])
    assert bool((plan.slot_positions[bad_slots] == -1).all())


def test_all_ids_invalid_stays_in_bounds():
    # Every id out of range: nothing is placed, the fields outside the plan stay untouched.
    T, k, E, block_m = 3000, 4, 16, 64
    topk_ids = torch.full((T, k), E + 3, dtype=torch.int64, device="cuda")
    num_slots = T * k
    guard = 1024
    backing = torch.full(
        (plan_numel(num_slots, E, block_m) + 2 * guard,), 12345, dtype=torch.int32, device="cuda"
    )
    plan = RoutingPlan.from_buffer(backing[guard:-guard], num_slots, E, k, block_m)
    fill_routing_plan(topk_ids, plan)
    assert plan.invalid_ids.tolist() == [num_slots, num_slots]
    assert bool((backing[:guard] == 12345).all()) and bool((backing[-guard:] == 12345).all())
    assert int(plan.num_tiles) == 0 and bool((plan.expert_counts == 0).all())
    assert bool((plan.slot_positions == -1).all())


def test_plan_in_a_cuda_graph():
    topk_ids = _routing(8192, 64, 6, "random", seed=2, dtype=torch.int64)
    plan = _empty_plan(8192, 6, 64, 64)
    fill_routing_plan(topk_ids, plan)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fill_routing_plan(topk_ids, plan)
    topk_ids.copy_(_routing(8192, 64, 6, "random", seed=3, dtype=torch.int64))
    plan.buffer.fill_(-1)
    graph.replay()
    torch_plan, _ = _reference_plans(topk_ids, 64, 64)
    assert torch.equal(plan.buffer, torch_plan.buffer)


# ---------------------------------------------------------------------------------------------
# Router top-k

ROUTER_CASES = {  # (N, E, k, score_func, bias, num_groups, topk_groups, norm)
    "E8_k2_softmax": (4096, 8, 2, "softmax", False, None, None, True),
    "E64_k6_softmax": (4096, 64, 6, "softmax", False, None, None, True),
    "E128_k8_softmax": (16384, 128, 8, "softmax", False, None, None, True),
    "E128_k8_no_norm": (1000, 128, 8, "softmax", False, None, None, False),
    "E256_k8_sigmoid_bias": (3000, 256, 8, "sigmoid", True, None, None, True),
    "E256_dsv3_groups": (3000, 256, 8, "sigmoid", True, 8, 4, True),
    "E160_dsv2_groups": (3000, 160, 6, "softmax", False, 8, 3, False),
    "E64_one_expert_groups": (2000, 64, 4, "sigmoid", True, 64, 5, True),
    "E96_groups_all_kept": (500, 96, 4, "softmax", False, 4, 4, True),
    "E384_k16": (700, 384, 16, "softmax", True, 12, 6, True),
    "E512_k16_sigmoid": (700, 512, 16, "sigmoid", False, None, None, True),
    "E1_k1": (100, 1, 1, "softmax", False, None, None, True),
    "E33_k3": (999, 33, 3, "sigmoid", False, 3, 2, True),
    "E256_k6_dsv4_sqrtsoftplus": (3000, 256, 6, "sqrtsoftplus", True, None, None, True),
    "E64_sqrtsoftplus_groups": (2000, 64, 4, "sqrtsoftplus", False, 8, 2, False),
    "N0": (0, 64, 4, "softmax", False, None, None, True),
}


def _router_inputs(case, seed=0, ties=False):
    N, E, k, score_func, bias, groups, topk_groups, norm = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    if ties:  # few distinct logits: exact ties in the scores
        logits = torch.randint(-2, 3, (N, E), device="cuda", generator=g).float()
    else:
        logits = torch.randn(N, E, device="cuda", generator=g) * 2
    expert_bias = torch.randn(E, device="cuda", generator=g) * 0.05 if bias else None
    return (logits, k, score_func, expert_bias, groups, topk_groups, norm)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("case", ROUTER_CASES.values(), ids=ROUTER_CASES.keys())
def test_router_topk_matches_the_reference(case, ties):
    args = _router_inputs(case, seed=len(ROUTER_CASES), ties=ties)
    logits, k, score_func, expert_bias, groups, topk_groups, norm = args
    alloc.poison, before = True, alloc.poison
    try:
        ids, weights, scores = router_topk(*args)
    finally:
        alloc.poison = before
    ref_ids, ref_weights, ref_scores = router_topk_reference(*args)
    # Scores: the same float32 softmax/sigmoid/sqrt(softplus) as torch (bit for bit expected;
    # 1e-6 asserted).
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-7)
    # Selection on the kernel's own scores: exact, ties to the lower index.
    assert torch.equal(ids, select_experts(scores, k, score_func, expert_bias, groups, topk_groups))
    # End to end: the same ids wherever the reference's scores are those of the kernel.
    same_scores = (scores == ref_scores).all(-1)
    assert torch.equal(ids[same_scores], ref_ids[same_scores])
    assert same_scores.float().mean() > 0.99 or logits.shape[0] == 0
    chosen = ref_scores.gather(1, ids)
    expected = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) if norm else chosen
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights[same_scores], ref_weights[same_scores], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "case", ["E64_k6_softmax", "E256_dsv3_groups", "E256_k6_dsv4_sqrtsoftplus"]
)
def test_router_topk_backward(case):
    logits, *options = _router_inputs(ROUTER_CASES[case], seed=11)
    grad_w = torch.randn(logits.shape[0], options[0], device="cuda")
    grad_s = torch.randn_like(logits)

    def grads(fn):
        x = logits.clone().requires_grad_()
        ids, weights, scores = fn(x, *options)
        torch.autograd.backward((weights, scores), (grad_w, grad_s))
        return ids, x.grad

    ids, actual = grads(RouterTopK.apply)
    ref_ids, expected = grads(router_topk_reference)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_router_topk_never_syncs():
    args = _router_inputs(ROUTER_CASES["E128_k8_softmax"], seed=1)
    router_topk(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            router_topk(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# Chunk signals

SLEEP_CYCLES = 50_000_000  # ~25 ms at ~2 GHz: the consumer really has to wait


def _load_producer_kernels(data: torch.Tensor, flags: torch.Tensor) -> None:
    """Launch once, with nothing waiting, every kernel the producers below launch while a consumer
    waits. CUDA loads a kernel at its first launch, and that load may wait for the context to be
    idle, so a first launch behind a waiting consumer waits for it (seen on an H100: the round
    trips hung and the bounded wait timed out when a test ran alone). overlap._C loads its own
    kernels before any wait; torch's are the tests' to load."""
    torch.cuda._sleep(1)
    data.fill_(0.0)
    torch.empty_like(data).copy_(data)
    compiled.require("overlap").write_flag_with_kernel(
        flags.data_ptr(), 0, torch.cuda.current_stream().cuda_stream, flags.device.index
    )
    torch.cuda.synchronize()


@pytest.mark.parametrize("writer", ["write_flag", "kernel"])
def test_signal_round_trip_between_two_streams(writer):
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    flags = torch.zeros(4, dtype=torch.int32, device="cuda")
    data = torch.zeros(1 << 20, device="cuda")
    seen = torch.empty_like(data)
    _load_producer_kernels(data, flags)
    for epoch in range(1, 6):
        with torch.cuda.stream(consumer):
            wait_flag(flags, 2, epoch)
            seen.copy_(data)  # must see the producer's data of this epoch
        with torch.cuda.stream(producer):
            torch.cuda._sleep(SLEEP_CYCLES)
            data.fill_(float(epoch))
            if writer == "write_flag":
                write_flag(flags, 2, epoch)
            else:
                module = compiled.require("overlap")
                module.write_flag_with_kernel(
                    flags.data_ptr() + 8, epoch, producer.cuda_stream, flags.device.index
                )
        consumer.synchronize()
        assert bool((seen == epoch).all()), f"epoch {epoch}: consumer ran before the flag"
    producer.synchronize()
    assert flags.tolist() == [0, 0, 5, 0]


def test_bounded_wait_passes_when_the_flag_rises():
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    flags = torch.zeros(2, dtype=torch.int32, device="cuda")
    status = torch.zeros(2, dtype=torch.int32, device="cuda")
    data, seen = torch.zeros(1024, device="cuda"), torch.empty(1024, device="cuda")
    _load_producer_kernels(data, flags)
    with torch.cuda.stream(consumer):
        wait_flag_bounded(flags, 1, 3, status, timeout_ns=5_000_000_000, code=9)
        seen.copy_(data)
    with torch.cuda.stream(producer):
        torch.cuda._sleep(SLEEP_CYCLES)
        data.fill_(3.0)
        write_flag(flags, 1, 3)
    torch.cuda.synchronize()
    assert status.tolist() == [0, 0]
    assert bool((seen == 3.0).all())


def test_bounded_wait_times_out_in_real_time():
    flags = torch.full((3,), 41, dtype=torch.int32, device="cuda")
    status = torch.zeros(2, dtype=torch.int32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    wait_flag_bounded(flags, 2, 42, status, timeout_ns=20_000_000, code=7)
    end.record()
    end.synchronize()
    assert status.tolist() == [7, 41]
    assert 19.0 <= start.elapsed_time(end) < 1000.0  # 20 ms of real time, not a spin count
    # A later wait on a broken protocol (status already set) returns at once, writing nothing.
    start.record()
    wait_flag_bounded(flags, 0, 100, status, timeout_ns=10_000_000_000, code=8)
    end.record()
    end.synchronize()
    assert status.tolist() == [7, 41]
    assert start.elapsed_time(end) < 100.0


def test_stream_memops_are_available_on_cuda_12_drivers():
    ok, why = compiled.require("overlap").stream_memops()
    assert ok, why
