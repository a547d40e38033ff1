"""Bad input gets a clear error naming the argument."""

import re

import pytest
import torch
from overlap_testing import randn

import overlap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def world():
    return overlap.LocalWorld(2, DEVICE, mode="serial")


def _ag_args():
    return randn(2, 4, 8, device=DEVICE), randn(2, 8, 6, device=DEVICE)


def _rs_args():
    return randn(2, 6, 8, device=DEVICE), randn(2, 8, 6, device=DEVICE)


@pytest.mark.parametrize(
    "op, args, error, match",
    [
        (
            "ag",
            lambda a, b: (a.double(), b.double()),
            TypeError,
            r"a_shard must be float16, bfloat16 or float32.*float64",
        ),
        (
            "ag",
            lambda a, b: (a, b.half()),
            TypeError,
            r"b has dtype torch.float16; expected a_shard's dtype torch.float32",
        ),
        (
            "ag",
            lambda a, b: (a.tolist(), b),
            TypeError,
            r"a_shard must be a torch.Tensor, got list",
        ),
        ("ag", lambda a, b: (a, b.to("meta")), ValueError, r"b is on meta"),
        ("ag", lambda a, b: (a[0], b), ValueError, r"a_shard must be \[W, rows, cols\].*\(4, 8\)"),
        (
            "ag",
            lambda a, b: (torch.cat([a, a]), b),
            ValueError,
            r"a_shard has 4 ranks in its leading dim; the world has 2",
        ),
        (
            "ag",
            lambda a, b: (a, b[:, :5]),
            ValueError,
            r"b must have 8 rows \(a_shard's last dim\)",
        ),
        (
            "rs",
            lambda a, b: (a[:, :5], b),
            ValueError,
            r"a has 5 rows, not divisible by the world size 2",
        ),
        (
            "rs",
            lambda a, b: (a, b.bfloat16()),
            TypeError,
            r"b has dtype torch.bfloat16; expected a's dtype",
        ),
        ("rs", lambda a, b: (a, b[:, :7]), ValueError, r"b must have 8 rows \(a's last dim\)"),
    ],
    ids=[
        "dtype",
        "dtype-mix",
        "not-tensor",
        "device",
        "no-rank-dim",
        "rank-count",
        "inner-dim",
        "M%W",
        "rs-dtype-mix",
        "rs-inner-dim",
    ],
)
def test_bad_tensors(world, op, args, error, match):
    fn, make = (
        (overlap.all_gather_matmul, _ag_args)
        if op == "ag"
        else (overlap.matmul_reduce_scatter, _rs_args)
    )
    with pytest.raises(error, match=match):
        fn(*args(*make()), world)


