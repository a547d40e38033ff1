"""Expert parallelism against the single-process MoELayer with the same weights.

# W ranks, T tokens of one rank, N tokens of all ranks, d hidden, F ffn, E experts,
# E_l = E / W experts per rank, k top-k

One run of 4 gloo processes checks W = 4 on the default group and, before it, W = 2 on the two
subgroups {0, 1} and {2, 3} at the same time. The parent process runs `moeblaze.MoELayer` on the
tokens of all ranks (forward and backward); each worker runs
`ExpertParallelMoELayer.from_moe_layer` on its own tokens and compares its output, dx, its
experts' slices of dw13 and dw2, and the all-reduced (data-parallel) gradients of the
replicated router and shared expert. The workers also run expert_parallel_mlp on routings with
dropped slots against moe_mlp on every rank's tokens, and expert tensor parallelism: experts
split over the pairs {0, 1} and {2, 3} (their F columns) and sharded over {0, 2} and {1, 3},
as expert_parallel_mlp and as the layer, and a bad id seen by every rank.

A run of 2 gloo processes checks the Megatron-style layer with expert_model_parallel_size=2
against the one-rank Megatron-style layer: initial model, loading a rank's state dict, output,
dx and gradients. Those two are spawned: forked from a process that has run megatron-core's
parallel_state (test_megatron, in the same pytest worker), their initialize_model_parallel
hangs.

The gloo workers are forked, not spawned: they start with the parent's imports, its warm Triton
interpreter and its NaN-poisoned allocations (the autouse `poison` fixture), so a row that no
kernel wrote fails the comparison in the workers too, and the run stays within seconds.
"""

import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import time
import types
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moeblaze_testing import expert_shard
from overlap_testing import gloo_rank, randn
from tolerance import assert_close

import moeblaze
from moeblaze.expert_parallel import ExpertParallelMoELayer, expert_parallel_mlp

D, FFN, E, K, SHARED = 16, 8, 8, 2, 12
RTOL = 1e-5  # float32 against float32: the same kernels, rows summed in another order
NUM_PROCS = 4


@dataclasses.dataclass(frozen=True)
class Case:
    """One MoE layer call spread over the ranks of a group, and its single-process result."""

    name: str
    layer: moeblaze.MoELayer  # the full layer, without gradients
    tokens: tuple[int, ...]  # [W] tokens of each rank
    x: torch.Tensor  # [N, d] the tokens of every rank, rank after rank
    dout: torch.Tensor  # [N, d]
    out: torch.Tensor  # [N, d] MoELayer's output
    topk_ids: torch.Tensor  # [N, k] MoELayer's routing
    grads: dict[str, torch.Tensor]  # "x" and every parameter name of the layer -> its gradient
    recompute_dispatch: bool = True


def _case(name, tokens, *, seed, receivers=None, recompute_dispatch=True, **layer_options):
    """MoELayer forward + backward on every rank's tokens. With `receivers`, tokens choose only
    experts of those ranks: the other ranks receive no row at all."""
    torch.manual_seed(seed)
    layer = moeblaze.MoELayer(D, FFN, E, K, **layer_options)
    x, dout = randn(sum(tokens), D, seed=seed + 1), randn(sum(tokens), D, seed=seed + 2)
    owner = torch.arange(E) // (E // len(tokens))  # [E] rank holding each expert
    allowed = torch.isin(owner, torch.tensor(receivers or range(len(tokens))))  # [E]
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.where(allowed, 0.0, -16.0)
    x[:, 0] = 4.0  # the other experts trail every token's logits by 64
    reference = copy.deepcopy(layer)
    x_ref = x.clone().requires_grad_()
    out = reference(x_ref)
    out.backward(dout)
    topk_ids = reference.last_router_output.topk_ids
    assert allowed[topk_ids].all()
    grads = {"x": x_ref.grad, **{n: p.grad for n, p in reference.named_parameters()}}
    return Case(
        name, layer, tuple(tokens), x, dout, out.detach(), topk_ids, grads, recompute_dispatch
    )


