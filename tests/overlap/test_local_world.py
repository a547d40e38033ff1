"""The ops on a LocalWorld: every schedule against the float64 reference, forward and gradients.

# W ranks, m rows per rank shard, M = W*m, K / k inner, n / N columns
"""

import dataclasses
import time

import pytest
import torch
import triton
from overlap_testing import (
    RTOL,
    assert_matches_float64,
    assert_tiles_once,
    check_back_to_back_calls,
    drop_one_flag,
    randn,
)
from tolerance import assert_close

import overlap
from overlap import tuning
from overlap.fused import default_tile_config
from overlap.protocol import EPOCH_LIMIT, ChunkLayout, raise_flags
from overlap.reference import all_gather_matmul_ref, matmul_reduce_scatter_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32  # the interpreter truncates fp32 -> bf16, so CPU tests stay in fp32

# (W, m, K, n, chunk_m): odd W, m not a multiple of the chunk nor of BLOCK_M (16 on the CPU),
# chunks smaller and larger than BLOCK_M.
SHAPES = [
    pytest.param(1, 7, 16, 20, 4, id="W1"),
    pytest.param(2, 21, 16, 18, 5, id="W2-ch5<BM"),
    pytest.param(3, 13, 24, 17, 40, id="W3-ch>m"),
    pytest.param(3, 18, 16, 16, 24, id="W3-ch24>BM"),
    pytest.param(4, 9, 16, 24, 4, id="W4-ch4"),
]
MODES = ["fused", "pipelined", "serial"]
TILE = default_tile_config(torch.device(DEVICE))


def _world(W, mode, chunk_m, **config):
    cfg = overlap.OverlapConfig(chunk_m=chunk_m, count_tiles=mode == "fused", **config)
    return overlap.LocalWorld(W, DEVICE, mode=mode, config=cfg)


def _check_tiles_once(world, mode):
    if mode == "fused":
        assert_tiles_once(world)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("W, m, K, n, chunk_m", SHAPES)
def test_all_gather_matmul_forward_and_gradients(W, m, K, n, chunk_m, mode):
    world = _world(W, mode, chunk_m)
    a = randn(W, m, K, seed=1, device=DEVICE).requires_grad_()  # [W, m, K]
    b = randn(W, n, K, seed=2, device=DEVICE).mT.requires_grad_()  # [W, K, n], not contiguous
    c = overlap.all_gather_matmul(a, b, world)  # [W, W*m, n]
    _check_tiles_once(world, mode)
    dc = randn(*c.shape, seed=3, device=DEVICE)
    # grad_a: GEMM-RS of the same world; grad_b from the kept gathered input
    assert_matches_float64(c, a, b, all_gather_matmul_ref, dc, rtol=RTOL[DTYPE])
    _check_tiles_once(world, mode)  # the backward's


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("W, m, K, n, chunk_m", SHAPES)
def test_matmul_reduce_scatter_forward_and_gradients(W, m, K, n, chunk_m, mode):
    world = _world(W, mode, chunk_m)
    a = randn(W, W * m, K, seed=4, device=DEVICE).requires_grad_()  # [W, M, k]
    b = randn(W, K, n, seed=5, device=DEVICE).requires_grad_()  # [W, k, N]
    c = overlap.matmul_reduce_scatter(a, b, world)  # [W, m, N]
    _check_tiles_once(world, mode)
    dc = randn(*c.shape, seed=6, device=DEVICE)
    # grad_a: AG-GEMM with b^T; grad_b from the gathered dc
    assert_matches_float64(c, a, b, matmul_reduce_scatter_ref, dc, rtol=RTOL[DTYPE])


