"""Nsight Compute counters of every kernel of a MoE layer step and of the fused overlap GEMM.

# T tokens, d hidden, F expert ffn, E experts, k top-k; M x K x N of a GEMM

Workloads (each profiled in its own process, only the kernels of one step after a warm-up one):
    moe:<shape>   moeblaze.moe_mlp forward + backward (recompute="activation", bf16) on a shape of
                  bench.moe_layer (default: mixtral and qwen3-30b-a3b)
    gemm-ag       all_gather_matmul on LocalWorld(1, mode="fused") at M=8192, K=8192, N=7168 (the
                  fused GEMM with every chunk present, as issue reports measured it), then
                  torch.matmul of the same shape (cuBLAS) for comparison
    routing       the router's top-k (softmax, k=8 of E=128, T=16384 float32 logits) and
                  build_routing_plan of its ids: the compiled kernels where moeblaze._C is
                  built (router_topk_kernel, routing_plan_kernel), else the torch top-k and
                  the Triton plan; the deferred id check's read-back is a copy, no kernel
                  (profiled only when named: not in the default list)

One row per kernel launch: workload, kernel, us (duration under ncu, which locks the clocks to
base: compare kernels, not wall time), sm_pct (compute throughput, % of peak), mem_pct (memory
throughput: the busiest of L1, L2 and DRAM), dram_pct, l2_hit_pct, occupancy_pct (achieved),
tensor_pct (Hopper wgmma pipe, % of active cycles, where this ncu knows the metric), registers,
smem_KiB (static + dynamic shared memory per block), grid, block. Results go to
kernel_profile-<gpu>.json and the reports to ncu-<workload>-<gpu>.ncu-rep (open them with
`ncu --import` or the Nsight Compute GUI).

    python -m bench.kernel_profile --out OUTDIR                 # GPU with Nsight Compute (ncu)
    python -m bench.kernel_profile --workloads moe:deepseek-ish
    python -m bench.kernel_profile --workloads moe:qwen3-30b-a3b --kernel-regex grad_act --full
    python -m bench.kernel_profile --workloads routing --full   # issue 11's latency kernels
    python -m bench.kernel_profile --workload moe:tiny          # one step, no ncu (what it runs)
"""

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the import of any @triton.jit module
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import harness  # noqa: E402

WORKLOADS = ("moe:mixtral", "moe:qwen3-30b-a3b", "gemm-ag")  # the default list
NAMED_WORKLOADS = ("gemm-ag", "routing")  # besides moe:<shape>
GEMM_AG_SHAPE = (8192, 8192, 7168)  # M, K, N
ROUTING_SHAPE = (16384, 128, 8)  # T, E, k: issue 11's target shape
NCU_PLACES = ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu")
# ncu metric -> column (times in us, sizes in KiB, whatever units ncu printed them in).
METRICS = {
    "gpu__time_duration.sum": "us",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem_pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
    "launch__registers_per_thread": "registers",
    "launch__shared_mem_per_block_static": "smem_KiB",
    "launch__shared_mem_per_block_dynamic": "smem_KiB",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
}
# Not known to every ncu version: the run is repeated without it where ncu rejects it.
OPTIONAL_METRICS = {
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor_pct",
}
# Unit -> factor to the column's unit: times to microseconds, sizes to KiB (ncu's "Kbyte" is
# 1000 bytes).
UNITS = {
    "nsecond": 1e-3,
    "usecond": 1.0,
    "msecond": 1e3,
    "second": 1e6,
    "byte": 1 / 1024,
    "Kbyte": 1000 / 1024,
    "Mbyte": 1e6 / 1024,
}
COLUMNS = (
    "workload",
    "kernel",
    "us",
    "sm_pct",
    "mem_pct",
    "dram_pct",
    "l2_hit_pct",
    "occupancy_pct",
    "tensor_pct",
    "registers",
    "smem_KiB",
    "grid",
    "block",
)


