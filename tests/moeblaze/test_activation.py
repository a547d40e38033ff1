"""The experts' activations (moeblaze.activation): SwiGLU's, Gated's and Ungated's torch forward
and backward against autograd, the kernels' epilogues against them (at the clamp, around 0), and
moe_mlp with the clamped, quick-GELU and soft-capped forms, GeGLU and each ungated function
against the float64 reference on both paths (Triton under the interpreter, torch); the kernels'
tanh of the soft caps, value by value.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots
"""

import gc
import math
import weakref

import pytest
import torch
from moeblaze_testing import (
    ACTIVATIONS,
    BF16_FACTOR,
    BF16_FACTOR_INTERPRETER,
    NAMES,
    SMALL,
    assert_kernel_tanh_is_tanh,
    assert_matches_reference,
)
from tolerance import assert_bf16_close, assert_close

import moeblaze
from moeblaze.activation import (
    GATED_FUNCTIONS,
    SWIGLU,
    UNGATED_FUNCTIONS,
    Gated,
    SwiGLU,
    Ungated,
    activation_of,
    evaluated_once,
)
from moeblaze.kernels.expert_mlp import TRITON_STAGES
from moeblaze.reference import TORCH_STAGES
from moeblaze.routing_plan import build_routing_plan

CLAMPED = [name for name, act in ACTIVATIONS.items() if act.limit is not None]


def test_defaults_and_repr():
    assert SwiGLU() == SWIGLU
    assert SWIGLU.constants == ("swiglu", 1.0, None, 0.0, False, None, None)
    assert repr(SWIGLU) == "SwiGLU()"
    gpt_oss = SwiGLU(alpha=1.702, limit=7, up_offset=1, interleaved=True)
    assert gpt_oss.constants == ("swiglu", 1.702, 7.0, 1.0, True, None, None)
    # one compiled variant per value
    assert all(type(c) is float for c in gpt_oss.constants[1:4])
    assert Ungated("relu2").constants == ("relu2", 1.0, None, 0.0, False, None, None)
    assert repr(Ungated("gelu")) == "Ungated(fn='gelu')"
    geglu = Gated("gelu", limit=7, up_offset=1)
    assert geglu.constants == ("gated_gelu", 1.0, 7.0, 1.0, False, None, None)
    inkling2 = SwiGLU(gate_softcap=4, up_softcap=25)
    assert inkling2.constants == ("swiglu", 1.0, None, 0.0, False, 4.0, 25.0)
    assert repr(inkling2) == "SwiGLU(gate_softcap=4.0, up_softcap=25.0)"
    assert Gated("relu", up_softcap=2).constants[-2:] == (None, 2.0)
    assert repr(geglu) == "Gated(fn='gelu', limit=7.0, up_offset=1.0)"
    everything = (SWIGLU, gpt_oss, geglu, inkling2, *(Gated(fn) for fn in GATED_FUNCTIONS))
    for activation in (*everything, *(Ungated(fn) for fn in UNGATED_FUNCTIONS)):
        assert activation_of(*activation.constants) == activation
    assert Gated("relu") != Ungated("relu") and (geglu.pre_width(24), geglu.ffn(48)) == (48, 24)
    assert (SWIGLU.pre_width(24), SWIGLU.ffn(48)) == (48, 24)
    assert (Ungated("relu2").pre_width(24), Ungated("relu2").ffn(24)) == (24, 24)
    assert repr(gpt_oss) == "SwiGLU(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True)"


