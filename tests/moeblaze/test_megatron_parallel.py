"""The Megatron-style layer under tensor, sequence, context and expert tensor parallelism, over 2
gloo processes (and expert tensor with expert parallelism over 4), against the one-rank layer
with the same weights.

# s sequence, b batch, h hidden, W = 2 ranks

Each configuration gives every rank its shard of the batch's sequence (`[s/W, b, h]`, sequence
parallel or context parallel) and of Megatron's padding mask, and checks, against the one-rank
layer on the whole batch: the output and dx of its rows; the losses, whose shares sum over the
ranks to the whole batch's; and the gradients, reduced as Megatron's training loop reduces them
(the replicated router summed over the ranks: DDP over the context-parallel ranks,
`finalize_model_grads` over the tensor-parallel ones for parameters marked `sequence_parallel`;
whole experts summed over the expert-data-parallel group, which `allreduce = False` selects; the
shards of split experts and of the shared expert complete on each rank). Each rank loads its own
Megatron state dict, its shards included, and its `sharded_state_dict` places its shards in the
whole layer's tensors.

The workers are spawned: forked from a process that has run megatron-core's parallel_state
(test_megatron, in the same pytest worker), their initialize_model_parallel hangs.
"""

import contextlib
import functools
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moeblaze_testing import expert_shard, shard_of
from overlap_testing import gloo_rank, randn
from tolerance import assert_close

S, BATCH, D, FFN, E, K, SHARED = 8, 2, 16, 8, 4, 2, 12
W = 2
RTOL = 1e-5  # float32 against float32: the same kernels, sums in another order
LOSSES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss")
# Megatron's padding_mask [b, s] (True: padding), as many padded tokens on every rank and in every
# sequence (the z-loss shares are means over each rank's real tokens, as Megatron's).
PADDING = (torch.arange(S) % 2 == 1).expand(BATCH, S)


# The models compared: a gated shared expert and no biases, or biases and no shared expert
# (Megatron's shared experts have none), or that with experts on a latent projection, or
# squared-ReLU experts without a gate (and such a shared expert).
LATENT = 8
MODELS = {
    "shared": dict(moe_shared_expert_intermediate_size=SHARED, add_bias_linear=False),
    "biases": dict(moe_shared_expert_intermediate_size=None, add_bias_linear=True),
    "latent": dict(
        moe_shared_expert_intermediate_size=None, add_bias_linear=True, moe_latent_size=LATENT
    ),
    "ungated": dict(
        moe_shared_expert_intermediate_size=SHARED,
        add_bias_linear=False,
        gated_linear_unit=False,
        activation_func=lambda y: torch.relu(y) ** 2,  # Megatron's squared_relu
    ),
}


def _config(model="shared", **fields):
    """A megatron-core TransformerConfig look-alike: every balancing loss, `MODELS[model]`,
    Megatron's init methods."""
    fields = {
        "init_method": functools.partial(torch.nn.init.normal_, std=0.02),
        "output_layer_init_method": functools.partial(torch.nn.init.normal_, std=0.01),
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        **MODELS[model],
        **fields,
    }
    return types.SimpleNamespace(
        hidden_size=D,
        num_moe_experts=E,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=K,
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss", "global_aux_loss"],
        moe_aux_loss_coeff=[1e-1, 2e-1, 5e-2],
        moe_z_loss_coeff=1e-2,
        moe_shared_expert_gate=True,
        **fields,
    )


# (parallel_state.initialize_model_parallel's sizes, the config's fields, the model) of each run
# on W ranks, then on 2W.
TP_SP = dict(tensor_model_parallel_size=W, sequence_parallel=True)  # and Megatron's ETP = TP
TP_EP = dict(
    tensor_model_parallel_size=W, expert_tensor_parallel_size=1, expert_model_parallel_size=W
)
CONFIGS = {
    "expert_tensor_parallel": (dict(tensor_model_parallel_size=W), TP_SP, "shared"),
    "expert_tensor_parallel_biases": (dict(tensor_model_parallel_size=W), TP_SP, "biases"),
    "expert_tensor_parallel_ungated": (dict(tensor_model_parallel_size=W), TP_SP, "ungated"),
    "tensor_sequence_parallel": (
        dict(tensor_model_parallel_size=W, expert_tensor_parallel_size=1),
        dict(tensor_model_parallel_size=W, expert_tensor_parallel_size=1, sequence_parallel=True),
        "shared",
    ),
    "context_parallel": (dict(context_parallel_size=W), dict(context_parallel_size=W), "shared"),
    "tensor_sequence_and_expert_parallel": (TP_EP, dict(**TP_EP, sequence_parallel=True), "shared"),
    # The latent tokens go through the all-to-alls.
    "latent_tensor_sequence_and_expert_parallel": (
        TP_EP,
        dict(**TP_EP, sequence_parallel=True),
        "latent",
    ),
}
CP_EP = dict(context_parallel_size=2, expert_model_parallel_size=2)
CONFIGS_2W = {  # ETP x EP over the four TP x CP ranks
    "expert_tensor_and_expert_parallel": (
        dict(tensor_model_parallel_size=W, **CP_EP),
        dict(**TP_SP, **CP_EP),
        "biases",
    ),
}


