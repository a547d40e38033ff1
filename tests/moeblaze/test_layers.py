"""MoELayer tests: the layer against a hand composition (router -> float64 reference experts +
shared expert) in forward and every gradient, aux-loss injection, logging output, bad input.

# B batch, L sequence, N = B*L tokens, d hidden, F ffn, E experts, k top-k
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close

import moeblaze
from moeblaze import MoELayer, RouterOutput

B, L, D, FFN, E, K, SHARED = 2, 7, 24, 16, 6, 2, 12
RTOL = 1e-5  # float32 layer against the float64 experts (see moeblaze_testing.RTOL_FP32)
# GPT-OSS's SwiGLU with a limit that clamps part of this layer's pre-activations (std ~0.6).
GPT_OSS = moeblaze.SwiGLU(alpha=1.702, limit=0.3, up_offset=1.0)
RELU2 = moeblaze.Ungated("relu2")  # experts without a gate: w13 [E, F, d]
GEGLU = moeblaze.Gated("gelu_tanh")  # Gemma 4's


def _layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MoELayer(D, FFN, E, K, **kwargs)


def _linear64(x, linear):
    """`linear` (an nn.Linear, bias or not) in float64."""
    bias = None if linear.bias is None else linear.bias.double()
    return F.linear(x, linear.weight.double(), bias)


def _hand_composition(layer, x, token_mask=None):
    """Router (float32, as the layer runs it, with its bias) -> float64 reference experts (the
    slots of tokens outside `token_mask` dropped) + shared expert."""
    tokens = x.reshape(-1, D)  # [N, d]
    mask = None if token_mask is None else token_mask.reshape(-1)
    routing = layer.router(tokens, token_mask=mask)
    topk_ids = routing.topk_ids
    if mask is not None:
        topk_ids = topk_ids.masked_fill(~mask.unsqueeze(-1), moeblaze.DROPPED)
    out = moeblaze.moe_mlp_reference(
        tokens.double(),
        topk_ids,
        routing.topk_weights.double(),
        layer.w13.double(),
        layer.w2.double(),
        activation=layer.activation,
        b13=None if layer.b13 is None else layer.b13.double(),
        b2=None if layer.b2 is None else layer.b2.double(),
    )
    if layer.shared_expert is not None:
        pre = _linear64(tokens.double(), layer.shared_expert.gate_up)
        gate, up = pre.chunk(2, -1)
        if layer.activation == RELU2:
            act = F.relu(pre) ** 2
        elif layer.activation == GEGLU:
            act = F.gelu(gate, approximate="tanh") * up
        elif layer.activation.limit is not None:  # GPT_OSS below: its SwiGLU written out
            gate, up = gate.clamp(max=GPT_OSS.limit), up.clamp(-GPT_OSS.limit, GPT_OSS.limit)
            act = gate * torch.sigmoid(GPT_OSS.alpha * gate) * (up + GPT_OSS.up_offset)
        else:
            act = F.silu(gate) * up
        shared = _linear64(act, layer.shared_expert.down)
        if layer.shared_expert.sigmoid_gate is not None:
            shared = shared * torch.sigmoid(
                _linear64(tokens.double(), layer.shared_expert.sigmoid_gate)
            )
        out = out + shared
    return out.view(x.shape)


def _step(fn, layer, x, dout):
    """[out, dx, *parameter grads] of fn(layer, x) with output gradient `dout`."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = fn(layer, x)
    out.backward(dout.to(out.dtype))
    grads = [p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return [out.detach(), x.grad, *grads]


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(
    "activation", [None, GPT_OSS, GEGLU, RELU2], ids=["swiglu", "gpt-oss", "geglu", "relu2"]
)
@pytest.mark.parametrize(
    "shared", [None, "plain", "gated"], ids=["routed_only", "shared_expert", "gated_shared_expert"]
)
@pytest.mark.parametrize("recompute", ["activation", "up_proj"])
def test_layer_matches_hand_composition(shared, recompute, activation, bias):
    # The SwiGLU reaches the routed experts and the shared expert.
    options = {} if activation is None else dict(activation=activation)
    if shared:
        options |= dict(shared_expert_size=SHARED, shared_expert_gate=shared == "gated")
    layer = _layer(recompute=recompute, bias=bias, **options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, D, generator=g)
    dout = torch.randn(B, L, D, generator=g)
    actual = _step(lambda m, t: m(t), layer, x, dout)
    expected = _step(_hand_composition, layer, x, dout)
    assert actual[0].shape == (B, L, D) and actual[0].dtype == torch.float32
    names = ["out", "dx", *(n for n, _ in layer.named_parameters())]
    assert layer.w13.shape == (E, FFN if activation is RELU2 else 2 * FFN, D)
    assert "router.weight" in names and "w13" in names and "w2" in names
    assert ("router.bias" in names and "b13" in names and "b2" in names) == bias
    if shared:
        assert "shared_expert.gate_up.weight" in names and "shared_expert.down.weight" in names
        assert (
            "shared_expert.gate_up.bias" in names and "shared_expert.down.bias" in names
        ) == bias
        assert ("shared_expert.sigmoid_gate.weight" in names) == (shared == "gated")
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a is not None, f"no gradient reached {name}"
        assert a.abs().sum() > 0, f"zero gradient for {name}"
        assert_close(a, e, rtol=RTOL, name=name)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_and_padding_drop_slots_before_the_experts(policy):
    """With a capacity and a token_mask, the layer matches the hand composition whose router
    drops slots past capacity and whose experts drop the padding's slots: forward and every
    gradient; padding gets the shared expert's output alone."""
    layer = _layer(
        capacity_factor=0.75, drop_policy=policy, shared_expert_size=SHARED, bias=True
    ).train()
    g = torch.Generator().manual_seed(2)
    x, dout = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    mask = torch.arange(L) < torch.tensor([[5], [2]])  # [B, L]: 5 and 2 real tokens
    actual = _step(lambda m, t: m(t, mask), layer, x, dout)
    expected = _step(lambda m, t: _hand_composition(m, t, mask), layer, x, dout)
    routed = layer.last_router_output.topk_ids
    assert (routed == moeblaze.DROPPED).any(), "the case is meant to drop slots for capacity"
    names = ["out", "dx", *(n for n, _ in layer.named_parameters())]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_close(a, e, rtol=RTOL, name=name)
    with torch.no_grad():
        shared = layer.shared_expert(x[~mask])
    assert_close(actual[0][~mask], shared, rtol=RTOL, name="padding's output")


def test_topk_scaling_factor_scales_the_routed_experts_only():
    plain = _layer(shared_expert_size=SHARED, score_func="sigmoid")
    scaled = _layer(shared_expert_size=SHARED, score_func="sigmoid", topk_scaling_factor=2.5)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(3))
    shared = plain.shared_expert(x)
    assert_close(scaled(x) - shared, 2.5 * (plain(x) - shared), rtol=RTOL, name="out")


