"""Megatron-style MoELayer: against a plain-torch transcription of megatron-core's MoE layer
(TopKRouter formulas, aux losses added to the objective, moeblaze.moe_mlp_reference experts) in
output and every gradient; its routing against megatron-core's own functions; loading Megatron
expert weights (a real SequentialMLP; TEGroupedMLP and GroupedMLP layouts); config errors that
name the field.

# s sequence, b batch, h hidden, N = s*b tokens, F expert ffn, E experts, k top-k
"""

import ast
import functools
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close

import moeblaze
from moeblaze.integrations import megatron as mb
from moeblaze.integrations.megatron import config as megatron_config
from moeblaze.integrations.megatron import layer as megatron_layer

# megatron-core warns about what it lacks here (TransformerEngine, Apex) and deprecated defaults.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
]

S, BATCH, H, FFN, E, K, SHARED = 5, 2, 32, 16, 4, 2, 24
RTOL = 1e-5  # float32 layer against the float64 transcription (as test_layer.RTOL)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: faster on these tiny tensors, and not slowed down by other processes
    holding the cores (two threads then wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides):
    """A stand-in for megatron-core's TransformerConfig with the fields the layer reads."""
    fields = dict(
        hidden_size=H,
        num_moe_experts=E,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=K,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_router_enable_expert_bias=False,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_shared_expert_intermediate_size=None,
        moe_shared_expert_gate=False,
        moe_layer_recompute=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        glu_linear_offset=0.0,
        activation_func_clamp_value=None,
        add_bias_linear=False,
        moe_router_topk_scaling_factor=None,
        moe_router_pre_softmax=False,
        moe_expert_capacity_factor=None,
        moe_token_drop_policy="probs",
        params_dtype=torch.float32,
    )
    return types.SimpleNamespace(**{**fields, **overrides})


def _group_limited_topk(scores, k, num_groups, group_topk):
    """megatron-core group_limited_topk: groups scored by the sum of their top k // group_topk."""
    n = scores.shape[0]
    grouped = scores.view(n, num_groups, -1)  # [N, G, E/G]
    group_scores = grouped.topk(k // group_topk, dim=-1).values.sum(-1)  # [N, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(group_topk, dim=-1).indices, True)
    masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, -1)
    return masked.topk(k, dim=-1)


def _independent_scores(logits, score_function):
    """megatron-core's scores of one expert each: sigmoid, or sqrt(softplus) (megatron-core
    0.19's "sqrtsoftplus")."""
    if score_function == "sigmoid":
        return logits.sigmoid()
    assert score_function == "sqrtsoftplus", score_function
    return F.softplus(logits).sqrt()


def _megatron_transcription(layer, x, cfg):
    """megatron-core's MoELayer forward on one rank, in float64: (out [s, b, h], aux losses).

    TopKRouter.routing (topk_routing_with_score_function, the "aux_loss" switch loss over
    compute_routing_scores_for_aux_loss, z_loss_func), then the experts and the shared expert.
    """
    tokens = x.reshape(-1, H).double()  # [N, h]
    n = tokens.shape[0]
    logits = tokens @ layer.router.weight.double().t()  # [N, E]
    if layer.router.bias is not None:  # add_bias_linear
        logits = logits + layer.router.bias.double()
    grouped = cfg.moe_router_group_topk
    if cfg.moe_router_score_function == "softmax":
        choice = logits.softmax(-1) if cfg.moe_router_pre_softmax else logits
        top, ids = (
            _group_limited_topk(choice, K, cfg.moe_router_num_groups, grouped)
            if grouped
            else choice.topk(K, dim=-1)
        )
        probs = top if cfg.moe_router_pre_softmax else top.softmax(-1)  # [N, k]
    else:  # sigmoid, sqrtsoftplus
        scores = _independent_scores(logits, cfg.moe_router_score_function)
        choice = (
            scores + layer.router.expert_bias.double()
            if layer.router.expert_bias is not None
            else scores
        )
        _, ids = (
            _group_limited_topk(choice, K, cfg.moe_router_num_groups, grouped)
            if grouped
            else choice.topk(K, dim=-1)
        )
        probs = scores.gather(1, ids)
        probs = probs / (probs.sum(-1, keepdim=True) + 1e-20) if K > 1 else probs
    if cfg.moe_router_topk_scaling_factor:
        probs = probs * cfg.moe_router_topk_scaling_factor
    losses = logits.new_zeros(())
    coeffs = megatron_config._loss_coeffs(vars(cfg))  # {type: coefficient}
    # compute_routing_scores_for_aux_loss: the scores as a distribution, their plain top-k
    aux_scores = logits.softmax(-1) if cfg.moe_router_score_function == "softmax" else None
    if aux_scores is None:
        aux_scores = _independent_scores(logits, cfg.moe_router_score_function)
        aux_scores = aux_scores / (aux_scores.sum(-1, keepdim=True) + 1e-20)
    aux_map = torch.zeros_like(aux_scores).scatter(1, aux_scores.topk(K, dim=-1).indices, 1.0)
    if coeffs.get("aux_loss"):  # switch_load_balancing_loss_func over the N tokens
        losses = losses + (aux_scores.sum(0) * aux_map.sum(0)).sum() * (
            E * coeffs["aux_loss"] / (K * n * n)
        )
    if coeffs.get("seq_aux_loss"):  # _apply_seq_aux_loss: each of the b sequences of s tokens
        s, b = x.shape[:2]
        seq_scores, seq_map = aux_scores.view(s, b * E), aux_map.view(s, b * E)
        losses = (
            losses
            + (seq_scores.sum(0) * seq_map.sum(0)).sum()
            * (E * coeffs["seq_aux_loss"] / (K * s * s))
            / b
        )
    if cfg.moe_z_loss_coeff:
        losses = losses + torch.logsumexp(logits, -1).square().mean() * cfg.moe_z_loss_coeff
    w13, w2 = layer.w13.double(), layer.w2.double()
    b13, b2 = (None, None) if layer.b13 is None else (layer.b13.double(), layer.b2.double())

    def expert(e, rows):  # fc2's bias is scaled by the routing weight with the rest
        fc1 = F.linear(rows, w13[e], None if b13 is None else b13[e])
        return F.linear(_glu(fc1, cfg), w2[e], None if b2 is None else b2[e])

    def latent(linear, rows):  # MoELayer's fc1_latent_proj / fc2_latent_proj
        return F.linear(rows, linear.weight.double(), _double(linear.bias))

    if getattr(cfg, "moe_latent_size", None):  # the experts work on projected tokens
        latent_out = _glu_experts(latent(layer.fc1_latent_proj, tokens), ids, probs, expert)
        out = latent(layer.fc2_latent_proj, latent_out)
    else:
        out = _glu_experts(tokens, ids, probs, expert)
    if layer.shared_expert is not None:  # SharedExpertMLP
        fc1 = F.linear(tokens, layer.shared_expert.gate_up.weight.double())
        shared = F.linear(_glu(fc1, cfg), layer.shared_expert.down.weight.double())
        if cfg.moe_shared_expert_gate:
            gate_weight = layer.shared_expert.sigmoid_gate.weight.double()  # [1, h]
            shared = shared * torch.sigmoid(F.linear(tokens, gate_weight))
        out = out + shared
    return out.view(x.shape), losses


def _double(t):
    return None if t is None else t.double()


def quick_gelu(y):  # megatron.core.fusions.fused_bias_geglu.quick_gelu
    return y * torch.sigmoid(1.702 * y)


def squared_relu(y):  # megatron.core.activations.squared_relu
    return torch.pow(F.relu(y), 2)


def _glu(h, cfg):
    """Megatron's glu (its MLP and experts): clamp, activation_func(gate) * (up + offset); with
    gated_linear_unit=False, activation_func(h) alone."""
    if not cfg.gated_linear_unit:
        return cfg.activation_func(h)
    gate, up = torch.chunk(h, 2, dim=-1)
    if (val := cfg.activation_func_clamp_value) is not None:
        gate, up = gate.clamp(min=None, max=val), up.clamp(min=-val, max=val)
    return cfg.activation_func(gate) * (up + cfg.glu_linear_offset)


