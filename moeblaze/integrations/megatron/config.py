"""A Megatron TransformerConfig in moeblaze's terms: the fields `MoELayer` reads
(`MEGATRON_DEFAULTS`), `layer_options` (`LayerOptions`), and the checks that name every field
moeblaze cannot honour (NotImplementedError) or that holds an invalid value (ValueError)."""

import dataclasses
import math

import torch
import torch.nn.functional as F

from moeblaze.activation import Activation, gated_unit_computing, ungated_computing
from moeblaze.reference import SCORE_FUNCS
from moeblaze.router import DROP_POLICIES

# The TransformerConfig fields MoELayer reads, with their megatron-core 0.16 defaults.
MEGATRON_DEFAULTS = {
    "hidden_size": 0,
    "num_moe_experts": None,
    "moe_ffn_hidden_size": None,
    "ffn_hidden_size": None,
    "moe_router_topk": 2,
    "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 0.0,
    "moe_z_loss_coeff": None,
    # Megatron turns a negative capacity factor into None (no token dropping).
    "moe_expert_capacity_factor": None,
    "moe_token_drop_policy": "probs",
    "moe_router_dtype": None,
    "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_gate": False,
    "moe_layer_recompute": False,
    "recompute_granularity": None,
    "recompute_modules": None,
    "gated_linear_unit": False,
    "activation_func": F.gelu,
    "glu_linear_offset": 0.0,
    "activation_func_clamp_value": None,
    "add_bias_linear": True,
    "params_dtype": torch.float32,
    "init_method": None,
    "output_layer_init_method": None,
    "perform_initialization": True,
    "use_cpu_initialization": False,
    "moe_input_jitter_eps": None,
    "moe_router_force_load_balancing": False,
    "moe_apply_probs_on_input": False,
    "moe_enable_routing_replay": False,
    "moe_router_topk_limited_devices": None,  # deprecated: group-limited routing by EP rank
    "moe_latent_size": None,
    "calculate_per_token_loss": False,
    "mtp_num_layers": None,
    "mtp_use_repeated_layer": False,
    # Padding each expert's rows to its capacity with tokens of routing weight 0 (Megatron's
    # drop-and-pad, for static expert shapes): they add nothing to the output and get no
    # gradient, so moeblaze computes none (its plan has static bounds anyway).
    "moe_pad_expert_input_to_capacity": False,
    # Features moeblaze does not have: only their defaults are accepted.
    "moe_router_padding_for_quantization": False,
    "moe_router_padding_for_fp8": False,
    "fp8": None,
    "fp4": None,
    # megatron-core >= 0.17 (absent from 0.16's config: their defaults then)
    "moe_router_force_biased": None,
    "moe_mlp_glu_interleave_size": None,
    "moe_shared_expert_glu_interleave_size": None,
    "moe_expert_rank_capacity_factor": None,
    "tensor_model_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "context_parallel_size": 1,
    "sequence_parallel": False,
}
# Fields whose other values need a feature moeblaze lacks: (the feature, accepted value test).
_OFF = lambda value: not value
_UNSUPPORTED = {
    "moe_router_padding_for_quantization": ("padding routed tokens for FP8/FP4", _OFF),
    "moe_router_padding_for_fp8": ("padding routed tokens for FP8", _OFF),
    "fp8": ("FP8 experts", _OFF),
    "fp4": ("FP4 experts", _OFF),
    "moe_router_force_biased": ("random expert biases on the router logits", _OFF),
    "moe_mlp_glu_interleave_size": ("the experts' GLU rows interleaved in blocks", _OFF),
    "moe_shared_expert_glu_interleave_size": (
        "the shared expert's GLU rows interleaved in blocks",
        _OFF,
    ),
    "moe_expert_rank_capacity_factor": ("token dropping by each expert rank's capacity", _OFF),
}
_LOAD_BALANCING_TYPES = (
    "aux_loss",
    "seq_aux_loss",
    "global_aux_loss",
    "sinkhorn",
    "quantile_balancing",  # megatron-core >= 0.17
    "none",
)
_PARAMS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """A Megatron config in moeblaze's terms (built and checked by `layer_options`)."""

    hidden_size: int
    ffn_hidden_size: int  # F of each routed expert
    num_experts: int
    top_k: int
    score_func: str  # moeblaze.Router options from here to topk_scaling_factor
    norm_topk_prob: bool
    num_groups: int | None
    topk_groups: int | None
    group_score_topk: int | None  # a group's score: the sum of its top this many
    group_score_from: str  # of the logits or the scores
    expert_bias: bool
    quantile_balancing: bool  # moe_router_load_balancing_type="quantile_balancing"
    aux_loss_coeff: float
    seq_aux_loss_coeff: float
    global_aux_loss_coeff: float
    z_loss_coeff: float
    topk_scaling_factor: float  # multiplies the k routing weights
    capacity_factor: float | None  # token dropping: None drops none
    drop_policy: str  # which slots an expert past its capacity keeps: "probs" or "position"
    input_jitter_eps: float | None  # router input jitter in training
    random_logits: bool  # random router logits (forced load balancing, for benchmarks)
    routing_dtype: torch.dtype  # of the logits, scores, weights and losses
    probs_on_input: bool  # the routing weight scales the expert's input (top-1), not its output
    routing_replay: bool  # Megatron's RouterReplay records or replays the experts chosen
    latent_size: int | None  # the routed experts work on tokens projected to this size
    shared_expert_size: int | None
    shared_expert_gate: bool  # the shared expert's output times sigmoid(x @ gate_weight)
    expert_parallel_size: int  # ranks the experts are sharded over
    expert_tensor_parallel_size: int  # ranks each expert's F columns are split over
    tensor_parallel_size: int  # ranks holding shards of one sequence (sequence parallel)
    context_parallel_size: int  # ranks holding chunks of one sequence (context parallel)
    sequence_parallel: bool
    bias: bool  # router and expert biases (add_bias_linear)
    activation: Activation  # the GLU (or ungated function) of the routed and shared experts
    recompute: str  # moeblaze.moe_mlp's policy
    recompute_shared_expert: bool
    params_dtype: torch.dtype
    # calculate_per_token_loss: Megatron divides every gradient by the global batch's tokens, so
    # the router losses' gradient is multiplied by the rank's real tokens (see MoELayer.route)
    per_token_loss: bool

    def router_options(self) -> dict:
        return dict(
            score_func=self.score_func,
            norm_topk_prob=self.norm_topk_prob,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            group_score_topk=self.group_score_topk,
            group_score_from=self.group_score_from,
            expert_bias=self.expert_bias,
            quantile_balancing=self.quantile_balancing,
            aux_loss_coeff=self.aux_loss_coeff,
            seq_aux_loss_coeff=self.seq_aux_loss_coeff,
            global_aux_loss_coeff=self.global_aux_loss_coeff,
            aux_counts="scores",  # Megatron counts the top-k of the scores alone
            z_loss_coeff=self.z_loss_coeff,
            topk_scaling_factor=self.topk_scaling_factor,
            capacity_factor=self.capacity_factor,
            drop_policy=self.drop_policy,
            input_jitter_eps=self.input_jitter_eps,
            random_logits=self.random_logits,
            routing_dtype=self.routing_dtype,
        )