def moe_step(shape_name: str, device: torch.device):
    """A forward + backward of moe_mlp on a bench.moe_layer shape (bf16 on CUDA)."""
    import moeblaze
    from bench.moe_layer import SHAPES, make_inputs

    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; choose from {list(SHAPES)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = make_inputs(SHAPES[shape_name], dtype, device)
    grad = torch.randn_like(inputs.x)

    def step():
        out = moeblaze.moe_mlp(
            inputs.x, inputs.topk_ids, inputs.topk_weights, inputs.w13, inputs.w2
        )
        out.backward(grad)

    return step


def gemm_ag_step(device: torch.device, shape=GEMM_AG_SHAPE):
    """The fused AG-GEMM with nothing to wait for, then cuBLAS on the same shape."""
    import overlap

    M, K, N = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(1, M, K, device=device, dtype=dtype, generator=g)
    b = torch.randn(1, K, N, device=device, dtype=dtype, generator=g).mul_(K**-0.5)
    world = overlap.LocalWorld(1, device, mode="fused")

    def step():
        overlap.all_gather_matmul(a, b, world)
        torch.matmul(a[0], b[0])

    return step


def routing_step(device: torch.device, shape=ROUTING_SHAPE):
    """Router top-k on float32 logits, then the routing plan of the chosen ids."""
    from kernelbase import compiled
    from moeblaze.reference import router_topk_reference
    from moeblaze.routing_plan import build_routing_plan

    num_tokens, num_experts, top_k = shape
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, device=device, generator=g)
    if device.type == "cuda" and compiled.load("moeblaze") is not None:
        from moeblaze.kernels.compiled import router_topk
    else:
        router_topk = router_topk_reference

    def step():
        topk_ids, _, _ = router_topk(logits, top_k, "softmax")
        build_routing_plan(topk_ids, num_experts, block_m=128)

    return step


def run_workload(name: str) -> None:
    """One warm-up step of the workload, then one between cudaProfilerStart and Stop."""
    device = harness.default_device()
    if name.startswith("moe:"):
        step = moe_step(name.removeprefix("moe:"), device)
    elif name == "gemm-ag":
        step = gemm_ag_step(device, GEMM_AG_SHAPE if device.type == "cuda" else (64, 32, 48))
    elif name == "routing":
        step = routing_step(device, ROUTING_SHAPE if device.type == "cuda" else (64, 16, 4))
    else:
        raise ValueError(
            f"unknown workload {name!r}; choose from moe:<shape>, {', '.join(NAMED_WORKLOADS)}"
        )
    step()  # compiles the kernels: nothing of that is profiled
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.profiler.start()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.profiler.stop()


def find_ncu(given: str | None = None) -> str | None:
    """The ncu executable: `given`, else on PATH, else in the usual CUDA install places."""
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("ncu") or next((p for p in NCU_PLACES if Path(p).is_file()), None)