def _aux_loss_grad(layer, x, coeff):
    """d(coeff * switch load-balancing loss) / d router.weight, written out by hand."""
    weight = layer.router.weight.detach().clone().requires_grad_()
    tokens = x.reshape(-1, D)
    probs = (tokens @ weight.t()).softmax(-1)  # [N, E]
    ids = probs.detach().topk(K, dim=-1).indices
    share = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()  # [E]
    aux = E * (share * probs.mean(0)).sum()
    (grad,) = torch.autograd.grad(coeff * aux, weight)
    return grad


def test_aux_loss_reaches_router_gradient():
    coeff = 0.1
    plain = _layer(seed=2)
    with_aux = copy.deepcopy(plain)
    with_aux.router.aux_loss_coeff = coeff
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(3))
    dout = torch.randn(B, L, D, generator=torch.Generator().manual_seed(4))
    grads = {}
    for name, layer in (("plain", plain), ("aux", with_aux)):
        layer.train()
        out = layer(x)
        out.backward(dout)
        grads[name] = layer.router.weight.grad.clone()
        assert isinstance(layer.last_router_output, RouterOutput)
    # The caller adds nothing: the injected gradient is exactly coeff * d(aux_loss)/d(weight).
    assert not torch.equal(grads["aux"], grads["plain"])
    assert_close(
        grads["aux"] - grads["plain"],
        _aux_loss_grad(plain, x, coeff),
        rtol=1e-4,
        name="injected aux-loss gradient",
    )
    # The expert weights do not see the aux loss.
    assert torch.equal(plain.w13.grad, with_aux.w13.grad)


