"""moe_mlp with expert biases (b13 [E, 2F] before the activation, b2 [E, d] after the down
projection, both weighted by the routing weight with the rest of the expert's output) against
the float64 reference, on both paths (Triton under the interpreter, torch), with every gradient:
dx, dtopk_weights (which gains b2's part), dw13, dw2, db13 and db2.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots
"""

import pytest
import torch
from moeblaze_testing import (
    BF16_FACTOR,
    BF16_FACTOR_INTERPRETER,
    NAMES,
    RTOL_FP32,
    SMALL,
    assert_matches_reference,
    output_names,
)
from tolerance import assert_bf16_close, assert_close

import moeblaze
from moeblaze.activation import SwiGLU

GPT_OSS = SwiGLU(alpha=1.702, limit=0.7, up_offset=1.0, interleaved=True)  # clamps a lot


@pytest.mark.parametrize("policy", moeblaze.RECOMPUTE_POLICIES)
@pytest.mark.parametrize("activation", [SwiGLU(), GPT_OSS], ids=["swiglu", "gpt-oss"])
def test_matches_reference(activation, policy, path, make_problem):
    problem = make_problem(*SMALL, seed=31, biases=True)
    actual = problem.run(recompute=policy, activation=activation)
    assert_matches_reference(actual, problem.reference(activation=activation))


@pytest.mark.parametrize(
    "k, deterministic", [(1, False), (3, True)], ids=["one-slot-per-token", "deterministic"]
)
def test_combine_paths(k, deterministic, path, make_problem):
    # k = 1 and deterministic=True store the down projection per slot instead of adding it
    # atomically into the output: b2's term must ride along on that path too.
    problem = make_problem(19, 24, 16, 4, k, seed=32, biases=True)
    actual = problem.run(deterministic=deterministic)
    assert_matches_reference(actual, problem.reference())


def test_empty_experts_get_zero_bias_grads(path, make_problem):
    # Outputs start as NaN (the poison fixture): experts without tokens must be written zeros.
    problem = make_problem(*SMALL, seed=33, routing="skip_experts", biases=True)
    actual = problem.run()
    assert_matches_reference(actual, problem.reference())
    used = problem.topk_ids.unique()
    unused = [e for e in range(problem.w13.shape[0]) if e not in used]
    assert unused
    for name, grad in zip(output_names(actual)[-2:], actual[-2:], strict=True):
        assert torch.equal(grad[unused], torch.zeros_like(grad[unused])), name


@pytest.mark.parametrize("which", ["b13", "b2"])
def test_one_bias_alone(which, path, make_problem):
    problem = make_problem(*SMALL, seed=34, biases=True)
    x, weights, w13, w2, b13, b2 = problem.leaves()
    bias = {"b13": b13, "b2": b2}[which]
    args = (x, problem.topk_ids, weights, w13, w2)
    out = moeblaze.moe_mlp(*args, **{which: bias})
    out.backward(problem.dout)
    leaves = [t.detach().double().requires_grad_() for t in (x, weights, w13, w2, bias)]
    x64, weights64, w13_64, w2_64, bias64 = leaves
    expected = moeblaze.moe_mlp_reference(
        x64, problem.topk_ids, weights64, w13_64, w2_64, **{which: bias64}
    )
    expected.backward(problem.dout.double())
    actual = [out.detach(), x.grad, weights.grad, w13.grad, w2.grad, bias.grad]
    expected = [expected.detach(), *(t.grad for t in leaves)]
    for name, a, e in zip((*NAMES, f"d{which}"), actual, expected, strict=True):
        assert_close(a, e, rtol=RTOL_FP32, name=f"with {which} only: {name}")


def test_T0(path, make_problem):
    problem = make_problem(0, 16, 8, 3, 2, seed=35, biases=True)
    actual = problem.run()
    for name, a in zip(output_names(actual), actual, strict=True):
        assert torch.equal(a, torch.zeros_like(a)), name


def test_bfloat16(path, make_problem):
    problem = make_problem(*SMALL, dtype=torch.bfloat16, seed=36, biases=True)
    actual = problem.run(activation=GPT_OSS)
    expected = problem.reference(activation=GPT_OSS)
    baseline = problem.torch_bf16(activation=GPT_OSS)
    factor = BF16_FACTOR_INTERPRETER if path == "kernels" else BF16_FACTOR
    for name, a, e, b in zip(output_names(actual), actual, expected, baseline, strict=True):
        assert_bf16_close(a, e, b, factor=factor, name=name)


def _bad_biases(problem):
    E, two_f, d = problem.w13.shape[0], problem.w13.shape[1], problem.x.shape[1]
    b13, b2 = problem.b13, problem.b2
    return [
        (dict(b13=b13[:, :-2]), ValueError, rf"b13 must be \[{E}, {two_f}\] to match w13 and x"),
        (dict(b2=b2.T), ValueError, rf"b2 must be \[{E}, {d}\] to match w13 and x, got shape"),
        (dict(b13=b13.double()), TypeError, r"b13 has dtype torch.float64; expected x's dtype"),
        (dict(b2=b2.tolist()), TypeError, r"b2 must be a torch.Tensor or None, got list"),
        (dict(b2=b2.to("meta")), ValueError, r"b2 is on meta; expected x's device cpu"),
    ]


def test_bad_biases_are_named(make_problem):
    problem = make_problem(*SMALL, seed=37, biases=True)
    for kwargs, error, match in _bad_biases(problem):
        with pytest.raises(error, match=match):
            moeblaze.moe_mlp(problem.x, problem.topk_ids, problem.topk_weights, problem.w13,
                             problem.w2, **kwargs)  # fmt: skip
