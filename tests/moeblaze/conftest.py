"""Fixtures of the moeblaze tests: NaN-poisoned outputs, the torch (non-Triton) stages, and
random MoE problems with their forward + backward runner and float64 reference.

# T tokens, d hidden, F ffn, E experts, k top-k, S = T*k slots
"""

import dataclasses

import pytest
import torch

import moeblaze
from kernelbase import alloc
from kernelbase.backend import backend_for
from moeblaze.kernels.expert_mlp import TRITON_STAGES
from moeblaze.ops import STAGES
from moeblaze.reference import TORCH_STAGES

ROUTINGS = ("random", "one_expert", "skip_experts", "dropped")


@pytest.fixture(autouse=True)
def poison():
    """Every launcher output starts as NaN (int: -2**30), so an unwritten element fails."""
    before = alloc.poison
    alloc.poison = True
    yield
    alloc.poison = before


@pytest.fixture
def torch_stages():
    """Run moeblaze on its torch (non-Triton) backend."""
    with moeblaze.use_backend("torch"):
        yield


@pytest.fixture(params=["kernels", "torch"])
def path(request):
    """'kernels': Triton under the interpreter; 'torch': the torch stages."""
    if request.param == "torch":
        request.getfixturevalue("torch_stages")
    expected = TORCH_STAGES if request.param == "torch" else TRITON_STAGES
    assert STAGES[backend_for(torch.device("cpu"))] is expected
    return request.param


@dataclasses.dataclass(frozen=True)
class MoEProblem:
    """Inputs of one moe_mlp call and the output gradient to send back through it."""

    x: torch.Tensor  # [T, d]
    topk_ids: torch.Tensor  # [T, k] int64, distinct per token
    topk_weights: torch.Tensor  # [T, k] float32
    w13: torch.Tensor  # [E, 2F, d] ([E, F, d] ungated)
    w2: torch.Tensor  # [E, d, F]
    dout: torch.Tensor  # [T, d]
    b13: torch.Tensor | None = None  # [E, 2F] ([E, F] ungated)
    b2: torch.Tensor | None = None  # [E, d]

    @property
    def num_slots(self) -> int:
        return self.topk_ids.numel()

    @property
    def biases(self) -> tuple[torch.Tensor, ...]:
        return () if self.b13 is None else (self.b13, self.b2)

    def leaves(self, dtype=None, weights_dtype=None) -> list[torch.Tensor]:
        """Fresh leaf copies [x, topk_weights, w13, w2] (+ [b13, b2]) (cast) that require grad."""
        tensors = (self.x, self.topk_weights, self.w13, self.w2, *self.biases)
        dtypes = (dtype, weights_dtype, *(dtype,) * (len(tensors) - 2))
        return [
            t.detach().to(dt or t.dtype, copy=True).requires_grad_()
            for t, dt in zip(tensors, dtypes, strict=True)
        ]

    def run(self, fn=moeblaze.moe_mlp, *, dtype=None, weights_dtype=None, **kwargs):
        """Forward + backward of `fn(x, topk_ids, topk_weights, w13, w2, **kwargs)` (and
        b13=, b2= for a problem with biases).

        Returns [out, dx, dtopk_weights, dw13, dw2] (moeblaze_testing.NAMES), then [db13, db2] with
        biases. Where the output does not depend on an input (T = 0 through the reference's
        empty loop), its gradient is zeros.
        """
        x, weights, w13, w2, *biases = leaves = self.leaves(dtype, weights_dtype)
        if biases:
            kwargs = dict(kwargs, b13=biases[0], b2=biases[1])
        out = fn(x, self.topk_ids, weights, w13, w2, **kwargs)
        if out.requires_grad:
            out.backward(self.dout.to(out.dtype))
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        return [out.detach(), *grads]

    def reference(self, **kwargs):
        """The float64 oracle: moeblaze.moe_mlp_reference run on float64 copies."""
        return self.run(
            moeblaze.moe_mlp_reference, dtype=torch.float64, weights_dtype=torch.float64, **kwargs
        )

    def torch_bf16(self, **kwargs):
        """Plain PyTorch in bf16 (float32 routing weights, as the Router returns them)."""
        return self.run(
            moeblaze.moe_mlp_reference, dtype=torch.bfloat16, weights_dtype=torch.float32, **kwargs
        )


def _routing(T, E, k, routing, g):
    """topk_ids [T, k] (distinct per token) and topk_weights [T, k] > 0."""
    if routing == "dropped":
        # Random, then about a third of the slots dropped (id -1), all of token 0's.
        ids, weights = _routing(T, E, k, "random", g)
        drop = torch.rand(T, k, generator=g) < 1 / 3
        drop[:1] = True
        return ids.masked_fill(drop, moeblaze.DROPPED), weights
    if routing == "random":
        allowed = torch.arange(E)
    elif routing == "one_expert":
        # Every token picks the same k experts: with k = 1 all slots land on expert E-1.
        ids = torch.tensor([E - 1, *range(k - 1)], dtype=torch.int64)
        return ids.expand(T, k).contiguous(), _weights(T, k, g)
    elif routing == "skip_experts":
        # Only every other expert can be chosen (more if k needs them): the rest get no token.
        allowed = torch.arange(0, E, 2)
        if len(allowed) < k:
            allowed = torch.arange(k)
        if len(allowed) == E:
            raise ValueError(f"skip_experts needs an expert left empty: E={E}, k={k}")
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    logits = torch.randn(T, len(allowed), generator=g)
    chosen = logits.softmax(-1).topk(k, dim=-1).indices  # [T, k]
    return allowed[chosen].contiguous(), _weights(T, k, g)


def _weights(T, k, g):
    # Softmax-like magnitudes, never 0 and never exactly 1 (so a dropped weight shows).
    return (0.1 + 0.9 * torch.rand(T, k, generator=g)) / k


def _make_problem(
    T,
    d,
    F,
    E,
    k,
    dtype=torch.float32,
    seed=0,
    routing="random",
    device="cpu",
    biases=False,
    gated=True,
) -> MoEProblem:
    """Random (never zero) inputs; weights scaled ~1/sqrt(fan_in) like nn.Linear; with
    `biases`, b13 and b2 of the size of a pre-activation and an output; `gated=False`: w13 and
    b13 F rows wide (experts without a gate, moeblaze.Ungated)."""
    g = torch.Generator().manual_seed(seed)
    topk_ids, topk_weights = _routing(T, E, k, routing, g)
    width = 2 * F if gated else F
    x = torch.randn(T, d, generator=g)
    w13 = torch.randn(E, width, d, generator=g) / d**0.5
    w2 = torch.randn(E, d, F, generator=g) / F**0.5
    dout = torch.randn(T, d, generator=g)
    b13 = torch.randn(E, width, generator=g) if biases else None
    b2 = torch.randn(E, d, generator=g) if biases else None

    def put(t, dt):
        return None if t is None else t.to(device=device, dtype=dt)

    return MoEProblem(
        x=put(x, dtype),
        topk_ids=topk_ids.to(device),
        topk_weights=put(topk_weights, torch.float32),
        w13=put(w13, dtype),
        w2=put(w2, dtype),
        dout=put(dout, dtype),
        b13=put(b13, dtype),
        b2=put(b2, dtype),
    )


@pytest.fixture(scope="session")
def make_problem():
    """`make_problem(T, d, F, E, k, dtype, seed, routing="random"|"one_expert"|"skip_experts"|
    "dropped", device="cpu", biases=False, gated=True) -> MoEProblem` (session-scoped: it is a
    pure function)."""
    return _make_problem