def _rank_state(trained, layer) -> dict[str, torch.Tensor]:
    """This rank's Megatron state dict (TEGroupedMLP experts, local ones numbered from 0, with
    expert tensor parallelism their shards; under tensor parallelism the shared expert's
    shards)."""
    # The router and the latent projections, replicated.
    state = {k: v for k, v in trained.items() if k.startswith(("router.", "fc"))}
    split, gated = layer.etp_group is not None, layer.activation.gated
    for i, e in enumerate(range(layer.experts.start, layer.experts.stop)):
        for ours, fc, what in (("w13", 1, "weight"), ("w2", 2, "weight"), ("b13", 1, "bias")):
            if ours in trained:
                whole = trained[ours][e]
                shard = shard_of(f"fc{fc}", whole, layer.etp_group, gated) if split else whole
                state[f"experts.linear_fc{fc}.{what}{i}"] = shard
        if "b2" in trained:
            state[f"experts.linear_fc2.bias{i}"] = trained["b2"][e]
    if "shared_expert.gate_up.weight" in trained:
        gate_up = trained["shared_expert.gate_up.weight"]
        down = trained["shared_expert.down.weight"]
        if layer.tp_group is not None:
            gate_up = shard_of("fc1", gate_up, layer.tp_group, gated)
            down = shard_of("fc2", down, layer.tp_group)
        state["shared_experts.linear_fc1.weight"] = gate_up
        state["shared_experts.linear_fc2.weight"] = down
        state["shared_experts.gate_weight"] = trained["shared_expert.sigmoid_gate.weight"]
    return state


def _check_initial_shards(layer, fields, where):
    """The split experts start as the shards of the one-rank layer's, drawn alike."""
    for init in ("megatron", "moeblaze"):
        plain = {} if init == "megatron" else dict(init_method=None, output_layer_init_method=None)
        torch.manual_seed(11)
        split = mb().MoELayer(_config("biases", **fields, **plain))
        torch.manual_seed(11)
        whole = mb().MoELayer(_config("biases", **plain))
        for name, fc in (("w13", "fc1"), ("w2", "fc2"), ("b13", "fc1"), ("b2", None)):
            for local, e in enumerate(range(split.experts.start, split.experts.stop)):
                want = getattr(whole, name)[e]
                want = want if fc is None else shard_of(fc, want, split.etp_group)
                got = getattr(split, name)[local]
                assert torch.equal(got, want), f"{where}: {init} {name}[{e}]"


def mb():
    from moeblaze.integrations import megatron

    return megatron


