"""The suite's interpreter speed-up (tests/interpreter_patching.py) changes no result."""

import os

import pytest
import torch

import moeblaze

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="only the interpreter is patched"
)


def _moe_step():
    g = torch.Generator().manual_seed(0)
    T, d, F, E, k = 24, 40, 24, 5, 2
    x = torch.randn(T, d, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g, requires_grad=True)
    w13 = torch.randn(E, 2 * F, d, generator=g, requires_grad=True)
    w2 = torch.randn(E, d, F, generator=g, requires_grad=True)
    out = moeblaze.moe_mlp(x, ids, weights, w13, w2)
    out.backward(torch.randn(out.shape, generator=g))
    return [out.detach(), x.grad, weights.grad, w13.grad, w2.grad]


def test_results_are_bitwise_those_of_the_unpatched_interpreter(monkeypatch):
    from triton.runtime import interpreter

    patched = interpreter._patch_lang
    assert getattr(patched, "once_per_launch", False), "tests/conftest.py installs it"
    fast = _moe_step()
    monkeypatch.setattr(interpreter, "_patch_lang", patched.original)
    plain = _moe_step()
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b)
