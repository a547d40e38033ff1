"""Overlap benchmark: fused vs pipelined vs serial AG-GEMM / GEMM-RS on a LocalWorld (one GPU),
the fused kernel with all data present against cuBLAS, and a projection to W GPUs over NVLink.

# W ranks, M rows in total (m = M/W per rank), K / k inner, n / N columns

Shapes of Llama-70B tensor parallelism (hidden 8192, ffn 28672), bf16 on CUDA:
    ag  AllGather(x [M/W, 8192]) @ w_up [8192, 28672/W]  -> [M, 28672/W]
    rs  ReduceScatter(h [M, 28672/W] @ w_down [28672/W, 8192]) -> [M/W, 8192]
for W in {2, 4, 8} and M in {1024, 2048, 4096, 8192}. One row per (op, W, M).

MEASURED on one GPU (every time is for all W virtual ranks, which run one after another):
  serial_ms, pipelined_ms, fused_ms  the op with that LocalWorld mode
  auto_ms, auto_mode                 mode=None: serial below OVERLAP_MIN_FLOPS, above it what
                 overlap.tuning's thresholds for this GPU pick (the end of the run prints the
                 thresholds this run supports)
  comm_ms        the communication alone: AG the fused producer's copies and flag writes,
                 RS the fp32 reduction kernels reading the W partial buffers (flags already up)
  compute_ms     cuBLAS on the same GEMMs with all data present (= cublas_ms)
  efficiency     (serial - fused) / min(comm, compute)
  fused_vs_serial  fused_ms / serial_ms (target: <= 1.03 for auto at every M)
  serial_host_ms, pipelined_host_ms, fused_host_ms  host time per call of the mode, HOST_RUNS
                 calls back to back (bench.harness.host_us): near {mode}_ms, launches bound it
  fused_present_ms  the fused GEMM kernels alone, every flag already raised (AG) / without the
                 reduction (RS); frac_cublas = cublas_ms / fused_present_ms (target >= 0.9)
  chunked_ms     the pipelined schedule's per-chunk cuBLAS GEMMs alone, all data present
EMULATED LINK (--emulate-link GBPS; overlap.link): every mode's worlds are
  LocalWorld(link_gbps=GBPS), so each transfer between ranks takes its time on a link of that
  bandwidth, and serial/pipelined/fused/auto_ms include it. Then
  link_ms        the link's time by construction: W * (W-1) * m * K (AG) or N (RS) * bytes / GBPS
  comm_ms        AG max(link_ms, the copies); RS link_ms + the reduction
  efficiency     (serial - fused) / min(comm, compute) as above (target >= 0.8 at 450 GB/s, W=8)
PROJECTED for W GPUs over NVLink (bench/overlap_model.py; link bandwidth --link-gbps, assumed):
  proj_comm_ms, proj_gemm_ms, proj_serial_ms, proj_pipelined_ms, proj_fused_ms, proj_efficiency
  (per-rank compute = measured / W; see the model's docstring for what is not modelled)

    python -m bench.overlap                          # the GPU sweep above, results to bench/results
    python -m bench.overlap --world-sizes 8 --ms 8192 --ops ag
    python -m bench.overlap --world-sizes 8 --ms 8192 --tiles 128x256x64:8:3,128x256x64:8:3:ptr
                                                     # fused GEMM tile configs side by side
    python -m bench.overlap --world-sizes 8 --emulate-link 450   # overlap efficiency on one GPU
    python -m bench.overlap --shapes tiny --out OUTDIR  # CPU smoke run (Triton interpreter)

On the CPU the fused kernels run under the Triton interpreter: those numbers show that the
script works, nothing about speed.
"""

import argparse
import dataclasses
import functools
import os
import sys
import traceback

import torch

if not torch.cuda.is_available():  # must precede the import of any @triton.jit module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import overlap  # noqa: E402
from bench import harness  # noqa: E402
from bench.overlap_model import DEFAULT_LINK_GBPS, project  # noqa: E402
from kernelbase.gemm import GemmConfig  # noqa: E402
from kernelbase.profiling import profile_range  # noqa: E402
from overlap.kernels.ag_gemm import ag_gemm_tiles  # noqa: E402
from overlap.kernels.gemm_rs import gemm_rs_tiles  # noqa: E402
from overlap.protocol import HEADER_WORDS  # noqa: E402

