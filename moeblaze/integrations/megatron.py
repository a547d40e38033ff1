"""`MoELayer(config)`: moeblaze as the MoE layer of a Megatron-style model.

# s sequence, b batch, h hidden, N = s*b tokens, F expert ffn, E experts, k top-k

    hidden_states [s, b, h] -> tokens [N, h] --moeblaze.Router--> topk_ids [N, k], topk_weights [N, k]
    (the router multiplies the weights by moe_router_topk_scaling_factor)
    moeblaze.moe_mlp(tokens, topk_ids, topk_weights, w13 [E, 2F, h], w2 [E, h, F], b13, b2)
    (+ shared expert, moeblaze.SwiGLUMLP) -> (output [s, b, h], None)

With `expert_model_parallel_size` W > 1 the experts are sharded over Megatron's expert-parallel
group as in Megatron (rank r of the group holds experts [r*E/W, (r+1)*E/W)), and
`moeblaze.expert_parallel_mlp` replaces `moe_mlp`: rows travel to their experts' ranks and back
by all-to-all. The router and the shared expert are replicated, like Megatron's.

Tensor parallelism (`tensor_model_parallel_size` T > 1) needs `sequence_parallel=True`, as
Megatron's MoE layer does in training. Context parallelism (`context_parallel_size` C) is
supported. Each rank routes its own shard of the sequence ([s/T, b, h], or its context-parallel
chunks):

- With whole experts (`expert_tensor_parallel_size` ETP = 1), each rank runs its own tokens
  through the experts it holds.
- With expert tensor parallelism (ETP > 1; Megatron's default ETP is T), each expert's F columns
  are split over Megatron's expert-tensor-parallel group (`pg_collection.expt_tp`): rank r holds
  `w13 [E_l, 2F/ETP, h]` (its gate rows, then its up rows, Megatron's local fc1 layout), `w2
  [E_l, h, F/ETP]`, `b13` with w13's rows and the whole `b2`. Without expert parallelism, the
  group's tokens, routing ids and weights are all-gathered, each rank runs them all through its
  shards, and the partial outputs are reduce-scattered back. With it, as in Megatron's
  all-to-all dispatcher, each rank first sends its own tokens' rows to the ranks that hold the
  same shard of their experts (`expert_parallel_mlp`), the rows received are all-gathered
  within the ETP group, and the partial outputs are reduce-scattered back before the
  all-to-all returns them: the expert-parallel links carry each routed token once. Megatron's
  grouped experts add fc2's bias on every ETP rank before that sum (as far as megatron-core
  0.16's TEGroupedMLP reads); moeblaze adds it once, as the unsplit layer does.

Under tensor and context parallelism:

- The balancing losses count the expert choices of the whole sequence: `moeblaze.Router`'s
  `loss_group` is Megatron's tensor-and-context-parallel group (`pg_collection.tp_cp`), and
  each rank's losses are its share, as in Megatron's TopKRouter.
- The shared expert is split over the TP group as Megatron's SharedExpertMLP is
  (`TensorParallelSwiGLUMLP`: `overlap.ColumnParallelLinear` gathers the TP ranks' tokens into
  the up-projection, `overlap.RowParallelLinear` reduce-scatters the down-projection); each rank
  holds and loads its shards.
- Gradients are left for Megatron's training loop to reduce, as Megatron's are: the router's
  and the shared expert's gate carry `sequence_parallel` (`finalize_model_grads` sums them over
  the TP group), and under TP the experts carry `allreduce = False` even when E is not sharded,
  so that Megatron's DDP sums them over the expert-data-parallel group, which holds the ranks
  whose tokens reach the same expert shards (with ETP = 1, the TP ranks). (Megatron's own experts
  keep `allreduce = True` with EP = 1.) A split expert's gradient is complete on each rank of
  its expert-tensor-parallel group (b2's, which every rank holds, alike on them).

`config` is a megatron-core `TransformerConfig` or any object with its field names; a field it
lacks takes megatron-core 0.16's default (`MEGATRON_DEFAULTS`). `layer_options(config)`
translates the fields into moeblaze's terms and raises `NotImplementedError` (a feature moeblaze
lacks) or `ValueError` (an invalid value) naming every offending field with its value.

The experts (and the shared expert) compute Megatron's GLU, `activation_func(gate') * (up' +
glu_linear_offset)` with gate' and up' clamped at `activation_func_clamp_value`, for
`activation_func` F.silu or quick_gelu: `moeblaze.SwiGLU(alpha, limit, up_offset)` (GPT-OSS's
settings are quick_gelu, 7.0 and 1.0, with `add_bias_linear=True`); for F.gelu, GELU's tanh
form, F.relu or squared_relu: `moeblaze.Gated(fn, limit, up_offset)` (GeGLU, ...). With
`gated_linear_unit=False` they compute `activation_func(fc1(x))` (Megatron ignores the clamp and
the offset there): `moeblaze.Ungated`, for an `activation_func` that computes F.gelu (the
default), squared_relu (Nemotron), F.relu, F.silu or GELU's tanh form; fc1 is then [F, h].

`add_bias_linear=True` (megatron-core's default) gives the router's logits a bias `router.bias
[E]` and each expert `b13 [E, 2F]` (fc1's, added before the GLU) and `b2 [E, h]` (fc2's, weighted
by the routing weight like the rest of the expert's output, as Megatron's experts do). Megatron's
shared experts have no biases, so a shared expert with `add_bias_linear=True` is a ValueError.

Routing follows megatron-core's `TopKRouter` (`topk_routing_with_score_function`):

- softmax, `moe_router_pre_softmax=False`: top-k of the logits, softmax over the k chosen, i.e.
  the softmax scores renormalised over the k (`norm_topk_prob=True`); with `pre_softmax=True`:
  the top-k softmax scores as they are (`norm_topk_prob=False`).
- sigmoid: top-k of the scores (plus the expert bias, for selection only), divided by their sum
  when k > 1.
- `moe_router_topk_scaling_factor` multiplies the k weights.
- Group-limited routing (`moe_router_num_groups`, `moe_router_group_topk`: a group scores the
  sum of its top k / group_topk logits for softmax without pre-softmax, scores otherwise:
  `moeblaze.Router`'s `group_score_from`), and the deprecated
  `moe_router_topk_limited_devices` as Megatron maps it (one group per expert-parallel rank,
  that many groups per token).
- The "aux_loss", "seq_aux_loss" and "global_aux_loss" load-balancing losses
  (`moe_aux_loss_coeff`; the second per sequence, each of the b sequences of `[s, b, h]` alone,
  averaged: DeepSeek-V3's; the third against the counts of the global batch, summed over
  Megatron's tensor-data-and-context-parallel group and averaged over the micro-batches of the
  step: `moeblaze.Router(global_aux_loss_coeff=, global_group=)`, whose tracker Megatron's
  `finalize_model_grads` resets by `reset_global_aux_loss_tracker`, as its own router's) count
  the top-k of the scores without expert bias or group limit, as Megatron's do
  (`moeblaze.Router(aux_counts="scores")`). They and the z-loss (`moe_z_loss_coeff`)
  reach the gradient through the routing weights, as Megatron's `MoEAuxLossAutoScaler` does:
  the injected gradient is `coeff * d(loss)` times the scale Megatron's schedule gives
  `MoEAuxLossAutoScaler` (`loss_scale / num_microbatches`, set after each forward), read in
  backward as Megatron reads it. Outside Megatron's schedule (megatron-core not imported, or
  that scale never set), `moeblaze.Router.aux_loss_scale` is used instead: set it with
  `moeblaze.Router.set_aux_loss_scale(loss_scale / num_microbatches)` before a step's
  forwards.
- `forward(hidden_states, padding_mask=)`: Megatron's `[b, s]` mask, True for padding (the
  convention of megatron-core's code and GPTModel, whose MoE docstrings say the opposite). The
  padding tokens are routed as the others (and compete for capacity, as in Megatron), but go
  to no routed expert (their routed output is 0; Megatron computes them), and are left out of
  the balancing losses (their choices and probabilities; the token counts are the real
  tokens'), the z-loss (the mean over the real tokens) and the expert-bias counts
  (`moeblaze.Router`'s `token_mask`).
  Megatron's sequence loss then divides every sequence's by the batch's mean number of real
  tokens, moeblaze each by its own: they agree where every sequence has as many. (megatron-core
  0.16's expert-bias count fails with a padding mask, Megatron-LM issue #6111; moeblaze counts
  the real tokens' choices.)
- Token dropping (`moe_expert_capacity_factor`, `moe_token_drop_policy`), as Megatron's
  `apply_router_token_dropping` on each rank's tokens: each expert keeps at most
  `ceil(N_rank * k / E * factor)` slots, those of the largest routing weights ("probs") or of
  the earliest tokens in Megatron's `[s, b]` order ("position"; megatron-core ranks by a top-k
  of ones, whose ties torch leaves unordered, so its choice among the tokens over capacity is
  unspecified). A dropped slot reaches no expert and its weight is 0; the losses count the
  choices before dropping and the expert-bias counts those kept, as Megatron's.
  `moe_pad_expert_input_to_capacity` is refused: with index routing nothing is padded.
- Megatron's `finalize_model_grads` updates the expert bias (`moe_router_enable_expert_bias`,
  `moe_router_bias_update_rate`) and resets the counts, as it does for its own router: the
  router's counts carry Megatron's name, `router.local_tokens_per_expert`.
- Router logits are float32 whatever `params_dtype` (Megatron: `moe_router_dtype='fp32'`), or
  float64 with `moe_router_dtype='fp64'` (logits, scores, routing weights and losses; Megatron
  rounds its softmax and sigmoid scores to float32 there).
- `moe_input_jitter_eps` jitters the router's input in training (`moeblaze.Router`'s
  `input_jitter_eps`, drawn as Megatron draws it); Megatron's also jitters in eval mode.
  `moe_router_force_load_balancing` routes by random logits with the real logits' gradient
  (`random_logits`), from the default generator of the device (Megatron's from its
  expert-parallel RNG tracker).
- `moe_latent_size` (Megatron's latent MoE, Nemotron 3's): the router sees the tokens, the
  routed experts (`w13 [E_l, 2F, L]`, `w2 [E_l, L, F]`) their projection `fc1_latent_proj
  [L, h]`, and their combined output is projected back by `fc2_latent_proj [h, L]` (both with
  a bias under `add_bias_linear`, replicated like the router, initialised by `init_method` and
  `output_layer_init_method`); the shared expert sees the tokens. Expert parallelism's
  all-to-alls carry L columns instead of h.
- `moe_enable_routing_replay`: the layer holds a megatron-core `RouterReplay` (registered in
  layer order, as Megatron's routers register theirs), so Megatron's controls work as they are
  (`RouterReplay.set_global_router_replay_action`, `set_replay_data`, `get_recorded_data`):
  record the experts chosen (before dropping for capacity), or route to given ones, whose
  routing weights are their scores (`moeblaze.Router`'s `replay_ids`).
- `moe_apply_probs_on_input` (top-1 only, as in Megatron; Llama 4's routing): each token is
  scaled by its routing weight (in float32, rounded to the activations' dtype) before its
  expert, whose output is then not weighted. The scaled tokens `[N, h]` are one more tensor
  kept for backward.

Recompute: `moe_layer_recompute=True` (or `recompute_granularity='selective'` with "moe" in
`recompute_modules`) runs the experts with `recompute="up_proj"`: backward recomputes the
gate/up GEMM, so the layer keeps its input, the router's [N, E] float32 scores, the routing
weights and plan, and nothing of size N*k*F or N*k*h. The router is not run twice, unlike a
checkpoint of the whole layer (whose recompute would count the expert-bias token counts
twice). Otherwise the experts use moeblaze's default `recompute="activation"` (SwiGLU
recomputed from the kept pre-activation, which is Megatron's "moe_act"). "shared_experts" in
`recompute_modules` checkpoints the shared expert (`torch.utils.checkpoint`, non-reentrant).

Megatron's distributed checkpointing (`megatron.core.dist_checkpointing`, the "torch_dist"
format) saves and loads the layer through `MoELayer.sharded_state_dict`: every tensor a shard of
the whole layer's, whatever the expert, expert-tensor and tensor parallelism, so that a
checkpoint saved under one layout can load under another. Without it Megatron would take the
expert shards for replicas and save one rank's.

Expert weights of an existing Megatron model load with `MoELayer.load_megatron_state_dict`
(router, experts in the SequentialMLP, TEGroupedMLP or legacy GroupedMLP layout, shared expert)
or `megatron_expert_weights` / `megatron_expert_params` (experts only; the latter with their
biases).
"""

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moeblaze
from moeblaze.activation import Activation, gated_unit_computing, ungated_computing
from moeblaze.expert_parallel import added_once, expert_parallel_mlp, gather_rows, summed_shard
from moeblaze.layers import MoEBlock, SwiGLUMLP, swiglu_mlp
from moeblaze.ops import moe_mlp
from moeblaze.router import DROP_POLICIES, RouterOutput, _group_size
from overlap import ColumnParallelLinear, DistWorld, RowParallelLinear