def test_auto_mode_runs_what_was_measured_to_win(monkeypatch):
    """mode=None: SERIAL below min_overlap_flops; above it FUSED from the measured threshold of
    this world, GPU and op (overlap.tuning) or OverlapConfig.fused_min_flops, else PIPELINED
    from its measured threshold, else the world's unmeasured_mode: SERIAL on a LocalWorld (its
    transfers are copies on the GPU that computes), PIPELINED with an emulated link."""
    small = overlap.LocalWorld(2, DEVICE)
    assert small.mode is None and small.mode_for(1e6) is overlap.Mode.SERIAL
    assert small.mode_for(1e12) is overlap.Mode.SERIAL  # nothing measured on this device
    eager = overlap.LocalWorld(
        2, DEVICE, config=overlap.OverlapConfig(min_overlap_flops=0, fused_min_flops=0)
    )
    assert eager.mode_for(1e6) is overlap.Mode.FUSED
    assert eager.mode_for(1e6, numel=0) is overlap.Mode.SERIAL  # empty problems never launch
    gpu = tuning.device_name(torch.device(DEVICE))
    monkeypatch.setitem(tuning.FUSED_FROM_FLOPS, ("LocalWorld", gpu, "all_gather_matmul"), 1e12)
    pipelined_from = ("LocalWorld", gpu, "matmul_reduce_scatter")
    monkeypatch.setitem(tuning.PIPELINED_FROM_FLOPS, pipelined_from, 5e11)
    assert small.mode_for(2e12, op="all_gather_matmul") is overlap.Mode.FUSED
    assert small.mode_for(5e11, op="all_gather_matmul") is overlap.Mode.SERIAL
    assert small.mode_for(2e12, op="matmul_reduce_scatter") is overlap.Mode.PIPELINED
    assert small.mode_for(2e11, op="matmul_reduce_scatter") is overlap.Mode.SERIAL
    linked = overlap.LocalWorld(2, DEVICE, link_gbps=450)  # the entries measured no link
    assert linked.mode_for(2e12, op="all_gather_matmul") is overlap.Mode.PIPELINED
    assert linked.mode_for(2e11, op="matmul_reduce_scatter") is overlap.Mode.PIPELINED
    a, b = randn(2, 5, 16, seed=7, device=DEVICE), randn(2, 16, 16, seed=8, device=DEVICE)
    for world in (small, eager):
        assert_close(
            overlap.all_gather_matmul(a, b, world),
            all_gather_matmul_ref(a, b),
            rtol=1e-6,
            name="result",
        )


def test_zero_rows_take_the_serial_path():
    world = _world(2, "fused", 4)
    a, b = torch.empty(2, 0, 16, device=DEVICE), randn(2, 16, 8, seed=9, device=DEVICE)
    assert overlap.all_gather_matmul(a, b, world).shape == (2, 0, 8)
    assert overlap.matmul_reduce_scatter(a, b, world).shape == (2, 0, 8)


def test_timeout_raises_naming_rank_and_chunk_then_the_world_recovers():
    W, m, chunk_m = 3, 12, 4
    cpr = triton.cdiv(m, chunk_m)
    world = _world(W, "fused", chunk_m, timeout_s=0.2)
    a, b = randn(W, m, 16, seed=10, device=DEVICE), randn(W, 16, 16, seed=11, device=DEVICE)
    overlap.all_gather_matmul(a, b, world)  # epoch 1 raises every flag
    drop_one_flag(world, rank=1, index=0 * cpr + 2)  # rank 1 never gets chunk 2 of rank 0
    # Epoch 2: the flag still holds epoch 1, which must not count as "arrived".
    start = time.perf_counter()
    with pytest.raises(
        overlap.OverlapTimeoutError, match=r"rank 1 .* chunk 2 \(rows 8\.\.12\) from rank 0"
    ) as info:
        overlap.all_gather_matmul(a, b, world)
    # 0.2 s of polls (~700 at the interpreter's rate), plus the GEMMs of the other tiles.
    assert time.perf_counter() - start < 10
    assert (info.value.rank, info.value.peer, info.value.chunk) == (1, 0, 2)
    world.fused.raise_flags = raise_flags
    assert_close(
        overlap.all_gather_matmul(a, b, world),
        all_gather_matmul_ref(a, b),
        rtol=1e-6,
        name="result",
    )


def test_epoch_wraparound_resets_the_flags():
    world = _world(2, "fused", 4)
    a, b = randn(2, 8, 16, seed=12, device=DEVICE), randn(2, 16, 16, seed=13, device=DEVICE)
    overlap.all_gather_matmul(a, b, world)
    overlap.matmul_reduce_scatter(a.repeat(1, 2, 1), b, world)
    world.fused.epoch = EPOCH_LIMIT - 1
    c = overlap.all_gather_matmul(a, b, world)
    assert world.fused.epoch == 1
    assert all(int(f.max()) == 1 for f in world.fused.ag_flags)
    assert_close(c, all_gather_matmul_ref(a, b), rtol=1e-6, name="result")