@contextlib.contextmanager
def _recording_received_rows():
    """Record the all-to-all outputs of d columns (dispatched and combined rows) made in the
    body; yields a function giving the shapes of those still alive."""
    refs = []
    all_to_all_single = dist.all_to_all_single

    def recording(output, *args, **kwargs):
        if output.dim() == 2 and output.shape[1] == D:
            refs.append(weakref.ref(output))
        return all_to_all_single(output, *args, **kwargs)

    def alive_shapes() -> list[tuple[int, ...]]:
        gc.collect()
        return [tuple(t.shape) for t in (r() for r in refs) if t is not None]

    dist.all_to_all_single = recording
    try:
        yield alive_shapes
    finally:
        dist.all_to_all_single = all_to_all_single


def _settled(shapes, expected, seconds=5.0) -> list[tuple[int, ...]]:
    """`shapes()` once it equals `expected`, or when `seconds` have passed. gloo's worker thread
    drops its reference to a finished collective's output a moment after the caller returns,
    so on a loaded machine a buffer can outlive forward briefly; one kept by autograd never
    dies and fails the comparison."""
    deadline = time.monotonic() + seconds
    while (found := shapes()) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def _check_case(case: Case, group, device="cpu", tensor_group=None, compiled=False) -> None:
    """With a `tensor_group` (expert tensor parallelism), every rank of the default group has
    its own tokens; without, those of `group`. `compiled`: the layer runs under torch.compile
    (aot_eager: Dynamo and AOTAutograd, as with inductor), its experts as one graph break."""
    data = group if tensor_group is None else dist.group.WORLD  # the ranks with own tokens
    W, r = dist.get_world_size(data), dist.get_rank(data)
    assert len(case.tokens) == W
    where = f"{case.name} (W={W}{', split experts' if tensor_group else ''}) rank {r}"
    where += ", compiled" if compiled else ""
    layer = ExpertParallelMoELayer.from_moe_layer(
        case.layer.to(device),
        group,
        recompute_dispatch=case.recompute_dispatch,
        expert_tensor_group=tensor_group,
    )
    first = sum(case.tokens[:r])
    mine = slice(first, first + case.tokens[r])  # this rank's rows of x
    x = case.x[mine].to(device).requires_grad_()
    call = torch.compile(layer, backend="aot_eager") if compiled else layer
    with _recording_received_rows() as alive_shapes:
        out = call(x)
    # No buffer of dispatched or combined rows outlives forward, but the received rows [R, d]
    # with recompute_dispatch=False (with split experts, the gathered rows instead).
    received = int(
        ((case.topk_ids >= layer.experts.start) & (case.topk_ids < layer.experts.stop)).sum()
    )
    kept = [] if case.recompute_dispatch or tensor_group else [(received, D)]
    assert _settled(alive_shapes, kept) == kept, f"{where}: rows kept for backward"
    out.backward(case.dout[mine].to(device))
    assert_close(out, case.out[mine], rtol=RTOL, name=f"{where}: out")
    assert_close(x.grad, case.grads["x"][mine], rtol=RTOL, name=f"{where}: dx")
    for name, p in layer.named_parameters():
        expected = case.grads[name]
        if name in ("w13", "w2", "b13", "b2"):  # this rank's experts: complete gradients
            expected = expected[layer.experts]
            if tensor_group is not None:  # this rank's shard
                expected = expert_shard(name, expected, tensor_group, layer.activation.gated)
            grad = p.grad
        else:  # replicated: the data-parallel all-reduce
            grad = p.grad.clone()
            dist.all_reduce(grad, group=data)
        assert_close(grad, expected, rtol=RTOL, name=f"{where}: grad {name}")


