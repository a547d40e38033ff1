"""Tensor-parallel linears on a LocalWorld against the dense layers they shard.

# W ranks, s sequence, b batch, h hidden, f ffn; activations sequence-first [s, b, h]
"""

import pytest
import torch
from overlap_testing import RTOL, randn
from tolerance import assert_close

import overlap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = RTOL[torch.float32]


def _world(W, mode):
    return overlap.LocalWorld(W, DEVICE, mode=mode, config=overlap.OverlapConfig(chunk_m=5))


def _full_column(layer):
    """The dense [f, h] weight and [f] bias a ColumnParallelLinear (LocalWorld) shards."""
    return layer.weight.reshape(-1, layer.in_features), layer.bias.reshape(-1)


def _full_row(layer):
    """The dense [f, h] weight a RowParallelLinear (LocalWorld) shards by columns."""
    return torch.cat(list(layer.weight), dim=1), layer.bias


@pytest.mark.parametrize("mode", ["fused", "serial"])
@pytest.mark.parametrize("W", [2, 3])
def test_column_parallel_sequence_parallel(W, mode):
    s, b, h, f = 4 * W, 2, 16, 6 * W
    layer = overlap.ColumnParallelLinear(
        h, f, _world(W, mode), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        layer.bias.copy_(randn(*layer.bias.shape, seed=1))
    x = randn(W, s // W, b, h, seed=2, device=DEVICE).requires_grad_()  # sequence shards
    y, out_bias = layer(x)  # [W, s, b, f/W]
    assert out_bias is None and y.shape == (W, s, b, f // W)
    assert y._base is None  # not a view: FSDP2 warns about a module returning one
    weight, bias = _full_column(layer)
    x_full = x.detach().reshape(s, b, h).double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y_full = torch.nn.functional.linear(x_full, w64, b64)  # [s, b, f]
    expected = torch.stack(y_full.chunk(W, dim=-1))  # rank r holds columns r*f/W.. of all rows
    assert_close(y, expected, rtol=TOL, name="y")
    dy = randn(*y.shape, seed=3, device=DEVICE)
    y.backward(dy)
    expected.backward(dy.double())
    assert_close(x.grad, x_full.grad.reshape(W, s // W, b, h), rtol=TOL, name="grad x")
    assert_close(layer.weight.grad.reshape(f, h), w64.grad, rtol=TOL, name="grad weight")
    assert_close(layer.bias.grad.reshape(f), b64.grad, rtol=TOL, name="grad bias")


@pytest.mark.parametrize("mode", ["fused", "serial"])
@pytest.mark.parametrize("W", [2, 3])
def test_row_parallel_sequence_parallel(W, mode):
    s, b, h, f = 4 * W, 2, 6 * W, 16
    layer = overlap.RowParallelLinear(
        h, f, _world(W, mode), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        layer.bias.copy_(randn(f, seed=1))
    x = randn(W, s, b, h // W, seed=2, device=DEVICE).requires_grad_()  # feature shards
    y, _ = layer(x)  # [W, s/W, b, f]
    assert y._base is None
    weight, bias = _full_row(layer)
    x_full = torch.cat(list(x.detach()), dim=-1).double().requires_grad_()  # [s, b, h]
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y_full = torch.nn.functional.linear(x_full, w64, b64)
    expected = y_full.reshape(W, s // W, b, f)  # rank r holds rows r*s/W..
    assert_close(y, expected, rtol=TOL, name="y")
    dy = randn(*y.shape, seed=3, device=DEVICE)
    y.backward(dy)
    expected.backward(dy.double())
    assert_close(x.grad, torch.stack(x_full.grad.chunk(W, dim=-1)), rtol=TOL, name="grad x")
    assert_close(torch.cat(list(layer.weight.grad), dim=1), w64.grad, rtol=TOL, name="grad weight")
    assert_close(layer.bias.grad, b64.grad, rtol=TOL, name="grad bias")


def _dense_mlp(mlp):
    w1, b1 = _full_column(mlp.up)
    w2, b2 = _full_row(mlp.down)
    return [t.detach().double().requires_grad_() for t in (w1, b1, w2, b2)]


@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no-sp"])
def test_parallel_mlp_matches_the_dense_mlp(sequence_parallel):
    W, s, b, h, f = 3, 6, 2, 16, 24
    world = _world(W, "fused")
    mlp = overlap.parallel_mlp(
        h, f, world, sequence_parallel=sequence_parallel, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        for p in (mlp.up.bias, mlp.down.bias):
            p.copy_(randn(*p.shape, seed=p.numel()))
    x_full = randn(s, b, h, seed=4, device=DEVICE)
    if sequence_parallel:
        x = x_full.reshape(W, s // W, b, h).clone().requires_grad_()  # [W, s/W, b, h]
    else:
        x = x_full.expand(W, s, b, h).clone().requires_grad_()  # replicated on every rank
    y = mlp(x)
    w1, b1, w2, b2 = _dense_mlp(mlp)
    x64 = x_full.double().requires_grad_()
    y64 = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x64, w1, b1)), w2, b2
    )
    if sequence_parallel:
        assert_close(y, y64.reshape(W, s // W, b, h), rtol=TOL, name="y")
        loss, loss64 = (y * y).sum(), (y64 * y64).sum()
    else:
        assert_close(y, y64.expand(W, s, b, h), rtol=TOL, name="y (replicated)")
        loss, loss64 = (y * y).mean(0).sum(), (y64 * y64).sum()  # one loss from the replicas
    loss.backward()
    loss64.backward()
    dx = x.grad.reshape(s, b, h) if sequence_parallel else x.grad.sum(0)
    assert_close(dx, x64.grad, rtol=TOL, name="grad x")
    assert_close(mlp.up.weight.grad.reshape(f, h), w1.grad, rtol=TOL, name="grad up.weight")
    assert_close(mlp.up.bias.grad.reshape(f), b1.grad, rtol=TOL, name="grad up.bias")
    assert_close(
        torch.cat(list(mlp.down.weight.grad), dim=1), w2.grad, rtol=TOL, name="grad down.weight"
    )
    assert_close(mlp.down.bias.grad, b2.grad, rtol=TOL, name="grad down.bias")


def test_skip_bias_add_returns_the_bias():
    world = _world(2, "serial")
    layer = overlap.ColumnParallelLinear(8, 4, world, skip_bias_add=True)
    y, bias = layer(randn(2, 3, 1, 8, device=DEVICE))
    assert bias is layer.bias and y.shape == (2, 6, 1, 2)
    no_bias = overlap.RowParallelLinear(4, 8, world, bias=False)
    y, bias = no_bias(randn(2, 6, 1, 2, device=DEVICE))
    assert bias is None and no_bias.bias is None and y.shape == (2, 3, 1, 8)


@pytest.mark.parametrize("bias", ["bias", "skip_bias_add", "no-bias"])
@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no-sp"])
@pytest.mark.parametrize("layer_type", [overlap.ColumnParallelLinear, overlap.RowParallelLinear])
def test_outputs_are_not_views(layer_type, sequence_parallel, bias):
    """No output is a view of another tensor (as nn.Linear's on 3-D input), in any bias mode
    and with or without sequence parallelism: FSDP2 warns about a wrapped module returning a
    view, since an in-place op on it would drop the module's pre-backward hook."""
    W, s, b, n = 2, 4, 3, 8
    layer = layer_type(
        n,
        n,
        _world(W, "serial"),
        sequence_parallel=sequence_parallel,
        bias=bias != "no-bias",
        skip_bias_add=bias == "skip_bias_add",
    )
    rows = s // W if sequence_parallel and layer_type is overlap.ColumnParallelLinear else s
    features = n if layer_type is overlap.ColumnParallelLinear else n // W
    x = randn(W, rows, b, features, device=DEVICE).requires_grad_()
    y, _ = layer(x)
    assert y.dim() == 4 and y._base is None
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_layers_equal_the_dense_linear_they_shard_at_init():
    world = _world(2, "serial")
    col = overlap.ColumnParallelLinear(8, 6, world, generator=torch.Generator().manual_seed(5))
    dense = torch.empty(6, 8)
    bound = 1 / 8**0.5
    dense.uniform_(-bound, bound, generator=torch.Generator().manual_seed(5))
    assert torch.equal(_full_column(col)[0].cpu(), dense)