VARIANTS = {
    # Megatron's default routing, both aux losses, a gated shared expert; "moe" and
    # "shared_experts" recompute: the experts keep nothing of size N*k*F, the shared expert
    # (gate included) is checkpointed.
    "softmax_aux_z_gated_shared_recompute": dict(
        moe_aux_loss_coeff=1e-1,
        moe_z_loss_coeff=1e-2,
        moe_shared_expert_intermediate_size=SHARED,
        moe_shared_expert_gate=True,
        recompute_granularity="selective",
        recompute_modules=["moe", "shared_experts"],
    ),
    # DeepSeek-V3 style: sigmoid, expert bias, 2 groups of 2 experts (top 1 group), scaling.
    "sigmoid_bias_groups_scaled": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none",
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
    ),
    # GPT-OSS's GLU (quick_gelu, up + 1, a clamp; here one that clamps part of the
    # pre-activations) in the routed and the shared experts.
    "quick_gelu_clamped_offset_shared": dict(
        activation_func=quick_gelu,
        glu_linear_offset=1.0,
        activation_func_clamp_value=0.2,
        moe_shared_expert_intermediate_size=SHARED,
    ),
    # DeepSeek-V3 in Megatron: sigmoid, expert bias, groups, scaling, and both balancing losses
    # (counting the top-k of the scores alone, without the bias or the group limit).
    "deepseek_v3_aux_seq_aux": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
        moe_aux_loss_coeff=[1e-1, 2e-1],
    ),
    # DeepSeek-V4's routing in Megatron (megatron-core 0.19): sqrt(softplus) scores, expert bias,
    # scaling, the aux loss (over its normalised scores) and the z-loss.
    "sqrtsoftplus_bias_scaled_aux_z": dict(
        moe_router_score_function="sqrtsoftplus",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=1.5,
        moe_aux_loss_coeff=1e-1,
        moe_z_loss_coeff=1e-2,
    ),
    # Latent MoE (Nemotron 3): the router sees the tokens, the experts their projection to
    # moe_latent_size, projected back after the combine; the shared expert sees the tokens.
    "latent_shared": dict(
        moe_latent_size=8, moe_shared_expert_intermediate_size=SHARED, moe_aux_loss_coeff=1e-1
    ),
    # ... with biases in the projections (add_bias_linear), and "moe" recompute.
    "latent_biases_recompute": dict(
        moe_latent_size=8, add_bias_linear=True, moe_layer_recompute=True
    ),
    # Experts without a gate (Nemotron's squared ReLU), in the shared expert too; the clamp and
    # offset, which Megatron applies only to a GLU, change nothing.
    "ungated_squared_relu_shared": dict(
        gated_linear_unit=False,
        activation_func=squared_relu,
        activation_func_clamp_value=0.2,
        glu_linear_offset=1.0,
        moe_shared_expert_intermediate_size=SHARED,
        moe_layer_recompute=True,
    ),
    # A GELU GLU (GeGLU), clamped and offset, in the routed and the shared experts.
    "geglu_clamped_offset_shared": dict(
        activation_func=F.gelu,
        glu_linear_offset=1.0,
        activation_func_clamp_value=0.2,
        moe_shared_expert_intermediate_size=SHARED,
    ),
    # megatron-core's default MLP: GELU without a gate, with add_bias_linear=True.
    "ungated_gelu_biases": dict(
        gated_linear_unit=False, activation_func=F.gelu, add_bias_linear=True
    ),
    # GPT-OSS in Megatron: its GLU with add_bias_linear=True (router and expert biases), and
    # the aux loss, which sees the biased logits.
    "gpt_oss_biases_aux": dict(
        activation_func=quick_gelu,
        glu_linear_offset=1.0,
        activation_func_clamp_value=0.2,
        add_bias_linear=True,
        moe_aux_loss_coeff=1e-1,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_matches_megatron_transcription(variant):
    cfg = _config(**VARIANTS[variant])
    torch.manual_seed(0)
    layer = mb.MoELayer(cfg).train()
    if layer.router.expert_bias is not None:  # a bias that changes the choice of experts
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
    g = torch.Generator().manual_seed(1)
    if layer.b13 is not None:  # Megatron starts them at zero: give them values to compute with
        with torch.no_grad():
            biases = [layer.b13, layer.b2]
            if layer.fc1_latent_proj is not None:
                biases += [layer.fc1_latent_proj.bias, layer.fc2_latent_proj.bias]
            for bias in biases:
                assert not bias.any()
                bias.normal_(generator=g)
    x = torch.randn(S, BATCH, H, generator=g)  # [s, b, h], sequence first
    dout = torch.randn(S, BATCH, H, generator=g)

    def step(fn):
        leaf = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out, extra = fn(leaf)
        ((out * dout.to(out.dtype)).sum() + extra).backward()
        return [out.detach(), leaf.grad, *(p.grad for p in layer.parameters())]

    def run_layer(leaf):
        out, bias = layer(leaf)
        assert bias is None
        return out, 0.0  # the aux losses reach the gradient by themselves

    actual = step(run_layer)
    expected = step(lambda leaf: _megatron_transcription(layer, leaf, cfg))
    names = ["out", "dx", *(n for n, _ in layer.named_parameters())]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a is not None and a.abs().sum() > 0, f"no gradient reached {name}"
        assert_close(a, e, rtol=RTOL, name=f"{variant} {name}")


@pytest.mark.parametrize(
    ("fields", "recompute", "shared_checkpointed"),
    [
        (dict(), "activation", False),
        (dict(moe_layer_recompute=True), "up_proj", False),
        (dict(recompute_granularity="selective", recompute_modules=["moe"]), "up_proj", False),
        (
            dict(recompute_granularity="selective", recompute_modules=["moe_act"]),
            "activation",
            False,
        ),
        (dict(recompute_granularity="full", recompute_modules=["moe"]), "activation", False),
        (
            dict(recompute_granularity="selective", recompute_modules=["shared_experts"]),
            "activation",
            True,
        ),
    ],
)
def test_recompute_mapping(fields, recompute, shared_checkpointed):
    options = mb.layer_options(_config(**fields))
    assert (options.recompute, options.recompute_shared_expert) == (recompute, shared_checkpointed)


@pytest.mark.parametrize(
    ("fields", "error", "names"),
    [
        (
            dict(add_bias_linear=True, moe_shared_expert_intermediate_size=SHARED),
            ValueError,
            [f"moe_shared_expert_intermediate_size={SHARED} with add_bias_linear=True"],
        ),
        (
            dict(
                moe_pad_expert_input_to_capacity=True,
                moe_router_enable_expert_bias=True,
                moe_router_score_function="sigmoid",
                moe_router_load_balancing_type="none",
            ),
            ValueError,
            [
                "moe_pad_expert_input_to_capacity=True needs moe_expert_capacity_factor >= 0",
                "moe_pad_expert_input_to_capacity=True with moe_router_enable_expert_bias=True "
                "(Megatron then counts the padded rows",
            ],
        ),
        (
            dict(
                moe_expert_capacity_factor=1.0,
                moe_pad_expert_input_to_capacity=True,
                moe_apply_probs_on_input=True,
                moe_router_topk=1,
                add_bias_linear=True,
            ),
            ValueError,
            [
                "moe_pad_expert_input_to_capacity=True with moe_apply_probs_on_input=True and "
                "add_bias_linear=True (a padded row enters its expert as zeros"
            ],
        ),
        (
            dict(moe_apply_probs_on_input=True),
            ValueError,
            ["moe_apply_probs_on_input=True needs moe_router_topk=1 (as in Megatron), got 2"],
        ),
        (
            dict(moe_expert_capacity_factor=0.0, moe_token_drop_policy="last"),
            ValueError,
            [
                "moe_expert_capacity_factor=0.0 must not be 0 (it drops every token; None or a "
                "negative value drops none)",
                "moe_token_drop_policy='last' must be one of ('probs', 'position')",
            ],
        ),
        (
            dict(moe_expert_capacity_factor=1.5, moe_router_load_balancing_type="sinkhorn"),
            ValueError,
            ["moe_expert_capacity_factor=1.5 needs moe_router_load_balancing_type aux_loss"],
        ),
        (
            dict(gated_linear_unit=True, activation_func=torch.tanh),
            NotImplementedError,
            ["gated_linear_unit=True", "activation_func=tanh"],
        ),
        (
            dict(gated_linear_unit=False, activation_func=torch.sigmoid),
            NotImplementedError,
            ["gated_linear_unit=False", "activation_func=sigmoid"],
        ),
        (dict(moe_router_load_balancing_type="sinkhorn"), NotImplementedError, ["sinkhorn"]),
        (
            dict(
                moe_router_load_balancing_type="quantile_balancing", moe_enable_routing_replay=True
            ),
            NotImplementedError,
            ["moe_enable_routing_replay=True with moe_router_load_balancing_type='quantile"],
        ),
        # megatron-core >= 0.17's fields that change what the layer computes or loads
        (
            dict(
                moe_router_load_balancing_type=["aux_loss", "quantile_balancing"],
                moe_aux_loss_coeff=[1e-2, 0.0],
                moe_router_force_biased=0.1,
                moe_mlp_glu_interleave_size=32,
                moe_shared_expert_glu_interleave_size=32,
                moe_expert_rank_capacity_factor=1.5,
            ),
            NotImplementedError,
            [
                "moe_router_load_balancing_type=['aux_loss', 'quantile_balancing'] (quantile "
                "balancing in a list",
                "moe_router_force_biased=0.1 (random expert biases on the router logits)",
                "moe_mlp_glu_interleave_size=32 (the experts' GLU rows interleaved in blocks)",
                "moe_shared_expert_glu_interleave_size=32 (the shared expert's GLU rows",
                "moe_expert_rank_capacity_factor=1.5 (token dropping by each expert rank's",
            ],
        ),
        (
            dict(moe_router_dtype="bf16"),
            ValueError,
            ["moe_router_dtype='bf16' must be None, 'fp32' or 'fp64'"],
        ),
        (
            dict(tensor_model_parallel_size=3, sequence_parallel=True),  # Megatron: ETP = TP
            ValueError,
            ["expert_tensor_parallel_size=None (None: tensor_model_parallel_size=3) must be"],
        ),
        (
            dict(expert_tensor_parallel_size=0),
            ValueError,
            ["expert_tensor_parallel_size=0 (None: tensor_model_parallel_size=1) must be"],
        ),
        (
            dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1),
            ValueError,
            ["tensor_model_parallel_size=2 needs sequence_parallel=True"],
        ),
        (
            dict(
                tensor_model_parallel_size=5,
                expert_tensor_parallel_size=1,
                sequence_parallel=True,
                moe_shared_expert_intermediate_size=SHARED,
            ),
            ValueError,
            [f"moe_shared_expert_intermediate_size={SHARED} must be divisible by "],
        ),
        # No tensor- or context-parallel group of 2 ranks here (see test_megatron_parallel).
        (
            dict(
                tensor_model_parallel_size=2, expert_tensor_parallel_size=1, sequence_parallel=True
            ),
            ValueError,
            ["tensor_model_parallel_size=2 "],
        ),
        (
            dict(context_parallel_size=2),
            ValueError,
            ["tensor_model_parallel_size * context_parallel_size=2 "],
        ),
        (dict(expert_model_parallel_size=3), ValueError, ["expert_model_parallel_size=3"]),
        # No expert-tensor-parallel group of 2 ranks here (see test_megatron_parallel).
        (dict(expert_tensor_parallel_size=2), ValueError, ["expert_tensor_parallel_size=2 "]),
        # No expert-parallel group of 2 ranks here (see test_expert_parallel for one).
        (dict(expert_model_parallel_size=2), ValueError, ["expert_model_parallel_size=2"]),
        (dict(moe_router_topk=5), ValueError, ["moe_router_topk=5"]),
        (
            dict(
                moe_router_load_balancing_type="quantile_balancing",
                moe_router_num_groups=2,
                moe_router_group_topk=1,
            ),
            ValueError,
            ["'quantile_balancing' with moe_router_group_topk=1 (megatron-core's quantile"],
        ),
        (
            dict(moe_router_load_balancing_type="quantile_balancing", moe_router_topk=E),
            ValueError,
            ["'quantile_balancing' needs moe_router_topk < num_moe_experts, got 4 and 4"],
        ),
        (dict(num_moe_experts=None), ValueError, ["num_moe_experts=None"]),
        (dict(moe_ffn_hidden_size=None), ValueError, ["moe_ffn_hidden_size=None"]),
        (
            dict(moe_router_enable_expert_bias=True),
            ValueError,
            ["moe_router_enable_expert_bias=True", "'softmax'"],
        ),
        (dict(moe_router_score_function="tanh"), ValueError, ["moe_router_score_function='tanh'"]),
        (
            dict(moe_router_num_groups=3, moe_router_group_topk=1),
            ValueError,
            ["moe_router_num_groups=3"],
        ),
        (dict(params_dtype=torch.float64), ValueError, ["params_dtype=torch.float64"]),
        (
            dict(moe_router_topk_scaling_factor=-2.0),
            ValueError,
            ["moe_router_topk_scaling_factor=-2.0"],
        ),
        (dict(moe_input_jitter_eps=1.0), ValueError, ["moe_input_jitter_eps=1.0 must be None or"]),
    ],
    ids=lambda v: "-".join(f"{k}" for k in v) if isinstance(v, dict) else None,
)
def test_config_errors_name_the_field(fields, error, names):
    with pytest.raises(error) as raised:
        mb.MoELayer(_config(**fields))
    for name in names:
        assert name in str(raised.value), f"{name!r} not in: {raised.value}"