def test_split_and_join():
    pre = torch.arange(12.0).view(2, 6)  # [.., 2F], F = 3
    gate, up = SWIGLU.split(pre)
    assert gate.tolist() == [[0, 1, 2], [6, 7, 8]] and up.tolist() == [[3, 4, 5], [9, 10, 11]]
    interleaved = SwiGLU(interleaved=True)
    gate, up = interleaved.split(pre)
    assert gate.tolist() == [[0, 2, 4], [6, 8, 10]] and up.tolist() == [[1, 3, 5], [7, 9, 11]]
    for activation in (SWIGLU, interleaved):
        assert torch.equal(activation.join(*activation.split(pre)), pre)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(alpha=0.0), ValueError, r"alpha=0.0 must be > 0"),
        (dict(alpha=math.inf), ValueError, r"alpha=inf must be finite"),
        (dict(alpha="1"), TypeError, r"alpha must be a number, got '1'"),
        (dict(alpha=True), TypeError, r"alpha must be a number, got True"),
        (dict(limit=0), ValueError, r"limit=0 must be a finite number > 0"),
        (dict(limit=-7.0), ValueError, r"limit=-7.0 must be a finite number > 0"),
        (dict(limit=math.nan), ValueError, r"limit=nan must be a finite number > 0"),
        (dict(limit="7"), TypeError, r"limit must be a number or None, got '7'"),
        (dict(up_softcap=0.0), ValueError, r"up_softcap=0.0 must be a finite number > 0"),
        (dict(up_softcap=math.inf), ValueError, r"up_softcap=inf must be a finite number > 0"),
        (dict(up_softcap=True), TypeError, r"up_softcap must be a number or None, got True"),
        (dict(gate_softcap=-1), ValueError, r"gate_softcap=-1 must be a finite number > 0"),
        (dict(up_offset=math.nan), ValueError, r"up_offset=nan must be finite"),
        (dict(interleaved=1), TypeError, r"interleaved must be a bool, got 1"),
    ],
)
def test_bad_values_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        SwiGLU(**kwargs)
    if not {"alpha", "gate_softcap"} & kwargs.keys():  # Gated checks the fields it shares
        # with SwiGLU the same way
        with pytest.raises(error, match=match.replace("SwiGLU", "Gated")):
            Gated("gelu", **kwargs)


def test_gated_names_a_wrong_function():
    with pytest.raises(ValueError, match=r"Gated\('silu'\) is moeblaze.SwiGLU\(\): use that"):
        Gated("silu")
    with pytest.raises(ValueError, match=r"Gated fn must be one of \(.*\), got 'swiglu'"):
        Gated("swiglu")


def test_moe_mlp_names_a_wrong_activation(make_problem):
    problem = make_problem(*SMALL)
    with pytest.raises(
        TypeError,
        match=r"must be a moeblaze.SwiGLU, moeblaze.Gated or moeblaze.Ungated, got 'gelu'",
    ):
        problem.run(activation="gelu")
    # An ungated activation reads w13 as [E, F, d]: the gated problem's [E, 2F, d] does not fit.
    with pytest.raises(ValueError, match=r"w2 must be \[E, d, F\] = \(5, 40, 48\)"):
        problem.run(activation=Ungated("relu2"))
    with pytest.raises(ValueError, match=r"Ungated fn must be one of .*, got 'swiglu'"):
        Ungated("swiglu")


def _halves_around_the_limit(limit: float, n: int = 64):
    """float64 gate and up [4, n]: random values, and values at, just inside and just past
    +-limit (where the clamps start and their gradients stop)."""
    g = torch.Generator().manual_seed(0)
    edges = [limit, -limit, limit * (1 - 1e-6), limit * (1 + 1e-6), 3 * limit]
    edges = torch.tensor(edges, dtype=torch.float64)  # float64 from the start: limit exactly
    edges = torch.cat([edges, -edges])
    gate = torch.randn(4, n, generator=g, dtype=torch.float64) * limit
    up = torch.randn(4, n, generator=g, dtype=torch.float64) * limit
    gate[0, : edges.numel()], up[1, : edges.numel()] = edges, edges
    gate[2, : edges.numel()], up[2, : edges.numel()] = edges, edges.flip(0)
    return gate, up


def _check_backward_is_autograd(activation, gate, up):
    """`activation.backward` at the float64 halves `gate`, `up` against autograd of its forward
    (rtol 1e-12), for a random gradient of act; returns (d_gate, d_up)."""
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    d_act = torch.randn(gate.shape, dtype=torch.float64)
    expected = torch.autograd.grad(activation.forward(gate, up), (gate, up), d_act)
    actual = activation.backward(gate.detach(), up.detach(), d_act)
    for what, a, e in zip(("d_gate", "d_up"), actual, expected, strict=True):
        assert_close(a, e, rtol=1e-12, name=what)
    return actual


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backward_is_the_gradient_of_forward(name):
    # SwiGLU.backward (what the torch stages and, in Triton, grad_act's epilogue compute) is
    # autograd's gradient of the forward, also exactly at the clamp: torch.clamp stops the
    # gradient past the limit, and at it passes it (before torch 2.14) or stops it (from 2.14 on).
    activation = ACTIVATIONS[name]
    actual = _check_backward_is_autograd(
        activation, *_halves_around_the_limit(activation.limit or 2.0)
    )
    if activation.limit is not None:  # the clamps did stop some gradients
        assert (actual[0] == 0).sum() >= 4 and (actual[1] == 0).sum() >= 4