def layer_options(config, is_mtp_layer: bool = False) -> LayerOptions:
    """Check a Megatron TransformerConfig (or look-alike) and translate it for moeblaze;
    `is_mtp_layer`: the options of a multi-token-prediction layer (see `_loss_coeffs`).

    Raises NotImplementedError listing every field whose value needs a feature moeblaze lacks,
    and ValueError for values that are invalid in Megatron too; both name field and value.
    """
    cfg = {name: getattr(config, name, default) for name, default in MEGATRON_DEFAULTS.items()}
    devices = cfg["moe_router_topk_limited_devices"]
    if devices and not cfg["moe_router_group_topk"]:  # as TransformerConfig.__post_init__ maps it
        cfg["moe_router_group_topk"] = devices
        cfg["moe_router_num_groups"] = cfg["expert_model_parallel_size"] or 1
    invalid = _invalid_fields(cfg)
    if invalid:
        raise ValueError("invalid MoE config: " + "; ".join(invalid))
    unsupported = _unsupported_fields(cfg)
    if unsupported:
        raise NotImplementedError(
            "moeblaze.integrations.megatron.MoELayer does not support: " + "; ".join(unsupported)
        )
    top_k, score_func = cfg["moe_router_topk"], cfg["moe_router_score_function"]
    recompute_modules = cfg["recompute_modules"] or ()
    selective = cfg["recompute_granularity"] == "selective"
    grouped = cfg["moe_router_num_groups"] is not None and cfg["moe_router_group_topk"]
    per_group = top_k // cfg["moe_router_group_topk"] if grouped else None
    # Megatron: softmax of the k chosen logits (= renormalised scores) unless pre-softmax;
    # sigmoid and sqrtsoftplus scores divided by their sum when k > 1.
    softmax_of_chosen = score_func == "softmax" and not cfg["moe_router_pre_softmax"]
    norm_topk_prob = softmax_of_chosen if score_func == "softmax" else top_k > 1
    recompute = "activation"
    if cfg["moe_layer_recompute"] or (selective and "moe" in recompute_modules):
        recompute = "up_proj"
    coeffs = _loss_coeffs(cfg, is_mtp_layer)
    return LayerOptions(
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["moe_ffn_hidden_size"] or cfg["ffn_hidden_size"],
        num_experts=cfg["num_moe_experts"],
        top_k=top_k,
        score_func=score_func,
        norm_topk_prob=norm_topk_prob,
        num_groups=cfg["moe_router_num_groups"] if grouped else None,
        topk_groups=cfg["moe_router_group_topk"] if grouped else None,
        group_score_topk=per_group,
        # Megatron's softmax without pre-softmax ranks the logits: a group's sum of its best
        # logits ranks the groups otherwise than its scores' once it sums more than one (the
        # max ranks them alike, and the compiled selection runs).
        group_score_from="logits" if softmax_of_chosen and (per_group or 0) > 1 else "scores",
        expert_bias=bool(cfg["moe_router_enable_expert_bias"]),
        # Megatron routes by quantile balancing when the type is this string (not in a list).
        quantile_balancing=cfg["moe_router_load_balancing_type"] == "quantile_balancing",
        aux_loss_coeff=coeffs.get("aux_loss", 0.0),
        seq_aux_loss_coeff=coeffs.get("seq_aux_loss", 0.0),
        global_aux_loss_coeff=coeffs.get("global_aux_loss", 0.0),
        z_loss_coeff=float(cfg["moe_z_loss_coeff"] or 0.0),
        topk_scaling_factor=cfg["moe_router_topk_scaling_factor"] or 1.0,
        capacity_factor=_capacity_factor(cfg),
        drop_policy=cfg["moe_token_drop_policy"],
        input_jitter_eps=cfg["moe_input_jitter_eps"],
        random_logits=bool(cfg["moe_router_force_load_balancing"]),
        routing_dtype=torch.float64 if cfg["moe_router_dtype"] == "fp64" else torch.float32,
        probs_on_input=bool(cfg["moe_apply_probs_on_input"]),
        routing_replay=bool(cfg["moe_enable_routing_replay"]),
        latent_size=cfg["moe_latent_size"],
        shared_expert_size=cfg["moe_shared_expert_intermediate_size"],
        # Megatron builds the gate only inside a shared expert.
        shared_expert_gate=bool(cfg["moe_shared_expert_gate"])
        and cfg["moe_shared_expert_intermediate_size"] is not None,
        expert_parallel_size=cfg["expert_model_parallel_size"] or 1,
        expert_tensor_parallel_size=_expert_tensor_parallel_size(cfg),
        tensor_parallel_size=cfg["tensor_model_parallel_size"] or 1,
        context_parallel_size=cfg["context_parallel_size"] or 1,
        sequence_parallel=bool(cfg["sequence_parallel"]),
        bias=bool(cfg["add_bias_linear"]),
        activation=_activation(cfg),
        recompute=recompute,
        recompute_shared_expert=selective and "shared_experts" in recompute_modules,
        params_dtype=cfg["params_dtype"],
        per_token_loss=bool(cfg["calculate_per_token_loss"]),
    )