@pytest.mark.parametrize(
    "fields",
    [
        dict(
            moe_shared_expert_intermediate_size=12,
            moe_shared_expert_gate=True,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_latent_size=8,
        ),
        dict(add_bias_linear=True),
        dict(
            init_method=None, output_layer_init_method=None, moe_shared_expert_intermediate_size=12
        ),
        dict(perform_initialization=False),
    ],
    ids=["shared_gated_bias_latent", "add_bias_linear", "no_init_methods", "no_initialization"],
)
def test_built_on_the_meta_device_then_materialised(fields):
    """Megatron's init_model_with_meta_device: the layer builds on the meta device, and
    `to_empty` then `reset_parameters` (seeded alike) give exactly the layer built on the CPU,
    Megatron's init methods, the router's buffers and every linear included."""
    init = dict(
        init_method=functools.partial(torch.nn.init.normal_, std=0.02),
        output_layer_init_method=functools.partial(torch.nn.init.normal_, std=0.01),
    )
    config = _config(**{**init, **fields})
    torch.manual_seed(3)
    built = mb.MoELayer(config)
    with torch.device("meta"):
        layer = mb.MoELayer(config)
    assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()
    state, want = layer.state_dict(), built.state_dict()
    assert state.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in built.named_buffers():  # the non-persistent counters too
        assert torch.equal(layer.get_buffer(name), tensor), name
    x = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(4))
    assert_close(layer(x)[0], built(x)[0], rtol=0, name="out")


def test_random_router_logits():
    """moe_router_force_load_balancing: the router draws its logits (the real ones' gradient)."""
    layer = mb.MoELayer(_config(moe_router_force_load_balancing=True)).train()
    assert layer.router.random_logits
    x = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(14))
    torch.manual_seed(15)
    layer(x)[0].square().sum().backward()
    torch.manual_seed(15)
    assert torch.equal(layer.last_router_output.logits, torch.randn(S * BATCH, E))
    assert layer.router.weight.grad.abs().sum() > 0


def test_forward_errors():
    layer = mb.MoELayer(_config(moe_aux_loss_coeff=1e-2))
    with pytest.raises(ValueError, match=r"hidden_states must be \[s, b, h=32\]"):
        layer(torch.randn(S * BATCH, H))
    with pytest.raises(ValueError, match=r"padding_mask must be \[b=2, s=5\]"):
        layer(torch.randn(S, BATCH, H), padding_mask=torch.ones(S, BATCH, dtype=torch.bool))


def _megatron_weights(g):
    """Per-expert Megatron weights: fc1 [E, 2F, h] ([gate; up] rows), fc2 [E, h, F]."""
    return torch.randn(E, 2 * FFN, H, generator=g) / H**0.5, torch.randn(E, H, FFN, generator=g)


def _glu_experts(tokens, ids, probs, expert_fn):
    """Megatron's experts on one rank: each token's rows through expert_fn(e, rows) -> [n, h],
    scaled by its routing weight and summed (the dispatcher's unpermute)."""
    out = torch.zeros_like(tokens)
    for e in range(E):
        token, slot = torch.where(ids == e)
        out = out.index_add(0, token, expert_fn(e, tokens[token]) * probs[token, slot, None])
    return out


def _swiglu(h):  # Megatron's glu: activation_func(first half) * second half
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("layout", ["te_grouped_mlp", "te_grouped_mlp_biases", "grouped_mlp"])
def test_load_grouped_layouts(layout):
    """TEGroupedMLP (with and without biases) / legacy GroupedMLP state dicts, against each
    module's forward math."""
    g = torch.Generator().manual_seed(5)
    fc1, fc2 = _megatron_weights(g)
    biases = layout == "te_grouped_mlp_biases"
    if layout.startswith("te_grouped_mlp"):  # TE GroupedLinear: weight{e} [out, in], y = x @ W^T
        state = {f"experts.linear_fc1.weight{e}": fc1[e] for e in range(E)}
        state |= {f"experts.linear_fc2.weight{e}": fc2[e] for e in range(E)}
        state["experts.linear_fc1._extra_state"] = None
        if biases:  # TEGroupedMLP adds fc1's bias in the GEMM, and fc2's times the weight
            state |= {
                f"experts.linear_fc1.bias{e}": torch.randn(2 * FFN, generator=g) for e in range(E)
            }
            state |= {f"experts.linear_fc2.bias{e}": torch.randn(H, generator=g) for e in range(E)}
            state["router.bias"] = torch.randn(E, generator=g)

        def expert(e, rows):
            b1, b2 = (state.get(f"experts.linear_fc{i}.bias{e}") for i in (1, 2))
            fc1_out = F.linear(rows, state[f"experts.linear_fc1.weight{e}"], b1)
            return F.linear(_swiglu(fc1_out), state[f"experts.linear_fc2.weight{e}"], b2)
    else:  # GroupedMLP.__init__ shapes, GroupedMLP.forward's views and gmm(trans_b=False)
        weight1 = fc1.transpose(1, 2).reshape(H, E * 2 * FFN)  # [h, E*2F]
        weight2 = fc2.transpose(1, 2).reshape(E * FFN, H)  # [E*F, h]
        state = {"experts.weight1": weight1, "experts.weight2": weight2}

        def expert(e, rows):
            w1 = state["experts.weight1"].view(E, H, -1)
            w2 = state["experts.weight2"].view(E, -1, H)
            return _swiglu(rows @ w1[e]) @ w2[e]

    state["router.weight"] = torch.randn(E, H, generator=g)
    layer = mb.MoELayer(_config(add_bias_linear=biases))
    layer.load_megatron_state_dict(state)
    assert torch.equal(layer.router.weight, state["router.weight"])
    if biases:
        assert torch.equal(layer.router.bias, state["router.bias"])
    tokens = torch.randn(S * BATCH, H, generator=g)  # [N, h]
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(S * BATCH)])  # [N, k]
    probs = torch.rand(S * BATCH, K, generator=g)  # [N, k]
    actual = moeblaze.moe_mlp_reference(
        tokens, ids, probs, layer.w13, layer.w2, b13=layer.b13, b2=layer.b2
    )
    assert_close(actual, _glu_experts(tokens, ids, probs, expert), rtol=RTOL, name=layout)
    params = mb.megatron_expert_params(state, E)
    assert params.keys() == ({"w13", "w2", "b13", "b2"} if biases else {"w13", "w2"})
    for name, value in params.items():
        assert torch.equal(value, getattr(layer, name)), name
    if biases:
        with pytest.raises(ValueError, match="the Megatron experts have biases.*b13 and b2"):
            mb.megatron_expert_weights(state, E)
    else:
        w13, w2 = mb.megatron_expert_weights(state, E)
        assert torch.equal(w13, layer.w13) and torch.equal(w2, layer.w2)