def test_the_rule_at_the_limit_is_the_installed_torch_clamp_rule():
    # torch 2.14 gives clamp the minimum-norm subgradient at its bounds (0; it was 1):
    # moeblaze.activation's rule, read from the version, is what autograd gives on this torch.
    x = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64, requires_grad=True)
    clamped = torch.stack([x[0].clamp(max=1.0), *x[1:].clamp(-1.0, 1.0)])
    (grad,) = torch.autograd.grad(clamped.sum(), x)
    passes = moeblaze.activation.CLAMP_GRAD_AT_LIMIT
    assert grad.tolist() == [float(passes)] * 3


def _clamp_with_rule(passes: bool):
    """SwiGLU's and Gated's `_clamp`, written with torch.where: a value exactly at the limit
    passes its gradient if `passes`, else not, whatever torch.clamp does."""

    def clamp(self, gate, up):
        limit = self.limit
        if passes:
            return torch.where(gate > limit, limit, gate), torch.where(
                up > limit, limit, torch.where(up < -limit, -limit, up)
            )
        return torch.where(gate >= limit, limit, gate), torch.where(
            up >= limit, limit, torch.where(up <= -limit, -limit, up)
        )

    return clamp


@pytest.mark.parametrize("passes", [True, False], ids=["passes", "stops"])
@pytest.mark.parametrize("name", CLAMPED)
def test_backward_at_the_limit_under_either_rule(name, passes, monkeypatch):
    # Both rules, whatever torch runs the test: backward against autograd of a forward whose
    # clamps follow the rule; at a gate exactly at the limit, the gradient is there or not.
    monkeypatch.setattr(moeblaze.activation, "CLAMP_GRAD_AT_LIMIT", passes)
    monkeypatch.setattr(type(ACTIVATIONS[name]), "_clamp", _clamp_with_rule(passes))
    activation = ACTIVATIONS[name]
    gate, up = _halves_around_the_limit(activation.limit)
    d_gate, d_up = _check_backward_is_autograd(activation, gate, up)
    at_gate, at_up = gate == activation.limit, up.abs() == activation.limit
    assert at_gate.sum() >= 2 and at_up.sum() >= 4
    if passes:
        assert (d_gate[at_gate] != 0).all() and (d_up[at_up] != 0).all()
    else:
        assert (d_gate[at_gate] == 0).all() and (d_up[at_up] == 0).all()


def test_evaluated_once_remembers_a_module_while_it_lives():
    # An evaluation is computed once per module, and the cache does not keep the module alive
    # (a model's act_fn module, which may hold parameters, is freed with the model).
    calls = []

    @evaluated_once
    def scaled_by(module, factor):
        calls.append(module)
        return float(module(torch.ones(1))) * factor

    first = torch.nn.SiLU()
    assert (
        scaled_by(first, 2)
        == scaled_by(first, 2)
        == 2 * torch.nn.functional.silu(torch.ones(1)).item()
    )
    assert len(calls) == 1
    alive = weakref.ref(first)
    del first, calls[:]
    gc.collect()
    assert alive() is None, "the cache keeps the module alive"
    second = torch.nn.ReLU()
    assert scaled_by(second, 2) == 2.0 and len(calls) == 1  # its own evaluation
    # Under FakeTensorMode (memory estimation) the evaluation still sees values.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert scaled_by(torch.nn.ReLU(), 3) == 3.0


def test_forward_is_the_written_out_activation():
    gate, up = _halves_around_the_limit(7.0)
    assert torch.equal(SWIGLU.forward(gate, up), torch.nn.functional.silu(gate) * up)
    gpt_oss = SwiGLU(alpha=1.702, limit=7.0, up_offset=1.0)  # transformers' GptOssExperts
    g, u = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    expected = g * torch.sigmoid(1.702 * g) * (u + 1)
    assert_close(gpt_oss.forward(gate, up), expected, rtol=1e-15, name="act")
    geglu = torch.nn.functional.gelu(gate, approximate="tanh") * up  # Gemma 4's experts
    assert torch.equal(Gated("gelu_tanh").forward(gate, up), geglu)
    megatron = torch.nn.functional.gelu(g) * (u + 1)  # Megatron's GLU, clamp and offset
    assert torch.equal(Gated("gelu", limit=7.0, up_offset=1.0).forward(gate, up), megatron)
    nan = torch.tensor([math.nan])
    assert gpt_oss.forward(nan, torch.ones(1)).isnan().all()  # a clamp keeps NaN
    assert gpt_oss.forward(torch.ones(1), nan).isnan().all()