def _check_ranges(profile, case: Case) -> None:
    names = {event.name for event in profile.events()}
    stages = ["exchange_counts", "dispatch", "experts", "combine"]
    stages += ["recompute_dispatch"] if case.recompute_dispatch else []
    for stage in stages:
        assert f"moeblaze.ep.{stage}" in names, f"no moeblaze.ep.{stage} range in {sorted(names)}"


def _check_init(groups) -> None:
    """Ranks seeded alike: the same router on every rank, distinct experts, and the same experts
    whatever the number of ranks, those of a MoELayer seeded alike."""
    experts = []
    for group in groups:
        torch.manual_seed(3)
        layer = ExpertParallelMoELayer(D, FFN, E, K, group=group)
        W = dist.get_world_size(group)
        routers, shards = (
            [torch.empty(E, D) for _ in range(W)],
            [torch.empty_like(layer.w13) for _ in range(W)],
        )
        dist.all_gather(routers, layer.router.weight.detach(), group=group)
        dist.all_gather(shards, layer.w13.detach(), group=group)
        assert all(torch.equal(r, routers[0]) for r in routers), "router weights differ"
        experts.append(torch.cat(shards))  # [E, 2F, d]
    assert torch.equal(experts[0], experts[1]), "the experts depend on the number of ranks"
    torch.manual_seed(3)
    assert torch.equal(moeblaze.MoELayer(D, FFN, E, K).w13, experts[0]), "differ from MoELayer's"
    assert len({tuple(w.flatten().tolist()) for w in experts[0]}) == E, "identical experts"


def _check_errors(group) -> None:
    W, r = dist.get_world_size(group), dist.get_rank(group)
    with pytest.raises(ValueError, match=rf"num_experts={W + 1} must be divisible .* \({W} ranks"):
        ExpertParallelMoELayer(D, FFN, W + 1, 1, group=group)
    # An id outside [0, E) on one rank raises on every rank (none waits in a collective).
    x, w13, w2 = randn(3, D), randn(1, 2 * FFN, D), randn(1, D, FFN)
    ids = torch.tensor([[0], [W], [W - 1]]) if r == 1 else torch.zeros(3, 1, dtype=torch.long)
    message = rf"rank\(s\) \[1\] .* outside \[0, num_experts={W}\)"
    if r == 1:
        message += f"; this rank's first one is {W}"
    with pytest.raises(ValueError, match=message):
        expert_parallel_mlp(x, ids, torch.ones(3, 1), w13, w2, group)
    # Backward dispatches x again (recompute_dispatch): x changed in place after forward raises,
    # on every rank before any of them enters a collective of the backward.
    x = randn(3, D, seed=45).requires_grad_() * 1
    out = expert_parallel_mlp(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), w13, w2)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after forward; backward dispatches"):
        out.sum().backward()