def test_load_ungated_grouped_mlp_layout():
    """GroupedMLP experts of gated_linear_unit=False (weight1 [h, E*F]) load as w13 [E, F, h],
    against its forward math; read as gated, they are named as the wrong shape."""
    g = torch.Generator().manual_seed(6)
    fc1, fc2 = torch.randn(E, FFN, H, generator=g), torch.randn(E, H, FFN, generator=g)
    weight1 = fc1.transpose(1, 2).reshape(H, E * FFN)  # [h, E*F]
    weight2 = fc2.transpose(1, 2).reshape(E * FFN, H)  # [E*F, h]
    state = {"experts.weight1": weight1, "experts.weight2": weight2}
    state["router.weight"] = torch.randn(E, H, generator=g)
    layer = mb.MoELayer(_config(gated_linear_unit=False, activation_func=F.gelu))
    layer.load_megatron_state_dict(state)

    def expert(e, rows):
        return F.gelu(rows @ weight1.view(E, H, -1)[e]) @ weight2.view(E, -1, H)[e]

    tokens = torch.randn(S * BATCH, H, generator=g)  # [N, h]
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(S * BATCH)])  # [N, k]
    probs = torch.rand(S * BATCH, K, generator=g)  # [N, k]
    actual = moeblaze.moe_mlp_reference(tokens, ids, probs, layer.w13, layer.w2, layer.activation)
    assert_close(actual, _glu_experts(tokens, ids, probs, expert), rtol=RTOL, name="grouped_mlp")
    w13, w2 = mb.megatron_expert_weights(state, E, gated=False)
    assert torch.equal(w13, layer.w13) and torch.equal(w2, layer.w2)
    with pytest.raises(ValueError, match=r"experts.weight1 must be \[h, E\*2F\] .* for gated"):
        mb.megatron_expert_weights(state, E)


def test_load_latent_projections():
    """moe_latent_size: Megatron's fc1_latent_proj and fc2_latent_proj (TELinear: weight, bias,
    _extra_state) load by their names, beside experts of the latent size."""
    cfg = _config(moe_latent_size=8, add_bias_linear=True)
    torch.manual_seed(6)
    source = mb.MoELayer(cfg)
    assert source.w13.shape == (E, 2 * FFN, 8) and source.w2.shape == (E, 8, FFN)
    state = {k: v for k, v in source.state_dict().items() if k.startswith(("router.", "fc"))}
    state["fc1_latent_proj._extra_state"] = None
    for e in range(E):  # TEGroupedMLP's layout
        state[f"experts.linear_fc1.weight{e}"] = source.w13[e]
        state[f"experts.linear_fc1.bias{e}"] = source.b13[e]
        state[f"experts.linear_fc2.weight{e}"] = source.w2[e]
        state[f"experts.linear_fc2.bias{e}"] = source.b2[e]
    assert "fc2_latent_proj.bias" in state
    layer = mb.MoELayer(cfg)
    layer.load_megatron_state_dict(state)
    for (name, ours), theirs in zip(
        layer.state_dict().items(), source.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name


def test_load_errors():
    g = torch.Generator().manual_seed(6)
    fc1, fc2 = _megatron_weights(g)
    state = {f"experts.linear_fc1.weight{e}": fc1[e] for e in range(E)}
    state |= {f"experts.linear_fc2.weight{e}": fc2[e] for e in range(E)}
    state["router.weight"] = torch.randn(E, H, generator=g)
    layer = mb.MoELayer(_config())
    with pytest.raises(ValueError, match="no place for.*shared_experts.gate_weight"):
        layer.load_megatron_state_dict({**state, "shared_experts.gate_weight": torch.ones(1, H)})
    with pytest.raises(
        ValueError, match=r"no place for: \['router.bias'\]"
    ):  # add_bias_linear=False
        layer.load_megatron_state_dict({**state, "router.bias": torch.zeros(E)})
    with pytest.raises(ValueError, match="num_experts=8 but the state_dict lacks"):
        mb.megatron_expert_weights(state, 8)
    biased = {f"experts.linear_fc1.bias{e}": torch.zeros(2 * FFN) for e in range(E)}
    biased |= {f"experts.linear_fc2.bias{e}": torch.zeros(H) for e in range(E)}
    with pytest.raises(ValueError, match="add_bias_linear=False but the Megatron state_dict has"):
        layer.load_megatron_state_dict({**state, **biased})
    with pytest.raises(ValueError, match="add_bias_linear=True but the Megatron state_dict lacks"):
        mb.MoELayer(_config(add_bias_linear=True)).load_megatron_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['experts.linear_fc2.bias0'"):
        mb.megatron_expert_params({**state, "experts.linear_fc1.bias0": torch.zeros(2 * FFN)}, 1)
    short = {f"experts.linear_fc2.bias{e}": torch.zeros(3) for e in range(E)}
    with pytest.raises(ValueError, match=rf"linear_fc2.bias0 must be \[{H}\].*got shape \(3,\)"):
        mb.megatron_expert_params({**state, **biased, **short}, E)
    with pytest.raises(ValueError, match="no Megatron expert weights under prefix 'moe.'"):
        mb.megatron_expert_weights(state, E, prefix="moe.")


def test_moeblaze_imports_no_integration():
    """`import moeblaze` never pulls in transformers or megatron: no module of the package
    imports them, or the integration modules that do, except those modules themselves."""
    package = Path(moeblaze.__file__).parent
    optional = (
        "transformers",
        "megatron",
        "moeblaze.integrations.huggingface",
        "moeblaze.integrations.megatron",
    )
    for path in package.rglob("*.py"):
        module = ".".join(("moeblaze", *path.relative_to(package).with_suffix("").parts))
        if module.removesuffix(".__init__").startswith(optional[2:]):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    parent = module.split(".")[: -node.level]
                    base = ".".join([*parent, *([base] if base else [])])
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                assert not name.startswith(optional), f"{module} imports {name}"


# ---------------------------------------------------------------------------------------------
# Against megatron-core itself (skipped where it does not import)


@pytest.fixture(scope="module")
def megatron():
    """megatron-core's modules, with a one-rank gloo process group for its parallel layers."""
    core = pytest.importorskip("megatron.core")
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils, router

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        yield types.SimpleNamespace(core=core, moe_utils=moe_utils, router=router)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _transformer_config(megatron, **fields):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=K,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
    )
    return TransformerConfig(**{**base, **fields})


@pytest.mark.parametrize(
    ("biases", "activation"),
    [
        (False, {}),
        (True, {}),
        (True, dict(gated_linear_unit=False, activation_func=F.gelu)),
        (True, dict(activation_func=F.gelu, activation_func_clamp_value=0.5, glu_linear_offset=1)),
    ],
    ids=[
        "gated_shared_expert",
        "add_bias_linear",
        "ungated_gelu_add_bias_linear",
        "geglu_clamped_offset_add_bias_linear",
    ],
)
def test_megatron_sequential_mlp_state_dict(megatron, biases, activation):
    """A real megatron-core SequentialMLP: its state dict loads, and its forward agrees; with
    add_bias_linear=True, its experts' biases (set to random values) too; with
    gated_linear_unit=False (megatron-core's default GELU experts), fc1 [F, h]; with a GELU GLU,
    clamped, with an offset (moeblaze.Gated)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    fields = (
        dict(add_bias_linear=True)
        if biases
        else dict(moe_shared_expert_intermediate_size=SHARED, moe_shared_expert_gate=True)
    )
    config = _transformer_config(megatron, **fields, **activation)
    group = torch.distributed.group.WORLD
    groups = ProcessGroupCollection(tp=group, ep=group, expt_tp=group, expt_dp=group)
    torch.manual_seed(7)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    experts = SequentialMLP(E, config, submodules, pg_collection=groups)
    if biases:  # Megatron starts them at zero
        with torch.no_grad():
            for name, p in experts.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    layer = mb.MoELayer(config)  # a real TransformerConfig is accepted as it is
    state = {f"experts.{k}": v for k, v in experts.state_dict().items()}
    state["router.weight"] = torch.randn(E, H)
    if biases:
        state["router.bias"] = torch.randn(E)
    else:
        state["shared_experts.linear_fc1.weight"] = torch.randn(2 * SHARED, H)
        state["shared_experts.linear_fc2.weight"] = torch.randn(H, SHARED)
        state["shared_experts.gate_weight"] = torch.randn(1, H)
    layer.load_megatron_state_dict(state)
    if biases:
        assert torch.equal(layer.router.bias, state["router.bias"])
        assert torch.equal(layer.b2[1], state["experts.local_experts.1.linear_fc2.bias"])
    else:
        assert torch.equal(
            layer.shared_expert.down.weight, state["shared_experts.linear_fc2.weight"]
        )
        gate = layer.shared_expert.sigmoid_gate.weight
        assert torch.equal(gate, state["shared_experts.gate_weight"])

    g = torch.Generator().manual_seed(8)
    tokens = torch.randn(S * BATCH, H, generator=g)  # [N, h]
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(S * BATCH)])  # [N, k]
    probs = torch.rand(S * BATCH, K, generator=g)  # [N, k]
    # What Megatron's dispatcher hands SequentialMLP: rows sorted by expert, weights alongside.
    token, slot = torch.where(ids == torch.arange(E).view(E, 1, 1))[1:]
    with torch.no_grad():
        rows, _ = experts(
            tokens[token], torch.bincount(ids.flatten(), minlength=E), probs[token, slot]
        )
    expected = torch.zeros_like(tokens).index_add_(0, token, rows)
    assert layer.w13.shape[1] == layer.activation.pre_width(FFN)
    if activation.get("glu_linear_offset"):
        assert layer.activation == moeblaze.Gated("gelu", limit=0.5, up_offset=1.0)
    actual = moeblaze.moe_mlp_reference(
        tokens, ids, probs, layer.w13, layer.w2, layer.activation, b13=layer.b13, b2=layer.b2
    )
    assert_close(actual.detach(), expected, rtol=RTOL, name="SequentialMLP forward")


def test_probs_on_input_matches_megatron_sequential_mlp(megatron):
    """moe_apply_probs_on_input (top-1): each token times its routing weight enters its expert,
    whose output is not weighted again. The layer against megatron-core's SequentialMLP (which
    applies the probs so) fed the layer's own routing, in every gradient."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    config = _transformer_config(  # Llama 4's routing: sigmoid, top-1
        megatron,
        moe_router_topk=1,
        moe_router_score_function="sigmoid",
        moe_apply_probs_on_input=True,
    )
    group = torch.distributed.group.WORLD
    groups = ProcessGroupCollection(tp=group, ep=group, expt_tp=group, expt_dp=group)
    torch.manual_seed(3)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    experts = SequentialMLP(E, config, submodules, pg_collection=groups)
    layer = mb.MoELayer(config)
    state = {f"experts.{k}": v for k, v in experts.state_dict().items()}
    state["router.weight"] = torch.randn(E, H)
    layer.load_megatron_state_dict(state)
    x = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(4))
    dout = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(5))

    def megatron_experts(leaf):  # the layer's router, then Megatron's experts
        tokens = leaf.reshape(-1, H)
        routing = layer.router(tokens)
        ids, probs = routing.topk_ids[:, 0], routing.topk_weights[:, 0]
        order = torch.sort(ids, stable=True).indices  # rows sorted by expert
        rows, _ = experts(tokens[order], torch.bincount(ids, minlength=E), probs[order])
        return torch.zeros_like(tokens).index_add(0, order, rows).view(leaf.shape)

    def step(fn):
        leaf = x.clone().requires_grad_()
        for module in (layer, experts):
            module.zero_grad(set_to_none=True)
        out = fn(leaf)
        (out * dout).sum().backward()
        return out.detach(), leaf.grad, layer.router.weight.grad

    assert not layer.router.loss_coeffs()["aux_loss"]  # no loss term: the outputs' gradients
    actual = step(lambda leaf: layer(leaf)[0])
    dw13, dw2 = layer.w13.grad, layer.w2.grad
    expected = step(megatron_experts)
    for name, a, e in zip(["out", "dx", "router.weight"], actual, expected, strict=True):
        assert a.abs().sum() > 0, f"no gradient reached {name}"
        assert_close(a, e, rtol=RTOL, name=f"probs on input {name}")
    for e, expert in enumerate(experts.local_experts):
        assert_close(dw13[e], expert.linear_fc1.weight.grad, rtol=RTOL, name=f"dw13[{e}]")
        assert_close(dw2[e], expert.linear_fc2.weight.grad, rtol=RTOL, name=f"dw2[{e}]")


