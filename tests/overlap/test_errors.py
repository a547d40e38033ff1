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
        (dict(chunk_m=0), "chunk_m=0 must be >= 1"),
        (dict(timeout_s=0), "timeout_s must be > 0"),
        (dict(free_sms=-1), "free_sms=-1 must be >= 0"),
        (dict(fused_min_flops=-1.0), "fused_min_flops=-1.0 must be >= 0"),
        (dict(min_overlap_flops=float("nan")), "min_overlap_flops=nan must be >= 0 and finite"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlap.OverlapConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_m=2.5), "chunk_m must be an int, got float 2.5"),
        (dict(free_sms="x"), "free_sms must be an int, got str 'x'"),
        (dict(timeout_s="10"), "timeout_s must be a number, got str"),
        (dict(sync_status="no"), "sync_status must be a bool, got str 'no'"),
        (dict(tile="big"), "tile must be None or a GemmConfig, got str"),
    ],
)
def test_config_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        overlap.OverlapConfig(**kwargs)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((48, 32, 32), {}, ValueError, "block_m=48 must be a power of two"),
        ((32, 0, 32), {}, ValueError, "block_n=0 must be >= 16"),
        ((32, 32, 8), {}, ValueError, "block_k=8 must be >= 16"),
        ((16.0, 32, 32), {}, TypeError, "block_m must be an int, got float 16.0"),
        ((32, 32, 32), dict(num_warps=6), ValueError, "num_warps=6 must be a power of two"),
        ((32, 32, 32), dict(num_stages=0), ValueError, "num_stages=0 must be >= 1"),
        ((32, 32, 32), dict(tma="no"), TypeError, "tma must be a bool, got str"),
    ],
)
def test_bad_tile_config(args, kwargs, error, match):
    # Named here, not by Triton's "Shape element 0 must be a power of 2" at the first launch.
    with pytest.raises(error, match=match):
        overlap.GemmConfig(*args, **kwargs)


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


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 32), {}, ValueError, "in_features=0 must be >= 1"),
        ((16, -2), {}, ValueError, "out_features=-2 must be >= 1"),
        ((16.0, 32), {}, TypeError, "in_features must be an int, got float 16.0"),
        ((16, 32), dict(bias="yes"), TypeError, "bias must be a bool, got str 'yes'"),
        ((16, 32), dict(dtype=torch.float64), TypeError, "dtype must be None, torch.float16"),
    ],
)
def test_bad_layer_arguments(args, kwargs, error, match):
    world = overlap.LocalWorld(2, DEVICE, mode="serial")
    with pytest.raises(error, match=match):
        overlap.ColumnParallelLinear(*args, world, **kwargs)


def test_layer_input_dtype_and_device_errors_name_the_layer():
    # Not the op's arguments (a_shard, b), which the user never passed.
    world = overlap.LocalWorld(2, DEVICE, mode="serial")
    for cls in (overlap.ColumnParallelLinear, overlap.RowParallelLinear):
        layer = cls(16, 16, world)
        width = 16 if cls is overlap.ColumnParallelLinear else 8
        with pytest.raises(
            TypeError,
            match=rf"{cls.__name__} has torch.float32 weights .* got x of dtype torch.bfloat16",
        ):
            layer(randn(2, 4, 1, width, device=DEVICE).bfloat16())
        with pytest.raises(ValueError, match=rf"{cls.__name__}'s weights are on .* got x on meta"):
            layer(torch.empty(2, 4, 1, width, device="meta"))


def test_parallel_mlp_activation_must_be_callable():
    world = overlap.LocalWorld(2, DEVICE, mode="serial")
    with pytest.raises(TypeError, match="activation must be None .* got str 'gelu'"):
        overlap.ParallelMLP(16, 32, world, activation="gelu")


def test_region_inputs_are_checked_against_the_world():
    # A LocalWorld's region helpers sum or copy over the leading rank dim: one of another size
    # was summed as if it held the ranks.
    world = overlap.LocalWorld(2, DEVICE, mode="serial")
    for region in (
        overlap.reduce_from_tensor_parallel_region,
        overlap.copy_to_tensor_parallel_region,
    ):
        with pytest.raises(ValueError, match=r"leading rank dim of the world size 2 .* \(3, 4\)"):
            region(torch.ones(3, 4, device=DEVICE), world)
        with pytest.raises(ValueError, match=r"at least 2-D\), got shape \(2,\)"):
            region(torch.ones(2, device=DEVICE), world)
        with pytest.raises(ValueError, match=r"x is on meta, but the world's ranks are on"):
            region(torch.ones(2, 4, device="meta"), world)
        with pytest.raises(TypeError, match="world must be an overlap world"):
            region(torch.ones(2, 4, device=DEVICE), "w")
    summed = overlap.reduce_from_tensor_parallel_region(torch.ones(2, 3, device=DEVICE), world)
    assert torch.equal(summed, torch.full((2, 3), 2.0, device=DEVICE))


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