def _check_checkpoint(layer, trained, where):
    """The layer's `sharded_state_dict` (megatron-core distributed checkpointing): the main
    replicas of all ranks tile each whole tensor exactly once, and their pieces are the
    one-rank layer's (w13, b13 and the shared gate_up of a GLU stored with their 2F axis as (2, F));
    a factory's tensor comes back from what it builds."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, is_main_replica

    pieces = []
    for key, item in layer.sharded_state_dict(prefix="mlp.").items():
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            assert torch.equal(item.merge_fn(built.data), item.data), f"{where}: {key} merge"
            item = built
        if is_main_replica(item.replica_id):
            offset = item.global_offset
            pieces.append((key, item.global_shape, offset, item.data.detach().clone()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, pieces)
    wholes, covered = {}, {}
    for key, shape, offset, data in (piece for rank in everyone for piece in rank):
        whole = wholes.setdefault(key, torch.zeros(shape))
        count = covered.setdefault(key, torch.zeros(shape, dtype=torch.int64))
        where_in = tuple(slice(o, o + n) for o, n in zip(offset, data.shape, strict=True))
        whole[where_in] = data
        count[where_in] += 1
    assert wholes.keys() == {f"mlp.{name}" for name in trained}, where
    for name, want in trained.items():
        key = f"mlp.{name}"
        assert (covered[key] == 1).all(), f"{where}: {key} not tiled once by the main replicas"
        assert torch.equal(wholes[key].flatten(), want.flatten()), f"{where}: {key}"
        glu = layer.activation.gated and name in ("w13", "b13", "shared_expert.gate_up.weight")
        assert wholes[key].dim() == want.dim() + glu, f"{where}: {key} shape"


@contextlib.contextmanager
def _rows_sent(columns: int):
    """Records the rows of `columns` columns that this rank sends by all-to-all in the body, in
    order."""
    sent = []
    all_to_all_single = dist.all_to_all_single

    def recording(output, rows, *args, **kwargs):
        if rows.dim() == 2 and rows.shape[1] == columns:
            sent.append(rows.shape[0])
        return all_to_all_single(output, rows, *args, **kwargs)

    dist.all_to_all_single = recording
    try:
        yield sent
    finally:
        dist.all_to_all_single = all_to_all_single


def _check_run(config, rank, trained, x, dout, expected):
    from megatron.core import parallel_state

    name, (sizes, fields, model) = config
    trained, expected = trained[model], expected[model]
    parallel_state.initialize_model_parallel(**sizes)
    try:
        where = f"{name}, rank {rank}"
        torch.manual_seed(5)
        layer = mb().MoELayer(_config(model, **fields))
        if layer.tp_group is not None and layer.shared_expert is not None:
            shards = [torch.empty_like(layer.shared_expert.gate_up.weight) for _ in range(2)]
            dist.all_gather(shards, layer.shared_expert.gate_up.weight.detach())
            assert not torch.equal(shards[0], shards[1]), f"{where}: equal shared-expert shards"
        if layer.etp_group is not None:
            _check_initial_shards(layer, fields, where)
        layer.load_megatron_state_dict(_rank_state(trained, layer))
        world = dist.get_world_size()
        mine = slice(rank * S // world, (rank + 1) * S // world)  # its shard of the sequence
        leaf = x[mine].clone().requires_grad_()
        with _rows_sent(layer.expert_hidden_size) as sent:
            out, _ = layer(leaf, padding_mask=PADDING[:, mine])
        if layer.group is not None:  # the dispatch sends each real token's k rows, no more
            assert sent[0] == int((~PADDING[:, mine]).sum()) * K, f"{where}: rows sent {sent}"
        out.backward(dout[mine])
        assert_close(out, expected["out"][mine], rtol=RTOL, name=f"{where}: out")
        assert_close(leaf.grad, expected["x"][mine], rtol=RTOL, name=f"{where}: dx")
        routing = layer.last_router_output
        for loss in LOSSES:  # this rank's share; the shares sum to the batch's loss
            share = getattr(routing, loss).clone().float()
            dist.all_reduce(share)
            assert_close(share, expected[loss].float(), rtol=RTOL, name=f"{where}: {loss}")
        tp, split = layer.tp_group is not None, layer.etp_group is not None
        gated = layer.activation.gated
        for pname, p in layer.named_parameters():
            want = expected[pname]
            expert = pname in ("w13", "w2", "b13", "b2")
            if expert:
                want = want[layer.experts]
                assert getattr(p, "allreduce", True) is not (tp or layer.group is not None), pname
            if split and pname in ("w13", "b13", "w2"):  # this rank's shards, complete
                grad, want = p.grad, expert_shard(pname, want, layer.etp_group, gated)
            elif tp and pname == "shared_expert.gate_up.weight":  # this rank's shard, complete
                grad, want = p.grad, shard_of("fc1", want, layer.tp_group, gated)
            elif tp and pname == "shared_expert.down.weight":
                grad, want = p.grad, shard_of("fc2", want, layer.tp_group)
            elif expert and (layer.group is not None or split):  # sharded experts: complete here
                grad = p.grad
            else:  # replicated over ranks with their own tokens: summed by the training loop
                grad = p.grad.clone()
                dist.all_reduce(grad)
                if tp and not expert:
                    assert getattr(p, "sequence_parallel", False), f"{where}: {pname} unmarked"
            assert_close(grad, want, rtol=RTOL, name=f"{where}: grad {pname}")
        _check_checkpoint(layer, trained, where)
    finally:
        parallel_state.destroy_model_parallel()


def _worker(rank, world, init_method, trained, x, dout, expected):
    with gloo_rank(rank, world, init_method, timeout_s=60):
        torch.set_num_threads(1)
        for config in (CONFIGS if world == W else CONFIGS_2W).items():
            _check_run(config, rank, trained, x, dout, expected)


def test_megatron_layer_under_tensor_sequence_and_context_parallelism(tmp_path):
    """Tensor + sequence parallelism (the shared expert split through overlap's TP linears;
    the experts whole or split over the TP ranks), context parallelism, and both with expert
    parallelism: out, dx, losses and gradients are the one-rank layer's on the whole batch."""
    pytest.importorskip("megatron.core")
    if dist.is_initialized():
        pytest.fail("a torch.distributed group is initialised in the test process")
    x, dout = randn(S, BATCH, D, seed=8), randn(S, BATCH, D, seed=9)  # [s, b, h]
    trained, expected = {}, {}
    for model in MODELS:
        torch.manual_seed(5)
        layer = mb().MoELayer(_config(model)).train()
        if layer.b13 is not None:  # Megatron starts them at zero
            biases = [layer.b13, layer.b2, layer.router.bias]
            if layer.fc1_latent_proj is not None:
                biases += [layer.fc1_latent_proj.bias, layer.fc2_latent_proj.bias]
            with torch.no_grad():
                for seed, p in enumerate(biases):
                    p.copy_(randn(*p.shape, seed=20 + seed))
        trained[model] = {n: p.detach().clone() for n, p in layer.named_parameters()}
        leaf = x.clone().requires_grad_()
        out, _ = layer(leaf, padding_mask=PADDING)
        out.backward(dout)
        routing = layer.last_router_output
        expected[model] = {
            "out": out.detach(),
            "x": leaf.grad,
            **{loss: getattr(routing, loss) for loss in LOSSES},
            **{n: p.grad for n, p in layer.named_parameters()},
        }
    for world in (W, 2 * W):
        mp.start_processes(
            _worker,
            args=(world, f"file://{tmp_path / f'store{world}'}", trained, x, dout, expected),
            nprocs=world,
            start_method="spawn",
        )