def test_megatron_transformer_layer_spec(megatron):
    """The layer named in a megatron-core GPT layer spec: Megatron builds it and runs its MLP
    block (pre-MLP norm, the layer, bias-dropout-add) forward and backward. (The whole
    TransformerLayer needs CUDA for Megatron's attention.)"""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    config = _transformer_config(
        megatron,
        moe_aux_loss_coeff=1e-2,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        bias_dropout_fusion=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    spec.submodules.mlp = ModuleSpec(module=mb.MoELayer)
    layer = build_module(spec, config=config, layer_number=1)
    assert isinstance(layer.mlp, mb.MoELayer)
    x = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(11))  # [s, b, h]
    with torch.no_grad():
        expected = x + layer.mlp(layer.pre_mlp_layernorm(x))[0]
    out = layer._forward_mlp(x)
    assert_close(out.detach(), expected, rtol=RTOL, name="Megatron MLP block")
    out.square().sum().backward()
    for name, p in layer.mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("repeated", [False, True], ids=["", "repeated"])
def test_mtp_layer_divides_balancing_losses_when_repeated(repeated):
    """A multi-token-prediction layer (`is_mtp_layer=True` and its `name`, which megatron-core
    >= 0.17's TransformerLayer passes) that Megatron runs mtp_num_layers = 2 times a step: its
    balancing losses (aux and sequence) reach the router with half a main layer's gradient
    and coefficients, its z-loss with the same (megatron-core's TopKRouter divides only the
    z-loss's logged value); not repeated, as a main layer."""
    fields = dict(mtp_num_layers=2, mtp_use_repeated_layer=repeated)
    balancing = dict(
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[1e-1, 2e-1]
    )
    x = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(5))
    for losses, share in (
        (balancing, 0.5 if repeated else 1.0),
        (dict(moe_z_loss_coeff=1e-2), 1.0),
    ):
        grads = []
        for mtp in (False, True):
            torch.manual_seed(3)
            layer = mb.MoELayer(_config(**fields, **losses), is_mtp_layer=mtp, name="mtp.mlp")
            router = layer.router
            coeffs = (router.aux_loss_coeff, router.seq_aux_loss_coeff, router.z_loss_coeff)
            (layer(x)[0].sum() * 0).backward()  # the losses' gradient alone
            grads.append((coeffs, router.weight.grad))
        (main_coeffs, main_grad), (mtp_coeffs, mtp_grad) = grads
        assert mtp_coeffs == (main_coeffs[0] * share, main_coeffs[1] * share, main_coeffs[2])
        assert main_grad.abs().sum() > 0
        assert_close(mtp_grad, main_grad * share, rtol=1e-6, name="MTP layer's router.weight.grad")


def test_drop_and_pad_is_token_dropping(megatron):
    """Megatron's moe_pad_expert_input_to_capacity pads each expert's rows with tokens of
    routing weight 0 (test_routing_matches_megatron, softmax_capacity_padded): a real
    TransformerConfig with it makes the layer of the same config without it."""
    fields = dict(moe_expert_capacity_factor=1.0, moe_token_dispatcher_type="alltoall")
    padded = _transformer_config(megatron, **fields, moe_pad_expert_input_to_capacity=True)
    assert mb.layer_options(padded) == mb.layer_options(_transformer_config(megatron, **fields))
    assert mb.layer_options(padded).capacity_factor == 1.0


def test_device_limited_routing_is_group_limited_routing(megatron):
    """Megatron's deprecated moe_router_topk_limited_devices: groups of experts by
    expert-parallel rank, that many groups per token. A real TransformerConfig maps it so
    itself (and keeps the field); a look-alike config is mapped the same way; a config whose
    group_topk says otherwise is refused."""
    fields = dict(
        moe_router_score_function="sigmoid",
        moe_router_topk_limited_devices=1,
        expert_model_parallel_size=2,
    )
    with pytest.warns(UserWarning, match="moe_router_topk_limited_devices is deprecated"):
        real = _transformer_config(megatron, **fields)
    assert real.moe_router_topk_limited_devices == 1 and real.moe_router_group_topk == 1
    for config in (real, _config(**fields)):
        options = mb.layer_options(config)
        assert (options.num_groups, options.topk_groups, options.group_score_topk) == (2, 1, K)
    with pytest.raises(ValueError, match=r"moe_router_topk_limited_devices=1 \(deprecated"):
        mb.layer_options(_config(**fields, moe_router_num_groups=2, moe_router_group_topk=2))


