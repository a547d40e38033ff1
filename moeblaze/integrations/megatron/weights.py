"""Megatron expert weights (a state dict of SequentialMLP, TEGroupedMLP or the legacy
GroupedMLP) as moeblaze's w13 [E, 2F, h] / w2 [E, h, F] (and b13, b2)."""

from collections.abc import Mapping

import torch


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
    params, _ = read_expert_params(state_dict, num_experts, prefix, gated)
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
    params, _ = read_expert_params(state_dict, num_experts, prefix, gated)
    return params


def read_expert_params(state_dict, num_experts, prefix, gated):
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
