"""Router tests: selection and weights against plain torch, group-limited routing against a
per-token loop, expert-bias balancing, aux/z-loss values and their injected gradients, errors.

# N tokens, d hidden, E experts, k top-k, G expert groups
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from overlap_testing import gloo_rank

from moeblaze.router import Router, RouterOutput

D, E = 24, 12


SCORE_FUNCS = ["softmax", "sigmoid", "sqrtsoftplus"]


def _x(n, d=D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype)


def _router(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("top_k", 3)
    return Router(D, kwargs.pop("num_experts", E), kwargs.pop("top_k"), **kwargs)


def _scores(logits, score_func):
    if score_func == "sqrtsoftplus":  # DeepSeek-V4's: sqrt(log(1 + e^x)), x beyond 20
        return torch.where(logits > 20, logits, torch.log1p(logits.exp())).sqrt()
    return logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()


def _normalise(w):
    return w / w.sum(-1, keepdim=True)


def _hand_losses(logits, topk_ids, score_func, num_experts):
    """Switch load-balancing loss and z-loss written out directly (differentiable in logits)."""
    n, k = topk_ids.shape
    probs = _scores(logits, score_func)
    if score_func != "softmax":
        probs = _normalise(probs)
    f = torch.stack([(topk_ids == e).sum() for e in range(num_experts)]).float() / (n * k)
    p = probs.mean(0)
    aux = num_experts * (f * p).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    return aux, z


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_topk_matches_plain_torch(score_func, norm):
    router = _router(score_func=score_func, norm_topk_prob=norm)
    x = _x(37)
    out = router(x)
    assert isinstance(out, RouterOutput)

    logits = x @ router.weight.detach().T
    scores = _scores(logits, score_func)
    ref_w, ref_ids = scores.sort(-1, descending=True)
    ref_w, ref_ids = ref_w[:, :3], ref_ids[:, :3]
    if norm:
        ref_w = _normalise(ref_w)
    assert out.topk_ids.dtype == torch.int64 and out.topk_weights.dtype == torch.float32
    assert torch.equal(out.topk_ids, ref_ids)
    torch.testing.assert_close(out.topk_weights, ref_w)
    torch.testing.assert_close(out.logits, logits)
    if norm:
        torch.testing.assert_close(out.topk_weights.sum(-1), torch.ones(37))


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_replay_ids_route_to_the_given_experts(score_func, norm):
    """replay_ids: the given experts (an expert bias and the scaling factor as usual: the bias
    takes no part, the factor scales), weighted by their scores, renormalised over the slots
    that go somewhere (-1: nowhere, weight 0); the counts are the replayed ids'."""
    router = _router(
        score_func=score_func, norm_topk_prob=norm, expert_bias=True, topk_scaling_factor=2.0
    )
    router.expert_bias.copy_(torch.linspace(-3, 3, E))
    x = _x(9)
    replay = torch.stack(
        [torch.randperm(E, generator=torch.Generator().manual_seed(t))[:3] for t in range(9)]
    )
    replay[4, 1] = -1
    out = router(x, replay_ids=replay.to(torch.int32))
    scores = _scores(x @ router.weight.detach().T, score_func)
    expected = scores.gather(1, replay.clamp_min(0)) * (replay >= 0)
    if norm:
        expected = _normalise(expected)
    assert out.topk_ids.dtype == torch.int64 and torch.equal(out.topk_ids, replay)
    assert torch.equal(out.chosen_ids, replay)
    torch.testing.assert_close(out.topk_weights, 2.0 * expected)
    assert out.topk_weights[4, 1] == 0
    counts = torch.bincount(replay[replay >= 0], minlength=E)
    assert torch.equal(out.tokens_per_expert, counts)
    out.topk_weights.sum().backward()
    assert router.weight.grad.abs().sum() > 0
    for bad, what in [
        (replay[:, :2], r"torch.int64 \(9, 2\)"),
        (replay.float(), r"torch.float32 \(9, 3\)"),
    ]:
        with pytest.raises(
            ValueError,
            match=r"replay_ids must be integer \[N=9, top_k=3\] on cpu, got " + what,
        ):
            router(x, replay_ids=bad)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_float64_routing(score_func):
    """routing_dtype=torch.float64: logits, weights and losses in float64 (to float64 rounding
    of a float64 reference), the injected losses' gradient too."""
    router = _router(
        score_func=score_func,
        aux_loss_coeff=0.1,
        z_loss_coeff=0.01,
        bias=True,
        routing_dtype=torch.float64,
    )
    x = _x(40).to(torch.bfloat16)
    out = router(x)
    logits = x.double() @ router.weight.detach().double().T + router.bias.detach().double()
    ref_w, ref_ids = _scores(logits, score_func).topk(3, dim=-1)
    assert out.logits.dtype == out.topk_weights.dtype == out.aux_loss.dtype == torch.float64
    assert torch.equal(out.topk_ids, ref_ids)
    torch.testing.assert_close(out.topk_weights, _normalise(ref_w), rtol=1e-12, atol=0)
    aux, z = _hand_losses(logits, ref_ids, score_func, E)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.z_loss, z, rtol=1e-12, atol=0)
    out.topk_weights.sum().backward()
    assert router.weight.grad.dtype == torch.float32 and router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"routing_dtype=torch.bfloat16 must be torch.float32"):
        Router(D, E, 3, routing_dtype=torch.bfloat16)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_gate_bias_shifts_logits_and_learns(score_func):
    """`bias=True`: logits = x @ weight.T + bias, so it changes the choice and the weights, and
    its gradient is that of a plain-torch float64 router."""
    router = _router(score_func=score_func, bias=True)
    assert router.bias.shape == (E,) and "bias" in dict(router.named_parameters())
    assert router.bias.abs().max() <= 1 / D**0.5 and router.bias.std() > 0  # nn.Linear's init
    with torch.no_grad():
        router.bias.copy_(torch.linspace(-2.0, 2.0, E))  # large enough to change choices
    x = _x(37)
    upstream = torch.randn(37, 3, generator=torch.Generator().manual_seed(5))
    out = router(x)
    (out.topk_weights * upstream).sum().backward()

    weight = router.weight.detach().double().requires_grad_()
    bias = router.bias.detach().double().requires_grad_()
    logits = x.double() @ weight.T + bias
    top, ids = _scores(logits, score_func).topk(3, dim=-1)
    (_normalise(top) * upstream.double()).sum().backward()
    assert torch.equal(out.topk_ids, ids)
    assert not torch.equal(ids, (x.double() @ weight.T).topk(3, dim=-1).indices)
    torch.testing.assert_close(out.logits, logits.float())
    torch.testing.assert_close(out.topk_weights, _normalise(top).float())
    torch.testing.assert_close(router.bias.grad, bias.grad.float())
    torch.testing.assert_close(router.weight.grad, weight.grad.float())
    assert "bias=True" in repr(router)


