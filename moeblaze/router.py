"""Token router: score every token against every expert and keep the top-k.

    # N tokens, d hidden, E experts, k top-k, G expert groups
    x [N, d] (* jitter) --float32 (or 64)--> logits = x @ weight.T (+ bias) [N, E] (or random draws)
    logits --softmax | sigmoid | sqrtsoftplus--> scores [N, E]
    scores (+ expert_bias) --keep the best topk_groups of G groups--> top-k --> topk_ids [N, k]
    scores.gather(topk_ids) --optional / sum--> (* topk_scaling_factor) --> topk_weights [N, k]
    (capacity_factor: the slots past each expert's capacity get id DROPPED and weight 0)
    aux_loss_coeff * load-balancing loss (+ seq_aux_loss_coeff * its mean over sequences
        + global_aux_loss_coeff * its version with the global batch's counts)
        + z_loss_coeff * z-loss --> gradient, through topk_weights

Logits and scores are computed in float32 whatever the dtype of `x` and `weight`, as Megatron and
Hugging Face do, because top-k selection is sensitive to rounding (or in float64:
`routing_dtype`, Megatron's `moe_router_dtype="fp64"`).

The expert bias (DeepSeek-V3 aux-loss-free balancing) only changes *which* experts are chosen;
the weights are always the unbiased scores. Counts of chosen experts accumulate over training
forwards, and `update_expert_bias()` nudges the bias of overloaded experts down and of
underloaded ones up.

The auxiliary losses do not have to be added to the training loss by hand: the forward wraps
`topk_weights` in an identity autograd function whose backward also sends a gradient of
`aux_loss_scale` to the loss (Megatron's MoEAuxLossAutoScaler). They therefore reach the
gradient whenever `topk_weights` reaches the objective, in training mode with grad enabled.
"""

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import nn

from kernelbase import compiled, deferred
from kernelbase.backend import autocast_off
from kernelbase.checks import check_bool, check_int, check_number, check_real
from kernelbase.profiling import profile_range
from moeblaze.kernels.compiled import RouterTopK
from moeblaze.reference import (
    check_selection_options,
    default_group_score_topk,
    quantile_balancing_choice,
    router_scores,
    router_topk_reference,
    routing_weights,
    select_experts,
)
from moeblaze.routing_plan import DROPPED

AUX_COUNTS = ("routed", "scores")
DROP_POLICIES = ("probs", "position")


@dataclasses.dataclass(frozen=True)
class RouterOutput:
    """What `Router.forward` returns. Losses are detached copies, for logging."""

    # [N, k] int64, chosen experts, best first; DROPPED (-1) for a slot dropped for capacity
    topk_ids: torch.Tensor
    # [N, k] int64, the experts chosen before dropping for capacity (topk_ids without capacity;
    # what a routing replay records)
    chosen_ids: torch.Tensor
    # [N, k] float32 (the routing dtype), differentiable, carries the injected loss gradient
    topk_weights: torch.Tensor
    logits: torch.Tensor  # [N, E] float32 (the routing dtype), differentiable
    aux_loss: torch.Tensor  # [] switch load-balancing loss, *unscaled* (1.0 at perfect balance)
    z_loss: torch.Tensor  # [] float64 z-loss mean(logsumexp(logits)^2), *unscaled*
    router_loss: torch.Tensor  # [] the weighted sum of the losses in use (their coeff > 0)
    # [E] int64, slots routed to each expert, sums to N * k less the slots dropped for capacity
    tokens_per_expert: torch.Tensor
    # [] the load-balancing loss per sequence, averaged, *unscaled*; 0 without sequence_ids
    seq_aux_loss: torch.Tensor
    # [] the load-balancing loss against the global batch's counts, *unscaled*; 0 unless its
    # coefficient is > 0
    global_aux_loss: torch.Tensor


def _describe_nonfinite_logits(largest: list[float]) -> str | None:
    """The error of logits whose largest magnitude is largest[0] (NaN if any logit is NaN)."""
    if math.isfinite(largest[0]):
        return None
    return (
        "router logits contain non-finite values (inf or NaN); check x and router.weight for "
        "inf/NaN or overflow"
    )