HIDDEN, FFN = 8192, 28672  # Llama-70B
GPU_WORLD_SIZES, GPU_MS = (2, 4, 8), (1024, 2048, 4096, 8192)
TINY = dict(hidden=32, ffn=96, world_sizes=(2, 3), ms=(48,))

MEASURED = (
    "op",
    "W",
    "M",
    "tile",
    "emulated_link_GBps",
    "link_ms",
    "serial_ms",
    "pipelined_ms",
    "fused_ms",
    "serial_host_ms",
    "pipelined_host_ms",
    "fused_host_ms",
    "auto_ms",
    "auto_mode",
    "comm_ms",
    "compute_ms",
    "efficiency",
    "fused_vs_serial",
    "fused_present_ms",
    "frac_cublas",
    "chunked_ms",
)
PROJECTED = (
    "op",
    "W",
    "M",
    "link_GBps",
    "proj_comm_ms",
    "proj_gemm_ms",
    "proj_serial_ms",
    "proj_pipelined_ms",
    "proj_fused_ms",
    "proj_efficiency",
)


OPS = {"ag": "all_gather_matmul", "rs": "matmul_reduce_scatter"}
# Calls per host-time measurement: few enough that the launch queue never fills (then the host
# would wait for the GPU and the time would be the GPU's).
HOST_RUNS = 10
WINS = 1.03  # a schedule wins where it takes at most this times what it replaces
# overlap.tuning's tables: the schedule and the ones it replaces
REPLACES = {"fused": ("serial", "pipelined"), "pipelined": ("serial",)}


def thresholds(rows, mode: str) -> dict[str, float | None]:
    """Per op, the smallest per-rank FLOPs from which `mode` won (WINS against the faster of the
    schedules it replaces, REPLACES) at every measured shape at least that large: the
    overlap.tuning entry this run supports (None: mode=None must not pick `mode` by this)."""
    found = {}
    for op, name in OPS.items():
        wins_at: dict[float, bool] = {}  # shapes of equal FLOPs must all win
        for r in rows:
            if r["op"] == op and f"{mode}_ms" in r:
                flops = 2 * r["M"] * r["inner"] * r["cols"]
                won = r[f"{mode}_ms"] <= WINS * min(r[f"{o}_ms"] for o in REPLACES[mode])
                wins_at[flops] = wins_at.get(flops, True) and won
        threshold = None
        for flops in sorted(wins_at, reverse=True):
            if not wins_at[flops]:
                break
            threshold = flops
        found[name] = threshold
    return found


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "ag" or "rs"
    W: int
    M: int
    inner: int  # K (ag) or local k (rs)
    cols: int  # local n (ag) or N (rs)

    @property
    def flops(self) -> int:
        """GEMM FLOPs of one call, all W ranks together."""
        return 2 * self.W * self.M * self.inner * self.cols


