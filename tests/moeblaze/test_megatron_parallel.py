"""The Megatron-style layer under tensor, sequence and context parallelism, over 2 gloo processes,
against the one-rank layer with the same weights.

# s sequence, b batch, h hidden, W = 2 ranks

Each configuration gives every rank its shard of the batch's sequence (`[s/W, b, h]`, sequence
parallel or context parallel) and checks, against the one-rank layer on the whole batch: the
output and dx of its rows; the losses, whose shares sum over the ranks to the whole batch's; and
the gradients, reduced as Megatron's training loop reduces them (the replicated router summed
over the ranks: DDP over the context-parallel ranks, `finalize_model_grads` over the
tensor-parallel ones for parameters marked `sequence_parallel`; whole experts summed over the
expert-data-parallel group, which `allreduce = False` selects; the shared expert's shards
complete on each rank). Each rank loads its own Megatron state dict, the shared expert's shards
included.

The workers are spawned: forked from a process that has run megatron-core's parallel_state
(test_megatron, in the same pytest worker), their initialize_model_parallel hangs.
"""

import functools
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from overlap_testing import gloo_rank, randn
from tolerance import assert_close

S, BATCH, D, FFN, E, K, SHARED = 8, 2, 16, 8, 4, 2, 12
W = 2
RTOL = 1e-5  # float32 against float32: the same kernels, sums in another order
LOSSES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss")


def _config(**fields):
    """A megatron-core TransformerConfig look-alike: every balancing loss, a gated shared
    expert, Megatron's init methods."""
    return types.SimpleNamespace(
        hidden_size=D,
        num_moe_experts=E,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=K,
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss", "global_aux_loss"],
        moe_aux_loss_coeff=[1e-1, 2e-1, 5e-2],
        moe_z_loss_coeff=1e-2,
        moe_shared_expert_intermediate_size=SHARED,
        moe_shared_expert_gate=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        init_method=functools.partial(torch.nn.init.normal_, std=0.02),
        output_layer_init_method=functools.partial(torch.nn.init.normal_, std=0.01),
        **fields,
    )


# (parallel_state.initialize_model_parallel's sizes, the config's fields) of each run.
CONFIGS = {
    "tensor_sequence_parallel": (
        dict(tensor_model_parallel_size=W, expert_tensor_parallel_size=1),
        dict(tensor_model_parallel_size=W, expert_tensor_parallel_size=1, sequence_parallel=True),
    ),
    "context_parallel": (dict(context_parallel_size=W), dict(context_parallel_size=W)),
    "tensor_sequence_and_expert_parallel": (
        dict(
            tensor_model_parallel_size=W,
            expert_tensor_parallel_size=1,
            expert_model_parallel_size=W,
        ),
        dict(
            tensor_model_parallel_size=W,
            expert_tensor_parallel_size=1,
            sequence_parallel=True,
            expert_model_parallel_size=W,
        ),
    ),
}


def _rank_state(trained, layer, rank: int) -> dict[str, torch.Tensor]:
    """This rank's Megatron state dict (TEGroupedMLP experts, local ones numbered from 0; under
    tensor parallelism the shared expert's shards: fc1 rows [gate_r; up_r], fc2 columns r)."""
    state = {"router.weight": trained["router.weight"]}
    for i, e in enumerate(range(layer.experts.start, layer.experts.stop)):
        state[f"experts.linear_fc1.weight{i}"] = trained["w13"][e]
        state[f"experts.linear_fc2.weight{i}"] = trained["w2"][e]
    gate_up, down = trained["shared_expert.gate_up.weight"], trained["shared_expert.down.weight"]
    if layer.tp_group is not None:
        gate, up = gate_up.chunk(2)
        gate_up = torch.cat([gate.chunk(W)[rank], up.chunk(W)[rank]])
        down = down.chunk(W, dim=1)[rank]
    state["shared_experts.linear_fc1.weight"] = gate_up
    state["shared_experts.linear_fc2.weight"] = down
    state["shared_experts.gate_weight"] = trained["shared_expert.sigmoid_gate.weight"]
    return state