def test_megatron_default_config_has_ungated_gelu_experts(megatron):
    """megatron-core's defaults (GeLU MLP without a gate, add_bias_linear=True) build a layer
    of moeblaze.Ungated("gelu") experts with fc1 [F, h] and biases."""
    config = _transformer_config(
        megatron, add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu
    )
    layer = mb.MoELayer(config)
    assert layer.activation == moeblaze.Ungated("gelu")
    assert layer.w13.shape == (E, FFN, H) and layer.b13.shape == (E, FFN)


ROUTINGS = {
    "softmax": dict(moe_aux_loss_coeff=1e-1, moe_z_loss_coeff=1e-2),
    "softmax_pre_softmax_scaled": dict(
        moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.0, moe_aux_loss_coeff=1e-1
    ),
    "sigmoid_aux": dict(moe_router_score_function="sigmoid", moe_aux_loss_coeff=1e-1),
    "sigmoid_top1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    "softmax_router_bias_aux_z": dict(
        add_bias_linear=True, moe_aux_loss_coeff=1e-1, moe_z_loss_coeff=1e-2
    ),
    "sigmoid_bias_groups": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_load_balancing_type="none",
    ),
    # Groups scored by the sum of their top topk // group_topk = 2 (moeblaze's softmax default:
    # the max).
    "softmax_pre_softmax_groups": dict(
        moe_router_pre_softmax=True, moe_router_num_groups=2, moe_router_group_topk=1
    ),
    # Softmax of the chosen: groups scored by the sum of their top 2 logits (not scores).
    "softmax_groups": dict(
        moe_router_num_groups=2, moe_router_group_topk=1, moe_aux_loss_coeff=1e-1
    ),
    "softmax_seq_aux": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=2e-1),
    # DeepSeek-V3's routing in Megatron, with both balancing losses.
    "sigmoid_bias_groups_aux_seq_aux": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
        moe_aux_loss_coeff=[1e-1, 2e-1],
    ),
    # Token dropping: about half the slots past their expert's capacity (3 and 4 of 5).
    "softmax_capacity": dict(
        moe_expert_capacity_factor=0.5, moe_aux_loss_coeff=1e-1, moe_z_loss_coeff=1e-2
    ),
    # Megatron's drop-and-pad: each expert's rows padded to its capacity with tokens of weight 0
    # (softmax weights are never 0, so the padded rows are told from the routed ones).
    "softmax_capacity_padded": dict(
        moe_expert_capacity_factor=1.0,  # some experts over capacity, some padded
        moe_pad_expert_input_to_capacity=True,
        moe_aux_loss_coeff=1e-1,
        moe_z_loss_coeff=1e-2,
    ),
    "sigmoid_bias_capacity_position": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none",
        moe_expert_capacity_factor=0.75,
        moe_token_drop_policy="position",
    ),
    # Routing in float64 (logits, scores, weights, losses), with biases and token dropping.
    "sigmoid_fp64_router_bias_capacity": dict(
        moe_router_dtype="fp64",
        moe_router_score_function="sigmoid",
        add_bias_linear=True,
        moe_aux_loss_coeff=1e-1,
        moe_z_loss_coeff=1e-2,
        moe_expert_capacity_factor=0.5,
    ),
    # The router's input multiplied by noise in [0.8, 1.2], drawn as Megatron draws it.
    "softmax_input_jitter": dict(moe_input_jitter_eps=0.2, moe_aux_loss_coeff=1e-1),
    # DeepSeek-V4's scores (megatron-core >= 0.19): with the expert bias and groups, and with
    # both balancing losses and the z-loss.
    "sqrtsoftplus_bias_groups": dict(
        moe_router_score_function="sqrtsoftplus",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_load_balancing_type="none",
    ),
    "sqrtsoftplus_aux_seq_aux_z_scaled": dict(
        moe_router_score_function="sqrtsoftplus",
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
        moe_aux_loss_coeff=[1e-1, 2e-1],
        moe_z_loss_coeff=1e-2,
        moe_router_topk_scaling_factor=2.0,
    ),
    # Quantile balancing (megatron-core >= 0.19): the experts of the largest logits - qb_beta,
    # weighted by their scores; with sigmoid scores, a scaling factor and the z-loss.
    "quantile_balancing": dict(moe_router_load_balancing_type="quantile_balancing"),
    "quantile_balancing_sigmoid_scaled_z": dict(
        moe_router_load_balancing_type="quantile_balancing",
        moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=2.0,
        moe_z_loss_coeff=1e-2,
    ),
    # Megatron's per-token loss: the losses' gradient times the rank's real tokens.
    "per_token_aux_seq_aux_z": dict(
        calculate_per_token_loss=True,
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
        moe_aux_loss_coeff=[1e-1, 2e-1],
        moe_z_loss_coeff=1e-2,
    ),
}


# Larger logits where the case needs them: softmax scores far from linear in the logits.
TOKEN_SCALE = {"softmax_groups": 10.0}


def _padding_mask(even: bool) -> torch.Tensor:
    """Megatron's padding_mask [b, s] (True for padding): the last 2 tokens of every sequence
    (`even`), else 1 of the first sequence and 3 of the second."""
    mask = torch.zeros(BATCH, S, dtype=torch.bool)
    for b, pad in enumerate((2, 2) if even else (1, 3)):
        mask[b, S - pad :] = True
    return mask