def cases(ops, world_sizes, ms, hidden, ffn) -> list[Case]:
    out = []
    for op in ops:
        for W in world_sizes:
            for M in ms:
                if op == "ag":
                    out.append(Case("ag", W, M, inner=hidden, cols=ffn // W))
                else:
                    out.append(Case("rs", W, M, inner=ffn // W, cols=hidden))
    return out


def make_inputs(case: Case, dtype, device, seed=0):
    """Random (never zero) inputs scaled so outputs stay O(1): AG (a_shard, b), RS (a, b)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows = case.M // case.W if case.op == "ag" else case.M
    a = torch.randn(case.W, rows, case.inner, device=device, generator=g, dtype=dtype)
    b = torch.randn(case.W, case.inner, case.cols, device=device, generator=g, dtype=dtype)
    return a, b.mul_(case.inner**-0.5)


def _world(case, device, mode, chunk_m, tile=None, emulated_link=None):
    """A LocalWorld of the case; `tile`: the fused GEMMs' GemmConfig (None: the world's)."""
    config = overlap.OverlapConfig(chunk_m=chunk_m, sync_status=False, tile=tile)
    return overlap.LocalWorld(case.W, device, mode=mode, config=config, link_gbps=emulated_link)


def parse_tile(text: str) -> GemmConfig:
    """'BMxBNxBK:warps:stages[:tma|:ptr]' (e.g. 128x256x64:8:3:ptr) -> GemmConfig; tma by
    default."""
    try:
        sizes, warps, stages, *loads = text.split(":")
        block_m, block_n, block_k = (int(v) for v in sizes.split("x"))
        if loads not in ([], ["tma"], ["ptr"]):
            raise ValueError(loads)
        return GemmConfig(
            block_m,
            block_n,
            block_k,
            num_warps=int(warps),
            num_stages=int(stages),
            tma=loads != ["ptr"],
        )
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a tile is BMxBNxBK:warps:stages[:tma|:ptr], e.g. 128x256x64:8:3 or "
            f"128x256x64:8:3:ptr (pointer loads instead of tensor descriptors); got {text!r}"
        ) from None


def describe_tile(config: GemmConfig) -> str:
    sizes = f"{config.block_m}x{config.block_n}x{config.block_k}"
    return f"{sizes}:{config.num_warps}:{config.num_stages}:{'tma' if config.tma else 'ptr'}"


def _time(fn, device, rep_ms):
    return harness.time_ms(fn, device=device, rep_ms=rep_ms)


def measure(
    case: Case, dtype, device, chunk_m, rep_ms, link_gbps, tile=None, emulated_link=None
) -> dict:
    """One row: see the module docstring. `emulated_link`: GB/s of LocalWorld(link_gbps=...)."""
    a, b = make_inputs(case, dtype, device)
    op_fn = overlap.all_gather_matmul if case.op == "ag" else overlap.matmul_reduce_scatter
    row = dict(
        op=case.op,
        W=case.W,
        M=case.M,
        inner=case.inner,
        cols=case.cols,
        dtype=str(dtype).removeprefix("torch."),
        chunk_m=chunk_m,
        link_GBps=link_gbps,
        emulated_link_GBps=emulated_link,
    )
    fused_world = _world(case, device, "fused", chunk_m, tile, emulated_link)
    row["tile"] = describe_tile(fused_world.fused.tile_for(dtype))
    for mode, world in (
        ("serial", _world(case, device, "serial", chunk_m, None, emulated_link)),
        ("pipelined", _world(case, device, "pipelined", chunk_m, None, emulated_link)),
        ("fused", fused_world),
        ("auto", _world(case, device, None, chunk_m, tile, emulated_link)),
    ):
        with profile_range(f"bench overlap {case.op} W={case.W} M={case.M} {mode}"):
            row[f"{mode}_ms"] = _time(lambda w=world: op_fn(a, b, w), device, rep_ms)
        if mode != "auto":
            call = functools.partial(op_fn, a, b, world)
            row[f"{mode}_host_ms"] = harness.host_us(call, device=device, runs=HOST_RUNS) / 1e3
        world.check_status()
        if mode == "auto":
            row["auto_mode"] = world.mode_for(case.flops / case.W, op=OPS[case.op]).value
    alone = _ag_parts if case.op == "ag" else _rs_parts
    row.update(alone(case, a, b, fused_world, device, rep_ms))
    fused_world.check_status()
    row["cublas_ms"] = row["compute_ms"]
    if emulated_link:
        m, row_elems = case.M // case.W, case.inner if case.op == "ag" else case.cols
        row_bytes = row_elems * a.element_size()
        row["link_ms"] = case.W * (case.W - 1) * m * row_bytes / emulated_link / 1e6
        if case.op == "ag":
            row["comm_ms"] = max(row["link_ms"], row["comm_ms"])
        else:
            row["comm_ms"] += row["link_ms"]
    row["efficiency"] = (row["serial_ms"] - row["fused_ms"]) / min(
        row["comm_ms"], row["compute_ms"]
    )
    row["fused_vs_serial"] = row["fused_ms"] / row["serial_ms"]
    row["auto_vs_serial"] = row["auto_ms"] / row["serial_ms"]
    row["frac_cublas"] = row["cublas_ms"] / row["fused_present_ms"]
    row["fused_present_TFLOP/s"] = case.flops / (row["fused_present_ms"] * 1e-3) / 1e12
    row["cublas_TFLOP/s"] = case.flops / (row["cublas_ms"] * 1e-3) / 1e12
    layout = fused_world.chunk_layout(case.M // case.W)
    proj = project(
        case.op,
        case.W,
        case.M,
        case.inner,
        case.cols,
        a.element_size(),
        gemm_ms=row["compute_ms"] / case.W,
        fused_ms=row["fused_present_ms"] / case.W,
        chunked_ms=row["chunked_ms"] / case.W,
        chunks_per_rank=layout.count,
        link_gbps=link_gbps,
    )
    row.update(
        proj_comm_ms=proj.comm_ms,
        proj_gemm_ms=proj.gemm_ms,
        proj_serial_ms=proj.serial_ms,
        proj_pipelined_ms=proj.pipelined_ms,
        proj_fused_ms=proj.fused_ms,
        proj_efficiency=proj.efficiency,
    )
    return row


def _ag_parts(case, a_shard, b, world, device, rep_ms) -> dict:
    """AG: the producer alone, cuBLAS alone, the fused kernel alone, the chunked GEMMs alone."""
    W, m, K = a_shard.shape
    M, n = W * m, b.shape[-1]
    fused = world.fused
    layout = fused.chunk_layout(m)
    gathered = [a_shard.new_empty(M, K) for _ in range(W)]
    flags = [torch.zeros(W * layout.count, dtype=torch.int32, device=device) for _ in range(W)]
    out = a_shard.new_empty(W, M, n)
    full = a_shard.reshape(M, K)
    programs = fused.programs(ag_gemm_tiles(m, n, W, fused.tile_for(a_shard.dtype)), 0)

    def producer():
        for rank in range(W):
            fused.gather(a_shard, gathered[rank], flags[rank], layout, 1)

    def cublas():
        for rank in range(W):
            torch.matmul(full, b[rank], out=out[rank])

    def fused_present():  # every flag is up (the producer above raised them to epoch 1)
        for rank in range(W):
            fused.ag_gemm(
                rank, a_shard[rank], full, b[rank], out[rank], flags[rank], 1, layout, programs
            )

    def chunked():
        for rank in range(W):
            for src in range(W):
                for chunk in range(layout.count):
                    lo, hi = layout.rows(chunk)
                    rows = slice(src * m + lo, src * m + hi)
                    torch.matmul(full[rows], b[rank], out=out[rank, rows])

    parts = dict(comm_ms=_time(producer, device, rep_ms), compute_ms=_time(cublas, device, rep_ms))
    parts["fused_present_ms"] = _time(fused_present, device, rep_ms)
    world.check_status()  # no flag wait may time out with every flag raised
    parts["chunked_ms"] = _time(chunked, device, rep_ms)
    return parts


def _rs_parts(case, a, b, world, device, rep_ms) -> dict:
    """RS: the reduction alone, cuBLAS alone, the fused GEMM alone, the chunked GEMMs alone."""
    W, M, _ = a.shape
    m, N = M // W, b.shape[-1]
    fused = world.fused
    layout = fused.chunk_layout(m)
    overlap.matmul_reduce_scatter(a, b, world)  # fills the workspace, raises every flag
    ws, epoch = fused.rs_workspace, fused.epoch
    out = a.new_empty(W, m, N)
    partials = [a.new_empty(M, N) for _ in range(W)]
    programs = fused.programs(gemm_rs_tiles(m, N, W, fused.tile_for(a.dtype)), 0)

    def reduction():
        for dest in range(W):
            fused.rs_reduce(dest, ws.partial_table, ws.header_table, out[dest], epoch, layout)

    def cublas():
        for rank in range(W):
            torch.matmul(a[rank], b[rank], out=partials[rank])

    def fused_present():  # the GEMM-RS producer kernels without the reduction
        for rank in range(W):
            ws.counters[rank].zero_()
            flags = ws.flags[rank][HEADER_WORDS:]
            partial, counters = ws.partials[rank], ws.counters[rank]
            fused.rs_gemm(rank, a[rank], b[rank], partial, counters, flags, epoch, layout, programs)

    def chunked():
        for dest in range(W):
            for chunk in range(layout.count):
                lo, hi = layout.rows(chunk)
                torch.matmul(a[:, dest * m + lo : dest * m + hi], b)

    return dict(
        comm_ms=_time(reduction, device, rep_ms),
        compute_ms=_time(cublas, device, rep_ms),
        fused_present_ms=_time(fused_present, device, rep_ms),
        chunked_ms=_time(chunked, device, rep_ms),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument(
        "--shapes", choices=("llama70b", "tiny"), default="llama70b" if on_gpu else "tiny"
    )
    parser.add_argument("--ops", default="ag,rs")
    parser.add_argument("--world-sizes", default=None, help="comma-separated, e.g. 2,4,8")
    parser.add_argument("--ms", default=None, help="total rows M, comma-separated")
    parser.add_argument(
        "--chunk-m", type=int, default=None, help="rows per chunk (default: the world's)"
    )
    parser.add_argument(
        "--tiles",
        type=lambda text: [parse_tile(t) for t in text.split(",")],
        default=[None],
        help="fused GEMM tile configs BMxBNxBK:warps:stages[:tma|:ptr] (operands through tensor "
        "descriptors, the default, or pointer loads), comma-separated; one row per case and "
        "tile (default: the world's)",
    )
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=DEFAULT_LINK_GBPS,
        help="link bandwidth of the projection to W GPUs (a model)",
    )
    parser.add_argument(
        "--emulate-link",
        type=float,
        default=None,
        metavar="GBPS",
        help="measure every mode on LocalWorld(link_gbps=GBPS): transfers take their time on "
        "an emulated link of GBPS GB/s per direction",
    )
    parser.add_argument("--rep-ms", type=float, default=100 if on_gpu else 1)
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    args = parser.parse_args(argv)

    device = harness.default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.shapes == "tiny"
    hidden, ffn = (TINY["hidden"], TINY["ffn"]) if tiny else (HIDDEN, FFN)
    world_sizes = _ints(args.world_sizes) or (TINY["world_sizes"] if tiny else GPU_WORLD_SIZES)
    ms = _ints(args.ms) or (TINY["ms"] if tiny else GPU_MS)
    chunk_m = args.chunk_m or (8 if tiny else None)
    env = harness.environment(device)
    rows, failed = [], False
    runs = [
        (case, tile)
        for case in cases(args.ops.split(","), world_sizes, ms, hidden, ffn)
        for tile in args.tiles
    ]
    for case, tile in runs:
        try:
            rows.append(
                measure(
                    case,
                    dtype,
                    device,
                    chunk_m,
                    args.rep_ms,
                    args.link_gbps,
                    tile,
                    args.emulate_link,
                )
            )
        except Exception as error:  # e.g. out of memory: report the case and go on
            failed = True
            print(f"{case}: FAILED", file=sys.stderr)
            traceback.print_exception(error, limit=-3, file=sys.stderr)
            rows.append(
                dict(
                    op=case.op,
                    W=case.W,
                    M=case.M,
                    tile=describe_tile(tile) if tile else None,
                    error=f"{type(error).__name__}: {error}"[:300],
                )
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path = harness.write_results("overlap", rows, env, args.out)  # kept if a limit stops us

    link = f", links emulated at {args.emulate_link:g} GB/s" if args.emulate_link else ""
    print(f"\nMEASURED on one {env['gpu']} (LocalWorld: the W ranks run one after another{link})")
    harness.print_table(rows, MEASURED)
    print(
        f"\nPROJECTED for W GPUs over NVLink at {args.link_gbps:g} GB/s per direction "
        f"(bench/overlap_model.py: a model, not a measurement)"
    )
    harness.print_table(rows, PROJECTED)
    harness.plot(
        rows,
        path.with_suffix(".png"),
        x=("op", "W", "M"),
        series="op",
        metrics=("efficiency", "frac_cublas", "fused_vs_serial", "proj_efficiency"),
        title="overlap (LocalWorld, one GPU; proj_*: projected)",
    )
    if len(args.tiles) == 1 and not args.emulate_link:  # the tiles and links the library runs
        for mode, replaced in REPLACES.items():
            print(
                f"\noverlap.tuning.{mode.upper()}_FROM_FLOPS entries this run supports ({mode} "
                f"within {WINS}x of {' and '.join(replaced)} at every larger measured shape):"
            )
            for op, threshold in thresholds(rows, mode).items():
                key = ("LocalWorld", env["gpu"], op)
                print(f"    {key!r}: {threshold:_}," if threshold else f"    none for {key!r}")
    print(f"\nwrote {path}")
    return 1 if failed else 0


def _ints(text: str | None):
    return tuple(int(v) for v in text.split(",")) if text else None


if __name__ == "__main__":
    sys.exit(main())