@pytest.mark.parametrize("passes", [True, False], ids=["passes", "stops"])
@pytest.mark.parametrize("name", CLAMPED)
def test_kernel_epilogue_matches_the_torch_stage_at_the_clamp(name, passes, monkeypatch):
    # grad_act's epilogue (Triton) and the torch stage on the same h, whose halves hold values
    # at and around +-limit: the same dh, a and routing-weight gradient, under either rule at
    # the limit (CLAMP_GRAD_AT_LIMIT, the kernel's GRAD_AT_LIMIT).
    monkeypatch.setattr(moeblaze.activation, "CLAMP_GRAD_AT_LIMIT", passes)
    activation = ACTIVATIONS[name]
    gate, up = _halves_around_the_limit(activation.limit, n=EPILOGUE_F)
    halves = ((gate, up), (up, gate), (gate.flip(1), up))
    rows = [activation.join(*pair) for pair in halves]
    _check_epilogues_agree(activation, torch.cat(rows).float(), seed=1)  # h [S, 2F]


EPILOGUE_F = 24


def _check_epilogues_agree(activation, h, seed):
    """grad_act of the kernels (Triton) and of the torch stages on the same h [S = 12, 2F or F]
    (F = EPILOGUE_F): the same dh, a and routing-weight gradient."""
    T, d, F, E, k = 6, 16, EPILOGUE_F, 2, 2
    g = torch.Generator().manual_seed(seed)
    topk_ids = torch.tensor([[0, 1]] * T)
    topk_weights = torch.rand(T, k, generator=g)
    dout, w2 = torch.randn(T, d, generator=g), torch.randn(E, d, F, generator=g) / F**0.5
    results = []
    for stages in (TRITON_STAGES, TORCH_STAGES):
        plan = build_routing_plan(topk_ids, E, block_m=stages.block_m(T * k, E))
        results.append(
            stages.grad_act(dout, w2, h, topk_weights, plan, store_a=True, activation=activation)
        )
    for what, a, e in zip(("dh", "dtopk_weights", "a"), *results, strict=True):
        assert_close(a, e, rtol=1e-6, name=what)


def _clamped_fraction(problem, activation: SwiGLU) -> float:
    """The fraction of gate values of all (token, expert) pairs above the activation's limit."""
    w_gate, _ = activation.split(problem.w13.double().mT)  # [E, d, F]
    pre = torch.einsum("td,edf->tef", problem.x.double(), w_gate)
    return (pre > activation.limit).double().mean().item()


