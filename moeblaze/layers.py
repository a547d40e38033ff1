"""`MoELayer`: router + index-routed SwiGLU experts (+ an optional shared expert).

`MoEBlock` holds what every MoE layer of moeblaze shares (this one, the expert-parallel one and
the Megatron-style one): parameters, checks and the forward around the routed experts.

# N tokens (all leading dims of x flattened), d hidden, F ffn, E experts, k top-k

    x [..., d] -> [N, d] --Router--> topk_ids [N, k], topk_weights [N, k]
    moe_mlp(x, topk_ids, topk_weights, w13 [E, 2F, d], w2 [E, d, F]) (+ shared expert) -> [..., d]
"""

import dataclasses
import difflib
import inspect
import math

import torch
from torch import nn

from kernelbase.backend import has_values
from kernelbase.checks import check_bool, check_dtype, check_int
from moeblaze.activation import SWIGLU, Activation, check_activation
from moeblaze.ops import check_recompute, moe_mlp
from moeblaze.router import Router, RouterOutput
from moeblaze.routing_plan import DROPPED


class MoEBlock(nn.Module):
    """What `MoELayer` and `moeblaze.ExpertParallelMoELayer` share: the router, the SwiGLU
    experts this module holds (`w13 [E_l, 2F, d]`, `w2 [E_l, d, F]`, E_l = `num_local_experts`
    of the `num_experts` routed to; with `bias`, also `b13 [E_l, 2F]` and `b2 [E_l, d]`, else
    None), the optional shared expert, and the forward around the routed experts' computation
    (`routed_mlp`, which a subclass defines). `bias` gives every linear map a bias: the router's,
    the experts' and the shared expert's. The experts held are those of global ids `experts`,
    a slice of `num_local_experts` from `first_expert`. `ffn_shard=(r, n)` holds shard r of n
    of each expert's F columns (expert tensor parallelism): `w13 [E_l, 2F/n, d]` holds gate rows
    r, then up rows r, `w2 [E_l, d, F/n]` columns r, `b13` the rows of `w13`; `b2` is whole.
    `expert_hidden_size` (default `hidden_size`) is the d of the experts' tensors when they work
    in another space than the router's input (a subclass then projects the tokens)."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        num_local_experts: int,
        *,
        recompute: str,
        deterministic: bool,
        shared_expert_size: int | None,
        shared_expert_gate: bool = False,
        device,
        dtype,
        router_options: dict,
        activation: Activation = SWIGLU,
        bias: bool = False,
        first_expert: int = 0,
        ffn_shard: tuple[int, int] = (0, 1),
        expert_hidden_size: int | None = None,
    ):
        super().__init__()
        check_int("ffn_hidden_size", ffn_hidden_size)
        if shared_expert_size is not None:
            check_int("shared_expert_size", shared_expert_size)
        for name, value in (
            ("deterministic", deterministic),
            ("shared_expert_gate", shared_expert_gate),
            ("bias", bias),
        ):
            check_bool(name, value)
        check_dtype("dtype", dtype)  # what moe_mlp computes in
        shard, shards = ffn_shard
        if not 0 <= shard < shards or ffn_hidden_size % shards:
            raise ValueError(
                f"ffn_shard={ffn_shard} must be (r, n) with 0 <= r < n and n dividing "
                f"ffn_hidden_size={ffn_hidden_size}"
            )
        check_recompute(recompute)
        check_activation(activation)
        if shared_expert_gate and not shared_expert_size:
            raise ValueError("shared_expert_gate=True needs a shared expert (shared_expert_size)")
        factory = dict(device=device, dtype=dtype)
        self.router = Router(
            hidden_size, num_experts, top_k, bias=bias, **router_options, **factory
        )
        ffn = ffn_hidden_size // shards  # the columns of each expert held here
        d = expert_hidden_size or hidden_size
        width = activation.pre_width(ffn)
        self.w13 = nn.Parameter(torch.empty(num_local_experts, width, d, **factory))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, d, ffn, **factory))
        self.b13 = self.b2 = None
        if bias:
            self.b13 = nn.Parameter(torch.empty(num_local_experts, width, **factory))
            self.b2 = nn.Parameter(torch.empty(num_local_experts, d, **factory))
        self.shared_expert = (
            SwiGLUMLP(
                hidden_size,
                shared_expert_size,
                activation=activation,
                bias=bias,
                sigmoid_gate=shared_expert_gate,
                **factory,
            )
            if shared_expert_size
            else None
        )
        self.experts = slice(first_expert, first_expert + num_local_experts)  # global ids
        self.ffn_hidden_size = ffn_hidden_size  # F, of the whole expert
        self.ffn_shard = ffn_shard
        self.hidden_size = hidden_size
        self.expert_hidden_size = d
        self.recompute = recompute
        self.deterministic = deterministic
        self.activation = activation
        self.last_router_output: RouterOutput | None = None

    def reset_parameters(self) -> None:
        """Each expert's matrices and biases like `nn.Linear`'s (uniform, bound 1/sqrt(fan_in)).

        Expert e draws from a generator seeded with (one draw of the default generator) + e: on
        ranks seeded alike, as a replicated router needs, the experts still differ, and the
        initial model is the same whatever the number of ranks holding the experts or their
        shards (a shard is cut from the whole expert's draw).
        """
        # Nothing to fill: on the meta device (filled later, as by
        # ExpertParallelMoELayer.from_moe_layer) or fake (FakeTensorMode: memory estimation).
        if not has_values(self.w13):
            return
        generator = torch.Generator(self.w13.device)
        d, f = self.expert_hidden_size, self.ffn_hidden_size
        width = self.activation.pre_width(f)
        whole = {"w13": (width, d), "b13": (width,), "w2": (d, f), "b2": (d,)}
        with torch.no_grad():
            for local, seed in self.expert_seeds():
                generator.manual_seed(seed)
                for names, fan_in in ((("w13", "b13"), d), (("w2", "b2"), f)):
                    bound = 1.0 / math.sqrt(fan_in)
                    for name in names:
                        if getattr(self, name) is not None:
                            t = self.w13.new_empty(whole[name]).uniform_(
                                -bound, bound, generator=generator
                            )
                            self.set_expert(name, local, t)

    def set_expert(self, name: str, local: int, whole: torch.Tensor) -> None:
        """Set local expert `local`'s `name` ("w13", "b13", "w2" or "b2") from the whole expert's
        tensor (`[2F, d]`, `[2F]`, `[d, F]`, `[d]`; `[F, d]`, `[F]` ungated): its shard of
        `ffn_shard`."""
        shard, shards = self.ffn_shard
        f = self.ffn_hidden_size // shards
        if name in ("w13", "b13"):  # gate rows r, then up rows r (ungated: rows r)
            halves = whole.chunk(2) if self.activation.gated else (whole,)
            whole = torch.cat([half[shard * f : (shard + 1) * f] for half in halves])
        elif name == "w2":
            whole = whole[:, shard * f : (shard + 1) * f]
        getattr(self, name)[local].copy_(whole)

    def expert_seeds(self) -> list[tuple[int, int]]:
        """(local index, seed) of each expert held: one draw of the default generator (the same
        on every rank seeded alike) plus the expert's global id."""
        seed = int(torch.randint(2**62, ()))
        experts = range(self.experts.start, self.experts.stop)
        return [(local, seed + expert) for local, expert in enumerate(experts)]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x [..., d]` -> `[..., d]`. `token_mask [...]` (bool, x's leading shape; True for a
        real token) leaves padding out of the router's statistics (`moeblaze.Router`) and out of
        the routed experts: a padding token's slots are dropped (its routed output is 0; the
        shared expert still computes it)."""
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must have last dim hidden_size={self.hidden_size}, got shape {tuple(x.shape)}"
            )
        if token_mask is not None and tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"token_mask must have x's leading shape {tuple(x.shape[:-1])}, got "
                f"{tuple(token_mask.shape)}"
            )
        tokens = x.reshape(-1, self.hidden_size)  # [N, d]
        sequences = self.sequences(x) if self.router.seq_aux_loss_coeff > 0 else (None, None)
        mask = None if token_mask is None else token_mask.reshape(-1)
        routing = self.route(tokens, sequences, mask)
        self.last_router_output = routing
        if mask is not None:  # padding goes to no expert
            ids = routing.topk_ids.masked_fill(~mask.unsqueeze(-1), DROPPED)
            routing = dataclasses.replace(routing, topk_ids=ids)
        out = self.routed_mlp(tokens, routing)  # [N, d], a tensor of this forward's own
        if self.shared_expert is not None:
            out = out + self.shared_mlp(tokens)
        # In x's shape without being a view of out (as nn.Linear's output on 3-D input): FSDP2
        # warns of a module output that is a view, since an in-place op on it would skip its
        # pre-backward hook. Nothing else holds out, so nothing can change it behind the alias.
        return torch.ops.aten._unsafe_view(out, x.shape)

    def route(self, tokens: torch.Tensor, sequences: tuple, token_mask) -> RouterOutput:
        """The router on `tokens [N, d]`, with `sequences` = (sequence ids, number) or
        (None, None), and `token_mask [N]` or None."""
        return self.router(tokens, *sequences, token_mask=token_mask)

    def routed_mlp(self, tokens: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """The routed experts' weighted sum for each of `tokens [N, d]`, [N, d]."""
        raise NotImplementedError

    def sequences(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sequence of each token [N], number of sequences) for the router's sequence-level
        loss: `x [..., L, d]` is batch first, L tokens a sequence (`x [L, d]`: one sequence)."""
        length = max(x.shape[-2] if x.dim() >= 2 else 1, 1)  # an empty x has no token anyway
        n = x.numel() // self.hidden_size
        return torch.arange(n, device=x.device) // length, n // length

    def expert_options(self) -> dict:
        """The keyword arguments of `moe_mlp` (and `expert_parallel_mlp`) these experts take."""
        return dict(
            b13=self.b13,
            b2=self.b2,
            recompute=self.recompute,
            deterministic=self.deterministic,
            activation=self.activation,
        )

    def shared_mlp(self, tokens: torch.Tensor) -> torch.Tensor:
        """The shared expert on `tokens [N, d]`."""
        return self.shared_expert(tokens)


class MoELayer(MoEBlock):
    """Mixture-of-Experts MLP block with SwiGLU experts in the Hugging Face weight layout.

    Other keyword arguments are router options (`score_func`, `norm_topk_prob`,
    `topk_scaling_factor`, `num_groups`, `topk_groups`, `expert_bias`, `aux_loss_coeff`,
    `z_loss_coeff`): they go to `moeblaze.Router`, which documents and checks them; `recompute`
    and `deterministic` to `moeblaze.moe_mlp`, and `activation` (a `moeblaze.SwiGLU`: plain,
    clamped as in DeepSeek-V4, or GPT-OSS's; a `moeblaze.Gated` such as Gemma 4's GeGLU; a
    `moeblaze.Ungated`) to it and to the shared expert. `bias=True` gives
    every linear map a bias, as GPT-OSS and Megatron's `add_bias_linear=True` have: `router.bias
    [E]`, each expert's `b13 [E, 2F]` and `b2 [E, d]`, and the shared expert's.
    `shared_expert_size` adds a dense SwiGLU MLP of that width that every token goes through
    (Qwen-MoE, DeepSeek); `shared_expert_gate=True` scales its output by sigmoid(x @ g) with a
    learnable `g [d]` (Qwen2-MoE's `shared_expert_gate`, Megatron's `moe_shared_expert_gate`).
    After each forward, `last_router_output` holds the router's `RouterOutput` (aux losses and
    tokens per expert, for logging). `forward(x, token_mask)` leaves the tokens outside
    `token_mask` (padding) out of the balancing losses, the z-loss, the expert-bias counts and
    the routed experts (`MoEBlock.forward`). `capacity_factor` and `drop_policy` drop the
    tokens past each expert's capacity (`moeblaze.Router`).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        recompute: str = "activation",
        deterministic: bool = False,
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
        activation: Activation = SWIGLU,
        bias: bool = False,
        device=None,
        dtype=None,
        **router_options,
    ):
        check_router_options(router_options, type(self))
        super().__init__(
            hidden_size,
            ffn_hidden_size,
            num_experts,
            top_k,
            num_experts,
            bias=bias,
            recompute=recompute,
            deterministic=deterministic,
            shared_expert_size=shared_expert_size,
            shared_expert_gate=shared_expert_gate,
            device=device,
            dtype=dtype,
            router_options=router_options,
            activation=activation,
        )
        self.reset_parameters()

    def routed_mlp(self, tokens: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        return moe_mlp(
            tokens,
            routing.topk_ids,
            routing.topk_weights,
            self.w13,
            self.w2,
            **self.expert_options(),
        )


def _keyword_only(init) -> list[str]:
    return [n for n, p in inspect.signature(init).parameters.items() if p.kind is p.KEYWORD_ONLY]


def check_router_options(options: dict, layer: type) -> None:
    """Name an unknown keyword of a `layer` class's constructor with a close match, rather than
    leave it to Router."""
    own_names = ("device", "dtype", "bias")  # the layer's own, passed on to the router
    known = [name for name in _keyword_only(Router.__init__) if name not in own_names]
    own = ", ".join(_keyword_only(layer.__init__))
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise TypeError(
                f"{layer.__name__} got an unexpected keyword argument {name!r}{hint} Its own "
                f"options are {own}; router options are {', '.join(known)}"
            )


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up in one [2F, d] matrix
    (rows as `activation.split` reads them); `activation` (a `moeblaze.SwiGLU`) replaces
    silu(gate) * up by its clamped or quick-GELU form, (a `moeblaze.Gated`) by fn(gate) * up,
    or (a `moeblaze.Ungated`) makes it down(fn(gate_up(x))) with an [F, d] gate_up. `bias`:
    both linear maps have one.
    `sigmoid_gate`: the output is scaled by sigmoid(x @ g), `sigmoid_gate.weight [1, d]` (no
    bias), as Qwen2-MoE and Megatron gate their shared experts."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        device=None,
        dtype=None,
        *,
        activation: Activation = SWIGLU,
        bias: bool = False,
        sigmoid_gate: bool = False,
    ):
        super().__init__()
        check_int("hidden_size", hidden_size)
        check_int("ffn_hidden_size", ffn_hidden_size)
        self.activation = activation
        factory = dict(bias=bias, device=device, dtype=dtype)
        check_activation(activation)
        self.gate_up = nn.Linear(hidden_size, activation.pre_width(ffn_hidden_size), **factory)
        self.down = nn.Linear(ffn_hidden_size, hidden_size, **factory)
        self.sigmoid_gate = (
            nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
            if sigmoid_gate
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(x, self.gate_up, self.down, self.activation, self.sigmoid_gate)


def swiglu_mlp(x, gate_up, down, activation: Activation, sigmoid_gate=None) -> torch.Tensor:
    """down(activation(gate_up(x))) (* sigmoid(sigmoid_gate(x))): `SwiGLUMLP`'s computation, with
    any maps `gate_up` and `down` (the tensor-parallel shared expert passes its own)."""
    out = down(activation.apply(gate_up(x)))
    if sigmoid_gate is not None:
        out = out * torch.sigmoid(sigmoid_gate(x))
    return out
