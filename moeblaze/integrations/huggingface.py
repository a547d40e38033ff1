"""Hugging Face `transformers` (v5) experts implementations that run `moeblaze.moe_mlp`.

# T tokens, d hidden, F expert ffn, E experts, k top-k

transformers v5 keeps the experts of an MoE block in one module whose class is decorated with
`transformers.integrations.moe.use_experts_implementation`. Its `forward` looks up
`config._experts_implementation` in `ExpertsInterface` and calls the function found there:

    MoE block: router -> top_k_index [T, k], top_k_weights [T, k]
    experts(hidden_states [T, d], top_k_index, top_k_weights)
      -> ExpertsInterface[config._experts_implementation](experts, hidden_states, ...)
      -> moeblaze.moe_mlp(hidden_states, top_k_index, top_k_weights,
                          w13 = gate_up_proj [E, 2F, d], w2 = down_proj [E, d, F],
                          b13 = gate_up_proj_bias, b2 = down_proj_bias) -> [T, d]
         (experts without a gate, has_gate=False: w13 = up_proj [E, F, d], b13 = up_proj_bias)

Importing this module registers one name per `moeblaze.RECOMPUTE_POLICIES` entry, plus the
default, so the policy is chosen per model, with no global state:

    "moeblaze"             recompute="activation" (moeblaze's default)
    "moeblaze-activation"  recompute="activation": keep the [T*k, 2F] pre-activation
    "moeblaze-up_proj"     recompute="up_proj": keep nothing of size T*k*F
    "moeblaze-none"        recompute="none": keep pre-activation and activation

    import moeblaze.integrations.huggingface  # noqa: F401  (registers the names)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moeblaze")
    model.set_experts_implementation("moeblaze-up_proj")  # switch policy later

The experts' own parameters are used as they are, with no conversion and no copy per call:
`gate_up_proj [E, 2F, d]` is `w13` and `down_proj [E, d, F]` is `w2`; families that store them
transposed (`is_transposed=True`, `[E, d, 2F]` and `[E, F, d]`) are passed as transposed views,
which the kernels read through their strides; biases (`has_bias=True`) are `b13` and `b2`. The
activation is `act_fn(gate) * up`, a `moeblaze.SwiGLU` for a SiLU `act_fn` and a
`moeblaze.Gated` for the GELU of Gemma 4 and DiffusionGemma (GeGLU; GELU in either form, ReLU,
ReLU²; read from transformers' activation class, `ACT_FN_CLASSES`, or found by evaluating
`act_fn`), or a custom `_apply_gate` that is a `moeblaze.SwiGLU` (`CUSTOM_GATES`: Beam's SwiGLU
in float32; the clamped SwiGLU of DeepSeek-V4, HY-V4 (and HY-V4-VL) and GLM-5-Next; the clamped
quick-GELU one of GPT-OSS, on gate and up columns interleaved as `is_concatenated=False` says,
and of MiniMax-M3-VL and OpenAI's privacy filter; the soft-capped SwiGLU of Inkling 2 and
Inkling 2 Loop), checked against the class's own `_apply_gate` before first use. Experts
without a gate (`up_proj` only, NemotronH) compute `act_fn(up)`: a `moeblaze.Ungated` (ReLU²,
GELU in either form, ReLU, SiLU), found the same way. Under torch.compile none of this breaks
the graph: a known activation class is read from the class, and an evaluation (another
`act_fn`, a custom `_apply_gate`) runs while dynamo traces, its result a constant
(`moeblaze.activation.evaluated_once`; before torch 2.12, a module's evaluation breaks it).
Experts that compute anything else raise `NotImplementedError` naming the experts class, its
model family and what moeblaze lacks: another activation, another custom `_apply_gate`, a
post-expert norm.

Under Hugging Face expert parallelism, slots routed to experts of other ranks arrive with ids
>= E and zero weights; they become dropped slots (`moeblaze.DROPPED`): no GEMM rows, nothing
added, no gradient (the "batched_mm" implementation computes them on expert E-1 and discards
them).
"""

import functools

import torch
from torch import nn

import moeblaze
from moeblaze.activation import (
    SWIGLU,
    Activation,
    Gated,
    SwiGLU,
    Ungated,
    activation_of,
    evaluated_once,
    gated_unit_computing,
    ungated_computing,
)

try:
    from transformers import activations as hf_activations
    from transformers.integrations import moe as hf_moe
except ImportError as error:
    raise ImportError(
        "moeblaze.integrations.huggingface needs transformers >= 5 (with "
        "transformers.integrations.moe.ExpertsInterface): pip install 'transformers>=5'"
    ) from error

NAME = "moeblaze"
DEFAULT_RECOMPUTE = "activation"
# Every name this module registers, and the recompute policy each one runs.
IMPLEMENTATIONS = {
    NAME: DEFAULT_RECOMPUTE,
    **{f"{NAME}-{policy}": policy for policy in moeblaze.RECOMPUTE_POLICIES},
}