def _expert_tensor_parallel_size(cfg):
    """Megatron's expert_tensor_parallel_size, whose default (None) is the tensor-parallel size."""
    etp = cfg["expert_tensor_parallel_size"]
    return (cfg["tensor_model_parallel_size"] or 1) if etp is None else etp


def _loss_coeffs(cfg, is_mtp_layer: bool = False) -> dict[str, float]:
    """{load-balancing type: coefficient} from moe_router_load_balancing_type / _aux_loss_coeff.

    A multi-token-prediction layer that Megatron runs mtp_num_layers times a step
    (mtp_use_repeated_layer) divides them by mtp_num_layers, as megatron-core >= 0.17 does, so
    that the repeated layer's balancing losses count once (its z-loss is not divided there)."""
    types, coeffs = cfg["moe_router_load_balancing_type"], cfg["moe_aux_loss_coeff"]
    if isinstance(types, str):
        types, coeffs = [types], [coeffs]
    repeats = cfg["mtp_num_layers"] if is_mtp_layer and cfg["mtp_use_repeated_layer"] else None
    return {t: float(c) / (repeats or 1) for t, c in zip(types, coeffs, strict=True)}


def _activation(cfg) -> Activation | None:
    """The experts' activation: Megatron's GLU as the SwiGLU (F.silu, quick_gelu) or Gated
    (F.gelu, ...) whose gate function computes activation_func, with its clamp and offset; or
    with gated_linear_unit=False the Ungated computing activation_func (which Megatron applies
    without clamp or offset); None where moeblaze has none. Both found by evaluating
    activation_func (`moeblaze.activation.identify`), so that any function computing one of
    them is recognised."""
    fn = cfg["activation_func"]
    if not cfg["gated_linear_unit"]:
        return ungated_computing(fn)
    unit = gated_unit_computing(fn)
    if unit is None:
        return None
    return dataclasses.replace(
        unit, limit=cfg["activation_func_clamp_value"], up_offset=cfg["glu_linear_offset"]
    )