def test_back_to_back_calls_with_changing_shapes():
    """Fused calls of both ops with a new shape each, status checked once at the end (the CPU
    side of the GPU stress test: epochs, header slots and buffers reused across shapes)."""
    world = _world(3, "fused", 8, sync_status=False)
    check_back_to_back_calls(world, calls=6, small=(24, 64, 24), seed=14)


def test_ops_open_profiler_ranges():
    world = _world(2, "fused", 4)
    a = randn(2, 8, 16, seed=14, device=DEVICE).requires_grad_()
    b = randn(2, 16, 16, seed=15, device=DEVICE).requires_grad_()
    with torch.profiler.profile() as prof:
        overlap.all_gather_matmul(a, b, world).sum().backward()
    names = {event.name for event in prof.events()}
    for name in (
        "overlap.all_gather_matmul",
        "overlap.all_gather_matmul.fused",
        "overlap.ag.copy",
        "overlap.ag.gemm",
        "overlap.all_gather_matmul.backward",
        "overlap.matmul_reduce_scatter",
        "overlap.rs.gemm",
        "overlap.rs.reduce",
    ):
        assert name in names, name


def test_torch_compile_sees_the_ops_fullgraph():
    world = _world(2, "fused", 4)

    def step(x, w1, w2):
        h = overlap.all_gather_matmul(x, w1, world)  # [W, M, f]
        return overlap.matmul_reduce_scatter(torch.relu(h), w2, world)  # [W, m, h]

    x = randn(2, 8, 16, seed=16, device=DEVICE).requires_grad_()
    w1 = randn(2, 16, 16, seed=17, device=DEVICE).requires_grad_()
    w2 = randn(2, 16, 16, seed=18, device=DEVICE).requires_grad_()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y = compiled(x, w1, w2)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    y_eager = step(x, w1, w2)
    y_eager.square().sum().backward()
    assert_close(y, y_eager, rtol=1e-6, name="compiled forward")
    for g, t in zip(grads, (x, w1, w2), strict=True):
        assert_close(g, t.grad, rtol=1e-6, name="compiled gradient")


def test_opcheck():
    world = _world(2, "serial", 4)
    a, b = randn(2, 4, 8, seed=19, device=DEVICE), randn(2, 8, 8, seed=20, device=DEVICE)
    torch.library.opcheck(torch.ops.overlap.all_gather_matmul, (a, b, world.handle))
    torch.library.opcheck(torch.ops.overlap.matmul_reduce_scatter, (a, b, world.handle))


# The emulated link (overlap.link). Under the interpreter the GPU clock reads 0, so the clock
# words hold exactly the time each schedule charged its transfers. 16 fp32 columns = 64 bytes
# per row; at 0.5 GB/s (bytes per ns) a row takes 128 ns.
LINK_GBPS, ROW_NS = 0.5, 128


@pytest.mark.parametrize("mode", MODES)
def test_emulated_link_keeps_every_schedule_exact(mode):
    W, m, K, n, chunk_m = 3, 13, 16, 16, 5
    world = overlap.LocalWorld(
        W,
        DEVICE,
        mode=mode,
        config=overlap.OverlapConfig(chunk_m=chunk_m, count_tiles=mode == "fused"),
        link_gbps=LINK_GBPS,
    )
    assert repr(world).endswith("link_gbps=0.5)")
    for op, ref, a_shape in [
        (overlap.all_gather_matmul, all_gather_matmul_ref, (W, m, K)),
        (overlap.matmul_reduce_scatter, matmul_reduce_scatter_ref, (W, W * m, K)),
    ]:
        a = randn(*a_shape, seed=20, device=DEVICE).requires_grad_()
        b = randn(W, K, n, seed=21, device=DEVICE).requires_grad_()
        c = op(a, b, world)
        _check_tiles_once(world, mode)
        dc = randn(*c.shape, seed=22, device=DEVICE)
        what = f"{op.__name__} with a link: "
        assert_matches_float64(c, a, b, ref, dc, rtol=RTOL[DTYPE], what=what)