def moeblaze_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,  # [T, d]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    *,
    recompute: str = DEFAULT_RECOMPUTE,
) -> torch.Tensor:  # [T, d]
    """The experts of a transformers v5 MoE block, computed by `moeblaze.moe_mlp`.

    `experts` is the module whose class is decorated with `use_experts_implementation`; this
    function is what its `forward` calls once "moeblaze" is its experts implementation.
    """
    activation = expert_activation(experts)  # raises for experts moeblaze does not compute
    w13, w2 = _weights(experts)  # [E, 2F, d], [E, d, F]: views of the parameters
    b13, b2 = expert_biases(experts)  # [E, 2F], [E, d] or None
    if getattr(experts, "_is_expert_parallel", False):
        # transformers' expert parallelism marks the slots of another rank's experts with ids
        # >= E (and weight 0): dropped here, they cost no GEMM rows and get no gradient.
        top_k_index = top_k_index.masked_fill(top_k_index >= w13.shape[0], moeblaze.DROPPED)
    # Under autocast the input may be float32 while the weights are bf16, as in "grouped_mm".
    out = moeblaze.moe_mlp(
        hidden_states.to(w13.dtype),
        top_k_index,
        top_k_weights,
        w13,
        w2,
        b13=b13,
        b2=b2,
        recompute=recompute,
        activation=activation,
    )
    return out.to(hidden_states.dtype)


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2F, d] (up_proj [E, F, d] without a gate), w2 [E, d, F]) of a transformers v5
    experts module, as views.

    Raises NotImplementedError naming the class and model family if its experts are not
    gated (SwiGLU, Gated) or ungated experts in a layout moeblaze reads without copying.
    """
    expert_activation(experts)
    return _weights(experts)


def expert_activation(experts: nn.Module) -> Activation:
    """The moeblaze activation (SwiGLU, Gated or Ungated) a transformers v5 experts module
    computes; NotImplementedError as `expert_weights` says if moeblaze cannot run it."""
    activation, missing = _support(experts)
    if missing:
        cls = type(experts)
        family = cls.__module__.removeprefix("transformers.models.").split(".")[0]
        raise NotImplementedError(
            f"experts_implementation='moeblaze' cannot run {cls.__name__} (model family "
            f"{family!r}): moeblaze computes down(act(gate(x)) * up(x)) with gate_up_proj "
            f"[E, 2F, d] (or down(act(up(x))) with up_proj [E, F, d]) and down_proj [E, d, F] "
            f"(or transposed), but these experts have "
            f"{'; '.join(missing)}. Use experts_implementation='grouped_mm' or 'eager' for "
            f"this model."
        )
    return activation


def _weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`expert_weights` of experts already checked."""
    w13 = experts.gate_up_proj if experts.has_gate else experts.up_proj
    if experts.is_transposed:  # gate_up_proj [E, d, 2F], down_proj [E, F, d]
        return w13.transpose(1, 2), experts.down_proj.transpose(1, 2)
    return w13, experts.down_proj