def _megatron_scores(moe_utils, score_function) -> bool:
    """Whether megatron-core's routing computes `score_function` (sqrtsoftplus: 0.19)."""
    try:
        moe_utils.compute_routing_scores_for_aux_loss(torch.zeros(1, 2), 1, score_function)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_routing_matches_megatron(routing, padded, megatron, monkeypatch):
    """Routing weights per (token, expert) and the router-weight gradient, aux losses included
    with the loss scale Megatron's schedule sets (MoEAuxLossAutoScaler.set_loss_scale), which the
    layer reads in backward, before moeblaze.Router's own; tokens dropped for capacity by
    megatron-core's apply_router_token_dropping ("position": the earliest tokens, a choice
    megatron-core leaves to torch.topk's order among ties, so only its counts are compared),
    and the expert-bias counts of the tokens kept. `padded`: with Megatron's
    padding_mask, whose tokens the losses leave out (as many in each sequence where the
    sequence loss is on: Megatron then divides every sequence's by their mean real length,
    moeblaze each by its own)."""
    mu = megatron.moe_utils
    cfg = _config(**ROUTINGS[routing])
    if not _megatron_scores(mu, cfg.moe_router_score_function):
        pytest.skip(f"this megatron-core has no {cfg.moe_router_score_function!r} scores")
    quantile = cfg.moe_router_load_balancing_type == "quantile_balancing"
    if quantile and not hasattr(mu, "qb_dual_update"):
        pytest.skip("this megatron-core has no quantile balancing")
    monkeypatch.setattr(mu.MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    monkeypatch.setattr(moeblaze.Router, "aux_loss_scale", 3.0)  # not Megatron's: unused
    torch.manual_seed(9)
    layer = mb.MoELayer(cfg).train()
    bias = None
    if layer.router.expert_bias is not None:
        bias = torch.tensor([0.3, -0.2, 0.1, -0.4])
        layer.router.expert_bias.copy_(bias)
    beta = None  # quantile balancing's bias, which changes the choice here
    if quantile:
        beta = torch.tensor([0.05, -0.04, 0.02, -0.03])
        layer.router.qb_beta.copy_(beta)
    g = torch.Generator().manual_seed(10)
    tokens = torch.randn(S * BATCH, H, generator=g) * TOKEN_SCALE.get(routing, 1.0)  # [N, h]
    upstream = torch.randn(S * BATCH, E, generator=g)  # d objective / d routing weight [N, E]
    k = cfg.moe_router_topk

    def dense(ids, weights):  # [N, k] -> [N, E]; a dropped slot (-1, weight 0) adds 0
        return weights.new_zeros(ids.shape[0], E).scatter_add(1, ids.clamp_min(0), weights)

    coeffs = megatron_config._loss_coeffs(vars(cfg))  # {type: coefficient}
    padding = _padding_mask(even="seq_aux_loss" in coeffs) if padded else None  # [b, s]
    if quantile and padded:  # refused, as megatron-core's TopKRouter.routing refuses it
        with pytest.raises(ValueError, match="token_mask must be None"):
            layer(tokens.view(S, BATCH, H), padding_mask=padding)
        return
    # The router applies moe_router_topk_scaling_factor; the tokens are [s, b, h] flattened.
    torch.manual_seed(11)  # the input jitter's draw
    layer(tokens.view(S, BATCH, H), padding_mask=padding)
    routing_out = layer.last_router_output
    ours = dense(routing_out.topk_ids, routing_out.topk_weights)
    assert megatron_layer._megatron_aux_loss_scale() == 3.0  # Megatron's unset: moeblaze.Router's
    mu.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([0.5]))  # after the forward, as Megatron
    (ours * upstream).sum().backward()
    router_params = dict(layer.router.named_parameters())  # weight, and bias if add_bias_linear
    ours_grads = {name: p.grad.clone() for name, p in router_params.items()}

    megatron_params = {n: p.detach().clone().requires_grad_() for n, p in router_params.items()}
    # TopKRouter.gating's RouterGatingLinearFunction without TransformerEngine (which this
    # megatron-core needs to run it): addmm in float32.
    weight, gate_bias = megatron_params["weight"], megatron_params.get("bias")
    torch.manual_seed(11)
    eps = getattr(cfg, "moe_input_jitter_eps", None)
    router = types.SimpleNamespace(config=types.SimpleNamespace(moe_input_jitter_eps=eps))
    router.input_jitter = None
    jittered = megatron.router.TopKRouter.apply_input_jitter(router, tokens.view(S, BATCH, H))
    jittered = jittered.view(-1, H)  # tokens itself without moe_input_jitter_eps
    # router_gating_linear: in moe_router_dtype
    dtype = torch.float64 if getattr(cfg, "moe_router_dtype", None) == "fp64" else torch.float32
    logits = jittered.to(dtype) @ weight.to(dtype).t()  # [N, E]
    if gate_bias is not None:
        logits = torch.addmm(gate_bias.to(dtype), jittered.to(dtype), weight.to(dtype).t())
    padding = None if padding is None else padding.t().reshape(-1)  # [N], TopKRouter.routing
    # calculate_per_token_loss: each loss times the real tokens (one rank: TP x CP size 1)
    per_token = S * BATCH if padding is None else int((~padding).sum())
    per_token = per_token if getattr(cfg, "calculate_per_token_loss", False) else 1
    if cfg.moe_z_loss_coeff:
        z_loss = mu.z_loss_func(logits, cfg.moe_z_loss_coeff, padding_mask=padding)
        logits = mu.MoEAuxLossAutoScaler.apply(logits, z_loss * per_token)
    chosen = {}  # TopKRouter.quantile_balancing: the experts qb_dual_update picks
    if quantile:
        qb_ids, column = mu.qb_dual_update(logits.detach().float(), k, beta)
        chosen = dict(precomputed_indices=qb_ids)
    probs, routing_map = mu.topk_routing_with_score_function(
        logits,
        k,
        use_pre_softmax=cfg.moe_router_pre_softmax,
        num_groups=cfg.moe_router_num_groups,
        group_topk=cfg.moe_router_group_topk,
        scaling_factor=cfg.moe_router_topk_scaling_factor,
        score_function=cfg.moe_router_score_function,
        expert_bias=bias,
        **chosen,
    )
    if cfg.moe_expert_capacity_factor is not None:  # TopKRouter.routing
        policy, factor = cfg.moe_token_drop_policy, cfg.moe_expert_capacity_factor
        capacity = math.ceil(S * BATCH * k / E * factor)
        padded_to_capacity = getattr(cfg, "moe_pad_expert_input_to_capacity", False)
        dropped = mu.apply_router_token_dropping(
            probs, routing_map, k, factor, policy, pad_to_capacity=padded_to_capacity
        )
        if padded_to_capacity:  # every expert its capacity; the padding rows weigh 0
            assert (dropped[1].sum(0) == capacity).all()
            padding_rows = dropped[1] & ~routing_map
            assert padding_rows.any() and not dropped[0][padding_rows].any()
            dropped = (dropped[0], dropped[1] & routing_map)  # the rows moeblaze computes
        if policy == "position":
            earliest = routing_map & (routing_map.cumsum(0) <= capacity)
            assert torch.equal(dropped[1].sum(0), earliest.sum(0))
            dropped = (probs * earliest, earliest)
        assert not torch.equal(dropped[1], routing_map), "the case is meant to drop tokens"
        probs, routing_map = dropped
    aux_map, aux_scores = mu.compute_routing_scores_for_aux_loss(
        logits, k, cfg.moe_router_score_function, padding_mask=padding
    )
    # get_tokens_per_expert_and_token_count on one rank: the real tokens, k slots each.
    if coeffs.get("aux_loss"):  # TopKRouter._apply_aux_loss
        aux = mu.switch_load_balancing_loss_func(
            aux_scores, aux_map.sum(0), aux_map.sum() / k, k, E, coeffs["aux_loss"]
        )
        probs = mu.MoEAuxLossAutoScaler.apply(probs, aux * per_token)
    if coeffs.get("seq_aux_loss"):  # TopKRouter._apply_seq_aux_loss, one rank
        seq_scores, seq_map = aux_scores.reshape(S, -1), aux_map.reshape(S, -1)
        seq_aux = mu.switch_load_balancing_loss_func(
            seq_scores, seq_map.sum(0), seq_map.sum() / (k * BATCH), k, E, coeffs["seq_aux_loss"]
        )
        probs = mu.MoEAuxLossAutoScaler.apply(probs, seq_aux / BATCH * per_token)
    (probs * upstream).sum().backward()

    assert torch.equal(ours != 0, routing_map), "different experts chosen"
    if quantile:  # the bias changed the choice; the quantile added to what the step updates by
        unbiased = torch.zeros_like(routing_map).scatter(1, logits.topk(k, dim=-1).indices, True)
        assert not torch.equal(routing_map, unbiased)
        assert_close(layer.router.qb_beta_accum, column, rtol=1e-6, name=f"{routing} qb_beta")
        assert layer.router.qb_beta_count.item() == 1
    if routing == "softmax_groups":  # the case tells the groups' logit sums from score sums
        by_scores = mb.MoELayer(_config(moe_router_num_groups=2, moe_router_group_topk=1))
        by_scores.router.group_score_from = "scores"
        by_scores.router.load_state_dict(layer.router.state_dict())
        by_scores(tokens.view(S, BATCH, H))
        assert not torch.equal(by_scores.last_router_output.topk_ids, routing_out.topk_ids)
    if bias is not None:  # TopKRouter._apply_expert_bias: the real tokens' slots kept
        real = routing_map if padding is None else routing_map & ~padding.unsqueeze(-1)
        assert torch.equal(layer.router.local_tokens_per_expert, real.sum(0))
    # (In float64, Megatron rounds the scores to float32: they agree to that rounding.)
    assert ours.dtype == probs.dtype == dtype, "routing in another dtype"
    assert_close(ours.detach(), probs.detach(), rtol=1e-6, name=f"{routing} routing weights")
    assert router_params.keys() == ({"weight", "bias"} if cfg.add_bias_linear else {"weight"})
    for name, p in megatron_params.items():
        assert_close(ours_grads[name], p.grad, rtol=1e-5, name=f"{routing} router.{name}.grad")