def test_low_precision_input_routes_in_float32():
    router = _router().to(torch.bfloat16)
    x = _x(19, dtype=torch.bfloat16)
    out = router(x)
    ref = x.float() @ router.weight.float().T
    assert out.logits.dtype == torch.float32 and out.topk_weights.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref)
    assert torch.equal(out.topk_ids, ref.softmax(-1).topk(3, -1).indices)


def _group_reference(scores, bias, num_groups, topk_groups, k, score_func, per_group=None):
    """Per-token loop: rank groups (by the sum of their top `per_group` values: by default 2
    for sigmoid and sqrtsoftplus, 1 for softmax), then rank experts inside the kept groups."""
    n, num_experts = scores.shape
    size = num_experts // num_groups
    choice = scores + bias
    ids = torch.empty(n, k, dtype=torch.int64)
    for t in range(n):
        group_scores = []
        for g in range(num_groups):
            members = sorted(choice[t, g * size : (g + 1) * size].tolist(), reverse=True)
            top = per_group or (1 if score_func == "softmax" else 2)
            group_scores.append(sum(members[:top]))
        kept = sorted(range(num_groups), key=lambda g: -group_scores[g])[:topk_groups]
        candidates = [e for e in range(num_experts) if e // size in kept]
        ids[t] = torch.tensor(sorted(candidates, key=lambda e: -choice[t, e].item())[:k])
    return ids


@pytest.mark.parametrize("per_group", [None, 1, 3], ids=["default", "top1", "top3"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_group_limited_routing(score_func, with_bias, per_group):
    groups, topk_groups, k = 4, 2, 4
    router = _router(
        score_func=score_func,
        top_k=k,
        num_groups=groups,
        topk_groups=topk_groups,
        group_score_topk=per_group,
        expert_bias=with_bias,
    )
    bias = torch.zeros(E)
    if with_bias:
        # Comparable to the spread of the scores, so it reorders experts without dominating.
        bias = torch.linspace(-0.2, 0.3, E) * (0.1 if score_func == "softmax" else 1.0)
        router.expert_bias.copy_(bias)
    x = _x(41, seed=1)
    out = router(x)

    scores = _scores(x @ router.weight.detach().T, score_func)
    ref_ids = _group_reference(scores, bias, groups, topk_groups, k, score_func, per_group)
    assert torch.equal(out.topk_ids, ref_ids)
    # Every token uses at most topk_groups groups, and weights are the unbiased scores.
    used_groups = out.topk_ids // (E // groups)
    assert all(len(set(row.tolist())) <= topk_groups for row in used_groups)
    torch.testing.assert_close(out.topk_weights, _normalise(scores.gather(1, ref_ids)))
    # Group limiting really constrains the choice here: plain top-k differs for some token.
    assert not torch.equal(out.topk_ids, (scores + bias).topk(k, -1).indices)


def test_group_scores_from_the_logits():
    """group_score_from="logits": a group scores the sum of its best logits (Megatron's softmax
    without pre-softmax), which can pick another group than the sum of its scores; the experts
    within the group and the weights (the scores) are the same rule."""
    x = torch.tensor([[3.0, -10.0, 1.0, 0.9]])  # logits sums: -7 | 1.9; scores: 0.86 | 0.14
    chosen = {}
    for source in ("scores", "logits"):
        router = Router(4, 4, 2, num_groups=2, topk_groups=1, group_score_topk=2,
                        group_score_from=source)  # fmt: skip
        with torch.no_grad():
            router.weight.copy_(torch.eye(4))
        out = router(x)
        chosen[source] = out.topk_ids.tolist()
        torch.testing.assert_close(
            out.topk_weights, _normalise(x.softmax(-1).gather(1, out.topk_ids))
        )
    assert chosen == {"scores": [[0, 1]], "logits": [[2, 3]]}
    with pytest.raises(ValueError, match=r"group_score_from='sum' must be one of"):
        Router(4, 4, 2, group_score_from="sum")
    with pytest.raises(ValueError, match=r"with expert_bias=True: the expert bias is added to"):
        Router(4, 4, 2, num_groups=2, topk_groups=1, group_score_from="logits", expert_bias=True)


def test_expert_bias_changes_selection_not_weights():
    plain = _router(score_func="sigmoid")
    biased = _router(score_func="sigmoid", expert_bias=True)
    biased.load_state_dict(plain.state_dict(), strict=False)
    biased.expert_bias[5] = 10.0
    x = _x(23, seed=2)
    ref, out = plain(x), biased(x)

    assert (out.topk_ids[:, 0] == 5).all()
    assert not torch.equal(out.topk_ids, ref.topk_ids)
    scores = (x @ plain.weight.detach().T).sigmoid()
    torch.testing.assert_close(out.topk_weights, _normalise(scores.gather(1, out.topk_ids)))


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
def test_topk_scaling_factor_multiplies_the_weights_after_renormalisation(norm):
    plain = _router(score_func="sigmoid", norm_topk_prob=norm, aux_loss_coeff=0.1)
    scaled = _router(
        score_func="sigmoid", norm_topk_prob=norm, aux_loss_coeff=0.1, topk_scaling_factor=2.5
    )
    scaled.load_state_dict(plain.state_dict())
    x = _x(29, seed=4)
    ref, out = plain(x), scaled(x)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    torch.testing.assert_close(out.topk_weights, 2.5 * ref.topk_weights)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)  # from the scores, not the weights
    upstream = torch.randn(ref.topk_weights.shape, generator=torch.Generator().manual_seed(5))
    (ref.topk_weights * upstream).sum().backward()
    (out.topk_weights * upstream / 2.5).sum().backward()
    torch.testing.assert_close(scaled.weight.grad, plain.weight.grad)
    assert "topk_scaling_factor=2.5" in repr(scaled) and "scaling" not in repr(plain)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_update_expert_bias_moves_toward_balance(score_func):
    router = _router(score_func=score_func, expert_bias=True)
    x = _x(64, seed=4) + _x(1, seed=3)  # a shared offset makes a few experts popular

    def spread(counts):  # coefficient of variation of the per-expert counts
        counts = counts.float()
        return (counts.std() / counts.mean()).item()

    first = router(x).tokens_per_expert
    assert torch.equal(router.tokens_per_expert_accum, first)
    router.update_expert_bias(update_rate=0.01)
    expected = 0.01 * torch.sign(first.float().mean() - first.float())
    torch.testing.assert_close(router.expert_bias, expected)
    assert router.expert_bias[first.argmax()] < 0 and router.expert_bias[first.argmin()] > 0
    assert not router.tokens_per_expert_accum.any()

    for _ in range(50):
        router(x)
        router.update_expert_bias(update_rate=0.01)
    assert spread(router(x).tokens_per_expert) < 0.5 * spread(first)

    router.eval()
    router.tokens_per_expert_accum.zero_()
    router(x)
    assert not router.tokens_per_expert_accum.any(), "eval forwards must not count"


def test_update_expert_bias_needs_expert_bias():
    with pytest.raises(RuntimeError, match="expert_bias=True"):
        _router().update_expert_bias()


def test_expert_bias_stays_float32_under_dtype_casts():
    router = _router(expert_bias=True).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32
    assert router.tokens_per_expert_accum.dtype == torch.int64
    assert "expert_bias" in router.state_dict()
    assert "tokens_per_expert_accum" not in router.state_dict()


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_loss_values_match_hand_computation(score_func):
    router = _router(score_func=score_func, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    out = router(_x(29, seed=5))
    aux, z = _hand_losses(out.logits.detach(), out.topk_ids, score_func, E)
    torch.testing.assert_close(out.aux_loss, aux)
    assert out.z_loss.dtype == torch.float64  # logsumexp ~1e20 would square past float32
    torch.testing.assert_close(out.z_loss.float(), z)
    torch.testing.assert_close(out.router_loss, 0.01 * aux + 0.001 * z)
    assert not (out.aux_loss.requires_grad or out.z_loss.requires_grad)
    assert not out.router_loss.requires_grad


def test_aux_loss_is_one_at_perfect_balance():
    router = Router(4, 4, 1)
    with torch.no_grad():
        router.weight.copy_(2.0 * torch.eye(4))
    balanced = router(torch.eye(4))  # token t prefers expert t, probabilities symmetric
    assert torch.equal(balanced.tokens_per_expert, torch.ones(4, dtype=torch.int64))
    torch.testing.assert_close(balanced.aux_loss, torch.tensor(1.0))
    skewed = router(torch.eye(4)[[0, 0, 0, 1]])
    assert skewed.aux_loss > 1.5


def _grads(router, x, c, extra=None):
    router.zero_grad()
    x = x.detach().requires_grad_(True)
    out = router(x)
    loss = (out.topk_weights * c).sum()
    if extra is not None:
        loss = loss + extra(out)
    loss.backward()
    return router.weight.grad.clone(), x.grad.clone()


@pytest.mark.parametrize(
    "aux_coeff, z_coeff", [(0.5, 0.0), (0.0, 0.05), (0.5, 0.05)], ids=["aux", "z", "both"]
)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_losses_reach_gradient_through_injection(score_func, norm, aux_coeff, z_coeff):
    kwargs = dict(score_func=score_func, norm_topk_prob=norm, seed=6)
    injected = _router(aux_loss_coeff=aux_coeff, z_loss_coeff=z_coeff, **kwargs)
    with torch.no_grad():
        injected.weight *= 4.0  # sharper probabilities, so the aux-loss gradient is not tiny
    by_hand = _router(**kwargs)
    by_hand.load_state_dict(injected.state_dict())
    x, c = _x(31, seed=7), _x(31, d=3, seed=8)

    def hand_loss(out):
        aux, z = _hand_losses(out.logits, out.topk_ids, score_func, E)
        return aux_coeff * aux + z_coeff * z

    got = _grads(injected, x, c)
    want = _grads(by_hand, x, c, extra=hand_loss)
    plain = _grads(by_hand, x, c)
    for g, w, p in zip(got, want, plain, strict=True):
        torch.testing.assert_close(g, w)
        assert (g - p).abs().max() > 1e-4, "the injected loss must change the gradient"


def test_aux_loss_scale_multiplies_injected_gradient(monkeypatch):
    injected = _router(aux_loss_coeff=0.1, z_loss_coeff=0.05)
    by_hand = _router()
    by_hand.load_state_dict(injected.state_dict())
    x, c = _x(17, seed=9), _x(17, d=3, seed=10)

    def hand_loss(out):
        aux, z = _hand_losses(out.logits, out.topk_ids, "softmax", E)
        return 0.25 * (0.1 * aux + 0.05 * z)

    want = _grads(by_hand, x, c, extra=hand_loss)
    monkeypatch.setattr(Router, "aux_loss_scale", Router.aux_loss_scale)  # restored afterwards
    Router.set_aux_loss_scale(0.25)
    for g, w in zip(_grads(injected, x, c), want, strict=True):
        torch.testing.assert_close(g, w)
    Router.set_aux_loss_scale(1.0)
    injected.aux_loss_scale = 0.25  # per-instance override
    for g, w in zip(_grads(injected, x, c), want, strict=True):
        torch.testing.assert_close(g, w)


def _hand_sequence_loss(logits, ids, sequence_ids, num_sequences, score_func):
    """The switch loss of each sequence's tokens on its own (a loop), averaged over sequences."""
    losses = []
    for j in range(num_sequences):
        mine = sequence_ids == j
        aux, _ = _hand_losses(logits[mine], ids[mine], score_func, E)
        losses.append(aux)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_sequence_loss_matches_a_loop_over_sequences(score_func):
    """seq_aux_loss over uneven, interleaved sequences: value, and gradient through injection."""
    g = torch.Generator().manual_seed(11)
    sequence_ids = torch.randint(0, 4, (41,), generator=g)  # 4 sequences, interleaved, uneven
    x, c = _x(41, seed=12), _x(41, d=3, seed=13)
    kwargs = dict(score_func=score_func, seed=6)
    injected = _router(seq_aux_loss_coeff=0.5, **kwargs)
    with torch.no_grad():
        injected.weight *= 4.0  # sharper probabilities, so the loss gradient is not tiny
    by_hand = _router(**kwargs)
    by_hand.load_state_dict(injected.state_dict())

    out = injected(x, sequence_ids, 4)
    want = _hand_sequence_loss(out.logits.detach(), out.topk_ids, sequence_ids, 4, score_func)
    torch.testing.assert_close(out.seq_aux_loss, want)
    torch.testing.assert_close(out.router_loss, 0.5 * want)

    def run(router, extra=None):
        router.zero_grad()
        leaf = x.clone().requires_grad_()
        routed = router(leaf, sequence_ids, 4)
        loss = (routed.topk_weights * c).sum()
        if extra is not None:
            loss = loss + 0.5 * _hand_sequence_loss(
                routed.logits, routed.topk_ids, sequence_ids, 4, score_func
            )
        loss.backward()
        return router.weight.grad.clone(), leaf.grad.clone()

    got, wanted, plain = run(injected), run(by_hand, extra=True), run(by_hand)
    for a, w, p in zip(got, wanted, plain, strict=True):
        torch.testing.assert_close(a, w)
        assert (a - p).abs().max() > 1e-4, "the injected loss must change the gradient"


def test_aux_counts_scores_ignore_expert_bias_and_groups():
    """aux_counts="scores": the balancing losses count the plain top-k of the scores, whatever
    the expert bias and the group limit chose; "routed" counts the choices."""
    x, sequence_ids = _x(33, seed=14), torch.arange(33) % 3
    options = dict(score_func="sigmoid", expert_bias=True, num_groups=4, topk_groups=1, seed=3)
    routers = {c: _router(aux_counts=c, **options) for c in ("routed", "scores")}
    for router in routers.values():
        router.expert_bias.copy_(torch.linspace(0.3, -0.3, E))
    outs = {c: r(x, sequence_ids, 3) for c, r in routers.items()}
    plain = outs["scores"].logits.sigmoid().topk(3, dim=-1).indices  # [N, k]
    assert torch.equal(outs["scores"].topk_ids, outs["routed"].topk_ids)
    assert not torch.equal(plain.sort(-1).values, outs["routed"].topk_ids.sort(-1).values)
    for counts, ids in (("scores", plain), ("routed", outs["routed"].topk_ids)):
        out = outs[counts]
        aux, _ = _hand_losses(out.logits, ids, "sigmoid", E)
        torch.testing.assert_close(out.aux_loss, aux)
        seq = _hand_sequence_loss(out.logits, ids, sequence_ids, 3, "sigmoid")
        torch.testing.assert_close(out.seq_aux_loss, seq)


def test_sequence_loss_errors():
    router = _router(seq_aux_loss_coeff=0.1)
    with pytest.raises(ValueError, match=r"seq_aux_loss_coeff=0.1 needs sequence_ids"):
        router(_x(5))
    with pytest.raises(ValueError, match=r"sequence_ids must be int32 or int64 \[N=5\]"):
        router(_x(5), torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"num_sequences must be an int >= 0"):
        router(_x(5), torch.zeros(5, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"aux_counts='plain' must be one of"):
        _router(aux_counts="plain")
    with pytest.raises(ValueError, match=r"seq_aux_loss_coeff=-1.0 must be >= 0"):
        _router(seq_aux_loss_coeff=-1.0)


@pytest.mark.parametrize("case", ["coeff_zero", "eval"])
def test_no_injection_when_disabled(case):
    coeff = 0.0 if case == "coeff_zero" else 0.1
    router = _router(aux_loss_coeff=coeff, z_loss_coeff=coeff)
    reference = _router()
    reference.load_state_dict(router.state_dict())
    if case == "eval":
        router.eval()
    x, c = _x(13, seed=11), _x(13, d=3, seed=12)
    for g, w in zip(_grads(router, x, c), _grads(reference, x, c), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert router(x).aux_loss > 0  # still computed for logging


def test_no_graph_under_no_grad():
    router = _router(aux_loss_coeff=0.1)
    with torch.no_grad():
        out = router(_x(5))
    assert not out.topk_weights.requires_grad


def test_tokens_per_expert_counts_slots():
    router = _router(top_k=4)
    out = router(_x(53, seed=13))
    assert out.tokens_per_expert.dtype == torch.int64 and out.tokens_per_expert.shape == (E,)
    assert out.tokens_per_expert.sum() == 53 * 4
    assert torch.equal(out.tokens_per_expert, torch.bincount(out.topk_ids.flatten(), minlength=E))


def test_k_equals_num_experts():
    router = _router(top_k=E)
    out = router(_x(7))
    assert torch.equal(out.topk_ids.sort(-1).values, torch.arange(E).expand(7, E))
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.ones(7))


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(n):
    router = _router(score_func="sigmoid", expert_bias=True, aux_loss_coeff=0.1, z_loss_coeff=0.1)
    x = _x(n).requires_grad_(True)
    out = router(x)
    assert out.topk_ids.shape == (n, 3) and out.topk_weights.shape == (n, 3)
    assert out.logits.shape == (n, E) and out.tokens_per_expert.sum() == n * 3
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)
    if n == 0:
        assert out.aux_loss == 0 and out.z_loss == 0
    (out.topk_weights * 2.0).sum().backward()
    assert torch.isfinite(router.weight.grad).all()
    assert x.grad.shape == (n, D)


def test_layout_and_init():
    router = Router(D, E, 2, dtype=torch.float64)
    assert router.weight.shape == (E, D) and router.weight.dtype == torch.float64
    bound = 1 / D**0.5  # nn.Linear init
    assert router.weight.abs().max() <= bound and router.weight.std() > bound / 4
    assert router.expert_bias is None and router.bias is None


def test_profile_range():
    router = _router()
    with torch.profiler.profile() as prof:
        router(_x(4))
    assert "moeblaze.router" in {e.name for e in prof.events()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=0), r"top_k=0 must be >= 1"),
        (dict(top_k=E + 1), rf"top_k={E + 1} must be <= num_experts={E}"),
        (dict(score_func="relu"), r"score_func='relu' must be one of"),
        (dict(num_groups=4), r"num_groups=4 and topk_groups=None must be set together"),
        (dict(num_groups=5, topk_groups=2), r"num_groups=5 must divide num_experts=12"),
        (dict(num_groups=4, topk_groups=5), r"topk_groups=5 must be in \[1, num_groups=4\]"),
        (dict(num_groups=4, topk_groups=1, top_k=4), r"top_k=4 must be <= topk_groups"),
        (
            dict(num_groups=4, topk_groups=1, group_score_topk=4),
            r"group_score_topk=4 must be in \[1, num_experts / num_groups = 3\]",
        ),
        (dict(group_score_topk=2), r"group_score_topk=2 needs num_groups and topk_groups"),
        (dict(aux_loss_coeff=-0.1), r"aux_loss_coeff=-0.1 must be >= 0"),
        (dict(z_loss_coeff=-1.0), r"z_loss_coeff=-1.0 must be >= 0"),
        (dict(topk_scaling_factor=0.0), r"topk_scaling_factor=0.0 must be a finite number > 0"),
        (dict(topk_scaling_factor=float("inf")), r"topk_scaling_factor=inf must be a finite"),
        (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be None \(no dropping\) or a"),
        (dict(capacity_factor=float("nan")), r"capacity_factor=nan must be None"),
        (dict(drop_policy="random"), r"drop_policy='random' must be one of \('probs', 'posi"),
        (dict(input_jitter_eps=0.0), r"input_jitter_eps=0.0 must be None \(no jitter\) or in"),
        (dict(input_jitter_eps=1.5), r"input_jitter_eps=1.5 must be None"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _router(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hidden_size=32.0), TypeError, r"hidden_size must be an int, got float 32.0"),
        (dict(num_experts=4.0), TypeError, r"num_experts must be an int, got float"),
        (dict(top_k=2.0), TypeError, r"top_k must be an int, got float"),
        (dict(top_k="2"), TypeError, r"top_k must be an int, got str '2'"),
        (dict(top_k=True), TypeError, r"top_k must be an int, got bool"),
        (dict(num_groups=4.0, topk_groups=2), TypeError, r"num_groups must be an int"),
        (dict(aux_loss_coeff="0.1"), TypeError, r"aux_loss_coeff must be a number, got str"),
        (dict(z_loss_coeff=float("inf")), ValueError, r"z_loss_coeff=inf must be >= 0 and fin"),
        (dict(aux_loss_coeff=float("nan")), ValueError, r"aux_loss_coeff=nan must be >= 0"),
        (dict(capacity_factor="1"), TypeError, r"capacity_factor must be a number, got str"),
        (dict(norm_topk_prob="no"), TypeError, r"norm_topk_prob must be a bool, got str 'no'"),
        (dict(bias="yes"), TypeError, r"bias must be a bool, got str"),
        (dict(expert_bias=1), TypeError, r"expert_bias must be a bool, got int 1"),
        (dict(random_logits="yes"), TypeError, r"random_logits must be a bool, got str"),
        (dict(dtype=torch.int32), TypeError, r"dtype must be None or a floating-point torch"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_options_of_the_wrong_type_or_not_finite(kwargs, error, match):
    # Named before torch or arithmetic sees them (a str coefficient compared with 0, a truthy
    # string taken as True, an inf z-loss coefficient giving non-finite gradients).
    args = dict(hidden_size=D, num_experts=E, top_k=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Router(args.pop("hidden_size"), args.pop("num_experts"), args.pop("top_k"), **args)


def test_input_jitter_scales_the_routers_input_in_training_only():
    """Training: logits of x * noise, noise uniform in [1 - eps, 1 + eps] drawn from the default
    generator, dx through the noise, and a checkpointed recompute draws the same noise. Eval:
    the plain logits."""
    eps = 0.25
    router, plain = _router(input_jitter_eps=eps), _router()
    x = _x(40).requires_grad_()
    torch.manual_seed(3)
    out = router(x)
    torch.manual_seed(3)
    noise = (1 - eps) + torch.rand(x.shape) * (2 * eps)
    assert noise.min() < 1 - eps / 2 and noise.max() > 1 + eps / 2  # the noise is noticeable
    expected = (x * noise) @ router.weight.t()
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(out.logits.shape)
    (out.logits * upstream).sum().backward()
    torch.testing.assert_close(x.grad, noise * (upstream @ router.weight), rtol=1e-5, atol=1e-6)
    dx = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    logits = torch.utils.checkpoint.checkpoint(lambda t: router(t).logits, x, use_reentrant=False)
    (logits * upstream).sum().backward()
    torch.testing.assert_close(x.grad, dx, rtol=0, atol=0)
    router.eval()
    assert torch.equal(router(x).logits, plain.eval()(x).logits)


def test_random_logits_route_at_random_with_the_real_logits_gradient():
    """The logits are standard normal draws (the default generator's), whatever the router's
    weights: every expert gets about N*k/E slots even when the weights send every token to
    expert 0; the gradient reaching the logits goes to the weights as the real logits'."""
    router = _router(random_logits=True, top_k=2)
    with torch.no_grad():
        router.weight[0] = 10.0  # without random logits, expert 0 in every token's top-k
    x = _x(3000).abs()
    torch.manual_seed(4)
    out = router(x)
    torch.manual_seed(4)
    assert torch.equal(out.logits, torch.randn(3000, E))
    mean = 3000 * 2 / E
    assert (out.tokens_per_expert - mean).abs().max() < 0.15 * mean, out.tokens_per_expert
    upstream = torch.randn(out.logits.shape)
    (out.logits * upstream).sum().backward()
    torch.testing.assert_close(router.weight.grad, upstream.t() @ x, rtol=1e-5, atol=1e-4)


def test_top_k_error_message():
    with pytest.raises(ValueError, match=r"^top_k=9 must be <= num_experts=8$"):
        Router(16, 8, 9)


def test_bad_inputs():
    router = _router()
    with pytest.raises(
        ValueError, match=r"x must have shape \[N, hidden_size=24\], got \(2, 3, 24"
    ):
        router(_x(6).view(2, 3, D))
    with pytest.raises(ValueError, match=r"hidden_size=24.*got \(5, 23\)"):
        router(_x(5, d=23))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int"):
        router(torch.arange(2 * D).view(2, D))
    bad = _x(4)
    bad[2, 7] = float("inf")
    with pytest.raises(ValueError, match=r"router logits contain non-finite values"):
        router(bad)
    bad[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"router logits contain non-finite values"):
        router(bad)


def test_huge_logits_log_a_finite_z_loss_and_router_loss():
    """Logits near 1e20 (finite) square past float32: the z-loss is kept in float64, and with
    z_loss_coeff=0 the z-loss is no term of the injected loss (no 0 * inf = NaN)."""
    router = _router(aux_loss_coeff=0.1)
    with torch.no_grad():
        router.weight.mul_(1e19)
    out = router(_x(16))
    assert float(out.z_loss) > 1e36 and torch.isfinite(out.z_loss)
    assert torch.isfinite(out.router_loss)
    assert torch.allclose(out.router_loss, 0.1 * out.aux_loss)


def test_logits_stay_float32_under_autocast():
    router = _router()
    x = _x(8)
    expected = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.topk_ids, expected.topk_ids)


def test_checkpoint_recompute_does_not_count_choices_twice():
    router = _router(expert_bias=True, score_func="sigmoid")
    x = _x(30).requires_grad_()
    out = torch.utils.checkpoint.checkpoint(
        lambda t: router(t).topk_weights, x, use_reentrant=False
    )
    out.sum().backward()
    assert int(router.tokens_per_expert_accum.sum()) == 30 * router.top_k


def test_global_aux_loss_averages_the_counts_of_the_training_forwards():
    """The global loss takes the counts averaged over the training forwards since the last
    reset (one process: no group to sum over); outside training, or right after a reset, the
    forward's own counts, where it equals the micro-batch loss."""
    router = _router(global_aux_loss_coeff=0.1).train()
    x1, x2 = _x(40, seed=1), _x(40, seed=2)
    first, second = router(x1), router(x2)
    assert torch.equal(first.global_aux_loss, first.aux_loss)
    counts = (first.tokens_per_expert + second.tokens_per_expert).float() / 2
    averaged = router._load_balancing_loss(_scores(second.logits, "softmax"), counts)  # probs
    torch.testing.assert_close(second.global_aux_loss, averaged.detach())
    assert not torch.allclose(second.global_aux_loss, second.aux_loss)
    with torch.no_grad():
        assert torch.equal(router(x2).global_aux_loss, second.aux_loss)
    router.reset_global_aux_loss_tracker()
    assert torch.equal(router(x2).global_aux_loss, second.aux_loss)
    assert router.global_aux_steps == 1


@pytest.mark.parametrize(
    "options",
    [
        dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.2, z_loss_coeff=0.01),
        dict(
            score_func="sigmoid",
            expert_bias=True,
            num_groups=3,
            topk_groups=2,
            aux_counts="scores",
            aux_loss_coeff=0.1,
            seq_aux_loss_coeff=0.2,
            global_aux_loss_coeff=0.3,
        ),
    ],
    ids=["softmax", "sigmoid_bias_groups_scores"],
)
def test_token_mask_counts_as_if_the_padding_were_not_there(options):
    """Tokens outside `token_mask` (padding: a different number in each sequence, one sequence
    all padding) leave every loss, the injected gradient and the expert-bias counts as the real
    tokens routed alone give them; they are still routed."""
    n, num_sequences = 30, 4
    x = _x(n, seed=3)
    sequence_ids = torch.arange(n) % num_sequences
    mask = torch.ones(n, dtype=torch.bool)
    mask[[0, 5, 9, 13, 17, 21, 25]] = False  # sequence 1 loses 5 of its 8, sequence 0 one
    mask[sequence_ids == 3] = False
    upstream = torch.randn(n, 3, generator=torch.Generator().manual_seed(4))
    runs = {}
    for name, rows, token_mask in (("masked", slice(None), mask), ("alone", mask, None)):
        router = _router(**options).train()
        if router.expert_bias is not None:
            router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
        out = router(x[rows], sequence_ids[rows], num_sequences, token_mask=token_mask)
        weights = out.topk_weights if token_mask is None else out.topk_weights[mask]
        (weights * upstream[mask]).sum().backward()
        runs[name] = (router, out)
    (masked, out), (alone, expected) = runs["masked"], runs["alone"]
    assert torch.equal(out.topk_ids[mask], expected.topk_ids)
    assert int(out.tokens_per_expert.sum()) == n * 3  # every token routed
    for loss in ("aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(out, loss), getattr(expected, loss), msg=loss)
    torch.testing.assert_close(masked.weight.grad, alone.weight.grad)
    if masked.expert_bias is not None:
        assert torch.equal(masked.tokens_per_expert_accum, alone.tokens_per_expert_accum)
        assert masked.tokens_per_expert_accum.sum() == int(mask.sum()) * 3
        assert torch.equal(masked.global_tokens_per_expert, alone.global_tokens_per_expert)


def test_token_mask_errors():
    router = _router()
    with pytest.raises(ValueError, match=r"token_mask must be bool \[N=5\] .* got torch.int64"):
        router(_x(5), token_mask=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"got torch.bool \(4,\)"):
        router(_x(5), token_mask=torch.ones(4, dtype=torch.bool))


def _kept_by_loop(topk_ids, topk_weights, capacity, policy):
    """[N, k] bool: the slots each expert keeps, expert by expert: its `capacity` largest weights
    (ties: the earlier token) or its `capacity` earliest tokens."""
    keep = torch.zeros_like(topk_ids, dtype=torch.bool)
    for e in topk_ids.unique().tolist():
        if e < 0:  # a replayed slot of no expert
            continue
        tokens, choices = torch.where(topk_ids == e)
        if policy == "probs":
            weights = topk_weights[tokens, choices].tolist()
            ranked = sorted(range(len(tokens)), key=lambda i: (-weights[i], int(tokens[i])))
        else:
            ranked = range(len(tokens))  # torch.where lists them in token order
        for i in list(ranked)[:capacity]:
            keep[tokens[i], choices[i]] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize(
    "factor, top_k, num_experts", [(1.0, 3, E), (0.5, 2, 6), (1.25, 1, 4), (2.0, 3, E)]
)
def test_capacity_drops_the_slots_past_each_experts_capacity(factor, top_k, num_experts, policy):
    """Against a loop over the experts: ids DROPPED and weights 0 past capacity (weights
    renormalised before dropping), tokens_per_expert and the expert-bias counts those kept, the
    balancing losses those chosen, and no gradient through a dropped weight."""
    n = 40
    options = dict(top_k=top_k, num_experts=num_experts, aux_loss_coeff=0.1, expert_bias=True)
    x = _x(n, seed=5)
    x[7] = x[3]  # tokens 3 and 7 tie for every expert: the earlier one is kept first
    plain = _router(**options).train()
    router = _router(**options, capacity_factor=factor, drop_policy=policy).train()
    expected, out = plain(x), router(x)
    capacity = -(-n * top_k * factor // num_experts)  # ceil
    keep = _kept_by_loop(expected.topk_ids, expected.topk_weights.detach(), int(capacity), policy)
    if factor == 2.0:
        assert keep.all(), "the case is meant to fit every token"
    else:
        assert not keep.all(), "the case is meant to drop slots"
    assert torch.equal(out.topk_ids, expected.topk_ids.masked_fill(~keep, -1))
    assert torch.equal(out.topk_weights, expected.topk_weights * keep)
    kept_ids = expected.topk_ids[keep]
    assert torch.equal(out.tokens_per_expert, torch.bincount(kept_ids, minlength=num_experts))
    assert torch.equal(router.tokens_per_expert_accum, out.tokens_per_expert)
    for loss in ("aux_loss", "z_loss"):
        assert torch.equal(getattr(out, loss), getattr(expected, loss)), loss
    upstream = torch.randn(n, top_k, generator=torch.Generator().manual_seed(6))
    out.topk_weights.backward(upstream)
    (expected.topk_weights * keep).backward(upstream)
    torch.testing.assert_close(router.weight.grad, plain.weight.grad)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_with_replayed_slots_of_no_expert(policy):
    """Replayed slots of no expert (-1) take no expert's capacity and stay -1 (each used to
    shift the ranks of every later expert, which then kept fewer than its capacity)."""
    n = 24
    x = _x(n, seed=9)
    replay = _router()(x).topk_ids
    replay[::3, 1] = -1
    expected = _router().train()(x, replay_ids=replay)
    out = _router(capacity_factor=0.5, drop_policy=policy).train()(x, replay_ids=replay)
    capacity = -(-n * 3 // (2 * E))  # ceil(N k / E * 0.5)
    keep = _kept_by_loop(replay, expected.topk_weights.detach(), capacity, policy)
    assert not keep[replay >= 0].all(), "the case is meant to drop slots"
    assert torch.equal(out.topk_ids, replay.masked_fill(~keep & (replay >= 0), -1))
    assert torch.equal(out.topk_weights, expected.topk_weights * keep)
    assert torch.equal(out.tokens_per_expert, torch.bincount(replay[keep], minlength=E))


def test_ids_out_of_range_raise_and_count_nowhere():
    """Replayed ids and sequence ids outside their ranges raise ValueError naming the first
    (on CUDA by the next moeblaze call); no count or loss indexes with them first (a device
    fault on CUDA)."""
    router = _router(seq_aux_loss_coeff=0.1, capacity_factor=0.5)
    x, sequences = _x(6), torch.tensor([0, 0, 0, 1, 1, 1])
    replay = torch.tensor([[0, 1, 2]] * 6)
    for bad, match in [
        (-2, r"replay_ids contains -2 \(replay_ids\[4, 2\], the first of 1 out of range\)"),
        (E, rf"replay_ids contains {E} \(replay_ids\[4, 2\].* \[0, num_experts={E}\) or -1"),
    ]:
        ids = replay.clone()
        ids[4, 2] = bad
        with pytest.raises(ValueError, match=match):
            router(x, sequences, 2, replay_ids=ids)
    for bad, match in [(2, r"sequence_ids contains 2 \(sequence_ids\[5\]"), (-1, r"contains -1")]:
        ids = sequences.clone()
        ids[5] = bad
        with pytest.raises(ValueError, match=match + r".*\[0, num_sequences=2\)"):
            router(x, ids, 2)
    with pytest.raises(ValueError, match=r"num_sequences=0 with 6 tokens"):
        router(x, sequences, 0)


def test_capacity_with_padding():
    """Padding tokens compete for capacity (as in Megatron) but are counted nowhere."""
    n = 30
    x, mask = _x(n, seed=8), torch.arange(n) % 3 != 0
    router = _router(capacity_factor=0.5, expert_bias=True).train()
    out = router(x, token_mask=mask)
    plain = _router(capacity_factor=0.5).train()(x)
    assert torch.equal(out.topk_ids, plain.topk_ids)
    kept = out.topk_ids[mask]
    counts = torch.bincount(kept[kept >= 0], minlength=E)
    assert torch.equal(router.tokens_per_expert_accum, counts)
    assert int(out.tokens_per_expert.sum()) == int((out.topk_ids >= 0).sum()) < n * 3


def _hand_quantile_choice(logits, k, beta):
    """Quantile balancing written out token by token and expert by expert: each token's k best
    biased logits (no ties in these random values), alpha its (k + 1)-th, and each expert's
    (N*k/E + 1)-th largest logit - alpha over the tokens."""
    n, num_experts = logits.shape
    ids, alphas = [], []
    for t in range(n):
        ranked = sorted(range(num_experts), key=lambda e: (-(logits[t, e] - beta[e]).item(), e))
        ids.append(ranked[:k])
        alphas.append((logits[t, ranked[k]] - beta[ranked[k]]).item())
    target = n * k // num_experts
    column = [
        sorted((logits[t, e].item() - alphas[t] for t in range(n)), reverse=True)[target]
        for e in range(num_experts)
    ]
    return torch.tensor(ids), torch.tensor(column)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_quantile_balancing_chooses_by_biased_logits_and_accumulates_quantiles(score_func):
    router = _router(score_func=score_func, quantile_balancing=True, top_k=3)
    beta = torch.linspace(-0.4, 0.5, E)
    router.qb_beta.copy_(beta)
    x = _x(40, seed=5)  # 40 * 3 slots: a multiple of E = 12
    out = router(x)
    logits = x @ router.weight.detach().T
    ids, column = _hand_quantile_choice(logits, 3, beta)
    assert torch.equal(out.topk_ids, ids)
    assert not torch.equal(ids, logits.topk(3, -1).indices), "the bias changes the choice"
    # Weighted by the unbiased scores of the chosen experts (renormalised), as a replay is.
    chosen = _scores(logits, score_func).gather(1, ids)
    torch.testing.assert_close(out.topk_weights, _normalise(chosen))
    torch.testing.assert_close(router.qb_beta_accum, column.float(), rtol=1e-6, atol=1e-6)
    assert router.qb_beta_count.item() == 1
    router(x)
    torch.testing.assert_close(router.qb_beta_accum, 2 * column.float(), rtol=1e-6, atol=1e-6)
    # The weights' gradient reaches the router weight (the choice has none).
    router.weight.grad = None
    router(x).topk_weights[:, 0].sum().backward()  # (the k weights of a token sum to 1)
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # Outside training, or without grad, or when checkpointing reruns the forward: no quantile.
    before = (router.qb_beta_accum.clone(), router.qb_beta_count.clone())
    with torch.no_grad():
        router(x)
    router.eval()
    router(x)
    router.train()
    checkpointed = torch.utils.checkpoint.checkpoint(
        lambda t: router(t).topk_weights, x.clone().requires_grad_(), use_reentrant=False
    )
    counted_once = router.qb_beta_count.clone()
    checkpointed.sum().backward()  # reruns the router
    assert torch.equal(router.qb_beta_count, counted_once)
    assert counted_once.item() == before[1].item() + 1


def test_update_quantile_bias_averages_blends_and_centres():
    router = _router(quantile_balancing=True)
    router.qb_beta.copy_(torch.linspace(-1.0, 2.0, E))
    accum = torch.randn(E, generator=torch.Generator().manual_seed(1))
    router.qb_beta_accum.copy_(accum)
    router.qb_beta_count.fill_(4)
    old = router.qb_beta.clone()
    router.update_quantile_bias(ema=0.25)
    expected = 0.25 * old + 0.75 * accum / 4
    torch.testing.assert_close(router.qb_beta, expected - expected.mean())
    assert not router.qb_beta_accum.any() and router.qb_beta_count.item() == 0
    with pytest.raises(ValueError, match=r"ema=1.0 must be in \[0, 1\)"):
        router.update_quantile_bias(ema=1.0)
    with pytest.raises(RuntimeError, match="quantile_balancing=True"):
        _router().update_quantile_bias()


def test_quantile_balancing_balances_the_load():
    router = _router(quantile_balancing=True, top_k=2)
    x = _x(96, seed=4) + _x(1, seed=3)  # a shared offset makes a few experts popular

    def spread(counts):  # coefficient of variation of the per-expert counts
        counts = counts.float()
        return (counts.std() / counts.mean()).item()

    first = router(x).tokens_per_expert
    router.update_quantile_bias()
    assert spread(router(x).tokens_per_expert) < 0.5 * spread(first)


def test_quantile_balancing_state_and_dtype():
    router = _router(quantile_balancing=True)
    assert set(router.state_dict()) == {"weight", "qb_beta"}  # the accumulation is transient
    router.to(torch.bfloat16)
    assert router.qb_beta.dtype == router.qb_beta_accum.dtype == torch.float32
    assert "quantile_balancing=True" in repr(router)
    plain = _router()
    assert plain.qb_beta is None and plain.qb_beta_accum is None and plain.qb_beta_count is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(quantile_balancing=1), TypeError, "quantile_balancing must be a bool, got int"),
        (dict(top_k=12), ValueError, "needs top_k < num_experts"),
        (dict(num_groups=4, topk_groups=2), ValueError, "no group limit .* num_groups=4"),
        (
            dict(aux_loss_coeff=0.1, z_loss_coeff=0.1),
            ValueError,
            r"without balancing losses \(as megatron-core's\): aux_loss_coeff=0.1 must be 0",
        ),
    ],
    ids=["bool", "k=E", "groups", "aux"],
)
def test_quantile_balancing_options_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        _router(**{"quantile_balancing": True, **kwargs})


def test_quantile_balancing_forward_errors():
    router = _router(quantile_balancing=True, top_k=3)
    with pytest.raises(ValueError, match="token_mask must be None"):
        router(_x(8), token_mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="10 tokens x top_k=3 are not"):
        router(_x(10))
    router.eval()  # no quantile to take: any number of tokens
    assert router(_x(10)).topk_ids.shape == (10, 3)
    router.train()
    assert router(_x(0)).topk_ids.shape == (0, 3)


def _quantile_over_a_loss_group_worker(rank, init_method):
    with gloo_rank(rank, 2, init_method, timeout_s=60):
        torch.set_num_threads(1)
        whole = _router(quantile_balancing=True)  # the same weights on both ranks (seed 0)
        shard = _router(quantile_balancing=True, loss_group=dist.group.WORLD)
        for router in (whole, shard):
            router.qb_beta.copy_(torch.linspace(-0.3, 0.4, E))
        x = _x(32, seed=6)  # the batch; each rank routes its half
        expected = whole(x)
        out = shard(x[16 * rank : 16 * (rank + 1)])
        rows = slice(16 * rank, 16 * (rank + 1))
        assert torch.equal(out.topk_ids, expected.topk_ids[rows])
        torch.testing.assert_close(out.topk_weights, expected.topk_weights[rows])
        # The quantiles of the whole batch, on every rank.
        torch.testing.assert_close(shard.qb_beta_accum, whole.qb_beta_accum)


def test_quantile_balancing_over_a_loss_group(tmp_path):
    """Over a loss group (sequence or context parallelism), each rank chooses its tokens' experts
    and accumulates the quantiles as the router of the whole batch does (2 gloo ranks)."""
    init_method = f"file://{tmp_path / 'store'}"
    mp.start_processes(
        _quantile_over_a_loss_group_worker, args=(init_method,), nprocs=2, start_method="fork"
    )