def _recomputing() -> bool:
    """True while the autograd engine runs this forward (activation checkpointing recomputes it
    inside backward). False while torch.compile traces it: AOTAutograd applies a compiled
    forward's buffer updates once, after its graph, and never in the backward graph's
    recomputation (a compiled call that an eager checkpoint reruns still counts again)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class _InjectLossGrad(torch.autograd.Function):
    """Identity on `topk_weights`; backward also returns `scale` as the gradient of `loss` (a
    number, or a callable called then that returns a number or a one-element tensor). The output
    is a copy ([N, k]: small), not the input returned, which autograd would make a view of it
    (FSDP2 warns of a module output that is a view)."""

    @staticmethod
    def forward(ctx, topk_weights, loss, scale):
        ctx.scale = scale
        return topk_weights.clone()

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.scale() if callable(ctx.scale) else ctx.scale
        if torch.is_tensor(scale):  # no copy from the host
            return grad, scale.to(grad.device, torch.float32).reshape(()), None
        return grad, grad.new_full((), float(scale), dtype=torch.float32), None


class Router(nn.Module):
    """Linear gate `weight [E, d]` (Hugging Face layout) followed by top-k expert selection.

    `forward(x [N, d]) -> RouterOutput`. Options:

    - `bias`: the gate has a learnable `bias [E]` added to the logits (GPT-OSS, Megatron's
      `add_bias_linear=True`); it changes scores and weights alike. Not to be confused with
      `expert_bias`.
    - `score_func`: `"softmax"` (Mixtral, Qwen-MoE, DeepSeek-V2), `"sigmoid"` (DeepSeek-V3) or
      `"sqrtsoftplus"`, sqrt(softplus(logit)) (DeepSeek-V4, Megatron's "sqrtsoftplus").
    - `norm_topk_prob`: divide the k chosen scores by their sum.
    - `topk_scaling_factor`: multiply the k weights by this factor, after any renormalisation
      (DeepSeek-V3's `routed_scaling_factor`, Megatron's `moe_router_topk_scaling_factor`).
    - `num_groups`, `topk_groups`: group-limited routing. Experts form `num_groups` contiguous
      groups; a group scores the sum of its top `group_score_topk` scores (default: 2 for
      sigmoid, DeepSeek-V3, and sqrtsoftplus; 1, the max, for softmax, DeepSeek-V2; Megatron
      sums the top `top_k // topk_groups`); only the experts of the best `topk_groups` groups
      can be chosen.
      `group_score_from="logits"` sums the logits instead of the scores (Megatron's softmax
      without pre-softmax; the same experts within a group; no `expert_bias`).
    - `expert_bias`: keep a float32 buffer `expert_bias [E]` added to the scores for selection
      only, and a buffer `tokens_per_expert_accum [E]` counting choices over training forwards;
      see `update_expert_bias`.
    - `quantile_balancing`: megatron-core's "quantile_balancing" routing: each token takes the
      experts of its k largest `logits - qb_beta` (float32; `qb_beta [E]` a float32 buffer, 0 at
      first), weighted by their scores as a routing replay is (`replay_ids`); in training, each
      forward adds to `qb_beta_accum [E]` (and 1 to `qb_beta_count`) every expert's column
      quantile, the bias that would have given each expert N·k/E of the tokens (the tokens of
      the whole batch over `loss_group`: N·k must be a multiple of E); `update_quantile_bias`
      (or megatron-core's `finalize_model_grads`, which finds these buffers by their names)
      moves `qb_beta` to their average. No balancing loss (their coefficients must be 0), no
      group limit, no `token_mask`, `top_k` < `num_experts`.
    - `aux_loss_coeff`, `z_loss_coeff`: weights of the load-balancing loss and the z-loss that
      are injected into the gradient (see the module docstring).
    - `seq_aux_loss_coeff`: weight of the load-balancing loss computed per sequence and averaged
      over the sequences (DeepSeek-V3's sequence-wise balance loss, Megatron's
      "seq_aux_loss"); `forward` then needs `sequence_ids`.
    - `global_aux_loss_coeff`, `global_group`: weight of the load-balancing loss whose expert
      counts are those of the global batch (Megatron's "global_aux_loss", global-batch
      balancing): this forward's counts summed over the ranks of `global_group` (the
      data-parallel ranks, and those sharing a batch; Megatron's tensor-data-and-context-
      parallel group) and averaged over the training forwards since the last
      `reset_global_aux_loss_tracker()` (call it once per optimizer step), against this
      forward's scores; the token count it divides by is this forward's over the group, as
      Megatron's.
    - `capacity_factor`, `drop_policy`: token dropping (Megatron's `moe_expert_capacity_factor`
      and `moe_token_drop_policy`, GShard / Switch capacity). Each expert takes at most
      `ceil(N * k / E * capacity_factor)` of this forward's N tokens; the slots past that get
      `topk_ids` DROPPED (-1: no expert computes them) and `topk_weights` 0. `"probs"` keeps the
      slots of the largest weights (ties: the earlier token), `"position"` the earliest
      tokens. The weights are renormalised before dropping, not after; the balancing losses
      count the choices before dropping, the expert-bias counts and `tokens_per_expert` those
      kept. None (default): no token is dropped.
    - `input_jitter_eps`: in training, the router (not the experts) sees x multiplied by noise
      drawn uniformly in [1 - eps, 1 + eps] per element (Switch Transformer's input jitter,
      Megatron's `moe_input_jitter_eps`; Megatron also jitters in eval mode). The noise comes
      from the default generator of x's device (activation checkpointing restores its state).
    - `random_logits`: for benchmarking balanced routing, the logits are replaced by standard
      normal draws (default generator of x's device) whose gradient is passed to the real
      logits unchanged (Megatron's `moe_router_force_load_balancing`, a straight-through
      estimator). The losses see the drawn logits.
    - `routing_dtype`: torch.float32 (default) or torch.float64: the dtype of the logits, the
      scores, the routing weights and the losses (Megatron's `moe_router_dtype`); float64 runs
      the torch selection, not the compiled kernel.
    - `aux_counts`: the expert choices the balancing losses count: `"routed"`, those made, or
      `"scores"`, the top-k of the scores without the expert bias and the group limit (Megatron,
      and DeepSeek-V3's definition). They differ only with `expert_bias` or `num_groups`.
    - `loss_group`: a `torch.distributed` process group whose ranks each route a shard of one
      batch (sequence or context parallelism: Megatron's tensor-and-context-parallel group).
      The losses then count the expert choices of the whole batch (one all-reduce of the [E]
      counts, and of the [S, E] counts per sequence, per forward) and each rank's losses are
      its share: summed over the group they are the whole batch's, and the gradient a rank
      injects is that of the whole batch's losses with respect to its own tokens' scores (its
      z-loss share is its tokens' mean divided by the group size, as Megatron's). The logged
      `aux_loss`, `seq_aux_loss` and `z_loss` are these shares.

    `forward(..., token_mask=)` leaves padding tokens out of the losses and the expert-bias
    counts (Megatron's `padding_mask`, inverted).

    `aux_loss_scale` (class attribute, default 1.0; set it with `Router.set_aux_loss_scale` or per
    instance) multiplies the injected gradient. Set it to the factor your loss is multiplied by
    before `backward()`: `1 / num_microbatches` under gradient accumulation, times the loss scale
    when scaling the loss for fp16. A number is read at forward time; an instance's may also be
    a callable without arguments, called in backward, that returns a number or a one-element
    tensor (the Megatron-style layer reads Megatron's `MoEAuxLossAutoScaler` this way).

    `local_tokens_per_expert` is `tokens_per_expert_accum` under Megatron's name, so that
    megatron-core's `finalize_model_grads` (which all-reduces it over the data-parallel ranks,
    updates `expert_bias` and zeroes it) drives the expert bias of this router too.
    """

    aux_loss_scale: float = 1.0

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        bias: bool = False,
        topk_scaling_factor: float = 1.0,
        num_groups: int | None = None,
        topk_groups: int | None = None,
        group_score_topk: int | None = None,
        group_score_from: str = "scores",
        expert_bias: bool = False,
        quantile_balancing: bool = False,
        aux_loss_coeff: float = 0.0,
        seq_aux_loss_coeff: float = 0.0,
        global_aux_loss_coeff: float = 0.0,
        aux_counts: str = "routed",
        z_loss_coeff: float = 0.0,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        input_jitter_eps: float | None = None,
        random_logits: bool = False,
        routing_dtype: torch.dtype = torch.float32,
        loss_group=None,
        global_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_options(
            hidden_size,
            num_experts,
            top_k,
            score_func,
            num_groups,
            topk_groups,
            group_score_topk,
            group_score_from,
            aux_loss_coeff,
            seq_aux_loss_coeff,
            global_aux_loss_coeff,
            z_loss_coeff,
            topk_scaling_factor,
        )
        if group_score_from == "logits" and expert_bias:
            raise ValueError(
                'group_score_from="logits" with expert_bias=True: the expert bias is added to '
                "the scores"
            )
        _check_quantile_balancing(
            quantile_balancing,
            num_experts,
            top_k,
            num_groups,
            aux_loss_coeff,
            seq_aux_loss_coeff,
            global_aux_loss_coeff,
        )
        for name, value in (
            ("norm_topk_prob", norm_topk_prob),
            ("bias", bias),
            ("expert_bias", expert_bias),
            ("random_logits", random_logits),
        ):
            check_bool(name, value)
        if aux_counts not in AUX_COUNTS:
            raise ValueError(f"aux_counts={aux_counts!r} must be one of {AUX_COUNTS}")
        if capacity_factor is not None:
            check_real("capacity_factor", capacity_factor)
            if not (math.isfinite(capacity_factor) and capacity_factor > 0):
                raise ValueError(
                    f"capacity_factor={capacity_factor} must be None (no dropping) or a finite "
                    f"number > 0"
                )
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={drop_policy!r} must be one of {DROP_POLICIES}")
        if input_jitter_eps is not None:
            check_real("input_jitter_eps", input_jitter_eps)
        if input_jitter_eps is not None and not 0 < input_jitter_eps < 1:
            raise ValueError(
                f"input_jitter_eps={input_jitter_eps} must be None (no jitter) or in (0, 1)"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")
        if routing_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"routing_dtype={routing_dtype!r} must be torch.float32 or torch.float64"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.topk_scaling_factor = float(topk_scaling_factor)
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.group_score_topk = group_score_topk
        self.group_score_from = group_score_from
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.seq_aux_loss_coeff = float(seq_aux_loss_coeff)
        self.aux_counts = aux_counts
        self.z_loss_coeff = float(z_loss_coeff)
        self.global_aux_loss_coeff = float(global_aux_loss_coeff)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.drop_policy = drop_policy
        self.input_jitter_eps = None if input_jitter_eps is None else float(input_jitter_eps)
        self.random_logits = random_logits
        self.routing_dtype = routing_dtype
        self.loss_group = loss_group
        self.global_group = global_group
        weight = torch.empty(num_experts, hidden_size, device=device, dtype=dtype)  # [E, d]
        self.weight = nn.Parameter(weight)
        self.bias = (
            nn.Parameter(torch.empty(num_experts, device=device, dtype=dtype)) if bias else None
        )
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device))
            self.register_buffer(
                "tokens_per_expert_accum",
                torch.zeros(num_experts, dtype=torch.int64, device=device),
                persistent=False,
            )
        else:
            self.expert_bias = None
            self.tokens_per_expert_accum = None
        # Quantile balancing's bias and the column quantiles accumulated since its last update,
        # under megatron-core's names (None without it).
        for name, shape, dtype, persistent in (
            ("qb_beta", (num_experts,), torch.float32, True),
            ("qb_beta_accum", (num_experts,), torch.float32, False),
            ("qb_beta_count", (), torch.int64, False),
        ):
            buffer = torch.zeros(shape, dtype=dtype, device=device) if quantile_balancing else None
            self.register_buffer(name, buffer, persistent=persistent)
        # The global load-balancing loss's tracker (None without that loss).
        factory = dict(dtype=torch.float32, device=device)
        tracking = self.global_aux_loss_coeff > 0
        for name, shape in (("global_tokens_per_expert", (num_experts,)), ("global_aux_steps", ())):
            buffer = torch.zeros(shape, **factory) if tracking else None
            self.register_buffer(name, buffer, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight and bias like `nn.Linear`'s; expert bias, quantile-balancing bias and what
        they accumulated to zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.hidden_size)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
            self.tokens_per_expert_accum.zero_()
        if self.qb_beta is not None:
            for buffer in (self.qb_beta, self.qb_beta_accum, self.qb_beta_count):
                buffer.zero_()
        self.reset_global_aux_loss_tracker()

    @classmethod
    def set_aux_loss_scale(cls, scale: float) -> None:
        """Set the factor on the injected aux-loss gradient for every Router (default 1.0)."""
        cls.aux_loss_scale = float(scale)

    def forward(
        self,
        x: torch.Tensor,
        sequence_ids: torch.Tensor | None = None,
        num_sequences: int | None = None,
        token_mask: torch.Tensor | None = None,
        replay_ids: torch.Tensor | None = None,
    ) -> RouterOutput:
        """Route `x [N, d]`. `sequence_ids [N]` (integers in [0, `num_sequences`)) says which
        sequence each token belongs to, for the sequence-level loss: needed when
        `seq_aux_loss_coeff` > 0, used for the logged `seq_aux_loss` whenever given.

        `token_mask [N]` (bool, True for a real token) leaves the other tokens (padding) out of
        every statistic: the balancing losses (their choices and probabilities; a sequence's and
        the batch's token counts are its real tokens), the z-loss (the mean over the real
        tokens) and the expert-bias counts. They are still routed (and compete for capacity),
        and `tokens_per_expert` counts every token's choices.

        `replay_ids [N, k]` (integers in [0, E), or -1 for a slot that goes nowhere; routing
        replay, e.g. of the routing an inference engine chose): the experts each token goes to,
        instead of the router's choice. The routing weights are the scores of these experts
        (renormalised if `norm_topk_prob`, then scaled by `topk_scaling_factor`), with their
        gradient; everything after the choice (capacity, counts, losses) runs as usual. Another
        id, or a sequence id outside [0, num_sequences), raises ValueError: at once on the CPU,
        on CUDA at the latest by the next moeblaze call (as `moe_mlp`'s ids; not under
        torch.compile, where `moe_mlp` still raises on such an id)."""
        with profile_range("moeblaze.router"):
            self._check_input(x)
            self._check_sequences(x, sequence_ids, num_sequences)
            self._check_token_mask(x, token_mask)
            self._check_replay_ids(x, replay_ids)
            num_experts = self.num_experts
            # Their values: at once on the CPU, deferred on CUDA, as the logits' below. Counting
            # and capacity never index with them, so an id out of range cannot fault the device.
            if not torch.compiler.is_compiling():
                if sequence_ids is not None:
                    _defer_range_check(
                        "sequence_ids", sequence_ids, 0, num_sequences, "num_sequences"
                    )
                if replay_ids is not None:
                    _defer_range_check(
                        "replay_ids", replay_ids, DROPPED, num_experts, "num_experts", " or -1"
                    )
            dtype = self.routing_dtype
            with autocast_off(x.device.type):  # float32 even under autocast
                logits = self._jittered(x).to(dtype) @ self.weight.to(dtype).t()  # [N, E]
                if self.bias is not None:
                    logits = logits + self.bias.to(dtype)
            # A look at the values: at once on the CPU, without a host synchronisation on CUDA
            # (raised at the latest by the next moeblaze call); torch.compile skips it.
            if not torch.compiler.is_compiling() and logits.numel() > 0:
                # the largest |logit|, NaN if any is NaN: one reduction, its value read back
                largest = torch.linalg.vector_norm(logits, float("inf")).reshape(1)
                deferred.defer(largest, _describe_nonfinite_logits)
            if self.random_logits:  # drawn values (exactly: + 0), the gradient of the real ones
                logits = torch.randn_like(logits) + (logits - logits.detach())
            if replay_ids is None and self.qb_beta is not None:
                if token_mask is not None:
                    raise ValueError(
                        "quantile_balancing counts every token in its quantiles: token_mask "
                        "must be None (megatron-core's has no padding mask either)"
                    )
                replay_ids = self._quantile_choice(logits)
            if replay_ids is None:
                chosen_ids, topk_weights, scores = self._select(logits)  # [N, k], [N, k], [N, E]
            else:
                chosen_ids, topk_weights, scores = self._replayed(logits, replay_ids)
            if self.topk_scaling_factor != 1.0:
                topk_weights = topk_weights * self.topk_scaling_factor
            topk_ids, all_chosen = chosen_ids, None  # all_chosen: every token's choices [E]
            if self.capacity_factor is not None:  # which compete for capacity
                all_chosen = _slots_per_expert(chosen_ids, num_experts)
                topk_ids, topk_weights = self._drop_over_capacity(
                    chosen_ids, topk_weights, all_chosen
                )

            tokens_per_expert = _slots_per_expert(topk_ids, num_experts)  # [E] slots kept
            counted = tokens_per_expert  # [E] slots kept of the real tokens
            if token_mask is not None:
                counted = _slots_per_expert(topk_ids, num_experts, token_mask)
            chosen = counted  # [E] slots chosen (dropped or not) of the real tokens
            if topk_ids is not chosen_ids:
                chosen = (
                    all_chosen
                    if token_mask is None
                    else _slots_per_expert(chosen_ids, num_experts, token_mask)
                )
            # Counted once per real forward: not again when activation checkpointing reruns the
            # forward inside backward.
            if self.expert_bias is not None and self.training and not _recomputing():
                with torch.no_grad():
                    self.tokens_per_expert_accum += counted

            losses = self._losses(
                logits, scores, chosen_ids, chosen, sequence_ids, num_sequences, token_mask
            )
            # Only the terms in use: a huge z-loss logged with z_loss_coeff=0 must not make the
            # injected loss inf or NaN.
            router_loss = logits.new_zeros(())
            coeffs = self.loss_coeffs()
            for name, coeff in coeffs.items():
                if coeff > 0:
                    router_loss = router_loss + coeff * losses[name].to(router_loss.dtype)
            inject = any(coeff > 0 for coeff in coeffs.values())
            if inject and self.training and torch.is_grad_enabled():
                scale = self.aux_loss_scale
                topk_weights = _InjectLossGrad.apply(
                    topk_weights, router_loss, scale if callable(scale) else float(scale)
                )
            return RouterOutput(
                topk_ids=topk_ids,
                chosen_ids=chosen_ids,
                topk_weights=topk_weights,
                logits=logits,
                router_loss=router_loss.detach(),
                tokens_per_expert=tokens_per_expert,
                **{name: loss.detach() for name, loss in losses.items()},
            )

    def _jittered(self, x: torch.Tensor) -> torch.Tensor:
        """x times uniform noise in [1 - eps, 1 + eps] in training (input_jitter_eps), drawn in
        x's dtype as Megatron's `apply_input_jitter` draws it; x as it is otherwise."""
        eps = self.input_jitter_eps
        if eps is None or not self.training:
            return x
        # Bounds as 0-dim CPU tensors in x's dtype (Megatron's values; on CUDA they enter as
        # scalars, where a device copy would synchronise with the host).
        low, high = (torch.tensor(v, dtype=x.dtype) for v in (1 - eps, 1 + eps))
        return x * (low + torch.rand(x.shape, dtype=x.dtype, device=x.device) * (high - low))

    def loss_coeffs(self) -> dict[str, float]:
        """{name of the loss in RouterOutput: its coefficient}."""
        return {
            "aux_loss": self.aux_loss_coeff,
            "seq_aux_loss": self.seq_aux_loss_coeff,
            "global_aux_loss": self.global_aux_loss_coeff,
            "z_loss": self.z_loss_coeff,
        }

    def _losses(
        self, logits, scores, topk_ids, tokens_per_expert, sequence_ids, num_sequences, token_mask
    ):
        """The unscaled losses of `loss_coeffs` (this rank's shares, with a loss group), over the
        real tokens of `token_mask` (all without one); `tokens_per_expert` counts their choices."""
        num_experts = self.num_experts
        aux_ids, aux_tokens_per_expert = topk_ids, tokens_per_expert
        biased = self.expert_bias is not None or self.num_groups is not None
        if self.aux_counts == "scores" and biased:
            aux_ids = select_experts(scores.detach(), self.top_k, self.score_func)  # [N, k]
            aux_tokens_per_expert = _slots_per_expert(aux_ids, num_experts, token_mask)
        probs = self._balancing_probs(scores)  # [N, E]
        z_terms = torch.logsumexp(logits, -1).double().square()  # [N]; float64: lse ~1e20
        real_tokens = max(logits.shape[0], 1)
        if token_mask is not None:
            probs = probs * token_mask.unsqueeze(-1)
            z_terms = torch.where(token_mask, z_terms, 0.0)
            real_tokens = token_mask.sum().clamp_min(1)
        global_aux_loss = scores.new_zeros(())
        if self.global_aux_loss_coeff > 0:
            global_aux_loss = self._global_balancing_loss(probs, aux_tokens_per_expert)
        sequence_counts = None  # [S, E] slots of each (sequence, expert)
        if sequence_ids is not None:
            sequence_counts = _sequence_slots(
                aux_ids, sequence_ids, num_sequences, num_experts, token_mask
            )
        if _group_size(self.loss_group) > 1:  # the whole batch's counts
            aux_tokens_per_expert, sequence_counts = _summed_over(
                self.loss_group, aux_tokens_per_expert, sequence_counts
            )
        seq_aux_loss = scores.new_zeros(())
        if sequence_ids is not None:
            seq_aux_loss = self._sequence_balancing_loss(probs, sequence_ids, sequence_counts)
        z_loss = z_terms.sum() / real_tokens
        return dict(
            aux_loss=self._load_balancing_loss(probs, aux_tokens_per_expert),
            seq_aux_loss=seq_aux_loss,
            global_aux_loss=global_aux_loss,
            # This rank's share of the batch's mean.
            z_loss=z_loss / _group_size(self.loss_group),
        )

    def _global_balancing_loss(self, probs, tokens_per_expert):
        """The load-balancing loss of these `probs` against the counts of the global batch:
        `tokens_per_expert` summed over `global_group`, averaged over the training forwards since
        the last `reset_global_aux_loss_tracker` (this one included; not counted again when
        activation checkpointing reruns it); outside training, this forward's alone. The token
        count it divides by is this forward's over the group, as Megatron's."""
        counts = tokens_per_expert.float()
        if _group_size(self.global_group) > 1:
            dist.all_reduce(counts, group=self.global_group)
        if not (self.training and torch.is_grad_enabled()):
            return self._load_balancing_loss(probs, counts)
        totals, steps = self.global_tokens_per_expert, self.global_aux_steps
        if not _recomputing():  # this forward's counts join the tracker's
            # New detached values copied in, and used here, rather than the buffers updated in
            # place under no_grad and read back: torch.compile (AOTAutograd, torch 2.13) gives
            # the latter pattern a backward that sees the step counted twice.
            totals, steps = (totals + counts).detach(), (steps + 1).detach()
            self.global_tokens_per_expert.copy_(totals)
            self.global_aux_steps.copy_(steps)
        averaged = totals / steps.clamp_min(1)
        return self._load_balancing_loss(probs, averaged, slots=counts.sum())

    @torch.no_grad()
    def reset_global_aux_loss_tracker(self) -> None:
        """Start a new global batch for the global load-balancing loss (once per optimizer step;
        megatron-core's finalize_model_grads calls it by this name)."""
        if self.global_tokens_per_expert is not None:
            self.global_tokens_per_expert.zero_()
            self.global_aux_steps.zero_()

    @property
    def local_tokens_per_expert(self) -> torch.Tensor | None:
        """`tokens_per_expert_accum`, under the name megatron-core's training loop reads."""
        return self.tokens_per_expert_accum

    @torch.no_grad()
    def update_expert_bias(self, update_rate: float = 1e-3) -> None:
        """`expert_bias += update_rate * sign(mean count - count)`, then reset the counts.

        Call once per optimizer step. Under data parallelism, all-reduce (sum)
        `tokens_per_expert_accum` across ranks first so every rank applies the same update.
        """
        if self.expert_bias is None:
            raise RuntimeError(
                "update_expert_bias() needs a Router built with expert_bias=True; "
                "this one has expert_bias=False"
            )
        counts = self.tokens_per_expert_accum.float()  # [E]
        self.expert_bias += update_rate * torch.sign(counts.mean() - counts)
        self.tokens_per_expert_accum.zero_()

    @torch.no_grad()
    def update_quantile_bias(self, ema: float = 0.0) -> None:
        """`qb_beta = ema * qb_beta + (1 - ema) * qb_beta_accum / qb_beta_count`, centred to mean
        0, then `qb_beta_accum` and `qb_beta_count` back to 0 (megatron-core's update, `ema` its
        `moe_router_quantile_balancing_ema`; an accumulation of no forward counts as zeros).

        Call once per optimizer step. Under data parallelism, all-reduce (sum) `qb_beta_accum`
        and `qb_beta_count` across the data-parallel ranks first.
        """
        if self.qb_beta is None:
            raise RuntimeError(
                "update_quantile_bias() needs a Router built with quantile_balancing=True; this "
                "one has quantile_balancing=False"
            )
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema} must be in [0, 1)")
        average = self.qb_beta_accum / self.qb_beta_count.clamp(min=1).to(torch.float32)
        beta = ema * self.qb_beta + (1.0 - ema) * average
        self.qb_beta.copy_(beta - beta.mean())
        self.qb_beta_accum.zero_()
        self.qb_beta_count.zero_()

    def _quantile_choice(self, logits: torch.Tensor) -> torch.Tensor:
        """`topk_ids [N, k]` of quantile balancing (`quantile_balancing_choice`) on the logits of
        every rank of `loss_group` (gathered, in rank order); in a training forward (not when
        activation checkpointing reruns it), the column quantiles added to `qb_beta_accum`."""
        local = logits.detach().float()
        ranks = _group_size(self.loss_group)
        logits_of_batch = local
        if ranks > 1:
            logits_of_batch = local.new_empty(local.shape[0] * ranks, local.shape[1])
            dist.all_gather_into_tensor(logits_of_batch, local.contiguous(), group=self.loss_group)
        num_tokens = logits_of_batch.shape[0]
        update = num_tokens > 0 and self.training and torch.is_grad_enabled() and not _recomputing()
        if update and num_tokens * self.top_k % self.num_experts:
            where = f" (over the {ranks} ranks of loss_group)" if ranks > 1 else ""
            raise ValueError(
                f"quantile_balancing needs the routed slots to be a multiple of num_experts="
                f"{self.num_experts}: {num_tokens} tokens{where} x top_k={self.top_k} are not"
            )
        topk_ids, column = quantile_balancing_choice(
            logits_of_batch, self.top_k, self.qb_beta, update
        )
        if update:
            self.qb_beta_accum += column
            self.qb_beta_count += 1
        if ranks > 1:
            rank = dist.get_rank(self.loss_group)
            topk_ids = topk_ids[rank * local.shape[0] : (rank + 1) * local.shape[0]]
        return topk_ids

    def _select(self, logits: torch.Tensor):
        """(topk_ids, topk_weights, scores) of `logits [N, E]`: one launch of the compiled
        kernel where it runs (moeblaze._C on CUDA, eager), else plain torch, which compute the
        same (ties: the lower expert index) (moeblaze.reference.router_topk_reference)."""
        options = (
            self.top_k,
            self.score_func,
            self.expert_bias,
            self.num_groups,
            self.topk_groups,
            self.norm_topk_prob,
        )
        per_group = self.group_score_topk
        if self.num_groups is not None and per_group is not None:
            default = default_group_score_topk(self.score_func, self.num_experts // self.num_groups)
            per_group = None if per_group == default else per_group  # else not the kernel's rule
        compilable = (
            per_group is None
            and logits.dtype == torch.float32
            and self.group_score_from == "scores"
        )
        if logits.is_cuda and not torch.compiler.is_compiling() and compilable:
            module = compiled.load("moeblaze")
            fits = module is not None and (
                self.num_experts <= module.MAX_ROUTER_EXPERTS
                and self.top_k <= module.MAX_ROUTER_TOPK
            )
            if fits:
                return RouterTopK.apply(logits, *options)
        return router_topk_reference(logits, *options, per_group, self.group_score_from)

    def _replayed(self, logits: torch.Tensor, replay_ids: torch.Tensor):
        """(topk_ids, topk_weights, scores) as `_select` returns them, for the given experts.
        Ids out of range read the score of the nearest expert here (no host synchronisation to
        check them); forward raises on them (`_defer_range_check`)."""
        scores = router_scores(logits, self.score_func)
        topk_ids = replay_ids.long()
        gathered = topk_ids.clamp(DROPPED, self.num_experts - 1)
        return topk_ids, routing_weights(scores, gathered, self.norm_topk_prob), scores

    def _drop_over_capacity(self, topk_ids, topk_weights, counts):
        """(topk_ids, topk_weights) [N, k] with the slots past each expert's capacity dropped: id
        DROPPED, weight 0 (its gradient too); `counts [E]` the slots of each expert in topk_ids.
        A stable sort of the slots by expert (by weight, descending, within an expert for
        "probs"; by slot, so token order, for "position"): a slot's rank in its expert is its
        sorted position less the expert's first. Slots of no expert (replayed: DROPPED, or an id
        out of range, raised apart) sort after every expert's and are left as they are. No host
        synchronisation."""
        num_tokens, top_k = topk_ids.shape
        num_experts = self.num_experts
        capacity = math.ceil(num_tokens * top_k / num_experts * self.capacity_factor)
        if capacity >= num_tokens:  # no expert can receive more: nothing to drop
            return topk_ids, topk_weights
        ids = topk_ids.flatten()  # [S]
        counted = (ids >= 0) & (ids < num_experts)
        expert = torch.where(counted, ids, num_experts)  # [S]; E: no expert, sorted last
        if self.drop_policy == "probs":
            order = torch.sort(topk_weights.detach().flatten(), descending=True, stable=True)[1]
            order = order[torch.sort(expert[order], stable=True)[1]]
        else:
            order = torch.sort(expert, stable=True)[1]  # [S] slots by expert, then slot
        # [E + 1] first sorted position of each expert, and of the slots of none
        first = torch.cumsum(counts, 0) - counts
        first = torch.cat([first, counts.sum(0, keepdim=True)])
        ranks = torch.empty_like(ids)
        ranks[order] = torch.arange(ids.numel(), device=ids.device) - first[expert[order]]
        keep = ((ranks < capacity) | ~counted).view(num_tokens, top_k)
        return topk_ids.masked_fill(~keep, DROPPED), topk_weights * keep

    def _balancing_probs(self, scores):
        """Each token's scores as a distribution over the experts (sigmoid and sqrtsoftplus ones
        normalised)."""
        if self.score_func != "softmax":
            return scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return scores

    def _load_balancing_loss(self, probs, tokens_per_expert, slots=None):
        """Switch loss `E * sum_e f_e * P_e`: f_e share of the `slots` (default: all those
        counted in `tokens_per_expert`; every token fills k of them), P_e the `probs [N, E]`
        (`_balancing_probs`) summed over the tokens of the slots (this rank's share of the mean,
        with a loss group)."""
        if slots is None:
            slots = tokens_per_expert.sum()
        slots = slots.clamp_min(1).float()
        slot_share = tokens_per_expert.float() / slots  # [E], no grad
        mean_prob = probs.sum(0) / (slots / self.top_k)  # [E]
        return self.num_experts * (slot_share * mean_prob).sum()

    def _sequence_balancing_loss(self, probs, sequence_ids, counts):
        """The switch loss of each sequence's tokens, averaged over the S sequences of
        `counts [S, E]` (an empty one counts 0): one scatter per statistic, no loop, no host
        sync."""
        num_sequences, num_experts = counts.shape
        if num_sequences == 0:
            return probs.new_zeros(())
        counts = counts.float()
        tokens = (counts.sum(-1) / self.top_k).clamp_min(1)  # [S]: each token fills k slots
        in_range = sequence_ids.clamp(0, num_sequences - 1)  # out of range: raised apart
        prob_sums = probs.new_zeros(num_sequences, num_experts).index_add(
            0, in_range, probs
        )  # [S, E]
        slot_share = counts / (tokens * self.top_k).unsqueeze(1)
        per_sequence = (slot_share * prob_sums).sum(-1) / tokens  # [S]
        return num_experts * per_sequence.sum() / num_sequences

    def _check_sequences(self, x, sequence_ids, num_sequences) -> None:
        if sequence_ids is None:
            if self.seq_aux_loss_coeff > 0:
                raise ValueError(
                    f"seq_aux_loss_coeff={self.seq_aux_loss_coeff} needs sequence_ids (the "
                    f"sequence of each token) and num_sequences"
                )
            return
        if not isinstance(num_sequences, int) or num_sequences < 0:
            raise ValueError(
                f"num_sequences must be an int >= 0 with sequence_ids, got {num_sequences!r}"
            )
        if num_sequences == 0 and x.shape[0] > 0:
            raise ValueError(f"num_sequences=0 with {x.shape[0]} tokens: each needs a sequence")
        if (
            sequence_ids.dtype not in (torch.int32, torch.int64)
            or tuple(sequence_ids.shape) != (x.shape[0],)
            or sequence_ids.device != x.device
        ):
            raise ValueError(
                f"sequence_ids must be int32 or int64 [N={x.shape[0]}] on {x.device}, got "
                f"{sequence_ids.dtype} {tuple(sequence_ids.shape)} on {sequence_ids.device}"
            )

    def _check_token_mask(self, x, token_mask) -> None:
        if token_mask is not None and (
            token_mask.dtype != torch.bool
            or tuple(token_mask.shape) != (x.shape[0],)
            or token_mask.device != x.device
        ):
            raise ValueError(
                f"token_mask must be bool [N={x.shape[0]}] on {x.device} (True: a real token), "
                f"got {token_mask.dtype} {tuple(token_mask.shape)} on {token_mask.device}"
            )

    def _check_replay_ids(self, x, replay_ids) -> None:
        expected = (x.shape[0], self.top_k)
        if replay_ids is not None and (
            replay_ids.is_floating_point()
            or replay_ids.is_complex()
            or replay_ids.dtype == torch.bool
            or tuple(replay_ids.shape) != expected
            or replay_ids.device != x.device
        ):
            raise ValueError(
                f"replay_ids must be integer [N={expected[0]}, top_k={expected[1]}] on "
                f"{x.device}, got {replay_ids.dtype} {tuple(replay_ids.shape)} on "
                f"{replay_ids.device}"
            )

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(
                f"x must have shape [N, hidden_size={self.hidden_size}], got {tuple(x.shape)}"
            )
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but router.weight is on {self.weight.device}")

    def _apply(self, fn, recurse=True):
        # Keep the biases float32 through .to(dtype) / .half(): small updates vanish in bf16.
        super()._apply(fn, recurse)
        for name in ("expert_bias", "qb_beta", "qb_beta_accum"):
            buffer = getattr(self, name)
            if buffer is not None and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return self

    def extra_repr(self) -> str:
        s = f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"
        s += f", score_func={self.score_func!r}, norm_topk_prob={self.norm_topk_prob}"
        s += f", bias={self.bias is not None}"
        if self.topk_scaling_factor != 1.0:
            s += f", topk_scaling_factor={self.topk_scaling_factor}"
        if self.num_groups is not None:
            s += f", num_groups={self.num_groups}, topk_groups={self.topk_groups}"
            if self.group_score_topk is not None:
                s += f", group_score_topk={self.group_score_topk}"
            if self.group_score_from != "scores":
                s += f", group_score_from={self.group_score_from!r}"
        s += f", expert_bias={self.expert_bias is not None}"
        if self.qb_beta is not None:
            s += ", quantile_balancing=True"
        s += f", aux_loss_coeff={self.aux_loss_coeff}, seq_aux_loss_coeff={self.seq_aux_loss_coeff}"
        s += f", aux_counts={self.aux_counts!r}"
        if self.loss_group is not None:
            s += f", loss_group=<{_group_size(self.loss_group)} ranks>"
        if self.global_aux_loss_coeff > 0:
            s += f", global_aux_loss_coeff={self.global_aux_loss_coeff}"
        if self.capacity_factor is not None:
            s += f", capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy!r}"
        return s + f", z_loss_coeff={self.z_loss_coeff}"


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _defer_range_check(
    name: str, values: torch.Tensor, low: int, high: int, high_name: str, also: str = ""
) -> None:
    """ValueError naming the first of `values` outside [low, high) (`also`: what else is fine),
    at once on the CPU, without a host synchronisation on CUDA (kernelbase.deferred)."""
    if values.numel() == 0:
        return
    outside = ((values < low) | (values >= high)).flatten()
    word = torch.stack([outside.sum(), outside.int().argmax()])  # count, the first

    def describe(word: list[int]) -> str | None:
        count, first = word
        if count == 0:
            return None
        where = ", ".join(
            str(int(i)) for i in torch.unravel_index(torch.tensor(first), values.shape)
        )
        return (
            f"{name} contains {int(values.flatten()[first])} ({name}[{where}], the first of "
            f"{count} out of range); expected values in [0, {high_name}={high}){also}"
        )

    deferred.defer(word, describe)


def _sequence_slots(
    ids, sequence_ids, num_sequences: int, num_experts: int, token_mask=None
) -> torch.Tensor:
    """[S, E] int64 count of the slots of `ids [N, k]` per (sequence, expert), token t being of
    sequence `sequence_ids[t]` (only the tokens of `token_mask [N]` where given)."""
    k = ids.shape[1]
    slot_sequence = sequence_ids.view(-1, 1).expand(-1, k).reshape(-1)  # [N*k]
    slot_sequence = slot_sequence.clamp(0, num_sequences - 1)  # out of range: raised apart
    slots = slot_sequence * num_experts + ids.flatten().clamp(0, num_experts - 1)  # [N*k]
    counts = torch.zeros(num_sequences * num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, slots, _slot_weights(ids, num_experts, token_mask))
    return counts.view(num_sequences, num_experts)


def _slot_weights(ids: torch.Tensor, num_experts: int, token_mask) -> torch.Tensor:
    """[N*k] int64: 1 for each slot of `ids [N, k]`, 0 for a dropped one (DROPPED), one of an id
    outside [0, num_experts) (a replayed id, raised apart) and those of tokens outside
    `token_mask [N]`."""
    counted = (ids >= 0) & (ids < num_experts)
    if token_mask is not None:
        counted = counted & token_mask.view(-1, 1)
    return counted.flatten().long()


def _summed_over(group, tokens_per_expert, sequence_counts):
    """`tokens_per_expert [E]` and `sequence_counts [S, E]` (or None) summed over the ranks of
    `group`, in one all-reduce (no host synchronisation)."""
    parts = [tokens_per_expert] if sequence_counts is None else [tokens_per_expert, sequence_counts]
    flat = torch.cat([p.flatten() for p in parts])
    dist.all_reduce(flat, group=group)
    tokens_per_expert = flat[: tokens_per_expert.numel()]
    if sequence_counts is not None:
        sequence_counts = flat[tokens_per_expert.numel() :].view(sequence_counts.shape)
    return tokens_per_expert, sequence_counts


def _slots_per_expert(ids: torch.Tensor, num_experts: int, token_mask=None) -> torch.Tensor:
    """[E] int64 count of each expert's slots in `ids [N, k]` (of the tokens of `token_mask [N]`
    where given; dropped slots count nowhere); scatter_add_ rather than bincount, which syncs
    with the host to size its output."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    index = ids.flatten().long().clamp(0, num_experts - 1)  # an uncounted slot adds its 0 there
    return counts.scatter_add_(0, index, _slot_weights(ids, num_experts, token_mask))


def _check_options(
    hidden_size,
    num_experts,
    top_k,
    score_func,
    num_groups,
    topk_groups,
    group_score_topk,
    group_score_from,
    aux_coeff,
    seq_aux_coeff,
    global_aux_coeff,
    z_coeff,
    scale,
):
    check_int("hidden_size", hidden_size)
    check_int("num_experts", num_experts)
    check_selection_options(
        num_experts, top_k, score_func, num_groups, topk_groups, group_score_topk, group_score_from
    )
    coeffs = (
        ("aux_loss_coeff", aux_coeff),
        ("seq_aux_loss_coeff", seq_aux_coeff),
        ("global_aux_loss_coeff", global_aux_coeff),
        ("z_loss_coeff", z_coeff),
    )
    for name, value in coeffs:
        check_number(name, value)
    check_real("topk_scaling_factor", scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"topk_scaling_factor={scale} must be a finite number > 0")


def _check_quantile_balancing(
    quantile_balancing, num_experts, top_k, num_groups, aux_coeff, seq_aux_coeff, global_aux_coeff
) -> None:
    if not isinstance(quantile_balancing, bool):
        raise TypeError(
            f"quantile_balancing must be a bool, got {type(quantile_balancing).__name__}"
        )
    if not quantile_balancing:
        return
    if top_k >= num_experts:
        raise ValueError(
            f"quantile_balancing needs top_k < num_experts (a token's (k + 1)-th expert), got "
            f"top_k={top_k}, num_experts={num_experts}"
        )
    if num_groups is not None:
        raise ValueError(
            f"quantile_balancing has no group limit (as megatron-core's): num_groups={num_groups}"
        )
    coeffs = {
        "aux_loss_coeff": aux_coeff,
        "seq_aux_loss_coeff": seq_aux_coeff,
        "global_aux_loss_coeff": global_aux_coeff,
    }
    losses = [f"{name}={value}" for name, value in coeffs.items() if value]
    if losses:
        raise ValueError(
            "quantile_balancing balances by its bias, without balancing losses (as "
            f"megatron-core's): {', '.join(losses)} must be 0"
        )