def profile(
    ncu: str, workload: str, report: Path, kernel_regex: str | None = None, full: bool = False
) -> str:
    """Run `workload` in a child process under ncu, exporting `report`; its CSV (long form).
    `kernel_regex`: profile only the kernels whose names match; `full`: also collect ncu's full
    section set (memory workload analysis, warp stall reasons, source counters) into the
    report, for `ncu --import REPORT --page details` (many replays per kernel: narrow it)."""
    env = dict(os.environ, LC_ALL="C", PYTHONUNBUFFERED="1")
    metrics = {**METRICS, **OPTIONAL_METRICS}
    select = ["--kernel-name", f"regex:{kernel_regex}"] if kernel_regex else []
    select += ["--set", "full"] if full else []
    for attempt in (metrics, METRICS):
        command = [
            ncu,
            "--profile-from-start",
            "off",
            *select,
            "--metrics",
            ",".join(attempt),
            "--export",
            str(report),
            "--force-overwrite",
            sys.executable,
            "-m",
            "bench.kernel_profile",
            "--workload",
            workload,
        ]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode == 0:
            break
        print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
        if attempt is METRICS or not any(m in run.stdout + run.stderr for m in OPTIONAL_METRICS):
            raise RuntimeError(f"ncu failed (exit {run.returncode}) on {workload}: {command}")
        print(f"ncu does not know {list(OPTIONAL_METRICS)}: profiling without", file=sys.stderr)
    imported = subprocess.run(
        [ncu, "--import", str(report), "--csv", "--page", "details", "--print-units", "base"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return imported.stdout


def parse_ncu_csv(text: str, workload: str) -> list[dict]:
    """Rows of COLUMNS from ncu's CSV: the long form (one line per kernel and metric: "ID",
    "Kernel Name", "Metric Name", "Metric Unit", "Metric Value", ...) or the wide form (one line
    per kernel, a column per metric, a line of units under the header). Lines before the header
    (ncu's own messages) are skipped; numbers may carry thousands separators."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line), None)
    if start is None:
        return []
    table = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    known = {**METRICS, **OPTIONAL_METRICS}
    launches: dict[str, dict] = {}
    if table and "Metric Name" in table[0]:
        for entry in table:
            if entry["Metric Name"] in known:
                launch = launches.setdefault(entry["ID"], _launch(workload, entry["Kernel Name"]))
                column = known[entry["Metric Name"]]
                _add(launch, column, entry["Metric Value"], entry["Metric Unit"])
    else:
        units = table[0] if table else {}
        for entry in table[1:]:
            launch = launches.setdefault(entry["ID"], _launch(workload, entry["Kernel Name"]))
            for metric in known.keys() & entry.keys():
                _add(launch, known[metric], entry[metric], units[metric])
    return list(launches.values())


def _launch(workload: str, kernel: str) -> dict:
    return dict(workload=workload, kernel=kernel.split("(")[0][:80])


def _add(launch: dict, column: str, value: str, unit: str) -> None:
    try:
        number = float(value.replace(",", "")) * UNITS.get(unit, 1.0)
    except ValueError:
        return  # "n/a" and the like
    launch[column] = launch.get(column, 0.0) + number  # smem: static + dynamic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--workload", help="run this workload's step once, unprofiled by us")
    parser.add_argument("--ncu", help="path of the ncu executable (default: PATH, CUDA dirs)")
    parser.add_argument("--kernel-regex", help="profile only kernels whose names match")
    parser.add_argument(
        "--full", action="store_true", help="ncu's full section set in the reports (slow)"
    )
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.workload:
        run_workload(args.workload)
        return 0
    if not torch.cuda.is_available():
        print("bench.kernel_profile needs a CUDA GPU and Nsight Compute (ncu)", file=sys.stderr)
        return 2
    ncu = find_ncu(args.ncu)
    if ncu is None:
        where = args.ncu or f"PATH, {', '.join(NCU_PLACES)}"
        print(f"Nsight Compute (ncu) not found (looked in {where})", file=sys.stderr)
        return 2
    env = harness.environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], False
    for workload in args.workloads.split(","):
        slug = workload.replace(":", "-")
        report = out / f"ncu-{slug}-{harness.gpu_slug(env['gpu'])}.ncu-rep"
        try:
            csv_text = profile(ncu, workload, report, args.kernel_regex, args.full)
            rows += parse_ncu_csv(csv_text, workload)
        except Exception as error:  # report it and go on with the next workload
            failed = True
            print(f"{workload}: FAILED: {error}", file=sys.stderr)
            rows.append(dict(workload=workload, error=f"{type(error).__name__}: {error}"[:300]))
        path = harness.write_results("kernel_profile", rows, env, out)  # kept if stopped
    print(f"\nkernels under Nsight Compute on {env['gpu']} (base clocks; us for comparison only)")
    harness.print_table(rows, COLUMNS)
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