def _check_dropped(group) -> None:
    """Dropped slots (-1) on every rank, all of one rank's tokens on one rank: expert_parallel_mlp
    on this rank's tokens matches moe_mlp on every rank's (out, dx, dtopk_weights, this rank's
    dw13 and dw2), and a dropped slot's weight gets gradient 0."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    tokens = [6, 0, 5, 4][:W]
    x, dout = randn(sum(tokens), D, seed=40), randn(sum(tokens), D, seed=41)
    w13, w2 = randn(E, 2 * FFN, D, seed=42) / D**0.5, randn(E, D, FFN, seed=43) / FFN**0.5
    g = torch.Generator().manual_seed(44)
    ids = torch.rand(sum(tokens), E, generator=g).topk(K, dim=-1).indices
    ids[torch.rand(ids.shape, generator=g) < 0.4] = moeblaze.DROPPED
    ids[: tokens[0]] = moeblaze.DROPPED  # rank 0 sends nothing at all
    weights = torch.rand(ids.shape, generator=g)

    def run(fn, rows, experts, *group_arg):
        leaves = [
            t.clone().requires_grad_() for t in (x[rows], weights[rows], w13[experts], w2[experts])
        ]
        out = fn(leaves[0], ids[rows], leaves[1], *leaves[2:], *group_arg)
        out.backward(dout[rows])
        return [out.detach(), *(t.grad for t in leaves)]

    first = sum(tokens[:r])
    mine = slice(first, first + tokens[r])
    local = slice(r * E // W, (r + 1) * E // W)
    actual = run(expert_parallel_mlp, mine, local, group)
    expected = run(moeblaze.moe_mlp, slice(None), slice(None))
    expected = [t[mine] for t in expected[:3]] + [t[local] for t in expected[3:]]
    for name, a, b in zip(("out", "dx", "dweights", "dw13", "dw2"), actual, expected, strict=True):
        assert_close(a, b, rtol=RTOL, name=f"dropped slots (W={W}) rank {r}: {name}")
    dropped = ids[mine] == moeblaze.DROPPED
    assert torch.equal(actual[2][dropped], torch.zeros(int(dropped.sum())))


def _check_expert_tensor(expert_group, tensor_group, *, to_first_ranks, recompute_dispatch):
    """Experts split over 2 expert-parallel x 2 expert-tensor-parallel ranks (each holds half of
    the F columns of half of the experts), with biases, dropped slots and a rank without
    tokens: out, dx, dtopk_weights and every parameter's shard of the gradient match moe_mlp on
    every rank's tokens with whole experts. `to_first_ranks`: every token chooses experts of
    expert-parallel rank 0, so the other ranks' experts compute no row."""
    r = dist.get_rank(expert_group)
    where = f"expert tensor parallel (to_first_ranks={to_first_ranks}) rank {dist.get_rank()}"
    tokens = [6, 0, 5, 4]
    x, dout = randn(sum(tokens), D, seed=50), randn(sum(tokens), D, seed=51)
    whole = [randn(E, 2 * FFN, D, seed=52) / D**0.5, randn(E, D, FFN, seed=53) / FFN**0.5]
    whole += [randn(E, 2 * FFN, seed=54), randn(E, D, seed=55)]  # b13, b2
    g = torch.Generator().manual_seed(56)
    choices = E // 2 if to_first_ranks else E
    ids = torch.rand(sum(tokens), choices, generator=g).topk(K, dim=-1).indices
    ids[torch.rand(ids.shape, generator=g) < 0.3] = moeblaze.DROPPED
    weights = torch.rand(ids.shape, generator=g)

    def run(fn, rows, params, **options):
        leaves = [t.clone().requires_grad_() for t in (x[rows], weights[rows], *params)]
        w13, w2, b13, b2 = leaves[2:]
        out = fn(leaves[0], ids[rows], leaves[1], w13, w2, b13=b13, b2=b2, **options)
        out.backward(dout[rows])
        return [out.detach(), *(t.grad for t in leaves)]

    first = sum(tokens[: dist.get_rank()])
    mine = slice(first, first + tokens[dist.get_rank()])
    local = slice(r * E // 2, (r + 1) * E // 2)

    def shards(params):  # whole experts' w13, w2, b13, b2 [E, ...] -> this rank's shards
        names = ("w13", "w2", "b13", "b2")
        return [expert_shard(n, t[local], tensor_group) for n, t in zip(names, params, strict=True)]

    actual = run(
        expert_parallel_mlp,
        mine,
        shards(whole),
        group=expert_group,
        expert_tensor_group=tensor_group,
        recompute_dispatch=recompute_dispatch,
    )
    expected = run(moeblaze.moe_mlp, slice(None), whole)
    expected = [t[mine] for t in expected[:3]] + shards(expected[3:])
    names = ("out", "dx", "dweights", "dw13", "dw2", "db13", "db2")
    for name, a, b in zip(names, actual, expected, strict=True):
        assert_close(a, b, rtol=RTOL, name=f"{where}: {name}")
    if to_first_ranks and r == 1:  # no row reached these experts
        assert not actual[3].any() and not actual[4].any()


def _check_expert_tensor_errors(expert_group, tensor_group) -> None:
    """An F that the group cannot split raises; an id outside [0, E) on global rank 1 raises on
    all four ranks, also on those that share neither its expert-parallel group nor its
    expert-tensor-parallel group."""
    x, w13, w2 = randn(3, D), randn(1, FFN, D), randn(1, D, FFN // 2)
    ids = torch.zeros(3, 1, dtype=torch.long)
    if dist.get_rank() == 1:
        ids[1] = -2
    with pytest.raises(ValueError, match=r"ffn_hidden_size=5 must be divisible .* \(2 ranks\)"):
        ExpertParallelMoELayer(D, 5, E, K, group=expert_group, expert_tensor_group=tensor_group)
    with pytest.raises(ValueError, match=r"global rank\(s\) \[1\] contain .* outside \[0, num_"):
        expert_parallel_mlp(
            x, ids, torch.ones(3, 1), w13, w2, expert_group, expert_tensor_group=tensor_group
        )


def _gloo_worker(rank, init_method, pair_cases, case):
    with gloo_rank(rank, NUM_PROCS, init_method, timeout_s=60):
        torch.set_num_threads(1)
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
        odd_even = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        pair, pair_case = pairs[rank // 2], pair_cases[rank // 2]
        cpu = [torch.profiler.ProfilerActivity.CPU]  # no CUDA in a forked worker
        with torch.profiler.profile(activities=cpu) as profile:
            _check_case(pair_case, pair)
        _check_ranges(profile, pair_case)
        _check_case(case, dist.group.WORLD)
        _check_case(case, dist.group.WORLD, compiled=True)
        _check_dropped(dist.group.WORLD)
        for to_first_ranks in (False, True):  # expert-parallel pairs {0, 2}, {1, 3}
            _check_expert_tensor(
                odd_even[rank % 2],
                pairs[rank // 2],
                to_first_ranks=to_first_ranks,
                recompute_dispatch=not to_first_ranks,
            )
        _check_expert_tensor_errors(odd_even[rank % 2], pairs[rank // 2])
        _check_case(case, odd_even[rank % 2], tensor_group=pairs[rank // 2])
        _check_init([pair, dist.group.WORLD])
        _check_errors(dist.group.WORLD)


def test_expert_parallel_over_gloo(tmp_path):
    """W = 2 on two subgroups at once, then W = 4, in one run of 4 processes."""
    if dist.is_initialized():
        pytest.fail(
            "a torch.distributed group is initialised in the test process; forked "
            "workers would inherit it"
        )
    pair_cases = [
        # Ranks {0, 1}: rank 0 has no token of its own (it sends nothing).
        _case("no_tokens_on_0", (0, 5), seed=10, recompute="none"),
        # Ranks {2, 3}: every token goes to rank 1's experts, so rank 0 receives nothing.
        _case("all_to_1", (4, 3), seed=20, receivers=(1,), recompute_dispatch=False),
    ]
    # Rank 2 has no token, rank 0 receives none, ranks 1-3 exchange rows at random; experts
    # without a gate (w13 [E, F, d], split by rows with expert tensor parallelism).
    case = _case(
        "no_tokens_on_2_none_to_0",
        (5, 3, 0, 4),
        seed=30,
        receivers=(1, 2, 3),
        recompute="up_proj",
        shared_expert_size=SHARED,
        bias=True,
        activation=moeblaze.Ungated("relu2"),
    )
    init_method = f"file://{tmp_path / 'store'}"
    mp.start_processes(
        _gloo_worker, args=(init_method, pair_cases, case), nprocs=NUM_PROCS, start_method="fork"
    )


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    # Unknown keywords are named first, process group or not.
    with pytest.raises(TypeError, match=r"ExpertParallelMoELayer .*'score_fn'; did you mean"):
        ExpertParallelMoELayer(D, FFN, E, K, score_fn="sigmoid")
    with pytest.raises(RuntimeError, match="none is initialised: call .*init_process_group"):
        ExpertParallelMoELayer(D, FFN, E, K)
    x, ids, weights = randn(3, D), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(RuntimeError, match="expert_parallel_mlp runs collectives"):
        expert_parallel_mlp(x, ids, weights, randn(2, 2 * FFN, D), randn(2, D, FFN))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=randn(3, 2, D)), ValueError, r"x must be 2-D \[T, d\], got shape \(3, 2, 16\)"),
        (dict(w13=randn(2, 2 * FFN, D + 1)), ValueError, r"w13 must be \[E_l, 2F, d\] with d=16"),
        (dict(w2=randn(2, D, FFN + 1)), ValueError, r"w2 must be \[E_l, d, F\] = \(2, 16, 8\)"),
        (dict(w2=randn(2, D, FFN, dtype=torch.float64)), TypeError, "w2 has dtype torch.float64"),
        (dict(topk_ids=torch.zeros(3, 1)), TypeError, "topk_ids must have an integer dtype"),
        (dict(topk_ids=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"with T=3 \(x's rows\)"),
        (dict(topk_weights=torch.ones(3, 2)), ValueError, "topk_weights must have topk_ids' shape"),
    ],
    ids=["x_3d", "w13_d", "w2_shape", "w2_dtype", "ids_float", "ids_rows", "weights_shape"],
)
def test_bad_arguments(change, error, match):
    """Rank-local checks, before any collective (so no process group is needed to see them)."""
    ids = torch.zeros(3, 1, dtype=torch.long)
    args = dict(
        x=randn(3, D),
        topk_ids=ids,
        topk_weights=torch.ones(3, 1),
        w13=randn(2, 2 * FFN, D),
        w2=randn(2, D, FFN),
    )
    args.update(change)
    with pytest.raises(error, match=match):
        expert_parallel_mlp(**args)


def _nccl_worker(rank, init_method, cases):
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=init_method,
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for case in cases:
            _check_case(case, dist.group.WORLD, device=f"cuda:{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_expert_parallel_over_nccl(tmp_path):
    """The same checks with NCCL, one GPU per rank (spawned: CUDA does not survive a fork)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL needs one GPU per rank: 2 needed, {torch.cuda.device_count()} found")
    cases = [
        _case("no_tokens_on_0", (0, 37), seed=50, shared_expert_size=SHARED),
        _case("all_to_1", (29, 41), seed=60, receivers=(1,), recompute_dispatch=False),
    ]
    mp.spawn(_nccl_worker, args=(f"file://{tmp_path / 'store'}", cases), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------
# The Megatron-style layer with expert_model_parallel_size = 2


def _megatron_config(**fields):
    """A megatron-core TransformerConfig look-alike: biases, Megatron's init methods."""
    return types.SimpleNamespace(
        hidden_size=D,
        num_moe_experts=E,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=K,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=True,
        init_method=functools.partial(torch.nn.init.normal_, std=0.02),
        output_layer_init_method=functools.partial(torch.nn.init.normal_, std=0.01),
        **fields,
    )


def _megatron_worker(rank, init_method, initial, trained, x, dout, expected):
    from megatron.core import parallel_state

    from moeblaze.integrations import megatron as mb

    W = 2
    with gloo_rank(rank, W, init_method, timeout_s=60):
        torch.set_num_threads(1)
        singles = [dist.new_group([r]) for r in range(W)]  # every rank creates both
        parallel_state.initialize_model_parallel(expert_model_parallel_size=W)
        try:
            # The group from megatron-core's parallel_state; seeded as the one-rank layer was.
            torch.manual_seed(5)
            layer = mb.MoELayer(_megatron_config(expert_model_parallel_size=W))
            num_local = E // W
            assert layer.experts == slice(rank * num_local, (rank + 1) * num_local)
            for name, p in layer.named_parameters():  # the same model whatever W
                local = name in ("w13", "w2", "b13", "b2")
                want = initial[name][layer.experts] if local else initial[name]
                assert torch.equal(p, want), f"rank {rank}: initial {name}"
                assert getattr(p, "allreduce", True) is not local, f"rank {rank}: {name}"

            # This rank's own Megatron state dict (TEGroupedMLP: local experts numbered from 0).
            state = {
                "router.weight": trained["router.weight"],
                "router.bias": trained["router.bias"],
            }
            for i, e in enumerate(range(layer.experts.start, layer.experts.stop)):
                state[f"experts.linear_fc1.weight{i}"] = trained["w13"][e]
                state[f"experts.linear_fc2.weight{i}"] = trained["w2"][e]
                state[f"experts.linear_fc1.bias{i}"] = trained["b13"][e]
                state[f"experts.linear_fc2.bias{i}"] = trained["b2"][e]
            groups = types.SimpleNamespace(ep=dist.group.WORLD)  # the group from pg_collection
            layer = mb.MoELayer(
                _megatron_config(expert_model_parallel_size=W), pg_collection=groups
            )
            layer.load_megatron_state_dict(state)
            mine = slice(rank, rank + 1)  # this rank's sequence of the batch [s, b, h]
            leaf = x[:, mine].clone().requires_grad_()
            out, bias = layer(leaf)
            assert bias is None
            out.backward(dout[:, mine])
            where = f"Megatron layer, expert_model_parallel_size={W}, rank {rank}"
            assert_close(out, expected["out"][:, mine], rtol=RTOL, name=f"{where}: out")
            assert_close(leaf.grad, expected["x"][:, mine], rtol=RTOL, name=f"{where}: dx")
            for name, p in layer.named_parameters():
                if name in ("w13", "w2", "b13", "b2"):  # complete for the global batch
                    grad, want = p.grad, expected[name][layer.experts]
                else:  # replicated: Megatron's data-parallel all-reduce
                    grad, want = p.grad.clone(), expected[name]
                    dist.all_reduce(grad)
                assert_close(grad, want, rtol=RTOL, name=f"{where}: grad {name}")

            with pytest.raises(
                ValueError, match=r"expert_model_parallel_size=2 but .* has 1 ranks"
            ):
                mb.MoELayer(
                    _megatron_config(expert_model_parallel_size=W),
                    pg_collection=types.SimpleNamespace(ep=singles[rank]),
                )
        finally:
            parallel_state.destroy_model_parallel()


def test_megatron_layer_expert_parallel_over_gloo(tmp_path):
    """moeblaze.integrations.megatron.MoELayer with expert_model_parallel_size=2 over 2 gloo
    processes (the group from megatron-core's parallel_state, and from pg_collection): its
    initial model is the one-rank layer's, it loads a rank's own Megatron state dict, and its
    output, dx and gradients are the one-rank layer's on all tokens."""
    pytest.importorskip("megatron.core")
    from moeblaze.integrations import megatron as mb

    if dist.is_initialized():
        pytest.fail("a torch.distributed group is initialised in the test process")
    torch.manual_seed(5)
    layer = mb.MoELayer(_megatron_config())
    initial = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():  # Megatron starts the expert biases at zero: give them values
        layer.b13.normal_(generator=torch.Generator().manual_seed(6))
        layer.b2.normal_(generator=torch.Generator().manual_seed(7))
    trained = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x, dout = randn(5, 2, D, seed=8), randn(5, 2, D, seed=9)  # [s, b, h]: one sequence a rank
    leaf = x.clone().requires_grad_()
    out, _ = layer(leaf)
    out.backward(dout)
    expected = {
        "out": out.detach(),
        "x": leaf.grad,
        **{n: p.grad for n, p in layer.named_parameters()},
    }
    mp.start_processes(
        _megatron_worker,
        args=(f"file://{tmp_path / 'store'}", initial, trained, x, dout, expected),
        nprocs=2,
        # Spawned, not forked: a process that has run megatron-core's parallel_state before
        # (test_megatron's fixture) forks workers whose initialize_model_parallel hangs.
        start_method="spawn",
    )