def _invalid_fields(cfg) -> list[str]:
    problems = []
    clamp = cfg["activation_func_clamp_value"]
    if clamp is not None and not (isinstance(clamp, int | float) and 0 < clamp < math.inf):
        problems.append(
            f"activation_func_clamp_value={clamp!r} must be None or a finite number > 0"
        )
    offset = cfg["glu_linear_offset"]
    if not (isinstance(offset, int | float) and math.isfinite(offset)):
        problems.append(f"glu_linear_offset={offset!r} must be a finite number")
    hidden, experts = cfg["hidden_size"], cfg["num_moe_experts"]
    if not isinstance(hidden, int) or hidden < 1:
        problems.append(f"hidden_size={hidden!r} must be a positive int")
    if not isinstance(experts, int) or experts < 1:
        problems.append(f"num_moe_experts={experts!r} must be a positive int")
        experts = None
    ep = cfg["expert_model_parallel_size"] or 1
    if not isinstance(ep, int) or ep < 1 or (experts and experts % ep):
        problems.append(
            f"expert_model_parallel_size={cfg['expert_model_parallel_size']!r} must be a positive "
            f"int dividing num_moe_experts={experts}"
        )
    for name in ("tensor_model_parallel_size", "context_parallel_size"):
        value = cfg[name] or 1
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}={cfg[name]!r} must be a positive int")
    tp = cfg["tensor_model_parallel_size"] or 1
    if isinstance(tp, int) and tp > 1 and not cfg["sequence_parallel"]:
        problems.append(
            f"tensor_model_parallel_size={tp} needs sequence_parallel=True (Megatron's MoE layer "
            f"refuses tensor parallelism without it in training too)"
        )
    ffn = cfg["moe_ffn_hidden_size"] or cfg["ffn_hidden_size"]
    if not isinstance(ffn, int) or ffn < 1:
        problems.append(
            f"moe_ffn_hidden_size={cfg['moe_ffn_hidden_size']!r} (or ffn_hidden_size="
            f"{cfg['ffn_hidden_size']!r}) must be a positive int"
        )
        ffn = None
    etp = _expert_tensor_parallel_size(cfg)
    if not isinstance(etp, int) or etp < 1 or (ffn and ffn % etp):
        problems.append(
            f"expert_tensor_parallel_size={cfg['expert_tensor_parallel_size']!r} (None: "
            f"tensor_model_parallel_size={tp!r}) must be a positive int dividing each expert's "
            f"ffn size {ffn} (its columns are split over the ranks)"
        )
    top_k = cfg["moe_router_topk"]
    if not isinstance(top_k, int) or top_k < 1 or (experts and top_k > experts):
        problems.append(f"moe_router_topk={top_k!r} must be in [1, num_moe_experts={experts}]")
        top_k = None
    devices = cfg["moe_router_topk_limited_devices"]
    if devices and devices != cfg["moe_router_group_topk"]:
        problems.append(
            f"moe_router_topk_limited_devices={devices!r} (deprecated in Megatron) is "
            f"moe_router_group_topk={devices!r} with moe_router_num_groups="
            f"expert_model_parallel_size; got moe_router_group_topk="
            f"{cfg['moe_router_group_topk']!r} too"
        )
    if cfg["moe_router_dtype"] not in (None, "fp32", "fp64"):
        problems.append(
            f"moe_router_dtype={cfg['moe_router_dtype']!r} must be None, 'fp32' or 'fp64'"
        )
    latent = cfg["moe_latent_size"]
    if latent is not None and (not isinstance(latent, int) or latent < 1):
        problems.append(f"moe_latent_size={latent!r} must be None or a positive int")
    if cfg["moe_apply_probs_on_input"] and top_k not in (None, 1):
        problems.append(
            f"moe_apply_probs_on_input=True needs moe_router_topk=1 (as in Megatron), got {top_k}"
        )
    score_func = cfg["moe_router_score_function"]
    if score_func not in SCORE_FUNCS:
        problems.append(f"moe_router_score_function={score_func!r} must be one of {SCORE_FUNCS}")
    if cfg["moe_router_enable_expert_bias"] and score_func == "softmax":
        problems.append(
            "moe_router_enable_expert_bias=True needs moe_router_score_function 'sigmoid' or "
            f"'sqrtsoftplus' (as in Megatron), got {score_func!r}"
        )
    groups, group_topk = cfg["moe_router_num_groups"], cfg["moe_router_group_topk"]
    if cfg["moe_router_load_balancing_type"] == "quantile_balancing":
        if group_topk:
            problems.append(
                f"moe_router_load_balancing_type='quantile_balancing' with moe_router_group_topk="
                f"{group_topk!r} (megatron-core's quantile balancing has no group limit)"
            )
        if experts and top_k and top_k >= experts:
            problems.append(
                f"moe_router_load_balancing_type='quantile_balancing' needs moe_router_topk < "
                f"num_moe_experts, got {top_k} and {experts}"
            )
    if group_topk:
        if not groups or not experts or experts % groups:
            problems.append(
                f"moe_router_num_groups={groups!r} must divide num_moe_experts={experts} when "
                f"moe_router_group_topk={group_topk!r} is set"
            )
        elif not 1 <= group_topk <= groups or (top_k and top_k % group_topk):
            problems.append(
                f"moe_router_group_topk={group_topk!r} must be in [1, moe_router_num_groups="
                f"{groups}] and divide moe_router_topk={top_k}"
            )
    types = cfg["moe_router_load_balancing_type"]
    types = [types] if isinstance(types, str) else list(types)
    coeffs = cfg["moe_aux_loss_coeff"]
    coeffs = [coeffs] if isinstance(coeffs, int | float) else list(coeffs)
    if len(types) != len(coeffs) or any(t not in _LOAD_BALANCING_TYPES for t in types):
        problems.append(
            f"moe_router_load_balancing_type={cfg['moe_router_load_balancing_type']!r} must be "
            f"one of {_LOAD_BALANCING_TYPES} (or a list of them, with a moe_aux_loss_coeff each), "
            f"with moe_aux_loss_coeff={cfg['moe_aux_loss_coeff']!r}"
        )
    if any(c < 0 for c in coeffs):
        problems.append(f"moe_aux_loss_coeff={cfg['moe_aux_loss_coeff']!r} must be >= 0")
    factor = cfg["moe_expert_capacity_factor"]
    if factor is not None and not (isinstance(factor, int | float) and math.isfinite(factor)):
        problems.append(f"moe_expert_capacity_factor={factor!r} must be None or a finite number")
    elif _capacity_factor(cfg) is not None:
        if factor == 0:
            problems.append(
                f"moe_expert_capacity_factor={factor!r} must not be 0 (it drops every token; None "
                f"or a negative value drops none)"
            )
        if "sinkhorn" in types:
            problems.append(
                f"moe_expert_capacity_factor={factor} needs moe_router_load_balancing_type "
                f"aux_loss, seq_aux_loss, global_aux_loss or none (as in Megatron), got "
                f"{cfg['moe_router_load_balancing_type']!r}"
            )
    if cfg["moe_pad_expert_input_to_capacity"]:
        problems += _padding_problems(cfg)
    if cfg["moe_token_drop_policy"] not in DROP_POLICIES:
        problems.append(
            f"moe_token_drop_policy={cfg['moe_token_drop_policy']!r} must be one of {DROP_POLICIES}"
        )
    eps = cfg["moe_input_jitter_eps"]
    if eps is not None and not (isinstance(eps, int | float) and 0 < eps < 1):
        problems.append(f"moe_input_jitter_eps={eps!r} must be None or in (0, 1)")
    if (cfg["moe_z_loss_coeff"] or 0.0) < 0:
        problems.append(f"moe_z_loss_coeff={cfg['moe_z_loss_coeff']!r} must be >= 0")
    scale = cfg["moe_router_topk_scaling_factor"]
    if scale and not (isinstance(scale, int | float) and 0 < scale < math.inf):  # 0: no scaling
        problems.append(f"moe_router_topk_scaling_factor={scale!r} must be a finite number > 0")
    shared = cfg["moe_shared_expert_intermediate_size"]
    if shared is not None and (not isinstance(shared, int) or shared < 1):
        problems.append(f"moe_shared_expert_intermediate_size={shared!r} must be >= 1 or None")
    elif shared is not None and isinstance(tp, int) and tp > 1 and shared % tp:
        problems.append(
            f"moe_shared_expert_intermediate_size={shared} must be divisible by "
            f"tensor_model_parallel_size={tp} (the shared expert is split over its ranks)"
        )
    elif shared is not None and cfg["add_bias_linear"]:
        problems.append(
            f"moe_shared_expert_intermediate_size={shared} with add_bias_linear=True (Megatron's "
            f"shared experts have no biases: set add_bias_linear=False)"
        )
    if cfg["params_dtype"] not in _PARAMS_DTYPES:
        problems.append(f"params_dtype={cfg['params_dtype']} must be one of {_PARAMS_DTYPES}")
    return problems