def test_world_must_be_a_world():
    with pytest.raises(TypeError, match="world must be an overlap world"):
        overlap.all_gather_matmul(*_ag_args(), 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(world_size=0), ValueError, "world_size must be a positive int, got 0"),
        (dict(world_size=2.0), ValueError, "world_size must be a positive int"),
        (dict(world_size=2, mode="ring"), ValueError, "mode must be None or one of 'serial'"),
        (dict(world_size=2, config={"chunk_m": 4}), TypeError, "config must be an OverlapConfig"),
    ],
)
def test_bad_world_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        overlap.LocalWorld(device=DEVICE, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_m=0), "chunk_m must be >= 1"),
        (dict(timeout_s=0), "timeout_s must be > 0"),
        (dict(free_sms=-1), "free_sms must be >= 0"),
        (dict(fused_min_flops=-1.0), "fused_min_flops must be >= 0"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlap.OverlapConfig(**kwargs)


def test_dist_world_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        overlap.DistWorld()


def test_a_dead_world_handle_is_reported():
    world = overlap.LocalWorld(2, DEVICE, mode="serial")
    handle = world.handle
    del world
    with pytest.raises(RuntimeError, match=f"no live overlap world has handle {handle}"):
        torch.ops.overlap.all_gather_matmul(*_ag_args(), handle)


def test_layer_sizes_must_split_evenly(world):
    with pytest.raises(ValueError, match="out_features=7 must be divisible by the world size 2"):
        overlap.ColumnParallelLinear(4, 7, world)
    with pytest.raises(ValueError, match="in_features=5 must be divisible by the world size 2"):
        overlap.RowParallelLinear(5, 4, world)
    row = overlap.RowParallelLinear(4, 4, world)
    with pytest.raises(
        ValueError, match="sequence length 3 .* must be divisible by the world size 2"
    ):
        row(randn(2, 3, 1, 2, device=DEVICE))


@pytest.mark.parametrize(
    "layer, shape, match",
    [
        (
            "column",
            (4, 2, 2, 17),
            r"ColumnParallelLinear\(in_features=16\) on 4 ranks takes x "
            r"whose last dim is in_features=16, got x of shape \(4, 2, 2, 17\)",
        ),
        (
            "column",
            (2, 2, 16),
            r"ColumnParallelLinear takes x of shape \[W, s, b, \.\.\., "
            r"in_features=16\] \(a LocalWorld of 4 ranks: a leading rank dim\), got \(2, 2, 16\)",
        ),
        (
            "row",
            (4, 8, 2, 16),
            r"RowParallelLinear\(in_features=16\) on 4 ranks takes x whose "
            r"last dim is in_features/W=4",
        ),
        ("row", (4, 8), r"RowParallelLinear takes x of shape \[W, s, b, \.\.\., in_features/W=4\]"),
    ],
)
def test_layer_input_errors_name_the_layer_and_its_features(layer, shape, match):
    world = overlap.LocalWorld(4, DEVICE, mode="serial")
    cls = overlap.ColumnParallelLinear if layer == "column" else overlap.RowParallelLinear
    with pytest.raises(ValueError, match=match):
        cls(16, 32, world)(randn(*shape, device=DEVICE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_local_world_on_cuda_without_cuda_says_why():
    with pytest.raises(ValueError, match=r"LocalWorld device cuda: unavailable: "):
        overlap.LocalWorld(4, "cuda")


def _facts(host="node0", device="cpu", interpreting=True, **cuda):
    return dict(host=host, device=device, interpreting=interpreting, **cuda)


@pytest.mark.parametrize(
    "facts, device, match",
    [
        ([_facts(), _facts(host="node1")], "cpu", r"spans several hosts \(node0, node1\)"),
        ([_facts(), _facts(interpreting=False)], "cpu", r"only under the Triton interpreter"),
        ([_facts(), _facts(device="cuda:0")], "cpu", r"devices are of different types"),
        (
            [_facts(device="cuda:0", symmetric_memory=False, index=0, peers={0: True})] * 2,
            "cuda",
            r"no torch.distributed._symmetric_memory",
        ),
        (
            [
                _facts(device="cuda:0", symmetric_memory=True, index=0, peers={0: True, 1: False}),
                _facts(device="cuda:1", symmetric_memory=True, index=1, peers={0: True, 1: True}),
            ],
            "cuda",
            r"GPU 0 has no peer access to GPU 1",
        ),
    ],
    ids=["hosts", "no-interpreter", "device-types", "no-symm-mem", "no-peer-access"],
)
def test_dist_world_fused_says_why_peer_memory_is_unavailable(facts, device, match):
    from overlap.peer_memory import _why_unavailable

    assert re.search(match, _why_unavailable(facts, torch.device(device)))


def test_peer_memory_works_for_one_host_and_for_gpus_with_peer_access():
    from overlap.peer_memory import _why_unavailable

    assert _why_unavailable([_facts(), _facts()], torch.device("cpu")) is None
    gpu = [
        _facts(device=f"cuda:{i}", symmetric_memory=True, index=i, peers={0: True, 1: True})
        for i in range(2)
    ]
    assert _why_unavailable(gpu, torch.device("cuda")) is None
    shared = [_facts(device="cuda:0", symmetric_memory=True, index=0, peers={0: True})] * 2
    assert _why_unavailable(shared, torch.device("cuda")) is None  # two ranks on one GPU


def test_peer_buffer_views_must_fit_and_be_aligned():
    from overlap.peer_memory import PeerBuffer

    buf = PeerBuffer(0, (torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)))
    assert buf.view(1, torch.float32, (4, 2), offset=32).shape == (4, 2)
    assert buf.addresses(8).tolist() == [b.data_ptr() + 8 for b in buf.buffers]
    with pytest.raises(ValueError, match=r"float32 view of shape \(4, 5\) at byte 0 does not fit"):
        buf.view(0, torch.float32, (4, 5))
    with pytest.raises(ValueError, match=r"at byte 2 does not fit an aligned place"):
        buf.view(0, torch.float32, (2,), offset=2)