@pytest.mark.parametrize("policy", moeblaze.RECOMPUTE_POLICIES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_moe_mlp_matches_reference(name, policy, path, make_problem):
    activation = ACTIVATIONS[name]
    problem = make_problem(*SMALL, seed=21)
    if activation.limit is not None:
        assert _clamped_fraction(problem, activation) > 0.2
    actual = problem.run(recompute=policy, activation=activation)
    assert_matches_reference(actual, problem.reference(activation=activation))


@pytest.mark.parametrize(
    "activation",
    [ACTIVATIONS["gpt-oss"], ACTIVATIONS["geglu"], Ungated("gelu_tanh")],
    ids=["gpt-oss", "geglu", "gelu_tanh"],
)
def test_bfloat16(activation, path, make_problem):
    problem = make_problem(*SMALL, dtype=torch.bfloat16, seed=22, gated=activation.gated)
    actual = problem.run(activation=activation)
    expected = problem.reference(activation=activation)
    baseline = problem.torch_bf16(activation=activation)
    factor = BF16_FACTOR_INTERPRETER if path == "kernels" else BF16_FACTOR
    for what, a, e, b in zip(NAMES, actual, expected, baseline, strict=True):
        assert_bf16_close(a, e, b, factor=factor, name=what)


# --- Ungated: experts without a gate ----------------------------------------------------------


def _around_zero(n: int = 64) -> torch.Tensor:
    """float64 [4, n]: N(0, 2) values, and 0, +-1e-30, +-tiny steps, +-3, +-6, +-30."""
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(4, n, generator=g, dtype=torch.float64) * 2
    edges = torch.tensor([0.0, 1e-30, 1e-7, 3.0, 6.0, 30.0], dtype=torch.float64)
    edges = torch.cat([edges, -edges])
    pre[0, : edges.numel()] = edges
    return pre


@pytest.mark.parametrize("fn", UNGATED_FUNCTIONS)
def test_ungated_grad_is_the_gradient_of_apply(fn):
    # Ungated.grad writes each derivative out (as grad_act's epilogue does); autograd of
    # Ungated.apply (torch's own functions) is the oracle.
    activation = Ungated(fn)
    pre = _around_zero().requires_grad_()
    d_act = torch.randn(pre.shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(activation.apply(pre), pre, d_act)
    assert_close(activation.grad(pre.detach(), d_act), expected, rtol=1e-12, name="d_pre")


def test_ungated_apply_is_the_named_function():
    pre = _around_zero()
    relu = torch.nn.functional.relu(pre)
    assert torch.equal(Ungated("relu2").apply(pre), relu * relu)
    assert torch.equal(Ungated("relu").apply(pre), relu)
    assert torch.equal(Ungated("gelu").apply(pre), torch.nn.functional.gelu(pre))
    tanh = torch.nn.functional.gelu(pre, approximate="tanh")
    assert torch.equal(Ungated("gelu_tanh").apply(pre), tanh)
    assert torch.equal(Ungated("silu").apply(pre), torch.nn.functional.silu(pre))


# The interpreter's numpy overflows exp in the sigmoid of GELU's tanh form at -30 (to the right
# limit, 0): a warning there, not on a GPU.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("fn", UNGATED_FUNCTIONS)
def test_kernel_epilogue_matches_the_torch_stage_around_zero(fn):
    # grad_act's epilogue (Triton, `_ungated`) and the torch stage (Ungated.grad) on the same h
    # [S, F], with values at and around 0 and far out on both sides.
    pre = _around_zero(EPILOGUE_F)  # [4, F]
    h = torch.cat([pre, -pre.flip(1), pre / 8]).float()  # [S = 12, F]
    _check_epilogues_agree(Ungated(fn), h, seed=3)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    "activation",
    [
        *(Gated(fn) for fn in GATED_FUNCTIONS),
        SwiGLU(gate_softcap=4.0, up_softcap=25.0),  # Inkling 2
        SwiGLU(alpha=1.702, gate_softcap=0.5, up_softcap=0.3),
        Gated("gelu", up_softcap=0.5),
    ],
    ids=repr,
)
def test_gated_backward_and_kernel_epilogue_around_zero(activation):
    # Each gate function of Gated, and the soft caps (the kernels' tanh: a series near 0):
    # backward against autograd of forward (torch's own functions), and grad_act's epilogue
    # (`_glu`) against the torch stage, with gate and up values at and around 0 and far out on
    # both sides.
    gate = _around_zero(EPILOGUE_F)  # [4, F]
    up = torch.randn(gate.shape, dtype=torch.float64)
    _check_backward_is_autograd(activation, gate, up)
    h = torch.cat([activation.join(gate, up), activation.join(-gate.flip(1), gate / 8)])
    _check_epilogues_agree(activation, torch.cat([h, activation.join(up, gate)]).float(), seed=4)


@pytest.mark.parametrize("fn", UNGATED_FUNCTIONS)
def test_ungated_moe_mlp_matches_reference(fn, path, make_problem):
    activation = Ungated(fn)
    problem = make_problem(*SMALL, seed=23, gated=False)
    actual = problem.run(activation=activation)
    assert_matches_reference(actual, problem.reference(activation=activation))


@pytest.mark.parametrize("policy", ["up_proj", "none"])
def test_ungated_policies_and_biases(policy, path, make_problem):
    # Every policy (the default one above), with biases and dropped slots: the pre-activation
    # [S, F] recomputed and overwritten by dh ("up_proj"), or kept with the activation ("none").
    activation = Ungated("relu2")
    problem = make_problem(*SMALL, seed=24, routing="dropped", biases=True, gated=False)
    actual = problem.run(recompute=policy, activation=activation)
    assert_matches_reference(actual, problem.reference(activation=activation))


def test_kernel_tanh_is_tanh_value_by_value():
    # The soft caps' tanh in the kernels (a series below 1/4, exponentials beyond), value by
    # value: within a few float32 ulp of float64 tanh, the tiny values too (a norm-wise
    # comparison of a whole epilogue cannot see those), exact at 0, +-inf and NaN.
    assert_kernel_tanh_is_tanh("cpu", rtol=4e-7)