@pytest.mark.parametrize("mode", MODES)
def test_emulated_link_charges_each_schedule_its_bytes(mode):
    """RS: every rank sends (W-1)*m rows to its peers; the serial and fused schedules queue them
    on the rank's link, the pipelined one (all ranks' GEMMs of a chunk at once) on one link.
    The fused producer records each chunk's arrival: rank s's chunks for its peers form a queue
    on its link, with nothing for its own rows. AG: each rank's link takes its origin."""
    W, m, K, chunk_m = 3, 13, 16, 5
    world = overlap.LocalWorld(
        W,
        DEVICE,
        mode=mode,
        config=overlap.OverlapConfig(chunk_m=chunk_m),
        link_gbps=LINK_GBPS,
    )
    b = randn(W, K, 16, seed=24, device=DEVICE)
    overlap.matmul_reduce_scatter(randn(W, W * m, K, seed=23, device=DEVICE), b, world)
    clock = world.link.clock.tolist()
    per_rank = (W - 1) * m * ROW_NS
    if mode == "pipelined":
        assert clock[0] == W * per_rank
    else:
        assert clock[:W] == [per_rank] * W
    if mode == "fused":
        chunk_ns = [(hi - lo) * ROW_NS for lo, hi in map(ChunkLayout(m, chunk_m).rows, range(3))]
        arrivals = torch.tensor(clock[W:]).view(W, W, len(chunk_ns))  # [source, dest, chunk]
        for src in range(W):
            assert arrivals[src, src].tolist() == [0] * len(chunk_ns)
            times = sorted(arrivals[src].flatten().tolist())[len(chunk_ns) :]
            steps = [t1 - t0 for t0, t1 in zip([0, *times], times, strict=False)]
            assert sorted(steps) == sorted(chunk_ns * (W - 1)), (src, times)
            # The rows for the next rank are produced, hence sent, first.
            assert max(arrivals[src, (src + 1) % W]) < min(arrivals[src, (src + 2) % W])
    overlap.all_gather_matmul(randn(W, m, K, seed=25, device=DEVICE), b, world)
    assert world.link.clock[:W].tolist() == [1] * W  # origins (the interpreter's clock is 0)


def test_link_gbps_is_checked():
    for bad in (0, -450.0, float("inf"), float("nan"), True, "450"):
        with pytest.raises(ValueError, match="link_gbps"):
            overlap.LocalWorld(2, DEVICE, link_gbps=bad)
    assert overlap.LocalWorld(2, DEVICE).link is None


@pytest.mark.parametrize(
    "tma, config",
    [
        (True, {}),
        (False, dict(tma=False)),
        (False, dict(tile=dataclasses.replace(TILE, tma=False))),
    ],
    ids=["tma", "pointers", "pointer-tile"],
)
@pytest.mark.parametrize("weight_t", [False, True], ids=["b", "weight_t"])
def test_fused_gemms_with_and_without_tensor_descriptors(tma, config, weight_t):
    """OverlapConfig(tma=False) or a tile config with tma=False: pointer loads; else both main
    loops of both fused GEMMs read through descriptors, b as [K, n] or as a transposed weight
    (every shape here allows it). The TMA AG-GEMM reads the local rows from the gather buffer,
    after their flags (the producer copies them first)."""
    W, m, K, n = 3, 21, 16, 24
    world = _world(W, "fused", 5, **config)
    assert world.fused.tile.tma is tma
    b = (
        randn(W, n, K, seed=31, device=DEVICE).mT
        if weight_t
        else randn(W, K, n, seed=31, device=DEVICE)
    )
    a = randn(W, m, K, seed=30, device=DEVICE)
    c = overlap.all_gather_matmul(a, b, world)
    _check_tiles_once(world, "fused")
    assert_close(c, all_gather_matmul_ref(a, b), rtol=RTOL[DTYPE], name="all_gather_matmul")
    a = randn(W, W * m, K, seed=32, device=DEVICE)
    c = overlap.matmul_reduce_scatter(a, b, world)
    _check_tiles_once(world, "fused")
    assert_close(c, matmul_reduce_scatter_ref(a, b), rtol=RTOL[DTYPE], name="reduce_scatter")