# The TransformerConfig fields this module reads, with their megatron-core 0.16 defaults.
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
    # Features moeblaze does not have: only their defaults are accepted.
    "moe_pad_expert_input_to_capacity": False,
    "moe_router_padding_for_quantization": False,
    "moe_router_padding_for_fp8": False,
    "calculate_per_token_loss": False,
    "fp8": None,
    "fp4": None,
    "tensor_model_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "context_parallel_size": 1,
    "sequence_parallel": False,
}
# Fields whose other values need a feature moeblaze lacks: (the feature, accepted value test).
_OFF = lambda value: not value
_UNSUPPORTED = {
    "moe_pad_expert_input_to_capacity": ("padding experts to capacity", _OFF),
    "moe_router_padding_for_quantization": ("padding routed tokens for FP8/FP4", _OFF),
    "moe_router_padding_for_fp8": ("padding routed tokens for FP8", _OFF),
    "fp8": ("FP8 experts", _OFF),
    "fp4": ("FP4 experts", _OFF),
}
_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
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

    def router_options(self) -> dict:
        return dict(
            score_func=self.score_func,
            norm_topk_prob=self.norm_topk_prob,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            group_score_topk=self.group_score_topk,
            group_score_from=self.group_score_from,
            expert_bias=self.expert_bias,
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


def layer_options(config) -> LayerOptions:
    """Check a Megatron TransformerConfig (or look-alike) and translate it for moeblaze.

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
    # sigmoid scores divided by their sum when k > 1.
    softmax_of_chosen = score_func == "softmax" and not cfg["moe_router_pre_softmax"]
    norm_topk_prob = softmax_of_chosen if score_func == "softmax" else top_k > 1
    recompute = "activation"
    if cfg["moe_layer_recompute"] or (selective and "moe" in recompute_modules):
        recompute = "up_proj"
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
        aux_loss_coeff=_loss_coeffs(cfg).get("aux_loss", 0.0),
        seq_aux_loss_coeff=_loss_coeffs(cfg).get("seq_aux_loss", 0.0),
        global_aux_loss_coeff=_loss_coeffs(cfg).get("global_aux_loss", 0.0),
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
    )


class MoELayer(MoEBlock):
    """moeblaze's MoE layer built from a Megatron `TransformerConfig`, Megatron's interface.

    `forward(hidden_states [s, b, h]) -> (output [s, b, h], None)`. Parameters, named as in
    Megatron where Megatron has them: `router.weight [E, h]` (and `router.bias [E]` with
    `add_bias_linear`, and the buffer `router.expert_bias [E]`), `w13 [E_l, 2F, h]` (gate rows,
    then up rows), `w2 [E_l, h, F]` (with `add_bias_linear`, `b13 [E_l, 2F]` and `b2 [E_l, h]`),
    `shared_expert.gate_up.weight [2Fs, h]`, `shared_expert.down.weight [h, Fs]` (and with
    `moe_shared_expert_gate`, `shared_expert.sigmoid_gate.weight [1, h]`, Megatron's
    `gate_weight`); dtype `config.params_dtype`. The E_l = E / W experts held, W =
    `expert_model_parallel_size`, are those of global ids `experts` (a slice); E_l = E on one
    rank; under expert tensor parallelism, their shards (`ffn_shard`, see the module docstring).
    They are initialised with `config.init_method` (router weight and bias, w13 per
    expert, shared gate/up and sigmoid gate) and `config.output_layer_init_method` (w2 per
    expert, shared down) when `config.perform_initialization` and those are set, else as
    `moeblaze.MoELayer` does; the expert biases start at zero then, as Megatron's do. Each
    expert draws from its own seed (see `MoEBlock.reset_parameters`): ranks seeded alike hold
    distinct experts, and the initial model does not depend on W (nor on ETP: shards are cut
    from whole experts).

    `submodules` is accepted so that a Megatron `ModuleSpec` can name this class; moeblaze
    builds its own router and experts. With W > 1, the expert-parallel group is
    `pg_collection.ep`, else megatron-core's `parallel_state` one, and the expert parameters
    carry `allreduce=False`, as Megatron's do, so that Megatron's DistributedDataParallel
    reduces their gradients over the expert-data-parallel group. Under tensor and context
    parallelism (see the module docstring) the groups are `pg_collection.tp`, `.tp_cp` and
    `.expt_tp`, else `parallel_state`'s, and the shared expert is a `TensorParallelSwiGLUMLP`.
    `device` defaults to the current CUDA device, as in Megatron, unless
    `config.use_cpu_initialization` is set or CUDA is unavailable. `recompute` overrides the
    policy read from the config (see the module docstring); `recompute_dispatch` is
    `moeblaze.expert_parallel_mlp`'s (W > 1). Megatron's `finalize_model_grads` updates an
    expert bias after each step; outside Megatron's training loop, sum
    `layer.router.tokens_per_expert_accum` over the data-parallel ranks and call
    `layer.router.update_expert_bias(config.moe_router_bias_update_rate)` once per optimizer
    step.
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number: int | None = None,
        pg_collection=None,
        *,
        recompute: str | None = None,
        deterministic: bool = False,
        recompute_dispatch: bool = True,
        device=None,
    ):
        options = layer_options(config)
        tp, cp = options.tensor_parallel_size, options.context_parallel_size
        group = _megatron_group(pg_collection, "ep", options.expert_parallel_size)
        tp_group = _megatron_group(pg_collection, "tp", tp)
        etp = options.expert_tensor_parallel_size
        etp_group = _megatron_group(pg_collection, "expt_tp", etp)
        rank = _rank(group)
        num_local = options.num_experts // options.expert_parallel_size
        cpu_init = getattr(config, "use_cpu_initialization", False)
        if device is None and torch.cuda.is_available() and not cpu_init:
            device = torch.device("cuda", torch.cuda.current_device())
        router_options = options.router_options()
        router_options["loss_group"] = _megatron_group(pg_collection, "tp_cp", tp * cp)
        if options.global_aux_loss_coeff > 0:
            router_options["global_group"] = _global_batch_group(pg_collection)
        super().__init__(
            options.hidden_size,
            options.ffn_hidden_size,
            options.num_experts,
            options.top_k,
            num_local,
            first_expert=rank * num_local,
            ffn_shard=(_rank(etp_group), etp),
            expert_hidden_size=options.latent_size,
            recompute=recompute or options.recompute,
            deterministic=deterministic,
            # Under tensor parallelism, split below rather than built whole.
            shared_expert_size=options.shared_expert_size if tp_group is None else None,
            shared_expert_gate=options.shared_expert_gate and tp_group is None,
            activation=options.activation,
            bias=options.bias,
            device=device,
            dtype=options.params_dtype,
            router_options=router_options,
        )
        if tp_group is not None and options.shared_expert_size:
            self.shared_expert = TensorParallelSwiGLUMLP(
                options.hidden_size,
                options.shared_expert_size,
                DistWorld(tp_group, device=self.w13.device),
                activation=options.activation,
                sigmoid_gate=options.shared_expert_gate,
                dtype=options.params_dtype,
            )
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if options.latent_size:  # Megatron's names; replicated like the router
            factory = dict(bias=options.bias, device=self.w13.device, dtype=options.params_dtype)
            self.fc1_latent_proj = nn.Linear(options.hidden_size, options.latent_size, **factory)
            self.fc2_latent_proj = nn.Linear(options.latent_size, options.hidden_size, **factory)
        self.config = config
        self.options = options
        self.layer_number = layer_number
        self.group = group
        self.tp_group = tp_group
        self.etp_group = etp_group
        # The ranks holding the same expert shards (for checkpoint replica ids).
        self.expert_data_group = _find_group(
            pg_collection, "expt_dp", "get_expert_data_parallel_group"
        )
        self.recompute_dispatch = recompute_dispatch
        self.router.aux_loss_scale = _megatron_aux_loss_scale  # read in backward
        # Registered in Megatron's list of replay instances, in layer order (as TopKRouter's).
        self.router_replay = _router_replay() if options.routing_replay else None
        self.reset_parameters()
        if getattr(config, "perform_initialization", True):
            self._megatron_init(
                getattr(config, "init_method", None),
                getattr(config, "output_layer_init_method", None),
            )
        # Megatron's DDP reduces `allreduce=False` parameters over the expert-data-parallel
        # group, which holds the ranks whose tokens reach the same expert shards: the EP group's
        # others, and under tensor parallelism with whole experts the TP group.
        if self.group is not None or tp_group is not None or etp_group is not None:
            for p in (self.w13, self.w2, self.b13, self.b2):
                if p is not None:
                    p.allreduce = False
        # Replicated over the TP ranks, each with its own tokens: Megatron's finalize_model_grads
        # all-reduces the gradients so marked over the TP group under sequence parallelism.
        replicated = [self.router.weight, self.router.bias]
        for linear in (self.fc1_latent_proj, self.fc2_latent_proj):
            if linear is not None:
                replicated += [linear.weight, linear.bias]
        if self.shared_expert is not None and self.shared_expert.sigmoid_gate is not None:
            replicated.append(self.shared_expert.sigmoid_gate.weight)
        for p in replicated:
            if p is not None:
                p.sequence_parallel = options.sequence_parallel

    @torch.no_grad()
    def _megatron_init(self, init_method: Callable | None, output_init_method: Callable | None):
        """Megatron initialises each expert's [out, in] weight like one linear layer, the router's
        bias like its weight, and the experts' biases to zero. Expert e's weights are drawn after
        seeding the default generator of their device with (one draw) + e, inside a fork of its
        state, as `MoEBlock.reset_parameters` does."""
        if self.b13 is not None:
            self.b13.zero_()
            self.b2.zero_()
        fc1 = [self.router.weight]
        if self.router.bias is not None:
            fc1.append(self.router.bias)
        fc2 = []
        if isinstance(self.shared_expert, SwiGLUMLP):  # else split: drawn per rank below
            fc1.append(self.shared_expert.gate_up.weight)
            fc2.append(self.shared_expert.down.weight)
        if self.shared_expert is not None and self.shared_expert.sigmoid_gate is not None:
            fc1.append(self.shared_expert.sigmoid_gate.weight)
        if self.fc1_latent_proj is not None:  # biases zero, as TransformerEngine's
            fc1.append(self.fc1_latent_proj.weight)
            fc2.append(self.fc2_latent_proj.weight)
            for linear in (self.fc1_latent_proj, self.fc2_latent_proj):
                if linear.bias is not None:
                    linear.bias.zero_()
        for method, tensors in ((init_method, fc1), (output_init_method, fc2)):
            if method is not None:
                for t in tensors:
                    method(t)
        d, f = self.expert_hidden_size, self.ffn_hidden_size
        for local, seed in self.expert_seeds():
            with _seeded(self.w13.device, seed):  # drawn whole, then cut into shards
                for method, name, shape in (
                    (init_method, "w13", (self.activation.pre_width(f), d)),
                    (output_init_method, "w2", (d, f)),
                ):
                    if method is not None:
                        whole = self.w13.new_empty(shape)
                        method(whole)
                        self.set_expert(name, local, whole)
        if isinstance(self.shared_expert, TensorParallelSwiGLUMLP):
            seed = int(torch.randint(2**62, ())) + dist.get_rank(self.tp_group)
            shards = (
                (init_method, self.shared_expert.gate_up),
                (output_init_method, self.shared_expert.down),
            )
            with _seeded(self.w13.device, seed):  # the shards of one rank differ from another's
                for method, linear in shards:
                    if method is not None:
                        method(linear.weight)

    def route(self, tokens: torch.Tensor, sequences: tuple, token_mask) -> RouterOutput:
        """The router; with `moe_enable_routing_replay`, as the action of Megatron's
        RouterReplay says: record the experts chosen (before dropping for capacity), or route to
        the target ones (forward) or to the next of the list kept for backward's recompute."""
        replay = self.router_replay
        if replay is None or replay.router_replay_action is None:
            return super().route(tokens, sequences, token_mask)
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        action, replay_ids = replay.router_replay_action, None
        if action == RouterReplayAction.REPLAY_FORWARD:
            replay_ids = replay.target_topk_idx
        elif action == RouterReplayAction.REPLAY_BACKWARD and replay.replay_backward_list:
            replay_ids = replay.replay_backward_list.pop(0)
        if action != RouterReplayAction.RECORD and replay_ids is None:
            raise RuntimeError(
                f"routing replay action {action.value} of layer {self.layer_number} has no "
                "expert ids to replay: set them with RouterReplay.set_replay_data"
            )
        if replay_ids is not None:
            replay_ids = replay_ids.to(tokens.device)
        routing = self.router(tokens, *sequences, token_mask=token_mask, replay_ids=replay_ids)
        if action == RouterReplayAction.RECORD:
            replay.record_indices(routing.chosen_ids)
        return routing

    def routed_mlp(self, tokens: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        if self.fc1_latent_proj is None:
            return self._experts_mlp(tokens, routing)
        # Megatron's latent MoE: the experts (and their all-to-alls) work in the latent size.
        return self.fc2_latent_proj(self._experts_mlp(self.fc1_latent_proj(tokens), routing))

    def _experts_mlp(self, tokens: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """The routed experts' weighted sum for `tokens [N, d]` in the experts' size d."""
        ids, weights, options = routing.topk_ids, routing.topk_weights, self.expert_options()
        if self.options.probs_on_input:  # top-1: each token scaled by its one routing weight
            tokens = (weights * tokens).to(tokens.dtype)  # in float32, as Megatron's experts
            weights = torch.ones_like(weights)
        if self.group is not None:  # the expert-parallel all-to-all, then the ETP gather
            return expert_parallel_mlp(
                tokens,
                ids,
                weights,
                self.w13,
                self.w2,
                self.group,
                recompute_dispatch=self.recompute_dispatch,
                expert_tensor_group=self.etp_group,
                **options,
            )
        if self.etp_group is None:
            return moe_mlp(tokens, ids, weights, self.w13, self.w2, **options)
        # Every rank of the group runs all its tokens through its F/ETP columns of each expert;
        # the partial sums add up in the reduce-scatter below.
        tokens, ids, weights = (gather_rows(t, self.etp_group) for t in (tokens, ids, weights))
        if self.b2 is not None:
            options["b2"] = added_once(self.b2, self.etp_group)
        out = moe_mlp(tokens, ids, weights, self.w13, self.w2, **options)
        return summed_shard(out, self.etp_group)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [s, b, h]
        intermediate_tensors=None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if intermediate_tensors is not None:
            raise NotImplementedError(
                "intermediate_tensors (Megatron's partial CUDA-graph capture of the MoE layer) is "
                "not supported; pass None"
            )
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [s, b, h={self.hidden_size}] (sequence first), got "
                f"shape {tuple(hidden_states.shape)}"
            )
        token_mask = None
        if padding_mask is not None:
            s, b = hidden_states.shape[:2]
            if tuple(padding_mask.shape) != (b, s):
                raise ValueError(
                    f"padding_mask must be [b={b}, s={s}] (batch first, True for padding, as "
                    f"Megatron's), got shape {tuple(padding_mask.shape)}"
                )
            token_mask = ~padding_mask.bool().t()  # [s, b], True for a real token
        return super().forward(hidden_states, token_mask), None

    def shared_mlp(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.options.recompute_shared_expert and torch.is_grad_enabled():
            return checkpoint(self.shared_expert, tokens, use_reentrant=False)
        return self.shared_expert(tokens)

    def sequences(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Megatron's hidden states are sequence first: token i of `x [s, b, h]` flattened
        belongs to sequence i % b."""
        s, b = x.shape[:2]
        return torch.arange(s * b, device=x.device) % b, b

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """This layer's state for megatron-core's distributed checkpointing
        (`megatron.core.dist_checkpointing`), which calls it by this name: each tensor a
        `ShardedTensor` of the whole layer's, so that a checkpoint saved under one layout of
        expert, expert-tensor and tensor parallelism loads under another.

        The experts are `w13 [E, 2, F, h]` (gate, up; a view of the parameter, through a
        `ShardedTensorFactory`), `w2 [E, h, F]`, `b13 [E, 2, F]`, `b2 [E, h]`, split over the
        expert-parallel ranks (E) and the expert-tensor-parallel ones (F); the TP shared expert's
        `gate_up.weight [2, Fs, h]` and `down.weight [h, Fs]` split over the TP ranks (Fs); the
        rest whole. Replicas are told apart as Megatron's: by TP and data-parallel rank
        (`metadata["dp_cp_group"]`) for the replicated tensors, by expert-data-parallel rank for
        the experts. `sharded_offsets` (the layer's place in the model) prefix every tensor's.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_rank, dp_rank = _rank(self.tp_group), _rank(metadata["dp_cp_group"])
        ep, etp = (_rank(self.group), _group_size(self.group)), self.ffn_shard
        expert_replica = (0, 0, _rank(self.expert_data_group))
        num_axes = len(sharded_offsets)
        # The 2F axis of a gate/up tensor, stored as (2, F) so that its F splits; an ungated
        # one's F axis splits as it is.
        gated = self.activation.gated
        glu_axes = {"w13": 1, "b13": 1, "shared_expert.gate_up.weight": 0} if gated else {}
        glu = int(gated)  # the stored F axis's shift
        # name: (its split axes of the stored shape, (axis, rank, ranks) each; replica id)
        splits = {
            "w13": ([(0, *ep), (1 + glu, *etp)], expert_replica),
            "w2": ([(0, *ep), (2, *etp)], expert_replica),
            "b13": ([(0, *ep), (1 + glu, *etp)], expert_replica),
            "b2": ([(0, *ep)], (0, etp[0], expert_replica[2])),  # whole on the ETP ranks
        }
        if isinstance(self.shared_expert, TensorParallelSwiGLUMLP):
            tp = (tp_rank, _group_size(self.tp_group))
            splits["shared_expert.gate_up.weight"] = ([(glu, *tp)], (0, 0, dp_rank))
            splits["shared_expert.down.weight"] = ([(1, *tp)], (0, 0, dp_rank))
        sharded = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            key = f"{prefix}{name}"
            split, replica = splits.get(name, ([], (0, tp_rank, dp_rank)))
            offsets = [*sharded_offsets, *((num_axes + a, r, n) for a, r, n in split)]
            glu_axis = glu_axes.get(name)

            def build(key, t, replica_id, flattened_range, offsets=offsets, glu_axis=glu_axis):
                if flattened_range is not None:
                    raise NotImplementedError(
                        f"{key}: flattened checkpoint shards (flattened_range) are not supported"
                    )
                if glu_axis is not None:  # [.., 2F, ..] stored as [.., 2, F, ..]
                    shape = list(t.shape)
                    t = t.view(*shape[:glu_axis], 2, shape[glu_axis] // 2, *shape[glu_axis + 1 :])
                return ShardedTensor.from_rank_offsets(
                    key, t, *offsets, replica_id=replica_id, prepend_axis_num=num_axes
                )

            if glu_axis is None:
                sharded[key] = build(key, tensor, replica, None)
            else:
                shape = tensor.shape
                sharded[key] = ShardedTensorFactory(
                    key,
                    tensor,
                    build,
                    lambda loaded, shape=shape: loaded.reshape(shape),
                    replica,
                )
        return sharded

    def load_megatron_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load the state dict of a megatron-core `MoELayer`. Under expert parallelism, each rank
        loads its own `state_dict()`, which holds its E_l local experts numbered from 0, as
        Megatron numbers them there; under tensor parallelism, its own shards of the shared
        expert (fc1 [2Fs/T, h]: its gate rows, then its up rows; fc2 [h, Fs/T]), and under expert
        tensor parallelism its shards of the experts (fc1 [2F/ETP, h] and its bias alike, fc2
        [h, F/ETP], fc2's bias whole).

        Reads `router.weight`, `router.bias`, `router.expert_bias`, the experts in any layout
        that `megatron_expert_weights` reads (under `experts.`), with their biases, and
        `shared_experts.linear_fc1.weight` / `linear_fc2.weight` (gate rows, then up rows, as
        moeblaze.SwiGLUMLP) / `gate_weight`. With `strict`, a key with no place here (other
        than `_extra_state` and non-persistent buffers) raises ValueError, and so do biases in a
        layer built with `add_bias_linear=False` or missing from one built with it. Returns what
        `load_state_dict` returns.
        """
        converted, used = _expert_params(
            state_dict, self.w13.shape[0], "experts.", self.activation.gated
        )
        if strict and ("b13" in converted) != (self.b13 is not None):
            raise ValueError(
                f"this layer was built with add_bias_linear={self.b13 is not None} but the "
                f"Megatron state_dict {'has' if 'b13' in converted else 'lacks'} expert biases"
            )
        renames = {
            "router.weight": "router.weight",
            "router.bias": "router.bias",
            "router.expert_bias": "router.expert_bias",
            "shared_experts.linear_fc1.weight": "shared_expert.gate_up.weight",
            "shared_experts.linear_fc2.weight": "shared_expert.down.weight",
            "shared_experts.gate_weight": "shared_expert.sigmoid_gate.weight",
        }
        for name in ("fc1_latent_proj", "fc2_latent_proj"):  # the same names
            renames |= {f"{name}.weight": f"{name}.weight", f"{name}.bias": f"{name}.bias"}
        ours = self.state_dict().keys()
        for megatron_key, key in renames.items():
            if megatron_key in state_dict and key in ours:
                converted[key] = state_dict[megatron_key]
                used.add(megatron_key)
        ignored = {"router.local_tokens_per_expert", "router.global_tokens_per_expert"}
        left = [
            k for k in state_dict if k not in used and k not in ignored and "_extra_state" not in k
        ]
        if strict and left:
            raise ValueError(
                f"the Megatron state_dict has keys this layer has no place for: {sorted(left)}"
            )
        return self.load_state_dict(converted, strict=strict)


# pg_collection's groups: (the TransformerConfig field of their size, megatron-core
# parallel_state's getter).
_GROUPS = {
    "ep": ("expert_model_parallel_size", "get_expert_model_parallel_group"),
    "tp": ("tensor_model_parallel_size", "get_tensor_model_parallel_group"),
    "tp_cp": (
        "tensor_model_parallel_size * context_parallel_size",
        "get_tensor_and_context_parallel_group",
    ),
    "expt_tp": ("expert_tensor_parallel_size", "get_expert_tensor_parallel_group"),
}


def _find_group(pg_collection, name: str, getter: str, **getter_options):
    """`pg_collection.<name>`, else megatron-core parallel_state's `getter` group (None where
    neither has one)."""
    group = getattr(pg_collection, name, None)
    if group is None:
        try:
            from megatron.core import parallel_state
        except ImportError:
            return None
        group = getattr(parallel_state, getter)(check_initialized=False, **getter_options)
    return group


def _rank(group) -> int:
    """This process's rank in `group` (0 in none)."""
    return 0 if group is None else dist.get_rank(group)


def _global_batch_group(pg_collection):
    """The ranks of a global batch, for "global_aux_loss": `pg_collection.tp_dp_cp`, else
    megatron-core parallel_state's tensor-data-and-context-parallel group; None in a single
    process."""
    group = _find_group(
        pg_collection,
        "tp_dp_cp",
        "get_tensor_and_data_parallel_group",
        with_context_parallel=True,
    )
    if group is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            "moe_router_load_balancing_type='global_aux_loss' needs the ranks of the global "
            "batch: pass pg_collection with a `tp_dp_cp` group, or initialise "
            "megatron.core.parallel_state (initialize_model_parallel)"
        )
    return group


def _megatron_group(pg_collection, name: str, size: int):
    """The process group `name` of `_GROUPS` (None for one rank): `pg_collection.<name>`, else
    megatron-core's parallel_state one; it must have `size` ranks."""
    if size == 1:
        return None
    field, getter = _GROUPS[name]
    group = _find_group(pg_collection, name, getter)
    if group is None:
        raise ValueError(
            f"{field}={size} needs a process group: pass pg_collection with a `{name}` group, or "
            f"initialise megatron.core.parallel_state (initialize_model_parallel)"
        )
    if not dist.is_initialized() or dist.get_world_size(group) != size:
        found = dist.get_world_size(group) if dist.is_initialized() else "no initialised"
        raise ValueError(f"{field}={size} but the `{name}` process group has {found} ranks")
    return group


def megatron_expert_weights(
    state_dict: Mapping[str, torch.Tensor],
    num_experts: int,
    prefix: str = "experts.",
    gated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2F, h], w2 [E, h, F]) from the experts of a megatron-core MoE layer's state dict.

    Reads any of these layouts (keys under `prefix`; no tensor or expert parallelism; gated
    experts, whose fc1 output is [gate, up], as Megatron's `glu` chunks it; with
    `gated=False`, experts of `gated_linear_unit=False`, whose fc1 is [F, h] and w13 [E, F, h]):

        SequentialMLP  local_experts.{e}.linear_fc1.weight [2F, h], .linear_fc2.weight [h, F]
        TEGroupedMLP   linear_fc1.weight{e} [2F, h], linear_fc2.weight{e} [h, F]
        GroupedMLP     weight1 [h, E*2F] holding [E, h, 2F], weight2 [E*F, h] holding [E, F, h]

    The GroupedMLP result is a view of its tensors; the others are stacked copies. Experts with
    biases (`add_bias_linear=True`; SequentialMLP `...linear_fc1.bias`, TEGroupedMLP
    `linear_fc1.bias{e}`) raise ValueError here, lest they be dropped: read them with
    `megatron_expert_params`.
    """
    params, _ = _expert_params(state_dict, num_experts, prefix, gated)
    if "b13" in params:
        raise ValueError(
            "the Megatron experts have biases (add_bias_linear=True), which (w13, w2) would "
            "drop: use megatron_expert_params, which returns them as b13 and b2"
        )
    return params["w13"], params["w2"]


def megatron_expert_params(
    state_dict: Mapping[str, torch.Tensor],
    num_experts: int,
    prefix: str = "experts.",
    gated: bool = True,
) -> dict[str, torch.Tensor]:
    """`{"w13", "w2"}`, plus `"b13" [E, 2F]` and `"b2" [E, h]` for experts with biases: the
    keyword arguments of `moeblaze.moe_mlp` (and the parameter names of `moeblaze.MoELayer`),
    read from any layout `megatron_expert_weights` reads (`gated` as there)."""
    params, _ = _expert_params(state_dict, num_experts, prefix, gated)
    return params


def _expert_params(state_dict, num_experts, prefix, gated):
    """megatron_expert_params, plus the set of keys it read."""
    sequential = f"{prefix}local_experts.{{e}}.linear_fc{{i}}.{{what}}"
    te_grouped = f"{prefix}linear_fc{{i}}.{{what}}{{e}}"
    for layout in (sequential, te_grouped):
        if layout.format(e=0, i=1, what="weight") not in state_dict:
            continue
        names = {("weight", 1): "w13", ("weight", 2): "w2", ("bias", 1): "b13", ("bias", 2): "b2"}
        if layout.format(e=0, i=1, what="bias") not in state_dict:
            names = {key: name for key, name in names.items() if key[0] == "weight"}
        keys = {
            name: [layout.format(e=e, i=i, what=what) for e in range(num_experts)]
            for (what, i), name in names.items()
        }
        missing = [k for ks in keys.values() for k in ks if k not in state_dict]
        if missing:
            raise ValueError(f"num_experts={num_experts} but the state_dict lacks {missing}")
        params = {name: torch.stack([state_dict[k] for k in ks]) for name, ks in keys.items()}
        _check_expert_shapes(params, {name: ks[0] for name, ks in keys.items()}, gated)
        return params, {k for ks in keys.values() for k in ks}
    weight1, weight2 = f"{prefix}weight1", f"{prefix}weight2"
    if weight1 in state_dict and weight2 in state_dict:
        w1, w2_flat = state_dict[weight1], state_dict[weight2]  # [h, E*2F], [E*F, h]
        hidden = w1.shape[0]
        if w2_flat.dim() != 2 or w2_flat.shape[0] % num_experts or w2_flat.shape[1] != hidden:
            raise ValueError(
                f"{weight2} must be [E*F, h] with E={num_experts} and h={hidden} ({weight1}'s "
                f"first dim), got shape {tuple(w2_flat.shape)}"
            )
        ffn = w2_flat.shape[0] // num_experts
        width, rows = (2 * ffn, "2F") if gated else (ffn, "F")
        if tuple(w1.shape) != (hidden, num_experts * width):
            raise ValueError(
                f"{weight1} must be [h, E*{rows}] = {(hidden, num_experts * width)} for "
                f"{'gated' if gated else 'ungated'} experts, got shape {tuple(w1.shape)}"
            )
        # GroupedMLP.forward reads weight1.view(E, h, -1) and weight2.view(E, -1, h).
        w13 = w1.view(num_experts, hidden, width).transpose(1, 2)  # [E, 2F (F), h]
        w2 = w2_flat.view(num_experts, ffn, hidden).transpose(1, 2)  # [E, h, F]
        return {"w13": w13, "w2": w2}, {weight1, weight2}
    raise ValueError(
        f"no Megatron expert weights under prefix {prefix!r}: expected "
        f"{sequential.format(e=0, i=1, what='weight')!r} (SequentialMLP), "
        f"{te_grouped.format(e=0, i=1, what='weight')!r} (TEGroupedMLP) or {weight1!r} and "
        f"{weight2!r} (GroupedMLP)"
    )


def _check_expert_shapes(params, keys, gated):
    """Gated experts: w13 [E, 2F, h], w2 [E, h, F] (and b13 [E, 2F], b2 [E, h]); ungated: w13
    [E, F, h]; `keys` names each tensor's first key, for the error."""
    w13, w2 = params["w13"], params["w2"]
    ffn, rows = (w13.shape[1] // 2, "2F") if gated else (w13.shape[1], "F")
    if (gated and w13.shape[1] % 2) or w2.shape[1:] != (w13.shape[2], ffn):
        raise ValueError(
            f"{keys['w13']} must be [{rows}, h] and {keys['w2']} [h, F] for "
            f"{'gated' if gated else 'ungated'} experts, got {tuple(w13.shape[1:])} and "
            f"{tuple(w2.shape[1:])}"
        )
    for name, weight in (("b13", w13), ("b2", w2)):
        if name in params and params[name].shape[1:] != weight.shape[1:2]:
            raise ValueError(
                f"{keys[name]} must be [{weight.shape[1]}] (the out features of its weight), "
                f"got shape {tuple(params[name].shape[1:])}"
            )


class TensorParallelSwiGLUMLP(nn.Module):
    """The shared expert under Megatron's tensor and sequence parallelism: `moeblaze.SwiGLUMLP`'s
    computation and parameter names, its `gate_up` rows and `down` columns split over the W
    ranks of `world` (an `overlap.DistWorld`) as in Megatron's SharedExpertMLP.

        tokens [N_l, h] --overlap.ColumnParallelLinear: all-gather, GEMM--> [W*N_l, 2F/W]
        --SwiGLU--> [W*N_l, F/W] --overlap.RowParallelLinear: GEMM, reduce-scatter--> [N_l, h]
        (* sigmoid(tokens @ sigmoid_gate.weight^T), on this rank's tokens)

    Rank r holds `gate_up.weight [2F/W, h]` (its shard of the gate rows, then of the up rows:
    Megatron's local fc1 layout; [F/W, h] for an ungated activation), `down.weight [h, F/W]` and
    the replicated `sigmoid_gate.weight [1, h]`. The weights start as the `overlap` layers start
    (one matrix drawn alike on every rank, split)."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        world: DistWorld,
        *,
        activation: Activation,
        sigmoid_gate: bool = False,
        dtype=None,
    ):
        super().__init__()
        self.activation = activation
        self.gate_up = ColumnParallelLinear(
            hidden_size, activation.pre_width(ffn_hidden_size), world, bias=False, dtype=dtype
        )
        self.down = RowParallelLinear(ffn_hidden_size, hidden_size, world, bias=False, dtype=dtype)
        self.sigmoid_gate = (
            nn.Linear(hidden_size, 1, bias=False, device=world.device, dtype=dtype)
            if sigmoid_gate
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N_l, h]
        # The parallel linears return (output, bias): gate_up gives every rank's tokens,
        # down this rank's again.
        gate_up, down = (lambda t: self.gate_up(t)[0]), (lambda t: self.down(t)[0])
        return swiglu_mlp(x, gate_up, down, self.activation, self.sigmoid_gate)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """The default generator of `device` seeded with `seed`, inside a fork of its state."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        generator = torch.cuda.default_generators[device.index] if cuda else torch.default_generator
        generator.manual_seed(seed)
        yield


def _router_replay():
    """A new megatron-core RouterReplay (it registers itself in its class's list)."""
    try:
        from megatron.core.transformer.moe.router_replay import RouterReplay
    except ImportError as error:
        raise ImportError(
            "moe_enable_routing_replay=True uses megatron-core's RouterReplay "
            "(megatron.core.transformer.moe.router_replay): pip install 'megatron-core>=0.16'"
        ) from error
    return RouterReplay()


def _megatron_aux_loss_scale() -> float | torch.Tensor:
    """The scale of the router losses' gradient that Megatron's schedule sets (after each forward,
    read in backward), where megatron-core runs and has set it; else `moeblaze.Router`'s."""
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    scale = None if moe_utils is None else moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale
    return moeblaze.Router.aux_loss_scale if scale is None else scale


def _expert_tensor_parallel_size(cfg):
    """Megatron's expert_tensor_parallel_size, whose default (None) is the tensor-parallel size."""
    etp = cfg["expert_tensor_parallel_size"]
    return (cfg["tensor_model_parallel_size"] or 1) if etp is None else etp


def _loss_coeffs(cfg) -> dict[str, float]:
    """{load-balancing type: coefficient} from moe_router_load_balancing_type / _aux_loss_coeff."""
    types, coeffs = cfg["moe_router_load_balancing_type"], cfg["moe_aux_loss_coeff"]
    if isinstance(types, str):
        return {types: float(coeffs)}
    return {t: float(c) for t, c in zip(types, coeffs, strict=True)}


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
    if score_func not in ("softmax", "sigmoid"):
        problems.append(f"moe_router_score_function={score_func!r} must be 'softmax' or 'sigmoid'")
    if cfg["moe_router_enable_expert_bias"] and score_func != "sigmoid":
        problems.append(
            f"moe_router_enable_expert_bias=True needs moe_router_score_function='sigmoid' "
            f"(as in Megatron), got {score_func!r}"
        )
    groups, group_topk = cfg["moe_router_num_groups"], cfg["moe_router_group_topk"]
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
    uses_losses = sum(coeffs.values()) > 0 or (cfg["moe_z_loss_coeff"] or 0.0) > 0
    if uses_losses and cfg["calculate_per_token_loss"]:
        problems.append("calculate_per_token_loss=True with aux losses (per-token loss scaling)")
    return problems