@pytest.mark.parametrize(
    "routing", ["softmax_pre_softmax_scaled", "sigmoid_bias_groups", "softmax_capacity"]
)
def test_routing_replay_matches_megatron(routing, megatron, monkeypatch):
    """moe_enable_routing_replay through megatron-core's own RouterReplay controls: each layer
    registers one instance, in layer order; "record" stores the experts the router chose
    (before dropping for capacity); "replay_forward" routes to the target experts with
    megatron-core's routing weights for them (topk_routing_with_score_function with a replay)
    and their gradient; "replay_backward" takes the targets kept for backward's recompute in
    order, and raises once they run out."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    mu = megatron.moe_utils
    monkeypatch.setattr(RouterReplay, "global_router_replay_instances", [])
    no_losses = dict(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)  # the weights' gradient
    cfg = _config(**{**ROUTINGS[routing], **no_losses}, moe_enable_routing_replay=True)
    torch.manual_seed(13)
    layers = [mb.MoELayer(cfg).train() for _ in range(2)]
    assert RouterReplay.global_router_replay_instances == [lay.router_replay for lay in layers]
    layer, k, n = layers[0], cfg.moe_router_topk, S * BATCH
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
    g = torch.Generator().manual_seed(14)
    x = torch.randn(S, BATCH, H, generator=g)
    upstream = torch.randn(n, E, generator=g)

    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    layer(x)
    chosen = layer.last_router_output.chosen_ids
    assert torch.equal(RouterReplay.get_recorded_data()[0], chosen)
    if cfg.moe_expert_capacity_factor is not None:
        assert not torch.equal(layer.last_router_output.topk_ids, chosen), "meant to drop"
    layer.router_replay.clear_router_replay_action()
    layer(x)  # no action: the router's own choice
    assert torch.equal(layer.last_router_output.chosen_ids, chosen)

    # Targets the router would not choose: the experts of its lowest scores.
    targets = [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)]) for _ in "ab"]
    RouterReplay.set_replay_data(targets)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    layer.zero_grad(set_to_none=True)
    layer(x)
    out = layer.last_router_output
    dense = torch.zeros(n, E).scatter_add(1, out.topk_ids.clamp_min(0), out.topk_weights)
    (dense * upstream).sum().backward()
    if cfg.moe_expert_capacity_factor is None:
        assert torch.equal(out.topk_ids, targets[0])
    assert torch.equal(out.chosen_ids, targets[0])

    weight = layer.router.weight.detach().clone().requires_grad_()
    theirs = RouterReplay()  # megatron-core's routing with its own replay of the same targets
    theirs.set_target_indices(targets[0])
    theirs.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    bias = layer.router.expert_bias
    probs, routing_map = mu.topk_routing_with_score_function(
        x.view(n, H) @ weight.t(),
        k,
        use_pre_softmax=cfg.moe_router_pre_softmax,
        num_groups=cfg.moe_router_num_groups,
        group_topk=cfg.moe_router_group_topk,
        scaling_factor=cfg.moe_router_topk_scaling_factor,
        score_function=cfg.moe_router_score_function,
        expert_bias=None if bias is None else bias.clone(),
        router_replay=theirs,
    )
    if cfg.moe_expert_capacity_factor is not None:
        probs, routing_map = mu.apply_router_token_dropping(
            probs, routing_map, k, cfg.moe_expert_capacity_factor, cfg.moe_token_drop_policy
        )
    (probs * upstream).sum().backward()
    assert torch.equal(dense != 0, routing_map)
    assert_close(dense.detach(), probs.detach(), rtol=1e-6, name=f"{routing} replayed weights")
    assert_close(layer.router.weight.grad, weight.grad, rtol=1e-5, name=f"{routing} dweight")

    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    layer(x)
    assert torch.equal(layer.last_router_output.chosen_ids, targets[0])
    with pytest.raises(RuntimeError, match="replay_backward of layer None has no expert ids"):
        layer(x)  # the list kept for backward is spent


def test_megatron_training_loop_updates_the_expert_bias(megatron):
    """megatron-core's own steps of finalize_model_grads (_update_router_expert_bias, then
    reset_model_temporary_tensors) drive the router's expert bias: the counts of a step's
    training forwards, all-reduced, move it by moe_router_bias_update_rate; then they reset."""
    import importlib

    finalize_model_grads = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    rate = 0.25
    config = _transformer_config(
        megatron,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none",
        moe_router_bias_update_rate=rate,
    )
    torch.manual_seed(12)
    layer = mb.MoELayer(config).train()
    x = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(13))  # [s, b, h]
    for _ in range(2):  # two micro-batches
        layer(x)[0].square().sum().backward()
    counts = layer.router.tokens_per_expert_accum.clone()
    assert counts.sum() == 2 * S * BATCH * K and counts.min() < counts.max()
    expected = rate * torch.sign(counts.float().mean() - counts.float())
    finalize_model_grads._update_router_expert_bias([layer], config)
    finalize_model_grads.reset_model_temporary_tensors(config, [layer])
    assert torch.equal(layer.router.expert_bias, expected)
    assert not layer.router.tokens_per_expert_accum.any()


def test_global_aux_loss_matches_megatron(megatron, monkeypatch):
    """Megatron's "global_aux_loss" over two micro-batches, the second padded: the loss and the
    router-weight gradient of each against Megatron's _apply_global_aux_loss (its counts, of real
    tokens, averaged over the step's micro-batches, against this micro-batch's real tokens; one
    rank here), then megatron-core's reset_model_temporary_tensors starts a new step."""
    import importlib

    finalize_model_grads = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    mu, coeff = megatron.moe_utils, 0.3
    config = _transformer_config(
        megatron, moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=coeff
    )
    monkeypatch.setattr(mu.MoEAuxLossAutoScaler, "main_loss_backward_scale", torch.tensor(1.0))
    torch.manual_seed(14)
    router = mb.MoELayer(config).train().router
    g = torch.Generator().manual_seed(15)
    counts = torch.zeros(E)  # Megatron's global_tokens_per_expert
    for step in range(1, 3):
        tokens = torch.randn(S * BATCH, H, generator=g)  # [N, h]
        upstream = torch.randn(S * BATCH, E, generator=g)  # d objective / d routing weight
        padding = None if step == 1 else _padding_mask(even=False).t().reshape(-1)  # [N]
        router.zero_grad()
        out = router(tokens, token_mask=None if padding is None else ~padding)
        ours = torch.zeros(S * BATCH, E).scatter(1, out.topk_ids, out.topk_weights)
        (ours * upstream).sum().backward()

        weight = router.weight.detach().clone().requires_grad_()
        logits = tokens @ weight.t()
        probs, _ = mu.topk_routing_with_score_function(logits, K, score_function="softmax")
        aux_map, aux_scores = mu.compute_routing_scores_for_aux_loss(
            logits, K, "softmax", padding_mask=padding
        )
        counts += aux_map.sum(0)
        loss = mu.switch_load_balancing_loss_func(
            aux_scores, counts / step, aux_map.sum() / K, K, E, coeff
        )
        (mu.MoEAuxLossAutoScaler.apply(probs, loss) * upstream).sum().backward()
        where = f"micro-batch {step}"
        assert_close(coeff * out.global_aux_loss, loss.detach(), rtol=1e-6, name=where)
        assert_close(router.weight.grad, weight.grad, rtol=1e-5, name=f"{where}: grad")
    finalize_model_grads.reset_model_temporary_tensors(config, [router])
    assert not router.global_tokens_per_expert.any() and router.global_aux_steps == 0


def test_sharded_state_dict_places_the_layer_in_the_model(megatron):
    """`sharded_state_dict` (megatron-core's distributed checkpointing) prefixes the layer's
    place among the model's layers to every tensor, and stores w13's 2F axis as (2, F)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    layer = mb.MoELayer(_config(moe_shared_expert_intermediate_size=SHARED))
    sharded = layer.sharded_state_dict("decoder.layers.mlp.", ((0, 3, 8),), {"dp_cp_group": None})
    assert set(sharded) == {f"decoder.layers.mlp.{name}" for name in layer.state_dict()}
    w13 = sharded["decoder.layers.mlp.w13"]
    assert isinstance(w13, ShardedTensorFactory)
    built = w13.build()
    assert built.global_shape == (8, E, 2, FFN, H) and built.global_offset == (3, 0, 0, 0, 0)
    assert torch.equal(built.data.reshape(layer.w13.shape), layer.w13.detach())
    w2 = sharded["decoder.layers.mlp.w2"]
    assert w2.global_shape == (8, E, H, FFN) and w2.global_offset[0] == 3


def test_quantile_balancing_maps_to_the_router():
    # The routing itself is compared with megatron-core's (>= 0.19) in
    # test_routing_matches_megatron.
    layer = mb.MoELayer(_config(moe_router_load_balancing_type="quantile_balancing"))
    assert layer.router.qb_beta is not None and layer.router.aux_loss_coeff == 0.0
    assert mb.MoELayer(_config()).router.qb_beta is None


def test_megatron_training_loop_updates_the_quantile_bias(megatron):
    """megatron-core's own steps of finalize_model_grads (_update_router_qb_beta, then
    reset_model_temporary_tensors) drive the router's quantile-balancing bias: the average of a
    step's column quantiles, blended by moe_router_quantile_balancing_ema and centred; then the
    accumulation resets. Both steps find the router's buffers by megatron-core's names."""
    import importlib

    finalize_model_grads = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    if not hasattr(finalize_model_grads, "_update_router_qb_beta"):
        pytest.skip("this megatron-core has no quantile balancing")
    from megatron.core import parallel_state

    ema = 0.25
    config = _transformer_config(
        megatron,
        moe_router_load_balancing_type="quantile_balancing",
        moe_aux_loss_coeff=0.0,
        moe_router_quantile_balancing_ema=ema,
    )
    torch.manual_seed(12)
    layer = mb.MoELayer(config).train()
    layer.router.qb_beta.copy_(torch.tensor([0.05, -0.04, 0.02, -0.03]))
    x = torch.randn(S, BATCH, H, generator=torch.Generator().manual_seed(13))  # [s, b, h]
    for _ in range(2):  # two micro-batches
        layer(x)[0].square().sum().backward()
    assert layer.router.qb_beta_count.item() == 2
    average = layer.router.qb_beta_accum / 2
    expected = ema * layer.router.qb_beta + (1 - ema) * average
    expected = expected - expected.mean()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    finalize_model_grads._update_router_qb_beta([layer], config, dp_cp_group=group)
    finalize_model_grads.reset_model_temporary_tensors(config, [layer])
    assert_close(layer.router.qb_beta, expected, rtol=1e-6, name="qb_beta")
    assert not layer.router.qb_beta_accum.any() and layer.router.qb_beta_count.item() == 0
    # moeblaze's own update computes the same outside Megatron's loop.
    layer.router.qb_beta.copy_(torch.tensor([0.05, -0.04, 0.02, -0.03]))
    layer(x)[0].sum().backward()
    layer(x)[0].sum().backward()
    ours = dict(layer.router.named_buffers())
    theirs_beta = ema * ours["qb_beta"] + (1 - ema) * ours["qb_beta_accum"] / 2
    layer.router.update_quantile_bias(ema)
    assert_close(layer.router.qb_beta, theirs_beta - theirs_beta.mean(), rtol=1e-6, name="own")


def test_megatron_config_with_deepseek_v4_scores(megatron):
    """A megatron-core TransformerConfig with sqrt(softplus) scores and the expert bias
    (DeepSeek-V4's routing; megatron-core >= 0.19 accepts it) builds a layer that routes by them."""
    try:
        config = _transformer_config(
            megatron,
            moe_router_score_function="sqrtsoftplus",
            moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none",
        )
    except (AssertionError, ValueError) as error:  # megatron-core < 0.19 refuses it
        pytest.skip(f"this megatron-core refuses sqrtsoftplus with the expert bias: {error}")
    layer = mb.MoELayer(config)
    assert layer.router.score_func == "sqrtsoftplus" and layer.router.expert_bias is not None
    out, _ = layer(torch.randn(S, BATCH, H))
    assert out.shape == (S, BATCH, H)
