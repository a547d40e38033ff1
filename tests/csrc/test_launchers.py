"""CPU tests of the compiled kernels' Python launchers (they check every tensor before the
module is needed, naming the argument) and of the torch router reference they are tested
against, including its backward against the hand-written one of RouterTopK.

# N rows, E experts, k top-k, G groups
"""

import pytest
import torch

from moeblaze import Router
from moeblaze.kernels import compiled as moe_compiled
from moeblaze.kernels.compiled import RouterTopK, fill_routing_plan, router_topk
from moeblaze.reference import router_topk_reference, select_experts
from moeblaze.routing_plan import RoutingPlan, plan_numel
from overlap.kernels.compiled import wait_flag, wait_flag_bounded, write_flag


def _plan(num_tokens=4, top_k=2, num_experts=4, block_m=16):
    buffer = torch.empty(plan_numel(num_tokens * top_k, num_experts, block_m), dtype=torch.int32)
    return RoutingPlan.from_buffer(buffer, num_tokens * top_k, num_experts, top_k, block_m)


IDS = torch.zeros(4, 2, dtype=torch.int64)


@pytest.mark.parametrize(
    "topk_ids, error, match",
    [
        ([[0, 1]], TypeError, "topk_ids must be a torch.Tensor, got list"),
        (IDS.float(), TypeError, r"topk_ids must have dtype torch.int32 or torch.int64"),
        (IDS.to(torch.int16), TypeError, "topk_ids must have dtype"),
        (IDS.reshape(-1), ValueError, r"topk_ids must have 2 dims, got shape \(8,\)"),
        (torch.zeros(2, 4, dtype=torch.int64).t(), ValueError, "topk_ids must be contiguous"),
        (IDS, ValueError, "topk_ids must be a CUDA tensor, got a tensor on cpu"),
    ],
    ids=["list", "float", "int16", "1-D", "strided", "cpu"],
)
def test_fill_routing_plan_checks_topk_ids(topk_ids, error, match):
    with pytest.raises(error, match=match):
        fill_routing_plan(topk_ids, _plan())


