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
lacks takes megatron-core 0.16's default, or 0.19's for the fields added since
(`MEGATRON_DEFAULTS`). `layer_options(config)` translates the fields into moeblaze's terms and
raises `NotImplementedError` (a feature moeblaze lacks: FP8/FP4, padding to capacity, Sinkhorn
routing, block-interleaved GLU rows, ...) or `ValueError` (an invalid value)
naming every offending field with its value. Tested with megatron-core 0.16.1 and 0.19.2.

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
- sigmoid, and sqrtsoftplus (sqrt(softplus(logit)), megatron-core 0.19): top-k of the scores
  (plus the expert bias, for selection only), divided by their sum when k > 1.
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
- `moe_router_load_balancing_type="quantile_balancing"` (megatron-core 0.19): the experts of the
  largest logits minus the bias `router.qb_beta`, chosen over the logits of the whole
  tensor-and-context-parallel batch, weighted by their scores as Megatron weighs them; the
  column quantiles of the training forwards accumulate in `router.qb_beta_accum` and
  `qb_beta_count`, which `finalize_model_grads` averages into `qb_beta`
  (`moe_router_quantile_balancing_ema`) and resets, as for its own router (`moeblaze.Router`'s
  `quantile_balancing`). No padding mask, as Megatron's.
- `calculate_per_token_loss`: Megatron's `finalize_model_grads` divides every gradient by the
  global batch's real tokens, so the router losses' gradient is multiplied by the forward's real
  tokens (times the TP x CP size with megatron-core >= 0.17: the installed version decides), as
  its router does (`MoELayer.route`).
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

from moeblaze.integrations.megatron.config import MEGATRON_DEFAULTS, LayerOptions, layer_options
from moeblaze.integrations.megatron.layer import MoELayer, TensorParallelSwiGLUMLP
from moeblaze.integrations.megatron.weights import megatron_expert_params, megatron_expert_weights

__all__ = [
    "MEGATRON_DEFAULTS",
    "LayerOptions",
    "MoELayer",
    "TensorParallelSwiGLUMLP",
    "layer_options",
    "megatron_expert_params",
    "megatron_expert_weights",
]