def expert_biases(experts: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(b13 [E, 2F] ([E, F] without a gate), b2 [E, d]) of experts with `has_bias=True` (their
    parameters), else (None, None)."""
    if not experts.has_bias:
        return None, None
    b13 = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
    return b13, experts.down_proj_bias


def _support(experts: nn.Module) -> tuple[Activation | None, list[str]]:
    """(the experts' activation or None, what they compute or store that moeblaze does not:
    empty if supported)."""
    cls = type(experts)
    if not hasattr(experts, "has_gate"):
        return None, [
            f"no transformers v5 experts interface ({cls.__name__} is not decorated with "
            f"transformers.integrations.moe.use_experts_implementation)"
        ]
    missing = []
    if getattr(experts, "has_post_expert_norm", False):
        missing.append("a norm after each expert (has_post_expert_norm=True)")
    activation, problem = _activation_of(experts)
    if problem:
        missing.append(problem)
    return activation, missing


def _softcaps(act_fn) -> dict:
    """The soft caps of Inkling 2's SoftcappedSwiGLU module (`c * tanh(y / c)` on gate and up)."""
    return dict(gate_softcap=act_fn.gate_softcap.softcap, up_softcap=act_fn.up_softcap.softcap)


# Experts classes with their own `_apply_gate` that is a moeblaze.SwiGLU, and how to read its
# numbers from the module (the gate/up layout is the module's `is_concatenated`). Before first
# use, the SwiGLU is checked against `_apply_gate` itself (`_computes`), so a class that changes
# its gate in a later transformers is refused, not computed wrong.
CUSTOM_GATES = {
    # act_fn(gate) * up in float32, rounded back
    "BeamExperts": lambda experts: {},
    # clamp, then act_fn(gate) * up
    "DeepseekV4Experts": lambda experts: dict(limit=experts.limit),
    # clamp, then silu(gate) * up
    "HYV4Experts": lambda experts: dict(limit=experts.swiglu_limit),
    "HYV4VLExperts": lambda experts: dict(limit=experts.swiglu_limit),
    "Glm5NextTextExperts": lambda experts: dict(limit=experts.swiglu_limit),
    # clamp, then gate * sigmoid(alpha * gate) * (up + 1) on concatenated halves
    "MiniMaxM3VLExperts": lambda experts: dict(
        alpha=experts.swiglu_alpha, limit=experts.swiglu_limit, up_offset=1.0
    ),
    "OpenAIPrivacyFilterExperts": lambda experts: dict(
        alpha=experts.alpha, limit=experts.limit, up_offset=1.0
    ),
    # gate, up = gate_up[..., ::2], gate_up[..., 1::2]; clamp; gate * sigmoid(alpha * gate) *
    # (up + 1)
    "GptOssExperts": lambda experts: dict(alpha=experts.alpha, limit=experts.limit, up_offset=1.0),
    # softcap(gate) * sigmoid(gate) * softcap(up) in float32, softcap(y) = c * tanh(y / c)
    "Inkling2Experts": lambda experts: _softcaps(experts.act_fn),
    "Inkling2LoopExperts": lambda experts: _softcaps(experts.act_fn),
}


# transformers' activation classes (ACT2CLS) and the Ungated function each computes, read from
# the class alone (exact type) so that torch.compile traces the choice without a graph break;
# tested against what evaluating them finds. Any other act_fn is evaluated
# (moeblaze.activation.identify), once per function object.
ACT_FN_CLASSES = {
    cls: fn
    for name, fn in [
        ("SiLUActivation", "silu"),
        ("GELUActivation", "gelu"),
        ("GELUTanh", "gelu_tanh"),
        ("NewGELUActivation", "gelu_tanh"),
        ("FastGELUActivation", "gelu_tanh"),
        ("ReLUSquaredActivation", "relu2"),
    ]
    if (cls := getattr(hf_activations, name, None)) is not None
} | {nn.SiLU: "silu", nn.ReLU: "relu"}


def _activation_of(experts: nn.Module) -> tuple[Activation | None, str | None]:
    """(the SwiGLU, Gated or Ungated the experts compute, None), or (None, what they compute
    instead)."""
    cls = type(experts)
    act = getattr(experts, "act_fn", None)
    known = ACT_FN_CLASSES.get(type(act))
    if not experts.has_gate:
        activation = Ungated(known) if known else ungated_computing(act)
        if activation is None:
            return None, f"the activation {act!r} (without a gate), which no moeblaze.Ungated is"
        return activation, None
    # A transformers without this default would make every gate "custom": loud, never wrong.
    if cls._apply_gate is getattr(hf_moe, "_default_apply_gate", None):
        if known == "silu" or act is nn.functional.silu:
            return SWIGLU, None
        activation = Gated(known) if known else gated_unit_computing(act)
        if activation is None:
            return None, f"the gate activation {act!r}, which no moeblaze.SwiGLU or Gated computes"
        return activation, None
    read = CUSTOM_GATES.get(cls.__name__)
    activation = None
    if read is not None:
        activation = SwiGLU(**read(experts), interleaved=not experts.is_concatenated)
    if activation is not None and _computes(cls, cls._apply_gate, act, *activation.constants):
        return activation, None
    known = f" (not {activation!r} as expected)" if activation is not None else ""
    return None, (
        f"their own gate activation {cls.__name__}._apply_gate{known}, which no "
        f"moeblaze.SwiGLU computes"
    )


@evaluated_once
def _computes(cls: type, apply_gate, act_fn, *constants) -> bool:
    """Whether `apply_gate` (`cls._apply_gate`) computes the activation of these `constants`
    (`moeblaze.activation.activation_of`) for experts of that class with this `act_fn`: on
    float64 gate and up (laid out as the activation says) at points across and around its
    clamps, to float32 rounding (moeblaze computes the activation in float32; a gate may
    too)."""
    activation = activation_of(*constants)
    bound = 2 * (activation.limit or 4.0)
    grid = torch.linspace(-bound, bound, 41, dtype=torch.float64)
    gate, up = grid[:, None].expand(41, 41), grid[None, :].expand(41, 41)  # every pair
    gate_up = activation.join(gate, up)  # [41, 82]
    probe = object.__new__(cls)  # the module's attributes the gate reads, nothing else
    limit, alpha = activation.limit, activation.alpha  # under the names the known gates read
    probe.__dict__.update(
        act_fn=act_fn, limit=limit, swiglu_limit=limit, alpha=alpha, swiglu_alpha=alpha
    )
    try:
        computed = apply_gate(probe, gate_up)
    except Exception:  # a gate that reads more than these attributes is not one we know
        return False
    return torch.allclose(computed.double(), activation.forward(gate, up), rtol=1e-6, atol=1e-9)


for _name, _policy in IMPLEMENTATIONS.items():
    hf_moe.ExpertsInterface.register(
        _name, functools.partial(moeblaze_experts_forward, recompute=_policy)
    )
