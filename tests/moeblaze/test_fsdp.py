"""moeblaze.MoELayer under PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), as torchtitan
wraps its blocks: 2 gloo processes, parameters sharded over both, the router in a group of its
own, the layer under activation checkpointing (non-reentrant); and ExpertParallelMoELayer over
the same ranks with FSDP2 on its replicated parts. Each rank's output and input gradient must
equal the single-process layer's on that rank's tokens, and the gathered parameter gradients the
mean over the ranks of the single-process gradients, the balancing and z losses included (each
rank's, as data parallelism averages them); a rank's experts, the sum (expert parallelism).

The workers are forked (see test_expert_parallel): the parent's imports, warm Triton interpreter
and NaN-poisoned allocations carry over.
"""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from overlap_testing import gloo_rank, randn
from tolerance import assert_close
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

import moeblaze
from moeblaze.expert_parallel import ExpertParallelMoELayer

D, FFN, E, K, SHARED, W = 16, 8, 4, 2, 12, 2
TOKENS = (2, 3)  # [B, L] tokens of each rank
RTOL = 1e-5  # float32 against float32: the same kernels, gradients reduced in another order
OPTIONS = dict(
    shared_expert_size=SHARED,
    score_func="sigmoid",
    expert_bias=True,
    aux_loss_coeff=1e-1,
    seq_aux_loss_coeff=1e-1,
    z_loss_coeff=1e-2,
)


def _worker(rank, init_method, layer, xs, douts, expected, expert_parallel):
    with gloo_rank(rank, W, init_method, timeout_s=60):
        from torch.distributed.fsdp import fully_shard

        torch.set_num_threads(1)
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (W,))
        if expert_parallel:  # experts sharded by rank, the rest by FSDP2
            model = ExpertParallelMoELayer.from_moe_layer(layer)
            fully_shard(model.router, mesh=mesh)
            fully_shard(model.shared_expert, mesh=mesh)
        else:
            model = copy.deepcopy(layer)
            fully_shard(model.router, mesh=mesh)
            fully_shard(model, mesh=mesh)
        x = xs[rank].clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = checkpoint(model, x, use_reentrant=False)
            out.backward(douts[rank])
        views = [str(w.message) for w in caught if "returned a view" in str(w.message)]
        assert not views, views[0]  # the layer's output is not a view of another tensor
        assert_close(out.detach(), expected["out"][rank], rtol=RTOL, name=f"rank {rank} out")
        assert_close(x.grad, expected["dx"][rank], rtol=RTOL, name=f"rank {rank} dx")
        experts = slice(rank * E // W, (rank + 1) * E // W)
        for name, p in model.named_parameters():
            if expert_parallel and name in ("w13", "w2"):  # this rank's experts, every token's
                assert not isinstance(p, DTensor)
                grad, want = p.grad, expected[name][experts]
            else:
                assert isinstance(p, DTensor), f"{name} is not sharded"
                grad = p.grad.full_tensor()  # gathered from both ranks
                want = expected[name] / W  # FSDP averages the ranks' gradients
            assert_close(grad, want, rtol=RTOL, name=f"rank {rank} {name}.grad")
        counts = model.router.tokens_per_expert_accum  # a buffer: each rank counts its tokens
        assert torch.equal(counts, expected["counts"][rank])


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["fsdp", "ep+fsdp"])
def test_moe_layer_under_fully_shard_and_checkpointing(expert_parallel, tmp_path):
    """FSDP2 over the whole layer; or expert parallelism over the same ranks, with the router
    and the shared expert (replicated otherwise) sharded by FSDP2, as torchtitan combines them:
    then each rank's experts get the gradient of every rank's tokens."""
    if dist.is_initialized():
        pytest.fail("a torch.distributed group is initialised in the test process")
    torch.manual_seed(0)
    layer = moeblaze.MoELayer(D, FFN, E, K, **OPTIONS)
    xs = [randn(*TOKENS, D, seed=1 + r) for r in range(W)]
    douts = [randn(*TOKENS, D, seed=3 + r) for r in range(W)]
    reference = copy.deepcopy(layer)
    expected = {"out": [], "dx": [], "counts": []}
    for x, dout in zip(xs, douts, strict=True):  # one data-parallel rank after another
        x = x.clone().requires_grad_()
        out = reference(x)
        out.backward(dout)
        expected["out"].append(out.detach())
        expected["dx"].append(x.grad)
        accum = reference.router.tokens_per_expert_accum
        expected["counts"].append(accum - sum(expected["counts"], torch.zeros_like(accum)))
    for name, p in reference.named_parameters():
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient: the test would not see it"
        expected[name] = p.grad  # summed over the ranks' tokens
    init_method = f"file://{tmp_path / 'store'}"
    mp.start_processes(
        _worker,
        args=(init_method, layer, xs, douts, expected, expert_parallel),
        nprocs=W,
        start_method="fork",
    )
