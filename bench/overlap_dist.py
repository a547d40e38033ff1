"""Overlap benchmark on a node: DistWorld fused vs pipelined vs serial, one process per rank.

# W ranks (processes), M rows in total (m = M/W per rank), K / k inner, n / N columns

Shapes of Llama-70B tensor parallelism as in bench/overlap.py, W = the number of processes:
    ag  AllGather(x [M/W, 8192]) @ w_up [8192, 28672/W]  -> [M, 28672/W]
    rs  ReduceScatter(h [M, 28672/W] @ w_down [28672/W, 8192]) -> [M/W, 8192]

Every time is the median of a fixed number of calls on each rank (CUDA events; a barrier before
each measurement), reported for the slowest rank, which is what a training step waits for:
  serial_ms, pipelined_ms, fused_ms  the op with that DistWorld mode ("fused" is missing, with
                 the reason in fused_unavailable, where peer memory does not work)
  comm_ms        the collective alone (all_gather_single / reduce_scatter_single)
  compute_ms     the same GEMM alone with all data present (cuBLAS on CUDA)
  efficiency     (serial - fused) / min(comm, compute);  fused_vs_serial  fused / serial

    torchrun --nproc-per-node 8 -m bench.overlap_dist      # one node of GPUs, NCCL
    python -m bench.overlap_dist --spawn 8                  # the same without torchrun
    python -m bench.overlap_dist --spawn 2 --shapes tiny    # CPU smoke run (gloo, interpreter)

Rank 0 writes bench/results/overlap_dist-<gpu>.json. On the CPU the fused kernels run under the
Triton interpreter: those numbers show that the script works, nothing about speed.
"""

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # must precede the import of any @triton.jit module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import overlap  # noqa: E402
from bench import harness  # noqa: E402
from bench.overlap import FFN, HIDDEN, TINY, Case, make_inputs  # noqa: E402

GPU_MS = (1024, 2048, 4096, 8192)
MODES = ("serial", "pipelined", "fused")
COLUMNS = (
    "op",
    "W",
    "M",
    "serial_ms",
    "pipelined_ms",
    "fused_ms",
    "comm_ms",
    "compute_ms",
    "efficiency",
    "fused_vs_serial",
)


def _worlds(device, chunk_m) -> tuple[dict, str | None]:
    """{mode: DistWorld} and, if the fused world cannot be built, why (the same on every rank)."""
    config = overlap.OverlapConfig(chunk_m=chunk_m, sync_status=False)
    worlds, unavailable = {}, None
    for mode in MODES:
        try:
            worlds[mode] = overlap.DistWorld(mode=mode, device=device, config=config)
        except ValueError as error:  # raised alike on every rank: peer memory is unavailable
            unavailable = str(error)
    return worlds, unavailable


def measure(case: Case, worlds: dict, dtype, device, runs: int) -> dict:
    """This rank's times for `case` (every rank must call it with the same case)."""
    r = dist.get_rank()
    a, b = (t[r] for t in make_inputs(case, dtype, device))
    row = dict(
        op=case.op,
        W=case.W,
        M=case.M,
        inner=case.inner,
        cols=case.cols,
        dtype=str(dtype).removeprefix("torch."),
    )

    def timed(fn) -> float:
        dist.barrier()
        return harness.time_ms_fixed(fn, device=device, runs=runs)

    for mode, world in worlds.items():
        op = world.all_gather_matmul if case.op == "ag" else world.matmul_reduce_scatter
        row[f"{mode}_ms"] = timed(lambda op=op: op(a, b))
        world.check_status()
    serial = worlds["serial"]  # its collectives: the torch version's non-deprecated names
    if case.op == "ag":
        gathered = a.new_empty(case.M, case.inner)
        row["comm_ms"] = timed(lambda: serial._all_gather(gathered, a, group=serial.group))
        row["compute_ms"] = timed(lambda: gathered @ b)
    else:
        partial = a @ b
        out = partial.new_empty(case.M // case.W, case.cols)
        row["comm_ms"] = timed(lambda: serial._reduce_scatter(out, partial, group=serial.group))
        row["compute_ms"] = timed(lambda: a @ b)
    return row


def run(rank: int, world_size: int, args, init_method: str) -> None:
    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        tiny = args.shapes == "tiny"
        hidden, ffn = (TINY["hidden"], TINY["ffn"]) if tiny else (HIDDEN, FFN)
        ms = (
            tuple(int(v) for v in args.ms.split(","))
            if args.ms
            else (TINY["ms"] if tiny else GPU_MS)
        )
        dtype = torch.bfloat16 if on_gpu else torch.float32
        worlds, unavailable = _worlds(device, args.chunk_m or (8 if tiny else None))
        W, rows = world_size, []
        for op in args.ops.split(","):
            for M in ms:
                inner, cols = (hidden, ffn // W) if op == "ag" else (ffn // W, hidden)
                mine = measure(Case(op, W, M, inner, cols), worlds, dtype, device, args.runs)
                every = [None] * W
                dist.all_gather_object(every, mine)
                row = {
                    k: max(r[k] for r in every) if k.endswith("_ms") else v for k, v in mine.items()
                }
                if "fused_ms" in row:
                    row["efficiency"] = (row["serial_ms"] - row["fused_ms"]) / min(
                        row["comm_ms"], row["compute_ms"]
                    )
                    row["fused_vs_serial"] = row["fused_ms"] / row["serial_ms"]
                else:
                    row["fused_unavailable"] = unavailable
                rows.append(row)
                if rank == 0:
                    env = harness.environment(device) | {"world_size": W}
                    path = harness.write_results("overlap_dist", rows, env, args.out)
        if rank == 0:
            print(f"\nMEASURED on {W} x {env['gpu']} (DistWorld; slowest rank per row)")
            harness.print_table(rows, COLUMNS)
            if unavailable:
                print(f"no fused rows: {unavailable}")
            print(f"\nwrote {path}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--spawn",
        type=int,
        default=None,
        help="start this many local ranks (default: launched by torchrun)",
    )
    parser.add_argument(
        "--shapes",
        choices=("llama70b", "tiny"),
        default="llama70b" if torch.cuda.is_available() else "tiny",
    )
    parser.add_argument("--ops", default="ag,rs")
    parser.add_argument("--ms", default=None, help="total rows M, comma-separated")
    parser.add_argument("--chunk-m", type=int, default=None, help="rows per chunk")
    parser.add_argument("--runs", type=int, default=20 if torch.cuda.is_available() else 2)
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.spawn is None:
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, "env://")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'store')}"
        torch.multiprocessing.spawn(run, args=(args.spawn, args, init_method), nprocs=args.spawn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