@pytest.mark.parametrize(
    "logits, kwargs, error, match",
    [
        (
            torch.zeros(3, 8, dtype=torch.float64),
            {},
            TypeError,
            "logits must have dtype torch.float32, got torch.float64",
        ),
        (torch.zeros(3, 8, 1), {}, ValueError, r"logits must have 2 dims, got shape \(3, 8, 1\)"),
        (torch.zeros(8, 3).t(), {}, ValueError, "logits must be contiguous"),
        (torch.zeros(3, 8), {}, ValueError, "logits must be a CUDA tensor, got a tensor on cpu"),
    ],
    ids=["float64", "3-D", "strided", "cpu"],
)
def test_router_topk_checks_logits(logits, kwargs, error, match):
    with pytest.raises(error, match=match):
        router_topk(logits, 2, "softmax", **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=9), "top_k=9 must be <= num_experts=8"),
        (dict(score_func="tanh"), "score_func='tanh' must be one of"),
        (dict(num_groups=3, topk_groups=1), "num_groups=3 must divide num_experts=8"),
        (dict(num_groups=4), "must be set together"),
        (dict(num_groups=4, topk_groups=5), r"topk_groups=5 must be in \[1, num_groups=4\]"),
        (dict(top_k=5, num_groups=4, topk_groups=2), "top_k=5 must be <= topk_groups"),
    ],
    ids=["k>E", "score_func", "groups_divide", "groups_pair", "topk_groups", "capacity"],
)
def test_router_options_are_checked(kwargs, match):
    args = dict(top_k=2, score_func="softmax") | kwargs
    with pytest.raises(ValueError, match=match):
        router_topk_reference(torch.zeros(3, 8), **args)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: write_flag(torch.zeros(4, dtype=torch.int64), 0, 1), "flags must have dtype"),
        (lambda: write_flag(torch.zeros(4, dtype=torch.int32), 0, 1), "flags must be a CUDA"),
        (lambda: wait_flag(torch.zeros(4, dtype=torch.float32), 0, 1), "flags must have dtype"),
        (
            lambda: wait_flag_bounded(
                torch.zeros(4, dtype=torch.int32), 0, 1, torch.zeros(2, dtype=torch.int32), 10, 1
            ),
            "flags must be a CUDA",
        ),
    ],
    ids=["write_int64", "write_cpu", "wait_float", "bounded_cpu"],
)
def test_flag_launchers_check_tensors(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def _router_problem(n, num_experts, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many exact ties in scores
        return torch.randint(-2, 3, (n, num_experts), generator=g).float()
    return torch.randn(n, num_experts, generator=g)


CONFIGS = {
    "softmax": dict(top_k=2, score_func="softmax"),
    "sigmoid_norm": dict(top_k=6, score_func="sigmoid"),
    "bias": dict(top_k=4, score_func="sigmoid", expert_bias=True),
    "groups_softmax": dict(top_k=4, score_func="softmax", num_groups=4, topk_groups=2),
    "groups_sigmoid": dict(
        top_k=8, score_func="sigmoid", num_groups=8, topk_groups=4, expert_bias=True
    ),
    "no_norm": dict(top_k=3, score_func="softmax", norm_topk_prob=False),
    "sqrtsoftplus_bias_groups": dict(
        top_k=4, score_func="sqrtsoftplus", num_groups=4, topk_groups=2, expert_bias=True
    ),
}
SCORES = {
    "softmax": lambda logits: logits.softmax(-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: torch.nn.functional.softplus(logits).sqrt(),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_reference_matches_router_forward(config):
    # The reference is Router.forward's selection; without ties the two agree exactly.
    config = dict(config)
    num_experts = 32
    router = Router(
        16,
        num_experts,
        config["top_k"],
        score_func=config["score_func"],
        norm_topk_prob=config.get("norm_topk_prob", True),
        num_groups=config.get("num_groups"),
        topk_groups=config.get("topk_groups"),
        expert_bias=config.pop("expert_bias", False),
    )
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.randn(num_experts) * 0.1)
    x = torch.randn(64, 16)
    out = router(x)
    ids, weights, scores = router_topk_reference(
        out.logits, expert_bias=router.expert_bias, **config
    )
    assert torch.equal(ids, out.topk_ids)
    torch.testing.assert_close(weights, out.topk_weights, rtol=0, atol=0)
    expected_scores = SCORES[config["score_func"]](out.logits)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0)


def test_reference_breaks_ties_by_lower_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.5]])
    ids, _, _ = router_topk_reference(logits, 4, "sigmoid", norm_topk_prob=False)
    assert ids.tolist() == [[1, 2, 4, 5]]
    # Groups {0,1,2} and {3,4,5} both score 2 * sigmoid(1) (sigmoid: top-2 sum): group 0 wins.
    grouped = select_experts(logits.sigmoid(), 2, "sigmoid", num_groups=2, topk_groups=1)
    assert grouped.tolist() == [[1, 2]]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
def test_router_topk_backward_matches_autograd_of_the_reference(score_func, norm, monkeypatch):
    # RouterTopK's forward is the compiled kernel; on CPU the reference stands in for it, so
    # this checks the hand-written backward against autograd through the torch reference.
    monkeypatch.setattr(moe_compiled, "router_topk", router_topk_reference)
    logits = _router_problem(24, 16, seed=3).double()
    logits[0, :4] = torch.tensor([25.0, 20.5, 19.5, -30.0])  # past and near softplus's threshold
    g = torch.Generator().manual_seed(4)
    grad_weights = torch.randn(24, 4, generator=g, dtype=torch.float64)
    grad_scores = torch.randn(24, 16, generator=g, dtype=torch.float64)

    def grads(fn):
        x = logits.clone().requires_grad_()
        _, weights, scores = fn(x, 4, score_func, None, None, None, norm)
        torch.autograd.backward((weights, scores), (grad_weights, grad_scores))
        return x.grad

    expected = grads(router_topk_reference)
    actual = grads(RouterTopK.apply)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_select_experts_of_tied_scores_is_a_stable_order():
    scores = _router_problem(50, 12, seed=1, ties=True).sigmoid()
    ids = select_experts(scores, 5, "sigmoid")
    for row, chosen in zip(scores, ids, strict=True):
        order = sorted(range(12), key=lambda e: (-row[e].item(), e))
        assert chosen.tolist() == order[:5]