def _padding_problems(cfg) -> list[str]:
    """What moe_pad_expert_input_to_capacity=True cannot go with. The padded rows are tokens of
    routing weight 0: equal to no padding, except where Megatron counts them or feeds them."""
    padding = "moe_pad_expert_input_to_capacity=True"
    problems = []
    if _capacity_factor(cfg) is None:
        problems.append(f"{padding} needs moe_expert_capacity_factor >= 0 (as in Megatron)")
    if cfg["moe_router_enable_expert_bias"]:
        problems.append(
            f"{padding} with moe_router_enable_expert_bias=True (Megatron then counts the padded "
            f"rows in the expert-bias update: every expert its capacity)"
        )
    if cfg["moe_apply_probs_on_input"] and cfg["add_bias_linear"]:
        problems.append(
            f"{padding} with moe_apply_probs_on_input=True and add_bias_linear=True (a padded "
            f"row enters its expert as zeros and leaves as the expert's bias terms)"
        )
    return problems


def _capacity_factor(cfg) -> float | None:
    """Megatron's capacity factor, None for no dropping (Megatron turns a negative one into
    None)."""
    factor = cfg["moe_expert_capacity_factor"]
    return None if factor is None or factor < 0 else float(factor)


def _unsupported_fields(cfg) -> list[str]:
    problems = [
        f"{name}={cfg[name]!r} ({what})"
        for name, (what, accepted) in _UNSUPPORTED.items()
        if not accepted(cfg[name])
    ]
    if _activation(cfg) is None:
        act = getattr(cfg["activation_func"], "__name__", repr(cfg["activation_func"]))
        problems.append(
            f"gated_linear_unit={cfg['gated_linear_unit']!r} with activation_func={act} "
            f"(moeblaze's gate functions are F.silu, quick_gelu, F.gelu, GELU's tanh form, "
            f"F.relu and squared_relu, and without a gate (gated_linear_unit=False) the same "
            f"but quick_gelu)"
        )
    coeffs = _loss_coeffs(cfg)
    if "sinkhorn" in coeffs:
        problems.append("moe_router_load_balancing_type='sinkhorn' (Sinkhorn routing)")
    types = cfg["moe_router_load_balancing_type"]
    if "quantile_balancing" in coeffs and not isinstance(types, str):
        problems.append(
            f"moe_router_load_balancing_type={types!r} (quantile balancing in a list, which "
            f"megatron-core does not route by)"
        )
    if types == "quantile_balancing" and cfg["moe_enable_routing_replay"]:
        problems.append(
            "moe_enable_routing_replay=True with moe_router_load_balancing_type="
            "'quantile_balancing' (megatron-core's quantile balancing does not replay)"
        )
    return problems