def test_last_router_output_is_set():
    layer = _layer(seed=5)
    assert layer.last_router_output is None
    x = torch.randn(B, L, D)
    layer(x)
    routing = layer.last_router_output
    assert isinstance(routing, RouterOutput)
    assert routing.topk_ids.shape == (B * L, K) and routing.topk_weights.shape == (B * L, K)
    assert int(routing.tokens_per_expert.sum()) == B * L * K
    assert torch.isfinite(routing.aux_loss) and torch.isfinite(routing.z_loss)


@pytest.mark.parametrize("shared", [None, 12], ids=["routed", "shared"])
def test_any_leading_shape(shared):
    layer = _layer(seed=6, shared_expert_size=shared)
    x = torch.randn(3, 2, 5, D, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    # A tensor of its own, not a view (FSDP2 warns of a module output that is a view).
    assert out._base is None
    assert_close(out, layer(x.reshape(-1, D)).view(x.shape), rtol=0, name="out")
    out.sum().backward()
    expected = torch.autograd.grad(layer(x.reshape(-1, D)).sum(), x)[0]
    assert_close(x.grad, expected, rtol=0, name="dx")


@pytest.mark.parametrize(
    "options",
    [
        dict(shared_expert_size=12, aux_loss_coeff=1e-2),
        dict(
            score_func="sigmoid",
            expert_bias=True,
            num_groups=2,
            topk_groups=1,
            seq_aux_loss_coeff=1e-2,
            z_loss_coeff=1e-3,
            capacity_factor=1.0,
        ),
    ],
    ids=["shared_aux", "deepseek_capacity"],
)
@pytest.mark.parametrize("where", ["fake", "meta"])
def test_layer_without_values(options, where):
    # Memory estimation builds and runs a model on fake tensors (torch's FakeTensorMode: shapes,
    # no values), shape inference on the meta device: the layer is built without drawing
    # initial values, runs forward and backward, and looks at no value (the checks of ids and
    # logits skip such tensors; autocast, which the meta device lacks, is left alone).
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode() if where == "fake" else torch.device("meta")
    with mode:
        layer = _layer(**options).train()
        x = torch.randn(2, 3, D, requires_grad=True)
        out = layer(x)
        out.sum().backward()
    for t in (out, layer.w13.grad, x.grad):
        assert isinstance(t, FakeTensor) if where == "fake" else t.is_meta
    assert out.shape == x.grad.shape == x.shape and layer.w13.grad.shape == layer.w13.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ffn_hidden_size=0), "ffn_hidden_size=0 must be >= 1"),
        (dict(ffn_hidden_size=64.0), "ffn_hidden_size must be an int, got float 64.0"),
        (dict(hidden_size=32.0), "hidden_size must be an int, got float"),
        (dict(num_experts=4.0), "num_experts must be an int, got float"),
        (dict(recompute="bogus"), "recompute must be one of"),
        (dict(shared_expert_size=0), "shared_expert_size=0 must be >= 1"),
        (dict(deterministic="yes"), "deterministic must be a bool, got str 'yes'"),
        (dict(bias=1), "bias must be a bool, got int 1"),
        (dict(dtype=torch.float64), "dtype must be None, torch.float16, bfloat16 or float32"),
        (dict(dtype=torch.int32), "dtype must be None, torch.float16, bfloat16 or float32"),
        (dict(shared_expert_gate=True), r"shared_expert_gate=True needs a shared expert"),
        (dict(top_k=E + 1), "top_k=7 must be <= num_experts=6"),
        (
            dict(activation="silu"),
            "must be a moeblaze.SwiGLU, moeblaze.Gated or moeblaze.Ungated, got 'silu'",
        ),
    ],
    ids=[
        "ffn0",
        "ffn-float",
        "hidden-float",
        "experts-float",
        "recompute",
        "shared0",
        "deterministic-str",
        "bias-int",
        "float64",
        "int32",
        "gate_alone",
        "k>E",
        "activation",
    ],
)
def test_bad_options(kwargs, match):
    args = dict(hidden_size=D, ffn_hidden_size=FFN, num_experts=E, top_k=K)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        MoELayer(
            args.pop("hidden_size"),
            args.pop("ffn_hidden_size"),
            args.pop("num_experts"),
            args.pop("top_k"),
            **args,
        )