def _check_run(name, rank, trained, x, dout, expected):
    from megatron.core import parallel_state

    from moeblaze.integrations import megatron as mb

    sizes, fields = CONFIGS[name]
    parallel_state.initialize_model_parallel(**sizes)
    try:
        where = f"{name}, rank {rank}"
        torch.manual_seed(5)
        layer = mb.MoELayer(_config(**fields))
        if layer.tp_group is not None:  # ranks seeded alike draw distinct shards
            shards = [torch.empty_like(layer.shared_expert.gate_up.weight) for _ in range(W)]
            dist.all_gather(shards, layer.shared_expert.gate_up.weight.detach())
            assert not torch.equal(shards[0], shards[1]), f"{where}: equal shared-expert shards"
        layer.load_megatron_state_dict(_rank_state(trained, layer, rank))
        mine = slice(rank * S // W, (rank + 1) * S // W)  # this rank's shard of the sequence
        leaf = x[mine].clone().requires_grad_()
        out, _ = layer(leaf)
        out.backward(dout[mine])
        assert_close(out, expected["out"][mine], rtol=RTOL, name=f"{where}: out")
        assert_close(leaf.grad, expected["x"][mine], rtol=RTOL, name=f"{where}: dx")
        routing = layer.last_router_output
        for loss in LOSSES:  # this rank's share; the shares sum to the batch's loss
            share = getattr(routing, loss).clone().float()
            dist.all_reduce(share)
            assert_close(share, expected[loss].float(), rtol=RTOL, name=f"{where}: {loss}")
        tp = layer.tp_group is not None
        for pname, p in layer.named_parameters():
            want = expected[pname]
            expert = pname in ("w13", "w2")
            if expert:
                want = want[layer.experts]
                assert getattr(p, "allreduce", True) is not (tp or layer.group is not None), pname
            if tp and pname == "shared_expert.gate_up.weight":  # this rank's shard, complete
                gate, up = want.chunk(2)
                grad, want = p.grad, torch.cat([gate.chunk(W)[rank], up.chunk(W)[rank]])
            elif tp and pname == "shared_expert.down.weight":
                grad, want = p.grad, want.chunk(W, dim=1)[rank]
            elif expert and layer.group is not None:  # sharded experts: complete here
                grad = p.grad
            else:  # replicated over ranks with their own tokens: summed by the training loop
                grad = p.grad.clone()
                dist.all_reduce(grad)
                if tp and not expert:
                    assert getattr(p, "sequence_parallel", False), f"{where}: {pname} unmarked"
            assert_close(grad, want, rtol=RTOL, name=f"{where}: grad {pname}")
    finally:
        parallel_state.destroy_model_parallel()


def _worker(rank, init_method, trained, x, dout, expected):
    with gloo_rank(rank, W, init_method, timeout_s=60):
        torch.set_num_threads(1)
        for name in CONFIGS:
            _check_run(name, rank, trained, x, dout, expected)


def test_megatron_layer_under_tensor_sequence_and_context_parallelism(tmp_path):
    """Tensor + sequence parallelism (the shared expert split through overlap's TP linears),
    context parallelism, and both with expert parallelism: out, dx, losses and gradients are
    the one-rank layer's on the whole batch."""
    pytest.importorskip("megatron.core")
    from moeblaze.integrations import megatron as mb

    if dist.is_initialized():
        pytest.fail("a torch.distributed group is initialised in the test process")
    torch.manual_seed(5)
    layer = mb.MoELayer(_config()).train()
    trained = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x, dout = randn(S, BATCH, D, seed=8), randn(S, BATCH, D, seed=9)  # [s, b, h]
    leaf = x.clone().requires_grad_()
    out, _ = layer(leaf)
    out.backward(dout)
    routing = layer.last_router_output
    expected = {
        "out": out.detach(),
        "x": leaf.grad,
        **{loss: getattr(routing, loss) for loss in LOSSES},
        **{n: p.grad for n, p in layer.named_parameters()},
    }
    mp.start_processes(
        _worker,
        args=(f"file://{tmp_path / 'store'}", trained, x, dout, expected),
        nprocs=W,
        start_method="spawn",
    )
