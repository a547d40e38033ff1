"""`MoELayer(config)`, Megatron's MoE layer interface over moeblaze (see the package
docstring), the process groups it finds, and `TensorParallelSwiGLUMLP`, its shared expert over
overlap's tensor-parallel linears."""

import contextlib
import functools
import importlib.metadata
import sys
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import moeblaze
from kernelbase.backend import has_values
from moeblaze.activation import Activation
from moeblaze.expert_parallel import added_once, expert_parallel_mlp, gather_rows, summed_shard
from moeblaze.integrations.megatron.config import layer_options
from moeblaze.integrations.megatron.weights import read_expert_params
from moeblaze.layers import MoEBlock, SwiGLUMLP, swiglu_mlp
from moeblaze.ops import moe_mlp
from moeblaze.router import RouterOutput, _group_size
from overlap import ColumnParallelLinear, DistWorld, RowParallelLinear


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

    `submodules` and `name` (the module's name, which megatron-core >= 0.17 passes down) are
    accepted so that a Megatron `ModuleSpec` can name this class; moeblaze builds its own router and
    experts. `is_mtp_layer` (a multi-token-prediction layer, which Megatron passes too) divides the
    balancing losses by `mtp_num_layers` when `mtp_use_repeated_layer` is set, as megatron-core
    does. With W > 1, the expert-parallel group is `pg_collection.ep`, else megatron-core's
    `parallel_state` one, and the expert parameters carry `allreduce=False`, as Megatron's do, so
    that Megatron's DistributedDataParallel reduces their gradients over the expert-data-parallel
    group. Under tensor and context parallelism (see the module docstring) the groups are
    `pg_collection.tp`, `.tp_cp` and `.expt_tp`, else `parallel_state`'s, and the shared expert is a
    `TensorParallelSwiGLUMLP`. `device` defaults to the current CUDA device, as in Megatron, unless
    `config.use_cpu_initialization` is set or CUDA is unavailable. `recompute` overrides the policy
    read from the config (see the module docstring); `recompute_dispatch` is
    `moeblaze.expert_parallel_mlp`'s (W > 1). Megatron's `finalize_model_grads` updates an expert
    bias after each step; outside Megatron's training loop, sum
    `layer.router.tokens_per_expert_accum` over the data-parallel ranks and call
    `layer.router.update_expert_bias(config.moe_router_bias_update_rate)` once per optimizer step
    (quantile balancing: sum `qb_beta_accum` and `qb_beta_count`, then
    `layer.router.update_quantile_bias(config.moe_router_quantile_balancing_ema)`).
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number: int | None = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        *,
        recompute: str | None = None,
        deterministic: bool = False,
        recompute_dispatch: bool = True,
        device=None,
    ):
        options = layer_options(config, is_mtp_layer)
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
        # calculate_per_token_loss: megatron-core >= 0.17 also multiplies by the TP x CP size.
        self.per_token_loss_ranks = tp * cp if _megatron_at_least("0.17") else 1
        # Registered in Megatron's list of replay instances, in layer order (as TopKRouter's).
        self.router_replay = _router_replay() if options.routing_replay else None
        self._initialise()
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

    def reset_parameters(self) -> None:
        """Every parameter and buffer of the layer drawn or set again as at construction: the
        router's and its linears' defaults (shared expert, latent projections), then Megatron's
        initialisation where `perform_initialization` (the config's `init_method` and
        `output_layer_init_method`; the experts' biases zero). A layer built on the meta device
        (as under Megatron's `init_model_with_meta_device`) is materialised by
        `layer.to_empty(device=...)` and this. The tensor-parallel shared expert's split linears
        are drawn again by the init methods only."""
        self.router.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        self._initialise()

    def _initialise(self) -> None:
        super().reset_parameters()
        if getattr(self.config, "perform_initialization", True):
            self._megatron_init(
                getattr(self.config, "init_method", None),
                getattr(self.config, "output_layer_init_method", None),
            )

    @torch.no_grad()
    def _megatron_init(self, init_method: Callable | None, output_init_method: Callable | None):
        """Megatron initialises each expert's [out, in] weight like one linear layer, the router's
        bias like its weight, and the experts' biases to zero. Expert e's weights are drawn after
        seeding the default generator of their device with (one draw) + e, inside a fork of its
        state, as `MoEBlock.reset_parameters` does."""
        if not has_values(self.w13):  # nothing to fill (see MoEBlock's)
            return
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
        the target ones (forward) or to the next of the list kept for backward's recompute.

        With calculate_per_token_loss, Megatron divides every gradient by the global batch's
        real tokens: the router losses' gradient is multiplied by this forward's real tokens
        (times the TP x CP size with megatron-core >= 0.17), as Megatron's router does, so that
        it keeps the scale it has without."""
        if self.options.per_token_loss:  # read in this forward's backward
            real = tokens.shape[0] if token_mask is None else token_mask.sum()
            tokens_scale = real * self.per_token_loss_ranks
            self.router.aux_loss_scale = functools.partial(_per_token_loss_scale, tokens_scale)
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
        converted, used = read_expert_params(
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


def _per_token_loss_scale(tokens: int | torch.Tensor) -> float | torch.Tensor:
    """`_megatron_aux_loss_scale` times `tokens` (calculate_per_token_loss, see MoELayer.route)."""
    return _megatron_aux_loss_scale() * tokens


def _megatron_at_least(version: str) -> bool:
    """Whether the installed megatron-core is at least `version` (True without one: the layer
    then follows the newest)."""
    try:
        installed = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return True
    return torch.torch_version.TorchVersion(installed) >= version


def _megatron_aux_loss_scale() -> float | torch.Tensor:
    """The scale of the router losses' gradient that Megatron's schedule sets (after each forward,
    read in backward), where megatron-core runs and has set it; else `moeblaze.Router`'s."""
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    scale = None if moe_utils is None else moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale
    return moeblaze.Router.aux_loss_scale if scale is None else scale