def test_bad_hidden_size():
    layer = _layer(seed=7)
    with pytest.raises(ValueError, match=f"hidden_size={D}"):
        layer(torch.randn(B, L, D + 1))
    with pytest.raises(ValueError, match=rf"last dim hidden_size={D}, got shape \(\)"):
        layer(torch.tensor(1.0))


def test_a_misspelt_option_is_named_by_moe_layer():
    with pytest.raises(
        TypeError, match=r"MoELayer .*'aux_loss_coef'; did you mean 'aux_loss_coeff'"
    ):
        MoELayer(24, 20, num_experts=4, top_k=1, aux_loss_coef=0.1)


@pytest.mark.parametrize("backend", [None, "torch"], ids=["kernels", "torch"])
def test_linear_then_moe_layer_under_autocast(backend):
    """As with nn.Linear: under autocast the layer computes in the autocast dtype, the same on
    every backend, and gives what it gives for inputs already in that dtype."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(24, 24)
    layer = _layer()
    bf16 = copy.deepcopy(layer)  # the experts in bf16; the router computes in float32 anyway
    bf16.w13.data, bf16.w2.data = layer.w13.data.bfloat16(), layer.w2.data.bfloat16()
    x = torch.randn(2, 5, 24)
    with moeblaze.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = linear(x)
            y = layer(h)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        assert layer.w13.grad.dtype == torch.float32 and torch.isfinite(layer.w13.grad).all()
        with torch.no_grad():
            expected = bf16(h.detach())
    assert torch.equal(y.detach(), expected)


def test_checkpointed_layer_counts_expert_choices_once():
    layer = _layer(expert_bias=True, score_func="sigmoid")
    x = torch.randn(3, 20, 24, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.square().mean().backward()
    assert int(layer.router.tokens_per_expert_accum.sum()) == 60 * layer.router.top_k


def test_sequence_loss_takes_batch_first_sequences():
    """seq_aux_loss_coeff: x [B, L, d] holds B sequences of L tokens; the layer's logged loss is
    the router's with those sequence ids, and differs from the micro-batch loss."""
    layer = _layer(seq_aux_loss_coeff=0.1, aux_loss_coeff=0.1)
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(9))
    layer(x)
    logged = layer.last_router_output
    ids, count = layer.sequences(x)
    assert count == B and torch.equal(ids, torch.arange(B * L) // L)
    expected = layer.router(x.reshape(-1, D), ids, count)
    assert_close(logged.seq_aux_loss, expected.seq_aux_loss, rtol=0, name="seq_aux_loss")
    assert not torch.allclose(logged.seq_aux_loss, logged.aux_loss)
    assert layer.sequences(x[0])[1] == 1  # x [L, d]: one sequence
